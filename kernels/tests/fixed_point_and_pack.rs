//! Fixed point Qm.n, dynamic fixed point and bit-packing.

mod common;

use common::{data, isas, Rng};
use quantbench_kernels::fixed_point::{FixedPointFormat, Rounding};
use quantbench_kernels::pack::{pack_bits, pack_codes, packed_len, unpack_bits, unpack_codes};
use quantbench_kernels::{Kernels, NoiseKey};

#[test]
fn seed_example_q6_1() {
    // 8 bits: 1 sign + 6 integer + 1 fractional -> steps of 0.5 over [-64, 63.5]
    let f = FixedPointFormat::new(8, 1).unwrap();
    assert_eq!((f.int_bits(), f.step(), f.qrange()), (6, 0.5, (-128, 127)));
    let x = [
        0.0f32,
        0.25,
        0.75,
        1.3,
        -1.3,
        63.5,
        63.8,
        100.0,
        -64.0,
        -64.3,
        f32::NAN,
        f32::INFINITY,
    ];
    let want: [i8; 12] = [0, 0, 2, 3, -3, 127, 127, 127, -128, -128, 0, 127];
    for isa in isas() {
        let k = Kernels::new(isa).unwrap();
        let mut q = [0i8; 12];
        k.fixed_quantize(&x, &f, Rounding::NearestEven, &mut q)
            .unwrap();
        assert_eq!(q, want, "{isa}");
        let mut back = [0f32; 12];
        k.fixed_dequantize(&q, &f, &mut back).unwrap();
        assert_eq!(back[3], 1.5);
        assert_eq!(back[5], 63.5);
    }
}

#[test]
fn formats_are_validated() {
    assert!(FixedPointFormat::new(1, 0).is_err());
    assert!(FixedPointFormat::new(17, 0).is_err());
    assert!(FixedPointFormat::new(8, 200).is_err());
    let f = FixedPointFormat::new(16, 20).unwrap(); // all fractional, int_bits negative
    assert_eq!(f.int_bits(), -5);
    let k = Kernels::active();
    assert!(
        k.fixed_quantize(&[1.0], &f, Rounding::NearestEven, &mut [0i8; 1])
            .is_err(),
        "16-bit codes do not fit i8"
    );
}

#[test]
fn dynamic_fixed_point_picks_the_finest_grid_that_does_not_clip() {
    let k = Kernels::active();
    let cases: &[(&[f32], u32, i32)] = &[
        (&[0.9, -0.2], 8, 7),  // 0.9 * 128 = 115 <= 127
        (&[1.0], 8, 6),        // 1.0 * 128 = 128 > 127: one fewer fractional bit
        (&[-1.0], 8, 7),       // -128 is representable
        (&[63.7, -3.0], 8, 1), // the seed's Q6.1 for data up to ~64
        (&[1000.0], 8, -3),    // steps of 8
        (&[0.001], 8, 16),     // 0.001 * 2^16 = 65.5 -> 66
        (&[0.0, 0.0], 8, 7),   // all-zero tensor
        (&[], 4, 3),
        (&[3.0], 4, 1),              // 3 * 2 = 6 <= 7
        (&[200.0, f32::NAN], 16, 7), // 200 * 128 = 25600 <= 32767
    ];
    for &(x, bits, frac) in cases {
        let f = k.dynamic_fixed_point(x, bits).unwrap();
        assert_eq!(f.frac_bits(), frac, "{x:?} at {bits} bits");
        let (qmin, qmax) = f.qrange();
        let mut q = vec![0i16; x.len()];
        k.fixed_quantize(x, &f, Rounding::NearestEven, &mut q)
            .unwrap();
        for (&v, &c) in x.iter().zip(&q) {
            if v.is_finite() && v != 0.0 {
                assert!(
                    c as i32 > qmin && (c as i32) < qmax
                        || (c as f32 * f.step() - v).abs() <= f.step() / 2.0
                );
            }
        }
    }
}

#[test]
fn per_channel_dynamic_formats() {
    let k = Kernels::active();
    let x = [0.5f32, -0.25, 10.0, 3.0, 0.01, 0.02];
    let layout = quantbench_kernels::ChannelLayout::new(&[3, 2], 0).unwrap();
    let f = k.dynamic_fixed_point_per_channel(&x, &layout, 8).unwrap();
    assert_eq!(
        f.iter().map(|f| f.frac_bits()).collect::<Vec<_>>(),
        vec![7, 3, 12]
    );
}

#[test]
fn stochastic_fixed_point_is_unbiased() {
    let f = FixedPointFormat::new(8, 4).unwrap(); // step 1/16
    let mut rng = Rng::new(9);
    // inside the range [-8, 7.9375] only: saturation is biased by design
    let x: Vec<f32> = data(&mut rng, 200_000, 3.0, f.step(), false)
        .into_iter()
        .filter(|v| v.abs() < 7.9)
        .collect();
    for isa in isas() {
        let k = Kernels::new(isa).unwrap();
        let mut q = vec![0i8; x.len()];
        k.fixed_quantize(
            &x,
            &f,
            Rounding::Stochastic {
                key: NoiseKey::from_seed(1),
                offset: 0,
            },
            &mut q,
        )
        .unwrap();
        let err: f64 = x
            .iter()
            .zip(&q)
            .map(|(&v, &c)| c as f64 * f.step() as f64 - v as f64)
            .sum::<f64>()
            / x.len() as f64;
        // each error is uniform-ish within one step (1/16): the mean of 2e5 has sd ~ 6e-5
        assert!(err.abs() < 5e-4, "{isa}: mean error {err}");
        for (&v, &c) in x.iter().zip(&q) {
            let t = v / f.step();
            assert!(
                c as f32 == t.floor().clamp(-128.0, 127.0)
                    || c as f32 == t.ceil().clamp(-128.0, 127.0),
                "{isa}: {v} -> {c}"
            );
        }
    }
}

#[test]
fn pack_round_trip_every_width_and_length() {
    let mut rng = Rng::new(4);
    for bits in 1..=8u32 {
        for n in (0..70).chain([255, 256, 257, 1023, 4097]) {
            let fields: Vec<u8> = (0..n).map(|_| rng.below(1 << bits) as u8).collect();
            let mut packed = vec![0u8; packed_len(n, bits)];
            pack_bits(&fields, bits, &mut packed).unwrap();
            let mut back = vec![0u8; n];
            unpack_bits(&packed, bits, &mut back).unwrap();
            assert_eq!(back, fields, "bits {bits} n {n}");
        }
    }
}

#[test]
fn pack_layout_is_lsb_first() {
    // ONNX int4 order: element 0 in the low nibble
    let mut out = [0u8; 2];
    pack_bits(&[0x1, 0x2, 0x3], 4, &mut out).unwrap();
    assert_eq!(out, [0x21, 0x03]);
    let mut out = [0u8; 2];
    pack_bits(&[1, 0, 1, 1, 0, 0, 0, 1, 1], 1, &mut out).unwrap();
    assert_eq!(out, [0b1000_1101, 0b1]);
    let mut out = [0u8; 2];
    pack_bits(&[0b101, 0b011, 0b110], 3, &mut out).unwrap(); // 101 | 011<<3 | 110<<6
    assert_eq!(out, [0b1001_1101, 0b1]);
    // a 3-bit tensor of 1000 values really takes 375 bytes
    assert_eq!(pack_codes(&vec![-4i8; 1000], -4, 3).unwrap().len(), 375);
    let codes: Vec<i8> = vec![-4, 3, 0, -1, 2];
    assert_eq!(
        unpack_codes::<i8>(&pack_codes(&codes, -4, 3).unwrap(), -4, 3, 5).unwrap(),
        codes
    );
}

#[test]
fn pack_errors_name_the_value() {
    let mut out = [0u8; 1];
    let e = pack_bits(&[1, 4], 2, &mut out).unwrap_err();
    assert_eq!(e.to_string(), "value 4 at index 1 does not fit in 2 bits");
    assert!(pack_bits(&[1], 9, &mut out).is_err());
    assert!(pack_codes(&[5i8], -4, 3)
        .unwrap_err()
        .to_string()
        .contains("code 5 at index 0"));
    assert!(unpack_bits(&[0u8; 1], 4, &mut [0u8; 3]).is_err());
}
