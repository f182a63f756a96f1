//! Times the exact k-means (`Kernels::kmeans_optimal`) several times in one process on a
//! seeded Gaussian sample: the first run pays for the first touch of its memory, the later
//! ones reuse the allocator's pages.
//!
//! `cargo run --release -p quantbench-kernels --example km_probe -- [N [K [RUNS]]]`
//! (defaults 270000, 16, 5).

use quantbench_kernels::Kernels;

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .map_or(default, |a| a.parse().expect("N, K and RUNS are counts"))
    };
    let (n, k, runs) = (arg(1, 270_000), arg(2, 16), arg(3, 5));
    // xorshift64, Box-Muller
    let mut s = 12345u64;
    let mut unit = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    let x: Vec<f32> = (0..n)
        .map(|_| {
            let (a, b) = (unit().max(1e-300), unit());
            ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
        })
        .collect();
    let kern = Kernels::active();
    for r in 0..runs {
        let t = std::time::Instant::now();
        let f = kern.kmeans_optimal(&x, k).expect("exact k-means");
        println!(
            "run {r}: {:.4} s, sse {}, {} ({})",
            t.elapsed().as_secs_f64(),
            f.sse,
            n,
            kern.isa().name()
        );
    }
}
