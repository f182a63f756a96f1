//! AVX-512 (F + BW + VL) paths of [`super::scalar`], name for name. Assignment counts the
//! thresholds below each value (k <= 16) or binary-searches them with each level's probes in
//! registers (no gathers); decoding is a register table lookup (`vpermps` for k <= 16,
//! `vpermi2ps` for k <= 32) or a gather.

use std::arch::x86_64::*;

use super::{layer_with, scalar, search_level, Codebook, FastBinning, Layer, FAST_BINS, INV_PAD};
use crate::linear::x86_avx512::lanes_mask;

/// Indices of 16 values among k <= 16 centroids: the number of thresholds each is `>=`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn assign16(x: __m512, cb: &Codebook) -> __m512i {
    let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(x, x);
    let x = _mm512_maskz_mov_ps(ordered, x);
    let one = _mm512_set1_epi32(1);
    let mut idx = _mm512_setzero_si512();
    for &t in &cb.thresholds[..cb.centroids.len() - 1] {
        let ge = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(t));
        idx = _mm512_mask_add_epi32(idx, ge, idx, one);
    }
    idx
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL; `out.len() == x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn assign(x: &[f32], cb: &Codebook, out: &mut [u8]) {
    if cb.centroids.len() > 16 {
        return assign_search(x, cb, out);
    }
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

/// More than 16 centroids, 16 values at a time: a branch-free binary search over the padded
/// thresholds for the reference's count of those `<= x`, its probes of each level read from
/// registers ([`Codebook::levels`]: `vpermps` for up to 16 probes, `vpermi2ps` for 32, two or
/// four of them and a selection by the probe's high bits for 64 and 128). No gathers.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn assign_search(x: &[f32], cb: &Codebook, out: &mut [u8]) {
    match cb.thresholds.len().trailing_ones() {
        5 => assign_search_m::<5>(x, cb, out),
        6 => assign_search_m::<6>(x, cb, out),
        7 => assign_search_m::<7>(x, cb, out),
        _ => assign_search_m::<8>(x, cb, out),
    }
}

/// [`assign_search`] over `2^M - 1` padded thresholds, four vectors of 16 values at a time
/// (the levels of one vector depend on each other; the four do not).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn assign_search_m<const M: u32>(x: &[f32], cb: &Codebook, out: &mut [u8]) {
    let lv = cb.levels.as_ptr();
    let last = _mm512_set1_epi32(cb.centroids.len() as i32 - 1);
    let one = _mm512_set1_epi32(1);
    // the probe of level `level` for the lanes' bits so far, `j < 2^level` (the count's top
    // `level` bits)
    let probe = |level: u32, j: __m512i| {
        let t = lv.add(search_level(level));
        let pair = |p: usize| {
            _mm512_permutex2var_ps(
                _mm512_loadu_ps(t.add(32 * p)),
                j,
                _mm512_loadu_ps(t.add(32 * p + 16)),
            )
        };
        match level {
            0 => _mm512_set1_ps(*t),
            1..=4 => _mm512_permutexvar_ps(j, _mm512_loadu_ps(t)),
            5 => pair(0),
            _ => {
                let bit5 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(32));
                let lo = _mm512_mask_mov_ps(pair(0), bit5, pair(1));
                if level == 6 {
                    return lo;
                }
                let hi = _mm512_mask_mov_ps(pair(2), bit5, pair(3));
                let bit6 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(64));
                _mm512_mask_mov_ps(lo, bit6, hi)
            }
        }
    };
    let ordered = |v: __m512| _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v), v);
    // one level: the next bit of the count is whether v reaches the probe
    let step = |level: u32, v: __m512, j: __m512i| {
        let ge = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, probe(level, j));
        let j = _mm512_add_epi32(j, j);
        _mm512_mask_add_epi32(j, ge, j, one)
    };
    let n = x.len();
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 64 <= n {
        let v: [__m512; 4] =
            core::array::from_fn(|q| ordered(_mm512_loadu_ps(src.add(i + 16 * q))));
        let mut idx = [_mm512_setzero_si512(); 4];
        for level in 0..M {
            for q in 0..4 {
                idx[q] = step(level, v[q], idx[q]);
            }
        }
        for (q, &c) in idx.iter().enumerate() {
            _mm512_mask_cvtepi32_storeu_epi8(
                dst.add(i + 16 * q) as *mut _,
                0xFFFF,
                _mm512_min_epi32(c, last),
            );
        }
        i += 64;
    }
    while i < n {
        let k = lanes_mask(n - i);
        let v = ordered(_mm512_maskz_loadu_ps(k, src.add(i)));
        let mut idx = _mm512_setzero_si512();
        for level in 0..M {
            idx = step(level, v, idx);
        }
        _mm512_mask_cvtepi32_storeu_epi8(dst.add(i) as *mut _, k, _mm512_min_epi32(idx, last));
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

/// [`super::scalar::dp_row`] on 8 candidates per step: each lane keeps its smallest value and
/// the first candidate that reached it, then the lanes are reduced to the minimum and, among
/// the lanes that hold it, the smallest candidate (the leftmost argmin). With `UNIT` weights
/// the reciprocal counts come from [`Layer::inv`] (one load and a lane reversal) instead of a
/// division.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dp_row<const UNIT: bool>(r: &Layer, j: usize, first: usize, last: usize) -> (f64, usize) {
    // with UNIT weights `r.w` is not read (it may be empty)
    let (wj, s1j, s2j) = (
        if UNIT {
            _mm512_setzero_pd()
        } else {
            _mm512_set1_pd(r.w[j])
        },
        _mm512_set1_pd(r.s1[j]),
        _mm512_set1_pd(r.s2[j]),
    );
    let zero = _mm512_setzero_pd();
    let one = _mm512_set1_pd(1.0);
    let reverse = _mm512_setr_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    let (prev, w, s1, s2) = (r.prev.as_ptr(), r.w.as_ptr(), r.s1.as_ptr(), r.s2.as_ptr());
    let inv = r.inv.unwrap_or(&[]).as_ptr();
    // the values of candidates i..i + 8 in lanes k
    let values = |i: usize, k: __mmask8| {
        let s = _mm512_sub_pd(s1j, _mm512_maskz_loadu_pd(k, s1.add(i)));
        let d2 = _mm512_sub_pd(s2j, _mm512_maskz_loadu_pd(k, s2.add(i)));
        let rcp = if UNIT {
            // lane l: count j - i - l, at inv[INV_PAD + j - i - l] (i <= j - 1: in bounds)
            _mm512_permutexvar_pd(reverse, _mm512_loadu_pd(inv.add(INV_PAD + j - i - 7)))
        } else {
            _mm512_div_pd(one, _mm512_sub_pd(wj, _mm512_maskz_loadu_pd(k, w.add(i))))
        };
        let c = _mm512_max_pd(
            _mm512_sub_pd(d2, _mm512_mul_pd(_mm512_mul_pd(s, s), rcp)),
            zero,
        );
        _mm512_add_pd(_mm512_maskz_loadu_pd(k, prev.add(i)), c)
    };
    let inf = _mm512_set1_pd(f64::INFINITY);
    let (mut best, mut at) = (inf, _mm512_set1_epi64(first as i64));
    let mut idx = _mm512_add_epi64(
        _mm512_set1_epi64(first as i64),
        _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7),
    );
    let eight = _mm512_set1_epi64(8);
    let end = last + 1;
    let mut i = first;
    while i < end {
        let k = if end - i >= 8 {
            0xFF
        } else {
            ((1u32 << (end - i)) - 1) as __mmask8
        };
        let v = values(i, k);
        let better = _mm512_mask_cmp_pd_mask::<_CMP_LT_OQ>(k, v, best);
        best = _mm512_mask_mov_pd(best, better, v);
        at = _mm512_mask_mov_epi64(at, better, idx);
        idx = _mm512_add_epi64(idx, eight);
        i += 8;
    }
    let min = _mm512_reduce_min_pd(best);
    if min == f64::INFINITY {
        // every candidate was NaN or +inf: the scalar scan reports +inf at `first`
        return (f64::INFINITY, first);
    }
    let holds = _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(best, _mm512_set1_pd(min));
    if end - first <= 8 {
        // one step: lane l holds candidate first + l
        return (min, first + holds.trailing_zeros() as usize);
    }
    (min, _mm512_mask_reduce_min_epi64(holds, at) as usize)
}

/// One layer of the dynamic program with the 8-lane scans.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL; `first <= last < l.prev.len()` for every row, as
/// `super::optimal_partition` guarantees.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn dp_layer(l: &Layer, cur: &mut [f64], arg: &mut [u32]) {
    if l.inv.is_some() {
        layer_with(
            l,
            cur,
            arg,
            |j, a, b| dp_row::<true>(l, j, a, b),
            |j0, count, a, b, cur, arg| dp_block::<true>(l, j0, count, a, b, cur, arg),
        );
    } else {
        layer_with(
            l,
            cur,
            arg,
            |j, a, b| dp_row::<false>(l, j, a, b),
            |j0, count, a, b, cur, arg| dp_block::<false>(l, j0, count, a, b, cur, arg),
        );
    }
}

/// [`super::scalar::dp_row`] for one row `j` over `first..=last` with the 8-lane scan.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL; `first <= last < min(j, l.prev.len())`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn dp_min(l: &Layer, j: usize, first: usize, last: usize) -> (f64, usize) {
    if l.inv.is_some() {
        dp_row::<true>(l, j, first, last)
    } else {
        dp_row::<false>(l, j, first, last)
    }
}

/// [`super::rows_of_block`] with one row per lane: rows `j0..j0 + count` (`count < 8`) take
/// the candidates `first..=last` in order, each broadcast to every lane; a lane skips the
/// candidates past its row's `j - 1` and keeps its smallest value and the first candidate
/// that reached it, as the scalar scan of that row does. No reduction across lanes. With
/// `UNIT` weights the lanes' reciprocal counts are one load from [`Layer::inv`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dp_block<const UNIT: bool>(
    r: &Layer,
    j0: usize,
    count: usize,
    first: usize,
    last: usize,
    cur: &mut [f64],
    arg: &mut [u32],
) {
    debug_assert!(count < 8 && j0 + count <= cur.len() && j0 + count <= arg.len());
    debug_assert!(first < j0 && last < r.prev.len() && last < j0 + count);
    let rows = ((1u32 << count) - 1) as __mmask8;
    // with UNIT weights `r.w` is not read (it may be empty)
    let (wj, s1j, s2j) = (
        if UNIT {
            _mm512_setzero_pd()
        } else {
            _mm512_maskz_loadu_pd(rows, r.w.as_ptr().add(j0))
        },
        _mm512_maskz_loadu_pd(rows, r.s1.as_ptr().add(j0)),
        _mm512_maskz_loadu_pd(rows, r.s2.as_ptr().add(j0)),
    );
    let zero = _mm512_setzero_pd();
    let one = _mm512_set1_pd(1.0);
    let (prev, w, s1, s2) = (r.prev.as_ptr(), r.w.as_ptr(), r.s1.as_ptr(), r.s2.as_ptr());
    let inv = r.inv.unwrap_or(&[]).as_ptr();
    // candidate i for every row, and the rows j > i that take it
    let candidate = |i: usize| {
        let open = if i < j0 {
            rows
        } else {
            // i - j0 + 1 <= count <= 7 here
            rows & !(((1u32 << (i - j0 + 1)) - 1) as __mmask8)
        };
        let s = _mm512_sub_pd(s1j, _mm512_set1_pd(*s1.add(i)));
        let d2 = _mm512_sub_pd(s2j, _mm512_set1_pd(*s2.add(i)));
        let rcp = if UNIT {
            // lane l: count j0 + l - i, at inv[INV_PAD + j0 - i + l] (i <= j0 + 6)
            _mm512_loadu_pd(inv.add(INV_PAD + j0 - i))
        } else {
            _mm512_div_pd(one, _mm512_sub_pd(wj, _mm512_set1_pd(*w.add(i))))
        };
        let c = _mm512_max_pd(
            _mm512_sub_pd(d2, _mm512_mul_pd(_mm512_mul_pd(s, s), rcp)),
            zero,
        );
        (open, _mm512_add_pd(_mm512_set1_pd(*prev.add(i)), c))
    };
    // two accumulators (even and odd candidates) so that the compare-and-keep chains
    // overlap; each keeps per lane its smallest value and the first candidate reaching it
    let inf = _mm512_set1_pd(f64::INFINITY);
    let start = _mm512_set1_epi64(first as i64);
    let (mut best0, mut at0, mut best1, mut at1) = (inf, start, inf, start);
    let mut i = first;
    while i < last {
        let (open0, v0) = candidate(i);
        let (open1, v1) = candidate(i + 1);
        let b0 = _mm512_mask_cmp_pd_mask::<_CMP_LT_OQ>(open0, v0, best0);
        let b1 = _mm512_mask_cmp_pd_mask::<_CMP_LT_OQ>(open1, v1, best1);
        best0 = _mm512_mask_mov_pd(best0, b0, v0);
        best1 = _mm512_mask_mov_pd(best1, b1, v1);
        at0 = _mm512_mask_mov_epi64(at0, b0, _mm512_set1_epi64(i as i64));
        at1 = _mm512_mask_mov_epi64(at1, b1, _mm512_set1_epi64(i as i64 + 1));
        i += 2;
    }
    if i == last {
        let (open0, v0) = candidate(i);
        let b0 = _mm512_mask_cmp_pd_mask::<_CMP_LT_OQ>(open0, v0, best0);
        best0 = _mm512_mask_mov_pd(best0, b0, v0);
        at0 = _mm512_mask_mov_epi64(at0, b0, _mm512_set1_epi64(i as i64));
    }
    // per lane: the smaller value, on a tie the earlier candidate
    let take1 = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(best1, best0)
        | (_mm512_cmp_pd_mask::<_CMP_EQ_OQ>(best1, best0) & _mm512_cmplt_epi64_mask(at1, at0));
    let best = _mm512_mask_mov_pd(best0, take1, best1);
    let at = _mm512_mask_mov_epi64(at0, take1, at1);
    _mm512_mask_storeu_pd(cur.as_mut_ptr().add(j0), rows, best);
    _mm256_mask_storeu_epi32(
        arg.as_mut_ptr().add(j0) as *mut i32,
        rows,
        _mm512_cvtepi64_epi32(at),
    );
}

/// [`scalar::keep_values`] 16 values at a time: the bins in f64 as the reference computes
/// them, the bitmap words gathered for the finite lanes; the rare kept lanes are appended in
/// order.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/DQ; `keep` covers [`FAST_BINS`] bits.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub(crate) unsafe fn keep_values(
    x: &[f32],
    bins: &FastBinning,
    keep: &[u32],
    out: &mut Vec<(f32, u32)>,
) {
    debug_assert!(keep.len() * 32 >= FAST_BINS);
    let (lo, scale) = (_mm512_set1_pd(bins.lo as f64), _mm512_set1_pd(bins.scale));
    let top = _mm512_set1_epi32(FAST_BINS as i32 - 1);
    let (zero, one) = (_mm512_setzero_si512(), _mm512_set1_epi32(1));
    let n = x.len() - x.len() % 16;
    let mut idx = [0u32; 16];
    for i in (0..n).step_by(16) {
        let v = _mm512_loadu_ps(x.as_ptr().add(i));
        // v - v is 0 exactly for the finite values (NaN for NaN and +-inf)
        let finite = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_sub_ps(v, v), _mm512_setzero_ps());
        let bin = |h: __m256| {
            let t = _mm512_mul_pd(_mm512_sub_pd(_mm512_cvtps_pd(h), lo), scale);
            _mm512_cvttpd_epi32(t)
        };
        let low = bin(_mm512_castps512_ps256(v));
        let high = bin(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
            _mm512_castps_pd(v),
        )));
        let b = _mm512_min_epi32(
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high),
            top,
        );
        let word = _mm512_mask_i32gather_epi32::<4>(
            zero,
            finite,
            _mm512_srli_epi32::<5>(b),
            keep.as_ptr() as *const _,
        );
        let bit = _mm512_sllv_epi32(one, _mm512_and_si512(b, _mm512_set1_epi32(31)));
        // the non-finite lanes gathered 0: never kept
        let mut hit = _mm512_test_epi32_mask(word, bit);
        if hit != 0 {
            _mm512_storeu_si512(idx.as_mut_ptr() as *mut _, b);
            while hit != 0 {
                let l = hit.trailing_zeros() as usize;
                out.push((x[i + l], idx[l]));
                hit &= hit - 1;
            }
        }
    }
    scalar::keep_values(&x[n..], bins, keep, out);
}
