//! The strict JPEG path: every input is made to start with a JPEG start
//! marker, so the mutations go to zune-jpeg's strict mode and our checks
//! around it (sizes, memory bound, colour spaces, EXIF orientation), through
//! the LLaVA/CLIP shortest-edge resize and centre crop.
//!
//! Contract: as `image`: one-line typed errors; an accepted JPEG fills the
//! whole `pixel_values` with finite values in range.
#![no_main]

use elastic_edge::model::image::Resize;
use elastic_edge_fuzz::{check_load_bytes, preprocess};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let crop = preprocess(Resize::BicubicShortestEdgeCenterCrop, 14, 14);
    if data.starts_with(&[0xFF, 0xD8, 0xFF]) {
        check_load_bytes(&crop, data);
    } else {
        let mut jpeg = Vec::with_capacity(data.len() + 3);
        jpeg.extend_from_slice(&[0xFF, 0xD8, 0xFF]);
        jpeg.extend_from_slice(data);
        check_load_bytes(&crop, &jpeg);
    }
});
