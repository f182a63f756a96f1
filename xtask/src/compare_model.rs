//! `cargo xtask compare model [--limit N] [--reps R] [--out DIR]`: quantbench against ONNX
//! Runtime on ResNet-20 and the shared CIFAR-10 files, in one run: fp32 top-1 and single-thread
//! latency at batch 1 and 64; W8A8 (per-channel int8 weights, 8-bit activations, MinMax
//! calibration on the first 512 training images) top-1 against ORT's quantize_static (QDQ);
//! our integer_only (the real int8 path) top-1, its simulation, and its latency against ORT's
//! int8 (QDQ) latency.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

use crate::util::{cpu_model, git_revision, root, run, setup, utc_stamp, write_atomic, Setup};

pub fn main(args: &[String]) -> Result<(), String> {
    let root = root();
    let mut limit: Option<usize> = None;
    let mut reps = 20usize;
    let mut out_dir = root.join("results/compare");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Result<usize, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or(format!("{name} needs a positive number"))
        };
        match a.as_str() {
            "--limit" => limit = Some(num("--limit")?),
            "--reps" => reps = num("--reps")?,
            "--out" => out_dir = PathBuf::from(it.next().ok_or("--out needs a value")?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    let Setup {
        python,
        quantbench,
        work,
    } = setup(&root, &out_dir)?;
    let data = quantbench::data_root().ok_or("no data root: set QUANTBENCH_DATA")?;
    let data = std::fs::canonicalize(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    let stamp = utc_stamp();
    let exp_path = work.join("compare-model.toml");
    let limit_line = limit.map_or(String::new(), |n| format!("limit = {n}\n"));
    let exp = format!(
        r#"name = "compare-model"
[data]
dataset = "cifar10"
{limit_line}batch = 64
[calibration]
split = "train"
samples = 512
method = "minmax"
[[models]]
name = "resnet20"
path = "models/resnet20/resnet20.onnx"
[[methods]]
method = "linear"
bits = 8
granularity = "per_channel"
symmetric = true
act_bits = 8
[[methods]]
method = "integer_only"
[latency]
batch_sizes = [1, 64]
threads = 1
repetitions = {reps}
[report]
charts = false
"#
    );
    write_atomic(&exp_path, &exp)?;
    let run_dir = work.join(format!("compare-model-{stamp}"));
    eprintln!("[compare] quantbench: fp32, W8A8 (simulated) and integer_only on ResNet-20");
    run(Command::new(&quantbench)
        .arg("run")
        .arg(&exp_path)
        .arg("--out")
        .arg(&run_dir)
        .arg("--data")
        .arg(&data)
        .arg("--quiet"))?;
    let cell = |id: &str| -> Result<Value, String> {
        let p = run_dir.join("cells").join(format!("resnet20--{id}.json"));
        let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", p.display()))
    };
    let fp32 = cell("fp32")?;
    let w8a8 = cell("lin8pcs-a8minmax")?;
    let int8 = cell("int8-lin8pcs-a8minmax")?;
    eprintln!("[compare] ONNX Runtime: fp32 and quantize_static (QDQ, per channel, MinMax)");
    let mut peer_cmd = Command::new(&python);
    peer_cmd
        .arg(root.join("xtask/peers/compare_model.py"))
        .arg("--model")
        .arg(data.join("models/resnet20/resnet20.onnx"))
        .arg("--test")
        .arg(data.join("data/cifar10-jpeg/test_batch.bin"))
        .arg("--train")
        .arg(data.join("data/cifar10-jpeg/train_10k.bin"))
        .args([
            "--calib",
            "512",
            "--batches",
            "1,64",
            "--reps",
            &reps.to_string(),
        ]);
    if let Some(n) = limit {
        peer_cmd.args(["--limit", &n.to_string()]);
    }
    let peer: Value = serde_json::from_str(run(&mut peer_cmd)?.trim())
        .map_err(|e| format!("peer output: {e}"))?;

    let lat = |rec: &Value, b: usize| -> Option<f64> {
        rec["latency"]
            .as_array()?
            .iter()
            .find(|l| l["batch"] == b)
            .and_then(|l| l["ms_per_batch"].as_f64())
    };
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "ResNet-20, CIFAR-10 test ({} images), one run; latency: single thread, median of {reps}",
        peer["images"]
    );
    println!(
        "{:<34} {:>12} {:>12} {:>10}",
        "",
        "quantbench",
        peer["peer"].as_str().unwrap_or("peer"),
        "ratio"
    );
    let ours_fp32 = f(&fp32["row"]["top1"]);
    let ours_w8 = f(&w8a8["row"]["top1"]);
    println!(
        "{:<34} {:>11.2}% {:>11.2}% {:>+9.2}pp",
        "fp32 top-1",
        ours_fp32 * 100.0,
        f(&peer["fp32_top1"]) * 100.0,
        (ours_fp32 - f(&peer["fp32_top1"])) * 100.0
    );
    println!(
        "{:<34} {:>11.2}% {:>11.2}% {:>+9.2}pp",
        "W8A8 per-channel MinMax top-1",
        ours_w8 * 100.0,
        f(&peer["qdq_top1"]) * 100.0,
        (ours_w8 - f(&peer["qdq_top1"])) * 100.0
    );
    let ours_int8 = f(&int8["row"]["top1"]);
    println!(
        "{:<34} {:>11.2}% {:>11.2}% {:>+9.2}pp",
        "integer_only top-1 (vs ORT QDQ)",
        ours_int8 * 100.0,
        f(&peer["qdq_top1"]) * 100.0,
        (ours_int8 - f(&peer["qdq_top1"])) * 100.0
    );
    println!(
        "{:<34} {:>11.2}%",
        "  its fake-quant simulation",
        f(&int8["row"]["sim_top1"]) * 100.0
    );
    let mut lat_rows = Vec::new();
    for b in [1usize, 64] {
        let ours = lat(&fp32, b).unwrap_or(f64::NAN);
        let p32 = f(&peer["fp32_latency_ms"][b.to_string()]);
        let p8 = f(&peer["qdq_latency_ms"][b.to_string()]);
        println!(
            "{:<34} {:>10.3}ms {:>10.3}ms {:>9.2}x",
            format!("fp32 ms/image, batch {b}"),
            ours / b as f64,
            p32 / b as f64,
            p32 / ours
        );
        let ours8 = lat(&int8, b).unwrap_or(f64::NAN);
        println!(
            "{:<34} {:>10.3}ms {:>10.3}ms {:>9.2}x",
            format!("int8 ms/image, batch {b}"),
            ours8 / b as f64,
            p8 / b as f64,
            p8 / ours8
        );
        lat_rows.push(json!({"batch": b, "ours_fp32_ms_per_image": ours / b as f64, "peer_fp32_ms_per_image": p32 / b as f64,
                             "ours_int8_ms_per_image": ours8 / b as f64, "peer_int8_ms_per_image": p8 / b as f64,
                             "fp32_speedup": p32 / ours, "int8_speedup": p8 / ours8}));
    }
    println!("(ratio of latency: ORT time / our time, > 1 means we are faster)");
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let record = json!({
        "stamp": stamp,
        "cpu": cpu_model(),
        "git": git_revision(&root),
        "isa": fp32["row"]["isa"],
        "images": peer["images"],
        "ours": { "fp32_top1": ours_fp32, "w8a8_top1": ours_w8, "fp32_latency": fp32["latency"],
                  "integer_only_top1": ours_int8, "integer_only_sim_top1": int8["row"]["sim_top1"], "integer_only_latency": int8["latency"] },
        "peer": peer,
        "latency": lat_rows,
    });
    let path = out_dir.join(format!("model-{stamp}.json"));
    write_atomic(
        &path,
        &serde_json::to_string_pretty(&record).map_err(|e| e.to_string())?,
    )?;
    eprintln!("[compare] wrote {}", path.display());
    Ok(())
}
