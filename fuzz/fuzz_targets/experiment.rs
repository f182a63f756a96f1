//! The experiment TOML: parsing, validation and the expansion into cells.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(exp) = quantbench::experiment::Experiment::parse(text, None) {
        let _ = exp.cells();
    }
});
