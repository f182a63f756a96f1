//! The CIFAR-10 binary reader.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    if quantbench::data::parse_cifar10(data, Path::new("f"), &mut pixels, &mut labels).is_ok() {
        assert_eq!(pixels.len(), labels.len() * 3072);
    }
});
