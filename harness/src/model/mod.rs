//! ONNX import: `ModelProto` (decoded by prost) -> [`Graph`], a validated, topologically ordered
//! list of typed operators over numbered values, with every constant read once.
//!
//! What import guarantees: every node's operator, opset and attributes are supported (anything else
//! is an error naming the node, the op and the opset), every input of a node is produced earlier
//! or is a graph input or a constant, shape parameters (Reshape's shape, Slice's starts/ends, Pad's
//! pads, Clip's bounds) are constants, and a BatchNormalization that follows a Conv is folded into
//! that Conv's weights and bias.

pub mod proto;

use std::collections::HashMap;
use std::path::Path;

use prost::Message;

/// A dense f32 tensor in row-major order.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            shape,
            data: vec![0.0; n],
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Padding rule of Conv and the pools.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AutoPad {
    /// Explicit `pads`.
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

/// Window geometry shared by Conv, MaxPool and AveragePool (2-D only).
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    /// (kh, kw); for Conv taken from the weight when the attribute is absent.
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    /// [top, left, bottom, right].
    pub pads: [usize; 4],
    pub auto_pad: AutoPad,
    pub ceil_mode: bool,
}

impl Window {
    /// Output size and the effective [top, left, bottom, right] pads for an input of `h x w`.
    pub fn output(&self, h: usize, w: usize) -> Result<([usize; 2], [usize; 4]), String> {
        let mut pads = self.pads;
        let mut out = [0usize; 2];
        for (d, size) in [h, w].into_iter().enumerate() {
            let ek = self.dilations[d] * (self.kernel[d] - 1) + 1;
            let s = self.strides[d];
            match self.auto_pad {
                AutoPad::NotSet => {
                    let padded = size + pads[d] + pads[d + 2];
                    if padded < ek {
                        return Err(format!(
                            "window of {ek} does not fit an input of {size} (+ pads)"
                        ));
                    }
                    out[d] = if self.ceil_mode {
                        (padded - ek).div_ceil(s) + 1
                    } else {
                        (padded - ek) / s + 1
                    };
                }
                AutoPad::Valid => {
                    if size < ek {
                        return Err(format!("window of {ek} does not fit an input of {size}"));
                    }
                    pads[d] = 0;
                    pads[d + 2] = 0;
                    out[d] = (size - ek) / s + 1;
                }
                AutoPad::SameUpper | AutoPad::SameLower => {
                    out[d] = size.div_ceil(s);
                    let total = ((out[d] - 1) * s + ek).saturating_sub(size);
                    let (small, big) = (total / 2, total - total / 2);
                    if self.auto_pad == AutoPad::SameUpper {
                        pads[d] = small;
                        pads[d + 2] = big;
                    } else {
                        pads[d] = big;
                        pads[d + 2] = small;
                    }
                }
            }
        }
        Ok((out, pads))
    }
}

/// The operators the engine executes, with their attributes resolved at import.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// inputs: x, weight [M, C/group, kh, kw], optional bias [M].
    Conv {
        window: Window,
        group: usize,
    },
    /// Y = alpha * op(A) op(B) + beta * C.
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    MatMul,
    Add,
    Sub,
    Mul,
    Div,
    Relu,
    Clip {
        min: f32,
        max: f32,
    },
    /// Kept only where it cannot be folded into a Conv: inputs x, scale, bias, mean, var.
    BatchNorm {
        epsilon: f32,
    },
    MaxPool {
        window: Window,
    },
    AveragePool {
        window: Window,
        count_include_pad: bool,
    },
    GlobalAveragePool,
    Flatten {
        axis: i64,
    },
    Reshape {
        shape: Vec<i64>,
        allow_zero: bool,
    },
    Transpose {
        perm: Option<Vec<usize>>,
    },
    Slice {
        starts: Vec<i64>,
        ends: Vec<i64>,
        axes: Vec<i64>,
        steps: Vec<i64>,
    },
    /// Constant padding only; `pads` as ONNX gives them (begins then ends, one per axis).
    Pad {
        pads: Vec<i64>,
        value: f32,
    },
    Concat {
        axis: i64,
    },
    /// `legacy`: opset < 13 semantics (flatten to 2-D at `axis`).
    Softmax {
        axis: i64,
        legacy: bool,
    },
    Identity,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv { .. } => "Conv",
            Op::Gemm { .. } => "Gemm",
            Op::MatMul => "MatMul",
            Op::Add => "Add",
            Op::Sub => "Sub",
            Op::Mul => "Mul",
            Op::Div => "Div",
            Op::Relu => "Relu",
            Op::Clip { .. } => "Clip",
            Op::BatchNorm { .. } => "BatchNormalization",
            Op::MaxPool { .. } => "MaxPool",
            Op::AveragePool { .. } => "AveragePool",
            Op::GlobalAveragePool => "GlobalAveragePool",
            Op::Flatten { .. } => "Flatten",
            Op::Reshape { .. } => "Reshape",
            Op::Transpose { .. } => "Transpose",
            Op::Slice { .. } => "Slice",
            Op::Pad { .. } => "Pad",
            Op::Concat { .. } => "Concat",
            Op::Softmax { .. } => "Softmax",
            Op::Identity => "Identity",
        }
    }
}

/// One operator application. Inputs and output are value ids of the [`Graph`].
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<usize>,
    pub output: usize,
}

/// An imported model.
#[derive(Clone, Debug)]
pub struct Graph {
    /// Name of every value (activations and constants), indexed by value id.
    pub value_names: Vec<String>,
    /// Constant tensors (initializers and Constant nodes), indexed by value id.
    pub constants: Vec<Option<Tensor>>,
    pub nodes: Vec<Node>,
    /// The one data input: value id and its declared shape (`None` for a symbolic dimension).
    pub input: usize,
    pub input_shape: Vec<Option<usize>>,
    pub output: usize,
    pub opset: i64,
}

impl Graph {
    /// Reads and imports an ONNX file. Errors name the file.
    pub fn load(path: &Path) -> Result<Graph, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Graph::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Imports an ONNX model from its serialized bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Graph, String> {
        let model = proto::ModelProto::decode(bytes)
            .map_err(|e| format!("not a valid ONNX model (protobuf decode failed: {e})"))?;
        import(model)
    }

    pub fn value_id(&self, name: &str) -> Option<usize> {
        self.value_names.iter().position(|n| n == name)
    }

    pub fn constant(&self, name: &str) -> Option<&Tensor> {
        self.value_id(name)
            .and_then(|id| self.constants[id].as_ref())
    }

    /// The weight tensors that quantization methods act on: the second input of every Conv,
    /// Gemm and MatMul when it is a constant, in node order (deduplicated).
    pub fn weights(&self) -> Vec<WeightRef> {
        let mut out: Vec<WeightRef> = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let (kind, axis) = match &node.op {
                Op::Conv { .. } => (LayerKind::Conv, 0),
                Op::Gemm { trans_b, .. } => (LayerKind::Gemm, if *trans_b { 0 } else { 1 }),
                Op::MatMul => (LayerKind::MatMul, 1),
                _ => continue,
            };
            let Some(&w) = node.inputs.get(1) else {
                continue;
            };
            if self.constants[w].is_none() || out.iter().any(|r| r.value == w) {
                continue;
            }
            out.push(WeightRef {
                node: i,
                value: w,
                kind,
                out_axis: axis,
            });
        }
        out
    }

    /// Replaces a constant, keeping its shape. The hook through which methods install
    /// quantized-then-dequantized weights.
    pub fn set_constant(&mut self, value: usize, data: Vec<f32>) -> Result<(), String> {
        let name = &self.value_names[value];
        let t = self.constants[value]
            .as_mut()
            .ok_or_else(|| format!("tensor '{name}' is not a constant"))?;
        if t.data.len() != data.len() {
            return Err(format!(
                "tensor '{name}': replacement has {} values, expected {}",
                data.len(),
                t.data.len()
            ));
        }
        t.data = data;
        Ok(())
    }
}

/// The kind of layer a weight belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Conv,
    Gemm,
    MatMul,
}

/// A weight tensor of the graph: the node that uses it, its value id, and the axis of its
/// output channels (per-channel quantization runs along this axis).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightRef {
    pub node: usize,
    pub value: usize,
    pub kind: LayerKind,
    pub out_axis: usize,
}

struct Importer {
    names: Vec<String>,
    ids: HashMap<String, usize>,
    constants: Vec<Option<Tensor>>,
    /// Integer constants (shape parameters) by value id.
    ints: HashMap<usize, Vec<i64>>,
    produced: Vec<bool>,
}

impl Importer {
    fn id(&mut self, name: &str) -> usize {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len();
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        self.constants.push(None);
        self.produced.push(false);
        id
    }
}

fn import(model: proto::ModelProto) -> Result<Graph, String> {
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .ok_or("the model imports no version of the default ONNX operator set")?;
    if !(7..=22).contains(&opset) {
        return Err(format!(
            "opset {opset} is not supported (supported: 7..=22)"
        ));
    }
    let graph = model.graph.ok_or("the model has no graph")?;
    let mut im = Importer {
        names: Vec::new(),
        ids: HashMap::new(),
        constants: Vec::new(),
        ints: HashMap::new(),
        produced: Vec::new(),
    };
    for init in &graph.initializer {
        let id = im.id(&init.name);
        read_constant(&mut im, id, init)
            .map_err(|e| format!("initializer '{}': {e}", init.name))?;
    }
    // The data input: the graph input that is not an initializer.
    let data_inputs: Vec<&proto::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !im.ids.contains_key(&i.name))
        .collect();
    if data_inputs.len() != 1 {
        let names: Vec<&str> = data_inputs.iter().map(|i| i.name.as_str()).collect();
        return Err(format!(
            "expected exactly one data input (graph inputs that are not initializers), found {}: {names:?}",
            data_inputs.len()
        ));
    }
    let input_info = data_inputs[0];
    let input = im.id(&input_info.name);
    im.produced[input] = true;
    let tensor_type = input_info
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .ok_or_else(|| format!("input '{}' is not a tensor", input_info.name))?;
    if tensor_type.elem_type != proto::data_type::FLOAT {
        return Err(format!(
            "input '{}' has element type {} (only float32 inputs are supported)",
            input_info.name, tensor_type.elem_type
        ));
    }
    let input_shape: Vec<Option<usize>> = tensor_type
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| d.dim_value.filter(|&v| v > 0).map(|v| v as usize))
                .collect()
        })
        .unwrap_or_default();

    let mut nodes = Vec::new();
    for (index, node) in graph.node.iter().enumerate() {
        let label = if node.name.is_empty() {
            format!("node #{index} ({})", node.op_type)
        } else {
            format!("node '{}' ({})", node.name, node.op_type)
        };
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            return Err(format!(
                "{label}: operator domain '{}' is not supported (only the default ONNX domain)",
                node.domain
            ));
        }
        let extra_ok = node.op_type == "BatchNormalization"
            || (node.op_type == "MaxPool" && node.output.len() == 2 && node.output[1].is_empty());
        if node.output.is_empty() || (node.output.len() != 1 && !extra_ok) {
            return Err(format!(
                "{label}: expected one output, found {}",
                node.output.len()
            ));
        }
        if let Some(n) =
            import_node(&mut im, node, opset).map_err(|e| format!("{label}, opset {opset}: {e}"))?
        {
            nodes.push(n);
        }
    }
    let out_name = &graph.output.first().ok_or("the graph has no output")?.name;
    let output = *im
        .ids
        .get(out_name)
        .ok_or_else(|| format!("graph output '{out_name}' is never produced"))?;
    if !im.produced[output] && im.constants[output].is_none() {
        return Err(format!("graph output '{out_name}' is never produced"));
    }
    let mut g = Graph {
        value_names: im.names,
        constants: im.constants,
        nodes,
        input,
        input_shape,
        output,
        opset,
    };
    fold_batch_norms(&mut g)?;
    crate::engine::fold_constants(&mut g)?;
    Ok(g)
}

fn read_constant(im: &mut Importer, id: usize, t: &proto::TensorProto) -> Result<(), String> {
    if t.data_location == 1 {
        return Err(
            "external data is not supported (save the model with the weights inside)".into(),
        );
    }
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(format!("negative dimension {d}"));
        }
        shape.push(d as usize);
    }
    let n: usize = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("dimensions overflow")?;
    let check = |got: usize| -> Result<(), String> {
        if got == n {
            Ok(())
        } else {
            Err(format!(
                "shape {shape:?} needs {n} values, the tensor holds {got}"
            ))
        }
    };
    let raw = &t.raw_data;
    match t.data_type {
        proto::data_type::FLOAT => {
            let data: Vec<f32> = if !raw.is_empty() {
                if !raw.len().is_multiple_of(4) {
                    return Err(format!(
                        "raw_data of {} bytes is not a whole number of float32",
                        raw.len()
                    ));
                }
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            } else {
                t.float_data.clone()
            };
            check(data.len())?;
            im.constants[id] = Some(Tensor::new(shape, data));
        }
        proto::data_type::DOUBLE => {
            let data: Vec<f32> = if !raw.is_empty() {
                raw.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    .collect()
            } else {
                t.double_data.iter().map(|&v| v as f32).collect()
            };
            check(data.len())?;
            im.constants[id] = Some(Tensor::new(shape, data));
        }
        proto::data_type::INT64 | proto::data_type::INT32 => {
            let data: Vec<i64> = if !raw.is_empty() {
                if t.data_type == proto::data_type::INT64 {
                    raw.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                        .collect()
                } else {
                    raw.chunks_exact(4)
                        .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                        .collect()
                }
            } else if t.data_type == proto::data_type::INT64 {
                t.int64_data.clone()
            } else {
                t.int32_data.iter().map(|&v| v as i64).collect()
            };
            check(data.len())?;
            im.constants[id] = Some(Tensor::new(shape, data.iter().map(|&v| v as f32).collect()));
            im.ints.insert(id, data);
        }
        other => {
            return Err(format!(
                "element type {other} is not supported (float32, float64, int32, int64)"
            ))
        }
    }
    Ok(())
}

struct Attrs<'a>(&'a [proto::AttributeProto]);

impl Attrs<'_> {
    fn get(&self, name: &str) -> Option<&proto::AttributeProto> {
        self.0.iter().find(|a| a.name == name)
    }
    fn int(&self, name: &str, default: i64) -> Result<i64, String> {
        match self.get(name) {
            None => Ok(default),
            Some(a) if a.r#type == proto::attribute_type::INT || a.r#type == 0 => Ok(a.i),
            Some(a) => Err(format!(
                "attribute '{name}' has type {}, expected INT",
                a.r#type
            )),
        }
    }
    fn float(&self, name: &str, default: f32) -> Result<f32, String> {
        match self.get(name) {
            None => Ok(default),
            Some(a) if a.r#type == proto::attribute_type::FLOAT || a.r#type == 0 => Ok(a.f),
            Some(a) => Err(format!(
                "attribute '{name}' has type {}, expected FLOAT",
                a.r#type
            )),
        }
    }
    fn ints(&self, name: &str) -> Result<Option<Vec<i64>>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(a) if a.r#type == proto::attribute_type::INTS || a.r#type == 0 => {
                Ok(Some(a.ints.clone()))
            }
            Some(a) => Err(format!(
                "attribute '{name}' has type {}, expected INTS",
                a.r#type
            )),
        }
    }
    fn string(&self, name: &str, default: &str) -> Result<String, String> {
        match self.get(name) {
            None => Ok(default.to_string()),
            Some(a) if a.r#type == proto::attribute_type::STRING || a.r#type == 0 => {
                String::from_utf8(a.s.clone())
                    .map_err(|_| format!("attribute '{name}' is not UTF-8"))
            }
            Some(a) => Err(format!(
                "attribute '{name}' has type {}, expected STRING",
                a.r#type
            )),
        }
    }
    /// Errors on any attribute outside `known`.
    fn only(&self, known: &[&str]) -> Result<(), String> {
        for a in self.0 {
            if !known.contains(&a.name.as_str()) {
                return Err(format!("attribute '{}' is not supported", a.name));
            }
        }
        Ok(())
    }
}

fn pair(v: Option<Vec<i64>>, default: usize, what: &str) -> Result<[usize; 2], String> {
    match v {
        None => Ok([default; 2]),
        Some(v) if v.len() == 2 && v.iter().all(|&x| x >= 1) => Ok([v[0] as usize, v[1] as usize]),
        Some(v) => Err(format!(
            "'{what}' = {v:?}: expected two positive values (2-D only)"
        )),
    }
}

fn window(a: &Attrs, kernel: Option<[usize; 2]>) -> Result<Window, String> {
    let kernel = match a.ints("kernel_shape")? {
        Some(_) => pair(a.ints("kernel_shape")?, 1, "kernel_shape")?,
        None => kernel.ok_or("'kernel_shape' is required")?,
    };
    let pads = match a.ints("pads")? {
        None => [0; 4],
        Some(p) if p.len() == 4 && p.iter().all(|&x| x >= 0) => {
            [p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize]
        }
        Some(p) => {
            return Err(format!(
                "'pads' = {p:?}: expected four non-negative values (2-D only)"
            ))
        }
    };
    let auto_pad = match a.string("auto_pad", "NOTSET")?.as_str() {
        "NOTSET" | "" => AutoPad::NotSet,
        "SAME_UPPER" => AutoPad::SameUpper,
        "SAME_LOWER" => AutoPad::SameLower,
        "VALID" => AutoPad::Valid,
        other => return Err(format!("auto_pad '{other}' is not supported")),
    };
    Ok(Window {
        kernel,
        strides: pair(a.ints("strides")?, 1, "strides")?,
        dilations: pair(a.ints("dilations")?, 1, "dilations")?,
        pads,
        auto_pad,
        ceil_mode: a.int("ceil_mode", 0)? != 0,
    })
}

/// A constant integer input (shape parameters); `None` if the input is absent or empty-named.
fn const_ints(
    im: &Importer,
    node: &proto::NodeProto,
    i: usize,
    what: &str,
) -> Result<Option<Vec<i64>>, String> {
    let Some(name) = node.input.get(i).filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    let id = im
        .ids
        .get(name)
        .ok_or_else(|| format!("input '{name}' is not defined before this node"))?;
    im.ints
        .get(id)
        .cloned()
        .map(Some)
        .ok_or_else(|| format!("'{what}' (input '{name}') must be a constant int64 tensor"))
}

fn const_scalar(
    im: &Importer,
    node: &proto::NodeProto,
    i: usize,
    what: &str,
) -> Result<Option<f32>, String> {
    let Some(name) = node.input.get(i).filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    let id = im
        .ids
        .get(name)
        .ok_or_else(|| format!("input '{name}' is not defined before this node"))?;
    match &im.constants[*id] {
        Some(t) if t.data.len() == 1 => Ok(Some(t.data[0])),
        _ => Err(format!(
            "'{what}' (input '{name}') must be a constant scalar"
        )),
    }
}

fn import_node(
    im: &mut Importer,
    node: &proto::NodeProto,
    opset: i64,
) -> Result<Option<Node>, String> {
    let a = Attrs(&node.attribute);
    let op_type = node.op_type.as_str();
    // Constant: becomes a constant value, no node.
    if op_type == "Constant" {
        a.only(&["value"])?;
        let t = a
            .get("value")
            .and_then(|v| v.t.as_ref())
            .ok_or("only the 'value' (tensor) form is supported")?;
        let id = im.id(&node.output[0]);
        return read_constant(im, id, t).map(|_| None);
    }
    // Data inputs: how many are tensors flowing through the engine.
    let (op, data_inputs): (Op, usize) = match op_type {
        "Conv" => {
            a.only(&[
                "kernel_shape",
                "strides",
                "pads",
                "dilations",
                "group",
                "auto_pad",
            ])?;
            let w = node.input.get(1).ok_or("Conv needs a weight input")?;
            let kernel = im
                .ids
                .get(w)
                .and_then(|&id| im.constants[id].as_ref())
                .filter(|t| t.shape.len() == 4)
                .map(|t| [t.shape[2], t.shape[3]]);
            let group = a.int("group", 1)?;
            if group < 1 {
                return Err(format!("group = {group}: expected >= 1"));
            }
            (
                Op::Conv {
                    window: window(&a, kernel)?,
                    group: group as usize,
                },
                node.input.len().min(3),
            )
        }
        "Gemm" => {
            a.only(&["alpha", "beta", "transA", "transB", "broadcast"])?;
            let op = Op::Gemm {
                alpha: a.float("alpha", 1.0)?,
                beta: a.float("beta", 1.0)?,
                trans_a: a.int("transA", 0)? != 0,
                trans_b: a.int("transB", 0)? != 0,
            };
            (op, node.input.len().min(3))
        }
        "MatMul" => (Op::MatMul, 2),
        "Add" | "Sub" | "Mul" | "Div" => {
            if opset < 7 {
                a.only(&["broadcast", "axis"])?;
            } else {
                a.only(&[])?;
            }
            let op = match op_type {
                "Add" => Op::Add,
                "Sub" => Op::Sub,
                "Mul" => Op::Mul,
                _ => Op::Div,
            };
            (op, 2)
        }
        "Relu" => (Op::Relu, 1),
        "Clip" => {
            if opset < 11 {
                a.only(&["min", "max"])?;
                (
                    Op::Clip {
                        min: a.float("min", f32::MIN)?,
                        max: a.float("max", f32::MAX)?,
                    },
                    1,
                )
            } else {
                a.only(&[])?;
                let min = const_scalar(im, node, 1, "min")?.unwrap_or(f32::MIN);
                let max = const_scalar(im, node, 2, "max")?.unwrap_or(f32::MAX);
                (Op::Clip { min, max }, 1)
            }
        }
        "BatchNormalization" => {
            a.only(&[
                "epsilon",
                "momentum",
                "training_mode",
                "spatial",
                "is_test",
                "consumed_inputs",
            ])?;
            if a.int("training_mode", 0)? != 0 {
                return Err("training_mode = 1 is not supported (inference only)".into());
            }
            if node.output.len() > 1 && node.output[1..].iter().any(|o| !o.is_empty()) {
                return Err("only the first output (inference mode) is supported".into());
            }
            (
                Op::BatchNorm {
                    epsilon: a.float("epsilon", 1e-5)?,
                },
                5,
            )
        }
        "MaxPool" => {
            a.only(&[
                "kernel_shape",
                "strides",
                "pads",
                "dilations",
                "auto_pad",
                "ceil_mode",
                "storage_order",
            ])?;
            if a.int("storage_order", 0)? != 0 {
                return Err("storage_order = 1 is not supported".into());
            }
            (
                Op::MaxPool {
                    window: window(&a, None)?,
                },
                1,
            )
        }
        "AveragePool" => {
            a.only(&[
                "kernel_shape",
                "strides",
                "pads",
                "auto_pad",
                "ceil_mode",
                "count_include_pad",
                "dilations",
            ])?;
            let op = Op::AveragePool {
                window: window(&a, None)?,
                count_include_pad: a.int("count_include_pad", 0)? != 0,
            };
            (op, 1)
        }
        "GlobalAveragePool" => (Op::GlobalAveragePool, 1),
        "Flatten" => {
            a.only(&["axis"])?;
            (
                Op::Flatten {
                    axis: a.int("axis", 1)?,
                },
                1,
            )
        }
        "Reshape" => {
            a.only(&["allowzero", "shape"])?;
            let shape = if opset < 5 {
                a.ints("shape")?.ok_or("'shape' attribute is required")?
            } else {
                const_ints(im, node, 1, "shape")?.ok_or("the shape input is required")?
            };
            (
                Op::Reshape {
                    shape,
                    allow_zero: a.int("allowzero", 0)? != 0,
                },
                1,
            )
        }
        "Transpose" => {
            a.only(&["perm"])?;
            let perm = a
                .ints("perm")?
                .map(|p| p.iter().map(|&x| x as usize).collect());
            (Op::Transpose { perm }, 1)
        }
        "Slice" => {
            let (starts, ends, axes, steps) = if opset < 10 {
                a.only(&["starts", "ends", "axes"])?;
                (
                    a.ints("starts")?.ok_or("'starts' is required")?,
                    a.ints("ends")?.ok_or("'ends' is required")?,
                    a.ints("axes")?,
                    None,
                )
            } else {
                a.only(&[])?;
                (
                    const_ints(im, node, 1, "starts")?.ok_or("'starts' is required")?,
                    const_ints(im, node, 2, "ends")?.ok_or("'ends' is required")?,
                    const_ints(im, node, 3, "axes")?,
                    const_ints(im, node, 4, "steps")?,
                )
            };
            if starts.len() != ends.len() {
                return Err(format!("{} starts but {} ends", starts.len(), ends.len()));
            }
            let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
            let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
            if axes.len() != starts.len() || steps.len() != starts.len() || steps.contains(&0) {
                return Err(
                    "axes/steps must match starts in length and steps must be non-zero".into(),
                );
            }
            (
                Op::Slice {
                    starts,
                    ends,
                    axes,
                    steps,
                },
                1,
            )
        }
        "Pad" => {
            let (pads, value, mode) = if opset < 11 {
                a.only(&["pads", "paddings", "mode", "value"])?;
                let pads = match a.ints("pads")? {
                    Some(p) => p,
                    None => a.ints("paddings")?.ok_or("'pads' is required")?,
                };
                (pads, a.float("value", 0.0)?, a.string("mode", "constant")?)
            } else {
                a.only(&["mode"])?;
                if node.input.get(3).is_some_and(|n| !n.is_empty()) {
                    return Err("the 'axes' input is not supported".into());
                }
                let pads = const_ints(im, node, 1, "pads")?.ok_or("the pads input is required")?;
                (
                    pads,
                    const_scalar(im, node, 2, "constant_value")?.unwrap_or(0.0),
                    a.string("mode", "constant")?,
                )
            };
            if mode != "constant" {
                return Err(format!("mode '{mode}' is not supported (constant only)"));
            }
            (Op::Pad { pads, value }, 1)
        }
        "Concat" => {
            a.only(&["axis"])?;
            let axis = a.int("axis", if opset < 4 { 1 } else { i64::MIN })?;
            if axis == i64::MIN {
                return Err("'axis' is required".into());
            }
            (Op::Concat { axis }, node.input.len())
        }
        "Softmax" => {
            a.only(&["axis"])?;
            let legacy = opset < 13;
            (
                Op::Softmax {
                    axis: a.int("axis", if legacy { 1 } else { -1 })?,
                    legacy,
                },
                1,
            )
        }
        "Identity" | "Dropout" => {
            if op_type == "Dropout" {
                a.only(&["ratio", "is_test", "seed"])?;
                if node.output.len() > 1 && node.output[1..].iter().any(|o| !o.is_empty()) {
                    return Err("the mask output is not supported".into());
                }
            }
            (Op::Identity, 1)
        }
        other => return Err(format!("operator '{other}' is not supported")),
    };
    if node.input.is_empty() {
        return Err("the node has no input".into());
    }
    let mut inputs = Vec::new();
    for name in node.input.iter().take(data_inputs) {
        if name.is_empty() {
            return Err("an empty (omitted) data input is not supported".into());
        }
        let id = *im
            .ids
            .get(name)
            .ok_or_else(|| format!("input '{name}' is not produced before this node"))?;
        if !im.produced[id] && im.constants[id].is_none() {
            return Err(format!("input '{name}' is not produced before this node"));
        }
        inputs.push(id);
    }
    let needed = match op {
        Op::Conv { .. } | Op::Gemm { .. } | Op::MatMul => 2,
        Op::Add | Op::Sub | Op::Mul | Op::Div => 2,
        Op::BatchNorm { .. } => 5,
        _ => 1,
    };
    if inputs.len() < needed {
        return Err(format!("needs {needed} inputs, has {}", inputs.len()));
    }
    let output = im.id(&node.output[0]);
    if im.produced[output] || im.constants[output].is_some() {
        return Err(format!("output '{}' is produced twice", node.output[0]));
    }
    im.produced[output] = true;
    // Constant folding of shape-like chains is not needed by the supported models; Identity of
    // an integer constant keeps it usable as a shape parameter.
    if op == Op::Identity {
        if let Some(v) = im.ints.get(&inputs[0]).cloned() {
            im.ints.insert(output, v);
        }
    }
    Ok(Some(Node {
        name: node.name.clone(),
        op,
        inputs,
        output,
    }))
}

/// Folds `BatchNormalization(Conv(x))` into the Conv when the Conv output feeds only the BN and
/// all BN parameters are constants: W' = W * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta.
fn fold_batch_norms(g: &mut Graph) -> Result<(), String> {
    let mut i = 0;
    while i < g.nodes.len() {
        let Op::BatchNorm { epsilon } = g.nodes[i].op else {
            i += 1;
            continue;
        };
        let bn = g.nodes[i].clone();
        let src = bn.inputs[0];
        let params: Option<Vec<&Tensor>> = bn.inputs[1..5]
            .iter()
            .map(|&id| g.constants[id].as_ref())
            .collect();
        let producer = g.nodes.iter().position(|n| n.output == src);
        let uses = g.nodes.iter().filter(|n| n.inputs.contains(&src)).count()
            + usize::from(g.output == src);
        let (Some(params), Some(p)) = (params, producer) else {
            i += 1;
            continue;
        };
        if !matches!(g.nodes[p].op, Op::Conv { .. }) || uses != 1 {
            i += 1;
            continue;
        }
        let w_id = g.nodes[p].inputs[1];
        let Some(w) = g.constants[w_id].clone() else {
            i += 1;
            continue;
        };
        let m = w.shape[0];
        if params.iter().any(|t| t.data.len() != m) {
            return Err(format!(
                "node '{}' (BatchNormalization): parameters do not have {m} channels of the preceding Conv",
                bn.name
            ));
        }
        let (gamma, beta, mean, var) = (
            &params[0].data,
            &params[1].data,
            &params[2].data,
            &params[3].data,
        );
        let per = w.data.len() / m;
        let mut new_w = w.data.clone();
        let old_b: Vec<f32> = match g.nodes[p].inputs.get(2) {
            Some(&b) => g.constants[b]
                .as_ref()
                .map(|t| t.data.clone())
                .ok_or("Conv bias is not a constant")?,
            None => vec![0.0; m],
        };
        let mut new_b = vec![0.0f32; m];
        for c in 0..m {
            let s = gamma[c] / (var[c] + epsilon).sqrt();
            for v in &mut new_w[c * per..(c + 1) * per] {
                *v *= s;
            }
            new_b[c] = (old_b[c] - mean[c]) * s + beta[c];
        }
        // Fresh value ids so that weights shared with another node are not changed.
        let conv_name = g.nodes[p].name.clone();
        let w_new_id = push_constant(
            g,
            format!("{conv_name}.folded_weight"),
            Tensor::new(w.shape.clone(), new_w),
        );
        let b_new_id = push_constant(
            g,
            format!("{conv_name}.folded_bias"),
            Tensor::new(vec![m], new_b),
        );
        let conv = &mut g.nodes[p];
        conv.inputs.truncate(1);
        conv.inputs.push(w_new_id);
        conv.inputs.push(b_new_id);
        conv.output = bn.output;
        g.nodes.remove(i);
    }
    Ok(())
}

fn push_constant(g: &mut Graph, name: String, t: Tensor) -> usize {
    g.value_names.push(name);
    g.constants.push(Some(t));
    g.value_names.len() - 1
}
