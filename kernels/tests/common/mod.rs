//! Shared helpers for the kernel tests: a seeded generator and data makers.
#![allow(dead_code)]

use quantbench_kernels::Isa;

/// SplitMix64: small, seeded, reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn range_i32(&mut self, lo: i32, hi: i32) -> i32 {
        lo + self.below((hi as i64 - lo as i64 + 1) as u64) as i32
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// A value of magnitude around `mag`, either sign.
    pub fn normalish(&mut self, mag: f32) -> f32 {
        let u = self.unit() * 2.0 - 1.0;
        u * mag * (1.0 + self.unit())
    }
}

/// Random data of `n` values with magnitude `mag`, sprinkled with exact ties (k + 0.5) *
/// scale and the special values when `specials` is set.
pub fn data(rng: &mut Rng, n: usize, mag: f32, scale: f32, specials: bool) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.below(16) {
            0 => (rng.range_i32(-300, 300) as f32 + 0.5) * scale,
            1 if specials => [
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                0.0,
                -0.0,
                1e-40,
                f32::MAX,
                f32::MIN,
            ][rng.below(8) as usize],
            _ => rng.normalish(mag),
        })
        .collect()
}

/// Lengths that straddle every SIMD width and tail: 0..=3*64+7 plus powers of two +-1.
pub fn lengths() -> Vec<usize> {
    let mut v: Vec<usize> = (0..=3 * 64 + 7).collect();
    for p in [8usize, 10, 12, 16] {
        v.extend([(1 << p) - 1, 1 << p, (1 << p) + 1]);
    }
    v.push(65539);
    v
}

/// Every ISA this machine can run, scalar first; prints them once so the log shows coverage.
pub fn isas() -> Vec<Isa> {
    let v = Isa::available();
    eprintln!(
        "testing ISAs: {:?}",
        v.iter().map(|i| i.name()).collect::<Vec<_>>()
    );
    v
}

pub fn bits_eq(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Where ../shared lives: `QUANTBENCH_DATA`, else `<workspace>/../shared`.
pub fn data_root() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("QUANTBENCH_DATA") {
        return p.into();
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

/// One tensor of a conformance case.json (values as f64, `bits` for floating types).
pub struct Tensor {
    pub dtype: String,
    pub dims: Vec<usize>,
    pub values: Vec<f64>,
    pub bits: Vec<u32>,
}

/// Reads a tensor of case.json.
pub fn tensor(v: &serde_json::Value) -> Tensor {
    let num = |x: &serde_json::Value| match x {
        serde_json::Value::Number(n) => n.as_f64().unwrap(),
        serde_json::Value::String(s) => s.parse::<f64>().unwrap(),
        other => panic!("unexpected value {other}"),
    };
    Tensor {
        dtype: v["elem_type_name"].as_str().unwrap().to_string(),
        dims: v["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect(),
        values: v["values"].as_array().unwrap().iter().map(num).collect(),
        bits: v
            .get("bits")
            .and_then(|b| b.as_array())
            .map(|b| b.iter().map(|x| x.as_u64().unwrap() as u32).collect())
            .unwrap_or_default(),
    }
}
