//! External oracle for the int8 GEMM: the ONNX backend node tests for MatMulInteger,
//! QLinearMatMul, ConvInteger and QLinearConv (`$QUANTBENCH_DATA/conformance/onnx-node`).
//! Every microkernel this CPU has computes the i32 products (convolutions through im2col);
//! the i32 outputs must match exactly. For the QLinear ops the float requantization of the
//! ONNX definition applied to our i32 result must match exactly, and our integer-only fused
//! epilogue (fixed-point multiplier) must be within one code of it. float16 cases are
//! skipped with the reason printed.

mod common;

use std::path::Path;

use common::{data_root, tensor, Tensor};
use quantbench_kernels::gemm::{
    gemm_i32, gemm_requantize, ActCode, Epilogue, Microkernel, OutputScale, PackedB,
};
use quantbench_kernels::integer_only::{quantize_multiplier, ChannelMultipliers, RequantOutput};
use quantbench_kernels::Code;
use serde_json::Value;

fn ints(t: &Tensor) -> Vec<i32> {
    t.values.iter().map(|&v| v as i32).collect()
}

fn signed(t: &Tensor) -> bool {
    match t.dtype.as_str() {
        "INT8" => true,
        "UINT8" => false,
        other => panic!("unexpected element type {other}"),
    }
}

/// B's codes and zero points as i8 (u8 weights shift by -128 on both, which leaves
/// `b - zb` unchanged).
fn weights_i8(b: &[i32], b_signed: bool, zb: &[i32]) -> (Vec<i8>, Vec<i32>) {
    let shift = if b_signed { 0 } else { 128 };
    (
        b.iter().map(|&v| (v - shift) as i8).collect(),
        zb.iter().map(|&z| z - shift).collect(),
    )
}

fn to_codes<A: ActCode>(a: &[i32]) -> Vec<A> {
    a.iter().map(|&v| A::from_i32(v)).collect()
}

/// `(A - za)(B - zb)` for `A [m x k]`, `B [k x n]` on microkernel `mk`.
#[allow(clippy::too_many_arguments)]
fn matmul(
    mk: Microkernel,
    a: &[i32],
    a_signed: bool,
    za: i32,
    m: usize,
    k: usize,
    b: &[i8],
    zb: &[i32],
    n: usize,
) -> Vec<i32> {
    let mut c = vec![0i32; m * n];
    if a_signed {
        let p = PackedB::new::<i8>(mk, b, k, n, zb).unwrap();
        gemm_i32(&to_codes::<i8>(a), m, za, &p, &mut c, 1).unwrap();
    } else {
        let p = PackedB::new::<u8>(mk, b, k, n, zb).unwrap();
        gemm_i32(&to_codes::<u8>(a), m, za, &p, &mut c, 1).unwrap();
    }
    c
}

/// The same product with the integer-only fused epilogue.
#[allow(clippy::too_many_arguments)]
fn matmul_requant<O: Code>(
    mk: Microkernel,
    a: &[i32],
    a_signed: bool,
    za: i32,
    m: usize,
    k: usize,
    b: &[i8],
    zb: &[i32],
    n: usize,
    epi: &Epilogue,
) -> Vec<i32> {
    let mut out = vec![O::default(); m * n];
    if a_signed {
        let p = PackedB::new::<i8>(mk, b, k, n, zb).unwrap();
        gemm_requantize(&to_codes::<i8>(a), m, za, &p, epi, &mut out, 1).unwrap();
    } else {
        let p = PackedB::new::<u8>(mk, b, k, n, zb).unwrap();
        gemm_requantize(&to_codes::<u8>(a), m, za, &p, epi, &mut out, 1).unwrap();
    }
    out.iter().map(|v| v.to_i32()).collect()
}

/// ONNX's float requantization: `saturate(rint(acc * (sa * sb / sy)) + zy)` in f32.
fn float_requant(acc: i32, sa: f32, sb: f32, sy: f32, zy: i32, lo: i32, hi: i32) -> i32 {
    let m = sa * sb / sy;
    ((acc as f32 * m).round_ties_even() as i32 + zy).clamp(lo, hi)
}

/// im2col of one NCHW image (N = 1, one group): rows = output pixels, columns =
/// (channel, ky, kx); padding reads the zero point.
#[allow(clippy::too_many_arguments)]
fn im2col(
    x: &[i32],
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    pads: [usize; 4],
    strides: [usize; 2],
    dil: [usize; 2],
    zp: i32,
) -> (Vec<i32>, usize, usize) {
    let oh = (h + pads[0] + pads[2] - dil[0] * (kh - 1) - 1) / strides[0] + 1;
    let ow = (w + pads[1] + pads[3] - dil[1] * (kw - 1) - 1) / strides[1] + 1;
    let mut cols = Vec::with_capacity(oh * ow * c * kh * kw);
    for oy in 0..oh {
        for ox in 0..ow {
            for ch in 0..c {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let y = (oy * strides[0] + ky * dil[0]) as isize - pads[0] as isize;
                        let xx = (ox * strides[1] + kx * dil[1]) as isize - pads[1] as isize;
                        let inside = y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < w;
                        cols.push(if inside {
                            x[(ch * h + y as usize) * w + xx as usize]
                        } else {
                            zp
                        });
                    }
                }
            }
        }
    }
    (cols, oh, ow)
}

fn attr_ints(node: &Value, name: &str) -> Option<Vec<usize>> {
    node["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == name)
        .map(|a| {
            a["value"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect()
        })
}

/// Outcome of one case on one microkernel: checked element count, or a skip reason.
enum Outcome {
    Checked(usize),
    Skipped(String),
}

fn run_case(dir: &Path, mk: Microkernel) -> Outcome {
    let case: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let name = case["case"].as_str().unwrap().to_string();
    let node = &case["graph"]["nodes"][0];
    let op = node["op_type"].as_str().unwrap();
    let set = &case["test_data_sets"][0];
    let by_name = |n: &str| -> Option<Tensor> {
        set["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == n)
            .map(tensor)
    };
    let input = |i: usize| -> Option<Tensor> {
        let names = node["inputs"].as_array().unwrap();
        names
            .get(i)
            .and_then(|n| n.as_str())
            .filter(|n| !n.is_empty())
            .and_then(by_name)
    };
    let expected = tensor(&set["outputs"][0]);
    let want = ints(&expected);
    if set["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["elem_type_name"] == "FLOAT16")
    {
        return Outcome::Skipped(format!(
            "{name}: float16 scales (the kernels take f32 scales)"
        ));
    }
    let zp_or_zero = |t: Option<Tensor>| t.map(|t| ints(&t)).unwrap_or_else(|| vec![0]);
    match op {
        "MatMulInteger" | "QLinearMatMul" => {
            let q = op == "QLinearMatMul";
            let (ia, ib, iza, izb) = if q { (0, 3, 2, 5) } else { (0, 1, 2, 3) };
            let a = input(ia).unwrap();
            let b = input(ib).unwrap();
            let za = zp_or_zero(input(iza))[0];
            let (bw, zb) = weights_i8(&ints(&b), signed(&b), &zp_or_zero(input(izb)));
            let (m, k) = (a.dims[a.dims.len() - 2], a.dims[a.dims.len() - 1]);
            let n = b.dims[b.dims.len() - 1];
            let batches = a.values.len() / (m * k);
            let b_batched = b.dims.len() == 3;
            let av = ints(&a);
            let mut acc = Vec::new();
            for bi in 0..batches {
                let bs = if b_batched {
                    &bw[bi * k * n..(bi + 1) * k * n]
                } else {
                    &bw[..]
                };
                acc.extend(matmul(
                    mk,
                    &av[bi * m * k..(bi + 1) * m * k],
                    signed(&a),
                    za,
                    m,
                    k,
                    bs,
                    &zb,
                    n,
                ));
            }
            if !q {
                assert_eq!(acc, want, "{name} on {}", mk.name());
                return Outcome::Checked(want.len());
            }
            let f = |i: usize| input(i).unwrap().values[0] as f32;
            let (sa, sb, sy) = (f(1), f(4), f(6));
            let zy = ints(&input(7).unwrap())[0];
            let y_signed = expected.dtype == "INT8";
            let (lo, hi) = if y_signed { (-128, 127) } else { (0, 255) };
            let got: Vec<i32> = acc
                .iter()
                .map(|&v| float_requant(v, sa, sb, sy, zy, lo, hi))
                .collect();
            assert_eq!(got, want, "{name} on {} (float requantization)", mk.name());
            // the integer-only epilogue, batch by batch
            let mult = quantize_multiplier(sa as f64 * sb as f64 / sy as f64).unwrap();
            let epi = Epilogue {
                bias: None,
                scale: OutputScale::PerTensor(mult),
                output: RequantOutput::new(zy, lo, hi).unwrap(),
            };
            let mut fixed = Vec::new();
            for bi in 0..batches {
                let bs = if b_batched {
                    &bw[bi * k * n..(bi + 1) * k * n]
                } else {
                    &bw[..]
                };
                let a_b = &av[bi * m * k..(bi + 1) * m * k];
                fixed.extend(if y_signed {
                    matmul_requant::<i8>(mk, a_b, signed(&a), za, m, k, bs, &zb, n, &epi)
                } else {
                    matmul_requant::<u8>(mk, a_b, signed(&a), za, m, k, bs, &zb, n, &epi)
                });
            }
            for (i, (&x, &y)) in fixed.iter().zip(&want).enumerate() {
                assert!(
                    (x - y).abs() <= 1,
                    "{name}: fixed-point epilogue element {i}: {x} vs {y}"
                );
            }
            Outcome::Checked(want.len())
        }
        "ConvInteger" | "QLinearConv" => {
            let q = op == "QLinearConv";
            let (ix, iw, izx, izw) = if q { (0, 3, 2, 5) } else { (0, 1, 2, 3) };
            let x = input(ix).unwrap();
            let w = input(iw).unwrap();
            let zx = zp_or_zero(input(izx))[0];
            let group = attr_ints(node, "group").map_or(1, |g| g[0]);
            if x.dims[0] != 1 || group != 1 {
                return Outcome::Skipped(format!("{name}: batch or groups > 1"));
            }
            let (c, h, wd) = (x.dims[1], x.dims[2], x.dims[3]);
            let (cout, kh, kw) = (w.dims[0], w.dims[2], w.dims[3]);
            let pads = attr_ints(node, "pads").unwrap_or(vec![0; 4]);
            let strides = attr_ints(node, "strides").unwrap_or(vec![1, 1]);
            let dil = attr_ints(node, "dilations").unwrap_or(vec![1, 1]);
            let (cols, oh, ow) = im2col(
                &ints(&x),
                c,
                h,
                wd,
                kh,
                kw,
                [pads[0], pads[1], pads[2], pads[3]],
                [strides[0], strides[1]],
                [dil[0], dil[1]],
                zx,
            );
            let k = c * kh * kw;
            // weights [cout, k] -> B [k, cout]
            let wv = ints(&w);
            let bt: Vec<i32> = (0..k)
                .flat_map(|kk| (0..cout).map(move |o| (kk, o)))
                .map(|(kk, o)| wv[o * k + kk])
                .collect();
            let (bw, zb) = weights_i8(&bt, signed(&w), &zp_or_zero(input(izw)));
            let acc = matmul(mk, &cols, signed(&x), zx, oh * ow, k, &bw, &zb, cout);
            // C [pixels, cout] -> NCHW
            let nchw = |v: &[i32]| -> Vec<i32> {
                (0..cout)
                    .flat_map(|o| (0..oh * ow).map(move |p| (o, p)))
                    .map(|(o, p)| v[p * cout + o])
                    .collect()
            };
            if !q {
                assert_eq!(nchw(&acc), want, "{name} on {}", mk.name());
                return Outcome::Checked(want.len());
            }
            let sx = input(1).unwrap().values[0] as f32;
            let sw: Vec<f32> = input(4).unwrap().values.iter().map(|&v| v as f32).collect();
            let sy = input(6).unwrap().values[0] as f32;
            let zy = ints(&input(7).unwrap())[0];
            let bias = input(8).map(|t| ints(&t));
            let y_signed = expected.dtype == "INT8";
            let (lo, hi) = if y_signed { (-128, 127) } else { (0, 255) };
            let swj = |j: usize| if sw.len() == 1 { sw[0] } else { sw[j] };
            let got: Vec<i32> = acc
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let j = i % cout;
                    let v = v + bias.as_ref().map_or(0, |b| b[j]);
                    float_requant(v, sx, swj(j), sy, zy, lo, hi)
                })
                .collect();
            assert_eq!(
                nchw(&got),
                want,
                "{name} on {} (float requantization)",
                mk.name()
            );
            let ms: Vec<_> = (0..cout)
                .map(|j| quantize_multiplier(sx as f64 * swj(j) as f64 / sy as f64).unwrap())
                .collect();
            let epi = Epilogue {
                bias,
                scale: OutputScale::PerChannel(ChannelMultipliers::new(&ms)),
                output: RequantOutput::new(zy, lo, hi).unwrap(),
            };
            let fixed = if y_signed {
                matmul_requant::<i8>(mk, &cols, signed(&x), zx, oh * ow, k, &bw, &zb, cout, &epi)
            } else {
                matmul_requant::<u8>(mk, &cols, signed(&x), zx, oh * ow, k, &bw, &zb, cout, &epi)
            };
            for (i, (&a, &b)) in nchw(&fixed).iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1,
                    "{name}: fixed-point epilogue element {i}: {a} vs {b}"
                );
            }
            Outcome::Checked(want.len())
        }
        _ => Outcome::Skipped(format!("{name}: not a GEMM op")),
    }
}

#[test]
fn onnx_integer_matmul_and_conv_cases_match_on_every_microkernel() {
    let root = data_root().join("conformance/onnx-node");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e} (set QUANTBENCH_DATA)", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            [
                "matmulinteger",
                "qlinearmatmul",
                "convinteger",
                "qlinearconv",
            ]
            .iter()
            .any(|op| n.contains(op))
        })
        .collect();
    dirs.sort();
    assert_eq!(
        dirs.len(),
        12,
        "expected the 12 GEMM cases in {}",
        root.display()
    );
    let mut checked_cases = 0;
    for mk in Microkernel::available() {
        for d in &dirs {
            match run_case(d, mk) {
                Outcome::Checked(n) => {
                    assert!(n > 0);
                    checked_cases += 1;
                }
                Outcome::Skipped(why) => {
                    if mk == Microkernel::Scalar {
                        println!("skipped {why}");
                    }
                }
            }
        }
    }
    // 8 cases without float16 per microkernel
    assert_eq!(checked_cases, 8 * Microkernel::available().len());
}
