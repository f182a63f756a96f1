//! Linear (affine) quantization, `r = scale * (q - zero_point)`: parameter selection,
//! quantize, dequantize, fake-quant (quantize + dequantize in one pass) and stochastic
//! rounding, per tensor and per channel along any axis.
//!
//! The semantics are defined in [`scalar`]; `x86_avx2`, `x86_avx512` and `aarch64_neon` are
//! the same functions, name for name, reproducing it bit for bit.

#[cfg(target_arch = "aarch64")]
pub(crate) mod aarch64_neon;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_avx512;

use crate::code::Code;
use crate::error::{check_len, KernelError};
use crate::isa::Kernels;
use crate::rng::NoiseKey;

/// Smallest accepted scale, 2^-100. Together with [`MAX_SCALE`] this keeps the reciprocal,
/// `scale * 2^17` and every quotient that can round to a nonzero code far from f32 overflow
/// and underflow, which is what the exact division of the SIMD paths needs.
pub const MIN_SCALE: f32 = 7.888_609e-31;
/// Largest accepted scale, 2^100 (dequantized values up to 65535 * 2^100 stay finite).
pub const MAX_SCALE: f32 = 1.267_650_6e30;

/// Parameters of one linear quantizer. Constructed only through [`QuantParams::new`], so every
/// value obeys: `scale` finite in [`MIN_SCALE`, `MAX_SCALE`], `i16::MIN <= qmin <= qmax <=
/// u16::MAX`, `qmin <= zero_point <= qmax`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantParams {
    pub(crate) scale: f32,
    pub(crate) inv_scale: f32,
    /// `scale * 2^17`: inputs beyond +-limit saturate whatever the code range (|codes| <= 2^16),
    /// so SIMD paths clamp to it first and never overflow the reciprocal product.
    pub(crate) limit: f32,
    pub(crate) zero_point: i32,
    pub(crate) qmin: i32,
    pub(crate) qmax: i32,
}

impl QuantParams {
    /// Validated parameters; `[qmin, qmax]` is the code range values are clamped to.
    pub fn new(scale: f32, zero_point: i32, qmin: i32, qmax: i32) -> Result<Self, KernelError> {
        if !(MIN_SCALE..=MAX_SCALE).contains(&scale) {
            return Err(KernelError::Scale { scale });
        }
        if qmin > qmax || qmin < i16::MIN as i32 || qmax > u16::MAX as i32 {
            return Err(KernelError::Range {
                message: format!(
                    "code range [{qmin}, {qmax}]: expected qmin <= qmax inside [-32768, 65535]"
                ),
            });
        }
        if !(qmin..=qmax).contains(&zero_point) {
            return Err(KernelError::Range {
                message: format!(
                    "zero_point = {zero_point}: outside the code range [{qmin}, {qmax}]"
                ),
            });
        }
        Ok(QuantParams {
            scale,
            inv_scale: 1.0 / scale,
            limit: scale * 131_072.0,
            zero_point,
            qmin,
            qmax,
        })
    }

    /// Parameters whose code range is the full range of `bits`-bit signed or unsigned codes.
    pub fn with_bits(
        scale: f32,
        zero_point: i32,
        bits: u32,
        signed: bool,
    ) -> Result<Self, KernelError> {
        let (qmin, qmax) = qrange(bits, signed)?;
        QuantParams::new(scale, zero_point, qmin, qmax)
    }

    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// `fl32(1 / scale)`, the reciprocal the SIMD paths multiply by before their correction.
    pub fn inv_scale(&self) -> f32 {
        self.inv_scale
    }
    pub fn zero_point(&self) -> i32 {
        self.zero_point
    }
    pub fn qmin(&self) -> i32 {
        self.qmin
    }
    pub fn qmax(&self) -> i32 {
        self.qmax
    }

    /// The scalar reference for one value (see [`scalar::quantize_one`]).
    pub fn quantize_one(&self, x: f32) -> i32 {
        scalar::quantize_one(x, self)
    }
    /// The scalar reference for one code (see [`scalar::dequantize_one`]).
    pub fn dequantize_one(&self, q: i32) -> f32 {
        scalar::dequantize_one(q, self)
    }

    /// Errors unless codes of these parameters fit `T`.
    pub fn check_code<T: Code>(&self) -> Result<(), KernelError> {
        if self.qmin < T::MIN || self.qmax > T::MAX {
            return Err(KernelError::Range {
                message: format!(
                    "code range [{}, {}] does not fit {} codes [{}, {}]",
                    self.qmin,
                    self.qmax,
                    T::NAME,
                    T::MIN,
                    T::MAX
                ),
            });
        }
        Ok(())
    }
}

/// Code range of `bits`-bit codes: signed `[-2^(b-1), 2^(b-1) - 1]`, unsigned `[0, 2^b - 1]`.
/// Supported widths: 1..=8 and 16.
pub fn qrange(bits: u32, signed: bool) -> Result<(i32, i32), KernelError> {
    if !((1..=8).contains(&bits) || bits == 16) {
        return Err(KernelError::Bits {
            bits,
            what: "linear quantization supports 1..=8 and 16 bits",
        });
    }
    Ok(if signed {
        (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    } else {
        (0, (1 << bits) - 1)
    })
}

/// How parameters are chosen from data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearScheme {
    pub bits: u32,
    /// Signed (`i8`/`i16`) or unsigned (`u8`/`u16`) codes.
    pub signed: bool,
    /// Symmetric: zero point fixed at the middle of the range, scale from max |x|.
    /// Asymmetric: scale and zero point from min and max.
    pub symmetric: bool,
}

impl LinearScheme {
    /// A validated scheme: bits in 1..=8 or 16; symmetric needs bits >= 2.
    pub fn new(bits: u32, signed: bool, symmetric: bool) -> Result<Self, KernelError> {
        qrange(bits, signed)?;
        if symmetric && bits < 2 {
            return Err(KernelError::Bits {
                bits,
                what: "symmetric quantization needs at least 2 bits (one positive level)",
            });
        }
        Ok(LinearScheme {
            bits,
            signed,
            symmetric,
        })
    }

    /// `(qmin, qmax)` of the scheme's codes.
    pub fn qrange(&self) -> (i32, i32) {
        qrange(self.bits, self.signed).expect("validated in LinearScheme::new")
    }

    /// Parameters for data whose finite values lie in `[min, max]` (`None`: no finite value).
    ///
    /// The range is first widened to include 0 (`lo = min(min, 0)`, `hi = max(max, 0)`) so
    /// that 0.0 is exactly representable (zero padding, ReLU outputs).
    ///
    /// * Asymmetric (ONNX DynamicQuantizeLinear's formula, in f32):
    ///   `scale = (hi - lo) / (qmax - qmin)`,
    ///   `zero_point = rne(clamp(qmin - lo / scale, qmin, qmax))`.
    /// * Symmetric: `m = max(|lo|, hi)`, `zero_point = 0` (signed) or `2^(bits-1)` (unsigned),
    ///   `scale = m / (2^(bits-1) - 1)`, so the codes used are `zero_point +- (2^(bits-1) - 1)`.
    ///
    /// Corrections to the seed's Python, which referenced an undefined `dtype` and rounded the
    /// zero point before clamping it: here the code range comes from `bits` and `signed`
    /// ([`qrange`]), and the zero point is clamped to it first, then rounded half to even (for
    /// integer bounds both orders give the same integer; clamping first keeps the value
    /// finite before any conversion).
    ///
    /// Degenerate input never yields NaN, inf or a division by zero: an all-zero (or empty,
    /// or all-NaN) tensor gets `scale = 1`; any scale is finally clamped to
    /// [`MIN_SCALE`, `MAX_SCALE`] (data beyond `MAX_SCALE * 2^bits` saturates).
    pub fn params_from_range(&self, range: Option<(f32, f32)>) -> Result<QuantParams, KernelError> {
        let (qmin, qmax) = self.qrange();
        let (min, max) = range.unwrap_or((0.0, 0.0));
        if !min.is_finite() || !max.is_finite() || min > max {
            return Err(KernelError::Range {
                message: format!("data range [{min}, {max}]: expected finite min <= max"),
            });
        }
        let lo = min.min(0.0);
        let hi = max.max(0.0);
        if self.symmetric {
            let half = 1i32 << (self.bits - 1);
            let zero_point = if self.signed { 0 } else { half };
            let m = (-lo).max(hi);
            let scale = fix_scale(m / (half - 1) as f32, m == 0.0);
            return QuantParams::new(scale, zero_point, qmin, qmax);
        }
        let mut span = hi - lo;
        if !span.is_finite() {
            span = (hi as f64 - lo as f64) as f32; // rounds to f32::MAX or inf: clamped below
        }
        let scale = fix_scale(span / (qmax - qmin) as f32, span == 0.0);
        let zp = (qmin as f32 - lo / scale).clamp(qmin as f32, qmax as f32);
        QuantParams::new(scale, zp.round_ties_even() as i32, qmin, qmax)
    }
}

fn fix_scale(scale: f32, zero_range: bool) -> f32 {
    if zero_range || scale.is_nan() {
        1.0
    } else {
        scale.clamp(MIN_SCALE, MAX_SCALE)
    }
}

/// A tensor viewed as `[outer, channels, inner]` around its quantization axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelLayout {
    pub outer: usize,
    pub channels: usize,
    pub inner: usize,
}

impl ChannelLayout {
    /// The layout of a row-major tensor of `shape` with channels along `axis`.
    pub fn new(shape: &[usize], axis: usize) -> Result<Self, KernelError> {
        if axis >= shape.len() {
            return Err(KernelError::Shape {
                message: format!("axis {axis} out of range for shape {shape:?}"),
            });
        }
        let outer = shape[..axis]
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d));
        let inner = shape[axis + 1..]
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d));
        match (outer, inner) {
            (Some(outer), Some(inner)) if outer.checked_mul(shape[axis] * inner).is_some() => {
                Ok(ChannelLayout {
                    outer,
                    channels: shape[axis],
                    inner,
                })
            }
            _ => Err(KernelError::Shape {
                message: format!("shape {shape:?} has more elements than fit in memory"),
            }),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.outer * self.channels * self.inner
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values of each channel, gathered into one vector per channel.
    pub fn gather(&self, x: &[f32]) -> Result<Vec<Vec<f32>>, KernelError> {
        check_len("per-channel data", self.len(), x.len())?;
        let mut channels = vec![Vec::with_capacity(self.outer * self.inner); self.channels];
        for (s, c) in self.runs() {
            channels[c].extend_from_slice(&x[s..s + self.inner]);
        }
        Ok(channels)
    }

    /// `(start, channel)` of every contiguous run of `inner` elements sharing one channel.
    pub fn runs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.outer * self.channels).map(move |r| (r * self.inner, r % self.channels))
    }
}

/// Matches on the handle's ISA and calls the function of the same name in the ISA's module.
/// Expands to `match k.dispatch() { Isa::Scalar => scalar::f(..), Isa::Avx2 => unsafe {
/// x86_avx2::f(..) }, ... }`; the unsafe calls are sound because a `Kernels` value exists only
/// for an ISA the CPU supports.
macro_rules! dispatch {
    ($k:expr, $f:ident $(::<$t:ty>)? ($($arg:expr),*)) => {
        match $k.dispatch() {
            crate::isa::Isa::Scalar => scalar::$f$(::<$t>)?($($arg),*),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Kernels::new/active only hold ISAs the CPU supports.
            crate::isa::Isa::Avx2 => unsafe { x86_avx2::$f$(::<$t>)?($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            crate::isa::Isa::Avx512 => unsafe { x86_avx512::$f$(::<$t>)?($($arg),*) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above.
            crate::isa::Isa::Neon => unsafe { aarch64_neon::$f$(::<$t>)?($($arg),*) },
            #[allow(unreachable_patterns)]
            isa => unreachable!("Kernels holds {isa}, which this build cannot run"),
        }
    };
}
pub(crate) use dispatch;

impl Kernels {
    /// Smallest and largest finite value of `x` (NaN and +-inf ignored).
    pub fn min_max(&self, x: &[f32]) -> Option<(f32, f32)> {
        dispatch!(self, min_max(x))
    }

    /// Smallest and largest finite value of each channel of `x` viewed through `layout`.
    pub fn min_max_per_channel(
        &self,
        x: &[f32],
        layout: &ChannelLayout,
    ) -> Result<Vec<Option<(f32, f32)>>, KernelError> {
        check_len("per-channel data", layout.len(), x.len())?;
        let mut ranges: Vec<Option<(f32, f32)>> = vec![None; layout.channels];
        for (start, c) in layout.runs() {
            if let Some((lo, hi)) = self.min_max(&x[start..start + layout.inner]) {
                ranges[c] = Some(ranges[c].map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))));
            }
        }
        Ok(ranges)
    }

    /// Per-tensor parameters for `x` under `scheme`.
    pub fn choose_params(
        &self,
        x: &[f32],
        scheme: &LinearScheme,
    ) -> Result<QuantParams, KernelError> {
        scheme.params_from_range(self.min_max(x))
    }

    /// One parameter set per channel of `x` viewed through `layout`.
    pub fn choose_params_per_channel(
        &self,
        x: &[f32],
        layout: &ChannelLayout,
        scheme: &LinearScheme,
    ) -> Result<Vec<QuantParams>, KernelError> {
        check_len("per-channel data", layout.len(), x.len())?;
        let ranges = self.min_max_per_channel(x, layout)?;
        ranges
            .into_iter()
            .map(|r| scheme.params_from_range(r))
            .collect()
    }

    /// `out[i] = quantize(x[i])`, round half to even (see [`scalar`]).
    pub fn quantize<T: Code>(
        &self,
        x: &[f32],
        p: &QuantParams,
        out: &mut [T],
    ) -> Result<(), KernelError> {
        check_len("quantize output", x.len(), out.len())?;
        p.check_code::<T>()?;
        dispatch!(self, quantize::<T>(x, p, out));
        Ok(())
    }

    /// `out[i] = scale * (q[i] - zero_point)`.
    pub fn dequantize<T: Code>(
        &self,
        q: &[T],
        p: &QuantParams,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        check_len("dequantize output", q.len(), out.len())?;
        dispatch!(self, dequantize::<T>(q, p, out));
        Ok(())
    }

    /// `out[i] = dequantize(quantize(x[i]))` in one pass.
    pub fn fake_quantize(
        &self,
        x: &[f32],
        p: &QuantParams,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        check_len("fake_quantize output", x.len(), out.len())?;
        dispatch!(self, fake_quantize(x, p, out));
        Ok(())
    }

    /// Fake-quant in place (used by simulation and training).
    pub fn fake_quantize_in_place(&self, x: &mut [f32], p: &QuantParams) {
        dispatch!(self, fake_quantize_in_place(x, p))
    }

    /// Stochastic rounding: element `i` rounds up with probability equal to the fractional
    /// part of `x[i] / scale`, using the noise of counter `offset + i` under `key`
    /// (see [`crate::rng`]); the result depends only on `(key, offset + i, x[i])`.
    pub fn quantize_stochastic<T: Code>(
        &self,
        x: &[f32],
        p: &QuantParams,
        key: NoiseKey,
        offset: u32,
        out: &mut [T],
    ) -> Result<(), KernelError> {
        check_len("quantize_stochastic output", x.len(), out.len())?;
        p.check_code::<T>()?;
        dispatch!(self, quantize_stochastic::<T>(x, p, key, offset, out));
        Ok(())
    }

    /// Per-channel quantize: channel `c` of `layout` uses `params[c]`.
    pub fn quantize_per_channel<T: Code>(
        &self,
        x: &[f32],
        layout: &ChannelLayout,
        params: &[QuantParams],
        out: &mut [T],
    ) -> Result<(), KernelError> {
        check_per_channel(layout, params, x.len(), out.len())?;
        for p in params {
            p.check_code::<T>()?;
        }
        // The AVX-512 path picks its store kind on the whole tensor's size, not a run's.
        #[cfg(target_arch = "x86_64")]
        let stream = x.len() >= x86_avx512::STREAM_MIN;
        for (s, c) in layout.runs() {
            let e = s + layout.inner;
            let (x, p, out) = (&x[s..e], &params[c], &mut out[s..e]);
            match self.dispatch() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: Kernels only holds ISAs the CPU supports.
                crate::isa::Isa::Avx512 => unsafe {
                    x86_avx512::quantize_streaming::<T>(x, p, out, stream)
                },
                _ => dispatch!(self, quantize::<T>(x, p, out)),
            }
        }
        Ok(())
    }

    /// Per-channel dequantize.
    pub fn dequantize_per_channel<T: Code>(
        &self,
        q: &[T],
        layout: &ChannelLayout,
        params: &[QuantParams],
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        check_per_channel(layout, params, q.len(), out.len())?;
        dispatch!(self, dequantize_per_channel::<T>(q, layout, params, out));
        Ok(())
    }

    /// Per-channel fake-quant.
    pub fn fake_quantize_per_channel(
        &self,
        x: &[f32],
        layout: &ChannelLayout,
        params: &[QuantParams],
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        check_per_channel(layout, params, x.len(), out.len())?;
        for (s, c) in layout.runs() {
            let e = s + layout.inner;
            dispatch!(self, fake_quantize(&x[s..e], &params[c], &mut out[s..e]));
        }
        Ok(())
    }
}

/// Calls `f(run_input, params, run_output)` for every run of one channel (shared by the
/// per-channel entry points of every ISA module).
#[inline]
pub(crate) fn for_each_run<A, B>(
    layout: &ChannelLayout,
    params: &[QuantParams],
    input: &[A],
    out: &mut [B],
    mut f: impl FnMut(&[A], &QuantParams, &mut [B]),
) {
    for (s, c) in layout.runs() {
        let e = s + layout.inner;
        f(&input[s..e], &params[c], &mut out[s..e]);
    }
}

fn check_per_channel(
    layout: &ChannelLayout,
    params: &[QuantParams],
    input: usize,
    output: usize,
) -> Result<(), KernelError> {
    check_len("per-channel parameters", layout.channels, params.len())?;
    check_len("per-channel input", layout.len(), input)?;
    check_len("per-channel output", input, output)
}

/// Quantizes f32 to i8 codes on the active ISA.
pub fn quantize_f32_i8(x: &[f32], p: &QuantParams, out: &mut [i8]) -> Result<(), KernelError> {
    Kernels::active().quantize(x, p, out)
}
/// Quantizes f32 to u8 codes on the active ISA.
pub fn quantize_f32_u8(x: &[f32], p: &QuantParams, out: &mut [u8]) -> Result<(), KernelError> {
    Kernels::active().quantize(x, p, out)
}
/// Dequantizes i8 codes to f32 on the active ISA.
pub fn dequantize_i8_f32(q: &[i8], p: &QuantParams, out: &mut [f32]) -> Result<(), KernelError> {
    Kernels::active().dequantize(q, p, out)
}
/// Dequantizes u8 codes to f32 on the active ISA.
pub fn dequantize_u8_f32(q: &[u8], p: &QuantParams, out: &mut [f32]) -> Result<(), KernelError> {
    Kernels::active().dequantize(q, p, out)
}
