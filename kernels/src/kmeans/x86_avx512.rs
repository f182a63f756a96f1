//! AVX-512 (F + BW + VL) paths of [`super::scalar`], name for name. Assignment counts the
//! thresholds below each value (k <= 16) or binary-searches them with gathers; decoding is a
//! register table lookup (`vpermps` for k <= 16, `vpermi2ps` for k <= 32) or a gather.

use std::arch::x86_64::*;

use super::Codebook;
use crate::linear::x86_avx512::lanes_mask;

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn assign16(x: __m512, cb: &Codebook) -> __m512i {
    let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(x, x);
    let x = _mm512_maskz_mov_ps(ordered, x);
    let k = cb.centroids.len();
    let one = _mm512_set1_epi32(1);
    let mut idx = _mm512_setzero_si512();
    if k <= 16 {
        for &t in &cb.thresholds[..k - 1] {
            let ge = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(t));
            idx = _mm512_mask_add_epi32(idx, ge, idx, one);
        }
        idx
    } else {
        let base = cb.thresholds.as_ptr();
        let mut step = cb.thresholds.len().div_ceil(2);
        while step > 0 {
            let probe = _mm512_add_epi32(idx, _mm512_set1_epi32(step as i32 - 1));
            let t = _mm512_i32gather_ps::<4>(probe, base as *const _);
            let ge = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, t);
            idx = _mm512_mask_add_epi32(idx, ge, idx, _mm512_set1_epi32(step as i32));
            step /= 2;
        }
        _mm512_min_epi32(idx, _mm512_set1_epi32(k as i32 - 1))
    }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL; `out.len() == x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn assign(x: &[f32], cb: &Codebook, out: &mut [u8]) {
    let n = x.len();
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i < n {
        let k = lanes_mask(n - i);
        let idx = assign16(_mm512_maskz_loadu_ps(k, src.add(i)), cb);
        _mm512_mask_cvtepi32_storeu_epi8(dst.add(i) as *mut _, k, idx);
        i += 16;
    }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL; `out.len() == idx.len()`; every index < k.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn decode(idx: &[u8], cb: &Codebook, out: &mut [f32]) {
    let n = idx.len();
    let (src, dst) = (idx.as_ptr(), out.as_mut_ptr());
    let k = cb.centroids.len();
    let lo = _mm512_loadu_ps(cb.table.as_ptr());
    let hi = _mm512_loadu_ps(cb.table.as_ptr().add(16));
    let lookup = |i: __m512i| {
        if k <= 16 {
            _mm512_permutexvar_ps(i, lo)
        } else if k <= 32 {
            _mm512_permutex2var_ps(lo, i, hi)
        } else {
            _mm512_i32gather_ps::<4>(i, cb.centroids.as_ptr() as *const _)
        }
    };
    let mut i = 0;
    while i + 64 <= n {
        let bytes = _mm512_loadu_si512(src.add(i) as *const _);
        for j in 0..4 {
            let part = match j {
                0 => _mm512_castsi512_si128(bytes),
                1 => _mm512_extracti32x4_epi32::<1>(bytes),
                2 => _mm512_extracti32x4_epi32::<2>(bytes),
                _ => _mm512_extracti32x4_epi32::<3>(bytes),
            };
            _mm512_storeu_ps(dst.add(i + 16 * j), lookup(_mm512_cvtepu8_epi32(part)));
        }
        i += 64;
    }
    while i < n {
        let m = lanes_mask(n - i);
        let v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, src.add(i) as *const i8));
        _mm512_mask_storeu_ps(dst.add(i), m, lookup(v));
        i += 16;
    }
}
