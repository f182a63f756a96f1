//! The MNIST IDX reader: the first byte splits the input into the image and the label file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let at = rest.len() * cut as usize / 255;
    let (images, labels) = rest.split_at(at);
    if let Ok(d) = quantbench::data::parse_mnist(images, labels, Path::new("i"), Path::new("l")) {
        // the parsed set must be self-consistent
        let per: usize = d.image_shape.iter().product();
        assert_eq!(d.pixels.len(), d.labels.len() * per);
    }
});
