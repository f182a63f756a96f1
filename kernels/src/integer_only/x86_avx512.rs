//! AVX-512 (F + BW + VL) paths of [`super::scalar`], name for name. 16 i32 lanes; masked tails.

use std::arch::x86_64::*;

use super::{ChannelMultipliers, Multiplier, RequantOutput};
use crate::code::Code;
use crate::linear::x86_avx512::{lanes_mask, store16, store64};

pub(crate) struct Out {
    lo: __m512i,
    hi: __m512i,
    zp: __m512i,
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn out_consts(o: &RequantOutput) -> Out {
    Out {
        lo: _mm512_set1_epi32(o.act_min - o.zero_point),
        hi: _mm512_set1_epi32(o.act_max - o.zero_point),
        zp: _mm512_set1_epi32(o.zero_point),
    }
}

/// `clamp(multiply_by_quantized_multiplier(x) + zp, act_min, act_max)` for 16 lanes with
/// per-lane multiplier `m` (>= 0), left shift `l` and right shift `r`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn requant16<const LEFT: bool>(
    x: __m512i,
    m: __m512i,
    l: __m512i,
    r: __m512i,
    o: &Out,
) -> __m512i {
    let x = if LEFT {
        let over = _mm512_cmpgt_epi32_mask(x, _mm512_srav_epi32(_mm512_set1_epi32(i32::MAX), l));
        let under = _mm512_cmpgt_epi32_mask(_mm512_srav_epi32(_mm512_set1_epi32(i32::MIN), l), x);
        let s = _mm512_sllv_epi32(x, l);
        let s = _mm512_mask_mov_epi32(s, over, _mm512_set1_epi32(i32::MAX));
        _mm512_mask_mov_epi32(s, under, _mm512_set1_epi32(i32::MIN))
    } else {
        x
    };
    // SRDHM = bits 31..62 of (x*m + 2^30); m >= 0 rules out the i32::MIN * i32::MIN case
    let nudge = _mm512_set1_epi64(1 << 30);
    let even = _mm512_srli_epi64::<31>(_mm512_add_epi64(_mm512_mul_epi32(x, m), nudge));
    let odd_p = _mm512_mul_epi32(_mm512_srli_epi64::<32>(x), _mm512_srli_epi64::<32>(m));
    let odd = _mm512_slli_epi64::<1>(_mm512_add_epi64(odd_p, nudge));
    let h = _mm512_mask_blend_epi32(0xAAAA, even, odd);
    // rounding divide by 2^r, ties away from zero
    let one = _mm512_set1_epi32(1);
    let mask = _mm512_sub_epi32(_mm512_sllv_epi32(one, r), one);
    let rem = _mm512_and_si512(h, mask);
    let half = _mm512_srli_epi32::<1>(mask);
    let neg = _mm512_cmplt_epi32_mask(h, _mm512_setzero_si512());
    let thr = _mm512_mask_add_epi32(half, neg, half, one);
    let q = _mm512_srav_epi32(h, r);
    let q = _mm512_mask_add_epi32(q, _mm512_cmpgt_epi32_mask(rem, thr), q, one);
    _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, o.lo), o.hi), o.zp)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn requantize_impl<T: Code, const LEFT: bool>(
    acc: &[i32],
    m: Multiplier,
    o: &RequantOutput,
    out: &mut [T],
) {
    let oc = out_consts(o);
    let mv = _mm512_set1_epi32(m.multiplier);
    let l = _mm512_set1_epi32(m.shift.max(0));
    let r = _mm512_set1_epi32((-m.shift).max(0));
    let n = acc.len();
    let (src, dst) = (acc.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 64 <= n {
        let a = requant16::<LEFT>(_mm512_loadu_si512(src.add(i) as *const _), mv, l, r, &oc);
        let b = requant16::<LEFT>(
            _mm512_loadu_si512(src.add(i + 16) as *const _),
            mv,
            l,
            r,
            &oc,
        );
        let c = requant16::<LEFT>(
            _mm512_loadu_si512(src.add(i + 32) as *const _),
            mv,
            l,
            r,
            &oc,
        );
        let d = requant16::<LEFT>(
            _mm512_loadu_si512(src.add(i + 48) as *const _),
            mv,
            l,
            r,
            &oc,
        );
        store64(dst.add(i), a, b, c, d);
        i += 64;
    }
    while i < n {
        let k = lanes_mask(n - i);
        let v = _mm512_maskz_loadu_epi32(k, src.add(i));
        store16(dst.add(i), requant16::<LEFT>(v, mv, l, r, &oc), k);
        i += 16;
    }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL; `out.len() == acc.len()`; `m` validated.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn requantize<T: Code>(acc: &[i32], m: Multiplier, o: &RequantOutput, out: &mut [T]) {
    if m.shift > 0 {
        requantize_impl::<T, true>(acc, m, o, out)
    } else {
        requantize_impl::<T, false>(acc, m, o, out)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn per_channel_impl<T: Code, const LEFT: bool>(
    acc: &[i32],
    m: &ChannelMultipliers,
    o: &RequantOutput,
    out: &mut [T],
) {
    let oc = out_consts(o);
    let channels = m.len();
    let (mp, lp, rp) = (m.multiplier.as_ptr(), m.left.as_ptr(), m.right.as_ptr());
    for row in 0..acc.len() / channels {
        let src = acc.as_ptr().add(row * channels);
        let dst = out.as_mut_ptr().add(row * channels);
        let mut j = 0;
        while j < channels {
            let k = lanes_mask(channels - j);
            let mv = _mm512_maskz_loadu_epi32(k, mp.add(j));
            let l = _mm512_maskz_loadu_epi32(k, lp.add(j));
            let r = _mm512_maskz_loadu_epi32(k, rp.add(j));
            let v = _mm512_maskz_loadu_epi32(k, src.add(j));
            store16(dst.add(j), requant16::<LEFT>(v, mv, l, r, &oc), k);
            j += 16;
        }
    }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VL; `acc.len() == out.len()`, a multiple of `m.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn requantize_per_channel<T: Code>(
    acc: &[i32],
    m: &ChannelMultipliers,
    o: &RequantOutput,
    out: &mut [T],
) {
    if m.any_left_shift() {
        per_channel_impl::<T, true>(acc, m, o, out)
    } else {
        per_channel_impl::<T, false>(acc, m, o, out)
    }
}

/// 16 codes of `T` at `p` (masked) widened to i32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load16_codes<T: Code>(p: *const T, k: __mmask16) -> __m512i {
    use crate::code::CodeKind;
    match T::KIND {
        CodeKind::U8 => _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, p as *const i8)),
        CodeKind::I8 => _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, p as *const i8)),
        CodeKind::U16 => _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p as *const i16)),
        CodeKind::I16 => _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k, p as *const i16)),
    }
}

/// The quantized addition of [`super::add`], 16 lanes at a time, bit-identical to its scalar
/// spec. Needs right-shift-only multipliers (every multiplier below 1, the normal case);
/// returns `false` without touching `out` otherwise.
///
/// # Safety
/// AVX-512 F/BW/VL; equal lengths (checked by the caller).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn add_requantize<T: Code>(
    a: &[T],
    b: &[T],
    p: &super::add::AddParams,
    out: &mut [T],
) -> bool {
    let ms = [p.a_multiplier, p.b_multiplier, p.out_multiplier];
    if ms.iter().any(|m| m.shift > 0) {
        return false;
    }
    let oc = out_consts(&p.output);
    let a_in = AddInput::new(p.a_zero_point, p.a_multiplier);
    let b_in = AddInput::new(p.b_zero_point, p.b_multiplier);
    let (mo, lo, ro) = (
        _mm512_set1_epi32(p.out_multiplier.multiplier),
        _mm512_setzero_si512(),
        _mm512_set1_epi32(-p.out_multiplier.shift),
    );
    let n = a.len();
    let mut i = 0;
    while i < n {
        let k = lanes_mask(n - i);
        let x = a_in.scale(load16_codes(a.as_ptr().add(i), k));
        let y = b_in.scale(load16_codes(b.as_ptr().add(i), k));
        let s = requant16::<false>(_mm512_add_epi32(x, y), mo, lo, ro, &oc);
        store16(out.as_mut_ptr().add(i), s, k);
        i += 16;
    }
    true
}

/// One input of [`add_requantize`]: `mbqm((code - z) << 20, m)` with a right-shift
/// multiplier, in 32-bit lanes. With `x = code - z`, `|x| <= 255` (codes and zero points are
/// codes of one 8-bit type), the doubling high multiply of `x << 20` by `M` is
/// `floor((x * M + 2^10) / 2^11)` (gemmlowp's nudge and truncation amount to flooring
/// `x * M * 2^20 + 2^30` over `2^31`), which splits exactly into
/// `x * (M >> 11) + ((x * (M & 2047) + 2^10) >> 11)`: both products fit i32. The result
/// `h` is below `2^28` in magnitude, so the rounding divide by `2^r` (ties away from zero)
/// is `(h + 2^(r-1) - [h < 0]) >> r` for `r >= 1` without overflow. Tested bit-exact
/// against the spec on every pair of codes.
struct AddInput {
    z: __m512i,
    hi: __m512i,
    lo: __m512i,
    round: __m512i,
    neg: __m512i,
    shift: __m128i,
}

impl AddInput {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn new(z: i32, m: Multiplier) -> AddInput {
        let r = -m.shift;
        debug_assert!((0..=31).contains(&r));
        AddInput {
            z: _mm512_set1_epi32(z),
            hi: _mm512_set1_epi32(m.multiplier >> 11),
            lo: _mm512_set1_epi32(m.multiplier & 2047),
            round: _mm512_set1_epi32(if r >= 1 { 1 << (r - 1) } else { 0 }),
            neg: _mm512_set1_epi32(if r >= 1 { -1 } else { 0 }),
            shift: _mm_cvtsi32_si128(r),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn scale(&self, codes: __m512i) -> __m512i {
        let x = _mm512_sub_epi32(codes, self.z);
        let low = _mm512_add_epi32(_mm512_mullo_epi32(x, self.lo), _mm512_set1_epi32(1 << 10));
        let h = _mm512_add_epi32(_mm512_mullo_epi32(x, self.hi), _mm512_srai_epi32::<11>(low));
        let sign = _mm512_and_si512(_mm512_srai_epi32::<31>(h), self.neg);
        let t = _mm512_add_epi32(_mm512_add_epi32(h, self.round), sign);
        _mm512_sra_epi32(t, self.shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integer_only::scalar::multiply_by_quantized_multiplier;

    /// [`AddInput::scale`] against the spec on every code difference (-255..=255), every
    /// right shift (0..=31) and multipliers at the edges of the split at bit 11, including
    /// `2^30 + 2^11`, whose products make ties of the rounding divide.
    #[test]
    fn the_add_input_stage_is_the_spec_on_every_code_difference() {
        if !(is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl"))
        {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let mut ms: Vec<i32> = vec![
            0,
            1,
            1023,
            1024,
            2047,
            2048,
            2049,
            1 << 30,
            (1 << 30) + 1,
            (1 << 30) + 2048,
            (1 << 30) + 3 * 2048,
            0x5555_5555,
            i32::MAX - 2047,
            i32::MAX,
        ];
        let mut seed = 0x9E37_79B9u32;
        for _ in 0..64 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            ms.push((seed >> 1) as i32);
        }
        let xs: Vec<i32> = (-255..=255).collect();
        let mut ties = 0;
        for r in 0..=31 {
            for &m in &ms {
                let mult = Multiplier::new(m, -r).unwrap();
                // SAFETY: AVX-512 F/BW/VL checked above.
                let input = unsafe { AddInput::new(0, mult) };
                for chunk in xs.chunks(16) {
                    let mut lanes = [0i32; 16];
                    lanes[..chunk.len()].copy_from_slice(chunk);
                    let mut got = [0i32; 16];
                    // SAFETY: as above; 16 lanes in, 16 out.
                    unsafe {
                        let v = input.scale(_mm512_loadu_si512(lanes.as_ptr() as *const _));
                        _mm512_storeu_si512(got.as_mut_ptr() as *mut _, v);
                    }
                    for (&x, &g) in chunk.iter().zip(&got) {
                        let h = multiply_by_quantized_multiplier(
                            x << 20,
                            Multiplier::new(m, 0).unwrap(),
                        );
                        let mask = ((1i64 << r) - 1) as i32;
                        if r >= 1 && x < 0 && h & mask == (mask >> 1) + 1 {
                            ties += 1;
                        }
                        let want = multiply_by_quantized_multiplier(x << 20, mult);
                        assert_eq!(g, want, "x {x}, multiplier {m}, shift -{r}");
                    }
                }
            }
        }
        assert!(ties > 100, "the cases include negative ties ({ties})");
    }
}
