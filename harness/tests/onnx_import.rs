//! ONNX import and the f32 engine: small graphs built here (encoded with the same prost messages,
//! then imported from bytes) checked against direct reference implementations written in this
//! file, plus the error paths (corrupt files, unsupported operators, shapes that do not fit).

#![allow(clippy::needless_range_loop)]

use prost::Message;
use quantbench::engine::Engine;
use quantbench::model::proto::{self, attribute_type as at, data_type as dt};
use quantbench::model::{Graph, Tensor};

// ---------------------------------------------------------------- graph building helpers

struct Seeded(u64);
impl Seeded {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn ftensor(name: &str, dims: &[usize], data: &[f32]) -> proto::TensorProto {
    proto::TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: dt::FLOAT,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn itensor(name: &str, data: &[i64]) -> proto::TensorProto {
    proto::TensorProto {
        name: name.into(),
        dims: vec![data.len() as i64],
        data_type: dt::INT64,
        int64_data: data.to_vec(),
        ..Default::default()
    }
}

fn ints(name: &str, v: &[i64]) -> proto::AttributeProto {
    proto::AttributeProto {
        name: name.into(),
        r#type: at::INTS,
        ints: v.to_vec(),
        ..Default::default()
    }
}
fn int(name: &str, v: i64) -> proto::AttributeProto {
    proto::AttributeProto {
        name: name.into(),
        r#type: at::INT,
        i: v,
        ..Default::default()
    }
}
fn float(name: &str, v: f32) -> proto::AttributeProto {
    proto::AttributeProto {
        name: name.into(),
        r#type: at::FLOAT,
        f: v,
        ..Default::default()
    }
}
fn string(name: &str, v: &str) -> proto::AttributeProto {
    proto::AttributeProto {
        name: name.into(),
        r#type: at::STRING,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn node(
    op: &str,
    inputs: &[&str],
    output: &str,
    attrs: Vec<proto::AttributeProto>,
) -> proto::NodeProto {
    proto::NodeProto {
        op_type: op.into(),
        name: format!("{op}_{output}"),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: attrs,
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Option<usize>]) -> proto::ValueInfoProto {
    proto::ValueInfoProto {
        name: name.into(),
        r#type: Some(proto::TypeProto {
            tensor_type: Some(proto::TypeProtoTensor {
                elem_type: dt::FLOAT,
                shape: Some(proto::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| proto::Dimension {
                            dim_value: d.map(|v| v as i64),
                            dim_param: if d.is_none() {
                                Some("batch".into())
                            } else {
                                None
                            },
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

fn model(
    nodes: Vec<proto::NodeProto>,
    inits: Vec<proto::TensorProto>,
    input: &[Option<usize>],
    output: &str,
    opset: i64,
) -> Vec<u8> {
    proto::ModelProto {
        ir_version: 8,
        producer_name: "quantbench-tests".into(),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        graph: Some(proto::GraphProto {
            name: "g".into(),
            node: nodes,
            initializer: inits,
            input: vec![value_info("x", input)],
            output: vec![value_info(output, &[])],
        }),
    }
    .encode_to_vec()
}

fn run(bytes: &[u8], x: Tensor) -> Tensor {
    let g = Graph::from_bytes(bytes).expect("import");
    Engine::new(&g).run(x, None).expect("run")
}

fn assert_close(got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.shape, want.shape, "shape");
    for (i, (a, b)) in got.data.iter().zip(&want.data).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "element {i}: got {a}, want {b}"
        );
    }
}

// ---------------------------------------------------------------- references

/// Direct convolution, NCHW, explicit pads [t, l, b, r].
#[allow(clippy::too_many_arguments)]
fn conv_ref(
    x: &Tensor,
    w: &Tensor,
    b: Option<&[f32]>,
    stride: [usize; 2],
    pads: [usize; 4],
    dil: [usize; 2],
    group: usize,
) -> Tensor {
    let (n, c, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let (m, cg, kh, kw) = (w.shape[0], w.shape[1], w.shape[2], w.shape[3]);
    assert_eq!(c, cg * group);
    let oh = (h + pads[0] + pads[2] - dil[0] * (kh - 1) - 1) / stride[0] + 1;
    let ow = (wd + pads[1] + pads[3] - dil[1] * (kw - 1) - 1) / stride[1] + 1;
    let mut out = Tensor::zeros(vec![n, m, oh, ow]);
    let mg = m / group;
    for i in 0..n {
        for o in 0..m {
            let g = o / mg;
            for y in 0..oh {
                for xo in 0..ow {
                    let mut acc = b.map_or(0.0, |b| b[o]) as f64;
                    for ci in 0..cg {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (y * stride[0] + ky * dil[0]) as isize - pads[0] as isize;
                                let ix = (xo * stride[1] + kx * dil[1]) as isize - pads[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xv = x.data
                                    [((i * c + g * cg + ci) * h + iy as usize) * wd + ix as usize];
                                let wv = w.data[((o * cg + ci) * kh + ky) * kw + kx];
                                acc += xv as f64 * wv as f64;
                            }
                        }
                    }
                    out.data[((i * m + o) * oh + y) * ow + xo] = acc as f32;
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------- operator tests

#[test]
fn conv_groups_strides_pads_dilations_bias() {
    let mut r = Seeded(1);
    // (c, m, group, k, stride, pads, dilation, h, w)
    let cases = [
        (3, 8, 1, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 9, 7),
        (4, 6, 2, [3, 2], [2, 1], [0, 1, 2, 0], [1, 1], 11, 8),
        (6, 6, 6, [3, 3], [1, 2], [1, 1, 1, 1], [2, 1], 10, 13), // depthwise
        (5, 7, 1, [1, 1], [1, 1], [0, 0, 0, 0], [1, 1], 5, 6),   // 1x1 direct path
        (5, 4, 1, [1, 1], [2, 2], [0, 0, 0, 0], [1, 1], 7, 7),   // 1x1 strided
        (2, 3, 1, [5, 5], [3, 3], [2, 2, 2, 2], [1, 1], 4, 5),   // kernel larger than input
    ];
    for (c, m, group, k, stride, pads, dil, h, w) in cases {
        let x = Tensor::new(vec![2, c, h, w], r.vec(2 * c * h * w));
        let wt = Tensor::new(
            vec![m, c / group, k[0], k[1]],
            r.vec(m * c / group * k[0] * k[1]),
        );
        let bias = r.vec(m);
        let bytes = model(
            vec![node(
                "Conv",
                &["x", "w", "b"],
                "y",
                vec![
                    ints("strides", &[stride[0] as i64, stride[1] as i64]),
                    ints("pads", &pads.map(|p| p as i64)),
                    ints("dilations", &[dil[0] as i64, dil[1] as i64]),
                    int("group", group as i64),
                ],
            )],
            vec![ftensor("w", &wt.shape, &wt.data), ftensor("b", &[m], &bias)],
            &[None, Some(c), Some(h), Some(w)],
            "y",
            13,
        );
        let got = run(&bytes, x.clone());
        let want = conv_ref(&x, &wt, Some(&bias), stride, pads, dil, group);
        assert_close(&got, &want, 1e-5);
    }
}

#[test]
fn winograd_convolutions_match_the_reference_in_a_graph() {
    // 3x3, stride 1, pad 1, even sizes, output channels a multiple of 8: on AVX-512 these run
    // through Winograd F(2x2, 3x3), fused with the Add and Relu when no hook watches, and
    // directly when one does.
    let mut r = Seeded(21);
    for (batch, c, m, h, w) in [
        (Some(2), 3, 8, 6, 10), // a fixed batch: both images in one Conv call
        (None, 16, 16, 8, 8),   // image by image
        (Some(1), 5, 24, 2, 34),
    ] {
        let n = batch.unwrap_or(3);
        let x = Tensor::new(vec![n, c, h, w], r.vec(n * c * h * w));
        let wt = Tensor::new(vec![m, c, 3, 3], r.vec(m * c * 9));
        let bias = r.vec(m);
        let bytes = model(
            vec![
                node(
                    "Conv",
                    &["x", "w", "b"],
                    "c",
                    vec![ints("pads", &[1, 1, 1, 1])],
                ),
                node("Relu", &["c"], "a", vec![]),
                node(
                    "Conv",
                    &["a", "w2", "b"],
                    "c2",
                    vec![ints("pads", &[1, 1, 1, 1])],
                ),
                node("Add", &["c2", "a"], "s", vec![]),
                node("Relu", &["s"], "y", vec![]),
            ],
            vec![
                ftensor("w", &wt.shape, &wt.data),
                ftensor("w2", &[m, m, 3, 3], &r.vec(m * m * 9)),
                ftensor("b", &[m], &bias),
            ],
            &[batch, Some(c), Some(h), Some(w)],
            "y",
            13,
        );
        let g = Graph::from_bytes(&bytes).expect("import");
        let w2 = g.constants[g.value_names.iter().position(|v| v == "w2").unwrap()]
            .clone()
            .unwrap();
        let e = Engine::new(&g);
        let fast = e.run(x.clone(), None).expect("run");
        let watched = e.run(x.clone(), Some(&Watch)).expect("run with a hook");
        let relu = |t: &mut Tensor| t.data.iter_mut().for_each(|v| *v = v.max(0.0));
        let mut a = conv_ref(&x, &wt, Some(&bias), [1, 1], [1; 4], [1, 1], 1);
        relu(&mut a);
        let mut want = conv_ref(&a, &w2, Some(&bias), [1, 1], [1; 4], [1, 1], 1);
        for (v, &s) in want.data.iter_mut().zip(&a.data) {
            *v += s;
        }
        relu(&mut want);
        assert_close(&fast, &want, 1e-5);
        assert_close(&watched, &want, 1e-5);
    }
}

#[test]
fn conv_auto_pad_same_upper_and_lower() {
    let mut r = Seeded(2);
    let x = Tensor::new(vec![1, 2, 6, 7], r.vec(2 * 6 * 7));
    let wt = Tensor::new(vec![3, 2, 4, 4], r.vec(3 * 2 * 16));
    for (mode, pads) in [("SAME_UPPER", [1, 1, 2, 2]), ("SAME_LOWER", [2, 2, 1, 1])] {
        let bytes = model(
            vec![node(
                "Conv",
                &["x", "w"],
                "y",
                vec![string("auto_pad", mode)],
            )],
            vec![ftensor("w", &wt.shape, &wt.data)],
            &[Some(1), Some(2), Some(6), Some(7)],
            "y",
            8,
        );
        let got = run(&bytes, x.clone());
        // stride 1: total padding 3 per axis, the odd one at the end (UPPER) or start (LOWER)
        let want = conv_ref(&x, &wt, None, [1, 1], pads, [1, 1], 1);
        assert_close(&got, &want, 1e-5);
    }
}

#[test]
fn batch_norm_after_conv_is_folded_and_matches_unfolded() {
    let mut r = Seeded(3);
    let (c, m) = (3, 4);
    let x = Tensor::new(vec![2, c, 5, 5], r.vec(2 * c * 25));
    let wt = Tensor::new(vec![m, c, 3, 3], r.vec(m * c * 9));
    let gamma = r.vec(m);
    let beta = r.vec(m);
    let mean = r.vec(m);
    let var: Vec<f32> = r.vec(m).iter().map(|v| v.abs() + 0.1).collect();
    let bn_inits = || {
        vec![
            ftensor("w", &wt.shape, &wt.data),
            ftensor("g", &[m], &gamma),
            ftensor("be", &[m], &beta),
            ftensor("mu", &[m], &mean),
            ftensor("var", &[m], &var),
        ]
    };
    let bytes = model(
        vec![
            node("Conv", &["x", "w"], "c", vec![ints("pads", &[1, 1, 1, 1])]),
            node(
                "BatchNormalization",
                &["c", "g", "be", "mu", "var"],
                "y",
                vec![float("epsilon", 1e-3)],
            ),
        ],
        bn_inits(),
        &[None, Some(c), Some(5), Some(5)],
        "y",
        13,
    );
    let g = Graph::from_bytes(&bytes).unwrap();
    assert_eq!(
        g.nodes.len(),
        1,
        "BatchNormalization is folded into the Conv"
    );
    let got = Engine::new(&g).run(x.clone(), None).unwrap();
    let conv = conv_ref(&x, &wt, None, [1, 1], [1, 1, 1, 1], [1, 1], 1);
    let mut want = conv.clone();
    for (i, v) in want.data.iter_mut().enumerate() {
        let ch = (i / 25) % m;
        *v = (*v - mean[ch]) / (var[ch] + 1e-3).sqrt() * gamma[ch] + beta[ch];
    }
    assert_close(&got, &want, 1e-5);
    // A BatchNormalization on a graph input cannot be folded: it runs as an op.
    let bytes = model(
        vec![node(
            "BatchNormalization",
            &["x", "g", "be", "mu", "var"],
            "y",
            vec![],
        )],
        bn_inits()[1..].to_vec(),
        &[None, Some(m), Some(2), Some(2)],
        "y",
        13,
    );
    let x4 = Tensor::new(vec![1, m, 2, 2], r.vec(m * 4));
    let got = run(&bytes, x4.clone());
    let want: Vec<f32> = x4
        .data
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let ch = i / 4;
            (v - mean[ch]) / (var[ch] + 1e-5).sqrt() * gamma[ch] + beta[ch]
        })
        .collect();
    assert_close(&got, &Tensor::new(vec![1, m, 2, 2], want), 1e-5);
}

#[test]
fn gemm_matmul_and_broadcasting() {
    let mut r = Seeded(4);
    let a = Tensor::new(vec![3, 5], r.vec(15));
    let b_t = r.vec(4 * 5); // [4, 5], used with transB
    let bias = r.vec(4);
    let bytes = model(
        vec![node(
            "Gemm",
            &["x", "b", "c"],
            "y",
            vec![int("transB", 1), float("alpha", 0.5), float("beta", 2.0)],
        )],
        vec![ftensor("b", &[4, 5], &b_t), ftensor("c", &[4], &bias)],
        &[None, Some(5)],
        "y",
        13,
    );
    let got = run(&bytes, a.clone());
    let mut want = Tensor::zeros(vec![3, 4]);
    for i in 0..3 {
        for j in 0..4 {
            let dot: f32 = (0..5).map(|k| a.data[i * 5 + k] * b_t[j * 5 + k]).sum();
            want.data[i * 4 + j] = 0.5 * dot + 2.0 * bias[j];
        }
    }
    assert_close(&got, &want, 1e-5);

    // MatMul of a rank-3 input by a 2-D weight, then Add with a broadcast row, Mul by a scalar,
    // Sub of a column, Div by a full tensor.
    let x = Tensor::new(vec![2, 3, 4], r.vec(24));
    let w = r.vec(4 * 2);
    let row = r.vec(2);
    let col = r.vec(3);
    let full: Vec<f32> = r.vec(12).iter().map(|v| v.abs() + 0.5).collect();
    let bytes = model(
        vec![
            node("MatMul", &["x", "w"], "m", vec![]),
            node("Add", &["m", "row"], "a", vec![]),
            node("Mul", &["a", "s"], "b", vec![]),
            node("Sub", &["b", "col"], "c", vec![]),
            node("Div", &["c", "full"], "y", vec![]),
        ],
        vec![
            ftensor("w", &[4, 2], &w),
            ftensor("row", &[2], &row),
            ftensor("s", &[], &[1.5]),
            ftensor("col", &[3, 1], &col),
            ftensor("full", &[2, 3, 2], &full),
        ],
        &[None, Some(3), Some(4)],
        "y",
        13,
    );
    let got = run(&bytes, x.clone());
    let mut want = Tensor::zeros(vec![2, 3, 2]);
    for i in 0..2 {
        for j in 0..3 {
            for k in 0..2 {
                let dot: f32 = (0..4)
                    .map(|t| x.data[(i * 3 + j) * 4 + t] * w[t * 2 + k])
                    .sum();
                let idx = (i * 3 + j) * 2 + k;
                want.data[idx] = ((dot + row[k]) * 1.5 - col[j]) / full[idx];
            }
        }
    }
    assert_close(&got, &want, 1e-5);
}

#[test]
fn pools_flatten_softmax_clip() {
    let mut r = Seeded(5);
    let x = Tensor::new(vec![1, 2, 5, 6], r.vec(60));
    let bytes = model(
        vec![
            node(
                "MaxPool",
                &["x"],
                "mp",
                vec![
                    ints("kernel_shape", &[3, 3]),
                    ints("strides", &[2, 2]),
                    ints("pads", &[1, 1, 1, 1]),
                ],
            ),
            node(
                "AveragePool",
                &["x"],
                "ap",
                vec![
                    ints("kernel_shape", &[2, 3]),
                    ints("strides", &[2, 2]),
                    ints("pads", &[0, 1, 0, 1]),
                ],
            ),
            node("GlobalAveragePool", &["x"], "gap", vec![]),
            node("Flatten", &["gap"], "f", vec![]),
            node("Softmax", &["f"], "sm", vec![int("axis", -1)]),
        ],
        vec![],
        &[None, Some(2), Some(5), Some(6)],
        "sm",
        13,
    );
    let g = Graph::from_bytes(&bytes).unwrap();
    // Check every intermediate through a hook.
    struct Capture(std::sync::Mutex<Vec<(String, Tensor)>>, Vec<String>);
    impl quantbench::engine::EdgeHook for Capture {
        fn on_value(&self, value: usize, t: &mut Tensor) {
            self.0
                .lock()
                .unwrap()
                .push((self.1[value].clone(), t.clone()));
        }
    }
    let cap = Capture(Default::default(), g.value_names.clone());
    let out = Engine::new(&g).run(x.clone(), Some(&cap)).unwrap();
    let seen = cap.0.into_inner().unwrap();
    let get = |n: &str| seen.iter().find(|(k, _)| k == n).unwrap().1.clone();
    let at = |c: usize, y: isize, xx: isize| -> Option<f32> {
        (y >= 0 && xx >= 0 && y < 5 && xx < 6)
            .then(|| x.data[(c * 5 + y as usize) * 6 + xx as usize])
    };
    let mp = get("mp");
    assert_eq!(mp.shape, vec![1, 2, 3, 3]);
    for c in 0..2 {
        for oy in 0..3 {
            for ox in 0..3 {
                let mut m = f32::NEG_INFINITY;
                for ky in 0..3 {
                    for kx in 0..3 {
                        if let Some(v) =
                            at(c, (oy * 2 + ky) as isize - 1, (ox * 2 + kx) as isize - 1)
                        {
                            m = m.max(v);
                        }
                    }
                }
                assert_eq!(mp.data[(c * 3 + oy) * 3 + ox], m);
            }
        }
    }
    let ap = get("ap");
    assert_eq!(ap.shape, vec![1, 2, 2, 3]); // (6 + 2 - 3) / 2 + 1 = 3
    for c in 0..2 {
        for oy in 0..2 {
            for ox in 0..3 {
                let vals: Vec<f32> = (0..2)
                    .flat_map(|ky| (0..3).map(move |kx| (ky, kx)))
                    .filter_map(|(ky, kx)| {
                        at(c, (oy * 2 + ky) as isize, (ox * 2 + kx) as isize - 1)
                    })
                    .collect();
                let want = vals.iter().sum::<f32>() / vals.len() as f32; // count_include_pad = 0
                assert!((ap.data[(c * 2 + oy) * 3 + ox] - want).abs() < 1e-6);
            }
        }
    }
    let means: Vec<f32> = (0..2)
        .map(|c| x.data[c * 30..(c + 1) * 30].iter().sum::<f32>() / 30.0)
        .collect();
    let e: Vec<f32> = means
        .iter()
        .map(|m| (m - means[0].max(means[1])).exp())
        .collect();
    let want = Tensor::new(vec![1, 2], e.iter().map(|v| v / (e[0] + e[1])).collect());
    assert_close(&out, &want, 1e-6);

    // Clip, opset 11+ (bounds as inputs) and opset 8 (attributes).
    let x = Tensor::new(vec![1, 6], vec![-3.0, -0.5, 0.0, 0.25, 2.0, 9.0]);
    let want = Tensor::new(vec![1, 6], vec![-1.0, -0.5, 0.0, 0.25, 2.0, 2.0]);
    let b11 = model(
        vec![node("Clip", &["x", "lo", "hi"], "y", vec![])],
        vec![ftensor("lo", &[], &[-1.0]), ftensor("hi", &[], &[2.0])],
        &[None, Some(6)],
        "y",
        13,
    );
    assert_close(&run(&b11, x.clone()), &want, 0.0);
    let b8 = model(
        vec![node(
            "Clip",
            &["x"],
            "y",
            vec![float("min", -1.0), float("max", 2.0)],
        )],
        vec![],
        &[None, Some(6)],
        "y",
        8,
    );
    assert_close(&run(&b8, x), &want, 0.0);
}

#[test]
fn reshape_transpose_slice_pad_concat() {
    let x = Tensor::new(vec![2, 3, 4], (0..24).map(|v| v as f32).collect());
    let bytes = model(
        vec![
            node("Transpose", &["x"], "t", vec![ints("perm", &[2, 0, 1])]), // [4, 2, 3]
            node("Slice", &["t", "st", "en", "ax", "sp"], "s", vec![]), // axis 0 step -2, axis 2 1..
            node("Pad", &["s", "pads"], "p", vec![]),
            node("Reshape", &["p", "shape"], "r", vec![]),
            node("Concat", &["r", "r"], "y", vec![int("axis", 1)]),
        ],
        vec![
            itensor("st", &[-1, 1]),
            itensor("en", &[-100, 100]),
            itensor("ax", &[0, 2]),
            itensor("sp", &[-2, 1]),
            itensor("pads", &[0, 1, 0, 0, 0, 1]), // [2, 2, 2] -> [2, 3, 3]
            itensor("shape", &[0, -1]),
        ],
        &[None, Some(3), Some(4)],
        "y",
        13,
    );
    let got = run(&bytes, x.clone());
    // Reference by index arithmetic: t[a][b][c] = x[b][c][a]; s = t[3,1][:, :][1..3]
    let mut p = [0.0f32; 2 * 3 * 3];
    for (si, a) in [3usize, 1].iter().enumerate() {
        for b in 0..2 {
            for (ci, c) in (1..3).enumerate() {
                p[(si * 3 + b + 1) * 3 + ci] = x.data[(b * 3 + c) * 4 + a];
            }
        }
    }
    let mut want = Vec::new();
    for row in p.chunks(9) {
        want.extend_from_slice(row);
        want.extend_from_slice(row);
    }
    assert_eq!(got, Tensor::new(vec![2, 18], want));
}

#[test]
fn constant_node_and_identity() {
    let value = proto::AttributeProto {
        name: "value".into(),
        r#type: at::TENSOR,
        t: Some(ftensor("", &[2], &[10.0, 20.0])),
        ..Default::default()
    };
    let bytes = model(
        vec![
            node("Constant", &[], "k", vec![value]),
            node("Add", &["x", "k"], "a", vec![]),
            node("Identity", &["a"], "y", vec![]),
        ],
        vec![],
        &[None, Some(2)],
        "y",
        13,
    );
    let got = run(&bytes, Tensor::new(vec![1, 2], vec![1.0, 2.0]));
    assert_eq!(got.data, vec![11.0, 22.0]);
}

// ---------------------------------------------------------------- errors

fn relu_model(op: &str, opset: i64) -> Vec<u8> {
    model(
        vec![node(op, &["x"], "y", vec![])],
        vec![],
        &[None, Some(3), Some(32), Some(32)],
        "y",
        opset,
    )
}

#[test]
fn unsupported_operator_names_node_op_and_opset() {
    let e = Graph::from_bytes(&relu_model("LSTM", 13)).unwrap_err();
    assert!(
        e.contains("LSTM_y") && e.contains("LSTM") && e.contains("opset 13"),
        "{e}"
    );
    let bad_attr = model(
        vec![node(
            "Conv",
            &["x", "w"],
            "y",
            vec![string("auto_pad", "SAME_UPPER"), int("frobnicate", 1)],
        )],
        vec![ftensor("w", &[1, 3, 1, 1], &[1.0; 3])],
        &[None, Some(3), Some(4), Some(4)],
        "y",
        13,
    );
    let e = Graph::from_bytes(&bad_attr).unwrap_err();
    assert!(e.contains("frobnicate") && e.contains("Conv"), "{e}");
    let e = Graph::from_bytes(&relu_model("Relu", 3)).unwrap_err();
    assert!(e.contains("opset 3"), "{e}");
    let dynamic_shape = model(
        vec![node("Reshape", &["x", "x"], "y", vec![])],
        vec![],
        &[None, Some(3), Some(32), Some(32)],
        "y",
        13,
    );
    let e = Graph::from_bytes(&dynamic_shape).unwrap_err();
    assert!(e.contains("must be a constant"), "{e}");
}

#[test]
fn truncated_and_corrupt_files_are_errors() {
    let good = relu_model("Relu", 13);
    assert!(Graph::from_bytes(&good).is_ok());
    for cut in [1, good.len() / 3, good.len() - 1] {
        let e = Graph::from_bytes(&good[..cut]).unwrap_err();
        assert!(
            e.contains("ONNX") || e.contains("graph") || e.contains("opset"),
            "cut {cut}: {e}"
        );
    }
    let e = Graph::from_bytes(b"this is not a protobuf at all \xff\xff\xff").unwrap_err();
    assert!(e.contains("not a valid ONNX model"), "{e}");
    let dir = std::env::temp_dir().join(format!("qb-onnx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("truncated.onnx");
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    let e = Graph::load(&path).unwrap_err();
    assert!(
        e.contains("truncated.onnx"),
        "the error names the file: {e}"
    );
    let e = Graph::load(&dir.join("missing.onnx")).unwrap_err();
    assert!(e.contains("missing.onnx"), "{e}");
    // An initializer whose data does not match its dims.
    let bad = model(
        vec![node("Add", &["x", "w"], "y", vec![])],
        vec![ftensor("w", &[3], &[1.0, 2.0])],
        &[None, Some(3)],
        "y",
        13,
    );
    let e = Graph::from_bytes(&bad).unwrap_err();
    assert!(e.contains("initializer 'w'"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn wrong_input_shape_is_an_error_not_a_panic() {
    let g = Graph::from_bytes(&relu_model("Relu", 13)).unwrap();
    let e = Engine::new(&g)
        .run(Tensor::zeros(vec![2, 1, 28, 28]), None)
        .unwrap_err();
    assert!(e.contains("expects shape") && e.contains("28"), "{e}");
    // Shape errors inside the graph name the node.
    let bytes = model(
        vec![node("MatMul", &["x", "w"], "y", vec![])],
        vec![ftensor("w", &[4, 2], &[0.0; 8])],
        &[None, None],
        "y",
        13,
    );
    let g = Graph::from_bytes(&bytes).unwrap();
    let e = Engine::new(&g)
        .run(Tensor::zeros(vec![2, 3]), None)
        .unwrap_err();
    assert!(
        e.contains("MatMul_y") && e.contains("inner dimensions"),
        "{e}"
    );
}

/// A hook that changes nothing: with it, the engine runs every node on its own.
struct Watch;
impl quantbench::engine::EdgeHook for Watch {
    fn on_value(&self, _value: usize, _tensor: &mut Tensor) {}
}

#[test]
fn conv_add_relu_fused_equal_node_by_node_and_the_reference() {
    let mut r = Seeded(11);
    let conv = |name: &str, input: &str, out: &str, stride: i64| {
        node(
            "Conv",
            &[input, &format!("{name}_w"), &format!("{name}_b")],
            out,
            vec![
                ints("strides", &[stride, stride]),
                ints("pads", &[1, 1, 1, 1]),
            ],
        )
    };
    // (channels, stride of the second conv, what the residual of the Add is)
    for (c, stride, residual) in [
        (8, 1, "a"),      // identity shortcut, produced before the conv: Add and Relu fused
        (16, 1, "bias4"), // [1, c, 1, 1] constant: broadcast, the nodes run one by one
        (8, 1, "late"),   // produced after the conv: not fused
        (6, 1, "a"),      // 6 channels: the general GEMM path with the epilogue after it
        (8, 2, "pool"),   // strided conv (im2col + packed GEMM), residual from a pool
    ] {
        let (h, w) = (9, 12);
        let x = Tensor::new(vec![2, c, h, w], r.vec(2 * c * h * w));
        let w1 = Tensor::new(vec![c, c, 3, 3], r.vec(c * c * 9));
        let w2 = Tensor::new(vec![c, c, 3, 3], r.vec(c * c * 9));
        let (b1, b2, b4) = (r.vec(c), r.vec(c), r.vec(c));
        let mut nodes = vec![
            conv("c1", "x", "c1_out", 1),
            node("Relu", &["c1_out"], "a", vec![]),
            conv("c2", "a", "c2_out", stride),
        ];
        if residual == "late" {
            nodes.push(node("Relu", &["x"], "late", vec![]));
        }
        if residual == "pool" {
            nodes.insert(
                2,
                node(
                    "MaxPool",
                    &["a"],
                    "pool",
                    vec![ints("kernel_shape", &[1, 1]), ints("strides", &[2, 2])],
                ),
            );
        }
        nodes.push(node("Add", &[residual, "c2_out"], "sum", vec![]));
        nodes.push(node("Relu", &["sum"], "y", vec![]));
        let bytes = model(
            nodes,
            vec![
                ftensor("c1_w", &w1.shape, &w1.data),
                ftensor("c1_b", &[c], &b1),
                ftensor("c2_w", &w2.shape, &w2.data),
                ftensor("c2_b", &[c], &b2),
                ftensor("bias4", &[1, c, 1, 1], &b4),
            ],
            &[None, Some(c), Some(h), Some(w)],
            "y",
            13,
        );
        let g = Graph::from_bytes(&bytes).expect("import");
        let e = Engine::new(&g);
        let fused = e.run(x.clone(), None).expect("run");
        let one_by_one = e.run(x.clone(), Some(&Watch)).expect("run with a hook");
        assert_eq!(fused.shape, one_by_one.shape);
        assert!(
            fused.data.iter().zip(&one_by_one.data).all(|(a, b)| a == b),
            "c={c} stride={stride} residual={residual}: fused differs from node by node"
        );
        // The reference: convolutions, the Add with broadcasting, ReLUs.
        let relu = |t: &mut Tensor| t.data.iter_mut().for_each(|v| *v = v.max(0.0));
        let mut a = conv_ref(&x, &w1, Some(&b1), [1, 1], [1; 4], [1, 1], 1);
        relu(&mut a);
        let mut want = conv_ref(&a, &w2, Some(&b2), [stride as usize; 2], [1; 4], [1, 1], 1);
        let [oh, ow] = [want.shape[2], want.shape[3]];
        for (i, v) in want.data.iter_mut().enumerate() {
            let (n, ch, y, xx) = (i / (c * oh * ow), i / (oh * ow) % c, i / ow % oh, i % ow);
            *v += match residual {
                "bias4" => b4[ch],
                "late" => x.data[i].max(0.0),
                "pool" => a.data[((n * c + ch) * h + 2 * y) * w + 2 * xx],
                _ => a.data[i],
            };
        }
        relu(&mut want);
        assert_close(&fused, &want, 1e-5);
    }
}

#[test]
fn batches_run_image_by_image_only_where_no_op_mixes_images() {
    let mut r = Seeded(12);
    // An odd width keeps the conv off Winograd (which runs only without a hook), so the two
    // schedules do the same arithmetic and must agree bit for bit.
    let (c, h, w) = (8, 6, 7);
    let wt = r.vec(c * c * 9);
    let inits = || {
        vec![
            ftensor("w", &[c, c, 3, 3], &wt),
            ftensor("per_channel", &[1, c, 1, 1], &[0.5; 8]),
            ftensor("per_batch", &[2, c, 1, 1], &[0.5; 16]),
            ftensor("lower_rank", &[c, 1, 1], &[0.5; 8]),
        ]
    };
    let conv = || node("Conv", &["x", "w"], "c", vec![ints("pads", &[1, 1, 1, 1])]);
    let input = [None, Some(c), Some(h), Some(w)];
    // (name, the nodes after the conv, the declared input shape, image by image?)
    type Case = (
        &'static str,
        Vec<proto::NodeProto>,
        [Option<usize>; 4],
        bool,
    );
    let cases: Vec<Case> = vec![
        (
            "add per channel",
            vec![node("Add", &["c", "per_channel"], "y", vec![])],
            input,
            true,
        ),
        (
            "add lower rank",
            vec![node("Add", &["c", "lower_rank"], "y", vec![])],
            input,
            true,
        ),
        (
            "add per batch",
            vec![node("Add", &["c", "per_batch"], "y", vec![])],
            input,
            false,
        ),
        (
            "slice along H",
            vec![node("Slice", &["c", "s", "e", "a"], "y", vec![])],
            input,
            true,
        ),
        (
            "concat along the batch",
            vec![node("Concat", &["c", "c"], "y", vec![int("axis", 0)])],
            input,
            false,
        ),
        (
            "concat along channels",
            vec![node("Concat", &["c", "c"], "y", vec![int("axis", 1)])],
            input,
            true,
        ),
        (
            "flatten then reshape with the batch baked in",
            vec![
                node("Flatten", &["c"], "f", vec![]),
                node("Reshape", &["f", "shape"], "y", vec![]),
            ],
            input,
            false,
        ),
        (
            "fixed batch",
            vec![node("Relu", &["c"], "y", vec![])],
            [Some(2), Some(c), Some(h), Some(w)],
            false,
        ),
    ];
    for (what, tail, inp, want) in cases {
        let mut nodes = vec![conv()];
        nodes.extend(tail);
        let mut init = inits();
        init.push(itensor("s", &[1]));
        init.push(itensor("e", &[4]));
        init.push(itensor("a", &[2]));
        init.push(itensor("shape", &[2, -1]));
        let bytes = model(nodes, init, &inp, "y", 13);
        let g = Graph::from_bytes(&bytes).expect(what);
        let e = Engine::new(&g);
        assert_eq!(e.runs_per_image(), want, "{what}");
        // either way, the batch gives what the engine gives node by node (a hook turns both
        // the image-by-image schedule and the fusion off)
        let x = Tensor::new(vec![2, c, h, w], r.vec(2 * c * h * w));
        let fast = e.run(x.clone(), None).expect(what);
        let plain = e.run(x, Some(&Watch)).expect(what);
        assert_eq!(fast.shape, plain.shape, "{what}");
        assert!(
            fast.data.iter().zip(&plain.data).all(|(a, b)| a == b),
            "{what}: image by image differs from the whole batch"
        );
    }
}
