//! `cargo xtask fuzz`: runs every fuzz target of `fuzz/` (cargo-fuzz, libFuzzer) for a fixed
//! time and reports the executions. Installs cargo-fuzz and the nightly toolchain when
//! missing. A crash leaves its input under `fuzz/artifacts/<target>/`; turn it into a
//! regression test under `harness/tests/fuzz_inputs/<target>/` (read by
//! `harness/tests/fuzz_regressions.rs`).
//!
//! Seeds: real files where they exist (the shared models and data, read from the data root
//! and copied into `target/fuzz/corpus`, never into the repository), the project's
//! experiments, and small files made here.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{root, run};

const TARGETS: [&str; 5] = ["onnx", "experiment", "npy", "idx", "cifar"];
/// libFuzzer fails an input that makes one allocation above this (the stated limit).
pub const MALLOC_LIMIT_MB: u32 = 1024;
const RSS_LIMIT_MB: u32 = 2048;

pub fn main(args: &[String]) -> Result<(), String> {
    let mut seconds = 60u64;
    let mut targets: Vec<String> = TARGETS.iter().map(|s| s.to_string()).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&s| s >= 1)
                    .ok_or("--seconds needs a whole number >= 1")?
            }
            "--targets" => {
                targets = crate::util::list("--targets", it.next())?;
                for t in &targets {
                    if !TARGETS.contains(&t.as_str()) {
                        return Err(format!(
                            "--targets: no fuzz target '{t}' (targets: {})",
                            TARGETS.join(", ")
                        ));
                    }
                }
            }
            other => return Err(format!("fuzz: unknown option '{other}'")),
        }
    }
    let root = root();
    ensure_tools()?;
    let corpus_root = root.join("target/fuzz/corpus");
    let mut report = Vec::new();
    let mut crashed = Vec::new();
    for t in &targets {
        let corpus = corpus_root.join(t);
        std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
        seed(&root, t, &corpus)?;
        eprintln!("[fuzz] {t}: {seconds} s");
        let out = Command::new("cargo")
            .current_dir(root.join("fuzz"))
            .args(["+nightly", "fuzz", "run", t])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg("-print_final_stats=1")
            .output()
            .map_err(|e| format!("cannot start cargo fuzz: {e}"))?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        let log_file = root.join(format!("target/fuzz/{t}.log"));
        std::fs::write(&log_file, &log).map_err(|e| format!("{}: {e}", log_file.display()))?;
        let execs = stat(&log, "stat::number_of_executed_units:");
        let corpus_n = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
        let ok = out.status.success();
        report.push(format!(
            "{t:<11} {seconds:>6} s {:>12} executions  corpus {corpus_n:>6}  {}",
            execs.map_or("?".into(), |e| e.to_string()),
            if ok { "no crash" } else { "CRASH" }
        ));
        if !ok {
            let artifact = log
                .lines()
                .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
                .unwrap_or("(see the log)")
                .to_string();
            crashed.push(format!("{t}: {artifact} (log: {})", log_file.display()));
        }
    }
    println!("target       time        executions  corpus   result");
    for r in &report {
        println!("{r}");
    }
    if crashed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fuzzing found {} crash(es):\n  {}",
            crashed.len(),
            crashed.join("\n  ")
        ))
    }
}

fn stat(log: &str, key: &str) -> Option<u64> {
    log.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

fn ensure_tools() -> Result<(), String> {
    let have_nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "-V"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_nightly {
        eprintln!("[fuzz] installing the nightly toolchain (rustup, minimal profile)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let have_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_fuzz {
        eprintln!("[fuzz] installing cargo-fuzz (cargo install --locked)");
        run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))?;
    }
    Ok(())
}

/// Puts the seed inputs of `target` into `corpus` (idempotent).
fn seed(root: &Path, target: &str, corpus: &Path) -> Result<(), String> {
    let data = quantbench::data_root();
    let put = |name: &str, bytes: &[u8]| -> Result<(), String> {
        let p = corpus.join(format!("seed-{name}"));
        if !p.exists() {
            std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        Ok(())
    };
    let read = |p: PathBuf| std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()));
    match target {
        "onnx" => {
            if let Some(d) = &data {
                put(
                    "mnist-8.onnx",
                    &read(d.join("models/mnist-8/mnist-8.onnx"))?,
                )?;
                put(
                    "resnet20.onnx",
                    &read(d.join("models/resnet20/resnet20.onnx"))?,
                )?;
            }
        }
        "experiment" => {
            for e in std::fs::read_dir(root.join("experiments")).map_err(|e| e.to_string())? {
                let p = e.map_err(|e| e.to_string())?.path();
                if p.extension().is_some_and(|x| x == "toml") {
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    put(&name, &read(p)?)?;
                }
            }
        }
        "npy" => {
            // a 2x3 little-endian float32 array, format version 1.0
            let mut header =
                String::from("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }");
            while (10 + header.len() + 1) % 64 != 0 {
                header.push(' ');
            }
            header.push('\n');
            let mut b = b"\x93NUMPY\x01\x00".to_vec();
            b.extend((header.len() as u16).to_le_bytes());
            b.extend(header.as_bytes());
            for v in [0.5f32, -1.0, 2.25, 3.0, 0.0, -0.125] {
                b.extend(v.to_le_bytes());
            }
            put("2x3.npy", &b)?;
        }
        "idx" => {
            // four real MNIST test images and labels as a consistent IDX pair
            if let Some(d) = &data {
                let dir = d.join("data/mnist");
                let images = read_idx(&dir.join("t10k-images-idx3-ubyte"))?;
                let labels = read_idx(&dir.join("t10k-labels-idx1-ubyte"))?;
                let mut im = images[..16].to_vec();
                im[4..8].copy_from_slice(&4u32.to_be_bytes());
                im.extend(&images[16..16 + 4 * 784]);
                let mut lb = labels[..8].to_vec();
                lb[4..8].copy_from_slice(&4u32.to_be_bytes());
                lb.extend(&labels[8..12]);
                // the target splits at rest.len() * cut / 255: choose cut for im's length
                let total = im.len() + lb.len();
                let cut = (im.len() * 255).div_ceil(total) as u8;
                let mut b = vec![cut];
                b.extend(&im);
                b.extend(&lb);
                put("mnist4", &b)?;
            }
        }
        "cifar" => {
            if let Some(d) = &data {
                let all = read(d.join("data/cifar10-jpeg/test_batch.bin"))?;
                put("two-records", &all[..2 * 3073])?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// An IDX file, raw or gzipped.
fn read_idx(base: &Path) -> Result<Vec<u8>, String> {
    if base.is_file() {
        return std::fs::read(base).map_err(|e| format!("{}: {e}", base.display()));
    }
    let gz = PathBuf::from(format!("{}.gz", base.display()));
    let o = Command::new("gzip")
        .arg("-dc")
        .arg(&gz)
        .output()
        .map_err(|e| format!("gzip: {e}"))?;
    if !o.status.success() {
        return Err(format!("{}: gzip -dc failed", gz.display()));
    }
    Ok(o.stdout)
}
