//! Operator implementations (f32, row-major, NCHW for the spatial ops).

use crate::model::{Op, Tensor, Window};

type R<T> = Result<T, String>;

/// Runs one op. `owned` is the first input when this node is its last reader (it may then be
/// reused in place); otherwise `first` borrows it. `rest` are the other inputs.
pub(crate) fn execute(
    op: &Op,
    owned: Option<Tensor>,
    first: Option<&Tensor>,
    rest: &[&Tensor],
    packed: Option<&[super::PackedWeight]>,
    wino: Option<&super::winograd::WinogradWeight>,
) -> R<Tensor> {
    if matches!(
        op,
        Op::Relu
            | Op::Clip { .. }
            | Op::Identity
            | Op::Flatten { .. }
            | Op::Reshape { .. }
            | Op::Softmax { .. }
    ) {
        let t = match (owned, first) {
            (Some(t), _) => t,
            (None, Some(t)) => t.clone(),
            (None, None) => return Err("missing input".into()),
        };
        return in_place(op, t);
    }
    if matches!(op, Op::Add | Op::Sub | Op::Mul | Op::Div) {
        let f: fn(f32, f32) -> f32 = match op {
            Op::Add => |a, b| a + b,
            Op::Sub => |a, b| a - b,
            Op::Mul => |a, b| a * b,
            _ => |a, b| a / b,
        };
        return match (owned, first) {
            (Some(t), _) => binary(t, rest[0], f),
            (None, Some(t)) => binary(t.clone(), rest[0], f),
            (None, None) => Err("missing input".into()),
        };
    }
    let x: &Tensor = match (&owned, first) {
        (Some(t), _) => t,
        (None, Some(t)) => t,
        (None, None) => return Err("missing input".into()),
    };
    match op {
        Op::Conv { window, group } => conv(
            x,
            rest[0],
            rest.get(1).copied(),
            window,
            *group,
            packed,
            wino,
            None,
            false,
        )?
        .ok_or_else(|| "unreachable: no residual".to_string()),
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => gemm_op(
            x,
            rest[0],
            rest.get(1).copied(),
            *alpha,
            *beta,
            *trans_a,
            *trans_b,
        ),
        Op::MatMul => matmul(x, rest[0]),
        Op::BatchNorm { epsilon } => batch_norm(x, rest, *epsilon),
        Op::MaxPool { window } => pool(x, window, PoolKind::Max),
        Op::AveragePool {
            window,
            count_include_pad,
        } => pool(
            x,
            window,
            PoolKind::Avg {
                include_pad: *count_include_pad,
            },
        ),
        Op::GlobalAveragePool => global_average_pool(x),
        Op::Transpose { perm } => transpose(x, perm.as_deref()),
        Op::Slice {
            starts,
            ends,
            axes,
            steps,
        } => slice(x, starts, ends, axes, steps),
        Op::Pad { pads, value } => pad(x, pads, *value),
        Op::Concat { axis } => {
            let mut all = vec![x];
            all.extend_from_slice(rest);
            concat(&all, *axis)
        }
        _ => unreachable!("in-place and binary ops are handled above"),
    }
}

/// The ops that can reuse their input's buffer.
fn in_place(op: &Op, mut t: Tensor) -> R<Tensor> {
    match op {
        Op::Relu => t.data.iter_mut().for_each(|v| *v = v.max(0.0)),
        Op::Clip { min, max } => t.data.iter_mut().for_each(|v| *v = v.max(*min).min(*max)),
        Op::Identity => {}
        Op::Flatten { axis } => {
            let r = t.shape.len();
            let a = if *axis < 0 { axis + r as i64 } else { *axis };
            if !(0..=r as i64).contains(&a) {
                return Err(format!("axis {axis} is out of range for rank {r}"));
            }
            let outer: usize = t.shape[..a as usize].iter().product();
            let inner: usize = t.shape[a as usize..].iter().product();
            t.shape = vec![outer, inner];
        }
        Op::Reshape { shape, allow_zero } => {
            t.shape = reshape_target(&t.shape, shape, *allow_zero)?
        }
        Op::Softmax { axis, legacy } => return softmax(t, *axis, *legacy),
        _ => unreachable!("not an in-place op"),
    }
    Ok(t)
}

fn norm_axis(axis: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        Err(format!("axis {axis} is out of range for rank {rank}"))
    }
}

fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// out[i] = src[offset + sum(i_d * strides[d])] over all indices of `shape`.
pub(crate) fn strided_gather<T: Copy>(
    src: &[T],
    offset: isize,
    shape: &[usize],
    strides: &[isize],
) -> Vec<T> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    let rank = shape.len();
    if rank == 0 {
        out.push(src[offset as usize]);
        return out;
    }
    let inner = shape[rank - 1];
    let inner_stride = strides[rank - 1];
    let mut idx = vec![0usize; rank - 1];
    loop {
        let base = offset
            + idx
                .iter()
                .zip(strides)
                .map(|(&i, &s)| i as isize * s)
                .sum::<isize>();
        if inner_stride == 1 {
            out.extend_from_slice(&src[base as usize..base as usize + inner]);
        } else {
            out.extend((0..inner).map(|j| src[(base + j as isize * inner_stride) as usize]));
        }
        // Next outer index.
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

// ---------------------------------------------------------------- convolution and GEMM

/// C[m x n] (row stride `ldc`) = bias_init + A[m x k] * B[k x n], all row-major with the given
/// row strides. `accumulate`: C already holds the initial values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
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
    ldc: usize,
    accumulate: bool,
    alpha_ab: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(0.0);
            }
        }
        return;
    }
    debug_assert!((m - 1) * a_rs + (k - 1) * a_cs < a.len());
    debug_assert!((k - 1) * b_rs + (n - 1) * b_cs < b.len());
    debug_assert!((m - 1) * ldc + n <= c.len());
    // SAFETY: the asserts above (checked in tests) bound every index the GEMM reads or writes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            alpha_ab,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A Conv node; with `residual` and / or `relu` also the Add and Relu that follow it (see
/// [`super::conv_gemm::Epilogue`]). `Ok(None)` when `residual` is not shaped like the output
/// (the caller then runs the nodes one by one).
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    win: &Window,
    group: usize,
    packed: Option<&[super::PackedWeight]>,
    wino: Option<&super::winograd::WinogradWeight>,
    residual: Option<&Tensor>,
    relu: bool,
) -> R<Option<Tensor>> {
    if x.shape.len() != 4 || w.shape.len() != 4 {
        return Err(format!(
            "expected 4-D input and weight, got {:?} and {:?}",
            x.shape, w.shape
        ));
    }
    let [n, c, h, wd] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let [m, cg, kh, kw] = [w.shape[0], w.shape[1], w.shape[2], w.shape[3]];
    if c != cg * group || m % group != 0 {
        return Err(format!(
            "input has {c} channels, weight {:?} with group {group} expects {}",
            w.shape,
            cg * group
        ));
    }
    if [kh, kw] != win.kernel {
        return Err(format!(
            "weight kernel {kh}x{kw} differs from kernel_shape {:?}",
            win.kernel
        ));
    }
    if let Some(b) = b {
        if b.len() != m {
            return Err(format!("bias has {} values, expected {m}", b.len()));
        }
    }
    let ([oh, ow], pads) = win.output(h, wd)?;
    if residual.is_some_and(|r| r.shape != [n, m, oh, ow]) {
        return Ok(None);
    }
    let p = oh * ow;
    let mg = m / group;
    let k = cg * kh * kw;
    if let Some(wt) = wino
        .filter(|wt| wt.m == m && wt.c == c && super::winograd::applies(win, group, h, wd, pads))
    {
        // Every output is written.
        let mut out = super::pool::take(n * m * p);
        let plan = super::winograd::Plan::new(h, wd, c, m);
        super::pool::with_scratch(plan.scratch_len(), |scratch| {
            for img in 0..n {
                let xi = &x.data[img * c * h * wd..(img + 1) * c * h * wd];
                let at = img * m * p;
                let epi = super::conv_gemm::Epilogue {
                    residual: residual.map(|r| &r.data[at..at + m * p]),
                    relu,
                };
                let bias = b.map(|b| &b.data[..]);
                plan.run(wt, xi, bias, &mut out[at..at + m * p], epi, scratch, true);
            }
        });
        return Ok(Some(Tensor::new(vec![n, m, oh, ow], out)));
    }
    let mut out = super::pool::take_zeroed(n * m * p);
    if let Some(pw) =
        packed.filter(|pw| pw.len() == group && pw.iter().all(|p| p.m == mg && p.k == k))
    {
        // AVX-512: packed receptive fields and the 8x32 micro-kernel.
        let plan = super::conv_gemm::direct_applies(win, h, wd, pads, oh, ow)
            .then(|| super::conv_gemm::DirectPlan::new(h, wd, cg, win, pads, oh, ow));
        // The direct path's buffer: zeroed once, only the image part rewritten per image.
        let mut cols = super::pool::take_zeroed(plan.as_ref().map_or(0, |p| p.len));
        for img in 0..n {
            let xi = &x.data[img * c * h * wd..(img + 1) * c * h * wd];
            let oi = &mut out[img * m * p..(img + 1) * m * p];
            for (g, pwg) in pw.iter().enumerate() {
                let xg = &xi[g * cg * h * wd..(g + 1) * cg * h * wd];
                let bias = b.map(|b| &b.data[g * mg..(g + 1) * mg]);
                let at = img * m * p + g * mg * p;
                let epi = super::conv_gemm::Epilogue {
                    residual: residual.map(|r| &r.data[at..at + mg * p]),
                    relu,
                };
                if let Some(plan) = &plan {
                    let og = &mut oi[g * mg * p..(g + 1) * mg * p];
                    plan.fill(xg, &mut cols);
                    plan.run(pwg, &cols, bias, og, p, epi, true);
                    continue;
                }
                super::conv_gemm::im2col_packed(xg, h, wd, cg, win, pads, oh, ow, &mut cols);
                super::conv_gemm::gemm_packed(
                    pwg,
                    &cols,
                    p,
                    bias,
                    &mut oi[g * mg * p..(g + 1) * mg * p],
                    p,
                    epi,
                    true,
                );
            }
        }
        super::pool::give_back(cols);
        return Ok(Some(Tensor::new(vec![n, m, oh, ow], out)));
    }
    let direct = kh == 1 && kw == 1 && win.strides == [1, 1] && pads == [0; 4];
    let mut col = Vec::new();
    for img in 0..n {
        let xi = &x.data[img * c * h * wd..(img + 1) * c * h * wd];
        let oi = &mut out[img * m * p..(img + 1) * m * p];
        if let Some(b) = b {
            for (ch, row) in oi.chunks_exact_mut(p).enumerate() {
                row.fill(b.data[ch]);
            }
        }
        for g in 0..group {
            let xg = &xi[g * cg * h * wd..(g + 1) * cg * h * wd];
            let rhs: &[f32] = if direct {
                xg
            } else {
                super::conv_gemm::im2col(xg, h, wd, cg, win, pads, oh, ow, &mut col);
                &col
            };
            let wg = &w.data[g * mg * k..(g + 1) * mg * k];
            let og = &mut oi[g * mg * p..(g + 1) * mg * p];
            sgemm(mg, p, k, wg, k, 1, rhs, p, 1, og, p, b.is_some(), 1.0);
        }
    }
    if residual.is_some() || relu {
        let epi = super::conv_gemm::Epilogue {
            residual: residual.map(|r| &r.data[..]),
            relu,
        };
        for (i, v) in out.iter_mut().enumerate() {
            *v = epi.apply(i, *v);
        }
    }
    Ok(Some(Tensor::new(vec![n, m, oh, ow], out)))
}

fn gemm_op(
    a: &Tensor,
    b: &Tensor,
    c: Option<&Tensor>,
    alpha: f32,
    beta: f32,
    ta: bool,
    tb: bool,
) -> R<Tensor> {
    if a.shape.len() != 2 || b.shape.len() != 2 {
        return Err(format!(
            "expected 2-D A and B, got {:?} and {:?}",
            a.shape, b.shape
        ));
    }
    let (m, ka) = if ta {
        (a.shape[1], a.shape[0])
    } else {
        (a.shape[0], a.shape[1])
    };
    let (kb, n) = if tb {
        (b.shape[1], b.shape[0])
    } else {
        (b.shape[0], b.shape[1])
    };
    if ka != kb {
        return Err(format!(
            "inner dimensions differ: A {:?} (transA={ta}), B {:?} (transB={tb})",
            a.shape, b.shape
        ));
    }
    let mut out = vec![0.0f32; m * n];
    let accumulate = match c {
        Some(c) if beta != 0.0 => {
            let cs = &c.shape;
            let (rs, cstride) = match cs.as_slice() {
                [] => (0, 0),
                [x] if *x == n => (0, 1),
                [x] if *x == 1 => (0, 0),
                [r, x] if (*r == m || *r == 1) && (*x == n || *x == 1) => {
                    (if *r == 1 { 0 } else { *x }, usize::from(*x != 1))
                }
                _ => {
                    return Err(format!(
                        "C of shape {cs:?} does not broadcast to [{m}, {n}]"
                    ))
                }
            };
            for i in 0..m {
                for j in 0..n {
                    out[i * n + j] = beta * c.data[i * rs + j * cstride];
                }
            }
            true
        }
        _ => false,
    };
    let (a_rs, a_cs) = if ta { (1, a.shape[1]) } else { (a.shape[1], 1) };
    let (b_rs, b_cs) = if tb { (1, b.shape[1]) } else { (b.shape[1], 1) };
    sgemm(
        m, n, ka, &a.data, a_rs, a_cs, &b.data, b_rs, b_cs, &mut out, n, accumulate, alpha,
    );
    Ok(Tensor::new(vec![m, n], out))
}

fn matmul(a: &Tensor, b: &Tensor) -> R<Tensor> {
    if a.shape.is_empty() || b.shape.len() != 2 {
        return Err(format!(
            "supported: A of rank >= 1 times a 2-D B; got {:?} and {:?}",
            a.shape, b.shape
        ));
    }
    let k = *a.shape.last().expect("rank >= 1");
    if k != b.shape[0] {
        return Err(format!(
            "inner dimensions differ: A {:?}, B {:?}",
            a.shape, b.shape
        ));
    }
    let n = b.shape[1];
    let m = a.len() / k.max(1);
    let mut out = vec![0.0f32; m * n];
    sgemm(
        m, n, k, &a.data, k, 1, &b.data, n, 1, &mut out, n, false, 1.0,
    );
    let mut shape = a.shape.clone();
    *shape.last_mut().expect("rank >= 1") = n;
    Ok(Tensor::new(shape, out))
}

// ---------------------------------------------------------------- elementwise

pub(crate) fn broadcast_shape(a: &[usize], b: &[usize]) -> R<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        };
    }
    Ok(out)
}

pub(crate) fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<isize> {
    let s = strides_of(shape);
    let off = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < off || shape[i - off] == 1 {
                0
            } else {
                s[i - off] as isize
            }
        })
        .collect()
}

fn binary(a: Tensor, b: &Tensor, f: fn(f32, f32) -> f32) -> R<Tensor> {
    let shape = broadcast_shape(&a.shape, &b.shape)?;
    if shape == a.shape {
        let mut out = a;
        if b.shape == out.shape {
            out.data
                .iter_mut()
                .zip(&b.data)
                .for_each(|(x, &y)| *x = f(*x, y));
            return Ok(out);
        }
        if b.len() == 1 {
            let y = b.data[0];
            out.data.iter_mut().for_each(|x| *x = f(*x, y));
            return Ok(out);
        }
        // b varies along some axes: walk the output in runs of its innermost dimension.
        let bs = broadcast_strides(&b.shape, &shape);
        let bexp = strided_gather(&b.data, 0, &shape, &bs);
        out.data
            .iter_mut()
            .zip(&bexp)
            .for_each(|(x, &y)| *x = f(*x, y));
        return Ok(out);
    }
    let aexp = strided_gather(&a.data, 0, &shape, &broadcast_strides(&a.shape, &shape));
    let bexp = strided_gather(&b.data, 0, &shape, &broadcast_strides(&b.shape, &shape));
    let data = aexp.iter().zip(&bexp).map(|(&x, &y)| f(x, y)).collect();
    Ok(Tensor::new(shape, data))
}

fn batch_norm(x: &Tensor, p: &[&Tensor], eps: f32) -> R<Tensor> {
    if x.shape.len() < 2 {
        return Err(format!("input of rank {} (expected >= 2)", x.shape.len()));
    }
    let c = x.shape[1];
    if p.len() != 4 || p.iter().any(|t| t.len() != c) {
        return Err(format!(
            "scale, bias, mean and var must each have {c} values"
        ));
    }
    let inner: usize = x.shape[2..].iter().product();
    let mut out = x.clone();
    for (i, chunk) in out.data.chunks_exact_mut(inner.max(1)).enumerate() {
        let ch = i % c;
        let s = p[0].data[ch] / (p[3].data[ch] + eps).sqrt();
        let t = p[1].data[ch] - p[2].data[ch] * s;
        chunk.iter_mut().for_each(|v| *v = *v * s + t);
    }
    Ok(out)
}

// ---------------------------------------------------------------- pooling

enum PoolKind {
    Max,
    Avg { include_pad: bool },
}

fn pool(x: &Tensor, win: &Window, kind: PoolKind) -> R<Tensor> {
    if x.shape.len() != 4 {
        return Err(format!("expected a 4-D input, got {:?}", x.shape));
    }
    let [n, c, h, w] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let ([oh, ow], pads) = win.output(h, w)?;
    let [kh, kw] = win.kernel;
    let [sh, sw] = win.strides;
    let [dh, dw] = win.dilations;
    let mut out = vec![0.0f32; n * c * oh * ow];
    for (plane, o) in x
        .data
        .chunks_exact(h * w)
        .zip(out.chunks_exact_mut(oh * ow))
    {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = if matches!(kind, PoolKind::Max) {
                    f32::NEG_INFINITY
                } else {
                    0.0
                };
                let mut count = 0usize;
                let mut padded_count = 0usize;
                for ki in 0..kh {
                    let iy = (oy * sh + ki * dh) as isize - pads[0] as isize;
                    for kj in 0..kw {
                        let ix = (ox * sw + kj * dw) as isize - pads[1] as isize;
                        // Positions inside the padded extent (not the ceil_mode overhang) count
                        // for count_include_pad.
                        if iy < h as isize + pads[2] as isize && ix < w as isize + pads[3] as isize
                        {
                            padded_count += 1;
                        }
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            continue;
                        }
                        let v = plane[iy as usize * w + ix as usize];
                        match kind {
                            PoolKind::Max => acc = acc.max(v),
                            PoolKind::Avg { .. } => acc += v,
                        }
                        count += 1;
                    }
                }
                o[oy * ow + ox] = match kind {
                    PoolKind::Max => acc,
                    PoolKind::Avg { include_pad: true } => acc / padded_count.max(1) as f32,
                    PoolKind::Avg { include_pad: false } => acc / count.max(1) as f32,
                };
            }
        }
    }
    Ok(Tensor::new(vec![n, c, oh, ow], out))
}

fn global_average_pool(x: &Tensor) -> R<Tensor> {
    if x.shape.len() < 3 {
        return Err(format!("expected rank >= 3, got {:?}", x.shape));
    }
    let inner: usize = x.shape[2..].iter().product();
    let data = x
        .data
        .chunks_exact(inner.max(1))
        .map(|c| c.iter().sum::<f32>() / inner as f32)
        .collect();
    let mut shape = x.shape.clone();
    shape[2..].iter_mut().for_each(|d| *d = 1);
    Ok(Tensor::new(shape, data))
}

// ---------------------------------------------------------------- shape ops

fn reshape_target(input: &[usize], spec: &[i64], allow_zero: bool) -> R<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allow_zero => {
                out.push(*input.get(i).ok_or_else(|| {
                    format!("shape {spec:?}: 0 at {i} copies a missing dimension")
                })?)
            }
            d if d >= 0 => out.push(d as usize),
            _ => return Err(format!("shape {spec:?} is not valid")),
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot reshape {input:?} to {spec:?}"));
        }
        out[i] = total / known;
    } else if known != total {
        return Err(format!(
            "cannot reshape {input:?} ({total} values) to {spec:?}"
        ));
    }
    Ok(out)
}

fn transpose(x: &Tensor, perm: Option<&[usize]>) -> R<Tensor> {
    let r = x.shape.len();
    let perm: Vec<usize> = perm
        .map(|p| p.to_vec())
        .unwrap_or_else(|| (0..r).rev().collect());
    let mut seen = vec![false; r];
    if perm.len() != r
        || perm
            .iter()
            .any(|&p| p >= r || std::mem::replace(&mut seen[p], true))
    {
        return Err(format!("perm {perm:?} is not a permutation of rank {r}"));
    }
    let s = strides_of(&x.shape);
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let strides: Vec<isize> = perm.iter().map(|&p| s[p] as isize).collect();
    Ok(Tensor::new(
        shape.clone(),
        strided_gather(&x.data, 0, &shape, &strides),
    ))
}

fn slice(x: &Tensor, starts: &[i64], ends: &[i64], axes: &[i64], steps: &[i64]) -> R<Tensor> {
    let (shape, data) = slice_nd(&x.data, &x.shape, starts, ends, axes, steps)?;
    Ok(Tensor::new(shape, data))
}

/// ONNX Slice of a row-major array of any element type: the output shape and elements.
pub(crate) fn slice_nd<T: Copy>(
    data: &[T],
    dims: &[usize],
    starts: &[i64],
    ends: &[i64],
    axes: &[i64],
    steps: &[i64],
) -> R<(Vec<usize>, Vec<T>)> {
    let r = dims.len();
    let s = strides_of(dims);
    let mut shape = dims.to_vec();
    let mut strides: Vec<isize> = s.iter().map(|&v| v as isize).collect();
    let mut offset = 0isize;
    let mut seen = vec![false; r];
    for i in 0..starts.len() {
        let a = norm_axis(axes[i], r)?;
        if std::mem::replace(&mut seen[a], true) {
            return Err(format!("axis {} appears twice", axes[i]));
        }
        let dim = dims[a] as i64;
        let step = steps[i];
        let clampi = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
        let fix = |v: i64| if v < 0 { v + dim } else { v };
        let (start, end) = if step > 0 {
            (clampi(fix(starts[i]), 0, dim), clampi(fix(ends[i]), 0, dim))
        } else {
            (
                clampi(fix(starts[i]), -1, dim - 1),
                clampi(fix(ends[i]), -1, dim - 1),
            )
        };
        let count = if step > 0 {
            if end > start {
                (end - start + step - 1) / step
            } else {
                0
            }
        } else if start > end {
            (start - end + (-step) - 1) / (-step)
        } else {
            0
        };
        shape[a] = count as usize;
        if count > 0 {
            offset += start as isize * s[a] as isize;
        }
        strides[a] = step as isize * s[a] as isize;
    }
    let out = strided_gather(data, offset, &shape, &strides);
    Ok((shape, out))
}

fn pad(x: &Tensor, pads: &[i64], value: f32) -> R<Tensor> {
    let (shape, data) = pad_nd(&x.data, &x.shape, pads, value)?;
    Ok(Tensor::new(shape, data))
}

/// Constant padding of a row-major array of any element type: the output shape and elements.
pub(crate) fn pad_nd<T: Copy>(
    data: &[T],
    dims: &[usize],
    pads: &[i64],
    value: T,
) -> R<(Vec<usize>, Vec<T>)> {
    let r = dims.len();
    if pads.len() != 2 * r {
        return Err(format!(
            "{} pads for a rank-{r} input (expected {})",
            pads.len(),
            2 * r
        ));
    }
    if pads.iter().any(|&p| p < 0) {
        return Err(format!("negative pads {pads:?} are not supported"));
    }
    let shape: Vec<usize> = (0..r)
        .map(|i| dims[i] + (pads[i] + pads[i + r]) as usize)
        .collect();
    let os = strides_of(&shape);
    let mut out = vec![value; shape.iter().product()];
    if data.is_empty() {
        return Ok((shape, out));
    }
    let inner = dims[r - 1];
    let rows = data.len() / inner.max(1);
    let mut idx = vec![0usize; r.saturating_sub(1)];
    for row in 0..rows {
        let mut base = pads[r - 1] as usize;
        for d in 0..r - 1 {
            base += (idx[d] + pads[d] as usize) * os[d];
        }
        out[base..base + inner].copy_from_slice(&data[row * inner..(row + 1) * inner]);
        for d in (0..r - 1).rev() {
            idx[d] += 1;
            if idx[d] < dims[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok((shape, out))
}

fn concat(xs: &[&Tensor], axis: i64) -> R<Tensor> {
    let r = xs[0].shape.len();
    let a = norm_axis(axis, r)?;
    for t in xs {
        if t.shape.len() != r || (0..r).any(|d| d != a && t.shape[d] != xs[0].shape[d]) {
            return Err(format!(
                "shapes {:?} and {:?} do not concatenate on axis {axis}",
                xs[0].shape, t.shape
            ));
        }
    }
    let outer: usize = xs[0].shape[..a].iter().product();
    let mut shape = xs[0].shape.clone();
    shape[a] = xs.iter().map(|t| t.shape[a]).sum();
    let mut out = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        for t in xs {
            let run: usize = t.shape[a..].iter().product();
            out.extend_from_slice(&t.data[o * run..(o + 1) * run]);
        }
    }
    Ok(Tensor::new(shape, out))
}

fn softmax(mut x: Tensor, axis: i64, legacy: bool) -> R<Tensor> {
    let r = x.shape.len();
    let a = norm_axis(axis, r.max(1))?;
    let (len, inner) = if legacy {
        (x.shape[a..].iter().product::<usize>(), 1)
    } else {
        (x.shape[a], x.shape[a + 1..].iter().product::<usize>())
    };
    let block = len * inner;
    if block == 0 {
        return Ok(x);
    }
    for chunk in x.data.chunks_exact_mut(block) {
        for j in 0..inner {
            let mut mx = f32::NEG_INFINITY;
            for i in 0..len {
                mx = mx.max(chunk[i * inner + j]);
            }
            let mut sum = 0.0f32;
            for i in 0..len {
                let e = (chunk[i * inner + j] - mx).exp();
                chunk[i * inner + j] = e;
                sum += e;
            }
            for i in 0..len {
                chunk[i * inner + j] /= sum;
            }
        }
    }
    Ok(x)
}
