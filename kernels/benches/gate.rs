//! The kernel performance gate of `cargo xtask bench` (issue #9): one fixed input per kernel
//! family, run three ways by the same binary.
//!
//! - `gate --probe KERNEL ISA` runs the kernel once (after one warm-up call) inside
//!   [`qb_measured`], so that `valgrind --tool=callgrind --toggle-collect='*qb_measured*'`
//!   counts the instructions of exactly that call. valgrind cannot execute AVX-512, so
//!   instruction counts exist for `scalar` and `avx2`.
//! - `gate --ratios ROUNDS KERNEL...` prints interleaved per-call medians of every ISA (see
//!   [`ratios`]); the gate's speed-ups over scalar come from these.
//! - `gate [criterion args]` (`cargo bench -p quantbench-kernels --bench gate`) times the same
//!   inputs with criterion (ids `gate_{kernel}/{isa}`), for a closer look at a failing kernel.
//! - `gate --list` prints the kernels, one per line, as `KERNEL ISA,ISA,...`.
//!
//! The inputs are deterministic and small enough to sit in L2 (64 KiB of f32 per operand), so
//! the timings measure the kernels rather than the memory bus of a shared machine.

mod common;

use common::data;
use std::hint::black_box;
use std::process::ExitCode;
use std::time::Duration;

use criterion::Criterion;
use quantbench_kernels::fixed_point::{FixedPointFormat, Rounding};
use quantbench_kernels::gemm::{
    conv_requantize, gemm_i32, ConvGeometry, Epilogue, Microkernel, OutputScale, PackedB,
};
use quantbench_kernels::integer_only::add::AddParams;
use quantbench_kernels::integer_only::{quantize_multiplier, ChannelMultipliers, RequantOutput};
use quantbench_kernels::kmeans::Codebook;
use quantbench_kernels::pack::{pack_bits, packed_len, unpack_bits};
use quantbench_kernels::{ChannelLayout, Isa, Kernels, NoiseKey, QuantParams};

/// Elements of the element-wise kernels: 16 Ki plus a tail that no vector width divides.
const N: usize = 16_384 + 13;
const CHANNELS: usize = 64;

type Run = Box<dyn FnMut()>;

struct Case {
    name: &'static str,
    /// `false` for kernels with one implementation (bit packing): instructions only.
    dispatched: bool,
    setup: fn(&Kernels) -> Run,
}

fn params() -> QuantParams {
    QuantParams::with_bits(4.0 / 127.0, 0, 8, true).unwrap()
}

fn requant_out() -> RequantOutput {
    RequantOutput::new(-3, -128, 127).unwrap()
}

fn channel_multipliers() -> ChannelMultipliers {
    ChannelMultipliers::new(
        &(0..CHANNELS)
            .map(|c| quantize_multiplier(0.01 + c as f64 * 1e-4).unwrap())
            .collect::<Vec<_>>(),
    )
}

fn accumulators(n: usize) -> Vec<i32> {
    data(n, 3).iter().map(|v| (v * 5000.0) as i32).collect()
}

fn codebook(k: usize) -> Codebook {
    Codebook::new((0..k).map(|j| (j as f32 / k as f32 - 0.5) * 8.0).collect()).unwrap()
}

fn codebook16() -> Codebook {
    codebook(16)
}

fn gemm_case(k: &Kernels, signed: bool) -> Run {
    let (m, kk, n) = (48usize, 256usize, 64usize);
    let mk = Microkernel::for_isa(k.isa());
    let b: Vec<i8> = (0..kk * n).map(|i| (i * 13 % 255) as u8 as i8).collect();
    let a: Vec<u8> = (0..m * kk).map(|i| (i * 7 % 251) as u8).collect();
    let mut c = vec![0i32; m * n];
    if signed {
        let a: Vec<i8> = a.iter().map(|&v| (v ^ 0x80) as i8).collect();
        let p = PackedB::new::<i8>(mk, &b, kk, n, &[0]).unwrap();
        Box::new(move || gemm_i32(black_box(&a), m, -3, &p, &mut c, 1).unwrap())
    } else {
        let p = PackedB::new::<u8>(mk, &b, kk, n, &[0]).unwrap();
        Box::new(move || gemm_i32(black_box(&a), m, 125, &p, &mut c, 1).unwrap())
    }
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "quantize_f32_i8",
            dispatched: true,
            setup: |k| {
                let (k, x, p, mut q) = (*k, data(N, 1), params(), vec![0i8; N]);
                Box::new(move || k.quantize(black_box(&x), &p, &mut q).unwrap())
            },
        },
        Case {
            name: "dequantize_i8_f32",
            dispatched: true,
            setup: |k| {
                let (k, p, mut f) = (*k, params(), vec![0f32; N]);
                let q: Vec<i8> = (0..N).map(|i| (i * 37 % 256) as u8 as i8).collect();
                Box::new(move || k.dequantize(black_box(&q), &p, &mut f).unwrap())
            },
        },
        Case {
            name: "fake_quantize_f32",
            dispatched: true,
            setup: |k| {
                let (k, x, p, mut f) = (*k, data(N, 1), params(), vec![0f32; N]);
                Box::new(move || k.fake_quantize(black_box(&x), &p, &mut f).unwrap())
            },
        },
        Case {
            name: "quantize_stochastic_f32_i8",
            dispatched: true,
            setup: |k| {
                let (k, x, p, mut q) = (*k, data(N, 1), params(), vec![0i8; N]);
                let key = NoiseKey::from_seed(1);
                Box::new(move || {
                    k.quantize_stochastic(black_box(&x), &p, key, 0, &mut q)
                        .unwrap()
                })
            },
        },
        Case {
            name: "min_max_f32",
            dispatched: true,
            setup: |k| {
                let (k, x) = (*k, data(N, 1));
                Box::new(move || {
                    black_box(k.min_max(black_box(&x)));
                })
            },
        },
        Case {
            name: "quantize_per_channel_f32_i8",
            dispatched: true,
            setup: |k| {
                let n = N / CHANNELS * CHANNELS;
                let (k, x, mut q) = (*k, data(n, 1), vec![0i8; n]);
                let layout = ChannelLayout::new(&[CHANNELS, n / CHANNELS], 0).unwrap();
                let ps: Vec<QuantParams> = (0..CHANNELS)
                    .map(|c| {
                        QuantParams::with_bits(4.0 / 127.0 * (1.0 + c as f32 / 64.0), 0, 8, true)
                            .unwrap()
                    })
                    .collect();
                Box::new(move || {
                    k.quantize_per_channel(black_box(&x), &layout, &ps, &mut q)
                        .unwrap()
                })
            },
        },
        Case {
            name: "fixed_quantize_q3_4_i8",
            dispatched: true,
            setup: |k| {
                let (k, x, mut q) = (*k, data(N, 1), vec![0i8; N]);
                let f = FixedPointFormat::new(8, 4).unwrap();
                Box::new(move || {
                    k.fixed_quantize(black_box(&x), &f, Rounding::NearestEven, &mut q)
                        .unwrap()
                })
            },
        },
        Case {
            name: "dynamic_fixed_point_8",
            dispatched: true,
            setup: |k| {
                let (k, x) = (*k, data(N, 1));
                Box::new(move || {
                    black_box(k.dynamic_fixed_point(black_box(&x), 8).unwrap());
                })
            },
        },
        Case {
            name: "requantize_i32_i8",
            dispatched: true,
            setup: |k| {
                let (k, acc, out, mut q) = (*k, accumulators(N), requant_out(), vec![0i8; N]);
                let m = quantize_multiplier(0.0123).unwrap();
                Box::new(move || k.requantize(black_box(&acc), m, &out, &mut q).unwrap())
            },
        },
        Case {
            name: "requantize_per_channel_i32_i8",
            dispatched: true,
            setup: |k| {
                let n = N / CHANNELS * CHANNELS;
                let (k, acc, out, mut q) = (*k, accumulators(n), requant_out(), vec![0i8; n]);
                let cm = channel_multipliers();
                Box::new(move || {
                    k.requantize_per_channel(black_box(&acc), &cm, &out, &mut q)
                        .unwrap()
                })
            },
        },
        Case {
            name: "add_requantize_u8",
            dispatched: true,
            setup: |k| {
                let k = *k;
                let a: Vec<u8> = (0..N).map(|i| (i * 7 % 256) as u8).collect();
                let b: Vec<u8> = (0..N).map(|i| (i * 11 % 256) as u8).collect();
                let mut out = vec![0u8; N];
                let p = AddParams::new(
                    (0.05, 128),
                    (0.07, 120),
                    0.09,
                    RequantOutput::new(3, 0, 255).unwrap(),
                )
                .unwrap();
                Box::new(move || {
                    k.add_requantize(black_box(&a), black_box(&b), &p, &mut out)
                        .unwrap()
                })
            },
        },
        Case {
            name: "kmeans_assign_16",
            dispatched: true,
            setup: |k| {
                let (k, x, cb, mut idx) = (*k, data(N, 1), codebook16(), vec![0u8; N]);
                Box::new(move || k.kmeans_assign(black_box(&x), &cb, &mut idx).unwrap())
            },
        },
        Case {
            name: "kmeans_assign_256",
            dispatched: true,
            setup: |k| {
                let (k, x, cb, mut idx) = (*k, data(N, 1), codebook(256), vec![0u8; N]);
                Box::new(move || k.kmeans_assign(black_box(&x), &cb, &mut idx).unwrap())
            },
        },
        Case {
            name: "kmeans_decode_packed4",
            dispatched: true,
            setup: |k| {
                let (k, cb, mut out) = (*k, codebook16(), vec![0f32; N]);
                let idx: Vec<u8> = (0..N).map(|i| (i * 7 % 16) as u8).collect();
                let mut packed = vec![0u8; packed_len(N, 4)];
                pack_bits(&idx, 4, &mut packed).unwrap();
                Box::new(move || {
                    k.kmeans_decode_packed(black_box(&packed), 4, &cb, &mut out)
                        .unwrap()
                })
            },
        },
        Case {
            name: "kmeans_fast_16",
            dispatched: true,
            setup: |k| {
                let (k, x) = (*k, data(N, 1));
                Box::new(move || {
                    black_box(k.kmeans_fast(black_box(&x), 16).unwrap());
                })
            },
        },
        Case {
            name: "pack_bits_3",
            dispatched: false,
            setup: |_| {
                let fields: Vec<u8> = (0..N).map(|i| (i * 5 % 8) as u8).collect();
                let mut packed = vec![0u8; packed_len(N, 3)];
                Box::new(move || pack_bits(black_box(&fields), 3, &mut packed).unwrap())
            },
        },
        Case {
            name: "unpack_bits_3",
            dispatched: false,
            setup: |_| {
                let fields: Vec<u8> = (0..N).map(|i| (i * 5 % 8) as u8).collect();
                let mut packed = vec![0u8; packed_len(N, 3)];
                pack_bits(&fields, 3, &mut packed).unwrap();
                let mut out = vec![0u8; N];
                Box::new(move || unpack_bits(black_box(&packed), 3, &mut out).unwrap())
            },
        },
        Case {
            name: "gemm_u8i8_i32_48x256x64",
            dispatched: true,
            setup: |k| gemm_case(k, false),
        },
        Case {
            name: "gemm_i8i8_i32_48x256x64",
            dispatched: true,
            setup: |k| gemm_case(k, true),
        },
        Case {
            name: "conv3x3_requantize_u8_8x8x32",
            dispatched: true,
            setup: |k| {
                // a ResNet-20 stage-2 style 3x3 convolution on a zero-point-padded 10x10x32
                // NHWC input: M = 64 output pixels, K = 288, N = 32 channels
                let geo = ConvGeometry {
                    batch: 1,
                    height: 10,
                    width: 10,
                    channels: 32,
                    kernel: [3, 3],
                    strides: [1, 1],
                    dilations: [1, 1],
                };
                let kk = 9 * 32;
                let n = 32;
                let b: Vec<i8> = (0..kk * n).map(|i| (i * 13 % 255) as u8 as i8).collect();
                let x: Vec<u8> = (0..10 * 10 * 32).map(|i| (i * 7 % 251) as u8).collect();
                let p = PackedB::new::<u8>(Microkernel::for_isa(k.isa()), &b, kk, n, &[0]).unwrap();
                let epi = Epilogue {
                    bias: Some((0..n as i32).map(|c| c * 100 - 1600).collect()),
                    scale: OutputScale::PerChannel(ChannelMultipliers::new(
                        &(0..n)
                            .map(|c| quantize_multiplier(0.0004 + c as f64 * 1e-5).unwrap())
                            .collect::<Vec<_>>(),
                    )),
                    output: RequantOutput::new(0, 0, 255).unwrap(),
                };
                let mut out = vec![0u8; 64 * n];
                Box::new(move || {
                    conv_requantize(black_box(&x), &geo, 7, &p, &epi, &mut out, 1).unwrap()
                })
            },
        },
    ]
}

/// The ISAs a case runs on here: every available ISA for dispatched kernels, scalar otherwise.
fn isas_of(case: &Case) -> Vec<Isa> {
    if case.dispatched {
        Isa::available()
    } else {
        vec![Isa::Scalar]
    }
}

/// The one function callgrind collects in (`--toggle-collect='*qb_measured*'`).
#[inline(never)]
fn qb_measured(run: &mut dyn FnMut()) {
    run();
}

fn probe(kernel: &str, isa: &str) -> Result<(), String> {
    let case = cases()
        .into_iter()
        .find(|c| c.name == kernel)
        .ok_or_else(|| format!("unknown kernel '{kernel}' (see --list)"))?;
    let isa = Isa::from_name(isa).ok_or_else(|| format!("unknown ISA '{isa}'"))?;
    if !isas_of(&case).contains(&isa) {
        return Err(format!("{kernel} does not run on {isa} here"));
    }
    let k = Kernels::new(isa).map_err(|e| e.to_string())?;
    let mut run = (case.setup)(&k);
    run(); // warm-up: lazy detection, thread-local scratch
    qb_measured(&mut run);
    Ok(())
}

/// `gate --ratios`: per-call median time of every ISA of the given kernels, from `rounds`
/// rounds in which the ISAs of one kernel run back to back (in a rotating order), each for a
/// batch of about `BATCH` of work. Prints `KERNEL ISA MEDIAN_NS` lines.
///
/// This is what the gate's speed-ups are computed from, rather than criterion's timings:
/// criterion measures one benchmark after the other in blocks of a second, and on a shared
/// machine the speed changes between blocks by more than the gate's tolerance; interleaved
/// samples see the same machine speed for every ISA of a round.
fn ratios(kernels: &[String], rounds: usize) -> Result<(), String> {
    const BATCH: Duration = Duration::from_millis(2);
    // long kernels (a k-means fit) get fewer rounds: about this much time each, at least 21
    const KERNEL_BUDGET: Duration = Duration::from_millis(1000);
    let all = cases();
    for name in kernels {
        let case = all
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| format!("unknown kernel '{name}' (see --list)"))?;
        if !case.dispatched {
            continue;
        }
        // (ISA, kernel call, calls per batch)
        let mut runs: Vec<(Isa, Run, usize)> = isas_of(case)
            .into_iter()
            .map(|isa| (isa, (case.setup)(&Kernels::new(isa).unwrap()), 1))
            .collect();
        // warm up and size each ISA's batch to about BATCH
        let mut round_s = 0.0;
        for (_, run, batch) in runs.iter_mut() {
            let t = std::time::Instant::now();
            let mut calls = 0usize;
            while t.elapsed() < BATCH * 5 || calls < 3 {
                run();
                calls += 1;
            }
            let per_call = t.elapsed().as_secs_f64() / calls as f64;
            *batch = ((BATCH.as_secs_f64() / per_call).round() as usize).max(1);
            round_s += per_call * *batch as f64;
        }
        let rounds = rounds.min(((KERNEL_BUDGET.as_secs_f64() / round_s) as usize).max(21));
        let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); runs.len()];
        for r in 0..rounds {
            for j in 0..runs.len() {
                let i = (j + r) % runs.len();
                let (_, run, batch) = &mut runs[i];
                let t = std::time::Instant::now();
                for _ in 0..*batch {
                    run();
                }
                samples[i].push(t.elapsed().as_nanos() as f64 / *batch as f64);
            }
        }
        for ((isa, _, _), mut s) in runs.iter().zip(samples) {
            s.sort_by(f64::total_cmp);
            println!("{} {} {:.1}", case.name, isa.name(), s[s.len() / 2]);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--probe") {
        return match probe(
            args.get(1).map_or("", String::as_str),
            args.get(2).map_or("", String::as_str),
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gate --probe: {e}");
                ExitCode::from(2)
            }
        };
    }
    if args.first().map(String::as_str) == Some("--ratios") {
        let rounds = args
            .get(1)
            .and_then(|r| r.parse::<usize>().ok())
            .filter(|&r| r >= 1);
        let Some(rounds) = rounds else {
            eprintln!("gate --ratios: expected ROUNDS KERNEL...");
            return ExitCode::from(2);
        };
        return match ratios(&args[2..], rounds) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gate --ratios: {e}");
                ExitCode::from(2)
            }
        };
    }
    if args.first().map(String::as_str) == Some("--list") {
        for case in cases() {
            let isas: Vec<&str> = isas_of(&case).iter().map(|i| i.name()).collect();
            println!("{} {}", case.name, isas.join(","));
        }
        return ExitCode::SUCCESS;
    }
    let mut c = Criterion::default()
        .sample_size(15)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(500))
        .configure_from_args();
    for case in cases() {
        if !case.dispatched {
            continue;
        }
        let mut g = c.benchmark_group(format!("gate_{}", case.name));
        for isa in isas_of(&case) {
            let k = Kernels::new(isa).unwrap();
            let mut run = (case.setup)(&k);
            g.bench_function(isa.name(), |b| b.iter(&mut run));
        }
        g.finish();
    }
    c.final_summary();
    ExitCode::SUCCESS
}
