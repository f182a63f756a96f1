//! Integer-only elementwise addition of two quantized tensors with different scales (the
//! TFLite / gemmlowp scheme): both inputs are centred, shifted left by 20 bits, rescaled to a
//! common scale with a fixed-point multiplier each, added, and requantized to the output.
//!
//! ```text
//! twice_max = 2 * max(s_a, s_b)
//! a' = mbqm((a - z_a) << 20, s_a / twice_max)        // mbqm: multiply_by_quantized_multiplier
//! b' = mbqm((b - z_b) << 20, s_b / twice_max)
//! y  = clamp(mbqm(a' + b', twice_max / (2^20 s_y)) + z_y, act_min, act_max)
//! ```
//! The scalar loop is the spec. AVX-512 has a hand-written 16-lane kernel (right-shift
//! multipliers, the normal case) and AVX2 an 8-lane one (right-shift input multipliers, which
//! `AddParams::new` always makes); otherwise the same loop compiled for the ISA runs. All are
//! tested bit-exact against the spec.

use super::scalar::{multiply_by_quantized_multiplier, requantize_one};
use super::{quantize_multiplier, Multiplier, RequantOutput};
use crate::code::Code;
use crate::error::{check_len, KernelError};
#[cfg(target_arch = "x86_64")]
use crate::isa::Isa;
use crate::isa::Kernels;

const LEFT_SHIFT: i32 = 20;

/// Parameters of one quantized addition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddParams {
    pub a_zero_point: i32,
    pub b_zero_point: i32,
    pub a_multiplier: Multiplier,
    pub b_multiplier: Multiplier,
    pub out_multiplier: Multiplier,
    pub output: RequantOutput,
}

impl AddParams {
    /// From the real scales: inputs `(s_a, z_a)`, `(s_b, z_b)`, output scale `s_y` and the
    /// output zero point / clamp range in `output`.
    pub fn new(
        (s_a, z_a): (f32, i32),
        (s_b, z_b): (f32, i32),
        s_y: f32,
        output: RequantOutput,
    ) -> Result<AddParams, KernelError> {
        for s in [s_a, s_b, s_y] {
            if !(s.is_finite() && s > 0.0) {
                return Err(KernelError::Scale { scale: s });
            }
        }
        let twice_max = 2.0 * (s_a as f64).max(s_b as f64);
        Ok(AddParams {
            a_zero_point: z_a,
            b_zero_point: z_b,
            a_multiplier: quantize_multiplier(s_a as f64 / twice_max)?,
            b_multiplier: quantize_multiplier(s_b as f64 / twice_max)?,
            out_multiplier: quantize_multiplier(
                twice_max / ((1u64 << LEFT_SHIFT) as f64 * s_y as f64),
            )?,
            output,
        })
    }
}

/// One output code (the spec).
#[inline(always)]
pub fn add_one(a: i32, b: i32, p: &AddParams) -> i32 {
    let x = multiply_by_quantized_multiplier((a - p.a_zero_point) << LEFT_SHIFT, p.a_multiplier);
    let y = multiply_by_quantized_multiplier((b - p.b_zero_point) << LEFT_SHIFT, p.b_multiplier);
    requantize_one(
        x.wrapping_add(y),
        p.out_multiplier,
        p.output.zero_point,
        p.output.act_min,
        p.output.act_max,
    )
}

#[inline(always)]
fn add_loop<T: Code>(a: &[T], b: &[T], p: &AddParams, out: &mut [T]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = T::from_i32(add_one(x.to_i32(), y.to_i32(), p));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_avx2<T: Code>(a: &[T], b: &[T], p: &AddParams, out: &mut [T]) {
    add_loop(a, b, p, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn add_avx512<T: Code>(a: &[T], b: &[T], p: &AddParams, out: &mut [T]) {
    add_loop(a, b, p, out)
}

impl Kernels {
    /// `out = a + b` of quantized tensors (see the module docs). All slices have one length;
    /// codes must lie in the type's range, the output range must fit `T`.
    pub fn add_requantize<T: Code>(
        &self,
        a: &[T],
        b: &[T],
        p: &AddParams,
        out: &mut [T],
    ) -> Result<(), KernelError> {
        check_len("add_requantize: b", a.len(), b.len())?;
        check_len("add_requantize: output", a.len(), out.len())?;
        if p.output.act_min < T::MIN || p.output.act_max > T::MAX {
            return Err(KernelError::Range {
                message: format!(
                    "add_requantize: output range [{}, {}] does not fit {} codes",
                    p.output.act_min,
                    p.output.act_max,
                    T::NAME
                ),
            });
        }
        for z in [p.a_zero_point, p.b_zero_point] {
            if !(T::MIN..=T::MAX).contains(&z) {
                return Err(KernelError::Range {
                    message: format!(
                        "add_requantize: input zero point {z} is not a {} code",
                        T::NAME
                    ),
                });
            }
        }
        match self.dispatch() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Kernels only holds ISAs the CPU supports. The hand-written kernel handles
            // right-shift multipliers (all below 1, the normal case); the compiled loop the rest.
            Isa::Avx512 => unsafe {
                if !super::x86_avx512::add_requantize(a, b, p, out) {
                    add_avx512(a, b, p, out)
                }
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe {
                if !super::x86_avx2::add_requantize(a, b, p, out) {
                    add_avx2(a, b, p, out)
                }
            },
            // NEON is baseline on aarch64: the compiler vectorises the plain loop
            _ => add_loop(a, b, p, out),
        }
        Ok(())
    }
}
