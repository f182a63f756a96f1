//! `cargo xtask compare quantize`: quantbench's quantize/dequantize kernels against ONNX
//! Runtime and numpy, in one run, on the same data and parameters, one thread each.
//!
//! Data: n float32 values ~ N(0, 1.5^2) from a seeded generator, written once as .npy and
//! read by both sides. Parameters: int8, scale 8/255, zero point -3; per channel, [64, n/64]
//! along axis 0 with channel c scaled by (1 + c/64). The peers run in a virtual environment
//! under target/ (created with pip when missing). ONNX Runtime's quantize output is also
//! compared with ours code for code. Each kernel is measured in 3 alternating rounds (peers,
//! ours) and each side reports its median, which tames this shared machine's drift. Ours per
//! channel alternates its calls with ours per tensor in one process (`{kernel}_vs_per_tensor`
//! records: the per-channel goal, the median of the rounds' ratios).

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

use crate::util::{cpu_model, git_revision, root, run, setup, utc_stamp, write_atomic, Setup};

const KERNELS: [&str; 4] = [
    "quantize",
    "dequantize",
    "quantize_per_channel",
    "dequantize_per_channel",
];
const DEFAULT_SIZES: [usize; 4] = [65_539, 262_144, 16 << 20, 64 << 20];
const SCALE: f32 = 8.0 / 255.0;
const ZERO_POINT: i32 = -3;
const CHANNELS: usize = 64;
const SEED: u64 = 20_261_126;
/// Alternating measurement rounds per kernel and size (`--rounds` changes it); the table
/// shows each side's median.
const ROUNDS: usize = 3;

/// Seeded N(0, 1.5^2) data (SplitMix64 + Box-Muller).
fn data(n: usize) -> Vec<f32> {
    let mut rng = crate::util::SplitMix64(SEED);
    let mut next = || rng.unit();
    (0..n)
        .map(|_| {
            let (u, v) = (next().max(1e-300), next());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos() * 1.5) as f32
        })
        .collect()
}

pub fn main(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("quantize") => {}
        Some("kmeans") => return crate::compare_kmeans::main(&args[1..]),
        Some("gemm") => return crate::compare_gemm::main(&args[1..]),
        Some("model") => return crate::compare_model::main(&args[1..]),
        _ => {
            return Err(
                "usage: cargo xtask compare (quantize | kmeans | gemm | model) [options]; see cargo xtask help"
                    .into(),
            )
        }
    }
    let mut sizes = DEFAULT_SIZES.to_vec();
    let mut rounds = ROUNDS;
    let mut kernels: Vec<&str> = KERNELS.to_vec();
    let root = root();
    let mut out_dir = root.join("results/compare");
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sizes" => {
                let v = it.next().ok_or("--sizes needs a value")?;
                sizes = v
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<usize>()
                            .map_err(|_| format!("--sizes: '{s}' is not a size"))
                    })
                    .collect::<Result<_, _>>()?;
                if let Some(bad) = sizes.iter().find(|&&n| n < CHANNELS) {
                    return Err(format!(
                        "--sizes: {bad} is smaller than the {CHANNELS} channels"
                    ));
                }
            }
            "--rounds" => {
                let v = it.next().ok_or("--rounds needs a value")?;
                rounds = v
                    .parse::<usize>()
                    .ok()
                    .filter(|&r| r >= 1)
                    .ok_or_else(|| format!("--rounds: '{v}' is not a count >= 1"))?;
            }
            "--kernels" => {
                let v = it.next().ok_or("--kernels needs a value")?;
                kernels = v
                    .split(',')
                    .map(|k| {
                        KERNELS
                            .iter()
                            .copied()
                            .find(|&x| x == k.trim())
                            .ok_or_else(|| {
                                format!("--kernels: '{k}' is not one of {}", KERNELS.join(", "))
                            })
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--out" => out_dir = PathBuf::from(it.next().ok_or("--out needs a value")?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    let Setup {
        python,
        quantbench,
        work,
    } = setup(&root, &out_dir)?;

    let mut records = Vec::new();
    println!(
        "{:<24} {:>10} {:>7} {:>10}  {:<20} {:>10} {:>7}  codes",
        "kernel", "n", "isa", "ours GB/s", "peer", "peer GB/s", "ratio"
    );
    for &n in &sizes {
        let n = n - n % CHANNELS;
        let npy = work.join(format!("x_{n}.npy"));
        quantbench::npy::write_f32(&npy, &[n], &data(n))?;
        let reps = (200_000_000 / n).clamp(5, 300).to_string();
        for &kernel in &kernels {
            eprintln!("[compare] {kernel} n={n}");
            if kernel == "quantize" {
                // the memory-bandwidth reference: copying the same f32 array
                let mut copy = Command::new(&quantbench);
                copy.args(["bench-kernel", "--kernel", "copy", "--npy"])
                    .arg(&npy)
                    .args(["--scale", "1", "--zero-point", "0", "--reps", &reps]);
                let rec: Value = serde_json::from_str(run(&mut copy)?.trim())
                    .map_err(|e| format!("quantbench output: {e}"))?;
                println!("{:<24} {:>10} {:>7} {:>10.2}  (f32 -> f32 copy: this machine's bandwidth reference)", "copy", n, "-", rec["gbps"].as_f64().unwrap_or(0.0));
                records.push(
                    json!({"kernel": "copy", "n": n, "threads": 1, "ours_gbps": rec["gbps"]}),
                );
            }
            let codes = work.join(format!("ort_codes_{kernel}_{n}.bin"));
            let common = |c: &mut Command| {
                c.arg("--kernel")
                    .arg(kernel)
                    .arg("--npy")
                    .arg(&npy)
                    .args([
                        "--scale",
                        &SCALE.to_string(),
                        "--zero-point",
                        &ZERO_POINT.to_string(),
                    ])
                    .args(["--channels", &CHANNELS.to_string(), "--reps", &reps]);
            };
            // `rounds` alternating rounds (peers, then ours); each side's figure is its median.
            // Ours per channel alternates its calls with ours per tensor in one process
            // (`bench-kernel` reports both), so their ratio does not carry the drift between
            // processes (measured: 21-29 GB/s from one process to the next at 16M).
            let per_tensor = kernel.strip_suffix("_per_channel");
            let mut peer_runs: Vec<Vec<Value>> = Vec::new();
            let mut our_runs: Vec<Value> = Vec::new();
            for _ in 0..rounds {
                let mut py = Command::new(&python);
                py.arg(root.join("xtask/peers/compare_quantize.py"))
                    .arg("--codes-out")
                    .arg(&codes);
                common(&mut py);
                peer_runs.push(
                    run(&mut py)?
                        .lines()
                        .map(|l| {
                            serde_json::from_str(l).map_err(|e| format!("peer output {l:?}: {e}"))
                        })
                        .collect::<Result<_, _>>()?,
                );
                let mut ours = Command::new(&quantbench);
                ours.arg("bench-kernel").arg("--check-codes").arg(&codes);
                common(&mut ours);
                our_runs.push(
                    serde_json::from_str(run(&mut ours)?.trim())
                        .map_err(|e| format!("quantbench output: {e}"))?,
                );
            }
            let median = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let mut ours = our_runs[0].clone();
            ours["gbps"] = json!(median(
                our_runs
                    .iter()
                    .map(|r| r["gbps"].as_f64().unwrap_or(0.0))
                    .collect()
            ));
            let mismatches = our_runs
                .iter()
                .filter_map(|r| r.get("code_mismatches").and_then(Value::as_u64))
                .max();
            if let Some(m) = mismatches.filter(|&m| m > 0) {
                return Err(format!(
                    "{kernel} n={n}: {m} codes differ from ONNX Runtime's"
                ));
            }
            let peers: Vec<Value> = (0..peer_runs[0].len())
                .map(|j| {
                    let mut p = peer_runs[0][j].clone();
                    p["gbps"] = json!(median(
                        peer_runs
                            .iter()
                            .map(|r| r[j]["gbps"].as_f64().unwrap_or(0.0))
                            .collect()
                    ));
                    p
                })
                .collect();
            if let Some(pt) = per_tensor {
                let of = |key: &str| -> Vec<f64> {
                    our_runs.iter().filter_map(|r| r[key].as_f64()).collect()
                };
                let (pc, t, ratio) = (
                    ours["gbps"].as_f64().unwrap_or(0.0),
                    median(of("per_tensor_gbps")),
                    median(of("ratio")),
                );
                let name = format!("{kernel}_vs_per_tensor");
                println!(
                    "{:<24} {n:>10} {:>7} {pc:>10.2}  {:<20} {t:>10.2} {ratio:>7.2}  (calls interleaved)",
                    kernel,
                    ours["isa"].as_str().unwrap_or("?"),
                    format!("ours {pt}"),
                );
                records.push(json!({
                    "kernel": name, "n": n, "threads": 1, "isa": ours["isa"],
                    "per_channel_gbps": pc, "per_tensor_gbps": t, "ratio": ratio,
                    "ratio_of": "median over the rounds of per-channel / per-tensor GB/s, calls alternated in one process",
                }));
            }
            for (j, p) in peers.into_iter().enumerate() {
                let (og, pg) = (ours["gbps"].as_f64().unwrap(), p["gbps"].as_f64().unwrap());
                // each round's ratio (the peer's run and ours right after it): the two sides
                // of one round see the same machine, so these spread less than the medians do
                let round_ratios: Vec<f64> = our_runs
                    .iter()
                    .zip(&peer_runs)
                    .map(|(o, r)| {
                        o["gbps"].as_f64().unwrap_or(0.0)
                            / r[j]["gbps"].as_f64().unwrap_or(f64::NAN)
                    })
                    .collect();
                let median_round = median(round_ratios.clone());
                let rec = json!({
                    "kernel": kernel, "n": n, "threads": 1, "isa": ours["isa"],
                    "ours_gbps": og, "peer": p["peer"], "peer_gbps": pg, "ratio": og / pg,
                    "rounds": rounds, "round_ratios": round_ratios,
                    "median_round_ratio": median_round,
                });
                println!(
                    "{:<24} {:>10} {:>7} {:>10.2}  {:<20} {:>10.2} {:>7.2}  {}",
                    kernel,
                    n,
                    ours["isa"].as_str().unwrap_or("?"),
                    og,
                    p["peer"].as_str().unwrap_or("?"),
                    pg,
                    og / pg,
                    match mismatches {
                        Some(0) => "identical to ORT",
                        _ => "-",
                    }
                );
                if rounds > 1 {
                    let list: Vec<String> =
                        round_ratios.iter().map(|r| format!("{r:.2}")).collect();
                    println!(
                        "{:<24} {:>10} {:>7}   round by round: {} (median {:.2})",
                        "",
                        "",
                        "",
                        list.join(" "),
                        median_round
                    );
                }
                records.push(rec);
            }
        }
    }
    let stamp = utc_stamp();
    let sha = git_revision(&root);
    let path = out_dir.join(format!("quantize-{stamp}.jsonl"));
    let body: String = records.iter().map(|r| format!("{r}\n")).collect();
    let meta = json!({
        "task": "compare quantize", "utc": stamp, "git": sha, "cpu": cpu_model(),
        "data": format!("N(0, 1.5^2), seed {SEED}"), "scale": SCALE, "zero_point": ZERO_POINT, "channels": CHANNELS,
    });
    write_atomic(&path, &body)?;
    write_atomic(&path.with_extension("meta.json"), &format!("{meta:#}\n"))?;
    println!("\nwrote {}", path.display());
    Ok(())
}
