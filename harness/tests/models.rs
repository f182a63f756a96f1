//! The pretrained models on the real data of the shared data root: accuracy and parity with
//! ONNX Runtime's logits, plus the data-set error paths.

mod common;

use common::root;
use quantbench::data::{Dataset, DatasetKind, Split};
use quantbench::engine::Engine;
use quantbench::eval::{evaluate, EvalOptions};
use quantbench::model::Graph;

fn quiet() -> EvalOptions {
    EvalOptions {
        progress: false,
        ..Default::default()
    }
}

/// ResNet-20 and the CIFAR-10 normalization, the first `calib` training images and the test
/// split.
fn resnet20(calib: usize) -> (Graph, quantbench::data::Normalization, Dataset, Dataset) {
    let root = root();
    let g = Graph::load(&root.join("models/resnet20/resnet20.onnx")).unwrap();
    let norm = DatasetKind::Cifar10.default_normalization();
    let mut train = Dataset::load(&root, DatasetKind::Cifar10, Split::Train).unwrap();
    train.truncate(calib);
    let test = Dataset::load(&root, DatasetKind::Cifar10, Split::Test).unwrap();
    (g, norm, train, test)
}

/// 8-bit activations calibrated with min-max on every edge.
fn minmax8() -> quantbench::calib::CalibRequest {
    use quantbench::experiment::{ActEdges, CalibMethod};
    quantbench::calib::CalibRequest {
        bits: 8,
        method: CalibMethod::Minmax,
        percentile: 99.99,
        edges: ActEdges::All,
    }
}

/// The int8 model of ResNet-20, calibrated with min-max on `calib` training images.
fn resnet20_int8(
    calib: usize,
) -> (
    quantbench::engine::int8::Int8Model,
    Graph,
    quantbench::data::Normalization,
    Dataset,
) {
    let (g, norm, calib, test) = resnet20(calib);
    let req = minmax8();
    let k = quantbench_kernels::Kernels::active();
    let model = quantbench::engine::int8::build(&k, &g, &calib, &norm, &quiet(), req).unwrap();
    (model, g, norm, test)
}

/// The same logits for images 0..6 in one batch, alone, and after other batches ran: buffers
/// reused across steps and runs must not leak values of one run into the next.
fn same_logits_for_any_batch_and_run_order(run: impl Fn(std::ops::Range<usize>) -> Vec<f32>) {
    let first = run(0..6);
    assert_eq!(first.len(), 60);
    // other images in between leave other values in the reused buffers
    run(100..164);
    assert_eq!(first, run(0..6), "a second run of the same batch");
    for i in 0..6 {
        run(200 + i..203 + i);
        assert_eq!(
            run(i..i + 1)[..],
            first[i * 10..(i + 1) * 10],
            "image {i} alone and in the batch"
        );
    }
}

#[test]
fn resnet20_matches_onnx_runtime_on_all_10000_images() {
    let root = root();
    let g = Graph::load(&root.join("models/resnet20/resnet20.onnx")).unwrap();
    let ds = Dataset::load(&root, DatasetKind::Cifar10, Split::Test).unwrap();
    assert_eq!(ds.len(), 10_000);
    let r = evaluate(
        &Engine::new(&g),
        &ds,
        &DatasetKind::Cifar10.default_normalization(),
        &quiet(),
        None,
    )
    .unwrap();
    let ort =
        quantbench::npy::read_f32(&root.join("models/resnet20/test_logits_fp32.npy")).unwrap();
    assert_eq!(ort.shape, vec![10_000, 10]);
    let max_diff = r
        .logits
        .iter()
        .zip(&ort.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff <= 1e-4, "max |logit - ORT logit| = {max_diff}");
    let ort_pred: Vec<usize> = ort
        .data
        .chunks_exact(10)
        .map(quantbench::eval::argmax)
        .collect();
    assert_eq!(
        r.predictions(),
        ort_pred,
        "argmax differs from ONNX Runtime"
    );
    assert_eq!((r.top1 * 10_000.0).round() as u32, 8103, "top-1 {}", r.top1);
}

#[test]
fn mnist8_reaches_the_published_accuracy() {
    let root = root();
    let g = Graph::load(&root.join("models/mnist-8/mnist-8.onnx")).unwrap();
    // The MatMul weight arrives through a Reshape of an initializer: constant folding at import
    // makes it a weight that methods quantize, like the two Conv weights.
    let weights = g.weights();
    assert_eq!(weights.len(), 3, "{weights:?}");
    assert_eq!(
        g.constants[weights[2].value].as_ref().unwrap().shape,
        vec![256, 10]
    );
    let ds = Dataset::load(&root, DatasetKind::Mnist, Split::Test).unwrap();
    let r = evaluate(
        &Engine::new(&g),
        &ds,
        &DatasetKind::Mnist.default_normalization(),
        &quiet(),
        None,
    )
    .unwrap();
    assert_eq!(r.batch, 1, "MNIST-8 fixes its batch at 1");
    assert_eq!((r.top1 * 10_000.0).round() as u32, 9890, "top-1 {}", r.top1);
}

#[test]
fn model_that_does_not_fit_the_data_set_is_a_clear_error() {
    let root = root();
    let g = Graph::load(&root.join("models/mnist-8/mnist-8.onnx")).unwrap();
    let mut ds = Dataset::load(&root, DatasetKind::Cifar10, Split::Test).unwrap();
    ds.truncate(8);
    let e = evaluate(
        &Engine::new(&g),
        &ds,
        &DatasetKind::Cifar10.default_normalization(),
        &quiet(),
        None,
    )
    .unwrap_err();
    assert!(e.contains("Input3") && e.contains("[N, 3, 32, 32]"), "{e}");
}

#[test]
fn data_files_of_the_wrong_size_or_missing_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("qb-data-{}", std::process::id()));
    let cifar = dir.join("data/cifar10-jpeg");
    std::fs::create_dir_all(&cifar).unwrap();
    std::fs::write(cifar.join("test_batch.bin"), vec![0u8; 3073 * 2 + 5]).unwrap();
    let e = Dataset::load(&dir, DatasetKind::Cifar10, Split::Test).unwrap_err();
    assert!(e.contains("test_batch.bin") && e.contains("3073"), "{e}");
    let e = Dataset::load(&dir, DatasetKind::Cifar10, Split::Train).unwrap_err();
    assert!(
        e.contains("train_10k.bin") && e.contains("not found") && e.contains("QUANTBENCH_DATA"),
        "{e}"
    );
    let e = Dataset::load(&dir, DatasetKind::Mnist, Split::Test).unwrap_err();
    assert!(
        e.contains("t10k-images-idx3-ubyte") && e.contains("not found"),
        "{e}"
    );
    // A truncated IDX file.
    let mnist = dir.join("data/mnist");
    std::fs::create_dir_all(&mnist).unwrap();
    let mut img = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28];
    img.extend(vec![0u8; 28 * 28]); // one image where the header says two
    std::fs::write(mnist.join("t10k-images-idx3-ubyte"), &img).unwrap();
    std::fs::write(
        mnist.join("t10k-labels-idx1-ubyte"),
        [0, 0, 8, 1, 0, 0, 0, 2, 3, 4],
    )
    .unwrap();
    let e = Dataset::load(&dir, DatasetKind::Mnist, Split::Test).unwrap_err();
    assert!(
        e.contains("t10k-images-idx3-ubyte") && e.contains("2 images"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn resnet20_integer_only_matches_its_fake_quant_simulation() {
    use quantbench::calib::FakeQuantHook;
    let (model, g, norm, mut test) = resnet20_int8(512);
    test.truncate(2000);
    let k = quantbench_kernels::Kernels::active();
    let real = evaluate(&model, &test, &norm, &quiet(), None).unwrap();
    let (sim_graph, points) = model.simulation().unwrap();
    let hook = FakeQuantHook {
        k: &k,
        params: &points,
    };
    let sim = evaluate(
        &Engine::new(&sim_graph),
        &test,
        &norm,
        &quiet(),
        Some(&hook),
    )
    .unwrap();
    let fp32 = evaluate(&Engine::new(&g), &test, &norm, &quiet(), None).unwrap();
    let agree = real
        .predictions()
        .iter()
        .zip(sim.predictions())
        .filter(|(a, b)| **a == *b)
        .count();
    eprintln!(
        "2000 images: fp32 {:.2} %, integer_only {:.2} %, simulation {:.2} %, same prediction {agree}",
        fp32.top1 * 100.0,
        real.top1 * 100.0,
        sim.top1 * 100.0
    );
    // within 0.1 pp of its simulation (2 of 2000 images) and within 1 pp of fp32
    assert!((real.top1 - sim.top1).abs() <= 0.001 + 1e-9);
    assert!((real.top1 - fp32.top1).abs() <= 0.01);
    // single codes that differ by one near rounding ties flip a few borderline images
    assert!(agree >= 1950, "{agree} of 2000 predictions agree");
}

#[test]
fn integer_only_gives_the_same_logits_for_any_batch_and_run_order() {
    // the int8 engine reuses its activation buffers across steps and runs (stale contents,
    // never zeroed): a step that left part of its output unwritten would show here
    let (model, _, norm, test) = resnet20_int8(64);
    same_logits_for_any_batch_and_run_order(|r| model.run(test.batch(r, &norm)).unwrap().data);
}

#[test]
fn fp32_gives_the_same_logits_for_any_batch_and_run_order() {
    // the f32 engine draws conv outputs and padded images from a per-thread pool, and zeroes
    // a padded buffer's border once per batch
    let (g, norm, _, test) = resnet20(0);
    let e = Engine::new(&g);
    same_logits_for_any_batch_and_run_order(|r| e.run(test.batch(r, &norm), None).unwrap().data);
    // batches run image by image, fused; with a hook the whole batch goes node by node
    assert!(e.runs_per_image());
    struct Watch;
    impl quantbench::engine::EdgeHook for Watch {
        fn on_value(&self, _value: usize, _tensor: &mut quantbench::model::Tensor) {}
    }
    // (and its 3x3 convolutions are the direct ones, not Winograd's: the last bits differ)
    let fast = e.run(test.batch(0..16, &norm), None).unwrap();
    let plain = e.run(test.batch(0..16, &norm), Some(&Watch)).unwrap();
    let max_diff = (fast.data.iter().zip(&plain.data))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff <= 1e-4, "max |fused - node by node| = {max_diff}");
    let argmax = |t: &quantbench::model::Tensor| -> Vec<usize> {
        t.data
            .chunks_exact(10)
            .map(quantbench::eval::argmax)
            .collect()
    };
    assert_eq!(argmax(&fast), argmax(&plain));
}

#[test]
fn integer_only_names_the_node_it_cannot_run() {
    use quantbench::calib::CalibRequest;
    use quantbench::engine::int8;
    use quantbench::model::Op;
    let (mut g, norm, calib, _) = resnet20(8);
    let last = g.nodes.len() - 1;
    g.nodes[last].op = Op::Softmax {
        axis: 1,
        legacy: false,
    };
    g.nodes[last].inputs.truncate(1);
    let req = minmax8();
    let k = quantbench_kernels::Kernels::active();
    let e = int8::build(&k, &g, &calib, &norm, &quiet(), req)
        .err()
        .expect("Softmax has no integer kernel");
    assert!(
        e.contains("integer_only: node") && e.contains("(Softmax): no integer kernel"),
        "{e}"
    );
    let e = int8::build(
        &k,
        &g,
        &calib,
        &norm,
        &quiet(),
        CalibRequest { bits: 4, ..req },
    )
    .err()
    .unwrap();
    assert!(e.contains("activations are 8-bit, not 4"), "{e}");
}

#[test]
fn fused_activation_edges_skip_what_feeds_only_a_relu() {
    use quantbench::calib::quantized_edges;
    use quantbench::experiment::ActEdges;
    use quantbench::model::Op;
    let g = Graph::load(&root().join("models/resnet20/resnet20.onnx")).unwrap();
    let all = quantized_edges(&g, ActEdges::All);
    let fused = quantized_edges(&g, ActEdges::Fused);
    let relus: Vec<_> = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Relu))
        .collect();
    // ResNet-20: the stem, 9 blocks x 2 (after the first conv, after the residual add)
    assert_eq!(relus.len(), 19);
    assert!(!all[g.output] && !fused[g.output]);
    assert!(all[g.input] && fused[g.input]);
    for r in &relus {
        // the Relu's output stays quantized; its input (a Conv or an Add output read by
        // nothing else) does not
        assert!(fused[r.output] && all[r.output]);
        assert!(all[r.inputs[0]] && !fused[r.inputs[0]]);
        let producer = g.nodes.iter().find(|n| n.output == r.inputs[0]).unwrap();
        assert!(
            matches!(producer.op, Op::Conv { .. } | Op::Add),
            "{:?}",
            producer.op
        );
    }
    let count = |e: &[bool]| e.iter().filter(|&&b| b).count();
    assert_eq!(count(&all) - count(&fused), 19);
}
