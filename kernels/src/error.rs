//! The one error type of the kernels crate. Every message names the offending value.

use std::fmt;

use crate::isa::Isa;

/// Why a kernel call was refused. Kernels never panic on bad parameters or mismatched
/// lengths: they return one of these before touching any output.
#[derive(Clone, Debug, PartialEq)]
pub enum KernelError {
    /// Two slices that must have related lengths do not.
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A bit width outside what the operation supports.
    Bits { bits: u32, what: &'static str },
    /// A scale that is not a finite normal positive f32 in [2^-100, 2^100].
    Scale { scale: f32 },
    /// A code range or zero point that does not fit the code type or each other.
    Range { message: String },
    /// An axis or shape that does not describe the data.
    Shape { message: String },
    /// A requantization multiplier or shift outside the supported range.
    Multiplier { message: String },
    /// The requested instruction set cannot run on this CPU.
    UnsupportedIsa { isa: Isa },
    /// `QUANTBENCH_ISA` holds something that is not an ISA name.
    Env { var: &'static str, value: String },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::Length {
                what,
                expected,
                got,
            } => write!(f, "{what}: expected length {expected}, got {got}"),
            KernelError::Bits { bits, what } => write!(f, "bits = {bits}: {what}"),
            KernelError::Scale { scale } => write!(
                f,
                "scale = {scale:e}: expected a finite positive f32 in [2^-100, 2^100]"
            ),
            KernelError::Range { message }
            | KernelError::Shape { message }
            | KernelError::Multiplier { message } => f.write_str(message),
            KernelError::UnsupportedIsa { isa } => write!(
                f,
                "instruction set {} is not supported by this CPU (available: {})",
                isa.name(),
                Isa::available()
                    .iter()
                    .map(|i| i.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            KernelError::Env { var, value } => write!(
                f,
                "{var}={value:?}: expected one of scalar, avx2, avx512, neon"
            ),
        }
    }
}

impl std::error::Error for KernelError {}

pub(crate) fn check_len(
    what: &'static str,
    expected: usize,
    got: usize,
) -> Result<(), KernelError> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::Length {
            what,
            expected,
            got,
        })
    }
}
