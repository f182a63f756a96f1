//! AVX2 microkernel: codes widened to i16 and multiplied with `vpmaddwd` (two products
//! summed into each i32 lane, exact for every input; see the module docs for why not
//! `vpmaddubsw`). A is packed by the driver into rows of u32 values (pairs of codes
//! widened to i16), B into `[k pair][8 * NV columns][2]` i16.

use std::arch::x86_64::*;

use super::Tile;

/// # Safety
/// AVX2; `t` as documented on [`Tile`] with `t.a` the first of MR packed A rows (`t.lda`
/// bytes apart; the rows past `t.rows` are zero padding).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile<const MR: usize, const NV: usize>(t: &Tile) {
    let mut acc = [[_mm256_setzero_si256(); NV]; MR];
    let mut rows = [t.a as *const i32; MR];
    for (i, r) in rows.iter_mut().enumerate() {
        *r = t.a.add(i * t.lda) as *const i32;
    }
    let mut b = t.b;
    for g in 0..t.groups {
        let mut bv = [_mm256_setzero_si256(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm256_loadu_si256(b.add(32 * v) as *const __m256i);
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let av = _mm256_set1_epi32(rows[i].add(g).read());
            for (v, x) in row.iter_mut().enumerate() {
                *x = _mm256_add_epi32(*x, _mm256_madd_epi16(av, bv[v]));
            }
        }
        b = b.add(32 * NV);
    }
    for (i, row) in acc.iter().enumerate().take(t.rows) {
        let c = t.c.add(i * t.ldc);
        for (v, &x) in row.iter().enumerate() {
            let col = 8 * v;
            if col >= t.cols {
                break;
            }
            let p = c.add(col);
            let left = t.cols - col;
            let ra = *t.row_add.add(i);
            if left >= 8 {
                let mut x = if t.accumulate {
                    _mm256_add_epi32(x, _mm256_loadu_si256(p as *const __m256i))
                } else {
                    x
                };
                if t.last {
                    let ca = _mm256_loadu_si256(t.col_add.add(col) as *const __m256i);
                    x = _mm256_add_epi32(x, _mm256_add_epi32(ca, _mm256_set1_epi32(ra)));
                }
                _mm256_storeu_si256(p as *mut __m256i, x);
            } else {
                let mut lanes = [0i32; 8];
                _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, x);
                for (l, &val) in lanes.iter().enumerate().take(left) {
                    let d = p.add(l);
                    let mut v = if t.accumulate {
                        (*d).wrapping_add(val)
                    } else {
                        val
                    };
                    if t.last {
                        v = v.wrapping_add(ra).wrapping_add(*t.col_add.add(col + l));
                    }
                    *d = v;
                }
            }
        }
    }
}

/// [`super::pack_a_pairs`] (the reference) with the widening done 16 codes at a time: each
/// row's 16 bytes become 8 i16 pairs in one `vpmovsxbw` / `vpmovzxbw` and one store.
/// `dst` must hold `ceil(mc / mr) * mr * kp / 2` values; every one is written (rows past
/// `mc` and codes past `k` as zero), so it needs no clearing first.
///
/// # Safety
/// AVX2; `a` holds at least `mc * k` codes.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn pack_a_pairs(
    a: &[u8],
    mc: usize,
    k: usize,
    kp: usize,
    mr: usize,
    signed: bool,
    dst: &mut [u32],
) {
    let pairs = kp / 2;
    let rows = mc.div_ceil(mr) * mr;
    debug_assert!(a.len() >= mc * k && dst.len() == rows * pairs);
    let widen = |v: u8| -> u32 {
        if signed {
            (v as i8 as i16 as u16) as u32
        } else {
            v as u32
        }
    };
    let chunks = k / 16;
    for i in 0..rows {
        let out = dst.as_mut_ptr().add(i * pairs);
        if i >= mc {
            std::ptr::write_bytes(out, 0, pairs);
            continue;
        }
        let row = a.as_ptr().add(i * k);
        for c in 0..chunks {
            let v = _mm_loadu_si128(row.add(16 * c) as *const __m128i);
            let w = if signed {
                _mm256_cvtepi8_epi16(v)
            } else {
                _mm256_cvtepu8_epi16(v)
            };
            _mm256_storeu_si256(out.add(8 * c) as *mut __m256i, w);
        }
        for p in 8 * chunks..pairs {
            let code = |kk: usize| if kk < k { widen(*row.add(kk)) } else { 0 };
            *out.add(p) = code(2 * p) | (code(2 * p + 1) << 16);
        }
    }
}

/// Independent accumulators in [`peak_loop`] (with its one multiplier, 15 of the 16 ymm
/// registers an AVX2 function may use).
pub const PEAK_CHAINS: usize = 14;

/// `iters` rounds of [`PEAK_CHAINS`] independent `vpmaddwd` on 256 bits (16 multiply-adds
/// each), the microkernel's multiplication, with no memory traffic; returns a value that
/// depends on all of them. Each chain multiplies its own previous result, so no two are the
/// same computation. The microkernel also adds each product into an accumulator (`vpaddd`),
/// which this loop leaves out: its rate is an upper bound. (Measured on a Zen 4: 234 GOPS
/// for this loop, 182 with the `vpaddd` of each step added.)
#[inline(never)]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn peak_loop(iters: usize) -> i32 {
    let mut b = _mm256_set1_epi32(0x0001_0003);
    let mut acc = [_mm256_set1_epi16(1); PEAK_CHAINS];
    for (i, x) in acc.iter_mut().enumerate() {
        *x = _mm256_add_epi16(*x, _mm256_set1_epi16(i as i16));
    }
    for _ in 0..iters {
        // opaque to the optimiser (no instruction): the loop cannot be folded away
        std::arch::asm!("/* {0} */", inout(ymm_reg) b, options(pure, nomem, nostack));
        for x in acc.iter_mut() {
            *x = _mm256_madd_epi16(*x, b);
        }
    }
    for i in 1..PEAK_CHAINS {
        acc[0] = _mm256_add_epi32(acc[0], acc[i]);
    }
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(acc[0]),
        _mm256_extracti128_si256::<1>(acc[0]),
    );
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0x4E>(s)))
}
