//! The MJPEG splitter of `stdin:mjpeg` (concatenated JPEGs cut on their
//! markers) and the decoding of each frame it cuts.
//!
//! Contract: see `check_pipe`; besides, no more frames than start markers.
#![no_main]

use elastic_edge::source::PipeFormat;
use elastic_edge_fuzz::check_pipe;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frames = check_pipe(data, PipeFormat::Mjpeg, 1 << 20);
    let starts = data.windows(2).filter(|w| w == &[0xFF, 0xD8]).count();
    assert!(frames <= starts, "{frames} frames from {starts} start markers");
});
