//! Counter-based uniform noise for stochastic rounding.
//!
//! The noise for element `i` of a call is a pure function of `(seed, offset + i)`, so it does
//! not depend on the ISA, the vector width, the thread split or the chunking: every path
//! reproduces the scalar reference bit for bit. The mixer is two rounds of a 32-bit
//! xorshift-multiply finaliser (all operations exist as vector instructions on every ISA).
//! The counter is 32 bits: a stream longer than 2^32 elements repeats its noise.

/// Keys derived from a 64-bit seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoiseKey {
    pub(crate) k0: u32,
    pub(crate) k1: u32,
}

pub(crate) const M_COUNTER: u32 = 0x9E37_79B9;
pub(crate) const M1: u32 = 0x7FEB_352D;
pub(crate) const M2: u32 = 0x846C_A68B;

impl NoiseKey {
    /// Derives the two 32-bit keys from a seed (splitmix64 finaliser).
    pub fn from_seed(seed: u64) -> NoiseKey {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        NoiseKey {
            k0: z as u32,
            k1: (z >> 32) as u32,
        }
    }
}

#[inline(always)]
pub(crate) fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(M1);
    x ^= x >> 15;
    x = x.wrapping_mul(M2);
    x ^= x >> 16;
    x
}

/// 32 random bits for counter `c`.
#[inline(always)]
pub(crate) fn bits(key: NoiseKey, c: u32) -> u32 {
    mix(mix(c.wrapping_mul(M_COUNTER) ^ key.k0) ^ key.k1)
}

/// A uniform value in [0, 1) with 24 bits of resolution for counter `c`.
#[inline(always)]
pub fn uniform(key: NoiseKey, c: u32) -> f32 {
    (bits(key, c) >> 8) as f32 * (1.0 / 16_777_216.0)
}
