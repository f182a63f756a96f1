//! The int8 GEMM: every microkernel this CPU has against the scalar spec, bit for bit, on
//! shapes with every kind of tail, K large enough to wrap i32, the code extremes, zero
//! points on both sides (per tensor and per column), 1 and 2 threads, and the fused epilogue.

mod common;

use common::Rng;
use quantbench_kernels::gemm::{
    gemm_i32, gemm_requantize, scalar, ActCode, Epilogue, Microkernel, OutputScale, PackedB,
};
use quantbench_kernels::integer_only::{ChannelMultipliers, Multiplier, RequantOutput};
use quantbench_kernels::{Code, Kernels};

fn codes<A: ActCode>(rng: &mut Rng, n: usize, extreme: Option<i32>) -> Vec<A> {
    (0..n)
        .map(|_| A::from_i32(extreme.unwrap_or_else(|| rng.range_i32(A::MIN, A::MAX))))
        .collect()
}

fn weights(rng: &mut Rng, n: usize, extreme: Option<i32>) -> Vec<i8> {
    (0..n)
        .map(|_| extreme.unwrap_or_else(|| rng.range_i32(-128, 127)) as i8)
        .collect()
}

struct Case {
    m: usize,
    k: usize,
    n: usize,
    za: i32,
    zb: Vec<i32>,
    a_ext: Option<i32>,
    b_ext: Option<i32>,
}

fn check_i32<A: ActCode>(mk: Microkernel, case: &Case, rng: &mut Rng) {
    let Case { m, k, n, za, .. } = *case;
    let a = codes::<A>(rng, m * k, case.a_ext);
    let b = weights(rng, k * n, case.b_ext);
    let mut want = vec![0i32; m * n];
    scalar::gemm_i32(&a, m, k, za, &b, n, &case.zb, None, &mut want);
    let packed = PackedB::new::<A>(mk, &b, k, n, &case.zb).unwrap();
    for threads in [1, 2] {
        let mut got = vec![7i32; m * n];
        gemm_i32(&a, m, za, &packed, &mut got, threads).unwrap();
        if got != want {
            let at = got.iter().zip(&want).position(|(g, w)| g != w).unwrap();
            panic!(
                "{} {} m={m} k={k} n={n} za={za} zb={:?} threads={threads}: first difference at {} (row {}, col {}): got {}, want {}",
                mk.name(),
                A::NAME,
                &case.zb[..case.zb.len().min(3)],
                at,
                at / n,
                at % n,
                got[at],
                want[at]
            );
        }
    }
}

#[test]
fn a_hand_computed_product() {
    // A = [[1, 2], [3, 4]] (za = 1), B = [[5, -6], [7, 8]] (zb = 2):
    // (A - 1) = [[0, 1], [2, 3]], (B - 2) = [[3, -8], [5, 6]]
    // C = [[5, 6], [21, 2]]
    let a: Vec<u8> = vec![1, 2, 3, 4];
    let b: Vec<i8> = vec![5, -6, 7, 8];
    for mk in Microkernel::available() {
        let packed = PackedB::new::<u8>(mk, &b, 2, 2, &[2]).unwrap();
        let mut c = vec![0i32; 4];
        gemm_i32(&a, 2, 1, &packed, &mut c, 1).unwrap();
        assert_eq!(c, vec![5, 6, 21, 2], "{}", mk.name());
    }
}

#[test]
fn every_microkernel_matches_the_spec_on_all_shapes() {
    let mut rng = Rng::new(0x6E33);
    let dims = [
        1usize, 2, 3, 5, 7, 8, 13, 16, 17, 31, 33, 48, 49, 64, 65, 100,
    ];
    for mk in Microkernel::available() {
        for (t, &m) in dims.iter().enumerate() {
            for (u, &n) in dims.iter().enumerate() {
                let k = dims[(t * 7 + u * 3) % dims.len()] + (t + u) % 5;
                let zb = if (t + u) % 3 == 0 {
                    (0..n).map(|_| rng.range_i32(-128, 127)).collect()
                } else {
                    vec![rng.range_i32(-20, 20)]
                };
                let case = Case {
                    m,
                    k,
                    n,
                    za: rng.range_i32(0, 255),
                    zb: zb.clone(),
                    a_ext: None,
                    b_ext: None,
                };
                check_i32::<u8>(mk, &case, &mut rng);
                let case = Case {
                    za: rng.range_i32(-128, 127),
                    ..case
                };
                check_i32::<i8>(mk, &case, &mut rng);
            }
        }
    }
}

#[test]
fn large_k_blocks_and_i32_wrapping_are_identical() {
    // K past the K-blocking (1024) and past 33,025, where extreme codes wrap i32.
    let mut rng = Rng::new(0xB16);
    for mk in Microkernel::available() {
        for (k, a_ext, b_ext, za, zb) in [
            (1025usize, None, None, 3, 0),
            (3001, Some(255), Some(-128), 0, 127),
            (3001, Some(255), Some(127), 0, -128),
            (40_000, Some(255), Some(-128), 0, 127),
        ] {
            let case = Case {
                m: 5,
                k,
                n: 19,
                za,
                zb: vec![zb],
                a_ext,
                b_ext,
            };
            check_i32::<u8>(mk, &case, &mut rng);
            let case = Case {
                a_ext: a_ext.map(|_| -128),
                za: 127,
                ..case
            };
            check_i32::<i8>(mk, &case, &mut rng);
        }
    }
}

#[test]
fn transformer_and_resnet_shapes_match() {
    let mut rng = Rng::new(0x7EA);
    for mk in Microkernel::available() {
        for (m, k, n) in [
            (64, 576, 64),
            (128, 768, 96),
            (1024, 27, 16),
            (300, 1100, 520),
        ] {
            let case = Case {
                m,
                k,
                n,
                za: 128,
                zb: vec![0],
                a_ext: None,
                b_ext: None,
            };
            check_i32::<u8>(mk, &case, &mut rng);
        }
    }
}

fn check_epilogue<A: ActCode, O: Code + PartialEq>(
    mk: Microkernel,
    per_channel: bool,
    rng: &mut Rng,
) {
    let (m, k, n) = (37, 75, 70);
    let a = codes::<A>(rng, m * k, None);
    let b = weights(rng, k * n, None);
    let za = rng.range_i32(A::MIN, A::MAX);
    let zb = vec![0];
    let bias: Vec<i32> = (0..n).map(|_| rng.range_i32(-20_000, 20_000)).collect();
    let ms: Vec<Multiplier> = (0..n)
        .map(|j| {
            // real multipliers between 1/512 and 1/16 (and a few with a left shift)
            let shift = if j % 11 == 0 { 1 } else { -rng.range_i32(4, 9) };
            Multiplier::new(rng.range_i32(1 << 30, i32::MAX), shift).unwrap()
        })
        .collect();
    let zp = (O::MIN + O::MAX) / 2 + 3;
    let output = RequantOutput::new(zp, O::MIN + 5, O::MAX - 2).unwrap();
    let scale = if per_channel {
        OutputScale::PerChannel(ChannelMultipliers::new(&ms))
    } else {
        OutputScale::PerTensor(ms[1])
    };
    let epi = Epilogue {
        bias: Some(bias.clone()),
        scale,
        output,
    };
    let mut acc = vec![0i32; m * n];
    scalar::gemm_i32(&a, m, k, za, &b, n, &zb, Some(&bias), &mut acc);
    let want: Vec<O> = acc
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let mm = if per_channel { ms[i % n] } else { ms[1] };
            scalar::requantize_element::<O>(v, mm, &output)
        })
        .collect();
    assert!(
        want.iter().any(|&v| v.to_i32() != zp) && want.iter().any(|&v| v.to_i32() == O::MIN + 5),
        "the case must exercise the requantization and the clamp: {:?}",
        &want[..20]
    );
    let packed = PackedB::new::<A>(mk, &b, k, n, &zb).unwrap();
    for threads in [1, 2] {
        let mut got = vec![O::default(); m * n];
        gemm_requantize(&a, m, za, &packed, &epi, &mut got, threads).unwrap();
        assert_eq!(
            got,
            want,
            "{} {} -> {} per_channel={per_channel}",
            mk.name(),
            A::NAME,
            O::NAME
        );
    }
}

#[test]
fn fused_epilogue_matches_the_spec() {
    let mut rng = Rng::new(0xE91);
    for mk in Microkernel::available() {
        for per_channel in [false, true] {
            check_epilogue::<u8, u8>(mk, per_channel, &mut rng);
            check_epilogue::<u8, i8>(mk, per_channel, &mut rng);
            check_epilogue::<i8, i8>(mk, per_channel, &mut rng);
        }
    }
}

#[test]
fn the_default_microkernel_is_the_best_one_available() {
    let k = Kernels::active();
    let mk = k.gemm_microkernel();
    assert!(mk.is_supported());
    assert_eq!(mk, Microkernel::for_isa(k.isa()));
    // the microkernel belongs to the handle's ISA, except the documented fallbacks
    assert!(
        mk.isa() == k.isa()
            || (k.isa() == quantbench_kernels::Isa::Avx512 && mk == Microkernel::Avx2MaddwdI16),
        "{} for {}",
        mk.name(),
        k.isa()
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512vnni")
        && k.isa() == quantbench_kernels::Isa::Avx512
    {
        assert_eq!(mk, Microkernel::Avx512VnniDpbusd);
    }
}

#[test]
fn bad_calls_are_errors_naming_the_problem() {
    let mk = Microkernel::Scalar;
    let b = vec![1i8; 6];
    let err = |r: Result<PackedB, quantbench_kernels::KernelError>| r.unwrap_err().to_string();
    assert!(err(PackedB::new::<u8>(mk, &b, 2, 2, &[0])).contains("expected length 4, got 6"));
    assert!(err(PackedB::new::<u8>(mk, &b, 0, 6, &[0])).contains("k >= 1"));
    assert!(err(PackedB::new::<u8>(mk, &b, 2, 3, &[0, 1])).contains("expected 1 or n = 3"));
    assert!(err(PackedB::new::<u8>(mk, &b, 2, 3, &[128])).contains("B zero point 128"));
    let packed = PackedB::new::<u8>(mk, &b, 2, 3, &[0]).unwrap();
    let mut c = vec![0i32; 6];
    let e = gemm_i32(&[1u8, 2, 3], 2, 0, &packed, &mut c, 1).unwrap_err();
    assert!(
        e.to_string()
            .contains("gemm: A (m x k): expected length 4, got 3"),
        "{e}"
    );
    let e = gemm_i32(&[1u8; 4], 2, 256, &packed, &mut c, 1).unwrap_err();
    assert!(e.to_string().contains("A zero point 256"), "{e}");
    let e = gemm_i32(&[1i8; 4], 2, 0, &packed, &mut c, 1).unwrap_err();
    assert!(
        e.to_string()
            .contains("packed for u8 activations, called with i8"),
        "{e}"
    );
    let e = gemm_i32(&[1u8; 4], 2, 0, &packed, &mut c[..5], 1).unwrap_err();
    assert!(e.to_string().contains("C (m x n)"), "{e}");
    let epi = Epilogue {
        bias: Some(vec![0; 2]),
        scale: OutputScale::PerTensor(Multiplier::new(1 << 30, 0).unwrap()),
        output: RequantOutput::new(0, 0, 255).unwrap(),
    };
    let mut out = vec![0u8; 6];
    let e = gemm_requantize(&[1u8; 4], 2, 0, &packed, &epi, &mut out, 1).unwrap_err();
    assert!(
        e.to_string()
            .contains("gemm: bias: expected length 3, got 2"),
        "{e}"
    );
    let epi = Epilogue { bias: None, ..epi };
    let mut out8 = vec![0i8; 6];
    let e = gemm_requantize(&[1u8; 4], 2, 0, &packed, &epi, &mut out8, 1).unwrap_err();
    assert!(e.to_string().contains("does not fit i8"), "{e}");
}

#[test]
fn convolution_matches_im2col_then_gemm_on_every_microkernel() {
    use quantbench_kernels::gemm::{conv_requantize, im2col, ConvGeometry};
    let mut rng = Rng::new(0xC0);
    // (batch, padded h, padded w, c, kernel, strides, dilations, n)
    let cases = [
        (
            1usize,
            34usize,
            34usize,
            16usize,
            [3usize, 3usize],
            [1usize, 1usize],
            [1usize, 1usize],
            16usize,
        ),
        (2, 18, 18, 32, [3, 3], [2, 2], [1, 1], 64),
        (1, 34, 34, 3, [3, 3], [1, 1], [1, 1], 16),
        (2, 9, 11, 8, [3, 2], [1, 2], [2, 1], 24),
        (1, 8, 8, 64, [1, 1], [1, 1], [1, 1], 64),
        (3, 10, 10, 12, [3, 3], [1, 1], [1, 2], 20),
        // enough work (m n k >= 2^23) that 2 threads really split the rows
        (4, 34, 34, 16, [3, 3], [1, 1], [1, 1], 64),
    ];
    for (batch, h, w, c, kernel, strides, dilations, n) in cases {
        let geo = ConvGeometry {
            batch,
            height: h,
            width: w,
            channels: c,
            kernel,
            strides,
            dilations,
        };
        let k = geo.k();
        let [oh, ow] = geo.output().unwrap();
        let m = batch * oh * ow;
        let x: Vec<u8> = (0..batch * h * w * c)
            .map(|_| rng.range_i32(0, 255) as u8)
            .collect();
        let b = weights(&mut rng, k * n, None);
        let ms: Vec<Multiplier> = (0..n)
            .map(|_| {
                Multiplier::new(rng.range_i32(1 << 30, i32::MAX), -rng.range_i32(8, 11)).unwrap()
            })
            .collect();
        let epi = Epilogue {
            bias: Some((0..n).map(|_| rng.range_i32(-5000, 5000)).collect()),
            scale: OutputScale::PerChannel(ChannelMultipliers::new(&ms)),
            output: RequantOutput::new(7, 7, 255).unwrap(),
        };
        let cols = im2col(&x, &geo).unwrap();
        assert_eq!(cols.len(), m * k);
        let spec = PackedB::new::<u8>(Microkernel::Scalar, &b, k, n, &[0]).unwrap();
        let mut want = vec![0u8; m * n];
        gemm_requantize(&cols, m, 9, &spec, &epi, &mut want, 1).unwrap();
        assert!(
            want.iter().any(|&v| v > 7),
            "the case exercises the requantization"
        );
        for mk in Microkernel::available() {
            let p = PackedB::new::<u8>(mk, &b, k, n, &[0]).unwrap();
            for threads in [1, 2] {
                let mut got = vec![0u8; m * n];
                conv_requantize(&x, &geo, 9, &p, &epi, &mut got, threads).unwrap();
                assert_eq!(got, want, "{} {geo:?} threads={threads}", mk.name());
            }
        }
        // i8 activations through the same path
        let xi: Vec<i8> = x.iter().map(|&v| (v ^ 0x80) as i8).collect();
        let colsi = im2col(&xi, &geo).unwrap();
        let spec = PackedB::new::<i8>(Microkernel::Scalar, &b, k, n, &[3]).unwrap();
        let mut want = vec![0u8; m * n];
        gemm_requantize(&colsi, m, -5, &spec, &epi, &mut want, 1).unwrap();
        for mk in Microkernel::available() {
            let p = PackedB::new::<i8>(mk, &b, k, n, &[3]).unwrap();
            let mut got = vec![0u8; m * n];
            conv_requantize(&xi, &geo, -5, &p, &epi, &mut got, 1).unwrap();
            assert_eq!(got, want, "{} i8 {geo:?}", mk.name());
        }
    }
    // errors name the mismatch
    let geo = ConvGeometry {
        batch: 1,
        height: 2,
        width: 2,
        channels: 4,
        kernel: [3, 3],
        strides: [1, 1],
        dilations: [1, 1],
    };
    assert!(geo
        .output()
        .unwrap_err()
        .to_string()
        .contains("does not fit"));
    let geo = ConvGeometry {
        height: 4,
        width: 4,
        ..geo
    };
    let p = PackedB::new::<u8>(Microkernel::Scalar, &[0i8; 36 * 2], 36, 2, &[0]).unwrap();
    let epi = Epilogue {
        bias: None,
        scale: OutputScale::PerTensor(Multiplier::new(1 << 30, -3).unwrap()),
        output: RequantOutput::new(0, 0, 255).unwrap(),
    };
    let e = conv_requantize(&[0u8; 10], &geo, 0, &p, &epi, &mut [0u8; 8], 1).unwrap_err();
    assert!(
        e.to_string()
            .contains("conv: input (n h w c): expected length 64, got 10"),
        "{e}"
    );
    let e = conv_requantize(&[0u8; 64], &geo, 0, &p, &epi, &mut [0u8; 7], 1).unwrap_err();
    assert!(e.to_string().contains("conv: output"), "{e}");
}
