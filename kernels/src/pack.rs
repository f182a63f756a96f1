//! Bit-packing of b-bit codes (1 <= b <= 8) into bytes, so that a 3-bit tensor really takes
//! 3 bits per value.
//!
//! Layout: value `i` occupies stream bits `[i*b, (i+1)*b)`, least significant bit first,
//! bytes in order (the layout of ONNX's int4/uint4 and of most packed formats). The last
//! byte is zero-padded. Signed codes are stored as `code - qmin`, so every stored field is an
//! unsigned number below `2^b`.

use crate::code::Code;
use crate::error::KernelError;

/// Bytes needed for `n` values of `bits` bits.
pub fn packed_len(n: usize, bits: u32) -> usize {
    (n * bits as usize).div_ceil(8)
}

fn check_bits(bits: u32) -> Result<(), KernelError> {
    if (1..=8).contains(&bits) {
        Ok(())
    } else {
        Err(KernelError::Bits {
            bits,
            what: "bit-packing supports 1..=8 bits",
        })
    }
}

/// Packs unsigned fields (`< 2^bits`) into `out` (`packed_len(fields.len(), bits)` bytes).
pub fn pack_bits(fields: &[u8], bits: u32, out: &mut [u8]) -> Result<(), KernelError> {
    check_bits(bits)?;
    crate::error::check_len("packed output", packed_len(fields.len(), bits), out.len())?;
    let limit = 1u16 << bits;
    if let Some((i, &v)) = fields.iter().enumerate().find(|(_, &v)| v as u16 >= limit) {
        return Err(KernelError::Range {
            message: format!("value {v} at index {i} does not fit in {bits} bits"),
        });
    }
    let mut acc: u64 = 0;
    let mut filled = 0u32;
    let mut o = 0;
    for &v in fields {
        acc |= (v as u64) << filled;
        filled += bits;
        while filled >= 8 {
            out[o] = acc as u8;
            o += 1;
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out[o] = acc as u8;
    }
    Ok(())
}

/// Unpacks `out.len()` fields of `bits` bits from `packed`.
pub fn unpack_bits(packed: &[u8], bits: u32, out: &mut [u8]) -> Result<(), KernelError> {
    check_bits(bits)?;
    crate::error::check_len("packed input", packed_len(out.len(), bits), packed.len())?;
    match bits {
        // widths that divide a byte: fixed-shape loops the compiler vectorises
        1 => unpack_fixed::<1>(packed, out),
        2 => unpack_fixed::<2>(packed, out),
        4 => unpack_fixed::<4>(packed, out),
        8 => out.copy_from_slice(packed),
        _ => unpack_any(packed, bits, out),
    }
    Ok(())
}

/// Unpacks fields of any width 1..=8 through a 64-bit accumulator; lengths already checked.
fn unpack_any(packed: &[u8], bits: u32, out: &mut [u8]) {
    let mask = ((1u16 << bits) - 1) as u64;
    let mut acc: u64 = 0;
    let mut avail = 0u32;
    let mut bytes = packed.iter();
    for o in out.iter_mut() {
        while avail < bits {
            acc |= (*bytes.next().unwrap_or(&0) as u64) << avail;
            avail += 8;
        }
        *o = (acc & mask) as u8;
        acc >>= bits;
        avail -= bits;
    }
}

/// Unpacks `B`-bit fields (B divides 8); lengths already checked.
fn unpack_fixed<const B: u32>(packed: &[u8], out: &mut [u8]) {
    let per = (8 / B) as usize;
    let mask = ((1u16 << B) - 1) as u8;
    let whole = out.len() / per;
    for (chunk, &b) in out[..whole * per]
        .chunks_exact_mut(8 / B as usize)
        .zip(packed)
    {
        for (j, o) in chunk.iter_mut().enumerate() {
            *o = (b >> (j as u32 * B)) & mask;
        }
    }
    for (j, o) in out[whole * per..].iter_mut().enumerate() {
        *o = (packed[whole] >> (j as u32 * B)) & mask;
    }
}

/// Packs codes of range `[qmin, qmin + 2^bits - 1]` (stored as `code - qmin`).
pub fn pack_codes<T: Code>(codes: &[T], qmin: i32, bits: u32) -> Result<Vec<u8>, KernelError> {
    check_bits(bits)?;
    let top = qmin + (1 << bits) - 1;
    let mut fields = Vec::with_capacity(codes.len());
    for (i, c) in codes.iter().enumerate() {
        let v = c.to_i32();
        if v < qmin || v > top {
            return Err(KernelError::Range {
                message: format!("code {v} at index {i} is outside [{qmin}, {top}] ({bits} bits)"),
            });
        }
        fields.push((v - qmin) as u8);
    }
    let mut out = vec![0u8; packed_len(codes.len(), bits)];
    pack_bits(&fields, bits, &mut out)?;
    Ok(out)
}

/// Inverse of [`pack_codes`]: `n` codes.
pub fn unpack_codes<T: Code>(
    packed: &[u8],
    qmin: i32,
    bits: u32,
    n: usize,
) -> Result<Vec<T>, KernelError> {
    let mut fields = vec![0u8; n];
    unpack_bits(packed, bits, &mut fields)?;
    let top = qmin + (1 << bits) - 1;
    if qmin < T::MIN || top > T::MAX {
        return Err(KernelError::Range {
            message: format!("codes [{qmin}, {top}] do not fit {}", T::NAME),
        });
    }
    Ok(fields
        .into_iter()
        .map(|f| T::from_i32(qmin + f as i32))
        .collect())
}
