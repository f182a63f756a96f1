//! The spec itself: parameter formulas, the edge table, the NaN policy and the invariants.

mod common;

use common::{data, isas, Rng};
use quantbench_kernels::linear::{qrange, MAX_SCALE, MIN_SCALE};
use quantbench_kernels::{Kernels, LinearScheme, QuantParams};

#[test]
fn code_ranges() {
    assert_eq!(qrange(8, true).unwrap(), (-128, 127));
    assert_eq!(qrange(8, false).unwrap(), (0, 255));
    assert_eq!(qrange(1, true).unwrap(), (-1, 0));
    assert_eq!(qrange(1, false).unwrap(), (0, 1));
    assert_eq!(qrange(3, true).unwrap(), (-4, 3));
    assert_eq!(qrange(16, true).unwrap(), (-32768, 32767));
    assert_eq!(qrange(16, false).unwrap(), (0, 65535));
    for bad in [0, 9, 12, 17, 32] {
        assert!(qrange(bad, true).is_err(), "bits {bad}");
    }
    assert!(LinearScheme::new(1, true, true).is_err());
}

#[test]
fn asymmetric_parameters_follow_the_documented_formula() {
    // [-1, 3] onto u8: scale = 4/255, zero_point = rne(0 - (-1)/scale) = rne(63.75) = 64
    let s = LinearScheme::new(8, false, false).unwrap();
    let p = s.params_from_range(Some((-1.0, 3.0))).unwrap();
    assert_eq!(p.scale(), 4.0f32 / 255.0);
    assert_eq!(p.zero_point(), 64);
    // the range always includes 0: [2, 5] behaves as [0, 5]
    let p = s.params_from_range(Some((2.0, 5.0))).unwrap();
    assert_eq!((p.scale(), p.zero_point()), (5.0f32 / 255.0, 0));
    // signed 8 bit: [-2, -1] -> [-2, 0], zero point at the top
    let p = LinearScheme::new(8, true, false)
        .unwrap()
        .params_from_range(Some((-2.0, -1.0)))
        .unwrap();
    assert_eq!((p.scale(), p.zero_point()), (2.0f32 / 255.0, 127));
    // the seed's 2-bit example: [-1, 2] onto [-2, 1]
    let p = LinearScheme::new(2, true, false)
        .unwrap()
        .params_from_range(Some((-1.0, 2.0)))
        .unwrap();
    assert_eq!((p.scale(), p.zero_point()), (1.0, -1));
    assert_eq!(p.quantize_one(0.0), -1);
    assert_eq!(p.dequantize_one(-1), 0.0);
}

#[test]
fn symmetric_parameters() {
    let p = LinearScheme::new(8, true, true)
        .unwrap()
        .params_from_range(Some((-0.5, 2.54)))
        .unwrap();
    assert_eq!((p.scale(), p.zero_point()), (2.54f32 / 127.0, 0));
    let p = LinearScheme::new(8, false, true)
        .unwrap()
        .params_from_range(Some((-3.0, 1.0)))
        .unwrap();
    assert_eq!((p.scale(), p.zero_point()), (3.0f32 / 127.0, 128));
    let p = LinearScheme::new(4, true, true)
        .unwrap()
        .params_from_range(Some((-7.0, 7.0)))
        .unwrap();
    assert_eq!(
        (p.scale(), p.zero_point(), p.qmin(), p.qmax()),
        (1.0, 0, -8, 7)
    );
}

#[test]
fn degenerate_tensors_get_valid_parameters() {
    let k = Kernels::active();
    for signed in [false, true] {
        for symmetric in [false, true] {
            let s = LinearScheme::new(8, signed, symmetric).unwrap();
            let cases: [&[f32]; 6] = [
                &[],
                &[0.0; 17],
                &[f32::NAN; 5],
                &[3.25; 33],
                &[-1e-40, 1e-40],
                &[f32::MIN, f32::MAX],
            ];
            for x in cases {
                let p = k.choose_params(x, &s).unwrap();
                assert!(
                    p.scale().is_finite() && p.scale() >= MIN_SCALE && p.scale() <= MAX_SCALE,
                    "{x:?} {p:?}"
                );
                assert!(p.inv_scale().is_finite() && p.inv_scale() > 0.0);
                let mut q = vec![0i16; x.len()];
                let mut back = vec![0f32; x.len()];
                let p16 = QuantParams::new(p.scale(), p.zero_point(), p.qmin(), p.qmax()).unwrap();
                k.quantize(x, &p16, &mut q).unwrap();
                k.dequantize(&q, &p16, &mut back).unwrap();
                assert!(back.iter().all(|v| v.is_finite()), "{x:?}: {back:?}");
                // zero is exact
                assert_eq!(p.dequantize_one(p.quantize_one(0.0)), 0.0, "{x:?}");
            }
            // a constant tensor reproduces its value to within half a step
            let p = k.choose_params(&[3.25; 9], &s).unwrap();
            assert!((p.dequantize_one(p.quantize_one(3.25)) - 3.25).abs() <= p.scale() / 2.0);
        }
    }
    assert!(LinearScheme::new(8, true, false)
        .unwrap()
        .params_from_range(Some((f32::NAN, 1.0)))
        .is_err());
}

#[test]
fn invalid_parameters_are_refused() {
    for s in [0.0, -1.0, f32::NAN, f32::INFINITY, 1e-40, 1e-31, 2e30, 1e38] {
        let e = QuantParams::new(s, 0, -128, 127).unwrap_err();
        assert!(e.to_string().starts_with("scale = "), "{e}");
    }
    assert!(QuantParams::new(1.0, 128, -128, 127)
        .unwrap_err()
        .to_string()
        .contains("zero_point = 128"));
    assert!(QuantParams::new(1.0, 0, 5, 4).is_err());
    assert!(QuantParams::new(1.0, 0, 0, 70000).is_err());
}

/// The edge table: every ISA gives exactly these codes.
#[test]
fn edge_table() {
    let p = QuantParams::with_bits(0.5, 3, 8, true).unwrap(); // codes [-128, 127], zp 3
    let table: &[(f32, i8)] = &[
        (f32::NAN, 3), // NaN reads as 0.0
        (-f32::NAN, 3),
        (f32::INFINITY, 127), // +inf saturates
        (f32::NEG_INFINITY, -128),
        (0.0, 3),
        (-0.0, 3),
        (1e-45, 3), // subnormal
        (-1e-40, 3),
        (f32::MAX, 127),
        (f32::MIN, -128),
        (0.25, 3),     // 0.5 step: tie -> even (0)
        (0.75, 5),     // 1.5 -> 2
        (1.25, 5),     // 2.5 -> 2
        (-0.25, 3),    // -0.5 -> -0
        (-0.75, 1),    // -1.5 -> -2
        (62.0, 127),   // 124 + 3 = 127 exactly
        (62.5, 127),   // saturates
        (-65.5, -128), // -131 + 3 = -128 exactly
        (-70.0, -128),
    ];
    for isa in isas() {
        let k = Kernels::new(isa).unwrap();
        // repeat the table so every SIMD lane position and the tail see each value
        let reps = 21;
        let x: Vec<f32> = (0..reps).flat_map(|_| table.iter().map(|t| t.0)).collect();
        let mut q = vec![0i8; x.len()];
        k.quantize(&x, &p, &mut q).unwrap();
        for (i, &c) in q.iter().enumerate() {
            let (v, want) = table[i % table.len()];
            assert_eq!(c, want, "{isa}: quantize({v:e}) at {i}");
        }
        let mut f = vec![0f32; x.len()];
        k.fake_quantize(&x, &p, &mut f).unwrap();
        for (i, &v) in f.iter().enumerate() {
            assert_eq!(
                v,
                (table[i % table.len()].1 as i32 - 3) as f32 * 0.5,
                "{isa}: fake at {i}"
            );
        }
        let mut mm = x.clone();
        mm.truncate(table.len());
        assert_eq!(k.min_max(&mm), Some((f32::MIN, f32::MAX)), "{isa}");
        assert_eq!(k.min_max(&[f32::NAN, f32::INFINITY]), None, "{isa}");
    }
}

/// Invariants on random data: codes inside [qmin, qmax], reconstruction error at most half a
/// step inside the clip range, and quantize is monotone.
#[test]
fn invariants() {
    let mut rng = Rng::new(11);
    for isa in isas() {
        let k = Kernels::new(isa).unwrap();
        for bits in [2u32, 3, 4, 8] {
            for symmetric in [false, true] {
                let s = LinearScheme::new(bits, true, symmetric).unwrap();
                let mut x = data(&mut rng, 1000, 2.0, 0.01, false);
                let p = k.choose_params(&x, &s).unwrap();
                let mut q = vec![0i8; x.len()];
                k.quantize(&x, &p, &mut q).unwrap();
                let mut back = vec![0f32; x.len()];
                k.dequantize(&q, &p, &mut back).unwrap();
                let (lo, hi) = (p.dequantize_one(p.qmin()), p.dequantize_one(p.qmax()));
                for i in 0..x.len() {
                    assert!((p.qmin()..=p.qmax()).contains(&(q[i] as i32)));
                    if x[i] >= lo && x[i] <= hi {
                        let tol = p.scale() / 2.0 * (1.0 + 1e-5);
                        assert!(
                            (back[i] - x[i]).abs() <= tol,
                            "{isa} bits {bits}: {} -> {}",
                            x[i],
                            back[i]
                        );
                    }
                }
                x.sort_by(f32::total_cmp);
                k.quantize(&x, &p, &mut q).unwrap();
                assert!(q.windows(2).all(|w| w[0] <= w[1]), "{isa}: not monotone");
            }
        }
    }
}

/// Stochastic rounding is unbiased and reproducible from its seed.
#[test]
fn stochastic_rounding_is_unbiased_and_seeded() {
    let p = QuantParams::with_bits(1.0, 0, 8, true).unwrap();
    let x = vec![0.3f32; 100_000];
    for isa in isas() {
        let k = Kernels::new(isa).unwrap();
        let mut q = vec![0i8; x.len()];
        k.quantize_stochastic(
            &x,
            &p,
            quantbench_kernels::NoiseKey::from_seed(7),
            0,
            &mut q,
        )
        .unwrap();
        assert!(q.iter().all(|&c| c == 0 || c == 1));
        let mean = q.iter().map(|&c| c as f64).sum::<f64>() / x.len() as f64;
        // binomial standard error at p=0.3, n=1e5 is 0.00145: allow 4 sigma
        assert!((mean - 0.3).abs() < 0.006, "{isa}: mean {mean}");
        let mut again = vec![0i8; x.len()];
        k.quantize_stochastic(
            &x,
            &p,
            quantbench_kernels::NoiseKey::from_seed(7),
            0,
            &mut again,
        )
        .unwrap();
        assert_eq!(q, again);
        k.quantize_stochastic(
            &x,
            &p,
            quantbench_kernels::NoiseKey::from_seed(8),
            0,
            &mut again,
        )
        .unwrap();
        assert_ne!(
            q, again,
            "{isa}: a different seed must give different noise"
        );
    }
}

/// The SIMD paths compute the correctly rounded quotient `x / scale` without dividing
/// (reciprocal + one Markstein correction). Hammer them with values at and one to three ulps
/// around every kind of half-integer quotient, for scales across the accepted range.
#[test]
fn simd_quotient_is_exact_at_near_ties() {
    let mut rng = Rng::new(3);
    let scalar = Kernels::scalar();
    let mut scales = vec![
        3.0f32,
        0.1,
        1.0 / 255.0,
        5.0 / 255.0,
        0.0137,
        7.77e-5,
        MIN_SCALE,
        MAX_SCALE,
        1.0 / 3.0,
    ];
    for _ in 0..40 {
        scales.push((1.0 + rng.unit()) * 2f32.powi(rng.range_i32(-99, 99)));
    }
    let mut x = Vec::new();
    let mut checked = 0usize;
    for &scale in &scales {
        let p = QuantParams::with_bits(scale, 0, 16, true).unwrap();
        x.clear();
        for _ in 0..4000 {
            let k = rng.range_i32(-40000, 40000) as f32 + 0.5;
            let tie = k * scale;
            let mut v = tie;
            for _ in 0..3 {
                v = f32::from_bits(v.to_bits() + 1);
                x.push(v);
            }
            x.push(tie);
            let mut v = tie;
            for _ in 0..3 {
                v = f32::from_bits(v.to_bits() - 1);
                x.push(v);
            }
            x.push(rng.normalish(scale * 30000.0));
        }
        let mut want = vec![0i16; x.len()];
        scalar.quantize(&x, &p, &mut want).unwrap();
        for (i, &v) in x.iter().enumerate() {
            let exact = (v / scale).round_ties_even().clamp(-32768.0, 32767.0) as i16;
            assert_eq!(want[i], exact, "scalar spec is the division");
        }
        for isa in isas() {
            let mut got = vec![0i16; x.len()];
            Kernels::new(isa)
                .unwrap()
                .quantize(&x, &p, &mut got)
                .unwrap();
            for i in 0..x.len() {
                assert_eq!(
                    got[i],
                    want[i],
                    "{isa}: x = {:e} ({:#x}), scale = {scale:e}",
                    x[i],
                    x[i].to_bits()
                );
            }
            checked += x.len();
        }
    }
    eprintln!("near-tie quotients checked: {checked}");
}
