//! NEON paths of [`super::scalar`], name for name. Assignment counts the thresholds below each
//! value (k <= 16) or, value by value, a block of 16 of them found by a first count (see
//! [`super::ASSIGN_BLOCK`]); decoding of k <= 16 is a
//! 64-byte `tbl` lookup (four table registers), larger codebooks load per lane.

use std::arch::aarch64::*;

use super::{layer_by_rows, scalar, Codebook, FastBinning, Layer, ASSIGN_BLOCK};

/// # Safety
/// The CPU must support NEON; `out.len() == x.len()`.
#[target_feature(enable = "neon")]
pub unsafe fn assign(x: &[f32], cb: &Codebook, out: &mut [u8]) {
    let k = cb.centroids.len();
    if k > 16 {
        return assign_blocks(x, cb, out);
    }
    let n = x.len();
    let mut i = 0;
    let mut lanes = [0u32; 4];
    while i + 4 <= n {
        let v = vld1q_f32(x.as_ptr().add(i));
        let ordered = vceqq_f32(v, v);
        let v = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), ordered));
        let mut idx = vdupq_n_u32(0);
        for &t in &cb.thresholds[..k - 1] {
            idx = vsubq_u32(idx, vcgeq_f32(v, vdupq_n_f32(t))); // true is all ones
        }
        vst1q_u32(lanes.as_mut_ptr(), idx);
        for (o, &l) in out[i..i + 4].iter_mut().zip(&lanes) {
            *o = l as u8;
        }
        i += 4;
    }
    scalar::assign(&x[i..], cb, &mut out[i..]);
}

/// More than 16 centroids, value by value: the two-step count of [`ASSIGN_BLOCK`] with each
/// 16-lane compare as four 4-lane ones, their all-ones results summed (each lane adds -1).
#[target_feature(enable = "neon")]
unsafe fn assign_blocks(x: &[f32], cb: &Codebook, out: &mut [u8]) {
    let f = cb.fences.as_ptr();
    let fences = [
        vld1q_f32(f),
        vld1q_f32(f.add(4)),
        vld1q_f32(f.add(8)),
        vld1q_f32(f.add(12)),
    ];
    let blocks = cb.blocks.as_ptr();
    let last = cb.centroids.len() as u32 - 1;
    // how many of the 16 thresholds `q` are `<= v`
    let count = |q: [float32x4_t; 4], v: float32x4_t| {
        let a = vaddq_u32(vcleq_f32(q[0], v), vcleq_f32(q[1], v));
        let b = vaddq_u32(vcleq_f32(q[2], v), vcleq_f32(q[3], v));
        vaddvq_u32(vaddq_u32(a, b)).wrapping_neg()
    };
    for (o, &v) in out.iter_mut().zip(x) {
        let v = vdupq_n_f32(if v.is_nan() { 0.0 } else { v });
        let b = count(fences, v) as usize;
        // b <= 15 and blocks holds 16 (b + 1) entries or more
        let p = blocks.add(ASSIGN_BLOCK * b);
        let block = [
            vld1q_f32(p),
            vld1q_f32(p.add(4)),
            vld1q_f32(p.add(8)),
            vld1q_f32(p.add(12)),
        ];
        let c = count(block, v);
        *o = (ASSIGN_BLOCK as u32 * b as u32 + c).min(last) as u8;
    }
}

/// # Safety
/// The CPU must support NEON; `out.len() == idx.len()`; every index < k.
#[target_feature(enable = "neon")]
pub unsafe fn decode(idx: &[u8], cb: &Codebook, out: &mut [f32]) {
    let k = cb.centroids.len();
    if k > 16 {
        return scalar::decode(idx, cb, out);
    }
    let t = cb.table.as_ptr() as *const u8;
    let table = uint8x16x4_t(
        vld1q_u8(t),
        vld1q_u8(t.add(16)),
        vld1q_u8(t.add(32)),
        vld1q_u8(t.add(48)),
    );
    let n = idx.len();
    let mut i = 0;
    let spread = vdupq_n_u32(0x0404_0404);
    let bytes_of_lane = vdupq_n_u32(0x0302_0100);
    while i + 8 <= n {
        let w = vmovl_u8(vld1_u8(idx.as_ptr().add(i)));
        for (j, half) in [vmovl_u16(vget_low_u16(w)), vmovl_high_u16(w)]
            .into_iter()
            .enumerate()
        {
            // lane value c becomes bytes 4c, 4c+1, 4c+2, 4c+3: the f32 centroid c of the table
            let sel = vreinterpretq_u8_u32(vmlaq_u32(bytes_of_lane, half, spread));
            let f = vreinterpretq_f32_u8(vqtbl4q_u8(table, sel));
            vst1q_f32(out.as_mut_ptr().add(i + 4 * j), f);
        }
        i += 8;
    }
    scalar::decode(&idx[i..], cb, &mut out[i..]);
}

/// One layer of the dynamic program, its rows scanned by [`scalar::dp_row`] (no 2-lane f64
/// NEON scan is written yet).
///
/// # Safety
/// Safe to call on any aarch64 CPU; `unsafe` only for the dispatch signature.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn dp_layer(l: &Layer, cur: &mut [f64], arg: &mut [u32]) {
    layer_by_rows(l, cur, arg, |j, a, b| scalar::dp_row(l, j, a, b));
}

/// [`scalar::dp_row`] for one row (the scalar scan, as in [`dp_layer`]).
///
/// # Safety
/// None beyond the dispatch's CPU check.
pub(crate) unsafe fn dp_min(l: &Layer, j: usize, first: usize, last: usize) -> (f64, usize) {
    scalar::dp_row(l, j, first, last)
}

/// [`scalar::keep_values`] (the pass is rare-branch bound; no vector form on this ISA).
///
/// # Safety
/// None beyond the dispatch's CPU check.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn keep_values(
    x: &[f32],
    bins: &FastBinning,
    keep: &[u32],
    out: &mut Vec<(f32, u32)>,
) {
    scalar::keep_values(x, bins, keep, out)
}
