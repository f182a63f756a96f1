//! AVX2 paths of [`super::scalar`], name for name. Assignment counts the thresholds below each
//! value (k <= 16) or, value by value, a block of 16 of them found by a first count (see
//! [`super::ASSIGN_BLOCK`]); decoding is `vpermps` (with blends for k <= 32), the scalar loop
//! beyond. Tails use the scalar reference.

use std::arch::x86_64::*;

use super::{layer_by_rows, scalar, Codebook, FastBinning, Layer, ASSIGN_BLOCK};
use crate::linear::x86_avx2::store32;

/// Indices of 8 values among k <= 16 centroids: the number of thresholds each is `>=`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn assign8(x: __m256, cb: &Codebook) -> __m256i {
    let ordered = _mm256_cmp_ps::<_CMP_ORD_Q>(x, x);
    let x = _mm256_and_ps(x, ordered);
    let mut idx = _mm256_setzero_si256();
    for &t in &cb.thresholds[..cb.centroids.len() - 1] {
        let ge = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(t));
        idx = _mm256_sub_epi32(idx, _mm256_castps_si256(ge)); // true is -1
    }
    idx
}

/// # Safety
/// The CPU must support AVX2 and FMA; `out.len() == x.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn assign(x: &[f32], cb: &Codebook, out: &mut [u8]) {
    if cb.centroids.len() > 16 {
        return assign_blocks(x, cb, out);
    }
    let n = x.len();
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 32 <= n {
        let a = assign8(_mm256_loadu_ps(src.add(i)), cb);
        let b = assign8(_mm256_loadu_ps(src.add(i + 8)), cb);
        let c = assign8(_mm256_loadu_ps(src.add(i + 16)), cb);
        let d = assign8(_mm256_loadu_ps(src.add(i + 24)), cb);
        store32(dst.add(i), a, b, c, d);
        i += 32;
    }
    scalar::assign(&x[i..], cb, &mut out[i..]);
}

/// More than 16 centroids, value by value: the two-step count of [`ASSIGN_BLOCK`] with each
/// 16-lane compare as two 8-lane ones. No gathers (a binary search by 8 dependent gathers
/// ran at 0.24 GiB/s for k = 256, below the scalar search).
#[target_feature(enable = "avx2,fma")]
unsafe fn assign_blocks(x: &[f32], cb: &Codebook, out: &mut [u8]) {
    let f = cb.fences.as_ptr();
    let (f0, f1) = (_mm256_loadu_ps(f), _mm256_loadu_ps(f.add(8)));
    let blocks = cb.blocks.as_ptr();
    let last = cb.centroids.len() as u32 - 1;
    // how many of 16 sorted thresholds (two halves) are `<= v`: those lanes are a prefix,
    // whose length is the trailing zeros of the mask + 1 (bsf; `count_ones` without the
    // popcnt feature is a dozen instructions)
    let count = |lo: __m256, hi: __m256, v: __m256| {
        let lo = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(lo, v)) as u32;
        let hi = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(hi, v)) as u32;
        ((lo | hi << 8) + 1).trailing_zeros()
    };
    for (o, &v) in out.iter_mut().zip(x) {
        let v = _mm256_set1_ps(if v.is_nan() { 0.0 } else { v });
        let b = count(f0, f1, v) as usize;
        // b <= 15 and blocks holds 16 (b + 1) entries or more
        let p = blocks.add(ASSIGN_BLOCK * b);
        let c = count(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), v);
        *o = (ASSIGN_BLOCK as u32 * b as u32 + c).min(last) as u8;
    }
}

/// # Safety
/// The CPU must support AVX2 and FMA; `out.len() == idx.len()`; every index < k.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn decode(idx: &[u8], cb: &Codebook, out: &mut [f32]) {
    let n = idx.len();
    let (src, dst) = (idx.as_ptr(), out.as_mut_ptr());
    let k = cb.centroids.len();
    let t = cb.table.as_ptr();
    let (t0, t1) = (_mm256_loadu_ps(t), _mm256_loadu_ps(t.add(8)));
    let (t2, t3) = (_mm256_loadu_ps(t.add(16)), _mm256_loadu_ps(t.add(24)));
    // Up to 32 centroids stay in registers: vpermps picks by the index's low 3 bits and
    // blends select by bits 3 and 4 (moved to the sign bit). Larger codebooks take the
    // scalar loop: vgatherdps is slower than it on CPUs with Intel's gather (GDS) microcode
    // mitigation (k = 256, 65539 indices: 156 us gathering against 90 us scalar, measured
    // with `cargo bench -p quantbench-kernels --bench kernels -- kmeans_decode/`).
    if k > 32 {
        return scalar::decode(idx, cb, out);
    }
    let lookup = |v: __m256i| {
        if k <= 8 {
            _mm256_permutevar8x32_ps(t0, v)
        } else {
            let bit3 = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(v));
            let lo = _mm256_blendv_ps(
                _mm256_permutevar8x32_ps(t0, v),
                _mm256_permutevar8x32_ps(t1, v),
                bit3,
            );
            if k <= 16 {
                return lo;
            }
            let hi = _mm256_blendv_ps(
                _mm256_permutevar8x32_ps(t2, v),
                _mm256_permutevar8x32_ps(t3, v),
                bit3,
            );
            _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32::<27>(v)))
        }
    };
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(src.add(i) as *const __m128i));
        _mm256_storeu_ps(dst.add(i), lookup(v));
        i += 8;
    }
    scalar::decode(&idx[i..], cb, &mut out[i..]);
}

/// [`scalar::dp_row`] on 4 candidates per step (indices carried as exact f64), the last
/// `< 4` candidates scalar; the lanes reduce to the minimum and its leftmost candidate.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dp_row(r: &Layer, j: usize, first: usize, last: usize) -> (f64, usize) {
    let (wj, s1j, s2j) = (r.w[j], r.s1[j], r.s2[j]);
    let end = last + 1;
    let (mut best, mut at) = (f64::INFINITY, first);
    let mut i = first;
    if end - first >= 4 {
        let (vw, v1, v2) = (_mm256_set1_pd(wj), _mm256_set1_pd(s1j), _mm256_set1_pd(s2j));
        let zero = _mm256_setzero_pd();
        let one = _mm256_set1_pd(1.0);
        let mut vbest = _mm256_set1_pd(f64::INFINITY);
        let mut vat = _mm256_set1_pd(first as f64);
        let mut idx = _mm256_add_pd(
            _mm256_set1_pd(first as f64),
            _mm256_setr_pd(0.0, 1.0, 2.0, 3.0),
        );
        let four = _mm256_set1_pd(4.0);
        let (prev, w, s1, s2) = (r.prev.as_ptr(), r.w.as_ptr(), r.s1.as_ptr(), r.s2.as_ptr());
        while i + 4 <= end {
            let s = _mm256_sub_pd(v1, _mm256_loadu_pd(s1.add(i)));
            let d2 = _mm256_sub_pd(v2, _mm256_loadu_pd(s2.add(i)));
            let dw = _mm256_sub_pd(vw, _mm256_loadu_pd(w.add(i)));
            let c = _mm256_max_pd(
                _mm256_sub_pd(
                    d2,
                    _mm256_mul_pd(_mm256_mul_pd(s, s), _mm256_div_pd(one, dw)),
                ),
                zero,
            );
            let v = _mm256_add_pd(_mm256_loadu_pd(prev.add(i)), c);
            let better = _mm256_cmp_pd::<_CMP_LT_OQ>(v, vbest);
            vbest = _mm256_blendv_pd(vbest, v, better);
            vat = _mm256_blendv_pd(vat, idx, better);
            idx = _mm256_add_pd(idx, four);
            i += 4;
        }
        let (mut lb, mut la) = ([0f64; 4], [0f64; 4]);
        _mm256_storeu_pd(lb.as_mut_ptr(), vbest);
        _mm256_storeu_pd(la.as_mut_ptr(), vat);
        for (&b, &a) in lb.iter().zip(&la) {
            let a = a as usize;
            if b < best || (b == best && a < at) {
                best = b;
                at = a;
            }
        }
    }
    while i < end {
        let s = s1j - r.s1[i];
        let v = r.prev[i] + ((s2j - r.s2[i]) - s * s * (1.0 / (wj - r.w[i]))).max(0.0);
        if v < best {
            best = v;
            at = i;
        }
        i += 1;
    }
    (best, at)
}

/// One layer of the dynamic program with the 4-lane scans.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `first <= last < l.prev.len()` for every row.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dp_layer(l: &Layer, cur: &mut [f64], arg: &mut [u32]) {
    layer_by_rows(l, cur, arg, |j, a, b| dp_row(l, j, a, b));
}

/// [`super::scalar::dp_row`] for one row with the 4-lane scan.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `first <= last < min(j, l.prev.len())`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dp_min(l: &Layer, j: usize, first: usize, last: usize) -> (f64, usize) {
    dp_row(l, j, first, last)
}

/// [`scalar::keep_values`] (the pass is rare-branch bound; no vector form on this ISA).
///
/// # Safety
/// None beyond the dispatch's CPU check.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn keep_values(
    x: &[f32],
    bins: &FastBinning,
    keep: &[u32],
    out: &mut Vec<(f32, u32)>,
) {
    scalar::keep_values(x, bins, keep, out)
}
