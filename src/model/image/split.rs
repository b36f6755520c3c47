//! Idefics3 / SmolVLM image splitting: one picture becomes `rows x cols`
//! tiles of `tile x tile` plus the whole picture at `tile x tile` (the
//! global image), each normalised into the vision graph's `pixel_values`
//! layout, the tiles row by row and the global image last
//! (`[frames, 3, tile, tile]`).
//!
//! The sizes are [`super::sizing::idefics3_split`]'s; the pixels follow
//! transformers' `Idefics3ImageProcessor.preprocess` (4.57): the picture is
//! resized twice, each time from the previous 8-bit result (long side to
//! `longest_edge`, then both sides up to multiples of the tile), the tiles
//! are crops of the second result and the global image a third resize of
//! it. Each resize is PIL's, bit for bit ([`super::resample`]), so
//! `pixel_values` equals the processor's exactly on the fixtures in
//! `models/fixtures/idefics3/` (`scripts/fixtures/idefics3_fixtures.py`).
//! One difference stays: a picture with alpha has it dropped when decoded
//! (as everywhere in [`super`]), while the processor composites its resized
//! frames over white.

use std::path::Path;

use image::RgbImage;

use super::resample::{resize_rgb8, Filter};
use super::sizing::{idefics3_split, Idefics3Params, Idefics3Split};
use super::{decode_file_rgb8, decode_rgb8, ImageError, ImageInfo, Preprocess, MAX_TARGET_SIDE};
use crate::model::prompt::SplitTokens;

/// The filter of every resize of a split picture (the processor's `resample`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitResample {
    /// PIL `LANCZOS` (1), the Idefics3 processor's default.
    Lanczos,
    /// PIL `BICUBIC` (3).
    Bicubic,
    /// PIL `BILINEAR` (2).
    Bilinear,
}

impl SplitResample {
    fn filter(self) -> Filter {
        match self {
            SplitResample::Lanczos => Filter::Lanczos,
            SplitResample::Bicubic => Filter::Bicubic,
            SplitResample::Bilinear => Filter::Bilinear,
        }
    }
}

/// The manifest's `vision.split` object: the processor's splitting settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    /// `size.longest_edge`: the picture's long side is brought to this first.
    pub longest_edge: u32,
    /// `max_image_size.longest_edge`: the side of a tile and of the global
    /// image (the vision graph's input size).
    pub tile: u32,
    pub resample: SplitResample,
    /// The marker tokens the prompt writes around the tiles.
    pub tokens: SplitTokens,
    /// `do_image_splitting`: false keeps only the global image, brought to
    /// the tile's size through the same two resizes as the processor's
    /// (long side first, then the square).
    #[serde(default = "splitting_on")]
    pub splitting: bool,
}

fn splitting_on() -> bool {
    true
}

/// The most frames (tiles plus the global image) a split may make: 64 x 64
/// tiles would be far past any real setting (SmolVLM: 4 x 4).
pub const MAX_FRAMES: u32 = 4097;

/// What one picture became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPicture {
    pub info: ImageInfo,
    /// Tile rows and columns; both 0 when the picture is its global image alone.
    pub rows: usize,
    pub cols: usize,
    /// Frames written: `rows * cols` tiles plus the global image.
    pub frames: usize,
}

impl SplitSpec {
    /// The settings must fit the vision graph: tiles of its input size.
    pub fn validate(&self, pre: &Preprocess) -> Result<(), ImageError> {
        let bad = |m: String| Err(ImageError::Config(m));
        if self.tile == 0 || self.tile != pre.width || self.tile != pre.height {
            return bad(format!(
                "split.tile {} must be the vision input's size {}x{}",
                self.tile, pre.width, pre.height
            ));
        }
        if self.longest_edge == 0 || self.longest_edge > MAX_TARGET_SIDE {
            return bad(format!(
                "split.longest_edge {} must be between 1 and {MAX_TARGET_SIDE}",
                self.longest_edge
            ));
        }
        if self.max_frames() > MAX_FRAMES {
            return bad(format!(
                "split.longest_edge {} over tiles of {} makes up to {} frames a picture, more than {MAX_FRAMES}",
                self.longest_edge,
                self.tile,
                self.max_frames()
            ));
        }
        Ok(())
    }

    /// The most frames a picture can make: the long side becomes
    /// `longest_edge` (at most 4096), so neither side passes
    /// `ceil(longest_edge / tile)` tiles.
    pub fn max_frames(&self) -> u32 {
        if !self.splitting {
            return 1;
        }
        let side = self.longest_edge.div_ceil(self.tile.max(1));
        side.saturating_mul(side).saturating_add(1)
    }

    /// The sizes for a `width x height` picture.
    pub fn plan(&self, width: u32, height: u32) -> Result<Idefics3Split, ImageError> {
        let params = Idefics3Params {
            longest_edge: Some(self.longest_edge),
            tile: self.tile,
            splitting: self.splitting,
            // Sizes only: the prompt counts the tokens.
            image_seq_len: 1,
        };
        // Decoding refuses empty pictures and `validate` bounds the
        // settings, so this fails only on settings that were not validated.
        idefics3_split(height, width, &params).map_err(|e| ImageError::Config(e.to_string()))
    }

    /// Decodes `path` and writes its frames into `out` (resized to fit).
    pub fn load_file(&self, pre: &Preprocess, path: &Path, out: &mut Vec<f32>) -> Result<SplitPicture, ImageError> {
        self.check(pre)?;
        let (rgb, format) = decode_file_rgb8(path, pre.max_pixels)?;
        self.split(pre, &rgb, Some(format), out)
    }

    /// As [`Self::load_file`], from an encoded picture in memory.
    pub fn load_bytes(&self, pre: &Preprocess, bytes: &[u8], out: &mut Vec<f32>) -> Result<SplitPicture, ImageError> {
        self.check(pre)?;
        let name = "(in-memory image)";
        if bytes.is_empty() {
            return Err(ImageError::Empty { input: name.into() });
        }
        let (rgb, format) = decode_rgb8(std::io::Cursor::new(bytes), name, pre.max_pixels)?;
        self.split(pre, &rgb, Some(format), out)
    }

    /// As [`Self::load_file`], from an RGB8 frame (no orientation applied).
    pub fn from_rgb8(
        &self,
        pre: &Preprocess,
        image: &RgbImage,
        out: &mut Vec<f32>,
    ) -> Result<SplitPicture, ImageError> {
        self.check(pre)?;
        pre.check_frame(image)?;
        self.split(pre, image, None, out)
    }

    fn check(&self, pre: &Preprocess) -> Result<(), ImageError> {
        pre.validate()?;
        self.validate(pre)
    }

    fn split(
        &self,
        pre: &Preprocess,
        rgb: &RgbImage,
        format: Option<&'static str>,
        out: &mut Vec<f32>,
    ) -> Result<SplitPicture, ImageError> {
        let (width, height) = rgb.dimensions();
        let plan = self.plan(width, height)?;
        let filter = self.resample.filter();
        let tile = self.tile as usize;
        let frame_len = 3 * tile * tile;
        // Each resize reads the previous 8-bit result, as the processor's do.
        let (rh, rw) = (plan.resized.0 as usize, plan.resized.1 as usize);
        let first = resize_rgb8(rgb.as_raw(), width as usize, height as usize, rw, rh, filter);
        let (eh, ew) = (plan.encoder_size.0 as usize, plan.encoder_size.1 as usize);
        let encoder = resize_rgb8(&first, rw, rh, ew, eh, filter);
        let (rows, cols) = (plan.rows as usize, plan.cols as usize);
        let frames = rows * cols + 1;
        out.clear();
        out.resize(frames * frame_len, 0.0);
        let mut frame = out.chunks_exact_mut(frame_len);
        let mut crop = vec![0u8; frame_len];
        for r in 0..rows {
            for c in 0..cols {
                for (y, line) in crop.chunks_exact_mut(tile * 3).enumerate() {
                    let start = ((r * tile + y) * ew + c * tile) * 3;
                    line.copy_from_slice(&encoder[start..start + tile * 3]);
                }
                // Invariant: `out` holds `frames` frames, one per tile and the global one.
                if let Some(dst) = frame.next() {
                    pre.normalize(&crop, dst);
                }
            }
        }
        // Not split, the picture is already one tile (both sides are
        // multiples of the tile, neither over it); the resize is then the identity.
        let global = resize_rgb8(&encoder, ew, eh, tile, tile, filter);
        if let Some(dst) = frame.next() {
            pre.normalize(&global, dst);
        }
        Ok(SplitPicture {
            info: ImageInfo { width, height, format },
            rows,
            cols,
            frames,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::image::{Resize, DEFAULT_MAX_PIXELS};
    use serde_json::Value;
    use sha2::{Digest, Sha256};
    use std::path::PathBuf;

    fn repo(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    fn expected() -> Value {
        let text = std::fs::read_to_string(repo("models/fixtures/idefics3/expected.json")).expect("expected.json");
        serde_json::from_str(&text).expect("fixture JSON")
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn tokens() -> SplitTokens {
        SplitTokens {
            fake_image: "<fake_token_around_image>".into(),
            row_col: "<row_{r}_col_{c}>".into(),
            global_image: "<global-img>".into(),
            image: "<image>".into(),
        }
    }

    /// The tiny self-test model's settings (`SETTINGS` in the generator).
    fn tiny() -> (SplitSpec, Preprocess) {
        let spec = SplitSpec {
            longest_edge: 96,
            tile: 32,
            resample: SplitResample::Lanczos,
            tokens: tokens(),
            splitting: true,
        };
        let pre = Preprocess {
            width: 32,
            height: 32,
            mean: [0.5; 3],
            std: [0.5; 3],
            rescale: 1.0 / 255.0,
            resize: Resize::BilinearSquash,
            max_pixels: DEFAULT_MAX_PIXELS,
            dynamic: None,
        };
        (spec, pre)
    }

    #[test]
    fn unsplit_pixel_values_equal_the_hf_processor_bit_for_bit() {
        let fx = expected();
        let (split, pre) = tiny();
        let spec = SplitSpec {
            splitting: false,
            ..split
        };
        let dir = repo("models/fixtures/idefics3");
        let cases = fx["no_splitting"].as_array().expect("no_splitting");
        assert_eq!(cases.len(), 3);
        let mut out = Vec::new();
        for case in cases {
            let name = case["name"].as_str().expect("name");
            let got = spec
                .load_file(&pre, &dir.join(case["picture"].as_str().expect("picture")), &mut out)
                .expect("global image");
            assert_eq!((got.rows, got.cols, got.frames), (0, 0, 1), "{name}");
            let want =
                crate::model::image::read_f32_fixture(&dir.join(case["pixel_values"]["file"].as_str().expect("file")));
            assert_eq!(out.len(), want.len(), "{name}");
            let differ = out
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differ, 0, "{name}: {differ} values differ");
        }
    }

    #[test]
    fn split_pixel_values_equal_the_hf_processor_bit_for_bit() {
        let fx = expected();
        let (spec, pre) = tiny();
        let mut out = Vec::new();
        let pictures = fx["pictures"].as_array().expect("pictures");
        assert_eq!(pictures.len(), 3);
        for case in pictures {
            let name = case["name"].as_str().expect("name");
            let dir = repo("models/fixtures/idefics3");
            let got = spec
                .load_file(&pre, &dir.join(case["picture"].as_str().expect("picture")), &mut out)
                .expect("split");
            assert_eq!(
                (got.rows, got.cols, got.frames),
                (
                    case["rows"].as_u64().expect("rows") as usize,
                    case["cols"].as_u64().expect("cols") as usize,
                    case["frames"].as_u64().expect("frames") as usize
                ),
                "{name}"
            );
            let want =
                crate::model::image::read_f32_fixture(&dir.join(case["pixel_values"]["file"].as_str().expect("file")));
            assert_eq!(out.len(), want.len(), "{name}");
            let max = out.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let differ = out
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            eprintln!(
                "{name}: {} frames, max |diff| {max}, {differ} values differ",
                got.frames
            );
            // Every step is integer or the processor's own f32 arithmetic: exact.
            assert_eq!(differ, 0, "{name}: max |diff| {max}");
            let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert_eq!(
                hex(&Sha256::digest(&bytes)),
                case["pixel_values"]["sha256"].as_str().expect("sha"),
                "{name}"
            );
            for s in case["pixel_values"]["samples"].as_array().expect("samples") {
                let i = s[0].as_u64().expect("i") as usize;
                assert_eq!(out[i], s[1].as_f64().expect("v") as f32, "{name}[{i}]");
            }
        }
    }

    #[test]
    fn lanczos_resizes_equal_pil() {
        let fx = expected();
        let cases = fx["lanczos"].as_array().expect("lanczos");
        assert!(cases.len() >= 6);
        for case in cases {
            let source = case["source"].as_str().expect("source");
            let (rgb, _) = decode_file_rgb8(&repo(source), DEFAULT_MAX_PIXELS).expect("decode");
            let (w, h) = (
                case["width"].as_u64().expect("w") as usize,
                case["height"].as_u64().expect("h") as usize,
            );
            let (sw, sh) = (rgb.width() as usize, rgb.height() as usize);
            let got = resize_rgb8(rgb.as_raw(), sw, sh, w, h, Filter::Lanczos);
            for s in case["samples_x_y_r_g_b"].as_array().expect("samples") {
                let v: Vec<usize> = s
                    .as_array()
                    .expect("s")
                    .iter()
                    .map(|x| x.as_u64().expect("n") as usize)
                    .collect();
                let i = (v[1] * w + v[0]) * 3;
                let want = [v[2] as u8, v[3] as u8, v[4] as u8];
                assert_eq!(got[i..i + 3], want, "{source} -> {w}x{h} at ({}, {})", v[0], v[1]);
            }
            assert_eq!(
                hex(&Sha256::digest(&got)),
                case["sha256"].as_str().expect("sha"),
                "{source} -> {w}x{h}"
            );
        }
    }

    #[test]
    fn a_picture_that_fits_one_tile_is_its_global_image_alone() {
        let (mut spec, pre) = tiny();
        spec.longest_edge = 32;
        let img = RgbImage::from_fn(45, 17, |x, y| image::Rgb([(x * 5) as u8, (y * 9) as u8, 77]));
        let mut out = Vec::new();
        let got = spec.from_rgb8(&pre, &img, &mut out).expect("split");
        assert_eq!((got.rows, got.cols, got.frames), (0, 0, 1));
        assert_eq!(out.len(), 3 * 32 * 32);
        // Long side 32, short side 12, then up to 32 x 32: two resizes, no third.
        let first = resize_rgb8(img.as_raw(), 45, 17, 32, 12, Filter::Lanczos);
        let second = resize_rgb8(&first, 32, 12, 32, 32, Filter::Lanczos);
        let mut want = vec![0f32; 3 * 32 * 32];
        pre.normalize(&second, &mut want);
        assert_eq!(out, want);
    }

    #[test]
    fn extreme_sizes_split_within_bounds() {
        let (spec, pre) = tiny();
        let mut out = Vec::new();
        // (width, height, rows, cols): sizes from image::sizing's rules.
        for (w, h, rows, cols) in [
            (1, 1, 3, 3),
            (300, 1, 1, 3),
            (1, 300, 3, 1),
            (4000, 7, 1, 3),
            (97, 96, 3, 3),
        ] {
            let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x % 251) as u8, (y % 241) as u8, 9]));
            let got = spec.from_rgb8(&pre, &img, &mut out).expect("split");
            assert_eq!((got.rows, got.cols), (rows, cols), "{w}x{h}");
            assert_eq!(out.len(), got.frames * pre.output_len(), "{w}x{h}");
            assert!(out.iter().all(|v| (-1.0..=1.0).contains(v)), "{w}x{h}");
        }
    }

    #[test]
    fn bad_pictures_and_settings_are_one_line_errors() {
        let (spec, pre) = tiny();
        let small_cap = Preprocess {
            max_pixels: 1000,
            ..pre.clone()
        };
        let path = repo("models/fixtures/idefics3/chelsea-crop-61x93.png");
        let mut out = Vec::new();
        let e = spec.load_file(&small_cap, &path, &mut out).expect_err("over the cap");
        let text = e.to_string();
        assert!(matches!(e, ImageError::TooLarge { .. }), "{text}");
        assert!(
            text.contains("61x93 = 5673 pixels, more than the limit of 1000") && !text.contains('\n'),
            "{text}"
        );
        let frame = RgbImage::new(40, 30);
        assert!(matches!(
            spec.from_rgb8(&small_cap, &frame, &mut out),
            Err(ImageError::TooLarge { .. })
        ));
        assert!(matches!(
            spec.load_bytes(&pre, &[], &mut out),
            Err(ImageError::Empty { .. })
        ));
        let wrong_tile = SplitSpec {
            tile: 16,
            ..spec.clone()
        };
        assert!(matches!(wrong_tile.validate(&pre), Err(ImageError::Config(_))));
        let too_many = SplitSpec {
            longest_edge: 4096,
            ..spec.clone()
        };
        let e = too_many.validate(&pre).expect_err("frames");
        assert!(e.to_string().contains("16385 frames"), "{e}");
        assert_eq!(spec.max_frames(), 10);
    }

    #[test]
    fn the_manifest_object_deserialises() {
        let v = serde_json::json!({
            "longest_edge": 1536, "tile": 384, "resample": "lanczos",
            "tokens": {"fake_image": "<fake_token_around_image>", "row_col": "<row_{r}_col_{c}>",
                       "global_image": "<global-img>", "image": "<image>"}
        });
        let spec: SplitSpec = serde_json::from_value(v.clone()).expect("split");
        assert_eq!(
            (spec.longest_edge, spec.tile, spec.resample),
            (1536, 384, SplitResample::Lanczos)
        );
        assert_eq!(spec.max_frames(), 17);
        let mut extra = v;
        extra["extra"] = Value::from(1);
        assert!(serde_json::from_value::<SplitSpec>(extra).is_err());
    }
}
