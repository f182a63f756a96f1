//! Times the f32 engine, or the integer-only int8 engine, on ResNet-20 (single thread), for
//! profiling: `cargo run --release -p quantbench --example latency -- BATCH REPS [int8]`
//! prints the median and the minimum ms per image. The input is seeded for f32; int8 is
//! calibrated (min-max) on 64 training images and runs on test images. `OPS=1` also lists the
//! graph's nodes. The peer comparison is `cargo xtask compare model`.
use quantbench::data::{Dataset, DatasetKind, Split};
use quantbench::engine::Engine;
use quantbench::eval::{EvalOptions, Forward};
use quantbench::model::{Graph, Tensor};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let b: usize = args.get(1).map_or(1, |s| s.parse().unwrap());
    let reps: usize = args.get(2).map_or(50, |s| s.parse().unwrap());
    let int8 = args.get(3).is_some_and(|s| s == "int8");
    let root = quantbench::data_root().expect("data root");
    let g = Graph::load(&root.join("models/resnet20/resnet20.onnx")).unwrap();
    if std::env::var_os("OPS").is_some() {
        for n in &g.nodes {
            let ins: Vec<&str> = n
                .inputs
                .iter()
                .map(|&v| g.value_names[v].as_str())
                .collect();
            println!("{} {:?} -> {}", n.op.name(), ins, g.value_names[n.output]);
        }
    }
    let e = Engine::new(&g);
    let model;
    let (x, run): (Tensor, &dyn Forward) = if int8 {
        use quantbench::calib::CalibRequest;
        use quantbench::experiment::{ActEdges, CalibMethod};
        let norm = DatasetKind::Cifar10.default_normalization();
        let mut calib = Dataset::load(&root, DatasetKind::Cifar10, Split::Train).unwrap();
        calib.truncate(64);
        let test = Dataset::load(&root, DatasetKind::Cifar10, Split::Test).unwrap();
        let req = CalibRequest {
            bits: 8,
            method: CalibMethod::Minmax,
            percentile: 99.99,
            edges: ActEdges::All,
        };
        let quiet = EvalOptions {
            progress: false,
            ..Default::default()
        };
        let k = quantbench_kernels::Kernels::active();
        model = quantbench::engine::int8::build(&k, &g, &calib, &norm, &quiet, req).unwrap();
        (test.batch(0..b, &norm), &model)
    } else {
        let mut s = 1u32;
        let data: Vec<f32> = (0..b * 3 * 32 * 32)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        (Tensor::new(vec![b, 3, 32, 32], data), &e)
    };
    run.forward(x.clone(), None).unwrap();
    let mut t = Vec::new();
    for _ in 0..reps {
        let s = Instant::now();
        run.forward(x.clone(), None).unwrap();
        t.push(s.elapsed().as_secs_f64() * 1e3 / b as f64);
    }
    t.sort_by(f64::total_cmp);
    let what = if int8 { "int8" } else { "fp32" };
    println!(
        "{what} b{b}: median {:.3} ms/image, min {:.3}",
        t[t.len() / 2],
        t[0]
    );
}
