//! Reference integer-only requantization (Jacob et al. 2018; the gemmlowp / TFLite reference
//! semantics): this file is the spec, bit for bit.
//!
//! A real multiplier `M = multiplier * 2^(shift - 31)` with `multiplier` in Q0.31 is applied to
//! an i32 accumulator as
//!
//! ```text
//! x1  = saturate_i32(x << max(shift, 0))                        // TFLite: x * (1 << left_shift)
//! x2  = saturating_rounding_doubling_high_mul(x1, multiplier)   // round(x1 * multiplier / 2^31)
//! x3  = rounding_divide_by_pot(x2, max(-shift, 0))              // round half away from zero
//! out = clamp(x3 + zero_point, act_min, act_max)                // in exact arithmetic
//! ```
//!
//! Where TFLite's C++ has undefined behaviour (a left shift that overflows; the zero-point
//! addition overflowing i32), this reference saturates / uses exact arithmetic; everywhere
//! else it is TFLite's reference code, and the tests check a table of its results.

use super::Multiplier;
use crate::code::Code;

/// gemmlowp `SaturatingRoundingDoublingHighMul`: the high 32 bits of `2 * a * b`, rounded to
/// nearest (`(a*b + 2^30) >> 31` for the non-negative nudge, truncating division for the
/// negative one), saturating the single overflow case `a == b == i32::MIN`.
#[inline]
pub fn saturating_rounding_doubling_high_mul(a: i32, b: i32) -> i32 {
    if a == i32::MIN && b == i32::MIN {
        return i32::MAX;
    }
    let ab = a as i64 * b as i64;
    let nudge: i64 = if ab >= 0 { 1 << 30 } else { 1 - (1 << 30) };
    // i64 `/` truncates toward zero, like C++
    ((ab + nudge) / (1i64 << 31)) as i32
}

/// gemmlowp `RoundingDivideByPOT`: `x / 2^exponent` rounded to nearest, ties away from zero.
/// `exponent` in 0..=31.
#[inline]
pub fn rounding_divide_by_pot(x: i32, exponent: i32) -> i32 {
    debug_assert!((0..=31).contains(&exponent));
    let mask = ((1i64 << exponent) - 1) as i32;
    let remainder = x & mask;
    let threshold = (mask >> 1) + (x < 0) as i32;
    (x >> exponent) + (remainder > threshold) as i32
}

/// `x << s` saturated to i32 (`s` in 0..=30).
#[inline]
pub fn saturating_left_shift(x: i32, s: i32) -> i32 {
    ((x as i64) << s).clamp(i32::MIN as i64, i32::MAX as i64) as i32
}

/// TFLite `MultiplyByQuantizedMultiplier`.
#[inline]
pub fn multiply_by_quantized_multiplier(x: i32, m: Multiplier) -> i32 {
    let left = m.shift.max(0);
    let right = (-m.shift).max(0);
    rounding_divide_by_pot(
        saturating_rounding_doubling_high_mul(saturating_left_shift(x, left), m.multiplier),
        right,
    )
}

/// One output code.
#[inline]
pub fn requantize_one(acc: i32, m: Multiplier, zero_point: i32, act_min: i32, act_max: i32) -> i32 {
    let v = multiply_by_quantized_multiplier(acc, m) as i64 + zero_point as i64;
    v.clamp(act_min as i64, act_max as i64) as i32
}

pub fn requantize<T: Code>(
    acc: &[i32],
    m: Multiplier,
    out_params: &super::RequantOutput,
    out: &mut [T],
) {
    let o = out_params;
    for (d, &a) in out.iter_mut().zip(acc) {
        *d = T::from_i32(requantize_one(a, m, o.zero_point, o.act_min, o.act_max));
    }
}

/// `acc` is `[rows, channels]` row-major; column `c` uses `m.get(c)`.
pub fn requantize_per_channel<T: Code>(
    acc: &[i32],
    m: &super::ChannelMultipliers,
    out_params: &super::RequantOutput,
    out: &mut [T],
) {
    let o = out_params;
    let channels = m.len();
    for (row_in, row_out) in acc
        .chunks_exact(channels)
        .zip(out.chunks_exact_mut(channels))
    {
        for (c, (d, &a)) in row_out.iter_mut().zip(row_in).enumerate() {
            *d = T::from_i32(requantize_one(
                a,
                m.get(c),
                o.zero_point,
                o.act_min,
                o.act_max,
            ));
        }
    }
}
