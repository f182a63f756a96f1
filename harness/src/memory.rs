//! The memory check of `quantbench run`: before loading anything big, the run's peak memory is
//! estimated and compared with a limit (`--max-memory`, default the machine's available
//! memory), so that a data set or model that cannot fit is refused with the numbers instead of
//! ending in the OOM killer.
//!
//! The estimate (an upper bound by construction, except for the allocator's overhead):
//! - data: the evaluation and calibration images as u8 (from the files' sizes, the gzip
//!   trailer for .gz, capped by `data.limit` / `calibration.samples`);
//! - models: 4x each ONNX file (the graph, a cell's quantized copy, its fake-quant or int8
//!   executable form, and the packed weights of the fast paths);
//! - activations: the bytes of every tensor one forward pass of one image produces (measured
//!   on the model, an upper bound on what is alive at once) x batch x threads, plus the f32
//!   input batches.

use std::path::Path;

use crate::data::{DatasetKind, Split};
use crate::engine::{EdgeHook, Engine};
use crate::model::{Graph, Tensor};

/// Parses `512M`, `8G`, `1.5GiB`, `2048` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 512M, 8G)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use K, M, G or T)")),
    };
    let bytes = v * mult as f64;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("'{s}' is not a size >= 1 byte"));
    }
    Ok(bytes as u64)
}

/// `MemAvailable` of /proc/meminfo, if readable.
pub fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
}

/// Bytes of a file once unpacked: its size, or the gzip trailer's ISIZE for `.gz`.
fn unpacked_size(path: &Path) -> Option<u64> {
    let len = std::fs::metadata(path).ok()?.len();
    if path.extension().is_some_and(|e| e == "gz") && len >= 18 {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(path).ok()?;
        f.seek(SeekFrom::End(-4)).ok()?;
        let mut b = [0u8; 4];
        f.read_exact(&mut b).ok()?;
        return Some(u32::from_le_bytes(b) as u64);
    }
    Some(len)
}

/// Upper bound on the u8 pixel bytes of `images` images of a split (all of them: `None`).
pub fn dataset_bytes(root: &Path, kind: DatasetKind, split: Split, images: Option<usize>) -> u64 {
    let (files, per_image): (Vec<std::path::PathBuf>, u64) = match kind {
        DatasetKind::Cifar10 => {
            let d = root.join("data/cifar10-jpeg");
            let f = match split {
                Split::Test => vec![d.join("test_batch.bin")],
                Split::Train if d.join("train_10k.bin").is_file() => vec![d.join("train_10k.bin")],
                Split::Train => (1..=5)
                    .map(|i| d.join(format!("data_batch_{i}.bin")))
                    .collect(),
            };
            (f, 3072)
        }
        DatasetKind::Mnist => {
            let d = root.join("data/mnist");
            let p = match split {
                Split::Test => "t10k",
                Split::Train => "train",
            };
            let base = d.join(format!("{p}-images-idx3-ubyte"));
            let gz = d.join(format!("{p}-images-idx3-ubyte.gz"));
            (vec![if base.is_file() { base } else { gz }], 784)
        }
    };
    let total: u64 = files.iter().filter_map(|f| unpacked_size(f)).sum();
    match images {
        Some(n) => total.min(n as u64 * per_image),
        None => total,
    }
}

struct SumBytes(std::sync::atomic::AtomicU64);

impl EdgeHook for SumBytes {
    fn on_value(&self, _value: usize, tensor: &mut Tensor) {
        self.0.fetch_add(
            4 * tensor.data.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// Bytes of every tensor one forward pass of one (zero) image produces, input included.
pub fn activation_bytes_per_image(graph: &Graph, image_shape: [usize; 3]) -> Result<u64, String> {
    let [c, h, w] = image_shape;
    let input = Tensor::new(vec![1, c, h, w], vec![0.0; c * h * w]);
    let hook = SumBytes(Default::default());
    Engine::new(graph).run(input, Some(&hook))?;
    Ok(hook.0.into_inner())
}

/// One part of the estimate, for the message.
pub struct Part {
    pub what: String,
    pub bytes: u64,
}

/// Fails when the parts add up to more than `limit`; `source` says where the limit came from.
pub fn check(parts: &[Part], limit: u64, source: &str) -> Result<u64, String> {
    let total: u64 = parts.iter().map(|p| p.bytes).sum();
    if total > limit {
        let detail: Vec<String> = parts
            .iter()
            .map(|p| format!("{} {}", p.what, mib(p.bytes)))
            .collect();
        return Err(format!(
            "estimated peak memory {} ({}) exceeds the limit of {} ({source}); lower data.limit, data.batch, calibration.samples or --threads, or raise --max-memory",
            mib(total),
            detail.join(", "),
            mib(limit)
        ));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_reject_nonsense() {
        assert_eq!(parse_size("2048").unwrap(), 2048);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size(" 64 kb ").unwrap(), 64 << 10);
        for bad in ["", "G", "-1G", "12Q", "0", "1e3"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_check_names_every_part_and_the_limit() {
        let parts = [
            Part {
                what: "data".into(),
                bytes: 300 << 20,
            },
            Part {
                what: "models".into(),
                bytes: 100 << 20,
            },
        ];
        assert_eq!(check(&parts, 400 << 20, "x").unwrap(), 400 << 20);
        let e = check(&parts, 399 << 20, "--max-memory").unwrap_err();
        assert!(
            e.contains("estimated peak memory 400 MiB (data 300 MiB, models 100 MiB)")
                && e.contains("limit of 399 MiB (--max-memory)"),
            "{e}"
        );
    }
}
