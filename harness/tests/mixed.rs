//! The mixed-precision search end to end on experiments/smoke-mixed.toml (ResNet-20, 256
//! CIFAR-10 test images, 128 held-out training images): the tables and charts, the budgets
//! respected, the DP never worse than a uniform configuration on its own proxy, the chosen
//! configurations re-run to the same numbers, resume, and the configuration errors.

mod common;

use std::path::{Path, PathBuf};

use common::root;

use quantbench::experiment::Experiment;
use quantbench::runner::{run_experiment, Row, RunOptions};

fn smoke_mixed() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../experiments/smoke-mixed.toml")
}

fn opts(out: &Path) -> RunOptions {
    RunOptions {
        data_root: root(),
        results_root: out.join("results"),
        out_dir: Some(out.to_path_buf()),
        git_sha: "test".into(),
        rustc: "test".into(),
        progress: false,
        threads: None,
        max_memory: None,
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}")))
        .unwrap()
}

fn row<'a>(rows: &'a [Row], cell: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.cell == cell)
        .unwrap_or_else(|| panic!("no row {cell}"))
}

#[test]
fn search_allocates_within_budgets_and_its_choice_reruns_to_the_same_numbers() {
    let tmp = std::env::temp_dir().join(format!("qb-mixed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let first = run_experiment(&smoke_mixed(), &opts(&tmp.join("run"))).unwrap();
    let dir = &first.dir;
    let search = dir.join("search");
    for f in [
        "chosen.toml",
        "resnet20/sensitivity.csv",
        "resnet20/sensitivity.svg",
    ] {
        assert!(search.join(f).is_file(), "{f} missing");
    }
    assert!(dir.join("mixed_vs_uniform.svg").is_file());
    let summary = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    assert!(summary.contains("## Mixed precision (search)"), "{summary}");

    // the sensitivity table: every (layer, candidate) once, in order
    let csv = std::fs::read_to_string(search.join("resnet20/sensitivity.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().skip(1).collect();
    let cands = ["km2pt", "km3pt", "km4pt", "lin4pcs", "lin8pcs"];
    assert_eq!(lines.len(), 20 * cands.len());
    let mut weights = 0u64;
    let mut noise = vec![[0f64; 5]; 20];
    let mut bytes = vec![[0u64; 5]; 20];
    for (i, line) in lines.iter().enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f[0].parse::<usize>().unwrap(), i / cands.len(), "{line}");
        assert_eq!(f[3], cands[i % cands.len()], "{line}");
        if i % 5 == 0 {
            weights += f[2].parse::<u64>().unwrap();
        }
        bytes[i / 5][i % 5] = f[4].parse().unwrap();
        noise[i / 5][i % 5] = f[8].parse().unwrap();
        let drop: f64 = f[7].parse().unwrap();
        assert!((-1.0..=1.0).contains(&drop), "{line}");
    }
    // more bits, less weight error: the 8-bit linear layer is quieter than the 2-bit k-means one
    for l in 0..20 {
        assert!(noise[l][4] < noise[l][0], "layer {l}: {:?}", noise[l]);
        assert!(
            bytes[l][0] < bytes[l][1] && bytes[l][1] < bytes[l][2],
            "{:?}",
            bytes[l]
        );
    }

    // one row against a direct evaluation: layer 10 as 2-bit k-means, the rest fp32, on the
    // held-out images (training images 64..192); the search runs only the nodes after the
    // layer per candidate, which must give the same logits
    {
        use quantbench::data::{Dataset, DatasetKind, Normalization, Split};
        use quantbench::engine::Engine;
        use quantbench::eval::{evaluate, EvalOptions};
        use quantbench::experiment::{Granularity, KMeansMode, WeightScheme};
        let graph =
            quantbench::model::Graph::load(&root().join("models/resnet20/resnet20.onnx")).unwrap();
        let mut held = Dataset::load(&root(), DatasetKind::Cifar10, Split::Train).unwrap();
        let per = 3 * 32 * 32;
        held.pixels = held.pixels[64 * per..192 * per].to_vec();
        held.labels = held.labels[64..192].to_vec();
        let norm: Normalization = DatasetKind::Cifar10.default_normalization();
        let o = EvalOptions {
            progress: false,
            ..Default::default()
        };
        let base = evaluate(&Engine::new(&graph), &held, &norm, &o, None).unwrap();
        let r = graph.weights()[10];
        let k = quantbench_kernels::Kernels::active();
        let scheme = WeightScheme::Kmeans {
            bits: 2,
            granularity: Granularity::PerTensor,
            mode: KMeansMode::Exact,
        };
        let w = graph.constants[r.value].as_ref().unwrap();
        let qw = quantbench::quant::quantize_weight(&k, "w", w, r.out_axis, &scheme).unwrap();
        let mut g = graph.clone();
        g.set_constant(r.value, qw.dequantized).unwrap();
        let q = evaluate(&Engine::new(&g), &held, &norm, &o, None).unwrap();
        let noise: f64 = base
            .logits
            .iter()
            .zip(&q.logits)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum::<f64>()
            / 128.0;
        let f: Vec<&str> = lines[10 * 5].split(',').collect();
        assert_eq!(f[3], "km2pt");
        let top1: f64 = f[6].parse().unwrap();
        assert!((top1 - q.top1).abs() < 1e-6, "{top1} vs {}", q.top1);
        let want: f64 = f[8].parse().unwrap();
        assert!((noise - want).abs() <= 1e-6 * want, "{noise} vs {want}");
    }

    let meta = json(&dir.join("meta.json"));
    let allocs = meta["search"]["resnet20"]["allocations"]
        .as_array()
        .unwrap();
    assert_eq!(allocs.len(), 3);
    for a in allocs {
        let file = a["file_bytes"].as_u64().unwrap();
        let mixed = row(&first.rows, a["cell"].as_str().unwrap());
        // the reported model file is the one the budget was checked on
        assert_eq!(mixed.size_bytes, file, "{a}");
        match a["budget"].as_str().unwrap() {
            "2.5bpw" => {
                let wb = a["weight_bytes"].as_u64().unwrap();
                assert!(wb as f64 * 8.0 <= 2.5 * weights as f64, "{a}");
                assert!(wb > 0);
            }
            b => {
                let uniform = row(&first.rows, a["size_of"].as_str().unwrap());
                assert!(
                    file <= uniform.size_bytes,
                    "{b}: {file} > {}",
                    uniform.size_bytes
                );
                // the DP's proxy (summed single-layer noise) is never above the uniform
                // configuration's, which fits the same budget
                let tag = b.trim_start_matches("size-of-");
                let c = cands.iter().position(|x| *x == tag).unwrap();
                let uniform_proxy: f64 = noise.iter().map(|n| n[c]).sum();
                let dp = a["dp_proxy_noise"].as_f64().unwrap();
                assert!(
                    dp <= uniform_proxy * (1.0 + 1e-9),
                    "{b}: {dp} > {uniform_proxy}"
                );
            }
        }
        let choice = a["choice"].as_array().unwrap();
        assert_eq!(choice.len(), 20);
    }

    // the chosen configurations, re-run from the written experiment file
    let chosen = search.join("chosen.toml");
    let again = run_experiment(&chosen, &opts(&tmp.join("chosen"))).unwrap();
    let mut compared = 0;
    for r in again.rows.iter().filter(|r| r.method == "hybrid") {
        let m = row(&first.rows, &r.cell);
        assert_eq!(
            (m.top1, m.top5, m.size_bytes, m.weight_sqnr_db),
            (r.top1, r.top5, r.size_bytes, r.weight_sqnr_db),
            "{}",
            r.cell
        );
        compared += 1;
    }
    assert_eq!(compared, 3);

    // resume: everything is cached, the same rows come back
    let stamp = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let cache = search.join("resnet20/sensitivity-000.json");
    let before = stamp(&cache);
    let resumed = run_experiment(&smoke_mixed(), &opts(&tmp.join("run"))).unwrap();
    assert_eq!(resumed.skipped, resumed.rows.len());
    assert_eq!(stamp(&cache), before);
    for r in &resumed.rows {
        assert_eq!(row(&first.rows, &r.cell).top1, r.top1);
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

fn parse_err(text: &str) -> String {
    let original = std::fs::read_to_string(smoke_mixed()).unwrap();
    let text = original.replace(
        "budgets = [{ size_of = \"km3pt\" }, { size_of = \"lin4pcs\" }, { bits_per_weight = 2.5 }]",
        text,
    );
    Experiment::parse(&text, Some(&root())).unwrap_err()
}

#[test]
fn search_configuration_errors_name_the_key() {
    let e = parse_err("budgets = [{ size_of = \"km5pt\" }]");
    assert!(
        e.contains("search.budgets[0]") && e.contains("km5pt"),
        "{e}"
    );
    let e = parse_err("budgets = [{ size_of = \"km3pt\", bytes = 10 }]");
    assert!(e.contains("exactly one"), "{e}");
    let e = parse_err("budgets = [{ bits_per_weight = 0.0 }]");
    assert!(e.contains("bits_per_weight"), "{e}");
    let e = parse_err("budgets = []");
    assert!(e.contains("search.budgets"), "{e}");
    let e = parse_err("budgets = [{ bytes = 100000 }]\nfoo = 1");
    assert!(e.contains("foo"), "{e}");
    let original = std::fs::read_to_string(smoke_mixed()).unwrap();
    let e = Experiment::parse(
        &original.replace(
            "method = \"linear\", bits = [4, 8]",
            "method = \"integer_only\"",
        ),
        Some(&root()),
    )
    .unwrap_err();
    assert!(e.contains("search.candidates[1]"), "{e}");
    // held-out images from the evaluated split are refused
    let e = Experiment::parse(
        &original.replace("split = \"train\"", "split = \"test\""),
        Some(&root()),
    )
    .unwrap_err();
    assert!(e.contains("search") && e.contains("evaluated split"), "{e}");
}

#[test]
fn a_budget_below_the_smallest_configuration_is_a_clear_error() {
    let original = std::fs::read_to_string(smoke_mixed()).unwrap();
    let text = original
        .replace(
            "budgets = [{ size_of = \"km3pt\" }, { size_of = \"lin4pcs\" }, { bits_per_weight = 2.5 }]",
            "budgets = [{ bytes = 1000 }]",
        )
        .replace("samples = 128", "samples = 8")
        .replace("bits = [2, 3]\ngranularity", "bits = 3\ngranularity");
    let tmp = std::env::temp_dir().join(format!("qb-mixed-small-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let file = tmp.join("small.toml");
    std::fs::write(&file, text).unwrap();
    let e = match run_experiment(&file, &opts(&tmp.join("run"))) {
        Ok(_) => panic!("a 1000-byte budget cannot be met"),
        Err(e) => e,
    };
    assert!(e.contains("1000B") && e.contains("too small"), "{e}");
    // no half-written result files
    assert!(!tmp.join("run/summary.md").exists());
    std::fs::remove_dir_all(&tmp).unwrap();
}
