//! Data sets: CIFAR-10 (official binary records) and MNIST (IDX, gzip or raw), read whole into
//! memory as u8 pixels, normalized per batch.
//!
//! Layout under the data root (`QUANTBENCH_DATA`, default `../shared`), as ../shared/README.md:
//! `data/cifar10-jpeg/{test_batch.bin, train_10k.bin | data_batch_1..5.bin}` and
//! `data/mnist/{t10k,train}-{images-idx3,labels-idx1}-ubyte[.gz]`.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::model::Tensor;

/// Which data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    Cifar10,
    Mnist,
}

impl DatasetKind {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "cifar10" => Ok(Self::Cifar10),
            "mnist" => Ok(Self::Mnist),
            other => Err(format!(
                "unknown data set '{other}' (expected cifar10 or mnist)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Cifar10 => "cifar10",
            Self::Mnist => "mnist",
        }
    }

    /// The usual preprocessing of the models this project ships experiments for: CIFAR-10 with
    /// the ImageNet mean/std the ResNet-20 checkpoint was trained with (../shared/README.md),
    /// MNIST scaled to [0, 1] (the MNIST-8 model card).
    pub fn default_normalization(self) -> Normalization {
        match self {
            Self::Cifar10 => Normalization {
                scale: 1.0 / 255.0,
                mean: vec![0.485, 0.456, 0.406],
                std: vec![0.229, 0.224, 0.225],
            },
            Self::Mnist => Normalization {
                scale: 1.0 / 255.0,
                mean: vec![0.0],
                std: vec![1.0],
            },
        }
    }
}

/// Which split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "train" => Ok(Self::Train),
            "test" => Ok(Self::Test),
            other => Err(format!("unknown split '{other}' (expected train or test)")),
        }
    }
}

/// x = (pixel * scale - mean[c]) / std[c]; one mean/std per channel (or one for all).
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Normalization {
    pub scale: f32,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalization {
    pub fn validate(&self, channels: usize) -> Result<(), String> {
        for (what, v) in [("mean", &self.mean), ("std", &self.std)] {
            if v.len() != 1 && v.len() != channels {
                return Err(format!(
                    "normalization {what} has {} values, expected 1 or {channels}",
                    v.len()
                ));
            }
        }
        if self.std.iter().any(|&s| !(s.is_finite() && s > 0.0)) || !self.scale.is_finite() {
            return Err("normalization std must be positive and scale finite".into());
        }
        Ok(())
    }
}

/// A labelled image set in memory.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub kind: DatasetKind,
    /// [channels, height, width] of one image.
    pub image_shape: [usize; 3],
    /// u8 pixels, image after image, channel planes (CHW).
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
    pub classes: usize,
    /// The files read.
    pub files: Vec<PathBuf>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Loads a split from `root` (the data root holding `data/`).
    pub fn load(root: &Path, kind: DatasetKind, split: Split) -> Result<Dataset, String> {
        match kind {
            DatasetKind::Cifar10 => load_cifar10(&root.join("data/cifar10-jpeg"), split),
            DatasetKind::Mnist => load_mnist(&root.join("data/mnist"), split),
        }
    }

    /// Keeps the first `n` images (the shared files are shuffled, so a prefix is class-balanced).
    pub fn truncate(&mut self, n: usize) {
        let per = self.image_shape.iter().product::<usize>();
        self.labels.truncate(n);
        self.pixels.truncate(n * per);
    }

    /// Images `range` as a normalized [b, c, h, w] tensor.
    pub fn batch(&self, range: std::ops::Range<usize>, norm: &Normalization) -> Tensor {
        let [c, h, w] = self.image_shape;
        let per = c * h * w;
        let src = &self.pixels[range.start * per..range.end * per];
        let mut data = Vec::with_capacity(src.len());
        for img in src.chunks_exact(per) {
            for (ch, plane) in img.chunks_exact(h * w).enumerate() {
                let mean = norm.mean[if norm.mean.len() == 1 { 0 } else { ch }];
                let inv_std = 1.0 / norm.std[if norm.std.len() == 1 { 0 } else { ch }];
                data.extend(
                    plane
                        .iter()
                        .map(|&p| (p as f32 * norm.scale - mean) * inv_std),
                );
            }
        }
        Tensor::new(vec![range.len(), c, h, w], data)
    }
}

const CIFAR_RECORD: usize = 1 + 3 * 32 * 32;

fn missing(path: &Path, how: &str) -> String {
    format!(
        "{}: not found. {how} Set QUANTBENCH_DATA (or --data) to the folder that holds data/ and models/ (../shared by default).",
        path.display()
    )
}

fn load_cifar10(dir: &Path, split: Split) -> Result<Dataset, String> {
    let how = "CIFAR-10 in the official binary layout (https://www.cs.toronto.edu/~kriz/cifar.html, 'binary version'; 3073-byte records).";
    let files: Vec<PathBuf> = match split {
        Split::Test => vec![dir.join("test_batch.bin")],
        Split::Train => {
            let subset = dir.join("train_10k.bin");
            if subset.is_file() {
                vec![subset]
            } else {
                let batches: Vec<PathBuf> = (1..=5)
                    .map(|i| dir.join(format!("data_batch_{i}.bin")))
                    .collect();
                if !batches[0].is_file() {
                    return Err(missing(&subset, how));
                }
                batches
            }
        }
    };
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                missing(f, how)
            } else {
                format!("{}: cannot read: {e}", f.display())
            }
        })?;
        parse_cifar10(&bytes, f, &mut pixels, &mut labels)?;
    }
    Ok(Dataset {
        kind: DatasetKind::Cifar10,
        image_shape: [3, 32, 32],
        pixels,
        labels,
        classes: 10,
        files,
    })
}

/// Appends the records of one CIFAR-10 binary file (`path` names it in errors).
pub fn parse_cifar10(
    bytes: &[u8],
    f: &Path,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> Result<(), String> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(CIFAR_RECORD) {
        return Err(format!(
            "{}: {} bytes is not a whole number of 3073-byte CIFAR-10 records (1 label byte + 3072 pixel bytes)",
            f.display(),
            bytes.len()
        ));
    }
    for rec in bytes.chunks_exact(CIFAR_RECORD) {
        if rec[0] > 9 {
            return Err(format!(
                "{}: label {} is outside 0..=9 (not a CIFAR-10 file?)",
                f.display(),
                rec[0]
            ));
        }
        labels.push(rec[0]);
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

fn read_maybe_gz(base: &Path, how: &str) -> Result<(PathBuf, Vec<u8>), String> {
    let gz = PathBuf::from(format!("{}.gz", base.display()));
    for (path, zipped) in [(base.to_path_buf(), false), (gz.clone(), true)] {
        if !path.is_file() {
            continue;
        }
        let raw =
            std::fs::read(&path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        if !zipped {
            return Ok((path, raw));
        }
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .take(MAX_GUNZIPPED as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| format!("{}: not a valid gzip file: {e}", path.display()))?;
        if out.len() > MAX_GUNZIPPED {
            return Err(format!(
                "{}: unpacks to more than {} MiB; an MNIST file is at most 47 MiB",
                path.display(),
                MAX_GUNZIPPED >> 20
            ));
        }
        return Ok((path, out));
    }
    Err(missing(&gz, how))
}

/// Largest gunzipped IDX file accepted (a gzip bomb is refused, not unpacked).
const MAX_GUNZIPPED: usize = 1 << 30;

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn load_mnist(dir: &Path, split: Split) -> Result<Dataset, String> {
    let how = "MNIST in IDX format (the files of http://yann.lecun.com/exdb/mnist/, gzip or raw).";
    let prefix = match split {
        Split::Test => "t10k",
        Split::Train => "train",
    };
    let (ip, images) = read_maybe_gz(&dir.join(format!("{prefix}-images-idx3-ubyte")), how)?;
    let (lp, labels) = read_maybe_gz(&dir.join(format!("{prefix}-labels-idx1-ubyte")), how)?;
    parse_mnist(&images, &labels, &ip, &lp)
}

/// An MNIST IDX pair (u8 images `[n, h, w]`, u8 labels `[n]`), already unpacked; `ip` and
/// `lp` name the files in errors.
pub fn parse_mnist(images: &[u8], labels: &[u8], ip: &Path, lp: &Path) -> Result<Dataset, String> {
    if images.len() < 16 || be_u32(images, 0) != 0x0803 {
        return Err(format!(
            "{}: not an IDX3 u8 image file (bad magic)",
            ip.display()
        ));
    }
    if labels.len() < 8 || be_u32(labels, 0) != 0x0801 {
        return Err(format!(
            "{}: not an IDX1 u8 label file (bad magic)",
            lp.display()
        ));
    }
    let (n, h, w) = (
        be_u32(images, 4) as usize,
        be_u32(images, 8) as usize,
        be_u32(images, 12) as usize,
    );
    if h == 0 || w == 0 {
        return Err(format!(
            "{}: header says images of {h}x{w}; expected both sides >= 1",
            ip.display()
        ));
    }
    let want = n
        .checked_mul(h)
        .and_then(|v| v.checked_mul(w))
        .and_then(|v| v.checked_add(16));
    if want != Some(images.len()) {
        return Err(format!(
            "{}: header says {n} images of {h}x{w} ({} bytes), the file holds {}",
            ip.display(),
            want.map_or("more than 2^64".to_string(), |b| b.to_string()),
            images.len()
        ));
    }
    let nl = be_u32(labels, 4) as usize;
    if labels.len() != 8 + nl || nl != n {
        return Err(format!(
            "{}: {nl} labels ({} bytes) for {n} images",
            lp.display(),
            labels.len()
        ));
    }
    if let Some(bad) = labels[8..].iter().find(|&&l| l > 9) {
        return Err(format!("{}: label {bad} is outside 0..=9", lp.display()));
    }
    Ok(Dataset {
        kind: DatasetKind::Mnist,
        image_shape: [1, h, w],
        pixels: images[16..].to_vec(),
        labels: labels[8..].to_vec(),
        classes: 10,
        files: vec![ip.to_path_buf(), lp.to_path_buf()],
    })
}
