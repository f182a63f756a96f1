//! Shared by the harness's integration tests.

use std::path::{Path, PathBuf};

/// The shared data root (`QUANTBENCH_DATA`, else ../shared); the tests need it.
pub fn root() -> PathBuf {
    let r = quantbench::data_root()
        .or_else(|| {
            let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
            p.is_dir().then_some(p)
        })
        .expect("shared data root not found: set QUANTBENCH_DATA");
    assert!(
        r.join("models").is_dir(),
        "{}: no models/ folder (set QUANTBENCH_DATA)",
        r.display()
    );
    r
}

/// Every file under `dir`, recursively (empty when `dir` does not exist).
#[allow(dead_code)] // not every test file walks folders
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
