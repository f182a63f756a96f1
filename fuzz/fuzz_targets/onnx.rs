//! The ONNX importer: protobuf decoding and every graph check after it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = quantbench::model::Graph::from_bytes(data) {
        // what the runner asks of an imported graph
        let _ = g.weights();
    }
});
