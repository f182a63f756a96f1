//! In-process timing of one kernel on one array, for the peer comparison
//! (`cargo xtask compare quantize`). Single thread; the median of `reps` timed calls after
//! warm-up calls; throughput in GB/s of f32 data (4 bytes per element), the unit the peers'
//! numbers are quoted in.

use std::time::Instant;

use quantbench_kernels::{ChannelLayout, Kernels, QuantParams};
use serde_json::{json, Value};

/// Kernels the comparison times.
pub const KERNELS: [&str; 4] = [
    "quantize",
    "dequantize",
    "quantize_per_channel",
    "dequantize_per_channel",
];

/// Per-channel parameters used by both sides of the comparison: channel `c` of `channels`
/// has scale `scale * (1 + c / channels)` and the common zero point.
pub fn channel_params(
    scale: f32,
    zero_point: i32,
    channels: usize,
) -> Result<Vec<QuantParams>, String> {
    (0..channels)
        .map(|c| {
            QuantParams::with_bits(
                scale * (1.0 + c as f32 / channels as f32),
                zero_point,
                8,
                true,
            )
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())
}

fn median_seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// The medians of `f` and `g` timed in alternation, `reps` calls each (after 3 of each
/// untimed): both see the same state of the machine, so their ratio does not carry the drift
/// between two separate runs.
fn median_seconds_pair(reps: usize, mut f: impl FnMut(), mut g: impl FnMut()) -> (f64, f64) {
    for _ in 0..3 {
        f();
        g();
    }
    let (mut tf, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        let s = Instant::now();
        f();
        tf.push(s.elapsed().as_secs_f64());
        let s = Instant::now();
        g();
        tg.push(s.elapsed().as_secs_f64());
    }
    tf.sort_by(f64::total_cmp);
    tg.sort_by(f64::total_cmp);
    (tf[tf.len() / 2], tg[tg.len() / 2])
}

/// Times `kernel` on `x` (f32 -> i8 codes with the given parameters) and returns one JSON
/// record `{kernel, n, threads, isa, seconds, gbps}`. A per-channel kernel's calls alternate
/// with its per-tensor counterpart's on the same data, and the record adds
/// `per_tensor_seconds`, `per_tensor_gbps` and `ratio` (per-channel / per-tensor GB/s). With `expected_codes` (a peer's int8
/// output for the same data), a quantize kernel's codes are compared and the record gets
/// `code_mismatches`.
#[allow(clippy::too_many_arguments)]
pub fn time_kernel(
    k: &Kernels,
    kernel: &str,
    x: &[f32],
    scale: f32,
    zero_point: i32,
    channels: usize,
    reps: usize,
    expected_codes: Option<&[u8]>,
) -> Result<Value, String> {
    let n = x.len();
    let p = QuantParams::with_bits(scale, zero_point, 8, true).map_err(|e| e.to_string())?;
    let mut q = vec![0i8; n];
    let mut out = vec![0f32; n];
    k.quantize(x, &p, &mut q).map_err(|e| e.to_string())?;
    let per_channel = kernel.ends_with("per_channel");
    let (layout, cp) = if per_channel {
        if channels == 0 || !n.is_multiple_of(channels) {
            return Err(format!("--channels {channels} does not divide n = {n}"));
        }
        (
            Some(ChannelLayout::new(&[channels, n / channels], 0).map_err(|e| e.to_string())?),
            channel_params(scale, zero_point, channels)?,
        )
    } else {
        (None, Vec::new())
    };
    let mut per_tensor_seconds = None;
    let seconds = match kernel {
        "quantize" => median_seconds(reps, || k.quantize(x, &p, &mut q).unwrap()),
        "dequantize" => median_seconds(reps, || k.dequantize(&q, &p, &mut out).unwrap()),
        "copy" => median_seconds(reps, || out.copy_from_slice(std::hint::black_box(x))),
        "quantize_per_channel" => {
            let l = layout.unwrap();
            // both write the same output (separate ones would evict each other from the
            // cache at the sizes that fit), then the per-channel codes once more for the check
            let q = std::cell::RefCell::new(&mut q);
            let (pc, pt) = median_seconds_pair(
                reps,
                || {
                    k.quantize_per_channel(x, &l, &cp, &mut q.borrow_mut())
                        .unwrap()
                },
                || k.quantize(x, &p, &mut q.borrow_mut()).unwrap(),
            );
            let q = q.into_inner();
            k.quantize_per_channel(x, &l, &cp, q).unwrap();
            per_tensor_seconds = Some(pt);
            pc
        }
        "dequantize_per_channel" => {
            let l = layout.unwrap();
            let out = std::cell::RefCell::new(&mut out);
            let (pc, pt) = median_seconds_pair(
                reps,
                || {
                    k.dequantize_per_channel(&q, &l, &cp, &mut out.borrow_mut())
                        .unwrap()
                },
                || k.dequantize(&q, &p, &mut out.borrow_mut()).unwrap(),
            );
            per_tensor_seconds = Some(pt);
            pc
        }
        other => {
            return Err(format!(
                "--kernel {other}: expected one of {}",
                KERNELS.join(", ")
            ))
        }
    };
    let mut rec = json!({
        "kernel": kernel,
        "n": n,
        "threads": 1,
        "isa": k.isa().name(),
        "seconds": seconds,
        "gbps": 4.0 * n as f64 / seconds / 1e9,
    });
    if let Some(pt) = per_tensor_seconds {
        rec["per_tensor_seconds"] = json!(pt);
        rec["per_tensor_gbps"] = json!(4.0 * n as f64 / pt / 1e9);
        rec["ratio"] = json!(pt / seconds);
    }
    if let (Some(expected), true) = (expected_codes, kernel.starts_with("quantize")) {
        if expected.len() != n {
            return Err(format!(
                "expected codes: {} bytes for {n} values",
                expected.len()
            ));
        }
        let mismatches = q
            .iter()
            .zip(expected)
            .filter(|(&a, &b)| a as u8 != b)
            .count();
        rec["code_mismatches"] = json!(mismatches);
    }
    Ok(rec)
}

/// Times the int8 GEMM `kernel` (`gemm_u8i8_i32` or `gemm_i8i8_i32`) on an `m x k x n`
/// problem with seeded codes, `threads` threads, A zero point `a_zero_point` (in the u8
/// domain; the i8 kernel uses `a_zero_point - 128`). Median of timed calls filling about
/// `target_s` seconds. Returns `{kernel, m, k, n, threads, isa, microkernel, ours_s,
/// ours_gops, peak_gops, pct_of_peak}` (peak: [`quantbench_kernels::gemm::measured_peak_gops`]).
pub fn time_gemm(
    k: &Kernels,
    kernel: &str,
    (m, kk, n): (usize, usize, usize),
    threads: usize,
    a_zero_point: i32,
    target_s: f64,
    peak_gops: Option<f64>,
) -> Result<Value, String> {
    use quantbench_kernels::gemm::gemm_i32;
    let signed = match kernel {
        "gemm_u8i8_i32" => false,
        "gemm_i8i8_i32" => true,
        other => {
            return Err(format!(
                "--kernel {other}: expected gemm_u8i8_i32 or gemm_i8i8_i32"
            ))
        }
    };
    if m == 0 || kk == 0 || n == 0 {
        return Err(format!("shape {m}x{kk}x{n}: every dimension must be >= 1"));
    }
    // seeded codes (xorshift64): the data do not change the time, only keep it honest
    let mut s = 0x2545_F491_4F6C_DD1Du64 ^ (m * 31 + kk * 17 + n) as u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 24) as u8
    };
    let b: Vec<i8> = (0..kk * n).map(|_| next() as i8).collect();
    let a: Vec<u8> = (0..m * kk).map(|_| next()).collect();
    let mut c = vec![0i32; m * n];
    let mk = k.gemm_microkernel();
    let mut call: Box<dyn FnMut()> = if signed {
        let a: Vec<i8> = a.iter().map(|&v| (v ^ 0x80) as i8).collect();
        let p = k.pack_b::<i8>(&b, kk, n, &[0]).map_err(|e| e.to_string())?;
        let za = a_zero_point - 128;
        Box::new(move || gemm_i32(&a, m, za, &p, &mut c, threads).unwrap())
    } else {
        let p = k.pack_b::<u8>(&b, kk, n, &[0]).map_err(|e| e.to_string())?;
        Box::new(move || gemm_i32(&a, m, a_zero_point, &p, &mut c, threads).unwrap())
    };
    let start = Instant::now();
    call();
    let one = start.elapsed().as_secs_f64().max(1e-7);
    let reps = ((target_s / one) as usize).clamp(5, 5000);
    let seconds = median_seconds(reps, &mut *call);
    let gops = 2.0 * (m * kk * n) as f64 / seconds / 1e9;
    Ok(json!({
        "kernel": kernel, "m": m, "k": kk, "n": n, "threads": threads,
        "isa": k.isa().name(), "microkernel": mk.name(),
        "ours_s": seconds, "ours_gops": gops,
        "peak_gops": peak_gops,
        "pct_of_peak": peak_gops.map(|p| 100.0 * gops / (p * threads as f64)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A per-channel record carries its per-tensor counterpart timed in the same process,
    /// the ratio of the two, and codes equal to the per-channel kernel's (not the per-tensor
    /// calls' that alternate with it).
    #[test]
    fn per_channel_records_carry_the_interleaved_per_tensor_timing() {
        let k = Kernels::active();
        let x: Vec<f32> = (0..4096).map(|i| (i % 97) as f32 / 10.0 - 4.8).collect();
        let cp = channel_params(0.05, -3, 4).unwrap();
        let layout = ChannelLayout::new(&[4, 1024], 0).unwrap();
        let mut want = vec![0i8; 4096];
        k.quantize_per_channel(&x, &layout, &cp, &mut want).unwrap();
        let want: Vec<u8> = want.iter().map(|&v| v as u8).collect();
        let rec = time_kernel(&k, "quantize_per_channel", &x, 0.05, -3, 4, 5, Some(&want)).unwrap();
        assert_eq!(rec["code_mismatches"], 0);
        let (pc, pt) = (
            rec["seconds"].as_f64().unwrap(),
            rec["per_tensor_seconds"].as_f64().unwrap(),
        );
        assert!(pc > 0.0 && pt > 0.0);
        assert_eq!(rec["ratio"].as_f64().unwrap(), pt / pc);
        assert_eq!(
            rec["per_tensor_gbps"].as_f64().unwrap(),
            4.0 * 4096.0 / pt / 1e9
        );
        let rec = time_kernel(&k, "dequantize_per_channel", &x, 0.05, -3, 4, 5, None).unwrap();
        assert!(rec["per_tensor_seconds"].as_f64().unwrap() > 0.0);
        let rec = time_kernel(&k, "quantize", &x, 0.05, -3, 4, 5, None).unwrap();
        assert!(rec.get("per_tensor_seconds").is_none() && rec.get("ratio").is_none());
    }
}
