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
            .args(["-c", "import onnxruntime, onnx, numpy, sklearn"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    if !ready {
        eprintln!(
            "[compare] creating {} and installing onnxruntime, onnx, numpy with pip",
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
        ]))?;
    }
    Ok(python)
}

pub fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil-from-days (proleptic Gregorian)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

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
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, body).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// What every comparison needs: the peers' Python, a release build of `quantbench`, and the
/// scratch (`target/compare`) and output folders.
pub struct Setup {
    pub python: PathBuf,
    pub quantbench: PathBuf,
    pub work: PathBuf,
}

pub fn setup(root: &Path, out_dir: &Path) -> Result<Setup, String> {
    let python = peer_python(root)?;
    eprintln!("[compare] building quantbench (release)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo).current_dir(root).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "quantbench",
    ]))?;
    let work = root.join("target/compare");
    for dir in [&work, &out_dir.to_path_buf()] {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(Setup {
        python,
        quantbench: root.join("target/release/quantbench"),
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
