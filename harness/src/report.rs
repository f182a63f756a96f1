//! The report of one run: `runs.parquet` and `runs.csv` (one polars DataFrame), `latency.csv`,
//! `summary.md`, charts (SVG and PNG) and `meta.json`. Reads rows only, never models. Every
//! file is written to a temporary name and renamed.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use polars::prelude::*;

use crate::experiment::Experiment;
use crate::runner::{LatencyRecord, Row};

pub fn write_report(
    dir: &Path,
    exp: &Experiment,
    rows: &[Row],
    latency: &[LatencyRecord],
    meta: &serde_json::Value,
) -> Result<(), String> {
    let mut df = frame(rows).map_err(|e| format!("building the results frame: {e}"))?;
    let mut buf = Vec::new();
    ParquetWriter::new(&mut buf)
        .finish(&mut df)
        .map_err(|e| format!("runs.parquet: {e}"))?;
    crate::write_atomic(&dir.join("runs.parquet"), &buf)?;
    let mut buf = Vec::new();
    CsvWriter::new(&mut buf)
        .finish(&mut df)
        .map_err(|e| format!("runs.csv: {e}"))?;
    crate::write_atomic(&dir.join("runs.csv"), &buf)?;
    let mut lat = String::from("model,method,batch,threads,ms_per_batch,ms_per_image\n");
    for l in latency {
        lat.push_str(&format!(
            "{},{},{},{},{:.4},{:.4}\n",
            l.model, l.method, l.batch, l.threads, l.ms_per_batch, l.ms_per_image
        ));
    }
    crate::write_atomic(&dir.join("latency.csv"), lat.as_bytes())?;

    let mut meta = meta.clone();
    let charts = if exp.report.charts {
        match charts(dir, rows, latency, exp.report.png) {
            Ok(files) => serde_json::json!(files),
            Err(e) => {
                eprintln!("warning: charts not written: {e}");
                serde_json::json!(format!("not written: {e}"))
            }
        }
    } else {
        serde_json::json!("disabled in [report]")
    };
    meta["charts"] = charts;
    crate::write_atomic(
        &dir.join("summary.md"),
        summary(exp, rows, latency, &meta).as_bytes(),
    )?;
    crate::write_atomic(
        &dir.join("meta.json"),
        serde_json::to_string_pretty(&meta)
            .expect("json")
            .as_bytes(),
    )?;
    Ok(())
}

fn frame(rows: &[Row]) -> PolarsResult<DataFrame> {
    macro_rules! col {
        ($name:literal, $f:expr) => {
            Column::new($name.into(), rows.iter().map($f).collect::<Vec<_>>())
        };
    }
    DataFrame::new(
        rows.len(),
        vec![
            col!("model", |r: &Row| r.model.clone()),
            col!("cell", |r: &Row| r.cell.clone()),
            col!("method", |r: &Row| r.method.clone()),
            col!("label", |r: &Row| r.label.clone()),
            col!("weight_bits", |r: &Row| r.weight_bits),
            col!("act_bits", |r: &Row| r.act_bits),
            col!("granularity", |r: &Row| r.granularity.clone()),
            col!("symmetric", |r: &Row| r.symmetric),
            col!("calibration", |r: &Row| r.calibration.clone()),
            col!("top1", |r: &Row| r.top1),
            col!("top1_delta", |r: &Row| r.top1_delta),
            col!("top5", |r: &Row| r.top5),
            col!("sim_top1", |r: &Row| r.sim_top1),
            col!("size_bytes", |r: &Row| r.size_bytes),
            col!("compression", |r: &Row| r.compression),
            col!("weight_sqnr_db", |r: &Row| r.weight_sqnr_db),
            col!("latency_ms_b1", |r: &Row| r.latency_ms_b1),
            col!("latency_ms_bN", |r: &Row| r.latency_ms_bn),
            col!("latency_batch_n", |r: &Row| r.latency_batch_n as u64),
            col!("quantize_s", |r: &Row| r.quantize_s),
            col!("eval_s", |r: &Row| r.eval_s),
            col!("images", |r: &Row| r.images as u64),
            col!("isa", |r: &Row| r.isa.clone()),
            col!("top1_before_finetune", |r: &Row| r.top1_before),
            col!("train_images_per_s", |r: &Row| r.train_images_per_s),
        ],
    )
}

/// Rows no other row of the same model beats on both size (smaller or equal) and top-1
/// (higher or equal, one of them strictly).
pub fn pareto(rows: &[Row]) -> Vec<bool> {
    rows.iter()
        .map(|r| {
            !rows.iter().any(|o| {
                o.model == r.model
                    && o.size_bytes <= r.size_bytes
                    && o.top1 >= r.top1
                    && (o.size_bytes < r.size_bytes || o.top1 > r.top1)
            })
        })
        .collect()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

fn summary(
    exp: &Experiment,
    rows: &[Row],
    latency: &[LatencyRecord],
    meta: &serde_json::Value,
) -> String {
    let front = pareto(rows);
    let mut s = format!("# {}\n\n", exp.name);
    s.push_str(&format!(
        "{} images of {} ({}), calibration: {} {} images; ISA {}; git {}; {} cells in {:.0} s.\n\n",
        meta["eval_images"],
        exp.data.dataset.name(),
        format!("{:?}", exp.data.split).to_lowercase(),
        meta["calibration"]["samples"]
            .as_u64()
            .map_or("no".to_string(), |n| n.to_string()),
        format!("{:?}", exp.calibration.split).to_lowercase(),
        meta["isa"].as_str().unwrap_or("?"),
        meta["git_sha"].as_str().unwrap_or("?"),
        rows.len(),
        meta["wall_time_s"].as_f64().unwrap_or(0.0),
    ));
    if exp.calibration.allow_eval_split && exp.calibration.split == exp.data.split {
        s.push_str("**Caveat:** activation ranges were calibrated on the evaluated split (`calibration.allow_eval_split = true`); rows with A bits < 32 are optimistic.\n\n");
    }
    s.push_str("Pareto-optimal rows (no other row is both smaller and more accurate) are marked with **P**. ");
    s.push_str("Size is the size of the safetensors file the cell wrote; weight bits exclude scales and codebooks.\n\n");
    s.push_str("| model | method | cell | W bits | A bits | granularity | sym | calib | top-1 % | delta pp | top-5 % | size KiB | x smaller | W SQNR dB | P |\n");
    s.push_str("|---|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|:-:|\n");
    let mut order: Vec<usize> = (0..rows.len()).collect();
    let method_rank = |m: &str| {
        [
            "fp32",
            "linear",
            "fixed_point",
            "dynamic_fixed_point",
            "kmeans",
            "integer_only",
            "hybrid",
        ]
        .iter()
        .position(|x| *x == m)
        .unwrap_or(9)
    };
    order.sort_by(|&a, &b| {
        let (x, y) = (&rows[a], &rows[b]);
        (
            x.model.as_str(),
            method_rank(&x.method),
            -(x.weight_bits * 100.0) as i64,
            x.cell.as_str(),
        )
            .cmp(&(
                y.model.as_str(),
                method_rank(&y.method),
                -(y.weight_bits * 100.0) as i64,
                y.cell.as_str(),
            ))
    });
    for i in order {
        let r = &rows[i];
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:+.2} | {:.2} | {:.1} | {:.2} | {} | {} |\n",
            r.model,
            r.method,
            r.cell.split("--").nth(1).unwrap_or(&r.cell),
            if r.weight_bits.fract() == 0.0 { format!("{}", r.weight_bits) } else { format!("{:.2}", r.weight_bits) },
            if r.act_bits == 32 { "32".into() } else { r.act_bits.to_string() },
            r.granularity,
            r.symmetric.map_or("-", |s| if s { "yes" } else { "no" }),
            r.calibration,
            r.top1 * 100.0,
            r.top1_delta * 100.0,
            r.top5 * 100.0,
            r.size_bytes as f64 / 1024.0,
            r.compression,
            opt(r.weight_sqnr_db, 1),
            if front[i] { "**P**" } else { "" },
        ));
    }
    if !latency.is_empty() {
        s.push_str("\n## Latency (executable paths, single thread, median)\n\n| model | method | batch | ms per batch | ms per image |\n|---|---|---:|---:|---:|\n");
        for l in latency {
            s.push_str(&format!(
                "| {} | {} | {} | {:.3} | {:.3} |\n",
                l.model, l.method, l.batch, l.ms_per_batch, l.ms_per_image
            ));
        }
        s.push_str("\nfp32 and integer_only execute for real (integer_only on the int8 GEMM); the other quantized cells are simulated (dequantized weights, fake-quant activations), so their latency is not reported: it would measure the simulation, not a quantized kernel path.\n");
    }
    let int8: Vec<&Row> = rows.iter().filter(|r| r.sim_top1.is_some()).collect();
    if !int8.is_empty() {
        s.push_str("\n## integer_only against its fake-quant simulation\n\n| model | cell | top-1 % (int8) | top-1 % (simulation) | difference pp |\n|---|---|---:|---:|---:|\n");
        for r in int8 {
            let sim = r.sim_top1.unwrap_or(f64::NAN);
            s.push_str(&format!(
                "| {} | {} | {:.2} | {:.2} | {:+.2} |\n",
                r.model,
                r.cell,
                r.top1 * 100.0,
                sim * 100.0,
                (r.top1 - sim) * 100.0
            ));
        }
    }
    s.push_str(&finetune_summary(rows));
    if let Some(search) = meta["search"].as_object() {
        s.push_str(&search_summary(search, rows));
    }
    if let Some(files) = meta["charts"].as_array() {
        s.push_str("\n## Charts\n\n");
        for f in files
            .iter()
            .filter_map(|f| f.as_str())
            .filter(|f| f.ends_with(".svg"))
        {
            s.push_str(&format!("![{f}]({f})\n\n"));
        }
    } else if let Some(why) = meta["charts"].as_str() {
        s.push_str(&format!("\nCharts: {why}\n"));
    }
    s
}

/// The fine-tuning section: each fine-tuned cell before and after, against the fp32 control
/// fine-tuned with the same budget (only that difference is meaningful: the training images
/// are JPEG-compressed and move the fp32 baseline too).
fn finetune_summary(rows: &[Row]) -> String {
    let tuned: Vec<&Row> = rows
        .iter()
        .filter(|r| r.train_images_per_s.is_some() && r.method != "fp32")
        .collect();
    if tuned.is_empty() {
        return String::new();
    }
    let mut s = String::from("\n## Fine-tuning (quantization-aware training)\n\n");
    s.push_str("| model | cell | top-1 % before | top-1 % after | fp32 control % | after - control pp | train images/s |\n|---|---|---:|---:|---:|---:|---:|\n");
    for r in tuned {
        let control = r
            .control
            .as_ref()
            .and_then(|id| rows.iter().find(|c| &c.cell == id));
        s.push_str(&format!(
            "| {} | {} | {} | {:.2} | {} | {} | {:.0} |\n",
            r.model,
            r.cell.split("--").nth(1).unwrap_or(&r.cell),
            opt(r.top1_before.map(|v| v * 100.0), 2),
            r.top1 * 100.0,
            control.map_or("-".into(), |c| format!("{:.2}", c.top1 * 100.0)),
            control.map_or("-".into(), |c| format!("{:+.2}", (r.top1 - c.top1) * 100.0)),
            r.train_images_per_s.unwrap_or(0.0),
        ));
    }
    s
}

/// The mixed-precision section of the summary: per budget, what the search chose on the
/// held-out images and what it scored on the evaluated split next to the uniform cell.
fn search_summary(search: &serde_json::Map<String, serde_json::Value>, rows: &[Row]) -> String {
    let row = |cell: &str| rows.iter().find(|r| r.cell == cell);
    let mut s = String::from("\n## Mixed precision (search)\n\n");
    for (model, o) in search {
        s.push_str(&format!(
            "{model}: {} weight layers x {} candidates measured on {} held-out images of the calibration split (fp32 held-out top-1 {:.2} %); search {:.0} s. \
             Sensitivity table and heat map: `search/{model}/sensitivity.csv`, `search/{model}/sensitivity.svg`; the chosen configurations as an experiment file: `search/chosen.toml`.\n\n",
            o["layers"].as_array().map_or(0, |a| a.len()),
            o["candidates"].as_array().map_or(0, |a| a.len()),
            o["held_out_images"],
            o["fp32_heldout_top1"].as_f64().unwrap_or(0.0) * 100.0,
            o["seconds"].as_f64().unwrap_or(0.0),
        ));
        s.push_str("| budget | file bytes (limit) | bits/weight | held-out top-1 % DP -> refined | moves kept/tried | test top-1 % mixed | uniform cell | its bytes | its test top-1 % |\n|---|---:|---:|---:|---:|---:|---|---:|---:|\n");
        for a in o["allocations"].as_array().into_iter().flatten() {
            let mixed = a["cell"].as_str().and_then(row);
            let uniform = a["size_of"].as_str().and_then(row);
            s.push_str(&format!(
                "| {} | {} ({}) | {:.3} | {:.2} -> {:.2} | {}/{} | {} | {} | {} | {} |\n",
                a["budget"].as_str().unwrap_or("?"),
                a["file_bytes"],
                a["target_file_bytes"]
                    .as_u64()
                    .map_or("-".into(), |v| v.to_string()),
                a["bits_per_weight"].as_f64().unwrap_or(0.0),
                a["dp_heldout_top1"].as_f64().unwrap_or(0.0) * 100.0,
                a["heldout_top1"].as_f64().unwrap_or(0.0) * 100.0,
                a["moves_accepted"],
                a["moves_evaluated"],
                mixed.map_or("-".into(), |r| format!("{:.2}", r.top1 * 100.0)),
                uniform.map_or("-".into(), |r| r
                    .cell
                    .split("--")
                    .nth(1)
                    .unwrap_or("")
                    .to_string()),
                uniform.map_or("-".into(), |r| r.size_bytes.to_string()),
                uniform.map_or("-".into(), |r| format!("{:.2}", r.top1 * 100.0)),
            ));
        }
        s.push('\n');
    }
    s
}

// ---------------------------------------------------------------- charts

/// Registers a TrueType font for the charts once: `QUANTBENCH_FONT`, else DejaVu Sans from the
/// usual Debian path (package fonts-dejavu-core).
fn ensure_font() -> Result<(), String> {
    static FONT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    FONT.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("QUANTBENCH_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain([
                PathBuf::from("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
                PathBuf::from("/usr/share/fonts/TTF/DejaVuSans.ttf"),
            ])
            .collect();
        let path = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
            "no TrueType font found (install fonts-dejavu-core or set QUANTBENCH_FONT to a .ttf file)".to_string()
        })?;
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, leaked)
            .map_err(|_| format!("{}: not a usable TrueType font", path.display()))
    })
    .clone()
}

type DynErr = Box<dyn std::error::Error>;

const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// A distinct colour for series `i` of `n`: the palette while it lasts, else evenly spaced hues.
fn series_color(i: usize, n: usize) -> RGBColor {
    if n <= PALETTE.len() {
        return PALETTE[i];
    }
    let (r, g, b) = HSLColor(i as f64 / n as f64, 0.75, 0.42).rgb();
    RGBColor(r, g, b)
}

/// Writes every chart as SVG (and PNG); returns the file names.
fn charts(
    dir: &Path,
    rows: &[Row],
    latency: &[LatencyRecord],
    png: bool,
) -> Result<Vec<String>, String> {
    ensure_font()?;
    let mut files = Vec::new();
    let mixed = rows.iter().any(is_mixed);
    for (name, draw) in [
        ("accuracy_vs_bits", 0),
        ("accuracy_vs_size", 1),
        ("latency", 2),
        ("mixed_vs_uniform", 3),
    ] {
        if (draw == 2 && latency.is_empty()) || (draw == 3 && !mixed) {
            continue;
        }
        let mut kinds = vec!["svg"];
        if png {
            kinds.push("png");
        }
        for kind in kinds {
            let file = format!("{name}.{kind}");
            // the bitmap backend picks its encoder from the extension: keep it last
            let tmp = dir.join(format!("{name}.partial-{}.{kind}", std::process::id()));
            let result: Result<(), DynErr> = if kind == "svg" {
                let root = SVGBackend::new(&tmp, (960, 600)).into_drawing_area();
                draw_chart(draw, root, rows, latency)
            } else {
                let root = BitMapBackend::new(&tmp, (960, 600)).into_drawing_area();
                draw_chart(draw, root, rows, latency)
            };
            result.map_err(|e| format!("{file}: {e}"))?;
            std::fs::rename(&tmp, dir.join(&file)).map_err(|e| format!("{file}: {e}"))?;
            files.push(file);
        }
    }
    Ok(files)
}

fn draw_chart<DB: DrawingBackend>(
    which: usize,
    root: DrawingArea<DB, plotters::coord::Shift>,
    rows: &[Row],
    latency: &[LatencyRecord],
) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    match which {
        0 => accuracy_vs_bits(&root, rows)?,
        1 => accuracy_vs_size(&root, rows)?,
        2 => latency_chart(&root, latency)?,
        _ => mixed_vs_uniform(&root, rows)?,
    }
    root.present()?;
    Ok(())
}

/// Series of the accuracy-vs-bits chart: rows that differ only in weight bits.
fn series_key(r: &Row) -> String {
    let mut k = format!("{} {}", r.model, r.label);
    if r.granularity != "-" && r.granularity != "mixed" {
        k.push_str(&format!(" {}", r.granularity));
    }
    if let Some(s) = r.symmetric {
        if r.method == "linear" {
            k.push_str(if s { " sym" } else { " asym" });
        }
    }
    if r.act_bits != 32 {
        k.push_str(&format!(" A{} {}", r.act_bits, r.calibration));
    }
    k
}

fn accuracy_vs_bits<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    rows: &[Row],
) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    let quant: Vec<&Row> = rows
        .iter()
        .filter(|r| r.method != "fp32" && r.method != "hybrid")
        .collect();
    let mut chart = ChartBuilder::on(root)
        .caption("Top-1 accuracy vs weight bits", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.5f64..8.5f64, 0f64..100f64)?;
    chart
        .configure_mesh()
        .x_desc("weight bits")
        .y_desc("top-1 %")
        .draw()?;
    for (i, r) in rows.iter().filter(|r| r.method == "fp32").enumerate() {
        let y = r.top1 * 100.0;
        chart
            .draw_series(LineSeries::new([(0.5, y), (8.5, y)], BLACK.stroke_width(1)))?
            .label(format!("{} fp32 ({y:.2} %)", r.model))
            .legend(move |(x, yy)| {
                PathElement::new([(x, yy), (x + 16, yy)], BLACK.stroke_width(1 + i as u32))
            });
    }
    let mut keys: Vec<String> = quant.iter().map(|r| series_key(r)).collect();
    keys.sort();
    keys.dedup();
    for (i, key) in keys.iter().enumerate() {
        let color = series_color(i, keys.len());
        let mut pts: Vec<(f64, f64)> = quant
            .iter()
            .filter(|r| &series_key(r) == key)
            .map(|r| (r.weight_bits, r.top1 * 100.0))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(key.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()?;
    Ok(())
}

fn accuracy_vs_size<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    rows: &[Row],
) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    let kib: Vec<f64> = rows.iter().map(|r| r.size_bytes as f64 / 1024.0).collect();
    let all: Vec<&Row> = rows.iter().collect();
    let mut chart = size_axes(
        root,
        &all,
        "Top-1 accuracy vs model file size (Pareto front in black)",
    )?;
    let mut methods: Vec<&str> = rows.iter().map(|r| r.method.as_str()).collect();
    methods.sort();
    methods.dedup();
    for (i, m) in methods.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .zip(&kib)
            .filter(|(r, _)| r.method == *m)
            .map(|(r, &k)| (k, r.top1 * 100.0))
            .collect();
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?
            .label(m.to_string())
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, color.filled()));
    }
    let front = pareto(rows);
    let mut fp: Vec<(f64, f64)> = rows
        .iter()
        .zip(&kib)
        .zip(&front)
        .filter(|(_, &f)| f)
        .map(|((r, &k), _)| (k, r.top1 * 100.0))
        .collect();
    fp.sort_by(|a, b| a.0.total_cmp(&b.0));
    chart
        .draw_series(LineSeries::new(fp, BLACK.stroke_width(2)))?
        .label("Pareto front")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

/// Log-scale file size (KiB) against top-1 (%), spanning `rows`.
fn size_axes<'a, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, plotters::coord::Shift>,
    rows: &[&Row],
    caption: &str,
) -> Result<SizeChart<'a, DB>, DynErr>
where
    DB::ErrorType: 'static,
{
    let kib = |r: &Row| r.size_bytes as f64 / 1024.0;
    let lo = rows
        .iter()
        .map(|r| kib(r))
        .fold(f64::INFINITY, f64::min)
        .max(0.01)
        * 0.8;
    let hi = rows.iter().map(|r| kib(r)).fold(0.0, f64::max) * 1.25;
    let ymin = rows.iter().map(|r| r.top1 * 100.0).fold(100.0, f64::min);
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d((lo..hi).log_scale(), ((ymin - 5.0).max(0.0))..100f64)?;
    chart
        .configure_mesh()
        .x_desc("safetensors file size, KiB (log)")
        .y_desc("top-1 %")
        .draw()?;
    Ok(chart)
}

type SizeChart<'a, DB> = ChartContext<
    'a,
    DB,
    Cartesian2d<
        plotters::coord::combinators::LogCoord<f64>,
        plotters::coord::types::RangedCoordf64,
    >,
>;

/// A row the mixed-precision search produced.
fn is_mixed(r: &Row) -> bool {
    r.method == "hybrid" && r.label.starts_with("mixed ")
}

/// The Pareto fronts of the uniform rows (one method and bit width for every layer) and of the
/// mixed rows of the search, per model, on one accuracy-vs-size chart.
fn mixed_vs_uniform<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    rows: &[Row],
) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    let uniform: Vec<Row> = rows
        .iter()
        .filter(|r| r.method != "hybrid" && r.method != "fp32" && r.act_bits == 32)
        .cloned()
        .collect();
    let mixed: Vec<Row> = rows.iter().filter(|r| is_mixed(r)).cloned().collect();
    let shown: Vec<&Row> = uniform.iter().chain(&mixed).collect();
    let kib = |r: &Row| r.size_bytes as f64 / 1024.0;
    let mut chart = size_axes(
        root,
        &shown,
        "Mixed precision (search) vs uniform quantization: Pareto fronts",
    )?;
    let mut models: Vec<&str> = mixed.iter().map(|r| r.model.as_str()).collect();
    models.sort();
    models.dedup();
    for (i, m) in models.iter().enumerate() {
        for (j, (set, what)) in [(&uniform, "uniform"), (&mixed, "mixed")]
            .into_iter()
            .enumerate()
        {
            let color = PALETTE[(2 * i + j) % PALETTE.len()];
            let of_model: Vec<Row> = set.iter().filter(|r| r.model == *m).cloned().collect();
            chart.draw_series(
                of_model
                    .iter()
                    .map(|r| Circle::new((kib(r), r.top1 * 100.0), 3, color.mix(0.5).filled())),
            )?;
            let front = pareto(&of_model);
            let mut pts: Vec<(f64, f64)> = of_model
                .iter()
                .zip(&front)
                .filter(|(_, &f)| f)
                .map(|(r, _)| (kib(r), r.top1 * 100.0))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(format!("{m} {what} front"))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

/// `search/<model>/sensitivity.svg` (and `.png`): the output SQNR of every (layer, candidate)
/// with only that layer quantized, as a heat map (dark: the layer is sensitive).
pub fn write_search_charts(
    dir: &Path,
    out: &crate::mixed::SearchOutcome,
    png: bool,
) -> Result<(), String> {
    ensure_font()?;
    let dir = dir.join(crate::sys::file_safe(&out.model));
    let mut kinds = vec!["svg"];
    if png {
        kinds.push("png");
    }
    for kind in kinds {
        let tmp = dir.join(format!("sensitivity.partial-{}.{kind}", std::process::id()));
        let size = (
            (220 + 46 * out.layers.len()).max(700) as u32,
            (160 + 26 * out.candidates.len()) as u32,
        );
        let result: Result<(), DynErr> = if kind == "svg" {
            heat_map(SVGBackend::new(&tmp, size).into_drawing_area(), out)
        } else {
            heat_map(BitMapBackend::new(&tmp, size).into_drawing_area(), out)
        };
        result.map_err(|e| format!("sensitivity.{kind}: {e}"))?;
        std::fs::rename(&tmp, dir.join(format!("sensitivity.{kind}")))
            .map_err(|e| format!("sensitivity.{kind}: {e}"))?;
    }
    Ok(())
}

fn heat_map<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    out: &crate::mixed::SearchOutcome,
) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (nl, nc) = (out.layers.len(), out.candidates.len());
    let cands = out.candidates.clone();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: output SQNR (dB) with one layer quantized, the rest fp32",
                out.model
            ),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d((0..nl).into_segmented(), (0..nc).into_segmented())?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("weight layer (index)")
        .x_labels(nl)
        .y_labels(nc)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => i.to_string(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => cands.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    let centre = Pos::new(HPos::Center, VPos::Center);
    for l in 0..nl {
        for c in 0..nc {
            let db = out.table[l * nc + c].output_sqnr_db;
            // 0 dB and below dark red, 40 dB and above pale yellow; fp32 (no noise) white
            let color = match db {
                None => WHITE,
                Some(v) => {
                    let t = (v / 40.0).clamp(0.0, 1.0);
                    let (r, g, b) = HSLColor(0.16 * t, 0.85, 0.18 + 0.7 * t).rgb();
                    RGBColor(r, g, b)
                }
            };
            chart.draw_series(std::iter::once(Rectangle::new(
                [
                    (SegmentValue::Exact(l), SegmentValue::Exact(c)),
                    (SegmentValue::Exact(l + 1), SegmentValue::Exact(c + 1)),
                ],
                color.filled(),
            )))?;
            let text = db.map_or("fp32".to_string(), |v| format!("{v:.0}"));
            let ink = if db.is_some_and(|v| v < 20.0) {
                WHITE
            } else {
                BLACK
            };
            chart.draw_series(std::iter::once(Text::new(
                text,
                (SegmentValue::CenterOf(l), SegmentValue::CenterOf(c)),
                ("sans-serif", 11).into_font().color(&ink).pos(centre),
            )))?;
        }
    }
    root.present()?;
    Ok(())
}

fn latency_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    lat: &[LatencyRecord],
) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    let labels: Vec<String> = lat
        .iter()
        .map(|l| format!("{} {} b{}", l.model, l.method, l.batch))
        .collect();
    let ymax = lat.iter().map(|l| l.ms_per_image).fold(0.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Latency per image (single thread, median)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..lat.len()).into_segmented(), 0f64..ymax.max(1e-6))?;
    chart
        .configure_mesh()
        .y_desc("ms per image")
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(lat.iter().enumerate().map(|(i, l)| {
        let color = PALETTE[i % PALETTE.len()];
        Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), l.ms_per_image),
            ],
            color.filled(),
        )
    }))?;
    Ok(())
}

/// `quantbench plot-bench-history`: the kernel gate's history (`results/bench/history.csv`,
/// written by `cargo xtask bench`) as one SVG (or PNG, by `out`'s extension), a panel per
/// kernel. Each series (instruction
/// count per ISA, speed-up over scalar per ISA) is drawn relative to its first recorded value,
/// so a regression shows as a step away from 1.0 whatever the kernel's scale.
pub fn bench_history_chart(history: &Path, out: &Path) -> Result<(), String> {
    let text =
        std::fs::read_to_string(history).map_err(|e| format!("{}: {e}", history.display()))?;
    let mut lines = text.lines();
    const HEADER: &str = "date,git_sha,kernel,isa,instructions,ratio";
    if lines.next() != Some(HEADER) {
        return Err(format!(
            "{}: expected the header '{HEADER}'",
            history.display()
        ));
    }
    let body: Vec<&str> = lines.collect();
    // (kernel, series) -> [(run index, value)]
    let mut runs: Vec<String> = Vec::new();
    let mut series: HistorySeries = Default::default();
    for (i, line) in body.iter().enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 6 {
            if i + 1 == body.len() {
                eprintln!(
                    "{}: skipping the incomplete last line {}",
                    history.display(),
                    i + 2
                );
                continue;
            }
            return Err(format!(
                "{}: line {}: expected 6 fields, found {}",
                history.display(),
                i + 2,
                f.len()
            ));
        }
        let run = format!("{} {}", f[0], f[1]);
        if runs.last() != Some(&run) {
            runs.push(run);
        }
        let x = runs.len() - 1;
        for (field, what) in [(f[4], "instructions"), (f[5], "speed-up")] {
            if field.is_empty() {
                continue;
            }
            let v: f64 = field.parse().map_err(|_| {
                format!(
                    "{}: line {}: {what} '{field}' is not a number",
                    history.display(),
                    i + 2
                )
            })?;
            series
                .entry((f[2].to_string(), format!("{what} {}", f[3])))
                .or_default()
                .push((x, v));
        }
    }
    if series.is_empty() {
        return Err(format!("{}: no measurements", history.display()));
    }
    ensure_font()?;
    let mut kernels: Vec<String> = series.keys().map(|(k, _)| k.clone()).collect();
    kernels.dedup();
    let mut names: Vec<String> = series.keys().map(|(_, s)| s.clone()).collect();
    names.sort();
    names.dedup();
    let rows = kernels.len().div_ceil(4);
    let png = out.extension().is_some_and(|e| e == "png");
    // the bitmap backend picks its encoder from the extension: keep it last
    let tmp = out.with_extension(format!(
        "partial-{}.{}",
        std::process::id(),
        if png { "png" } else { "svg" }
    ));
    let size = (1600, 60 + 300 * rows as u32);
    let result = if png {
        draw_bench_history(
            BitMapBackend::new(&tmp, size).into_drawing_area(),
            &runs,
            &series,
            &kernels,
            &names,
        )
    } else {
        draw_bench_history(
            SVGBackend::new(&tmp, size).into_drawing_area(),
            &runs,
            &series,
            &kernels,
            &names,
        )
    };
    result.map_err(|e| format!("{}: {e}", out.display()))?;
    std::fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))
}

type HistorySeries = std::collections::BTreeMap<(String, String), Vec<(usize, f64)>>;

fn draw_bench_history<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    runs: &[String],
    series: &HistorySeries,
    kernels: &[String],
    names: &[String],
) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    let cols = 4usize;
    let rows = kernels.len().div_ceil(cols);
    {
        root.fill(&WHITE)?;
        let (title, grid) = root.split_vertically(60);
        title.draw(&Text::new(
            format!(
                "Kernel gate history ({} runs): each series relative to its first value (1.0)",
                runs.len()
            ),
            (20, 20),
            ("sans-serif", 22),
        ))?;
        let panels = grid.split_evenly((rows, cols));
        for (p, kernel) in panels.iter().zip(kernels) {
            let mine: Vec<(&String, Vec<(f64, f64)>)> = series
                .iter()
                .filter(|((k, _), _)| k == kernel)
                .map(|((_, s), pts)| {
                    let first = pts[0].1;
                    let rel = pts
                        .iter()
                        .map(|&(x, v)| (x as f64, if first > 0.0 { v / first } else { 1.0 }))
                        .collect();
                    (s, rel)
                })
                .collect();
            let (lo, hi) = mine
                .iter()
                .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
                .fold((0.8f64, 1.2f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
            let x_hi = (runs.len().max(2) - 1) as f64;
            let mut chart = ChartBuilder::on(p)
                .caption(kernel, ("sans-serif", 15))
                .margin(8)
                .x_label_area_size(22)
                .y_label_area_size(40)
                .build_cartesian_2d(-0.2f64..x_hi + 0.2, lo * 0.95..hi * 1.05)?;
            chart
                .configure_mesh()
                .x_labels(runs.len().clamp(2, 10))
                .x_label_formatter(&|x| format!("{x:.0}"))
                .label_style(("sans-serif", 11))
                .draw()?;
            for (name, pts) in &mine {
                let i = names.iter().position(|n| n == *name).unwrap_or(0);
                let color = series_color(i, names.len());
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 14, y)], color.stroke_width(2))
                    });
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerLeft)
                .background_style(WHITE.mix(0.8))
                .label_font(("sans-serif", 11))
                .draw()?;
        }
        root.present()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qb-report-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bench_history_chart_draws_and_rejects_malformed_lines() {
        let dir = scratch("history");
        let good = "date,git_sha,kernel,isa,instructions,ratio\n\
                    20261127T000000Z,abc,quantize_f32_i8,scalar,537221,\n\
                    20261127T000000Z,abc,quantize_f32_i8,avx2,25955,37.9\n\
                    20261128T000000Z,def,quantize_f32_i8,scalar,537221,\n\
                    20261128T000000Z,def,quantize_f32_i8,avx2,25955,36.1\n";
        let history = dir.join("history.csv");
        // an interrupted append (incomplete last line) is skipped
        std::fs::write(&history, format!("{good}20261129T000000Z,ghi,quant")).unwrap();
        let out = dir.join("history.svg");
        if ensure_font().is_ok() {
            bench_history_chart(&history, &out).unwrap();
            let svg = std::fs::read_to_string(&out).unwrap();
            assert!(svg.contains("quantize_f32_i8") && svg.contains("speed-up avx2"));
        }
        std::fs::write(&history, good.replace("25955,36.1", "25955,fast")).unwrap();
        let e = bench_history_chart(&history, &out).unwrap_err();
        assert!(e.contains("line 5") && e.contains("'fast'"), "{e}");
        std::fs::write(&history, good.replacen(",abc,", ",", 1)).unwrap();
        let e = bench_history_chart(&history, &out).unwrap_err();
        assert!(e.contains("line 2: expected 6 fields, found 5"), "{e}");
        std::fs::write(&history, "when,what\n").unwrap();
        let e = bench_history_chart(&history, &out).unwrap_err();
        assert!(e.contains("expected the header"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
