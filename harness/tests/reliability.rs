//! Reliability of `quantbench run` (issue #10), through the binary:
//! - interrupted runs: killed with SIGKILL at seeded random moments and re-run into the same
//!   folder until it finishes. After every kill each result file present is complete; the
//!   final `runs.csv` equals an uninterrupted run's (all columns but the wall-clock ones); the
//!   final run recomputes no finished cell. A second run into a busy folder is refused.
//! - reproducibility: the same table twice in a row, with 1 and 2 threads, and with every ISA
//!   forced (integer paths bit-identical; the float paths' tolerance is stated and tested).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{files, root};

/// MNIST-8 on 300 test images: seven cells (fp32, linear 8/4/2 bits, k-means 4/2 bits,
/// integer_only), no latency measurement, so every remaining column is deterministic.
const EXPERIMENT: &str = r#"
name = "interrupted"
seed = 7

[data]
dataset = "mnist"
split = "test"
limit = 300
batch = 1
normalization = { scale = 0.00392156862745098, mean = [0.0], std = [1.0] }

[calibration]
split = "test"
allow_eval_split = true
samples = 64
method = "minmax"

[latency]
batch_sizes = []

[report]
charts = false

[[models]]
name = "mnist8"
path = "models/mnist-8/mnist-8.onnx"
input = [1, 28, 28]

[[methods]]
method = "linear"
bits = [8, 4, 2]
granularity = "per_channel"

[[methods]]
method = "kmeans"
bits = [4, 2]
granularity = "per_tensor"

[[methods]]
method = "integer_only"
"#;

/// Columns that are wall-clock measurements, dropped before comparing tables.
const TIMING: [&str; 4] = ["quantize_s", "eval_s", "latency_ms_b1", "latency_ms_bN"];

fn quantbench(exp: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_quantbench"));
    c.arg("run")
        .arg(exp)
        .arg("--out")
        .arg(out)
        .arg("--data")
        .arg(root())
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn run_to_end(exp: &Path, out: &Path) {
    run_with(exp, out, &[], &[]);
}

fn run_with(exp: &Path, out: &Path, args: &[&str], env: &[(&str, &str)]) {
    let o = quantbench(exp, out)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "quantbench run failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// runs.csv without the timing columns.
fn table(dir: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(dir.join("runs.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let keep: Vec<usize> = (0..header.len())
        .filter(|&i| !TIMING.contains(&header[i]))
        .collect();
    assert_eq!(keep.len() + TIMING.len(), header.len(), "{header:?}");
    std::iter::once(header.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .chain(lines.map(|l| l.split(',').map(str::to_string).collect()))
        .map(|row: Vec<String>| keep.iter().map(|&i| row[i].clone()).collect())
        .collect()
}

/// Every result file in `dir` is complete: JSON parses, CSV rows have the header's width and
/// end in a newline, Parquet has both magic numbers, safetensors' header and data add up to
/// the file size. Temporary `.partial-` files and the lock are not results. Returns the
/// number of finished cell records.
fn check_complete(dir: &Path) -> usize {
    let mut cells = 0;
    for p in files(dir) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.contains(".partial-") || name == ".lock" {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let what = p.display();
        match p.extension().and_then(|e| e.to_str()).unwrap_or("") {
            "json" => {
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .unwrap_or_else(|e| panic!("{what}: half-written JSON: {e}"));
                if p.parent().unwrap().ends_with("cells") {
                    cells += 1;
                }
            }
            "csv" => {
                let text = String::from_utf8(bytes).unwrap();
                assert!(text.ends_with('\n'), "{what}: no final newline");
                let width = text.lines().next().unwrap().split(',').count();
                for l in text.lines() {
                    assert_eq!(l.split(',').count(), width, "{what}: short row '{l}'");
                }
            }
            "parquet" => {
                assert!(
                    bytes.len() >= 8
                        && &bytes[..4] == b"PAR1"
                        && &bytes[bytes.len() - 4..] == b"PAR1",
                    "{what}: truncated Parquet"
                );
            }
            "safetensors" => {
                let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
                let header: serde_json::Value =
                    serde_json::from_slice(&bytes[8..8 + n]).expect("safetensors header");
                let end = header
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter(|(k, _)| *k != "__metadata__")
                    .map(|(_, v)| v["data_offsets"][1].as_u64().unwrap() as usize)
                    .max()
                    .unwrap_or(0);
                assert_eq!(8 + n + end, bytes.len(), "{what}: truncated tensors");
            }
            "md" | "toml" | "hash" => assert!(!bytes.is_empty(), "{what}: empty"),
            _ => {}
        }
    }
    cells
}

/// xorshift64: the kill moments of one seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[test]
fn killed_runs_resume_to_the_uninterrupted_result() {
    let tmp = std::env::temp_dir().join(format!("qb-interrupted-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let exp = tmp.join("interrupted.toml");
    std::fs::write(&exp, EXPERIMENT).unwrap();

    let clean = tmp.join("clean");
    let t = Instant::now();
    run_to_end(&exp, &clean);
    let full_ms = t.elapsed().as_millis() as u64;
    let want = table(&clean);
    assert_eq!(want.len(), 1 + 7, "header + seven cells");
    assert_eq!(check_complete(&clean), 7);

    let mut kills = 0;
    for seed in 1..=3u64 {
        let out = tmp.join(format!("seed{seed}"));
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
        // up to three kills at random moments of a full run's duration, then to the end
        for _ in 0..3 {
            let mut child = quantbench(&exp, &out).spawn().unwrap();
            std::thread::sleep(Duration::from_millis(rng.below(full_ms)));
            let finished = child.try_wait().unwrap().is_some();
            child.kill().ok(); // SIGKILL on Unix
            child.wait().unwrap();
            if !finished {
                kills += 1;
            }
            check_complete(&out);
        }
        let done = check_complete(&out);
        run_to_end(&exp, &out);
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("meta.json")).unwrap()).unwrap();
        assert_eq!(
            meta["cells_skipped_as_done"].as_u64(),
            Some(done as u64),
            "seed {seed}: the final run must skip exactly the {done} finished cells"
        );
        assert_eq!(
            table(&out),
            want,
            "seed {seed}: runs.csv differs from the clean run"
        );
        let leftovers: Vec<PathBuf> = files(&out)
            .into_iter()
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                n.contains(".partial-") || n == ".lock"
            })
            .collect();
        assert!(leftovers.is_empty(), "seed {seed}: {leftovers:?}");
    }
    // the kills must actually have interrupted something
    assert!(kills >= 3, "only {kills} runs were interrupted");
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn a_second_run_into_a_busy_folder_is_refused() {
    let tmp = std::env::temp_dir().join(format!("qb-locked-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let out = tmp.join("run");
    std::fs::create_dir_all(&out).unwrap();
    let exp = tmp.join("interrupted.toml");
    std::fs::write(&exp, EXPERIMENT).unwrap();
    // this test process is alive: its pid in the lock means "busy"
    std::fs::write(out.join(".lock"), std::process::id().to_string()).unwrap();
    let o = quantbench(&exp, &out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("another quantbench run") && err.contains(&std::process::id().to_string()),
        "{err}"
    );
    // a dead pid's lock is taken over (pid 0x7fff_fff0 does not exist)
    std::fs::write(out.join(".lock"), "2147483632").unwrap();
    run_to_end(&exp, &out);
    assert!(!out.join(".lock").exists());
    std::fs::remove_dir_all(&tmp).ok();
}

/// A table as `column -> values` rows (header first in `table`).
fn column(t: &[Vec<String>], name: &str) -> Vec<String> {
    let i = t[0].iter().position(|h| h == name).unwrap();
    t[1..].iter().map(|r| r[i].clone()).collect()
}

/// Accuracy columns of the float paths (fp32, and the fake-quant simulation of linear and
/// k-means weights): their logits come from f32 arithmetic whose summation order depends on
/// the ISA's vector width, so an image near a tie can flip. Stated tolerance: 0.5 percentage
/// points of top-1 / top-5 (1.5 of the 300 images); measured on this experiment: identical.
/// Everything else (integer_only's accuracy, the quantized weights' size, SQNR and every
/// label) must be bit-identical.
const ACCURACY: [&str; 4] = ["top1", "top1_delta", "top5", "sim_top1"];
const FLOAT_TOLERANCE: f64 = 0.005;

#[test]
fn results_are_identical_across_runs_threads_and_isas() {
    let tmp = std::env::temp_dir().join(format!("qb-repro-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let exp = tmp.join("interrupted.toml");
    std::fs::write(&exp, EXPERIMENT).unwrap();
    let run = |name: &str, args: &[&str], env: &[(&str, &str)]| {
        let out = tmp.join(name);
        run_with(&exp, &out, args, env);
        table(&out)
    };
    let first = run("first", &[], &[]);
    assert_eq!(run("second", &[], &[]), first, "twice in a row");
    assert_eq!(run("threads1", &["--threads", "1"], &[]), first, "1 thread");
    assert_eq!(
        run("threads2", &["--threads", "2"], &[]),
        first,
        "2 threads"
    );

    let isas = String::from_utf8(
        Command::new(env!("CARGO_BIN_EXE_quantbench"))
            .arg("isa")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let methods = column(&first, "method");
    for line in isas.lines().filter(|l| l.ends_with(" supported")) {
        let isa = line.split_whitespace().next().unwrap();
        let t = run(&format!("isa-{isa}"), &[], &[("QUANTBENCH_ISA", isa)]);
        assert!(
            column(&t, "isa").iter().all(|v| v == isa),
            "{isa}: isa column"
        );
        for name in &t[0] {
            if name == "isa" {
                continue;
            }
            let (got, want) = (column(&t, name), column(&first, name));
            for (i, m) in methods.iter().enumerate() {
                let float_accuracy = m != "integer_only" && ACCURACY.contains(&name.as_str());
                if !float_accuracy {
                    assert_eq!(got[i], want[i], "{isa}: {m} {name} must be bit-identical");
                    continue;
                }
                let (g, w) = (got[i].parse::<f64>(), want[i].parse::<f64>());
                match (g, w) {
                    (Ok(g), Ok(w)) => assert!(
                        (g - w).abs() <= FLOAT_TOLERANCE,
                        "{isa}: {m} {name} = {g}, default ISA {w}: beyond {FLOAT_TOLERANCE}"
                    ),
                    _ => assert_eq!(got[i], want[i], "{isa}: {m} {name}"),
                }
            }
        }
    }
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn a_run_that_would_not_fit_in_memory_is_refused_up_front() {
    let tmp = std::env::temp_dir().join(format!("qb-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let exp = tmp.join("interrupted.toml");
    std::fs::write(&exp, EXPERIMENT).unwrap();
    let out = tmp.join("run");
    // 300 MNIST images are 235 KB and MNIST-8 is 26 KB: 200 KiB cannot hold them
    let o = quantbench(&exp, &out)
        .args(["--max-memory", "200K"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("interrupted.toml: estimated peak memory")
            && err.contains("evaluation images 0 MiB")
            && err.contains("exceeds the limit of 0 MiB (--max-memory)"),
        "{err}"
    );
    assert!(
        !out.join("runs.csv").exists() && !out.join("cells").join("mnist8--fp32.json").exists()
    );
    // enough memory: the run goes through and records its estimate
    run_with(&exp, &out, &["--max-memory", "1G"], &[]);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("meta.json")).unwrap()).unwrap();
    let est = meta["memory_estimate_bytes"].as_u64().unwrap();
    assert!(est > 300 * 784 && est < 1 << 30, "{est}");
    assert_eq!(meta["memory_limit_bytes"].as_u64(), Some(1 << 30));
    let o = quantbench(&exp, &out)
        .args(["--max-memory", "lots"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("'lots' is not a size"));
    std::fs::remove_dir_all(&tmp).ok();
}
