//! Winograd F(2x2, 3x3) convolution for the f32 engine (Lavin & Gray, "Fast Algorithms for
//! Convolutional Neural Networks", 2016).
//!
//! A 3x3, stride-1, pad-1 convolution is cut into tiles of 2x2 outputs. Tile `t` of output
//! channel `o` comes from the 4x4 block `d_c` of the zero-padded input around it (the padded
//! rows and columns `2 ty ..= 2 ty + 3`, `2 tx ..= 2 tx + 3`) and the 3x3 filters `g_oc`:
//!
//! ```text
//! Y = A^T [ sum_c (G g_oc G^T) . (B^T d_c B) ] A          (. is the element-wise product)
//!
//! B^T = | 1  0 -1  0 |    G = | 1    0    0   |    A^T = | 1  1  1  0 |
//!       | 0  1  1  0 |        | 1/2  1/2  1/2 |          | 0  1 -1 -1 |
//!       | 0 -1  1  0 |        | 1/2 -1/2  1/2 |
//!       | 0  1  0 -1 |        | 0    0    1   |
//! ```
//!
//! The sum over channels is 16 matrix products, one per position `xi` of the 4x4 transformed
//! block: `M_xi[o, t] = sum_c U_xi[o, c] V_xi[c, t]` with `U = G g G^T` (computed once per
//! layer, in f64, rounded to f32) and `V = B^T d B`. Each output takes 16 multiplies per input
//! channel instead of the direct convolution's 36 per 2x2 tile: 2.25x fewer.
//!
//! Rounding: the transforms add and subtract inputs (and the products), so the result differs
//! from the direct convolution's in the last bits (the tests bound the difference). On every
//! path the transforms are the same f32 code, and the products run on a micro-kernel whose
//! AVX-512 version does the scalar specification's fused multiply-adds in the same order: the
//! AVX-512 result is bit-identical to the scalar one.
//!
//! Non-finite inputs: an infinity inside a tile's 4x4 block meets differences of itself in the
//! transforms, so outputs that the direct convolution makes +-inf can be NaN here (NaN
//! spreads to the same outputs in both).
//!
//! Layouts: `V` is `[16][C][LD]` and `M` is `[16][M][LD]` (tiles contiguous, `LD` the tile
//! count rounded up to the micro-kernel's width; the extra columns hold anything and are never
//! stored to the output), and `U_xi` is packed like the direct convolution's weights
//! (`[M/8][C][8]`). [`Plan`] gives the details.

use super::conv_gemm::{Epilogue, PackedWeight, MR};
use crate::model::Window;

/// The filters of one layer in the transformed domain: `U_xi = G g G^T` at position `xi` of
/// the 4x4 block, one packed `[M, C]` matrix per position.
#[derive(Clone, Debug)]
pub struct WinogradWeight {
    pub m: usize,
    pub c: usize,
    u: Vec<PackedWeight>,
}

impl WinogradWeight {
    /// From a `[M, C, 3, 3]` weight; `None` when M is not a multiple of [`MR`].
    pub fn new(w: &[f32], m: usize, c: usize) -> Option<WinogradWeight> {
        if m == 0 || c == 0 || !m.is_multiple_of(MR) || w.len() != m * c * 9 {
            return None;
        }
        let mut u = vec![vec![0.0f32; m * c]; 16];
        for (oc, g) in w.chunks_exact(9).enumerate() {
            let g: Vec<f64> = g.iter().map(|&v| v as f64).collect();
            // G g: 4 x 3.
            let mut gg = [[0.0f64; 3]; 4];
            for j in 0..3 {
                let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
                gg[0][j] = g0;
                gg[1][j] = (g0 + g1 + g2) / 2.0;
                gg[2][j] = (g0 - g1 + g2) / 2.0;
                gg[3][j] = g2;
            }
            // (G g) G^T: 4 x 4.
            for (i, [a, b, cc]) in gg.into_iter().enumerate() {
                let row = [a, (a + b + cc) / 2.0, (a - b + cc) / 2.0, cc];
                for (j, v) in row.into_iter().enumerate() {
                    u[i * 4 + j][oc] = v as f32;
                }
            }
        }
        let u = u
            .iter()
            .map(|x| PackedWeight::new(x, m, c))
            .collect::<Option<Vec<_>>>()?;
        Some(WinogradWeight { m, c, u })
    }
}

/// Whether a Conv runs through Winograd: a 3x3 kernel, stride 1, no dilation, one group,
/// padding 1 on every side, and an even input height and width (whole tiles).
pub fn applies(win: &Window, group: usize, h: usize, w: usize, pads: [usize; 4]) -> bool {
    win.kernel == [3, 3]
        && win.strides == [1, 1]
        && win.dilations == [1, 1]
        && group == 1
        && pads == [1; 4]
        && h >= 2
        && w >= 2
        && h.is_multiple_of(2)
        && w.is_multiple_of(2)
}

/// The geometry of one layer: `h x w` images of `c` channels into `m` channels.
///
/// Scratch layout (see [`Plan::scratch_len`]):
/// - the zero-padded image split into four phase planes per channel, by the parity of the
///   padded row and column: plane `(rp, cp)` holds padded position `(2 r + rp, 2 q + cp)` at
///   `r * (tw + 1) + q`. Element `(i, j)` of tile `(ty, tx)` is then at `v(t) + (i / 2) *
///   (tw + 1) + j / 2` of plane `(i % 2, j % 2)`, with `v(t) = ty * (tw + 1) + tx`: 16
///   consecutive tiles read 16 values of a 32-value window, picked by one permute;
/// - `V` (`[16][C][LD]`) and `M` (`[16][M][LD]`).
#[derive(Clone, Debug)]
pub struct Plan {
    h: usize,
    w: usize,
    c: usize,
    m: usize,
    th: usize,
    tw: usize,
    tiles: usize,
    /// Vectors of 16 tiles per micro-kernel call (1 or 2).
    nv: usize,
    /// Tiles rounded up to a multiple of `16 nv`: the row pitch of `V` and `M`.
    ld: usize,
    /// Values per phase plane, with room for the last window's overread.
    ps: usize,
    /// Values per position `xi` of `V` and of `M`: `C * LD` and `M * LD` plus 16, so that the
    /// 16 positions of one tile (read or written together) do not share an L1 set when
    /// `C * LD` is a multiple of 4 KiB.
    vp: usize,
    mp: usize,
}

impl Plan {
    /// The plan for [`applies`] geometries.
    pub fn new(h: usize, w: usize, c: usize, m: usize) -> Plan {
        assert!(h >= 2 && w >= 2 && h.is_multiple_of(2) && w.is_multiple_of(2) && c > 0 && m > 0);
        let (th, tw) = (h / 2, w / 2);
        let tiles = th * tw;
        // Two vectors per call unless that pads more tiles than one vector does.
        let nv = if tiles.div_ceil(32) * 32 == tiles.div_ceil(16) * 16 {
            2
        } else {
            1
        };
        let ld = tiles.div_ceil(16 * nv) * 16 * nv;
        // A window starts below th * (tw + 1) + tw + 2 and spans 32 values.
        let ps = ((th + 1) * (tw + 1) + 48).div_ceil(16) * 16;
        Plan {
            h,
            w,
            c,
            m,
            th,
            tw,
            tiles,
            nv,
            ld,
            ps,
            vp: c * ld + 16,
            mp: m * ld + 16,
        }
    }

    /// Scratch values [`Plan::run`] needs (any contents: it writes before it reads).
    pub fn scratch_len(&self) -> usize {
        4 * self.c * self.ps + 16 * self.vp + 16 * self.mp
    }

    /// The convolution of one image `x` (`[c, h, w]`) into `out` (`[m, h, w]`): bias, then the
    /// epilogue (indices relative to `out`).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        wt: &WinogradWeight,
        x: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
        epi: Epilogue,
        scratch: &mut [f32],
        avx512: bool,
    ) {
        let (c, m, hw) = (self.c, self.m, self.h * self.w);
        assert!(wt.m == m && wt.c == c && wt.u.len() == 16);
        assert!(x.len() >= c * hw && out.len() >= m * hw && scratch.len() >= self.scratch_len());
        assert!(epi.residual.is_none_or(|r| r.len() >= m * hw));
        assert!(bias.is_none_or(|b| b.len() >= m));
        let (planes, rest) = scratch.split_at_mut(4 * c * self.ps);
        let (v, rest) = rest.split_at_mut(16 * self.vp);
        let mo = &mut rest[..16 * self.mp];
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            // SAFETY: the caller checked AVX-512F support; every slice is as long as the
            // plan needs (asserted above).
            unsafe {
                if self.tw.is_multiple_of(16) {
                    x86::input_rows(self, x, v);
                } else {
                    x86::fill(self, x, planes);
                    x86::input_transform(self, planes, v);
                }
                self.products(wt, v, mo, true);
                x86::output_transform(self, mo, bias, out, epi);
            }
            return;
        }
        let _ = (avx512, planes);
        self.input_transform(x, v);
        self.products(wt, v, mo, false);
        self.output_transform(mo, bias, out, epi);
    }

    /// `M_xi = U_xi V_xi` for the 16 positions.
    fn products(&self, wt: &WinogradWeight, v: &[f32], mo: &mut [f32], avx512: bool) {
        let (c, tiles, ld) = (self.c, self.tiles, self.ld);
        let width = 16 * self.nv;
        for xi in 0..16 {
            let vb = &v[xi * self.vp..xi * self.vp + c * ld];
            let mb = &mut mo[xi * self.mp..xi * self.mp + self.m * ld];
            for (tile, a) in wt.u[xi].data.chunks_exact(c * MR).enumerate() {
                for j in 0..ld / width {
                    let valid = (tiles - j * width).min(width);
                    let c_out = &mut mb[tile * MR * ld + j * width..];
                    let b = &vb[j * width..];
                    #[cfg(target_arch = "x86_64")]
                    if avx512 {
                        // SAFETY: AVX-512F checked by the caller; the kernel asserts its
                        // slices' lengths.
                        unsafe {
                            match self.nv {
                                1 => x86::kernel_8xv::<1>(c, a, b, ld, c_out, ld, valid),
                                _ => x86::kernel_8xv::<2>(c, a, b, ld, c_out, ld, valid),
                            }
                        }
                        continue;
                    }
                    match self.nv {
                        1 => kernel_8xv_scalar::<1>(c, a, b, ld, c_out, ld, valid),
                        _ => kernel_8xv_scalar::<2>(c, a, b, ld, c_out, ld, valid),
                    }
                }
            }
        }
    }

    /// Specification of the input transform: `V = B^T d B` for every tile and channel of
    /// image `x`, rows first (`h = d B` row by row, then `B^T h` column by column), into `v`
    /// (`[16][C][LD]`; columns from `tiles` on are left as they are).
    fn input_transform(&self, x: &[f32], v: &mut [f32]) {
        let (h, w, ld) = (self.h, self.w, self.ld);
        let at = |c: usize, py: usize, px: usize| -> f32 {
            if py == 0 || px == 0 || py > h || px > w {
                0.0
            } else {
                x[(c * h + py - 1) * w + px - 1]
            }
        };
        for c in 0..self.c {
            for t in 0..self.tiles {
                let (ty, tx) = (t / self.tw, t % self.tw);
                let mut hr = [[0.0f32; 4]; 4];
                for (i, row) in hr.iter_mut().enumerate() {
                    let d: [f32; 4] = std::array::from_fn(|j| at(c, 2 * ty + i, 2 * tx + j));
                    *row = [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]];
                }
                for j in 0..4 {
                    let col = [
                        hr[0][j] - hr[2][j],
                        hr[1][j] + hr[2][j],
                        hr[2][j] - hr[1][j],
                        hr[1][j] - hr[3][j],
                    ];
                    for (i, val) in col.into_iter().enumerate() {
                        v[(i * 4 + j) * self.vp + c * ld + t] = val;
                    }
                }
            }
        }
    }

    /// Specification of the output transform: `Y = A^T M A` for every tile of every output
    /// channel (columns first), plus the bias, then the epilogue.
    fn output_transform(&self, mo: &[f32], bias: Option<&[f32]>, out: &mut [f32], epi: Epilogue) {
        let (w, m, ld) = (self.w, self.m, self.ld);
        for o in 0..m {
            let b = bias.map_or(0.0, |b| b[o]);
            for t in 0..self.tiles {
                let (ty, tx) = (t / self.tw, t % self.tw);
                let q = |xi: usize| mo[xi * self.mp + o * ld + t];
                let s: [f32; 4] = std::array::from_fn(|j| q(j) + q(4 + j) + q(8 + j));
                let r: [f32; 4] = std::array::from_fn(|j| q(4 + j) - q(8 + j) - q(12 + j));
                let y = [
                    [s[0] + s[1] + s[2], s[1] - s[2] - s[3]],
                    [r[0] + r[1] + r[2], r[1] - r[2] - r[3]],
                ];
                for (a, row) in y.iter().enumerate() {
                    for (bb, &val) in row.iter().enumerate() {
                        let i = o * self.h * w + (2 * ty + a) * w + 2 * tx + bb;
                        out[i] = epi.apply(i, val + b);
                    }
                }
            }
        }
    }
}

/// The slices of one product micro-kernel call: `a` holds `k x 8` weights, `b` `k` rows of
/// `width` values at pitch `ldb`, `c` 8 rows of `valid <= width` outputs at pitch `ldc`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn check_tile(
    k: usize,
    a: &[f32],
    b: &[f32],
    ldb: usize,
    c: &[f32],
    ldc: usize,
    valid: usize,
    width: usize,
) {
    assert!(valid <= width && a.len() >= k * MR);
    assert!(k == 0 || b.len() >= (k - 1) * ldb + width);
    assert!(c.len() >= (MR - 1) * ldc + valid);
}

/// Specification of the product micro-kernel: `c[r * ldc + p] = sum_k a[k * 8 + r] *
/// b[k * ldb + p]` for 8 rows and `p < valid`, one `mul_add` per k in k order from 0.
#[allow(clippy::too_many_arguments)]
pub fn kernel_8xv_scalar<const NV: usize>(
    k: usize,
    a: &[f32],
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    valid: usize,
) {
    check_tile(k, a, b, ldb, c, ldc, valid, 16 * NV);
    for r in 0..MR {
        for p in 0..valid {
            let mut acc = 0.0f32;
            for kk in 0..k {
                acc = a[kk * MR + r].mul_add(b[kk * ldb + p], acc);
            }
            c[r * ldc + p] = acc;
        }
    }
}

// Index loops over the register tile keep it unrolled in registers.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86 {
    use super::{Epilogue, Plan, MR};
    use std::arch::x86_64::*;

    /// A mask of the `n` lanes from lane `from` on.
    #[inline]
    fn lanes(from: usize, n: usize) -> u16 {
        ((((1u32 << n) - 1) << from) & 0xffff) as u16
    }

    /// Copies image `x` into its zero-padded phase planes (see [`Plan`]).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fill(p: &Plan, x: &[f32], planes: &mut [f32]) {
        let (h, w, tw, ps) = (p.h, p.w, p.tw, p.ps);
        let pitch = tw + 1;
        assert!(x.len() >= p.c * h * w && planes.len() >= 4 * p.c * ps);
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        for c in 0..p.c {
            let base = 4 * c * ps;
            // Padded row 0 is row 0 of the even-row planes; padded row h + 1 is row th of the
            // odd-row planes.
            planes[base..base + pitch].fill(0.0);
            planes[base + ps..base + ps + pitch].fill(0.0);
            let last = base + 2 * ps + p.th * pitch;
            planes[last..last + pitch].fill(0.0);
            planes[last + ps..last + ps + pitch].fill(0.0);
            for y in 0..h {
                // Padded row y + 1.
                let (rp, row) = ((y + 1) % 2, (y + 1) >> 1);
                let e = base + 2 * rp * ps + row * pitch;
                let o = e + ps;
                // Padded column 0 (even) and w + 1 (odd) are zero; input column 2k is odd
                // column k, input column 2k + 1 is even column k + 1.
                planes[e] = 0.0;
                planes[o + tw] = 0.0;
                let src = x.as_ptr().add((c * h + y) * w);
                let dst = planes.as_mut_ptr();
                for k0 in (0..tw).step_by(16) {
                    let n = (tw - k0).min(16);
                    let lo = _mm512_maskz_loadu_ps(lanes(0, (2 * n).min(16)), src.add(2 * k0));
                    let hi = _mm512_maskz_loadu_ps(
                        lanes(0, (2 * n).saturating_sub(16)),
                        src.add(2 * k0 + 16),
                    );
                    let m = lanes(0, n);
                    _mm512_mask_storeu_ps(dst.add(o + k0), m, _mm512_permutex2var_ps(lo, even, hi));
                    _mm512_mask_storeu_ps(
                        dst.add(e + 1 + k0),
                        m,
                        _mm512_permutex2var_ps(lo, odd, hi),
                    );
                }
            }
        }
    }

    /// [`Plan::input_transform`] straight from the image when tile rows are whole vectors
    /// (`tw` a multiple of 16): for each run of 16 tiles along a tile row, the horizontal
    /// transforms of each padded row are computed once (from two loads, the even and odd
    /// columns and their one-lane shifts) and kept in registers for the two tile rows that
    /// share it; no phase planes.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn input_rows(p: &Plan, x: &[f32], v: &mut [f32]) {
        let (h, w, tw, ld, cn) = (p.h, p.w, p.tw, p.ld, p.c);
        assert!(tw.is_multiple_of(16) && x.len() >= cn * h * w && v.len() >= 16 * p.vp);
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let zero = _mm512_setzero_ps();
        let vp = v.as_mut_ptr();
        // `[d0 - d2, d1 + d2, d2 - d1, d1 - d3]` of padded row r (1..=h) for tiles
        // tx0..tx0 + 16: d_j is input column 2 tx + j - 1.
        let horizontal = |plane: *const f32, r: usize, tx0: usize| -> [__m512; 4] {
            if r == 0 || r == h + 1 {
                return [zero; 4];
            }
            let row = plane.add((r - 1) * w);
            let lo = _mm512_loadu_ps(row.add(2 * tx0));
            let hi = _mm512_loadu_ps(row.add(2 * tx0 + 16));
            let d1 = _mm512_permutex2var_ps(lo, even, hi);
            let d2 = _mm512_permutex2var_ps(lo, odd, hi);
            let before = if tx0 == 0 { 0.0 } else { *row.add(2 * tx0 - 1) };
            let after = if tx0 + 16 == tw {
                0.0
            } else {
                *row.add(2 * tx0 + 32)
            };
            // d0: d2 one lane up, `before` in lane 0; d3: d1 one lane down, `after` in 15.
            let d0 = _mm512_castsi512_ps(_mm512_alignr_epi32::<15>(
                _mm512_castps_si512(d2),
                _mm512_castps_si512(_mm512_set1_ps(before)),
            ));
            let d3 = _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                _mm512_castps_si512(_mm512_set1_ps(after)),
                _mm512_castps_si512(d1),
            ));
            [
                _mm512_sub_ps(d0, d2),
                _mm512_add_ps(d1, d2),
                _mm512_sub_ps(d2, d1),
                _mm512_sub_ps(d1, d3),
            ]
        };
        for c in 0..cn {
            let plane = x.as_ptr().add(c * h * w);
            for tx0 in (0..tw).step_by(16) {
                let mut r0 = horizontal(plane, 0, tx0);
                let mut r1 = horizontal(plane, 1, tx0);
                for ty in 0..p.th {
                    let r2 = horizontal(plane, 2 * ty + 2, tx0);
                    let r3 = horizontal(plane, 2 * ty + 3, tx0);
                    let t = ty * tw + tx0;
                    for j in 0..4 {
                        let col = [
                            _mm512_sub_ps(r0[j], r2[j]),
                            _mm512_add_ps(r1[j], r2[j]),
                            _mm512_sub_ps(r2[j], r1[j]),
                            _mm512_sub_ps(r1[j], r3[j]),
                        ];
                        for i in 0..4 {
                            _mm512_storeu_ps(vp.add((i * 4 + j) * p.vp + c * ld + t), col[i]);
                        }
                    }
                    (r0, r1) = (r2, r3);
                }
            }
        }
    }

    /// [`Plan::input_transform`] from the phase planes, 16 tiles at a time.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn input_transform(p: &Plan, planes: &[f32], v: &mut [f32]) {
        let (tw, ps, ld, cn) = (p.tw, p.ps, p.ld, p.c);
        let pitch = tw + 1;
        assert!(planes.len() >= 4 * cn * ps && v.len() >= 16 * p.vp);
        // Per group of 16 tiles: where its window starts, and each lane's place in it.
        let groups: Vec<(usize, __m512i)> = (0..p.tiles.div_ceil(16))
            .map(|g| {
                let virt = |t: usize| t + t / tw;
                let v0 = virt(16 * g);
                let idx: [i32; 16] = std::array::from_fn(|l| {
                    let t = 16 * g + l;
                    if t < p.tiles {
                        (virt(t) - v0) as i32
                    } else {
                        l as i32
                    }
                });
                (v0, _mm512_loadu_si512(idx.as_ptr().cast()))
            })
            .collect();
        let row_vectors = tw.is_multiple_of(16);
        let vp = v.as_mut_ptr();
        for c in 0..cn {
            let base = planes.as_ptr().add(4 * c * ps);
            for (g, &(v0, idx)) in groups.iter().enumerate() {
                let mut d = [[_mm512_setzero_ps(); 4]; 4];
                for i in 0..4 {
                    for j in 0..4 {
                        let q = (i % 2) * 2 + j % 2;
                        let at = base.add(q * ps + v0 + (i / 2) * pitch + j / 2);
                        // With whole vectors per tile row the window is the first 16.
                        d[i][j] = if row_vectors {
                            _mm512_loadu_ps(at)
                        } else {
                            _mm512_permutex2var_ps(
                                _mm512_loadu_ps(at),
                                idx,
                                _mm512_loadu_ps(at.add(16)),
                            )
                        };
                    }
                }
                let mut hr = [[_mm512_setzero_ps(); 4]; 4];
                for i in 0..4 {
                    let r = d[i];
                    hr[i] = [
                        _mm512_sub_ps(r[0], r[2]),
                        _mm512_add_ps(r[1], r[2]),
                        _mm512_sub_ps(r[2], r[1]),
                        _mm512_sub_ps(r[1], r[3]),
                    ];
                }
                for j in 0..4 {
                    let col = [
                        _mm512_sub_ps(hr[0][j], hr[2][j]),
                        _mm512_add_ps(hr[1][j], hr[2][j]),
                        _mm512_sub_ps(hr[2][j], hr[1][j]),
                        _mm512_sub_ps(hr[1][j], hr[3][j]),
                    ];
                    for i in 0..4 {
                        _mm512_storeu_ps(vp.add((i * 4 + j) * p.vp + c * ld + 16 * g), col[i]);
                    }
                }
            }
        }
    }

    /// [`Plan::output_transform`], 16 tiles at a time: the four outputs of each tile are
    /// interleaved into two rows of pairs and stored run by run (a run is the tiles of one
    /// tile row).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn output_transform(
        p: &Plan,
        mo: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
        epi: Epilogue,
    ) {
        let (w, m, tw, ld, tiles) = (p.w, p.m, p.tw, p.ld, p.tiles);
        let hw = p.h * w;
        assert!(mo.len() >= 16 * p.mp && out.len() >= m * hw);
        assert!(epi.residual.is_none_or(|r| r.len() >= m * hw));
        let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let zero = _mm512_setzero_ps();
        let op = out.as_mut_ptr();
        let mp = mo.as_ptr();
        for o in 0..m {
            let b = _mm512_set1_ps(bias.map_or(0.0, |b| b[o]));
            for t0 in (0..tiles).step_by(16) {
                let q: [__m512; 16] =
                    std::array::from_fn(|xi| _mm512_loadu_ps(mp.add(xi * p.mp + o * ld + t0)));
                let s: [__m512; 4] =
                    std::array::from_fn(|j| _mm512_add_ps(_mm512_add_ps(q[j], q[4 + j]), q[8 + j]));
                let r: [__m512; 4] = std::array::from_fn(|j| {
                    _mm512_sub_ps(_mm512_sub_ps(q[4 + j], q[8 + j]), q[12 + j])
                });
                let y00 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), s[2]), b);
                let y01 = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[1], s[2]), s[3]), b);
                let y10 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(r[0], r[1]), r[2]), b);
                let y11 = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(r[1], r[2]), r[3]), b);
                let rows = [
                    [
                        _mm512_permutex2var_ps(y00, lo, y01),
                        _mm512_permutex2var_ps(y00, hi, y01),
                    ],
                    [
                        _mm512_permutex2var_ps(y10, lo, y11),
                        _mm512_permutex2var_ps(y10, hi, y11),
                    ],
                ];
                for half in 0..2 {
                    let start = t0 + 8 * half;
                    let end = (start + 8).min(tiles);
                    let mut t = start;
                    while t < end {
                        let (ty, tx) = (t / tw, t % tw);
                        let n = (tw - tx).min(end - t);
                        let l = t - start;
                        let mask = lanes(2 * l, 2 * n);
                        for (a, row) in rows.iter().enumerate() {
                            // Lane 2l of the vector is output i: the vector's lane 0 sits at
                            // i - 2l (>= 0: i >= 2t >= 2l), its masked-off lanes untouched.
                            let at = o * hw + (2 * ty + a) * w + 2 * tx - 2 * l;
                            let mut val = row[half];
                            if let Some(res) = epi.residual {
                                let rv = _mm512_maskz_loadu_ps(mask, res.as_ptr().add(at));
                                val = _mm512_add_ps(val, rv);
                            }
                            if epi.relu {
                                val = _mm512_max_ps(val, zero);
                            }
                            _mm512_mask_storeu_ps(op.add(at), mask, val);
                        }
                        t += n;
                    }
                }
            }
        }
    }

    /// [`super::kernel_8xv_scalar`] with `8 x NV` accumulators of 16 lanes.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_8xv<const NV: usize>(
        k: usize,
        a: &[f32],
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        valid: usize,
    ) {
        super::check_tile(k, a, b, ldb, c, ldc, valid, 16 * NV);
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let mut ap = a.as_ptr();
        let mut bp = b.as_ptr();
        for _ in 0..k {
            let mut bv = [_mm512_setzero_ps(); NV];
            for j in 0..NV {
                bv[j] = _mm512_loadu_ps(bp.add(16 * j));
            }
            for r in 0..MR {
                let wv = _mm512_set1_ps(*ap.add(r));
                for j in 0..NV {
                    acc[r][j] = _mm512_fmadd_ps(wv, bv[j], acc[r][j]);
                }
            }
            ap = ap.add(MR);
            bp = bp.add(ldb);
        }
        let mut masks = [0u16; NV];
        for j in 0..NV {
            let n = valid.saturating_sub(16 * j).min(16);
            masks[j] = ((1u32 << n) - 1) as u16;
        }
        let cp = c.as_mut_ptr();
        for r in 0..MR {
            for j in 0..NV {
                _mm512_mask_storeu_ps(cp.add(r * ldc + 16 * j), masks[j], acc[r][j]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::conv_gemm;
    use crate::engine::conv_gemm::tests::seq;

    /// The plain definition of the convolution, in f64.
    fn reference(
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        c: usize,
        m: usize,
        h: usize,
        wd: usize,
    ) -> Vec<f64> {
        let mut out = vec![0.0f64; m * h * wd];
        for o in 0..m {
            for y in 0..h {
                for xx in 0..wd {
                    let mut s = bias[o] as f64;
                    for ci in 0..c {
                        for ki in 0..3 {
                            for kj in 0..3 {
                                let (iy, ix) = (y + ki, xx + kj);
                                if iy < 1 || ix < 1 || iy > h || ix > wd {
                                    continue;
                                }
                                s += w[((o * c + ci) * 3 + ki) * 3 + kj] as f64
                                    * x[(ci * h + iy - 1) * wd + ix - 1] as f64;
                            }
                        }
                    }
                    out[(o * h + y) * wd + xx] = s;
                }
            }
        }
        out
    }

    #[test]
    fn winograd_matches_the_definition_and_simd_is_bit_identical_to_scalar() {
        let avx512 = quantbench_kernels::Isa::Avx512.is_supported();
        // Tile counts of one and two vectors, a partial vector, and a single tile.
        for &(c, m, h, wd) in &[
            (3, 8, 2, 2),
            (16, 16, 8, 8),
            (5, 8, 6, 10),
            (16, 24, 16, 16),
            (32, 8, 12, 20),
            (7, 16, 32, 32),
            (4, 8, 4, 64),
        ] {
            let x = seq(c * h * wd, 1 + c as u32);
            let w = seq(m * c * 9, 7 + m as u32);
            let bias = seq(m, 3);
            let residual = seq(m * h * wd, 5);
            let wt = WinogradWeight::new(&w, m, c).unwrap();
            let plan = Plan::new(h, wd, c, m);
            let want = reference(&x, &w, &bias, c, m, h, wd);
            for epi in [
                Epilogue::default(),
                Epilogue {
                    residual: Some(&residual),
                    relu: true,
                },
            ] {
                let mut runs = Vec::new();
                for simd in [false, true] {
                    if simd && !avx512 {
                        continue;
                    }
                    let mut scratch = vec![0.0f32; plan.scratch_len()];
                    let mut out = vec![f32::NAN; m * h * wd];
                    // twice: a reused scratch gives the same result
                    plan.run(&wt, &x, Some(&bias), &mut out, epi, &mut scratch, simd);
                    let first = out.clone();
                    plan.run(&wt, &x, Some(&bias), &mut out, epi, &mut scratch, simd);
                    assert_eq!(first, out);
                    runs.push(out);
                }
                for (i, &got) in runs[0].iter().enumerate() {
                    let ideal = epi.apply(i, want[i] as f32) as f64;
                    // The sum of |terms| bounds the rounding of either method.
                    let scale = (c * 9) as f64;
                    assert!(
                        (got as f64 - ideal).abs() <= 1e-5 * scale,
                        "{c}x{m} {h}x{wd} output {i}: {got} vs {ideal}"
                    );
                }
                if let Some(simd) = runs.get(1) {
                    let same = runs[0]
                        .iter()
                        .zip(simd)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{c}x{m} {h}x{wd}: AVX-512 differs from scalar");
                }
            }
        }
    }

    #[test]
    fn winograd_is_close_to_the_direct_convolution() {
        // ResNet-20's shapes; the direct kernel is the engine's other exact-order path.
        let avx512 = quantbench_kernels::Isa::Avx512.is_supported();
        for &(c, h) in &[(16, 32), (32, 16), (64, 8)] {
            let (m, wd) = (c, h);
            let x = seq(c * h * wd, 11);
            let w: Vec<f32> = seq(m * c * 9, 13).iter().map(|v| v * 0.2).collect();
            let win = Window {
                kernel: [3, 3],
                strides: [1, 1],
                dilations: [1, 1],
                pads: [1; 4],
                auto_pad: crate::model::AutoPad::NotSet,
                ceil_mode: false,
            };
            let pads = [1; 4];
            assert!(applies(&win, 1, h, wd, pads));
            let pw = conv_gemm::PackedWeight::new(&w, m, c * 9).unwrap();
            let mut cols = Vec::new();
            conv_gemm::im2col_packed(&x, h, wd, c, &win, pads, h, wd, &mut cols);
            let mut direct = vec![0.0f32; m * h * wd];
            let p = h * wd;
            conv_gemm::gemm_packed(
                &pw,
                &cols,
                p,
                None,
                &mut direct,
                p,
                Epilogue::default(),
                false,
            );
            let wt = WinogradWeight::new(&w, m, c).unwrap();
            let plan = Plan::new(h, wd, c, m);
            let mut scratch = vec![0.0f32; plan.scratch_len()];
            let mut out = vec![0.0f32; m * p];
            plan.run(
                &wt,
                &x,
                None,
                &mut out,
                Epilogue::default(),
                &mut scratch,
                avx512,
            );
            let max = direct
                .iter()
                .zip(&out)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                max < 2e-5,
                "{c} channels {h}x{h}: max |winograd - direct| = {max}"
            );
        }
    }
}
