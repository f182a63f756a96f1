//! The `quantbench` command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use quantbench::data::{Dataset, DatasetKind, Split};
use quantbench::engine::Engine;
use quantbench::eval::{evaluate, EvalOptions};
use quantbench::model::Graph;
use quantbench::tensor::{self, TensorMethod, TensorRequest};
use quantbench_kernels::isa::{self, Isa};
use quantbench_kernels::Kernels;

#[derive(Parser)]
#[command(
    name = "quantbench",
    version,
    about = "Measure neural-network quantization: kernels, accuracy, size, latency"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    Linear,
    Fixed,
    DynamicFixed,
    Kmeans,
}

#[derive(Subcommand)]
enum Command {
    /// Quantize one tensor and print one JSON object: params, codes, dequantized values,
    /// stored size, compression and error. Methods: linear, fixed, dynamic-fixed, kmeans.
    Tensor {
        #[arg(long, value_enum)]
        method: MethodArg,
        /// Bits per code: linear 1..=8 or 16; fixed / dynamic-fixed 2..=16 (with the sign bit);
        /// kmeans 1..=8 (2^bits clusters).
        #[arg(long)]
        bits: Option<u32>,
        /// kmeans: number of clusters, 1..=256 (codes take ceil(log2 K) bits).
        #[arg(long)]
        clusters: Option<usize>,
        /// kmeans: the fast mode (histogram + exact DP over bins + Lloyd) instead of the exact
        /// optimum; for tensors with millions of values.
        #[arg(long)]
        fast: bool,
        /// Linear: zero point in the middle, scale from max |x|.
        #[arg(long)]
        symmetric: bool,
        /// Linear: unsigned codes (u8/u16) instead of signed.
        #[arg(long)]
        unsigned: bool,
        /// Fixed: number of fractional bits n of Qm.n.
        #[arg(long, allow_hyphen_values = true)]
        frac_bits: Option<i32>,
        /// Fixed-point methods: stochastic rounding with this seed (default: nearest even).
        #[arg(long)]
        stochastic_seed: Option<u64>,
        /// Per-channel parameters along this axis of --shape (linear, dynamic-fixed).
        #[arg(long)]
        axis: Option<usize>,
        /// Shape of the values, e.g. 4,4 (default: a vector; taken from the file with --npy).
        #[arg(long, value_delimiter = ',')]
        shape: Option<Vec<String>>,
        /// Comma-separated values.
        #[arg(
            long,
            allow_hyphen_values = true,
            conflicts_with = "npy",
            required_unless_present = "npy"
        )]
        values: Option<String>,
        /// A little-endian float32 .npy file.
        #[arg(long)]
        npy: Option<PathBuf>,
    },
    /// Evaluate an ONNX model in fp32 on a data set: top-1, top-5, images per second.
    Eval {
        /// The ONNX model file.
        #[arg(long)]
        model: PathBuf,
        /// cifar10 | mnist
        #[arg(long)]
        dataset: String,
        /// test | train
        #[arg(long, default_value = "test")]
        split: String,
        /// Evaluate only the first N images.
        #[arg(long)]
        limit: Option<usize>,
        /// Images per batch (a model exported with a fixed batch uses its own).
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Worker threads, one batch each (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Data root holding data/ (default: $QUANTBENCH_DATA, else ../shared).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Write the logits (images x classes) to this .npy file.
        #[arg(long)]
        save_logits: Option<PathBuf>,
    },
    /// Run an experiment file: every model x method x bitwidth cell, then the report under
    /// results/<name>/<UTC time>-<git sha>/ (`cargo xtask run FILE` builds and runs this).
    Run {
        /// The experiment (TOML).
        experiment: PathBuf,
        /// Write into (or resume) this folder; finished cells are skipped.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Data root holding data/ and models/ (default: $QUANTBENCH_DATA, else ../shared).
        #[arg(long)]
        data: Option<PathBuf>,
        /// The results root (default: results/ under the current directory).
        #[arg(long, default_value = "results")]
        results: PathBuf,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
        /// Evaluation threads (default: every core); the results do not depend on it.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
        threads: Option<u64>,
        /// Refuse the run when its estimated peak memory exceeds SIZE (e.g. 4G, 512M);
        /// default: the memory the machine has available.
        #[arg(long, value_name = "SIZE", value_parser = quantbench::memory::parse_size)]
        max_memory: Option<u64>,
    },
    /// Print the instruction sets this CPU supports and the one kernels will use.
    Isa,
    /// Draw the kernel gate's history (used by `cargo xtask bench --plot`).
    #[command(hide = true)]
    PlotBenchHistory {
        #[arg(long)]
        history: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Time one kernel on a .npy array (used by `cargo xtask compare quantize`).
    #[command(hide = true)]
    BenchKernel {
        #[arg(long)]
        kernel: String,
        #[arg(long)]
        npy: PathBuf,
        #[arg(long)]
        scale: f32,
        #[arg(long, allow_hyphen_values = true)]
        zero_point: i32,
        #[arg(long, default_value_t = 64)]
        channels: usize,
        #[arg(long, default_value_t = 50)]
        reps: usize,
        /// Raw int8 codes of a peer to compare the quantize output with.
        #[arg(long)]
        check_codes: Option<PathBuf>,
    },
    /// Time the int8 GEMM on seeded codes (used by `cargo xtask compare gemm`); one JSON
    /// line per shape and thread count.
    #[command(hide = true)]
    BenchGemm {
        /// gemm_u8i8_i32 | gemm_i8i8_i32
        #[arg(long)]
        kernel: String,
        /// Comma-separated MxKxN.
        #[arg(long)]
        shapes: String,
        /// Comma-separated thread counts.
        #[arg(long, default_value = "1")]
        threads: String,
        /// A's zero point (u8 domain).
        #[arg(long, default_value_t = 0)]
        a_zero_point: i32,
        /// Seconds of timed calls per shape.
        #[arg(long, default_value_t = 0.4)]
        seconds: f64,
    },
    /// Time the exact 1-D k-means of a .npy array (used by `cargo xtask compare kmeans`).
    #[command(hide = true)]
    BenchKmeans {
        #[arg(long)]
        npy: PathBuf,
        #[arg(long)]
        k: usize,
        /// exact | fast | optimal-sse (the exact mode's optimal SSE alone, without its
        /// traceback: for sizes whose exact clustering does not fit in memory)
        #[arg(long, default_value = "exact")]
        mode: String,
    },
}

fn parse_values(text: &str) -> Result<Vec<f32>, String> {
    text.split(',')
        .enumerate()
        .map(|(i, s)| {
            let s = s.trim();
            s.parse::<f32>()
                .map_err(|_| format!("--values: '{s}' (item {}) is not a number", i + 1))
        })
        .collect()
}

fn parse_shape(items: &[String]) -> Result<Vec<usize>, String> {
    items
        .iter()
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("--shape: '{s}' is not a dimension"))
        })
        .collect()
}

/// Prints one line; a closed pipe (`| head`) ends the program quietly instead of panicking.
fn print_line(line: &str) -> Result<(), String> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("cannot write to stdout: {e}"))
        }
        _ => Ok(()),
    }
}

/// The first line a command prints, or "unknown".
fn command_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.lines().next().unwrap_or("").trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn run(cli: Cli) -> Result<(), String> {
    // a bad QUANTBENCH_ISA is a clean error here, never a panic later
    isa::isa_from_env().map_err(|e| e.to_string())?;
    let k = Kernels::active();
    match cli.command {
        Command::Tensor {
            method,
            bits,
            clusters,
            fast,
            symmetric,
            unsigned,
            frac_bits,
            stochastic_seed,
            axis,
            shape,
            values,
            npy,
        } => {
            let (values, file_shape) = match (values, npy) {
                (Some(v), _) => {
                    let v = parse_values(&v)?;
                    let n = v.len();
                    (v, vec![n])
                }
                (None, Some(path)) => {
                    let a = quantbench::npy::read_f32(&path)?;
                    (a.data, a.shape)
                }
                (None, None) => return Err("give --values or --npy".into()),
            };
            let shape = match shape {
                Some(s) => parse_shape(&s)?,
                None => file_shape,
            };
            let req = TensorRequest {
                method: match method {
                    MethodArg::Linear => TensorMethod::Linear,
                    MethodArg::Fixed => TensorMethod::Fixed,
                    MethodArg::DynamicFixed => TensorMethod::DynamicFixed,
                    MethodArg::Kmeans => TensorMethod::KMeans,
                },
                bits,
                clusters,
                kmeans_fast: fast,
                symmetric,
                unsigned,
                frac_bits,
                axis,
                shape,
                values,
                stochastic_seed,
            };
            let out = tensor::run(&req, &k)?;
            print_line(&out.to_string())?;
        }
        Command::Eval {
            model,
            dataset,
            split,
            limit,
            batch,
            threads,
            data,
            save_logits,
        } => {
            let kind = DatasetKind::parse(&dataset).map_err(|e| format!("--dataset: {e}"))?;
            let split = Split::parse(&split).map_err(|e| format!("--split: {e}"))?;
            let root = data.or_else(quantbench::data_root).ok_or(
                "no data root: set QUANTBENCH_DATA or pass --data (../shared does not exist here)",
            )?;
            let graph = Graph::load(&model)?;
            let mut ds = Dataset::load(&root, kind, split)?;
            if let Some(n) = limit {
                ds.truncate(n);
            }
            if ds.is_empty() {
                return Err("no images to evaluate (--limit 0?)".into());
            }
            let engine = Engine::new(&graph);
            let opts = EvalOptions {
                batch,
                threads: threads.unwrap_or_else(quantbench::eval::default_threads),
                progress: true,
                label: "eval".into(),
            };
            let r = evaluate(&engine, &ds, &kind.default_normalization(), &opts, None)?;
            if let Some(p) = save_logits {
                quantbench::npy::write_f32(&p, &[r.images, r.classes], &r.logits)?;
            }
            let rec = serde_json::json!({
                "model": model.display().to_string(), "dataset": kind.name(), "images": r.images,
                "top1": r.top1, "top5": r.top5, "batch": r.batch, "threads": opts.threads,
                "seconds": r.seconds, "images_per_s": r.images_per_second(),
            });
            print_line(&rec.to_string())?;
        }
        Command::Run {
            experiment,
            out,
            data,
            results,
            quiet,
            threads,
            max_memory,
        } => {
            let root = data.or_else(quantbench::data_root).ok_or(
                "no data root: set QUANTBENCH_DATA or pass --data (../shared does not exist here)",
            )?;
            let opts = quantbench::runner::RunOptions {
                data_root: root,
                results_root: results,
                out_dir: out,
                git_sha: std::env::var("QUANTBENCH_GIT_SHA")
                    .unwrap_or_else(|_| command_line("git", &["rev-parse", "--short=10", "HEAD"])),
                rustc: std::env::var("QUANTBENCH_RUSTC")
                    .unwrap_or_else(|_| command_line("rustc", &["-V"])),
                progress: !quiet,
                threads: threads.map(|t| t as usize),
                max_memory,
            };
            let summary = quantbench::runner::run_experiment(&experiment, &opts)?;
            eprintln!(
                "{} cells ({} done earlier) -> {}",
                summary.rows.len(),
                summary.skipped,
                summary.dir.display()
            );
            print_line(&summary.dir.display().to_string())?;
        }
        Command::PlotBenchHistory { history, out } => {
            quantbench::report::bench_history_chart(&history, &out)?;
        }
        Command::Isa => {
            for i in Isa::ALL {
                println!(
                    "{:<8} {}",
                    i.name(),
                    if i.is_supported() { "supported" } else { "-" }
                );
            }
            println!("active: {} ({} to force)", k.isa(), isa::ISA_ENV);
        }
        Command::BenchKmeans {
            npy,
            k: clusters,
            mode,
        } => {
            let a = quantbench::npy::read_f32(&npy)?;
            let start = std::time::Instant::now();
            if mode == "optimal-sse" {
                let sse = k
                    .kmeans_optimal_sse(&a.data, clusters)
                    .map_err(|e| e.to_string())?;
                let rec = serde_json::json!({
                    "n": a.data.len(), "k": clusters, "mode": mode, "threads": 1, "isa": k.isa().name(),
                    "ours_s": start.elapsed().as_secs_f64(), "ours_sse": sse,
                });
                return print_line(&rec.to_string());
            }
            let fit = match mode.as_str() {
                "exact" => k.kmeans_optimal(&a.data, clusters),
                "fast" => k.kmeans_fast(&a.data, clusters),
                other => {
                    return Err(format!(
                        "--mode {other}: expected exact, fast or optimal-sse"
                    ))
                }
            }
            .map_err(|e| e.to_string())?;
            let seconds = start.elapsed().as_secs_f64();
            let rec = serde_json::json!({
                "n": a.data.len(), "k": clusters, "mode": mode, "threads": 1, "isa": k.isa().name(),
                "ours_s": seconds, "ours_sse": fit.sse, "centroids": fit.codebook.len(),
                "gap_bound": fit.gap_bound,
            });
            print_line(&rec.to_string())?;
        }
        Command::BenchGemm {
            kernel,
            shapes,
            threads,
            a_zero_point,
            seconds,
        } => {
            let peak = quantbench_kernels::gemm::measured_peak_gops(k.gemm_microkernel(), 0.5);
            let threads: Vec<usize> = threads
                .split(',')
                .map(|t| {
                    t.trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|&t| t >= 1)
                        .ok_or(format!("--threads: '{t}' is not a count >= 1"))
                })
                .collect::<Result<_, _>>()?;
            for shape in shapes.split(',') {
                let dims: Vec<usize> = shape
                    .split('x')
                    .map(|d| d.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| format!("--shapes: '{shape}' is not MxKxN"))?;
                let [m, kk, n] = dims[..] else {
                    return Err(format!("--shapes: '{shape}' is not MxKxN"));
                };
                for &t in &threads {
                    let rec = quantbench::bench::time_gemm(
                        &k,
                        &kernel,
                        (m, kk, n),
                        t,
                        a_zero_point,
                        seconds,
                        peak,
                    )?;
                    print_line(&rec.to_string())?;
                }
            }
        }
        Command::BenchKernel {
            kernel,
            npy,
            scale,
            zero_point,
            channels,
            reps,
            check_codes,
        } => {
            let a = quantbench::npy::read_f32(&npy)?;
            let expected = match check_codes {
                Some(p) => Some(
                    std::fs::read(&p).map_err(|e| format!("{}: cannot read: {e}", p.display()))?,
                ),
                None => None,
            };
            let rec = quantbench::bench::time_kernel(
                &k,
                &kernel,
                &a.data,
                scale,
                zero_point,
                channels,
                reps,
                expected.as_deref(),
            )?;
            print_line(&rec.to_string())?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quantbench: error: {e}");
            ExitCode::from(2)
        }
    }
}
