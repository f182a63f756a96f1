//! Times the int8 convolution-GEMM (implicit im2col) against im2col + GEMM on one ResNet-20
//! layer shape: `cargo run --release -p quantbench-kernels --example conv_probe -- H C N`.

use std::time::Instant;

use quantbench_kernels::gemm::{
    conv_requantize, gemm_requantize, im2col, ConvGeometry, Epilogue, OutputScale,
};
use quantbench_kernels::integer_only::{Multiplier, RequantOutput};
use quantbench_kernels::Kernels;

fn best(mut f: impl FnMut()) -> f64 {
    let mut b = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..200 {
            f();
        }
        b = b.min(t.elapsed().as_secs_f64() / 200.0);
    }
    b
}

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|v| v.parse().expect("H C N as integers"))
        .collect();
    let (h, c, n) = (a[0], a[1], a[2]);
    let geo = ConvGeometry {
        batch: 1,
        height: h + 2,
        width: h + 2,
        channels: c,
        kernel: [3, 3],
        strides: [1, 1],
        dilations: [1, 1],
    };
    let k = geo.k();
    let x: Vec<u8> = (0..(h + 2) * (h + 2) * c)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let b: Vec<i8> = (0..k * n).map(|i| (i * 13 % 255) as u8 as i8).collect();
    let p = Kernels::active()
        .pack_b::<u8>(&b, k, n, &[0])
        .expect("pack");
    let epi = Epilogue {
        bias: None,
        scale: OutputScale::PerTensor(Multiplier::new(1 << 30, -12).expect("m")),
        output: RequantOutput::new(3, 3, 255).expect("out"),
    };
    let m = h * h;
    let mut out = vec![0u8; m * n];
    let t_conv = best(|| conv_requantize(&x, &geo, 5, &p, &epi, &mut out, 1).expect("conv"));
    let cols = im2col(&x, &geo).expect("im2col");
    let t_gemm = best(|| gemm_requantize(&cols, m, 5, &p, &epi, &mut out, 1).expect("gemm"));
    let mut acc = vec![0i32; m * n];
    let t_i32 = best(|| {
        quantbench_kernels::gemm::gemm_i32(&cols, m, 5, &p, &mut acc, 1).expect("gemm_i32")
    });
    let t_i2c = best(|| {
        std::hint::black_box(im2col(&x, &geo).expect("im2col"));
    });
    let ops = 2.0 * (m * k * n) as f64;
    println!(
        "{h}x{h}x{c} -> {n}: implicit conv {:.1} us ({:.0} GOPS), dense GEMM on im2col {:.1} us ({:.0} GOPS), im2col {:.1} us, i32 GEMM {:.1} us",
        t_conv * 1e6,
        ops / t_conv / 1e9,
        t_gemm * 1e6,
        ops / t_gemm / 1e9,
        t_i2c * 1e6,
        t_i32 * 1e6
    );
}
