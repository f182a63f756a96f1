//! Integer-only requantization: TFLite reference semantics (a table of values computed by an
//! independent transliteration of TFLite's reference C++ into Python with unbounded integers),
//! then every ISA against the scalar reference, bit for bit.

mod common;

use common::{isas, lengths, Rng};
use quantbench_kernels::integer_only::scalar::{
    multiply_by_quantized_multiplier, rounding_divide_by_pot, saturating_rounding_doubling_high_mul,
};
use quantbench_kernels::integer_only::{
    quantize_multiplier, Activation, ChannelMultipliers, Multiplier, RequantOutput,
};
use quantbench_kernels::{Code, Kernels, QuantParams};

#[test]
fn srdhm_table() {
    let table: &[(i32, i32, i32)] = &[
        (1073741824, 1073741824, 536870912),
        (-1, 1073741824, 0),
        (1, 1073741824, 1),
        (-2147483648, -2147483648, 2147483647),
        (2147483647, 2147483647, 2147483646),
        (-3, 1073741824, -1),
        (3, 1073741824, 2),
        (-2147483648, 2147483647, -2147483647),
        (123456789, 1518500250, 87297133),
        (-123456789, 1518500250, -87297133),
        (0, 2147483647, 0),
        (-2147483648, 0, 0),
    ];
    for &(a, b, want) in table {
        assert_eq!(
            saturating_rounding_doubling_high_mul(a, b),
            want,
            "SRDHM({a}, {b})"
        );
    }
}

#[test]
fn rounding_divide_by_pot_table() {
    let table: &[(i32, i32, i32)] = &[
        (5, 1, 3),
        (-5, 1, -3),
        (-4, 1, -2),
        (7, 2, 2),
        (-7, 2, -2),
        (6, 2, 2),
        (-6, 2, -2),
        (2147483647, 31, 1),
        (-2147483648, 31, -1),
        (-2147483648, 1, -1073741824),
        (12345, 0, 12345),
        (-1, 31, 0),
        (1, 1, 1),
        (-1, 1, -1),
        (1048576, 21, 1),
        (-1048576, 21, -1),
        (1572864, 20, 2),
        (-1572864, 20, -2),
    ];
    for &(x, e, want) in table {
        assert_eq!(rounding_divide_by_pot(x, e), want, "RDBPOT({x}, {e})");
    }
}

#[test]
fn quantize_multiplier_table() {
    let table: &[(f64, i32, i32)] = &[
        (0.5, 1073741824, 0),
        (1.0, 1073741824, 1),
        (0.25, 1073741824, -1),
        (0.75, 1610612736, 0),
        (1.0 / 3.0, 1431655765, -1),
        (0.9999999999, 1073741824, 1), // rounds to 2^31: renormalised
        (1e-10, 0, 0),                 // below 2^-32: flushed to zero
        (4.656612873077393e-10, 1073741824, -30),
        (3e-10, 1383505806, -31),
        (0.0039215686, 1077952569, -7),
        (1.5, 1610612736, 1),
        (1234.5678, 1294538165, 11),
        (std::f64::consts::FRAC_1_SQRT_2, 1518500250, 0),
        (2.3283064365386963e-10, 1073741824, -31),
        (0.0, 0, 0),
    ];
    for &(real, m, s) in table {
        let got = quantize_multiplier(real).unwrap();
        assert_eq!(
            (got.multiplier, got.shift),
            (m, s),
            "QuantizeMultiplier({real})"
        );
        if m != 0 {
            assert!((got.to_f64() - real).abs() <= real * 2f64.powi(-30));
        }
    }
    for bad in [-1.0, f64::NAN, f64::INFINITY, 1073741824.0] {
        assert!(quantize_multiplier(bad).is_err(), "{bad}");
    }
    assert!(Multiplier::new(-5, 0).is_err());
    assert!(Multiplier::new(5, 31).is_err());
    assert!(Multiplier::new(5, -32).is_err());
}

#[test]
fn multiply_by_quantized_multiplier_table() {
    // (x, real multiplier, result); the 3.0 rows overflow a left shift: TFLite's C++ is
    // undefined there, ours saturates.
    let table: &[(i32, f64, i32)] = &[
        (1000, 0.5, 500),
        (-1001, 0.5, -500),
        (1002, 0.25, 251),
        (-1002, 0.25, -251),
        (2147483647, 0.5, 1073741824),
        (-2147483648, 0.5, -1073741824),
        (100000, 0.0039215686, 392),
        (-100000, 0.0039215686, -392),
        (12345, 1.5, 18518),
        (-12345, 1.5, -18517),
        (1073741824, 3.0, 1610612735),
        (-1073741824, 3.0, -1610612736),
        (7, 1e-10, 0),
        (5000000, 3e-10, 0),
        (2147483647, 4.656612873077393e-10, 1),
        (-2147483648, 4.656612873077393e-10, -1),
        (777, std::f64::consts::FRAC_1_SQRT_2, 549),
        (-777, std::f64::consts::FRAC_1_SQRT_2, -549),
        (3, 0.5, 2),
        (-3, 0.5, -1),
        (99999, 1234.5678, 123455545),
    ];
    for &(x, real, want) in table {
        let m = quantize_multiplier(real).unwrap();
        assert_eq!(
            multiply_by_quantized_multiplier(x, m),
            want,
            "MBQM({x}, {real})"
        );
        // and through the vector kernels of every ISA, in every lane position
        for isa in isas() {
            let k = Kernels::new(isa).unwrap();
            let acc = vec![x; 67];
            let mut out = vec![0i16; 67];
            let o = RequantOutput::new(0, i16::MIN as i32, i16::MAX as i32).unwrap();
            k.requantize(&acc, m, &o, &mut out).unwrap();
            let clamped = want.clamp(i16::MIN as i32, i16::MAX as i32);
            assert!(
                out.iter().all(|&v| v as i32 == clamped),
                "{isa}: MBQM({x}, {real})"
            );
        }
    }
}

fn random_multiplier(rng: &mut Rng) -> Multiplier {
    match rng.below(6) {
        0 => Multiplier::new(rng.range_i32(0, i32::MAX), rng.range_i32(-31, 30)).unwrap(),
        1 => Multiplier::new(i32::MAX, rng.range_i32(-31, 0)).unwrap(), // near 1.0
        2 => Multiplier::new(1 << 30, -31).unwrap(),                    // near 0
        _ => quantize_multiplier(rng.unit() as f64 * 2f64.powi(rng.range_i32(-20, 3))).unwrap(),
    }
}

fn random_acc(rng: &mut Rng, n: usize) -> Vec<i32> {
    (0..n)
        .map(|_| match rng.below(8) {
            0 => [i32::MIN, i32::MAX, 0, -1, 1, i32::MIN + 1][rng.below(6) as usize],
            1 => rng.next_u64() as i32,
            // exact ties of the right shift
            2 => (rng.range_i32(-1000, 1000) << 8) | 0x80,
            _ => rng.range_i32(-1 << 20, 1 << 20),
        })
        .collect()
}

fn check_parity<T: Code + PartialEq>(seed: u64, zp: i32) {
    let mut rng = Rng::new(seed);
    let scalar = Kernels::scalar();
    let outputs = [
        RequantOutput::new(zp, T::MIN, T::MAX).unwrap(),
        RequantOutput::new(zp, zp.max(T::MIN), T::MAX).unwrap(),
        RequantOutput::new(zp, (zp - 3).max(T::MIN), (zp + 40).min(T::MAX)).unwrap(),
    ];
    for isa in isas() {
        let k = Kernels::new(isa).unwrap();
        for (li, &n) in lengths().iter().enumerate() {
            let acc = random_acc(&mut rng, n);
            let m = random_multiplier(&mut rng);
            let o = &outputs[li % outputs.len()];
            let (mut want, mut got) = (vec![T::default(); n], vec![T::default(); n]);
            scalar.requantize(&acc, m, o, &mut want).unwrap();
            k.requantize(&acc, m, o, &mut got).unwrap();
            assert!(
                want == got,
                "requantize<{}> {isa} n={n} {m:?} {o:?}",
                T::NAME
            );
        }
        for channels in [1usize, 3, 7, 8, 15, 16, 17, 33, 64, 100] {
            let rows = 1 + rng.below(9) as usize;
            let acc = random_acc(&mut rng, rows * channels);
            let ms: Vec<Multiplier> = (0..channels).map(|_| random_multiplier(&mut rng)).collect();
            let cm = ChannelMultipliers::new(&ms);
            let o = &outputs[channels % outputs.len()];
            let (mut want, mut got) =
                (vec![T::default(); acc.len()], vec![T::default(); acc.len()]);
            scalar
                .requantize_per_channel(&acc, &cm, o, &mut want)
                .unwrap();
            k.requantize_per_channel(&acc, &cm, o, &mut got).unwrap();
            assert!(
                want == got,
                "requantize_per_channel<{}> {isa} {rows}x{channels}",
                T::NAME
            );
            for (i, &v) in want.iter().enumerate() {
                let m = ms[i % channels];
                let r = (multiply_by_quantized_multiplier(acc[i], m) as i64 + zp as i64)
                    .clamp(o.act_min() as i64, o.act_max() as i64);
                assert_eq!(v.to_i32() as i64, r);
            }
        }
    }
}

#[test]
fn requantize_i8_matches_scalar() {
    check_parity::<i8>(21, -5);
}
#[test]
fn requantize_u8_matches_scalar() {
    check_parity::<u8>(22, 128);
}
#[test]
fn requantize_i16_matches_scalar() {
    check_parity::<i16>(23, 0);
}
#[test]
fn requantize_u16_matches_scalar() {
    check_parity::<u16>(24, 32768);
}

#[test]
fn activation_ranges() {
    let out = QuantParams::with_bits(0.05, 10, 8, false).unwrap();
    let none = RequantOutput::for_activation(&out, Activation::None);
    assert_eq!((none.act_min(), none.act_max()), (0, 255));
    let relu = RequantOutput::for_activation(&out, Activation::Relu);
    assert_eq!((relu.act_min(), relu.act_max()), (10, 255));
    let relu6 = RequantOutput::for_activation(&out, Activation::Relu6);
    assert_eq!((relu6.act_min(), relu6.act_max()), (10, 130)); // 10 + 6 / 0.05
    let k = Kernels::active();
    let mut q = [0u8; 4];
    k.requantize(
        &[-1000, 0, 500, 100000],
        quantize_multiplier(0.25).unwrap(),
        &relu6,
        &mut q,
    )
    .unwrap();
    assert_eq!(q, [10, 10, 130, 130]);
}

#[test]
fn bad_calls_are_errors() {
    let k = Kernels::active();
    let m = quantize_multiplier(0.5).unwrap();
    let o = RequantOutput::new(0, -128, 127).unwrap();
    assert!(k.requantize(&[1, 2], m, &o, &mut [0i8; 1]).is_err());
    let wide = RequantOutput::new(0, -128, 300).unwrap();
    assert!(k
        .requantize(&[1], m, &wide, &mut [0i8; 1])
        .unwrap_err()
        .to_string()
        .contains("does not fit i8"));
    let cm = ChannelMultipliers::new(&[m, m, m]);
    let e = k
        .requantize_per_channel(&[0; 4], &cm, &o, &mut [0i8; 4])
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("not a whole number of rows of 3 channels"),
        "{e}"
    );
    assert!(RequantOutput::new(0, 10, 5).is_err());
}

/// A u8 add case moved to the i8 domain (every code, zero point and bound by -128): the
/// parameters, both inputs and the spec's sums.
fn add_case_i8(
    a: &[u8],
    b: &[u8],
    (sa, za): (f32, i32),
    (sb, zb): (f32, i32),
    sy: f32,
    (zy, lo): (i32, i32),
) -> (
    quantbench_kernels::integer_only::add::AddParams,
    Vec<i8>,
    Vec<i8>,
    Vec<i8>,
) {
    use quantbench_kernels::integer_only::add::{add_one, AddParams};
    let output8 = RequantOutput::new(zy - 128, lo - 128, 127).unwrap();
    let p8 = AddParams::new((sa, za - 128), (sb, zb - 128), sy, output8).unwrap();
    let a8: Vec<i8> = a.iter().map(|&v| (v as i32 - 128) as i8).collect();
    let b8: Vec<i8> = b.iter().map(|&v| (v as i32 - 128) as i8).collect();
    let want8: Vec<i8> = a8
        .iter()
        .zip(&b8)
        .map(|(&x, &y)| add_one(x as i32, y as i32, &p8) as i8)
        .collect();
    (p8, a8, b8, want8)
}

#[test]
fn quantized_add_is_bit_exact_on_every_pair_of_codes() {
    use quantbench_kernels::integer_only::add::{add_one, AddParams};
    const TIE: f32 = 1.0 / 1_048_576.0;
    // all 65,536 (a, b) pairs, as u8 and as i8 codes, under extreme zero points and input
    // right shifts from 1 to 31 (and a multiplier that rounds to 0)
    let a: Vec<u8> = (0..1usize << 16).map(|i| (i >> 8) as u8).collect();
    let b: Vec<u8> = (0..1usize << 16).map(|i| i as u8).collect();
    for (sa, za, sb, zb, sy, zy, lo) in [
        (0.02f32, 0, 0.05f32, 255, 0.06f32, 10, 0),
        (0.5, 255, 0.5, 0, 1.0, 128, 0),
        (0.11, 128, 0.013, 7, 0.09, 0, 0),
        // b's multiplier is about 2^-32: shift -31
        (1.0, 7, 6e-10, 250, 0.9, 3, 3),
        // b's multiplier rounds to 0
        (1.0, 0, 1e-12, 255, 0.5, 0, 0),
        (3e-4, 128, 0.7, 128, 0.011, 200, 0),
        // most sums saturate
        (0.25, 0, 0.25, 255, 0.001, 0, 0),
        // multipliers 2^30 + 2^11 with shifts -1 and -3: the scaled input is
        // x (2^19 + 1), so every odd x (every x = 4 mod 8) is a tie of the rounding divide
        // (the output's coarser rounding hides most of them; the AVX-512 input stage is
        // checked on its own in `integer_only::x86_avx512::tests`)
        (1.0, 3, 0.5 + TIE, 200, 0.7, 100, 0),
        ((0.5 + TIE) / 4.0, 250, 1.0, 5, 0.7, 100, 0),
    ] {
        let output = RequantOutput::new(zy, lo, 255).unwrap();
        let p = AddParams::new((sa, za), (sb, zb), sy, output).unwrap();
        let want: Vec<u8> = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| add_one(x as i32, y as i32, &p) as u8)
            .collect();
        let (p8, a8, b8, want8) = add_case_i8(&a, &b, (sa, za), (sb, zb), sy, (zy, lo));
        assert!(
            want.iter().any(|&v| v as i32 > zy),
            "the case has sums above the output zero point"
        );
        for isa in common::isas() {
            let k = Kernels::new(isa).unwrap();
            let mut got = vec![0u8; a.len()];
            k.add_requantize(&a, &b, &p, &mut got).unwrap();
            assert_eq!(got, want, "{isa}, u8, {p:?}");
            let mut got8 = vec![0i8; a.len()];
            k.add_requantize(&a8, &b8, &p8, &mut got8).unwrap();
            assert_eq!(got8, want8, "{isa}, i8, {p8:?}");
        }
    }
}

#[test]
fn quantized_add_is_bit_exact_on_every_isa_and_close_to_the_real_sum() {
    use quantbench_kernels::integer_only::add::{add_one, AddParams};
    let mut rng = common::Rng::new(0xADD);
    for (sa, za, sb, zb, sy, zy, relu) in [
        (0.02f32, 0, 0.05f32, 3, 0.06f32, 10, false),
        (0.11, 128, 0.013, 7, 0.09, 0, true),
        (0.5, 255, 0.5, 0, 1.0, 128, false),
        // an output multiplier above 1 (left shift): AVX-512 falls back to the compiled loop
        (1.0, 0, 1.0, 0, 1e-7, 0, false),
    ] {
        let output = RequantOutput::new(zy, if relu { zy } else { 0 }, 255).unwrap();
        let p = AddParams::new((sa, za), (sb, zb), sy, output).unwrap();
        let n = 1000 + 37;
        let a: Vec<u8> = (0..n).map(|_| rng.range_i32(0, 255) as u8).collect();
        let b: Vec<u8> = (0..n).map(|_| rng.range_i32(0, 255) as u8).collect();
        let want: Vec<u8> = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| add_one(x as i32, y as i32, &p) as u8)
            .collect();
        for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
            let real = sa * (x as i32 - za) as f32 + sb * (y as i32 - zb) as f32;
            let lo = if relu { zy } else { 0 };
            let ideal = ((real / sy).round() as i32 + zy).clamp(lo, 255);
            assert!(
                (want[i] as i32 - ideal).abs() <= 1,
                "element {i}: {x}, {y} -> {} but the real sum rounds to {ideal}",
                want[i]
            );
        }
        let lo = if relu { zy } else { 0 };
        let (p8, a8, b8, want8) = add_case_i8(&a, &b, (sa, za), (sb, zb), sy, (zy, lo));
        for isa in common::isas() {
            let k = Kernels::new(isa).unwrap();
            // every length up to 70 (vector bodies and tails), then the whole input
            for len in (0..=70).chain([n]) {
                let mut got = vec![0u8; len];
                k.add_requantize(&a[..len], &b[..len], &p, &mut got)
                    .unwrap();
                assert_eq!(got, want[..len], "{isa}, u8, {len} codes");
                let mut got8 = vec![0i8; len];
                k.add_requantize(&a8[..len], &b8[..len], &p8, &mut got8)
                    .unwrap();
                assert_eq!(got8, want8[..len], "{isa}, i8, {len} codes");
            }
        }
    }
    let k = Kernels::scalar();
    let p = AddParams::new(
        (0.1, 0),
        (0.1, 0),
        0.1,
        RequantOutput::new(0, 0, 255).unwrap(),
    )
    .unwrap();
    let e = k
        .add_requantize(&[1u8, 2], &[1u8], &p, &mut [0u8; 2])
        .unwrap_err();
    assert!(e.to_string().contains("add_requantize: b"), "{e}");
    let p8 = AddParams::new(
        (0.1, 0),
        (0.1, 0),
        0.1,
        RequantOutput::new(0, 0, 255).unwrap(),
    )
    .unwrap();
    let e = k
        .add_requantize(&[1i8, 2], &[1i8, 3], &p8, &mut [0i8; 2])
        .unwrap_err();
    assert!(e.to_string().contains("does not fit i8"), "{e}");
}
