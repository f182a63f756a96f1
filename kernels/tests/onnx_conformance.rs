//! External oracle: the ONNX backend node tests for QuantizeLinear, DequantizeLinear and
//! DynamicQuantizeLinear (`$QUANTBENCH_DATA/conformance/onnx-node`, see ../shared/README.md).
//! Every case whose element types our codes cover (8/16-bit, int4/uint4/int2/uint2,
//! per-tensor, per-axis, blocked) must match exactly on every ISA; float8/float4 cases are
//! skipped with the reason printed.

mod common;

use std::path::Path;

use common::{data_root, isas, tensor, Tensor};
use quantbench_kernels::linear::qrange;
use quantbench_kernels::pack::{pack_codes, unpack_codes};
use quantbench_kernels::{ChannelLayout, Code, Kernels, LinearScheme, QuantParams};
use serde_json::Value;

/// (bits, signed) of an ONNX integer element type we support.
fn int_type(name: &str) -> Option<(u32, bool)> {
    Some(match name {
        "INT8" => (8, true),
        "UINT8" => (8, false),
        "INT16" => (16, true),
        "UINT16" => (16, false),
        "INT4" => (4, true),
        "UINT4" => (4, false),
        "INT2" => (2, true),
        "UINT2" => (2, false),
        _ => return None,
    })
}

/// For every element of `x_dims`, the index of its parameter set: per-tensor (0),
/// per-axis (index along `axis`) or blocked (`scale_dims` has x's rank, axis dim / block).
fn param_index(x_dims: &[usize], scale_dims: &[usize], axis: usize, block: usize) -> Vec<usize> {
    let n: usize = x_dims.iter().product();
    let count: usize = scale_dims.iter().product();
    (0..n)
        .map(|i| {
            if count == 1 {
                return 0;
            }
            let mut rem = i;
            let mut idx = vec![0usize; x_dims.len()];
            for d in (0..x_dims.len()).rev() {
                idx[d] = rem % x_dims[d];
                rem /= x_dims[d];
            }
            if scale_dims.len() == 1 {
                return idx[axis];
            }
            idx[axis] /= block;
            idx.iter()
                .zip(scale_dims)
                .fold(0, |acc, (&v, &d)| acc * d + v)
        })
        .collect()
}

enum Outcome {
    Pass,
    Skip(String),
}

fn attr(node: &Value, name: &str) -> Option<i64> {
    node["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == name)
        .and_then(|a| a["value"].as_i64())
}

/// Quantizes or dequantizes on `k` through the per-tensor / per-channel API, or for blocked
/// layouts by gathering each parameter group into one contiguous call.
fn run_q<T: Code>(
    k: &Kernels,
    x: &[f32],
    groups: &[usize],
    params: &[QuantParams],
    layout: Option<ChannelLayout>,
) -> Vec<i32> {
    let mut out = vec![T::default(); x.len()];
    if params.len() == 1 {
        k.quantize(x, &params[0], &mut out).unwrap();
    } else if let Some(l) = layout {
        k.quantize_per_channel(x, &l, params, &mut out).unwrap();
    } else {
        for (g, p) in params.iter().enumerate() {
            let idx: Vec<usize> = (0..x.len()).filter(|&i| groups[i] == g).collect();
            let xs: Vec<f32> = idx.iter().map(|&i| x[i]).collect();
            let mut qs = vec![T::default(); xs.len()];
            k.quantize(&xs, p, &mut qs).unwrap();
            for (j, &i) in idx.iter().enumerate() {
                out[i] = qs[j];
            }
        }
    }
    out.iter().map(|c| c.to_i32()).collect()
}

fn run_dq<T: Code>(
    k: &Kernels,
    q: &[i32],
    groups: &[usize],
    params: &[QuantParams],
    layout: Option<ChannelLayout>,
) -> Vec<f32> {
    let codes: Vec<T> = q.iter().map(|&v| T::from_i32(v)).collect();
    let mut out = vec![0f32; q.len()];
    if params.len() == 1 {
        k.dequantize(&codes, &params[0], &mut out).unwrap();
    } else if let Some(l) = layout {
        k.dequantize_per_channel(&codes, &l, params, &mut out)
            .unwrap();
    } else {
        for (g, p) in params.iter().enumerate() {
            let idx: Vec<usize> = (0..q.len()).filter(|&i| groups[i] == g).collect();
            let cs: Vec<T> = idx.iter().map(|&i| codes[i]).collect();
            let mut fs = vec![0f32; cs.len()];
            k.dequantize(&cs, p, &mut fs).unwrap();
            for (j, &i) in idx.iter().enumerate() {
                out[i] = fs[j];
            }
        }
    }
    out
}

fn dispatch_q(
    k: &Kernels,
    bits: u32,
    signed: bool,
    x: &[f32],
    g: &[usize],
    p: &[QuantParams],
    l: Option<ChannelLayout>,
) -> Vec<i32> {
    match (bits > 8, signed) {
        (false, true) => run_q::<i8>(k, x, g, p, l),
        (false, false) => run_q::<u8>(k, x, g, p, l),
        (true, true) => run_q::<i16>(k, x, g, p, l),
        (true, false) => run_q::<u16>(k, x, g, p, l),
    }
}

fn dispatch_dq(
    k: &Kernels,
    bits: u32,
    signed: bool,
    q: &[i32],
    g: &[usize],
    p: &[QuantParams],
    l: Option<ChannelLayout>,
) -> Vec<f32> {
    match (bits > 8, signed) {
        (false, true) => run_dq::<i8>(k, q, g, p, l),
        (false, false) => run_dq::<u8>(k, q, g, p, l),
        (true, true) => run_dq::<i16>(k, q, g, p, l),
        (true, false) => run_dq::<u16>(k, q, g, p, l),
    }
}

fn run_case(dir: &Path) -> Outcome {
    let case: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let name = case["case"].as_str().unwrap().to_string();
    let nodes = case["graph"]["nodes"].as_array().unwrap();
    let set = &case["test_data_sets"][0];
    let inputs: Vec<Tensor> = set["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(tensor)
        .collect();
    let outputs: Vec<Tensor> = set["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(tensor)
        .collect();

    if name.contains("dynamicquantizelinear") {
        // y_scale = (max(x,0) - min(x,0)) / 255, zero point and codes as ONNX defines them
        let x: Vec<f32> = inputs[0].bits.iter().map(|&b| f32::from_bits(b)).collect();
        let scheme = LinearScheme::new(8, false, false).unwrap();
        for isa in isas() {
            let k = Kernels::new(isa).unwrap();
            let p = k.choose_params(&x, &scheme).unwrap();
            assert_eq!(
                p.scale().to_bits(),
                outputs[1].bits[0],
                "{name} {isa}: y_scale"
            );
            assert_eq!(
                p.zero_point() as f64,
                outputs[2].values[0],
                "{name} {isa}: y_zero_point"
            );
            let mut q = vec![0u8; x.len()];
            k.quantize(&x, &p, &mut q).unwrap();
            let want: Vec<u8> = outputs[0].values.iter().map(|&v| v as u8).collect();
            assert_eq!(q, want, "{name} {isa}: y");
        }
        return Outcome::Pass;
    }

    let node = &nodes[0];
    let op = node["op_type"].as_str().unwrap();
    let (code_t, float_in) = match op {
        "QuantizeLinear" => (&outputs[0], &inputs[0]),
        "DequantizeLinear" => (&inputs[0], &outputs[0]),
        other => return Outcome::Skip(format!("operator {other} belongs to the GEMM issue")),
    };
    let Some((bits, signed)) = int_type(&code_t.dtype) else {
        return Outcome::Skip(format!(
            "element type {} (float8/float4) has no integer codes",
            code_t.dtype
        ));
    };
    let x_dims = float_in.dims.clone();
    let rank = x_dims.len();
    let axis = {
        let a = attr(node, "axis").unwrap_or(1);
        if a < 0 {
            (a + rank as i64) as usize
        } else {
            a as usize
        }
    };
    let block = attr(node, "block_size").unwrap_or(0) as usize;
    let scale = &inputs[1];
    let scales: Vec<f32> = scale.bits.iter().map(|&b| f32::from_bits(b)).collect();
    let zps: Vec<i32> = match inputs.get(2) {
        Some(z) => z.values.iter().map(|&v| v as i32).collect(),
        None => vec![0; scales.len()],
    };
    let (qmin, qmax) = qrange(bits, signed).unwrap();
    let params: Vec<QuantParams> = scales
        .iter()
        .zip(&zps)
        .map(|(&s, &z)| QuantParams::new(s, z, qmin, qmax).unwrap())
        .collect();
    let groups = param_index(&x_dims, &scale.dims, axis, block);
    let layout = (params.len() > 1 && scale.dims.len() == 1)
        .then(|| ChannelLayout::new(&x_dims, axis).unwrap());

    for isa in isas() {
        let k = Kernels::new(isa).unwrap();
        if op == "QuantizeLinear" {
            let x: Vec<f32> = inputs[0].bits.iter().map(|&b| f32::from_bits(b)).collect();
            let q = dispatch_q(&k, bits, signed, &x, &groups, &params, layout);
            let want: Vec<i32> = outputs[0].values.iter().map(|&v| v as i32).collect();
            assert_eq!(q, want, "{name} {isa}");
            if bits < 8 {
                // sub-byte codes really pack to `bits` bits each and unpack unchanged
                let codes: Vec<i8> = q.iter().map(|&v| v as i8).collect();
                let packed = pack_codes(&codes, qmin, bits).unwrap();
                assert_eq!(packed.len(), (q.len() * bits as usize).div_ceil(8));
                assert_eq!(
                    unpack_codes::<i8>(&packed, qmin, bits, q.len()).unwrap(),
                    codes
                );
            }
        } else {
            let q: Vec<i32> = inputs[0].values.iter().map(|&v| v as i32).collect();
            let y = dispatch_dq(&k, bits, signed, &q, &groups, &params, layout);
            let got: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, outputs[0].bits, "{name} {isa}");
        }
    }
    Outcome::Pass
}

#[test]
fn onnx_quantize_dequantize_conformance() {
    let root = data_root().join("conformance/onnx-node");
    assert!(
        root.is_dir(),
        "ONNX conformance cases not found at {} (set QUANTBENCH_DATA to the shared data root)",
        root.display()
    );
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            p.is_dir() && (n.contains("quantizelinear") || n.contains("dequantizelinear"))
        })
        .collect();
    dirs.sort();
    let (mut passed, mut skipped) = (Vec::new(), Vec::new());
    for d in &dirs {
        let name = d.file_name().unwrap().to_string_lossy().to_string();
        match run_case(d) {
            Outcome::Pass => passed.push(name),
            Outcome::Skip(why) => skipped.push(format!("{name}: {why}")),
        }
    }
    eprintln!(
        "ONNX conformance: {} passed, {} skipped",
        passed.len(),
        skipped.len()
    );
    for s in &skipped {
        eprintln!("  skipped {s}");
    }
    // 33 Q/DQ/DynamicQ cases ship; 8 of them are float8/float4
    assert_eq!(dirs.len(), 33, "case directory changed");
    assert_eq!(passed.len(), 25, "passed: {passed:?}");
}
