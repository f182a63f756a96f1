//! K-means weight sharing: optimal 1-D clustering into codebooks, assignment of values to
//! their nearest centroid, decoding of indices, and the per-centroid gradient sums that
//! fine-tuning (Deep Compression) uses.
//!
//! * [`optimal_1d`] finds the clustering of minimum within-cluster sum of squares (SSE), not a
//!   local optimum: in one dimension optimal clusters are contiguous runs of the sorted values,
//!   so a dynamic program over the sorted values is exact (equal values merged into one
//!   position weighted by their count, unless few values repeat: then every value is a
//!   position of weight 1, see `sorted_positions`). Its layers are monotone-argmin problems
//!   (the cost is Monge) solved by divide and conquer, O(k m log m) for m positions (Wang &
//!   Song 2011, Gronlund et al. 2017), here iteratively, coarse rows first, with the previous
//!   layer's argmins as lower bounds (Knuth) and the finest rows in blocks of 8 (`layer_with`).
//!   Each scan computes each candidate with the reference's operations (the reciprocal of a
//!   count divided, or read from a table: the same quotient), so every ISA returns the same
//!   codebook bit for bit. (A SMAWK version, O(k m), measured slower here: its evaluations
//!   are branchy and latency-bound. Solving 8 rows at once with gathers, one per lane,
//!   measured 1.4-3x slower on a Zen 4; the blocks broadcast shared candidates instead.)
//!   From [`LAGRANGE_MIN_POSITIONS`] positions on, a Lagrangian search comes first
//!   (`lagrange`): a penalty per cluster turns the k layers into one monotone-argmin program
//!   without a cluster count, solved for a few penalties until one gives exactly k clusters,
//!   which is then optimal for k: O(m) memory and a time that does not grow with k (at
//!   270,000 values, 1-2 passes of ~12 ms for k = 4..256, against 0.08-0.9 s for the layers).
//!   Where no penalty gives k clusters (ties between cluster counts) the layers run.
//! * Ties (several partitions with the same SSE) are broken toward the leftmost boundaries:
//!   each cluster ends as early as possible, scanning from the first value (up to f64 rounding
//!   of the costs). For [1, 3, 5, 7, 9] and k = 2 that is {1, 3}, {5, 7, 9}: centroids 2 and 7.
//!   (The Lagrangian search, for larger inputs, also takes the leftmost of equal candidates
//!   for each prefix, but of the penalized costs: between exactly tied partitions it may
//!   choose another optimum than the layers.)
//! * Centroids are stored sorted ascending; index `i` is the `i`-th smallest centroid.
//! * Policy for non-finite values (the crate's NaN policy): clustering ignores NaN and +-inf;
//!   assignment reads NaN as 0.0 and sends +-inf to the last / first centroid.
//!
//! Assignment and decoding are defined in [`scalar`]; the SIMD paths match them bit for bit.

#[cfg(target_arch = "aarch64")]
mod aarch64_neon;
mod lagrange;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;

use crate::error::{check_len, KernelError};
use crate::isa::Kernels;
use crate::linear::{dispatch, ChannelLayout};

/// Largest codebook: indices are stored in `u8`.
pub const MAX_CLUSTERS: usize = 256;
/// `k` must be a codebook size, 1..=[`MAX_CLUSTERS`].
fn check_clusters(k: usize) -> Result<(), KernelError> {
    if (1..=MAX_CLUSTERS).contains(&k) {
        return Ok(());
    }
    Err(KernelError::Range {
        message: format!("k = {k} clusters: expected 1..={MAX_CLUSTERS}"),
    })
}

/// Largest traceback table of the exact dynamic program, in entries of 4 bytes (1 GiB).
pub const MAX_TRACEBACK: usize = 1 << 28;

/// A sorted codebook of 1..=256 finite centroids, with the thresholds that assignment uses.
/// Two codebooks are equal when their centroids are (everything else derives from them).
#[derive(Clone, Debug)]
pub struct Codebook {
    centroids: Vec<f32>,
    /// `thresholds[j]` is the smallest f32 strictly above the midpoint of centroids `j` and
    /// `j+1` (computed exactly in f64), so `x >= thresholds[j]` exactly when `x` is closer to
    /// centroid `j+1` (an exact midpoint goes to the lower centroid). Padded with +inf to a
    /// power of two minus one entries for branch-free binary search.
    pub(crate) thresholds: Vec<f32>,
    /// The first 32 centroids, padded with the last one (register-resident decode tables).
    pub(crate) table: [f32; 32],
    /// The SIMD assignment of k > 16 counts the thresholds `<= x` in two steps of 16 (see
    /// [`ASSIGN_BLOCK`]): `blocks` is `thresholds` extended with +inf to a multiple of 16
    /// entries, at least one more than `thresholds` has, and `fences[j] = blocks[16 j + 15]`
    /// for every block of 16 but the last, NaN beyond (a NaN fence is never `<= x`). Empty
    /// (all NaN) for k <= 16.
    pub(crate) blocks: Vec<f32>,
    pub(crate) fences: [f32; ASSIGN_BLOCK],
    /// The binary search over `thresholds` (`2^m - 1` entries) level by level, for register
    /// table lookups: level `L < m` probes `thresholds[j 2^(m-L) + 2^(m-L-1) - 1]` for
    /// `j < 2^L`, stored at [`search_level`]`(L)`; empty for k <= 16 and off x86-64 (read
    /// by AVX-512 only).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) levels: Vec<f32>,
}

/// Offset of level `level` in [`Codebook::levels`]: every level takes at least 16 entries
/// (one AVX-512 register; the entries beyond `2^level` are never probed).
pub(crate) const fn search_level(level: u32) -> usize {
    let mut off = 0;
    let mut l = 0;
    while l < level {
        off += if 1 << l > 16 { 1 << l } else { 16 };
        l += 1;
    }
    off
}

/// Width of the two-step count behind the SIMD assignment of more than 16 centroids. The
/// thresholds are sorted, so the number `b` of fences `<= x` is the number of whole blocks
/// `<= x`: every threshold before block `b` is `<= x` and the last of block `b` (if it has a
/// fence) is not. Then `#{t <= x} = 16 b + #{t in block b : t <= x}`; the +inf padding only
/// counts for x = +inf, which the clamp to `k - 1` sends where the scalar search does.
pub(crate) const ASSIGN_BLOCK: usize = 16;

impl PartialEq for Codebook {
    fn eq(&self, other: &Codebook) -> bool {
        self.centroids == other.centroids
    }
}

impl Codebook {
    /// A codebook from centroids (sorted here); they must be finite and 1..=256 many.
    pub fn new(mut centroids: Vec<f32>) -> Result<Codebook, KernelError> {
        if centroids.is_empty() || centroids.len() > MAX_CLUSTERS {
            return Err(KernelError::Range {
                message: format!(
                    "codebook of {} centroids: expected 1..={MAX_CLUSTERS}",
                    centroids.len()
                ),
            });
        }
        if let Some(bad) = centroids.iter().find(|c| !c.is_finite()) {
            return Err(KernelError::Range {
                message: format!("codebook centroid {bad}: centroids must be finite"),
            });
        }
        centroids.sort_by(f32::total_cmp);
        let k = centroids.len();
        let padded = k.next_power_of_two() - 1;
        let mut thresholds: Vec<f32> = centroids
            .windows(2)
            .map(|w| {
                let mid = (w[0] as f64 + w[1] as f64) / 2.0; // exact
                let t = mid as f32;
                if t as f64 > mid {
                    t
                } else {
                    t.next_up()
                }
            })
            .collect();
        thresholds.resize(padded, f32::INFINITY);
        let mut table = [centroids[k - 1]; 32];
        for (t, &c) in table.iter_mut().zip(&centroids) {
            *t = c;
        }
        // the SIMD assignment's tables for k > 16 (k <= 16 compares with every threshold)
        let (mut blocks, mut fences) = (Vec::new(), [f32::NAN; ASSIGN_BLOCK]);
        if k > 16 {
            blocks = thresholds.clone();
            blocks.resize(
                (thresholds.len() + 1).next_multiple_of(ASSIGN_BLOCK),
                f32::INFINITY,
            );
            let whole = blocks.len() / ASSIGN_BLOCK - 1; // every block but the last
            for (j, f) in fences.iter_mut().enumerate().take(whole) {
                *f = blocks[ASSIGN_BLOCK * j + ASSIGN_BLOCK - 1];
            }
        }
        let mut levels = Vec::new();
        if k > 16 && cfg!(target_arch = "x86_64") {
            let m = thresholds.len().trailing_ones();
            levels.resize(search_level(m), f32::INFINITY);
            for level in 0..m {
                let (stride, probe) = (1usize << (m - level), (1usize << (m - level - 1)) - 1);
                for j in 0..1usize << level {
                    levels[search_level(level) + j] = thresholds[j * stride + probe];
                }
            }
        }
        Ok(Codebook {
            centroids,
            thresholds,
            table,
            blocks,
            fences,
            levels,
        })
    }

    /// The centroids, ascending.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// Number of centroids `k`.
    pub fn len(&self) -> usize {
        self.centroids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.centroids.is_empty()
    }

    /// Bits per stored index: `ceil(log2 k)` (0 for a single centroid).
    pub fn index_bits(&self) -> u32 {
        (self.len() as u32).next_power_of_two().trailing_zeros()
    }
}

/// Result of a clustering.
#[derive(Clone, Debug, PartialEq)]
pub struct KMeansFit {
    pub codebook: Codebook,
    /// Sum over the finite input values of the squared distance to their centroid, computed
    /// in f64 directly from the data and the final centroids.
    pub sse: f64,
    /// A proven upper bound on `sse` minus the minimum SSE of any clustering of the finite
    /// values into k clusters: 0.0 from the exact mode (optimal, up to the f64 evaluation of
    /// its program and the f32 rounding of its centroids), [`fast_gap_bound`] from the fast
    /// mode.
    pub gap_bound: f64,
}

/// The fast mode's gap bound, for `n` finite values in `[lo, hi]` whose fullest histogram
/// bin (of [`FAST_BINS`] over that range, width `h`) holds `max_n` values, and its `sse`:
///
/// ```text
/// 2 max_n (hi - lo) h (1 + 1e-4)  +  (FAST_LLOYD_ITERS + 1) n (2^-24 max(|lo|, |hi|))^2  +  1e-9 sse
/// ```
///
/// Why. The clusters of an optimal clustering are intervals, each value nearest its own
/// centroid `c_1 < ... < c_k`. Give every bin that two or more of them share to the lowest,
/// `c_j`: a value `x` of cluster `i > j` in that bin, with a value `y <= (c_j + c_{j+1}) / 2`
/// of cluster `j` beside it, costs `(c_i - c_j)(2 x - c_i - c_j) <= 2 (c_i - c_j)(x - y) <= 2
/// h (c_i - c_j)` more. Shared bins span disjoint runs of centroids, so the bin-aligned
/// clustering built costs at most `2 h max_n (c_k - c_1) <= 2 h max_n (hi - lo)` above the
/// optimum, and the fast mode's program over whole bins finds one no worse. Its Lloyd steps
/// never increase the SSE but for the rounding of centroids to f32 (`|C| d^2` per cluster, `d
/// <= 2^-24 |c|`), once for the program's centroids and once per step. The `1 + 1e-4` and
/// `1e-9 sse` cover the f64 rounding of bins and sums.
pub fn fast_gap_bound(n: f64, max_n: f64, lo: f32, hi: f32, sse: f64) -> f64 {
    let range = hi as f64 - lo as f64;
    let h = range / FAST_BINS as f64;
    let c = (lo.abs().max(hi.abs()) as f64) * (-24f64).exp2();
    2.0 * max_n * range * h * (1.0 + 1e-4) + (FAST_LLOYD_ITERS + 1) as f64 * n * c * c + 1e-9 * sse
}

/// The finite values of `x` in ascending order (-0.0 before 0.0), the order of
/// `f32::total_cmp`: a least-significant-digit radix sort of their order-preserving bit
/// patterns, three passes of 11 bits (several times faster than a comparison sort here).
fn sorted_finite(x: &[f32]) -> Vec<f32> {
    // negative values: all bits flipped; others: the sign bit set (branch-free: the signs
    // of a sample are not predictable)
    let key = |v: f32| {
        let b = v.to_bits();
        b ^ (((b as i32 >> 31) as u32) | 0x8000_0000)
    };
    let n = x.iter().filter(|v| v.is_finite()).count();
    let mut a = vec![0u32; n];
    // the three passes' digit counts, in the same read as the keys
    let mut counts = [[0usize; 1 << 11]; 3];
    let mut put = |k: &mut u32, v: f32| {
        *k = key(v);
        counts[0][(*k & 0x7FF) as usize] += 1;
        counts[1][((*k >> 11) & 0x7FF) as usize] += 1;
        counts[2][(*k >> 22) as usize] += 1;
    };
    if n == x.len() {
        a.iter_mut().zip(x).for_each(|(k, &v)| put(k, v));
    } else {
        let finite = x.iter().filter(|v| v.is_finite());
        a.iter_mut().zip(finite).for_each(|(k, &v)| put(k, v));
    }
    let mut b = vec![0u32; n];
    /// A counting-sort pass on the 11 bits of the keys `src` from `shift` with the digit
    /// counts `count`: `put(slot, key)`.
    fn pass(src: &[u32], shift: u32, count: &[usize; 1 << 11], mut put: impl FnMut(usize, u32)) {
        let mut start = [0usize; 1 << 11];
        let mut sum = 0;
        for (s, &c) in start.iter_mut().zip(count) {
            (*s, sum) = (sum, sum + c);
        }
        for &k in src {
            let d = ((k >> shift) & 0x7FF) as usize;
            put(start[d], k);
            start[d] += 1;
        }
    }
    pass(&a, 0, &counts[0], |i, k| b[i] = k);
    pass(&b, 11, &counts[1], |i, k| a[i] = k);
    // the last pass writes the values' bits (the key's inverse), read back in place
    pass(&a, 22, &counts[2], |i, k| {
        b[i] = k ^ ((!((k as i32) >> 31) as u32) | 0x8000_0000)
    });
    b.into_iter().map(f32::from_bits).collect()
}

/// The finite values of `x` sorted, as the positions of the dynamic program with their
/// weights, and the number of distinct values. Equal values are merged into one position
/// weighted by their multiplicity, unless at most one value in 8 repeats an earlier one: then
/// every value is its own position of weight 1 (a few more positions, but unit weights let the
/// SIMD scans read the reciprocal counts from a table, see [`Layer::inv`]). Merged or not, the
/// optimum is the same: splitting equal values between two clusters is never better than
/// keeping them together. Unit weights are not stored: the sorted f32 values are the
/// positions (no f64 copies, which measured 8-10 % of the exact mode's time at 270,000
/// values).
fn sorted_positions(x: &[f32]) -> Positions {
    let sorted = sorted_finite(x);
    // -0.0 and 0.0 are one value
    let distinct = match sorted.len() {
        0 => 0,
        _ => 1 + sorted.windows(2).filter(|w| w[0] != w[1]).count(),
    };
    let merged = (sorted.len() - distinct > sorted.len() / 8).then(|| {
        let mut values: Vec<f64> = Vec::with_capacity(distinct);
        let mut weights: Vec<f64> = Vec::with_capacity(distinct);
        for &a in sorted.iter() {
            if values.last().is_some_and(|&l| l == a as f64) {
                *weights.last_mut().unwrap() += 1.0;
            } else {
                values.push(a as f64);
                weights.push(1.0);
            }
        }
        (values, weights)
    });
    Positions {
        sorted,
        merged,
        distinct,
    }
}

/// The positions of the dynamic program ([`sorted_positions`]).
struct Positions {
    /// The finite values, sorted: the positions, each of weight 1, unless `merged`.
    sorted: Vec<f32>,
    /// The distinct values and their counts, when equal values are merged.
    merged: Option<(Vec<f64>, Vec<f64>)>,
    /// Distinct finite values.
    distinct: usize,
}

impl Positions {
    fn len(&self) -> usize {
        self.merged
            .as_ref()
            .map_or(self.sorted.len(), |(v, _)| v.len())
    }

    fn value(&self, t: usize) -> f64 {
        match &self.merged {
            Some((v, _)) => v[t],
            None => self.sorted[t] as f64,
        }
    }

    fn weight(&self, t: usize) -> f64 {
        match &self.merged {
            Some((_, w)) => w[t],
            None => 1.0,
        }
    }

    /// The prefix sums over the positions (for unit weights straight from the sorted
    /// values: the same sums as [`Prefix::new`] with weights 1, bit for bit).
    fn prefix(&self) -> Prefix {
        match &self.merged {
            Some((values, weights)) => Prefix::new(values, weights),
            None => Prefix::unit(&self.sorted),
        }
    }
}

/// `inv[INV_PAD + c] = 1 / c` for counts `c` in `1..` ([`Layer::inv`]); the entries below
/// `INV_PAD + 1` are 0 and only ever read into masked-off lanes.
pub(crate) const INV_PAD: usize = 8;

/// The reciprocal table of [`Layer::inv`] for positions of unit weight, `m` positions.
fn reciprocals(m: usize) -> Vec<f64> {
    let mut inv = vec![0.0; INV_PAD + m + 2 * INV_PAD + 1];
    for (c, r) in inv.iter_mut().enumerate().skip(INV_PAD + 1) {
        *r = 1.0 / (c - INV_PAD) as f64;
    }
    inv
}

/// Prefix sums of weights, weighted values and weighted squares, of values shifted by their
/// weighted mean (smaller magnitudes, less cancellation in the cost formula).
struct Prefix {
    /// `None` for unit weights: then `w[i] = i` ([`Prefix::weights`]), not stored.
    w: Option<Vec<f64>>,
    s1: Vec<f64>,
    s2: Vec<f64>,
    /// [`reciprocals`] when every weight is 1 (then `w[j] - w[i] = j - i` exactly).
    inv: Option<Vec<f64>>,
}

impl Prefix {
    fn new(values: &[f64], weights: &[f64]) -> Prefix {
        let total: f64 = weights.iter().sum();
        let mean = values.iter().zip(weights).map(|(v, w)| v * w).sum::<f64>() / total;
        let m = values.len();
        let (mut w, mut s1, mut s2) = (vec![0.0; m + 1], vec![0.0; m + 1], vec![0.0; m + 1]);
        // running sums in registers (through the arrays, each step waited on a store)
        let (mut tw, mut t1, mut t2) = (0.0, 0.0, 0.0);
        for i in 0..m {
            let d = values[i] - mean;
            tw += weights[i];
            t1 += weights[i] * d;
            t2 += weights[i] * d * d;
            (w[i + 1], s1[i + 1], s2[i + 1]) = (tw, t1, t2);
        }
        let inv = weights.iter().all(|&w| w == 1.0).then(|| reciprocals(m));
        Prefix {
            w: Some(w),
            s1,
            s2,
            inv,
        }
    }

    /// [`Prefix::new`] for the values `sorted`, each of weight 1, without the f64 copies.
    fn unit(sorted: &[f32]) -> Prefix {
        let m = sorted.len();
        let mean = sorted.iter().map(|&v| v as f64).sum::<f64>() / m as f64;
        let (mut s1, mut s2) = (vec![0.0; m + 1], vec![0.0; m + 1]);
        let (mut t1, mut t2) = (0.0, 0.0);
        for i in 0..m {
            let d = sorted[i] as f64 - mean;
            t1 += d;
            t2 += d * d;
            (s1[i + 1], s2[i + 1]) = (t1, t2);
        }
        Prefix {
            w: None,
            s1,
            s2,
            inv: Some(reciprocals(m)),
        }
    }

    /// Prefix sums of per-bin `(weight, sum of d, sum of d^2)` with `d` measured from any
    /// common reference (the cost formula does not depend on it).
    fn from_bins(bins: &[[f64; 3]]) -> Prefix {
        let m = bins.len();
        let (mut w, mut s1, mut s2) = (vec![0.0; m + 1], vec![0.0; m + 1], vec![0.0; m + 1]);
        let (mut tw, mut t1, mut t2) = (0.0, 0.0, 0.0);
        for (i, b) in bins.iter().enumerate() {
            tw += b[0];
            t1 += b[1];
            t2 += b[2];
            (w[i + 1], s1[i + 1], s2[i + 1]) = (tw, t1, t2);
        }
        Prefix {
            w: Some(w),
            s1,
            s2,
            inv: None,
        }
    }

    /// The prefix sums of the weights, `w[i]` for `i` in `0..=m` (built for unit weights,
    /// which are not stored: the layered program's scans read them).
    fn weights(&self) -> std::borrow::Cow<'_, [f64]> {
        match &self.w {
            Some(w) => std::borrow::Cow::Borrowed(w),
            None => (0..self.s1.len()).map(|i| i as f64).collect(),
        }
    }

    /// SSE of the cluster made of positions `i..j` (0-based, `i < j`).
    #[inline]
    fn cost(&self, i: usize, j: usize) -> f64 {
        let w = match &self.w {
            Some(w) => w[j] - w[i],
            None => (j - i) as f64,
        };
        let s = self.s1[j] - self.s1[i];
        ((self.s2[j] - self.s2[i]) - s * s / w).max(0.0)
    }
}

/// Rows per block of the finest levels of [`layer_with`].
pub(crate) const BLOCK: usize = 8;
/// Segment sizes of [`layer_with`] (powers of two, decreasing, multiples of [`BLOCK`]).
const TIERS: [usize; 2] = [1 << 18, 1 << 12];

/// Rows `lo..=hi` of one layer `l` of the dynamic program,
/// `cur[j] = min_{i < j} prev[i] + cost(i, j)` with its leftmost argmin in `arg[j]`, the
/// argmin of row `lo - 1` being `opt_lo` and of row `hi + 1` at most `opt_hi`.
///
/// The cost is Monge, so leftmost argmins never decrease with `j`: once rows `j - s` and
/// `j + s` are solved, row `j` only has to scan the candidates between their argmins, and
/// not below the previous layer's argmin of row `j` ([`Layer::lower`]). Rows are solved
/// coarse to fine without recursion: first every `S`-th row (`S` the largest power of two up
/// to the row count), then the rows half-way between, down to stride [`BLOCK`]; each row's
/// scan is `row(j, first, last) -> (min, leftmost argmin)` over `first..=last`. The levels
/// finer than [`TIERS`]`[0]` run segment by segment, and within those the levels finer than
/// `TIERS[1]`, so that a segment's data stays in cache across its levels while each level
/// still has many independent rows (solving rows depth first instead measured 1.3-1.6x
/// slower: each row then waits for the one before it). The order changes no row's bounds.
///
/// The rows left between two solved ones, up to `BLOCK - 1` consecutive rows
/// `j0..j0 + count`, share the candidates from the argmin of row `j0 - 1` (or the previous
/// layer's of row `j0`, if larger) to that of row `j0 + BLOCK - 1`:
/// `block(j0, count, first, last, cur, arg)` solves each such row `j` over
/// `first..=min(last, j - 1)`, a superset of its divide-and-conquer range that still holds
/// its leftmost argmin; a SIMD block scans them with one row per lane and no reduction.
#[inline(always)]
pub(crate) fn layer_with(
    l: &Layer,
    cur: &mut [f64],
    arg: &mut [u32],
    mut row: impl FnMut(usize, usize, usize) -> (f64, usize),
    mut block: impl FnMut(usize, usize, usize, usize, &mut [f64], &mut [u32]),
) {
    let (lo, hi) = (l.lo, l.hi);
    if lo > hi {
        return;
    }
    let rows = hi - lo + 1;
    let top = 1usize << (usize::BITS - 1 - rows.leading_zeros());
    // row lo + t of the level of stride s, between rows t - s and t + s; candidates at most
    // j - 1 and not below the previous layer's argmin
    let mut solve_row = |s: usize, t: usize, cur: &mut [f64], arg: &mut [u32]| {
        let (first, last) = bounds(l, arg, rows, t.checked_sub(s), t + s);
        let j = lo + t;
        let last = last.min(j - 1);
        let (best, at) = row(j, first.max(lower_bound(l, j)).min(last), last);
        cur[j] = best;
        arg[j] = at as u32;
    };
    // rows lo + t0.. up to the next solved row
    let mut solve_block = |t0: usize, cur: &mut [f64], arg: &mut [u32]| {
        let count = (BLOCK - 1).min(rows - t0);
        let (first, last) = bounds(l, arg, rows, t0.checked_sub(1), t0 + BLOCK - 1);
        let first = first.max(lower_bound(l, lo + t0)).min(last);
        block(lo + t0, count, first, last, cur, arg);
    };
    let mut level = |s: usize, from: usize, to: usize, cur: &mut [f64], arg: &mut [u32]| {
        // rows t in from..to with t + 1 an odd multiple of s; t - s and t + s were solved
        let mut t = from + s - 1;
        while t < to {
            solve_row(s, t, cur, arg);
            t += 2 * s;
        }
    };
    // the levels of stride >= TIERS[0] over all rows, then segment by segment
    let mut s = top;
    let mut segment =
        |from: usize, to: usize, s: &mut usize, floor: usize, cur: &mut [f64], arg: &mut [u32]| {
            while *s >= floor {
                level(*s, from, to, cur, arg);
                *s /= 2;
            }
        };
    segment(0, rows, &mut s, TIERS[0], cur, arg);
    for f0 in (0..rows).step_by(TIERS[0]) {
        let t0 = rows.min(f0 + TIERS[0]);
        let mut s0 = s;
        segment(f0, t0, &mut s0, TIERS[1], cur, arg);
        for f1 in (f0..t0).step_by(TIERS[1]) {
            let t1 = t0.min(f1 + TIERS[1]);
            let mut s1 = s0;
            segment(f1, t1, &mut s1, BLOCK, cur, arg);
            for b in (f1..t1).step_by(BLOCK) {
                solve_block(b, cur, arg);
            }
        }
    }
}

/// Row `j`'s argmin bound from [`Layer::lower`] (0 without one).
#[inline(always)]
fn lower_bound(l: &Layer, j: usize) -> usize {
    l.lower.get(j).map_or(0, |&a| a as usize)
}

/// [`layer_with`] with its blocks solved row by row by `row` ([`rows_of_block`]): the
/// reference, and the ISAs without a block scan.
#[inline(always)]
pub(crate) fn layer_by_rows(
    l: &Layer,
    cur: &mut [f64],
    arg: &mut [u32],
    row: impl Fn(usize, usize, usize) -> (f64, usize) + Copy,
) {
    layer_with(l, cur, arg, row, |j0, count, a, b, cur, arg| {
        rows_of_block(j0, count, a, b, cur, arg, row)
    });
}

/// The reference block of [`layer_with`]: rows `j0..j0 + count`, each scanned by `row` over
/// `first..=min(last, j - 1)`.
#[inline(always)]
fn rows_of_block(
    j0: usize,
    count: usize,
    first: usize,
    last: usize,
    cur: &mut [f64],
    arg: &mut [u32],
    mut row: impl FnMut(usize, usize, usize) -> (f64, usize),
) {
    for j in j0..j0 + count {
        let (best, at) = row(j, first, last.min(j - 1));
        cur[j] = best;
        arg[j] = at as u32;
    }
}

/// The candidates `first..=last` of the rows strictly between rows `lo + below` and
/// `lo + above` of [`layer_with`]: from the argmin of row `lo + below` (`opt_lo` for `None`)
/// to that of row `lo + above` (`opt_hi` past the last row).
#[inline(always)]
fn bounds(
    l: &Layer,
    arg: &[u32],
    rows: usize,
    below: Option<usize>,
    above: usize,
) -> (usize, usize) {
    let first = below.map_or(l.opt_lo, |t| arg[l.lo + t] as usize);
    let last = if above < rows {
        arg[l.lo + above] as usize
    } else {
        l.opt_hi
    };
    (first, last)
}

/// One layer of the dynamic program: the previous layer's costs and the prefix sums a row
/// scan reads (plain slices, shared by every ISA), and the rows `lo..=hi` to solve with the
/// argmin bounds `opt_lo` (row `lo - 1`) and `opt_hi` (row `hi + 1`).
pub(crate) struct Layer<'a> {
    pub prev: &'a [f64],
    /// The previous layer's argmins: with one cluster fewer, the last cluster of the first
    /// `j` values starts no later (Knuth), so `lower[j]` bounds row `j`'s argmin from below.
    /// Empty: no such bound (the penalized passes of `lagrange`).
    pub lower: &'a [u32],
    /// With unit weights, the reciprocal counts `inv[INV_PAD + c] = 1 / c` (`c >= 1`), so a
    /// SIMD scan loads the `1 / (w[j] - w[i])` of the cost instead of dividing: the same
    /// value, bit for bit. `None` for other weights.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub inv: Option<&'a [f64]>,
    /// The prefix sums of the weights; may be empty with unit weights on the ISAs whose
    /// scans read [`Layer::inv`] instead ([`layer_weights`]).
    pub w: &'a [f64],
    pub s1: &'a [f64],
    pub s2: &'a [f64],
    pub lo: usize,
    pub hi: usize,
    pub opt_lo: usize,
    pub opt_hi: usize,
}

/// Positions from which [`optimal_partition`] first tries the penalty search
/// (`lagrange`): O(m) memory and a time independent of `k`. Below, the layered program is
/// as fast, and its tie rule (leftmost boundaries) holds exactly.
pub const LAGRANGE_MIN_POSITIONS: usize = 4096;

/// Boundaries (start indices into the positions) of the optimal clustering into
/// `k <= m` clusters: from the penalty search (`lagrange`) for at least
/// [`LAGRANGE_MIN_POSITIONS`] positions when it finds `k` clusters, else from the layered
/// dynamic program ([`dp_layers`], its traceback limited to [`MAX_TRACEBACK`] entries).
fn optimal_partition(
    kernels: &Kernels,
    p: &Prefix,
    m: usize,
    k: usize,
) -> Result<Vec<usize>, KernelError> {
    if m >= LAGRANGE_MIN_POSITIONS {
        if let Some((starts, _)) = lagrange::partition(kernels, p, m, k) {
            return Ok(starts);
        }
    }
    let entries = (k - 1).saturating_mul(m + 1);
    if entries > MAX_TRACEBACK {
        return Err(KernelError::Range {
            message: format!(
                "exact k-means of {m} sorted values into {k} clusters: the penalty search found no partition of {k} clusters (ties), and the layered dynamic program needs {} MiB for its traceback (limit {} MiB)",
                (entries * 4) >> 20,
                (MAX_TRACEBACK * 4) >> 20
            ),
        });
    }
    let (_, args) = dp_layers(kernels, p, m, k, true);
    let mut starts = vec![0usize; k];
    let mut j = m;
    for c in (1..k).rev() {
        // the last cluster of the first j values in c + 1 clusters starts at i
        let i = args[c * (m + 1) + j] as usize;
        starts[c] = i;
        j = i;
    }
    Ok(starts)
}

/// The weights [`Layer::w`] for scans of `p` on `kernels`' ISA: none for unit weights on
/// AVX-512, whose scans read the reciprocal table ([`Layer::inv`]) instead, else
/// [`Prefix::weights`].
fn layer_weights<'p>(kernels: &Kernels, p: &'p Prefix) -> std::borrow::Cow<'p, [f64]> {
    if p.w.is_none() && p.inv.is_some() && kernels.isa() == crate::isa::Isa::Avx512 {
        std::borrow::Cow::Borrowed(&[])
    } else {
        p.weights()
    }
}

/// Rows `layer.lo..=layer.hi` of `layer` on `kernels`' ISA ([`layer_with`]).
fn layer_on(kernels: &Kernels, layer: &Layer, cur: &mut [f64], arg: &mut [u32]) {
    dispatch!(kernels, dp_layer(layer, cur, arg))
}

/// Row `j`'s minimum over the candidates `first..=last` of `layer` (`last < j`) and its
/// leftmost argmin ([`scalar::dp_row`]), on `kernels`' ISA.
fn row_min_on(
    kernels: &Kernels,
    layer: &Layer,
    j: usize,
    first: usize,
    last: usize,
) -> (f64, usize) {
    dispatch!(kernels, dp_min(layer, j, first, last))
}

/// Layers 2..=k of the dynamic program over `p` (m positions): the minimum cost of all
/// m values in k clusters and, with `keep`, every layer's argmins (the traceback, flat:
/// layer `c`'s `m + 1` entries from `(c - 1) (m + 1)`, after the first layer's zeros);
/// without it two argmin arrays take turns (a layer writes its own rows' argmins and reads
/// those and the previous layer's).
fn dp_layers(kernels: &Kernels, p: &Prefix, m: usize, k: usize, keep: bool) -> (f64, Vec<u32>) {
    let stride = m + 1;
    // prev[j]: best cost of the first j values in `layer` clusters
    let mut prev: Vec<f64> = (0..=m)
        .map(|j| if j == 0 { 0.0 } else { p.cost(0, j) })
        .collect();
    let mut cur = vec![f64::INFINITY; stride];
    // slot 0: the first layer's argmins (one cluster: every row splits at 0)
    let mut args = vec![0u32; stride * if keep { k } else { 3 }];
    let w = layer_weights(kernels, p);
    for c in 2..=k {
        // rows below c are not part of this layer (and never read as candidates)
        cur[..c].fill(f64::INFINITY);
        let (below, slot) = if keep {
            (c - 2, c - 1)
        } else if c == 2 {
            (0, 1)
        } else {
            (1 + (c - 1) % 2, 1 + c % 2)
        };
        let (lower, arg) = if below < slot {
            let (a, b) = args.split_at_mut(slot * stride);
            (&a[below * stride..][..stride], &mut b[..stride])
        } else {
            let (a, b) = args.split_at_mut(below * stride);
            (&b[..stride], &mut a[slot * stride..][..stride])
        };
        // j values in c clusters need j >= c; the split i leaves >= c-1 values before it
        let layer = Layer {
            prev: &prev,
            lower,
            inv: p.inv.as_deref(),
            w: &w,
            s1: &p.s1,
            s2: &p.s2,
            lo: c,
            hi: m,
            opt_lo: c - 1,
            opt_hi: m - 1,
        };
        layer_on(kernels, &layer, &mut cur, arg);
        std::mem::swap(&mut prev, &mut cur);
    }
    (prev[m], if keep { args } else { Vec::new() })
}

/// The optimal (minimum-SSE) clustering of the finite values of `x` into at most `k`
/// clusters: exactly `k` when `x` has at least `k` distinct finite values, else one centroid
/// per distinct value (an input without finite values gets the single centroid 0.0).
///
/// This is the reference (every layer scanned by `scalar::dp_row`); the SIMD scans of
/// [`Kernels::kmeans_optimal`] give the same codebook and SSE bit for bit.
pub fn optimal_1d(x: &[f32], k: usize) -> Result<KMeansFit, KernelError> {
    Kernels::scalar().kmeans_optimal(x, k)
}

impl Kernels {
    /// The minimum SSE of the finite values of `x` in at most `k` clusters (exactly `k` when
    /// there are that many distinct values): the value of the exact mode's dynamic program,
    /// with the clusters' exact means (not rounded to f32 centroids), so no clustering has a
    /// lower SSE (up to f64 rounding): the penalty search's, or the layered program's
    /// without its traceback. O(m) memory for m sorted values either way, where the layered
    /// fallback of [`Kernels::kmeans_optimal`] needs `(k - 1) x (m + 1)` entries. Measures the
    /// fast mode's gap where the exact clustering fails for want of memory.
    pub fn kmeans_optimal_sse(&self, x: &[f32], k: usize) -> Result<f64, KernelError> {
        check_clusters(k)?;
        let pos = sorted_positions(x);
        let m = pos.len();
        if m == 0 {
            return Ok(0.0);
        }
        let p = pos.prefix();
        let k = k.min(pos.distinct);
        if m >= LAGRANGE_MIN_POSITIONS {
            if let Some((_, sse)) = lagrange::partition(self, &p, m, k) {
                return Ok(sse);
            }
        }
        Ok(dp_layers(self, &p, m, k, false).0)
    }
}

impl Kernels {
    /// [`optimal_1d`] with the layers of the dynamic program scanned on this handle's ISA.
    pub fn kmeans_optimal(&self, x: &[f32], k: usize) -> Result<KMeansFit, KernelError> {
        optimal_on(self, x, k)
    }

    /// One optimal codebook per channel of `x` viewed through `layout`, on this handle's ISA.
    pub fn kmeans_optimal_per_channel(
        &self,
        x: &[f32],
        layout: &ChannelLayout,
        k: usize,
    ) -> Result<Vec<KMeansFit>, KernelError> {
        layout
            .gather(x)?
            .iter()
            .map(|v| optimal_on(self, v, k))
            .collect()
    }
}

fn optimal_on(kernels: &Kernels, x: &[f32], k: usize) -> Result<KMeansFit, KernelError> {
    check_clusters(k)?;
    let pos = sorted_positions(x);
    let m = pos.len();
    if m == 0 {
        return Ok(KMeansFit {
            codebook: Codebook::new(vec![0.0])?,
            sse: 0.0,
            gap_bound: 0.0,
        });
    }
    let k = k.min(pos.distinct);
    let p = pos.prefix();
    let starts = optimal_partition(kernels, &p, m, k)?;
    let mut centroids = Vec::with_capacity(k);
    for c in 0..k {
        let (i, j) = (starts[c], if c + 1 < k { starts[c + 1] } else { m });
        let (mut sw, mut sv) = (0.0f64, 0.0f64);
        for t in i..j {
            sw += pos.weight(t);
            sv += pos.weight(t) * pos.value(t);
        }
        centroids.push((sv / sw) as f32);
    }
    let codebook = Codebook::new(centroids)?;
    let sse = sse_on(kernels, x, &codebook);
    Ok(KMeansFit {
        codebook,
        sse,
        gap_bound: 0.0,
    })
}

/// Histogram bins of the fast mode.
pub const FAST_BINS: usize = 1 << 16;

/// The fast mode's bins over `[lo, hi]`: bin `b` holds `lo + [b, b + 1) / scale`.
pub(crate) struct FastBinning {
    pub lo: f32,
    pub scale: f64,
}

impl FastBinning {
    /// The bin of a finite value `v >= lo` (the last bin also takes `hi`).
    #[inline]
    pub fn bin_of(&self, v: f32) -> usize {
        (((v as f64 - self.lo as f64) * self.scale) as usize).min(FAST_BINS - 1)
    }
}
/// Lloyd iterations of the fast mode at most (it stops earlier when no centroid moves).
pub const FAST_LLOYD_ITERS: usize = 2;

/// Non-empty bins of the fast mode at each side of a binned boundary whose values are kept.
pub const FAST_WINDOW: usize = 4;

/// The fast mode's non-empty bins, in value order.
#[derive(Default)]
struct Bins {
    /// `(count, sum of d, sum of d^2)`, `d = x - reference`.
    sums: Vec<[f64; 3]>,
    /// Bounds of its values (see `kmeans_fast_with`).
    range: Vec<[f32; 2]>,
    /// Whether the bin's values are in `values`.
    kept: Vec<bool>,
    /// The values of the kept bins, with their bin.
    values: Vec<(f32, u32)>,
}

impl Kernels {
    /// Per-cluster sums of the values assigned to their nearest centroid of `cb`, as
    /// [`Kernels::assigned_sums`] but from the bins: assignment is monotone, so a bin whose
    /// value bounds go to one centroid goes there whole; only bins that a threshold may split
    /// are assigned value by value, from their kept values. If such a bin was not kept, every
    /// value is assigned ([`Kernels::assigned_sums`]).
    fn lloyd_sums(
        &self,
        x: &[f32],
        bins: &Bins,
        cb: &Codebook,
        reference: f64,
    ) -> Result<Vec<[f64; 3]>, KernelError> {
        let mut acc = vec![[0f64; 3]; cb.len()];
        let mut split = vec![false; bins.sums.len()];
        for (i, (s, r)) in bins.sums.iter().zip(&bins.range).enumerate() {
            let (a, b) = (scalar::assign_one(r[0], cb), scalar::assign_one(r[1], cb));
            if a == b {
                for (t, &v) in acc[a as usize].iter_mut().zip(s) {
                    *t += v;
                }
            } else if bins.kept[i] {
                split[i] = true;
            } else {
                return self.assigned_sums(x, cb, reference);
            }
        }
        for &(v, i) in &bins.values {
            if split[i as usize] {
                add_value(&mut acc[scalar::assign_one(v, cb) as usize], v, reference);
            }
        }
        Ok(acc)
    }

    /// Per-cluster `(count, sum of d, sum of d^2)`, `d = x - reference`, over the finite values
    /// of `x` assigned to their nearest centroid of `cb` (on this handle's ISA), chunk by chunk
    /// into a small index buffer (no index array of the input's size). The sums are added in
    /// the order of the values.
    fn assigned_sums(
        &self,
        x: &[f32],
        cb: &Codebook,
        reference: f64,
    ) -> Result<Vec<[f64; 3]>, KernelError> {
        let mut acc = vec![[0f64; 3]; cb.len()];
        let mut idx = vec![0u8; SUM_CHUNK.min(x.len())];
        for chunk in x.chunks(SUM_CHUNK) {
            let idx = &mut idx[..chunk.len()];
            self.kmeans_assign(chunk, cb, idx)?;
            for (&v, &i) in chunk.iter().zip(idx.iter()) {
                if v.is_finite() {
                    add_value(&mut acc[i as usize], v, reference);
                }
            }
        }
        Ok(acc)
    }
}

/// Values per chunk of [`Kernels::assigned_sums`]: their indices stay in L1.
const SUM_CHUNK: usize = 1 << 14;

/// Adds value `v` to a cluster's `(count, sum of d, sum of d^2)`, `d = v - reference`.
#[inline]
fn add_value(a: &mut [f64; 3], v: f32, reference: f64) {
    let d = v as f64 - reference;
    a[0] += 1.0;
    a[1] += d;
    a[2] += d * d;
}

impl Kernels {
    /// Fast 1-D k-means for large tensors: one pass builds a histogram of [`FAST_BINS`] equal
    /// bins holding each bin's count, sum and sum of squares; the exact dynamic program over
    /// the non-empty bins gives the optimal clustering that keeps every bin whole (its SSE is
    /// exact for the real values, not for bin centres); then at most [`FAST_LLOYD_ITERS`] Lloyd
    /// iterations let boundaries move inside bins. Each step never increases the SSE.
    ///
    /// The Lloyd steps and the final SSE take whole bins by their sums where a bin's value
    /// bounds fall on one side of every threshold, and assign value by value (with the scalar
    /// reference) only the values of bins a threshold may cut; those are kept, in a second
    /// pass over the input (on this handle's ISA, the bins of 16 values at a time against a
    /// bitmap), for the [`FAST_WINDOW`] bins on each side of every binned boundary. Should a threshold move beyond them, that step assigns every value on this
    /// handle's ISA. No sort: two O(n) passes plus O(k m log m) for m <= 65,536 bins. Gap to
    /// the optimum: at most [`KMeansFit::gap_bound`] (proven, see [`fast_gap_bound`]); the
    /// measured gaps are far smaller (the tests require <= 0.5 % on Gaussian, Laplacian,
    /// uniform and mixture samples; see the README).
    pub fn kmeans_fast(&self, x: &[f32], k: usize) -> Result<KMeansFit, KernelError> {
        self.kmeans_fast_with(x, k, FAST_WINDOW)
    }

    /// [`Kernels::kmeans_fast`] with `window` bins kept on each side of every boundary of the
    /// binned clustering (0: every Lloyd step passes over all values).
    pub(crate) fn kmeans_fast_with(
        &self,
        x: &[f32],
        k: usize,
        window: usize,
    ) -> Result<KMeansFit, KernelError> {
        check_clusters(k)?;
        let Some((lo, hi)) = self.min_max(x) else {
            return Ok(KMeansFit {
                codebook: Codebook::new(vec![0.0])?,
                sse: 0.0,
                gap_bound: 0.0,
            });
        };
        if lo == hi {
            return Ok(KMeansFit {
                codebook: Codebook::new(vec![lo])?,
                sse: 0.0,
                gap_bound: 0.0,
            });
        }
        let reference = (lo as f64 + hi as f64) / 2.0;
        let binning = FastBinning {
            lo,
            scale: FAST_BINS as f64 / (hi as f64 - lo as f64),
        };
        let (scale, bin_of) = (binning.scale, |v: f32| binning.bin_of(v));
        // per bin: (count, sum of d, sum of d^2)
        let mut sums = vec![[0f64; 3]; FAST_BINS];
        for &v in x {
            if v.is_finite() {
                let d = v as f64 - reference;
                let e = &mut sums[bin_of(v)];
                e[0] += 1.0;
                e[1] += d;
                e[2] += d * d;
            }
        }
        // The non-empty bins, the position of each among them, and an f32 interval holding
        // every value of the bin: bin `b` spans lo + [b, b + 1) / scale, and the rounding of
        // `bin_of` (relative 1e-15) moves a value by far less than a bin, so
        // [edge(b - 1), edge(b + 2)], rounded outward to f32, holds them all.
        let edge = |t: f64| lo as f64 + t / scale;
        let down = |e: f64| {
            let f = e as f32;
            if f as f64 > e {
                f.next_down()
            } else {
                f
            }
        };
        let up = |e: f64| {
            let f = e as f32;
            if (f as f64) < e {
                f.next_up()
            } else {
                f
            }
        };
        let mut slot = vec![u32::MAX; FAST_BINS];
        let mut bins = Bins::default();
        // the fullest bin's count, for the gap bound
        let mut max_n = 0f64;
        for (b, s) in sums.iter().enumerate() {
            if s[0] > 0.0 {
                if s[0] > max_n {
                    max_n = s[0];
                }
                slot[b] = bins.sums.len() as u32;
                bins.sums.push(*s);
                let b = b as f64;
                bins.range.push([down(edge(b - 1.0)), up(edge(b + 2.0))]);
            }
        }
        drop(sums);
        let m = bins.sums.len();
        let kk = k.min(m);
        let p = Prefix::from_bins(&bins.sums);
        let starts = optimal_partition(self, &p, m, kk)?;
        let weights = p.weights();
        let n = weights[m]; // the finite values
        let mut centroids: Vec<f32> = (0..kk)
            .map(|c| {
                let (i, j) = (starts[c], if c + 1 < kk { starts[c + 1] } else { m });
                let (w, s) = (weights[j] - weights[i], p.s1[j] - p.s1[i]);
                (reference + s / w) as f32
            })
            .collect();
        // Lloyd's thresholds stay near the binned boundaries: keep the values of the bins
        // around each (one more pass), so a step only has to assign those one by one
        bins.kept = vec![false; m];
        for &start in &starts[1..] {
            for i in start.saturating_sub(window)..(start + window).min(m) {
                bins.kept[i] = true;
            }
        }
        if window > 0 {
            // a bitmap by bin number, so a value costs one lookup before the (rare) keep
            let mut keep = vec![0u32; FAST_BINS / 32];
            for (b, &i) in slot.iter().enumerate() {
                if i != u32::MAX && bins.kept[i as usize] {
                    keep[b / 32] |= 1 << (b % 32);
                }
            }
            dispatch!(self, keep_values(x, &binning, &keep, &mut bins.values));
            for e in bins.values.iter_mut() {
                e.1 = slot[e.1 as usize];
            }
        }
        for _ in 0..FAST_LLOYD_ITERS {
            let cb = Codebook::new(centroids.clone())?;
            let sums = self.lloyd_sums(x, &bins, &cb, reference)?;
            let next: Vec<f32> = cb
                .centroids()
                .iter()
                .zip(&sums)
                .map(|(&c, a)| {
                    if a[0] > 0.0 {
                        (reference + a[1] / a[0]) as f32
                    } else {
                        c
                    }
                })
                .collect();
            let moved = next != cb.centroids();
            centroids = next;
            if !moved {
                break;
            }
        }
        let codebook = Codebook::new(centroids)?;
        // SSE of the final centroids over the final assignment (a Lloyd step's assignment is
        // nearest for the centroids it produced only at convergence: recompute if needed)
        let sums = self.lloyd_sums(x, &bins, &codebook, reference)?;
        let (mut sse, mut terms) = (0f64, 0f64);
        for (&c, a) in codebook.centroids().iter().zip(&sums) {
            let off = c as f64 - reference;
            sse += (a[2] - 2.0 * off * a[1] + a[0] * off * off).max(0.0);
            terms += a[2] + 2.0 * (off * a[1]).abs() + a[0] * off * off;
        }
        // The sums are around the middle of the range: for clusters much narrower than their
        // distance to it the formula cancels, and f64 rounding could show in its result. Where
        // the terms exceed the SSE a million times, it is computed from the data instead.
        if terms > 1e6 * sse {
            sse = sse_on(self, x, &codebook);
        }
        let gap_bound = fast_gap_bound(n, max_n, lo, hi, sse);
        Ok(KMeansFit {
            codebook,
            sse,
            gap_bound,
        })
    }
}

/// Sum of squared distances of the finite values of `x` to their nearest centroid (f64).
pub fn sse(x: &[f32], codebook: &Codebook) -> f64 {
    x.iter()
        .filter(|v| v.is_finite())
        .map(|&v| {
            let c = codebook.centroids[scalar::assign_one(v, codebook) as usize] as f64;
            (v as f64 - c).powi(2)
        })
        .sum()
}

/// [`sse`], bit for bit, with the nearest centroids found by `kernels`' assign kernel (a
/// block at a time) instead of one binary search per value.
fn sse_on(kernels: &Kernels, x: &[f32], codebook: &Codebook) -> f64 {
    let mut idx = [0u8; 4096];
    let mut total = -0.0;
    for block in x.chunks(idx.len()) {
        let idx = &mut idx[..block.len()];
        dispatch!(kernels, assign(block, codebook, idx));
        for (&v, &i) in block.iter().zip(idx.iter()) {
            if v.is_finite() {
                total += (v as f64 - codebook.centroids[i as usize] as f64).powi(2);
            }
        }
    }
    total
}

/// One optimal codebook per channel of `x` viewed through `layout`.
pub fn optimal_1d_per_channel(
    x: &[f32],
    layout: &ChannelLayout,
    k: usize,
) -> Result<Vec<KMeansFit>, KernelError> {
    Kernels::scalar().kmeans_optimal_per_channel(x, layout, k)
}

/// Errors unless every index is below `k` (a max-reduction the compiler vectorises; the
/// position is searched only to report an error).
fn check_indices(idx: &[u8], k: usize) -> Result<(), KernelError> {
    check_indices_at(idx, k, 0)
}

/// [`check_indices`] for a chunk that starts at position `offset` of the whole index array.
fn check_indices_at(idx: &[u8], k: usize, offset: usize) -> Result<(), KernelError> {
    if k >= 256 || (idx.iter().fold(0u8, |m, &i| m.max(i)) as usize) < k {
        return Ok(());
    }
    let pos = idx.iter().position(|&i| i as usize >= k).unwrap_or(0);
    Err(KernelError::Range {
        message: format!(
            "index {} at position {} is outside a codebook of {k} centroids",
            idx[pos],
            offset + pos
        ),
    })
}

impl Kernels {
    /// `out[i]` = index of the centroid nearest to `x[i]` (see [`scalar::assign_one`]).
    pub fn kmeans_assign(
        &self,
        x: &[f32],
        codebook: &Codebook,
        out: &mut [u8],
    ) -> Result<(), KernelError> {
        check_len("kmeans_assign output", x.len(), out.len())?;
        dispatch!(self, assign(x, codebook, out));
        Ok(())
    }

    /// `out[i] = centroids[idx[i]]`; every index must be below the codebook's size.
    pub fn kmeans_decode(
        &self,
        idx: &[u8],
        codebook: &Codebook,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        check_len("kmeans_decode output", idx.len(), out.len())?;
        check_indices(idx, codebook.len())?;
        dispatch!(self, decode(idx, codebook, out));
        Ok(())
    }
}

/// Indices decoded per chunk by [`Kernels::kmeans_decode_packed`] (a multiple of 8, so every
/// chunk starts on a byte boundary whatever the width).
const PACKED_CHUNK: usize = 4096;

impl Kernels {
    /// Decodes bit-packed indices (the layout of [`crate::pack`], `bits` per index) straight
    /// into centroids: chunks of 4096 indices are unpacked into a small buffer and decoded,
    /// so no full-size index array is materialised. `out.len()` is the number of indices.
    pub fn kmeans_decode_packed(
        &self,
        packed: &[u8],
        bits: u32,
        codebook: &Codebook,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        if !(1..=8).contains(&bits) || codebook.len() > 1 << bits {
            return Err(KernelError::Bits {
                bits,
                what: "packed k-means indices need 1..=8 bits and a codebook of at most 2^bits centroids",
            });
        }
        check_len(
            "packed indices",
            crate::pack::packed_len(out.len(), bits),
            packed.len(),
        )?;
        let mut idx = [0u8; PACKED_CHUNK];
        let bytes_per_chunk = PACKED_CHUNK * bits as usize / 8;
        for (c, out_chunk) in out.chunks_mut(PACKED_CHUNK).enumerate() {
            let n = out_chunk.len();
            let start = c * bytes_per_chunk;
            let src = &packed[start..start + crate::pack::packed_len(n, bits)];
            crate::pack::unpack_bits(src, bits, &mut idx[..n])?;
            check_indices_at(&idx[..n], codebook.len(), c * PACKED_CHUNK)?;
            dispatch!(self, decode(&idx[..n], codebook, out_chunk));
        }
        Ok(())
    }
}

/// Deep Compression's centroid gradients: for each of `k` centroids, the sum of the gradients
/// of the weights assigned to it (accumulated in f64, in index order) and how many weights
/// that is. (Scalar: a scatter-add over `k <= 256` bins, run once per training step.)
pub fn centroid_gradients(
    grads: &[f32],
    idx: &[u8],
    k: usize,
) -> Result<(Vec<f64>, Vec<u64>), KernelError> {
    check_len("centroid gradient indices", grads.len(), idx.len())?;
    check_clusters(k)?;
    check_indices(idx, k)?;
    let mut sums = vec![0f64; k];
    let mut counts = vec![0u64; k];
    for (&g, &i) in grads.iter().zip(idx) {
        sums[i as usize] += g as f64;
        counts[i as usize] += 1;
    }
    Ok((sums, counts))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SSE through the assign kernels is [`sse`]'s, bit for bit, on every ISA: values
    /// on both sides of every midpoint, non-finite values skipped, lengths around the block.
    #[test]
    fn sse_through_the_assign_kernels_is_the_reference_bit_for_bit() {
        use crate::isa::Isa;
        use crate::rng::{uniform, NoiseKey};
        let key = NoiseKey::from_seed(41);
        for (n, k) in [(0u32, 3usize), (5, 1), (4095, 16), (4097, 7), (20_000, 256)] {
            let mut x: Vec<f32> = (0..n).map(|i| (uniform(key, i) - 0.5) * 8.0).collect();
            for (i, bad) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
                .into_iter()
                .enumerate()
            {
                if let Some(v) = x.get_mut(3 * i + 1) {
                    *v = bad;
                }
            }
            let cb = Codebook::new((0..k).map(|c| c as f32 - k as f32 / 3.0).collect()).unwrap();
            // values exactly on the midpoints
            x.extend(cb.thresholds.iter().copied());
            let want = sse(&x, &cb);
            for isa in Isa::available() {
                let got = sse_on(&Kernels::new(isa).unwrap(), &x, &cb);
                assert_eq!(got.to_bits(), want.to_bits(), "{} n={n} k={k}", isa.name());
            }
        }
    }

    /// Few repeats: every value is a position of weight 1; more: equal values merge.
    #[test]
    fn positions_merge_equal_values_only_when_many_repeat() {
        // 16 values, 2 repeats (<= 1 in 8): unit weights, repeats kept as positions
        let mut x: Vec<f32> = (0..14).map(|i| i as f32).collect();
        x.extend([3.0, -0.0]);
        let pos = sorted_positions(&x);
        assert_eq!(pos.distinct, 14);
        assert_eq!(pos.len(), 16);
        assert!((0..16).all(|t| pos.weight(t) == 1.0));
        assert!((1..16).all(|t| pos.value(t - 1) <= pos.value(t)));
        let unit = pos.prefix();
        assert!(unit.inv.is_some());
        // the same sums as the general constructor with weights 1
        let values: Vec<f64> = (0..16).map(|t| pos.value(t)).collect();
        let general = Prefix::new(&values, &[1.0; 16]);
        assert_eq!(
            (&unit.weights()[..], &unit.s1[..], &unit.s2[..]),
            (&general.weights()[..], &general.s1[..], &general.s2[..])
        );
        // 3 repeats in 16 (3, 5, 7): merged, with their counts
        (x[0], x[15]) = (5.0, 7.0);
        let pos = sorted_positions(&x);
        assert_eq!((pos.len(), pos.distinct), (13, 13));
        assert_eq!((0..13).map(|t| pos.weight(t)).sum::<f64>(), 16.0);
        let five = (0..13).position(|t| pos.value(t) == 5.0).unwrap();
        assert_eq!(pos.weight(five), 2.0);
        assert!(pos.prefix().inv.is_none());
    }

    /// The fast mode's keep pass finds the same values, in the same order, on every ISA:
    /// NaN and +-inf skipped, the extremes binned like the rest, every tail length.
    #[test]
    fn keep_values_match_scalar_on_every_isa() {
        use crate::isa::Isa;
        use crate::rng::{uniform, NoiseKey};
        let key = NoiseKey::from_seed(41);
        let mut x: Vec<f32> = (0..5000u32)
            .map(|i| (uniform(key, i) - 0.5) * 8.0)
            .collect();
        for (i, v) in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -4.0,
            4.0,
            0.0,
            -0.0,
        ]
        .into_iter()
        .enumerate()
        {
            x[i * 701 + 3] = v;
        }
        let binning = FastBinning {
            lo: -4.0,
            scale: FAST_BINS as f64 / 8.0,
        };
        // bins kept in runs, as around the fast mode's boundaries, plus the first and last
        let mut keep = vec![0u32; FAST_BINS / 32];
        for b in (0..FAST_BINS).filter(|b| b % 997 < 9 || *b == FAST_BINS - 1) {
            keep[b / 32] |= 1 << (b % 32);
        }
        for n in [0usize, 1, 15, 16, 17, 31, 33, 4999, 5000] {
            let mut want = Vec::new();
            scalar::keep_values(&x[..n], &binning, &keep, &mut want);
            for isa in Isa::available() {
                let k = Kernels::new(isa).unwrap();
                let mut got = Vec::new();
                dispatch!(k, keep_values(&x[..n], &binning, &keep, &mut got));
                assert_eq!(got.len(), want.len(), "{isa} n={n}");
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.0.to_bits() == b.0.to_bits() && a.1 == b.1),
                    "{isa} n={n}"
                );
            }
        }
        let mut all = Vec::new();
        scalar::keep_values(&x, &binning, &keep, &mut all);
        assert!(all.len() > 20 && all.len() < 100, "{} kept", all.len());
        assert!(
            all.iter().any(|e| e.1 as usize == FAST_BINS - 1),
            "the top value's bin"
        );
    }

    /// The radix sort gives `f32::total_cmp`'s order of the finite values, bit for bit.
    #[test]
    fn radix_sort_orders_as_total_cmp() {
        // SplitMix64
        let mut state = 5u64;
        let mut next = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let mut x: Vec<f32> = (0..5000)
            .map(|i| {
                let r = next();
                match i % 4 {
                    // any bit pattern (NaN, inf, subnormals included)
                    0 => f32::from_bits(r as u32),
                    // small integers: many repeats
                    1 => (r % 81) as f32 - 40.0,
                    2 => (r >> 11) as f32 * 1e-13 - 1e3,
                    _ => f32::from_bits((r as u32) & 0x807F_FFFF),
                }
            })
            .collect();
        x.extend([
            0.0,
            -0.0,
            f32::MIN,
            f32::MAX,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
        ]);
        x.extend([1e-45, -1e-45, f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        let mut want: Vec<f32> = x.iter().copied().filter(|v| v.is_finite()).collect();
        want.sort_unstable_by(f32::total_cmp);
        let got = sorted_finite(&x);
        assert_eq!(got.len(), want.len());
        assert!(got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(sorted_finite(&[]).is_empty());
    }

    /// The kept-values path and the every-value path (window 0: every cut bin falls back)
    /// agree to f64 rounding, and each reports the SSE of its own codebook.
    #[test]
    fn fast_mode_windows_match_the_full_passes() {
        use crate::rng::{uniform, NoiseKey};
        let key = NoiseKey::from_seed(37);
        // Box-Muller normals, every third one 4x wider
        let x: Vec<f32> = (0..200_000u32)
            .map(|i| {
                let (u, v) = (uniform(key, 2 * i).max(1e-7), uniform(key, 2 * i + 1));
                let z = (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos();
                z * if i % 3 == 0 { 4.0 } else { 1.0 }
            })
            .collect();
        let k = Kernels::active();
        for clusters in [2usize, 16, 256] {
            let kept = k.kmeans_fast_with(&x, clusters, FAST_WINDOW).unwrap();
            let full = k.kmeans_fast_with(&x, clusters, 0).unwrap();
            let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-300);
            assert!(
                rel(kept.sse, full.sse) < 1e-9,
                "k={clusters}: {} vs {}",
                kept.sse,
                full.sse
            );
            for fit in [&kept, &full] {
                assert!(rel(fit.sse, sse(&x, &fit.codebook)) < 1e-9, "k={clusters}");
            }
        }
    }
}
