//! Experiment files (`experiments/*.toml`): strict parse, defaults, validation, and the pure
//! expansion of the method grid into cells.
//!
//! Unknown keys and wrong types are errors that name the file, line and column (the `toml`
//! crate's spans); semantic problems (a bit width a method cannot take, a model file that does
//! not exist) are errors that name the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::data::{DatasetKind, Normalization, Split};

/// A value or a list of values; lists expand into grid cells.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Names the results folder `results/<name>/`.
    pub name: String,
    /// Seeds every random choice (calibration sample order is the file order; k-means is
    /// deterministic; the seed is recorded and reserved for stochastic methods).
    #[serde(default)]
    pub seed: u64,
    pub data: DataSpec,
    #[serde(default)]
    pub calibration: CalibrationSpec,
    pub models: Vec<ModelSpec>,
    #[serde(default)]
    pub methods: Vec<MethodSpec>,
    #[serde(default)]
    pub latency: LatencySpec,
    #[serde(default)]
    pub report: ReportSpec,
    /// Mixed precision: per-layer sensitivity and bit allocation under size budgets.
    pub search: Option<SearchSpec>,
}

/// `[search]`: quantize one weight layer at a time with each candidate, measure the damage on
/// held-out images, then choose one candidate per layer for each budget (see `mixed.rs`).
/// Weight-only: activations stay fp32.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSpec {
    /// Held-out images for the sensitivity and the refinement: taken from the calibration split
    /// after its first `calibration.samples` images (never from the evaluated split).
    #[serde(default = "default_search_samples")]
    pub samples: usize,
    /// Per-layer candidates, written like `[[methods]]` entries (lists expand).
    pub candidates: Vec<MethodSpec>,
    pub budgets: Vec<BudgetSpec>,
    /// Greedy refinement: rounds of moves verified on the held-out images (0: the DP's choice).
    #[serde(default = "default_refine_steps")]
    pub refine_steps: usize,
    /// Moves evaluated per round (the ones the additive proxy ranks best).
    #[serde(default = "default_refine_moves")]
    pub refine_moves: usize,
}

fn default_search_samples() -> usize {
    2000
}
fn default_refine_steps() -> usize {
    2
}
fn default_refine_moves() -> usize {
    6
}

/// One size budget; exactly one key.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    /// The model file may be at most as large as the file of this grid cell (its tag, e.g.
    /// "km3pt" or "lin4pcs").
    pub size_of: Option<String>,
    /// Codes plus parameters (scales, zero points, codebooks) of the weight layers, in bits per
    /// weight.
    pub bits_per_weight: Option<f64>,
    /// The model file in bytes.
    pub bytes: Option<u64>,
}

/// A budget after validation.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Budget {
    SizeOf(String),
    BitsPerWeight(f64),
    Bytes(u64),
}

impl Budget {
    /// Names the budget in labels and file names.
    pub fn tag(&self) -> String {
        match self {
            Budget::SizeOf(t) => format!("size-of-{t}"),
            Budget::BitsPerWeight(b) => format!("{b}bpw"),
            Budget::Bytes(n) => format!("{n}B"),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    pub dataset: DatasetKind,
    #[serde(default = "default_split")]
    pub split: Split,
    /// Evaluate the first `limit` images only (the shared files are shuffled: class-balanced).
    pub limit: Option<usize>,
    /// Default: the data set's usual preprocessing ([`DatasetKind::default_normalization`]).
    pub normalization: Option<Normalization>,
    #[serde(default = "default_batch")]
    pub batch: usize,
}

fn default_split() -> Split {
    Split::Test
}
fn default_batch() -> usize {
    64
}

/// The id of the fp32 control cell of a cell of `model` fine-tuned with `ft`.
pub fn control_id(model: &str, ft: &crate::train::FinetuneSpec) -> String {
    format!("{model}--fp32-{}", ft.control().tag())
}

/// Which activation edges are quantized (see `MethodSpec::act_edges`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActEdges {
    #[default]
    All,
    Fused,
}

/// How activation ranges are chosen from calibration data.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CalibMethod {
    /// The observed min and max.
    Minmax,
    /// The `percentile` / `100 - percentile` quantiles of the observed values.
    Percentile,
    /// The clipping range that minimises the quantization MSE of the observed values.
    Mse,
}

impl CalibMethod {
    pub fn name(self) -> &'static str {
        match self {
            CalibMethod::Minmax => "minmax",
            CalibMethod::Percentile => "percentile",
            CalibMethod::Mse => "mse",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSpec {
    #[serde(default = "default_calib_split")]
    pub split: Split,
    #[serde(default = "default_samples")]
    pub samples: usize,
    #[serde(default = "default_calib_method")]
    pub method: CalibMethod,
    /// For `percentile`: the upper quantile in percent (the lower one is 100 - this).
    #[serde(default = "default_percentile")]
    pub percentile: f64,
    /// Calibrating on the split that is evaluated is refused unless this is set (it is then
    /// stated in the summary). For data sets without a training split here (MNIST).
    #[serde(default)]
    pub allow_eval_split: bool,
}

fn default_calib_split() -> Split {
    Split::Train
}
fn default_samples() -> usize {
    512
}
fn default_calib_method() -> CalibMethod {
    CalibMethod::Minmax
}
fn default_percentile() -> f64 {
    99.99
}

impl Default for CalibrationSpec {
    fn default() -> Self {
        Self {
            split: default_calib_split(),
            samples: default_samples(),
            method: default_calib_method(),
            percentile: default_percentile(),
            allow_eval_split: false,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    /// An ONNX file: absolute, or relative to the data root (`QUANTBENCH_DATA`).
    pub path: PathBuf,
    /// Expected [channels, height, width] of one input image (checked against the model).
    pub input: Option<[usize; 3]>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    PerTensor,
    PerChannel,
}

impl Granularity {
    pub fn name(self) -> &'static str {
        match self {
            Granularity::PerTensor => "per_tensor",
            Granularity::PerChannel => "per_channel",
        }
    }
    fn short(self) -> &'static str {
        match self {
            Granularity::PerTensor => "pt",
            Granularity::PerChannel => "pc",
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MethodKind {
    Fp32,
    Linear,
    FixedPoint,
    DynamicFixedPoint,
    Kmeans,
    IntegerOnly,
    Hybrid,
}

impl MethodKind {
    pub fn name(self) -> &'static str {
        match self {
            MethodKind::Fp32 => "fp32",
            MethodKind::Linear => "linear",
            MethodKind::FixedPoint => "fixed_point",
            MethodKind::DynamicFixedPoint => "dynamic_fixed_point",
            MethodKind::Kmeans => "kmeans",
            MethodKind::IntegerOnly => "integer_only",
            MethodKind::Hybrid => "hybrid",
        }
    }
}

/// One `[[methods]]` entry. List-valued keys expand into one cell per combination.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodSpec {
    pub method: MethodKind,
    /// Weight bits (linear 1..=8, fixed_point / dynamic_fixed_point 2..=8, kmeans 1..=8).
    pub bits: Option<OneOrMany<u32>>,
    pub granularity: Option<OneOrMany<Granularity>>,
    /// linear: symmetric (zero point 0, scale from max |w|) or asymmetric (min/max).
    pub symmetric: Option<OneOrMany<bool>>,
    /// fixed_point: integer bits m of Qm.n (excluding the sign); n = bits - 1 - m.
    pub int_bits: Option<OneOrMany<i32>>,
    /// Activation bits: 32 keeps activations in fp32 (weight-only); 2..=8 quantizes every
    /// activation edge (asymmetric, per tensor, ranges from calibration).
    pub act_bits: Option<OneOrMany<u32>>,
    /// Overrides `[calibration] method` for this entry (a list compares methods).
    pub calibration: Option<OneOrMany<CalibMethod>>,
    /// Which activation edges `act_bits` quantizes: `all` (every node output but the logits,
    /// and the input; the default) or `fused` (as an integer pipeline that fuses a Relu into
    /// the Conv or Add before it: an edge whose only consumers are Relu nodes stays in fp32).
    pub act_edges: Option<ActEdges>,
    /// kmeans: `exact` (optimal 1-D clustering, default) or `fast` (histogram + DP + Lloyd).
    pub kmeans_mode: Option<KMeansMode>,
    /// hybrid: the rule for every weight layer no override matches.
    pub default: Option<LayerRule>,
    /// hybrid: per-layer rules, first match wins.
    #[serde(default)]
    pub overrides: Vec<LayerOverride>,
    /// hybrid: the row label (default "hybrid").
    pub label: Option<String>,
    /// Fine-tune (quantization-aware training) on the training split after quantizing; adds
    /// the fp32 control row fine-tuned with the same budget.
    pub finetune: Option<crate::train::FinetuneSpec>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KMeansMode {
    Exact,
    Fast,
}

/// One layer's weight treatment (hybrid).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LayerRule {
    pub method: MethodKind,
    pub bits: Option<u32>,
    pub granularity: Option<Granularity>,
    pub symmetric: Option<bool>,
    pub int_bits: Option<i32>,
}

impl BudgetSpec {
    pub fn resolve(&self, key: &str) -> Result<Budget, String> {
        match (&self.size_of, self.bits_per_weight, self.bytes) {
            (Some(t), None, None) => Ok(Budget::SizeOf(t.clone())),
            (None, Some(b), None) if b.is_finite() && b > 0.0 && b <= 32.0 => {
                Ok(Budget::BitsPerWeight(b))
            }
            (None, Some(b), None) => Err(format!(
                "{key}: bits_per_weight = {b}: expected 0 < bits <= 32"
            )),
            (None, None, Some(n)) if n > 0 => Ok(Budget::Bytes(n)),
            (None, None, Some(_)) => Err(format!("{key}: bytes must be >= 1")),
            _ => Err(format!(
                "{key}: give exactly one of size_of, bits_per_weight, bytes"
            )),
        }
    }
}

/// A hybrid override: `layers` selects weight layers by `first`, `last`, their index among the
/// weight layers (`"3"`), or a substring of the node or weight name.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LayerOverride {
    pub layers: Vec<String>,
    pub method: MethodKind,
    pub bits: Option<u32>,
    pub granularity: Option<Granularity>,
    pub symmetric: Option<bool>,
    pub int_bits: Option<i32>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencySpec {
    #[serde(default = "default_batches")]
    pub batch_sizes: Vec<usize>,
    #[serde(default = "default_threads")]
    pub threads: usize,
    #[serde(default = "default_reps")]
    pub repetitions: usize,
}

fn default_batches() -> Vec<usize> {
    vec![1, 64]
}
fn default_threads() -> usize {
    1
}
fn default_reps() -> usize {
    10
}

impl Default for LatencySpec {
    fn default() -> Self {
        Self {
            batch_sizes: default_batches(),
            threads: default_threads(),
            repetitions: default_reps(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSpec {
    /// Write the charts (SVG, and PNG when `png`).
    #[serde(default = "yes")]
    pub charts: bool,
    #[serde(default = "yes")]
    pub png: bool,
}

fn yes() -> bool {
    true
}

impl Default for ReportSpec {
    fn default() -> Self {
        Self {
            charts: true,
            png: true,
        }
    }
}

// ---------------------------------------------------------------- cells

/// The weight treatment of one layer.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum WeightScheme {
    Fp32,
    Linear {
        bits: u32,
        granularity: Granularity,
        symmetric: bool,
    },
    FixedPoint {
        bits: u32,
        int_bits: i32,
    },
    DynamicFixedPoint {
        bits: u32,
        granularity: Granularity,
    },
    Kmeans {
        bits: u32,
        granularity: Granularity,
        mode: KMeansMode,
    },
}

impl WeightScheme {
    pub fn bits(&self) -> u32 {
        match self {
            WeightScheme::Fp32 => 32,
            WeightScheme::Linear { bits, .. }
            | WeightScheme::FixedPoint { bits, .. }
            | WeightScheme::DynamicFixedPoint { bits, .. }
            | WeightScheme::Kmeans { bits, .. } => *bits,
        }
    }

    pub fn granularity(&self) -> Option<Granularity> {
        match self {
            WeightScheme::Linear { granularity, .. }
            | WeightScheme::DynamicFixedPoint { granularity, .. }
            | WeightScheme::Kmeans { granularity, .. } => Some(*granularity),
            WeightScheme::FixedPoint { .. } => Some(Granularity::PerTensor),
            WeightScheme::Fp32 => None,
        }
    }

    fn tag(&self) -> String {
        match self {
            WeightScheme::Fp32 => "fp32".into(),
            WeightScheme::Linear {
                bits,
                granularity,
                symmetric,
            } => {
                format!(
                    "lin{bits}{}{}",
                    granularity.short(),
                    if *symmetric { "s" } else { "a" }
                )
            }
            WeightScheme::FixedPoint { bits, int_bits } => {
                format!("q{int_bits}.{}", *bits as i32 - 1 - int_bits)
            }
            WeightScheme::DynamicFixedPoint { bits, granularity } => {
                format!("dfp{bits}{}", granularity.short())
            }
            WeightScheme::Kmeans {
                bits,
                granularity,
                mode,
            } => format!(
                "km{bits}{}{}",
                granularity.short(),
                if *mode == KMeansMode::Fast { "f" } else { "" }
            ),
        }
    }

    fn validate(&self, key: &str) -> Result<(), String> {
        let ok = match self {
            WeightScheme::Fp32 => true,
            WeightScheme::Linear {
                bits, symmetric, ..
            } => (1..=8).contains(bits) && (!symmetric || *bits >= 2),
            WeightScheme::FixedPoint { bits, int_bits } => {
                (2..=8).contains(bits) && (-16..=16).contains(int_bits)
            }
            WeightScheme::DynamicFixedPoint { bits, .. } => (2..=8).contains(bits),
            WeightScheme::Kmeans { bits, .. } => (1..=8).contains(bits),
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{key}: {self:?} is not valid (linear takes 1..=8 bits, symmetric >= 2; fixed_point and dynamic_fixed_point 2..=8 with int_bits in -16..=16; kmeans 1..=8)"
            ))
        }
    }
}

/// Activation treatment of a cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ActScheme {
    /// `None`: fp32 activations.
    pub bits: Option<u32>,
    pub calibration: Option<CalibMethod>,
    #[serde(default)]
    pub edges: ActEdges,
}

/// One grid cell: a model, a weight treatment (possibly per layer) and an activation treatment.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Cell {
    /// Stable id (file names, resume): `<model>--<method tag>`.
    pub id: String,
    pub model: String,
    pub method: MethodKind,
    /// Display label of the method variant (for charts and the summary).
    pub label: String,
    pub weights: WeightScheme,
    /// hybrid: per-layer overrides (layer selector strings and their scheme).
    pub overrides: Vec<(Vec<String>, WeightScheme)>,
    pub act: ActScheme,
    /// Fine-tuning after quantization (None: none).
    pub finetune: Option<crate::train::FinetuneSpec>,
}

impl Experiment {
    /// Parses and validates an experiment file. `data_root` resolves relative model paths.
    pub fn load(path: &Path, data_root: Option<&Path>) -> Result<(Experiment, String), String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let exp =
            Experiment::parse(&text, data_root).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((exp, text))
    }

    pub fn parse(text: &str, data_root: Option<&Path>) -> Result<Experiment, String> {
        let mut exp: Experiment =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        exp.validate(data_root)?;
        Ok(exp)
    }

    fn validate(&mut self, data_root: Option<&Path>) -> Result<(), String> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "name = '{}': use letters, digits, '-', '_' or '.'",
                self.name
            ));
        }
        if self.models.is_empty() {
            return Err("[[models]]: at least one model is required".into());
        }
        if self.data.batch == 0 {
            return Err("data.batch must be >= 1".into());
        }
        if self.data.limit == Some(0) {
            return Err("data.limit must be >= 1".into());
        }
        if self.calibration.samples == 0 {
            return Err("calibration.samples must be >= 1".into());
        }
        if !(50.0..100.0).contains(&self.calibration.percentile) {
            return Err(format!(
                "calibration.percentile = {}: expected 50 <= p < 100",
                self.calibration.percentile
            ));
        }
        if self.latency.batch_sizes.contains(&0)
            || self.latency.repetitions == 0
            || self.latency.threads == 0
        {
            return Err("latency: batch_sizes, threads and repetitions must be >= 1".into());
        }
        let quantizes_activations = self.methods.iter().any(|m| {
            m.act_bits
                .as_ref()
                .is_some_and(|a| a.to_vec().iter().any(|&b| b != 32))
        });
        if quantizes_activations
            && self.calibration.split == self.data.split
            && !self.calibration.allow_eval_split
        {
            return Err(format!(
                "calibration.split = {:?} is the evaluated split: calibrating on test images inflates the results. \
                 Use the training split, or set calibration.allow_eval_split = true to accept it (the summary says so)",
                self.data.split
            )
            .to_lowercase());
        }
        let mut names = std::collections::HashSet::new();
        for (i, m) in self.models.iter_mut().enumerate() {
            if !names.insert(m.name.clone()) {
                return Err(format!("models[{i}]: duplicate name '{}'", m.name));
            }
            if m.path.is_relative() {
                let root = data_root.ok_or_else(|| {
                    format!("models[{i}].path '{}' is relative but no data root is set (QUANTBENCH_DATA)", m.path.display())
                })?;
                m.path = root.join(&m.path);
            }
            if !m.path.is_file() {
                return Err(format!(
                    "models[{i}].path: {} does not exist",
                    m.path.display()
                ));
            }
        }
        let cells = self.cells()?;
        if let Some(search) = &self.search {
            self.validate_search(search, &cells)?;
        }
        Ok(())
    }

    fn validate_search(&self, search: &SearchSpec, cells: &[Cell]) -> Result<(), String> {
        if search.samples == 0 {
            return Err("search.samples must be >= 1".into());
        }
        if search.candidates.is_empty() {
            return Err("search.candidates: at least one candidate is required".into());
        }
        if search.budgets.is_empty() {
            return Err("search.budgets: at least one budget is required".into());
        }
        if self.calibration.split == self.data.split {
            return Err(format!(
                "search: the held-out images come from calibration.split = {:?}, which is the evaluated split; \
                 choosing layers on test images would inflate the results",
                self.data.split
            )
            .to_lowercase());
        }
        let n = self.search_candidates()?.len();
        if n > 255 {
            return Err(format!(
                "search.candidates: {n} candidates after expansion; at most 255"
            ));
        }
        for (i, b) in search.budgets.iter().enumerate() {
            let key = format!("search.budgets[{i}]");
            let budget = b.resolve(&key)?;
            if let Budget::SizeOf(tag) = &budget {
                for m in &self.models {
                    let id = format!("{}--{tag}", m.name);
                    let cell = cells.iter().find(|c| c.id == id).ok_or_else(|| {
                        format!(
                            "{key}: size_of = \"{tag}\" names no cell of the grid (expected the tag of a [[methods]] cell, e.g. \"km3pt\")"
                        )
                    })?;
                    if cell.act.bits.is_some() || cell.method == MethodKind::IntegerOnly {
                        return Err(format!(
                            "{key}: size_of = \"{tag}\" must name a weight-only cell (the search keeps activations in fp32)"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The search's per-layer candidates: `(tag, scheme)`, in file order, without repeats.
    pub fn search_candidates(&self) -> Result<Vec<(String, WeightScheme)>, String> {
        let Some(search) = &self.search else {
            return Ok(vec![]);
        };
        let mut out: Vec<(String, WeightScheme)> = Vec::new();
        for (i, spec) in search.candidates.iter().enumerate() {
            let key = format!("search.candidates[{i}] ({})", spec.method.name());
            if matches!(spec.method, MethodKind::IntegerOnly | MethodKind::Hybrid) {
                return Err(format!(
                    "{key}: a per-layer candidate is fp32, linear, fixed_point, dynamic_fixed_point or kmeans"
                ));
            }
            for (what, present) in [
                ("act_bits", spec.act_bits.is_some()),
                ("calibration", spec.calibration.is_some()),
                ("act_edges", spec.act_edges.is_some()),
                ("kmeans_mode", spec.kmeans_mode.is_some()),
                ("finetune", spec.finetune.is_some()),
            ] {
                if present {
                    return Err(format!(
                        "{key}: '{what}' does not apply to a search candidate (weights only, exact k-means)"
                    ));
                }
            }
            for cell in self.expand(spec, &key, "m")? {
                let tag = cell.id.trim_start_matches("m--").to_string();
                if !out.iter().any(|(t, _)| *t == tag) {
                    out.push((tag, cell.weights));
                }
            }
        }
        Ok(out)
    }

    /// The grid: an fp32 baseline per model, then every method entry's combinations.
    pub fn cells(&self) -> Result<Vec<Cell>, String> {
        let mut out = Vec::new();
        for model in &self.models {
            out.push(Cell {
                id: format!("{}--fp32", model.name),
                model: model.name.clone(),
                method: MethodKind::Fp32,
                label: "fp32".into(),
                weights: WeightScheme::Fp32,
                overrides: vec![],
                act: ActScheme {
                    bits: None,
                    calibration: None,
                    edges: ActEdges::All,
                },
                finetune: None,
            });
            for (i, spec) in self.methods.iter().enumerate() {
                let key = format!("methods[{i}] ({})", spec.method.name());
                if let Some(ft) = &spec.finetune {
                    // the control: fp32 fine-tuned with the same budget (the options of
                    // quantized training do not apply to it)
                    let id = control_id(&model.name, ft);
                    let ft = ft.control();
                    if !out.iter().any(|c: &Cell| c.id == id) {
                        out.push(Cell {
                            id,
                            model: model.name.clone(),
                            method: MethodKind::Fp32,
                            label: "fp32 fine-tuned".into(),
                            weights: WeightScheme::Fp32,
                            overrides: vec![],
                            act: ActScheme {
                                bits: None,
                                calibration: None,
                                edges: ActEdges::All,
                            },
                            finetune: Some(ft),
                        });
                    }
                }
                for cell in self.expand(spec, &key, &model.name)? {
                    if out.iter().any(|c: &Cell| c.id == cell.id) {
                        continue; // the same cell from two entries runs once
                    }
                    out.push(cell);
                }
            }
        }
        Ok(out)
    }

    fn expand(&self, spec: &MethodSpec, key: &str, model: &str) -> Result<Vec<Cell>, String> {
        let need_bits = || {
            spec.bits
                .as_ref()
                .map(|b| b.to_vec())
                .ok_or_else(|| format!("{key}: 'bits' is required"))
        };
        let grans = spec
            .granularity
            .as_ref()
            .map_or(vec![Granularity::PerChannel], |g| g.to_vec());
        let mut acts: Vec<Option<u32>> = spec
            .act_bits
            .as_ref()
            .map_or(vec![32], |a| a.to_vec())
            .into_iter()
            .map(|b| match b {
                32 => Ok(None),
                2..=8 => Ok(Some(b)),
                _ => Err(format!(
                    "{key}: act_bits = {b}: expected 2..=8, or 32 for fp32 activations"
                )),
            })
            .collect::<Result<_, _>>()?;
        let calibs = spec
            .calibration
            .as_ref()
            .map_or(vec![self.calibration.method], |c| c.to_vec());
        let edges = spec.act_edges.unwrap_or_default();
        if spec.act_edges.is_some() && !acts.iter().any(|a| a.is_some()) {
            return Err(format!(
                "{key}: 'act_edges' applies to quantized activations; set act_bits < 32"
            ));
        }
        if spec.method == MethodKind::IntegerOnly && spec.act_edges.is_some() {
            return Err(format!(
                "{key}: 'act_edges' does not apply to integer_only (it quantizes what its int8 layers produce)"
            ));
        }
        let reject = |what: &str, present: bool| -> Result<(), String> {
            if present {
                Err(format!(
                    "{key}: '{what}' does not apply to method {}",
                    spec.method.name()
                ))
            } else {
                Ok(())
            }
        };
        let mut schemes: Vec<WeightScheme> = Vec::new();
        let mut overrides = Vec::new();
        let mut label = spec.method.name().to_string();
        match spec.method {
            MethodKind::Fp32 => {
                for (w, p) in [
                    ("bits", spec.bits.is_some()),
                    ("granularity", spec.granularity.is_some()),
                ] {
                    reject(w, p)?;
                }
                schemes.push(WeightScheme::Fp32);
            }
            MethodKind::Linear => {
                reject("int_bits", spec.int_bits.is_some())?;
                let syms = spec.symmetric.as_ref().map_or(vec![true], |s| s.to_vec());
                for b in need_bits()? {
                    for &g in &grans {
                        for &s in &syms {
                            schemes.push(WeightScheme::Linear {
                                bits: b,
                                granularity: g,
                                symmetric: s,
                            });
                        }
                    }
                }
            }
            MethodKind::FixedPoint => {
                reject("symmetric", spec.symmetric.is_some())?;
                reject("granularity", spec.granularity.is_some())?;
                let ints = spec
                    .int_bits
                    .as_ref()
                    .map(|v| v.to_vec())
                    .ok_or_else(|| format!("{key}: 'int_bits' is required (Qm.n: m)"))?;
                for b in need_bits()? {
                    for &m in &ints {
                        schemes.push(WeightScheme::FixedPoint {
                            bits: b,
                            int_bits: m,
                        });
                    }
                }
            }
            MethodKind::DynamicFixedPoint => {
                reject("symmetric", spec.symmetric.is_some())?;
                reject("int_bits", spec.int_bits.is_some())?;
                for b in need_bits()? {
                    for &g in &grans {
                        schemes.push(WeightScheme::DynamicFixedPoint {
                            bits: b,
                            granularity: g,
                        });
                    }
                }
            }
            MethodKind::Kmeans => {
                reject("symmetric", spec.symmetric.is_some())?;
                reject("int_bits", spec.int_bits.is_some())?;
                let mode = spec.kmeans_mode.unwrap_or(KMeansMode::Exact);
                for b in need_bits()? {
                    for &g in &grans {
                        schemes.push(WeightScheme::Kmeans {
                            bits: b,
                            granularity: g,
                            mode,
                        });
                    }
                }
            }
            MethodKind::IntegerOnly => {
                // the real int8 path: u8 activations, i8 per-channel symmetric weights
                reject("int_bits", spec.int_bits.is_some())?;
                if let Some(b) = spec.bits.as_ref().map(|b| b.to_vec()) {
                    if b != [8] {
                        return Err(format!(
                            "{key}: integer_only runs 8-bit weights; bits = {b:?}"
                        ));
                    }
                }
                if spec
                    .symmetric
                    .as_ref()
                    .is_some_and(|s| s.to_vec().contains(&false))
                {
                    return Err(format!(
                        "{key}: integer_only weights are symmetric (zero point 0)"
                    ));
                }
                if grans != [Granularity::PerChannel] {
                    return Err(format!(
                        "{key}: integer_only weights are quantized per channel; granularity must be \"per_channel\""
                    ));
                }
                match spec.act_bits.as_ref().map(|a| a.to_vec()) {
                    None => acts = vec![Some(8)],
                    Some(a) if a == [8] => {}
                    Some(a) => {
                        return Err(format!(
                            "{key}: integer_only runs 8-bit activations; act_bits = {a:?}"
                        ))
                    }
                }
                schemes.push(WeightScheme::Linear {
                    bits: 8,
                    granularity: Granularity::PerChannel,
                    symmetric: true,
                });
            }
            MethodKind::Hybrid => {
                let d = spec.default.as_ref().ok_or_else(|| {
                    format!("{key}: 'default' (the rule for other layers) is required")
                })?;
                schemes.push(rule_scheme(
                    d.method,
                    d.bits,
                    d.granularity,
                    d.symmetric,
                    d.int_bits,
                    &format!("{key}.default"),
                )?);
                for (j, o) in spec.overrides.iter().enumerate() {
                    let k = format!("{key}.overrides[{j}]");
                    if o.layers.is_empty() {
                        return Err(format!("{k}: 'layers' is empty"));
                    }
                    overrides.push((
                        o.layers.clone(),
                        rule_scheme(o.method, o.bits, o.granularity, o.symmetric, o.int_bits, &k)?,
                    ));
                }
                label = spec.label.clone().unwrap_or_else(|| "hybrid".into());
            }
        }
        if spec.method != MethodKind::Hybrid
            && (spec.default.is_some() || !spec.overrides.is_empty() || spec.label.is_some())
        {
            return Err(format!(
                "{key}: 'default', 'overrides' and 'label' apply to method hybrid only"
            ));
        }
        if let Some(ft) = &spec.finetune {
            ft.validate(key)?;
            if spec.method == MethodKind::IntegerOnly {
                return Err(format!(
                    "{key}: finetune does not apply to integer_only (fine-tune a linear cell instead)"
                ));
            }
            if ft.learn_scale && !acts.iter().any(|a| a.is_some()) {
                return Err(format!(
                    "{key}: finetune.learn_scale learns activation step sizes; it needs act_bits < 32"
                ));
            }
            if ft.reassign && spec.method != MethodKind::Kmeans {
                return Err(format!(
                    "{key}: finetune.reassign re-assigns k-means indices; it applies to method kmeans only"
                ));
            }
            if self.data.split == crate::data::Split::Train {
                return Err(format!(
                    "{key}: finetune trains on the training split, which is the evaluated split here"
                ));
            }
        }
        if spec.method != MethodKind::Kmeans && spec.kmeans_mode.is_some() {
            return Err(format!(
                "{key}: 'kmeans_mode' applies to method kmeans only"
            ));
        }
        let mut cells = Vec::new();
        for w in &schemes {
            w.validate(key)?;
            for &a in &acts {
                let calib_list: Vec<Option<CalibMethod>> = if a.is_some() {
                    calibs.iter().map(|&c| Some(c)).collect()
                } else {
                    vec![None]
                };
                for c in calib_list {
                    let mut tag = match spec.method {
                        MethodKind::Hybrid => format!("hybrid-{}", slug(&label)),
                        MethodKind::IntegerOnly => format!("int8-{}", w.tag()),
                        _ => w.tag(),
                    };
                    if let Some(b) = a {
                        tag.push_str(&format!("-a{b}{}", c.map_or("", |c| c.name())));
                        if edges == ActEdges::Fused {
                            tag.push_str("-fused");
                        }
                    }
                    if let Some(ft) = &spec.finetune {
                        tag.push_str(&format!("-{}", ft.tag()));
                    }
                    cells.push(Cell {
                        id: format!("{model}--{tag}"),
                        model: model.to_string(),
                        method: spec.method,
                        label: label.clone(),
                        weights: w.clone(),
                        overrides: overrides.clone(),
                        act: ActScheme {
                            bits: a,
                            calibration: c,
                            edges: if a.is_some() { edges } else { ActEdges::All },
                        },
                        finetune: spec.finetune.clone(),
                    });
                }
            }
        }
        Ok(cells)
    }
}

fn rule_scheme(
    method: MethodKind,
    bits: Option<u32>,
    granularity: Option<Granularity>,
    symmetric: Option<bool>,
    int_bits: Option<i32>,
    key: &str,
) -> Result<WeightScheme, String> {
    let bits_req = || bits.ok_or_else(|| format!("{key}: 'bits' is required"));
    let g = granularity.unwrap_or(Granularity::PerChannel);
    let s = match method {
        MethodKind::Fp32 => WeightScheme::Fp32,
        MethodKind::Linear => WeightScheme::Linear {
            bits: bits_req()?,
            granularity: g,
            symmetric: symmetric.unwrap_or(true),
        },
        MethodKind::FixedPoint => WeightScheme::FixedPoint {
            bits: bits_req()?,
            int_bits: int_bits.ok_or_else(|| format!("{key}: 'int_bits' is required"))?,
        },
        MethodKind::DynamicFixedPoint => WeightScheme::DynamicFixedPoint {
            bits: bits_req()?,
            granularity: g,
        },
        MethodKind::Kmeans => WeightScheme::Kmeans {
            bits: bits_req()?,
            granularity: g,
            mode: KMeansMode::Exact,
        },
        other => {
            return Err(format!(
                "{key}: method {} cannot be a per-layer rule",
                other.name()
            ))
        }
    };
    s.validate(key)?;
    Ok(s)
}

/// Lower-case letters and digits, every other run of characters one '-'.
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}
