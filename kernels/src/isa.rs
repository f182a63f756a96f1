//! THE dispatch point. Every kernel call goes through a [`Kernels`] handle that carries one
//! [`Isa`]; kernels `match` on it and nothing else in the crate detects CPU features.
//!
//! * Detection happens once (cached in an atomic) with `is_x86_feature_detected!` /
//!   `is_aarch64_feature_detected!`: a normal build runs the best path the CPU has, never a
//!   path chosen at compile time.
//! * `QUANTBENCH_ISA=scalar|avx2|avx512|neon` forces a path for the whole process
//!   (benchmarks, tests, the CLI). Forcing a path the CPU lacks is an error, never a silent
//!   fallback.
//! * Every dispatched call records which ISA ran ([`has_run`]), so a test can prove that a
//!   forced path was really exercised.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::error::KernelError;

/// Name of the environment variable that forces a kernel path.
pub const ISA_ENV: &str = "QUANTBENCH_ISA";

/// An instruction-set level with its own kernel implementations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust, one element at a time: the reference semantics (the spec).
    Scalar,
    /// x86-64 AVX2 + FMA (Haswell and later), 256-bit vectors.
    Avx2,
    /// x86-64 AVX-512 F + BW + VL + DQ (Skylake-SP and later), 512-bit vectors, masked tails.
    Avx512,
    /// AArch64 Advanced SIMD, 128-bit vectors.
    Neon,
}

impl Isa {
    /// Every level this crate knows, in order of preference from worst to best.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon];

    /// Lower-case name used in benchmark ids, result rows and `QUANTBENCH_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// Parses a name as printed by [`Isa::name`] (case-insensitive).
    pub fn from_name(name: &str) -> Option<Isa> {
        let lower = name.trim().to_ascii_lowercase();
        Isa::ALL.into_iter().find(|isa| isa.name() == lower)
    }

    /// Whether this CPU can execute the level (runtime detection).
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every level this CPU supports, scalar first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// The fastest supported level.
    pub fn best() -> Isa {
        *Isa::available().last().unwrap_or(&Isa::Scalar)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Reads `QUANTBENCH_ISA`: `Ok(None)` when unset or empty, an error when it names no ISA or
/// one this CPU cannot run.
pub fn isa_from_env() -> Result<Option<Isa>, KernelError> {
    match std::env::var(ISA_ENV) {
        Ok(value) if !value.trim().is_empty() => {
            let isa = Isa::from_name(&value).ok_or(KernelError::Env {
                var: ISA_ENV,
                value: value.clone(),
            })?;
            if isa.is_supported() {
                Ok(Some(isa))
            } else {
                Err(KernelError::UnsupportedIsa { isa })
            }
        }
        _ => Ok(None),
    }
}

/// 0 = not yet decided, otherwise `isa as u8 + 1`.
static ACTIVE: AtomicU8 = AtomicU8::new(0);
/// Bit set of the ISAs whose kernels have executed in this process.
static RAN: AtomicU8 = AtomicU8::new(0);

/// The ISA every default dispatch uses: `QUANTBENCH_ISA` if set, else [`Isa::best`].
/// Decided once per process.
///
/// # Panics
/// When `QUANTBENCH_ISA` is invalid or names an ISA this CPU lacks. Programs that want a
/// clean error call [`isa_from_env`] first (the `quantbench` CLI does).
pub fn active() -> Isa {
    match ACTIVE.load(Ordering::Relaxed) {
        0 => {
            let isa = match isa_from_env() {
                Ok(forced) => forced.unwrap_or_else(Isa::best),
                Err(e) => panic!("{e}"),
            };
            ACTIVE.store(isa as u8 + 1, Ordering::Relaxed);
            isa
        }
        v => Isa::ALL[(v - 1) as usize],
    }
}

/// Records that a kernel ran on `isa` (one relaxed load on the hot path once set).
#[inline]
pub(crate) fn mark_ran(isa: Isa) {
    if RAN.load(Ordering::Relaxed) & isa.bit() == 0 {
        RAN.fetch_or(isa.bit(), Ordering::Relaxed);
    }
}

/// Whether any kernel has executed on `isa` in this process.
pub fn has_run(isa: Isa) -> bool {
    RAN.load(Ordering::Relaxed) & isa.bit() != 0
}

/// A handle that carries the ISA kernels run on. Obtain one with [`Kernels::active`] (the
/// process-wide choice) or [`Kernels::new`] (a specific path, checked against the CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    isa: Isa,
}

impl Kernels {
    /// A handle for `isa`, or an error if this CPU cannot run it.
    pub fn new(isa: Isa) -> Result<Kernels, KernelError> {
        if isa.is_supported() {
            Ok(Kernels { isa })
        } else {
            Err(KernelError::UnsupportedIsa { isa })
        }
    }

    /// The reference implementation.
    pub fn scalar() -> Kernels {
        Kernels { isa: Isa::Scalar }
    }

    /// The process-wide choice (see [`active`]).
    pub fn active() -> Kernels {
        Kernels { isa: active() }
    }

    /// A handle for an ISA the caller already knows this CPU supports.
    pub(crate) fn for_dispatch(isa: Isa) -> Kernels {
        debug_assert!(isa.is_supported());
        Kernels { isa }
    }

    /// The ISA this handle dispatches to.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Records the run and returns the ISA to match on.
    #[inline]
    pub(crate) fn dispatch(&self) -> Isa {
        mark_ran(self.isa);
        self.isa
    }
}
