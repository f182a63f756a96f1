//! Reference assignment and decoding for codebooks: this file is the spec.
//!
//! ```text
//! assign(x) = #{ j : x' >= thresholds[j] }   clamped to k - 1,   x' = 0.0 if x is NaN else x
//! decode(i) = centroids[i]
//! ```
//! `thresholds[j]` is the smallest f32 above the exact midpoint of centroids `j` and `j+1`, so
//! assignment picks the nearest centroid, the lower one at an exact midpoint; +inf goes to the
//! last centroid and -inf to the first.

use super::{layer_by_rows, Codebook, FastBinning, Layer};

/// Index of the centroid nearest to `x`.
#[inline]
pub fn assign_one(x: f32, cb: &Codebook) -> u8 {
    let x = if x.is_nan() { 0.0 } else { x };
    let count = cb.thresholds.partition_point(|&t| t <= x);
    count.min(cb.centroids.len() - 1) as u8
}

pub fn assign(x: &[f32], cb: &Codebook, out: &mut [u8]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = assign_one(v, cb);
    }
}

pub fn decode(idx: &[u8], cb: &Codebook, out: &mut [f32]) {
    for (o, &i) in out.iter_mut().zip(idx) {
        *o = cb.centroids[i as usize];
    }
}

/// The minimum over `i` in `first..=last` of `prev[i] + cost(i, j)` and its leftmost argmin,
/// where `cost(i, j) = max(0, (s2[j] - s2[i]) - s * s * (1 / (w[j] - w[i])))`,
/// `s = s1[j] - s1[i]`, is the SSE of the cluster made of positions `i..j`. The SIMD scans
/// evaluate the same operations in the same order (the reciprocal divided, or read from
/// [`Layer::inv`], which holds the same quotients), so every candidate's value, and the
/// argmin, are identical.
pub(crate) fn dp_row(r: &Layer, j: usize, first: usize, last: usize) -> (f64, usize) {
    let (wj, s1j, s2j) = (r.w[j], r.s1[j], r.s2[j]);
    let (mut best, mut at) = (f64::INFINITY, first);
    for i in first..=last {
        let s = s1j - r.s1[i];
        let v = r.prev[i] + ((s2j - r.s2[i]) - s * s * (1.0 / (wj - r.w[i]))).max(0.0);
        if v < best {
            best = v;
            at = i;
        }
    }
    (best, at)
}

/// [`dp_row`] under the name the dispatch uses for one row's scan.
pub(crate) fn dp_min(l: &Layer, j: usize, first: usize, last: usize) -> (f64, usize) {
    dp_row(l, j, first, last)
}

/// One layer of the dynamic program (see `layer_with`) with [`dp_row`] scans.
pub(crate) fn dp_layer(l: &Layer, cur: &mut [f64], arg: &mut [u32]) {
    layer_by_rows(l, cur, arg, |j, a, b| dp_row(l, j, a, b));
}

/// The fast mode's second pass: every finite value of `x` whose bin is marked in the bitmap
/// `keep` (bit `b % 32` of word `b / 32`), appended to `out` in order with its bin.
pub(crate) fn keep_values(x: &[f32], bins: &FastBinning, keep: &[u32], out: &mut Vec<(f32, u32)>) {
    for &v in x {
        if v.is_finite() {
            let b = bins.bin_of(v);
            if keep[b / 32] >> (b % 32) & 1 == 1 {
                out.push((v, b as u32));
            }
        }
    }
}
