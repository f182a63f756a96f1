//! Reference implementation of linear quantization: this file is the spec. It is written for
//! clarity, one element at a time, and is never optimised. SIMD paths reproduce it bit for bit.
//!
//! For parameters `scale > 0`, `zero_point`, `[qmin, qmax]` (with `qmin <= zero_point <= qmax`):
//!
//! ```text
//! quantize(x)      = zero_point + rne(clamp(fl32(x / scale), qmin - zero_point, qmax - zero_point))
//! dequantize(q)    = fl32((q - zero_point) as f32 * scale)          // (q - zero_point) is exact in f32
//! fake_quantize(x) = dequantize(quantize(x))
//! ```
//!
//! * `rne` rounds half to even. Clamping before rounding equals rounding then clamping,
//!   because the bounds are integers.
//! * `fl32(x / scale)` is the correctly rounded f32 quotient: ONNX QuantizeLinear's semantics
//!   exactly (the conformance tests check it). PyTorch/fbgemm multiply by `fl32(1 / scale)`
//!   instead, which differs by one code for a few values per million next to half-integers
//!   (e.g. -2.5 / (5/255) is -127.49999 but -2.5 * (255/5) rounds to the tie -127.5). The SIMD
//!   paths avoid the slow divider without giving up exactness: they multiply by the reciprocal
//!   and apply one Markstein correction, `q1 = fma(fma(-q0, scale, x), inv_scale, q0)`, which
//!   yields the correctly rounded quotient (Markstein 1990) for the scales accepted here;
//!   the parity tests check it on random, tie and near-tie inputs.
//! * NaN policy (the same in every kernel of this crate): NaN quantizes to `zero_point`, i.e. it
//!   is read as 0.0; +inf saturates to `qmax` and -inf to `qmin`. Range estimation
//!   ([`min_max`]) ignores NaN and +-inf.

use super::QuantParams;
use crate::code::Code;
use crate::rng::{self, NoiseKey};

/// Round-to-nearest-even code of one value.
#[inline]
pub fn quantize_one(x: f32, p: &QuantParams) -> i32 {
    if x.is_nan() {
        return p.zero_point;
    }
    let lo = (p.qmin - p.zero_point) as f32;
    let hi = (p.qmax - p.zero_point) as f32;
    let v = (x / p.scale).clamp(lo, hi);
    v.round_ties_even() as i32 + p.zero_point
}

/// Real value of one code.
#[inline]
pub fn dequantize_one(q: i32, p: &QuantParams) -> f32 {
    (q - p.zero_point) as f32 * p.scale
}

/// Stochastic rounding of one value with uniform noise `u` in [0, 1):
/// `zero_point + min(floor(fl32(clamp(fl32(x / scale), lo, hi) + u)), hi)`
/// (lo, hi as in [`quantize_one`]; the final `min` catches `hi + u` rounding up to `hi + 1`).
/// NaN -> `zero_point`, +-inf saturate. Unbiased: E[code] = x / scale inside the range.
#[inline]
pub fn quantize_stochastic_one(x: f32, u: f32, p: &QuantParams) -> i32 {
    if x.is_nan() {
        return p.zero_point;
    }
    let lo = (p.qmin - p.zero_point) as f32;
    let hi = (p.qmax - p.zero_point) as f32;
    let v = (x / p.scale).clamp(lo, hi);
    ((v + u).floor().min(hi)) as i32 + p.zero_point
}

/// Smallest and largest finite value (NaN and +-inf ignored); `None` when there is none.
pub fn min_max(x: &[f32]) -> Option<(f32, f32)> {
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for &v in x {
        if v.is_finite() {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    (lo <= hi).then_some((lo, hi))
}

pub fn quantize<T: Code>(x: &[f32], p: &QuantParams, out: &mut [T]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = T::from_i32(quantize_one(v, p));
    }
}

pub fn dequantize<T: Code>(q: &[T], p: &QuantParams, out: &mut [f32]) {
    for (o, &c) in out.iter_mut().zip(q) {
        *o = dequantize_one(c.to_i32(), p);
    }
}

pub fn fake_quantize(x: &[f32], p: &QuantParams, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = dequantize_one(quantize_one(v, p), p);
    }
}

pub fn fake_quantize_in_place(x: &mut [f32], p: &QuantParams) {
    for v in x.iter_mut() {
        *v = dequantize_one(quantize_one(*v, p), p);
    }
}

/// Element `i` uses the noise of counter `offset + i` (wrapping).
pub fn quantize_stochastic<T: Code>(
    x: &[f32],
    p: &QuantParams,
    key: NoiseKey,
    offset: u32,
    out: &mut [T],
) {
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        let u = rng::uniform(key, offset.wrapping_add(i as u32));
        *o = T::from_i32(quantize_stochastic_one(v, u, p));
    }
}

/// Per-channel dequantize: each run of `layout` with its channel's parameters.
pub fn dequantize_per_channel<T: Code>(
    q: &[T],
    layout: &super::ChannelLayout,
    params: &[QuantParams],
    out: &mut [f32],
) {
    super::for_each_run(layout, params, q, out, |q, p, o| dequantize(q, p, o));
}
