//! Fine-tuning and quantization-aware training (`finetune = { ... }` on a method entry).
//!
//! Every weight layer keeps a float master copy and a treatment chosen by the cell's scheme:
//! - fp32: the master is the weight.
//! - linear, fixed_point, dynamic_fixed_point: fake-quant. The forward pass uses the
//!   quantized-then-dequantized master (parameters re-chosen from the master every step),
//!   and the gradient passes straight through to the master (straight-through estimator).
//! - kmeans: weights tied to their centroids (Deep Compression). The gradient of a centroid
//!   is the sum of the gradients of its weights divided by their count (the mean: the step a
//!   centroid takes is the mean of the steps its weights would take), and the centroids are
//!   what SGD updates. The indices stay fixed, or with `reassign` the layer also keeps float
//!   weights trained with their own gradients (straight-through), and after every epoch but
//!   the last each weight moves to the centroid nearest its float value. The stored form keeps the packed
//!   indices and gets the new codebook.
//!
//! Quantized activations (`act_bits < 32`) are fake-quantized while training, with the
//! parameters calibrated for the post-training cell as the start. The gradient passes where
//! the value before rounding lies inside the clipping range (and, after a Relu, is positive)
//! and is zero outside it (straight-through estimator with clipping). With `learn_scale` the
//! step sizes train too (LSQ, Esser et al. 2020: gradient scale 1/sqrt(elements per image x
//! qmax), zero points fixed), the input's included.
//!
//! Biases (and every other float constant a Conv, Gemm, MatMul or Add reads) train in fp32.
//! BatchNormalization was folded into the convolutions at import: the folded weights train.
//! SGD with momentum and weight decay (weights and centroids, not biases), a cosine or step
//! learning-rate schedule over all steps with an optional linear warm-up, optional clipping
//! of the global gradient norm, mean softmax cross-entropy (optionally mixed with knowledge
//! distillation from the fine-tuned fp32 control, `distill`). CIFAR-10 images get the usual
//! augmentation: a random 32x32 crop of the image padded by 4 black pixels, and a horizontal
//! flip with probability 1/2. Every random choice is seeded by the experiment's seed.

pub mod autograd;

use std::time::Instant;

use quantbench_kernels::{Kernels, QuantParams};
use serde::{Deserialize, Serialize};

use crate::calib::ActParams;
use crate::data::{Dataset, DatasetKind, Normalization};
use crate::experiment::{Granularity, WeightScheme};
use crate::model::{Graph, Op, Tensor, WeightRef};
use crate::quant::{quantize_weight, QuantizedWeight, Stored};

/// `finetune = { epochs, lr, batch_size, samples, momentum, weight_decay }`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSpec {
    pub epochs: usize,
    /// Peak learning rate (cosine decay to 0 over all steps).
    pub lr: f64,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Training images: the first `samples` of the training split (default: all of it).
    pub samples: Option<usize>,
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// Learning-rate schedule: cosine decay to 0 over all steps, or steps of x0.1 after half
    /// and after three quarters of the steps.
    #[serde(default)]
    pub schedule: Schedule,
    /// Epochs over which the learning rate rises linearly from 0 to its schedule (default 0).
    #[serde(default)]
    pub warmup: f64,
    /// Scale each step's gradients of the weights and biases down to this global L2 norm when
    /// they exceed it (k-means centroids get the clipped per-weight gradients).
    pub clip_norm: Option<f64>,
    /// Learn the activation step sizes (LSQ, Esser et al. 2020) when activations are
    /// quantized; otherwise they stay at their calibrated values.
    #[serde(default)]
    pub learn_scale: bool,
    /// k-means: re-assign every weight to its nearest centroid after each epoch but the last. The layer
    /// then also keeps a float copy of its weights, updated with their own gradients
    /// (straight-through), from which the assignment is made; without it the indices stay
    /// fixed and only the centroids train.
    #[serde(default)]
    pub reassign: bool,
    /// Knowledge distillation from the cell's fp32 control after its fine-tuning: the loss
    /// mixes the label cross-entropy with the teacher's softened outputs.
    pub distill: Option<Distill>,
}

/// `distill = { weight, temperature }`: the loss per image is `(1 - weight) x cross-entropy +
/// weight x T^2 x KL(teacher || student)` with both softmaxes at temperature T (Hinton et al.
/// 2015). The teacher is the cell's fp32 control (the pretrained model fine-tuned with the
/// same budget, without distillation), run on the same augmented images.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Distill {
    #[serde(default = "default_one")]
    pub weight: f64,
    #[serde(default = "default_one")]
    pub temperature: f64,
}

fn default_one() -> f64 {
    1.0
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Cosine,
    Step,
}

impl Schedule {
    /// The learning rate at `step` of `total`.
    pub fn lr(self, peak: f64, step: usize, total: usize) -> f64 {
        let f = step as f64 / total.max(1) as f64;
        match self {
            Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * f).cos()),
            Schedule::Step if f < 0.5 => peak,
            Schedule::Step if f < 0.75 => peak * 0.1,
            Schedule::Step => peak * 0.01,
        }
    }
}

fn default_batch() -> usize {
    64
}
fn default_momentum() -> f64 {
    0.9
}
fn default_wd() -> f64 {
    5e-4
}

impl FinetuneSpec {
    pub fn validate(&self, key: &str) -> Result<(), String> {
        if self.epochs == 0 || self.epochs > 1000 {
            return Err(format!(
                "{key}.finetune.epochs = {}: expected 1..=1000",
                self.epochs
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 10.0) {
            return Err(format!(
                "{key}.finetune.lr = {}: expected 0 < lr <= 10",
                self.lr
            ));
        }
        if self.batch_size == 0 {
            return Err(format!("{key}.finetune.batch_size must be >= 1"));
        }
        if self.samples == Some(0) {
            return Err(format!("{key}.finetune.samples must be >= 1"));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(format!(
                "{key}.finetune.momentum = {}: expected 0 <= m < 1",
                self.momentum
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(format!("{key}.finetune.weight_decay must be >= 0"));
        }
        if !(self.warmup.is_finite() && self.warmup >= 0.0 && self.warmup <= self.epochs as f64) {
            return Err(format!(
                "{key}.finetune.warmup = {}: expected 0..=epochs ({})",
                self.warmup, self.epochs
            ));
        }
        if let Some(c) = self.clip_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(format!(
                    "{key}.finetune.clip_norm = {c}: expected a positive number"
                ));
            }
        }
        if let Some(d) = &self.distill {
            if !(d.weight.is_finite() && (0.0..=1.0).contains(&d.weight)) {
                return Err(format!(
                    "{key}.finetune.distill.weight = {}: expected 0..=1",
                    d.weight
                ));
            }
            if !(d.temperature.is_finite() && d.temperature > 0.0 && d.temperature <= 100.0) {
                return Err(format!(
                    "{key}.finetune.distill.temperature = {}: expected 0 < T <= 100",
                    d.temperature
                ));
            }
        }
        Ok(())
    }

    /// The same budget for the fp32 control (no quantized-training options).
    pub fn control(&self) -> FinetuneSpec {
        FinetuneSpec {
            learn_scale: false,
            reassign: false,
            distill: None,
            ..self.clone()
        }
    }

    /// A short stable tag for cell ids.
    pub fn tag(&self) -> String {
        let mut t = format!("ft{}e-lr{}", self.epochs, self.lr);
        if let Some(s) = self.samples {
            t.push_str(&format!("-n{s}"));
        }
        if self.batch_size != default_batch() {
            t.push_str(&format!("-b{}", self.batch_size));
        }
        if self.schedule == Schedule::Step {
            t.push_str("-step");
        }
        if self.warmup > 0.0 {
            t.push_str(&format!("-wu{}", self.warmup));
        }
        if let Some(c) = self.clip_norm {
            t.push_str(&format!("-clip{c}"));
        }
        if self.learn_scale {
            t.push_str("-lsq");
        }
        if self.reassign {
            t.push_str("-ra");
        }
        if let Some(d) = &self.distill {
            t.push_str(&format!("-kd{}t{}", d.weight, d.temperature));
        }
        t
    }
}

/// What one fine-tuning run did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainLog {
    pub epochs: Vec<EpochLog>,
    pub images: usize,
    pub seconds: f64,
    pub images_per_second: f64,
    /// Quantized activation edges: (value name, calibrated scale, scale after training).
    #[serde(default)]
    pub act_scales: Vec<(String, f32, f32)>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochLog {
    pub epoch: usize,
    pub loss: f64,
    pub train_top1: f64,
    pub seconds: f64,
    /// k-means with `reassign`: weights whose centroid changed at the end of the epoch.
    #[serde(default)]
    pub reassigned: Option<usize>,
}

/// The per-layer state of training.
enum Layer {
    /// fp32 or fake-quant (`scheme`): SGD on the master.
    Master {
        scheme: WeightScheme,
        master: Vec<f32>,
        velocity: Vec<f32>,
    },
    /// Tied to centroids: `runs` of (start, end, codebook) with fixed `idx`.
    Tied {
        idx: Vec<u8>,
        runs: Vec<(usize, usize, usize)>,
        /// [codebooks x clusters]
        centroids: Vec<f32>,
        clusters: usize,
        velocity: Vec<f32>,
        template: Box<QuantizedWeight>,
        /// With `reassign`: the float weights (and their momentum) the indices are re-chosen from.
        shadow: Option<(Vec<f32>, Vec<f32>)>,
    },
}

/// SplitMix64: the seeded generator behind shuffles and augmentation.
struct Mix(u64);
impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The result of fine-tuning: the graph with its trained biases and the effective (quantized
/// then dequantized) weights, and every weight layer in its stored form.
pub struct Trained {
    pub graph: Graph,
    pub weights: Vec<(WeightRef, QuantizedWeight)>,
    /// The activation parameters after training (learned or as calibrated).
    pub act: Option<ActParams>,
    pub log: TrainLog,
}

/// Inputs of [`finetune`].
pub struct FinetuneInput<'a> {
    pub k: &'a Kernels,
    pub graph: &'a Graph,
    /// One scheme per entry of `graph.weights()`.
    pub schemes: &'a [WeightScheme],
    pub train: &'a Dataset,
    pub norm: &'a Normalization,
    pub spec: &'a FinetuneSpec,
    /// Quantized activations (fake-quant with these calibrated parameters while training).
    pub act: Option<&'a ActParams>,
    /// The fp32 teacher of `spec.distill`.
    pub teacher: Option<&'a Graph>,
    pub seed: u64,
    pub threads: usize,
    pub progress: bool,
    pub label: &'a str,
}

/// Fine-tunes `graph` with each weight layer treated as its scheme says (see the module doc).
pub fn finetune(inp: &FinetuneInput) -> Result<Trained, String> {
    let g0 = inp.graph;
    autograd::check_graph(g0)?;
    let refs = g0.weights();
    if refs.len() != inp.schemes.len() {
        return Err(format!(
            "finetune: {} schemes for {} weight layers",
            inp.schemes.len(),
            refs.len()
        ));
    }
    let spec = inp.spec;
    if spec.distill.is_some() && inp.teacher.is_none() {
        return Err("finetune: distillation needs a teacher model".into());
    }
    let n = spec.samples.unwrap_or(inp.train.len()).min(inp.train.len());
    if n == 0 {
        return Err("finetune: the training split is empty".into());
    }
    let mut graph = g0.clone();
    // trainable float constants: weights (handled per layer) and biases
    let mut trainable = vec![false; graph.value_names.len()];
    let mut biases: Vec<usize> = Vec::new();
    for node in &graph.nodes {
        let extra: &[usize] = match node.op {
            Op::Conv { .. } | Op::Gemm { .. } => node.inputs.get(2..).unwrap_or(&[]),
            Op::Add => &node.inputs,
            _ => &[],
        };
        for &v in extra {
            if graph.constants[v].is_some()
                && !refs.iter().any(|r| r.value == v)
                && !biases.contains(&v)
            {
                biases.push(v);
            }
        }
    }
    for &v in &biases {
        trainable[v] = true;
    }
    for r in &refs {
        trainable[r.value] = true;
    }
    let mut bias_velocity: Vec<Vec<f32>> = biases
        .iter()
        .map(|&v| vec![0f32; graph.constants[v].as_ref().map_or(0, |t| t.len())])
        .collect();

    let mut layers = Vec::with_capacity(refs.len());
    for (r, scheme) in refs.iter().zip(inp.schemes) {
        let name = graph.value_names[r.value].clone();
        let w = graph.constants[r.value]
            .as_ref()
            .expect("weights are constants");
        layers.push(match scheme {
            WeightScheme::Kmeans { .. } => {
                let qw = quantize_weight(inp.k, &name, w, r.out_axis, scheme)?;
                let Stored::KMeans {
                    codebooks,
                    clusters,
                    ..
                } = &qw.stored
                else {
                    unreachable!("k-means stores a codebook")
                };
                let runs = runs_of(&w.shape, r.out_axis, scheme.granularity());
                let mut idx = vec![0u8; w.len()];
                for &(s, e, c) in &runs {
                    let cb = &codebooks[c * clusters..(c + 1) * clusters];
                    for (slot, &v) in idx[s..e].iter_mut().zip(&qw.dequantized[s..e]) {
                        *slot = cb.iter().position(|&x| x == v).ok_or_else(|| {
                            format!("weight '{name}': decoded value not in its codebook")
                        })? as u8;
                    }
                }
                Layer::Tied {
                    idx,
                    runs,
                    centroids: codebooks.clone(),
                    clusters: *clusters,
                    velocity: vec![0f32; codebooks.len()],
                    template: Box::new(qw),
                    shadow: spec.reassign.then(|| (w.data.clone(), vec![0f32; w.len()])),
                }
            }
            other => Layer::Master {
                scheme: other.clone(),
                master: w.data.clone(),
                velocity: vec![0f32; w.len()],
            },
        });
    }

    // activation step sizes: the calibrated parameters, learned with `learn_scale`
    let mut act: Option<Vec<Option<QuantParams>>> = inp.act.map(|a| a.params.clone());
    if let Some(a) = &act {
        if a.len() != graph.value_names.len() {
            return Err(format!(
                "finetune: activation parameters for {} values, the graph has {}",
                a.len(),
                graph.value_names.len()
            ));
        }
    }
    let mut scale_velocity = vec![0f32; graph.value_names.len()];
    let scale_floor: Vec<f32> = act.as_ref().map_or(vec![], |a| {
        a.iter()
            .map(|p| p.as_ref().map_or(0.0, |p| p.scale() * 1e-3))
            .collect()
    });

    let steps_per_epoch = n.div_ceil(spec.batch_size);
    let total_steps = steps_per_epoch * spec.epochs;
    let bar = crate::eval::progress_bar(total_steps as u64, inp.label, inp.progress);
    let start = Instant::now();
    let mut log = TrainLog {
        epochs: vec![],
        images: n * spec.epochs,
        seconds: 0.0,
        images_per_second: 0.0,
        act_scales: vec![],
    };
    let mut step = 0usize;
    for epoch in 0..spec.epochs {
        let t = Instant::now();
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = Mix(inp.seed ^ (0x5151 + epoch as u64).wrapping_mul(0x9e37_79b9));
        for i in (1..n).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let (mut loss_sum, mut correct) = (0f64, 0usize);
        for batch in order.chunks(spec.batch_size) {
            // effective weights into the graph
            for (r, layer) in refs.iter().zip(&layers) {
                let eff = effective(
                    inp.k,
                    &graph.value_names[r.value],
                    layer,
                    &graph.constants[r.value].as_ref().expect("constant").shape,
                    r.out_axis,
                )?;
                graph.set_constant(r.value, eff)?;
            }
            let images: Vec<(usize, u64)> = batch.iter().map(|&i| (i, rng.next())).collect();
            let (loss, ok, grads) = batch_gradients(
                &graph,
                inp,
                &images,
                &trainable,
                &refs,
                &biases,
                act.as_deref(),
            )?;
            if !loss.is_finite() {
                return Err(format!(
                    "fine-tuning diverged at step {step} of {total_steps} (the loss is {loss}); lower finetune.lr (now {})",
                    spec.lr
                ));
            }
            loss_sum += loss;
            correct += ok;
            let warm = spec.warmup * steps_per_epoch as f64;
            let mut lr = spec.schedule.lr(spec.lr, step, total_steps);
            if (step as f64) < warm {
                lr *= (step + 1) as f64 / warm.ceil();
            }
            let lr = lr as f32;
            let clip = match spec.clip_norm {
                Some(c) => (c / grads.norm().max(c)) as f32,
                None => 1.0,
            };
            let (mom, wd) = (spec.momentum as f32, spec.weight_decay as f32);
            for (layer, gw) in layers.iter_mut().zip(&grads.weights) {
                match layer {
                    Layer::Master {
                        master, velocity, ..
                    } => {
                        for ((w, v), &g) in master.iter_mut().zip(velocity.iter_mut()).zip(gw) {
                            *v = mom * *v + clip * g + wd * *w;
                            *w -= lr * *v;
                        }
                    }
                    Layer::Tied {
                        idx,
                        runs,
                        centroids,
                        clusters,
                        velocity,
                        shadow,
                        ..
                    } => {
                        if let Some((w, v)) = shadow {
                            for ((w, v), &g) in w.iter_mut().zip(v.iter_mut()).zip(gw) {
                                *v = mom * *v + clip * g + wd * *w;
                                *w -= lr * *v;
                            }
                        }
                        for &(s, e, c) in runs.iter() {
                            let (sums, counts) = quantbench_kernels::kmeans::centroid_gradients(
                                &gw[s..e],
                                &idx[s..e],
                                *clusters,
                            )
                            .map_err(|e| e.to_string())?;
                            for j in 0..*clusters {
                                if counts[j] == 0 {
                                    continue;
                                }
                                let at = c * *clusters + j;
                                let g = clip * (sums[j] / counts[j] as f64) as f32;
                                velocity[at] = mom * velocity[at] + g + wd * centroids[at];
                                centroids[at] -= lr * velocity[at];
                            }
                        }
                    }
                }
            }
            // learned step sizes (LSQ): gradient scaled by 1 / sqrt(elements per image x qmax)
            if let (true, Some(params)) = (spec.learn_scale, act.as_mut()) {
                for (v, p) in params.iter_mut().enumerate() {
                    let Some(q) = p.as_mut() else { continue };
                    let per_image = grads.act_elems[v].max(1) as f64;
                    let gs = (grads.dscale[v] / (per_image * q.qmax().max(1) as f64).sqrt()) as f32;
                    scale_velocity[v] = mom * scale_velocity[v] + gs;
                    let s = (q.scale() - lr * scale_velocity[v]).max(scale_floor[v]);
                    *q = QuantParams::new(s, q.zero_point(), q.qmin(), q.qmax()).map_err(|e| {
                        format!(
                            "activation '{}': learned step size {s}: {e}",
                            graph.value_names[v]
                        )
                    })?;
                }
            }
            for ((&v, vel), g) in biases
                .iter()
                .zip(bias_velocity.iter_mut())
                .zip(&grads.biases)
            {
                let b = graph.constants[v].as_mut().expect("constant");
                for ((w, u), &d) in b.data.iter_mut().zip(vel.iter_mut()).zip(g) {
                    *u = mom * *u + clip * d;
                    *w -= lr * *u;
                }
            }
            step += 1;
            bar.inc(1);
        }
        // k-means with `reassign`: every weight to the nearest centroid of its float copy (not
        // after the last epoch, which would leave no steps to adapt to the moves)
        let mut reassigned = None;
        let last = epoch + 1 == spec.epochs;
        for layer in layers.iter_mut().filter(|_| !last) {
            if let Layer::Tied {
                idx,
                runs,
                centroids,
                clusters,
                shadow: Some((w, _)),
                ..
            } = layer
            {
                for &(s, e, c) in runs.iter() {
                    let cb = &centroids[c * *clusters..(c + 1) * *clusters];
                    for (slot, &x) in idx[s..e].iter_mut().zip(&w[s..e]) {
                        let j = nearest(cb, x);
                        if j != *slot {
                            *reassigned.get_or_insert(0) += 1;
                            *slot = j;
                        } else {
                            reassigned.get_or_insert(0);
                        }
                    }
                }
            }
        }
        log.epochs.push(EpochLog {
            epoch: epoch + 1,
            loss: loss_sum / n as f64,
            train_top1: correct as f64 / n as f64,
            seconds: t.elapsed().as_secs_f64(),
            reassigned,
        });
        eprintln!(
            "{}: epoch {}/{}: loss {:.4}, train top-1 {:.2} %, {:.1} s{}",
            inp.label,
            epoch + 1,
            spec.epochs,
            loss_sum / n as f64,
            100.0 * correct as f64 / n as f64,
            t.elapsed().as_secs_f64(),
            reassigned.map_or(String::new(), |r| format!(", {r} weights re-assigned"))
        );
    }
    bar.finish_and_clear();
    log.seconds = start.elapsed().as_secs_f64();
    if let (Some(a0), Some(a1)) = (inp.act, &act) {
        for (v, (p0, p1)) in a0.params.iter().zip(a1).enumerate() {
            if let (Some(p0), Some(p1)) = (p0, p1) {
                log.act_scales
                    .push((graph.value_names[v].clone(), p0.scale(), p1.scale()));
            }
        }
    }
    log.images_per_second = log.images as f64 / log.seconds.max(1e-9);

    // final stored forms and effective weights
    let mut weights = Vec::with_capacity(refs.len());
    for (r, layer) in refs.iter().zip(&layers) {
        let name = graph.value_names[r.value].clone();
        let shape = graph.constants[r.value]
            .as_ref()
            .expect("constant")
            .shape
            .clone();
        let qw = match layer {
            Layer::Master { scheme, master, .. } => {
                let t = Tensor::new(shape, master.clone());
                quantize_weight(inp.k, &name, &t, r.out_axis, scheme)?
            }
            Layer::Tied {
                idx,
                centroids,
                template,
                ..
            } => {
                let mut qw = (**template).clone();
                qw.dequantized = effective(inp.k, &name, layer, &shape, r.out_axis)?;
                if let Stored::KMeans {
                    codebooks,
                    packed,
                    bits,
                    ..
                } = &mut qw.stored
                {
                    codebooks.clone_from(centroids);
                    // the indices change with `reassign`
                    *packed = quantbench_kernels::pack::pack_codes(idx, 0, *bits)
                        .map_err(|e| format!("weight '{name}': {e}"))?;
                }
                qw
            }
        };
        graph.set_constant(r.value, qw.dequantized.clone())?;
        weights.push((*r, qw));
    }
    Ok(Trained {
        graph,
        weights,
        act: act.map(|params| ActParams { params }),
        log,
    })
}

/// The index of the centroid nearest to `x` (the first on a tie).
fn nearest(cb: &[f32], x: f32) -> u8 {
    let mut best = (f32::INFINITY, 0usize);
    for (j, &c) in cb.iter().enumerate() {
        let d = (c - x).abs();
        if d < best.0 {
            best = (d, j);
        }
    }
    best.1 as u8
}

fn runs_of(shape: &[usize], axis: usize, g: Option<Granularity>) -> Vec<(usize, usize, usize)> {
    let n: usize = shape.iter().product();
    match g {
        Some(Granularity::PerChannel) => {
            let outer: usize = shape[..axis].iter().product();
            let ch = shape[axis];
            let inner: usize = shape[axis + 1..].iter().product();
            let mut out = Vec::with_capacity(outer * ch);
            for o in 0..outer {
                for c in 0..ch {
                    let s = (o * ch + c) * inner;
                    out.push((s, s + inner, c));
                }
            }
            out
        }
        _ => vec![(0, n, 0)],
    }
}

/// The weight the forward pass uses.
fn effective(
    k: &Kernels,
    name: &str,
    layer: &Layer,
    shape: &[usize],
    axis: usize,
) -> Result<Vec<f32>, String> {
    Ok(match layer {
        Layer::Master {
            scheme: WeightScheme::Fp32,
            master,
            ..
        } => master.clone(),
        Layer::Master { scheme, master, .. } => {
            let t = Tensor::new(shape.to_vec(), master.clone());
            quantize_weight(k, name, &t, axis, scheme)?.dequantized
        }
        Layer::Tied {
            idx,
            runs,
            centroids,
            clusters,
            ..
        } => {
            let mut out = vec![0f32; idx.len()];
            for &(s, e, c) in runs {
                let cb = &centroids[c * clusters..(c + 1) * clusters];
                for i in s..e {
                    out[i] = cb[idx[i] as usize];
                }
            }
            out
        }
    })
}

/// One thread's share of a batch: summed loss, correct predictions, gradients by value id,
/// step-size gradients by value id, elements per image by value id.
type Part = (f64, usize, Vec<Option<Vec<f32>>>, Vec<f64>, Vec<usize>);

struct BatchGrads {
    /// per weight layer (graph.weights() order)
    weights: Vec<Vec<f32>>,
    /// per trainable bias (the order `finetune` collected them in)
    biases: Vec<Vec<f32>>,
    /// per value id: gradient of the activation step size (learned step size only)
    dscale: Vec<f64>,
    /// per value id: elements of the value per image
    act_elems: Vec<usize>,
}

impl BatchGrads {
    /// The global L2 norm of the gradients.
    fn norm(&self) -> f64 {
        let sq = |v: &Vec<f32>| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
        (self.weights.iter().map(sq).sum::<f64>() + self.biases.iter().map(sq).sum::<f64>()).sqrt()
    }
}

/// One batch: augmented images split across threads; the summed loss, correct predictions
/// and the gradients of the mean loss.
fn batch_gradients(
    graph: &Graph,
    inp: &FinetuneInput,
    images: &[(usize, u64)],
    trainable: &[bool],
    refs: &[WeightRef],
    biases: &[usize],
    act: Option<&[Option<QuantParams>]>,
) -> Result<(f64, usize, BatchGrads), String> {
    let nv = graph.value_names.len();
    let threads = inp.threads.clamp(1, images.len());
    let per = images.len().div_ceil(threads);
    let denominator = images.len();
    let parts: Vec<Result<Part, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = images
            .chunks(per)
            .map(|chunk| {
                s.spawn(move || -> Result<Part, String> {
                    // a model exported with a fixed batch (MNIST-8: 1) runs piece by piece
                    let piece = graph
                        .input_shape
                        .first()
                        .copied()
                        .flatten()
                        .unwrap_or(chunk.len())
                        .max(1);
                    let (mut loss, mut ok) = (0f64, 0usize);
                    let mut acc: Vec<Option<Vec<f32>>> = vec![None; nv];
                    let mut dscale = vec![0f64; nv];
                    let mut elems = vec![0usize; nv];
                    for part in chunk.chunks(piece) {
                        let (x, labels) = make_batch(inp.train, inp.norm, part);
                        // the teacher's logits on the same augmented images
                        let teacher = match (&inp.spec.distill, inp.teacher) {
                            (Some(_), Some(t)) => {
                                autograd::forward(t, x.clone(), None)?.swap_remove(t.output)
                            }
                            _ => None,
                        };
                        let (vals, trace) = match act {
                            Some(params) => {
                                let aq = autograd::ActQuant {
                                    k: inp.k,
                                    params,
                                    learn_scale: inp.spec.learn_scale,
                                };
                                let (v, t) = autograd::forward_quant(graph, x, &aq)?;
                                (v, Some(t))
                            }
                            None => (autograd::forward(graph, x, None)?, None),
                        };
                        let logits = vals[graph.output].as_ref().ok_or("no output")?;
                        let (l, d, c) = match (&inp.spec.distill, &teacher) {
                            (Some(kd), Some(t)) => autograd::distillation_loss(
                                logits,
                                t,
                                &labels,
                                denominator,
                                kd.weight,
                                kd.temperature,
                            )?,
                            _ => autograd::softmax_cross_entropy(logits, &labels, denominator)?,
                        };
                        for (e, v) in elems.iter_mut().zip(&vals) {
                            if let Some(t) = v {
                                *e = t.len() / part.len();
                            }
                        }
                        let (grads, ds) =
                            autograd::backward_quant(graph, &vals, trace.as_ref(), d, trainable)?;
                        dscale.iter_mut().zip(&ds).for_each(|(a, b)| *a += b);
                        loss += l;
                        ok += c;
                        for (a, g) in acc.iter_mut().zip(grads) {
                            match (a.as_mut(), g) {
                                (Some(a), Some(g)) => {
                                    a.iter_mut().zip(&g).for_each(|(x, y)| *x += y)
                                }
                                (None, Some(g)) => *a = Some(g),
                                _ => {}
                            }
                        }
                    }
                    Ok((loss, ok, acc, dscale, elems))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a training thread panicked".into()))
            })
            .collect()
    });
    let (mut loss, mut correct) = (0f64, 0usize);
    let mut weights: Vec<Vec<f32>> = refs
        .iter()
        .map(|r| vec![0f32; graph.constants[r.value].as_ref().map_or(0, |t| t.len())])
        .collect();
    let mut bias_grads: Vec<Vec<f32>> = biases
        .iter()
        .map(|&v| vec![0f32; graph.constants[v].as_ref().map_or(0, |t| t.len())])
        .collect();
    let mut dscale = vec![0f64; nv];
    let mut act_elems = vec![0usize; nv];
    for p in parts {
        let (l, ok, g, ds, el) = p?;
        loss += l;
        correct += ok;
        dscale.iter_mut().zip(&ds).for_each(|(a, b)| *a += b);
        act_elems
            .iter_mut()
            .zip(&el)
            .for_each(|(a, &b)| *a = (*a).max(b));
        for (r, acc) in refs.iter().zip(weights.iter_mut()) {
            if let Some(d) = &g[r.value] {
                acc.iter_mut().zip(d).for_each(|(a, b)| *a += b);
            }
        }
        for (&v, acc) in biases.iter().zip(bias_grads.iter_mut()) {
            if let Some(d) = &g[v] {
                acc.iter_mut().zip(d).for_each(|(a, b)| *a += b);
            }
        }
    }
    Ok((
        loss,
        correct,
        BatchGrads {
            weights,
            biases: bias_grads,
            dscale,
            act_elems,
        },
    ))
}

/// Normalized images (augmented for CIFAR-10: random crop from the 4-pixel zero-padded image,
/// random horizontal flip, both drawn from the image's seed) and their labels.
fn make_batch(d: &Dataset, norm: &Normalization, images: &[(usize, u64)]) -> (Tensor, Vec<u8>) {
    let [c, h, w] = d.image_shape;
    let per = c * h * w;
    let mut data = Vec::with_capacity(images.len() * per);
    let mut labels = Vec::with_capacity(images.len());
    for &(i, seed) in images {
        let src = &d.pixels[i * per..(i + 1) * per];
        let (dy, dx, flip) = if d.kind == DatasetKind::Cifar10 {
            let mut r = Mix(seed);
            (
                r.below(9) as isize - 4,
                r.below(9) as isize - 4,
                r.below(2) == 1,
            )
        } else {
            (0, 0, false)
        };
        for ch in 0..c {
            let mean = norm.mean[if norm.mean.len() == 1 { 0 } else { ch }];
            let inv_std = 1.0 / norm.std[if norm.std.len() == 1 { 0 } else { ch }];
            for y in 0..h {
                for x in 0..w {
                    let sx = if flip { w - 1 - x } else { x } as isize + dx;
                    let sy = y as isize + dy;
                    let p = if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                        0u8
                    } else {
                        src[ch * h * w + sy as usize * w + sx as usize]
                    };
                    data.push((p as f32 * norm.scale - mean) * inv_std);
                }
            }
        }
        labels.push(d.labels[i]);
    }
    (Tensor::new(vec![images.len(), c, h, w], data), labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_start_at_the_peak_and_decay() {
        let c = Schedule::Cosine;
        assert_eq!(c.lr(0.1, 0, 100), 0.1);
        assert!((c.lr(0.1, 50, 100) - 0.05).abs() < 1e-12);
        assert!(c.lr(0.1, 99, 100) < 1e-4);
        let s = Schedule::Step;
        assert_eq!(
            [0, 49, 50, 74, 75, 99].map(|i| s.lr(1.0, i, 100)),
            [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
        );
    }

    #[test]
    fn nearest_centroid_takes_the_first_of_a_tie() {
        let cb = [-1.0, 0.0, 0.0, 2.0];
        assert_eq!(nearest(&cb, -0.6), 0);
        assert_eq!(nearest(&cb, 0.1), 1);
        assert_eq!(nearest(&cb, 1.0), 1);
        assert_eq!(nearest(&cb, 1.2), 3);
    }
}
