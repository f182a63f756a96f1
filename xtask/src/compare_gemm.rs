//! `cargo xtask compare gemm`: quantbench's int8 GEMM against ONNX Runtime's MatMulInteger
//! (and PyTorch's quantized Linear when torch is installed), in one run, on the same shapes,
//! one thread unless asked otherwise. Each shape is measured in alternating rounds (ours,
//! peers) and each side reports its best round, which tames this shared machine's drift.
//! Writes JSON lines `{kernel, m, k, n, threads, isa, ours_gops, peer, peer_gops, ratio,
//! pct_of_peak}` to results/compare/gemm-<UTC>.jsonl.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

use crate::util::{
    cpu_model, git_revision, list, root, run, setup, utc_stamp, write_atomic, Setup,
};

/// Squares, ResNet-20's im2col shapes at batch 1 and 64, transformer projections.
const DEFAULT_SHAPES: &str = "256x256x256,512x512x512,1024x1024x1024,2048x2048x2048,\
1024x27x16,1024x144x16,256x144x32,256x288x32,64x288x64,64x576x64,\
65536x27x16,65536x144x16,16384x144x32,16384x288x32,4096x288x64,4096x576x64,\
128x768x768,128x768x3072";
const ROUNDS: usize = 2;

pub fn main(args: &[String]) -> Result<(), String> {
    let root = root();
    let mut shapes: Vec<String> = DEFAULT_SHAPES.split(',').map(String::from).collect();
    let mut threads = vec![1usize];
    let mut kernels = vec!["gemm_u8i8_i32".to_string(), "gemm_i8i8_i32".to_string()];
    let mut a_zero_point = 0i32;
    let mut out_dir = root.join("results/compare");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--shapes" => shapes = list("--shapes", it.next())?,
            "--threads" => threads = list("--threads", it.next())?,
            "--kernels" => kernels = list("--kernels", it.next())?,
            "--a-zero-point" => {
                a_zero_point = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|z| (0..=255).contains(z))
                    .ok_or("--a-zero-point needs a value in 0..=255")?
            }
            "--out" => out_dir = PathBuf::from(it.next().ok_or("--out needs a value")?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    for s in &shapes {
        let ok = s.split('x').count() == 3
            && s.split('x')
                .all(|d| d.parse::<usize>().is_ok_and(|d| d > 0));
        if !ok {
            return Err(format!("--shapes: '{s}' is not MxKxN"));
        }
    }
    if let Some(k) = kernels
        .iter()
        .find(|k| *k != "gemm_u8i8_i32" && *k != "gemm_i8i8_i32")
    {
        return Err(format!(
            "--kernels: '{k}' is not gemm_u8i8_i32 or gemm_i8i8_i32"
        ));
    }
    let Setup {
        python, quantbench, ..
    } = setup(&root, &out_dir)?;
    let thread_list = threads
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",");

    println!(
        "{:<14} {:>17} {:>3} {:<7} {:>9} {:>7}  {:<42} {:>9} {:>7}",
        "kernel", "MxKxN", "thr", "isa", "ours GOPS", "% peak", "peer", "peer GOPS", "ratio"
    );
    let mut records = Vec::new();
    for shape in &shapes {
        // key (kernel, threads) -> best record of each side
        let mut ours: BTreeMap<(String, u64), Value> = BTreeMap::new();
        let mut peers: BTreeMap<(String, u64, String), Value> = BTreeMap::new();
        for _ in 0..ROUNDS {
            for kernel in &kernels {
                let out = run(Command::new(&quantbench).args([
                    "bench-gemm",
                    "--kernel",
                    kernel,
                    "--shapes",
                    shape,
                    "--threads",
                    &thread_list,
                    "--a-zero-point",
                    &a_zero_point.to_string(),
                ]))?;
                for line in out.lines().filter(|l| !l.trim().is_empty()) {
                    let v: Value = serde_json::from_str(line).map_err(|e| format!("ours: {e}"))?;
                    let key = (kernel.clone(), v["threads"].as_u64().unwrap_or(1));
                    let better = ours
                        .get(&key)
                        .is_none_or(|o| v["ours_gops"].as_f64() > o["ours_gops"].as_f64());
                    if better {
                        ours.insert(key, v);
                    }
                }
            }
            let out = run(Command::new(&python)
                .arg(root.join("xtask/peers/compare_gemm.py"))
                .args(["--shapes", shape, "--threads", &thread_list])
                .args(["--kernels", &kernels.join(",")])
                .args(["--a-zero-point", &a_zero_point.to_string()])
                .env("OMP_NUM_THREADS", "1"))?;
            for line in out.lines().filter(|l| l.starts_with('{')) {
                let v: Value = serde_json::from_str(line).map_err(|e| format!("peer: {e}"))?;
                let key = (
                    v["kernel"].as_str().unwrap_or("").to_string(),
                    v["threads"].as_u64().unwrap_or(1),
                    v["peer"].as_str().unwrap_or("").to_string(),
                );
                let better = peers
                    .get(&key)
                    .is_none_or(|o| v["peer_gops"].as_f64() > o["peer_gops"].as_f64());
                if better {
                    peers.insert(key, v);
                }
            }
        }
        for ((kernel, t), o) in &ours {
            let ours_gops = o["ours_gops"].as_f64().unwrap_or(f64::NAN);
            let mine: Vec<_> = peers
                .iter()
                .filter(|((k, pt, _), _)| k == kernel && pt == t)
                .collect();
            let rows: Vec<(Value, f64)> = if mine.is_empty() {
                vec![(Value::Null, f64::NAN)]
            } else {
                mine.iter()
                    .map(|((_, _, name), p)| {
                        (json!(name), p["peer_gops"].as_f64().unwrap_or(f64::NAN))
                    })
                    .collect()
            };
            for (peer, peer_gops) in rows {
                let dims: Vec<u64> = shape.split('x').map(|d| d.parse().unwrap()).collect();
                let rec = json!({
                    "kernel": kernel, "m": dims[0], "k": dims[1], "n": dims[2], "threads": t,
                    "isa": o["isa"], "microkernel": o["microkernel"], "a_zero_point": a_zero_point,
                    "ours_gops": ours_gops, "peer": peer, "peer_gops": peer_gops,
                    "ratio": ours_gops / peer_gops, "pct_of_peak": o["pct_of_peak"], "peak_gops": o["peak_gops"],
                });
                println!(
                    "{:<14} {:>17} {:>3} {:<7} {:>9.1} {:>7} {:<42} {:>9.1} {:>6.2}x",
                    kernel,
                    shape,
                    t,
                    o["isa"].as_str().unwrap_or("?"),
                    ours_gops,
                    o["pct_of_peak"]
                        .as_f64()
                        .map(|p| format!("{p:.0}%"))
                        .unwrap_or("-".into()),
                    rec["peer"].as_str().unwrap_or("-"),
                    peer_gops,
                    rec["ratio"].as_f64().unwrap_or(f64::NAN),
                );
                records.push(rec);
            }
        }
    }
    let stamp = utc_stamp();
    let path = out_dir.join(format!("gemm-{stamp}.jsonl"));
    let body: String = records.iter().map(|r| format!("{r}\n")).collect();
    write_atomic(&path, &body)?;
    let meta = json!({"task": "compare gemm", "utc": stamp, "git": git_revision(&root), "cpu": cpu_model(),
                      "rounds": ROUNDS, "best_of_rounds": true, "a_zero_point": a_zero_point,
                      "ops": "2*m*k*n per call; peers timed through their Python API (call overhead included)"});
    write_atomic(&path.with_extension("meta.json"), &format!("{meta:#}\n"))?;
    println!("\nwrote {}", path.display());
    Ok(())
}
