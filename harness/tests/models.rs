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
