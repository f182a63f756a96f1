//! `integer_only`: the real int8 path (Jacob et al. 2018). Activations are `u8` codes with a
//! per-tensor scale and zero point, weights `i8` per output channel (symmetric, codes in
//! `[-127, 127]`), biases `i32` at scale `s_x * s_w[c]`, and every layer runs on integers:
//!
//! * Conv (+ a following Relu, fused): the `u8` NHWC input padded with its zero point, and
//!   the int8 convolution-GEMM with its fused epilogue (bias, per-channel
//!   fixed-point multiplier `s_x s_w[c] / s_y`, output zero point, ReLU as a clamp); on
//!   AVX-512 VNNI the GEMM reads the zero-point-padded input in place (implicit im2col).
//! * Add (+ Relu): the integer-only quantized addition of the kernels crate.
//! * GlobalAveragePool: an i32 sum per channel and one fixed-point multiplier.
//! * Relu, MaxPool, Slice, constant Pad, Flatten / Reshape, Identity: on the codes (the
//!   scale is unchanged; Pad writes the code of its value).
//! * The final Gemm / MatMul: the int8 GEMM to i32; its logits are dequantized (the only
//!   float besides quantizing the input image).
//!
//! Quantization points are the outputs of the layers above that compute (Conv, Add, pool
//! averages, the input); [`Int8Model::simulation`] builds the fake-quant simulation of exactly
//! this scheme (same codes, same points) for the accuracy check.

use quantbench_kernels::gemm::{
    conv_requantize, gemm_i32, ConvGeometry, Epilogue, OutputScale, PackedB,
};
use quantbench_kernels::integer_only::add::AddParams;
use quantbench_kernels::integer_only::{
    quantize_multiplier, ChannelMultipliers, Multiplier, RequantOutput,
};
use quantbench_kernels::{Kernels, QuantParams};

use super::ops::{pad_nd, slice_nd};
use crate::calib::ActParams;
use crate::model::{Graph, Op, Tensor, Window};

/// Scale and zero point of a `u8` activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QParams {
    pub scale: f32,
    pub zero_point: i32,
}

impl QParams {
    fn from(p: &QuantParams) -> QParams {
        QParams {
            scale: p.scale(),
            zero_point: p.zero_point(),
        }
    }
}

/// A `u8` activation in NHWC layout.
#[derive(Clone, Debug)]
struct Act {
    dims: [usize; 4],
    data: Vec<u8>,
}

/// What a value holds while the model runs.
enum Slot {
    Empty,
    Codes(Act),
    /// 2-D activations after Flatten: `[n, features]`.
    Flat(usize, usize, Vec<u8>),
    Float(Tensor),
}

struct ConvStep {
    src: usize,
    dst: usize,
    window: Window,
    cin: usize,
    cout: usize,
    zp_in: i32,
    packed: PackedB,
    epi: Epilogue,
}

struct FcStep {
    src: usize,
    dst: usize,
    zp_in: i32,
    n_out: usize,
    packed: PackedB,
    bias: Vec<i32>,
    /// `s_x * s_w[j]`: dequantizes output column `j`.
    scale: Vec<f32>,
}

enum Step {
    Conv(Box<ConvStep>),
    Add {
        a: usize,
        b: usize,
        dst: usize,
        params: AddParams,
    },
    Relu {
        src: usize,
        dst: usize,
        zp: u8,
    },
    MaxPool {
        src: usize,
        dst: usize,
        window: Window,
        zp: u8,
    },
    Slice {
        src: usize,
        dst: usize,
        starts: Vec<i64>,
        ends: Vec<i64>,
        axes: Vec<i64>,
        steps: Vec<i64>,
    },
    Pad {
        src: usize,
        dst: usize,
        pads: Vec<i64>,
        fill: u8,
    },
    GlobalAvgPool {
        src: usize,
        dst: usize,
        zp_in: i32,
        /// `s_in / s_out`; divided by H*W when the shape is known.
        ratio: f64,
        out: RequantOutput,
    },
    Flatten {
        src: usize,
        dst: usize,
    },
    Identity {
        src: usize,
        dst: usize,
    },
    Fc(Box<FcStep>),
}

/// A graph lowered to integer-only steps.
pub struct Int8Model {
    graph: Graph,
    input: QParams,
    steps: Vec<Step>,
    /// Quantization parameters of every value that holds codes (`None` otherwise).
    params: Vec<Option<QParams>>,
    /// The value whose contents the model returns (dequantized if codes).
    output: usize,
    /// Per value: the last step reading it (frees memory early).
    last_use: Vec<usize>,
    kernels: Kernels,
    /// Quantized biases as the simulation needs them: (bias value id, dequantized values).
    sim_biases: Vec<(usize, Vec<f32>)>,
    /// Weights as the simulation needs them: (weight value id, dequantized values).
    sim_weights: Vec<(usize, Vec<f32>)>,
}

/// Per-channel symmetric int8 weights of an `[out, k]` matrix: codes in `[-127, 127]` and
/// one scale per output row (`max |w| / 127`, 1 for an all-zero row).
pub fn quantize_weights_i8(w: &[f32], out: usize) -> (Vec<i8>, Vec<f32>) {
    let k = w.len() / out;
    let mut codes = vec![0i8; w.len()];
    let mut scales = vec![1f32; out];
    for o in 0..out {
        let row = &w[o * k..(o + 1) * k];
        let m = row.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let s = if m > 0.0 { m / 127.0 } else { 1.0 };
        scales[o] = s;
        for (c, &v) in codes[o * k..(o + 1) * k].iter_mut().zip(row) {
            *c = (v / s).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
    }
    (codes, scales)
}

/// The parameters of an int8 input of node `node`, or an error naming it.
fn input_params(
    g: &Graph,
    params: &[Option<QParams>],
    v: usize,
    node: usize,
) -> Result<QParams, String> {
    params[v].ok_or_else(|| {
        unsupported(
            g,
            node,
            &format!(
                "input '{}' is not an int8 activation (a constant or a float value)",
                g.value_names[v]
            ),
        )
    })
}

fn unsupported(g: &Graph, node: usize, why: &str) -> String {
    let n = &g.nodes[node];
    format!("integer_only: node '{}' ({}): {why}", n.name, n.op.name())
}

impl Int8Model {
    /// Lowers `graph` with activation parameters `acts` (u8 asymmetric, from calibration of
    /// the graph with int8 weights). Errors name the node that has no integer kernel.
    pub fn new(graph: &Graph, acts: &ActParams) -> Result<Int8Model, String> {
        let g = graph;
        let nv = g.value_names.len();
        let mut consumers = vec![Vec::new(); nv];
        for (i, n) in g.nodes.iter().enumerate() {
            for &v in &n.inputs {
                consumers[v].push(i);
            }
        }
        let act = |v: usize| -> Result<QParams, String> {
            acts.params
                .get(v)
                .and_then(|p| p.as_ref())
                .map(QParams::from)
                .ok_or_else(|| {
                    format!(
                        "integer_only: no calibrated range for value '{}'",
                        g.value_names[v]
                    )
                })
        };
        let mut params: Vec<Option<QParams>> = vec![None; nv];
        params[g.input] = Some(act(g.input)?);
        let mut steps = Vec::new();
        let mut fused_away = vec![false; g.nodes.len()];
        let mut sim_biases = Vec::new();
        let mut sim_weights = Vec::new();
        // a node whose output feeds exactly one Relu (not the graph output) fuses it
        let fused_relu = |i: usize| -> Option<usize> {
            let out = g.nodes[i].output;
            if out == g.output {
                return None;
            }
            match consumers[out].as_slice() {
                [c] if g.nodes[*c].op == Op::Relu => Some(*c),
                _ => None,
            }
        };
        // an Add of a constant right after a bias-free Conv / MatMul is its bias: returns the
        // Add node and the constant when the constant is one value per output channel
        // (shape [C, 1, 1] / [1, C, 1, 1] after a Conv, [C] / [1, C] after a MatMul)
        let const_bias_add = |i: usize, count: usize, conv: bool| -> Option<(usize, usize)> {
            let out = g.nodes[i].output;
            let [c] = consumers[out].as_slice() else {
                return None;
            };
            let add = &g.nodes[*c];
            if add.op != Op::Add {
                return None;
            }
            let other = if add.inputs[0] == out {
                add.inputs[1]
            } else {
                add.inputs[0]
            };
            let t = g.constants[other].as_ref()?;
            let dims: Vec<usize> = t.shape.iter().copied().filter(|&d| d != 1).collect();
            let pos_ok = if conv {
                t.shape.len() >= 3 && t.shape[t.shape.len() - 3] == count
            } else {
                t.shape.last() == Some(&count)
            };
            (dims == [count] && pos_ok).then_some((*c, other))
        };
        for (i, n) in g.nodes.iter().enumerate() {
            if fused_away[i] {
                continue;
            }
            let x = n.inputs[0];
            match &n.op {
                Op::Conv { window, group } => {
                    if *group != 1 {
                        return Err(unsupported(g, i, "grouped convolution"));
                    }
                    let px = input_params(g, &params, x, i)?;
                    let w = g.constants[n.inputs[1]]
                        .as_ref()
                        .ok_or_else(|| unsupported(g, i, "the weight is not a constant"))?;
                    let [cout, cin, kh, kw] = w.shape[..] else {
                        return Err(unsupported(g, i, "the weight is not 4-D"));
                    };
                    let (codes, ws) = quantize_weights_i8(&w.data, cout);
                    sim_weights.push((
                        n.inputs[1],
                        codes
                            .iter()
                            .enumerate()
                            .map(|(j, &c)| c as f32 * ws[j / (cin * kh * kw)])
                            .collect(),
                    ));
                    // B [K = (ky, kx, c), cout] with the channels padded to a multiple of 4 (zero
                    // weights; the input's extra channels hold its zero point), so that a kernel
                    // row is a whole number of 4-byte groups and the GEMM reads it in place
                    let cp = cin.next_multiple_of(4);
                    let k = kh * kw * cp;
                    let mut b = vec![0i8; k * cout];
                    for o in 0..cout {
                        for c in 0..cin {
                            for y in 0..kh {
                                for xx in 0..kw {
                                    b[((y * kw + xx) * cp + c) * cout + o] =
                                        codes[((o * cin + c) * kh + y) * kw + xx];
                                }
                            }
                        }
                    }
                    let mut last = i;
                    let mut bias_value = n.inputs.get(2).copied();
                    if bias_value.is_none() {
                        if let Some((add, cv)) = const_bias_add(i, cout, true) {
                            fused_away[add] = true;
                            last = add;
                            bias_value = Some(cv);
                        }
                    }
                    let (dst, relu) = match fused_relu(last) {
                        Some(r) => {
                            fused_away[r] = true;
                            (g.nodes[r].output, true)
                        }
                        None => (g.nodes[last].output, false),
                    };
                    let py = act(dst)?;
                    let bias_f =
                        bias_value.map(|bv| (bv, g.constants[bv].as_ref().map(|t| t.data.clone())));
                    let mut bias = vec![0i32; cout];
                    if let Some((bv, data)) = bias_f {
                        let data =
                            data.ok_or_else(|| unsupported(g, i, "the bias is not a constant"))?;
                        let mut deq = vec![0f32; cout];
                        for o in 0..cout {
                            let s = px.scale as f64 * ws[o] as f64;
                            let q = (data[o] as f64 / s)
                                .round()
                                .clamp(i32::MIN as f64, i32::MAX as f64);
                            bias[o] = q as i32;
                            deq[o] = (q * s) as f32;
                        }
                        sim_biases.push((bv, deq));
                    }
                    let ms = ws
                        .iter()
                        .map(|&s| quantize_multiplier(px.scale as f64 * s as f64 / py.scale as f64))
                        .collect::<Result<Vec<Multiplier>, _>>()
                        .map_err(|e| unsupported(g, i, &e.to_string()))?;
                    let lo = if relu { py.zero_point } else { 0 };
                    let epi = Epilogue {
                        bias: Some(bias),
                        scale: OutputScale::PerChannel(ChannelMultipliers::new(&ms)),
                        output: RequantOutput::new(py.zero_point, lo, 255)
                            .map_err(|e| unsupported(g, i, &e.to_string()))?,
                    };
                    let kern = Kernels::active();
                    let packed = kern
                        .pack_b::<u8>(&b, k, cout, &[0])
                        .map_err(|e| unsupported(g, i, &e.to_string()))?;
                    let mut window = window.clone();
                    window.kernel = [kh, kw];
                    params[dst] = Some(py);
                    steps.push(Step::Conv(Box::new(ConvStep {
                        src: x,
                        dst,
                        window,
                        cin,
                        cout,
                        zp_in: px.zero_point,
                        packed,
                        epi,
                    })));
                }
                Op::Add => {
                    let (a, b) = (n.inputs[0], n.inputs[1]);
                    let (pa, pb) = (
                        input_params(g, &params, a, i)?,
                        input_params(g, &params, b, i)?,
                    );
                    let (dst, relu) = match fused_relu(i) {
                        Some(r) => {
                            fused_away[r] = true;
                            (g.nodes[r].output, true)
                        }
                        None => (n.output, false),
                    };
                    let py = act(dst)?;
                    let lo = if relu { py.zero_point } else { 0 };
                    let out = RequantOutput::new(py.zero_point, lo, 255)
                        .map_err(|e| unsupported(g, i, &e.to_string()))?;
                    let p = AddParams::new(
                        (pa.scale, pa.zero_point),
                        (pb.scale, pb.zero_point),
                        py.scale,
                        out,
                    )
                    .map_err(|e| unsupported(g, i, &e.to_string()))?;
                    params[dst] = Some(py);
                    steps.push(Step::Add {
                        a,
                        b,
                        dst,
                        params: p,
                    });
                }
                Op::Relu => {
                    let p = input_params(g, &params, x, i)?;
                    params[n.output] = Some(p);
                    steps.push(Step::Relu {
                        src: x,
                        dst: n.output,
                        zp: p.zero_point as u8,
                    });
                }
                Op::MaxPool { window } => {
                    let p = input_params(g, &params, x, i)?;
                    params[n.output] = Some(p);
                    steps.push(Step::MaxPool {
                        src: x,
                        dst: n.output,
                        window: window.clone(),
                        zp: p.zero_point as u8,
                    });
                }
                Op::Slice {
                    starts,
                    ends,
                    axes,
                    steps: st,
                } => {
                    params[n.output] = Some(input_params(g, &params, x, i)?);
                    steps.push(Step::Slice {
                        src: x,
                        dst: n.output,
                        starts: starts.clone(),
                        ends: ends.clone(),
                        axes: axes.clone(),
                        steps: st.clone(),
                    });
                }
                Op::Pad { pads, value } => {
                    let p = input_params(g, &params, x, i)?;
                    let code = (*value / p.scale).round() + p.zero_point as f32;
                    if !(0.0..=255.0).contains(&code)
                        || ((code - p.zero_point as f32) * p.scale - value).abs()
                            > 1e-6 * value.abs().max(1.0)
                    {
                        return Err(unsupported(
                            g,
                            i,
                            &format!("pad value {value} is not a code of its input's quantization"),
                        ));
                    }
                    params[n.output] = Some(p);
                    steps.push(Step::Pad {
                        src: x,
                        dst: n.output,
                        pads: pads.clone(),
                        fill: code as u8,
                    });
                }
                Op::GlobalAveragePool => {
                    let p = input_params(g, &params, x, i)?;
                    let py = act(n.output)?;
                    params[n.output] = Some(py);
                    steps.push(Step::GlobalAvgPool {
                        src: x,
                        dst: n.output,
                        zp_in: p.zero_point,
                        ratio: p.scale as f64 / py.scale as f64,
                        out: RequantOutput::new(py.zero_point, 0, 255)
                            .map_err(|e| unsupported(g, i, &e.to_string()))?,
                    });
                }
                Op::Flatten { axis: 1 } => {
                    params[n.output] = Some(input_params(g, &params, x, i)?);
                    steps.push(Step::Flatten {
                        src: x,
                        dst: n.output,
                    });
                }
                Op::Reshape { shape, .. }
                    if shape.len() == 2
                        && (shape[1] == -1 || shape[0] == -1 || shape[0] == 0 || shape[0] == 1) =>
                {
                    params[n.output] = Some(input_params(g, &params, x, i)?);
                    steps.push(Step::Flatten {
                        src: x,
                        dst: n.output,
                    });
                }
                Op::Identity => {
                    params[n.output] = params[x];
                    steps.push(Step::Identity {
                        src: x,
                        dst: n.output,
                    });
                }
                Op::Gemm {
                    alpha,
                    beta,
                    trans_a: false,
                    trans_b,
                } if *alpha == 1.0 && *beta == 1.0 => {
                    let px = input_params(g, &params, x, i)?;
                    let w = g.constants[n.inputs[1]]
                        .as_ref()
                        .ok_or_else(|| unsupported(g, i, "the weight is not a constant"))?;
                    let [r0, r1] = w.shape[..] else {
                        return Err(unsupported(g, i, "the weight is not 2-D"));
                    };
                    // rows = output features
                    let (n_out, k) = if *trans_b { (r0, r1) } else { (r1, r0) };
                    let w_rows: Vec<f32> = if *trans_b {
                        w.data.clone()
                    } else {
                        (0..n_out)
                            .flat_map(|o| (0..k).map(move |kk| (o, kk)))
                            .map(|(o, kk)| w.data[kk * n_out + o])
                            .collect()
                    };
                    let fc = fc_step(
                        g,
                        i,
                        x,
                        n.output,
                        px,
                        &w_rows,
                        n_out,
                        k,
                        n.inputs.get(2).copied(),
                        &mut sim_biases,
                    )?;
                    let deq_rows: Vec<f32> = fc.1;
                    let deq: Vec<f32> = if *trans_b {
                        deq_rows
                    } else {
                        (0..k)
                            .flat_map(|kk| (0..n_out).map(move |o| (kk, o)))
                            .map(|(kk, o)| deq_rows[o * k + kk])
                            .collect()
                    };
                    sim_weights.push((n.inputs[1], deq));
                    steps.push(Step::Fc(Box::new(fc.0)));
                }
                Op::MatMul if g.constants[n.inputs[1]].is_some() => {
                    let px = input_params(g, &params, x, i)?;
                    let w = g.constants[n.inputs[1]].as_ref().expect("checked");
                    let [k, n_out] = w.shape[..] else {
                        return Err(unsupported(g, i, "the weight is not 2-D"));
                    };
                    let w_rows: Vec<f32> = (0..n_out)
                        .flat_map(|o| (0..k).map(move |kk| (o, kk)))
                        .map(|(o, kk)| w.data[kk * n_out + o])
                        .collect();
                    let (dst, bias) = match const_bias_add(i, n_out, false) {
                        Some((add, cv)) => {
                            fused_away[add] = true;
                            (g.nodes[add].output, Some(cv))
                        }
                        None => (n.output, None),
                    };
                    let fc = fc_step(g, i, x, dst, px, &w_rows, n_out, k, bias, &mut sim_biases)?;
                    let deq: Vec<f32> = (0..k)
                        .flat_map(|kk| (0..n_out).map(move |o| (kk, o)))
                        .map(|(kk, o)| fc.1[o * k + kk])
                        .collect();
                    sim_weights.push((n.inputs[1], deq));
                    steps.push(Step::Fc(Box::new(fc.0)));
                }
                _ => {
                    return Err(unsupported(
                        g,
                        i,
                        "no integer kernel for this operator (or these attributes)",
                    ))
                }
            }
        }
        let mut last_use = vec![0usize; nv];
        for (si, s) in steps.iter().enumerate() {
            for v in s.inputs() {
                last_use[v] = si;
            }
        }
        last_use[g.output] = usize::MAX;
        Ok(Int8Model {
            graph: graph.clone(),
            input: params[g.input].expect("set above"),
            steps,
            params,
            output: g.output,
            last_use,
            kernels: Kernels::active(),
            sim_biases,
            sim_weights,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The fake-quant simulation of this exact scheme: the graph with the int8 weights and
    /// the i32 biases (dequantized), and the activation parameters of every quantization
    /// point (for [`crate::calib::FakeQuantHook`]). Values that only move codes (Slice, Pad,
    /// Relu, MaxPool) need no fake-quant: their values are already on the grid.
    pub fn simulation(&self) -> Result<(Graph, ActParams), String> {
        let mut g = self.graph.clone();
        for (v, d) in self.sim_weights.iter().chain(&self.sim_biases) {
            g.set_constant(*v, d.clone())?;
        }
        let mut points = vec![None; self.params.len()];
        let mut mark = |v: usize| -> Result<(), String> {
            if let Some(p) = self.params[v] {
                points[v] = Some(
                    QuantParams::new(p.scale, p.zero_point, 0, 255).map_err(|e| e.to_string())?,
                );
            }
            Ok(())
        };
        mark(self.graph.input)?;
        for s in &self.steps {
            match s {
                Step::Conv(c) => mark(c.dst)?,
                Step::Add { dst, .. } | Step::GlobalAvgPool { dst, .. } => mark(*dst)?,
                _ => {}
            }
        }
        Ok((g, ActParams { params: points }))
    }

    /// Runs a batch (`[n, c, h, w]` f32, normalized): quantizes it, runs the integer steps,
    /// returns the dequantized output.
    pub fn run(&self, input: Tensor) -> Result<Tensor, String> {
        let [n, c, h, w] = input.shape[..] else {
            return Err(format!(
                "integer_only: input of shape {:?}; expected [n, c, h, w]",
                input.shape
            ));
        };
        let mut slots: Vec<Slot> = (0..self.params.len()).map(|_| Slot::Empty).collect();
        // quantize (the kernels' rounding, as in the simulation) and transpose to NHWC
        let q = self.input;
        let qp = QuantParams::new(q.scale, q.zero_point, 0, 255).map_err(|e| e.to_string())?;
        // buffers live per thread across runs: fresh ones cost zeroing and page faults
        thread_local! {
            static BUFFERS: std::cell::RefCell<Buffers> = const {
                std::cell::RefCell::new(Buffers { scratch: Vec::new(), free: Vec::new() })
            };
        }
        let mut bufs = BUFFERS.with(|b| std::mem::take(&mut *b.borrow_mut()));
        let mut nchw = bufs.take(input.len());
        self.kernels
            .quantize(&input.data, &qp, &mut nchw)
            .map_err(|e| e.to_string())?;
        let hw = h * w;
        let mut data = bufs.take(input.len());
        for ni in 0..n {
            let src = &nchw[ni * c * hw..(ni + 1) * c * hw];
            let dst = &mut data[ni * c * hw..(ni + 1) * c * hw];
            for ci in 0..c {
                for (p, &v) in src[ci * hw..(ci + 1) * hw].iter().enumerate() {
                    dst[p * c + ci] = v;
                }
            }
        }
        slots[self.graph.input] = Slot::Codes(Act {
            dims: [n, h, w, c],
            data,
        });
        bufs.give(nchw);
        for (si, step) in self.steps.iter().enumerate() {
            let out = self.exec(step, &slots, &mut bufs)?;
            let dst = step.dst();
            slots[dst] = out;
            for v in step.inputs() {
                if self.last_use[v] == si {
                    if let Slot::Codes(a) = std::mem::replace(&mut slots[v], Slot::Empty) {
                        bufs.give(a.data);
                    }
                }
            }
        }
        BUFFERS.with(|b| *b.borrow_mut() = bufs);
        match std::mem::replace(&mut slots[self.output], Slot::Empty) {
            Slot::Float(t) => Ok(t),
            Slot::Flat(n, f, d) => {
                let p = self.params[self.output].expect("codes have parameters");
                Ok(Tensor::new(
                    vec![n, f],
                    d.iter()
                        .map(|&v| (v as i32 - p.zero_point) as f32 * p.scale)
                        .collect(),
                ))
            }
            Slot::Codes(a) => {
                let p = self.params[self.output].expect("codes have parameters");
                let [n, h, w, c] = a.dims;
                let mut out = vec![0f32; a.data.len()];
                for ni in 0..n {
                    for pix in 0..h * w {
                        for ci in 0..c {
                            out[(ni * c + ci) * h * w + pix] =
                                (a.data[(ni * h * w + pix) * c + ci] as i32 - p.zero_point) as f32
                                    * p.scale;
                        }
                    }
                }
                Ok(Tensor::new(vec![n, c, h, w], out))
            }
            Slot::Empty => Err("integer_only: the output was never computed".into()),
        }
    }

    fn exec(&self, step: &Step, slots: &[Slot], bufs: &mut Buffers) -> Result<Slot, String> {
        let codes = |v: usize| -> Result<&Act, String> {
            match &slots[v] {
                Slot::Codes(a) => Ok(a),
                _ => Err(format!(
                    "integer_only: value '{}' is not a 4-D int8 activation here",
                    self.graph.value_names[v]
                )),
            }
        };
        let k = &self.kernels;
        Ok(match step {
            Step::Conv(cs) => {
                let x = codes(cs.src)?;
                let [n, h, w, c] = x.dims;
                if c != cs.cin {
                    return Err(format!(
                        "integer_only: conv input has {c} channels, the weight {}",
                        cs.cin
                    ));
                }
                let ([oh, ow], pads) = cs.window.output(h, w)?;
                let mut out = bufs.take(n * oh * ow * cs.cout);
                // the input padded with its zero point (a plain copy when there is no padding),
                // then the convolution as an implicit GEMM over it
                let unpadded = pads == [0; 4];
                let (hp, wp) = (h + pads[0] + pads[2], w + pads[1] + pads[3]);
                let cp = c.next_multiple_of(4);
                let unpadded = unpadded && cp == c;
                if !unpadded {
                    pad_nhwc(x, pads, cp, cs.zp_in as u8, &mut bufs.scratch);
                }
                let xp: &[u8] = if unpadded {
                    &x.data
                } else {
                    &bufs.scratch[..n * hp * wp * cp]
                };
                let geo = ConvGeometry {
                    batch: n,
                    height: hp,
                    width: wp,
                    channels: cp,
                    kernel: cs.window.kernel,
                    strides: cs.window.strides,
                    dilations: cs.window.dilations,
                };
                if geo.output().map_err(|e| e.to_string())? != [oh, ow] {
                    return Err(format!(
                        "integer_only: conv output {:?} != [{oh}, {ow}]",
                        geo.output()
                    ));
                }
                conv_requantize(xp, &geo, cs.zp_in, &cs.packed, &cs.epi, &mut out, 1)
                    .map_err(|e| e.to_string())?;
                Slot::Codes(Act {
                    dims: [n, oh, ow, cs.cout],
                    data: out,
                })
            }
            Step::Add { a, b, params, .. } => {
                let (xa, xb) = (codes(*a)?, codes(*b)?);
                if xa.dims != xb.dims {
                    return Err(format!(
                        "integer_only: Add of shapes {:?} and {:?} (NHWC); broadcasting is not supported",
                        xa.dims, xb.dims
                    ));
                }
                let mut out = bufs.take(xa.data.len());
                k.add_requantize(&xa.data, &xb.data, params, &mut out)
                    .map_err(|e| e.to_string())?;
                Slot::Codes(Act {
                    dims: xa.dims,
                    data: out,
                })
            }
            Step::Relu { src, zp, .. } => match &slots[*src] {
                Slot::Codes(x) => Slot::Codes(Act {
                    dims: x.dims,
                    data: x.data.iter().map(|&v| v.max(*zp)).collect(),
                }),
                Slot::Flat(n, f, d) => Slot::Flat(*n, *f, d.iter().map(|&v| v.max(*zp)).collect()),
                _ => return Err("integer_only: Relu of a non-int8 value".into()),
            },
            Step::MaxPool {
                src, window, zp, ..
            } => {
                let x = codes(*src)?;
                let [n, h, w, c] = x.dims;
                let ([oh, ow], pads) = window.output(h, w)?;
                let mut out = vec![0u8; n * oh * ow * c];
                for ni in 0..n {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let o = ((ni * oh + oy) * ow + ox) * c;
                            let mut first = true;
                            for ky in 0..window.kernel[0] {
                                for kx in 0..window.kernel[1] {
                                    let y = (oy * window.strides[0] + ky * window.dilations[0])
                                        as isize
                                        - pads[0] as isize;
                                    let xx = (ox * window.strides[1] + kx * window.dilations[1])
                                        as isize
                                        - pads[1] as isize;
                                    if y < 0 || xx < 0 || y as usize >= h || xx as usize >= w {
                                        continue;
                                    }
                                    let i = ((ni * h + y as usize) * w + xx as usize) * c;
                                    for ci in 0..c {
                                        let v = x.data[i + ci];
                                        if first || v > out[o + ci] {
                                            out[o + ci] = v;
                                        }
                                    }
                                    first = false;
                                }
                            }
                            if first {
                                out[o..o + c].fill(*zp);
                            }
                        }
                    }
                }
                Slot::Codes(Act {
                    dims: [n, oh, ow, c],
                    data: out,
                })
            }
            Step::Slice {
                src,
                starts,
                ends,
                axes,
                steps,
                ..
            } => {
                let x = codes(*src)?;
                // NCHW axes -> NHWC axes
                let axes: Vec<i64> = axes
                    .iter()
                    .map(|&a| nhwc_axis(a))
                    .collect::<Result<_, _>>()?;
                let (shape, data) = slice_nd(&x.data, &x.dims, starts, ends, &axes, steps)?;
                Slot::Codes(Act {
                    dims: [shape[0], shape[1], shape[2], shape[3]],
                    data,
                })
            }
            Step::Pad {
                src, pads, fill, ..
            } => {
                let x = codes(*src)?;
                if pads.len() != 8 {
                    return Err(format!(
                        "integer_only: Pad with {} pads on a 4-D input",
                        pads.len()
                    ));
                }
                let order = [0usize, 2, 3, 1]; // NHWC axis d is NCHW axis order[d]
                let p: Vec<i64> = (0..8).map(|i| pads[(i / 4) * 4 + order[i % 4]]).collect();
                let (shape, data) = pad_nd(&x.data, &x.dims, &p, *fill)?;
                Slot::Codes(Act {
                    dims: [shape[0], shape[1], shape[2], shape[3]],
                    data,
                })
            }
            Step::GlobalAvgPool {
                src,
                zp_in,
                ratio,
                out,
                ..
            } => {
                let x = codes(*src)?;
                let [n, h, w, c] = x.dims;
                let hw = h * w;
                let m = quantize_multiplier(ratio / hw as f64).map_err(|e| e.to_string())?;
                let mut acc = vec![0i32; n * c];
                for ni in 0..n {
                    let a = &mut acc[ni * c..(ni + 1) * c];
                    for p in 0..hw {
                        let row = &x.data[(ni * hw + p) * c..(ni * hw + p + 1) * c];
                        for (s, &v) in a.iter_mut().zip(row) {
                            *s += v as i32;
                        }
                    }
                    for s in a.iter_mut() {
                        *s -= zp_in * hw as i32;
                    }
                }
                let mut data = vec![0u8; n * c];
                k.requantize(&acc, m, out, &mut data)
                    .map_err(|e| e.to_string())?;
                Slot::Codes(Act {
                    dims: [n, 1, 1, c],
                    data,
                })
            }
            Step::Flatten { src, .. } => match &slots[*src] {
                Slot::Codes(x) => {
                    let [n, h, w, c] = x.dims;
                    let f = h * w * c;
                    // features in NCHW order
                    let data = if h * w == 1 {
                        x.data.clone()
                    } else {
                        let mut d = vec![0u8; x.data.len()];
                        for ni in 0..n {
                            for p in 0..h * w {
                                for ci in 0..c {
                                    d[ni * f + ci * h * w + p] = x.data[(ni * h * w + p) * c + ci];
                                }
                            }
                        }
                        d
                    };
                    Slot::Flat(n, f, data)
                }
                Slot::Flat(n, f, d) => Slot::Flat(*n, *f, d.clone()),
                _ => return Err("integer_only: Flatten of a non-int8 value".into()),
            },
            Step::Identity { src, .. } => match &slots[*src] {
                Slot::Codes(x) => Slot::Codes(x.clone()),
                Slot::Flat(n, f, d) => Slot::Flat(*n, *f, d.clone()),
                Slot::Float(t) => Slot::Float(t.clone()),
                Slot::Empty => return Err("integer_only: Identity of an empty value".into()),
            },
            Step::Fc(fc) => {
                let (n, f, a) = match &slots[fc.src] {
                    Slot::Flat(n, f, d) => (*n, *f, d.as_slice()),
                    Slot::Codes(x) if x.dims[1] * x.dims[2] == 1 => {
                        (x.dims[0], x.dims[3], x.data.as_slice())
                    }
                    _ => return Err("integer_only: Gemm input is not a 2-D int8 activation".into()),
                };
                if f != fc.packed.k() {
                    return Err(format!(
                        "integer_only: Gemm input has {f} features, the weight {}",
                        fc.packed.k()
                    ));
                }
                let mut acc = vec![0i32; n * fc.n_out];
                gemm_i32(a, n, fc.zp_in, &fc.packed, &mut acc, 1).map_err(|e| e.to_string())?;
                let out: Vec<f32> = acc
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let j = i % fc.n_out;
                        v.wrapping_add(fc.bias[j]) as f32 * fc.scale[j]
                    })
                    .collect();
                Slot::Float(Tensor::new(vec![n, fc.n_out], out))
            }
        })
    }
}

fn nhwc_axis(a: i64) -> Result<i64, String> {
    Ok(match a {
        0 | -4 => 0,
        1 | -3 => 3,
        2 | -2 => 1,
        3 | -1 => 2,
        _ => return Err(format!("integer_only: axis {a} of a 4-D activation")),
    })
}

/// The final fully-connected layer: int8 weights `[n_out, k]` (rows = outputs), i32 bias.
/// Returns the step and the dequantized weight rows (for the simulation).
#[allow(clippy::too_many_arguments)]
fn fc_step(
    g: &Graph,
    node: usize,
    src: usize,
    dst: usize,
    px: QParams,
    w_rows: &[f32],
    n_out: usize,
    k: usize,
    bias: Option<usize>,
    sim_biases: &mut Vec<(usize, Vec<f32>)>,
) -> Result<(FcStep, Vec<f32>), String> {
    let (codes, ws) = quantize_weights_i8(w_rows, n_out);
    let deq: Vec<f32> = codes
        .iter()
        .enumerate()
        .map(|(i, &c)| c as f32 * ws[i / k])
        .collect();
    let mut b = vec![0i8; k * n_out];
    for o in 0..n_out {
        for kk in 0..k {
            b[kk * n_out + o] = codes[o * k + kk];
        }
    }
    let scale: Vec<f32> = ws
        .iter()
        .map(|&s| (px.scale as f64 * s as f64) as f32)
        .collect();
    let mut bias_q = vec![0i32; n_out];
    if let Some(bv) = bias {
        let t = g.constants[bv]
            .as_ref()
            .ok_or_else(|| unsupported(g, node, "the bias is not a constant"))?;
        if t.data.len() != n_out {
            return Err(unsupported(g, node, "the bias is not one value per output"));
        }
        let mut d = vec![0f32; n_out];
        for o in 0..n_out {
            let s = px.scale as f64 * ws[o] as f64;
            let q = (t.data[o] as f64 / s)
                .round()
                .clamp(i32::MIN as f64, i32::MAX as f64);
            bias_q[o] = q as i32;
            d[o] = (q * s) as f32;
        }
        sim_biases.push((bv, d));
    }
    let packed = Kernels::active()
        .pack_b::<u8>(&b, k, n_out, &[0])
        .map_err(|e| unsupported(g, node, &e.to_string()))?;
    Ok((
        FcStep {
            src,
            dst,
            zp_in: px.zero_point,
            n_out,
            packed,
            bias: bias_q,
            scale,
        },
        deq,
    ))
}

/// Activation buffers reused across steps and runs. Every buffer handed out is overwritten
/// in full by the step that takes it, so its old contents never matter.
#[derive(Default)]
struct Buffers {
    /// The zero-point-padded input of the current convolution.
    scratch: Vec<u8>,
    /// Buffers of values no later step reads.
    free: Vec<Vec<u8>>,
}

impl Buffers {
    /// A buffer of `len` bytes (old contents; zeros only where it had to grow).
    fn take(&mut self, len: usize) -> Vec<u8> {
        let best = (self.free.iter().enumerate())
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        let mut v = best.map_or_else(Vec::new, |i| self.free.swap_remove(i));
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0);
        }
        v
    }

    fn give(&mut self, v: Vec<u8>) {
        // a handful covers a residual network's live values; more would only hold memory
        if self.free.len() < 8 {
            self.free.push(v);
        }
    }
}

/// `x` padded by `[top, left, bottom, right]` pixels, and from `c` to `cp >= c` channels, with
/// code `fill` into `out` (NHWC; `out` is reused across layers).
fn pad_nhwc(x: &Act, pads: [usize; 4], cp: usize, fill: u8, out: &mut Vec<u8>) {
    let [n, h, w, c] = x.dims;
    let (hp, wp) = (h + pads[0] + pads[2], w + pads[1] + pads[3]);
    let len = n * hp * wp * cp;
    out.resize(len, fill);
    out.truncate(len);
    let row = w * c;
    let line = wp * cp;
    for ni in 0..n {
        let image = &mut out[ni * hp * line..(ni + 1) * hp * line];
        // the border (and the padding channels) take the fill, the interior the input: every
        // byte is written, so the buffer's old contents never show
        image[..pads[0] * line].fill(fill);
        image[(pads[0] + h) * line..].fill(fill);
        for y in 0..h {
            let at = (y + pads[0]) * line;
            let dst = &mut image[at..at + line];
            dst[..pads[1] * cp].fill(fill);
            dst[(pads[1] + w) * cp..].fill(fill);
            let inner = &mut dst[pads[1] * cp..(pads[1] + w) * cp];
            let src = &x.data[(ni * h + y) * row..(ni * h + y + 1) * row];
            if cp == c {
                inner.copy_from_slice(src);
            } else {
                for (d, s) in inner.chunks_exact_mut(cp).zip(src.chunks_exact(c)) {
                    d[..c].copy_from_slice(s);
                    d[c..].fill(fill);
                }
            }
        }
    }
}

impl Step {
    fn dst(&self) -> usize {
        match self {
            Step::Conv(c) => c.dst,
            Step::Fc(f) => f.dst,
            Step::Add { dst, .. }
            | Step::Relu { dst, .. }
            | Step::MaxPool { dst, .. }
            | Step::Slice { dst, .. }
            | Step::Pad { dst, .. }
            | Step::GlobalAvgPool { dst, .. }
            | Step::Flatten { dst, .. }
            | Step::Identity { dst, .. } => *dst,
        }
    }

    fn inputs(&self) -> Vec<usize> {
        match self {
            Step::Conv(c) => vec![c.src],
            Step::Fc(f) => vec![f.src],
            Step::Add { a, b, .. } => vec![*a, *b],
            Step::Relu { src, .. }
            | Step::MaxPool { src, .. }
            | Step::Slice { src, .. }
            | Step::Pad { src, .. }
            | Step::GlobalAvgPool { src, .. }
            | Step::Flatten { src, .. }
            | Step::Identity { src, .. } => vec![*src],
        }
    }
}

/// `graph` with every Conv / Gemm / MatMul weight replaced by its int8 per-channel
/// dequantized values (the weights [`Int8Model`] uses), biases untouched: the graph to
/// calibrate activation ranges on.
pub fn with_int8_weights(graph: &Graph) -> Result<Graph, String> {
    let mut g = graph.clone();
    for r in graph.weights() {
        let w = graph.constants[r.value]
            .as_ref()
            .expect("weights are constants");
        let out = w.shape[r.out_axis];
        let deq = match (r.out_axis, w.shape.len()) {
            (0, _) => {
                let (codes, s) = quantize_weights_i8(&w.data, out);
                let k = w.data.len() / out;
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| c as f32 * s[i / k])
                    .collect()
            }
            (1, 2) => {
                let k = w.shape[0];
                let rows: Vec<f32> = (0..out)
                    .flat_map(|o| (0..k).map(move |kk| (o, kk)))
                    .map(|(o, kk)| w.data[kk * out + o])
                    .collect();
                let (codes, s) = quantize_weights_i8(&rows, out);
                let mut d = vec![0f32; w.data.len()];
                for o in 0..out {
                    for kk in 0..k {
                        d[kk * out + o] = codes[o * k + kk] as f32 * s[o];
                    }
                }
                d
            }
            _ => {
                return Err(format!(
                    "integer_only: weight '{}' has its output channels on axis {} of {:?}",
                    graph.value_names[r.value], r.out_axis, w.shape
                ))
            }
        };
        g.set_constant(r.value, deq)?;
    }
    Ok(g)
}

/// Calibrates `graph` (with its int8 weights) on `calib` images and lowers it: the whole
/// integer_only preparation. `req` should ask for 8-bit activations.
pub fn build(
    k: &Kernels,
    graph: &Graph,
    calib: &crate::data::Dataset,
    norm: &crate::data::Normalization,
    opts: &crate::eval::EvalOptions,
    req: crate::calib::CalibRequest,
) -> Result<Int8Model, String> {
    if req.bits != 8 {
        return Err(format!(
            "integer_only: activations are 8-bit, not {}",
            req.bits
        ));
    }
    let wg = with_int8_weights(graph)?;
    let acts = crate::calib::calibrate(k, &wg, calib, norm, opts, req)?;
    Int8Model::new(graph, &acts)
}
