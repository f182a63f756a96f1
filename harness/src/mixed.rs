//! Mixed precision (`[search]` in an experiment file): per-layer sensitivity, then one
//! candidate per weight layer for each size budget.
//!
//! 1. **Sensitivity.** Every weight layer is quantized with every candidate while all other
//!    layers stay fp32, and the model is run on held-out images (from the calibration split,
//!    after the calibration images). Recorded per (layer, candidate): the stored bytes, the
//!    weight SQNR, the held-out top-1 and its drop, and the output noise: the mean over images
//!    of the squared distance between the logits and the fp32 logits (and the output SQNR).
//! 2. **Allocation.** The proxy: the output noise of a configuration is the sum of its layers'
//!    noises (independent errors add in power). An exact multiple-choice knapsack over the
//!    stored bytes ([`allocate`]) minimises it under the budget.
//! 3. **Refinement.** Greedy, verified by real evaluation on the held-out images: each round
//!    tries the best-ranked moves "give layer l its next larger candidate and re-solve the
//!    others", evaluates them, and keeps the best if its held-out top-1 is higher (ties: lower
//!    measured noise). The test split is never used to choose.
//!
//! Every measurement is cached under `search/` in the run folder, so a killed run resumes.

use std::path::{Path, PathBuf};

use quantbench_kernels::Kernels;
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, Normalization};
use crate::engine::Engine;
use crate::eval::{evaluate, EvalOptions};
use crate::experiment::{Budget, Cell, Experiment, Granularity, MethodKind, WeightScheme};
use crate::model::{Graph, WeightRef};
use crate::quant::{
    quantize_weight, safetensors_bytes, stored_bytes, QuantizedModel, QuantizedWeight,
};

/// One (layer, candidate) measurement.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sensitivity {
    pub layer: usize,
    pub layer_name: String,
    pub weights: usize,
    pub candidate: String,
    /// Codes plus parameters of this layer under this candidate.
    pub bytes: u64,
    pub weight_sqnr_db: Option<f64>,
    /// Held-out top-1 with only this layer quantized.
    pub top1: f64,
    /// fp32 held-out top-1 minus `top1`.
    pub top1_drop: f64,
    /// Mean over images of the squared logit error against fp32.
    pub noise: f64,
    pub output_sqnr_db: Option<f64>,
}

/// The held-out score of one configuration.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Score {
    pub top1: f64,
    pub noise: f64,
}

impl Score {
    /// Higher top-1 wins; at equal top-1 the lower noise.
    fn better_than(&self, o: &Score) -> bool {
        self.top1 > o.top1 || (self.top1 == o.top1 && self.noise < o.noise)
    }
}

/// A held-out score and the output SQNR in dB (`None`: no error at all).
type ScoreSqnr = (Score, Option<f64>);

/// The outcome of the search for one budget.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Allocation {
    pub model: String,
    pub budget: Budget,
    /// The model file limit (file budgets) and the weight bytes limit the DP ran with.
    pub target_file_bytes: Option<u64>,
    pub weight_bytes_limit: u64,
    /// Candidate index per layer: the DP's choice and the final (refined) one.
    pub dp_choice: Vec<usize>,
    pub dp_proxy: f64,
    pub dp_score: Score,
    pub choice: Vec<usize>,
    pub proxy: f64,
    pub score: Score,
    pub weight_bytes: u64,
    pub file_bytes: u64,
    pub bits_per_weight: f64,
    pub moves_evaluated: usize,
    pub moves_accepted: usize,
    /// Candidate tags, for reading the choices.
    pub candidates: Vec<String>,
}

/// What the search of one model produced.
pub struct SearchOutcome {
    pub model: String,
    pub layers: Vec<String>,
    pub candidates: Vec<String>,
    pub table: Vec<Sensitivity>,
    pub fp32: Score,
    pub allocations: Vec<Allocation>,
    pub seconds: f64,
}

/// Exact multiple-choice knapsack: one candidate per layer minimising the summed `cost` with
/// summed `bytes <= cap`. `fixed[l] = Some(c)` forces layer l's choice. `None` when nothing
/// fits. Ties go to the lower candidate index (deterministic).
///
/// Dominated candidates (no fewer bytes and no lower cost than another) are dropped first;
/// the DP then runs over the bytes above each layer's smallest candidate:
/// O(layers x candidates x (cap - minimum bytes)).
pub fn allocate(
    cost: &[Vec<f64>],
    bytes: &[Vec<u64>],
    cap: u64,
    fixed: &[Option<usize>],
) -> Option<Vec<usize>> {
    let layers = cost.len();
    // per layer: the undominated candidates (index, extra bytes over the layer's minimum, cost)
    let mut opts: Vec<Vec<(usize, u64, f64)>> = Vec::with_capacity(layers);
    let mut base = 0u64;
    for l in 0..layers {
        let allowed: Vec<usize> = match fixed.get(l).copied().flatten() {
            Some(c) => vec![c],
            None => (0..cost[l].len()).collect(),
        };
        let keep: Vec<usize> = allowed
            .iter()
            .copied()
            .filter(|&c| {
                !allowed.iter().any(|&o| {
                    o != c
                        && bytes[l][o] <= bytes[l][c]
                        && cost[l][o] <= cost[l][c]
                        && (bytes[l][o] < bytes[l][c] || cost[l][o] < cost[l][c] || o < c)
                })
            })
            .collect();
        let min = keep.iter().map(|&c| bytes[l][c]).min()?;
        base += min;
        opts.push(
            keep.iter()
                .map(|&c| (c, bytes[l][c] - min, cost[l][c]))
                .collect(),
        );
    }
    if base > cap {
        return None;
    }
    let spread: u64 = opts
        .iter()
        .map(|o| o.iter().map(|x| x.1).max().unwrap_or(0))
        .sum();
    let w = (cap - base).min(spread) as usize;
    // best[x]: the least cost of the layers so far using at most x extra bytes
    let mut best = vec![0f64; w + 1];
    let mut pick: Vec<Vec<u8>> = Vec::with_capacity(layers);
    let mut next = vec![0f64; w + 1];
    for o in &opts {
        let mut p = vec![u8::MAX; w + 1];
        for x in 0..=w {
            let mut b = f64::INFINITY;
            for (j, &(_, extra, c)) in o.iter().enumerate() {
                let extra = extra as usize;
                if extra <= x {
                    let v = best[x - extra] + c;
                    if v < b {
                        b = v;
                        p[x] = j as u8;
                    }
                }
            }
            next[x] = b;
        }
        std::mem::swap(&mut best, &mut next);
        pick.push(p);
    }
    if !best[w].is_finite() {
        return None;
    }
    let mut choice = vec![0usize; layers];
    let mut x = w;
    for l in (0..layers).rev() {
        let j = pick[l][x] as usize;
        let (c, extra, _) = opts[l][j];
        choice[l] = c;
        x -= extra as usize;
    }
    Some(choice)
}

fn proxy(cost: &[Vec<f64>], choice: &[usize]) -> f64 {
    choice.iter().enumerate().map(|(l, &c)| cost[l][c]).sum()
}

/// The state of one model's search.
struct Search<'a> {
    graph: &'a Graph,
    refs: Vec<WeightRef>,
    held: &'a Dataset,
    norm: &'a Normalization,
    opts: EvalOptions,
    /// [layer][candidate]
    quantized: Vec<Vec<QuantizedWeight>>,
    ref_logits: Vec<f32>,
}

impl Search<'_> {
    /// Held-out score of a configuration (candidate per layer; `usize::MAX` keeps a layer fp32).
    fn score(&self, choice: &[usize]) -> Result<ScoreSqnr, String> {
        let mut g = self.graph.clone();
        for (l, r) in self.refs.iter().enumerate() {
            let Some(qw) = self.quantized[l].get(choice[l]) else {
                continue;
            };
            if qw.scheme != WeightScheme::Fp32 {
                g.set_constant(r.value, qw.dequantized.clone())?;
            }
        }
        let r = evaluate(&Engine::new(&g), self.held, self.norm, &self.opts, None)?;
        self.score_logits(&r.logits)
    }

    /// Held-out scores with layer `l` as each candidate and every other layer fp32 (`None`
    /// for an fp32 candidate). The nodes before the layer run once; only the rest of the
    /// graph runs per candidate. The logits are the ones a whole run gives (same batches,
    /// same operations).
    fn layer_scores(&self, l: usize) -> Result<Vec<Option<ScoreSqnr>>, String> {
        let node = self.refs[l].node;
        let nodes = self.graph.nodes.len();
        let batch = crate::eval::check_model_fits(self.graph, self.held, self.opts.batch)?;
        let n = self.held.len();
        let ranges: Vec<std::ops::Range<usize>> = (0..n.div_ceil(batch))
            .map(|b| b * batch..((b + 1) * batch).min(n))
            .collect();
        let fp32 = Engine::new(self.graph);
        let states = par_map(ranges.len(), self.opts.threads, |b| {
            let mut st = fp32.start(self.held.batch(ranges[b].clone(), self.norm), None)?;
            fp32.run_nodes(&mut st, 0..node, None)?;
            Ok(st)
        })?;
        let mut out = Vec::with_capacity(self.quantized[l].len());
        for qw in &self.quantized[l] {
            if qw.scheme == WeightScheme::Fp32 {
                out.push(None);
                continue;
            }
            let mut g = self.graph.clone();
            g.set_constant(self.refs[l].value, qw.dequantized.clone())?;
            let e = Engine::new(&g);
            let logits = par_map(ranges.len(), self.opts.threads, |b| {
                let mut st = states[b].clone();
                e.run_nodes(&mut st, node..nodes, None)?;
                Ok(e.finish(st)?.data)
            })?;
            let logits: Vec<f32> = logits.into_iter().flatten().collect();
            out.push(Some(self.score_logits(&logits)?));
        }
        Ok(out)
    }

    /// Top-1 and noise of held-out logits against the labels and the fp32 logits.
    fn score_logits(&self, logits: &[f32]) -> Result<ScoreSqnr, String> {
        let n = self.held.len();
        if logits.len() != self.ref_logits.len() || n == 0 {
            return Err(format!(
                "search: {} logits for {n} held-out images, expected {}",
                logits.len(),
                self.ref_logits.len()
            ));
        }
        let classes = logits.len() / n;
        let correct = logits
            .chunks_exact(classes)
            .zip(&self.held.labels)
            .filter(|(row, &y)| crate::eval::argmax(row) == y as usize)
            .count();
        let (mut sig, mut err) = (0f64, 0f64);
        for (&a, &b) in self.ref_logits.iter().zip(logits) {
            sig += a as f64 * a as f64;
            err += (a as f64 - b as f64).powi(2);
        }
        let sqnr = (err > 0.0).then(|| 10.0 * (sig / err).log10());
        Ok((
            Score {
                top1: correct as f64 / n as f64,
                noise: err / n as f64,
            },
            sqnr,
        ))
    }

    fn model(&self, choice: &[usize]) -> QuantizedModel {
        QuantizedModel {
            weights: self
                .refs
                .iter()
                .enumerate()
                .map(|(l, r)| (*r, self.quantized[l][choice[l]].clone()))
                .collect(),
            sqnr_db: None,
            seconds: 0.0,
        }
    }

    fn file_bytes(&self, choice: &[usize]) -> Result<u64, String> {
        Ok(safetensors_bytes(self.graph, &self.model(choice))?.len() as u64)
    }
}

/// `f(0..n)` on up to `threads` threads, results in index order; the first error wins.
fn par_map<T: Send>(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> Result<T, String> + Sync,
) -> Result<Vec<T>, String> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, n.max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || failure.lock().expect("lock").is_some() {
                    return;
                }
                match f(i) {
                    Ok(v) => out.lock().expect("lock")[i] = Some(v),
                    Err(e) => {
                        failure.lock().expect("lock").get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().expect("lock") {
        return Err(e);
    }
    Ok(out
        .into_inner()
        .expect("lock")
        .into_iter()
        .map(|v| v.expect("every index ran"))
        .collect())
}

fn read_cache<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn write_cache<T: Serialize>(path: &Path, v: &T) -> Result<(), String> {
    crate::write_atomic(
        path,
        serde_json::to_string_pretty(v)
            .expect("serializable")
            .as_bytes(),
    )
}

/// Everything the search of one model needs from the runner.
pub struct SearchInput<'a> {
    pub k: &'a Kernels,
    pub exp: &'a Experiment,
    pub model: &'a str,
    pub graph: &'a Graph,
    /// Held-out images (never the evaluated split).
    pub held: &'a Dataset,
    pub norm: &'a Normalization,
    pub opts: EvalOptions,
    /// File sizes of the grid's cells of this model, by tag (for `size_of` budgets).
    pub grid_sizes: &'a [(String, u64)],
    /// `search/` in the run folder: the caches and the tables.
    pub dir: PathBuf,
    pub progress: bool,
}

pub fn search(inp: &SearchInput) -> Result<SearchOutcome, String> {
    let start = std::time::Instant::now();
    let spec = inp
        .exp
        .search
        .as_ref()
        .ok_or("the experiment has no [search]")?;
    let candidates = inp.exp.search_candidates()?;
    let tags: Vec<String> = candidates.iter().map(|c| c.0.clone()).collect();
    let refs = inp.graph.weights();
    if refs.is_empty() {
        return Err(format!(
            "search: model '{}' has no weight layers (Conv, Gemm or MatMul with a constant weight)",
            inp.model
        ));
    }
    let layer_names: Vec<String> = refs
        .iter()
        .map(|r| inp.graph.value_names[r.value].clone())
        .collect();
    let dir = inp.dir.join(crate::sys::file_safe(inp.model));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;

    // every (layer, candidate) quantized once; the configurations reuse them
    let mut quantized = Vec::with_capacity(refs.len());
    for (l, r) in refs.iter().enumerate() {
        let w = inp.graph.constants[r.value]
            .as_ref()
            .expect("weights() returns constants");
        let row = candidates
            .iter()
            .map(|(_, s)| quantize_weight(inp.k, &layer_names[l], w, r.out_axis, s))
            .collect::<Result<Vec<_>, _>>()?;
        quantized.push(row);
    }
    let opts = EvalOptions {
        progress: false,
        ..inp.opts.clone()
    };
    let fp32 = evaluate(&Engine::new(inp.graph), inp.held, inp.norm, &opts, None)?;
    let mut s = Search {
        graph: inp.graph,
        refs: refs.clone(),
        held: inp.held,
        norm: inp.norm,
        opts,
        quantized,
        ref_logits: fp32.logits.clone(),
    };
    let fp32_score = Score {
        top1: fp32.top1,
        noise: 0.0,
    };

    // 1. sensitivity, one cache file per layer
    let total = (refs.len() * tags.len()) as u64;
    let bar = crate::eval::progress_bar(total, &format!("{} sensitivity", inp.model), inp.progress);
    let mut table: Vec<Sensitivity> = Vec::with_capacity(total as usize);
    for l in 0..refs.len() {
        let cache = dir.join(format!("sensitivity-{l:03}.json"));
        let cached: Option<Vec<Sensitivity>> = read_cache(&cache);
        let rows = match cached {
            Some(rows)
                if rows.len() == tags.len()
                    && rows
                        .iter()
                        .zip(&tags)
                        .all(|(r, t)| &r.candidate == t && r.layer_name == layer_names[l]) =>
            {
                rows
            }
            _ => {
                let t = std::time::Instant::now();
                let mut rows = Vec::with_capacity(tags.len());
                let scores = s.layer_scores(l)?;
                for (c, tag) in tags.iter().enumerate() {
                    let qw = &s.quantized[l][c];
                    let (score, out_sqnr) = match scores[c] {
                        Some(x) => x,
                        None => (fp32_score, None),
                    };
                    let w = &inp.graph.constants[refs[l].value]
                        .as_ref()
                        .expect("constant")
                        .data;
                    rows.push(Sensitivity {
                        layer: l,
                        layer_name: layer_names[l].clone(),
                        weights: w.len(),
                        candidate: tag.clone(),
                        bytes: stored_bytes(&qw.stored),
                        weight_sqnr_db: weight_sqnr(w, &qw.dequantized),
                        top1: score.top1,
                        top1_drop: fp32_score.top1 - score.top1,
                        noise: score.noise,
                        output_sqnr_db: out_sqnr,
                    });
                    bar.inc(1);
                }
                write_cache(&cache, &rows)?;
                log(&format!(
                    "search {}: layer {}/{} '{}' ({} candidates) in {:.1} s",
                    inp.model,
                    l + 1,
                    refs.len(),
                    layer_names[l],
                    tags.len(),
                    t.elapsed().as_secs_f64()
                ));
                rows
            }
        };
        table.extend(rows);
    }
    bar.finish_and_clear();
    write_sensitivity_csv(&dir.join("sensitivity.csv"), &table)?;

    let cost: Vec<Vec<f64>> = (0..refs.len())
        .map(|l| {
            (0..tags.len())
                .map(|c| table[l * tags.len() + c].noise)
                .collect()
        })
        .collect();
    let bytes: Vec<Vec<u64>> = (0..refs.len())
        .map(|l| {
            (0..tags.len())
                .map(|c| table[l * tags.len() + c].bytes)
                .collect()
        })
        .collect();
    let n_weights: u64 = table
        .iter()
        .filter(|r| r.candidate == tags[0])
        .map(|r| r.weights as u64)
        .sum();

    // 2 + 3. allocation and refinement per budget
    let mut allocations = Vec::new();
    for (i, b) in spec.budgets.iter().enumerate() {
        let budget = b.resolve(&format!("search.budgets[{i}]"))?;
        let cache = dir.join(format!(
            "allocation-{}.json",
            crate::sys::file_safe(&budget.tag())
        ));
        if let Some(a) = read_cache::<Allocation>(&cache) {
            if a.budget == budget && a.candidates == tags && a.choice.len() == refs.len() {
                allocations.push(a);
                continue;
            }
        }
        let t = std::time::Instant::now();
        let a = allocate_budget(
            &mut s,
            inp,
            &budget,
            &cost,
            &bytes,
            n_weights,
            &tags,
            spec.refine_steps,
            spec.refine_moves,
        )?;
        log(&format!(
            "search {}: budget {}: {} bytes, held-out top-1 {:.2} % (DP {:.2} %), {} moves tried, {} kept, {:.1} s",
            inp.model,
            budget.tag(),
            a.file_bytes,
            a.score.top1 * 100.0,
            a.dp_score.top1 * 100.0,
            a.moves_evaluated,
            a.moves_accepted,
            t.elapsed().as_secs_f64()
        ));
        write_cache(&cache, &a)?;
        allocations.push(a);
    }
    Ok(SearchOutcome {
        model: inp.model.to_string(),
        layers: layer_names,
        candidates: tags,
        table,
        fp32: fp32_score,
        allocations,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn log(msg: &str) {
    eprintln!("{msg}");
}

fn weight_sqnr(w: &[f32], d: &[f32]) -> Option<f64> {
    let (mut sig, mut err) = (0f64, 0f64);
    for (&a, &b) in w.iter().zip(d) {
        sig += a as f64 * a as f64;
        err += (a as f64 - b as f64).powi(2);
    }
    (err > 0.0).then(|| 10.0 * (sig / err).log10())
}

#[allow(clippy::too_many_arguments)]
fn allocate_budget(
    s: &mut Search,
    inp: &SearchInput,
    budget: &Budget,
    cost: &[Vec<f64>],
    bytes: &[Vec<u64>],
    n_weights: u64,
    tags: &[String],
    steps: usize,
    moves: usize,
) -> Result<Allocation, String> {
    let layers = cost.len();
    let free = vec![None; layers];
    let target_file = match budget {
        Budget::SizeOf(tag) => Some(
            inp.grid_sizes
                .iter()
                .find(|(t, _)| t == tag)
                .map(|x| x.1)
                .ok_or_else(|| {
                    format!(
                        "search budget size_of = \"{tag}\": the grid has no result for cell '{}--{tag}'",
                        inp.model
                    )
                })?,
        ),
        Budget::Bytes(n) => Some(*n),
        Budget::BitsPerWeight(_) => None,
    };
    let too_small = |what: String| {
        format!(
            "search budget {}: {what} is too small for model '{}': the smallest candidates of every layer need more",
            budget.tag(),
            inp.model
        )
    };
    // the weight-bytes limit: direct for bits per weight; for a file limit, the file minus its
    // other bytes (header, biases), tightened until the real file fits
    let (cap, mut choice) = match (budget, target_file) {
        (Budget::BitsPerWeight(b), _) => {
            let cap = (b * n_weights as f64 / 8.0).floor() as u64;
            let c = allocate(cost, bytes, cap, &free)
                .ok_or_else(|| too_small(format!("{cap} weight bytes")))?;
            (cap, c)
        }
        (_, Some(target)) => {
            let smallest: Vec<usize> = (0..layers)
                .map(|l| {
                    (0..tags.len())
                        .min_by_key(|&c| (bytes[l][c], c))
                        .unwrap_or(0)
                })
                .collect();
            let weight_bytes = |c: &[usize]| -> u64 { (0..layers).map(|l| bytes[l][c[l]]).sum() };
            let overhead = s
                .file_bytes(&smallest)?
                .saturating_sub(weight_bytes(&smallest));
            let mut cap = target.saturating_sub(overhead);
            let mut found = None;
            for _ in 0..16 {
                let Some(c) = allocate(cost, bytes, cap, &free) else {
                    break;
                };
                let f = s.file_bytes(&c)?;
                if f <= target {
                    found = Some(c);
                    break;
                }
                cap = cap.saturating_sub(f - target);
            }
            let c = found.ok_or_else(|| too_small(format!("a {target}-byte model file")))?;
            (cap, c)
        }
        _ => unreachable!("every budget kind is handled"),
    };
    let fits = |s: &Search, c: &[usize]| -> Result<bool, String> {
        Ok(match target_file {
            Some(t) => s.file_bytes(c)? <= t,
            None => (0..layers).map(|l| bytes[l][c[l]]).sum::<u64>() <= cap,
        })
    };
    // The DP is exact in weight bytes; a file limit also counts the header, which differs a
    // little between configurations. A uniform configuration that fits and scores better on
    // the proxy is taken instead, so the choice is never worse than a uniform one.
    for c in 0..tags.len() {
        let u = vec![c; layers];
        if proxy(cost, &u) < proxy(cost, &choice) && fits(s, &u)? {
            choice = u;
        }
    }
    let dp_choice = choice.clone();
    let dp_proxy = proxy(cost, &choice);
    let (dp_score, _) = s.score(&choice)?;
    let mut score = dp_score;
    let mut fixed: Vec<Option<usize>> = vec![None; layers];
    let (mut evaluated, mut accepted) = (0, 0);
    for _ in 0..steps {
        // moves: give one free layer its next larger candidate, re-solve the others
        let mut tried: Vec<(f64, usize, Vec<usize>)> = Vec::new();
        for l in 0..layers {
            if fixed[l].is_some() {
                continue;
            }
            let cur = choice[l];
            let up = (0..tags.len())
                .filter(|&c| bytes[l][c] > bytes[l][cur] && cost[l][c] < cost[l][cur])
                .min_by(|&a, &b| bytes[l][a].cmp(&bytes[l][b]).then(a.cmp(&b)));
            let Some(up) = up else { continue };
            let mut f = fixed.clone();
            f[l] = Some(up);
            let Some(c) = allocate(cost, bytes, cap, &f) else {
                continue;
            };
            if c == choice || tried.iter().any(|t| t.2 == c) || !fits(s, &c)? {
                continue;
            }
            tried.push((proxy(cost, &c), l, c));
        }
        tried.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        tried.truncate(moves);
        let mut best: Option<(Score, usize, Vec<usize>)> = None;
        for (_, l, c) in tried {
            let (sc, _) = s.score(&c)?;
            evaluated += 1;
            if sc.better_than(best.as_ref().map_or(&score, |b| &b.0)) {
                best = Some((sc, l, c));
            }
        }
        match best {
            Some((sc, l, c)) => {
                fixed[l] = Some(c[l]);
                choice = c;
                score = sc;
                accepted += 1;
            }
            None => break,
        }
    }
    let weight_bytes: u64 = (0..layers).map(|l| bytes[l][choice[l]]).sum();
    let file_bytes = s.file_bytes(&choice)?;
    Ok(Allocation {
        model: inp.model.to_string(),
        budget: budget.clone(),
        target_file_bytes: target_file,
        weight_bytes_limit: cap,
        dp_proxy,
        dp_score,
        dp_choice,
        proxy: proxy(cost, &choice),
        choice,
        score,
        weight_bytes,
        file_bytes,
        bits_per_weight: 8.0 * weight_bytes as f64 / n_weights.max(1) as f64,
        moves_evaluated: evaluated,
        moves_accepted: accepted,
        candidates: tags.to_vec(),
    })
}

fn write_sensitivity_csv(path: &Path, table: &[Sensitivity]) -> Result<(), String> {
    let f = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.3}"));
    let mut s = String::from(
        "layer,layer_name,weights,candidate,bytes,weight_sqnr_db,top1,top1_drop,output_noise,output_sqnr_db\n",
    );
    for r in table {
        s.push_str(&format!(
            "{},{},{},{},{},{},{:.6},{:.6},{:.6e},{}\n",
            r.layer,
            r.layer_name,
            r.weights,
            r.candidate,
            r.bytes,
            f(r.weight_sqnr_db),
            r.top1,
            r.top1_drop,
            r.noise,
            f(r.output_sqnr_db)
        ));
    }
    crate::write_atomic(path, s.as_bytes())
}

/// The search of one model for `meta.json` (and the summary).
pub fn outcome_json(o: &SearchOutcome, held_out_images: usize) -> serde_json::Value {
    let allocations: Vec<serde_json::Value> = o
        .allocations
        .iter()
        .map(|a| {
            serde_json::json!({
                "budget": a.budget.tag(),
                "cell": format!("{}--hybrid-{}", a.model, crate::experiment::slug(&label(&a.budget))),
                "size_of": match &a.budget { Budget::SizeOf(t) => Some(format!("{}--{t}", a.model)), _ => None },
                "target_file_bytes": a.target_file_bytes,
                "weight_bytes_limit": a.weight_bytes_limit,
                "file_bytes": a.file_bytes,
                "weight_bytes": a.weight_bytes,
                "bits_per_weight": a.bits_per_weight,
                "dp_heldout_top1": a.dp_score.top1,
                "heldout_top1": a.score.top1,
                "dp_proxy_noise": a.dp_proxy,
                "proxy_noise": a.proxy,
                "heldout_noise": a.score.noise,
                "moves_evaluated": a.moves_evaluated,
                "moves_accepted": a.moves_accepted,
                "choice": a.choice.iter().map(|&c| a.candidates[c].clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "held_out_images": held_out_images,
        "fp32_heldout_top1": o.fp32.top1,
        "layers": o.layers,
        "candidates": o.candidates,
        "seconds": o.seconds,
        "allocations": allocations,
    })
}

/// The label of the mixed configuration chosen for `budget` (its cell id is
/// `<model>--hybrid-<slug of the label>`).
pub fn label(budget: &Budget) -> String {
    format!("mixed {}", budget.tag())
}

/// An allocation as a hybrid cell: the most common candidate is the default, the others are
/// overrides selecting layers by index.
pub fn cell(a: &Allocation, schemes: &[WeightScheme]) -> Cell {
    let (default, overrides) = rules(a, schemes);
    let label = label(&a.budget);
    Cell {
        id: format!("{}--hybrid-{}", a.model, crate::experiment::slug(&label)),
        model: a.model.clone(),
        method: MethodKind::Hybrid,
        label,
        weights: schemes[default].clone(),
        overrides: overrides
            .into_iter()
            .map(|(c, ls)| {
                (
                    ls.iter().map(|l| l.to_string()).collect(),
                    schemes[c].clone(),
                )
            })
            .collect(),
        act: crate::experiment::ActScheme {
            bits: None,
            calibration: None,
            edges: crate::experiment::ActEdges::All,
        },
        finetune: None,
    }
}

/// (default candidate, [(candidate, layers)]) for an allocation.
fn rules(a: &Allocation, schemes: &[WeightScheme]) -> (usize, Vec<(usize, Vec<usize>)>) {
    let mut counts = vec![0usize; schemes.len()];
    for &c in &a.choice {
        counts[c] += 1;
    }
    let default = (0..schemes.len())
        .max_by(|&x, &y| counts[x].cmp(&counts[y]).then(y.cmp(&x)))
        .unwrap_or(0);
    let mut overrides: Vec<(usize, Vec<usize>)> = Vec::new();
    for (c, &count) in counts.iter().enumerate() {
        if c == default || count == 0 {
            continue;
        }
        let ls: Vec<usize> = (0..a.choice.len()).filter(|&l| a.choice[l] == c).collect();
        overrides.push((c, ls));
    }
    (default, overrides)
}

/// A weight scheme as the keys of a hybrid rule.
fn rule_table(s: &WeightScheme) -> toml::Table {
    let mut t = toml::Table::new();
    let method = match s {
        WeightScheme::Fp32 => MethodKind::Fp32,
        WeightScheme::Linear { .. } => MethodKind::Linear,
        WeightScheme::FixedPoint { .. } => MethodKind::FixedPoint,
        WeightScheme::DynamicFixedPoint { .. } => MethodKind::DynamicFixedPoint,
        WeightScheme::Kmeans { .. } => MethodKind::Kmeans,
    };
    t.insert("method".into(), method.name().into());
    if *s != WeightScheme::Fp32 {
        t.insert("bits".into(), i64::from(s.bits()).into());
    }
    if let Some(g) = s.granularity() {
        if !matches!(s, WeightScheme::FixedPoint { .. }) {
            t.insert(
                "granularity".into(),
                match g {
                    Granularity::PerTensor => "per_tensor",
                    Granularity::PerChannel => "per_channel",
                }
                .into(),
            );
        }
    }
    match s {
        WeightScheme::Linear { symmetric, .. } => {
            t.insert("symmetric".into(), (*symmetric).into());
        }
        WeightScheme::FixedPoint { int_bits, .. } => {
            t.insert("int_bits".into(), i64::from(*int_bits).into());
        }
        _ => {}
    }
    t
}

/// The experiment file that re-runs the chosen configurations: the original file's data,
/// calibration, models, latency and report, its name with `-chosen`, and one hybrid
/// `[[methods]]` entry per allocation (no `[search]`).
pub fn chosen_toml(
    original: &str,
    allocations: &[Allocation],
    schemes: &[WeightScheme],
) -> Result<String, String> {
    let mut doc: toml::Table = toml::from_str(original).map_err(|e| e.to_string())?;
    doc.remove("search");
    let name = doc
        .get("name")
        .and_then(|v| v.as_str())
        .unwrap_or("experiment")
        .to_string();
    doc.insert("name".into(), format!("{name}-chosen").into());
    let mut methods = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for a in allocations {
        if !seen.insert(label(&a.budget)) {
            continue; // the same budget for several models: one entry
        }
        let (default, overrides) = rules(a, schemes);
        let mut m = toml::Table::new();
        m.insert("method".into(), "hybrid".into());
        m.insert("label".into(), label(&a.budget).into());
        m.insert("default".into(), rule_table(&schemes[default]).into());
        let ov: Vec<toml::Value> = overrides
            .iter()
            .map(|(c, ls)| {
                let mut t = rule_table(&schemes[*c]);
                let layers: Vec<toml::Value> = ls
                    .iter()
                    .map(|l| toml::Value::from(l.to_string()))
                    .collect();
                t.insert("layers".into(), layers.into());
                t.into()
            })
            .collect();
        if !ov.is_empty() {
            m.insert("overrides".into(), ov.into());
        }
        methods.push(toml::Value::from(m));
    }
    doc.insert("methods".into(), methods.into());
    let body = toml::to_string(&doc).map_err(|e| e.to_string())?;
    Ok(format!(
        "# Written by the [search] of experiment '{name}': the configuration chosen for each budget\n\
         # (layers by index among the weight layers). `cargo xtask run` on this file evaluates them again.\n\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every assignment, for the brute-force check.
    fn brute(cost: &[Vec<f64>], bytes: &[Vec<u64>], cap: u64) -> Option<f64> {
        let l = cost.len();
        let c = cost[0].len();
        let mut best: Option<f64> = None;
        let mut idx = vec![0usize; l];
        loop {
            let b: u64 = (0..l).map(|i| bytes[i][idx[i]]).sum();
            if b <= cap {
                let v: f64 = (0..l).map(|i| cost[i][idx[i]]).sum();
                if best.is_none_or(|x| v < x) {
                    best = Some(v);
                }
            }
            let mut i = 0;
            loop {
                if i == l {
                    return best;
                }
                idx[i] += 1;
                if idx[i] < c {
                    break;
                }
                idx[i] = 0;
                i += 1;
            }
        }
    }

    #[test]
    fn allocate_matches_brute_force() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for case in 0..300 {
            let layers = 1 + (next() % 5) as usize;
            let cands = 1 + (next() % 4) as usize;
            let cost: Vec<Vec<f64>> = (0..layers)
                .map(|_| (0..cands).map(|_| (next() % 100) as f64).collect())
                .collect();
            let bytes: Vec<Vec<u64>> = (0..layers)
                .map(|_| (0..cands).map(|_| 1 + next() % 40).collect())
                .collect();
            let cap = next() % (40 * layers as u64 + 10);
            let want = brute(&cost, &bytes, cap);
            let got = allocate(&cost, &bytes, cap, &vec![None; layers]);
            match (want, got) {
                (None, None) => {}
                (Some(w), Some(c)) => {
                    let used: u64 = (0..layers).map(|l| bytes[l][c[l]]).sum();
                    assert!(used <= cap, "case {case}: {used} > {cap}");
                    assert_eq!(proxy(&cost, &c), w, "case {case}");
                }
                (w, g) => panic!("case {case}: brute {w:?}, dp {g:?}"),
            }
        }
    }

    #[test]
    fn allocate_respects_fixed_layers() {
        let cost = vec![vec![10.0, 1.0], vec![10.0, 1.0]];
        let bytes = vec![vec![1, 5], vec![1, 5]];
        // 6 bytes: only one layer can take its large candidate; the DP picks layer 0 (ties
        // go to the lower index in the backtrack), fixing layer 0 small moves it to layer 1
        let c = allocate(&cost, &bytes, 6, &[None, None]).unwrap();
        assert_eq!(proxy(&cost, &c), 11.0);
        let c = allocate(&cost, &bytes, 6, &[Some(0), None]).unwrap();
        assert_eq!(c, vec![0, 1]);
        assert_eq!(allocate(&cost, &bytes, 1, &[None, None]), None);
        assert_eq!(allocate(&cost, &bytes, 10, &[None, None]), Some(vec![1, 1]));
    }

    #[test]
    fn chosen_toml_round_trips_through_the_experiment_parser() {
        let schemes = vec![
            WeightScheme::Kmeans {
                bits: 3,
                granularity: Granularity::PerTensor,
                mode: crate::experiment::KMeansMode::Exact,
            },
            WeightScheme::Linear {
                bits: 8,
                granularity: Granularity::PerChannel,
                symmetric: true,
            },
            WeightScheme::FixedPoint {
                bits: 6,
                int_bits: 1,
            },
            WeightScheme::Fp32,
        ];
        let a = Allocation {
            model: "m".into(),
            budget: Budget::BitsPerWeight(3.5),
            target_file_bytes: None,
            weight_bytes_limit: 0,
            dp_choice: vec![],
            dp_proxy: 0.0,
            dp_score: Score {
                top1: 0.0,
                noise: 0.0,
            },
            choice: vec![1, 0, 0, 2, 0, 3],
            proxy: 0.0,
            score: Score {
                top1: 0.0,
                noise: 0.0,
            },
            weight_bytes: 0,
            file_bytes: 0,
            bits_per_weight: 0.0,
            moves_evaluated: 0,
            moves_accepted: 0,
            candidates: vec![],
        };
        let original = "name = \"x\"\n[data]\ndataset = \"cifar10\"\n[[models]]\nname = \"m\"\npath = \"/nonexistent.onnx\"\n[[methods]]\nmethod = \"kmeans\"\nbits = 2\n[search]\ncandidates = []\nbudgets = []\n";
        let text = chosen_toml(original, std::slice::from_ref(&a), &schemes).unwrap();
        let doc: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(doc["name"].as_str(), Some("x-chosen"));
        assert!(doc.get("search").is_none());
        // parse the methods as the experiment parser does and expand the cell
        let exp: Experiment = toml::from_str(&text).unwrap();
        let spec = &exp.methods[0];
        assert_eq!(spec.method, MethodKind::Hybrid);
        let want = cell(&a, &schemes);
        assert_eq!(spec.label.as_deref(), Some(want.label.as_str()));
        let d = spec.default.as_ref().unwrap();
        assert_eq!((d.method, d.bits), (MethodKind::Kmeans, Some(3)));
        let layers: Vec<Vec<String>> = spec.overrides.iter().map(|o| o.layers.clone()).collect();
        assert_eq!(layers, vec![vec!["0"], vec!["3"], vec!["5"]]);
        assert_eq!(spec.overrides[1].int_bits, Some(1));
        assert_eq!(want.overrides.len(), 3);
    }
}
