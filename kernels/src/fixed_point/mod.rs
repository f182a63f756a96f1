//! Fixed-point Qm.n (Gupta et al. 2015) and dynamic fixed point (Ristretto).
//!
//! A Qm.n number with `total_bits = 1 + m + n` (sign, integer and fractional bits) is a signed
//! code `q` in `[-2^(total_bits-1), 2^(total_bits-1) - 1]` standing for `q * 2^-n`. The
//! seed's 8-bit example, 1 sign + 6 integer + 1 fractional bit, is `FixedPointFormat::new(8, 1)`:
//! steps of 0.5 over [-64, 63.5]. `n` may exceed `total_bits - 1` (all bits fractional, small
//! tensors) or be negative (steps coarser than 1).
//!
//! Quantization is linear quantization with `scale = 2^-n`, zero point 0 and the signed code
//! range, so it runs on the [`crate::linear`] kernels of every ISA. Multiplying by the
//! power-of-two reciprocal is exact, so round-to-nearest-even here equals rounding the true
//! quotient. Stochastic rounding (round up with probability equal to the fractional part,
//! unbiased) uses the seeded counter-based noise of [`crate::rng`]. Values beyond the range
//! saturate; NaN reads as 0.

use crate::code::Code;
use crate::error::KernelError;
use crate::isa::Kernels;
use crate::linear::{ChannelLayout, QuantParams};
use crate::rng::NoiseKey;

/// Smallest and largest accepted number of fractional bits (scales `2^-n` stay normal f32).
pub const FRAC_BITS_RANGE: (i32, i32) = (-100, 100);

/// A Qm.n format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedPointFormat {
    total_bits: u32,
    frac_bits: i32,
}

/// How values are rounded to the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// Round to nearest, ties to even.
    NearestEven,
    /// Round up with probability equal to the fractional part; element `i` uses the noise of
    /// counter `offset + i` under `key`.
    Stochastic { key: NoiseKey, offset: u32 },
}

impl FixedPointFormat {
    /// `total_bits` in 2..=16 (one of them the sign), `frac_bits` in [`FRAC_BITS_RANGE`].
    pub fn new(total_bits: u32, frac_bits: i32) -> Result<Self, KernelError> {
        if !(2..=16).contains(&total_bits) {
            return Err(KernelError::Bits {
                bits: total_bits,
                what: "fixed point needs 2..=16 total bits (one sign bit)",
            });
        }
        if !(FRAC_BITS_RANGE.0..=FRAC_BITS_RANGE.1).contains(&frac_bits) {
            return Err(KernelError::Range {
                message: format!(
                    "frac_bits = {frac_bits}: expected {}..={}",
                    FRAC_BITS_RANGE.0, FRAC_BITS_RANGE.1
                ),
            });
        }
        Ok(FixedPointFormat {
            total_bits,
            frac_bits,
        })
    }

    pub fn total_bits(&self) -> u32 {
        self.total_bits
    }
    /// `n`, the number of fractional bits.
    pub fn frac_bits(&self) -> i32 {
        self.frac_bits
    }
    /// `m = total_bits - 1 - n` (may be negative).
    pub fn int_bits(&self) -> i32 {
        self.total_bits as i32 - 1 - self.frac_bits
    }
    /// `(qmin, qmax)` of the signed codes.
    pub fn qrange(&self) -> (i32, i32) {
        let half = 1i32 << (self.total_bits - 1);
        (-half, half - 1)
    }
    /// Distance between neighbouring values, `2^-n`.
    pub fn step(&self) -> f32 {
        pow2(-self.frac_bits)
    }
    /// The equivalent linear parameters (scale `2^-n`, zero point 0).
    pub fn params(&self) -> QuantParams {
        let (qmin, qmax) = self.qrange();
        QuantParams::new(self.step(), 0, qmin, qmax)
            .expect("frac_bits range keeps the scale normal")
    }

    /// Dynamic fixed point: the format of `total_bits` with the most fractional bits such
    /// that the finite range `[min, max]` does not saturate after rounding, i.e. the largest
    /// `n` with `rne(max * 2^n) <= qmax` and `rne(min * 2^n) >= qmin`. (Ristretto uses
    /// `n = total_bits - 1 - ceil(log2 max|x|)`, which can clip the maximum by half a step;
    /// this choice never clips.) An all-zero tensor gets `n = total_bits - 1`.
    pub fn for_range(range: Option<(f32, f32)>, total_bits: u32) -> Result<Self, KernelError> {
        FixedPointFormat::new(total_bits, 0)?;
        let (lo, hi) = range.unwrap_or((0.0, 0.0));
        if lo == 0.0 && hi == 0.0 {
            return FixedPointFormat::new(total_bits, total_bits as i32 - 1);
        }
        let half = 1i64 << (total_bits - 1);
        let fits = |n: i32| {
            let s = 2f64.powi(n);
            let (a, b) = (
                (lo as f64 * s).round_ties_even(),
                (hi as f64 * s).round_ties_even(),
            );
            a >= -(half as f64) && b <= (half - 1) as f64
        };
        let mut n = FRAC_BITS_RANGE.1;
        while n > FRAC_BITS_RANGE.0 && !fits(n) {
            n -= 1;
        }
        FixedPointFormat::new(total_bits, n)
    }
}

fn pow2(e: i32) -> f32 {
    2f64.powi(e) as f32
}

impl Kernels {
    /// Quantizes to the format's codes (`i8` holds up to 8 total bits, `i16` up to 16).
    pub fn fixed_quantize<T: Code>(
        &self,
        x: &[f32],
        format: &FixedPointFormat,
        rounding: Rounding,
        out: &mut [T],
    ) -> Result<(), KernelError> {
        let p = format.params();
        match rounding {
            Rounding::NearestEven => self.quantize(x, &p, out),
            Rounding::Stochastic { key, offset } => {
                self.quantize_stochastic(x, &p, key, offset, out)
            }
        }
    }

    /// `out[i] = q[i] * 2^-n`.
    pub fn fixed_dequantize<T: Code>(
        &self,
        q: &[T],
        format: &FixedPointFormat,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        self.dequantize(q, &format.params(), out)
    }

    /// The dynamic fixed-point format of `x` (see [`FixedPointFormat::for_range`]).
    pub fn dynamic_fixed_point(
        &self,
        x: &[f32],
        total_bits: u32,
    ) -> Result<FixedPointFormat, KernelError> {
        FixedPointFormat::for_range(self.min_max(x), total_bits)
    }

    /// One dynamic format per channel.
    pub fn dynamic_fixed_point_per_channel(
        &self,
        x: &[f32],
        layout: &ChannelLayout,
        total_bits: u32,
    ) -> Result<Vec<FixedPointFormat>, KernelError> {
        let ranges = self.min_max_per_channel(x, layout)?;
        ranges
            .into_iter()
            .map(|r| FixedPointFormat::for_range(r, total_bits))
            .collect()
    }
}
