//! Per-channel against per-tensor quantize (f32 -> i8, full range) at 262,144 values in 64
//! channels, timed interleaved in one process (2000 calls each, median), so that the
//! machine's drift between two separate runs does not enter the ratio:
//! `cargo run --release -p quantbench-kernels --example pc_probe`.
use quantbench_kernels::linear::{ChannelLayout, QuantParams};
use quantbench_kernels::Kernels;
use std::time::Instant;
fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(262144, |a| a.parse().expect("N: a count"));
    let ch = 64usize;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 2654435761usize) % 10007) as f32 / 1000.0 - 5.0)
        .collect();
    let k = Kernels::active();
    let p = QuantParams::with_bits(0.04, 3, 8, true).unwrap();
    let ps: Vec<QuantParams> = (0..ch)
        .map(|c| QuantParams::with_bits(0.04 * (1.0 + c as f32 / 64.0), 3, 8, true).unwrap())
        .collect();
    let layout = ChannelLayout::new(&[ch, n / ch], 0).unwrap();
    let mut out = vec![0i8; n];
    for round in 0..3 {
        let mut ts = [Vec::new(), Vec::new()];
        for _ in 0..(2000 * 262_144 / n).max(20) {
            let t = Instant::now();
            k.quantize(&x, &p, &mut out).unwrap();
            ts[0].push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            k.quantize_per_channel(&x, &layout, &ps, &mut out).unwrap();
            ts[1].push(t.elapsed().as_secs_f64());
        }
        let best = ts.map(|mut v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        });
        println!(
            "round {round}: per tensor {:.1} GB/s, per channel {:.1} GB/s",
            n as f64 * 4.0 / best[0] * 1e-9,
            n as f64 * 4.0 / best[1] * 1e-9
        );
    }
}
