//! K-means: optimality against brute force and an independent O(k n^2) dynamic program, the
//! seed's examples, and assignment / decoding on every ISA against the scalar reference.

mod common;

use common::{bits_eq, data, isas, lengths, Rng};
use quantbench_kernels::kmeans::{
    centroid_gradients, optimal_1d, optimal_1d_per_channel, sse, Codebook,
};
use quantbench_kernels::{ChannelLayout, Kernels};

/// Minimum SSE over all partitions of the sorted values into exactly `k` contiguous groups,
/// by enumeration (small n only).
fn brute_force(x: &[f32], k: usize) -> f64 {
    let mut v: Vec<f64> = x.iter().map(|&a| a as f64).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let cost = |a: usize, b: usize| {
        let m = v[a..b].iter().sum::<f64>() / (b - a) as f64;
        v[a..b].iter().map(|t| (t - m) * (t - m)).sum::<f64>()
    };
    // choose k-1 cut points among n-1 gaps
    let mut best = f64::INFINITY;
    let gaps = n - 1;
    for mask in 0u32..(1 << gaps) {
        if mask.count_ones() as usize != k - 1 {
            continue;
        }
        let mut start = 0;
        let mut total = 0.0;
        for g in 0..gaps {
            if mask & (1 << g) != 0 {
                total += cost(start, g + 1);
                start = g + 1;
            }
        }
        total += cost(start, n);
        best = best.min(total);
    }
    best
}

/// An independent textbook O(k n^2) dynamic program over all sorted values (no distinct-value
/// compression, no monotonicity, costs from running sums).
#[allow(clippy::needless_range_loop)] // the textbook form, on purpose
fn quadratic_dp(x: &[f32], k: usize) -> f64 {
    let mut v: Vec<f64> = x.iter().map(|&a| a as f64).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    // cost[a][b] for the group v[a..b], built by extending b
    let mut prev = vec![f64::INFINITY; n + 1];
    prev[0] = 0.0;
    for _ in 0..k {
        let mut cur = vec![f64::INFINITY; n + 1];
        for a in 0..n {
            if prev[a].is_infinite() {
                continue;
            }
            let (mut s, mut s2) = (0.0f64, 0.0f64);
            for b in a + 1..=n {
                s += v[b - 1];
                s2 += v[b - 1] * v[b - 1];
                let w = (b - a) as f64;
                let c = prev[a] + (s2 - s * s / w).max(0.0);
                if c < cur[b] {
                    cur[b] = c;
                }
            }
        }
        prev = cur;
    }
    prev[n]
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn seed_examples() {
    // ties: {1,3},{5,7,9} and {1,3,5},{7,9} both have SSE 10; ours takes the leftmost boundary
    let f = optimal_1d(&[1.0, 3.0, 5.0, 7.0, 9.0], 2).unwrap();
    assert_eq!(f.sse, 10.0);
    assert_eq!(f.codebook.centroids(), &[2.0, 7.0]);
    let x: Vec<f32> = (1..=9).map(|i| i as f32 * 10.0).collect();
    let f = optimal_1d(&x, 3).unwrap();
    assert_eq!(f.codebook.centroids(), &[20.0, 50.0, 80.0]);
    assert_eq!(f.sse, 600.0);
    // {-10,-5},{0,5,10} ties with {-10,-5,0},{5,10} (scikit-learn: -5 and 7.5): SSE 62.5
    let f = optimal_1d(&[-10.0, -5.0, 0.0, 5.0, 10.0], 2).unwrap();
    assert_eq!(f.sse, 62.5);
    assert_eq!(f.codebook.centroids(), &[-7.5, 5.0]);
}

#[test]
fn optimal_against_brute_force() {
    let mut rng = Rng::new(31);
    for trial in 0..300 {
        let n = 1 + rng.below(11) as usize;
        let k = 1 + rng.below(n.min(5) as u64) as usize;
        // small integers make ties and duplicates common
        let x: Vec<f32> = (0..n)
            .map(|_| {
                if trial % 2 == 0 {
                    rng.range_i32(-6, 6) as f32
                } else {
                    rng.normalish(3.0)
                }
            })
            .collect();
        let distinct = {
            let mut d = x.clone();
            d.sort_by(f32::total_cmp);
            d.dedup();
            d.len()
        };
        let f = optimal_1d(&x, k).unwrap();
        let want = brute_force(&x, k.min(distinct));
        assert!(
            close(f.sse, want),
            "{x:?} k={k}: ours {} brute force {want}",
            f.sse
        );
        assert_eq!(f.codebook.len(), k.min(distinct));
    }
}

#[test]
fn optimal_against_quadratic_dp() {
    let mut rng = Rng::new(32);
    for &(n, k) in &[
        (50usize, 3usize),
        (200, 8),
        (700, 16),
        (2000, 4),
        (2000, 33),
        (800, 256),
        // from 4096 positions on, the penalty search (`kmeans::LAGRANGE_MIN_POSITIONS`)
        (5000, 5),
        (4200, 12),
        // integers with repeats: positions weighted by their counts, >= 4096 of them
        (6000, 3),
    ] {
        let x = if n == 6000 {
            (0..n).map(|_| rng.range_i32(0, 9000) as f32).collect()
        } else {
            data(&mut rng, n, 2.0, 0.01, false)
        };
        let f = optimal_1d(&x, k).unwrap();
        let want = quadratic_dp(&x, k);
        assert!(
            close(f.sse, want),
            "n={n} k={k}: ours {} quadratic DP {want}",
            f.sse
        );
        // the optimum without a traceback: the same value on every ISA, never above a fit
        let scalar = Kernels::scalar().kmeans_optimal_sse(&x, k).unwrap();
        assert!(
            close(scalar, want),
            "n={n} k={k}: optimal_sse {scalar}, quadratic DP {want}"
        );
        assert!(
            scalar <= f.sse * (1.0 + 1e-12),
            "n={n} k={k}: {scalar} > fit {}",
            f.sse
        );
        for isa in isas() {
            let v = Kernels::new(isa)
                .unwrap()
                .kmeans_optimal_sse(&x, k)
                .unwrap();
            assert_eq!(v.to_bits(), scalar.to_bits(), "n={n} k={k} {isa:?}");
        }
        assert!(
            f.codebook.centroids().windows(2).all(|w| w[0] < w[1]),
            "sorted, distinct"
        );
    }
}

/// The SIMD scans of the dynamic program evaluate every candidate with the reference's
/// operations: same codebook and same SSE, bit for bit, on every ISA, for the exact mode and
/// for the fast mode (whose bins go through the same program).
#[test]
fn dynamic_program_matches_scalar_on_every_isa() {
    let mut rng = Rng::new(36);
    let mut cases = Vec::new();
    for &(n, k, ints) in &[
        (1usize, 1usize, false),
        (9, 2, true),
        (40, 7, true),
        (333, 5, false),
        (1000, 256, true),
        (2049, 33, false),
        (5000, 16, true),
        (20_000, 3, false),
        (20_000, 256, false),
    ] {
        // small integers give repeated values, i.e. weights above 1
        let x: Vec<f32> = (0..n)
            .map(|_| {
                if ints {
                    rng.range_i32(-300, 300) as f32
                } else {
                    rng.normalish(2.0)
                }
            })
            .collect();
        cases.push((x, k));
    }
    // evenly spaced values (once or twice each) with k not dividing their count: many
    // partitions tie exactly (the sums are exact in f64), so the tie-breaking is compared too
    for &(n, k, copies) in &[
        (5usize, 2usize, 1usize),
        (10, 3, 1),
        (101, 7, 1),
        (1000, 16, 2),
        (999, 64, 1),
    ] {
        let x: Vec<f32> = (0..n * copies)
            .map(|i| (i / copies) as f32 * 2.0 + 1.0)
            .collect();
        cases.push((x, k));
    }
    for (x, k) in &cases {
        let (n, k) = (x.len(), *k);
        let want = optimal_1d(x, k).unwrap();
        let want_fast = Kernels::scalar().kmeans_fast(x, k).unwrap();
        for isa in isas() {
            let kern = Kernels::new(isa).unwrap();
            let got = kern.kmeans_optimal(x, k).unwrap();
            assert_eq!(got.codebook, want.codebook, "{isa} n={n} k={k}");
            assert_eq!(got.sse.to_bits(), want.sse.to_bits(), "{isa} n={n} k={k}");
            let fast = kern.kmeans_fast(x, k).unwrap();
            assert_eq!(fast.codebook, want_fast.codebook, "fast {isa} n={n} k={k}");
            assert_eq!(
                fast.sse.to_bits(),
                want_fast.sse.to_bits(),
                "fast {isa} n={n} k={k}"
            );
        }
    }
}

#[test]
fn degenerate_inputs() {
    assert_eq!(optimal_1d(&[], 4).unwrap().codebook.centroids(), &[0.0]);
    assert_eq!(
        optimal_1d(&[f32::NAN, f32::INFINITY], 4)
            .unwrap()
            .codebook
            .centroids(),
        &[0.0]
    );
    let f = optimal_1d(&[2.5; 10], 8).unwrap();
    assert_eq!((f.codebook.centroids(), f.sse), (&[2.5f32][..], 0.0));
    let f = optimal_1d(&[1.0, 2.0, 2.0, f32::NAN, 4.0], 8).unwrap();
    assert_eq!(f.codebook.centroids(), &[1.0, 2.0, 4.0]);
    let f = optimal_1d(&[1.0, 2.0, 6.0], 1).unwrap();
    assert_eq!((f.codebook.centroids(), f.sse), (&[3.0f32][..], 14.0));
    assert!(optimal_1d(&[1.0], 0).is_err());
    assert!(optimal_1d(&[1.0], 257).is_err());
    assert!(Codebook::new(vec![]).is_err());
    assert!(Codebook::new(vec![1.0, f32::NAN]).is_err());
    assert_eq!(Codebook::new(vec![0.0; 5]).unwrap().index_bits(), 3);
    assert_eq!(Codebook::new(vec![0.0]).unwrap().index_bits(), 0);
    assert_eq!(Codebook::new(vec![0.0; 256]).unwrap().index_bits(), 8);
}

fn codebook(rng: &mut Rng, k: usize) -> Codebook {
    let mut c: Vec<f32> = (0..k).map(|_| rng.normalish(2.0)).collect();
    if k > 2 {
        c[1] = c[0]; // a duplicate centroid
    }
    Codebook::new(c).unwrap()
}

#[test]
fn assign_and_decode_match_scalar_on_every_isa() {
    let mut rng = Rng::new(33);
    let scalar = Kernels::scalar();
    for k in [
        1usize, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100, 255, 256,
    ] {
        let cb = codebook(&mut rng, k);
        for isa in isas() {
            let kern = Kernels::new(isa).unwrap();
            for &n in lengths().iter().step_by(7) {
                let mut x = data(&mut rng, n, 3.0, 0.1, true);
                // the midpoints rounded to f32, and the f32s on either side of them (one of
                // which is the threshold: the smallest f32 above the exact midpoint)
                let around = cb.centroids().windows(2).flat_map(|w| {
                    let m = ((w[0] as f64 + w[1] as f64) / 2.0) as f32;
                    [m, m.next_up(), m.next_down()]
                });
                for (v, m) in x.iter_mut().zip(around) {
                    *v = m;
                }
                let (mut want, mut got) = (vec![0u8; n], vec![0u8; n]);
                scalar.kmeans_assign(&x, &cb, &mut want).unwrap();
                kern.kmeans_assign(&x, &cb, &mut got).unwrap();
                assert_eq!(want, got, "assign {isa} k={k} n={n}");
                let (mut fw, mut fg) = (vec![0f32; n], vec![0f32; n]);
                scalar.kmeans_decode(&want, &cb, &mut fw).unwrap();
                kern.kmeans_decode(&want, &cb, &mut fg).unwrap();
                assert!(bits_eq(&fw, &fg), "decode {isa} k={k} n={n}");
            }
        }
    }
}

/// Every value goes to its nearest centroid (ties to the lower index), NaN reads as 0.
#[test]
fn assignment_is_nearest() {
    let mut rng = Rng::new(34);
    for k in [2usize, 5, 16, 40, 256] {
        let cb = codebook(&mut rng, k);
        let x = data(&mut rng, 5000, 3.0, 0.1, true);
        let mut idx = vec![0u8; x.len()];
        Kernels::active().kmeans_assign(&x, &cb, &mut idx).unwrap();
        let c = cb.centroids();
        for (&v, &i) in x.iter().zip(&idx) {
            let v = if v.is_nan() { 0.0 } else { v };
            if v.is_infinite() {
                assert_eq!(i as usize, if v > 0.0 { k - 1 } else { 0 });
                continue;
            }
            // exact: v is nearer to c[b] than to c[a] (a < b) iff v > (c[a] + c[b]) / 2, which
            // f64 holds exactly; at an exact midpoint the lower centroid wins
            let mid = |a: usize, b: usize| (c[a] as f64 + c[b] as f64) / 2.0;
            let i = i as usize;
            for j in 0..k {
                if c[j] < c[i] {
                    assert!(
                        v as f64 > mid(j, i),
                        "value {v} -> {i}, but {j} is as near (k={k})"
                    );
                } else if c[j] > c[i] {
                    assert!(
                        v as f64 <= mid(i, j),
                        "value {v} -> {i}, but {j} is nearer (k={k})"
                    );
                }
            }
        }
    }
}

#[test]
fn decode_rejects_out_of_range_indices() {
    let cb = Codebook::new(vec![0.0, 1.0, 2.0]).unwrap();
    let e = Kernels::active()
        .kmeans_decode(&[0, 1, 3], &cb, &mut [0.0; 3])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "index 3 at position 2 is outside a codebook of 3 centroids"
    );
}

#[test]
fn centroid_gradient_sums() {
    let (sums, counts) =
        centroid_gradients(&[0.5, -1.0, 2.0, 0.25, 1.0], &[0, 2, 2, 0, 1], 4).unwrap();
    assert_eq!(sums, vec![0.75, 1.0, 1.0, 0.0]);
    assert_eq!(counts, vec![2, 1, 2, 0]);
    assert!(centroid_gradients(&[1.0], &[4], 4).is_err());
    assert!(centroid_gradients(&[1.0, 2.0], &[0], 4).is_err());
}

#[test]
fn per_channel_codebooks() {
    let x = [1.0f32, 1.1, 9.0, 9.2, -50.0, -49.0, 30.0, 31.0];
    let layout = ChannelLayout::new(&[2, 4], 0).unwrap();
    let fits = optimal_1d_per_channel(&x, &layout, 2).unwrap();
    assert_eq!(fits[0].codebook.centroids(), &[1.05, 9.1]);
    assert_eq!(fits[1].codebook.centroids(), &[-49.5, 30.5]);
    assert!(close(fits[0].sse, sse(&x[..4], &fits[0].codebook)));
}

/// The fast mode against the exact optimum on samples much larger than its histogram: its
/// SSE stays within its proven `gap_bound` of the optimum, and within the documented
/// (measured) 0.5 %.
#[test]
fn fast_mode_stays_within_its_bound() {
    let mut rng = Rng::new(35);
    let n = 300_000;
    let gaussian: Vec<f32> = (0..n)
        .map(|_| {
            let (u, v) = (rng.unit().max(1e-7) as f64, rng.unit() as f64);
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect();
    let laplacian: Vec<f32> = (0..n)
        .map(|_| {
            let c = rng.unit() as f64 - 0.5;
            (-c.signum() * (1.0 - 2.0 * c.abs()).max(1e-12).ln()) as f32
        })
        .collect();
    let uniform: Vec<f32> = (0..n).map(|_| rng.unit() * 4.0 - 2.0).collect();
    let mixture: Vec<f32> = (0..n)
        .map(|i| rng.normalish(0.05) + [-1.0f32, 0.0, 0.3, 2.5][i % 4])
        .collect();
    // three clusters inside one histogram bin (the optimum splits it; whole bins cannot)
    let clumps: Vec<f32> = (0..n)
        .map(|i| rng.normalish(1e-7) + [0.0f32, 2e-6, 4e-6, 1.0][i % 4])
        .collect();
    for (name, x) in [
        ("gaussian", &gaussian),
        ("laplacian", &laplacian),
        ("uniform", &uniform),
        ("mixture", &mixture),
        ("clumps", &clumps),
    ] {
        for k in [4usize, 16] {
            let exact = optimal_1d(x, k).unwrap();
            for isa in isas() {
                let fast = Kernels::new(isa).unwrap().kmeans_fast(x, k).unwrap();
                let gap = fast.sse / exact.sse - 1.0;
                eprintln!(
                    "fast mode {name} k={k} {isa}: {:+.5} % vs optimum, proven bound {:.5} %",
                    gap * 100.0,
                    fast.gap_bound / exact.sse * 100.0
                );
                assert!(
                    fast.sse - exact.sse <= fast.gap_bound,
                    "{name} k={k} {isa}: fast {} exceeds the optimum {} by more than its bound {}",
                    fast.sse,
                    exact.sse,
                    fast.gap_bound
                );
                assert_eq!(exact.gap_bound, 0.0);
                assert!(
                    gap >= -1e-9,
                    "{name} k={k} {isa}: fast {} below the optimum {}",
                    fast.sse,
                    exact.sse
                );
                // the measured 0.5 % holds for smooth distributions only: clusters narrower
                // than a bin (the clumps) are beyond whole bins, and its bound says so
                assert!(
                    gap <= 0.005 || name == "clumps",
                    "{name} k={k} {isa}: fast mode {:.4} % above the optimum",
                    gap * 100.0
                );
                assert!(
                    close(fast.sse, sse(x, &fast.codebook)),
                    "{name}: reported SSE is the SSE of its codebook"
                );
            }
        }
    }
}

#[test]
fn decode_from_packed_indices() {
    use quantbench_kernels::pack::{pack_bits, packed_len};
    let mut rng = Rng::new(36);
    for bits in 1..=8u32 {
        let k = (1usize << bits) - (bits as usize % 2); // full and not-full codebooks
        let cb = codebook(&mut rng, k.max(1));
        for n in [0usize, 1, 7, 8, 4095, 4096, 4097, 10_001] {
            let idx: Vec<u8> = (0..n).map(|_| rng.below(cb.len() as u64) as u8).collect();
            let mut packed = vec![0u8; packed_len(n, bits)];
            pack_bits(&idx, bits, &mut packed).unwrap();
            let mut want = vec![0f32; n];
            Kernels::scalar()
                .kmeans_decode(&idx, &cb, &mut want)
                .unwrap();
            for isa in isas() {
                let mut got = vec![0f32; n];
                Kernels::new(isa)
                    .unwrap()
                    .kmeans_decode_packed(&packed, bits, &cb, &mut got)
                    .unwrap();
                assert!(bits_eq(&want, &got), "{isa} bits={bits} n={n}");
            }
        }
    }
    // an index beyond the codebook is an error, not a wrong value
    let cb = Codebook::new(vec![0.0, 1.0, 2.0]).unwrap();
    let mut packed = [0u8; 1];
    pack_bits(&[0, 3], 2, &mut packed).unwrap();
    let e = Kernels::active()
        .kmeans_decode_packed(&packed, 2, &cb, &mut [0.0; 2])
        .unwrap_err();
    assert!(e.to_string().contains("index 3 at position 1"), "{e}");
    assert!(
        Kernels::active()
            .kmeans_decode_packed(&packed, 1, &cb, &mut [0.0; 2])
            .is_err(),
        "3 centroids need 2 bits"
    );
    // positions are absolute, past the first chunk too
    let mut idx = vec![1u8; 5000];
    idx[4500] = 3;
    let mut packed = vec![0u8; 1250];
    pack_bits(&idx, 2, &mut packed).unwrap();
    let e = Kernels::active()
        .kmeans_decode_packed(&packed, 2, &cb, &mut vec![0.0; 5000])
        .unwrap_err();
    assert!(e.to_string().contains("index 3 at position 4500"), "{e}");
}
