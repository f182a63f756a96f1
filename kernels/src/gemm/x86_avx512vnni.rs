//! AVX-512 VNNI microkernel: `vpdpbusd` multiplies 4 unsigned bytes by 4 signed bytes and
//! adds the four products to an i32 lane, without saturation.
//!
//! Tile `MR x 16*NV`: per group of 4 k the kernel loads NV vectors of B (16 columns x 4
//! codes each), broadcasts 4 codes of each of the MR rows of A, and issues MR * NV
//! `vpdpbusd`, with A as the unsigned operand (flipped for `i8` A, see [`PLAIN`] and
//! [`FLIP_A`]). When the tile's `row_coef` is not 0 the kernel also sums its A
//! rows (one `vpdpbusd` against ones per 64 bytes of a row) and subtracts
//! `row_coef * rowsum` from every column of the row: the row-sum term of the zero-point
//! algebra without a pass over A of its own.

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

/// `u8` A is the unsigned operand (one `vpbroadcastd` from memory per broadcast: the
/// unsigned operand cannot be `vpdpbusd`'s memory operand), B (signed) as given.
pub const PLAIN: u8 = 0;
/// `i8` A is read as `a + 128` (each broadcast `^ 0x80`) as the unsigned operand and B is
/// the signed one; the driver removes `128 * colsum(B)`, a constant per column. The flip
/// and the broadcast are one `vpxord` with an embedded broadcast ([`flipped_broadcast`]).
pub const FLIP_A: u8 = 1;

/// The 4 codes at `p` broadcast to every lane, each `^ 0x80`, in one instruction: `vpxord`
/// with a `{1to16}` memory operand. Written with `asm!` because LLVM narrows the
/// intrinsics' xor-of-a-splat to an `xmm` load, `vpxord` and `vpbroadcastd` (three
/// instructions); at N = 16, one `vpdpbusd` per broadcast, that cost i8 x i8 30 % against
/// u8 x i8 (252 vs 359 GOPS on 65536 x 144 x 16), and the fused form 1-3 %.
///
/// # Safety
/// AVX-512 F; 4 bytes readable at `p` (any alignment).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn flipped_broadcast(p: *const u8, c80: __m512i) -> __m512i {
    let v: __m512i;
    std::arch::asm!(
        "vpxord {v}, {c}, dword ptr [{p}]{{1to16}}",
        v = lateout(zmm_reg) v,
        c = in(zmm_reg) c80,
        p = in(reg) p,
        options(pure, readonly, nostack, preserves_flags)
    );
    v
}

/// `row_coef * rowsum` of each of the tile's MR rows over this K block (lane i: row i), as i8 codes when
/// `signed` else u8 (wrapping, like every other term). Each row's bytes go through
/// `vpdpbusd` against ones, 64 at a time (16 partial sums per row), and one shuffle tree
/// reduces all rows together.
#[inline(always)]
unsafe fn row_terms<const MR: usize>(t: &Tile, rows: &[*const u8; MR], signed: bool) -> __m512i {
    let ones = _mm512_set1_epi8(1);
    let dot = |z: __m512i, v: __m512i| {
        if signed {
            _mm512_dpbusd_epi32(z, ones, v)
        } else {
            _mm512_dpbusd_epi32(z, v, ones)
        }
    };
    let per = 4 * t.seg_groups;
    // order is row i at lane 4 * (i % 4) + i / 4 of the tree's result
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let coef = _mm512_set1_epi32(t.row_coef);
    if t.segs == 1 && per + t.tail <= 32 {
        // short rows: two per vector (row 2p in the low half), which is the tree's first
        // level already
        let mask: __mmask32 = ((1u64 << (per + t.tail)) - 1) as __mmask32;
        let mut v = [_mm512_setzero_si512(); 8];
        for p in 0..MR.div_ceil(2) {
            let lo = _mm256_maskz_loadu_epi8(mask, rows[2 * p] as *const i8);
            let hi = if 2 * p + 1 < MR {
                _mm256_maskz_loadu_epi8(mask, rows[2 * p + 1] as *const i8)
            } else {
                _mm256_setzero_si256()
            };
            v[p] = dot(
                _mm512_setzero_si512(),
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi),
            );
        }
        let sums = _mm512_permutexvar_epi32(order, hsum_pairs(&v));
        return _mm512_mullo_epi32(sums, coef);
    }
    let mut z = [_mm512_setzero_si512(); 16];
    for seg in 0..t.segs {
        // dense rows are one run with the tail after it
        let len = per + if seg + 1 == t.segs { t.tail } else { 0 };
        let at = seg * t.seg_stride;
        let full = len / 64;
        for c in 0..full {
            for i in 0..MR {
                let v = _mm512_loadu_si512(rows[i].add(at + 64 * c) as *const _);
                z[i] = dot(z[i], v);
            }
        }
        let rem = len % 64;
        if rem > 0 {
            let mask: __mmask64 = (1u64 << rem) - 1;
            for i in 0..MR {
                let v = _mm512_maskz_loadu_epi8(mask, rows[i].add(at + 64 * full) as *const i8);
                z[i] = dot(z[i], v);
            }
        }
    }
    let sums = _mm512_permutexvar_epi32(order, hsum16(&z));
    _mm512_mullo_epi32(sums, coef)
}

/// The lane sums of 16 vectors in one vector: lane `4 * (i % 4) + i / 4` holds the sum of
/// `z[i]`. Four levels of shuffles and adds (vectors past a tile's MR rows are zero and
/// fold away).
#[inline(always)]
unsafe fn hsum16(z: &[__m512i; 16]) -> __m512i {
    // 16 -> 8: 128-bit lanes 0-1 hold z[2p]'s partials, lanes 2-3 z[2p+1]'s
    let mut v = [_mm512_setzero_si512(); 8];
    for p in 0..8 {
        let (a, b) = (z[2 * p], z[2 * p + 1]);
        v[p] = _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0x44>(a, b),
            _mm512_shuffle_i32x4::<0xEE>(a, b),
        );
    }
    hsum_pairs(&v)
}

/// The rest of [`hsum16`] from its first level: `v[p]`'s 128-bit lanes 0-1 hold partial sums
/// of row 2p, lanes 2-3 of row 2p + 1.
#[inline(always)]
unsafe fn hsum_pairs(v: &[__m512i; 8]) -> __m512i {
    // 8 -> 4: 128-bit lane l of w[q] holds row 4q + l's 4 partials
    let mut w = [_mm512_setzero_si512(); 4];
    for q in 0..4 {
        let (a, b) = (v[2 * q], v[2 * q + 1]);
        w[q] = _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0x88>(a, b),
            _mm512_shuffle_i32x4::<0xDD>(a, b),
        );
    }
    // 4 -> 2: in lane l, dwords 0-1 are row 8r + l's partials, dwords 2-3 row 8r + 4 + l's
    let mut s = [_mm512_setzero_si512(); 2];
    for r in 0..2 {
        let (a, b) = (w[2 * r], w[2 * r + 1]);
        s[r] = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
    }
    // 2 -> 1: lane l is rows l, 4 + l, 8 + l, 12 + l
    let (a, b) = (_mm512_castsi512_ps(s[0]), _mm512_castsi512_ps(s[1]));
    _mm512_add_epi32(
        _mm512_castps_si512(_mm512_shuffle_ps::<0x88>(a, b)),
        _mm512_castps_si512(_mm512_shuffle_ps::<0xDD>(a, b)),
    )
}

/// The accumulators of one tile. A function of its own so that the accumulator array is
/// only ever indexed by constants and stays in registers (with the stores in the same
/// function LLVM kept a memory copy of all 24 accumulators, updated every iteration).
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn products<const MR: usize, const NV: usize, const MODE: u8>(
    t: &Tile,
    out: &mut [[__m512i; NV]; MR],
    row_sub: &mut __m512i,
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
    if t.row_coef != 0 {
        *row_sub = row_terms::<MR>(t, &rows, MODE != PLAIN);
    }
    let mut b = t.b;
    let c80 = _mm512_set1_epi8(0x80u8 as i8);
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
                let av = if MODE == FLIP_A {
                    flipped_broadcast(p, c80)
                } else {
                    _mm512_set1_epi32((p as *const i32).read_unaligned())
                };
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
            // the bytes past the tail are 0 (0x80 when flipped), against B's zero padding
            let mut av = broadcast_partial(rows[i].add(off), t.tail);
            if MODE == FLIP_A {
                av = _mm512_xor_si512(av, c80);
            }
            for v in 0..NV {
                acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], av, bv[v]);
            }
        }
    }
    // one store at the end: returning the array by value let LLVM update the caller's
    // slot inside the loop (a store per `vpdpbusd`)
    *out = acc;
}

/// Each row's term to add (lane i: row i): minus the row-sum term of this K block, plus the
/// driver's row term when `last`. Read back one lane per row as a broadcast.
#[inline(always)]
unsafe fn row_adds(t: &Tile, row_sub: __m512i, last: bool) -> [i32; 16] {
    let driver = if last {
        _mm512_maskz_loadu_epi32(lanes_mask(t.rows.min(16)), t.row_add)
    } else {
        _mm512_setzero_si512()
    };
    let mut out = [0i32; 16];
    _mm512_storeu_si512(
        out.as_mut_ptr() as *mut _,
        _mm512_sub_epi32(driver, row_sub),
    );
    out
}

/// # Safety
/// AVX-512 F/BW/VL + VNNI; `t` as documented on [`Tile`], B panel 64-byte aligned with
/// `16 * NV` columns per group.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::needless_range_loop)] // constant indices keep `acc` in registers
pub unsafe fn tile<const MR: usize, const NV: usize, const MODE: u8>(t: &Tile) {
    // the C tile is read back at the end: start fetching it now
    for i in 0..MR.min(t.rows) {
        for v in 0..NV {
            _mm_prefetch::<_MM_HINT_T0>(t.c.add(i * t.ldc + 16 * v) as *const i8);
        }
    }
    let mut acc = [[_mm512_setzero_si512(); NV]; MR];
    let mut row_sub = _mm512_setzero_si512();
    products::<MR, NV, MODE>(t, &mut acc, &mut row_sub);
    let radd = row_adds(t, row_sub, t.last);
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
                    _mm512_set1_epi32(radd[i]),
                );
                x = _mm512_add_epi32(x, add);
            } else if t.row_coef != 0 {
                x = _mm512_add_epi32(x, _mm512_set1_epi32(radd[i]));
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
pub unsafe fn tile_requant<const MR: usize, const NV: usize, const MODE: u8, O: Code>(
    t: &Tile,
    e: &TileOutput<'_>,
) {
    debug_assert!(!t.accumulate && t.last);
    let mut acc = [[_mm512_setzero_si512(); NV]; MR];
    let mut row_sub = _mm512_setzero_si512();
    products::<MR, NV, MODE>(t, &mut acc, &mut row_sub);
    let radd = row_adds(t, row_sub, true);
    if e.any_left {
        epilogue::<MR, NV, O, true>(t, e, &acc, &radd)
    } else {
        epilogue::<MR, NV, O, false>(t, e, &acc, &radd)
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::needless_range_loop)] // constant indices keep `acc` in registers
unsafe fn epilogue<const MR: usize, const NV: usize, O: Code, const LEFT: bool>(
    t: &Tile,
    e: &TileOutput<'_>,
    acc: &[[__m512i; NV]; MR],
    radd: &[i32; 16],
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
            let x = _mm512_add_epi32(x, _mm512_set1_epi32(radd[i]));
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
