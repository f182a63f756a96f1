//! Criterion benchmarks of every dispatched kernel on every ISA this machine has.
//! Ids are `{kernel}/{isa}/{n}`; throughput is set in f32 (or i32) elements' bytes, so
//! criterion reports GB/s of the wide side of each kernel.
//!
//! `cargo bench -p quantbench-kernels` runs them all; filter with a substring, e.g.
//! `cargo bench -p quantbench-kernels -- quantize_f32_i8/avx512`.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quantbench_kernels::integer_only::{quantize_multiplier, ChannelMultipliers, RequantOutput};
use quantbench_kernels::{ChannelLayout, Isa, Kernels, NoiseKey, QuantParams};

const SIZES: [usize; 4] = [4096, 65539, 262_144, 16 << 20];
const CHANNELS: usize = 64;

fn data(n: usize) -> Vec<f32> {
    // deterministic, spread over the whole i8 range and beyond
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        })
        .collect()
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
    for &n in &SIZES {
        let x = data(n);
        let acc: Vec<i32> = x.iter().map(|v| (v * 5000.0) as i32).collect();
        let mut q = vec![0i8; n];
        let mut f = vec![0f32; n];
        let rows = n / CHANNELS;
        let layout = ChannelLayout::new(&[CHANNELS, rows], 0).unwrap();
        let xc = &x[..rows * CHANNELS];
        for &isa in &isas {
            let k = Kernels::new(isa).unwrap();
            let id = |name: &str| BenchmarkId::new(format!("{name}/{}", isa.name()), n);
            let mut g = c.benchmark_group("kernels");
            g.sample_size(20)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_millis(1200));
            g.throughput(Throughput::Bytes(4 * n as u64));
            g.bench_function(id("quantize_f32_i8"), |b| {
                b.iter(|| k.quantize(black_box(&x), &p, &mut q).unwrap())
            });
            g.bench_function(id("dequantize_i8_f32"), |b| {
                b.iter(|| k.dequantize(black_box(&q), &p, &mut f).unwrap())
            });
            g.bench_function(id("fake_quantize_f32"), |b| {
                b.iter(|| k.fake_quantize(black_box(&x), &p, &mut f).unwrap())
            });
            g.bench_function(id("quantize_stochastic_f32_i8"), |b| {
                b.iter(|| {
                    k.quantize_stochastic(black_box(&x), &p, NoiseKey::from_seed(1), 0, &mut q)
                        .unwrap()
                })
            });
            g.bench_function(id("min_max_f32"), |b| b.iter(|| k.min_max(black_box(&x))));
            g.bench_function(id("requantize_i32_i8"), |b| {
                b.iter(|| k.requantize(black_box(&acc), m, &out, &mut q).unwrap())
            });
            g.throughput(Throughput::Bytes(4 * (rows * CHANNELS) as u64));
            g.bench_function(id("quantize_per_channel_f32_i8"), |b| {
                b.iter(|| {
                    k.quantize_per_channel(
                        black_box(xc),
                        &layout,
                        &cparams,
                        &mut q[..rows * CHANNELS],
                    )
                    .unwrap()
                })
            });
            g.bench_function(id("requantize_per_channel_i32_i8"), |b| {
                b.iter(|| {
                    k.requantize_per_channel(
                        black_box(&acc[..rows * CHANNELS]),
                        &cm,
                        &out,
                        &mut q[..rows * CHANNELS],
                    )
                    .unwrap()
                })
            });
            g.finish();
        }
    }
}

criterion_group!(kernels, benches);
criterion_main!(kernels);
