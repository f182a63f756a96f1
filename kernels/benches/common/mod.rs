//! Inputs shared by the benchmarks.

/// `n` deterministic values spread over [-4, 4) (the whole i8 range at scale 4/127 and
/// beyond); `seed` picks the sequence (0: the one `benches/kernels.rs` has always used).
pub fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        })
        .collect()
}
