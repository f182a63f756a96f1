//! Quick single-shape timing of the int8 GEMM (the full comparison is `cargo xtask compare
//! gemm`): `cargo run --release -p quantbench-kernels --example gemm_gops -- M K N [threads]`;
//! `ZB=z` packs B with zero point z (default 0).

use std::time::Instant;

use quantbench_kernels::gemm::{gemm_i32, PackedB};
use quantbench_kernels::Kernels;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("M K N [threads] as integers"))
        .collect();
    let (m, k, n) = (args[0], args[1], args[2]);
    let threads = args.get(3).copied().unwrap_or(1);
    let kern = Kernels::active();
    let a: Vec<u8> = (0..m * k).map(|i| (i * 7 % 251) as u8).collect();
    let b: Vec<i8> = (0..k * n).map(|i| (i * 13 % 255) as u8 as i8).collect();
    let zb: i32 = std::env::var("ZB").map_or(0, |z| z.parse().expect("ZB: an integer"));
    let packed = kern.pack_b::<u8>(&b, k, n, &[zb]).expect("pack");
    let mut c = vec![0i32; m * n];
    let ops = 2.0 * (m * k * n) as f64;
    let reps = ((2e9 / ops) as usize).clamp(3, 100_000);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            gemm_i32(&a, m, 128, &packed, &mut c, threads).expect("gemm");
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    let _ = PackedB::microkernel(&packed);
    if std::env::var("PEAK").is_ok() {
        for mk in quantbench_kernels::gemm::Microkernel::available() {
            println!(
                "peak {}: {:?}",
                mk.name(),
                quantbench_kernels::gemm::measured_peak_gops(mk, 1.0)
            );
        }
    }
    println!(
        "{} {m}x{k}x{n} threads={threads}: {:.1} GOPS ({:.3} ms)",
        packed.microkernel().name(),
        ops / best / 1e9,
        best * 1e3
    );
}
