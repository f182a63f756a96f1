//! The experiment runner end to end on experiments/smoke.toml (ResNet-20, 256 CIFAR-10 test
//! images), resume, and the configuration errors.

mod common;

use std::path::{Path, PathBuf};

use common::root;

use quantbench::experiment::Experiment;
use quantbench::runner::{run_experiment, RunOptions};

fn smoke() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../experiments/smoke.toml")
}

fn opts(out: &Path) -> RunOptions {
    RunOptions {
        data_root: root(),
        results_root: out.join("results"),
        out_dir: Some(out.join("run")),
        git_sha: "test".into(),
        rustc: "test".into(),
        progress: false,
        threads: None,
        max_memory: None,
    }
}

#[test]
fn smoke_experiment_writes_every_result_and_resumes() {
    let tmp = std::env::temp_dir().join(format!("qb-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let first = run_experiment(&smoke(), &opts(&tmp)).unwrap();
    let dir = &first.dir;
    for f in [
        "runs.parquet",
        "runs.csv",
        "summary.md",
        "meta.json",
        "latency.csv",
        "accuracy_vs_size.svg",
        "accuracy_vs_bits.svg",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    // No temporary file is left behind.
    let leftovers: Vec<_> = common::files(dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let rows = &first.rows;
    let cells = Experiment::load(&smoke(), Some(&root()))
        .unwrap()
        .0
        .cells()
        .unwrap();
    assert_eq!(rows.len(), cells.len());
    let fp32 = rows.iter().find(|r| r.method == "fp32").unwrap();
    // The fp32 row agrees with a direct evaluation of the same images.
    let g = quantbench::model::Graph::load(&root().join("models/resnet20/resnet20.onnx")).unwrap();
    let mut ds = quantbench::data::Dataset::load(
        &root(),
        quantbench::data::DatasetKind::Cifar10,
        quantbench::data::Split::Test,
    )
    .unwrap();
    ds.truncate(256);
    let direct = quantbench::eval::evaluate(
        &quantbench::engine::Engine::new(&g),
        &ds,
        &quantbench::data::DatasetKind::Cifar10.default_normalization(),
        &quantbench::eval::EvalOptions {
            progress: false,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    assert_eq!(fp32.top1, direct.top1);
    assert!(fp32.latency_ms_b1.is_some() && fp32.latency_ms_bn.is_some());
    // Sizes are the files on disk, and the methods order as they must.
    for r in rows {
        let file = dir.join("models").join(format!("{}.safetensors", r.cell));
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            r.size_bytes,
            "{}",
            r.cell
        );
    }
    let by = |id: &str| {
        rows.iter()
            .find(|r| r.cell == format!("resnet20--{id}"))
            .unwrap_or_else(|| panic!("{id}"))
    };
    assert!(
        by("lin8pcs").size_bytes * 3 < fp32.size_bytes,
        "8-bit is > 3x smaller"
    );
    assert!(by("km2pt").size_bytes < by("km4pt").size_bytes);
    assert!(
        (by("lin8pcs").top1 - fp32.top1).abs() < 0.02,
        "8-bit weights keep the accuracy"
    );
    assert!(
        by("km2pt").top1 < 0.5,
        "2-bit k-means per tensor collapses: {}",
        by("km2pt").top1
    );
    assert!(by("lin8pcs-a8minmax").act_bits == 8 && by("lin8pcs-a8minmax").calibration == "minmax");
    // integer_only: the real int8 path, its simulation alongside, latency measured
    let int8 = by("int8-lin8pcs-a8minmax");
    let sim = int8.sim_top1.expect("integer_only reports its simulation");
    assert!(
        (int8.top1 - sim).abs() <= 2.0 / 256.0 + 1e-9,
        "int8 {} vs simulation {sim} on 256 images",
        int8.top1
    );
    assert!((int8.top1 - fp32.top1).abs() < 0.03, "{}", int8.top1);
    assert!(int8.latency_ms_b1.is_some() && int8.latency_ms_bn.is_some());
    assert!(rows
        .iter()
        .filter(|r| r.method != "integer_only")
        .all(|r| r.sim_top1.is_none()));
    let w4 = by("lin4pcs").weight_sqnr_db.unwrap();
    let w8 = by("lin8pcs").weight_sqnr_db.unwrap();
    assert!(
        w8 > w4 + 18.0,
        "4 more bits add ~24 dB of SQNR: {w4} -> {w8}"
    );
    // The CSV has one line per row plus the header, with the required columns.
    let csv = std::fs::read_to_string(dir.join("runs.csv")).unwrap();
    assert_eq!(csv.lines().count(), rows.len() + 1);
    for col in [
        "model",
        "method",
        "weight_bits",
        "act_bits",
        "granularity",
        "symmetric",
        "calibration",
        "top1",
        "top1_delta",
        "top5",
        "sim_top1",
        "size_bytes",
        "compression",
        "weight_sqnr_db",
        "latency_ms_b1",
        "latency_ms_bN",
        "quantize_s",
        "isa",
    ] {
        assert!(
            csv.lines().next().unwrap().split(',').any(|c| c == col),
            "column {col}"
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["cells"], rows.len());

    // Resume: a removed cell is recomputed, the others are skipped, numbers identical.
    let victim = dir.join("cells/resnet20--km4pt.json");
    std::fs::remove_file(&victim).unwrap();
    let second = run_experiment(&smoke(), &opts(&tmp)).unwrap();
    assert_eq!(second.skipped, rows.len() - 1);
    let strip = |rs: &[quantbench::runner::Row]| -> Vec<(String, f64, f64, u64)> {
        rs.iter()
            .map(|r| (r.cell.clone(), r.top1, r.top5, r.size_bytes))
            .collect()
    };
    assert_eq!(
        strip(&second.rows),
        strip(rows),
        "same config, same numbers"
    );
    std::fs::remove_dir_all(&tmp).ok();
}

const BASE: &str = r#"
name = "t"
[data]
dataset = "cifar10"
[[models]]
name = "m"
path = "models/resnet20/resnet20.onnx"
"#;

#[test]
fn configuration_errors_name_the_key_line_and_column() {
    let r = root();
    assert!(Experiment::parse(BASE, Some(&r)).is_ok());
    let e = Experiment::parse(&format!("{BASE}\nfrobnicate = 1\n"), Some(&r)).unwrap_err();
    assert!(e.contains("frobnicate") && e.contains("line"), "{e}");
    let e = Experiment::parse(
        &BASE.replace(
            "dataset = \"cifar10\"",
            "dataset = \"cifar10\"\nbatch = \"big\"",
        ),
        Some(&r),
    )
    .unwrap_err();
    assert!(e.contains("line 5") && e.contains("batch"), "{e}");
    let e = Experiment::parse(&BASE.replace("cifar10", "imagenet"), Some(&r)).unwrap_err();
    assert!(e.contains("imagenet"), "{e}");
    let e = Experiment::parse(
        &format!("{BASE}\n[[methods]]\nmethod = \"kmeans\"\nbits = 9\n"),
        Some(&r),
    )
    .unwrap_err();
    assert!(e.contains("methods[0]") && e.contains("kmeans"), "{e}");
    let e = Experiment::parse(
        &format!("{BASE}\n[[methods]]\nmethod = \"linear\"\n"),
        Some(&r),
    )
    .unwrap_err();
    assert!(e.contains("'bits' is required"), "{e}");
    let e = Experiment::parse(
        &format!("{BASE}\n[[methods]]\nmethod = \"linear\"\nbits = 8\nact_bits = 12\n"),
        Some(&r),
    )
    .unwrap_err();
    assert!(e.contains("act_bits = 12"), "{e}");
    let e = Experiment::parse(&format!("{BASE}\n[[methods]]\nmethod = \"fixed_point\"\nbits = 8\nsymmetric = true\nint_bits = 1\n"), Some(&r)).unwrap_err();
    assert!(e.contains("'symmetric' does not apply"), "{e}");
    let e =
        Experiment::parse(&BASE.replace("resnet20.onnx", "missing.onnx"), Some(&r)).unwrap_err();
    assert!(
        e.contains("missing.onnx") && e.contains("does not exist"),
        "{e}"
    );
    for (extra, want) in [
        ("bits = 4", "integer_only runs 8-bit weights"),
        ("act_bits = 6", "integer_only runs 8-bit activations"),
        (
            "granularity = \"per_tensor\"",
            "granularity must be \"per_channel\"",
        ),
        ("symmetric = false", "symmetric (zero point 0)"),
        ("int_bits = 2", "'int_bits' does not apply"),
    ] {
        let e = Experiment::parse(
            &format!("{BASE}\n[[methods]]\nmethod = \"integer_only\"\n{extra}\n"),
            Some(&r),
        )
        .unwrap_err();
        assert!(e.contains(want), "{extra}: {e}");
    }
    let exp = Experiment::parse(
        &format!(
            "{BASE}\n[[methods]]\nmethod = \"integer_only\"\ncalibration = [\"minmax\", \"mse\"]\n"
        ),
        Some(&r),
    )
    .unwrap();
    let ids: Vec<String> = exp.cells().unwrap().iter().map(|c| c.id.clone()).collect();
    assert!(
        ids.contains(&"m--int8-lin8pcs-a8minmax".to_string()),
        "{ids:?}"
    );
    assert!(
        ids.contains(&"m--int8-lin8pcs-a8mse".to_string()),
        "{ids:?}"
    );
    // Grid expansion: 2 bits x 2 granularities x 2 activation settings, plus the fp32 row.
    let exp = Experiment::parse(
        &format!("{BASE}\n[[methods]]\nmethod = \"linear\"\nbits = [8, 4]\ngranularity = [\"per_tensor\", \"per_channel\"]\nact_bits = [32, 8]\n"),
        Some(&r),
    )
    .unwrap();
    let cells = exp.cells().unwrap();
    assert_eq!(cells.len(), 1 + 8);
    let mut ids: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), cells.len(), "cell ids are unique");
}

#[test]
fn hybrid_selector_that_matches_nothing_is_an_error() {
    let r = root();
    let text = format!(
        "{BASE}\n[[methods]]\nmethod = \"hybrid\"\ndefault = {{ method = \"kmeans\", bits = 3 }}\noverrides = [{{ layers = [\"no_such_layer\"], method = \"linear\", bits = 8 }}]\n"
    );
    let exp = Experiment::parse(&text, Some(&r)).unwrap();
    let g = quantbench::model::Graph::load(&exp.models[0].path).unwrap();
    let cell = exp
        .cells()
        .unwrap()
        .into_iter()
        .find(|c| c.method == quantbench::experiment::MethodKind::Hybrid)
        .unwrap();
    let e = quantbench::quant::quantize_model(&quantbench_kernels::Kernels::active(), &g, &cell)
        .err()
        .unwrap();
    assert!(e.contains("no_such_layer"), "{e}");
}

/// Every shipped experiment file parses and expands into cells (a typo in one is caught here,
/// not an hour into a run).
#[test]
fn every_shipped_experiment_parses() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../experiments");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let exp = Experiment::parse(&text, Some(&root()))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let cells = exp
            .cells()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(cells.len() > 1, "{}", path.display());
        n += 1;
    }
    assert!(n >= 8, "{n} experiment files");
}
