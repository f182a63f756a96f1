//! `cargo xtask <task>`: the project's automation, in Rust (no shell scripts). One file per task.

mod bench;
mod compare;
mod compare_gemm;
mod compare_kmeans;
mod compare_model;
mod fuzz;
mod run;
mod util;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  bench [--check | --update | --plot] [--kernels NAME,...] [--baseline FILE]
      the kernel performance gate: callgrind instruction counts of the scalar and AVX2 paths
      and criterion speed-ups of every ISA over scalar, for one fixed input per kernel family
      (kernels/benches/gate.rs); --check fails when a kernel's instructions grow by more than
      5 % or its speed-up falls by more than 20 % against results/bench/baseline.json;
      --update rewrites the baseline; both append to results/bench/history.csv; --plot draws
      the history to results/bench/history.svg; without a mode, measures and prints (needs
      valgrind)
  compare quantize [--sizes N,N,...] [--kernels K,K,...] [--rounds R] [--out DIR]
      time quantbench's quantize/dequantize (per tensor and per channel, 1 thread) against
      ONNX Runtime and numpy on the same data, in one run, in R alternating rounds (default 3;
      medians, and each round's ratio); installs the peers with pip into target/peers-venv when
      missing; prints a table and writes JSON lines under results/compare/
  compare kmeans [--sizes N,...] [--ks K,...] [--dists gaussian,laplacian] [--out DIR]
      time quantbench's exact 1-D k-means against scikit-learn's KMeans (one thread each) on
      the same seeded data; reports time, SSE and the peer's gap to the optimum
  compare model [--limit N] [--reps R] [--out DIR]
      ResNet-20 on CIFAR-10 against ONNX Runtime in one run: fp32 top-1 and single-thread
      latency (batch 1 and 64), W8A8 per-channel MinMax (512 training images) top-1 against
      ORT's quantize_static (QDQ), and our integer_only top-1 and latency against ORT's int8
  compare gemm [--shapes MxKxN,...] [--threads T,...] [--kernels gemm_u8i8_i32,gemm_i8i8_i32]
               [--a-zero-point Z] [--out DIR]
      the int8 GEMM against ONNX Runtime's MatMulInteger (and PyTorch's quantized Linear when
      torch is installed) on the same shapes in alternating rounds; GOPS, % of the measured
      per-core peak, ratio; default shapes: squares, ResNet-20 im2col (batch 1 and 64),
      transformer projections
  fuzz [--seconds N] [--targets onnx,experiment,npy,idx,cifar]
      runs each fuzz target of fuzz/ (cargo-fuzz, libFuzzer; installs cargo-fuzz and the
      nightly toolchain when missing) for N seconds (default 60) with a 1024 MiB limit per
      allocation; prints the executions per target; fails on a crash (input under
      fuzz/artifacts/)
  run EXPERIMENT.toml [--out DIR] [--quiet]
      run an experiment (models x methods x bitwidths) with a release build of quantbench;
      results go to results/<name>/<UTC time>-<git sha>/ (or DIR, where finished cells are
      skipped)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("bench") => bench::main(&args[1..]),
        Some("compare") => compare::main(&args[1..]),
        Some("fuzz") => fuzz::main(&args[1..]),
        Some("run") => run::main(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown task '{other}'\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::from(2)
        }
    }
}
