//! Methods: each weight tensor of a model in its STORED form (packed codes + parameters, or a
//! codebook + packed indices), its dequantized values for the simulation, and the quantized
//! model written as safetensors (whose file size is the reported size).

use std::collections::BTreeMap;
use std::path::Path;

use quantbench_kernels::fixed_point::{FixedPointFormat, Rounding};
use quantbench_kernels::pack::pack_codes;
use quantbench_kernels::{ChannelLayout, Kernels, LinearScheme, QuantParams};

use crate::experiment::{Cell, Granularity, KMeansMode, WeightScheme};
use crate::model::{Graph, Tensor, WeightRef};

/// A weight in the form it is stored in.
#[derive(Clone, Debug)]
pub enum Stored {
    Float(Vec<f32>),
    Linear {
        bits: u32,
        packed: Vec<u8>,
        scales: Vec<f32>,
        zero_points: Vec<i8>,
        qmin: i32,
    },
    Fixed {
        bits: u32,
        packed: Vec<u8>,
        frac_bits: Vec<i8>,
    },
    KMeans {
        bits: u32,
        packed: Vec<u8>,
        codebooks: Vec<f32>,
        clusters: usize,
    },
}

#[derive(Clone, Debug)]
pub struct QuantizedWeight {
    pub name: String,
    pub shape: Vec<usize>,
    pub scheme: WeightScheme,
    pub stored: Stored,
    pub dequantized: Vec<f32>,
}

/// The weights of one model under one cell, plus every other constant in fp32.
pub struct QuantizedModel {
    pub weights: Vec<(WeightRef, QuantizedWeight)>,
    /// Weight SQNR over all quantized weights: 10 log10(sum w^2 / sum (w - w_hat)^2).
    pub sqnr_db: Option<f64>,
    pub seconds: f64,
}

fn layout_for(
    shape: &[usize],
    axis: usize,
    g: Granularity,
) -> Result<Option<ChannelLayout>, String> {
    match g {
        Granularity::PerTensor => Ok(None),
        Granularity::PerChannel => ChannelLayout::new(shape, axis)
            .map(Some)
            .map_err(|e| e.to_string()),
    }
}

/// Runs of `(start, end, channel)` covering the tensor (one run for per-tensor).
fn runs(layout: &Option<ChannelLayout>, n: usize) -> Vec<(usize, usize, usize)> {
    match layout {
        Some(l) => l.runs().map(|(s, c)| (s, s + l.inner, c)).collect(),
        None => vec![(0, n, 0)],
    }
}

/// Quantizes one weight tensor. `axis` is its output-channel axis (per-channel parameters).
pub fn quantize_weight(
    k: &Kernels,
    name: &str,
    w: &Tensor,
    axis: usize,
    scheme: &WeightScheme,
) -> Result<QuantizedWeight, String> {
    let x = &w.data;
    let n = x.len();
    let err = |e: quantbench_kernels::KernelError| format!("weight '{name}': {e}");
    let (stored, dequantized) = match *scheme {
        WeightScheme::Fp32 => (Stored::Float(x.clone()), x.clone()),
        WeightScheme::Linear {
            bits,
            granularity,
            symmetric,
        } => {
            let scheme = LinearScheme::new(bits, true, symmetric).map_err(err)?;
            let layout = layout_for(&w.shape, axis, granularity)?;
            let params: Vec<QuantParams> = match &layout {
                Some(l) => k.choose_params_per_channel(x, l, &scheme),
                None => k.choose_params(x, &scheme).map(|p| vec![p]),
            }
            .map_err(err)?;
            let mut q = vec![0i8; n];
            let mut d = vec![0f32; n];
            match &layout {
                Some(l) => {
                    k.quantize_per_channel(x, l, &params, &mut q).map_err(err)?;
                    k.dequantize_per_channel(&q, l, &params, &mut d)
                        .map_err(err)?;
                }
                None => {
                    k.quantize(x, &params[0], &mut q).map_err(err)?;
                    k.dequantize(&q, &params[0], &mut d).map_err(err)?;
                }
            }
            let (qmin, _) = scheme.qrange();
            let packed = pack_codes(&q, qmin, bits).map_err(err)?;
            let stored = Stored::Linear {
                bits,
                packed,
                scales: params.iter().map(|p| p.scale()).collect(),
                zero_points: params.iter().map(|p| p.zero_point() as i8).collect(),
                qmin,
            };
            (stored, d)
        }
        WeightScheme::FixedPoint { bits, int_bits } => {
            let f = FixedPointFormat::new(bits, bits as i32 - 1 - int_bits).map_err(err)?;
            fixed(k, x, None, &[f]).map_err(err)?
        }
        WeightScheme::DynamicFixedPoint { bits, granularity } => {
            let layout = layout_for(&w.shape, axis, granularity)?;
            let formats = match &layout {
                Some(l) => k.dynamic_fixed_point_per_channel(x, l, bits),
                None => k.dynamic_fixed_point(x, bits).map(|f| vec![f]),
            }
            .map_err(err)?;
            fixed(k, x, layout, &formats).map_err(err)?
        }
        WeightScheme::Kmeans {
            bits,
            granularity,
            mode,
        } => {
            let clusters = 1usize << bits;
            let layout = layout_for(&w.shape, axis, granularity)?;
            let fits = match (&layout, mode) {
                (Some(l), KMeansMode::Exact) => k.kmeans_optimal_per_channel(x, l, clusters),
                (None, KMeansMode::Exact) => k.kmeans_optimal(x, clusters).map(|f| vec![f]),
                (Some(l), KMeansMode::Fast) => l
                    .gather(x)
                    .and_then(|chs| chs.iter().map(|v| k.kmeans_fast(v, clusters)).collect()),
                (None, KMeansMode::Fast) => k.kmeans_fast(x, clusters).map(|f| vec![f]),
            }
            .map_err(err)?;
            let mut idx = vec![0u8; n];
            let mut d = vec![0f32; n];
            for (s, e, c) in runs(&layout, n) {
                let cb = &fits[c].codebook;
                k.kmeans_assign(&x[s..e], cb, &mut idx[s..e]).map_err(err)?;
                k.kmeans_decode(&idx[s..e], cb, &mut d[s..e]).map_err(err)?;
            }
            // Every codebook is stored with exactly `clusters` entries (a channel with fewer
            // distinct values than clusters pads with its last centroid).
            let mut codebooks = Vec::with_capacity(fits.len() * clusters);
            for f in &fits {
                let c = f.codebook.centroids();
                codebooks.extend((0..clusters).map(|i| c[i.min(c.len() - 1)]));
            }
            let packed = pack_codes(&idx, 0, bits).map_err(err)?;
            (
                Stored::KMeans {
                    bits,
                    packed,
                    codebooks,
                    clusters,
                },
                d,
            )
        }
    };
    Ok(QuantizedWeight {
        name: name.to_string(),
        shape: w.shape.clone(),
        scheme: scheme.clone(),
        stored,
        dequantized,
    })
}

fn fixed(
    k: &Kernels,
    x: &[f32],
    layout: Option<ChannelLayout>,
    formats: &[FixedPointFormat],
) -> Result<(Stored, Vec<f32>), quantbench_kernels::KernelError> {
    let n = x.len();
    let mut q = vec![0i8; n];
    let mut d = vec![0f32; n];
    for (s, e, c) in runs(&layout, n) {
        k.fixed_quantize(&x[s..e], &formats[c], Rounding::NearestEven, &mut q[s..e])?;
        k.fixed_dequantize(&q[s..e], &formats[c], &mut d[s..e])?;
    }
    let bits = formats[0].total_bits();
    let (qmin, _) = formats[0].qrange();
    let packed = pack_codes(&q, qmin, bits)?;
    let frac_bits = formats
        .iter()
        .map(|f| f.frac_bits().clamp(-128, 127) as i8)
        .collect();
    Ok((
        Stored::Fixed {
            bits,
            packed,
            frac_bits,
        },
        d,
    ))
}

/// Which weight layers a hybrid selector matches.
fn selector_matches(
    sel: &str,
    index: usize,
    count: usize,
    node_name: &str,
    weight_name: &str,
) -> bool {
    match sel {
        "first" => index == 0,
        "last" => index + 1 == count,
        s => match s.parse::<usize>() {
            Ok(i) => i == index,
            Err(_) => node_name.contains(s) || weight_name.contains(s),
        },
    }
}

/// Quantizes every weight layer of `graph` as `cell` says.
pub fn quantize_model(k: &Kernels, graph: &Graph, cell: &Cell) -> Result<QuantizedModel, String> {
    let start = std::time::Instant::now();
    let refs = graph.weights();
    for (sels, _) in &cell.overrides {
        for s in sels {
            let hit = refs.iter().enumerate().any(|(i, r)| {
                selector_matches(
                    s,
                    i,
                    refs.len(),
                    &graph.nodes[r.node].name,
                    &graph.value_names[r.value],
                )
            });
            if !hit {
                return Err(format!(
                    "hybrid override layer selector '{s}' matches no weight layer of model '{}'",
                    cell.model
                ));
            }
        }
    }
    let mut weights = Vec::with_capacity(refs.len());
    let (mut signal, mut noise) = (0f64, 0f64);
    for (i, r) in refs.iter().enumerate() {
        let name = &graph.value_names[r.value];
        let node_name = &graph.nodes[r.node].name;
        let scheme = cell
            .overrides
            .iter()
            .find(|(sels, _)| {
                sels.iter()
                    .any(|s| selector_matches(s, i, refs.len(), node_name, name))
            })
            .map_or(&cell.weights, |(_, s)| s);
        let w = graph.constants[r.value]
            .as_ref()
            .expect("weights() returns constants");
        let qw = quantize_weight(k, name, w, r.out_axis, scheme)?;
        for (&a, &b) in w.data.iter().zip(&qw.dequantized) {
            signal += a as f64 * a as f64;
            noise += (a as f64 - b as f64).powi(2);
        }
        weights.push((*r, qw));
    }
    let sqnr_db = (noise > 0.0).then(|| 10.0 * (signal / noise).log10());
    Ok(QuantizedModel {
        weights,
        sqnr_db,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The graph with every quantized weight replaced by its dequantized values.
pub fn simulated_graph(graph: &Graph, qm: &QuantizedModel) -> Result<Graph, String> {
    let mut g = graph.clone();
    for (r, qw) in &qm.weights {
        g.set_constant(r.value, qw.dequantized.clone())?;
    }
    Ok(g)
}

/// Writes the model's stored form as safetensors: for each quantized weight `<name>.codes`
/// (U8, packed LSB-first), `<name>.scale` (F32) and `<name>.zero_point` (I8) | `<name>.frac_bits`
/// (I8) | `<name>.codebook` (F32, [channels, clusters]); every other constant as F32; the
/// scheme of every weight in the metadata. Written to a temporary file and renamed.
pub fn write_safetensors(path: &Path, graph: &Graph, qm: &QuantizedModel) -> Result<u64, String> {
    let bytes = safetensors_bytes(graph, qm).map_err(|e| format!("{}: {e}", path.display()))?;
    crate::write_atomic(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// Per value id: whether some node reads it.
fn read_by_nodes(graph: &Graph) -> Vec<bool> {
    let mut used = vec![false; graph.value_names.len()];
    for n in &graph.nodes {
        for &v in &n.inputs {
            used[v] = true;
        }
    }
    used
}

/// `graph` with every constant a node reads replaced by the fp32 tensor of the same name in
/// the safetensors file at `path`, as [`write_safetensors`] writes an fp32 cell (a fine-tuned
/// fp32 control, for example). A missing tensor, or one of another type or shape, is an error
/// naming the file and the tensor.
pub fn read_fp32_model(graph: &Graph, path: &Path) -> Result<Graph, String> {
    use safetensors::tensor::Dtype;
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{}: not a safetensors file: {e}", path.display()))?;
    let mut g = graph.clone();
    for (v, _) in read_by_nodes(&g).iter().enumerate().filter(|(_, &u)| u) {
        let Some(shape) = g.constants[v].as_ref().map(|t| t.shape.clone()) else {
            continue;
        };
        let name = &g.value_names[v];
        let t = st.tensor(name).map_err(|_| {
            format!(
                "{}: no tensor '{name}' (expected the fp32 weights of every layer)",
                path.display()
            )
        })?;
        if t.dtype() != Dtype::F32 || t.shape() != shape.as_slice() {
            return Err(format!(
                "{}: tensor '{name}' is {:?} {:?}, expected F32 {shape:?}",
                path.display(),
                t.dtype(),
                t.shape()
            ));
        }
        let data = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        g.set_constant(v, data)?;
    }
    Ok(g)
}

/// Bytes of a weight's stored form: codes plus parameters (scales, zero points, fractional
/// bits, codebooks), as [`write_safetensors`] writes them.
pub fn stored_bytes(s: &Stored) -> u64 {
    (match s {
        Stored::Float(v) => 4 * v.len(),
        Stored::Linear {
            packed,
            scales,
            zero_points,
            ..
        } => packed.len() + 4 * scales.len() + zero_points.len(),
        Stored::Fixed {
            packed, frac_bits, ..
        } => packed.len() + frac_bits.len(),
        Stored::KMeans {
            packed, codebooks, ..
        } => packed.len() + 4 * codebooks.len(),
    }) as u64
}

/// The safetensors file of [`write_safetensors`], in memory.
pub fn safetensors_bytes(graph: &Graph, qm: &QuantizedModel) -> Result<Vec<u8>, String> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut meta = BTreeMap::new();
    let quantized: std::collections::HashSet<usize> =
        qm.weights.iter().map(|(r, _)| r.value).collect();
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for (r, qw) in &qm.weights {
        let name = &graph.value_names[r.value];
        let scheme =
            serde_json::json!({ "scheme": qw.scheme, "shape": qw.shape, "axis": r.out_axis });
        meta.insert(name.clone(), scheme.to_string());
        match &qw.stored {
            Stored::Float(v) => {
                owned.push((name.clone(), Dtype::F32, qw.shape.clone(), f32_bytes(v)))
            }
            Stored::Linear {
                packed,
                scales,
                zero_points,
                ..
            } => {
                owned.push((
                    format!("{name}.codes"),
                    Dtype::U8,
                    vec![packed.len()],
                    packed.clone(),
                ));
                owned.push((
                    format!("{name}.scale"),
                    Dtype::F32,
                    vec![scales.len()],
                    f32_bytes(scales),
                ));
                let zp: Vec<u8> = zero_points.iter().map(|&z| z as u8).collect();
                owned.push((format!("{name}.zero_point"), Dtype::I8, vec![zp.len()], zp));
            }
            Stored::Fixed {
                packed, frac_bits, ..
            } => {
                owned.push((
                    format!("{name}.codes"),
                    Dtype::U8,
                    vec![packed.len()],
                    packed.clone(),
                ));
                let fb: Vec<u8> = frac_bits.iter().map(|&z| z as u8).collect();
                owned.push((format!("{name}.frac_bits"), Dtype::I8, vec![fb.len()], fb));
            }
            Stored::KMeans {
                packed,
                codebooks,
                clusters,
                ..
            } => {
                owned.push((
                    format!("{name}.codes"),
                    Dtype::U8,
                    vec![packed.len()],
                    packed.clone(),
                ));
                let channels = codebooks.len() / clusters;
                owned.push((
                    format!("{name}.codebook"),
                    Dtype::F32,
                    vec![channels, *clusters],
                    f32_bytes(codebooks),
                ));
            }
        }
    }
    // Every other constant the graph reads (biases, shape parameters) in fp32.
    let used = read_by_nodes(graph);
    for (id, c) in graph.constants.iter().enumerate() {
        if let Some(t) = c {
            if used[id] && !quantized.contains(&id) {
                owned.push((
                    graph.value_names[id].clone(),
                    Dtype::F32,
                    t.shape.clone(),
                    f32_bytes(&t.data),
                ));
            }
        }
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let meta: std::collections::HashMap<String, String> = meta.into_iter().collect();
    safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
}
