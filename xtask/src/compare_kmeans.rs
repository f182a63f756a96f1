//! `cargo xtask compare kmeans`: quantbench's exact and fast 1-D k-means against
//! scikit-learn's KMeans (lloyd, k-means++ init, n_init=1, seed 0), in one run, on the same
//! seeded data, one thread each (`OMP_NUM_THREADS=1` for the peer). Reports times and each
//! SSE's gap to the exact optimum. Cells where the peer is fast are measured in several
//! alternating rounds, each side reporting its median ([`ROUNDS`]).

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

use crate::util::{
    cpu_model, git_revision, list, root, run, setup, utc_stamp, write_atomic, Setup,
};

const SEED: u64 = 20_261_127;

/// Rounds per cell (ours and the peer alternating) where the peer's first run is shorter
/// than [`SHORT_PEER_S`]; longer cells (scikit-learn takes ~8-150 s at 11.7M values) run once.
const ROUNDS: usize = 5;
const SHORT_PEER_S: f64 = 5.0;

/// The median of `v` (the mean of the middle two for an even length; NaN if empty).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Seeded samples: "gaussian" N(0, 1) or "laplacian" Laplace(0, 1).
fn data(dist: &str, n: usize) -> Vec<f32> {
    let mut rng = crate::util::SplitMix64(SEED ^ if dist == "gaussian" { 0 } else { 0xA5A5 });
    let mut next = || rng.unit();
    (0..n)
        .map(|_| {
            let (u, v) = (next().max(1e-300), next());
            if dist == "gaussian" {
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
            } else {
                let c = v - 0.5;
                (-c.signum() * (1.0 - 2.0 * c.abs()).max(1e-300).ln()) as f32
            }
        })
        .collect()
}

pub fn main(args: &[String]) -> Result<(), String> {
    let root = root();
    let mut sizes = vec![270_000usize];
    let mut ks = vec![4usize, 16, 256];
    let mut dists = vec!["gaussian".to_string(), "laplacian".to_string()];
    let mut out_dir = root.join("results/compare");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sizes" => sizes = list("--sizes", it.next())?,
            "--ks" => ks = list("--ks", it.next())?,
            "--dists" => {
                dists = list("--dists", it.next())?;
                if let Some(bad) = dists.iter().find(|d| *d != "gaussian" && *d != "laplacian") {
                    return Err(format!("--dists: '{bad}' is not gaussian or laplacian"));
                }
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

    println!(
        "{:<12} {:<10} {:>9} {:>4} {:>9} {:>10}  {:<20} {:>9} {:>9} {:>8}",
        "kernel", "dist", "n", "k", "ours s", "ours gap", "peer", "peer s", "peer gap", "speedup"
    );
    println!(
        "(gap: SSE above the optimum: the exact mode's SSE, or where it does not run the dynamic program's optimal value, --mode optimal-sse)"
    );
    let mut records = Vec::new();
    for dist in &dists {
        for &n in &sizes {
            let npy = work.join(format!("kmeans_{dist}_{n}.npy"));
            quantbench::npy::write_f32(&npy, &[n], &data(dist, n))?;
            for &k in &ks {
                eprintln!("[compare] kmeans {dist} n={n} k={k}");
                let ours = |mode: &str| -> Result<Value, String> {
                    let out = run(Command::new(&quantbench)
                        .arg("bench-kmeans")
                        .arg("--npy")
                        .arg(&npy)
                        .args(["--k", &k.to_string(), "--mode", mode]))?;
                    serde_json::from_str(out.trim()).map_err(|e| e.to_string())
                };
                let peer_run = || -> Result<Value, String> {
                    serde_json::from_str(
                        run(Command::new(&python)
                            .arg(root.join("xtask/peers/compare_kmeans.py"))
                            .arg("--npy")
                            .arg(&npy)
                            .args(["--k", &k.to_string()])
                            .env("OMP_NUM_THREADS", "1")
                            .env_remove("OPENBLAS_CORETYPE")
                            .env_remove("OPENBLAS_L2_SIZE"))?
                        .trim(),
                    )
                    .map_err(|e| format!("peer output: {e}"))
                };
                // Round 1: ours (exact, fast), then the peer. Where the peer took less than
                // SHORT_PEER_S, ROUNDS - 1 more rounds in the same order; each side's time is
                // its median over the rounds (one cold process per run, each run's own
                // measurement). The SSEs are deterministic: the first run's are kept.
                let mut exact = ours("exact");
                let mut fast = ours("fast");
                let mut peer = peer_run()?;
                let first_peer_s = peer["peer_s"].as_f64().unwrap_or(f64::INFINITY);
                let rounds = if first_peer_s < SHORT_PEER_S {
                    ROUNDS
                } else {
                    1
                };
                let (mut exact_s, mut fast_s, mut peer_times) =
                    (vec![], vec![], vec![first_peer_s]);
                let seconds =
                    |r: &Result<Value, String>| r.as_ref().ok().and_then(|o| o["ours_s"].as_f64());
                exact_s.extend(seconds(&exact));
                fast_s.extend(seconds(&fast));
                for _ in 1..rounds {
                    exact_s.extend(seconds(&ours("exact")));
                    fast_s.extend(seconds(&ours("fast")));
                    peer_times.extend(peer_run()?["peer_s"].as_f64());
                }
                for (res, times) in [(&mut exact, &exact_s), (&mut fast, &fast_s)] {
                    if let Ok(o) = res {
                        o["ours_s"] = json!(median(times));
                    }
                }
                peer["peer_s"] = json!(median(&peer_times));
                let (peer_s, peer_sse) = (
                    peer["peer_s"].as_f64().unwrap_or(f64::NAN),
                    peer["peer_sse"].as_f64().unwrap_or(f64::NAN),
                );
                // Should the exact clustering fail (its layered fallback's traceback is
                // limited), the optimum is still measured: the optimal value alone, without a
                // traceback (`--mode optimal-sse`, untimed here).
                let optimal = match &exact {
                    Ok(o) => o["ours_sse"].as_f64(),
                    Err(_) => ours("optimal-sse")
                        .ok()
                        .and_then(|o| o["ours_sse"].as_f64()),
                };
                let optimal_from = if exact.is_ok() {
                    "exact"
                } else {
                    "optimal-sse"
                };
                for (kernel, res) in [("kmeans_exact", &exact), ("kmeans_fast", &fast)] {
                    let rec = match res {
                        Ok(o) => {
                            let (s, sse) = (
                                o["ours_s"].as_f64().unwrap(),
                                o["ours_sse"].as_f64().unwrap(),
                            );
                            json!({"kernel": kernel, "n": n, "k": k, "dist": dist, "ours_s": s, "ours_sse": sse,
                                   "peer": peer["peer"], "peer_s": peer_s, "peer_sse": peer_sse, "optimal_sse": optimal,
                                   "optimal_from": optimal_from, "speedup": peer_s / s, "rounds": rounds,
                                   "ours_gap_bound": o["gap_bound"]})
                        }
                        Err(e) => {
                            json!({"kernel": kernel, "n": n, "k": k, "dist": dist, "ours_s": null, "ours_sse": null,
                                         "ours_error": e.lines().last().unwrap_or(""), "peer": peer["peer"], "peer_s": peer_s,
                                         "peer_sse": peer_sse, "optimal_sse": optimal, "optimal_from": optimal_from,
                                         "speedup": null})
                        }
                    };
                    let gap = |v: f64| {
                        optimal
                            .map(|o| format!("{:+.4}%", (v / o - 1.0) * 100.0))
                            .unwrap_or("-".into())
                    };
                    println!(
                        "{:<12} {:<10} {:>9} {:>4} {:>9} {:>10}  {:<20} {:>9.3} {:>9} {:>8}",
                        kernel,
                        dist,
                        n,
                        k,
                        rec["ours_s"]
                            .as_f64()
                            .map(|v| format!("{v:.3}"))
                            .unwrap_or("-".into()),
                        rec["ours_sse"].as_f64().map(gap).unwrap_or("-".into()),
                        peer["peer"].as_str().unwrap_or("?"),
                        peer_s,
                        gap(peer_sse),
                        rec["speedup"]
                            .as_f64()
                            .map(|v| format!("{v:.2}x"))
                            .unwrap_or("-".into()),
                    );
                    if let Some(e) = rec.get("ours_error") {
                        println!("             ours: {}", e.as_str().unwrap_or(""));
                    }
                    records.push(rec);
                }
            }
        }
    }
    let stamp = utc_stamp();
    let path = out_dir.join(format!("kmeans-{stamp}.jsonl"));
    let body: String = records.iter().map(|r| format!("{r}\n")).collect();
    write_atomic(&path, &body)?;
    let meta = json!({"task": "compare kmeans", "utc": stamp, "git": git_revision(&root), "cpu": cpu_model(),
                      "data_seed": SEED, "threads": 1,
                      "timing": format!("each side's median over {ROUNDS} alternating rounds where the peer's first run took < {SHORT_PEER_S} s, else one run; one process per run"), "peer_settings": "lloyd, k-means++, n_init=1, random_state=0, OMP_NUM_THREADS=1"});
    write_atomic(&path.with_extension("meta.json"), &format!("{meta:#}\n"))?;
    println!("\nwrote {}", path.display());
    Ok(())
}
