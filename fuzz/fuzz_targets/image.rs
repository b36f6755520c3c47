//! Any encoded picture (PNG, JPEG, WebP, BMP, TIFF, GIF, PNM) through
//! decoding, the resize modes the exporter writes into manifests,
//! Idefics3 splitting and Qwen2-VL's dynamic resolution.
//!
//! Contract: an error is an `ImageError` of one line, never a panic; an
//! accepted picture gives exactly `3 x height x width` finite floats in
//! range, in every mode; decoding is deterministic.
#![no_main]

use elastic_edge::model::image::dynamic::{DynamicPixels, DynamicResolution};
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
    // Dynamic resolution, a small budget: the grid within it, every patch's
    // values in range, the index inputs a permutation and its inverse.
    let dynamic = DynamicResolution {
        patch_size: 14,
        merge_size: 2,
        temporal_patch_size: 2,
        window_size: 56,
        min_pixels: 784,
        max_pixels: 28 * 28 * 16,
    };
    let pre = elastic_edge::model::image::Preprocess {
        dynamic: Some(dynamic.clone()),
        ..preprocess(Resize::BicubicSmartResize, 112, 112)
    };
    let mut feed = DynamicPixels::for_spec(&dynamic);
    match pre.from_rgb8_dynamic(&rgb, &mut feed) {
        Ok(info) => {
            assert_eq!((info.width, info.height), (width, height));
            let grid = feed.grid.expect("a loaded picture has its grid");
            assert!(grid.tokens() >= 1 && grid.tokens() <= dynamic.max_tokens());
            assert_eq!(feed.pixels.len(), grid.patches() * dynamic.patch_len());
            let (low, high) = (0..3)
                .map(|c| elastic_edge_fuzz::channel_range(&pre, c))
                .fold((f32::MAX, f32::MIN), |(l, h), (a, b)| (l.min(a), h.max(b)));
            assert!(feed.pixels.iter().all(|v| v.is_finite() && (low..=high).contains(v)));
            let mut order = feed.window_index.clone();
            order.sort_unstable();
            assert!(order.iter().enumerate().all(|(i, &t)| t == i as i64));
            for (at, &token) in feed.window_index.iter().enumerate() {
                assert_eq!(feed.window_reverse[token as usize], at as i64);
            }
        }
        // A side over 200 times the other: refused, in one line.
        Err(e) => assert_one_line(&e.to_string()),
    }
});
