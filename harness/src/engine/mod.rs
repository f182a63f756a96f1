//! The f32 execution engine: runs an imported [`Graph`] on a batch.
//!
//! Convolution on AVX-512 is Winograd F(2x2, 3x3) ([`winograd`]) for 3x3 stride-1 pad-1 layers
//! and the direct kernel of [`conv_gemm`] for the others (with Add / Relu fused when no hook
//! watches), elsewhere im2col and the `gemm` crate's f32 GEMM; single-threaded (the
//! evaluator runs one batch per core). Without a hook, batches of a graph that never mixes
//! images run one image at a time.
//! The engine knows no quantization method; it offers the hooks methods need:
//! [`Graph::set_constant`] replaces weights, and an [`EdgeHook`] sees (and may change) every
//! activation as it is produced: fake-quant at edges, calibration statistics.

pub(crate) mod conv_gemm;
pub mod int8;
pub(crate) mod ops;
pub(crate) mod pool;
pub(crate) mod winograd;

pub use conv_gemm::PackedWeight;

use crate::model::{Graph, Op, Tensor};

/// Called on the graph input and on every node output, in execution order. `value` is the value
/// id in the graph (`Graph::value_names[value]` names it).
pub trait EdgeHook: Sync {
    fn on_value(&self, value: usize, tensor: &mut Tensor);
}

/// Executes one graph. Cheap to build; shareable across threads.
pub struct Engine<'g> {
    graph: &'g Graph,
    /// For each value, the index of the last node that reads it (`usize::MAX` for the output).
    last_use: Vec<usize>,
    /// Per node: Conv weights packed for the AVX-512 micro-kernel, one per group (only when
    /// AVX-512 is the active ISA and each group's output channels are a multiple of 8).
    packed: Vec<Option<Vec<PackedWeight>>>,
    /// Per node: a 3x3 Conv weight in Winograd's transformed domain (AVX-512 only, one group,
    /// output channels a multiple of 8; used when the layer's geometry fits, see
    /// [`winograd::applies`], and no hook watches the run).
    winograd: Vec<Option<winograd::WinogradWeight>>,
    /// Per node: the Add / Relu nodes after this Conv that run inside it (see [`Fusion`]).
    fused: Vec<Option<Fusion>>,
    /// Every node maps image b of its inputs to image b of its output (see [`per_image`]).
    per_image: bool,
}

/// Whether each image of a batch goes through the graph on its own: the input's batch
/// dimension is symbolic, and every node keeps the batch as its leading dimension and mixes
/// nothing across it (checked op by op, with the ranks of the values; constants broadcast
/// along the batch only with a leading 1 or a lower rank). A batch can then run one image at
/// a time, with the activations of one image (tens of KiB) staying in the cache instead of
/// passing through memory at every layer; the results are the same.
fn per_image(g: &Graph) -> bool {
    if g.input_shape.first().is_none_or(|d| d.is_some()) {
        return false;
    }
    let mut rank: Vec<Option<usize>> = g
        .constants
        .iter()
        .map(|c| c.as_ref().map(|t| t.shape.len()))
        .collect();
    rank[g.input] = Some(g.input_shape.len());
    let constant = |v: usize| g.constants[v].as_ref();
    for node in &g.nodes {
        let Some(r) = rank[node.inputs[0]] else {
            return false;
        };
        if constant(node.inputs[0]).is_some() || r == 0 {
            return false;
        }
        let rest_constant = node.inputs[1..].iter().all(|&v| constant(v).is_some());
        // A constant that broadcasts against an activation of rank `r` leaves the batch alone.
        // An axis attribute that names some axis other than the batch.
        let not_batch = |a: i64| a >= 1 || (a < 0 && -a < r as i64);
        let leaves_batch =
            |v: usize| constant(v).is_none_or(|c| c.shape.len() < r || c.shape.first() == Some(&1));
        let out = match &node.op {
            Op::Conv { .. }
            | Op::Relu
            | Op::Clip { .. }
            | Op::BatchNorm { .. }
            | Op::MaxPool { .. }
            | Op::AveragePool { .. }
            | Op::GlobalAveragePool
            | Op::Identity
                if rest_constant =>
            {
                r
            }
            Op::Add | Op::Sub | Op::Mul | Op::Div => {
                let ranks: Option<Vec<usize>> = node.inputs.iter().map(|&v| rank[v]).collect();
                let Some(ranks) = ranks else { return false };
                // activations: the same rank (batch aligned); constants: no batch of their own
                let same = node.inputs.iter().zip(&ranks).all(|(&v, &rv)| {
                    if constant(v).is_some() {
                        rv <= r
                    } else {
                        rv == r
                    }
                });
                if !same || !node.inputs.iter().all(|&v| leaves_batch(v)) {
                    return false;
                }
                r
            }
            Op::Flatten { axis } if *axis >= 1 => 2,
            Op::Gemm { trans_a: false, .. } if rest_constant && r == 2 => {
                if !node.inputs.get(2).is_none_or(|&c| leaves_batch(c)) {
                    return false;
                }
                2
            }
            Op::MatMul if rest_constant && r >= 2 && rank[node.inputs[1]] == Some(2) => r,
            Op::Reshape {
                shape,
                allow_zero: false,
            } if shape.first() == Some(&0) => shape.len(),
            Op::Transpose { perm: Some(p) } if p.first() == Some(&0) => r,
            Op::Softmax { axis, .. } if not_batch(*axis) => r,
            Op::Slice { axes, .. } if axes.iter().all(|&a| not_batch(a)) => r,
            Op::Pad { pads, .. } if pads.len() == 2 * r && pads[0] == 0 && pads[r] == 0 => r,
            Op::Concat { axis }
                if not_batch(*axis)
                    && node
                        .inputs
                        .iter()
                        .all(|&v| constant(v).is_none() && rank[v] == Some(r)) =>
            {
                r
            }
            _ => return false,
        };
        rank[node.output] = Some(out);
    }
    true
}

/// A Conv whose output only a Relu reads, or only an Add whose other operand exists before
/// the Conv runs (then optionally a Relu that alone reads the sum): without an [`EdgeHook`],
/// the Conv applies the Add and the Relu to each output as it is stored, and the absorbed
/// nodes are skipped. The values are the same as node by node: the sum, then `+ residual`
/// (f32 addition commutes), then `max(0, .)`.
#[derive(Clone, Debug)]
struct Fusion {
    residual: Option<usize>,
    relu: bool,
    /// The Add and / or Relu nodes, in order.
    absorbed: Vec<usize>,
    /// The value the last absorbed node produces.
    output: usize,
}

/// The [`Fusion`] starting at node `i`, if any.
fn fusion_at(
    graph: &Graph,
    readers: &[Vec<usize>],
    producer: &[usize],
    i: usize,
) -> Option<Fusion> {
    let node = &graph.nodes[i];
    if !matches!(node.op, Op::Conv { .. }) {
        return None;
    }
    // The only node reading `v`, unless `v` is the graph output.
    let sole = |v: usize| match readers[v].as_slice() {
        [j] if v != graph.output => Some(*j),
        _ => None,
    };
    let j = sole(node.output)?;
    let next = &graph.nodes[j];
    let mut f = Fusion {
        residual: None,
        relu: false,
        absorbed: vec![j],
        output: next.output,
    };
    match next.op {
        Op::Relu => f.relu = true,
        Op::Add if next.inputs.len() == 2 => {
            let (a, b) = (next.inputs[0], next.inputs[1]);
            let r = if a == node.output { b } else { a };
            let ready = graph.constants[r].is_some() || r == graph.input || producer[r] < i;
            if r == node.output || !ready {
                return None;
            }
            f.residual = Some(r);
            if let Some(k) = sole(next.output).filter(|&k| graph.nodes[k].op == Op::Relu) {
                f.relu = true;
                f.absorbed.push(k);
                f.output = graph.nodes[k].output;
            }
        }
        _ => return None,
    }
    Some(f)
}

impl<'g> Engine<'g> {
    pub fn new(graph: &'g Graph) -> Self {
        let mut last_use = vec![0usize; graph.value_names.len()];
        for (i, node) in graph.nodes.iter().enumerate() {
            for &v in &node.inputs {
                last_use[v] = i;
            }
        }
        last_use[graph.output] = usize::MAX;
        let mut readers = vec![Vec::new(); graph.value_names.len()];
        let mut producer = vec![usize::MAX; graph.value_names.len()];
        for (i, node) in graph.nodes.iter().enumerate() {
            for &v in &node.inputs {
                if readers[v].last() != Some(&i) {
                    readers[v].push(i);
                }
            }
            producer[node.output] = i;
        }
        let fused = (0..graph.nodes.len())
            .map(|i| fusion_at(graph, &readers, &producer, i))
            .collect();
        let avx512 = quantbench_kernels::isa::active() == quantbench_kernels::Isa::Avx512;
        let packed = graph
            .nodes
            .iter()
            .map(|n| {
                match (
                    &n.op,
                    graph.constants[n.inputs[1.min(n.inputs.len() - 1)]].as_ref(),
                ) {
                    (Op::Conv { group, .. }, Some(w)) if avx512 && w.shape.len() == 4 => {
                        let m = w.shape[0];
                        let k: usize = w.shape[1..].iter().product();
                        if m % group != 0 {
                            return None;
                        }
                        let mg = m / group;
                        (0..*group)
                            .map(|g| {
                                PackedWeight::new(&w.data[g * mg * k..(g + 1) * mg * k], mg, k)
                            })
                            .collect()
                    }
                    _ => None,
                }
            })
            .collect();
        let winograd = graph
            .nodes
            .iter()
            .map(|n| {
                match (
                    &n.op,
                    n.inputs.get(1).and_then(|&v| graph.constants[v].as_ref()),
                ) {
                    (Op::Conv { group: 1, window }, Some(w))
                        if avx512
                            && window.kernel == [3, 3]
                            && w.shape.len() == 4
                            && w.shape[2..] == [3, 3] =>
                    {
                        winograd::WinogradWeight::new(&w.data, w.shape[0], w.shape[1])
                    }
                    _ => None,
                }
            })
            .collect();
        Self {
            graph,
            last_use,
            packed,
            winograd,
            fused,
            per_image: per_image(graph),
        }
    }

    pub fn graph(&self) -> &Graph {
        self.graph
    }

    /// Whether a batch without an edge hook runs one image at a time (see [`per_image`]).
    pub fn runs_per_image(&self) -> bool {
        self.per_image
    }

    /// Runs the graph on `input` (shape checked against the declared input, a symbolic or
    /// batch dimension accepting any size) and returns the graph output.
    pub fn run(&self, input: Tensor, hook: Option<&dyn EdgeHook>) -> Result<Tensor, String> {
        let n = input.shape.first().copied().unwrap_or(0);
        if hook.is_none() && self.per_image && n > 1 {
            check_input_shape(self.graph, &input.shape)?;
            return self.run_per_image(input);
        }
        let mut slots = self.start(input, hook)?;
        self.run_nodes(&mut slots, 0..self.graph.nodes.len(), hook)?;
        self.finish(slots)
    }

    /// [`Engine::run`] one image at a time (see [`per_image`]); the outputs, each of batch 1,
    /// are stacked.
    fn run_per_image(&self, input: Tensor) -> Result<Tensor, String> {
        let n = input.shape[0];
        let per = input.len() / n;
        let mut shape = input.shape.clone();
        shape[0] = 1;
        // The output shape of image 0 (batch 1), and every image's output in order.
        let mut first: Option<Vec<usize>> = None;
        let mut data = Vec::new();
        for (b, image) in input.data.chunks_exact(per).enumerate() {
            let x = Tensor::new(shape.clone(), image.to_vec());
            let mut slots = self.start(x, None)?;
            self.run_nodes(&mut slots, 0..self.graph.nodes.len(), None)?;
            let y = self.finish(slots)?;
            if y.shape.first() != Some(&1) {
                return Err(format!(
                    "the output of one image has shape {:?}, expected a batch of 1",
                    y.shape
                ));
            }
            let s0 = first.get_or_insert_with(|| y.shape.clone());
            if *s0 != y.shape {
                return Err(format!(
                    "image {b} gives output shape {:?}, image 0 gave {s0:?}",
                    y.shape
                ));
            }
            data.extend_from_slice(&y.data);
        }
        let mut out_shape = first.ok_or_else(|| "empty batch".to_string())?;
        out_shape[0] = n;
        Ok(Tensor::new(out_shape, data))
    }

    /// The value slots before node 0: only the (checked) input is set. With [`run_nodes`]
    /// and [`finish`] a caller can keep the state after a prefix of the graph and run only
    /// the rest, for example once per variant of a later layer's weight.
    ///
    /// [`run_nodes`]: Engine::run_nodes
    /// [`finish`]: Engine::finish
    pub fn start(
        &self,
        input: Tensor,
        hook: Option<&dyn EdgeHook>,
    ) -> Result<Vec<Option<Tensor>>, String> {
        let g = self.graph;
        check_input_shape(g, &input.shape)?;
        let mut slots: Vec<Option<Tensor>> = vec![None; g.value_names.len()];
        let mut input = input;
        if let Some(h) = hook {
            h.on_value(g.input, &mut input);
        }
        slots[g.input] = Some(input);
        Ok(slots)
    }

    /// Executes nodes `range` on `slots` (the values live before `range.start`), freeing each
    /// value after the last node that reads it.
    pub fn run_nodes(
        &self,
        slots: &mut [Option<Tensor>],
        range: std::ops::Range<usize>,
        hook: Option<&dyn EdgeHook>,
    ) -> Result<(), String> {
        let g = self.graph;
        // Nodes a fused Conv already computed.
        let mut absorbed: Vec<usize> = Vec::new();
        for i in range.clone() {
            let node = &g.nodes[i];
            let fused = match (&self.fused[i], hook) {
                (Some(f), None) if f.absorbed.iter().all(|j| range.contains(j)) => {
                    self.run_fused(slots, i, f)?
                }
                _ => None,
            };
            if let Some((f, out)) = fused {
                slots[f.output] = Some(out);
                absorbed.extend(&f.absorbed);
            } else if !absorbed.contains(&i) {
                let out = {
                    // Inputs this node reads last (and are not constants) may be consumed in place.
                    let mut owned: Option<Tensor> = None;
                    let first = node.inputs[0];
                    if self.last_use[first] == i
                        && g.constants[first].is_none()
                        && node.inputs[1..].iter().all(|&v| v != first)
                    {
                        owned = slots[first].take();
                    }
                    let get = |v: usize| -> Result<&Tensor, String> {
                        if let Some(t) = g.constants[v].as_ref() {
                            return Ok(t);
                        }
                        slots[v]
                            .as_ref()
                            .ok_or_else(|| format!("value '{}' is not available", g.value_names[v]))
                    };
                    let args: Vec<&Tensor> = node.inputs[1..]
                        .iter()
                        .map(|&v| get(v))
                        .collect::<Result<_, _>>()?;
                    let first_ref = match &owned {
                        Some(_) => None,
                        None => Some(get(first)?),
                    };
                    ops::execute(
                        &node.op,
                        owned,
                        first_ref,
                        &args,
                        self.packed[i].as_deref(),
                        // A hook (calibration, fake-quant simulation) sees the direct
                        // convolution's sums, the closest to the integer path's.
                        self.winograd[i].as_ref().filter(|_| hook.is_none()),
                    )
                    .map_err(|e| format!("node {} ({}): {e}", self.label(i), node.op.name()))?
                };
                let mut out = out;
                if let Some(h) = hook {
                    h.on_value(node.output, &mut out);
                }
                slots[node.output] = Some(out);
            }
            for &v in &node.inputs {
                if self.last_use[v] == i {
                    if let Some(t) = slots[v].take() {
                        pool::give_back(t.data);
                    }
                }
            }
        }
        Ok(())
    }

    /// Node `i` for messages: its quoted name, or `#i` when it has none.
    fn label(&self, i: usize) -> String {
        match self.graph.nodes[i].name.as_str() {
            "" => format!("#{i}"),
            name => format!("'{name}'"),
        }
    }

    /// Runs the Conv at node `i` with the Add / Relu of `f` fused; `None` when the residual
    /// is not shaped like the Conv output (the nodes then run one by one).
    fn run_fused<'f>(
        &self,
        slots: &[Option<Tensor>],
        i: usize,
        f: &'f Fusion,
    ) -> Result<Option<(&'f Fusion, Tensor)>, String> {
        let g = self.graph;
        let node = &g.nodes[i];
        let Op::Conv { window, group } = &node.op else {
            return Ok(None);
        };
        let get = |v: usize| -> Result<&Tensor, String> {
            g.constants[v]
                .as_ref()
                .or(slots[v].as_ref())
                .ok_or_else(|| format!("value '{}' is not available", g.value_names[v]))
        };
        let x = get(node.inputs[0])?;
        let w = get(node.inputs[1])?;
        let b = node.inputs.get(2).map(|&v| get(v)).transpose()?;
        let residual = f.residual.map(get).transpose()?;
        let out = ops::conv(
            x,
            w,
            b,
            window,
            *group,
            self.packed[i].as_deref(),
            self.winograd[i].as_ref(),
            residual,
            f.relu,
        )
        .map_err(|e| format!("node {} (Conv): {e}", self.label(i)))?;
        Ok(out.map(|t| (f, t)))
    }

    /// The graph output once every node has run.
    pub fn finish(&self, mut slots: Vec<Option<Tensor>>) -> Result<Tensor, String> {
        let g = self.graph;
        slots[g.output]
            .take()
            .or_else(|| g.constants[g.output].clone())
            .ok_or_else(|| "the graph output was not produced".to_string())
    }
}

/// Constant folding: every node whose inputs are all constants (a Reshape or Transpose of a
/// weight, arithmetic on initializers) is evaluated once and its output becomes a constant, so
/// that quantization sees the weight a layer really multiplies by. Run at import.
pub fn fold_constants(g: &mut Graph) -> Result<(), String> {
    let mut i = 0;
    while i < g.nodes.len() {
        let node = &g.nodes[i];
        let all_const = node.inputs.iter().all(|&v| g.constants[v].is_some());
        if !all_const || node.output == g.output {
            i += 1;
            continue;
        }
        let args: Vec<&Tensor> = node.inputs[1..]
            .iter()
            .map(|&v| g.constants[v].as_ref().expect("constant"))
            .collect();
        let first = g.constants[node.inputs[0]].as_ref();
        let out = ops::execute(&node.op, None, first, &args, None, None).map_err(|e| {
            format!(
                "node '{}' ({}), folding constants: {e}",
                node.name,
                node.op.name()
            )
        })?;
        let id = node.output;
        g.constants[id] = Some(out);
        g.nodes.remove(i);
    }
    Ok(())
}

fn check_input_shape(g: &Graph, shape: &[usize]) -> Result<(), String> {
    let declared = &g.input_shape;
    let name = &g.value_names[g.input];
    if declared.is_empty() {
        return Ok(());
    }
    let bad = || {
        let d: Vec<String> = declared
            .iter()
            .map(|d| d.map_or("?".into(), |v| v.to_string()))
            .collect();
        format!(
            "input '{name}' expects shape [{}], got {shape:?}",
            d.join(", ")
        )
    };
    if declared.len() != shape.len() {
        return Err(bad());
    }
    // A model exported with a fixed batch (MNIST-8: 1) runs at that batch only: its Reshape
    // constants bake the batch in.
    for (d, &s) in declared.iter().zip(shape) {
        if d.is_some_and(|d| d != s) {
            return Err(bad());
        }
    }
    Ok(())
}

/// Whether the op is a layer with weights (Conv, Gemm, MatMul).
pub fn is_weighted(op: &Op) -> bool {
    matches!(op, Op::Conv { .. } | Op::Gemm { .. } | Op::MatMul)
}
