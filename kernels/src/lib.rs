//! # quantbench-kernels
//!
//! Quantization kernels with a scalar reference (the spec) and AVX2, AVX-512 and NEON paths
//! behind one runtime dispatch point ([`isa`]). Safe API: slices and validated parameter
//! structs in, slices out; bad lengths or parameters are `Err`, never a panic.
//!
//! | family | module | SIMD-dispatched kernels |
//! |---|---|---|
//! | linear `r = S(q - Z)` | [`linear`] | min/max, quantize, dequantize, fake-quant, stochastic rounding |
//! | fixed point Qm.n, dynamic fixed point | [`fixed_point`] | (the linear kernels with a power-of-two scale) |
//! | integer-only requantization | [`integer_only`] | requantize i32 -> i8/u8/i16/u16, per tensor and per channel |
//! | int8 GEMM (u8/i8 x i8 -> i32, fused requantize) | [`gemm`] | AVX-512 VNNI, AVX2, NEON sdot / smull microkernels |
//! | k-means weight sharing | [`kmeans`] | assign (value -> nearest centroid), decode (index -> centroid), the exact clustering's row scans and the fast mode's keep pass; centroid gradients are scalar (their f64 sums in index order are the spec) |
//! | bit-packing of 1..=8-bit codes | [`pack`] | scalar (runs once per stored tensor) |
//!
//! NaN policy, the same everywhere: NaN is read as 0.0 (it quantizes to the zero point),
//! +-inf saturate to the ends of the code range, and range estimation ignores non-finite
//! values.

pub mod code;
pub mod error;
pub mod fixed_point;
pub mod gemm;
pub mod integer_only;
pub mod isa;
pub mod kmeans;
pub mod linear;
pub mod pack;
pub mod rng;

pub use code::{Code, CodeKind};
pub use error::KernelError;
pub use isa::{Isa, Kernels};
pub use linear::{ChannelLayout, LinearScheme, QuantParams};
pub use rng::NoiseKey;
