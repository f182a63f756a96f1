//! Times the f32 engine on ResNet-20 (seeded input, single thread), for profiling:
//! `cargo run --release -p quantbench --example latency -- BATCH REPS` prints the median and
//! the minimum ms per image; `OPS=1` also lists the graph's nodes. The peer comparison is
//! `cargo xtask compare model`.
use quantbench::engine::Engine;
use quantbench::model::{Graph, Tensor};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let b: usize = args.get(1).map_or(1, |s| s.parse().unwrap());
    let reps: usize = args.get(2).map_or(50, |s| s.parse().unwrap());
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
    let mut s = 1u32;
    let data: Vec<f32> = (0..b * 3 * 32 * 32)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    let x = Tensor::new(vec![b, 3, 32, 32], data);
    e.run(x.clone(), None).unwrap();
    let mut t = Vec::new();
    for _ in 0..reps {
        let s = Instant::now();
        e.run(x.clone(), None).unwrap();
        t.push(s.elapsed().as_secs_f64() * 1e3 / b as f64);
    }
    t.sort_by(f64::total_cmp);
    println!(
        "fp32 b{b}: median {:.3} ms/image, min {:.3}",
        t[t.len() / 2],
        t[0]
    );
}
