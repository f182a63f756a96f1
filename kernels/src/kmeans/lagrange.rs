//! The exact k-cluster optimum through a Lagrangian relaxation: O(m) memory and a time that
//! does not grow with k.
//!
//! Charging a penalty `lambda` per cluster and letting the number of clusters free,
//! `h(lambda) = min over partitions P of sse(P) + lambda |P|` is one dynamic program over the
//! sorted positions, `F(i) = min_{j < i} F(j) + cost(j, i) + lambda`, whose argmins never
//! decrease with `i` (the cost is Monge). It is solved in blocks of rows, each over the
//! candidates before it with the layered program's SIMD scans, then checked against the
//! candidates inside it ([`Pass::run`]).
//!
//! If a pass at some `lambda` returns a partition of exactly `k` clusters, no partition of
//! `k` clusters has a lower SSE: any other one would have had a lower penalized cost. The
//! optimal SSE is convex in the number of clusters (Monge costs; Aggarwal, Schieber and
//! Tokuyama 1994), so every `k` whose optimum lies strictly below the chord of its neighbours
//! has an interval of such `lambda`. The search over `lambda` brackets `k` between a partition
//! with more clusters and one with fewer and moves to the penalty at which their penalized
//! costs are equal (Newton's method on the piecewise-linear concave `h`), a finite number of
//! passes. When `k`'s optimum lies on such a chord (ties: several cluster counts optimal for
//! one penalty) no pass may return `k` clusters; the search then gives up (`None`) and the
//! caller runs the layered dynamic program instead.

use super::{layer_on, layer_weights, row_min_on, Layer, Prefix};
use crate::isa::Kernels;

/// Penalized passes at most before [`partition`] gives up (the searches of the comparison's
/// samples took 1-6 per level).
const MAX_PASSES: usize = 60;

/// Rows of [`Pass::run`]'s first block, and the fewest of a block after one that passed.
const FIRST_BLOCK: usize = 16;

/// The arrays of the penalized passes, allocated once for all of them.
struct Pass<'a> {
    kernels: &'a Kernels,
    /// The weights the scans read ([`layer_weights`]: built once, for every pass).
    w: std::borrow::Cow<'a, [f64]>,
    /// `f[i]`: the penalized cost of the best partition of the first `i` positions.
    f: Vec<f64>,
    /// `arg[i]`: where that partition's last cluster starts.
    arg: Vec<u32>,
    /// A block's row minima before the penalty is added (see [`Pass::run`]).
    g: Vec<f64>,
    /// The clusters and SSE of the last pass.
    last: (usize, f64),
}

impl<'a> Pass<'a> {
    /// The arrays for passes over the `m` positions of `p` on `kernels`' ISA.
    fn new(kernels: &'a Kernels, p: &'a Prefix, m: usize) -> Pass<'a> {
        Pass {
            kernels,
            w: layer_weights(kernels, p),
            f: vec![0.0; m + 1],
            arg: vec![0; m + 1],
            g: vec![0.0; m + 1],
            last: (0, 0.0),
        }
    }

    /// One pass at penalty `lambda`: the number of clusters of the partition found and its
    /// SSE (summed over its clusters).
    ///
    /// The rows are solved in blocks `b..e`, each first over the candidates below `b` only:
    /// a row-minima problem whose argmins never decrease, which the layered program's scans
    /// solve (`layer_with`: the last row over every candidate from the argmin of row `b - 1`,
    /// the others between the argmins of solved rows). Those are the rows' true minima
    /// unless some candidate `j` inside the block is better for some row: then, for the
    /// first such row `r0` (whose best candidate `j0 < r0` has its true value) and every
    /// later row, `j0` beats every candidate below `b` (the cost is Monge), so it beats the
    /// last row's minimum. A scan of the block's own candidates for its last row checks
    /// that. A block that fails is solved again with half as many rows (a single row has no
    /// candidate inside its block); after a block that passes, the next one has half as many
    /// rows as the last row's cluster has positions.
    ///
    /// Measured at 270,000 Gaussian values (AVX-512, one pass after the first): k = 4
    /// 6.9 ms, k = 16 6.6 ms, k = 256 4.1 ms, where the queue of candidates this replaced (a
    /// gallop and binary search per candidate) took 10-12 ms: the scans are branch-free
    /// and vectorised, the queue's searches were branch-bound.
    fn run(&mut self, p: &Prefix, m: usize, lambda: f64) -> (usize, f64) {
        let w = &self.w[..];
        let (f, arg, g) = (&mut self.f[..], &mut self.arg[..], &mut self.g[..]);
        f[0] = 0.0;
        arg[0] = 0;
        // rows b..b + rows, the argmin of row b - 1
        let (mut b, mut rows, mut opt) = (1usize, FIRST_BLOCK, 0usize);
        while b <= m {
            let last = (b + rows - 1).min(m);
            // the last row first: the argmin that bounds every other row's from above
            let below = layer(p, w, &f[..b], (b, last), (opt, b - 1));
            let (gl, al) = row_min_on(self.kernels, &below, last, opt, b - 1);
            (g[last], arg[last]) = (gl, al as u32);
            if last > b {
                let rest = layer(p, w, &f[..b], (b, last - 1), (opt, al));
                layer_on(self.kernels, &rest, g, arg);
            }
            for r in b..=last {
                f[r] = g[r] + lambda;
            }
            if last > b {
                let check = layer(p, w, f, (last, last), (b, last - 1));
                let (inside, _) = row_min_on(self.kernels, &check, last, b, last - 1);
                if inside < g[last] {
                    rows = (rows / 2).max(1);
                    continue;
                }
            }
            opt = arg[last] as usize;
            b = last + 1;
            // the last cluster of row b - 1 spans b - 1 - opt positions: the next rows'
            // best candidates lie that far back, so half of it rarely reaches a row whose
            // best candidate is inside the block
            rows = FIRST_BLOCK.max((b - 1 - opt) / 2);
        }
        let (mut clusters, mut sse, mut r) = (0, 0.0, m);
        while r > 0 {
            let j = arg[r] as usize;
            sse += p.cost(j, r);
            clusters += 1;
            r = j;
        }
        (clusters, sse)
    }

    /// The starts of the clusters of the last pass, ascending (the first is 0).
    fn starts(&self, m: usize) -> Vec<usize> {
        let mut starts = Vec::new();
        let mut r = m;
        while r > 0 {
            r = self.arg[r] as usize;
            starts.push(r);
        }
        starts.reverse();
        starts
    }
}

/// The rows `rows` of the row-minima problem over the candidates `prev` (their penalized
/// costs) of `p`, their argmins within `opt` (`layer_with`), without a lower layer.
fn layer<'a>(
    p: &'a Prefix,
    w: &'a [f64],
    prev: &'a [f64],
    rows: (usize, usize),
    opt: (usize, usize),
) -> Layer<'a> {
    Layer {
        prev,
        lower: &[],
        inv: p.inv.as_deref(),
        w,
        s1: &p.s1,
        s2: &p.s2,
        lo: rows.0,
        hi: rows.1,
        opt_lo: opt.0,
        opt_hi: opt.1,
    }
}

/// The starts of an optimal partition of the `m` positions of `p` into exactly `k` clusters
/// (`2 <= k <= m`) and its SSE, or `None` when the search over the penalty does not find
/// one (see the module's documentation).
pub(super) fn partition(
    kernels: &Kernels,
    p: &Prefix,
    m: usize,
    k: usize,
) -> Option<(Vec<usize>, f64)> {
    let total = p.cost(0, m);
    // a constant input (or none) has nothing to split
    if total.is_nan() || total <= 0.0 || k < 2 || k > m {
        return None;
    }
    let mut pass = Pass::new(kernels, p, m);
    search(p, m, k, penalty_guess(kernels, p, m, k), &mut pass)?;
    Some((pass.starts(m), pass.last.1))
}

/// A first penalty for `k` clusters: the one that gives `k` clusters when clusters may only
/// start at every [`COARSE`]-th position (found the same way, recursively), else, from
/// high-resolution quantization (`sse(k) ~ C / k^2`), `-sse'(k) ~ 2 sse(1) / k^3`.
fn penalty_guess(kernels: &Kernels, p: &Prefix, m: usize, k: usize) -> f64 {
    let kf = k as f64;
    coarse_penalty(kernels, p, m, k).unwrap_or(2.0 * p.cost(0, m) / (kf * kf * kf))
}

/// Positions per coarse position of [`coarse_penalty`].
const COARSE: usize = 16;

/// The penalty at which the partitions of `p` whose clusters start at multiples of
/// [`COARSE`] have `k` clusters, if there are enough of those positions.
fn coarse_penalty(kernels: &Kernels, p: &Prefix, m: usize, k: usize) -> Option<f64> {
    let mc = m / COARSE;
    if mc < (8 * k).max(1024) {
        return None;
    }
    // coarse position c is position c COARSE; the last one is m
    let pick = |v: &[f64]| -> Vec<f64> {
        let mut out = vec![0.0; mc + 1];
        for (c, o) in out.iter_mut().enumerate() {
            *o = v[if c == mc { m } else { c * COARSE }];
        }
        out
    };
    let coarse = Prefix {
        w: Some(match &p.w {
            Some(w) => pick(w),
            None => (0..=mc)
                .map(|c| if c == mc { m } else { c * COARSE } as f64)
                .collect(),
        }),
        s1: pick(&p.s1),
        s2: pick(&p.s2),
        inv: None,
    };
    search(
        &coarse,
        mc,
        k,
        penalty_guess(kernels, &coarse, mc, k),
        &mut Pass::new(kernels, &coarse, mc),
    )
}

/// Penalized passes from `lambda` until one gives `k` clusters (then left in `pass`): the
/// penalty of that pass, or `None` if the search stalls.
fn search(p: &Prefix, m: usize, k: usize, mut lambda: f64, pass: &mut Pass) -> Option<f64> {
    let kf = k as f64;
    // the partitions with the fewest clusters above k and the most below k seen so far
    let mut above: Option<(usize, f64)> = None;
    let mut below: Option<(usize, f64)> = None;
    let mut exponent = 3.0f64;
    let mut last: Option<(f64, usize)> = None;
    for _ in 0..MAX_PASSES {
        let (c, sse) = pass.run(p, m, lambda);
        pass.last = (c, sse);
        if c == k {
            return Some(lambda);
        }
        // Between a bracket's two penalties the counts lie strictly between its two: a
        // pass that returns one of them (or beyond) found no partition below both lines,
        // so k's optimum lies on their chord (or rounding broke the tie): give up.
        let bracketed = above.is_some() && below.is_some();
        if c > k {
            if bracketed && above.is_some_and(|(a, _)| c >= a) {
                return None;
            }
            above = Some((c, sse));
        } else {
            if bracketed && below.is_some_and(|(b, _)| c <= b) {
                return None;
            }
            below = Some((c, sse));
        }
        // the local exponent of count against penalty, from the last two passes when they
        // differ (else twice the last one)
        if let Some((l0, c0)) = last {
            exponent = if c0 != c && l0 != lambda {
                ((lambda / l0).ln() / (c0 as f64 / c as f64).ln()).clamp(0.5, 12.0)
            } else {
                2.0 * exponent
            };
        }
        last = Some((lambda, c));
        lambda = match (above, below) {
            // the penalty at which the two partitions' penalized costs are equal
            (Some((ca, sa)), Some((cb, sb))) => (sb - sa) / (ca - cb) as f64,
            // a count c at penalty l suggests l (c / k)^exponent
            (Some((ca, _)), None) => lambda * (ca as f64 / kf).powf(exponent),
            (None, Some((cb, _))) => lambda * (cb as f64 / kf).powf(exponent),
            (None, None) => unreachable!(),
        };
        if !(lambda > 0.0 && lambda.is_finite()) {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::{dp_layers, sorted_positions, Prefix};
    use super::*;
    use crate::isa::{Isa, Kernels};

    /// A handle for every ISA this machine has.
    fn every_isa() -> Vec<Kernels> {
        Isa::available()
            .into_iter()
            .map(|isa| Kernels::new(isa).unwrap())
            .collect()
    }
    use crate::rng::{uniform, NoiseKey};

    /// Seeded samples: 0 uniform, 1 Gaussian, 2 Laplacian, 3 a mixture of two Gaussians,
    /// 4 small integers (many repeats: weighted positions).
    fn sample(kind: u32, n: usize, seed: u64) -> Vec<f32> {
        let key = NoiseKey::from_seed(seed);
        let u = |c: usize| (uniform(key, c as u32) as f64).max(1e-9);
        (0..n)
            .map(|i| {
                let (a, b) = (u(2 * i), u(2 * i + 1));
                let g = (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos();
                (match kind {
                    0 => a,
                    1 => g,
                    2 => -(b - 0.5).signum() * (1.0 - 2.0 * (b - 0.5).abs()).max(1e-9).ln(),
                    3 => g + if a < 0.3 { 6.0 } else { 0.0 },
                    _ => (g * 40.0).round(),
                }) as f32
            })
            .collect()
    }

    fn prefix(x: &[f32]) -> (Prefix, usize) {
        let pos = sorted_positions(x);
        (pos.prefix(), pos.len())
    }

    /// The SSE of the partition with these cluster starts.
    fn sse_of(p: &Prefix, m: usize, starts: &[usize]) -> f64 {
        let ends = starts[1..].iter().copied().chain([m]);
        starts.iter().zip(ends).map(|(&i, j)| p.cost(i, j)).sum()
    }

    #[test]
    fn penalty_search_is_optimal_against_the_layers() {
        let scalar = Kernels::scalar();
        let isas = every_isa();
        let mut found = 0;
        for kind in 0..5 {
            for (n, seed) in [(5_000usize, 1u64), (20_000, 2), (40_000, 3)] {
                let x = sample(kind, n, seed + 10 * kind as u64);
                let (p, m) = prefix(&x);
                for k in [2usize, 3, 7, 16, 61, 256] {
                    // (the layered reference at 40,000 x 256 is slow under qemu)
                    if k > m || n == 40_000 && k == 256 {
                        continue;
                    }
                    let (layers, _) = dp_layers(&scalar, &p, m, k, false);
                    // the passes scan on each ISA: the same clusters and SSE on each
                    let runs: Vec<_> = isas.iter().map(|kern| partition(kern, &p, m, k)).collect();
                    assert!(
                        runs.iter().all(|r| r == &runs[0]),
                        "kind {kind} n {n} k {k}"
                    );
                    let Some((starts, sse)) = runs[0].clone() else {
                        continue;
                    };
                    found += 1;
                    assert_eq!(starts.len(), k, "kind {kind} n {n} k {k}");
                    assert_eq!(starts[0], 0);
                    assert!(starts.windows(2).all(|w| w[0] < w[1]));
                    let recomputed = sse_of(&p, m, &starts);
                    let tol = 1e-9 * layers.abs() + 1e-12;
                    assert!(
                        (sse - layers).abs() <= tol && (recomputed - layers).abs() <= tol,
                        "kind {kind} n {n} k {k}: penalty search {sse} ({recomputed}), layers {layers}"
                    );
                }
            }
        }
        // ties are not generic: the search must find k on (nearly) all of these
        assert!(
            found >= 80,
            "the penalty search found k clusters in {found} of 85 cases"
        );
    }

    #[test]
    fn ties_between_cluster_counts_give_up_or_stay_optimal() {
        // two identical groups far apart: sse(2a + 1) lies on the chord of sse(2a) and
        // sse(2a + 2), so no penalty is guaranteed to give 2a + 1 clusters
        let group: Vec<f32> = (0..3000).map(|i| (i as f32 * 0.37).sin()).collect();
        let x: Vec<f32> = group
            .iter()
            .chain(&group)
            .enumerate()
            .map(|(i, &v)| if i < 3000 { v } else { v + 100.0 })
            .collect();
        let (p, m) = prefix(&x);
        let scalar = Kernels::scalar();
        for k in [3usize, 5, 9, 17] {
            let (layers, _) = dp_layers(&scalar, &p, m, k, false);
            if let Some((starts, sse)) = partition(&scalar, &p, m, k) {
                assert_eq!(starts.len(), k);
                assert!(
                    (sse - layers).abs() <= 1e-9 * layers,
                    "k {k}: {sse} vs {layers}"
                );
            }
        }
    }

    #[test]
    fn every_prefix_of_a_pass_is_optimal() {
        // each f[i] against the minimum over every predecessor (O(m^2)), at penalties that
        // give from a few to a few hundred clusters (blocks from a few rows to hundreds,
        // some failing their check), on every ISA
        for (kind, kernels) in [0u32, 2, 4]
            .into_iter()
            .flat_map(|kind| every_isa().into_iter().map(move |kern| (kind, kern)))
        {
            let x = sample(kind, 2_500, 7 + kind as u64);
            let (p, m) = prefix(&x);
            let mut pass = Pass::new(&kernels, &p, m);
            let total = p.cost(0, m);
            for lambda in [total / 4.0, total / 1e3, total / 1e5, total / 1e7] {
                pass.run(&p, m, lambda);
                let mut best = vec![0.0f64; m + 1];
                for i in 1..=m {
                    best[i] = (0..i)
                        .map(|j| best[j] + p.cost(j, i) + lambda)
                        .fold(f64::INFINITY, f64::min);
                    // rounding: the costs are differences of prefix sums up to ~total
                    assert!(
                        (pass.f[i] - best[i]).abs() <= 1e-12 * (total + best[i]),
                        "{} kind {kind} lambda {lambda} row {i}: pass {} optimum {}",
                        kernels.isa().name(),
                        pass.f[i],
                        best[i]
                    );
                }
            }
        }
    }

    #[test]
    fn outside_its_domain_it_declines() {
        let kern = Kernels::scalar();
        let (p, m) = prefix(&[1.0, 2.0, 3.0, 4.0]);
        assert!(partition(&kern, &p, m, 1).is_none());
        assert!(partition(&kern, &p, m, 5).is_none());
        let (p, m) = prefix(&[2.5; 100]);
        assert!(partition(&kern, &p, m, 2).is_none());
    }
}
