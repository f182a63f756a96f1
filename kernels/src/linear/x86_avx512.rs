//! AVX-512 (F + BW + VL) paths of [`super::scalar`], name for name. 16 f32 lanes; four
//! vectors per main-loop step; tails use masked loads and stores (no scalar epilogue).

use std::arch::x86_64::*;

use super::QuantParams;
use crate::code::{Code, CodeKind};
use crate::rng::{NoiseKey, M1, M2, M_COUNTER};

const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
/// Elements to prefetch ahead in streaming loops (measured: 1024 f32 = 4 KiB ahead was the
/// best of 512..4096 for quantize at 256K and 16M elements on a Cascade Lake VM).
const PREFETCH: usize = 1024;
/// From this many elements on (the whole tensor), quantize writes full-range 8-bit codes, and
/// dequantize its f32 values, with non-temporal stores. Measured on a Zen 4 EPYC (32 MiB L3): a tie at 4M elements, 10-35 %
/// faster from 8M on (24 vs 18 GB/s at 64M), because the stores no longer read the lines first.
pub(crate) const STREAM_MIN: usize = 1 << 23;
/// Output elements to prefetch-for-write ahead in dequantize (best of 128..1024, measured).
const DEQ_PREFETCH: usize = 128;
/// From this many elements on, dequantize runs the 256-bit loop (see `dequantize`).
const WIDE_DEQUANT_MAX: usize = 1 << 22;
const FLOOR: i32 = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;

struct Consts {
    inv: __m512,
    scale: __m512,
    limit: __m512,
    neg_limit: __m512,
    lo: __m512,
    hi: __m512,
    lo_i: __m512i,
    hi_i: __m512i,
    zp: __m512i,
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn consts(p: &QuantParams) -> Consts {
    Consts {
        inv: _mm512_set1_ps(p.inv_scale),
        scale: _mm512_set1_ps(p.scale),
        limit: _mm512_set1_ps(p.limit),
        neg_limit: _mm512_set1_ps(-p.limit),
        lo: _mm512_set1_ps((p.qmin - p.zero_point) as f32),
        hi: _mm512_set1_ps((p.qmax - p.zero_point) as f32),
        lo_i: _mm512_set1_epi32(p.qmin - p.zero_point),
        hi_i: _mm512_set1_epi32(p.qmax - p.zero_point),
        zp: _mm512_set1_epi32(p.zero_point),
    }
}

/// `fl32(x / scale)` for |x| <= limit (beyond it every code saturates, so inputs are first
/// clamped to +-limit); NaN lanes give 0. The reciprocal product gets one Markstein
/// correction, which makes it the correctly rounded quotient.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quotient(x: __m512, c: &Consts) -> __m512 {
    let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(x, x);
    let x = _mm512_min_ps(_mm512_maskz_max_ps(ordered, x, c.neg_limit), c.limit);
    let q0 = _mm512_mul_ps(x, c.inv);
    let residual = _mm512_fnmadd_ps(q0, c.scale, x);
    _mm512_fmadd_ps(residual, c.inv, q0)
}

/// `rne(x / scale)` as i32, not yet clamped to the code range (|value| <= 2^17): the same
/// value as `rne(quotient(x))` in two fewer operations. `vrangeps` (min of magnitudes, the
/// sign of x) clamps to +-limit in one step, and the conversion zeroes the NaN lanes under
/// the ordered mask (so the `maskz_max` is not needed).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn rounded(x: __m512, c: &Consts) -> __m512i {
    let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(x, x);
    // imm 0b0010: the smaller magnitude, with the sign of the first operand
    let x = _mm512_range_ps::<0b0010>(x, c.limit);
    let q0 = _mm512_mul_ps(x, c.inv);
    let residual = _mm512_fnmadd_ps(q0, c.scale, x);
    let q = _mm512_fmadd_ps(residual, c.inv, q0);
    _mm512_maskz_cvt_roundps_epi32::<RNE>(ordered, q)
}

/// `rne(clamp(x / scale, lo, hi))` without the zero point (the clamp done on integers, where
/// both ports take it; equal because the bounds are integers).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn round_clamped(x: __m512, c: &Consts) -> __m512i {
    _mm512_min_epi32(_mm512_max_epi32(rounded(x, c), c.lo_i), c.hi_i)
}

/// Stores 16 in-range i32 lanes as codes of type `T`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn store16<T: Code>(dst: *mut T, v: __m512i, k: __mmask16) {
    match T::KIND {
        CodeKind::I8 | CodeKind::U8 => _mm512_mask_cvtepi32_storeu_epi8(dst as *mut _, k, v),
        CodeKind::I16 | CodeKind::U16 => _mm512_mask_cvtepi32_storeu_epi16(dst as *mut _, k, v),
    }
}

/// Stores 64 in-range i32 lanes (four vectors, in order) as codes of type `T`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn store64<T: Code>(dst: *mut T, a: __m512i, b: __m512i, c: __m512i, d: __m512i) {
    match T::KIND {
        CodeKind::I8 | CodeKind::U8 => {
            // packs work inside 128-bit lanes: lane k holds dwords [A_k, B_k, C_k, D_k]
            let ab = _mm512_packs_epi32(a, b);
            let cd = _mm512_packs_epi32(c, d);
            let r = if T::KIND == CodeKind::I8 {
                _mm512_packs_epi16(ab, cd)
            } else {
                _mm512_packus_epi16(ab, cd)
            };
            let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            _mm512_storeu_si512(dst as *mut _, _mm512_permutexvar_epi32(idx, r));
        }
        CodeKind::I16 | CodeKind::U16 => {
            let idx = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
            let (ab, cd) = if T::KIND == CodeKind::I16 {
                (_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d))
            } else {
                (_mm512_packus_epi32(a, b), _mm512_packus_epi32(c, d))
            };
            let dst = dst as *mut __m512i;
            _mm512_storeu_si512(dst as *mut _, _mm512_permutexvar_epi64(idx, ab));
            _mm512_storeu_si512(dst.add(1) as *mut _, _mm512_permutexvar_epi64(idx, cd));
        }
    }
}

/// Loads 16 codes widened to i32 (unmasked).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load16_full<T: Code>(src: *const T) -> __m512i {
    match T::KIND {
        CodeKind::I8 => _mm512_cvtepi8_epi32(_mm_loadu_si128(src as *const __m128i)),
        CodeKind::U8 => _mm512_cvtepu8_epi32(_mm_loadu_si128(src as *const __m128i)),
        CodeKind::I16 => _mm512_cvtepi16_epi32(_mm256_loadu_si256(src as *const __m256i)),
        CodeKind::U16 => _mm512_cvtepu16_epi32(_mm256_loadu_si256(src as *const __m256i)),
    }
}

/// Loads 16 codes (lanes outside `k` read as 0) widened to i32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load16<T: Code>(src: *const T, k: __mmask16) -> __m512i {
    match T::KIND {
        CodeKind::I8 => _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, src as *const i8)),
        CodeKind::U8 => _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, src as *const i8)),
        CodeKind::I16 => _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k, src as *const i16)),
        CodeKind::U16 => _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, src as *const i16)),
    }
}

/// Mask of the next 16 lanes when `remaining` elements are left (all 16 if at least 16).
#[inline]
pub(crate) fn lanes_mask(remaining: usize) -> __mmask16 {
    if remaining >= 16 {
        0xFFFF
    } else {
        tail_mask(remaining)
    }
}

#[inline]
fn tail_mask(n: usize) -> __mmask16 {
    debug_assert!(n < 16);
    ((1u32 << n) - 1) as __mmask16
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn min_max(x: &[f32]) -> Option<(f32, f32)> {
    let inf = _mm512_set1_ps(f32::INFINITY);
    let mut lo = inf;
    let mut hi = _mm512_set1_ps(f32::NEG_INFINITY);
    let n = x.len();
    let p = x.as_ptr();
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_loadu_ps(p.add(i));
        let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(v), inf);
        lo = _mm512_mask_min_ps(lo, finite, lo, v);
        hi = _mm512_mask_max_ps(hi, finite, hi, v);
        i += 16;
    }
    if i < n {
        let k = tail_mask(n - i);
        let v = _mm512_maskz_loadu_ps(k, p.add(i));
        let finite = k & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(v), inf);
        lo = _mm512_mask_min_ps(lo, finite, lo, v);
        hi = _mm512_mask_max_ps(hi, finite, hi, v);
    }
    let (lo, hi) = (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
    (lo <= hi).then_some((lo, hi))
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL; `out.len() == x.len()`; `p` fits `T`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub unsafe fn quantize<T: Code>(x: &[f32], p: &QuantParams, out: &mut [T]) {
    quantize_streaming(x, p, out, x.len() >= STREAM_MIN)
}

/// [`quantize`] with the store kind chosen by the caller: `stream` writes full-range 8-bit
/// codes with non-temporal stores (per-channel calls decide on the whole tensor's size).
///
/// # Safety
/// As [`quantize`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub unsafe fn quantize_streaming<T: Code>(x: &[f32], p: &QuantParams, out: &mut [T], stream: bool) {
    let c = consts(p);
    let n = x.len();
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    let full_8bit =
        matches!(T::KIND, CodeKind::I8 | CodeKind::U8) && p.qmin == T::MIN && p.qmax == T::MAX;
    if full_8bit {
        // The code range is the whole type: saturating packs clamp for free. i32 -> i16
        // saturates |v| <= 2^17 to +-32767, + zero point saturates in i16, -> i8/u8 saturates
        // to the type; each step preserves order and |zero point| <= 255, so the result is
        // clamp(v + zero_point, qmin, qmax).
        let zp16 = _mm512_set1_epi16(p.zero_point as i16);
        let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        if stream {
            // codes up to the first 64-byte boundary of `out`, so the loop's stores are aligned
            let head = dst.align_offset(64).min(n);
            while i < head {
                let k = lanes_mask(head - i);
                let v = _mm512_maskz_loadu_ps(k, src.add(i));
                store16(dst.add(i), _mm512_add_epi32(round_clamped(v, &c), c.zp), k);
                i += 16.min(head - i);
            }
        }
        while i + 64 <= n {
            let pf = src.wrapping_add(i + PREFETCH) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(pf);
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64));
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(128));
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(192));
            let a = rounded(_mm512_loadu_ps(src.add(i)), &c);
            let b = rounded(_mm512_loadu_ps(src.add(i + 16)), &c);
            let cc = rounded(_mm512_loadu_ps(src.add(i + 32)), &c);
            let d = rounded(_mm512_loadu_ps(src.add(i + 48)), &c);
            let ab = _mm512_adds_epi16(_mm512_packs_epi32(a, b), zp16);
            let cd = _mm512_adds_epi16(_mm512_packs_epi32(cc, d), zp16);
            let r = if T::KIND == CodeKind::I8 {
                _mm512_packs_epi16(ab, cd)
            } else {
                _mm512_packus_epi16(ab, cd)
            };
            let r = _mm512_permutexvar_epi32(idx, r);
            if stream {
                _mm512_stream_si512(dst.add(i) as *mut _, r);
            } else {
                _mm512_storeu_si512(dst.add(i) as *mut _, r);
            }
            i += 64;
        }
        if stream {
            _mm_sfence();
        }
    }
    while i + 64 <= n {
        let pf = src.wrapping_add(i + PREFETCH) as *const i8;
        _mm_prefetch::<_MM_HINT_T0>(pf);
        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64));
        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(128));
        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(192));
        let a = _mm512_add_epi32(round_clamped(_mm512_loadu_ps(src.add(i)), &c), c.zp);
        let b = _mm512_add_epi32(round_clamped(_mm512_loadu_ps(src.add(i + 16)), &c), c.zp);
        let cc = _mm512_add_epi32(round_clamped(_mm512_loadu_ps(src.add(i + 32)), &c), c.zp);
        let d = _mm512_add_epi32(round_clamped(_mm512_loadu_ps(src.add(i + 48)), &c), c.zp);
        store64(dst.add(i), a, b, cc, d);
        i += 64;
    }
    while i < n {
        let k = lanes_mask(n - i);
        let v = _mm512_maskz_loadu_ps(k, src.add(i));
        store16(dst.add(i), _mm512_add_epi32(round_clamped(v, &c), c.zp), k);
        i += 16;
    }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL; `out.len() == q.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn dequantize<T: Code>(q: &[T], p: &QuantParams, out: &mut [f32]) {
    if q.len() >= STREAM_MIN {
        // measured on a Zen 4 EPYC: 26-28 GB/s against 16-27 at 16M, 20-21 at 64M
        return dequantize_512::<T, true>(q, p, out);
    }
    if q.len() >= WIDE_DEQUANT_MAX {
        // Measured (cargo xtask compare quantize, Cascade Lake VM): from 16M elements on, the
        // 256-bit loop streams faster than the 512-bit one (7.8 vs 6.5 GB/s at 64M), which
        // costs the core its AVX-512 clock licence while memory sets the pace anyway.
        return super::x86_avx2::dequantize(q, p, out);
    }
    dequantize_512::<T, false>(q, p, out)
}

/// Per-channel dequantize; the loop (512-bit, 256-bit or streaming) is chosen on the whole
/// tensor's size.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL; lengths checked by the caller.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn dequantize_per_channel<T: Code>(
    q: &[T],
    layout: &super::ChannelLayout,
    params: &[QuantParams],
    out: &mut [f32],
) {
    if q.len() >= STREAM_MIN {
        super::for_each_run(layout, params, q, out, |q, p, o| unsafe {
            dequantize_512::<T, true>(q, p, o)
        });
    } else if q.len() >= WIDE_DEQUANT_MAX {
        super::x86_avx2::dequantize_per_channel(q, layout, params, out)
    } else {
        super::for_each_run(layout, params, q, out, |q, p, o| unsafe {
            dequantize_512::<T, false>(q, p, o)
        });
    }
}

/// The 512-bit dequantize loop. `STREAM` writes with non-temporal stores (from an aligned
/// start): the output's lines are not read first, which pays once the output is past the
/// last-level cache; otherwise the destination is prefetched for writing.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dequantize_512<T: Code, const STREAM: bool>(q: &[T], p: &QuantParams, out: &mut [f32]) {
    let c = consts(p);
    let n = q.len();
    let (src, dst) = (q.as_ptr(), out.as_mut_ptr());
    let deq = |v: __m512i| _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(v, c.zp)), c.scale);
    let mut i = 0;
    if STREAM {
        // up to the first 64-byte boundary of `out` (at most 15 values: `out` holds f32)
        i = dst.align_offset(64).min(n);
        debug_assert!(i < 16);
        if i > 0 {
            let k = lanes_mask(i);
            _mm512_mask_storeu_ps(dst, k, deq(load16(src, k)));
        }
    }
    while i + 32 <= n {
        let (a, b) = (
            deq(load16_full(src.add(i))),
            deq(load16_full(src.add(i + 16))),
        );
        if STREAM {
            _mm512_stream_ps(dst.add(i), a);
            _mm512_stream_ps(dst.add(i + 16), b);
        } else {
            // prefetchw: fetch the destination lines ahead in exclusive state, so the stores
            // do not wait for their read-for-ownership (measured +30 % at 256K elements)
            let pw = dst.wrapping_add(i + DEQ_PREFETCH) as *const i8;
            _mm_prefetch::<_MM_HINT_ET0>(pw);
            _mm_prefetch::<_MM_HINT_ET0>(pw.wrapping_add(64));
            _mm512_storeu_ps(dst.add(i), a);
            _mm512_storeu_ps(dst.add(i + 16), b);
        }
        i += 32;
    }
    if STREAM {
        _mm_sfence();
    }
    while i < n {
        let k = lanes_mask(n - i);
        _mm512_mask_storeu_ps(dst.add(i), k, deq(load16(src.add(i), k)));
        i += 16;
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn fake_quantize_raw(src: *const f32, dst: *mut f32, n: usize, p: &QuantParams) {
    let c = consts(p);
    let mut i = 0;
    while i + 32 <= n {
        let pf = src.wrapping_add(i + PREFETCH) as *const i8;
        _mm_prefetch::<_MM_HINT_T0>(pf);
        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64));
        let a = round_clamped(_mm512_loadu_ps(src.add(i)), &c);
        let b = round_clamped(_mm512_loadu_ps(src.add(i + 16)), &c);
        _mm512_storeu_ps(dst.add(i), _mm512_mul_ps(_mm512_cvtepi32_ps(a), c.scale));
        _mm512_storeu_ps(
            dst.add(i + 16),
            _mm512_mul_ps(_mm512_cvtepi32_ps(b), c.scale),
        );
        i += 32;
    }
    while i < n {
        let k = lanes_mask(n - i);
        let v = round_clamped(_mm512_maskz_loadu_ps(k, src.add(i)), &c);
        _mm512_mask_storeu_ps(dst.add(i), k, _mm512_mul_ps(_mm512_cvtepi32_ps(v), c.scale));
        i += 16;
    }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL; `out.len() == x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub unsafe fn fake_quantize(x: &[f32], p: &QuantParams, out: &mut [f32]) {
    fake_quantize_raw(x.as_ptr(), out.as_mut_ptr(), x.len(), p)
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub unsafe fn fake_quantize_in_place(x: &mut [f32], p: &QuantParams) {
    fake_quantize_raw(x.as_ptr(), x.as_mut_ptr(), x.len(), p)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn mix(mut x: __m512i) -> __m512i {
    x = _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(M1 as i32));
    x = _mm512_xor_si512(x, _mm512_srli_epi32::<15>(x));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(M2 as i32));
    _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x))
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL; `out.len() == x.len()`; `p` fits `T`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn quantize_stochastic<T: Code>(
    x: &[f32],
    p: &QuantParams,
    key: NoiseKey,
    offset: u32,
    out: &mut [T],
) {
    let c = consts(p);
    let hi_i = _mm512_set1_epi32(p.qmax - p.zero_point);
    let (k0, k1) = (
        _mm512_set1_epi32(key.k0 as i32),
        _mm512_set1_epi32(key.k1 as i32),
    );
    let mult = _mm512_set1_epi32(M_COUNTER as i32);
    let unit = _mm512_set1_ps(1.0 / 16_777_216.0);
    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let n = x.len();
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i < n {
        let k = lanes_mask(n - i);
        let counter = _mm512_add_epi32(
            _mm512_set1_epi32(offset.wrapping_add(i as u32) as i32),
            iota,
        );
        let h = mix(_mm512_xor_si512(
            mix(_mm512_xor_si512(_mm512_mullo_epi32(counter, mult), k0)),
            k1,
        ));
        let u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32::<8>(h)), unit);
        let v = quotient(_mm512_maskz_loadu_ps(k, src.add(i)), &c);
        let v = _mm512_min_ps(_mm512_max_ps(v, c.lo), c.hi);
        let q = _mm512_min_epi32(_mm512_cvt_roundps_epi32::<FLOOR>(_mm512_add_ps(v, u)), hi_i);
        store16(dst.add(i), _mm512_add_epi32(q, c.zp), k);
        i += 16;
    }
}
