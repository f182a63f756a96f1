//! Reference integer GEMM: this file is the spec, bit for bit.

use super::ActCode;
use crate::code::Code;
use crate::integer_only::scalar::requantize_one;
use crate::integer_only::{Multiplier, RequantOutput};

/// `c[i][j] = bias[j] + sum_k (a[i][k] - za) * (b[k][j] - zb[j])` with wrapping i32
/// arithmetic; `a` is `[m x k]`, `b` `[k x n]`, both row-major; `zb` has 1 or `n` entries.
#[allow(clippy::too_many_arguments)]
pub fn gemm_i32<A: ActCode>(
    a: &[A],
    m: usize,
    k: usize,
    za: i32,
    b: &[i8],
    n: usize,
    zb: &[i32],
    bias: Option<&[i32]>,
    c: &mut [i32],
) {
    for i in 0..m {
        for j in 0..n {
            let zbj = if zb.len() == 1 { zb[0] } else { zb[j] };
            let mut s = bias.map_or(0i32, |bb| bb[j]);
            for kk in 0..k {
                let x = a[i * k + kk].to_i32() - za;
                let w = b[kk * n + j] as i32 - zbj;
                s = s.wrapping_add(x.wrapping_mul(w));
            }
            c[i * n + j] = s;
        }
    }
}

/// The fused epilogue on one accumulator: column `j`'s multiplier (`per_channel`) or the
/// single one, then [`requantize_one`].
pub fn requantize_element<O: Code>(acc: i32, m: Multiplier, out: &RequantOutput) -> O {
    O::from_i32(requantize_one(
        acc,
        m,
        out.zero_point(),
        out.act_min(),
        out.act_max(),
    ))
}
