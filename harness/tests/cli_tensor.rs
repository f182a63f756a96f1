//! `quantbench tensor` end to end: the JSON contract and the error contract (one line, exit 2).

use std::process::Command;

use serde_json::Value;

fn quantbench(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn json(args: &[&str]) -> Value {
    let (code, stdout, stderr) = quantbench(args);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn linear_report_has_every_key() {
    let v = json(&[
        "tensor",
        "--method",
        "linear",
        "--bits",
        "8",
        "--values",
        "-1.5,0,0.25,3",
    ]);
    for key in [
        "method",
        "bits",
        "params",
        "codes",
        "dequantized",
        "size_bits",
        "compression_vs_fp32",
        "mse",
        "sqnr_db",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert_eq!(v["method"], "linear");
    // [-1.5, 3] on i8: scale 4.5/255, zero point rne(-128 + 1.5/scale) = -43
    assert_eq!(v["params"]["zero_point"], -43);
    assert_eq!(v["codes"][1], -43);
    assert_eq!(v["dequantized"][1], 0.0);
    // 4 codes of 8 bits + f32 scale + 1-byte zero point
    assert_eq!(v["size_bits"], (4 + 4 + 1) * 8);
    assert!(v["sqnr_db"].as_f64().unwrap() > 30.0);
}

#[test]
fn per_channel_symmetric_and_npy_input() {
    let dir = std::env::temp_dir().join(format!("qb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.npy");
    let data: Vec<f32> = (0..24)
        .map(|i| (i as f32 - 11.0) * if i < 12 { 0.1 } else { 2.0 })
        .collect();
    quantbench::npy::write_f32(&path, &[2, 12], &data).unwrap();
    let v = json(&[
        "tensor",
        "--method",
        "linear",
        "--bits",
        "4",
        "--symmetric",
        "--axis",
        "0",
        "--npy",
        path.to_str().unwrap(),
    ]);
    assert_eq!(v["shape"], serde_json::json!([2, 12]));
    assert_eq!(v["params"]["granularity"], "per_channel");
    let scales = v["params"]["scale"].as_array().unwrap();
    assert_eq!(scales.len(), 2);
    assert!((scales[0].as_f64().unwrap() - 1.1 / 7.0).abs() < 1e-6);
    assert!((scales[1].as_f64().unwrap() - 24.0 / 7.0).abs() < 1e-5);
    // 24 codes * 4 bits = 12 bytes, + 2 * (4 + 1) bytes of parameters
    assert_eq!(v["size_bits"], (12 + 10) * 8);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fixed_point_seed_example_and_stochastic_rounding() {
    let v = json(&[
        "tensor",
        "--method",
        "fixed",
        "--bits",
        "8",
        "--frac-bits",
        "1",
        "--values",
        "1.3,-70,0.25",
    ]);
    assert_eq!(v["codes"], serde_json::json!([3, -128, 0]));
    assert_eq!(v["params"]["int_bits"], 6);
    let a = json(&[
        "tensor",
        "--method",
        "fixed",
        "--bits",
        "4",
        "--frac-bits",
        "0",
        "--stochastic-seed",
        "5",
        "--values",
        "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
    ]);
    let b = json(&[
        "tensor",
        "--method",
        "fixed",
        "--bits",
        "4",
        "--frac-bits",
        "0",
        "--stochastic-seed",
        "5",
        "--values",
        "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
    ]);
    assert_eq!(a["codes"], b["codes"], "same seed, same codes");
    let codes = a["codes"].as_array().unwrap();
    assert!(codes.iter().all(|c| c == 0 || c == 1));
    let d = json(&[
        "tensor",
        "--method",
        "dynamic-fixed",
        "--bits",
        "8",
        "--values",
        "0.9,-0.2",
    ]);
    assert_eq!(d["params"]["frac_bits"], 7);
}

#[test]
fn kmeans_4x4_two_bit_is_160_bits() {
    // any 4x4 matrix with at least 4 distinct values: 16 * 2 + 4 * 32 = 160 bits, 3.2x
    for values in [
        "0.1,-0.2,0.3,0.4,0.5,0.6,-0.7,0.8,0.9,1.0,1.1,1.2,1.3,1.4,1.5,1.6",
        "1,1,1,1,2,2,2,2,3,3,3,3,40,40,40,-7",
    ] {
        let v = json(&[
            "tensor", "--method", "kmeans", "--bits", "2", "--shape", "4,4", "--values", values,
        ]);
        assert_eq!(v["size_bits"], 160, "{values}");
        assert_eq!(v["compression_vs_fp32"], 3.2);
        assert_eq!(v["bits"], 2);
        let codebook = v["params"]["codebook"].as_array().unwrap();
        assert_eq!(codebook.len(), 4);
        // every value is replaced by its centroid
        for (code, deq) in v["codes"]
            .as_array()
            .unwrap()
            .iter()
            .zip(v["dequantized"].as_array().unwrap())
        {
            assert_eq!(&codebook[code.as_u64().unwrap() as usize], deq);
        }
    }
    let kmeans = |fast: bool| {
        let mut args = vec!["tensor", "--method", "kmeans", "--clusters", "2"];
        if fast {
            args.push("--fast");
        }
        json(&[args, vec!["--values", "1,3,5,7,9"]].concat())
    };
    let v = kmeans(false);
    assert_eq!(v["params"]["codebook"], serde_json::json!([2.0, 7.0]));
    assert_eq!(v["params"]["sse"], 10.0);
    assert_eq!(v["params"]["gap_bound"], 0.0);
    // the fast mode reports its proven bound: 2 max_n (hi - lo) h with one value per bin,
    // a range of 8 and 65,536 bins (plus rounding terms far below 1e-6)
    let v = kmeans(true);
    assert_eq!(v["params"]["mode"], "fast");
    let bound = v["params"]["gap_bound"].as_f64().unwrap();
    assert!(
        (bound - 2.0 * 8.0 * 8.0 / 65536.0).abs() < 1e-6,
        "gap_bound {bound}"
    );
    assert!(v["params"]["sse"].as_f64().unwrap() - 10.0 <= bound);
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "tensor", "--method", "linear", "--bits", "8", "--values", "1,abc",
            ],
            "'abc' (item 2) is not a number",
        ),
        (
            &[
                "tensor", "--method", "linear", "--bits", "0", "--values", "1",
            ],
            "bits = 0",
        ),
        (
            &[
                "tensor", "--method", "linear", "--bits", "17", "--values", "1",
            ],
            "bits = 17",
        ),
        (
            &[
                "tensor", "--method", "fixed", "--bits", "8", "--values", "1",
            ],
            "needs --frac-bits",
        ),
        (
            &[
                "tensor",
                "--method",
                "fixed",
                "--bits",
                "1",
                "--frac-bits",
                "0",
                "--values",
                "1",
            ],
            "2..=16 total bits",
        ),
        (
            &[
                "tensor", "--method", "linear", "--bits", "8", "--shape", "3", "--values", "1,2",
            ],
            "has 3 elements, but 2 values",
        ),
        (
            &[
                "tensor",
                "--method",
                "linear",
                "--bits",
                "8",
                "--npy",
                "/nonexistent/x.npy",
            ],
            "/nonexistent/x.npy: cannot read",
        ),
        (
            &[
                "tensor", "--method", "kmeans2", "--bits", "8", "--values", "1",
            ],
            "invalid value 'kmeans2'",
        ),
    ];
    for (args, needle) in cases {
        let (code, stdout, stderr) = quantbench(args);
        assert_eq!(code, 2, "{args:?}");
        assert!(stdout.is_empty(), "{args:?} printed {stdout}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        if !needle.contains("invalid value") {
            assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        }
    }
    // a non-f32 .npy
    let dir = std::env::temp_dir().join(format!("qb-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("f8.npy");
    quantbench::npy::write_f32(&p, &[2], &[1.0, 2.0]).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    let at = bytes.windows(3).position(|w| w == b"<f4").unwrap();
    bytes[at + 1] = b'i';
    std::fs::write(&p, bytes).unwrap();
    let (code, _, stderr) = quantbench(&[
        "tensor",
        "--method",
        "linear",
        "--bits",
        "8",
        "--npy",
        p.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("dtype '<i4': expected little-endian float32"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
