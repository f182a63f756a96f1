//! AVX2 paths of [`super::scalar`], name for name. 8 i32 lanes; scalar tails.

use std::arch::x86_64::*;

use super::{scalar, ChannelMultipliers, Multiplier, RequantOutput};
use crate::code::Code;
use crate::linear::x86_avx2::store32;

struct Out {
    lo: __m256i,
    hi: __m256i,
    zp: __m256i,
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn out_consts(o: &RequantOutput) -> Out {
    Out {
        lo: _mm256_set1_epi32(o.act_min - o.zero_point),
        hi: _mm256_set1_epi32(o.act_max - o.zero_point),
        zp: _mm256_set1_epi32(o.zero_point),
    }
}

/// `clamp(multiply_by_quantized_multiplier(x) + zp, act_min, act_max)` for 8 lanes with
/// per-lane multiplier `m` (>= 0), left shift `l` and right shift `r`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn requant8<const LEFT: bool>(
    x: __m256i,
    m: __m256i,
    l: __m256i,
    r: __m256i,
    o: &Out,
) -> __m256i {
    let x = if LEFT {
        let max = _mm256_set1_epi32(i32::MAX);
        let min = _mm256_set1_epi32(i32::MIN);
        let over = _mm256_cmpgt_epi32(x, _mm256_srav_epi32(max, l));
        let under = _mm256_cmpgt_epi32(_mm256_srav_epi32(min, l), x);
        let s = _mm256_blendv_epi8(_mm256_sllv_epi32(x, l), max, over);
        _mm256_blendv_epi8(s, min, under)
    } else {
        x
    };
    // SRDHM = bits 31..62 of (x*m + 2^30); m >= 0 rules out the i32::MIN * i32::MIN case.
    // A logical 64-bit shift yields the same low 32 bits as the arithmetic one.
    let nudge = _mm256_set1_epi64x(1 << 30);
    let even = _mm256_srli_epi64::<31>(_mm256_add_epi64(_mm256_mul_epi32(x, m), nudge));
    let odd_p = _mm256_mul_epi32(_mm256_srli_epi64::<32>(x), _mm256_srli_epi64::<32>(m));
    let odd = _mm256_slli_epi64::<1>(_mm256_add_epi64(odd_p, nudge));
    let h = _mm256_blend_epi32::<0b1010_1010>(even, odd);
    // rounding divide by 2^r, ties away from zero
    let one = _mm256_set1_epi32(1);
    let mask = _mm256_sub_epi32(_mm256_sllv_epi32(one, r), one);
    let rem = _mm256_and_si256(h, mask);
    // threshold = (mask >> 1) + (h < 0); the compare yields -1 for true
    let thr = _mm256_sub_epi32(
        _mm256_srli_epi32::<1>(mask),
        _mm256_cmpgt_epi32(_mm256_setzero_si256(), h),
    );
    let q = _mm256_sub_epi32(_mm256_srav_epi32(h, r), _mm256_cmpgt_epi32(rem, thr));
    _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(q, o.lo), o.hi), o.zp)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn requantize_impl<T: Code, const LEFT: bool>(
    acc: &[i32],
    m: Multiplier,
    o: &RequantOutput,
    out: &mut [T],
) {
    let oc = out_consts(o);
    let mv = _mm256_set1_epi32(m.multiplier);
    let l = _mm256_set1_epi32(m.shift.max(0));
    let r = _mm256_set1_epi32((-m.shift).max(0));
    let n = acc.len();
    let (src, dst) = (acc.as_ptr() as *const __m256i, out.as_mut_ptr());
    let mut i = 0;
    while i + 32 <= n {
        let v = src.add(i / 8);
        let a = requant8::<LEFT>(_mm256_loadu_si256(v), mv, l, r, &oc);
        let b = requant8::<LEFT>(_mm256_loadu_si256(v.add(1)), mv, l, r, &oc);
        let c = requant8::<LEFT>(_mm256_loadu_si256(v.add(2)), mv, l, r, &oc);
        let d = requant8::<LEFT>(_mm256_loadu_si256(v.add(3)), mv, l, r, &oc);
        store32(dst.add(i), a, b, c, d);
        i += 32;
    }
    scalar::requantize(&acc[i..], m, o, &mut out[i..]);
}

/// # Safety
/// The CPU must support AVX2; `out.len() == acc.len()`; `m` validated.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn requantize<T: Code>(acc: &[i32], m: Multiplier, o: &RequantOutput, out: &mut [T]) {
    if m.shift > 0 {
        requantize_impl::<T, true>(acc, m, o, out)
    } else {
        requantize_impl::<T, false>(acc, m, o, out)
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn per_channel_impl<T: Code, const LEFT: bool>(
    acc: &[i32],
    m: &ChannelMultipliers,
    o: &RequantOutput,
    out: &mut [T],
) {
    let oc = out_consts(o);
    let channels = m.len();
    let (mp, lp, rp) = (
        m.multiplier.as_ptr() as *const __m256i,
        m.left.as_ptr() as *const __m256i,
        m.right.as_ptr() as *const __m256i,
    );
    let mut lanes = [0i32; 8];
    for row in 0..acc.len() / channels {
        let base = row * channels;
        let mut j = 0;
        while j + 8 <= channels {
            let v = _mm256_loadu_si256(acc.as_ptr().add(base + j) as *const __m256i);
            let (mv, l, r) = (
                _mm256_loadu_si256(mp.byte_add(j * 4)),
                _mm256_loadu_si256(lp.byte_add(j * 4)),
                _mm256_loadu_si256(rp.byte_add(j * 4)),
            );
            _mm256_storeu_si256(
                lanes.as_mut_ptr() as *mut __m256i,
                requant8::<LEFT>(v, mv, l, r, &oc),
            );
            for (d, &q) in out[base + j..base + j + 8].iter_mut().zip(&lanes) {
                *d = T::from_i32(q);
            }
            j += 8;
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

/// # Safety
/// The CPU must support AVX2; `acc.len() == out.len()`, a multiple of `m.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn requantize_per_channel<T: Code>(
    acc: &[i32],
    m: &ChannelMultipliers,
    o: &RequantOutput,
    out: &mut [T],
) {
    if m.any_left_shift() {
        per_channel_impl::<T, true>(acc, m, o, out)
    } else {
        per_channel_impl::<T, false>(acc, m, o, out)
    }
}

/// The quantized addition of [`super::add`], 32 codes (four vectors of 8 lanes) at a time and
/// a scalar tail, bit-identical to its spec. The inputs' multipliers must shift right (each
/// is at most 1/2 by construction); returns `false` without touching `out` otherwise. The
/// output multiplier may shift either way.
///
/// # Safety
/// AVX2; equal lengths (checked by the caller).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn add_requantize<T: Code>(
    a: &[T],
    b: &[T],
    p: &super::add::AddParams,
    out: &mut [T],
) -> bool {
    if p.a_multiplier.shift > 0 || p.b_multiplier.shift > 0 {
        return false;
    }
    if p.out_multiplier.shift > 0 {
        add_impl::<T, true>(a, b, p, out)
    } else {
        add_impl::<T, false>(a, b, p, out)
    }
    true
}

#[target_feature(enable = "avx2,fma")]
unsafe fn add_impl<T: Code, const LEFT: bool>(
    a: &[T],
    b: &[T],
    p: &super::add::AddParams,
    out: &mut [T],
) {
    use crate::linear::x86_avx2::load8;
    let wide = Out {
        lo: _mm256_set1_epi32(i32::MIN),
        hi: _mm256_set1_epi32(i32::MAX),
        zp: _mm256_setzero_si256(),
    };
    let oc = out_consts(&p.output);
    let consts = |m: Multiplier| {
        (
            _mm256_set1_epi32(m.multiplier),
            _mm256_set1_epi32(m.shift.max(0)),
            _mm256_set1_epi32((-m.shift).max(0)),
        )
    };
    let (ma, la, ra) = consts(p.a_multiplier);
    let (mb, lb, rb) = consts(p.b_multiplier);
    let (mo, lo, ro) = consts(p.out_multiplier);
    let (za, zb) = (
        _mm256_set1_epi32(p.a_zero_point),
        _mm256_set1_epi32(p.b_zero_point),
    );
    let one = |i: usize| {
        let x = _mm256_slli_epi32::<20>(_mm256_sub_epi32(load8(a.as_ptr().add(i)), za));
        let y = _mm256_slli_epi32::<20>(_mm256_sub_epi32(load8(b.as_ptr().add(i)), zb));
        let x = requant8::<false>(x, ma, la, ra, &wide);
        let y = requant8::<false>(y, mb, lb, rb, &wide);
        requant8::<LEFT>(_mm256_add_epi32(x, y), mo, lo, ro, &oc)
    };
    let n = a.len();
    let mut i = 0;
    while i + 32 <= n {
        store32(
            out.as_mut_ptr().add(i),
            one(i),
            one(i + 8),
            one(i + 16),
            one(i + 24),
        );
        i += 32;
    }
    for j in i..n {
        out[j] = T::from_i32(super::add::add_one(a[j].to_i32(), b[j].to_i32(), p));
    }
}
