//! Reverse-mode gradients through an imported [`Graph`].
//!
//! The forward pass is the inference engine's own operators (`engine::ops::execute`), run
//! with every value kept. The backward pass walks the nodes in reverse and computes the input
//! gradients of each node from its inputs, its output and its output gradient. Supported:
//! Conv (any group, stride, padding and dilation), Gemm, MatMul (2-D), Add, Relu, Pad
//! (constant), Slice, GlobalAveragePool, MaxPool, Flatten, Reshape and Identity, plus
//! softmax cross-entropy on the logits. Any other operator is an error naming the node.
//! BatchNormalization is folded into the preceding Conv at import, so training updates the
//! folded weights and biases.
//!
//! Every backward is checked against central finite differences in the tests below.

use crate::engine::ops::{
    broadcast_shape, broadcast_strides, execute, pad_nd, slice_nd, strided_gather,
};
use crate::engine::EdgeHook;
use crate::model::{Graph, Op, Tensor, Window};
use quantbench_kernels::{Kernels, QuantParams};

type R<T> = Result<T, String>;
/// Gradients by value id (`None`: not computed).
type Grads = Vec<Option<Vec<f32>>>;

/// Whether the backward pass supports `op` (checked before training starts).
pub fn supported(op: &Op) -> bool {
    matches!(
        op,
        Op::Conv { .. }
            | Op::Gemm { .. }
            | Op::MatMul
            | Op::Add
            | Op::Relu
            | Op::Pad { .. }
            | Op::Slice { .. }
            | Op::GlobalAveragePool
            | Op::MaxPool { .. }
            | Op::Flatten { .. }
            | Op::Reshape { .. }
            | Op::Identity
    )
}

/// An error naming the first node training cannot differentiate, if any.
pub fn check_graph(g: &Graph) -> R<()> {
    for (i, n) in g.nodes.iter().enumerate() {
        if !supported(&n.op) {
            return Err(format!(
                "node {} ({}): training has no backward pass for this operator (supported: Conv, Gemm, MatMul, Add, Relu, Pad, Slice, GlobalAveragePool, MaxPool, Flatten, Reshape, Identity)",
                if n.name.is_empty() { format!("#{i}") } else { format!("'{}'", n.name) },
                n.op.name()
            ));
        }
    }
    Ok(())
}

/// Runs the graph keeping every value (indexed by value id; constants stay `None`). The hook
/// sees every produced value, as in the engine (fake-quant of activations).
pub fn forward(g: &Graph, input: Tensor, hook: Option<&dyn EdgeHook>) -> R<Vec<Option<Tensor>>> {
    run_nodes(g, input, |v, _, t| {
        if let Some(h) = hook {
            h.on_value(v, t);
        }
    })
}

fn run_nodes(
    g: &Graph,
    input: Tensor,
    mut post: impl FnMut(usize, Option<&Op>, &mut Tensor),
) -> R<Vec<Option<Tensor>>> {
    let mut vals: Vec<Option<Tensor>> = vec![None; g.value_names.len()];
    let mut input = input;
    post(g.input, None, &mut input);
    vals[g.input] = Some(input);
    for (i, node) in g.nodes.iter().enumerate() {
        let get = |v: usize| -> R<&Tensor> {
            g.constants[v]
                .as_ref()
                .or(vals[v].as_ref())
                .ok_or_else(|| format!("value '{}' is not available", g.value_names[v]))
        };
        let first = get(node.inputs[0])?;
        let rest: Vec<&Tensor> = node.inputs[1..].iter().map(|&v| get(v)).collect::<R<_>>()?;
        let mut out = execute(&node.op, None, Some(first), &rest, None, None)
            .map_err(|e| format!("node #{i} ({}): {e}", node.op.name()))?;
        post(node.output, Some(&node.op), &mut out);
        vals[node.output] = Some(out);
    }
    Ok(vals)
}

/// Fake-quantization of activation edges while training.
pub struct ActQuant<'a> {
    pub k: &'a Kernels,
    /// Per value id: the edge's quantization parameters (`None`: fp32).
    pub params: &'a [Option<QuantParams>],
    /// Also record what the gradients of the scales need (learned step size).
    pub learn_scale: bool,
}

/// What the backward pass needs from the activation fake-quant of one forward pass.
#[derive(Default)]
pub struct ActTrace {
    /// Per value id: whether the gradient passes each element (straight-through estimator:
    /// the value before rounding lies inside the clipping range; after a Relu, also > 0).
    pub gates: Vec<Option<Vec<bool>>>,
    /// Per value id: d(fake-quant output)/d(scale) of each element (learned step size):
    /// `round(x/s) - x/s` inside the range, the clipped code (minus the zero point) outside.
    pub dscale: Vec<Option<Vec<f32>>>,
}

/// [`forward`] with the edges of `aq` fake-quantized, and the trace the backward pass needs.
pub fn forward_quant(
    g: &Graph,
    input: Tensor,
    aq: &ActQuant,
) -> R<(Vec<Option<Tensor>>, ActTrace)> {
    let n = g.value_names.len();
    let mut trace = ActTrace {
        gates: vec![None; n],
        dscale: vec![None; n],
    };
    let vals = run_nodes(g, input, |v, op, t| {
        let Some(p) = &aq.params[v] else { return };
        let pre = t.data.clone();
        aq.k.fake_quantize_in_place(&mut t.data, p);
        let (s, z) = (p.scale(), p.zero_point());
        let (lo, hi) = (s * (p.qmin() - z) as f32, s * (p.qmax() - z) as f32);
        let relu = matches!(op, Some(Op::Relu));
        trace.gates[v] = Some(
            pre.iter()
                .map(|&x| x >= lo && x <= hi && !(relu && x <= 0.0))
                .collect(),
        );
        if aq.learn_scale {
            let (below, above) = ((p.qmin() - z) as f32, (p.qmax() - z) as f32);
            trace.dscale[v] = Some(
                pre.iter()
                    .zip(&t.data)
                    .map(|(&x, &y)| {
                        if x < lo {
                            below
                        } else if x > hi {
                            above
                        } else {
                            (y - x) / s
                        }
                    })
                    .collect(),
            );
        }
    })?;
    Ok((vals, trace))
}

/// Mean softmax cross-entropy of `logits` [batch, classes] against `labels`, its gradient
/// scaled by `1 / denominator` (the whole batch when a batch is split across threads), and
/// the number of correct top-1 predictions.
pub fn softmax_cross_entropy(
    logits: &Tensor,
    labels: &[u8],
    denominator: usize,
) -> R<(f64, Vec<f32>, usize)> {
    let b = labels.len();
    if b == 0 || !logits.len().is_multiple_of(b) {
        return Err(format!("{} logits for {b} labels", logits.len()));
    }
    let classes = logits.len() / b;
    let mut grad = vec![0f32; logits.len()];
    let (mut loss, mut correct) = (0f64, 0usize);
    for ((row, g), &y) in logits
        .data
        .chunks_exact(classes)
        .zip(grad.chunks_exact_mut(classes))
        .zip(labels)
    {
        let y = y as usize;
        if y >= classes {
            return Err(format!("label {y} but the model has {classes} outputs"));
        }
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        loss += sum.ln() - (row[y] - max) as f64;
        for (j, (gj, &v)) in g.iter_mut().zip(row).enumerate() {
            let p = ((v - max) as f64).exp() / sum;
            *gj = ((p - f64::from(u8::from(j == y))) / denominator as f64) as f32;
        }
        correct += usize::from(crate::eval::argmax(row) == y);
    }
    Ok((loss, grad, correct))
}

/// Knowledge distillation (Hinton et al. 2015) from `teacher` logits: per image
/// `(1 - weight) * CE(z, y) + weight * T^2 * KL(softmax(t / T) || softmax(z / T))`, summed over
/// the batch, with its gradient `(1 - weight) * (softmax(z) - onehot(y)) + weight * T *
/// (softmax(z / T) - softmax(t / T))` scaled by `1 / denominator`, and the number of correct
/// top-1 predictions. `weight = 0` is [`softmax_cross_entropy`].
pub fn distillation_loss(
    logits: &Tensor,
    teacher: &Tensor,
    labels: &[u8],
    denominator: usize,
    weight: f64,
    temperature: f64,
) -> R<(f64, Vec<f32>, usize)> {
    if teacher.len() != logits.len() {
        return Err(format!(
            "{} teacher logits for {} student logits",
            teacher.len(),
            logits.len()
        ));
    }
    let (ce, mut grad, correct) = softmax_cross_entropy(logits, labels, denominator)?;
    let classes = logits.len() / labels.len();
    let t = temperature;
    // log-softmax of a row at temperature t, in f64
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = row.iter().map(|&v| ((v as f64 - max) / t).exp()).sum();
        row.iter()
            .map(|&v| (v as f64 - max) / t - sum.ln())
            .collect()
    };
    let mut kl = 0f64;
    for ((z, tz), g) in logits
        .data
        .chunks_exact(classes)
        .zip(teacher.data.chunks_exact(classes))
        .zip(grad.chunks_exact_mut(classes))
    {
        let (ls, lt) = (log_softmax(z), log_softmax(tz));
        for ((gj, &s), &q) in g.iter_mut().zip(&ls).zip(&lt) {
            let (ps, pt) = (s.exp(), q.exp());
            kl += pt * (q - s);
            *gj =
                ((1.0 - weight) * *gj as f64 + weight * t * (ps - pt) / denominator as f64) as f32;
        }
    }
    Ok(((1.0 - weight) * ce + weight * t * t * kl, grad, correct))
}

/// Gradients of every value (and of the constants in `trainable`) given the gradient of the
/// graph output. Returns gradients indexed by value id.
pub fn backward(
    g: &Graph,
    vals: &[Option<Tensor>],
    d_out: Vec<f32>,
    trainable: &[bool],
) -> R<Vec<Option<Vec<f32>>>> {
    Ok(backward_quant(g, vals, None, d_out, trainable)?.0)
}

/// [`backward`] through the activation fake-quant recorded in `trace` (straight-through
/// estimator), also returning the gradient of each edge's scale (per value id; 0 without
/// [`ActQuant::learn_scale`]).
pub fn backward_quant(
    g: &Graph,
    vals: &[Option<Tensor>],
    trace: Option<&ActTrace>,
    d_out: Vec<f32>,
    trainable: &[bool],
) -> R<(Grads, Vec<f64>)> {
    let mut grads: Vec<Option<Vec<f32>>> = vec![None; g.value_names.len()];
    let mut dscale = vec![0f64; g.value_names.len()];
    // a learned input step size needs the gradient of the input
    let input_scale = trace.is_some_and(|t| t.dscale[g.input].is_some());
    grads[g.output] = Some(d_out);
    let value = |v: usize| -> &Tensor {
        g.constants[v]
            .as_ref()
            .or(vals[v].as_ref())
            .expect("forward produced every value")
    };
    for (i, node) in g.nodes.iter().enumerate().rev() {
        let Some(mut dy) = grads[node.output].take() else {
            continue;
        };
        let mut gated = false;
        if let Some(t) = trace {
            if let Some(ds) = &t.dscale[node.output] {
                dscale[node.output] = dy.iter().zip(ds).map(|(&a, &b)| a as f64 * b as f64).sum();
            }
            if let Some(gate) = &t.gates[node.output] {
                dy.iter_mut()
                    .zip(gate)
                    .filter(|(_, &pass)| !pass)
                    .for_each(|(d, _)| *d = 0.0);
                gated = true;
            }
        }
        let wants: Vec<bool> = node
            .inputs
            .iter()
            .map(|&v| (g.constants[v].is_none() && (v != g.input || input_scale)) || trainable[v])
            .collect();
        if !wants.iter().any(|&w| w) {
            continue;
        }
        let ins: Vec<&Tensor> = node.inputs.iter().map(|&v| value(v)).collect();
        let y = value(node.output);
        // a gated Relu output already carries the Relu's own mask (taken before rounding)
        let dins = if gated && matches!(node.op, Op::Relu) {
            vec![Some(dy)]
        } else {
            node_backward(&node.op, &ins, y, &dy, &wants)
                .map_err(|e| format!("node #{i} ({}) backward: {e}", node.op.name()))?
        };
        for ((&v, d), &w) in node.inputs.iter().zip(dins).zip(&wants) {
            let (Some(d), true) = (d, w) else { continue };
            match &mut grads[v] {
                Some(acc) => acc.iter_mut().zip(&d).for_each(|(a, b)| *a += b),
                slot @ None => *slot = Some(d),
            }
        }
    }
    if let (Some(t), Some(d)) = (trace, &grads[g.input]) {
        if let Some(ds) = &t.dscale[g.input] {
            dscale[g.input] = d.iter().zip(ds).map(|(&a, &b)| a as f64 * b as f64).sum();
        }
    }
    Ok((grads, dscale))
}

/// Input gradients of one node (`None` where not wanted).
pub fn node_backward(
    op: &Op,
    ins: &[&Tensor],
    y: &Tensor,
    dy: &[f32],
    wants: &[bool],
) -> R<Vec<Option<Vec<f32>>>> {
    let x = ins[0];
    let one = |d: Vec<f32>| -> Vec<Option<Vec<f32>>> {
        let mut v = vec![None; ins.len()];
        v[0] = Some(d);
        v
    };
    Ok(match op {
        Op::Identity | Op::Flatten { .. } | Op::Reshape { .. } => one(dy.to_vec()),
        Op::Relu => one(y
            .data
            .iter()
            .zip(dy)
            .map(|(&v, &d)| if v > 0.0 { d } else { 0.0 })
            .collect()),
        Op::Add => {
            let shape = broadcast_shape(&ins[0].shape, &ins[1].shape)?;
            let reduce = |t: &Tensor| -> Vec<f32> {
                if t.shape == shape {
                    return dy.to_vec();
                }
                let idx: Vec<u32> = (0..t.len() as u32).collect();
                let map = strided_gather(&idx, 0, &shape, &broadcast_strides(&t.shape, &shape));
                let mut d = vec![0f32; t.len()];
                for (&j, &g) in map.iter().zip(dy) {
                    d[j as usize] += g;
                }
                d
            };
            vec![
                wants[0].then(|| reduce(ins[0])),
                wants[1].then(|| reduce(ins[1])),
            ]
        }
        Op::Slice {
            starts,
            ends,
            axes,
            steps,
        } => {
            let idx: Vec<u32> = (0..x.len() as u32).collect();
            let (_, map) = slice_nd(&idx, &x.shape, starts, ends, axes, steps)?;
            let mut d = vec![0f32; x.len()];
            for (&j, &g) in map.iter().zip(dy) {
                d[j as usize] += g;
            }
            one(d)
        }
        Op::Pad { pads, .. } => {
            let idx: Vec<u32> = (0..x.len() as u32).collect();
            let (_, map) = pad_nd(&idx, &x.shape, pads, u32::MAX)?;
            let mut d = vec![0f32; x.len()];
            for (&j, &g) in map.iter().zip(dy) {
                if j != u32::MAX {
                    d[j as usize] += g;
                }
            }
            one(d)
        }
        Op::GlobalAveragePool => {
            let inner: usize = x.shape[2..].iter().product();
            let mut d = vec![0f32; x.len()];
            for (plane, &g) in d.chunks_exact_mut(inner.max(1)).zip(dy) {
                plane.fill(g / inner as f32);
            }
            one(d)
        }
        Op::MaxPool { window } => one(max_pool_backward(x, window, dy)?),
        Op::Conv { window, group } => {
            let (dx, dw, db) = conv_backward(x, ins[1], window, *group, dy, wants)?;
            let mut v = vec![dx, dw];
            if ins.len() > 2 {
                v.push(db);
            }
            v
        }
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => gemm_backward(ins, *alpha, *beta, *trans_a, *trans_b, y, dy, wants)?,
        Op::MatMul => {
            let (a, b) = (ins[0], ins[1]);
            if a.shape.len() != 2 || b.shape.len() != 2 {
                return Err(format!(
                    "MatMul backward supports 2-D operands, got {:?} and {:?}",
                    a.shape, b.shape
                ));
            }
            let (m, k, n) = (a.shape[0], a.shape[1], b.shape[1]);
            // dA = dY B^T, dB = A^T dY
            let da = wants[0].then(|| {
                let mut d = vec![0f32; m * k];
                mm(m, k, n, dy, n, 1, &b.data, 1, n, &mut d, false);
                d
            });
            let db = wants[1].then(|| {
                let mut d = vec![0f32; k * n];
                mm(k, n, m, &a.data, 1, k, dy, n, 1, &mut d, false);
                d
            });
            vec![da, db]
        }
        other => return Err(format!("no backward pass for {}", other.name())),
    })
}

/// C[m x n] (row-major, ldc = n) (+)= A[m x k] B[k x n], A and B given by row and column
/// strides (a transpose is a swap of the two): the engine's GEMM, with its bounds asserted.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    assert!((m - 1) * a_rs + (k - 1) * a_cs < a.len());
    assert!((k - 1) * b_rs + (n - 1) * b_cs < b.len());
    assert!(m * n <= c.len());
    crate::engine::ops::sgemm(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, n, accumulate, 1.0);
}

type Grad3 = (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>);

/// Conv: dX (col2im of W^T dY), dW (dY col^T) and db (sum of dY), per image and group.
fn conv_backward(
    x: &Tensor,
    w: &Tensor,
    win: &Window,
    group: usize,
    dy: &[f32],
    wants: &[bool],
) -> R<Grad3> {
    let [n, c, h, wd] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let [m, cg, kh, kw] = [w.shape[0], w.shape[1], w.shape[2], w.shape[3]];
    let ([oh, ow], pads) = win.output(h, wd)?;
    let p = oh * ow;
    let mg = m / group;
    let k = cg * kh * kw;
    let want_x = wants[0];
    let want_w = wants.get(1).copied().unwrap_or(false);
    let want_b = wants.get(2).copied().unwrap_or(false);
    let mut dx = want_x.then(|| vec![0f32; x.len()]);
    let mut dw = want_w.then(|| vec![0f32; w.len()]);
    let db = want_b.then(|| {
        let mut d = vec![0f32; m];
        for img in 0..n {
            for (ch, row) in dy[img * m * p..(img + 1) * m * p]
                .chunks_exact(p)
                .enumerate()
            {
                d[ch] += row.iter().sum::<f32>();
            }
        }
        d
    });
    let mut col = Vec::new();
    let mut dcol = vec![0f32; if want_x { k * p } else { 0 }];
    for img in 0..n {
        for g in 0..group {
            let xg = &x.data[(img * c + g * cg) * h * wd..(img * c + (g + 1) * cg) * h * wd];
            let dyg = &dy[(img * m + g * mg) * p..(img * m + (g + 1) * mg) * p];
            let wg = &w.data[g * mg * k..(g + 1) * mg * k];
            if let Some(dw) = dw.as_mut() {
                crate::engine::conv_gemm::im2col(xg, h, wd, cg, win, pads, oh, ow, &mut col);
                // dW_g[mg x k] += dY_g[mg x p] col^T[p x k]
                mm(
                    mg,
                    k,
                    p,
                    dyg,
                    p,
                    1,
                    &col,
                    1,
                    p,
                    &mut dw[g * mg * k..(g + 1) * mg * k],
                    true,
                );
            }
            if let Some(dx) = dx.as_mut() {
                // dcol[k x p] = W_g^T[k x mg] dY_g[mg x p]
                mm(k, p, mg, wg, 1, k, dyg, p, 1, &mut dcol, false);
                let dxg = &mut dx[(img * c + g * cg) * h * wd..(img * c + (g + 1) * cg) * h * wd];
                col2im(&dcol, h, wd, cg, win, pads, oh, ow, dxg);
            }
        }
    }
    Ok((dx, dw, db))
}

/// The adjoint of im2col: adds every column entry back to the input pixel it was read from.
#[allow(clippy::too_many_arguments)]
fn col2im(
    dcol: &[f32],
    h: usize,
    w: usize,
    cg: usize,
    win: &Window,
    pads: [usize; 4],
    oh: usize,
    ow: usize,
    dx: &mut [f32],
) {
    let [kh, kw] = win.kernel;
    let [sh, sw] = win.strides;
    let [dh, dw] = win.dilations;
    let p = oh * ow;
    let mut k = 0;
    for ci in 0..cg {
        let plane = &mut dx[ci * h * w..(ci + 1) * h * w];
        for ky in 0..kh {
            for kx in 0..kw {
                let row = &dcol[k * p..(k + 1) * p];
                for oy in 0..oh {
                    let iy = (oy * sh + ky * dh) as isize - pads[0] as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let line = &mut plane[iy as usize * w..(iy as usize + 1) * w];
                    let src = &row[oy * ow..(oy + 1) * ow];
                    // the outputs whose input column ix = ox*sw + kx*dw - pad is inside
                    let off = (kx * dw) as isize - pads[1] as isize;
                    let lo = if off >= 0 {
                        0
                    } else {
                        ((-off) as usize).div_ceil(sw)
                    };
                    let hi = if (w as isize) <= off {
                        0
                    } else {
                        ((w as isize - off) as usize).div_ceil(sw).min(ow)
                    };
                    if lo >= hi {
                        continue;
                    }
                    let ix0 = (lo * sw) as isize + off;
                    if sw == 1 {
                        let dst = &mut line[ix0 as usize..ix0 as usize + (hi - lo)];
                        dst.iter_mut().zip(&src[lo..hi]).for_each(|(d, &v)| *d += v);
                    } else {
                        for (j, &v) in src[lo..hi].iter().enumerate() {
                            line[ix0 as usize + j * sw] += v;
                        }
                    }
                }
                k += 1;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm_backward(
    ins: &[&Tensor],
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
    y: &Tensor,
    dy: &[f32],
    wants: &[bool],
) -> R<Vec<Option<Vec<f32>>>> {
    let (a, b) = (ins[0], ins[1]);
    if a.shape.len() != 2 || b.shape.len() != 2 {
        return Err("Gemm operands must be 2-D".into());
    }
    let (m, n) = (y.shape[0], y.shape[1]);
    let k = if trans_a { a.shape[0] } else { a.shape[1] };
    // op(A)[i][l] = A[i*a_rs + l*a_cs]
    let (a_rs, a_cs) = if trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k) } else { (n, 1) };
    let scaled: Vec<f32> = dy.iter().map(|&v| v * alpha).collect();
    let da = wants[0].then(|| {
        // d op(A)[m x k] = alpha dY[m x n] op(B)^T; op(B)^T[j][l] = op(B)[l][j]
        let mut d = vec![0f32; m * k];
        mm(m, k, n, &scaled, n, 1, &b.data, b_cs, b_rs, &mut d, false);
        if trans_a {
            transpose2(&d, m, k)
        } else {
            d
        }
    });
    let db = wants[1].then(|| {
        // d op(B)[k x n] = alpha op(A)^T dY
        let mut d = vec![0f32; k * n];
        mm(k, n, m, &a.data, a_cs, a_rs, &scaled, n, 1, &mut d, false);
        if trans_b {
            transpose2(&d, k, n)
        } else {
            d
        }
    });
    let mut out = vec![da, db];
    if let Some(c) = ins.get(2) {
        let dc = wants[2].then(|| {
            let idx: Vec<u32> = (0..c.len() as u32).collect();
            let map = strided_gather(&idx, 0, &[m, n], &broadcast_strides(&c.shape, &[m, n]));
            let mut d = vec![0f32; c.len()];
            for (&j, &g) in map.iter().zip(dy) {
                d[j as usize] += beta * g;
            }
            d
        });
        out.push(dc);
    }
    Ok(out)
}

fn transpose2(d: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; d.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = d[r * cols + c];
        }
    }
    t
}

/// MaxPool: each output's gradient goes to the first input position holding the maximum.
fn max_pool_backward(x: &Tensor, win: &Window, dy: &[f32]) -> R<Vec<f32>> {
    let [_, _, h, w] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let ([oh, ow], pads) = win.output(h, w)?;
    let [kh, kw] = win.kernel;
    let [sh, sw] = win.strides;
    let [dh, dw] = win.dilations;
    let mut dx = vec![0f32; x.len()];
    for ((plane, dplane), dyp) in x
        .data
        .chunks_exact(h * w)
        .zip(dx.chunks_exact_mut(h * w))
        .zip(dy.chunks_exact(oh * ow))
    {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut best: Option<(f32, usize)> = None;
                for ki in 0..kh {
                    let iy = (oy * sh + ki * dh) as isize - pads[0] as isize;
                    for kj in 0..kw {
                        let ix = (ox * sw + kj * dw) as isize - pads[1] as isize;
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            continue;
                        }
                        let at = iy as usize * w + ix as usize;
                        if best.is_none_or(|(v, _)| plane[at] > v) {
                            best = Some((plane[at], at));
                        }
                    }
                }
                if let Some((_, at)) = best {
                    dplane[at] += dyp[oy * ow + ox];
                }
            }
        }
    }
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AutoPad;

    struct Rng(u64);
    impl Rng {
        fn f(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn tensor(&mut self, shape: &[usize]) -> Tensor {
            let n = shape.iter().product();
            Tensor::new(shape.to_vec(), (0..n).map(|_| self.f()).collect())
        }
    }

    /// Compares `node_backward` with central differences of L = sum(y * r) for every input
    /// element (inputs are small), in f64 where it matters.
    fn check(op: Op, ins: Vec<Tensor>, seed: u64) {
        let mut rng = Rng(seed);
        let refs: Vec<&Tensor> = ins.iter().collect();
        let y = execute(&op, None, Some(refs[0]), &refs[1..], None, None).unwrap();
        let r: Vec<f32> = (0..y.len()).map(|_| rng.f()).collect();
        let wants = vec![true; ins.len()];
        let grads = node_backward(&op, &refs, &y, &r, &wants).unwrap();
        let loss = |ins: &[Tensor]| -> f64 {
            let refs: Vec<&Tensor> = ins.iter().collect();
            let y = execute(&op, None, Some(refs[0]), &refs[1..], None, None).unwrap();
            y.data
                .iter()
                .zip(&r)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum()
        };
        let eps = 1e-2f32;
        for (t, g) in grads.iter().enumerate() {
            let g = g
                .as_ref()
                .unwrap_or_else(|| panic!("{op:?}: no gradient for input {t}"));
            assert_eq!(g.len(), ins[t].len());
            for (i, &ana) in g.iter().enumerate() {
                let mut plus = ins.clone();
                plus[t].data[i] += eps;
                let mut minus = ins.clone();
                minus[t].data[i] -= eps;
                let num = (loss(&plus) - loss(&minus)) / (2.0 * eps as f64);
                let ana = ana as f64;
                assert!(
                    (num - ana).abs() <= 2e-3 + 1e-2 * num.abs().max(ana.abs()),
                    "{} input {t}[{i}]: analytic {ana}, numeric {num}",
                    op.name()
                );
            }
        }
    }

    fn window(k: usize, s: usize, d: usize, p: usize) -> Window {
        Window {
            kernel: [k, k],
            strides: [s, s],
            dilations: [d, d],
            pads: [p; 4],
            auto_pad: AutoPad::NotSet,
            ceil_mode: false,
        }
    }

    #[test]
    fn conv_gradients_match_finite_differences() {
        let mut rng = Rng(1);
        for (k, s, d, p, group, c, m) in [
            (3, 1, 1, 1, 1, 3, 4),
            (3, 2, 1, 1, 1, 2, 3),
            (1, 1, 1, 0, 1, 4, 2),
            (3, 1, 2, 2, 2, 4, 4),
        ] {
            let x = rng.tensor(&[2, c, 6, 5]);
            let w = rng.tensor(&[m, c / group, k, k]);
            let b = rng.tensor(&[m]);
            check(
                Op::Conv {
                    window: window(k, s, d, p),
                    group,
                },
                vec![x, w, b],
                7,
            );
        }
    }

    #[test]
    fn dense_gradients_match_finite_differences() {
        let mut rng = Rng(2);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = rng.tensor(if ta { &[4, 3] } else { &[3, 4] });
            let b = rng.tensor(if tb { &[5, 4] } else { &[4, 5] });
            let c = rng.tensor(&[5]);
            let op = Op::Gemm {
                alpha: 0.7,
                beta: 1.3,
                trans_a: ta,
                trans_b: tb,
            };
            check(op, vec![a, b, c], 3);
        }
        check(
            Op::MatMul,
            vec![rng.tensor(&[3, 4]), rng.tensor(&[4, 2])],
            4,
        );
        check(
            Op::Add,
            vec![rng.tensor(&[2, 3, 4]), rng.tensor(&[3, 1])],
            5,
        );
        check(Op::Add, vec![rng.tensor(&[2, 3]), rng.tensor(&[2, 3])], 6);
    }

    #[test]
    fn shape_and_pool_gradients_match_finite_differences() {
        let mut rng = Rng(3);
        // keep values away from 0 so that Relu's kink is not straddled by the differences
        let mut x = rng.tensor(&[2, 3, 4, 4]);
        x.data.iter_mut().for_each(|v| *v += v.signum() * 0.05);
        check(Op::Relu, vec![x.clone()], 1);
        check(Op::GlobalAveragePool, vec![x.clone()], 2);
        check(
            Op::Slice {
                starts: vec![0, 1],
                ends: vec![i64::MAX, 4],
                axes: vec![2, 3],
                steps: vec![2, 2],
            },
            vec![x.clone()],
            3,
        );
        check(
            Op::Pad {
                pads: vec![0, 2, 1, 0, 0, 1, 0, 2],
                value: 0.0,
            },
            vec![x.clone()],
            4,
        );
        check(Op::Flatten { axis: 1 }, vec![x.clone()], 5);
        check(
            Op::Reshape {
                shape: vec![2, -1],
                allow_zero: false,
            },
            vec![x.clone()],
            6,
        );
        // distinct values so that the maximum of every window is unique
        let mut y = x.clone();
        for (i, v) in y.data.iter_mut().enumerate() {
            *v = (i as f32 * 0.37).sin() + i as f32 * 1e-3;
        }
        check(
            Op::MaxPool {
                window: window(2, 2, 1, 0),
            },
            vec![y.clone()],
            7,
        );
        check(
            Op::MaxPool {
                window: window(3, 1, 1, 1),
            },
            vec![y],
            8,
        );
    }

    /// Checks the gradient a loss over 3 x 5 logits returns (scaled by 1/3) against central
    /// differences of the loss it returns.
    fn check_logit_gradient(logits: &Tensor, loss: impl Fn(&Tensor) -> (f64, Vec<f32>)) {
        let (_, g) = loss(logits);
        let eps = 1e-2f32;
        for (i, &gi) in g.iter().enumerate() {
            let mut p = logits.clone();
            p.data[i] += eps;
            let mut m = logits.clone();
            m.data[i] -= eps;
            let num = (loss(&p).0 - loss(&m).0) / 3.0 / (2.0 * eps as f64);
            assert!((num - gi as f64).abs() < 1e-3, "{i}: {num} vs {gi}");
        }
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let labels = [1u8, 4, 0];
        check_logit_gradient(&Rng(4).tensor(&[3, 5]), |z| {
            let (l, g, _) = softmax_cross_entropy(z, &labels, 3).unwrap();
            (l, g)
        });
    }

    #[test]
    fn distillation_gradient_matches_finite_differences() {
        let mut rng = Rng(5);
        let logits = rng.tensor(&[3, 5]);
        let teacher = rng.tensor(&[3, 5]);
        let labels = [2u8, 0, 4];
        check_logit_gradient(&logits, |z| {
            let (l, g, _) = distillation_loss(z, &teacher, &labels, 3, 0.7, 3.0).unwrap();
            (l, g)
        });
        // a student equal to its teacher: the distillation term is 0, only the label term is left
        let (l, g, _) = distillation_loss(&logits, &logits, &labels, 3, 0.7, 3.0).unwrap();
        let (ce, gce, _) = softmax_cross_entropy(&logits, &labels, 3).unwrap();
        assert!((l - 0.3 * ce).abs() < 1e-9, "{l} vs {}", 0.3 * ce);
        for (a, b) in g.iter().zip(&gce) {
            assert!((a - 0.3 * b).abs() < 1e-6);
        }
        // weight 0 is plain cross-entropy
        assert_eq!(
            distillation_loss(&logits, &teacher, &labels, 3, 0.0, 3.0).unwrap(),
            softmax_cross_entropy(&logits, &labels, 3).unwrap()
        );
        assert!(distillation_loss(&logits, &rng.tensor(&[2, 5]), &labels, 3, 0.5, 1.0).is_err());
    }
}

#[cfg(test)]
mod quant_tests {
    use super::*;
    use crate::model::Node;
    use quantbench_kernels::LinearScheme;

    /// x [2 x 3] -> MatMul w1 -> h -> Relu -> r -> MatMul w2 -> out; h and r fake-quantized.
    fn net() -> Graph {
        let w1 = Tensor::new(
            vec![3, 4],
            vec![
                0.9, -0.7, 0.05, 0.4, -0.3, 0.8, 0.02, -0.6, 0.5, 0.1, -0.04, 0.9,
            ],
        );
        let w2 = Tensor::new(vec![4, 2], vec![0.3, -0.2, 0.7, 0.5, -0.4, 0.9, 0.6, 0.1]);
        Graph {
            value_names: ["x", "w1", "h", "r", "w2", "out"]
                .map(String::from)
                .to_vec(),
            constants: vec![None, Some(w1), None, None, Some(w2), None],
            nodes: vec![
                Node {
                    name: "mm1".into(),
                    op: Op::MatMul,
                    inputs: vec![0, 1],
                    output: 2,
                },
                Node {
                    name: "relu".into(),
                    op: Op::Relu,
                    inputs: vec![2],
                    output: 3,
                },
                Node {
                    name: "mm2".into(),
                    op: Op::MatMul,
                    inputs: vec![3, 4],
                    output: 5,
                },
            ],
            input: 0,
            input_shape: vec![Some(2), Some(3)],
            output: 5,
            opset: 13,
        }
    }

    #[test]
    fn activation_fake_quant_passes_gradients_straight_through_inside_the_range() {
        let g = net();
        let k = Kernels::active();
        let x = Tensor::new(vec![2, 3], vec![1.0, 0.5, -0.8, -0.2, 1.5, 0.3]);
        // 3-bit codes over [-0.5, 0.9] for h (some values clip), [0, 0.7] for r
        let s3 = LinearScheme::new(3, false, false).unwrap();
        let ph = s3.params_from_range(Some((-0.5, 0.9))).unwrap();
        let pr = s3.params_from_range(Some((0.0, 0.7))).unwrap();
        let params = vec![None, None, Some(ph), Some(pr), None, None];
        let aq = ActQuant {
            k: &k,
            params: &params,
            learn_scale: true,
        };
        let (vals, trace) = forward_quant(&g, x.clone(), &aq).unwrap();
        // the forward pass is the plain one with the two edges fake-quantized
        let plain = forward(&g, x.clone(), None).unwrap();
        let h_pre = plain[2].as_ref().unwrap().data.clone();
        let mut h_q = h_pre.clone();
        k.fake_quantize_in_place(&mut h_q, &ph);
        assert_eq!(vals[2].as_ref().unwrap().data, h_q);
        let mut r_q: Vec<f32> = h_q.iter().map(|&v| v.max(0.0)).collect();
        k.fake_quantize_in_place(&mut r_q, &pr);
        assert_eq!(vals[3].as_ref().unwrap().data, r_q);

        let d_out = vec![0.3, -1.1, 0.7, 0.25];
        let trainable = vec![false, true, false, false, true, false];
        let (grads, dscale) =
            backward_quant(&g, &vals, Some(&trace), d_out.clone(), &trainable).unwrap();
        // dL/dr = d_out w2^T, by hand
        let w2 = &g.constants[4].as_ref().unwrap().data;
        let dr: Vec<f32> = (0..8)
            .map(|i| {
                let (row, j) = (i / 4, i % 4);
                d_out[row * 2] * w2[j * 2] + d_out[row * 2 + 1] * w2[j * 2 + 1]
            })
            .collect();
        let (lo_h, hi_h) = (
            ph.scale() * (ph.qmin() - ph.zero_point()) as f32,
            ph.scale() * (ph.qmax() - ph.zero_point()) as f32,
        );
        let hi_r = pr.scale() * (pr.qmax() - pr.zero_point()) as f32;
        let mut dh = [0f32; 8];
        let (mut clipped, mut passed) = (0, 0);
        for i in 0..8 {
            let r_pre = h_q[i].max(0.0);
            let pass = h_pre[i] >= lo_h && h_pre[i] <= hi_h && r_pre > 0.0 && r_pre <= hi_r;
            if pass {
                dh[i] = dr[i];
                passed += 1;
            } else {
                clipped += 1;
            }
        }
        // dL/dw1 = x^T dh
        let dw1 = grads[1].as_ref().unwrap();
        for a in 0..3 {
            for j in 0..4 {
                let want = x.data[a] * dh[j] + x.data[3 + a] * dh[4 + j];
                assert!((dw1[a * 4 + j] - want).abs() < 1e-6, "dw1[{a}][{j}]");
            }
        }
        assert!(
            passed > 0 && clipped > 0,
            "{passed} passed, {clipped} blocked"
        );
        // the step-size gradient of r (LSQ): sum of dL/dr times d(fake-quant)/ds, in f64
        let s = pr.scale() as f64;
        let want: f64 = (0..8)
            .map(|i| {
                let v = h_q[i].max(0.0) as f64;
                let q = (v / s).round_ties_even().clamp(0.0, pr.qmax() as f64);
                let ds = if v > hi_r as f64 { q } else { q - v / s };
                dr[i] as f64 * ds
            })
            .sum();
        assert!((dscale[3] - want).abs() < 1e-5, "{} vs {want}", dscale[3]);
        assert!(want.abs() > 1e-4);
    }
}
