//! Activation calibration and fake-quant at activation edges.
//!
//! Calibration runs the (weight-quantized) graph on the calibration images in two passes: the
//! first records every edge's min and max, the second a 2048-bin histogram over that range.
//! The range of each edge is then chosen by the method: `minmax` (the observed range),
//! `percentile` (quantiles read off the histogram) or `mse` (the clipping range that minimises
//! the expected squared error of the quantized histogram, searched over the bins).

use std::sync::Mutex;

use quantbench_kernels::{Kernels, LinearScheme, QuantParams};

use crate::data::{Dataset, Normalization};
use crate::engine::{EdgeHook, Engine};
use crate::eval::EvalOptions;
use crate::experiment::{ActEdges, CalibMethod};
use crate::model::{Graph, Tensor};

const BINS: usize = 2048;

/// The edges whose activations are quantized: the graph input and every node output except
/// the graph output (the logits stay in fp32, as in integer pipelines that dequantize the
/// last layer). With [`ActEdges::Fused`], an edge whose only consumers are Relu nodes stays
/// in fp32 too: an integer pipeline computes the Relu inside the Conv or Add before it.
pub fn quantized_edges(g: &Graph, which: ActEdges) -> Vec<bool> {
    let mut e = vec![false; g.value_names.len()];
    e[g.input] = true;
    for n in &g.nodes {
        e[n.output] = true;
    }
    if which == ActEdges::Fused {
        for n in &g.nodes {
            let mut consumers = g.nodes.iter().filter(|m| m.inputs.contains(&n.output));
            let only_relu = consumers.clone().next().is_some()
                && consumers.all(|m| matches!(m.op, crate::model::Op::Relu));
            if only_relu {
                e[n.output] = false;
            }
        }
    }
    e[g.output] = false;
    e
}

struct RangeHook<'a> {
    edges: &'a [bool],
    k: &'a Kernels,
    ranges: Mutex<Vec<Option<(f32, f32)>>>,
}

impl EdgeHook for RangeHook<'_> {
    fn on_value(&self, value: usize, t: &mut Tensor) {
        if !self.edges[value] {
            return;
        }
        if let Some((lo, hi)) = self.k.min_max(&t.data) {
            let mut r = self.ranges.lock().expect("lock");
            r[value] = Some(r[value].map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))));
        }
    }
}

struct HistHook<'a> {
    ranges: &'a [Option<(f32, f32)>],
    hists: Mutex<Vec<Vec<u64>>>,
}

impl EdgeHook for HistHook<'_> {
    fn on_value(&self, value: usize, t: &mut Tensor) {
        let Some((lo, hi)) = self.ranges[value] else {
            return;
        };
        let width = (hi - lo).max(f32::MIN_POSITIVE);
        let mut local = vec![0u64; BINS];
        for &v in &t.data {
            if v.is_finite() {
                let b = (((v - lo) / width) * BINS as f32) as isize;
                local[b.clamp(0, BINS as isize - 1) as usize] += 1;
            }
        }
        let mut h = self.hists.lock().expect("lock");
        for (a, b) in h[value].iter_mut().zip(&local) {
            *a += b;
        }
    }
}

/// Per-edge activation quantization parameters (`None` for edges left in fp32).
#[derive(Clone, Debug)]
pub struct ActParams {
    pub params: Vec<Option<QuantParams>>,
}

/// What to calibrate for: `bits`-bit activations, ranges chosen by `method`.
#[derive(Clone, Copy, Debug)]
pub struct CalibRequest {
    pub bits: u32,
    pub method: CalibMethod,
    /// For [`CalibMethod::Percentile`].
    pub percentile: f64,
    pub edges: ActEdges,
}

/// Calibrates activation ranges of `graph` on `data` (already truncated to the calibration
/// samples) and returns the parameters of asymmetric unsigned per-tensor quantization for
/// every quantized edge.
pub fn calibrate(
    k: &Kernels,
    graph: &Graph,
    data: &Dataset,
    norm: &Normalization,
    opts: &EvalOptions,
    req: CalibRequest,
) -> Result<ActParams, String> {
    let CalibRequest {
        bits,
        method,
        percentile,
        edges,
    } = req;
    let edges = quantized_edges(graph, edges);
    let engine = Engine::new(graph);
    let quiet = EvalOptions {
        progress: false,
        ..opts.clone()
    };
    let rh = RangeHook {
        edges: &edges,
        k,
        ranges: Mutex::new(vec![None; edges.len()]),
    };
    crate::eval::evaluate(&engine, data, norm, &quiet, Some(&rh))?;
    let ranges = rh.ranges.into_inner().expect("lock");
    let scheme = LinearScheme::new(bits, false, false).map_err(|e| e.to_string())?;
    let chosen: Vec<Option<(f32, f32)>> = if method == CalibMethod::Minmax {
        ranges.clone()
    } else {
        let hh = HistHook {
            ranges: &ranges,
            hists: Mutex::new(vec![vec![0; BINS]; edges.len()]),
        };
        crate::eval::evaluate(&engine, data, norm, &quiet, Some(&hh))?;
        let hists = hh.hists.into_inner().expect("lock");
        ranges
            .iter()
            .zip(&hists)
            .map(|(r, h)| {
                r.map(|(lo, hi)| match method {
                    CalibMethod::Percentile => percentile_range(h, lo, hi, percentile),
                    _ => mse_range(h, lo, hi, bits),
                })
            })
            .collect()
    };
    let params = chosen
        .iter()
        .map(|r| r.map(|r| scheme.params_from_range(Some(r))).transpose())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    Ok(ActParams { params })
}

fn bin_edge(lo: f32, hi: f32, i: usize) -> f32 {
    lo + (hi - lo) * i as f32 / BINS as f32
}

/// [q_low, q_high] quantiles of the histogram (the range always keeps 0, see
/// `LinearScheme::params_from_range`).
fn percentile_range(h: &[u64], lo: f32, hi: f32, p: f64) -> (f32, f32) {
    let total: u64 = h.iter().sum();
    if total == 0 {
        return (lo, hi);
    }
    let cut = ((1.0 - p / 100.0) * total as f64).floor() as u64;
    let (mut acc, mut a) = (0u64, 0usize);
    while a < BINS && acc + h[a] <= cut {
        acc += h[a];
        a += 1;
    }
    let (mut acc2, mut b) = (0u64, BINS);
    while b > a + 1 && acc2 + h[b - 1] <= cut {
        acc2 += h[b - 1];
        b -= 1;
    }
    (bin_edge(lo, hi, a), bin_edge(lo, hi, b))
}

/// The clipping range [lo, t] (t over the bin edges) whose quantization of the histogram's
/// mass (bin centres) has the least squared error. Activations here are mostly one-sided
/// (after ReLU), so the search moves the upper end; a negative lower end is kept.
fn mse_range(h: &[u64], lo: f32, hi: f32, bits: u32) -> (f32, f32) {
    let levels = ((1u32 << bits) - 1) as f64;
    let centre = |i: usize| (lo as f64) + (hi as f64 - lo as f64) * (i as f64 + 0.5) / BINS as f64;
    let mut best = (f64::INFINITY, hi);
    let lo_c = (lo as f64).min(0.0);
    for t_bin in (BINS / 64..=BINS).step_by(BINS / 256) {
        let t = bin_edge(lo, hi, t_bin) as f64;
        let hi_c = t.max(0.0);
        let scale = ((hi_c - lo_c) / levels).max(f64::MIN_POSITIVE);
        let mut err = 0.0;
        for (i, &c) in h.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let x = centre(i);
            let q = ((x.clamp(lo_c, hi_c) - lo_c) / scale).round() * scale + lo_c;
            err += c as f64 * (x - q) * (x - q);
        }
        if err < best.0 {
            best = (err, t as f32);
        }
    }
    (lo, best.1)
}

/// Fake-quantizes every edge that has parameters.
pub struct FakeQuantHook<'a> {
    pub k: &'a Kernels,
    pub params: &'a ActParams,
}

impl EdgeHook for FakeQuantHook<'_> {
    fn on_value(&self, value: usize, t: &mut Tensor) {
        if let Some(p) = &self.params.params[value] {
            self.k.fake_quantize_in_place(&mut t.data, p);
        }
    }
}
