//! # quantbench
//!
//! The harness crate: the `quantbench` command-line tool and the library behind it. Today it
//! holds the one-tensor tool (`quantbench tensor`), the `.npy` reader and the kernel timing
//! used by the peer comparison (`cargo xtask compare quantize`). Experiments over models
//! (`cargo xtask run experiments/*.toml`) build on it.

pub mod bench;
pub mod calib;
pub mod data;
pub mod engine;
pub mod eval;
pub mod experiment;
pub mod memory;
pub mod mixed;
pub mod model;
pub mod quant;
#[cfg(feature = "report")]
pub mod report;
#[cfg(feature = "report")]
pub mod runner;
pub mod sys;

pub use sys::{cpu_model, fnv1a, hostname, utc_stamp, write_atomic};
pub mod npy;
pub mod tensor;
pub mod train;

/// The data root: `$QUANTBENCH_DATA`, else `../shared` (relative to the working directory)
/// when that folder exists. Laid out as ../shared/README.md describes (`data/`, `models/`,
/// `conformance/`).
pub fn data_root() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("QUANTBENCH_DATA") {
        return Some(p.into());
    }
    let default = std::path::Path::new("../shared");
    default.is_dir().then(|| default.to_path_buf())
}
