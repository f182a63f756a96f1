//! Evaluation: top-1 / top-5 of a graph over a data set, batched, one batch per worker thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::data::{Dataset, Normalization};
use crate::engine::int8::Int8Model;
use crate::engine::{EdgeHook, Engine};
use crate::model::{Graph, Tensor};

#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub batch: usize,
    pub threads: usize,
    /// Show a progress bar on stderr (hidden when stderr is not a terminal).
    pub progress: bool,
    pub label: String,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            batch: 64,
            threads: default_threads(),
            progress: true,
            label: "eval".into(),
        }
    }
}

/// Both cores (or as many as the machine reports).
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[derive(Clone, Debug)]
pub struct EvalResult {
    pub images: usize,
    pub top1: f64,
    pub top5: f64,
    pub seconds: f64,
    /// The batch actually used (a model exported with a fixed batch forces it).
    pub batch: usize,
    /// images x classes, in data set order.
    pub logits: Vec<f32>,
    pub classes: usize,
}

impl EvalResult {
    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.seconds
    }

    pub fn predictions(&self) -> Vec<usize> {
        self.logits.chunks_exact(self.classes).map(argmax).collect()
    }
}

pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Checks that the model's declared input fits the data set's images; returns the batch size
/// to use (the model's, when its batch dimension is fixed).
pub fn check_model_fits(graph: &Graph, data: &Dataset, batch: usize) -> Result<usize, String> {
    let shape = &graph.input_shape;
    let name = &graph.value_names[graph.input];
    let [c, h, w] = data.image_shape;
    let fmt = |s: &[Option<usize>]| {
        let d: Vec<String> = s
            .iter()
            .map(|d| d.map_or("?".into(), |v| v.to_string()))
            .collect();
        format!("[{}]", d.join(", "))
    };
    if !shape.is_empty() {
        let ok = shape.len() == 4
            && [c, h, w]
                .iter()
                .zip(&shape[1..])
                .all(|(&want, got)| got.is_none_or(|g| g == want));
        if !ok {
            return Err(format!(
                "model input '{name}' has shape {}, the {} images are [N, {c}, {h}, {w}]",
                fmt(shape),
                data.kind.name()
            ));
        }
        if let Some(b) = shape[0] {
            return Ok(b);
        }
    }
    Ok(batch.max(1))
}

/// Runs the whole data set through the graph and scores it.
/// Something that maps a batch of images to logits: the f32 [`Engine`] (with an optional
/// [`EdgeHook`]) or the integer-only [`Int8Model`] (which takes no hook).
pub trait Forward: Sync {
    fn graph(&self) -> &Graph;
    fn forward(&self, x: Tensor, hook: Option<&dyn EdgeHook>) -> Result<Tensor, String>;
}

impl Forward for Engine<'_> {
    fn graph(&self) -> &Graph {
        Engine::graph(self)
    }
    fn forward(&self, x: Tensor, hook: Option<&dyn EdgeHook>) -> Result<Tensor, String> {
        self.run(x, hook)
    }
}

impl Forward for Int8Model {
    fn graph(&self) -> &Graph {
        Int8Model::graph(self)
    }
    fn forward(&self, x: Tensor, hook: Option<&dyn EdgeHook>) -> Result<Tensor, String> {
        if hook.is_some() {
            return Err(
                "integer_only: the int8 path has no edge hooks (its values are codes)".into(),
            );
        }
        self.run(x)
    }
}

pub fn evaluate(
    engine: &dyn Forward,
    data: &Dataset,
    norm: &Normalization,
    opts: &EvalOptions,
    hook: Option<&dyn EdgeHook>,
) -> Result<EvalResult, String> {
    norm.validate(data.image_shape[0])?;
    let batch = check_model_fits(engine.graph(), data, opts.batch)?;
    let n = data.len();
    let batches = n.div_ceil(batch);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Vec<f32>, usize)>> = Mutex::new(Vec::with_capacity(batches));
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let bar = progress_bar(n as u64, &opts.label, opts.progress);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..opts.threads.max(1).min(batches.max(1)) {
            s.spawn(|| loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches || failure.lock().expect("lock").is_some() {
                    return;
                }
                let range = b * batch..((b + 1) * batch).min(n);
                let len = range.len();
                let x = data.batch(range, norm);
                match engine.forward(x, hook) {
                    Ok(out) => {
                        let classes = out.len() / len.max(1);
                        results.lock().expect("lock").push((b, out.data, classes));
                        bar.inc(len as u64);
                    }
                    Err(e) => {
                        *failure.lock().expect("lock") = Some(e);
                        return;
                    }
                }
            });
        }
    });
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    if let Some(e) = failure.into_inner().expect("lock") {
        return Err(e);
    }
    let mut parts = results.into_inner().expect("lock");
    parts.sort_by_key(|p| p.0);
    let classes = parts.first().map_or(0, |p| p.2);
    if classes < data.classes || parts.iter().any(|p| p.2 != classes) {
        return Err(format!(
            "the model output has {classes} values per image, the {} data set has {} classes",
            data.kind.name(),
            data.classes
        ));
    }
    let logits: Vec<f32> = parts.into_iter().flat_map(|p| p.1).collect();
    if let Some(i) = logits.iter().position(|v| v.is_nan()) {
        return Err(format!(
            "the model produced a NaN logit (image {}); no accuracy is reported for it",
            i / classes
        ));
    }
    let (mut top1, mut top5) = (0usize, 0usize);
    for (row, &label) in logits.chunks_exact(classes).zip(&data.labels) {
        let target = row[label as usize];
        // Rank of the true class: how many classes score strictly higher (ties favour the label
        // only when it comes first, as argmax does).
        let higher = row
            .iter()
            .enumerate()
            .filter(|&(i, &v)| v > target || (v == target && i < label as usize))
            .count();
        top1 += usize::from(higher == 0);
        top5 += usize::from(higher < 5);
    }
    Ok(EvalResult {
        images: n,
        top1: top1 as f64 / n as f64,
        top5: top5 as f64 / n as f64,
        seconds,
        batch,
        logits,
        classes,
    })
}

/// A progress bar on stderr; hidden when not wanted or when stderr is not a terminal.
pub fn progress_bar(len: u64, label: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label.to_string());
    bar
}
