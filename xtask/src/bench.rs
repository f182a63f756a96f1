//! `cargo xtask bench`: the kernel performance gate.
//!
//! Two measurements of every kernel family, both from the `gate` bench binary of
//! `quantbench-kernels` (`kernels/benches/gate.rs`), on fixed inputs:
//!
//! - **instructions**: callgrind counts the instructions of one call of the scalar and the AVX2
//!   path (valgrind cannot run AVX-512). They are deterministic, so the gate is tight: more
//!   than +5 % against the baseline fails.
//! - **speed-up over scalar**: the median time per call of every ISA the machine has,
//!   divided into the scalar path's median. The ISAs of one kernel are timed in interleaved
//!   rounds (`gate --ratios`), so every round sees one machine speed: on this shared 2-core
//!   machine criterion's one-benchmark-after-the-other blocks gave requantize's AVX-512
//!   speed-up anywhere in 42-56x over four runs, interleaved rounds 52-54x over five. A drop
//!   of more than 20 % fails, after two re-measurements of the failing kernels (a real
//!   regression fails every time, noise rarely three times in a row). The baseline's
//!   speed-ups are the median of three runs. `cargo bench -p quantbench-kernels --bench gate`
//!   gives criterion's full statistics of the same inputs, for a closer look.
//!
//! Baselines live in `results/bench/baseline.json` with the host they were measured on; every
//! `--check` and `--update` appends its numbers to `results/bench/history.csv`, and `--plot`
//! draws the history.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::util::{cpu_model, git_revision, root, run, utc_stamp, write_atomic};

/// Instruction-count growth that fails the check.
pub const INSTRUCTIONS_LIMIT: f64 = 0.05;
/// Drop of the speed-up over scalar that fails the check.
pub const SPEEDUP_LIMIT: f64 = 0.20;
/// Re-measurements of kernels whose speed-up failed, before the check fails.
const RETRIES: usize = 2;
/// The ISAs valgrind can execute.
const VALGRIND_ISAS: [&str; 2] = ["scalar", "avx2"];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub kernel: String,
    pub isa: String,
    /// callgrind's instruction count of one call (scalar and AVX2 only).
    pub instructions: Option<u64>,
    /// Median time of one call, in ns (interleaved rounds, `gate --ratios`).
    pub median_ns: Option<f64>,
    /// Scalar median / this ISA's median, measured in the same run (not for scalar).
    pub speedup: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Host {
    pub cpu: String,
    pub isas: Vec<String>,
    pub rustc: String,
    pub valgrind: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Baseline {
    pub created: String,
    pub git: String,
    pub host: Host,
    pub instructions_limit: f64,
    pub speedup_limit: f64,
    pub kernels: Vec<Entry>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Print,
    Check,
    Update,
    Plot,
}

pub fn main(args: &[String]) -> Result<(), String> {
    let root = root();
    let mut mode = Mode::Print;
    let mut only: Option<Vec<String>> = None;
    let mut baseline_path = root.join("results/bench/baseline.json");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let set = |m: Mode, mode: &mut Mode| {
            if *mode != Mode::Print {
                return Err("bench: give one of --check, --update, --plot".to_string());
            }
            *mode = m;
            Ok(())
        };
        match a.as_str() {
            "--check" => set(Mode::Check, &mut mode)?,
            "--update" => set(Mode::Update, &mut mode)?,
            "--plot" => set(Mode::Plot, &mut mode)?,
            "--kernels" => only = Some(crate::util::list("--kernels", it.next())?),
            "--baseline" => {
                baseline_path = PathBuf::from(it.next().ok_or("--baseline needs a file")?)
            }
            other => {
                return Err(format!(
                    "bench: unknown option '{other}' (see `cargo xtask help`)"
                ))
            }
        }
    }
    let history = baseline_path.with_file_name("history.csv");
    if mode == Mode::Plot {
        return plot(&root, &history);
    }
    if mode == Mode::Update && only.is_some() {
        return Err("bench --update measures every kernel: drop --kernels".into());
    }
    let baseline = match mode {
        Mode::Check => Some(read_baseline(&baseline_path)?),
        _ => None,
    };

    let gate = build_gate(&root)?;
    let all_cases = list_cases(&gate)?;
    let host = host(&all_cases);
    let mut cases = all_cases;
    if let Some(only) = &only {
        for name in only {
            if !cases.iter().any(|(k, _)| k == name) {
                return Err(format!(
                    "--kernels: no kernel '{name}' (kernels: {})",
                    cases
                        .iter()
                        .map(|(k, _)| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        cases.retain(|(k, _)| only.contains(k));
    }
    let work = root.join("target/bench-gate");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;

    let t0 = std::time::Instant::now();
    let instructions = count_instructions(&gate, &cases, &work)?;
    eprintln!(
        "[bench] callgrind: {} counts in {:.0} s",
        instructions.len(),
        t0.elapsed().as_secs_f64()
    );
    let t1 = std::time::Instant::now();
    let kernels: Vec<String> = cases.iter().map(|(k, _)| k.clone()).collect();
    let medians = time_kernels(&gate, &kernels)?;
    eprintln!(
        "[bench] timing: {} medians in {:.0} s",
        medians.len(),
        t1.elapsed().as_secs_f64()
    );
    let mut now = entries(&cases, &instructions, &medians);
    if mode == Mode::Update {
        // the baseline's speed-ups are the median of three runs, so that one noisy run does
        // not set a bar that later checks cannot reach
        let mut runs = vec![now.clone()];
        for round in 2..=3 {
            eprintln!("[bench] baseline speed-ups: timing run {round} of 3");
            let m = time_kernels(&gate, &kernels)?;
            runs.push(entries(&cases, &instructions, &m));
        }
        now = median_speedups(&runs);
    }

    let mut findings = Vec::new();
    if let Some(base) = &baseline {
        if base.host.rustc != host.rustc {
            eprintln!(
                "[bench] note: the baseline was compiled by {}, this run by {}; instruction counts depend on the compiler",
                base.host.rustc, host.rustc
            );
        }
        findings = compare(&base.kernels, &now, &host.isas);
        for attempt in 1..=RETRIES {
            let retry: Vec<String> = failing_speedups(&findings);
            if retry.is_empty() {
                break;
            }
            eprintln!(
                "[bench] speed-up below the limit for {}: re-measuring ({attempt} of {RETRIES})",
                retry.join(", ")
            );
            let again = time_kernels(&gate, &retry)?;
            let again = entries(&cases, &BTreeMap::new(), &again);
            merge_best_speedups(&mut now, &again);
            findings = compare(&base.kernels, &now, &host.isas);
        }
    }

    print_table(&now, baseline.as_ref().map(|b| b.kernels.as_slice()));
    let stamp = utc_stamp();
    let git = git_revision(&root);
    if mode != Mode::Print {
        append_history(&history, &stamp, &git, &now)?;
        eprintln!(
            "[bench] appended {} rows to {}",
            now.len(),
            history.display()
        );
    }
    match mode {
        Mode::Update => {
            let b = Baseline {
                created: stamp,
                git,
                host,
                instructions_limit: INSTRUCTIONS_LIMIT,
                speedup_limit: SPEEDUP_LIMIT,
                kernels: now,
            };
            let body = serde_json::to_string_pretty(&b).map_err(|e| e.to_string())? + "\n";
            if let Some(dir) = baseline_path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            write_atomic(&baseline_path, &body)?;
            eprintln!("[bench] wrote {}", baseline_path.display());
            Ok(())
        }
        Mode::Check => {
            for f in findings.iter().filter(|f| !f.fail) {
                eprintln!("[bench] note: {}", f.message);
            }
            let fails: Vec<&Finding> = findings.iter().filter(|f| f.fail).collect();
            if fails.is_empty() {
                eprintln!(
                    "[bench] check passed: {} measurements within +{:.0} % instructions and -{:.0} % speed-up of {}",
                    baseline.as_ref().map_or(0, |b| b.kernels.len()),
                    INSTRUCTIONS_LIMIT * 100.0,
                    SPEEDUP_LIMIT * 100.0,
                    baseline_path.display()
                );
                Ok(())
            } else {
                let lines: Vec<String> = fails.iter().map(|f| format!("  {}", f.message)).collect();
                Err(format!(
                    "kernel performance regressed against {} ({} failure(s)):\n{}\n(if the change is deliberate, record it with `cargo xtask bench --update` and commit the baseline)",
                    baseline_path.display(),
                    fails.len(),
                    lines.join("\n")
                ))
            }
        }
        _ => Ok(()),
    }
}

fn read_baseline(path: &Path) -> Result<Baseline, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "{}: {e} (record a baseline with `cargo xtask bench --update`)",
            path.display()
        )
    })?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a bench baseline: {e}", path.display()))
}

/// Builds the gate bench binary (bench profile, its own target folder because of its
/// RUSTFLAGS) and returns its path.
fn build_gate(root: &Path) -> Result<PathBuf, String> {
    eprintln!("[bench] building kernels/benches/gate.rs (bench profile)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root)
        .args([
            "bench",
            "--quiet",
            "-p",
            "quantbench-kernels",
            "--bench",
            "gate",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .env("CARGO_TARGET_DIR", root.join("target/bench-gate/build"));
    if cfg!(target_arch = "x86_64") {
        // Skylake-to-Cascade-Lake CPUs run a loop much slower when one of its jumps crosses
        // or ends on a 32-byte boundary (Intel's JCC erratum microcode), so an unrelated edit
        // that shifts code could move a kernel's speed-up by 30 %: measured here, the scalar
        // GEMM reference's layout alone took gemm_i8i8's AVX2 speed-up from 43-47x to 30x.
        // LLVM's padding keeps such jumps off the boundaries (32-33x in both builds).
        cmd.env(
            "RUSTFLAGS",
            "-C llvm-args=-x86-branches-within-32B-boundaries",
        );
    }
    let out = run(&mut cmd)?;
    for line in out.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact" && v["target"]["name"] == "gate" {
            if let Some(exe) = v["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    Err("cargo bench --no-run did not report the gate executable".into())
}

/// `(kernel, ISAs it runs on here)` from `gate --list`.
fn list_cases(gate: &Path) -> Result<Vec<(String, Vec<String>)>, String> {
    let out = run(Command::new(gate).arg("--list"))?;
    out.lines()
        .map(|l| {
            let (k, isas) = l
                .split_once(' ')
                .ok_or(format!("gate --list: unexpected line '{l}'"))?;
            Ok((k.to_string(), isas.split(',').map(str::to_string).collect()))
        })
        .collect()
}

fn host(cases: &[(String, Vec<String>)]) -> Host {
    let mut isas: Vec<String> = Vec::new();
    for (_, i) in cases {
        for isa in i {
            if !isas.contains(isa) {
                isas.push(isa.clone());
            }
        }
    }
    let first_line = |cmd: &mut Command| {
        run(cmd)
            .map(|s| s.lines().next().unwrap_or("").trim().to_string())
            .unwrap_or_default()
    };
    Host {
        cpu: cpu_model(),
        isas,
        rustc: first_line(Command::new("rustc").arg("-V")),
        valgrind: first_line(Command::new("valgrind").arg("--version")),
    }
}

fn valgrind_available() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// callgrind's instruction count of one call of each kernel's scalar and AVX2 path.
fn count_instructions(
    gate: &Path,
    cases: &[(String, Vec<String>)],
    work: &Path,
) -> Result<BTreeMap<(String, String), u64>, String> {
    if !valgrind_available() {
        return Err(
            "valgrind not found: the instruction counts need it (Debian: apt-get install valgrind)"
                .into(),
        );
    }
    let mut counts = BTreeMap::new();
    for (kernel, isas) in cases {
        for isa in VALGRIND_ISAS {
            if !isas.iter().any(|i| i == isa) {
                continue;
            }
            let file = work.join(format!("callgrind.{kernel}.{isa}.out"));
            let out = Command::new("valgrind")
                .arg("--tool=callgrind")
                .arg(format!("--callgrind-out-file={}", file.display()))
                .arg("--toggle-collect=*qb_measured*")
                .arg(gate)
                .args(["--probe", kernel, isa])
                .output()
                .map_err(|e| format!("cannot start valgrind: {e}"))?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() {
                if stderr.contains("does not run on") {
                    // valgrind hides an ISA this CPU has: no count, said in the table
                    eprintln!("[bench] {kernel}/{isa}: not executable under valgrind here");
                    continue;
                }
                return Err(format!("callgrind of {kernel}/{isa} failed:\n{stderr}"));
            }
            let text =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let n = callgrind_total(&text).ok_or(format!(
                "{}: no 'totals:' line in callgrind's output",
                file.display()
            ))?;
            counts.insert((kernel.clone(), isa.to_string()), n);
        }
    }
    Ok(counts)
}

/// The `totals:` (or `summary:`) event count of a callgrind output file.
pub fn callgrind_total(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Rounds of interleaved timing per kernel (`gate --ratios`; long kernels get fewer).
const ROUNDS: usize = 201;

/// Median ns per call of every ISA of the given kernels, from `gate --ratios`: the ISAs of
/// one kernel are timed in interleaved rounds, so each speed-up compares the same machine
/// speed.
fn time_kernels(
    gate: &Path,
    kernels: &[String],
) -> Result<BTreeMap<(String, String), f64>, String> {
    eprintln!(
        "[bench] timing {} kernels on every ISA ({ROUNDS} interleaved rounds each)",
        kernels.len()
    );
    let out = run(Command::new(gate)
        .arg("--ratios")
        .arg(ROUNDS.to_string())
        .args(kernels))?;
    let mut medians = BTreeMap::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let ns = f.get(2).and_then(|v| v.parse::<f64>().ok());
        match (f.len(), ns) {
            (3, Some(ns)) => {
                medians.insert((f[0].to_string(), f[1].to_string()), ns);
            }
            _ => return Err(format!("gate --ratios: unexpected line '{line}'")),
        }
    }
    Ok(medians)
}

/// One entry per (kernel, ISA), in the order of `gate --list`.
fn entries(
    cases: &[(String, Vec<String>)],
    instructions: &BTreeMap<(String, String), u64>,
    medians: &BTreeMap<(String, String), f64>,
) -> Vec<Entry> {
    let mut out = Vec::new();
    for (kernel, isas) in cases {
        let scalar = medians.get(&(kernel.clone(), "scalar".into())).copied();
        for isa in isas {
            let key = (kernel.clone(), isa.clone());
            let median_ns = medians.get(&key).copied();
            let speedup = match (isa.as_str(), scalar, median_ns) {
                ("scalar", _, _) => None,
                (_, Some(s), Some(m)) if m > 0.0 => Some(s / m),
                _ => None,
            };
            let instructions = instructions.get(&key).copied();
            if instructions.is_none() && median_ns.is_none() {
                continue;
            }
            out.push(Entry {
                kernel: kernel.clone(),
                isa: isa.clone(),
                instructions,
                median_ns,
                speedup,
            });
        }
    }
    out
}

/// The first run's entries with each speed-up (and median time) replaced by the median
/// over the runs.
fn median_speedups(runs: &[Vec<Entry>]) -> Vec<Entry> {
    let mut out = runs[0].clone();
    for e in out.iter_mut() {
        let mut xs: Vec<(f64, Option<f64>)> = runs
            .iter()
            .filter_map(|r| r.iter().find(|o| o.kernel == e.kernel && o.isa == e.isa))
            .filter_map(|o| o.speedup.map(|x| (x, o.median_ns)))
            .collect();
        if xs.is_empty() {
            continue;
        }
        xs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (x, ns) = xs[xs.len() / 2];
        e.speedup = Some(x);
        e.median_ns = ns;
    }
    out
}

/// Keeps, per (kernel, ISA), the better speed-up of two runs.
fn merge_best_speedups(now: &mut [Entry], again: &[Entry]) {
    for e in now.iter_mut() {
        if let Some(a) = again
            .iter()
            .find(|a| a.kernel == e.kernel && a.isa == e.isa)
        {
            if a.speedup.unwrap_or(0.0) > e.speedup.unwrap_or(0.0) {
                e.speedup = a.speedup;
                e.median_ns = a.median_ns;
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub kernel: String,
    pub isa: String,
    pub fail: bool,
    /// The failure is a speed-up (re-measurable), not an instruction count.
    pub speedup: bool,
    pub message: String,
}

fn failing_speedups(findings: &[Finding]) -> Vec<String> {
    let mut k: Vec<String> = findings
        .iter()
        .filter(|f| f.fail && f.speedup)
        .map(|f| f.kernel.clone())
        .collect();
    k.sort();
    k.dedup();
    k
}

/// The check: every baseline measurement against this run's. `host_isas` are the ISAs this
/// machine runs; a baseline speed-up of an ISA it lacks is skipped with a note.
pub fn compare(base: &[Entry], now: &[Entry], host_isas: &[String]) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut push = |b: &Entry, fail: bool, speedup: bool, message: String| {
        out.push(Finding {
            kernel: b.kernel.clone(),
            isa: b.isa.clone(),
            fail,
            speedup,
            message,
        })
    };
    for b in base {
        let id = format!("{}/{}", b.kernel, b.isa);
        let n = now.iter().find(|n| n.kernel == b.kernel && n.isa == b.isa);
        if !host_isas.contains(&b.isa) {
            push(
                b,
                false,
                false,
                format!("{id}: this machine has no {}; skipped", b.isa),
            );
            continue;
        }
        if let Some(bi) = b.instructions {
            match n.and_then(|n| n.instructions) {
                None => push(
                    b,
                    true,
                    false,
                    format!("{id}: instructions: in the baseline ({bi}) but not measured now"),
                ),
                Some(ni) => {
                    let change = ni as f64 / bi as f64 - 1.0;
                    if change > INSTRUCTIONS_LIMIT {
                        push(
                            b,
                            true,
                            false,
                            format!(
                                "{id}: instructions {bi} -> {ni} ({:+.1} %, limit +{:.0} %)",
                                change * 100.0,
                                INSTRUCTIONS_LIMIT * 100.0
                            ),
                        );
                    } else if change < -INSTRUCTIONS_LIMIT {
                        push(
                            b,
                            false,
                            false,
                            format!(
                                "{id}: instructions {bi} -> {ni} ({:+.1} %): faster; record with --update",
                                change * 100.0
                            ),
                        );
                    }
                }
            }
        }
        if let Some(bs) = b.speedup {
            match n.and_then(|n| n.speedup) {
                None => push(
                    b,
                    true,
                    true,
                    format!("{id}: speed-up over scalar: in the baseline ({bs:.2}x) but not measured now"),
                ),
                Some(ns) => {
                    let change = ns / bs - 1.0;
                    if change < -SPEEDUP_LIMIT {
                        push(
                            b,
                            true,
                            true,
                            format!(
                                "{id}: speed-up over scalar {bs:.2}x -> {ns:.2}x ({:+.1} %, limit -{:.0} %)",
                                change * 100.0,
                                SPEEDUP_LIMIT * 100.0
                            ),
                        );
                    }
                }
            }
        }
    }
    for n in now {
        if !base.iter().any(|b| b.kernel == n.kernel && b.isa == n.isa) {
            out.push(Finding {
                kernel: n.kernel.clone(),
                isa: n.isa.clone(),
                fail: false,
                speedup: false,
                message: format!(
                    "{}/{}: not in the baseline; record it with --update",
                    n.kernel, n.isa
                ),
            });
        }
    }
    out
}

fn print_table(now: &[Entry], base: Option<&[Entry]>) {
    println!(
        "{:<30} {:<7} {:>12} {:>12} {:>8}  {:>9} {:>9} {:>8}",
        "kernel", "isa", "instr base", "instr now", "change", "x base", "x now", "change"
    );
    for n in now {
        let b = base.and_then(|b| b.iter().find(|b| b.kernel == n.kernel && b.isa == n.isa));
        let fmt_i = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let fmt_x = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}x"));
        let change = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if a > 0.0 => format!("{:+.1}%", (b / a - 1.0) * 100.0),
            _ => "-".to_string(),
        };
        let bi = b.and_then(|b| b.instructions);
        let bs = b.and_then(|b| b.speedup);
        println!(
            "{:<30} {:<7} {:>12} {:>12} {:>8}  {:>9} {:>9} {:>8}",
            n.kernel,
            n.isa,
            fmt_i(bi),
            fmt_i(n.instructions),
            change(bi.map(|v| v as f64), n.instructions.map(|v| v as f64)),
            fmt_x(bs),
            fmt_x(n.speedup),
            change(bs, n.speedup),
        );
    }
}

const HISTORY_HEADER: &str = "date,git_sha,kernel,isa,instructions,ratio";

fn append_history(path: &Path, stamp: &str, git: &str, now: &[Entry]) -> Result<(), String> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut body = String::new();
    let exists = path.exists();
    if !exists {
        body.push_str(HISTORY_HEADER);
        body.push('\n');
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if text.lines().next() != Some(HISTORY_HEADER) {
            return Err(format!(
                "{}: expected the header '{HISTORY_HEADER}'",
                path.display()
            ));
        }
    }
    for e in now {
        body.push_str(&format!(
            "{stamp},{git},{},{},{},{}\n",
            e.kernel,
            e.isa,
            e.instructions.map_or(String::new(), |v| v.to_string()),
            e.speedup.map_or(String::new(), |v| format!("{v:.4}")),
        ));
    }
    // one write of whole lines: an interrupted append leaves at most an incomplete last line,
    // which the plot reports
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(body.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// `--plot`: the history chart, drawn by the release `quantbench` (which has plotters).
fn plot(root: &Path, history: &Path) -> Result<(), String> {
    if !history.exists() {
        return Err(format!(
            "{}: no history yet (run `cargo xtask bench --check` or `--update`)",
            history.display()
        ));
    }
    let quantbench = crate::util::build_quantbench(root, "bench")?;
    for ext in ["svg", "png"] {
        let out = history.with_extension(ext);
        run(Command::new(&quantbench)
            .arg("plot-bench-history")
            .arg("--history")
            .arg(history)
            .arg("--out")
            .arg(&out))?;
        eprintln!("[bench] wrote {}", out.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(kernel: &str, isa: &str, instr: Option<u64>, x: Option<f64>) -> Entry {
        Entry {
            kernel: kernel.into(),
            isa: isa.into(),
            instructions: instr,
            median_ns: None,
            speedup: x,
        }
    }

    fn isas() -> Vec<String> {
        vec!["scalar".into(), "avx2".into(), "avx512".into()]
    }

    #[test]
    fn unchanged_and_small_changes_pass() {
        let base = vec![
            e("q", "scalar", Some(1000), None),
            e("q", "avx2", Some(100), Some(8.0)),
            e("q", "avx512", None, Some(12.0)),
        ];
        let now = vec![
            e("q", "scalar", Some(1049), None),
            e("q", "avx2", Some(100), Some(6.5)),
            e("q", "avx512", None, Some(12.5)),
        ];
        let f = compare(&base, &now, &isas());
        assert!(f.iter().all(|f| !f.fail), "{f:?}");
    }

    #[test]
    fn instruction_growth_fails_naming_the_kernel_and_the_change() {
        let base = vec![e("quantize_f32_i8", "avx2", Some(25_955), Some(8.0))];
        let now = vec![e("quantize_f32_i8", "avx2", Some(537_221), Some(8.0))];
        let f = compare(&base, &now, &isas());
        assert_eq!(f.len(), 1);
        assert!(f[0].fail && !f[0].speedup);
        assert_eq!(
            f[0].message,
            "quantize_f32_i8/avx2: instructions 25955 -> 537221 (+1969.8 %, limit +5 %)"
        );
        // 5 % is allowed, 5.1 % is not
        let now = vec![e("quantize_f32_i8", "avx2", Some(27_252), Some(8.0))];
        assert!(compare(&base, &now, &isas()).iter().all(|f| !f.fail));
        let now = vec![e("quantize_f32_i8", "avx2", Some(27_300), Some(8.0))];
        assert!(compare(&base, &now, &isas()).iter().any(|f| f.fail));
    }

    #[test]
    fn speedup_drop_fails_and_is_marked_for_remeasurement() {
        let base = vec![e("min_max_f32", "avx512", None, Some(10.0))];
        let now = vec![e("min_max_f32", "avx512", None, Some(7.9))];
        let f = compare(&base, &now, &isas());
        assert_eq!(f.len(), 1);
        assert!(f[0].fail && f[0].speedup);
        assert!(f[0]
            .message
            .contains("10.00x -> 7.90x (-21.0 %, limit -20 %)"));
        assert_eq!(failing_speedups(&f), vec!["min_max_f32".to_string()]);
        // a better re-measurement replaces the failing one
        let mut now = now;
        merge_best_speedups(&mut now, &[e("min_max_f32", "avx512", None, Some(9.5))]);
        assert!(compare(&base, &now, &isas()).iter().all(|f| !f.fail));
    }

    #[test]
    fn missing_measurements_fail_and_absent_isas_are_skipped() {
        let base = vec![
            e("k", "avx2", Some(100), Some(4.0)),
            e("k", "avx512", None, Some(9.0)),
        ];
        let f = compare(&base, &[], &["scalar".into(), "avx2".into()]);
        let fails: Vec<&Finding> = f.iter().filter(|f| f.fail).collect();
        assert_eq!(fails.len(), 2, "{f:?}");
        assert!(fails.iter().all(|f| f.isa == "avx2"));
        assert!(f
            .iter()
            .any(|f| !f.fail && f.message == "k/avx512: this machine has no avx512; skipped"));
        // a new kernel is a note, not a failure
        let f = compare(&[], &[e("new", "scalar", Some(5), None)], &isas());
        assert!(f.len() == 1 && !f[0].fail);
    }

    #[test]
    fn baseline_speedups_are_the_median_of_the_runs() {
        let runs: Vec<Vec<Entry>> = [9.0, 12.0, 10.0]
            .iter()
            .map(|&x| {
                vec![
                    e("k", "scalar", Some(7), None),
                    e("k", "avx2", Some(3), Some(x)),
                ]
            })
            .collect();
        let m = median_speedups(&runs);
        assert_eq!(m[0].speedup, None);
        assert_eq!(m[1].speedup, Some(10.0));
        assert_eq!(m[1].instructions, Some(3));
    }

    #[test]
    fn callgrind_totals_are_parsed() {
        let text = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nfl=(1) x\n0 5\nsummary: 537221\ntotals: 537221\n";
        assert_eq!(callgrind_total(text), Some(537_221));
        assert_eq!(callgrind_total("events: Ir\n"), None);
    }

    #[test]
    fn entries_compute_speedups_against_the_same_runs_scalar() {
        let cases = vec![(
            "k".to_string(),
            vec!["scalar".to_string(), "avx2".to_string()],
        )];
        let mut med = BTreeMap::new();
        med.insert(("k".to_string(), "scalar".to_string()), 800.0);
        med.insert(("k".to_string(), "avx2".to_string()), 100.0);
        let mut ins = BTreeMap::new();
        ins.insert(("k".to_string(), "scalar".to_string()), 42u64);
        let es = entries(&cases, &ins, &med);
        assert_eq!(es.len(), 2);
        assert_eq!(es[0].speedup, None);
        assert_eq!(es[0].instructions, Some(42));
        assert_eq!(es[1].speedup, Some(8.0));
        assert_eq!(es[1].instructions, None);
    }
}
