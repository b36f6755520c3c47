//! Any encoded picture (PNG, JPEG, WebP, BMP, TIFF, GIF, PNM) through
//! decoding, the resize modes the exporter writes into manifests and
//! Idefics3 splitting.
//!
//! Contract: an error is an `ImageError` of one line, never a panic; an
//! accepted picture gives exactly `3 x height x width` finite floats in
//! range, in every mode; decoding is deterministic.
#![no_main]

use elastic_edge::model::image::split::{SplitResample, SplitSpec};
use elastic_edge::model::image::{decode_rgb8, Resize};
use elastic_edge::model::prompt::SplitTokens;
use elastic_edge_fuzz::{assert_one_line, check_load_bytes, check_pixel_values, preprocess};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Non-square, so width and height cannot be swapped unnoticed.
    let squash = preprocess(Resize::BilinearSquash, 12, 8);
    let Some((width, height)) = check_load_bytes(&squash, data) else {
        return;
    };
    let (rgb, _) = decode_rgb8(std::io::Cursor::new(data), "fuzz", squash.max_pixels)
        .expect("the same bytes decoded once and failed the second time");
    assert_eq!(
        rgb.dimensions(),
        (width, height),
        "two decodes of the same bytes differ in size"
    );
    for pre in [
        preprocess(Resize::BicubicShortestEdgeCenterCrop, 10, 10),
        preprocess(Resize::BicubicSquash, 5, 9),
    ] {
        let mut out = vec![f32::NAN; pre.output_len()];
        match pre.from_rgb8(&rgb, &mut out) {
            Ok(info) => assert_eq!((info.width, info.height), (width, height)),
            Err(e) => {
                assert_one_line(&e.to_string());
                panic!("a decoded {width}x{height} picture refused by {:?}: {e}", pre.resize);
            }
        }
        check_pixel_values(&pre, &out);
    }
    // Tiles of 8 from a long side of 24: up to 3 x 3 tiles and the global image.
    let pre = preprocess(Resize::LanczosSquash, 8, 8);
    let split = SplitSpec {
        longest_edge: 24,
        tile: 8,
        resample: SplitResample::Lanczos,
        tokens: SplitTokens {
            fake_image: "<fake_token_around_image>".into(),
            row_col: "<row_{r}_col_{c}>".into(),
            global_image: "<global-img>".into(),
            image: "<image>".into(),
        },
        splitting: true,
    };
    let mut out = Vec::new();
    match split.from_rgb8(&pre, &rgb, &mut out) {
        Ok(picture) => {
            assert_eq!((picture.info.width, picture.info.height), (width, height));
            assert!(picture.frames <= split.max_frames() as usize);
            assert_eq!(picture.frames, picture.rows * picture.cols + 1);
            assert_eq!(out.len(), picture.frames * pre.output_len());
            for frame in out.chunks_exact(pre.output_len()) {
                check_pixel_values(&pre, frame);
            }
        }
        Err(e) => {
            assert_one_line(&e.to_string());
            panic!("a decoded {width}x{height} picture refused by splitting: {e}");
        }
    }
});
