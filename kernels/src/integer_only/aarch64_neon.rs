//! NEON paths of [`super::scalar`], name for name. `sqrdmulh` is exactly gemmlowp's
//! SaturatingRoundingDoublingHighMul and `sqshl` its saturating left shift.

use std::arch::aarch64::*;

use super::{scalar, ChannelMultipliers, Multiplier, RequantOutput};
use crate::code::Code;
use crate::linear::aarch64_neon::store16;

struct Out {
    lo: int32x4_t,
    hi: int32x4_t,
    zp: int32x4_t,
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn out_consts(o: &RequantOutput) -> Out {
    Out {
        lo: vdupq_n_s32(o.act_min - o.zero_point),
        hi: vdupq_n_s32(o.act_max - o.zero_point),
        zp: vdupq_n_s32(o.zero_point),
    }
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn requant4(x: int32x4_t, m: int32x4_t, l: int32x4_t, r: int32x4_t, o: &Out) -> int32x4_t {
    let h = vqrdmulhq_s32(vqshlq_s32(x, l), m);
    let one = vdupq_n_s32(1);
    let mask = vsubq_s32(vshlq_s32(one, r), one);
    let rem = vandq_s32(h, mask);
    // threshold = (mask >> 1) + (h < 0); the compare yields all ones (-1) for true
    let thr = vsubq_s32(vshrq_n_s32::<1>(mask), vreinterpretq_s32_u32(vcltzq_s32(h)));
    let q = vshlq_s32(h, vnegq_s32(r));
    let q = vsubq_s32(q, vreinterpretq_s32_u32(vcgtq_s32(rem, thr)));
    vaddq_s32(vminq_s32(vmaxq_s32(q, o.lo), o.hi), o.zp)
}

/// # Safety
/// The CPU must support NEON; `out.len() == acc.len()`; `m` validated.
#[target_feature(enable = "neon")]
pub unsafe fn requantize<T: Code>(acc: &[i32], m: Multiplier, o: &RequantOutput, out: &mut [T]) {
    let oc = out_consts(o);
    let mv = vdupq_n_s32(m.multiplier);
    let l = vdupq_n_s32(m.shift.max(0));
    let r = vdupq_n_s32((-m.shift).max(0));
    let n = acc.len();
    let (src, dst) = (acc.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 16 <= n {
        let a = requant4(vld1q_s32(src.add(i)), mv, l, r, &oc);
        let b = requant4(vld1q_s32(src.add(i + 4)), mv, l, r, &oc);
        let c = requant4(vld1q_s32(src.add(i + 8)), mv, l, r, &oc);
        let d = requant4(vld1q_s32(src.add(i + 12)), mv, l, r, &oc);
        store16(dst.add(i), a, b, c, d);
        i += 16;
    }
    scalar::requantize(&acc[i..], m, o, &mut out[i..]);
}

/// # Safety
/// The CPU must support NEON; `acc.len() == out.len()`, a multiple of `m.len()`.
#[target_feature(enable = "neon")]
pub unsafe fn requantize_per_channel<T: Code>(
    acc: &[i32],
    m: &ChannelMultipliers,
    o: &RequantOutput,
    out: &mut [T],
) {
    let oc = out_consts(o);
    let channels = m.len();
    let (mp, lp, rp) = (m.multiplier.as_ptr(), m.left.as_ptr(), m.right.as_ptr());
    for row in 0..acc.len() / channels {
        let base = row * channels;
        let mut j = 0;
        while j + 16 <= channels {
            let mut q = [vdupq_n_s32(0); 4];
            for (k, qk) in q.iter_mut().enumerate() {
                let c = j + 4 * k;
                let v = vld1q_s32(acc.as_ptr().add(base + c));
                *qk = requant4(
                    v,
                    vld1q_s32(mp.add(c)),
                    vld1q_s32(lp.add(c)),
                    vld1q_s32(rp.add(c)),
                    &oc,
                );
            }
            store16(out.as_mut_ptr().add(base + j), q[0], q[1], q[2], q[3]);
            j += 16;
        }
        for c in j..channels {
            out[base + c] = T::from_i32(scalar::requantize_one(
                acc[base + c],
                m.get(c),
                o.zero_point,
                o.act_min,
                o.act_max,
            ));
        }
    }
}
