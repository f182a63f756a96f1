//! Integer GEMM, the integer-only inference primitive (Jacob et al. 2018): 8-bit activations
//! `A [M x K]` (row-major, `u8` or `i8`) times `i8` weights `B [K x N]` packed once into a
//! [`PackedB`], accumulated exactly in `i32`, with zero points on both sides and an optional
//! fused epilogue (+ bias, integer-only requantization per tensor or per channel, + output
//! zero point, clamp) that writes 8-bit codes.
//!
//! ## Semantics (the spec is [`scalar`])
//! `C[i][j] = bias[j] + sum_k (A[i][k] - za) * (B[k][j] - zb[j])` in wrapping `i32`
//! arithmetic (exact whenever the true value fits `i32`, which holds for
//! `K <= 2^31 / 255^2 = 33,025` with any data; beyond that every path wraps identically).
//!
//! ## How the SIMD paths compute it
//! Each microkernel computes a raw product of the (possibly shifted) codes and the driver
//! removes the zero points and shifts afterwards with row sums of A and column sums of B
//! (computed when B is packed):
//! `C = raw - zb[j] * rowsum_A[i] - (beta + za) * colsum_B[j] + K * za * zb[j] + bias[j]`,
//! where `raw = sum A*B + beta * colsum_B` and `beta` is what the microkernel's shift of A
//! adds (see [`Microkernel`]). All terms wrap mod 2^32, so the
//! identity is exact in the ring and every path is bit-identical to the spec.
//!
//! ## Microkernels
//! | name | ISA | operation | exactness |
//! |---|---|---|---|
//! | `avx512vnni_dpbusd` | AVX-512 VNNI | `vpdpbusd` u8 x s8, 4 products per i32 lane | no saturation (`vpdpbusd`, not `vpdpbusds`); with `i8` A each A broadcast is flipped to `a + 128` (`^ 0x80`, one `vpxord` with an embedded broadcast) as the unsigned operand (`beta = 128`) |
//! | `avx2_maddwd_i16` | AVX2 | codes widened to i16, `vpmaddwd` | exact for all inputs: a product pair is at most `2 * 255 * 128 < 2^31` |
//! | `neon_sdot` | NEON + dotprod | `sdot` (emitted with `asm!`) | `u8` A is shifted to `i8` (`a - 128`, `beta = -128`) |
//! | `neon_smull_sadalp` | NEON | `smull` to i16 + `sadalp` | products of two i8 are at most `2^14` in magnitude |
//! | `scalar` | any | the spec | - |
//!
//! Why AVX2 does not use `vpmaddubsw`: its i16 pair sums saturate for `u8 x i8` codes
//! (`255 * -128 * 2 = -65280`), so an exact result needs either 7-bit weights or two passes.
//! On Skylake-family cores `vpmaddubsw + vpmaddwd` and the widened `vpmaddwd` both spend two
//! port-0/1 multiplies per 32 products, so the widened form is exact at the same peak.
//!
//! Blocking: rows in blocks of `MC`, columns in blocks of `NC`, K in blocks of `KC`; the
//! microkernel keeps an `MR x NR` accumulator tile in registers and streams one packed B
//! panel (`KC x NR`, 64-byte aligned) per tile. Threads split the rows.

#[cfg(target_arch = "aarch64")]
mod aarch64_neon;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512vnni;

use crate::code::Code;
use crate::error::{check_len, KernelError};
use crate::integer_only::{ChannelMultipliers, Multiplier, RequantOutput};
use crate::isa::{mark_ran, Isa, Kernels};

/// 8-bit activation codes a GEMM accepts: `u8` or `i8`.
pub trait ActCode: Code {
    /// Whether the type is `i8`.
    const SIGNED: bool;
    /// The byte as stored.
    fn to_byte(self) -> u8;
}
impl ActCode for u8 {
    const SIGNED: bool = false;
    #[inline(always)]
    fn to_byte(self) -> u8 {
        self
    }
}
impl ActCode for i8 {
    const SIGNED: bool = true;
    #[inline(always)]
    fn to_byte(self) -> u8 {
        self as u8
    }
}

/// One GEMM inner kernel (see the module table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Microkernel {
    Scalar,
    Avx2MaddwdI16,
    Avx512VnniDpbusd,
    NeonSdot,
    NeonSmullSadalp,
}

impl Microkernel {
    pub const ALL: [Microkernel; 5] = [
        Microkernel::Scalar,
        Microkernel::Avx2MaddwdI16,
        Microkernel::Avx512VnniDpbusd,
        Microkernel::NeonSdot,
        Microkernel::NeonSmullSadalp,
    ];

    /// Name used in benchmark ids and reports.
    pub fn name(self) -> &'static str {
        match self {
            Microkernel::Scalar => "scalar",
            Microkernel::Avx2MaddwdI16 => "avx2_maddwd_i16",
            Microkernel::Avx512VnniDpbusd => "avx512vnni_dpbusd",
            Microkernel::NeonSdot => "neon_sdot",
            Microkernel::NeonSmullSadalp => "neon_smull_sadalp",
        }
    }

    /// The dispatch level this microkernel belongs to.
    pub fn isa(self) -> Isa {
        match self {
            Microkernel::Scalar => Isa::Scalar,
            Microkernel::Avx2MaddwdI16 => Isa::Avx2,
            Microkernel::Avx512VnniDpbusd => Isa::Avx512,
            Microkernel::NeonSdot | Microkernel::NeonSmullSadalp => Isa::Neon,
        }
    }

    /// Whether this CPU can run it.
    pub fn is_supported(self) -> bool {
        match self {
            Microkernel::Scalar => true,
            Microkernel::Avx2MaddwdI16 => Isa::Avx2.is_supported(),
            #[cfg(target_arch = "x86_64")]
            Microkernel::Avx512VnniDpbusd => {
                Isa::Avx512.is_supported() && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Microkernel::NeonSdot => {
                Isa::Neon.is_supported() && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            Microkernel::NeonSmullSadalp => Isa::Neon.is_supported(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every microkernel this CPU can run.
    pub fn available() -> Vec<Microkernel> {
        Microkernel::ALL
            .into_iter()
            .filter(|m| m.is_supported())
            .collect()
    }

    /// The best microkernel of a dispatch level: AVX-512 without VNNI runs the AVX2 kernel,
    /// NEON without dotprod the `smull` kernel.
    pub fn for_isa(isa: Isa) -> Microkernel {
        let pick = match isa {
            Isa::Scalar => Microkernel::Scalar,
            Isa::Avx2 => Microkernel::Avx2MaddwdI16,
            Isa::Avx512 => Microkernel::Avx512VnniDpbusd,
            Isa::Neon => Microkernel::NeonSdot,
        };
        if pick.is_supported() {
            return pick;
        }
        match isa {
            Isa::Avx512 => Microkernel::Avx2MaddwdI16,
            Isa::Neon => Microkernel::NeonSmullSadalp,
            _ => Microkernel::Scalar,
        }
    }

    /// K is consumed in groups of this many codes (B is zero-padded to a multiple).
    fn k_group(self) -> usize {
        match self {
            Microkernel::Scalar => 1,
            Microkernel::Avx2MaddwdI16 => 2,
            Microkernel::Avx512VnniDpbusd | Microkernel::NeonSdot => 4,
            Microkernel::NeonSmullSadalp => 8,
        }
    }

    /// Bytes per stored B element.
    fn b_elem(self) -> usize {
        match self {
            Microkernel::Avx2MaddwdI16 => 2,
            _ => 1,
        }
    }

    /// `(MR, NR)`: the register tile for a GEMM with `n` columns.
    fn tile(self, n: usize) -> (usize, usize) {
        match self {
            Microkernel::Scalar => (1, 1),
            Microkernel::Avx512VnniDpbusd => match n {
                0..=16 => (12, 16),
                17..=32 => (8, 32),
                33..=48 => (8, 48),
                _ => (6, 64),
            },
            Microkernel::Avx2MaddwdI16 => match n {
                0..=8 => (12, 8),
                _ => (6, 16),
            },
            Microkernel::NeonSdot => (4, 16),
            Microkernel::NeonSmullSadalp => (2, 8),
        }
    }

    /// `beta`: the multiple of B's column sums the microkernel's shift of A adds to
    /// `sum A*B` (see the module docs).
    fn col_shift(self, a_signed: bool) -> i32 {
        match (self, a_signed) {
            (Microkernel::Avx512VnniDpbusd, true) => 128,
            (Microkernel::NeonSdot | Microkernel::NeonSmullSadalp, false) => -128,
            _ => 0,
        }
    }
}

/// The arithmetic peak of one core in GOPS (2 operations per multiply-add) for a
/// microkernel, measured (about `seconds`) with a register-only loop of its multiply-add
/// instruction: 24 independent `vpdpbusd` on 512 bits for the VNNI kernel, 14 independent
/// `vpmaddwd` on 256 bits for the AVX2 kernel. (Measured, not derived: their ratio was
/// taken as 4 before, right for Cascade Lake with two 512-bit `vpdpbusd` per cycle, but it is
/// 2 on Zen 4, with one.) `None` where this build has no measurement (scalar, NEON).
pub fn measured_peak_gops(mk: Microkernel, seconds: f64) -> Option<f64> {
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (mk, seconds);
        None
    }
    #[cfg(target_arch = "x86_64")]
    {
        if !mk.is_supported() {
            return None;
        }
        // multiply-adds per loop iteration, and the fraction of the VNNI loop's rate
        let (per_iter, fraction, run): (f64, f64, unsafe fn(usize) -> i32) = match mk {
            Microkernel::Avx512VnniDpbusd => (24.0 * 64.0, 1.0, x86_avx512vnni::peak_loop),
            Microkernel::Avx2MaddwdI16 => (
                x86_avx2::PEAK_CHAINS as f64 * 16.0,
                1.0,
                x86_avx2::peak_loop,
            ),
            _ => return None,
        };
        let mut iters = 1usize << 16;
        loop {
            let t = std::time::Instant::now();
            // `black_box` after the clock read: the loop (a pure function) cannot be hoisted
            // above it. SAFETY: supported (checked above).
            std::hint::black_box(unsafe { run(std::hint::black_box(iters)) });
            let dt = t.elapsed().as_secs_f64();
            if dt >= seconds / 4.0 || iters >= 1 << 34 {
                let mut best = dt;
                for _ in 0..3 {
                    let t = std::time::Instant::now();
                    // SAFETY: as above.
                    std::hint::black_box(unsafe { run(std::hint::black_box(iters)) });
                    best = best.min(t.elapsed().as_secs_f64());
                }
                return Some(fraction * 2.0 * per_iter * iters as f64 / best / 1e9);
            }
            iters *= 2;
        }
    }
}

impl Kernels {
    /// The GEMM microkernel this handle's ISA runs.
    pub fn gemm_microkernel(&self) -> Microkernel {
        Microkernel::for_isa(self.isa())
    }

    /// Packs `B [k x n]` (row-major `i8`) with zero points `b_zero_points` (one, or one per
    /// column, each in `[-128, 127]`) for GEMMs with activations of type `A`.
    pub fn pack_b<A: ActCode>(
        &self,
        b: &[i8],
        k: usize,
        n: usize,
        b_zero_points: &[i32],
    ) -> Result<PackedB, KernelError> {
        PackedB::new::<A>(self.gemm_microkernel(), b, k, n, b_zero_points)
    }
}

/// 64 bytes, 64-byte aligned: the unit packed weights are stored in.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Weights packed for one microkernel and one activation type, with the column sums the
/// zero-point algebra needs. Pack once, multiply many times.
#[derive(Clone)]
pub struct PackedB {
    mk: Microkernel,
    a_signed: bool,
    k: usize,
    n: usize,
    kp: usize,
    mr: usize,
    nr: usize,
    lines: Vec<Line>,
    /// `sum_k B[k][j]` of the original codes.
    col_sums: Vec<i32>,
    /// One zero point, or one per column.
    zero_points: Vec<i32>,
    /// The scalar path keeps B as given.
    plain: Vec<i8>,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedB")
            .field("microkernel", &self.mk.name())
            .field("k", &self.k)
            .field("n", &self.n)
            .field("a_signed", &self.a_signed)
            .finish()
    }
}

impl PackedB {
    /// Packs for a specific microkernel (it must run on this CPU). See [`Kernels::pack_b`].
    pub fn new<A: ActCode>(
        mk: Microkernel,
        b: &[i8],
        k: usize,
        n: usize,
        b_zero_points: &[i32],
    ) -> Result<PackedB, KernelError> {
        if !mk.is_supported() {
            return Err(KernelError::UnsupportedIsa { isa: mk.isa() });
        }
        if k == 0 || n == 0 {
            return Err(KernelError::Shape {
                message: format!("pack_b: B is {k} x {n}; expected k >= 1 and n >= 1"),
            });
        }
        let len = k.checked_mul(n).ok_or_else(|| KernelError::Shape {
            message: format!("pack_b: {k} x {n} overflows"),
        })?;
        check_len("pack_b: B", len, b.len())?;
        if b_zero_points.len() != 1 && b_zero_points.len() != n {
            return Err(KernelError::Shape {
                message: format!(
                    "pack_b: {} B zero points; expected 1 or n = {n}",
                    b_zero_points.len()
                ),
            });
        }
        if let Some(z) = b_zero_points.iter().find(|z| !(-128..=127).contains(*z)) {
            return Err(KernelError::Range {
                message: format!("pack_b: B zero point {z} is outside the i8 range [-128, 127]"),
            });
        }
        let mut col_sums = vec![0i32; n];
        for row in b.chunks_exact(n) {
            for (s, &v) in col_sums.iter_mut().zip(row) {
                *s += v as i32;
            }
        }
        let g = mk.k_group();
        let kp = k.div_ceil(g) * g;
        let (mr, nr) = mk.tile(n);
        let mut packed = PackedB {
            mk,
            a_signed: A::SIGNED,
            k,
            n,
            kp,
            mr,
            nr,
            lines: Vec::new(),
            col_sums,
            zero_points: b_zero_points.to_vec(),
            plain: Vec::new(),
        };
        if mk == Microkernel::Scalar {
            packed.plain = b.to_vec();
            return Ok(packed);
        }
        // layout: [panel][k group][column in panel][code in group], zero padded
        let panels = n.div_ceil(nr);
        let elem = mk.b_elem();
        let panel_bytes = kp * nr * elem;
        let total = panels * panel_bytes;
        packed.lines = vec![Line([0; 64]); total.div_ceil(64)];
        // SAFETY: `lines` is `total` bytes (rounded up) of plain old data.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(packed.lines.as_mut_ptr() as *mut u8, total) };
        for p in 0..panels {
            for kk in 0..k {
                let (grp, within) = (kk / g, kk % g);
                for jj in 0..nr {
                    let j = p * nr + jj;
                    if j >= n {
                        break;
                    }
                    let v = b[kk * n + j];
                    let at = p * panel_bytes + ((grp * nr + jj) * g + within) * elem;
                    if elem == 2 {
                        bytes[at..at + 2].copy_from_slice(&(v as i16).to_ne_bytes());
                    } else {
                        bytes[at] = v as u8;
                    }
                }
            }
        }
        Ok(packed)
    }

    pub fn microkernel(&self) -> Microkernel {
        self.mk
    }
    pub fn k(&self) -> usize {
        self.k
    }
    pub fn n(&self) -> usize {
        self.n
    }
    /// Bytes of packed weights held.
    pub fn packed_bytes(&self) -> usize {
        self.lines.len() * 64 + self.plain.len()
    }

    fn panel_ptr(&self, panel: usize, k_offset: usize) -> *const u8 {
        let elem = self.mk.b_elem();
        let at = (panel * self.kp * self.nr + k_offset * self.nr) * elem;
        debug_assert!(at <= self.lines.len() * 64);
        // SAFETY: in bounds of `lines` (checked above in debug builds; the driver only asks
        // for panels < n / NR and offsets < kp).
        unsafe { (self.lines.as_ptr() as *const u8).add(at) }
    }

    fn zero_point(&self, j: usize) -> i32 {
        if self.zero_points.len() == 1 {
            self.zero_points[0]
        } else {
            self.zero_points[j]
        }
    }
}

/// How the i32 accumulators are scaled back to 8 bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputScale {
    PerTensor(Multiplier),
    PerChannel(ChannelMultipliers),
}

/// The fused epilogue: `out = clamp(requantize(C + bias) + zero_point)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Epilogue {
    pub bias: Option<Vec<i32>>,
    pub scale: OutputScale,
    pub output: RequantOutput,
}

/// One register tile's work, shared by every microkernel.
// the segmented-A fields are read by the x86 microkernels only
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Tile {
    /// A at row 0 of the tile and the block's first k (row-major, `lda` bytes per row), or
    /// the packed A panel for microkernels that pack A.
    pub a: *const u8,
    pub lda: usize,
    /// Full k groups in this block.
    pub groups: usize,
    /// Codes in a final partial group (0 when none).
    pub tail: usize,
    /// The packed B panel at the block's first k.
    pub b: *const u8,
    pub c: *mut i32,
    pub ldc: usize,
    /// Valid rows and columns of the tile.
    pub rows: usize,
    pub cols: usize,
    /// Add to `c` instead of overwriting it.
    pub accumulate: bool,
    /// The last K block: add `row_add[i] + col_add[j]` before storing (the zero-point,
    /// shift and bias terms).
    pub last: bool,
    pub row_add: *const i32,
    pub col_add: *const i32,
    /// Not 0: the microkernel sums each of its rows of A over this K block and subtracts
    /// `row_coef * rowsum` from the row (every block, not only the last). VNNI only.
    pub row_coef: i32,
    /// Segmented A (implicit im2col): when not null, row `i` starts at `a + row_offsets[i]`
    /// and is `segs` runs of `groups / segs` groups, run `s` at `+ s * seg_stride` bytes;
    /// `MR_MAX` offsets are readable (rows past the last repeat it), so the microkernel
    /// reads a whole tile's offsets without clamping. Null: row `i` is `a + i * lda`, one run.
    pub row_offsets: *const usize,
    pub segs: usize,
    pub seg_stride: usize,
    /// `groups / segs`, the groups of one run (divided once per call, not per tile).
    pub seg_groups: usize,
}

const MC: usize = 240;
/// The tallest register tile of any microkernel.
const MR_MAX: usize = 12;
const NC: usize = 512;
const KC: usize = 1024;

/// Where finished i32 rows go.
enum Sink<'a, O: Code> {
    I32 { c: &'a mut [i32] },
    Codes { out: &'a mut [O], epi: &'a Epilogue },
}

fn check_call<A: ActCode>(
    a: &[A],
    m: usize,
    a_zero_point: i32,
    b: &PackedB,
) -> Result<(), KernelError> {
    if b.a_signed != A::SIGNED {
        return Err(KernelError::Shape {
            message: format!(
                "gemm: B was packed for {} activations, called with {}",
                if b.a_signed { "i8" } else { "u8" },
                A::NAME
            ),
        });
    }
    if !(A::MIN..=A::MAX).contains(&a_zero_point) {
        return Err(KernelError::Range {
            message: format!(
                "gemm: A zero point {a_zero_point} is outside the {} range [{}, {}]",
                A::NAME,
                A::MIN,
                A::MAX
            ),
        });
    }
    let len = m.checked_mul(b.k).ok_or_else(|| KernelError::Shape {
        message: format!("gemm: {m} x {} overflows", b.k),
    })?;
    check_len("gemm: A (m x k)", len, a.len())
}

/// `C = (A - za) (B - zb)` in i32; `C` is `[m x n]` row-major. `threads >= 1` split the rows.
pub fn gemm_i32<A: ActCode>(
    a: &[A],
    m: usize,
    a_zero_point: i32,
    b: &PackedB,
    c: &mut [i32],
    threads: usize,
) -> Result<(), KernelError> {
    check_call(a, m, a_zero_point, b)?;
    check_len("gemm: C (m x n)", m * b.n, c.len())?;
    run::<A, i8>(a, m, a_zero_point, b, Sink::I32 { c }, threads);
    Ok(())
}

/// `u8 x i8 -> i32`: see [`gemm_i32`].
pub fn gemm_u8i8_i32(
    a: &[u8],
    m: usize,
    a_zero_point: i32,
    b: &PackedB,
    c: &mut [i32],
    threads: usize,
) -> Result<(), KernelError> {
    gemm_i32(a, m, a_zero_point, b, c, threads)
}

/// `i8 x i8 -> i32`: see [`gemm_i32`].
pub fn gemm_i8i8_i32(
    a: &[i8],
    m: usize,
    a_zero_point: i32,
    b: &PackedB,
    c: &mut [i32],
    threads: usize,
) -> Result<(), KernelError> {
    gemm_i32(a, m, a_zero_point, b, c, threads)
}

/// The GEMM with the fused epilogue: 8-bit codes `out [m x n]` of type `O`.
pub fn gemm_requantize<A: ActCode, O: Code>(
    a: &[A],
    m: usize,
    a_zero_point: i32,
    b: &PackedB,
    epi: &Epilogue,
    out: &mut [O],
    threads: usize,
) -> Result<(), KernelError> {
    check_call(a, m, a_zero_point, b)?;
    check_len("gemm: output (m x n)", m * b.n, out.len())?;
    check_epilogue::<O>(b, epi)?;
    run::<A, O>(a, m, a_zero_point, b, Sink::Codes { out, epi }, threads);
    Ok(())
}

fn check_epilogue<O: Code>(b: &PackedB, epi: &Epilogue) -> Result<(), KernelError> {
    if let Some(bias) = &epi.bias {
        check_len("gemm: bias", b.n, bias.len())?;
    }
    match &epi.scale {
        OutputScale::PerTensor(mm) => {
            Multiplier::new(mm.multiplier, mm.shift)?;
        }
        OutputScale::PerChannel(cm) => {
            check_len("gemm: per-channel multipliers", b.n, cm.len())?;
            for c in 0..cm.len() {
                let mm = cm.get(c);
                Multiplier::new(mm.multiplier, mm.shift)?;
            }
        }
    }
    if epi.output.act_min() < O::MIN || epi.output.act_max() > O::MAX {
        return Err(KernelError::Range {
            message: format!(
                "gemm: output range [{}, {}] does not fit {} codes",
                epi.output.act_min(),
                epi.output.act_max(),
                O::NAME
            ),
        });
    }
    Ok(())
}

/// A convolution over an NHWC input that is already padded (border positions hold the
/// input's zero point): batch, padded height and width, channels, kernel, strides, dilations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
}

impl ConvGeometry {
    /// Output height and width, or an error when the kernel does not fit.
    pub fn output(&self) -> Result<[usize; 2], KernelError> {
        let mut o = [0usize; 2];
        for (d, size) in [self.height, self.width].into_iter().enumerate() {
            let span = (self.kernel[d].max(1) - 1) * self.dilations[d] + 1;
            if self.kernel[d] == 0 || self.strides[d] == 0 || self.dilations[d] == 0 || span > size
            {
                return Err(KernelError::Shape {
                    message: format!("conv: {self:?}: the kernel does not fit the input"),
                });
            }
            o[d] = (size - span) / self.strides[d] + 1;
        }
        Ok(o)
    }

    /// GEMM depth: `kh * kw * channels`, in the order (ky, kx, c).
    pub fn k(&self) -> usize {
        self.kernel[0] * self.kernel[1] * self.channels
    }
}

/// im2col of a padded NHWC input: row `(n, oy, ox)`, columns `(ky, kx, c)` (the spec of
/// [`conv_requantize`]'s A).
pub fn im2col<A: ActCode>(x: &[A], geo: &ConvGeometry) -> Result<Vec<A>, KernelError> {
    let [oh, ow] = geo.output()?;
    let ConvGeometry {
        batch,
        height: h,
        width: w,
        channels: c,
        kernel: [kh, kw],
        strides: [sy, sx],
        dilations: [dy, dx],
    } = *geo;
    check_len("im2col: input (n h w c)", batch * h * w * c, x.len())?;
    let mut out = Vec::with_capacity(batch * oh * ow * geo.k());
    for ni in 0..batch {
        for oy in 0..oh {
            for ox in 0..ow {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let at = ((ni * h + oy * sy + ky * dy) * w + ox * sx + kx * dx) * c;
                        out.extend_from_slice(&x[at..at + c]);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Convolution as a GEMM with the fused epilogue: rows are the output pixels `(n, oy, ox)`,
/// K is `(ky, kx, c)` (pack the weights in that order), the output `[n * oh * ow, N]` is NHWC.
/// The spec is [`im2col`] followed by [`gemm_requantize`]. The AVX-512 VNNI microkernel reads
/// A in place (implicit im2col: each kernel row is `kw * c` contiguous input bytes) when
/// the horizontal dilation is 1, `kw * c` is a multiple of 4 and K fits one K block;
/// otherwise the im2col rows are materialized.
pub fn conv_requantize<A: ActCode, O: Code>(
    x: &[A],
    geo: &ConvGeometry,
    a_zero_point: i32,
    b: &PackedB,
    epi: &Epilogue,
    out: &mut [O],
    threads: usize,
) -> Result<(), KernelError> {
    let [oh, ow] = geo.output()?;
    let m = geo.batch * oh * ow;
    check_len(
        "conv: input (n h w c)",
        geo.batch * geo.height * geo.width * geo.channels,
        x.len(),
    )?;
    check_len("conv: packed weights' k (kh kw c)", geo.k(), b.k)?;
    if b.a_signed != A::SIGNED {
        return Err(KernelError::Shape {
            message: format!(
                "conv: weights packed for the other activation type than {}",
                A::NAME
            ),
        });
    }
    if !(A::MIN..=A::MAX).contains(&a_zero_point) {
        return Err(KernelError::Range {
            message: format!(
                "conv: input zero point {a_zero_point} is not a {} code",
                A::NAME
            ),
        });
    }
    check_len("conv: output (n oh ow x n)", m * b.n, out.len())?;
    check_epilogue::<O>(b, epi)?;
    let run_len = geo.kernel[1] * geo.channels;
    let implicit = b.mk == Microkernel::Avx512VnniDpbusd
        && geo.dilations[1] == 1
        && run_len.is_multiple_of(4)
        && b.kp <= KC;
    if !implicit {
        let a = im2col(x, geo)?;
        run::<A, O>(&a, m, a_zero_point, b, Sink::Codes { out, epi }, threads);
        return Ok(());
    }
    // the row offsets depend on the geometry only: a network's consecutive layers of one
    // shape reuse them (building them took ~6 % of a 16-channel ResNet-20 layer)
    thread_local! {
        static OFFSETS: std::cell::RefCell<(Option<ConvGeometry>, Vec<usize>)> =
            const { std::cell::RefCell::new((None, Vec::new())) };
    }
    let (w, c) = (geo.width, geo.channels);
    OFFSETS.with(|cache| {
        let mut cache = cache.borrow_mut();
        let (key, offsets) = &mut *cache;
        if *key != Some(*geo) {
            *key = None;
            conv_row_offsets(geo, oh, ow, offsets);
            *key = Some(*geo);
        }
        // SAFETY: ActCode types are one byte wide.
        let bytes = unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, x.len()) };
        let src = ASrc::Segmented {
            x: bytes,
            offsets,
            segs: geo.kernel[0],
            seg_stride: geo.dilations[0] * w * c,
        };
        run_src::<A, O>(src, m, a_zero_point, b, Sink::Codes { out, epi }, threads);
    });
    Ok(())
}

/// The byte offset of each output pixel's receptive field in the padded NHWC input, then
/// `MR_MAX` copies of the last one (a tile's rows past the last read it again, see
/// `Tile::row_offsets`).
fn conv_row_offsets(geo: &ConvGeometry, oh: usize, ow: usize, offsets: &mut Vec<usize>) {
    let (h, w, c) = (geo.height, geo.width, geo.channels);
    offsets.clear();
    for ni in 0..geo.batch {
        for oy in 0..oh {
            for ox in 0..ow {
                offsets.push(((ni * h + oy * geo.strides[0]) * w + ox * geo.strides[1]) * c);
            }
        }
    }
    let last = offsets.last().copied().unwrap_or(0);
    offsets.resize(offsets.len() + MR_MAX, last);
}

/// Where A's rows are.
#[derive(Clone, Copy)]
enum ASrc<'a> {
    /// `m` rows of `k` bytes.
    Dense(&'a [u8]),
    /// Implicit im2col: row `r` is `segs` runs of `k / segs` bytes in `x`, run `s` at
    /// `offsets[r] + s * seg_stride` (only for the VNNI microkernel, single K block);
    /// `offsets` runs `MR_MAX` entries past the last row (copies of it).
    Segmented {
        x: &'a [u8],
        offsets: &'a [usize],
        segs: usize,
        seg_stride: usize,
    },
}

impl<'a> ASrc<'a> {
    /// Rows `[r0, r0 + rows)` of this source.
    fn rows(self, r0: usize, rows: usize, k: usize) -> ASrc<'a> {
        match self {
            ASrc::Dense(a) => ASrc::Dense(&a[r0 * k..(r0 + rows) * k]),
            ASrc::Segmented {
                x,
                offsets,
                segs,
                seg_stride,
            } => ASrc::Segmented {
                x,
                // the rows and the padding after them (later rows serve as padding)
                offsets: &offsets[r0..r0 + rows + MR_MAX],
                segs,
                seg_stride,
            },
        }
    }
}

/// Splits the rows over threads and runs each share.
fn run<A: ActCode, O: Code>(
    a: &[A],
    m: usize,
    za: i32,
    b: &PackedB,
    sink: Sink<'_, O>,
    threads: usize,
) {
    // SAFETY: ActCode types are one byte wide.
    let a_bytes = unsafe { std::slice::from_raw_parts(a.as_ptr() as *const u8, a.len()) };
    run_src::<A, O>(ASrc::Dense(a_bytes), m, za, b, sink, threads)
}

fn run_src<A: ActCode, O: Code>(
    src: ASrc<'_>,
    m: usize,
    za: i32,
    b: &PackedB,
    sink: Sink<'_, O>,
    threads: usize,
) {
    mark_ran(b.mk.isa());
    if m == 0 {
        return;
    }
    let n = b.n;
    // below ~4M multiply-adds per thread, starting a thread costs more than it saves
    let work = m * n * b.k;
    let threads = threads
        .clamp(1, m.div_ceil(b.mr).max(1))
        .min((work >> 22).max(1));
    let rows_per = m.div_ceil(threads).div_ceil(b.mr) * b.mr;
    match sink {
        Sink::I32 { c } => {
            if threads == 1 {
                rows_block::<A, O>(src, m, za, b, SinkRows::I32(c));
                return;
            }
            std::thread::scope(|s| {
                for (t, cc) in c.chunks_mut(rows_per * n).enumerate() {
                    let r0 = t * rows_per;
                    let rows = cc.len() / n;
                    let ab = src.rows(r0, rows, b.k);
                    s.spawn(move || rows_block::<A, O>(ab, rows, za, b, SinkRows::I32(cc)));
                }
            });
        }
        Sink::Codes { out, epi } => {
            if threads == 1 {
                rows_block::<A, O>(src, m, za, b, SinkRows::Codes(out, epi));
                return;
            }
            std::thread::scope(|s| {
                for (t, oc) in out.chunks_mut(rows_per * n).enumerate() {
                    let r0 = t * rows_per;
                    let rows = oc.len() / n;
                    let ab = src.rows(r0, rows, b.k);
                    s.spawn(move || rows_block::<A, O>(ab, rows, za, b, SinkRows::Codes(oc, epi)));
                }
            });
        }
    }
}

enum SinkRows<'a, O: Code> {
    I32(&'a mut [i32]),
    Codes(&'a mut [O], &'a Epilogue),
}

/// One thread's `m` rows of A.
fn rows_block<A: ActCode, O: Code>(
    src: ASrc<'_>,
    m: usize,
    za: i32,
    b: &PackedB,
    mut sink: SinkRows<'_, O>,
) {
    let (n, k) = (b.n, b.k);
    // the segmented source only reaches the VNNI microkernel (checked by the caller)
    let a: &[u8] = match src {
        ASrc::Dense(a) => a,
        ASrc::Segmented { .. } => &[],
    };
    if b.mk == Microkernel::Scalar {
        let mut c = vec![0i32; m * n];
        let bias = match &sink {
            SinkRows::Codes(_, epi) => epi.bias.as_deref(),
            SinkRows::I32(_) => None,
        };
        // SAFETY: `a` is `m * k` bytes of `A` codes.
        let a_codes = unsafe { std::slice::from_raw_parts(a.as_ptr() as *const A, a.len()) };
        scalar::gemm_i32(a_codes, m, k, za, &b.plain, n, &b.zero_points, bias, &mut c);
        finish_rows(&c, 0, m, 0, n, n, b, &mut sink);
        return;
    }
    let beta = b.mk.col_shift(A::SIGNED);
    let per_channel_zb = b.zero_points.len() > 1;
    let zb_t = if per_channel_zb { 0 } else { b.zero_points[0] };
    let row_coef = zb_t;
    // the VNNI microkernel sums its own rows of A when one panel spans N (each row once);
    // B's per-column zero points still need the sums here, for the pass after the block
    let kernel_sums = b.mk == Microkernel::Avx512VnniDpbusd && n <= b.nr && row_coef != 0;
    let need_rowsum = per_channel_zb || (row_coef != 0 && !kernel_sums);
    let sum_bytes = |row: &[u8]| -> i32 {
        if A::SIGNED {
            row.iter().map(|&v| v as i8 as i32).sum()
        } else {
            row.iter().map(|&v| v as i32).sum()
        }
    };
    #[cfg(target_arch = "x86_64")]
    let fast_sums = b.mk == Microkernel::Avx512VnniDpbusd;
    let rowsum: Vec<i32> = match src {
        _ if !need_rowsum => Vec::new(),
        #[cfg(target_arch = "x86_64")]
        ASrc::Dense(a) if fast_sums => {
            let mut v = vec![0i32; m];
            // SAFETY: the VNNI microkernel runs on this CPU (AVX-512 BW included); `a` holds
            // `m` rows of `k` bytes.
            unsafe { x86_avx512vnni::row_sums(a, m, k, A::SIGNED, &mut v) };
            v
        }
        ASrc::Dense(a) => a.chunks_exact(k).map(sum_bytes).collect(),
        ASrc::Segmented {
            x,
            offsets,
            segs,
            seg_stride,
        } => offsets[..m]
            .iter()
            .map(|&o| {
                (0..segs)
                    .map(|sg| {
                        let at = o + sg * seg_stride;
                        sum_bytes(&x[at..at + k / segs])
                    })
                    .sum()
            })
            .collect(),
    };
    let bias = match &sink {
        SinkRows::Codes(_, epi) => epi.bias.as_deref(),
        SinkRows::I32(_) => None,
    };
    let kk = k as i32;
    let col_term: Vec<i32> = (0..n)
        .map(|j| {
            let zb = b.zero_point(j);
            bias.map_or(0, |bb| bb[j])
                .wrapping_sub((beta + za).wrapping_mul(b.col_sums[j]))
                .wrapping_add(kk.wrapping_mul(za).wrapping_mul(zb))
        })
        .collect();
    let row_term: Vec<i32> = if row_coef != 0 && !kernel_sums {
        rowsum
            .iter()
            .map(|&r| r.wrapping_mul(row_coef).wrapping_neg())
            .collect()
    } else {
        vec![0; m]
    };

    let (mr, nr) = (b.mr, b.nr);
    debug_assert!(mr <= MR_MAX, "segmented sources pad MR_MAX offsets");
    let nc_max = NC.div_ceil(nr) * nr;
    // codes from the VNNI microkernel with the whole K in one block: requantized in
    // registers (B's per-column zero points need the i32 block, so they take the tile path)
    #[cfg(target_arch = "x86_64")]
    let fused: Option<Fused<O>> = match &mut sink {
        SinkRows::Codes(out, epi)
            if b.mk == Microkernel::Avx512VnniDpbusd && b.kp <= KC && !per_channel_zb =>
        {
            Some(Fused::new(epi, n, out.as_mut_ptr()))
        }
        _ => None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let fused: Option<Fused<O>> = None;
    // i32 results go straight to C; codes go through an i32 tile and the epilogue
    let (dest, mut tile) = match &mut sink {
        SinkRows::I32(c) => (c.as_mut_ptr(), Vec::new()),
        SinkRows::Codes(..) if fused.is_some() => (std::ptr::null_mut(), Vec::new()),
        SinkRows::Codes(..) => {
            // one block: at most MC rows of at most NC columns
            let mut t = vec![0i32; MC.min(m) * nc_max.min(n.div_ceil(nr) * nr)];
            (t.as_mut_ptr(), t)
        }
    };
    let direct = matches!(sink, SinkRows::I32(_));
    let packs_a = b.mk == Microkernel::Avx2MaddwdI16;
    // divisions hoisted out of the tile loops
    let all_groups = k / b.mk.k_group();
    let run_groups = match src {
        ASrc::Segmented { segs, .. } => all_groups / segs,
        ASrc::Dense(_) => 0,
    };
    let mut apack: Vec<u32> = Vec::new();
    for ic in (0..m).step_by(MC) {
        let mc = MC.min(m - ic);
        if packs_a {
            let rows = &a[ic * k..(ic + mc) * k];
            #[cfg(target_arch = "x86_64")]
            {
                apack.resize(mc.div_ceil(mr) * b.kp / 2 * mr, 0);
                // SAFETY: the AVX2 microkernel (the one that packs A) runs on this CPU;
                // `rows` holds `mc * k` codes and `apack` the packed size.
                unsafe { x86_avx2::pack_a_pairs(rows, mc, k, b.kp, mr, A::SIGNED, &mut apack) };
            }
            #[cfg(not(target_arch = "x86_64"))]
            pack_a_pairs::<A>(rows, mc, k, b.kp, mr, &mut apack);
        }
        for jc in (0..n).step_by(nc_max) {
            let nc = nc_max.min(n - jc);
            // C rows, or tile rows of exactly this block's width (whole rows are contiguous)
            let ld_dest = if direct { n } else { nc };
            // top-left of this block in the destination
            let block = if direct {
                // SAFETY: row ic < m, column jc < n of C (m x n).
                unsafe { dest.add(ic * n + jc) }
            } else if fused.is_some() {
                // no i32 destination: the fused tiles write codes
                std::ptr::null_mut()
            } else {
                tile.as_mut_ptr()
            };
            for pc in (0..b.kp).step_by(KC) {
                let kc = KC.min(b.kp - pc);
                let g = b.mk.k_group();
                let real = kc.min(k.saturating_sub(pc));
                for jr in (0..nc).step_by(nr) {
                    let panel = (jc + jr) / nr;
                    let bp = b.panel_ptr(panel, pc);
                    for ir in (0..mc).step_by(mr) {
                        let (a_ptr, lda, groups, tail) = if let ASrc::Segmented { x, .. } = src {
                            // one K block (checked by the caller): all groups, no tail
                            (x.as_ptr(), 0, all_groups, 0)
                        } else if packs_a {
                            // packed A: rows of kp/2 u32, pairs of i16
                            let off = ir * (b.kp / 2) + pc / 2;
                            (
                                // SAFETY: `apack` holds ceil(mc / MR) * MR rows of kp/2.
                                unsafe { (apack.as_ptr() as *const u8).add(off * 4) },
                                b.kp * 2,
                                kc / 2,
                                0,
                            )
                        } else {
                            (
                                // SAFETY: row ic + ir < m, column pc < k (real > 0 here).
                                unsafe { a.as_ptr().add((ic + ir) * k + pc) },
                                k,
                                real / g,
                                real % g,
                            )
                        };
                        let t = Tile {
                            a: a_ptr,
                            lda,
                            groups,
                            tail,
                            b: bp,
                            c: if block.is_null() {
                                block
                            } else {
                                // SAFETY: ir < mc rows, jr < nc columns of the block.
                                unsafe { block.add(ir * ld_dest + jr) }
                            },
                            ldc: ld_dest,
                            rows: mr.min(mc - ir),
                            cols: nr.min(nc - jr),
                            accumulate: pc > 0,
                            last: pc + KC >= b.kp,
                            row_add: row_term[ic + ir..].as_ptr(),
                            col_add: col_term[jc + jr..].as_ptr(),
                            row_coef: if kernel_sums { row_coef } else { 0 },
                            row_offsets: match src {
                                ASrc::Segmented { offsets, .. } => offsets[ic + ir..].as_ptr(),
                                ASrc::Dense(_) => std::ptr::null(),
                            },
                            segs: match src {
                                ASrc::Segmented { segs, .. } => segs,
                                ASrc::Dense(_) => 1,
                            },
                            seg_stride: match src {
                                ASrc::Segmented { seg_stride, .. } => seg_stride,
                                ASrc::Dense(_) => 0,
                            },
                            seg_groups: match src {
                                ASrc::Segmented { .. } => run_groups,
                                ASrc::Dense(_) => groups,
                            },
                        };
                        // SAFETY: the microkernel is supported (checked when B was packed);
                        // `t` describes in-bounds memory: A rows/columns as above, the B
                        // panel of `kc` codes, a tile of `rows x cols` in the destination,
                        // `rows` row terms and `cols` column terms.
                        match &fused {
                            #[cfg(target_arch = "x86_64")]
                            Some(f) => {
                                let j = jc + jr;
                                let e = x86_avx512vnni::TileOutput {
                                    multiplier: f.multiplier[j..].as_ptr(),
                                    left: f.left[j..].as_ptr(),
                                    right: f.right[j..].as_ptr(),
                                    any_left: f.any_left,
                                    output: f.output,
                                    // SAFETY: row ic + ir < m, column j < n of the output.
                                    out: unsafe { f.out.add((ic + ir) * n + j) } as *mut u8,
                                    ldo: n,
                                };
                                // SAFETY: as for `call_microkernel`; one K block (the
                                // condition of `fused`), `e` in bounds as above.
                                unsafe { call_tile_requant::<O>(vnni_mode(b), mr, nr, &t, &e) };
                            }
                            _ => unsafe { call_microkernel(b, &t) },
                        }
                    }
                }
            }
            if per_channel_zb {
                for i in 0..mc {
                    let rs = rowsum[ic + i];
                    // SAFETY: row i < mc, columns < nc of the block.
                    let row = unsafe { std::slice::from_raw_parts_mut(block.add(i * ld_dest), nc) };
                    for (jj, v) in row.iter_mut().enumerate() {
                        *v = v.wrapping_sub(b.zero_points[jc + jj].wrapping_mul(rs));
                    }
                }
            }
            if !direct && fused.is_none() {
                finish_rows(&tile, ic, mc, jc, nc, nc, b, &mut sink);
            }
        }
    }
}

/// The fused epilogue's per-column constants for one call of [`rows_block`].
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Fused<'a, O: Code> {
    multiplier: Vec<i32>,
    left: Vec<i32>,
    right: Vec<i32>,
    any_left: bool,
    output: &'a RequantOutput,
    out: *mut O,
}

impl<'a, O: Code> Fused<'a, O> {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn new(epi: &'a Epilogue, n: usize, out: *mut O) -> Self {
        let (multiplier, left, right) = match &epi.scale {
            OutputScale::PerTensor(m) => (
                vec![m.multiplier; n],
                vec![m.shift.max(0); n],
                vec![(-m.shift).max(0); n],
            ),
            OutputScale::PerChannel(cm) => {
                (cm.multiplier.clone(), cm.left.clone(), cm.right.clone())
            }
        };
        let any_left = left.iter().any(|&l| l > 0);
        Fused {
            multiplier,
            left,
            right,
            any_left,
            output: &epi.output,
            out,
        }
    }
}

/// # Safety
/// The AVX-512 VNNI microkernel runs on this CPU; `t` and `e` as [`x86_avx512vnni::tile_requant`]
/// documents.
#[cfg(target_arch = "x86_64")]
unsafe fn call_tile_requant<O: Code>(
    mode: u8,
    mr: usize,
    nr: usize,
    t: &Tile,
    e: &x86_avx512vnni::TileOutput<'_>,
) {
    use x86_avx512vnni::{tile_requant, FLIP_A, PLAIN};
    match (mr, nr, mode) {
        (12, 16, PLAIN) => tile_requant::<12, 1, PLAIN, O>(t, e),
        (12, 16, FLIP_A) => tile_requant::<12, 1, FLIP_A, O>(t, e),
        (8, 32, PLAIN) => tile_requant::<8, 2, PLAIN, O>(t, e),
        (8, 32, FLIP_A) => tile_requant::<8, 2, FLIP_A, O>(t, e),
        (8, 48, PLAIN) => tile_requant::<8, 3, PLAIN, O>(t, e),
        (8, 48, FLIP_A) => tile_requant::<8, 3, FLIP_A, O>(t, e),
        (6, 64, PLAIN) => tile_requant::<6, 4, PLAIN, O>(t, e),
        (6, 64, FLIP_A) => tile_requant::<6, 4, FLIP_A, O>(t, e),
        _ => unreachable!("no avx512vnni tile {mr}x{nr} in mode {mode}"),
    }
}

/// The VNNI microkernel's operand mode for a packed B (see `x86_avx512vnni::PLAIN`).
#[cfg(target_arch = "x86_64")]
fn vnni_mode(b: &PackedB) -> u8 {
    if b.a_signed {
        x86_avx512vnni::FLIP_A
    } else {
        x86_avx512vnni::PLAIN
    }
}

/// Writes finished rows `[r0, r0 + rows)`, columns `[j0, j0 + cols)` from `tile` (row
/// stride `ld`) to the sink.
#[allow(clippy::too_many_arguments)]
fn finish_rows<O: Code>(
    tile: &[i32],
    r0: usize,
    rows: usize,
    j0: usize,
    cols: usize,
    ld: usize,
    b: &PackedB,
    sink: &mut SinkRows<'_, O>,
) {
    let n = b.n;
    let kern = Kernels::for_dispatch(b.mk.isa());
    match sink {
        SinkRows::I32(c) => {
            for i in 0..rows {
                c[(r0 + i) * n + j0..(r0 + i) * n + j0 + cols]
                    .copy_from_slice(&tile[i * ld..i * ld + cols]);
            }
        }
        SinkRows::Codes(out, epi) if cols == n && ld == n => {
            // whole rows: one call for the block
            let src = &tile[..rows * n];
            let dst = &mut out[r0 * n..(r0 + rows) * n];
            match &epi.scale {
                OutputScale::PerTensor(mm) => kern.requantize_unchecked(src, *mm, &epi.output, dst),
                OutputScale::PerChannel(cm) => {
                    kern.requantize_per_channel_unchecked(src, cm, &epi.output, dst)
                }
            }
        }
        SinkRows::Codes(out, epi) => {
            let scale_block = match &epi.scale {
                OutputScale::PerTensor(_) => None,
                OutputScale::PerChannel(cm) => Some(ChannelMultipliers::new(
                    &(j0..j0 + cols).map(|j| cm.get(j)).collect::<Vec<_>>(),
                )),
            };
            for i in 0..rows {
                let src = &tile[i * ld..i * ld + cols];
                let dst = &mut out[(r0 + i) * n + j0..(r0 + i) * n + j0 + cols];
                match (&epi.scale, &scale_block) {
                    (OutputScale::PerTensor(mm), _) => {
                        kern.requantize_unchecked(src, *mm, &epi.output, dst)
                    }
                    (_, Some(cm)) => {
                        kern.requantize_per_channel_unchecked(src, cm, &epi.output, dst)
                    }
                    _ => unreachable!("per-channel scales build a block"),
                }
            }
        }
    }
}

/// Packs `mc` rows of A, padded to a multiple of `mr` rows, into rows of `kp / 2` u32
/// values, each a pair of codes widened to i16 (low half = even k); rows past `mc` and k
/// past `k` are zero. The reference for `x86_avx2::pack_a_pairs`, which the driver calls
/// (only the AVX2 microkernel packs A).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn pack_a_pairs<A: ActCode>(
    a: &[u8],
    mc: usize,
    k: usize,
    kp: usize,
    mr: usize,
    dst: &mut Vec<u32>,
) {
    let blocks = mc.div_ceil(mr);
    let pairs = kp / 2;
    dst.clear();
    dst.resize(blocks * pairs * mr, 0);
    let widen = |v: u8| -> u32 {
        if A::SIGNED {
            (v as i8 as i16 as u16) as u32
        } else {
            v as u32
        }
    };
    for i in 0..mc {
        let row = &a[i * k..(i + 1) * k];
        for p in 0..pairs {
            let lo = row.get(2 * p).map_or(0, |&v| widen(v));
            let hi = row.get(2 * p + 1).map_or(0, |&v| widen(v));
            dst[i * pairs + p] = lo | (hi << 16);
        }
    }
}

/// # Safety
/// `mk` runs on this CPU and `t` describes valid memory for a `mr x nr` tile.
unsafe fn call_microkernel(b: &PackedB, t: &Tile) {
    let (mk, a_signed, mr, nr) = (b.mk, b.a_signed, b.mr, b.nr);
    match mk {
        #[cfg(target_arch = "x86_64")]
        Microkernel::Avx512VnniDpbusd => {
            use x86_avx512vnni::{tile, FLIP_A, PLAIN};
            match (mr, nr, vnni_mode(b)) {
                (12, 16, PLAIN) => tile::<12, 1, PLAIN>(t),
                (12, 16, FLIP_A) => tile::<12, 1, FLIP_A>(t),
                (8, 32, PLAIN) => tile::<8, 2, PLAIN>(t),
                (8, 32, FLIP_A) => tile::<8, 2, FLIP_A>(t),
                (8, 48, PLAIN) => tile::<8, 3, PLAIN>(t),
                (8, 48, FLIP_A) => tile::<8, 3, FLIP_A>(t),
                (6, 64, PLAIN) => tile::<6, 4, PLAIN>(t),
                (6, 64, FLIP_A) => tile::<6, 4, FLIP_A>(t),
                (_, _, mode) => unreachable!("no avx512vnni tile {mr}x{nr} in mode {mode}"),
            }
        }
        #[cfg(target_arch = "x86_64")]
        Microkernel::Avx2MaddwdI16 => match (mr, nr) {
            (12, 8) => x86_avx2::tile::<12, 1>(t),
            (6, 16) => x86_avx2::tile::<6, 2>(t),
            _ => unreachable!("no avx2 tile {mr}x{nr}"),
        },
        #[cfg(target_arch = "aarch64")]
        Microkernel::NeonSdot => {
            if a_signed {
                aarch64_neon::sdot_tile::<true>(t)
            } else {
                aarch64_neon::sdot_tile::<false>(t)
            }
        }
        #[cfg(target_arch = "aarch64")]
        Microkernel::NeonSmullSadalp => {
            if a_signed {
                aarch64_neon::smull_tile::<true>(t)
            } else {
                aarch64_neon::smull_tile::<false>(t)
            }
        }
        _ => {
            let _ = (a_signed, mr, nr, t);
            unreachable!("microkernel {} has no tile on this build", mk.name())
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn check<A: ActCode>(mc: usize, k: usize, mr: usize, seed: u32) {
        let kp = k.div_ceil(2) * 2;
        let a: Vec<u8> = (0..mc * k)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 24) as u8)
            .collect();
        let mut want = Vec::new();
        pack_a_pairs::<A>(&a, mc, k, kp, mr, &mut want);
        // stale values where the packer must write zeros
        let mut got = vec![0xDEAD_BEEF; want.len()];
        // SAFETY: checked just below; `a` holds mc * k codes, `got` the packed size.
        unsafe { x86_avx2::pack_a_pairs(&a, mc, k, kp, mr, A::SIGNED, &mut got) };
        assert_eq!(got, want, "mc {mc} k {k} mr {mr} signed {}", A::SIGNED);
    }

    #[test]
    fn avx2_packing_of_a_matches_the_reference() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let mut seed = 1;
        for mr in [6, 12] {
            for mc in [1, 5, 6, 7, 12, 13, 240] {
                for k in [1, 2, 3, 15, 16, 17, 31, 32, 33, 144, 145] {
                    seed += 1;
                    check::<u8>(mc, k, mr, seed);
                    check::<i8>(mc, k, mr, seed);
                }
            }
        }
    }
}
