//! The PPM splitter of `stdin:ppm` (concatenated binary P6 images, 8 or 16
//! bits, comments in the header).
//!
//! Contract: see `check_pipe`; besides, no more frames than `P6` headers.
#![no_main]

use elastic_edge::source::PipeFormat;
use elastic_edge_fuzz::check_pipe;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frames = check_pipe(data, PipeFormat::Ppm, 1 << 16);
    let headers = data.windows(2).filter(|w| w == b"P6").count();
    assert!(frames <= headers, "{frames} frames from {headers} headers");
});
