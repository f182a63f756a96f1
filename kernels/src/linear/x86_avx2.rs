//! AVX2 + FMA paths of [`super::scalar`], name for name. 8 f32 lanes; four vectors per
//! main-loop step; tails call the scalar reference for the last `n % 8` elements.

use std::arch::x86_64::*;

use super::{scalar, QuantParams};
use crate::code::{Code, CodeKind};
use crate::rng::{self, NoiseKey, M1, M2, M_COUNTER};

/// Elements to prefetch ahead in the quantize loop (as in the AVX-512 path).
const PREFETCH: usize = 1024;

struct Consts {
    inv: __m256,
    scale: __m256,
    limit: __m256,
    neg_limit: __m256,
    lo: __m256,
    hi: __m256,
    lo_i: __m256i,
    hi_i: __m256i,
    zp: __m256i,
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn consts(p: &QuantParams) -> Consts {
    Consts {
        inv: _mm256_set1_ps(p.inv_scale),
        scale: _mm256_set1_ps(p.scale),
        limit: _mm256_set1_ps(p.limit),
        neg_limit: _mm256_set1_ps(-p.limit),
        lo: _mm256_set1_ps((p.qmin - p.zero_point) as f32),
        hi: _mm256_set1_ps((p.qmax - p.zero_point) as f32),
        lo_i: _mm256_set1_epi32(p.qmin - p.zero_point),
        hi_i: _mm256_set1_epi32(p.qmax - p.zero_point),
        zp: _mm256_set1_epi32(p.zero_point),
    }
}

/// `fl32(x / scale)` for |x| <= limit (beyond it every code saturates, so inputs are first
/// clamped to +-limit); NaN lanes give 0. The reciprocal product gets one Markstein
/// correction, which makes it the correctly rounded quotient.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn quotient(x: __m256, c: &Consts) -> __m256 {
    let ordered = _mm256_cmp_ps::<_CMP_ORD_Q>(x, x);
    // maxps returns its second operand for a NaN lane; the mask then zeroes it
    let x = _mm256_and_ps(
        _mm256_min_ps(_mm256_max_ps(x, c.neg_limit), c.limit),
        ordered,
    );
    let q0 = _mm256_mul_ps(x, c.inv);
    let residual = _mm256_fnmadd_ps(q0, c.scale, x);
    _mm256_fmadd_ps(residual, c.inv, q0)
}

/// `rne(x / scale)` as i32, not yet clamped to the code range (|value| <= 2^17).
/// `cvtps2dq` rounds with MXCSR, which Rust leaves at round-to-nearest-even.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn rounded(x: __m256, c: &Consts) -> __m256i {
    _mm256_cvtps_epi32(quotient(x, c))
}

/// `rne(clamp(x / scale, lo, hi))` without the zero point (clamped on integers; equal
/// because the bounds are integers).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn round_clamped(x: __m256, c: &Consts) -> __m256i {
    _mm256_min_epi32(_mm256_max_epi32(rounded(x, c), c.lo_i), c.hi_i)
}

/// Stores 32 in-range i32 lanes (four vectors, in order) as codes of type `T`.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn store32<T: Code>(dst: *mut T, a: __m256i, b: __m256i, c: __m256i, d: __m256i) {
    match T::KIND {
        CodeKind::I8 | CodeKind::U8 => {
            // packs work inside 128-bit lanes: lane k holds dwords [A_k, B_k, C_k, D_k]
            let ab = _mm256_packs_epi32(a, b);
            let cd = _mm256_packs_epi32(c, d);
            let r = if T::KIND == CodeKind::I8 {
                _mm256_packs_epi16(ab, cd)
            } else {
                _mm256_packus_epi16(ab, cd)
            };
            let idx = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            _mm256_storeu_si256(dst as *mut __m256i, _mm256_permutevar8x32_epi32(r, idx));
        }
        CodeKind::I16 | CodeKind::U16 => {
            let (ab, cd) = if T::KIND == CodeKind::I16 {
                (_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d))
            } else {
                (_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d))
            };
            let dst = dst as *mut __m256i;
            _mm256_storeu_si256(dst, _mm256_permute4x64_epi64::<0b11_01_10_00>(ab));
            _mm256_storeu_si256(dst.add(1), _mm256_permute4x64_epi64::<0b11_01_10_00>(cd));
        }
    }
}

/// Loads 8 codes widened to i32.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn load8<T: Code>(src: *const T) -> __m256i {
    match T::KIND {
        CodeKind::I8 => _mm256_cvtepi8_epi32(_mm_loadl_epi64(src as *const __m128i)),
        CodeKind::U8 => _mm256_cvtepu8_epi32(_mm_loadl_epi64(src as *const __m128i)),
        CodeKind::I16 => _mm256_cvtepi16_epi32(_mm_loadu_si128(src as *const __m128i)),
        CodeKind::U16 => _mm256_cvtepu16_epi32(_mm_loadu_si128(src as *const __m128i)),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hmin(v: __m256) -> f32 {
    let m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_min_ss(m, _mm_shuffle_ps::<0b01>(m, m));
    _mm_cvtss_f32(m)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
    _mm_cvtss_f32(m)
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn min_max(x: &[f32]) -> Option<(f32, f32)> {
    let inf = _mm256_set1_ps(f32::INFINITY);
    let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let (mut lo, mut hi) = (inf, ninf);
    let n = x.len();
    let p = x.as_ptr();
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_loadu_ps(p.add(i));
        let finite = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_and_ps(v, abs_mask), inf);
        lo = _mm256_min_ps(lo, _mm256_blendv_ps(inf, v, finite));
        hi = _mm256_max_ps(hi, _mm256_blendv_ps(ninf, v, finite));
        i += 8;
    }
    let (mut lo, mut hi) = (hmin(lo), hmax(hi));
    if let Some((a, b)) = scalar::min_max(&x[i..]) {
        lo = lo.min(a);
        hi = hi.max(b);
    }
    (lo <= hi).then_some((lo, hi))
}

/// # Safety
/// The CPU must support AVX2 and FMA; `out.len() == x.len()`; `p` fits `T`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize<T: Code>(x: &[f32], p: &QuantParams, out: &mut [T]) {
    let c = consts(p);
    let n = x.len();
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    let full_8bit =
        matches!(T::KIND, CodeKind::I8 | CodeKind::U8) && p.qmin == T::MIN && p.qmax == T::MAX;
    if full_8bit {
        // The code range is the whole type: saturating packs clamp for free (see the AVX-512
        // path for why the result is clamp(v + zero_point, qmin, qmax)).
        let zp16 = _mm256_set1_epi16(p.zero_point as i16);
        let idx = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        while i + 32 <= n {
            let pf = src.wrapping_add(i + PREFETCH) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(pf);
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64));
            let a = rounded(_mm256_loadu_ps(src.add(i)), &c);
            let b = rounded(_mm256_loadu_ps(src.add(i + 8)), &c);
            let cc = rounded(_mm256_loadu_ps(src.add(i + 16)), &c);
            let d = rounded(_mm256_loadu_ps(src.add(i + 24)), &c);
            let ab = _mm256_adds_epi16(_mm256_packs_epi32(a, b), zp16);
            let cd = _mm256_adds_epi16(_mm256_packs_epi32(cc, d), zp16);
            let r = if T::KIND == CodeKind::I8 {
                _mm256_packs_epi16(ab, cd)
            } else {
                _mm256_packus_epi16(ab, cd)
            };
            _mm256_storeu_si256(
                dst.add(i) as *mut __m256i,
                _mm256_permutevar8x32_epi32(r, idx),
            );
            i += 32;
        }
    }
    while i + 32 <= n {
        let a = _mm256_add_epi32(round_clamped(_mm256_loadu_ps(src.add(i)), &c), c.zp);
        let b = _mm256_add_epi32(round_clamped(_mm256_loadu_ps(src.add(i + 8)), &c), c.zp);
        let cc = _mm256_add_epi32(round_clamped(_mm256_loadu_ps(src.add(i + 16)), &c), c.zp);
        let d = _mm256_add_epi32(round_clamped(_mm256_loadu_ps(src.add(i + 24)), &c), c.zp);
        store32(dst.add(i), a, b, cc, d);
        i += 32;
    }
    scalar::quantize(&x[i..], p, &mut out[i..]);
}

/// # Safety
/// The CPU must support AVX2 and FMA; `out.len() == q.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dequantize<T: Code>(q: &[T], p: &QuantParams, out: &mut [f32]) {
    let c = consts(p);
    let n = q.len();
    let (src, dst) = (q.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 16 <= n {
        let a = _mm256_sub_epi32(load8(src.add(i)), c.zp);
        let b = _mm256_sub_epi32(load8(src.add(i + 8)), c.zp);
        _mm256_storeu_ps(dst.add(i), _mm256_mul_ps(_mm256_cvtepi32_ps(a), c.scale));
        _mm256_storeu_ps(
            dst.add(i + 8),
            _mm256_mul_ps(_mm256_cvtepi32_ps(b), c.scale),
        );
        i += 16;
    }
    scalar::dequantize(&q[i..], p, &mut out[i..]);
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn fake_quantize_raw(src: *const f32, dst: *mut f32, n: usize, p: &QuantParams) -> usize {
    let c = consts(p);
    let mut i = 0;
    while i + 16 <= n {
        let a = round_clamped(_mm256_loadu_ps(src.add(i)), &c);
        let b = round_clamped(_mm256_loadu_ps(src.add(i + 8)), &c);
        _mm256_storeu_ps(dst.add(i), _mm256_mul_ps(_mm256_cvtepi32_ps(a), c.scale));
        _mm256_storeu_ps(
            dst.add(i + 8),
            _mm256_mul_ps(_mm256_cvtepi32_ps(b), c.scale),
        );
        i += 16;
    }
    i
}

/// # Safety
/// The CPU must support AVX2 and FMA; `out.len() == x.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn fake_quantize(x: &[f32], p: &QuantParams, out: &mut [f32]) {
    let i = fake_quantize_raw(x.as_ptr(), out.as_mut_ptr(), x.len(), p);
    scalar::fake_quantize(&x[i..], p, &mut out[i..]);
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn fake_quantize_in_place(x: &mut [f32], p: &QuantParams) {
    let i = fake_quantize_raw(x.as_ptr(), x.as_mut_ptr(), x.len(), p);
    scalar::fake_quantize_in_place(&mut x[i..], p);
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn mix(mut x: __m256i) -> __m256i {
    x = _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(M1 as i32));
    x = _mm256_xor_si256(x, _mm256_srli_epi32::<15>(x));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(M2 as i32));
    _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x))
}

/// # Safety
/// The CPU must support AVX2 and FMA; `out.len() == x.len()`; `p` fits `T`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_stochastic<T: Code>(
    x: &[f32],
    p: &QuantParams,
    key: NoiseKey,
    offset: u32,
    out: &mut [T],
) {
    let c = consts(p);
    let hi_i = _mm256_set1_epi32(p.qmax - p.zero_point);
    let (k0, k1) = (
        _mm256_set1_epi32(key.k0 as i32),
        _mm256_set1_epi32(key.k1 as i32),
    );
    let mult = _mm256_set1_epi32(M_COUNTER as i32);
    let unit = _mm256_set1_ps(1.0 / 16_777_216.0);
    let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let n = x.len();
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let codes8 = |j: usize| {
        let counter = _mm256_add_epi32(
            _mm256_set1_epi32(offset.wrapping_add(j as u32) as i32),
            iota,
        );
        let h = mix(_mm256_xor_si256(
            mix(_mm256_xor_si256(_mm256_mullo_epi32(counter, mult), k0)),
            k1,
        ));
        let u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32::<8>(h)), unit);
        let v = quotient(_mm256_loadu_ps(src.add(j)), &c);
        let v = _mm256_min_ps(_mm256_max_ps(v, c.lo), c.hi);
        let q = _mm256_min_epi32(
            _mm256_cvtps_epi32(_mm256_floor_ps(_mm256_add_ps(v, u))),
            hi_i,
        );
        _mm256_add_epi32(q, c.zp)
    };
    let mut i = 0;
    while i + 32 <= n {
        store32(
            dst.add(i),
            codes8(i),
            codes8(i + 8),
            codes8(i + 16),
            codes8(i + 24),
        );
        i += 32;
    }
    for j in i..n {
        let u = rng::uniform(key, offset.wrapping_add(j as u32));
        out[j] = T::from_i32(scalar::quantize_stochastic_one(x[j], u, p));
    }
}

/// Per-channel dequantize: each run of `layout` with its channel's parameters.
///
/// # Safety
/// The CPU must support AVX2 and FMA; lengths checked by the caller.
#[target_feature(enable = "avx2,fma")]
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
