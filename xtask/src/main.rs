//! `cargo xtask <task>`: the project's automation, in Rust (no shell scripts). One file per task.

mod compare;
mod compare_kmeans;
mod util;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  compare quantize [--sizes N,N,...] [--out DIR]
      time quantbench's quantize/dequantize (per tensor and per channel, 1 thread) against
      ONNX Runtime and numpy on the same data, in one run; installs the peers with pip into
      target/peers-venv when missing; prints a table and writes JSON lines under results/compare/
  compare kmeans [--sizes N,...] [--ks K,...] [--dists gaussian,laplacian] [--out DIR]
      time quantbench's exact 1-D k-means against scikit-learn's KMeans (one thread each) on
      the same seeded data; reports time, SSE and the peer's gap to the optimum
  run EXPERIMENT.toml
      the experiment runner (models x methods x bitwidths) arrives with the harness issue;
      until then this task exits with an error saying so";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("compare") => compare::main(&args[1..]),
        Some("run") => Err("`cargo xtask run` is not implemented yet: the experiment harness (issue #6) has not landed. \
                            Today: `quantbench tensor` (one tensor) and `cargo xtask compare quantize` (kernels vs peers)."
            .to_string()),
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
