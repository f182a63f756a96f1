//! Criterion benchmarks of every dispatched kernel on every ISA this machine has.
//! Ids are `{kernel}/{isa}/{n}`; throughput is the bytes of the f32 (or i32) side, so
//! criterion reports GB/s of the wide side of each kernel.
//!
//! `cargo bench -p quantbench-kernels` runs them all; filter with a substring, e.g.
//! `cargo bench -p quantbench-kernels -- quantize_f32_i8/avx512`.

mod common;

use common::data;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quantbench_kernels::integer_only::{quantize_multiplier, ChannelMultipliers, RequantOutput};
use quantbench_kernels::{ChannelLayout, Isa, Kernels, NoiseKey, QuantParams};

const SIZES: [usize; 4] = [4096, 65539, 262_144, 16 << 20];
const CHANNELS: usize = 64;

struct Inputs {
    x: Vec<f32>,
    acc: Vec<i32>,
    q: Vec<i8>,
    f: Vec<f32>,
}

fn benches(c: &mut Criterion) {
    let isas = Isa::available();
    eprintln!("benchmarking ISAs: {isas:?} (best: {})", Isa::best());
    let p = QuantParams::with_bits(4.0 / 127.0, 0, 8, true).unwrap();
    let m = quantize_multiplier(0.0123).unwrap();
    let out = RequantOutput::new(-3, -128, 127).unwrap();
    let cparams: Vec<QuantParams> = (0..CHANNELS)
        .map(|c| QuantParams::with_bits(4.0 / 127.0 * (1.0 + c as f32 / 64.0), 0, 8, true).unwrap())
        .collect();
    let cm = ChannelMultipliers::new(
        &(0..CHANNELS)
            .map(|c| quantize_multiplier(0.01 + c as f64 * 1e-4).unwrap())
            .collect::<Vec<_>>(),
    );
    let mut inputs: Vec<Inputs> = SIZES
        .iter()
        .map(|&n| {
            let x = data(n, 0);
            let acc = x.iter().map(|v| (v * 5000.0) as i32).collect();
            Inputs {
                x,
                acc,
                q: vec![0i8; n],
                f: vec![0f32; n],
            }
        })
        .collect();

    type Kernel<'a> = Box<dyn Fn(&Kernels, &mut Inputs) + 'a>;
    let kernels: Vec<(&str, bool, Kernel)> = vec![
        (
            "quantize_f32_i8",
            false,
            Box::new(|k, d| k.quantize(black_box(&d.x), &p, &mut d.q).unwrap()),
        ),
        (
            "dequantize_i8_f32",
            false,
            Box::new(|k, d| k.dequantize(black_box(&d.q), &p, &mut d.f).unwrap()),
        ),
        (
            "fake_quantize_f32",
            false,
            Box::new(|k, d| k.fake_quantize(black_box(&d.x), &p, &mut d.f).unwrap()),
        ),
        (
            "quantize_stochastic_f32_i8",
            false,
            Box::new(|k, d| {
                k.quantize_stochastic(black_box(&d.x), &p, NoiseKey::from_seed(1), 0, &mut d.q)
                    .unwrap()
            }),
        ),
        (
            "min_max_f32",
            false,
            Box::new(|k, d| {
                black_box(k.min_max(black_box(&d.x)));
            }),
        ),
        (
            "requantize_i32_i8",
            false,
            Box::new(|k, d| k.requantize(black_box(&d.acc), m, &out, &mut d.q).unwrap()),
        ),
        (
            "quantize_per_channel_f32_i8",
            true,
            Box::new(|k, d| {
                let n = d.x.len() / CHANNELS * CHANNELS;
                let layout = ChannelLayout::new(&[CHANNELS, n / CHANNELS], 0).unwrap();
                k.quantize_per_channel(black_box(&d.x[..n]), &layout, &cparams, &mut d.q[..n])
                    .unwrap()
            }),
        ),
        (
            "requantize_per_channel_i32_i8",
            true,
            Box::new(|k, d| {
                let n = d.acc.len() / CHANNELS * CHANNELS;
                k.requantize_per_channel(black_box(&d.acc[..n]), &cm, &out, &mut d.q[..n])
                    .unwrap()
            }),
        ),
    ];

    kmeans_benches(c, &isas);

    for (name, per_channel, run) in &kernels {
        let mut g = c.benchmark_group(*name);
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(1200));
        for d in inputs.iter_mut() {
            let n = d.x.len();
            let elements = if *per_channel {
                n / CHANNELS * CHANNELS
            } else {
                n
            };
            g.throughput(Throughput::Bytes(4 * elements as u64));
            for &isa in &isas {
                let k = Kernels::new(isa).unwrap();
                g.bench_function(BenchmarkId::new(isa.name(), n), |b| b.iter(|| run(&k, d)));
            }
        }
        g.finish();
    }
}

/// `kmeans_assign/{isa}/{n}/{k}` and `kmeans_decode/{isa}/{n}/{k}`: throughput in bytes of
/// the f32 side; `kmeans_decode/copy/{n}/f32` is a plain copy of `n` f32 values.
fn kmeans_benches(c: &mut Criterion, isas: &[Isa]) {
    use quantbench_kernels::kmeans::Codebook;
    // decode straight from 4-bit packed indices (k = 16)
    {
        let mut g = c.benchmark_group("kmeans_decode_packed4");
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(1200));
        let cb = Codebook::new((0..16).map(|j| j as f32 * 0.5 - 4.0).collect()).unwrap();
        for n in [262_144usize, 16 << 20] {
            let idx: Vec<u8> = (0..n).map(|i| (i * 7 % 16) as u8).collect();
            let mut packed = vec![0u8; quantbench_kernels::pack::packed_len(n, 4)];
            quantbench_kernels::pack::pack_bits(&idx, 4, &mut packed).unwrap();
            let mut out = vec![0f32; n];
            g.throughput(Throughput::Bytes(4 * n as u64));
            for &isa in isas {
                let kern = Kernels::new(isa).unwrap();
                g.bench_function(BenchmarkId::new(isa.name(), format!("{n}/16")), |b| {
                    b.iter(|| {
                        kern.kmeans_decode_packed(black_box(&packed), 4, &cb, &mut out)
                            .unwrap()
                    })
                });
            }
        }
        g.finish();
    }
    for (name, decode) in [("kmeans_assign", false), ("kmeans_decode", true)] {
        let mut g = c.benchmark_group(name);
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(1200));
        for n in [65_539usize, 262_144, 16 << 20] {
            let x = data(n, 0);
            let mut idx = vec![0u8; n];
            let mut out = vec![0f32; n];
            g.throughput(Throughput::Bytes(4 * n as u64));
            if decode {
                // the yardstick of issue #3's decode goal: this machine's copy of the same
                // f32 array (bytes copied per second), measured next to the decodes
                let src = data(n, 1);
                g.bench_function(BenchmarkId::new("copy", format!("{n}/f32")), |b| {
                    b.iter(|| out.copy_from_slice(black_box(&src)))
                });
            }
            for k in [4usize, 16, 256] {
                let cb = Codebook::new((0..k).map(|j| (j as f32 / k as f32 - 0.5) * 8.0).collect())
                    .unwrap();
                Kernels::scalar().kmeans_assign(&x, &cb, &mut idx).unwrap();
                for &isa in isas {
                    let kern = Kernels::new(isa).unwrap();
                    let id = BenchmarkId::new(isa.name(), format!("{n}/{k}"));
                    if decode {
                        g.bench_function(id, |b| {
                            b.iter(|| kern.kmeans_decode(black_box(&idx), &cb, &mut out).unwrap())
                        });
                    } else {
                        g.bench_function(id, |b| {
                            b.iter(|| kern.kmeans_assign(black_box(&x), &cb, &mut idx).unwrap())
                        });
                    }
                }
            }
        }
        g.finish();
    }
}

/// The int8 GEMM shapes of issue #4: squares, ResNet-20's im2col shapes at batch 64 and a
/// transformer projection. Ids `gemm_u8i8_i32/{microkernel ISA}/{m}x{k}x{n}` and
/// `gemm_i8i8_i32/...`; throughput in elements is 2*m*k*n, so criterion's "elem/s" reads as
/// operations per second.
fn gemm_benches(c: &mut Criterion) {
    use quantbench_kernels::gemm::{gemm_i32, Microkernel, PackedB};
    let shapes = [
        (256usize, 256usize, 256usize),
        (1024, 1024, 1024),
        (128, 768, 768),
        (65536, 27, 16),
        (16384, 144, 32),
        (4096, 576, 64),
    ];
    for signed in [false, true] {
        let name = if signed {
            "gemm_i8i8_i32"
        } else {
            "gemm_u8i8_i32"
        };
        let mut g = c.benchmark_group(name);
        g.warm_up_time(Duration::from_millis(300));
        g.measurement_time(Duration::from_secs(1));
        g.sample_size(10);
        for &(m, k, n) in &shapes {
            let b: Vec<i8> = (0..k * n).map(|i| (i * 13 % 255) as u8 as i8).collect();
            let a: Vec<u8> = (0..m * k).map(|i| (i * 7 % 251) as u8).collect();
            let a_signed: Vec<i8> = a.iter().map(|&v| (v ^ 0x80) as i8).collect();
            let mut out = vec![0i32; m * n];
            g.throughput(Throughput::Elements((2 * m * k * n) as u64));
            for mk in Microkernel::available() {
                if mk == Microkernel::Scalar && m * k * n > 1 << 24 {
                    continue;
                }
                let id = BenchmarkId::new(mk.isa().name(), format!("{m}x{k}x{n}"));
                if signed {
                    let p = PackedB::new::<i8>(mk, &b, k, n, &[0]).unwrap();
                    g.bench_function(id, |bb| {
                        bb.iter(|| gemm_i32(black_box(&a_signed), m, -3, &p, &mut out, 1).unwrap())
                    });
                } else {
                    let p = PackedB::new::<u8>(mk, &b, k, n, &[0]).unwrap();
                    g.bench_function(id, |bb| {
                        bb.iter(|| gemm_i32(black_box(&a), m, 125, &p, &mut out, 1).unwrap())
                    });
                }
            }
        }
        g.finish();
    }
}

criterion_group!(kernels, benches, gemm_benches);
criterion_main!(kernels);
