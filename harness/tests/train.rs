//! Training through the whole of ResNet-20 and MNIST-8: the backward pass against finite
//! differences of the real loss, and a fine-tuning run that lowers the loss.

mod common;

use common::root;
use quantbench::data::{Dataset, DatasetKind, Split};
use quantbench::model::{Graph, Tensor};
use quantbench::train::autograd;

fn loss(g: &Graph, x: &Tensor, labels: &[u8]) -> f64 {
    let vals = autograd::forward(g, x.clone(), None).unwrap();
    let logits = vals[g.output].as_ref().unwrap();
    autograd::softmax_cross_entropy(logits, labels, labels.len())
        .unwrap()
        .0
        / labels.len() as f64
}

fn check_model(path: &str, kind: DatasetKind, split: Split) {
    let g = Graph::load(&root().join(path)).unwrap();
    autograd::check_graph(&g).unwrap();
    let data = Dataset::load(&root(), kind, split).unwrap();
    let norm = kind.default_normalization();
    // MNIST-8 is exported with a fixed batch of 1
    let b = if kind == DatasetKind::Mnist { 1 } else { 3 };
    let x = data.batch(0..b, &norm);
    let labels = &data.labels[0..b];
    let vals = autograd::forward(&g, x.clone(), None).unwrap();
    let logits = vals[g.output].as_ref().unwrap();
    let (_, d, _) = autograd::softmax_cross_entropy(logits, labels, labels.len()).unwrap();
    let mut trainable = vec![false; g.value_names.len()];
    let refs = g.weights();
    for r in &refs {
        trainable[r.value] = true;
    }
    let grads = autograd::backward(&g, &vals, d, &trainable).unwrap();
    let mut checked = 0;
    for (li, r) in refs.iter().enumerate() {
        let gw = grads[r.value]
            .as_ref()
            .unwrap_or_else(|| panic!("no gradient for layer {li}"));
        let w = g.constants[r.value].as_ref().unwrap();
        // the coordinate with the largest gradient (a clear signal), and one more
        let big = (0..gw.len())
            .max_by(|&a, &b| gw[a].abs().total_cmp(&gw[b].abs()))
            .unwrap();
        for i in [big, (li * 7919) % gw.len()] {
            let eps = 1e-2f32 * w.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
            let mut plus = g.clone();
            let mut data = w.data.clone();
            data[i] += eps;
            plus.set_constant(r.value, data.clone()).unwrap();
            let mut minus = g.clone();
            data[i] -= 2.0 * eps;
            minus.set_constant(r.value, data).unwrap();
            let num = (loss(&plus, &x, labels) - loss(&minus, &x, labels)) / (2.0 * eps as f64);
            let ana = gw[i] as f64;
            // finite differences straddle ReLU kinks: the tolerance is relative to the
            // coordinate and to the layer's largest gradient
            let scale = gw[big].abs() as f64;
            assert!(
                (num - ana).abs() <= 1e-5 + 0.05 * num.abs().max(ana.abs()) + 0.02 * scale,
                "{path}: layer {li} weight {i}: analytic {ana}, numeric {num}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * refs.len());
}

#[test]
fn resnet20_weight_gradients_match_finite_differences() {
    check_model(
        "models/resnet20/resnet20.onnx",
        DatasetKind::Cifar10,
        Split::Train,
    );
}

#[test]
fn mnist8_weight_gradients_match_finite_differences() {
    check_model(
        "models/mnist-8/mnist-8.onnx",
        DatasetKind::Mnist,
        Split::Test,
    );
}

fn qat_experiment() -> String {
    "name = \"qat-test\"\nseed = 3\n\n[data]\ndataset = \"cifar10\"\nsplit = \"test\"\nlimit = 200\nbatch = 100\n\n\
     [[models]]\nname = \"resnet20\"\npath = \"models/resnet20/resnet20.onnx\"\n\n\
     [[methods]]\nmethod = \"kmeans\"\nbits = 2\ngranularity = \"per_channel\"\n\
     finetune = { epochs = 2, lr = 0.001, samples = 512, batch_size = 32 }\n\n\
     [latency]\nbatch_sizes = [1]\nrepetitions = 1\n\n[report]\ncharts = false\n"
        .to_string()
}

fn run(dir: &std::path::Path, text: &str) -> quantbench::runner::RunSummary {
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("qat.toml");
    std::fs::write(&file, text).unwrap();
    quantbench::runner::run_experiment(
        &file,
        &quantbench::runner::RunOptions {
            data_root: root(),
            results_root: dir.join("results"),
            out_dir: Some(dir.join("run")),
            git_sha: "test".into(),
            rustc: "test".into(),
            progress: false,
            threads: None,
            max_memory: None,
        },
    )
    .unwrap()
}

#[test]
fn finetuning_recovers_kmeans_accuracy_with_a_control_row_and_is_deterministic() {
    let tmp = std::env::temp_dir().join(format!("qb-qat-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let a = run(&tmp.join("a"), &qat_experiment());
    let cells: Vec<&str> = a.rows.iter().map(|r| r.cell.as_str()).collect();
    assert_eq!(
        cells,
        [
            "resnet20--fp32",
            "resnet20--fp32-ft2e-lr0.001-n512-b32",
            "resnet20--km2pc-ft2e-lr0.001-n512-b32"
        ]
    );
    let km = &a.rows[2];
    let before = km
        .top1_before
        .expect("fine-tuned cells report the accuracy before");
    // 2-bit k-means per channel loses most of its accuracy (about 30 % on the test set); fine-tuning its centroids on 512 images
    // for two epochs already wins a lot back
    assert!(
        km.top1 > before + 0.10,
        "before {before}, after {}",
        km.top1
    );
    assert!(km.train_images_per_s.unwrap() > 0.0);
    // latency is measured once for fp32: the fine-tuned control runs the same kernels
    assert!(a.rows[0].latency_ms_b1.is_some());
    assert_eq!(a.rows[1].latency_ms_b1, None);
    // the stored model keeps 2-bit indices: same size as the untuned cell's file would be
    assert!(km.size_bytes < 90_000, "{}", km.size_bytes);
    // the training log is in the cell record; the loss falls from epoch 1 to 2
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            a.dir
                .join("cells/resnet20--km2pc-ft2e-lr0.001-n512-b32.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let epochs = rec["train"]["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 2);
    assert!(epochs[1]["loss"].as_f64().unwrap() < epochs[0]["loss"].as_f64().unwrap());
    let summary = std::fs::read_to_string(a.dir.join("summary.md")).unwrap();
    assert!(summary.contains("## Fine-tuning"), "{summary}");
    // the same configuration gives the same numbers
    let b = run(&tmp.join("b"), &qat_experiment());
    for (x, y) in a.rows.iter().zip(&b.rows) {
        assert_eq!(
            (x.top1, x.top5, x.size_bytes),
            (y.top1, y.top5, y.size_bytes),
            "{}",
            x.cell
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn finetune_configuration_errors_name_the_key() {
    let base = qat_experiment();
    let parse = |t: &str| quantbench::experiment::Experiment::parse(t, Some(&root())).unwrap_err();
    let e = parse(&base.replace("epochs = 2", "epochs = 0"));
    assert!(
        e.contains("methods[0]") && e.contains("finetune.epochs"),
        "{e}"
    );
    let e = parse(&base.replace("lr = 0.001", "lr = -1.0"));
    assert!(e.contains("finetune.lr"), "{e}");
    let e = parse(&base.replace("batch_size = 32", "batch_size = 32, steps = 4"));
    assert!(e.contains("steps"), "{e}");
    let e = parse(&base.replace("batch_size = 32", "batch_size = 32, learn_scale = true"));
    assert!(e.contains("learn_scale") && e.contains("act_bits"), "{e}");
    let e = parse(
        &base
            .replace(
                "method = \"kmeans\"\nbits = 2",
                "method = \"linear\"\nbits = 4",
            )
            .replace("batch_size = 32", "batch_size = 32, reassign = true"),
    );
    assert!(e.contains("reassign") && e.contains("kmeans"), "{e}");
    let e = parse(&base.replace("batch_size = 32", "batch_size = 32, warmup = 3.0"));
    assert!(e.contains("finetune.warmup"), "{e}");
    let e = parse(&base.replace("batch_size = 32", "batch_size = 32, clip_norm = 0.0"));
    assert!(e.contains("finetune.clip_norm"), "{e}");
    let e = parse(&base.replace("batch_size = 32", "batch_size = 32, schedule = \"linear\""));
    assert!(e.contains("schedule"), "{e}");
    let e = parse(&base.replace(
        "granularity = \"per_channel\"\n",
        "granularity = \"per_channel\"\nact_edges = \"fused\"\n",
    ));
    assert!(e.contains("act_edges") && e.contains("act_bits"), "{e}");
    let kd = |d: &str| {
        parse(&base.replace(
            "batch_size = 32",
            &format!("batch_size = 32, distill = {d}"),
        ))
    };
    let e = kd("{ weight = 1.5 }");
    assert!(e.contains("finetune.distill.weight"), "{e}");
    let e = kd("{ temperature = 0.0 }");
    assert!(e.contains("finetune.distill.temperature"), "{e}");
    let e = kd("{ weight = 0.5, tau = 2.0 }");
    assert!(e.contains("tau"), "{e}");
}

/// Distillation from the fine-tuned fp32 control: the control trains without it, the k-means
/// cell distills from the control's stored weights and wins accuracy back.
#[test]
fn distillation_trains_the_cell_from_its_fine_tuned_control() {
    let text = qat_experiment().replace(
        "batch_size = 32 }",
        "batch_size = 32, distill = { weight = 1.0, temperature = 1.0 } }",
    );
    let tmp = std::env::temp_dir().join(format!("qb-qat-kd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let a = run(&tmp, &text);
    let cells: Vec<&str> = a.rows.iter().map(|r| r.cell.as_str()).collect();
    assert_eq!(
        cells,
        [
            "resnet20--fp32",
            "resnet20--fp32-ft2e-lr0.001-n512-b32",
            "resnet20--km2pc-ft2e-lr0.001-n512-b32-kd1t1"
        ]
    );
    assert_eq!(a.rows[2].control.as_deref(), Some(cells[1]));
    let km = &a.rows[2];
    let before = km.top1_before.unwrap();
    assert!(
        km.top1 > before + 0.10,
        "before {before}, after {}",
        km.top1
    );
    // the teacher is read back from the control's stored model: it holds the trained weights
    let pretrained = Graph::load(&root().join("models/resnet20/resnet20.onnx")).unwrap();
    let models = a.dir.join("models");
    let teacher = quantbench::quant::read_fp32_model(
        &pretrained,
        &models.join(format!("{}.safetensors", cells[1])),
    )
    .unwrap();
    let changed = (0..pretrained.constants.len())
        .filter(|&v| pretrained.constants[v] != teacher.constants[v])
        .count();
    assert!(
        changed > 20,
        "{changed} constants differ from the pretrained ones"
    );
    // a quantized cell's file is no fp32 model: the error names the file and the tensor
    let e = quantbench::quant::read_fp32_model(
        &pretrained,
        &models.join(format!("{}.safetensors", cells[2])),
    )
    .unwrap_err();
    assert!(e.contains("km2pc") && e.contains("no tensor"), "{e}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// W4A4 with learned activation step sizes, and k-means with per-epoch re-assignment.
#[test]
fn activation_qat_learns_step_sizes_and_kmeans_reassigns_indices() {
    let text = "name = \"qat-act\"\nseed = 5\n\n[data]\ndataset = \"cifar10\"\nsplit = \"test\"\nlimit = 200\nbatch = 100\n\n\
     [calibration]\nsamples = 64\n\n\
     [[models]]\nname = \"resnet20\"\npath = \"models/resnet20/resnet20.onnx\"\n\n\
     [[methods]]\nmethod = \"linear\"\nbits = 4\ngranularity = \"per_channel\"\nact_bits = 4\ncalibration = \"percentile\"\n\n\
     [[methods]]\nmethod = \"linear\"\nbits = 4\ngranularity = \"per_channel\"\nact_bits = 4\ncalibration = \"percentile\"\n\
     finetune = { epochs = 2, lr = 0.002, samples = 256, batch_size = 32, learn_scale = true }\n\n\
     [[methods]]\nmethod = \"kmeans\"\nbits = 2\ngranularity = \"per_channel\"\n\
     finetune = { epochs = 2, lr = 0.002, samples = 256, batch_size = 32, reassign = true }\n\n\
     [latency]\nbatch_sizes = [1]\nrepetitions = 1\n\n[report]\ncharts = false\n";
    let tmp = std::env::temp_dir().join(format!("qb-qat-act-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let a = run(&tmp, text);
    let cells: Vec<&str> = a.rows.iter().map(|r| r.cell.as_str()).collect();
    // one control serves both: the quantized-training options do not apply to fp32
    assert_eq!(
        cells,
        [
            "resnet20--fp32",
            "resnet20--lin4pcs-a4percentile",
            "resnet20--fp32-ft2e-lr0.002-n256-b32",
            "resnet20--lin4pcs-a4percentile-ft2e-lr0.002-n256-b32-lsq",
            "resnet20--km2pc-ft2e-lr0.002-n256-b32-ra",
        ]
    );
    // the accuracy before fine-tuning is the post-training W4A4 cell's (same calibration)
    assert_eq!(a.rows[3].top1_before, Some(a.rows[1].top1));
    assert_eq!(a.rows[3].control.as_deref(), Some(cells[2]));
    assert_eq!(a.rows[4].control.as_deref(), Some(cells[2]));
    let summary = std::fs::read_to_string(a.dir.join("summary.md")).unwrap();
    let w4a4 = summary
        .lines()
        .find(|l| l.contains("| lin4pcs-a4percentile-ft2e"))
        .unwrap();
    // before, after, the control's top-1 and the difference are all there
    assert!(!w4a4.contains("| - |"), "{w4a4}");
    let record = |cell: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(a.dir.join(format!("cells/{cell}.json"))).unwrap())
            .unwrap()
    };
    let rec = record(cells[3]);
    let scales = rec["train"]["act_scales"].as_array().unwrap();
    // ResNet-20: the input and every node output but the logits
    assert!(scales.len() > 40, "{}", scales.len());
    let moved = scales
        .iter()
        .filter(|s| s[1].as_f64().unwrap() != s[2].as_f64().unwrap())
        .count();
    // the step sizes were trained, the input's included (after 16 small steps, one whose
    // gradient stays below half an ulp of its scale may not have moved)
    assert!(
        moved * 10 >= scales.len() * 9,
        "{moved} of {}: {scales:?}",
        scales.len()
    );
    assert_ne!(scales[0][1], scales[0][2], "the input's step size");
    let rec = record(cells[4]);
    let reassigned = rec["train"]["epochs"][0]["reassigned"].as_u64().unwrap();
    assert!(reassigned > 0, "no weight changed its centroid");
    // not after the last epoch
    assert!(rec["train"]["epochs"][1]["reassigned"].is_null());
    // the stored model still holds 2-bit indices
    assert!(a.rows[4].size_bytes < 90_000, "{}", a.rows[4].size_bytes);
    std::fs::remove_dir_all(&tmp).unwrap();
}
