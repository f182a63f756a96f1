//! NEON microkernels. Both multiply signed bytes, so `u8` A is shifted to `i8` on load
//! (`a ^ 0x80 = a - 128`; the driver adds `128 * colsum_B` back).
//!
//! * `sdot_tile` (dotprod): tile 4 x 16; per group of 4 k, 4 vectors of B (16 columns x 4
//!   codes) and 4 codes of each row of A duplicated over a vector, 16 `sdot`. `sdot` is
//!   emitted with `asm!` (the intrinsic is unstable on stable Rust).
//! * `smull_tile` (plain NEON): tile 2 x 8; per group of 8 k, `smull` makes 8 i16 products
//!   of one row and one column (each at most 2^14 in magnitude) and `sadalp` adds their
//!   pairs into 4 i32 lanes; the lanes are summed at the end.

use std::arch::aarch64::*;
use std::arch::asm;

use super::Tile;

#[inline(always)]
unsafe fn read_n<const N: usize>(p: *const u8, n: usize) -> [u8; N] {
    let mut w = [0u8; N];
    std::ptr::copy_nonoverlapping(p, w.as_mut_ptr(), n);
    w
}

#[inline(always)]
unsafe fn sdot(acc: int32x4_t, b: int8x16_t, a: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    asm!(
        "sdot {acc:v}.4s, {b:v}.16b, {a:v}.16b",
        acc = inout(vreg) acc,
        b = in(vreg) b,
        a = in(vreg) a,
        options(pure, nomem, nostack)
    );
    acc
}

/// Stores row `i` of the tile (adding the driver's terms on the last K block).
#[inline(always)]
unsafe fn store_row(t: &Tile, i: usize, vals: &[i32]) {
    let c = t.c.add(i * t.ldc);
    for (j, &v) in vals.iter().enumerate().take(t.cols) {
        let d = c.add(j);
        let mut v = if t.accumulate {
            (*d).wrapping_add(v)
        } else {
            v
        };
        if t.last {
            v = v
                .wrapping_add(*t.row_add.add(i))
                .wrapping_add(*t.col_add.add(j));
        }
        *d = v;
    }
}

/// # Safety
/// NEON + dotprod; `t` as documented on [`Tile`], B panel with 16 columns per group of 4.
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn sdot_tile<const SIGNED_A: bool>(t: &Tile) {
    const MR: usize = 4;
    let mut acc = [[vdupq_n_s32(0); 4]; MR];
    let mut rows = [t.a; MR];
    for (i, r) in rows.iter_mut().enumerate() {
        *r = t.a.add(i.min(t.rows - 1) * t.lda);
    }
    let flip = vdupq_n_u8(if SIGNED_A { 0 } else { 0x80 });
    let mut b = t.b;
    let total = t.groups + (t.tail > 0) as usize;
    for g in 0..total {
        let bv = [
            vld1q_s8(b as *const i8),
            vld1q_s8(b.add(16) as *const i8),
            vld1q_s8(b.add(32) as *const i8),
            vld1q_s8(b.add(48) as *const i8),
        ];
        for i in 0..MR {
            let w = if g < t.groups {
                read_n::<4>(rows[i].add(4 * g), 4)
            } else {
                // zero codes of the padding: after the flip below they must stay 0 * b
                // products, and they do because B is zero there
                read_n::<4>(rows[i].add(4 * g), t.tail)
            };
            let a = vreinterpretq_s8_u8(veorq_u8(
                vreinterpretq_u8_u32(vdupq_n_u32(u32::from_ne_bytes(w))),
                flip,
            ));
            for v in 0..4 {
                acc[i][v] = sdot(acc[i][v], bv[v], a);
            }
        }
        b = b.add(64);
    }
    for (i, row) in acc.iter().enumerate().take(t.rows) {
        let mut vals = [0i32; 16];
        for (v, &x) in row.iter().enumerate() {
            vst1q_s32(vals.as_mut_ptr().add(4 * v), x);
        }
        store_row(t, i, &vals);
    }
}

/// # Safety
/// NEON; `t` as documented on [`Tile`], B panel with 8 columns per group of 8.
#[target_feature(enable = "neon")]
pub unsafe fn smull_tile<const SIGNED_A: bool>(t: &Tile) {
    const MR: usize = 2;
    const NR: usize = 8;
    let mut acc = [[vdupq_n_s32(0); NR]; MR];
    let mut rows = [t.a; MR];
    for (i, r) in rows.iter_mut().enumerate() {
        *r = t.a.add(i.min(t.rows - 1) * t.lda);
    }
    let flip = vdup_n_u8(if SIGNED_A { 0 } else { 0x80 });
    let mut b = t.b;
    let total = t.groups + (t.tail > 0) as usize;
    for g in 0..total {
        let n = if g < t.groups { 8 } else { t.tail };
        let mut av = [vdup_n_s8(0); MR];
        for (i, x) in av.iter_mut().enumerate() {
            let w = read_n::<8>(rows[i].add(8 * g), n);
            *x = vreinterpret_s8_u8(veor_u8(vld1_u8(w.as_ptr()), flip));
        }
        for j in 0..NR {
            let bj = vld1_s8(b.add(8 * j) as *const i8);
            for i in 0..MR {
                acc[i][j] = vpadalq_s16(acc[i][j], vmull_s8(av[i], bj));
            }
        }
        b = b.add(8 * NR);
    }
    for (i, row) in acc.iter().enumerate().take(t.rows) {
        let mut vals = [0i32; NR];
        for (j, &x) in row.iter().enumerate() {
            vals[j] = vaddvq_s32(x);
        }
        store_row(t, i, &vals);
    }
}
