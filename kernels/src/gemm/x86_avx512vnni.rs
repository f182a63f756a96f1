//! AVX-512 VNNI microkernel: `vpdpbusd` multiplies 4 unsigned bytes by 4 signed bytes and
//! adds the four products to an i32 lane, without saturation.
//!
//! Tile `MR x 16*NV`: per group of 4 k the kernel loads NV vectors of B (16 columns x 4
//! codes each), broadcasts 4 codes of each of the MR rows of A, and issues MR * NV
//! `vpdpbusd`. A is the unsigned operand and B the signed one; `i8` A is read as `a + 128`
//! (each broadcast `^ 0x80`) and the driver removes `128 * colsum(B)`, a constant per column,
//! so signed activations need no row sums of A.

use std::arch::x86_64::*;

use super::Tile;
use crate::code::Code;
use crate::integer_only::x86_avx512::{out_consts, requant16};
use crate::linear::x86_avx512::{lanes_mask, store16};

/// The first `n < 4` bytes at `p`, zero-extended, broadcast to every lane (a masked load:
/// the bytes past `n` are never read).
#[inline(always)]
unsafe fn broadcast_partial(p: *const u8, n: usize) -> __m512i {
    let v = _mm_maskz_loadu_epi8(((1u32 << n) - 1) as __mmask16, p as *const i8);
    _mm512_broadcastd_epi32(v)
}

/// Signed A codes as the unsigned operand: `a ^ 0x80 = a + 128` in every byte.
#[inline(always)]
unsafe fn flip<const SIGNED_A: bool>(av: __m512i) -> __m512i {
    if SIGNED_A {
        _mm512_xor_si512(av, _mm512_set1_epi8(0x80u8 as i8))
    } else {
        av
    }
}

/// The accumulators of one tile. A function of its own so that the accumulator array is
/// only ever indexed by constants and stays in registers (with the stores in the same
/// function LLVM kept a memory copy of all 24 accumulators, updated every iteration).
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn products<const MR: usize, const NV: usize, const SIGNED_A: bool>(
    t: &Tile,
    out: &mut [[__m512i; NV]; MR],
) {
    let mut acc = [[_mm512_setzero_si512(); NV]; MR];
    let mut rows = [t.a; MR];
    if t.row_offsets.is_null() {
        for (i, r) in rows.iter_mut().enumerate() {
            *r = t.a.add(i.min(t.rows - 1) * t.lda);
        }
    } else {
        // MR offsets are readable (padded past the last row): plain loads, no clamping
        // (with the clamped index LLVM gathered them)
        for (i, r) in rows.iter_mut().enumerate() {
            *r = t.a.add(*t.row_offsets.add(i));
        }
    }
    let mut b = t.b;
    // segmented rows (implicit im2col): `segs` runs of `per` groups; dense rows: one run
    let per = t.seg_groups;
    let mut g = 0;
    for seg in 0..t.segs {
        for w in 0..per {
            let mut bv = [_mm512_setzero_si512(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_load_si512(b.add(64 * v) as *const _);
            }
            for i in 0..MR {
                let p = rows[i].add(seg * t.seg_stride + 4 * w);
                let av = flip::<SIGNED_A>(_mm512_set1_epi32((p as *const i32).read_unaligned()));
                for v in 0..NV {
                    acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], av, bv[v]);
                }
            }
            b = b.add(64 * NV);
            g += 1;
        }
    }
    debug_assert_eq!(g, t.groups);
    if t.tail > 0 {
        let off = 4 * t.groups;
        let mut bv = [_mm512_setzero_si512(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm512_load_si512(b.add(64 * v) as *const _);
        }
        for i in 0..MR {
            // the bytes past the tail become 0x80 when flipped, against B's zero padding
            let av = flip::<SIGNED_A>(broadcast_partial(rows[i].add(off), t.tail));
            for v in 0..NV {
                acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], av, bv[v]);
            }
        }
    }
    // one store at the end: returning the array by value let LLVM update the caller's
    // slot inside the loop (a store per `vpdpbusd`)
    *out = acc;
}

/// # Safety
/// AVX-512 F/BW/VL + VNNI; `t` as documented on [`Tile`], B panel 64-byte aligned with
/// `16 * NV` columns per group.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::needless_range_loop)] // constant indices keep `acc` in registers
pub unsafe fn tile<const MR: usize, const NV: usize, const SIGNED_A: bool>(t: &Tile) {
    // the C tile is read back at the end: start fetching it now
    for i in 0..MR.min(t.rows) {
        for v in 0..NV {
            _mm_prefetch::<_MM_HINT_T0>(t.c.add(i * t.ldc + 16 * v) as *const i8);
        }
    }
    let mut acc = [[_mm512_setzero_si512(); NV]; MR];
    products::<MR, NV, SIGNED_A>(t, &mut acc);
    // constant indices only (a loop over `acc` by reference would keep it in memory)
    for i in 0..MR {
        if i >= t.rows {
            continue;
        }
        let c = t.c.add(i * t.ldc);
        for v in 0..NV {
            let col = 16 * v;
            if col >= t.cols {
                continue;
            }
            let left = t.cols - col;
            let mask: __mmask16 = if left >= 16 {
                0xFFFF
            } else {
                (1u16 << left) - 1
            };
            let p = c.add(col);
            let mut x = acc[i][v];
            if t.accumulate {
                x = _mm512_add_epi32(x, _mm512_maskz_loadu_epi32(mask, p));
            }
            if t.last {
                let add = _mm512_add_epi32(
                    _mm512_maskz_loadu_epi32(mask, t.col_add.add(col)),
                    _mm512_set1_epi32(*t.row_add.add(i)),
                );
                x = _mm512_add_epi32(x, add);
            }
            _mm512_mask_storeu_epi32(p, mask, x);
        }
    }
}

/// The requantization of a tile in registers (the fused epilogue of `gemm_requantize` and
/// `conv_requantize` when the whole K fits one block): per-column multipliers from the tile's
/// first column on, and where the tile's codes go.
pub(crate) struct TileOutput<'a> {
    pub multiplier: *const i32,
    pub left: *const i32,
    pub right: *const i32,
    /// Any left shift among the tile's columns (selects the saturating-shift variant).
    pub any_left: bool,
    pub output: &'a crate::integer_only::RequantOutput,
    /// The tile's top-left output code and the row stride in codes.
    pub out: *mut u8,
    pub ldo: usize,
}

/// [`tile`] followed by the requantization epilogue in registers: the accumulators plus
/// the row and column terms go through the same 16-lane requantization as
/// `requantize_per_channel` and are stored as codes of `O`, with no i32 round trip through
/// memory. For one K block only (`t.accumulate == false`, `t.last == true`).
///
/// # Safety
/// As [`tile`]; `e` points at `t.cols` multipliers and shifts and at a `t.rows x t.cols`
/// block of `O` codes with row stride `e.ldo`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn tile_requant<const MR: usize, const NV: usize, const SIGNED_A: bool, O: Code>(
    t: &Tile,
    e: &TileOutput<'_>,
) {
    debug_assert!(!t.accumulate && t.last);
    let mut acc = [[_mm512_setzero_si512(); NV]; MR];
    products::<MR, NV, SIGNED_A>(t, &mut acc);
    if e.any_left {
        epilogue::<MR, NV, O, true>(t, e, &acc)
    } else {
        epilogue::<MR, NV, O, false>(t, e, &acc)
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::needless_range_loop)] // constant indices keep `acc` in registers
unsafe fn epilogue<const MR: usize, const NV: usize, O: Code, const LEFT: bool>(
    t: &Tile,
    e: &TileOutput<'_>,
    acc: &[[__m512i; NV]; MR],
) {
    let oc = out_consts(e.output);
    let out = e.out as *mut O;
    for v in 0..NV {
        let col = 16 * v;
        if col >= t.cols {
            break;
        }
        let mask = lanes_mask(t.cols - col);
        let m = _mm512_maskz_loadu_epi32(mask, e.multiplier.add(col));
        let l = _mm512_maskz_loadu_epi32(mask, e.left.add(col));
        let r = _mm512_maskz_loadu_epi32(mask, e.right.add(col));
        let cadd = _mm512_maskz_loadu_epi32(mask, t.col_add.add(col));
        for i in 0..MR {
            if i >= t.rows {
                break;
            }
            let x = _mm512_add_epi32(acc[i][v], cadd);
            let x = _mm512_add_epi32(x, _mm512_set1_epi32(*t.row_add.add(i)));
            let q = requant16::<LEFT>(x, m, l, r, &oc);
            store16(out.add(i * e.ldo + col), q, mask);
        }
    }
}

/// `iters` rounds of 24 independent `vpdpbusd` (the instruction's throughput bound, no
/// memory traffic); returns a value that depends on all of them.
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn peak_loop(iters: usize) -> i32 {
    let mut a = _mm512_set1_epi32(0x0101_0101);
    let mut b = _mm512_set1_epi32(0x0102_0304);
    let mut acc = [_mm512_setzero_si512(); 24];
    for _ in 0..iters {
        // opaque to the optimiser (no instruction): the loop cannot be folded away
        std::arch::asm!(
            "/* {0} {1} */",
            inout(zmm_reg) a,
            inout(zmm_reg) b,
            options(pure, nomem, nostack)
        );
        for x in acc.iter_mut() {
            *x = _mm512_dpbusd_epi32(*x, a, b);
        }
    }
    for i in 1..24 {
        acc[0] = _mm512_add_epi32(acc[0], acc[i]);
    }
    _mm512_reduce_add_epi32(acc[0])
}

/// Sum of each `k`-byte row of `a` (`rows` rows, contiguous), as i8 when `signed` else u8:
/// `vpsadbw` against zero adds 8 bytes per 64-bit lane (signed bytes are flipped to
/// unsigned by `^ 0x80` and `128 * k` is subtracted).
///
/// # Safety
/// AVX-512 F/BW; `a.len() >= rows * k`, `out.len() >= rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn row_sums(a: &[u8], rows: usize, k: usize, signed: bool, out: &mut [i32]) {
    let flip = _mm512_set1_epi8(if signed { 0x80u8 as i8 } else { 0 });
    for (r, o) in out.iter_mut().enumerate().take(rows) {
        let p = a.as_ptr().add(r * k);
        *o = segment_sum(p, k, flip) - if signed { 128 * k as i32 } else { 0 };
    }
}

/// Sum of `len` bytes at `p` after `^ flip`, as u8 values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn segment_sum(p: *const u8, len: usize, flip: __m512i) -> i32 {
    let zero = _mm512_setzero_si512();
    let mut acc = _mm512_setzero_si512();
    let mut i = 0;
    while i < len {
        let left = len - i;
        let mask: __mmask64 = if left >= 64 { !0 } else { (1u64 << left) - 1 };
        let v = _mm512_maskz_loadu_epi8(mask, p.add(i) as *const i8);
        // masked-off lanes must stay 0 after the flip
        let v = _mm512_maskz_mov_epi8(mask, _mm512_xor_si512(v, flip));
        acc = _mm512_add_epi64(acc, _mm512_sad_epu8(v, zero));
        i += 64;
    }
    _mm512_reduce_add_epi64(acc) as i32
}
