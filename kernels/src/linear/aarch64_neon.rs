//! NEON paths of [`super::scalar`], name for name. 4 f32 lanes, 16 elements per main-loop
//! step; tails call the scalar reference.

use std::arch::aarch64::*;

use super::{scalar, QuantParams};
use crate::code::{Code, CodeKind};
use crate::rng::{self, NoiseKey, M1, M2, M_COUNTER};

struct Consts {
    inv: float32x4_t,
    scale: float32x4_t,
    limit: float32x4_t,
    neg_limit: float32x4_t,
    lo: float32x4_t,
    hi: float32x4_t,
    zp: int32x4_t,
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn consts(p: &QuantParams) -> Consts {
    Consts {
        inv: vdupq_n_f32(p.inv_scale),
        scale: vdupq_n_f32(p.scale),
        limit: vdupq_n_f32(p.limit),
        neg_limit: vdupq_n_f32(-p.limit),
        lo: vdupq_n_f32((p.qmin - p.zero_point) as f32),
        hi: vdupq_n_f32((p.qmax - p.zero_point) as f32),
        zp: vdupq_n_s32(p.zero_point),
    }
}

/// `clamp(fl32(x / scale), lo, hi)`, NaN lanes 0 (not yet rounded): inputs are first
/// clamped to +-limit, then the reciprocal product gets one Markstein correction, which
/// makes it the correctly rounded quotient.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn scaled_clamped(x: float32x4_t, c: &Consts) -> float32x4_t {
    let ordered = vceqq_f32(x, x);
    let x = vminq_f32(vmaxq_f32(x, c.neg_limit), c.limit);
    let x = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(x), ordered));
    let q0 = vmulq_f32(x, c.inv);
    let residual = vfmsq_f32(x, q0, c.scale);
    let q = vfmaq_f32(q0, residual, c.inv);
    vminq_f32(vmaxq_f32(q, c.lo), c.hi)
}

/// Round half to even (`fcvtns`), clamped, without the zero point.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn round_clamped(x: float32x4_t, c: &Consts) -> int32x4_t {
    vcvtnq_s32_f32(scaled_clamped(x, c))
}

/// Stores 16 in-range i32 lanes (four vectors, in order) as codes of type `T`.
#[inline]
#[target_feature(enable = "neon")]
pub(crate) unsafe fn store16<T: Code>(
    dst: *mut T,
    a: int32x4_t,
    b: int32x4_t,
    c: int32x4_t,
    d: int32x4_t,
) {
    // values are inside T's range, so truncating narrows are exact
    let ab = vcombine_s16(vmovn_s32(a), vmovn_s32(b));
    let cd = vcombine_s16(vmovn_s32(c), vmovn_s32(d));
    match T::KIND {
        CodeKind::I8 | CodeKind::U8 => {
            vst1q_s8(dst as *mut i8, vcombine_s8(vmovn_s16(ab), vmovn_s16(cd)));
        }
        CodeKind::I16 | CodeKind::U16 => {
            vst1q_s16(dst as *mut i16, ab);
            vst1q_s16((dst as *mut i16).add(8), cd);
        }
    }
}

/// Loads 8 codes widened to two i32 vectors.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load8<T: Code>(src: *const T) -> (int32x4_t, int32x4_t) {
    match T::KIND {
        CodeKind::I8 => {
            let w = vmovl_s8(vld1_s8(src as *const i8));
            (vmovl_s16(vget_low_s16(w)), vmovl_high_s16(w))
        }
        CodeKind::U8 => {
            let w = vmovl_u8(vld1_u8(src as *const u8));
            (
                vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(w))),
                vreinterpretq_s32_u32(vmovl_high_u16(w)),
            )
        }
        CodeKind::I16 => {
            let w = vld1q_s16(src as *const i16);
            (vmovl_s16(vget_low_s16(w)), vmovl_high_s16(w))
        }
        CodeKind::U16 => {
            let w = vld1q_u16(src as *const u16);
            (
                vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(w))),
                vreinterpretq_s32_u32(vmovl_high_u16(w)),
            )
        }
    }
}

/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub unsafe fn min_max(x: &[f32]) -> Option<(f32, f32)> {
    let inf = vdupq_n_f32(f32::INFINITY);
    let ninf = vdupq_n_f32(f32::NEG_INFINITY);
    let (mut lo, mut hi) = (inf, ninf);
    let n = x.len();
    let p = x.as_ptr();
    let mut i = 0;
    while i + 4 <= n {
        let v = vld1q_f32(p.add(i));
        let finite = vcltq_f32(vabsq_f32(v), inf);
        lo = vminq_f32(lo, vbslq_f32(finite, v, inf));
        hi = vmaxq_f32(hi, vbslq_f32(finite, v, ninf));
        i += 4;
    }
    let (mut lo, mut hi) = (vminvq_f32(lo), vmaxvq_f32(hi));
    if let Some((a, b)) = scalar::min_max(&x[i..]) {
        lo = lo.min(a);
        hi = hi.max(b);
    }
    (lo <= hi).then_some((lo, hi))
}

/// # Safety
/// The CPU must support NEON; `out.len() == x.len()`; `p` fits `T`.
#[target_feature(enable = "neon")]
pub unsafe fn quantize<T: Code>(x: &[f32], p: &QuantParams, out: &mut [T]) {
    let c = consts(p);
    let n = x.len();
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 16 <= n {
        let a = vaddq_s32(round_clamped(vld1q_f32(src.add(i)), &c), c.zp);
        let b = vaddq_s32(round_clamped(vld1q_f32(src.add(i + 4)), &c), c.zp);
        let cc = vaddq_s32(round_clamped(vld1q_f32(src.add(i + 8)), &c), c.zp);
        let d = vaddq_s32(round_clamped(vld1q_f32(src.add(i + 12)), &c), c.zp);
        store16(dst.add(i), a, b, cc, d);
        i += 16;
    }
    scalar::quantize(&x[i..], p, &mut out[i..]);
}

/// # Safety
/// The CPU must support NEON; `out.len() == q.len()`.
#[target_feature(enable = "neon")]
pub unsafe fn dequantize<T: Code>(q: &[T], p: &QuantParams, out: &mut [f32]) {
    let c = consts(p);
    let n = q.len();
    let (src, dst) = (q.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        let (a, b) = load8(src.add(i));
        vst1q_f32(
            dst.add(i),
            vmulq_f32(vcvtq_f32_s32(vsubq_s32(a, c.zp)), c.scale),
        );
        vst1q_f32(
            dst.add(i + 4),
            vmulq_f32(vcvtq_f32_s32(vsubq_s32(b, c.zp)), c.scale),
        );
        i += 8;
    }
    scalar::dequantize(&q[i..], p, &mut out[i..]);
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn fake_quantize_raw(src: *const f32, dst: *mut f32, n: usize, p: &QuantParams) -> usize {
    let c = consts(p);
    let mut i = 0;
    while i + 8 <= n {
        let a = round_clamped(vld1q_f32(src.add(i)), &c);
        let b = round_clamped(vld1q_f32(src.add(i + 4)), &c);
        vst1q_f32(dst.add(i), vmulq_f32(vcvtq_f32_s32(a), c.scale));
        vst1q_f32(dst.add(i + 4), vmulq_f32(vcvtq_f32_s32(b), c.scale));
        i += 8;
    }
    i
}

/// # Safety
/// The CPU must support NEON; `out.len() == x.len()`.
#[target_feature(enable = "neon")]
pub unsafe fn fake_quantize(x: &[f32], p: &QuantParams, out: &mut [f32]) {
    let i = fake_quantize_raw(x.as_ptr(), out.as_mut_ptr(), x.len(), p);
    scalar::fake_quantize(&x[i..], p, &mut out[i..]);
}

/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub unsafe fn fake_quantize_in_place(x: &mut [f32], p: &QuantParams) {
    let i = fake_quantize_raw(x.as_ptr(), x.as_mut_ptr(), x.len(), p);
    scalar::fake_quantize_in_place(&mut x[i..], p);
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn mix(mut x: uint32x4_t) -> uint32x4_t {
    x = veorq_u32(x, vshrq_n_u32::<16>(x));
    x = vmulq_u32(x, vdupq_n_u32(M1));
    x = veorq_u32(x, vshrq_n_u32::<15>(x));
    x = vmulq_u32(x, vdupq_n_u32(M2));
    veorq_u32(x, vshrq_n_u32::<16>(x))
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn stochastic4(
    v: float32x4_t,
    counter: uint32x4_t,
    key: NoiseKey,
    c: &Consts,
    hi_i: int32x4_t,
) -> int32x4_t {
    let h = vmulq_u32(counter, vdupq_n_u32(M_COUNTER));
    let h = mix(veorq_u32(
        mix(veorq_u32(h, vdupq_n_u32(key.k0))),
        vdupq_n_u32(key.k1),
    ));
    let u = vmulq_f32(
        vcvtq_f32_u32(vshrq_n_u32::<8>(h)),
        vdupq_n_f32(1.0 / 16_777_216.0),
    );
    let q = vminq_s32(vcvtmq_s32_f32(vaddq_f32(scaled_clamped(v, c), u)), hi_i);
    vaddq_s32(q, c.zp)
}

/// # Safety
/// The CPU must support NEON; `out.len() == x.len()`; `p` fits `T`.
#[target_feature(enable = "neon")]
pub unsafe fn quantize_stochastic<T: Code>(
    x: &[f32],
    p: &QuantParams,
    key: NoiseKey,
    offset: u32,
    out: &mut [T],
) {
    let c = consts(p);
    let hi_i = vdupq_n_s32(p.qmax - p.zero_point);
    let iota: [u32; 4] = [0, 1, 2, 3];
    let iota = vld1q_u32(iota.as_ptr());
    let n = x.len();
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 16 <= n {
        let mut q = [vdupq_n_s32(0); 4];
        for (j, qj) in q.iter_mut().enumerate() {
            let base = vdupq_n_u32(offset.wrapping_add((i + 4 * j) as u32));
            *qj = stochastic4(
                vld1q_f32(src.add(i + 4 * j)),
                vaddq_u32(base, iota),
                key,
                &c,
                hi_i,
            );
        }
        store16(dst.add(i), q[0], q[1], q[2], q[3]);
        i += 16;
    }
    for j in i..n {
        let u = rng::uniform(key, offset.wrapping_add(j as u32));
        out[j] = T::from_i32(scalar::quantize_stochastic_one(x[j], u, p));
    }
}

/// Per-channel dequantize: each run of `layout` with its channel's parameters.
///
/// # Safety
/// The CPU must support NEON; lengths checked by the caller.
#[target_feature(enable = "neon")]
pub unsafe fn dequantize_per_channel<T: Code>(
    q: &[T],
    layout: &super::ChannelLayout,
    params: &[QuantParams],
    out: &mut [f32],
) {
    super::for_each_run(layout, params, q, out, |q, p, o| unsafe {
        dequantize(q, p, o)
    });
}
