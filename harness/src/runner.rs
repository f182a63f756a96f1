//! Runs an experiment: every cell of the grid on the evaluation data, one result row per cell,
//! then the report. A cell's row is written to `cells/<id>.json` (atomically) as soon as it is
//! done; re-running into the same folder skips those cells.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use quantbench_kernels::Kernels;
use serde::{Deserialize, Serialize};

use crate::calib::{calibrate, ActParams, CalibRequest, FakeQuantHook};
use crate::data::{Dataset, Normalization};
use crate::engine::Engine;
use crate::eval::{check_model_fits, evaluate, EvalOptions};
use crate::experiment::{CalibMethod, Cell, Experiment, MethodKind, WeightScheme};
use crate::model::{Graph, Tensor};
use crate::quant::{quantize_model, simulated_graph, write_safetensors, QuantizedModel};

/// Calibrated activation parameters are shared by the cells of a model with the same bits,
/// method and edges.
type CalibKey = (String, u32, CalibMethod, crate::experiment::ActEdges);

/// One tidy result record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub model: String,
    pub cell: String,
    pub method: String,
    pub label: String,
    /// Bits per weight averaged over the weight layers (codes only, without parameters).
    pub weight_bits: f64,
    /// 32 for fp32 activations.
    pub act_bits: u32,
    pub granularity: String,
    pub symmetric: Option<bool>,
    pub calibration: String,
    pub top1: f64,
    /// integer_only: top-1 of the fake-quant simulation of the same scheme.
    #[serde(default)]
    pub sim_top1: Option<f64>,
    pub top1_delta: f64,
    pub top5: f64,
    pub size_bytes: u64,
    pub compression: f64,
    pub weight_sqnr_db: Option<f64>,
    pub latency_ms_b1: Option<f64>,
    pub latency_ms_bn: Option<f64>,
    pub latency_batch_n: usize,
    pub quantize_s: f64,
    pub eval_s: f64,
    pub images: usize,
    pub isa: String,
    /// Fine-tuned cells: top-1 of the same cell before fine-tuning.
    #[serde(default)]
    pub top1_before: Option<f64>,
    /// Fine-tuned cells: training throughput (images per second, all threads).
    #[serde(default)]
    pub train_images_per_s: Option<f64>,
    /// Fine-tuned cells: the id of their fp32 control cell.
    #[serde(default)]
    pub control: Option<String>,
}

/// Latency of one executable path at one batch size.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LatencyRecord {
    pub model: String,
    pub method: String,
    pub batch: usize,
    pub threads: usize,
    pub ms_per_batch: f64,
    pub ms_per_image: f64,
}

#[derive(Serialize, Deserialize)]
struct CellRecord {
    row: Row,
    latency: Vec<LatencyRecord>,
    /// Fine-tuned cells: the training log.
    #[serde(default)]
    train: Option<crate::train::TrainLog>,
}

pub struct RunOptions {
    pub data_root: PathBuf,
    /// `results/` of the project.
    pub results_root: PathBuf,
    /// Resume into (or write to) this folder instead of a new `results/<name>/<time>-<sha>/`.
    pub out_dir: Option<PathBuf>,
    pub git_sha: String,
    pub rustc: String,
    pub progress: bool,
    /// Evaluation threads (None: every core). Results do not depend on it.
    pub threads: Option<usize>,
    /// Refuse a run whose estimated peak memory is above this (None: the available memory).
    pub max_memory: Option<u64>,
}

pub struct RunSummary {
    pub dir: PathBuf,
    pub rows: Vec<Row>,
    pub skipped: usize,
}

fn log(msg: &str) {
    eprintln!("{msg}");
}

/// `DIR/.lock`, holding the pid of the run writing into DIR: a second run into the same
/// folder is refused while the first is alive; the lock of a run that was killed is taken
/// over. Removed when the run ends (also on error).
struct RunLock {
    path: PathBuf,
}

impl RunLock {
    fn acquire(dir: &Path) -> Result<RunLock, String> {
        use std::io::Write;
        let path = dir.join(".lock");
        for _ in 0..3 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(std::process::id().to_string().as_bytes())
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let pid = std::fs::read_to_string(&path).unwrap_or_default();
                    let pid = pid.trim();
                    let alive = pid.parse::<u32>().is_ok_and(process_alive);
                    if alive {
                        return Err(format!(
                            "{}: another quantbench run (pid {pid}) is writing into this folder; wait for it to finish, or remove {} if that process is gone",
                            dir.display(),
                            path.display()
                        ));
                    }
                    // a killed run's lock (or one being written this instant: retry)
                    if pid.is_empty() {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        if !std::fs::read_to_string(&path)
                            .unwrap_or_default()
                            .is_empty()
                        {
                            continue;
                        }
                    }
                    std::fs::remove_file(&path).ok();
                }
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
        Err(format!("{}: cannot take the run lock", path.display()))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        std::fs::remove_file(&self.path).ok();
    }
}

/// Whether a process with this pid exists (Linux: /proc; elsewhere assume it does, so a
/// stale lock is reported rather than broken).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        // a zombie (killed, not yet reaped) no longer writes
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
            Err(_) => false,
        }
    } else {
        true
    }
}

/// Temporary files (`*.partial-<pid>`) left by a killed run: under the lock nobody else is
/// writing, so every one is stale.
fn remove_stale_partials(dir: &Path) -> Result<(), String> {
    for sub in [dir.to_path_buf(), dir.join("cells"), dir.join("models")] {
        let Ok(entries) = std::fs::read_dir(&sub) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().contains(".partial-") {
                std::fs::remove_file(e.path())
                    .map_err(|err| format!("{}: {err}", e.path().display()))?;
            }
        }
    }
    Ok(())
}

/// Runs the experiment file at `path`.
pub fn run_experiment(path: &Path, opts: &RunOptions) -> Result<RunSummary, String> {
    let wall = Instant::now();
    let (exp, text) = Experiment::load(path, Some(&opts.data_root))?;
    let cells = exp
        .cells()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let k = Kernels::active();
    let dir = match &opts.out_dir {
        Some(d) => d.clone(),
        None => opts.results_root.join(&exp.name).join(format!(
            "{}-{}",
            crate::utc_stamp(),
            folder_safe(&opts.git_sha)
        )),
    };
    std::fs::create_dir_all(dir.join("cells")).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::create_dir_all(dir.join("models")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let _lock = RunLock::acquire(&dir)?;
    remove_stale_partials(&dir)?;
    let config_hash = format!("{:016x}", crate::fnv1a(text.as_bytes()));
    // A folder holds one configuration: resuming with a changed file would mix results.
    let hash_file = dir.join("config.hash");
    match std::fs::read_to_string(&hash_file) {
        Ok(h) if h.trim() != config_hash => {
            return Err(format!(
                "{}: was written by a different configuration (hash {} != {config_hash}); use a new folder",
                dir.display(),
                h.trim()
            ))
        }
        Ok(_) => {}
        Err(_) => crate::write_atomic(&hash_file, config_hash.as_bytes())?,
    }
    crate::write_atomic(&dir.join("experiment.toml"), text.as_bytes())?;

    let norm = exp
        .data
        .normalization
        .clone()
        .unwrap_or_else(|| exp.data.dataset.default_normalization());
    // memory: data and models are checked before they are read, activations once the models
    // are loaded
    let threads = opts
        .threads
        .unwrap_or_else(crate::eval::default_threads)
        .max(1);
    let (limit, limit_source) = match opts.max_memory {
        Some(b) => (Some(b), "--max-memory"),
        None => (
            crate::memory::available(),
            "the memory this machine has available",
        ),
    };
    let needs_calib = cells.iter().any(|c| c.act.bits.is_some());
    let needs_train = cells.iter().any(|c| c.finetune.is_some());
    let mut mem = vec![crate::memory::Part {
        what: "evaluation images".into(),
        bytes: crate::memory::dataset_bytes(
            &opts.data_root,
            exp.data.dataset,
            exp.data.split,
            exp.data.limit,
        ),
    }];
    if needs_calib {
        mem.push(crate::memory::Part {
            what: "calibration images".into(),
            bytes: crate::memory::dataset_bytes(
                &opts.data_root,
                exp.data.dataset,
                exp.calibration.split,
                Some(exp.calibration.samples),
            ),
        });
    }
    if needs_train {
        mem.push(crate::memory::Part {
            what: "fine-tuning images".into(),
            bytes: crate::memory::dataset_bytes(
                &opts.data_root,
                exp.data.dataset,
                crate::data::Split::Train,
                None,
            ),
        });
    }
    if let Some(search) = &exp.search {
        mem.push(crate::memory::Part {
            what: "search held-out images".into(),
            bytes: crate::memory::dataset_bytes(
                &opts.data_root,
                exp.data.dataset,
                exp.calibration.split,
                Some(exp.calibration.samples + search.samples),
            ),
        });
    }
    mem.push(crate::memory::Part {
        what: "models (4x the ONNX files)".into(),
        bytes: exp
            .models
            .iter()
            .map(|m| 4 * std::fs::metadata(&m.path).map_or(0, |md| md.len()))
            .sum(),
    });
    if let Some(limit) = limit {
        crate::memory::check(&mem, limit, limit_source)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let mut data = Dataset::load(&opts.data_root, exp.data.dataset, exp.data.split)?;
    if let Some(n) = exp.data.limit {
        data.truncate(n);
    }
    norm.validate(data.image_shape[0])
        .map_err(|e| format!("{}: data.normalization: {e}", path.display()))?;
    let calib_data = if needs_calib {
        let mut c = Dataset::load(&opts.data_root, exp.data.dataset, exp.calibration.split)
            .map_err(|e| format!("calibration data: {e}"))?;
        c.truncate(exp.calibration.samples);
        Some(c)
    } else {
        None
    };
    let train_data = if needs_train {
        Some(
            Dataset::load(&opts.data_root, exp.data.dataset, crate::data::Split::Train)
                .map_err(|e| format!("fine-tuning data: {e}"))?,
        )
    } else {
        None
    };
    let eval_opts = EvalOptions {
        batch: exp.data.batch,
        progress: opts.progress,
        threads,
        ..Default::default()
    };

    let mut graphs: HashMap<String, Graph> = HashMap::new();
    for m in &exp.models {
        let g = Graph::load(&m.path)?;
        check_model_fits(&g, &data, exp.data.batch)
            .map_err(|e| format!("model '{}': {e}", m.name))?;
        if let Some(shape) = m.input {
            if shape != data.image_shape {
                return Err(format!(
                    "models '{}': input = {shape:?} but the {} images are {:?}",
                    m.name,
                    data.kind.name(),
                    data.image_shape
                ));
            }
        }
        graphs.insert(m.name.clone(), g);
    }
    let mut activations = 0u64;
    for m in &exp.models {
        let g = &graphs[&m.name];
        let batch = check_model_fits(g, &data, exp.data.batch)? as u64;
        let per_image =
            crate::memory::activation_bytes_per_image(g, data.image_shape).map_err(|e| {
                format!(
                    "model '{}': a forward pass of one image failed: {e}",
                    m.name
                )
            })?;
        activations = activations.max(per_image * batch * threads as u64);
    }
    mem.push(crate::memory::Part {
        what: format!("activations ({threads} threads)"),
        bytes: activations,
    });
    let memory_estimate = match limit {
        Some(limit) => crate::memory::check(&mem, limit, limit_source)
            .map_err(|e| format!("{}: {e}", path.display()))?,
        None => mem.iter().map(|p| p.bytes).sum(),
    };

    let ctx = CellContext {
        exp: &exp,
        k: &k,
        dir: &dir,
        graphs: &graphs,
        data: &data,
        norm: &norm,
        calib_data: calib_data.as_ref(),
        train_data: train_data.as_ref(),
        eval_opts: &eval_opts,
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut latency: Vec<LatencyRecord> = Vec::new();
    let mut calib_cache: HashMap<CalibKey, ActParams> = HashMap::new();
    let mut skipped = 0;
    let total = cells.len();
    for (i, cell) in cells.iter().enumerate() {
        let (rec, done_earlier) =
            ctx.run_or_resume(cell, &mut calib_cache, &format!("[{}/{total}]", i + 1))?;
        skipped += usize::from(done_earlier);
        rows.push(rec.row);
        latency.extend(rec.latency);
    }
    let mut search_meta = serde_json::Map::new();
    if exp.search.is_some() {
        let schemes: Vec<WeightScheme> =
            exp.search_candidates()?.into_iter().map(|c| c.1).collect();
        let mut held = Dataset::load(&opts.data_root, exp.data.dataset, exp.calibration.split)
            .map_err(|e| format!("search held-out data: {e}"))?;
        held = held_out(
            held,
            exp.calibration.samples,
            exp.search.as_ref().map_or(0, |s| s.samples),
        )?;
        let mut allocations = Vec::new();
        for m in &exp.models {
            let grid_sizes: Vec<(String, u64)> = rows
                .iter()
                .filter(|r| r.model == m.name)
                .map(|r| (short_label(&r.cell), r.size_bytes))
                .collect();
            let out = crate::mixed::search(&crate::mixed::SearchInput {
                k: &k,
                exp: &exp,
                model: &m.name,
                graph: &graphs[&m.name],
                held: &held,
                norm: &norm,
                opts: eval_opts.clone(),
                grid_sizes: &grid_sizes,
                dir: dir.join("search"),
                progress: opts.progress,
            })?;
            let mixed_cells: Vec<Cell> = out
                .allocations
                .iter()
                .map(|a| crate::mixed::cell(a, &schemes))
                .collect();
            let n = mixed_cells.len();
            for (i, cell) in mixed_cells.iter().enumerate() {
                let (rec, done_earlier) =
                    ctx.run_or_resume(cell, &mut calib_cache, &format!("[mixed {}/{n}]", i + 1))?;
                skipped += usize::from(done_earlier);
                rows.push(rec.row);
                latency.extend(rec.latency);
            }
            crate::report::write_search_charts(&dir.join("search"), &out, exp.report.png)
                .unwrap_or_else(|e| eprintln!("warning: search charts not written: {e}"));
            search_meta.insert(m.name.clone(), crate::mixed::outcome_json(&out, held.len()));
            allocations.extend(out.allocations);
        }
        let chosen = crate::mixed::chosen_toml(&text, &allocations, &schemes)?;
        crate::write_atomic(&dir.join("search").join("chosen.toml"), chosen.as_bytes())?;
    }
    fill_relative(&mut rows);
    let meta = serde_json::json!({
        "experiment": exp.name,
        "config_file": path.display().to_string(),
        "config_hash": config_hash,
        "seed": exp.seed,
        "host": crate::hostname(),
        "cpu_model": crate::cpu_model(),
        "isa": k.isa().name(),
        "rustc": opts.rustc,
        "git_sha": opts.git_sha,
        "cells": rows.len(),
        "cells_skipped_as_done": skipped,
        "wall_time_s": wall.elapsed().as_secs_f64(),
        "eval_images": data.len(),
        "eval_files": data.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "calibration": { "split": format!("{:?}", exp.calibration.split).to_lowercase(), "samples": calib_data.as_ref().map(|c| c.len()), "percentile": exp.calibration.percentile },
        "threads": eval_opts.threads,
        "memory_estimate_bytes": memory_estimate,
        "memory_limit_bytes": limit,
        "finished_utc": crate::utc_stamp(),
    });
    let mut meta = meta;
    if !search_meta.is_empty() {
        meta["search"] = serde_json::Value::Object(search_meta);
    }
    crate::report::write_report(&dir, &exp, &rows, &latency, &meta)?;
    Ok(RunSummary { dir, rows, skipped })
}

/// What running one cell needs.
struct CellContext<'a> {
    exp: &'a Experiment,
    k: &'a Kernels,
    dir: &'a Path,
    graphs: &'a HashMap<String, Graph>,
    data: &'a Dataset,
    norm: &'a Normalization,
    calib_data: Option<&'a Dataset>,
    train_data: Option<&'a Dataset>,
    eval_opts: &'a EvalOptions,
}

impl CellContext<'_> {
    /// The cell's record: read from `cells/<id>.json` when an earlier run finished it (true),
    /// else run and written there.
    fn run_or_resume(
        &self,
        cell: &Cell,
        calib_cache: &mut HashMap<CalibKey, ActParams>,
        progress: &str,
    ) -> Result<(CellRecord, bool), String> {
        let record_path = self.dir.join("cells").join(format!("{}.json", cell.id));
        if let Ok(bytes) = std::fs::read(&record_path) {
            if let Ok(rec) = serde_json::from_slice::<CellRecord>(&bytes) {
                log(&format!("{progress} {}: done earlier, skipped", cell.id));
                return Ok((rec, true));
            }
        }
        let start = Instant::now();
        let rec = self.run_cell(cell, calib_cache)?;
        log(&format!(
            "{progress} {}: top1 {:.2} %, {} bytes, {:.1} s",
            cell.id,
            rec.row.top1 * 100.0,
            rec.row.size_bytes,
            start.elapsed().as_secs_f64()
        ));
        crate::write_atomic(
            &record_path,
            serde_json::to_string_pretty(&rec)
                .expect("serializable")
                .as_bytes(),
        )?;
        Ok((rec, false))
    }

    fn run_cell(
        &self,
        cell: &Cell,
        calib_cache: &mut HashMap<CalibKey, ActParams>,
    ) -> Result<CellRecord, String> {
        let (exp, k, dir, data, norm) = (self.exp, self.k, self.dir, self.data, self.norm);
        let calib_data = self.calib_data;
        let eval_opts = self.eval_opts;
        let graph = &self.graphs[&cell.model];
        let mut qm =
            quantize_model(k, graph, cell).map_err(|e| format!("cell {}: {e}", cell.id))?;
        let mut top1_before = None;
        let mut train_log = None;
        let trained_graph;
        // Calibrated activation parameters (of the pretrained graph, cached per model, bits
        // and method); quantization-aware training starts from them and learns its own.
        if let (Some(bits), Some(method)) = (cell.act.bits, cell.act.calibration) {
            let key = (cell.model.clone(), bits, method, cell.act.edges);
            if !calib_cache.contains_key(&key) {
                let cd = calib_data
                    .as_ref()
                    .expect("loaded when any cell quantizes activations");
                let req = CalibRequest {
                    bits,
                    method,
                    percentile: exp.calibration.percentile,
                    edges: cell.act.edges,
                };
                let p = calibrate(k, graph, cd, norm, eval_opts, req)
                    .map_err(|e| format!("cell {}: calibration: {e}", cell.id))?;
                calib_cache.insert(key.clone(), p);
            }
        }
        let calibrated = match (cell.act.bits, cell.act.calibration) {
            (Some(bits), Some(method)) => {
                Some(&calib_cache[&(cell.model.clone(), bits, method, cell.act.edges)])
            }
            _ => None,
        };
        let mut trained_act = None;
        let graph = match &cell.finetune {
            None => graph,
            Some(ft) => {
                let train = self
                    .train_data
                    .ok_or("the training split is loaded when any cell fine-tunes")?;
                let quiet = EvalOptions {
                    progress: false,
                    ..eval_opts.clone()
                };
                if cell.weights != WeightScheme::Fp32
                    || !cell.overrides.is_empty()
                    || calibrated.is_some()
                {
                    let hook = calibrated.map(|p| FakeQuantHook { k, params: p });
                    let before = evaluate(
                        &Engine::new(&simulated_graph(graph, &qm)?),
                        data,
                        norm,
                        &quiet,
                        hook.as_ref().map(|h| h as &dyn crate::engine::EdgeHook),
                    )
                    .map_err(|e| format!("cell {}: {e}", cell.id))?;
                    top1_before = Some(before.top1);
                }
                let schemes: Vec<WeightScheme> =
                    qm.weights.iter().map(|(_, qw)| qw.scheme.clone()).collect();
                // distillation: the teacher is the control, fine-tuned (and stored) before
                let teacher = match &ft.distill {
                    Some(_) => {
                        let control = crate::experiment::control_id(&cell.model, ft);
                        let path = dir.join("models").join(format!("{control}.safetensors"));
                        Some(
                            crate::quant::read_fp32_model(graph, &path)
                                .map_err(|e| format!("cell {}: teacher: {e}", cell.id))?,
                        )
                    }
                    None => None,
                };
                let t = crate::train::finetune(&crate::train::FinetuneInput {
                    k,
                    graph,
                    schemes: &schemes,
                    train,
                    norm,
                    spec: ft,
                    act: calibrated,
                    teacher: teacher.as_ref(),
                    seed: exp.seed,
                    threads: eval_opts.threads,
                    progress: eval_opts.progress,
                    label: &short_label(&cell.id),
                })
                .map_err(|e| format!("cell {}: fine-tuning: {e}", cell.id))?;
                // weight SQNR against the pretrained weights
                let (mut sig, mut err) = (0f64, 0f64);
                for (r, qw) in &t.weights {
                    let w = &graph.constants[r.value].as_ref().expect("constant").data;
                    for (&a, &b) in w.iter().zip(&qw.dequantized) {
                        sig += a as f64 * a as f64;
                        err += (a as f64 - b as f64).powi(2);
                    }
                }
                qm.sqnr_db = (err > 0.0).then(|| 10.0 * (sig / err).log10());
                qm.seconds += t.log.seconds;
                qm.weights = t.weights;
                train_log = Some(t.log);
                trained_act = t.act;
                trained_graph = t.graph;
                &trained_graph
            }
        };
        let model_path = dir.join("models").join(format!("{}.safetensors", cell.id));
        let size_bytes = write_safetensors(&model_path, graph, &qm)?;
        let sim = simulated_graph(graph, &qm)?;
        let act = trained_act.as_ref().or(calibrated);
        let opts_cell = EvalOptions {
            label: short_label(&cell.id),
            ..eval_opts.clone()
        };
        let mut cell_latency = Vec::new();
        let mut sim_top1 = None;
        let r = if cell.method == MethodKind::IntegerOnly {
            let req = CalibRequest {
                bits: 8,
                method: cell.act.calibration.unwrap_or(CalibMethod::Minmax),
                percentile: exp.calibration.percentile,
                edges: crate::experiment::ActEdges::All,
            };
            let cd = calib_data
                .as_ref()
                .expect("loaded when any cell quantizes activations");
            let quiet = EvalOptions {
                progress: false,
                ..eval_opts.clone()
            };
            let model = crate::engine::int8::build(k, graph, cd, norm, &quiet, req)
                .map_err(|e| format!("cell {}: {e}", cell.id))?;
            let r = evaluate(&model, data, norm, &opts_cell, None)
                .map_err(|e| format!("cell {}: {e}", cell.id))?;
            // the fake-quant simulation of the same scheme, for the 0.1 pp check
            let (sim_graph, points) = model.simulation()?;
            let hook = FakeQuantHook { k, params: &points };
            let sim_opts = EvalOptions {
                label: format!("{} (simulation)", short_label(&cell.id)),
                ..eval_opts.clone()
            };
            let s = evaluate(&Engine::new(&sim_graph), data, norm, &sim_opts, Some(&hook))
                .map_err(|e| format!("cell {}: simulation: {e}", cell.id))?;
            sim_top1 = Some(s.top1);
            for &b in &exp.latency.batch_sizes {
                let ms = measure_latency(&model, data, norm, b, exp.latency.repetitions)?;
                cell_latency.push(LatencyRecord {
                    model: cell.model.clone(),
                    method: "integer_only".into(),
                    batch: b,
                    threads: 1,
                    ms_per_batch: ms,
                    ms_per_image: ms / b as f64,
                });
            }
            r
        } else {
            let engine = Engine::new(&sim);
            let hook = act.map(|p| FakeQuantHook { k, params: p });
            let r = evaluate(
                &engine,
                data,
                norm,
                &opts_cell,
                hook.as_ref().map(|h| h as &dyn crate::engine::EdgeHook),
            )
            .map_err(|e| format!("cell {}: {e}", cell.id))?;
            // a fine-tuned fp32 cell runs the same kernels on the same shapes as the fp32
            // baseline: measured once, on the baseline
            if cell.method == MethodKind::Fp32 && cell.finetune.is_none() {
                for &b in &exp.latency.batch_sizes {
                    let ms = measure_latency(&engine, data, norm, b, exp.latency.repetitions)?;
                    cell_latency.push(LatencyRecord {
                        model: cell.model.clone(),
                        method: "fp32".into(),
                        batch: b,
                        threads: 1,
                        ms_per_batch: ms,
                        ms_per_image: ms / b as f64,
                    });
                }
            }
            r
        };
        let mut row = make_row(
            cell,
            &qm,
            &r,
            size_bytes,
            &cell_latency,
            exp,
            k.isa().name(),
        );
        row.sim_top1 = sim_top1;
        row.top1_before = top1_before;
        row.train_images_per_s = train_log.as_ref().map(|l| l.images_per_second);
        row.control = match &cell.finetune {
            Some(ft) if cell.method != MethodKind::Fp32 => {
                Some(crate::experiment::control_id(&cell.model, ft))
            }
            _ => None,
        };
        Ok(CellRecord {
            row,
            latency: cell_latency,
            train: train_log,
        })
    }
}

/// The held-out images of the search: `samples` images of the calibration split after its
/// first `skip` (the calibration images).
fn held_out(mut d: Dataset, skip: usize, samples: usize) -> Result<Dataset, String> {
    let have = d.len();
    if have < skip + samples {
        return Err(format!(
            "search.samples = {samples}: the calibration split has {have} images, {skip} of which are calibration images; at most {} are left for the search",
            have.saturating_sub(skip)
        ));
    }
    let per: usize = d.image_shape.iter().product();
    d.pixels = d.pixels[skip * per..(skip + samples) * per].to_vec();
    d.labels = d.labels[skip..skip + samples].to_vec();
    Ok(d)
}

fn folder_safe(s: &str) -> String {
    let s: String = s
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    if s.is_empty() {
        "nogit".into()
    } else {
        s
    }
}

fn short_label(id: &str) -> String {
    id.split("--").nth(1).unwrap_or(id).to_string()
}

/// Median wall time of `reps` single-thread runs at batch `b` (after one warm-up run).
fn measure_latency(
    engine: &dyn crate::eval::Forward,
    data: &Dataset,
    norm: &Normalization,
    b: usize,
    reps: usize,
) -> Result<f64, String> {
    let n = b.min(data.len());
    let x: Tensor = data.batch(0..n, norm);
    // Tile to b images when the data set is smaller than the batch.
    let x = if n < b {
        let per = x.len() / n;
        let mut d = Vec::with_capacity(b * per);
        for i in 0..b {
            d.extend_from_slice(&x.data[(i % n) * per..(i % n + 1) * per]);
        }
        let mut s = x.shape.clone();
        s[0] = b;
        Tensor::new(s, d)
    } else {
        x
    };
    if engine
        .graph()
        .input_shape
        .first()
        .copied()
        .flatten()
        .is_some_and(|fixed| fixed != b)
    {
        return Err(format!(
            "latency batch {b}: the model's batch is fixed at {:?}",
            engine.graph().input_shape[0]
        ));
    }
    engine.forward(x.clone(), None)?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        engine.forward(x.clone(), None)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn make_row(
    cell: &Cell,
    qm: &QuantizedModel,
    r: &crate::eval::EvalResult,
    size_bytes: u64,
    lat: &[LatencyRecord],
    exp: &Experiment,
    isa: &str,
) -> Row {
    let (mut bits_sum, mut count) = (0f64, 0f64);
    for (_, qw) in &qm.weights {
        let n = qw.dequantized.len() as f64;
        bits_sum += qw.scheme.bits() as f64 * n;
        count += n;
    }
    let weight_bits = if count > 0.0 { bits_sum / count } else { 32.0 };
    let symmetric = match &cell.weights {
        WeightScheme::Linear { symmetric, .. } => Some(*symmetric),
        WeightScheme::FixedPoint { .. } | WeightScheme::DynamicFixedPoint { .. } => Some(true),
        _ => None,
    };
    let granularity = match (cell.method, cell.weights.granularity()) {
        (MethodKind::Hybrid, _) => "mixed".into(),
        (_, Some(g)) => g.name().to_string(),
        (_, None) => "-".into(),
    };
    let largest = exp.latency.batch_sizes.iter().copied().max().unwrap_or(1);
    Row {
        model: cell.model.clone(),
        cell: cell.id.clone(),
        method: cell.method.name().to_string(),
        label: cell.label.clone(),
        weight_bits,
        act_bits: cell.act.bits.unwrap_or(32),
        granularity,
        symmetric,
        calibration: cell.act.calibration.map_or("-".into(), |c| {
            if cell.act.edges == crate::experiment::ActEdges::Fused {
                format!("{} (fused)", c.name())
            } else {
                c.name().to_string()
            }
        }),
        top1: r.top1,
        sim_top1: None,
        top1_delta: 0.0,
        top5: r.top5,
        size_bytes,
        compression: 1.0,
        weight_sqnr_db: qm.sqnr_db,
        latency_ms_b1: lat.iter().find(|l| l.batch == 1).map(|l| l.ms_per_batch),
        latency_ms_bn: lat
            .iter()
            .find(|l| l.batch == largest && largest > 1)
            .map(|l| l.ms_per_batch),
        latency_batch_n: largest,
        quantize_s: qm.seconds,
        eval_s: r.seconds,
        images: r.images,
        isa: isa.to_string(),
        top1_before: None,
        train_images_per_s: None,
        control: None,
    }
}

/// top1_delta and compression against the fp32 row of the same model.
fn fill_relative(rows: &mut [Row]) {
    let base: HashMap<String, (f64, u64)> = rows
        .iter()
        .filter(|r| r.method == "fp32")
        .map(|r| (r.model.clone(), (r.top1, r.size_bytes)))
        .collect();
    for r in rows.iter_mut() {
        if let Some(&(top1, size)) = base.get(&r.model) {
            r.top1_delta = r.top1 - top1;
            r.compression = size as f64 / r.size_bytes.max(1) as f64;
        }
    }
}
