//! The convolution GEMM of the f32 engine: `out[m, p] = bias[m] + sum_k w[m, k] * col[k, p]`
//! on packed operands, with an AVX-512 micro-kernel of 8 output channels x 32 output
//! positions (16 accumulators) and a scalar reference that is its specification.
//!
//! Layouts: the weight is packed once per layer as `[M/8][K][8]` (eight output channels side by
//! side); the receptive fields are written by [`im2col_packed`] straight into `[P/32][K][32]`
//! panels (the last panel zero-padded), so the micro-kernel streams both operands
//! contiguously. Each output element is `bias` followed by one fused multiply-add per k, in k
//! order, on every path: the SIMD result is bit-identical to the scalar one.

use crate::model::Window;

pub const MR: usize = 8;
pub const NR: usize = 32;
/// Vectors of 16 positions per direct micro-kernel call.
pub const VECTORS: usize = 2;

/// What happens to each output after its sum: `+ residual` (a tensor laid out like the
/// output), then `max(0, .)`. This is a Conv followed by an Add and / or a Relu, run as one
/// pass; the spec is [`Epilogue::apply`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

impl Epilogue<'_> {
    /// The epilogue of the output at index `i`. ReLU maps NaN and -0.0 to 0.0, as
    /// `vmaxps(v, 0)` does.
    #[inline]
    pub fn apply(&self, i: usize, v: f32) -> f32 {
        let v = match self.residual {
            Some(r) => v + r[i],
            None => v,
        };
        match self.relu {
            true if v > 0.0 => v,
            true => 0.0,
            false => v,
        }
    }

    /// The same epilogue for the outputs from index `at` on.
    fn offset(&self, at: usize) -> Self {
        Epilogue {
            residual: self.residual.map(|r| &r[at..]),
            relu: self.relu,
        }
    }
}

/// A conv weight `[M, K]` packed for the micro-kernel (M a multiple of [`MR`]).
#[derive(Clone, Debug)]
pub struct PackedWeight {
    pub m: usize,
    pub k: usize,
    pub data: Vec<f32>,
}

impl PackedWeight {
    /// `None` when M is not a multiple of [`MR`] (the engine then uses the general GEMM).
    pub fn new(w: &[f32], m: usize, k: usize) -> Option<PackedWeight> {
        if m == 0 || k == 0 || !m.is_multiple_of(MR) || w.len() != m * k {
            return None;
        }
        let mut data = Vec::with_capacity(m * k);
        for tile in 0..m / MR {
            for kk in 0..k {
                for r in 0..MR {
                    data.push(w[(tile * MR + r) * k + kk]);
                }
            }
        }
        Some(PackedWeight { m, k, data })
    }
}

/// Walks the receptive fields of one image (channels `0..cg` of `x`, `h x w` each): for every
/// tap `k = (c, ki, kj)` and output row `oy`, hands `sink(k, oy, line)` the `ow` input values
/// that tap reads for that row (zeros where it falls outside the image). Both im2col layouts
/// are built from it.
#[allow(clippy::too_many_arguments)]
pub fn receptive_lines(
    x: &[f32],
    h: usize,
    w: usize,
    cg: usize,
    win: &Window,
    pads: [usize; 4],
    oh: usize,
    ow: usize,
    mut sink: impl FnMut(usize, usize, &[f32]),
) {
    let [kh, kw] = win.kernel;
    let [sh, sw] = win.strides;
    let [dh, dw] = win.dilations;
    let mut line = vec![0.0f32; ow];
    let mut k = 0;
    for c in 0..cg {
        let plane = &x[c * h * w..(c + 1) * h * w];
        for ki in 0..kh {
            for kj in 0..kw {
                let off = (kj * dw) as isize - pads[1] as isize;
                // Output columns whose tap is inside the image: ox in [lo, hi).
                let lo = if off >= 0 {
                    0
                } else {
                    ((-off) as usize).div_ceil(sw)
                };
                let hi = if (w as isize) > off {
                    ((w as isize - off) as usize).div_ceil(sw).min(ow)
                } else {
                    0
                };
                for oy in 0..oh {
                    let iy = (oy * sh + ki * dh) as isize - pads[0] as isize;
                    if iy < 0 || iy >= h as isize || lo >= hi {
                        line.fill(0.0);
                    } else {
                        let row = &plane[iy as usize * w..(iy as usize + 1) * w];
                        line[..lo].fill(0.0);
                        line[hi..].fill(0.0);
                        if sw == 1 {
                            let s0 = (lo as isize + off) as usize;
                            line[lo..hi].copy_from_slice(&row[s0..s0 + (hi - lo)]);
                        } else {
                            for (ox, v) in line.iter_mut().enumerate().take(hi).skip(lo) {
                                *v = row[(ox as isize * sw as isize + off) as usize];
                            }
                        }
                    }
                    sink(k, oy, &line);
                }
                k += 1;
            }
        }
    }
}

/// The receptive fields as packed panels `[ceil(P/32)][K][32]`, `P = oh * ow`,
/// `K = cg * kh * kw`.
#[allow(clippy::too_many_arguments)]
pub fn im2col_packed(
    x: &[f32],
    h: usize,
    w: usize,
    cg: usize,
    win: &Window,
    pads: [usize; 4],
    oh: usize,
    ow: usize,
    out: &mut Vec<f32>,
) {
    let k_total = cg * win.kernel[0] * win.kernel[1];
    // Every position below P is written; the padding columns of the last panel may keep stale
    // values (finite: the buffer only ever holds image data) because the micro-kernel never
    // stores those columns. So the buffer is grown, never cleared.
    let need = (oh * ow).div_ceil(NR) * k_total * NR;
    if out.len() < need {
        out.resize(need, 0.0);
    }
    receptive_lines(x, h, w, cg, win, pads, oh, ow, |k, oy, line| {
        put(out, k_total, k, oy * ow, line)
    });
}

/// The receptive fields as a row-major `[K, P]` matrix (the layout of a plain GEMM).
#[allow(clippy::too_many_arguments)]
pub fn im2col(
    x: &[f32],
    h: usize,
    w: usize,
    cg: usize,
    win: &Window,
    pads: [usize; 4],
    oh: usize,
    ow: usize,
    col: &mut Vec<f32>,
) {
    let p = oh * ow;
    col.clear();
    col.resize(cg * win.kernel[0] * win.kernel[1] * p, 0.0);
    receptive_lines(x, h, w, cg, win, pads, oh, ow, |k, oy, line| {
        col[k * p + oy * ow..k * p + (oy + 1) * ow].copy_from_slice(line)
    });
}

/// Copies `src` to positions `p0..p0 + len` of row `k` of the packed panels.
fn put(out: &mut [f32], k_total: usize, k: usize, p0: usize, src: &[f32]) {
    let mut p = p0;
    let mut i = 0;
    while i < src.len() {
        let within = p % NR;
        let take = (NR - within).min(src.len() - i);
        let base = (p / NR) * k_total * NR + k * NR + within;
        out[base..base + take].copy_from_slice(&src[i..i + take]);
        i += take;
        p += take;
    }
}

/// `out[r * ldc + p] = bias[r] + sum_k w[r, k] * col[k, p]` for all `M` rows and `p < n`,
/// from packed operands; `isa_avx512` selects the micro-kernel (it must be supported).
#[allow(clippy::too_many_arguments)]
pub fn gemm_packed(
    w: &PackedWeight,
    cols: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldc: usize,
    epi: Epilogue,
    avx512: bool,
) {
    let k = w.k;
    let panels = n.div_ceil(NR);
    let need = (w.m - 1) * ldc + n;
    assert!(cols.len() >= panels * k * NR && out.len() >= need && ldc >= n);
    assert!(epi.residual.is_none_or(|r| r.len() >= need));
    let zeros = [0.0f32; MR];
    for tile in 0..w.m / MR {
        let a = &w.data[tile * k * MR..(tile + 1) * k * MR];
        let b_tile: &[f32] = match bias {
            Some(b) => &b[tile * MR..(tile + 1) * MR],
            None => &zeros,
        };
        for j in 0..panels {
            let b = &cols[j * k * NR..(j + 1) * k * NR];
            let valid = (n - j * NR).min(NR);
            let at = tile * MR * ldc + j * NR;
            let c = &mut out[at..];
            let e = epi.offset(at);
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: the caller checked AVX-512F support; slices cover K x 8, K x 32 and
                // 8 rows of `valid` outputs at stride ldc (asserted above), the residual too.
                unsafe { x86::kernel_8x32(k, a, b, b_tile, c, ldc, valid, e) };
                continue;
            }
            let _ = avx512;
            kernel_8x32_scalar(k, a, b, b_tile, c, ldc, valid, e);
        }
    }
}

/// Whether every output's receptive field lies inside the padded image (always so for a
/// Conv's own output size; checked, not assumed, since the kernel reads without bounds).
pub fn direct_applies(
    win: &Window,
    h: usize,
    w: usize,
    pads: [usize; 4],
    oh: usize,
    ow: usize,
) -> bool {
    let fits = |out: usize, size: usize, d: usize| {
        out > 0
            && win.strides[d] > 0
            && (out - 1) * win.strides[d] + (win.kernel[d] - 1) * win.dilations[d]
                < size + pads[d] + pads[d + 2]
    };
    fits(oh, h, 0) && fits(ow, w, 1)
}

/// Most distinct tap masks of one vector (the span layout needs one per kernel column).
pub const TAP_MASKS: usize = 8;

/// One vector of the direct kernel: buffer base position, the lanes it reads for a tap
/// whose mask class is `t` (`taps[t]`), the lanes that are outputs (`mask`), and the output
/// index of its first output lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lanes {
    pub base: usize,
    pub taps: [u16; TAP_MASKS],
    pub mask: u16,
    pub at: usize,
}

impl Lanes {
    /// A vector that reads the lanes it stores, for every tap.
    fn plain(base: usize, mask: u16, at: usize) -> Lanes {
        Lanes {
            base,
            taps: [mask; TAP_MASKS],
            mask,
            at,
        }
    }
}

/// The span layout (see [`DirectPlan`]): vectors of 16 consecutive outputs of an `oh x w`
/// output with kernel columns `kw` (at most [`TAP_MASKS`]) at dilation `dw` and left padding
/// `pl`; the tap mask of class `kj` keeps the lanes whose column `ox + kj * dw - pl` is
/// inside `0..w`.
pub fn span_lanes(oh: usize, w: usize, kw: usize, dw: usize, pl: usize) -> Vec<Lanes> {
    let n = oh * w;
    (0..n)
        .step_by(16)
        .map(|q0| {
            let mut l = Lanes::plain(q0, 0, q0);
            for j in 0..16.min(n - q0) {
                l.mask |= 1 << j;
                let ox = (q0 + j) % w;
                for (kj, t) in l.taps.iter_mut().enumerate().take(kw) {
                    if (ox + kj * dw).checked_sub(pl).is_some_and(|c| c < w) {
                        *t |= 1 << j;
                    }
                }
            }
            l
        })
        .collect()
}

/// The vectors covering an `oh x ow` output on a padded image of row pitch `wp` (see
/// [`DirectPlan`]); runs or pitch layout, whichever has fewer empty lanes.
pub fn direct_lanes(oh: usize, ow: usize, wp: usize) -> Vec<Lanes> {
    let runs_per_row = ow.div_ceil(16);
    let mut out = Vec::new();
    // Lanes spent: runs 16 * runs_per_row per row; pitch about wp per row.
    if runs_per_row * 16 <= wp {
        for oy in 0..oh {
            let mut ox = 0;
            while ox < ow {
                let len = (ow - ox).min(16);
                out.push(Lanes::plain(
                    oy * wp + ox,
                    ((1u32 << len) - 1) as u16,
                    oy * ow + ox,
                ));
                ox += len;
            }
        }
        return out;
    }
    let end = (oh - 1) * wp + ow;
    let mut q0 = 0;
    while q0 < end {
        let mut mask = 0u16;
        let mut at = None;
        for j in 0..16 {
            let q = q0 + j;
            if q < end && q % wp < ow {
                mask |= 1 << j;
                at.get_or_insert((q / wp) * ow + q % wp);
            }
        }
        if let Some(at) = at {
            out.push(Lanes::plain(q0, mask, at));
        }
        q0 += 16;
    }
    out
}

/// One image through a fresh [`DirectPlan`] (the tests' entry point).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub fn conv_direct(
    pw: &PackedWeight,
    x: &[f32],
    h: usize,
    w: usize,
    cg: usize,
    win: &Window,
    pads: [usize; 4],
    oh: usize,
    ow: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldc: usize,
    epi: Epilogue,
    padded: &mut Vec<f32>,
    avx512: bool,
) {
    let plan = DirectPlan::new(h, w, cg, win, pads, oh, ow);
    padded.clear();
    padded.resize(plan.len, 0.0);
    plan.fill(x, padded);
    plan.run(pw, padded, bias, out, ldc, epi, avx512);
}

/// Direct convolution: no im2col. The input image is copied once into a zero-padded buffer;
/// each micro-kernel call computes 8 output channels x two vectors of 16 lanes, and reads the
/// receptive field of every tap k straight from the buffer at the offset `offs[k]`.
///
/// Strides: the padded image of each channel is split into `sh x sw` phase planes (plane
/// `(a, b)` holds the rows `= a` and columns `= b` modulo the stride), each `hs x ws`. The tap
/// `(ki, kj)` of output `(oy, ox)` reads padded row `oy * sh + ki * dh`, which is row
/// `oy + ki * dh / sh` of phase `ki * dh % sh` (columns alike): within one plane, consecutive
/// outputs read consecutive values, as at stride 1 (one plane, `ws` = padded width).
///
/// A vector covers 16 consecutive positions of a plane, `q = oy * ws + ox`; per tap a lane
/// mask says which lanes to read (the others read as zero) and a store mask which lanes are
/// outputs. Three layouts of the vectors ([`direct_lanes`], [`span_lanes`]):
/// - runs: up to 16 positions within one output row (rows of 16 or 32 fill every lane);
/// - pitch: the vectors tile `q` without regard to rows, so one vector spans row ends; the
///   lanes of the `wp - ow` padding columns are masked off (an 8-wide row then fills 80 % of
///   the lanes instead of 50 %);
/// - span (stride 1, `ow == w`): the buffer has no padding columns, rows of pitch `w`, so
///   `q` is the output index and every lane is an output; a tap that would read a padding
///   column reads, at that lane, a value of the neighbouring row, so its mask turns that
///   lane off (the zero the padding would give).
///
/// The layout with the most useful lanes is used. The valid lanes of a vector are outputs at
/// consecutive indices of the row-major output, so the kernel compresses them and stores
/// them as one run. Same bias-then-FMA order per output as the GEMM path and the scalar
/// specification.
///
/// A plan holds the geometry of one layer, computed once and used for every image: the
/// layout, the buffer size, the tap offsets and mask classes, the vectors.
#[derive(Clone, Debug)]
pub struct DirectPlan {
    /// Values in the buffer; [`DirectPlan::fill`] writes the image, never the padding, so a
    /// buffer zeroed once serves every image.
    pub len: usize,
    span: bool,
    h: usize,
    w: usize,
    cg: usize,
    pads: [usize; 4],
    strides: [usize; 2],
    hs: usize,
    ws: usize,
    plane: usize,
    /// Strided: where input column xx goes, relative to its row's column-phase-0 start.
    cols: Vec<usize>,
    offs: Vec<usize>,
    cls: Vec<u8>,
    vectors: Vec<Lanes>,
    oh: usize,
    ow: usize,
}

impl DirectPlan {
    /// The plan for one image `[cg, h, w]`; the geometry must pass [`direct_applies`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        h: usize,
        w: usize,
        cg: usize,
        win: &Window,
        pads: [usize; 4],
        oh: usize,
        ow: usize,
    ) -> DirectPlan {
        assert!(direct_applies(win, h, w, pads, oh, ow));
        let [kh, kw] = win.kernel;
        let [dh, dw] = win.dilations;
        let [sh, sw] = win.strides;
        let (hs, ws) = (
            (h + pads[0] + pads[2]).div_ceil(sh),
            (w + pads[1] + pads[3]).div_ceil(sw),
        );
        let plane = hs * ws;
        let vectors = direct_lanes(oh, ow, ws);
        let mut plan = DirectPlan {
            len: 0,
            span: uses_span(win, w, oh, ow, vectors.len()),
            h,
            w,
            cg,
            pads,
            strides: win.strides,
            hs,
            ws,
            plane,
            cols: Vec::new(),
            offs: Vec::new(),
            cls: Vec::new(),
            vectors,
            oh,
            ow,
        };
        if plan.span {
            // Rows of pitch w, `pl` guard values in front: tap (c, ki, kj) of output q reads
            // q + offs; the column may fall in the previous or next row (or the guards),
            // where its mask turns the lane off.
            let hp = hs;
            plan.len = pads[1] + cg * hp * w + pads[3] + 16;
            plan.offs = (0..cg * kh * kw)
                .map(|t| {
                    let (c, ki, kj) = (t / (kh * kw), t / kw % kh, t % kw);
                    (c * hp + ki * dh) * w + kj * dw
                })
                .collect();
            plan.cls = (0..cg * kh * kw).map(|t| (t % kw) as u8).collect();
            plan.vectors = span_lanes(oh, w, kw, dw, pads[1]);
            return plan;
        }
        plan.len = cg * sh * sw * plane;
        if sw > 1 {
            plan.cols = (0..w).map(|xx| plan.at(0, 0, xx + pads[1])).collect();
        }
        let taps: Vec<usize> = (0..kh * kw)
            .map(|t| plan.at(0, t / kw * dh, t % kw * dw))
            .collect();
        // Every valid lane reads inside the buffer (direct_applies: the padded row
        // oy * sh + ki * dh exists, so does row oy + ki * dh / sh of its plane; columns
        // alike); masked-off lanes are not read.
        plan.offs = (0..cg)
            .flat_map(|c| taps.iter().map(move |&t| c * sh * sw * plane + t))
            .collect();
        plan.cls = vec![0; plan.offs.len()];
        plan
    }

    /// The buffer index of padded position (c, py, px) in the phase-plane layouts.
    fn at(&self, c: usize, py: usize, px: usize) -> usize {
        let [sh, sw] = self.strides;
        ((c * sh + py % sh) * sw + px % sw) * self.plane + py / sh * self.ws + px / sw
    }

    /// Copies image `x` into `buf` (of [`DirectPlan::len`] values, zero where this never
    /// writes).
    pub fn fill(&self, x: &[f32], buf: &mut [f32]) {
        let (h, w, pads) = (self.h, self.w, self.pads);
        assert!(x.len() >= self.cg * h * w && buf.len() >= self.len);
        if self.span {
            let hp = self.hs;
            for (c, xc) in x.chunks_exact(h * w).take(self.cg).enumerate() {
                let dst = pads[1] + (c * hp + pads[0]) * w;
                buf[dst..dst + h * w].copy_from_slice(xc);
            }
            return;
        }
        let [sh, sw] = self.strides;
        let (plane, ws) = (self.plane, self.ws);
        let first_row = self.at(0, pads[0], 0);
        for (c, xc) in x.chunks_exact(h * w).take(self.cg).enumerate() {
            // Padded row py = y + pads[0] is row py / sh of phase py % sh: both advance
            // without a division per row.
            let (mut phase, mut row) = (pads[0] % sh, first_row);
            for src in xc.chunks_exact(w) {
                let dst = c * sh * sw * plane + row;
                if sw == 1 {
                    // A loop, not a memcpy call: rows are 8 to 32 values.
                    for (d, &v) in buf[dst + pads[1]..dst + pads[1] + w].iter_mut().zip(src) {
                        *d = v;
                    }
                } else {
                    let out = &mut buf[dst..];
                    for (&o, &v) in self.cols.iter().zip(src) {
                        out[o] = v;
                    }
                }
                phase += 1;
                row += sw * plane;
                if phase == sh {
                    phase = 0;
                    row = row - sh * sw * plane + ws;
                }
            }
        }
    }

    /// The convolution of the image in `buf` (filled by [`DirectPlan::fill`]) into `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        pw: &PackedWeight,
        buf: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
        ldc: usize,
        epi: Epilogue,
        avx512: bool,
    ) {
        let need = (pw.m - 1) * ldc + self.oh * self.ow;
        assert!(out.len() >= need && epi.residual.is_none_or(|r| r.len() >= need));
        assert!(buf.len() >= self.len);
        direct_tiles(
            pw,
            &self.offs,
            &self.cls,
            buf,
            &self.vectors,
            bias,
            out,
            ldc,
            epi,
            avx512,
        );
    }
}

/// Whether a [`DirectPlan`] uses the span layout: stride 1, output as wide as the input, at
/// most [`TAP_MASKS`] kernel columns, and fewer vectors than the `padded` vectors of the
/// other layouts.
pub fn uses_span(win: &Window, w: usize, oh: usize, ow: usize, padded: usize) -> bool {
    win.strides == [1, 1]
        && ow == w
        && win.kernel[1] <= TAP_MASKS
        && (oh * ow).div_ceil(16) < padded
}

/// Runs the direct micro-kernel over every group of [`VECTORS`] vectors and every tile of 8
/// output channels; `cls[k]` is the tap mask class of tap k.
#[allow(clippy::too_many_arguments)]
fn direct_tiles(
    pw: &PackedWeight,
    offs: &[usize],
    cls: &[u8],
    padded: &[f32],
    vectors: &[Lanes],
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldc: usize,
    epi: Epilogue,
    avx512: bool,
) {
    assert!(offs.len() == pw.k && cls.len() == pw.k);
    assert!(cls.iter().all(|&c| (c as usize) < TAP_MASKS));
    let zeros = [0.0f32; MR];
    const NONE: Lanes = Lanes {
        base: 0,
        taps: [0; TAP_MASKS],
        mask: 0,
        at: 0,
    };
    for group in vectors.chunks(VECTORS) {
        let mut v = [NONE; VECTORS];
        v[..group.len()].copy_from_slice(group);
        for tile in 0..pw.m / MR {
            let a = &pw.data[tile * pw.k * MR..(tile + 1) * pw.k * MR];
            let bt: &[f32] = match bias {
                Some(b) => &b[tile * MR..(tile + 1) * MR],
                None => &zeros,
            };
            let rows = tile * MR * ldc;
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: AVX-512F checked by the caller; every unmasked load is inside
                // `padded` (see above) and every store inside `out` (`at` + popcount of the
                // mask <= oh * ow, 8 rows at stride ldc).
                unsafe {
                    x86::kernel_8x2x16_indirect(a, offs, cls, padded, v, bt, out, rows, ldc, epi)
                };
                continue;
            }
            let _ = avx512;
            kernel_8x2x16_indirect_scalar(a, offs, cls, padded, v, bt, out, rows, ldc, epi);
        }
    }
}

/// Specification of the direct micro-kernel: for each vector and each of its output lanes in
/// order, one output (bias, then `mul_add` in k order, then the epilogue) at the next output
/// index from `at`. Tap k reads `x[base + offs[k] + lane]` where the vector's mask of class
/// `cls[k]` has the lane, and 0 elsewhere.
#[allow(clippy::too_many_arguments)]
pub fn kernel_8x2x16_indirect_scalar(
    a: &[f32],
    offs: &[usize],
    cls: &[u8],
    x: &[f32],
    v: [Lanes; VECTORS],
    bias: &[f32],
    out: &mut [f32],
    rows: usize,
    ldc: usize,
    epi: Epilogue,
) {
    for half in v {
        for r in 0..MR {
            let valid = (0..16).filter(|j| half.mask >> j & 1 == 1);
            for (at, j) in (rows + r * ldc + half.at..).zip(valid) {
                let mut acc = bias[r];
                for (kk, (&o, &c)) in offs.iter().zip(cls).enumerate() {
                    let read = half.taps[c as usize] >> j & 1 == 1;
                    let xv = if read { x[half.base + o + j] } else { 0.0 };
                    acc = a[kk * MR + r].mul_add(xv, acc);
                }
                out[at] = epi.apply(at, acc);
            }
        }
    }
}

/// The specification: one accumulator per output, bias then `mul_add` in k order, then the
/// epilogue.
#[allow(clippy::too_many_arguments)]
pub fn kernel_8x32_scalar(
    k: usize,
    a: &[f32],
    b: &[f32],
    bias: &[f32],
    c: &mut [f32],
    ldc: usize,
    valid: usize,
    epi: Epilogue,
) {
    let mut acc = [[0.0f32; NR]; MR];
    for (r, row) in acc.iter_mut().enumerate() {
        row.fill(bias[r]);
    }
    for kk in 0..k {
        let bk = &b[kk * NR..(kk + 1) * NR];
        for (r, row) in acc.iter_mut().enumerate() {
            let wv = a[kk * MR + r];
            for (acc_v, &bv) in row.iter_mut().zip(bk) {
                *acc_v = wv.mul_add(bv, *acc_v);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, &v) in row[..valid].iter().enumerate() {
            c[r * ldc + j] = epi.apply(r * ldc + j, v);
        }
    }
}

// Index loops over the register tile keep it fully unrolled in registers.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86 {
    use super::{MR, NR, VECTORS};
    use std::arch::x86_64::*;

    /// The epilogue on one vector of outputs, the first at index `at` of the residual, `m`
    /// lanes valid.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn finish(v: __m512, epi: &super::Epilogue, at: usize, m: __mmask16) -> __m512 {
        let v = match epi.residual {
            Some(r) => _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, r.as_ptr().add(at))),
            None => v,
        };
        if epi.relu {
            _mm512_max_ps(v, _mm512_setzero_ps())
        } else {
            v
        }
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel_8x32(
        k: usize,
        a: &[f32],
        b: &[f32],
        bias: &[f32],
        c: &mut [f32],
        ldc: usize,
        valid: usize,
        epi: super::Epilogue,
    ) {
        debug_assert!(a.len() >= k * MR && b.len() >= k * NR && bias.len() >= MR);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for r in 0..MR {
            let v = _mm512_set1_ps(bias[r]);
            acc[r] = [v, v];
        }
        let mut ap = a.as_ptr();
        let mut bp = b.as_ptr();
        for _ in 0..k {
            let b0 = _mm512_loadu_ps(bp);
            let b1 = _mm512_loadu_ps(bp.add(16));
            for r in 0..MR {
                let wv = _mm512_set1_ps(*ap.add(r));
                acc[r][0] = _mm512_fmadd_ps(wv, b0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(wv, b1, acc[r][1]);
            }
            ap = ap.add(MR);
            bp = bp.add(NR);
        }
        let m0: __mmask16 = if valid >= 16 {
            0xffff
        } else {
            ((1u32 << valid) - 1) as u16
        };
        let m1: __mmask16 = if valid >= 32 {
            0xffff
        } else if valid > 16 {
            ((1u32 << (valid - 16)) - 1) as u16
        } else {
            0
        };
        let cp = c.as_mut_ptr();
        for (r, pair) in acc.iter().enumerate() {
            let row = cp.add(r * ldc);
            let v0 = finish(pair[0], &epi, r * ldc, m0);
            let v1 = finish(pair[1], &epi, r * ldc + 16, m1);
            _mm512_mask_storeu_ps(row, m0, v0);
            _mm512_mask_storeu_ps(row.add(16), m1, v1);
        }
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel_8x2x16_indirect(
        a: &[f32],
        offs: &[usize],
        cls: &[u8],
        x: &[f32],
        v: [super::Lanes; VECTORS],
        bias: &[f32],
        out: &mut [f32],
        rows: usize,
        ldc: usize,
        epi: super::Epilogue,
    ) {
        let m = v.map(|l| l.mask);
        let mut acc = [[_mm512_setzero_ps(); VECTORS]; MR];
        for r in 0..MR {
            acc[r] = [_mm512_set1_ps(bias[r]); VECTORS];
        }
        let xp = x.as_ptr();
        let p = v.map(|l| xp.add(l.base));
        let mut ap = a.as_ptr();
        for (&o, &c) in offs.iter().zip(cls) {
            let mut b = [_mm512_setzero_ps(); VECTORS];
            for j in 0..VECTORS {
                b[j] = _mm512_maskz_loadu_ps(*v[j].taps.get_unchecked(c as usize), p[j].add(o));
            }
            for r in 0..MR {
                let wv = _mm512_set1_ps(*ap.add(r));
                for j in 0..VECTORS {
                    acc[r][j] = _mm512_fmadd_ps(wv, b[j], acc[r][j]);
                }
            }
            ap = ap.add(MR);
        }
        // The valid lanes, packed to the low end, are consecutive outputs.
        let s = m.map(|m| ((1u32 << m.count_ones()) - 1) as u16);
        let op = out.as_mut_ptr();
        for (r, row) in acc.iter().enumerate() {
            for j in 0..VECTORS {
                let at = rows + r * ldc + v[j].at;
                let c = finish(_mm512_maskz_compress_ps(m[j], row[j]), &epi, at, s[j]);
                _mm512_mask_storeu_ps(op.add(at), s[j], c);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Seeded values in [-1, 1] (a xorshift), shared with the Winograd tests.
    pub(crate) fn seq(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// No epilogue, ReLU, + residual, + residual then ReLU.
    fn epilogues(residual: &[f32]) -> [Epilogue<'_>; 4] {
        let with = |relu| Epilogue {
            residual: Some(residual),
            relu,
        };
        let without = |relu| Epilogue {
            residual: None,
            relu,
        };
        [without(false), without(true), with(false), with(true)]
    }

    /// The epilogue written out as the Add and Relu nodes compute it.
    fn by_hand(epi: &Epilogue, i: usize, v: f32) -> f32 {
        let v = epi.residual.map_or(v, |r| v + r[i]);
        if epi.relu {
            v.max(0.0)
        } else {
            v
        }
    }

    #[test]
    fn packed_gemm_simd_is_bit_identical_to_scalar_and_matches_plain_sums() {
        for (m, k, n) in [
            (8, 1, 1),
            (16, 27, 1024),
            (32, 144, 256),
            (8, 5, 37),
            (64, 576, 64),
            (24, 9, 70),
        ] {
            let w = seq(m * k, 1);
            let col = seq(k * n, 2);
            let bias = seq(m, 3);
            let pw = PackedWeight::new(&w, m, k).unwrap();
            let panels = n.div_ceil(NR);
            let mut packed = vec![0.0f32; panels * k * NR];
            for kk in 0..k {
                for p in 0..n {
                    packed[(p / NR) * k * NR + kk * NR + p % NR] = col[kk * n + p];
                }
            }
            let residual = seq(m * n, 7);
            for epi in epilogues(&residual) {
                let mut scalar = vec![f32::NAN; m * n];
                gemm_packed(&pw, &packed, n, Some(&bias), &mut scalar, n, epi, false);
                for r in 0..m {
                    for p in 0..n {
                        let mut want = bias[r];
                        for kk in 0..k {
                            want = w[r * k + kk].mul_add(col[kk * n + p], want);
                        }
                        let want = by_hand(&epi, r * n + p, want);
                        assert_eq!(
                            scalar[r * n + p].to_bits(),
                            want.to_bits(),
                            "m={m} k={k} n={n} r={r} p={p} {epi:?}"
                        );
                    }
                }
                #[cfg(target_arch = "x86_64")]
                if quantbench_kernels::Isa::Avx512.is_supported() {
                    let mut simd = vec![f32::NAN; m * n];
                    gemm_packed(&pw, &packed, n, Some(&bias), &mut simd, n, epi, true);
                    let same = simd
                        .iter()
                        .zip(&scalar)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "AVX-512 differs from scalar at m={m} k={k} n={n} {epi:?}"
                    );
                }
            }
        }
        assert!(
            PackedWeight::new(&[0.0; 12], 4, 3).is_none(),
            "M not a multiple of 8"
        );
    }

    #[test]
    fn direct_lanes_cover_every_output_once_in_order() {
        let mut pitch_seen = false;
        for (oh, ow, wp) in [
            (32, 32, 34),
            (8, 8, 10),
            (9, 21, 23),
            (1, 1, 3),
            (5, 16, 16),
            (7, 3, 5),
        ] {
            let v = direct_lanes(oh, ow, wp);
            pitch_seen |= v.iter().any(|l| l.base % wp + 16 > wp);
            let mut next = 0;
            for l in &v {
                assert_ne!(l.mask, 0, "empty vector for {oh}x{ow} pitch {wp}");
                assert_eq!(l.at, next, "{oh}x{ow} pitch {wp}: outputs out of order");
                for j in (0..16).filter(|j| l.mask >> j & 1 == 1) {
                    let q = l.base + j;
                    assert_eq!((q / wp) * ow + q % wp, next, "lane {j} of {l:?}");
                    assert!(q % wp < ow && q / wp < oh);
                    next += 1;
                }
            }
            assert_eq!(next, oh * ow, "{oh}x{ow} pitch {wp}: outputs missed");
        }
        assert!(pitch_seen, "no case used the pitch layout");
    }

    #[test]
    fn direct_conv_simd_is_bit_identical_to_scalar_and_to_the_gemm_path() {
        use crate::model::AutoPad;
        let mut spans = 0;
        // (cg, m, h, w, kernel, pads, dilation, strides)
        for (cg, m, h, w, k, pads, dil, st) in [
            (3, 16, 32, 32, [3, 3], [1, 1, 1, 1], [1, 1], [1, 1]),
            (4, 8, 9, 21, [3, 3], [1, 1, 1, 1], [1, 1], [1, 1]),
            (5, 8, 8, 8, [1, 1], [0, 0, 0, 0], [1, 1], [1, 1]),
            (2, 16, 12, 17, [3, 5], [2, 0, 1, 3], [2, 1], [1, 1]),
            (16, 16, 8, 8, [3, 3], [1, 1, 1, 1], [1, 1], [1, 1]),
            (3, 8, 5, 3, [3, 3], [1, 1, 1, 1], [1, 1], [1, 1]),
            // strided: phase planes
            (16, 32, 32, 32, [3, 3], [1, 1, 1, 1], [1, 1], [2, 2]),
            (4, 8, 11, 13, [3, 2], [0, 1, 2, 0], [1, 1], [2, 1]),
            (3, 16, 17, 19, [3, 3], [2, 1, 0, 2], [2, 3], [3, 2]),
            (5, 8, 9, 9, [1, 1], [0, 0, 0, 0], [1, 1], [2, 2]),
        ] {
            let win = Window {
                kernel: k,
                strides: st,
                dilations: dil,
                pads,
                auto_pad: AutoPad::NotSet,
                ceil_mode: false,
            };
            let ([oh, ow], pads) = win.output(h, w).unwrap();
            assert!(direct_applies(&win, h, w, pads, oh, ow));
            let wp = (w + pads[1] + pads[3]).div_ceil(st[1]);
            spans += uses_span(&win, w, oh, ow, direct_lanes(oh, ow, wp).len()) as usize;
            let kk = cg * k[0] * k[1];
            let x = seq(cg * h * w, 4);
            let wt = seq(m * kk, 5);
            let bias = seq(m, 6);
            let pw = PackedWeight::new(&wt, m, kk).unwrap();
            let p = oh * ow;
            let residual = seq(m * p, 7);
            for epi in epilogues(&residual) {
                let direct = |avx512| {
                    let mut out = vec![f32::NAN; m * p];
                    let mut buf = Vec::new();
                    conv_direct(
                        &pw,
                        &x,
                        h,
                        w,
                        cg,
                        &win,
                        pads,
                        oh,
                        ow,
                        Some(&bias),
                        &mut out,
                        p,
                        epi,
                        &mut buf,
                        avx512,
                    );
                    out
                };
                let scalar = direct(false);
                // The im2col + packed GEMM path computes the same sums in the same order.
                let mut cols = Vec::new();
                im2col_packed(&x, h, w, cg, &win, pads, oh, ow, &mut cols);
                let mut via_gemm = vec![f32::NAN; m * p];
                gemm_packed(&pw, &cols, p, Some(&bias), &mut via_gemm, p, epi, false);
                let same = scalar
                    .iter()
                    .zip(&via_gemm)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "direct vs im2col, {cg}x{h}x{w} k{k:?} {epi:?}");
                #[cfg(target_arch = "x86_64")]
                if quantbench_kernels::Isa::Avx512.is_supported() {
                    let same = direct(true)
                        .iter()
                        .zip(&scalar)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "AVX-512 vs scalar, {cg}x{h}x{w} {epi:?}");
                }
            }
        }
        assert!(spans >= 3, "only {spans} cases used the span layout");
    }
}
