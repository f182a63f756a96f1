//! `cargo xtask run EXPERIMENT.toml [--out DIR] [--quiet]`: builds `quantbench` in release mode
//! and runs the experiment with it (xtask itself is a debug build: the work must not run here).

use std::path::Path;
use std::process::Command;

use crate::util::{git_revision, root, run};

pub fn main(args: &[String]) -> Result<(), String> {
    let Some(experiment) = args.first() else {
        return Err("usage: cargo xtask run EXPERIMENT.toml [--out DIR] [--quiet]".into());
    };
    let root = root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("[run] building quantbench (release)");
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--release", "--quiet", "-p", "quantbench"])
        .status()
        .map_err(|e| format!("cannot start cargo: {e}"))?;
    if !status.success() {
        return Err("building quantbench failed".into());
    }
    let rustc = run(Command::new("rustc").arg("-V"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    // Paths on the command line are relative to where the user ran cargo; cargo runs xtask in
    // that directory, so they resolve as typed.
    let exp = Path::new(experiment);
    let status = Command::new(root.join("target/release/quantbench"))
        .arg("run")
        .arg(exp)
        .arg("--results")
        .arg(root.join("results"))
        .args(&args[1..])
        .env("QUANTBENCH_GIT_SHA", git_revision(&root))
        .env("QUANTBENCH_RUSTC", rustc)
        .status()
        .map_err(|e| format!("cannot start quantbench: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "the experiment {experiment} failed (see the error above)"
        ))
    }
}
