//! Reference assignment and decoding for codebooks: this file is the spec.
//!
//! ```text
//! assign(x) = #{ j : x' >= thresholds[j] }   clamped to k - 1,   x' = 0.0 if x is NaN else x
//! decode(i) = centroids[i]
//! ```
//! `thresholds[j]` is the smallest f32 above the exact midpoint of centroids `j` and `j+1`, so
//! assignment picks the nearest centroid, the lower one at an exact midpoint; +inf goes to the
//! last centroid and -inf to the first.

use super::Codebook;

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
