//! Helpers shared by the comparison tasks: paths, subprocesses, the peers' Python, stamps.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The peers' Python: target/peers-venv with onnxruntime, onnx, numpy and scikit-learn,
/// made on first use.
pub fn peer_python(root: &Path) -> Result<PathBuf, String> {
    let venv = root.join("target/peers-venv");
    let python = venv.join("bin/python");
    let ready = python.exists()
        && Command::new(&python)
            .args(["-c", "import onnxruntime, onnx, numpy, sklearn, sympy"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    if !ready {
        eprintln!(
            "[compare] creating {} and installing onnxruntime, onnx, numpy, scikit-learn, sympy with pip",
            venv.display()
        );
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "onnxruntime",
            "onnx",
            "numpy",
            "scikit-learn",
            "sympy",
        ]))?;
    }
    Ok(python)
}

pub use quantbench::sys::{cpu_model, utc_stamp};

/// `git describe --always --dirty` of the workspace, or empty.
pub fn git_revision(root: &Path) -> String {
    run(Command::new("git")
        .current_dir(root)
        .args(["describe", "--always", "--dirty"]))
    .map(|s| s.trim().to_string())
    .unwrap_or_default()
}

/// Writes `body` to `path` through a temporary file (never a half-written result).
pub fn write_atomic(path: &Path, body: &str) -> Result<(), String> {
    quantbench::sys::write_atomic(path, body.as_bytes())
}

/// What every comparison needs: the peers' Python, a release build of `quantbench`, and the
/// scratch (`target/compare`) and output folders.
pub struct Setup {
    pub python: PathBuf,
    pub quantbench: PathBuf,
    pub work: PathBuf,
}

/// Builds the release `quantbench` binary and returns its path; `task` prefixes the message.
pub fn build_quantbench(root: &Path, task: &str) -> Result<PathBuf, String> {
    eprintln!("[{task}] building quantbench (release)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo).current_dir(root).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "quantbench",
    ]))?;
    Ok(root.join("target/release/quantbench"))
}

pub fn setup(root: &Path, out_dir: &Path) -> Result<Setup, String> {
    let python = peer_python(root)?;
    let quantbench = build_quantbench(root, "compare")?;
    let work = root.join("target/compare");
    for dir in [&work, &out_dir.to_path_buf()] {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(Setup {
        python,
        quantbench,
        work,
    })
}

/// SplitMix64, the seeded generator of the comparison data sets.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// Uniform in [0, 1) with 53 bits.
    pub fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A comma-separated option value parsed item by item (`--sizes 1,2,3`).
pub fn list<T: std::str::FromStr>(flag: &str, v: Option<&String>) -> Result<Vec<T>, String> {
    v.ok_or(format!("{flag} needs a value"))?
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<T>()
                .map_err(|_| format!("{flag}: '{s}' is not valid"))
        })
        .collect()
}
