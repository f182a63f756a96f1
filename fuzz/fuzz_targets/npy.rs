//! The .npy reader (float32 arrays).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = quantbench::npy::parse_f32(data);
});
