//! Every linear kernel on every ISA this machine has, against the scalar reference: integer
//! outputs bit for bit, f32 outputs bit for bit too (same operations in the same order).

mod common;

use common::{bits_eq, data, isas, lengths, Rng};
use quantbench_kernels::linear::qrange;
use quantbench_kernels::{ChannelLayout, Code, Kernels, LinearScheme, NoiseKey, QuantParams};

/// A spread of parameter sets: every code type, widths 1..=8 and 16, many scale magnitudes,
/// zero points at the ends and in the middle.
fn param_sets<T: Code>(rng: &mut Rng) -> Vec<QuantParams> {
    let mut v = Vec::new();
    let widths: &[u32] = if T::MAX > 255 {
        &[16, 12]
    } else {
        &[1, 2, 3, 4, 5, 7, 8]
    };
    for &bits in widths {
        let signed = T::MIN < 0;
        let (qmin, qmax) = if bits == 12 {
            if signed {
                (-2048, 2047)
            } else {
                (0, 4095)
            }
        } else {
            qrange(bits, signed).unwrap()
        };
        for scale in [1e-30f32, 1e-6, 0.0137, 0.5, 1.0, 3.0, 77.7, 1e20] {
            for zp in [qmin, qmax, (qmin + qmax) / 2, rng.range_i32(qmin, qmax)] {
                v.push(QuantParams::new(scale, zp, qmin, qmax).unwrap());
            }
        }
    }
    v
}

fn check_type<T: Code + PartialEq>(seed: u64) {
    let mut rng = Rng::new(seed);
    let scalar = Kernels::scalar();
    let params = param_sets::<T>(&mut rng);
    for isa in isas() {
        let k = Kernels::new(isa).unwrap();
        for (li, &n) in lengths().iter().enumerate() {
            let p = params[li % params.len()];
            let mag = p.scale() * (p.qmax() - p.qmin()) as f32 * (0.3 + rng.unit());
            let x = data(&mut rng, n, mag, p.scale(), li % 3 == 0);
            let (mut want, mut got) = (vec![T::default(); n], vec![T::default(); n]);
            scalar.quantize(&x, &p, &mut want).unwrap();
            k.quantize(&x, &p, &mut got).unwrap();
            assert!(want == got, "quantize<{}> {isa} n={n} {p:?}", T::NAME);

            let (mut fw, mut fg) = (vec![0f32; n], vec![0f32; n]);
            scalar.dequantize(&want, &p, &mut fw).unwrap();
            k.dequantize(&want, &p, &mut fg).unwrap();
            assert!(
                bits_eq(&fw, &fg),
                "dequantize<{}> {isa} n={n} {p:?}",
                T::NAME
            );

            scalar.fake_quantize(&x, &p, &mut fw).unwrap();
            k.fake_quantize(&x, &p, &mut fg).unwrap();
            assert!(bits_eq(&fw, &fg), "fake_quantize {isa} n={n} {p:?}");
            let mut inplace = x.clone();
            k.fake_quantize_in_place(&mut inplace, &p);
            assert!(bits_eq(&fw, &inplace), "fake_quantize_in_place {isa} n={n}");

            let key = NoiseKey::from_seed(seed ^ n as u64);
            let offset = rng.next_u64() as u32;
            scalar
                .quantize_stochastic(&x, &p, key, offset, &mut want)
                .unwrap();
            k.quantize_stochastic(&x, &p, key, offset, &mut got)
                .unwrap();
            assert!(
                want == got,
                "quantize_stochastic<{}> {isa} n={n} {p:?}",
                T::NAME
            );

            assert_eq!(scalar.min_max(&x), k.min_max(&x), "min_max {isa} n={n}");
        }
    }
}

#[test]
fn quantize_family_i8_matches_scalar() {
    check_type::<i8>(1);
}
#[test]
fn quantize_family_u8_matches_scalar() {
    check_type::<u8>(2);
}
#[test]
fn quantize_family_i16_matches_scalar() {
    check_type::<i16>(3);
}
#[test]
fn quantize_family_u16_matches_scalar() {
    check_type::<u16>(4);
}

/// Sizes past every size-dependent branch of the SIMD paths (the 256-bit dequantize loop of
/// the AVX-512 path from 4M elements on, its non-temporal stores from 8M on, with an output
/// that starts off a 64-byte boundary).
#[test]
fn large_arrays_match_scalar() {
    let mut rng = Rng::new(6);
    let n = (1 << 23) + 37;
    let p = QuantParams::with_bits(0.02, -7, 8, true).unwrap();
    let x = data(&mut rng, n, 3.0, p.scale(), true);
    let scalar = Kernels::scalar();
    let (mut want, mut fw) = (vec![0i8; n], vec![0f32; n]);
    scalar.quantize(&x, &p, &mut want).unwrap();
    scalar.dequantize(&want, &p, &mut fw).unwrap();
    for isa in isas() {
        let k = Kernels::new(isa).unwrap();
        let (mut got, mut fg) = (vec![0i8; n], vec![0f32; n]);
        k.quantize(&x, &p, &mut got).unwrap();
        assert!(want == got, "quantize {isa} n={n}");
        got.fill(0);
        k.quantize(&x[5..], &p, &mut got[5..]).unwrap();
        assert!(want[5..] == got[5..], "quantize {isa} n={n} from element 5");
        k.dequantize(&want, &p, &mut fg).unwrap();
        assert!(bits_eq(&fw, &fg), "dequantize {isa} n={n}");
        fg.fill(0.0);
        k.dequantize(&want[3..], &p, &mut fg[3..]).unwrap();
        assert!(
            bits_eq(&fw[3..], &fg[3..]),
            "dequantize {isa} n={n} from element 3"
        );
    }
    // per channel, with runs shorter than the whole tensor
    let layout = ChannelLayout::new(&[4, n / 4], 0).unwrap();
    let m = layout.len();
    let params: Vec<QuantParams> = (0..4)
        .map(|c| QuantParams::with_bits(0.01 * (c + 1) as f32, c - 2, 8, true).unwrap())
        .collect();
    let mut qw = vec![0i8; m];
    scalar
        .quantize_per_channel(&x[..m], &layout, &params, &mut qw)
        .unwrap();
    for isa in isas() {
        let mut qg = vec![0i8; m];
        Kernels::new(isa)
            .unwrap()
            .quantize_per_channel(&x[..m], &layout, &params, &mut qg)
            .unwrap();
        assert!(qw == qg, "quantize_per_channel {isa} n={m}");
    }
    let mut fw = vec![0f32; m];
    scalar
        .dequantize_per_channel(&want[..m], &layout, &params, &mut fw)
        .unwrap();
    for isa in isas() {
        let mut fg = vec![0f32; m];
        Kernels::new(isa)
            .unwrap()
            .dequantize_per_channel(&want[..m], &layout, &params, &mut fg)
            .unwrap();
        assert!(bits_eq(&fw, &fg), "dequantize_per_channel {isa} n={m}");
    }
}

#[test]
fn per_channel_matches_per_tensor_on_every_axis() {
    let mut rng = Rng::new(5);
    let shape = [3usize, 5, 7, 9];
    let n: usize = shape.iter().product();
    let x = data(&mut rng, n, 4.0, 0.03, true);
    let scheme = LinearScheme::new(4, true, false).unwrap();
    for isa in isas() {
        let k = Kernels::new(isa).unwrap();
        for axis in 0..shape.len() {
            let layout = ChannelLayout::new(&shape, axis).unwrap();
            let params = k.choose_params_per_channel(&x, &layout, &scheme).unwrap();
            assert_eq!(
                params,
                Kernels::scalar()
                    .choose_params_per_channel(&x, &layout, &scheme)
                    .unwrap()
            );
            let mut q = vec![0i8; n];
            k.quantize_per_channel(&x, &layout, &params, &mut q)
                .unwrap();
            let mut deq = vec![0f32; n];
            k.dequantize_per_channel(&q, &layout, &params, &mut deq)
                .unwrap();
            let mut fake = vec![0f32; n];
            k.fake_quantize_per_channel(&x, &layout, &params, &mut fake)
                .unwrap();
            assert!(
                bits_eq(&deq, &fake),
                "{isa} axis {axis}: dequant(quant) != fake-quant"
            );
            // element by element against the scalar reference of its own channel
            let strides: Vec<usize> = (0..shape.len())
                .map(|d| shape[d + 1..].iter().product())
                .collect();
            for i in 0..n {
                let c = (i / strides[axis]) % shape[axis];
                assert_eq!(
                    q[i] as i32,
                    params[c].quantize_one(x[i]),
                    "{isa} axis {axis} i {i}"
                );
            }
        }
    }
}

#[test]
fn length_and_range_errors_are_reported() {
    let k = Kernels::active();
    let p = QuantParams::with_bits(0.1, 0, 8, true).unwrap();
    let err = k.quantize(&[1.0, 2.0], &p, &mut [0i8; 3]).unwrap_err();
    assert_eq!(err.to_string(), "quantize output: expected length 2, got 3");
    let wide = QuantParams::with_bits(0.1, 0, 16, true).unwrap();
    let err = k.quantize(&[1.0], &wide, &mut [0i8; 1]).unwrap_err();
    assert!(err.to_string().contains("does not fit i8"), "{err}");
    let layout = ChannelLayout::new(&[2, 3], 1).unwrap();
    let err = k
        .quantize_per_channel(&[0.0; 6], &layout, &[p, p], &mut [0i8; 6])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "per-channel parameters: expected length 3, got 2"
    );
    assert!(ChannelLayout::new(&[2, 3], 2)
        .unwrap_err()
        .to_string()
        .contains("axis 2 out of range"));
}
