//! The exact k-cluster optimum through a Lagrangian relaxation: O(m) memory and a time that
//! does not grow with k.
//!
//! Charging a penalty `lambda` per cluster and letting the number of clusters free,
//! `h(lambda) = min over partitions P of sse(P) + lambda |P|` is one dynamic program over the
//! sorted positions, `F(i) = min_{j < i} F(j) + cost(j, i) + lambda`, whose argmins never
//! decrease with `i` (the cost is Monge). It is solved online with a queue of candidates,
//! each the best over an interval of later rows: a new candidate takes over a suffix of the
//! rows, found by a galloping then binary search against the last one (O(m log) per pass).
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

use super::{Prefix, INV_PAD};

/// Penalized passes at most before [`partition`] gives up (the searches of the comparison's
/// samples took 1-6 per level).
const MAX_PASSES: usize = 60;

/// The arrays of the penalized passes, allocated once for all of them.
struct Pass {
    /// `f[i]`: the penalized cost of the best partition of the first `i` positions.
    f: Vec<f64>,
    /// `arg[i]`: where that partition's last cluster starts.
    arg: Vec<u32>,
    /// The candidate queue: candidate `queue[t]` is the best for rows from `start[t]` on.
    queue: Vec<u32>,
    start: Vec<u32>,
    /// The clusters and SSE of the last pass.
    last: (usize, f64),
}

impl Pass {
    fn new(m: usize) -> Pass {
        Pass {
            f: vec![0.0; m + 1],
            arg: vec![0; m + 1],
            queue: vec![0; m + 1],
            start: vec![0; m + 1],
            last: (0, 0.0),
        }
    }

    /// One pass at penalty `lambda`: the number of clusters of the partition found and its
    /// SSE (summed over its clusters).
    fn run(&mut self, p: &Prefix, m: usize, lambda: f64) -> (usize, f64) {
        let (s1, s2) = (&p.s1[..], &p.s2[..]);
        match (p.inv.as_deref(), p.w.as_deref()) {
            (Some(inv), _) => self.run_with(m, lambda, |i, j| {
                let s = s1[j] - s1[i];
                ((s2[j] - s2[i]) - s * s * inv[INV_PAD + j - i]).max(0.0)
            }),
            (None, Some(w)) => self.run_with(m, lambda, |i, j| {
                let s = s1[j] - s1[i];
                ((s2[j] - s2[i]) - s * s * (1.0 / (w[j] - w[i]))).max(0.0)
            }),
            // (unit weights come with their reciprocals; this is their quotient)
            (None, None) => self.run_with(m, lambda, |i, j| {
                let s = s1[j] - s1[i];
                ((s2[j] - s2[i]) - s * s * (1.0 / (j - i) as f64)).max(0.0)
            }),
        }
    }

    /// [`Pass::run`] with the SSE `cost(i, j)` of the cluster of positions `i..j` (the
    /// layered program's formula and operations, see `scalar::dp_row`).
    #[inline(always)]
    fn run_with(
        &mut self,
        m: usize,
        lambda: f64,
        cost: impl Fn(usize, usize) -> f64,
    ) -> (usize, f64) {
        let (f, arg, queue, start) = (
            &mut self.f[..],
            &mut self.arg[..],
            &mut self.queue[..],
            &mut self.start[..],
        );
        // the penalized cost of rows 0..r ending with the cluster j..r (j < r)
        let val = |f: &[f64], j: usize, r: usize| f[j] + cost(j, r);
        f[0] = 0.0;
        queue[0] = 0;
        start[0] = 1;
        let (mut h, mut t) = (0usize, 1usize);
        for i in 1..=m {
            while h + 1 < t && start[h + 1] as usize <= i {
                h += 1;
            }
            let j = queue[h] as usize;
            f[i] = val(f, j, i) + lambda;
            arg[i] = j as u32;
            if i == m {
                break;
            }
            // candidate i (rows > i): drop the candidates it beats from their first row on;
            // i then also beats the one before the last dropped at that row (which the
            // dropped one beat there), a bound for the search below
            let mut beaten = m + 1;
            loop {
                let b = queue[t - 1] as usize;
                let s = (start[t - 1] as usize).max(i + 1);
                if val(f, i, s) < val(f, b, s) {
                    beaten = s;
                    t -= 1;
                    if t == h {
                        break;
                    }
                } else {
                    break;
                }
            }
            if t == h {
                queue[t] = i as u32;
                start[t] = (i + 1) as u32;
                t += 1;
                continue;
            }
            // the first row after s where i beats the last candidate, if any
            let b = queue[t - 1] as usize;
            let s = (start[t - 1] as usize).max(i + 1);
            let better = |r: usize| val(f, i, r) < val(f, b, r);
            let (mut lo, mut hi) = (s, beaten);
            let mut step = 1;
            while hi > m && lo + step <= m {
                if better(lo + step) {
                    hi = lo + step;
                    break;
                }
                lo += step;
                step *= 2;
            }
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if better(mid) {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            if hi <= m {
                queue[t] = i as u32;
                start[t] = hi as u32;
                t += 1;
            }
        }
        let (mut clusters, mut sse, mut r) = (0, 0.0, m);
        while r > 0 {
            let j = arg[r] as usize;
            sse += cost(j, r);
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

/// The starts of an optimal partition of the `m` positions of `p` into exactly `k` clusters
/// (`2 <= k <= m`) and its SSE, or `None` when the search over the penalty does not find
/// one (see the module's documentation).
pub(super) fn partition(p: &Prefix, m: usize, k: usize) -> Option<(Vec<usize>, f64)> {
    let total = p.cost(0, m);
    // a constant input (or none) has nothing to split
    if total.is_nan() || total <= 0.0 || k < 2 || k > m {
        return None;
    }
    let mut pass = Pass::new(m);
    search(p, m, k, penalty_guess(p, m, k), &mut pass)?;
    Some((pass.starts(m), pass.last.1))
}

/// A first penalty for `k` clusters: the one that gives `k` clusters when clusters may only
/// start at every [`COARSE`]-th position (found the same way, recursively), else, from
/// high-resolution quantization (`sse(k) ~ C / k^2`), `-sse'(k) ~ 2 sse(1) / k^3`.
fn penalty_guess(p: &Prefix, m: usize, k: usize) -> f64 {
    let kf = k as f64;
    coarse_penalty(p, m, k).unwrap_or(2.0 * p.cost(0, m) / (kf * kf * kf))
}

/// Positions per coarse position of [`coarse_penalty`].
const COARSE: usize = 16;

/// The penalty at which the partitions of `p` whose clusters start at multiples of
/// [`COARSE`] have `k` clusters, if there are enough of those positions.
fn coarse_penalty(p: &Prefix, m: usize, k: usize) -> Option<f64> {
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
        penalty_guess(&coarse, mc, k),
        &mut Pass::new(mc),
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
    use crate::isa::Kernels;
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
                    let Some((starts, sse)) = partition(&p, m, k) else {
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
            if let Some((starts, sse)) = partition(&p, m, k) {
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
        // give from a few to a few hundred clusters (a candidate that takes over a row late
        // or early is only caught where that changes f by more than rounding: at the row
        // where two candidates cross their values are nearly equal)
        for kind in [0u32, 2, 4] {
            let x = sample(kind, 2_500, 7 + kind as u64);
            let (p, m) = prefix(&x);
            let mut pass = Pass::new(m);
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
                        "kind {kind} lambda {lambda} row {i}: pass {} optimum {}",
                        pass.f[i],
                        best[i]
                    );
                }
            }
        }
    }

    #[test]
    fn outside_its_domain_it_declines() {
        let (p, m) = prefix(&[1.0, 2.0, 3.0, 4.0]);
        assert!(partition(&p, m, 1).is_none());
        assert!(partition(&p, m, 5).is_none());
        let (p, m) = prefix(&[2.5; 100]);
        assert!(partition(&p, m, 2).is_none());
    }
}
