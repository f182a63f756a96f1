//! `quantbench tensor`: quantize one tensor with one method and report everything about it:
//! parameters, codes, reconstruction, stored size and error.

use quantbench_kernels::fixed_point::{FixedPointFormat, Rounding};
use quantbench_kernels::kmeans;
use quantbench_kernels::pack::packed_len;
use quantbench_kernels::{ChannelLayout, Code, Kernels, LinearScheme, NoiseKey, QuantParams};
use serde_json::{json, Value};

/// Quantization method of the `tensor` command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorMethod {
    /// `r = scale * (q - zero_point)`, parameters from the data.
    Linear,
    /// Qm.n with a given number of fractional bits.
    Fixed,
    /// Qm.n with the fractional bits chosen from the data (per tensor or per channel).
    DynamicFixed,
    /// Optimal 1-D k-means codebook (per tensor or per channel) and one index per value.
    KMeans,
}

impl TensorMethod {
    pub fn name(self) -> &'static str {
        match self {
            TensorMethod::Linear => "linear",
            TensorMethod::Fixed => "fixed",
            TensorMethod::DynamicFixed => "dynamic-fixed",
            TensorMethod::KMeans => "kmeans",
        }
    }
}

/// One request, already parsed and validated for syntax.
#[derive(Clone, Debug)]
pub struct TensorRequest {
    pub method: TensorMethod,
    /// Bits per code; for k-means, `2^bits` clusters (or give `clusters`).
    pub bits: Option<u32>,
    /// k-means: number of clusters (codes take `ceil(log2 k)` bits).
    pub clusters: Option<usize>,
    /// k-means: the fast mode instead of the exact optimum.
    pub kmeans_fast: bool,
    pub symmetric: bool,
    pub unsigned: bool,
    pub frac_bits: Option<i32>,
    /// Per-channel axis (linear and dynamic-fixed).
    pub axis: Option<usize>,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    /// Seed of stochastic rounding (fixed-point methods); `None` rounds to nearest even.
    pub stochastic_seed: Option<u64>,
}

/// Result rows of every method: codes as integers and the reconstruction.
struct Quantized {
    params: Value,
    codes: Vec<i32>,
    dequantized: Vec<f32>,
    /// Bytes of the stored form: packed codes plus parameters.
    stored_bytes: usize,
}

/// Runs the request on `k` and returns the JSON report.
pub fn run(req: &TensorRequest, k: &Kernels) -> Result<Value, String> {
    let n = req.values.len();
    let shape_len = req.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if shape_len != Some(n) {
        return Err(format!(
            "--shape {:?} has {} elements, but {n} values were given",
            req.shape,
            shape_len.unwrap_or(0)
        ));
    }
    let layout = match req.axis {
        Some(axis) => {
            Some(ChannelLayout::new(&req.shape, axis).map_err(|e| format!("--axis: {e}"))?)
        }
        None => None,
    };
    let (q, bits) = match (req.method, req.bits, req.clusters) {
        (TensorMethod::KMeans, bits, clusters) => kmeans(req, k, layout, bits, clusters)?,
        (_, _, Some(_)) => return Err("--clusters applies to --method kmeans".into()),
        _ if req.kmeans_fast => return Err("--fast applies to --method kmeans".into()),
        (_, None, None) => return Err(format!("--method {} needs --bits N", req.method.name())),
        (TensorMethod::Linear, Some(b), None) => (linear(req, k, layout, b)?, b),
        (_, Some(b), None) => (fixed(req, k, layout, b)?, b),
    };
    let (mut signal, mut noise, mut finite) = (0f64, 0f64, 0usize);
    for (&x, &d) in req.values.iter().zip(&q.dequantized) {
        if x.is_finite() {
            signal += x as f64 * x as f64;
            noise += (d as f64 - x as f64).powi(2);
            finite += 1;
        }
    }
    let mse = if finite > 0 {
        noise / finite as f64
    } else {
        0.0
    };
    let sqnr_db = if noise > 0.0 {
        Some(10.0 * (signal / noise).log10())
    } else {
        None
    };
    let size_bits = q.stored_bytes * 8;
    Ok(json!({
        "method": req.method.name(),
        "bits": bits,
        "isa": k.isa().name(),
        "shape": req.shape,
        "axis": req.axis,
        "params": q.params,
        "codes": q.codes,
        "dequantized": q.dequantized,
        "size_bits": size_bits,
        "compression_vs_fp32": if size_bits > 0 { Some(32.0 * n as f64 / size_bits as f64) } else { None },
        "mse": mse,
        "sqnr_db": sqnr_db,
    }))
}

fn code_bytes(n: usize, bits: u32) -> usize {
    if bits <= 8 {
        packed_len(n, bits)
    } else {
        n * 2
    }
}

fn linear(
    req: &TensorRequest,
    k: &Kernels,
    layout: Option<ChannelLayout>,
    bits: u32,
) -> Result<Quantized, String> {
    if req.frac_bits.is_some() || req.stochastic_seed.is_some() {
        return Err(
            "--frac-bits and --stochastic-seed apply to the fixed-point methods only".into(),
        );
    }
    let scheme = LinearScheme::new(bits, !req.unsigned, req.symmetric)
        .map_err(|e| format!("--bits: {e}"))?;
    let x = &req.values;
    let params = match &layout {
        Some(l) => k.choose_params_per_channel(x, l, &scheme),
        None => k.choose_params(x, &scheme).map(|p| vec![p]),
    }
    .map_err(|e| e.to_string())?;
    let (codes, dequantized) = match (bits > 8, req.unsigned) {
        (false, false) => linear_codes::<i8>(k, x, layout, &params),
        (false, true) => linear_codes::<u8>(k, x, layout, &params),
        (true, false) => linear_codes::<i16>(k, x, layout, &params),
        (true, true) => linear_codes::<u16>(k, x, layout, &params),
    }
    .map_err(|e| e.to_string())?;
    let (qmin, qmax) = scheme.qrange();
    let pick = |f: &dyn Fn(&QuantParams) -> Value| -> Value {
        if layout.is_some() {
            Value::Array(params.iter().map(f).collect())
        } else {
            f(&params[0])
        }
    };
    let params_json = json!({
        "granularity": if layout.is_some() { "per_channel" } else { "per_tensor" },
        "symmetric": req.symmetric,
        "signed": !req.unsigned,
        "qmin": qmin,
        "qmax": qmax,
        "scale": pick(&|p| json!(p.scale())),
        "zero_point": pick(&|p| json!(p.zero_point())),
    });
    // stored: packed codes, then per parameter set an f32 scale and the zero point as one code
    let stored_bytes = code_bytes(x.len(), bits) + params.len() * (4 + (bits as usize).div_ceil(8));
    Ok(Quantized {
        params: params_json,
        codes,
        dequantized,
        stored_bytes,
    })
}

type Codes = (Vec<i32>, Vec<f32>);

fn linear_codes<T: Code>(
    k: &Kernels,
    x: &[f32],
    layout: Option<ChannelLayout>,
    params: &[QuantParams],
) -> Result<Codes, quantbench_kernels::KernelError> {
    let mut q = vec![T::default(); x.len()];
    let mut d = vec![0f32; x.len()];
    match layout {
        Some(l) => {
            k.quantize_per_channel(x, &l, params, &mut q)?;
            k.dequantize_per_channel(&q, &l, params, &mut d)?;
        }
        None => {
            k.quantize(x, &params[0], &mut q)?;
            k.dequantize(&q, &params[0], &mut d)?;
        }
    }
    Ok((q.iter().map(|c| c.to_i32()).collect(), d))
}

fn fixed(
    req: &TensorRequest,
    k: &Kernels,
    layout: Option<ChannelLayout>,
    bits: u32,
) -> Result<Quantized, String> {
    if req.symmetric || req.unsigned {
        return Err("--symmetric and --unsigned apply to the linear method only (fixed point is signed and symmetric)".into());
    }
    let x = &req.values;
    let formats: Vec<FixedPointFormat> = match (req.method, req.frac_bits) {
        (TensorMethod::Fixed, Some(f)) => {
            if layout.is_some() {
                return Err(
                    "--axis applies to linear and dynamic-fixed (fixed uses one format)".into(),
                );
            }
            vec![FixedPointFormat::new(bits, f).map_err(|e| format!("--bits/--frac-bits: {e}"))?]
        }
        (TensorMethod::Fixed, None) => return Err("--method fixed needs --frac-bits F".into()),
        (_, Some(_)) => {
            return Err("--frac-bits applies to --method fixed (dynamic-fixed chooses it)".into())
        }
        (_, None) => match &layout {
            Some(l) => k.dynamic_fixed_point_per_channel(x, l, bits),
            None => k.dynamic_fixed_point(x, bits).map(|f| vec![f]),
        }
        .map_err(|e| format!("--bits: {e}"))?,
    };
    let (codes, dequantized) = if bits <= 8 {
        fixed_codes::<i8>(k, x, layout, &formats, req.stochastic_seed)
    } else {
        fixed_codes::<i16>(k, x, layout, &formats, req.stochastic_seed)
    }
    .map_err(|e| e.to_string())?;
    let pick = |f: &dyn Fn(&FixedPointFormat) -> Value| -> Value {
        if layout.is_some() {
            Value::Array(formats.iter().map(f).collect())
        } else {
            f(&formats[0])
        }
    };
    let params_json = json!({
        "granularity": if layout.is_some() { "per_channel" } else { "per_tensor" },
        "total_bits": bits,
        "int_bits": pick(&|f| json!(f.int_bits())),
        "frac_bits": pick(&|f| json!(f.frac_bits())),
        "step": pick(&|f| json!(f.step())),
        "rounding": match req.stochastic_seed { Some(s) => json!({"stochastic_seed": s}), None => json!("nearest_even") },
    });
    // stored: packed codes, then one byte of fractional bits per format
    let stored_bytes = code_bytes(x.len(), bits) + formats.len();
    Ok(Quantized {
        params: params_json,
        codes,
        dequantized,
        stored_bytes,
    })
}

fn kmeans(
    req: &TensorRequest,
    k: &Kernels,
    layout: Option<ChannelLayout>,
    bits: Option<u32>,
    clusters: Option<usize>,
) -> Result<(Quantized, u32), String> {
    if req.symmetric || req.unsigned || req.frac_bits.is_some() || req.stochastic_seed.is_some() {
        return Err("--symmetric, --unsigned, --frac-bits and --stochastic-seed do not apply to --method kmeans".into());
    }
    let clusters = match (bits, clusters) {
        (Some(b), None) if (1..=8).contains(&b) => 1usize << b,
        (Some(b), None) => {
            return Err(format!(
                "--bits {b}: k-means takes 1..=8 bits (2..=256 clusters)"
            ))
        }
        (None, Some(c)) if (1..=kmeans::MAX_CLUSTERS).contains(&c) => c,
        (None, Some(c)) => {
            return Err(format!(
                "--clusters {c}: expected 1..={}",
                kmeans::MAX_CLUSTERS
            ))
        }
        (Some(_), Some(_)) => return Err("give --bits or --clusters, not both".into()),
        (None, None) => return Err("--method kmeans needs --bits N or --clusters K".into()),
    };
    // codes take ceil(log2 k) bits; the stored codebook always has k entries (fewer distinct
    // values than k leave unused entries)
    let index_bits = (clusters as u32).next_power_of_two().trailing_zeros();
    let x = &req.values;
    let fits = match (&layout, req.kmeans_fast) {
        (Some(l), false) => k.kmeans_optimal_per_channel(x, l, clusters),
        (None, false) => k.kmeans_optimal(x, clusters).map(|f| vec![f]),
        (Some(l), true) => l
            .gather(x)
            .and_then(|chs| chs.iter().map(|v| k.kmeans_fast(v, clusters)).collect()),
        (None, true) => k.kmeans_fast(x, clusters).map(|f| vec![f]),
    }
    .map_err(|e| e.to_string())?;
    let mut idx = vec![0u8; x.len()];
    let mut dequantized = vec![0f32; x.len()];
    let runs: Vec<(usize, usize, usize)> = match layout {
        Some(l) => l.runs().map(|(s, c)| (s, s + l.inner, c)).collect(),
        None => vec![(0, x.len(), 0)],
    };
    for (s, e, c) in runs {
        let cb = &fits[c].codebook;
        k.kmeans_assign(&x[s..e], cb, &mut idx[s..e])
            .map_err(|e| e.to_string())?;
        k.kmeans_decode(&idx[s..e], cb, &mut dequantized[s..e])
            .map_err(|e| e.to_string())?;
    }
    let pick = |f: &dyn Fn(&kmeans::KMeansFit) -> Value| -> Value {
        if layout.is_some() {
            Value::Array(fits.iter().map(f).collect())
        } else {
            f(&fits[0])
        }
    };
    let params = json!({
        "granularity": if layout.is_some() { "per_channel" } else { "per_tensor" },
        "mode": if req.kmeans_fast { "fast" } else { "exact" },
        "clusters": clusters,
        "index_bits": index_bits,
        "codebook": pick(&|f| json!(f.codebook.centroids())),
        "sse": pick(&|f| json!(f.sse)),
        // proven bound on sse minus the optimum's (0 for the exact mode)
        "gap_bound": pick(&|f| json!(f.gap_bound)),
    });
    let stored_bytes = packed_len(x.len(), index_bits.max(1)) * (index_bits > 0) as usize
        + fits.len() * clusters * 4;
    Ok((
        Quantized {
            params,
            codes: idx.iter().map(|&i| i as i32).collect(),
            dequantized,
            stored_bytes,
        },
        index_bits,
    ))
}

fn fixed_codes<T: Code>(
    k: &Kernels,
    x: &[f32],
    layout: Option<ChannelLayout>,
    formats: &[FixedPointFormat],
    seed: Option<u64>,
) -> Result<Codes, quantbench_kernels::KernelError> {
    let mut q = vec![T::default(); x.len()];
    let mut d = vec![0f32; x.len()];
    let rounding = |offset: usize| match seed {
        Some(s) => Rounding::Stochastic {
            key: NoiseKey::from_seed(s),
            offset: offset as u32,
        },
        None => Rounding::NearestEven,
    };
    let runs: Vec<(usize, usize, usize)> = match layout {
        Some(l) => l.runs().map(|(s, c)| (s, s + l.inner, c)).collect(),
        None => vec![(0, x.len(), 0)],
    };
    for (s, e, c) in runs {
        k.fixed_quantize(&x[s..e], &formats[c], rounding(s), &mut q[s..e])?;
        k.fixed_dequantize(&q[s..e], &formats[c], &mut d[s..e])?;
    }
    Ok((q.iter().map(|c| c.to_i32()).collect(), d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: TensorMethod, bits: u32, values: &[f32]) -> TensorRequest {
        TensorRequest {
            method,
            bits: Some(bits),
            clusters: None,
            kmeans_fast: false,
            symmetric: false,
            unsigned: false,
            frac_bits: None,
            axis: None,
            shape: vec![values.len()],
            values: values.to_vec(),
            stochastic_seed: None,
        }
    }

    #[test]
    fn seed_4x4_linear_2bit_is_smaller_and_exact_at_zero() {
        let values: Vec<f32> = (0..16).map(|i| i as f32 * 0.25 - 2.0).collect();
        let out = run(&req(TensorMethod::Linear, 2, &values), &Kernels::active()).unwrap();
        // 16 codes * 2 bits = 4 bytes, + f32 scale + 1 byte zero point = 9 bytes
        assert_eq!(out["size_bits"], 72);
        assert!((out["compression_vs_fp32"].as_f64().unwrap() - 512.0 / 72.0).abs() < 1e-12);
        let codes: Vec<i64> = out["codes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert!(codes.iter().all(|&c| (-2..=1).contains(&c)));
        let deq = out["dequantized"].as_array().unwrap();
        assert_eq!(deq[8].as_f64().unwrap(), 0.0, "zero is exact");
    }

    #[test]
    fn fixed_needs_frac_bits_and_per_channel_needs_matching_shape() {
        let k = Kernels::active();
        let e = run(&req(TensorMethod::Fixed, 8, &[1.0]), &k).unwrap_err();
        assert!(e.contains("--frac-bits"), "{e}");
        let mut r = req(TensorMethod::Linear, 8, &[1.0, 2.0, 3.0]);
        r.shape = vec![2, 2];
        assert!(run(&r, &k)
            .unwrap_err()
            .contains("has 4 elements, but 3 values"));
        r.shape = vec![3];
        r.axis = Some(1);
        assert!(run(&r, &k).unwrap_err().contains("axis 1 out of range"));
    }

    #[test]
    fn kmeans_seed_example_is_3_2x_smaller() {
        // the seed's worked example: 4x4 fp32 weights, 2-bit indices, 4 fp32 centroids
        let values: Vec<f32> = (0..16).map(|i| ((i * 7) % 16) as f32 * 0.3 - 2.0).collect();
        let mut r = req(TensorMethod::KMeans, 2, &values);
        r.shape = vec![4, 4];
        let out = run(&r, &Kernels::active()).unwrap();
        assert_eq!(out["size_bits"], 160);
        assert_eq!(out["compression_vs_fp32"], 3.2);
        assert_eq!(out["params"]["codebook"].as_array().unwrap().len(), 4);
        let r = TensorRequest {
            bits: None,
            clusters: Some(3),
            ..req(
                TensorMethod::KMeans,
                0,
                &[10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0],
            )
        };
        let out = run(&r, &Kernels::active()).unwrap();
        assert_eq!(out["params"]["codebook"], json!([20.0, 50.0, 80.0]));
        assert_eq!(out["codes"], json!([0, 0, 0, 1, 1, 1, 2, 2, 2]));
        assert_eq!(out["bits"], 2);
    }

    #[test]
    fn dynamic_fixed_per_channel_reports_each_format() {
        let mut r = req(TensorMethod::DynamicFixed, 8, &[0.5, -0.25, 10.0, 3.0]);
        r.shape = vec![2, 2];
        r.axis = Some(0);
        let out = run(&r, &Kernels::active()).unwrap();
        assert_eq!(out["params"]["frac_bits"], json!([7, 3]));
        assert_eq!(out["codes"], json!([64, -32, 80, 24]));
        assert_eq!(out["size_bits"], (4 + 2) * 8);
    }
}
