//! Integer-only requantization (Jacob et al. 2018, the gemmlowp/TFLite scheme): i32
//! accumulators are scaled by a fixed-point multiplier, shifted, offset by the output zero
//! point and clamped to the activation range, with no floating point.
//! The semantics are defined in [`scalar`]; SIMD paths match them bit for bit.

#[cfg(target_arch = "aarch64")]
mod aarch64_neon;
pub mod add;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_avx512;

use crate::code::Code;
use crate::error::{check_len, KernelError};
use crate::isa::Kernels;
use crate::linear::{dispatch, QuantParams};

/// A real multiplier `multiplier * 2^(shift - 31)`: `multiplier` is Q0.31 (normally in
/// `[2^30, 2^31)`, or 0), `shift > 0` shifts left, `shift < 0` right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Multiplier {
    pub multiplier: i32,
    pub shift: i32,
}

impl Multiplier {
    /// Validated: `multiplier >= 0`, `shift` in `[-31, 30]`.
    pub fn new(multiplier: i32, shift: i32) -> Result<Self, KernelError> {
        if multiplier < 0 || !(-31..=30).contains(&shift) {
            return Err(KernelError::Multiplier {
                message: format!(
                    "multiplier {multiplier}, shift {shift}: expected multiplier >= 0 and shift in [-31, 30]"
                ),
            });
        }
        Ok(Multiplier { multiplier, shift })
    }

    /// The real value this multiplier stands for.
    pub fn to_f64(self) -> f64 {
        self.multiplier as f64 * 2f64.powi(self.shift - 31)
    }
}

/// TFLite's `QuantizeMultiplier`: `real = q * 2^shift` with `q` in `[0.5, 1)` (frexp), `q`
/// rounded half away from zero to Q0.31; `q == 1.0` after rounding renormalises to `2^30`
/// with `shift + 1`; multipliers below `2^-32` become `(0, 0)`. `real` must be finite, `>= 0`
/// and below `2^31`.
pub fn quantize_multiplier(real: f64) -> Result<Multiplier, KernelError> {
    if !real.is_finite() || real < 0.0 {
        return Err(KernelError::Multiplier {
            message: format!("real multiplier {real}: expected a finite value >= 0"),
        });
    }
    if real == 0.0 {
        return Multiplier::new(0, 0);
    }
    let (q, mut shift) = frexp(real);
    let mut q_fixed = (q * (1u64 << 31) as f64).round() as i64;
    if q_fixed == 1i64 << 31 {
        q_fixed /= 2;
        shift += 1;
    }
    if shift < -31 {
        return Multiplier::new(0, 0);
    }
    if shift > 30 {
        return Err(KernelError::Multiplier {
            message: format!("real multiplier {real}: too large (must be below 2^31)"),
        });
    }
    Multiplier::new(q_fixed as i32, shift)
}

/// `x = q * 2^e` with `q` in `[0.5, 1)` for finite `x > 0` (C's frexp).
fn frexp(x: f64) -> (f64, i32) {
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7FF) as i32;
    if exp == 0 {
        // subnormal: scale into the normal range first
        let (q, e) = frexp(x * 2f64.powi(64));
        return (q, e - 64);
    }
    let q = f64::from_bits((bits & !(0x7FFu64 << 52)) | (1022u64 << 52));
    (q, exp - 1022)
}

/// Fused activation of a quantized layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    Relu6,
}

/// Output side of a requantization: zero point and the clamp range `[act_min, act_max]` in
/// the code domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequantOutput {
    pub(crate) zero_point: i32,
    pub(crate) act_min: i32,
    pub(crate) act_max: i32,
}

impl RequantOutput {
    /// Validated: `act_min <= act_max`, all three within `[-32768, 65535]`.
    pub fn new(zero_point: i32, act_min: i32, act_max: i32) -> Result<Self, KernelError> {
        let ok = |v: i32| (i16::MIN as i32..=u16::MAX as i32).contains(&v);
        if !(ok(zero_point) && ok(act_min) && ok(act_max)) || act_min > act_max {
            return Err(KernelError::Range {
                message: format!(
                    "requantize output zero_point {zero_point}, range [{act_min}, {act_max}]: expected act_min <= act_max inside [-32768, 65535]"
                ),
            });
        }
        Ok(RequantOutput {
            zero_point,
            act_min,
            act_max,
        })
    }

    /// The output of a layer quantized with `out` and fused `activation`: ReLU clamps at the
    /// zero point, ReLU6 also at `zero_point + rne(6 / scale)`.
    pub fn for_activation(out: &QuantParams, activation: Activation) -> RequantOutput {
        let (zp, qmin, qmax) = (out.zero_point(), out.qmin(), out.qmax());
        let (lo, hi) = match activation {
            Activation::None => (qmin, qmax),
            Activation::Relu => (zp.max(qmin), qmax),
            Activation::Relu6 => {
                let six = (6.0 / out.scale() as f64).round_ties_even().min(1e6) as i32;
                (zp.max(qmin), (zp + six).min(qmax))
            }
        };
        RequantOutput {
            zero_point: zp,
            act_min: lo,
            act_max: hi,
        }
    }

    pub fn zero_point(&self) -> i32 {
        self.zero_point
    }
    pub fn act_min(&self) -> i32 {
        self.act_min
    }
    pub fn act_max(&self) -> i32 {
        self.act_max
    }

    fn check_code<T: Code>(&self) -> Result<(), KernelError> {
        if self.act_min < T::MIN || self.act_max > T::MAX {
            return Err(KernelError::Range {
                message: format!(
                    "requantize range [{}, {}] does not fit {} codes",
                    self.act_min,
                    self.act_max,
                    T::NAME
                ),
            });
        }
        Ok(())
    }
}

/// Per-channel multipliers in structure-of-arrays form (what the SIMD paths load).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelMultipliers {
    pub(crate) multiplier: Vec<i32>,
    pub(crate) left: Vec<i32>,
    pub(crate) right: Vec<i32>,
}

impl ChannelMultipliers {
    pub fn new(ms: &[Multiplier]) -> Self {
        ChannelMultipliers {
            multiplier: ms.iter().map(|m| m.multiplier).collect(),
            left: ms.iter().map(|m| m.shift.max(0)).collect(),
            right: ms.iter().map(|m| (-m.shift).max(0)).collect(),
        }
    }
    pub fn len(&self) -> usize {
        self.multiplier.len()
    }
    pub fn is_empty(&self) -> bool {
        self.multiplier.is_empty()
    }
    pub fn get(&self, c: usize) -> Multiplier {
        Multiplier {
            multiplier: self.multiplier[c],
            shift: self.left[c] - self.right[c],
        }
    }
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn any_left_shift(&self) -> bool {
        self.left.iter().any(|&l| l > 0)
    }
}

impl Kernels {
    /// Requantizes i32 accumulators with one multiplier to codes of `T`.
    pub fn requantize<T: Code>(
        &self,
        acc: &[i32],
        m: Multiplier,
        output: &RequantOutput,
        out: &mut [T],
    ) -> Result<(), KernelError> {
        check_len("requantize output", acc.len(), out.len())?;
        let m = Multiplier::new(m.multiplier, m.shift)?;
        output.check_code::<T>()?;
        dispatch!(self, requantize::<T>(acc, m, output, out));
        Ok(())
    }

    /// Requantizes a row-major `[rows, channels]` accumulator block, channel `c` with
    /// multiplier `c` (per-output-channel weights).
    pub fn requantize_per_channel<T: Code>(
        &self,
        acc: &[i32],
        m: &ChannelMultipliers,
        output: &RequantOutput,
        out: &mut [T],
    ) -> Result<(), KernelError> {
        check_len("requantize output", acc.len(), out.len())?;
        if m.is_empty() || !acc.len().is_multiple_of(m.len()) {
            return Err(KernelError::Shape {
                message: format!(
                    "requantize_per_channel: {} accumulators are not a whole number of rows of {} channels",
                    acc.len(),
                    m.len()
                ),
            });
        }
        for c in 0..m.len() {
            Multiplier::new(m.multiplier[c], m.left[c] - m.right[c])?;
        }
        output.check_code::<T>()?;
        dispatch!(self, requantize_per_channel::<T>(acc, m, output, out));
        Ok(())
    }
}

impl Kernels {
    /// [`Kernels::requantize`] without the checks (the GEMM epilogue validated them once).
    pub(crate) fn requantize_unchecked<T: Code>(
        &self,
        acc: &[i32],
        m: Multiplier,
        output: &RequantOutput,
        out: &mut [T],
    ) {
        debug_assert_eq!(acc.len(), out.len());
        dispatch!(self, requantize::<T>(acc, m, output, out));
    }

    /// [`Kernels::requantize_per_channel`] without the checks.
    pub(crate) fn requantize_per_channel_unchecked<T: Code>(
        &self,
        acc: &[i32],
        m: &ChannelMultipliers,
        output: &RequantOutput,
        out: &mut [T],
    ) {
        debug_assert_eq!(acc.len(), out.len());
        dispatch!(self, requantize_per_channel::<T>(acc, m, output, out));
    }
}

/// Requantizes i32 to i8 on the active ISA.
pub fn requantize_i32_i8(
    acc: &[i32],
    m: Multiplier,
    output: &RequantOutput,
    out: &mut [i8],
) -> Result<(), KernelError> {
    Kernels::active().requantize(acc, m, output, out)
}
/// Requantizes i32 to u8 on the active ISA.
pub fn requantize_i32_u8(
    acc: &[i32],
    m: Multiplier,
    output: &RequantOutput,
    out: &mut [u8],
) -> Result<(), KernelError> {
    Kernels::active().requantize(acc, m, output, out)
}
