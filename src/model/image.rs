//! Image preprocessing: decode, orient, convert to RGB8, resize and normalise
//! into the vision graph's `pixel_values` ([1, 3, H, W] f32, NCHW).
//!
//! The result is bit-exact with the Python exporter's reference
//! (`scripts/export/common.py`: `PIL.Image.open(p).convert("RGB")`, PIL
//! `resize`, `np.float32(x) / 255.0`, `(x - mean) / std` in f32) for PNG, BMP,
//! PNM, GIF, TIFF and WebP-lossless inputs without an EXIF orientation; the
//! fixtures in `tests/data/pil_resize.json` (written by
//! `scripts/fixtures/pil_resize.py`) prove it byte for byte. Where we differ
//! from that reference, on purpose or by necessity:
//!
//! - **EXIF orientation is applied** (JPEG, WebP, TIFF): camera pictures come
//!   out upright. PIL's `Image.open` does not rotate, so the reference sees a
//!   sideways image; the fixtures use images without orientation tags.
//! - **JPEG decoding** is `zune-jpeg` (the `image` crate's decoder, run in
//!   strict mode: data cut short is an error), not libjpeg-turbo: the
//!   decoded pixels can differ by a few levels, so JPEG inputs are close
//!   to, not bit-exact with, the reference.
//! - **16-bit images** keep the high byte of each sample (`v >> 8`), which is
//!   what PIL does for 16-bit RGB, RGBA and LA PNGs. For 16-bit *grayscale*
//!   PIL clips every value above 255 to white (its `I;16` to `RGB`
//!   conversion), which destroys the picture; we keep the high byte there
//!   too.
//! - float images (32-bit TIFF) are clamped to [0, 1] and rounded to 8 bits.
//!
//! Alpha is dropped, not composited (PIL's `convert("RGB")`); gray is
//! replicated to the three channels; palette images are expanded.

pub mod dynamic;
mod resample;

/// A committed fixture's `pixel_values`: raw little-endian f32 (the
/// processors' outputs under `models/fixtures/`).
#[cfg(test)]
pub(crate) fn read_f32_fixture(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}
pub mod sizing;
pub mod split;

use std::io::{BufRead, BufReader, Cursor, Read, Seek};
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

use crate::error::one_line;
use resample::{resize_rgb8, resize_rgb8_window, Filter, Window};

/// Default cap on an input's pixel count (width x height, before resizing).
pub const DEFAULT_MAX_PIXELS: u64 = 64_000_000;

/// Largest target width or height accepted for the model input (4096 x
/// 4096 is 200 MB of `pixel_values`; vision encoders take a few hundred).
pub const MAX_TARGET_SIDE: u32 = 4096;

/// The largest `max_pixels` a manifest may set: 256 megapixels, which
/// bounds a decode at about 2 GiB.
pub const MAX_PIXELS_LIMIT: u64 = 256_000_000;

/// Bytes a decoder may use per input pixel (covers 16-bit RGBA) plus a fixed
/// allowance for its own working memory; with the default cap this bounds a
/// decode at about 0.5 GiB whatever the file's header claims.
const DECODE_BYTES_PER_PIXEL: u64 = 8;
const DECODE_SLACK_BYTES: u64 = 32 << 20;

/// How the picture is brought to the model's input size (the manifest's
/// `vision.resize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    /// `bilinear_squash`: the whole image to width x height, aspect ratio not
    /// kept, PIL `Image.BILINEAR` (antialiased).
    BilinearSquash,
    /// `bicubic_squash`: as above with PIL `Image.BICUBIC`.
    BicubicSquash,
    /// `bicubic_shortest_edge_center_crop` (LLaVA / CLIP processors): PIL
    /// bicubic resize so the shortest edge is the target size (the other edge
    /// `trunc(size * long / short)`, as `transformers` computes it), then a
    /// center crop with the offsets rounded down. Needs width == height.
    BicubicShortestEdgeCenterCrop,
    /// `lanczos_squash`: as `bilinear_squash` with PIL `Image.LANCZOS` (the
    /// Idefics3 processor's filter; a model with `vision.split` resizes by
    /// [`split`] instead).
    LanczosSquash,
    /// `bicubic_smart_resize` (Qwen2-VL, Qwen2.5-VL): the picture keeps its
    /// aspect ratio, its sides rounded to the patch grid within the pixel
    /// budget of `dynamic` ([`dynamic::DynamicResolution`]), PIL bicubic;
    /// `width x height` is then only what a square picture gets.
    BicubicSmartResize,
}

/// Everything that can go wrong turning an image into `pixel_values`.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file cannot be opened or read (missing, a directory, no permission).
    #[error("cannot read image {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// A file or buffer with no bytes.
    #[error("image {input} is empty (0 bytes)")]
    Empty { input: String },

    /// Bytes that match no image format we know.
    #[error(
        "image {input}: unrecognised format (first bytes {magic}); supported: PNG, JPEG, WebP, BMP, TIFF, GIF, PNM"
    )]
    UnknownFormat { input: String, magic: String },

    /// A format or a variant of one this build cannot decode.
    #[error("image {input}: unsupported {format} image: {reason}")]
    Unsupported {
        input: String,
        format: String,
        reason: String,
    },

    /// Truncated or corrupt data.
    #[error("image {input} is corrupt or truncated ({format}): {reason}")]
    Corrupt {
        input: String,
        format: String,
        reason: String,
    },

    /// A header with a zero width or height.
    #[error("image {input} has zero size ({width}x{height})")]
    ZeroSize { input: String, width: u32, height: u32 },

    /// More pixels than allowed, found from the header before decoding.
    #[error("image {input} is {width}x{height} = {pixels} pixels, more than the limit of {max_pixels}")]
    TooLarge {
        input: String,
        width: u32,
        height: u32,
        pixels: u64,
        max_pixels: u64,
    },

    /// The decoder would need more memory than the bound derived from `max_pixels`.
    #[error("image {input}: decoding needs more than the {limit_bytes}-byte memory limit ({reason})")]
    MemoryLimit {
        input: String,
        limit_bytes: u64,
        reason: String,
    },

    /// An output slice of the wrong length.
    #[error("pixel_values buffer holds {got} floats, but 3 x {height} x {width} = {needed} are needed")]
    OutputLength {
        got: usize,
        needed: usize,
        width: u32,
        height: u32,
    },

    /// A picture the model's resize rule cannot size (a dynamic-resolution
    /// model refuses a side over 200 times the other, as transformers does).
    #[error("the picture cannot be sized for this model: {0}")]
    Unsizable(String),

    /// A preprocessing setting that cannot work.
    #[error("invalid image preprocessing setting: {0}")]
    Config(String),
}

/// What was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Width of the original picture, after EXIF orientation.
    pub width: u32,
    /// Height of the original picture, after EXIF orientation.
    pub height: u32,
    /// The decoded format (`"png"`, `"jpeg"`, ...); `None` for raw frames.
    pub format: Option<&'static str>,
}

/// The vision input's preprocessing, as the manifest's `vision` object
/// describes it (unknown manifest fields are ignored when deserialising).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Preprocess {
    /// Model input width.
    pub width: u32,
    /// Model input height.
    pub height: u32,
    /// Per-channel (R, G, B) mean subtracted after rescaling.
    pub mean: [f32; 3],
    /// Per-channel (R, G, B) divisor applied last.
    pub std: [f32; 3],
    /// Factor from 8-bit values to the model's range (1/255). When `1/rescale`
    /// is an integer (255) the value is *divided* by it, as the reference's
    /// `x / 255.0` does (multiplying by f32(1/255) differs in the last bit for
    /// half of the 256 values); otherwise it is multiplied by `rescale`.
    pub rescale: f32,
    /// How the picture is brought to `width` x `height`.
    pub resize: Resize,
    /// Inputs with more pixels than this are refused before decoding.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// The patch grid and pixel budget of a dynamic-resolution model (with
    /// `resize` `bicubic_smart_resize`).
    #[serde(default)]
    pub dynamic: Option<dynamic::DynamicResolution>,
}

fn default_max_pixels() -> u64 {
    DEFAULT_MAX_PIXELS
}

impl Preprocess {
    /// Number of floats in `pixel_values`: 3 x height x width.
    pub fn output_len(&self) -> usize {
        3 * self.width as usize * self.height as usize
    }

    /// Checks the settings (called by every `load_*`).
    pub fn validate(&self) -> Result<(), ImageError> {
        let bad = |m: String| Err(ImageError::Config(m));
        if self.width == 0 || self.height == 0 || self.width > MAX_TARGET_SIDE || self.height > MAX_TARGET_SIDE {
            return bad(format!(
                "input size {}x{} must be between 1 and {MAX_TARGET_SIDE} on each side",
                self.width, self.height
            ));
        }
        if self.resize == Resize::BicubicShortestEdgeCenterCrop && self.width != self.height {
            return bad(format!(
                "bicubic_shortest_edge_center_crop needs a square input, got {}x{}",
                self.width, self.height
            ));
        }
        for c in 0..3 {
            if !self.std[c].is_finite() || self.std[c] == 0.0 || !self.mean[c].is_finite() {
                return bad(format!(
                    "mean {:?} / std {:?}: std must be non-zero, both finite",
                    self.mean, self.std
                ));
            }
        }
        if !self.rescale.is_finite() || self.rescale <= 0.0 {
            return bad(format!("rescale {} must be positive and finite", self.rescale));
        }
        match (&self.dynamic, self.resize) {
            (Some(spec), Resize::BicubicSmartResize) => spec.validate()?,
            (None, Resize::BicubicSmartResize) => {
                return bad("bicubic_smart_resize needs the dynamic resolution's settings (vision.dynamic)".into())
            }
            (Some(_), _) => return bad("vision.dynamic needs resize bicubic_smart_resize".into()),
            (None, _) => {}
        }
        if self.max_pixels == 0 || self.max_pixels > MAX_PIXELS_LIMIT {
            return bad(format!(
                "max_pixels {} must be between 1 and {MAX_PIXELS_LIMIT}",
                self.max_pixels
            ));
        }
        Ok(())
    }

    /// Decodes, orients (EXIF), converts to RGB8, resizes and normalises into
    /// `out` (length [`Self::output_len`], NCHW). Reads the file through a
    /// buffered reader: the whole file is never held in memory besides the
    /// decoded image.
    pub fn load_file(&self, path: &Path, out: &mut [f32]) -> Result<ImageInfo, ImageError> {
        self.validate()?;
        self.check_out(out)?;
        let (rgb, format) = decode_file_rgb8(path, self.max_pixels)?;
        self.finish(&rgb, Some(format), out)
    }

    /// As [`Self::load_file`], from an encoded image in memory.
    pub fn load_bytes(&self, bytes: &[u8], out: &mut [f32]) -> Result<ImageInfo, ImageError> {
        self.validate()?;
        self.check_out(out)?;
        let name = "(in-memory image)";
        if bytes.is_empty() {
            return Err(ImageError::Empty { input: name.into() });
        }
        let (rgb, format) = self.decode(Cursor::new(bytes), name)?;
        self.finish(&rgb, Some(format), out)
    }

    /// Resizes and normalises an RGB8 frame (a camera frame, say) into `out`.
    /// No orientation is applied.
    pub fn from_rgb8(&self, image: &RgbImage, out: &mut [f32]) -> Result<ImageInfo, ImageError> {
        self.validate()?;
        self.check_out(out)?;
        self.check_frame(image)?;
        self.finish(image, None, out)
    }

    /// As [`Self::load_file`], for a dynamic-resolution model: the picture's
    /// size picks its patch grid, and `out` receives every vision input.
    pub fn load_file_dynamic(&self, path: &Path, out: &mut dynamic::DynamicPixels) -> Result<ImageInfo, ImageError> {
        let spec = self.dynamic_spec()?;
        let (rgb, format) = decode_file_rgb8(path, self.max_pixels)?;
        self.finish_dynamic(spec, &rgb, Some(format), out)
    }

    /// As [`Self::load_bytes`], for a dynamic-resolution model.
    pub fn load_bytes_dynamic(&self, bytes: &[u8], out: &mut dynamic::DynamicPixels) -> Result<ImageInfo, ImageError> {
        let spec = self.dynamic_spec()?;
        let name = "(in-memory image)";
        if bytes.is_empty() {
            return Err(ImageError::Empty { input: name.into() });
        }
        let (rgb, format) = self.decode(Cursor::new(bytes), name)?;
        self.finish_dynamic(spec, &rgb, Some(format), out)
    }

    /// As [`Self::from_rgb8`], for a dynamic-resolution model.
    pub fn from_rgb8_dynamic(
        &self,
        image: &RgbImage,
        out: &mut dynamic::DynamicPixels,
    ) -> Result<ImageInfo, ImageError> {
        let spec = self.dynamic_spec()?;
        self.check_frame(image)?;
        self.finish_dynamic(spec, image, None, out)
    }

    fn dynamic_spec(&self) -> Result<&dynamic::DynamicResolution, ImageError> {
        self.validate()?;
        self.dynamic
            .as_ref()
            .ok_or_else(|| ImageError::Config("this model's pictures have a fixed size, not a dynamic one".into()))
    }

    fn finish_dynamic(
        &self,
        spec: &dynamic::DynamicResolution,
        rgb: &RgbImage,
        format: Option<&'static str>,
        out: &mut dynamic::DynamicPixels,
    ) -> Result<ImageInfo, ImageError> {
        let (width, height) = rgb.dimensions();
        let lut = dynamic::channel_tables(self.rescale, self.mean, self.std);
        dynamic::fill(spec, &lut, rgb.as_raw(), width as usize, height as usize, out)?;
        Ok(ImageInfo { width, height, format })
    }

    /// The resized RGB8 picture (packed HWC), before normalisation: what PIL's
    /// `resize` returns. Exposed for tests and debugging.
    pub fn resize_rgb8(&self, image: &RgbImage) -> Result<Vec<u8>, ImageError> {
        self.validate()?;
        self.check_fixed()?;
        self.check_frame(image)?;
        Ok(self.resize_inner(image))
    }

    /// The fixed-size loaders refuse a dynamic-resolution model (its
    /// pictures have no one size).
    fn check_fixed(&self) -> Result<(), ImageError> {
        if self.dynamic.is_some() {
            return Err(ImageError::Config(
                "this model sizes each picture by its own shape (dynamic resolution): use the dynamic loader".into(),
            ));
        }
        Ok(())
    }

    /// A raw frame must have pixels, and no more than `max_pixels`.
    fn check_frame(&self, image: &RgbImage) -> Result<(), ImageError> {
        let (width, height) = image.dimensions();
        let input = || "(RGB frame)".to_string();
        if width == 0 || height == 0 {
            return Err(ImageError::ZeroSize {
                input: input(),
                width,
                height,
            });
        }
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_pixels {
            return Err(ImageError::TooLarge {
                input: input(),
                width,
                height,
                pixels,
                max_pixels: self.max_pixels,
            });
        }
        Ok(())
    }

    fn check_out(&self, out: &[f32]) -> Result<(), ImageError> {
        self.check_fixed()?;
        let needed = self.output_len();
        if out.len() != needed {
            return Err(ImageError::OutputLength {
                got: out.len(),
                needed,
                width: self.width,
                height: self.height,
            });
        }
        Ok(())
    }

    fn decode<R: BufRead + Seek>(&self, reader: R, name: &str) -> Result<(RgbImage, &'static str), ImageError> {
        decode_rgb8(reader, name, self.max_pixels)
    }

    fn finish(&self, rgb: &RgbImage, format: Option<&'static str>, out: &mut [f32]) -> Result<ImageInfo, ImageError> {
        let (width, height) = rgb.dimensions();
        let resized = self.resize_inner(rgb);
        self.normalize(&resized, out);
        Ok(ImageInfo { width, height, format })
    }

    /// Packed RGB of exactly `width x height`.
    fn resize_inner(&self, img: &RgbImage) -> Vec<u8> {
        let (sw, sh) = (img.width() as usize, img.height() as usize);
        let (tw, th) = (self.width as usize, self.height as usize);
        let src = img.as_raw().as_slice();
        match self.resize {
            Resize::BilinearSquash => resize_rgb8(src, sw, sh, tw, th, Filter::Bilinear),
            Resize::BicubicSquash => resize_rgb8(src, sw, sh, tw, th, Filter::Bicubic),
            Resize::LanczosSquash => resize_rgb8(src, sw, sh, tw, th, Filter::Lanczos),
            // Refused before (`check_fixed`): a dynamic model's pictures go
            // through `finish_dynamic`.
            Resize::BicubicSmartResize => resize_rgb8(src, sw, sh, tw, th, Filter::Bicubic),
            Resize::BicubicShortestEdgeCenterCrop => {
                // Only the centre crop is computed: the resized picture of a
                // 60000 x 1 source would be 20 million columns wide.
                let (nw, nh) = shortest_edge_size(sw, sh, tw);
                let crop = Window {
                    x0: (nw - tw) / 2,
                    y0: (nh - th) / 2,
                    width: tw,
                    height: th,
                };
                resize_rgb8_window(src, sw, sh, nw, nh, crop, Filter::Bicubic)
            }
        }
    }

    /// `(x / 255 - mean) / std` per channel in f32, HWC u8 to CHW f32, through a
    /// 256-entry table per channel (the same operations, in the same order, as
    /// the numpy reference).
    fn normalize(&self, hwc: &[u8], out: &mut [f32]) {
        let inv = 1.0 / f64::from(self.rescale);
        let divisor = inv.round();
        let divide = (inv - divisor).abs() <= 1e-6 * divisor && divisor >= 1.0;
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, entry) in table.iter_mut().enumerate() {
                let x = v as f32;
                let scaled = if divide { x / divisor as f32 } else { x * self.rescale };
                *entry = (scaled - self.mean[c]) / self.std[c];
            }
        }
        let plane = self.width as usize * self.height as usize;
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in hwc.chunks_exact(3).enumerate().take(plane) {
            r[i] = lut[0][usize::from(px[0])];
            g[i] = lut[1][usize::from(px[1])];
            b[i] = lut[2][usize::from(px[2])];
        }
    }
}

/// The size after a shortest-edge resize to `size`, as `transformers`'
/// `get_resize_output_image_size(default_to_square=False)` computes it.
/// [`decode_rgb8`] of a file, read through a buffered reader: the whole file
/// is never held in memory besides the decoded image.
pub fn decode_file_rgb8(path: &Path, max_pixels: u64) -> Result<(RgbImage, &'static str), ImageError> {
    let name = path.display().to_string();
    let read_err = |source| ImageError::Read {
        path: name.clone(),
        source,
    };
    // Not a FIFO or a device (which would block or never end).
    let (file, meta) = crate::regular_file::open(path).map_err(read_err)?;
    if meta.len() == 0 {
        return Err(ImageError::Empty { input: name });
    }
    decode_rgb8(BufReader::new(file), &name, max_pixels)
}

/// Decodes an encoded picture (any supported format, found from its bytes)
/// into RGB8, EXIF orientation applied, refusing more than `max_pixels`
/// before decoding and bounding the decoder's memory. `name` is what errors
/// call the input. Used by the image preprocessing and the frame sources.
pub fn decode_rgb8<R: BufRead + Seek>(
    reader: R,
    name: &str,
    max_pixels: u64,
) -> Result<(RgbImage, &'static str), ImageError> {
    let mut reader = ImageReader::new(reader)
        .with_guessed_format()
        .map_err(|source| ImageError::Read {
            path: name.to_string(),
            source,
        })?;
    let Some(format) = reader.format() else {
        let mut inner = reader.into_inner();
        let mut head = [0u8; 8];
        let n = std::io::Read::read(&mut inner, &mut head).unwrap_or(0);
        let magic = head[..n]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ");
        return Err(ImageError::UnknownFormat {
            input: name.to_string(),
            magic,
        });
    };
    let fmt = format_name(format);
    let limit_bytes = max_pixels
        .saturating_mul(DECODE_BYTES_PER_PIXEL)
        .saturating_add(DECODE_SLACK_BYTES);
    if format == ImageFormat::Jpeg {
        let img = decode_jpeg(reader.into_inner(), name, max_pixels, limit_bytes)?;
        return rgb8_of(img, name, fmt);
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(limit_bytes);
    reader.limits(limits);
    let map = |e| map_decode_error(e, name, fmt, limit_bytes);

    let mut decoder = reader.into_decoder().map_err(map)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSize {
            input: name.to_string(),
            width,
            height,
        });
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ImageError::TooLarge {
            input: name.to_string(),
            width,
            height,
            pixels,
            max_pixels,
        });
    }
    if decoder.total_bytes() > limit_bytes {
        return Err(ImageError::MemoryLimit {
            input: name.to_string(),
            limit_bytes,
            reason: format!(
                "{width}x{height} {:?} is {} bytes",
                decoder.color_type(),
                decoder.total_bytes()
            ),
        });
    }
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(map)?;
    img.apply_orientation(orientation);
    rgb8_of(img, name, fmt)
}

fn rgb8_of(img: DynamicImage, name: &str, fmt: &'static str) -> Result<(RgbImage, &'static str), ImageError> {
    let rgb = to_rgb8(img).ok_or_else(|| ImageError::Corrupt {
        input: name.to_string(),
        format: fmt.to_string(),
        reason: "decoded pixel buffer does not match its size".into(),
    })?;
    Ok((rgb, fmt))
}

/// A JPEG, decoded by `zune-jpeg` (as `image` does) in strict mode: data
/// that ends before the last scan, a Huffman code that does not decode or a
/// marker where none may be is an error, not grey filled in, so a frame
/// cut off in transfer is counted as corrupt instead of captioned. EXIF
/// orientation applied; the file is read whole, at most `limit_bytes`.
fn decode_jpeg<R: BufRead + Seek>(
    reader: R,
    name: &str,
    max_pixels: u64,
    limit_bytes: u64,
) -> Result<DynamicImage, ImageError> {
    use zune_jpeg::zune_core::bytestream::ZCursor;
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;

    let input = || name.to_string();
    let corrupt = |e: zune_jpeg::errors::DecodeErrors| match e {
        zune_jpeg::errors::DecodeErrors::Unsupported(what) => ImageError::Unsupported {
            input: input(),
            format: "jpeg".into(),
            reason: format!("{what:?}"),
        },
        zune_jpeg::errors::DecodeErrors::FormatStatic(text) => ImageError::Corrupt {
            input: input(),
            format: "jpeg".into(),
            reason: one_line(&text.to_lowercase()),
        },
        zune_jpeg::errors::DecodeErrors::Format(text) => ImageError::Corrupt {
            input: input(),
            format: "jpeg".into(),
            reason: one_line(&text),
        },
        // Its I/O errors end with a newline.
        other => ImageError::Corrupt {
            input: input(),
            format: "jpeg".into(),
            reason: one_line(&other.to_string()),
        },
    };
    let mut bytes = Vec::new();
    reader
        .take(limit_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|source| ImageError::Read { path: input(), source })?;
    if bytes.len() as u64 > limit_bytes {
        return Err(ImageError::MemoryLimit {
            input: input(),
            limit_bytes,
            reason: "the file alone is larger".into(),
        });
    }
    let options = DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(&bytes[..]), options);
    decoder.decode_headers().map_err(corrupt)?;
    let (Some((width, height)), Some(colorspace)) = (decoder.dimensions(), decoder.input_colorspace()) else {
        return Err(corrupt(zune_jpeg::errors::DecodeErrors::FormatStatic(
            "no frame header",
        )));
    };
    // A JPEG's sides are 16-bit.
    let (width, height) = (width as u32, height as u32);
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSize {
            input: input(),
            width,
            height,
        });
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ImageError::TooLarge {
            input: input(),
            width,
            height,
            pixels,
            max_pixels,
        });
    }
    // What `image` asks for: the layouts it has, everything else as RGB.
    let out = match colorspace {
        ColorSpace::RGB | ColorSpace::RGBA | ColorSpace::Luma | ColorSpace::LumaA => colorspace,
        _ => ColorSpace::RGB,
    };
    decoder.set_options(decoder.options().jpeg_set_out_colorspace(out));
    let size = decoder.output_buffer_size().unwrap_or(usize::MAX);
    if size as u64 > limit_bytes {
        return Err(ImageError::MemoryLimit {
            input: input(),
            limit_bytes,
            reason: format!("{width}x{height} {out:?} is {size} bytes"),
        });
    }
    let mut data = vec![0u8; size];
    decoder.decode_into(&mut data).map_err(corrupt)?;
    let orientation = decoder
        .exif()
        .and_then(|exif| image::metadata::Orientation::from_exif_chunk(exif))
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mismatch = || ImageError::Corrupt {
        input: input(),
        format: "jpeg".into(),
        reason: "decoded pixel buffer does not match its size".into(),
    };
    let mut img = match out {
        ColorSpace::RGBA => {
            DynamicImage::ImageRgba8(image::RgbaImage::from_raw(width, height, data).ok_or_else(mismatch)?)
        }
        ColorSpace::Luma => {
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(width, height, data).ok_or_else(mismatch)?)
        }
        ColorSpace::LumaA => {
            DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_raw(width, height, data).ok_or_else(mismatch)?)
        }
        _ => DynamicImage::ImageRgb8(RgbImage::from_raw(width, height, data).ok_or_else(mismatch)?),
    };
    img.apply_orientation(orientation);
    Ok(img)
}

fn shortest_edge_size(w: usize, h: usize, size: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = ((size as f64 * long as f64 / short as f64) as usize).max(size);
    if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "png",
        ImageFormat::Jpeg => "jpeg",
        ImageFormat::WebP => "webp",
        ImageFormat::Bmp => "bmp",
        ImageFormat::Tiff => "tiff",
        ImageFormat::Gif => "gif",
        ImageFormat::Pnm => "pnm",
        other => other.extensions_str().first().copied().unwrap_or("unknown"),
    }
}

fn map_decode_error(e: image::ImageError, name: &str, format: &str, limit_bytes: u64) -> ImageError {
    let input = name.to_string();
    let format = format.to_string();
    match e {
        image::ImageError::Limits(l) => ImageError::MemoryLimit {
            input,
            limit_bytes,
            reason: one_line(&l.to_string()),
        },
        image::ImageError::Unsupported(u) => ImageError::Unsupported {
            input,
            format,
            reason: one_line(&u.to_string()),
        },
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => ImageError::Corrupt {
            input,
            format,
            reason: one_line(&format!("unexpected end of data ({io})")),
        },
        other => ImageError::Corrupt {
            input,
            format,
            reason: one_line(&other.to_string()),
        },
    }
}

/// PIL's `convert("RGB")` for every layout the decoders produce: alpha
/// dropped, gray replicated, 16-bit samples reduced to their high byte,
/// floats clamped to [0, 1] and rounded.
fn to_rgb8(img: DynamicImage) -> Option<RgbImage> {
    fn hi(v: u16) -> u8 {
        (v >> 8) as u8
    }
    fn f(v: f32) -> u8 {
        (v.clamp(0.0, 1.0) * 255.0).round() as u8
    }
    let (w, h) = (img.width(), img.height());
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    match img {
        DynamicImage::ImageRgb8(i) => return Some(i),
        DynamicImage::ImageRgba8(i) => i.pixels().for_each(|p| out.extend_from_slice(&p.0[..3])),
        DynamicImage::ImageLuma8(i) => i.pixels().for_each(|p| out.extend_from_slice(&[p.0[0]; 3])),
        DynamicImage::ImageLumaA8(i) => i.pixels().for_each(|p| out.extend_from_slice(&[p.0[0]; 3])),
        DynamicImage::ImageRgb16(i) => i.pixels().for_each(|p| out.extend(p.0.iter().map(|&v| hi(v)))),
        DynamicImage::ImageRgba16(i) => i.pixels().for_each(|p| out.extend(p.0[..3].iter().map(|&v| hi(v)))),
        DynamicImage::ImageLuma16(i) => i.pixels().for_each(|p| out.extend_from_slice(&[hi(p.0[0]); 3])),
        DynamicImage::ImageLumaA16(i) => i.pixels().for_each(|p| out.extend_from_slice(&[hi(p.0[0]); 3])),
        DynamicImage::ImageRgb32F(i) => i.pixels().for_each(|p| out.extend(p.0.iter().map(|&v| f(v)))),
        DynamicImage::ImageRgba32F(i) => i.pixels().for_each(|p| out.extend(p.0[..3].iter().map(|&v| f(v)))),
        // A future layout: the image crate's own conversion (rounds 16-bit values).
        other => return Some(other.to_rgb8()),
    }
    RgbImage::from_raw(w, h, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, Luma, LumaA, Rgb, Rgba};
    use serde_json::Value;
    use sha2::{Digest, Sha256};
    use std::fs::File;
    use std::path::PathBuf;

    fn repo(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    fn fixtures() -> Value {
        let text = std::fs::read_to_string(repo("tests/data/pil_resize.json")).expect("tests/data/pil_resize.json");
        serde_json::from_str(&text).expect("fixture JSON")
    }

    fn pre(width: u32, height: u32, resize: Resize) -> Preprocess {
        Preprocess {
            width,
            height,
            mean: [0.5; 3],
            std: [0.5; 3],
            rescale: 1.0 / 255.0,
            resize,
            max_pixels: DEFAULT_MAX_PIXELS,
            dynamic: None,
        }
    }

    /// LLaVA-1.5's processor (transformers' `CLIPImageProcessor`) on the
    /// committed pictures (scripts/fixtures/clip_fixtures.py): every value
    /// of `pixel_values` equal, bit for bit.
    #[test]
    fn pictures_come_out_as_the_clip_processor_makes_them() {
        for name in ["chelsea-crop-61x93", "coffee-crop-130x47", "astronaut-224"] {
            let dir = repo("models/fixtures/llava");
            let meta: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap()).unwrap();
            let floats = |key: &str| -> [f32; 3] {
                let v: Vec<f32> = meta[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect();
                [v[0], v[1], v[2]]
            };
            let size = meta["size"].as_u64().unwrap() as u32;
            let p = Preprocess {
                mean: floats("image_mean"),
                std: floats("image_std"),
                ..pre(size, size, Resize::BicubicShortestEdgeCenterCrop)
            };
            let mut out = vec![0.0; p.output_len()];
            p.load_file(&repo(meta["picture"].as_str().unwrap()), &mut out).unwrap();
            let expected = read_f32_fixture(&dir.join(format!("{name}.f32")));
            assert_eq!(out.len(), expected.len());
            let differ = out
                .iter()
                .zip(&expected)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differ, 0, "{name}: {differ} of {} values differ", expected.len());
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn decode_file(path: &Path) -> RgbImage {
        let file = BufReader::new(File::open(path).expect("open"));
        pre(1, 1, Resize::BilinearSquash)
            .decode(file, "test")
            .expect("decode")
            .0
    }

    fn resize_case(case: &Value) -> Option<String> {
        let source = case["source"].as_str().expect("source");
        let path = repo(source);
        if !path.exists() {
            assert!(
                !case["committed"].as_bool().expect("committed"),
                "committed fixture {source} is missing"
            );
            return None;
        }
        let resize: Resize = serde_json::from_value(case["resize"].clone()).expect("resize");
        let (w, h) = (
            case["width"].as_u64().expect("w") as u32,
            case["height"].as_u64().expect("h") as u32,
        );
        let img = decode_file(&path);
        assert_eq!(
            img.width() as u64,
            case["source_size"][0].as_u64().expect("sw"),
            "{source}"
        );
        let got = pre(w, h, resize).resize_rgb8(&img).expect("resize");
        let what = format!("{source} -> {w}x{h} {resize:?}");
        assert_eq!(got.len(), (w * h * 3) as usize, "{what}");
        if let Some(expected) = case.get("rgb_hex").and_then(Value::as_str) {
            if hex(&got) != expected {
                let diff = got
                    .iter()
                    .enumerate()
                    .find(|(i, &b)| expected.get(2 * i..2 * i + 2) != Some(&format!("{b:02x}")))
                    .map(|(i, _)| i);
                panic!("{what}: bytes differ from PIL, first at byte {diff:?}");
            }
        }
        for s in case["samples"].as_array().expect("samples") {
            let v: Vec<u64> = s
                .as_array()
                .expect("sample")
                .iter()
                .map(|x| x.as_u64().expect("n"))
                .collect();
            let i = ((v[1] * u64::from(w) + v[0]) * 3) as usize;
            assert_eq!(
                &got[i..i + 3],
                &[v[2] as u8, v[3] as u8, v[4] as u8],
                "{what}: pixel ({}, {})",
                v[0],
                v[1]
            );
        }
        assert_eq!(
            hex(&Sha256::digest(&got)),
            case["sha256"].as_str().expect("sha"),
            "{what}: sha256"
        );
        Some(what)
    }

    #[test]
    fn resize_matches_pil_on_committed_images() {
        let fx = fixtures();
        let mut n = 0;
        for case in fx["cases"].as_array().expect("cases") {
            if case["committed"].as_bool() == Some(true) {
                resize_case(case).expect("committed case ran");
                n += 1;
            }
        }
        assert!(n >= 20, "only {n} committed cases");
    }

    #[test]
    fn resize_matches_pil_on_real_pictures() {
        let fx = fixtures();
        let (mut ran, mut skipped) = (0, 0);
        for case in fx["cases"].as_array().expect("cases") {
            if case["committed"].as_bool() == Some(false) {
                match resize_case(case) {
                    Some(_) => ran += 1,
                    None => skipped += 1,
                }
            }
        }
        if skipped > 0 {
            eprintln!("note: {skipped} real-picture cases skipped: .cache/assets/skimage is absent (scripts/setup-python.sh fetches it)");
        }
        eprintln!("real-picture resize cases checked: {ran}");
    }

    #[test]
    fn pixel_values_match_the_exporter_bit_for_bit() {
        let fx = fixtures();
        for case in fx["pixel_values"].as_array().expect("pixel_values") {
            let source = case["source"].as_str().expect("source");
            let path = repo(source);
            if !path.exists() {
                eprintln!("note: {source} absent, pixel_values case skipped");
                continue;
            }
            let size = case["size"].as_u64().expect("size") as u32;
            let arr = |k: &str| -> [f32; 3] {
                let v: Vec<f32> = case[k]
                    .as_array()
                    .expect(k)
                    .iter()
                    .map(|x| x.as_f64().expect("f") as f32)
                    .collect();
                [v[0], v[1], v[2]]
            };
            let p = Preprocess {
                mean: arr("mean"),
                std: arr("std"),
                rescale: case["rescale"].as_f64().expect("rescale") as f32,
                ..pre(size, size, Resize::BilinearSquash)
            };
            let mut out = vec![0f32; p.output_len()];
            let info = p.load_file(&path, &mut out).expect("load");
            assert_eq!(info.format, Some("png"));
            let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
            let sum: f64 = out.iter().map(|&v| f64::from(v)).sum();
            assert!(
                (sum - case["sum"].as_f64().expect("sum")).abs() < 1e-6 * sum.abs().max(1.0),
                "{source}: sum {sum}"
            );
            assert_eq!(
                hex(&Sha256::digest(&bytes)),
                case["sha256_f32le"].as_str().expect("sha"),
                "{source}"
            );
        }
    }

    #[test]
    fn decodes_like_pil_convert_rgb() {
        let fx = fixtures();
        for case in fx["decode"].as_array().expect("decode") {
            let source = case["source"].as_str().expect("source");
            let img = decode_file(&repo(source));
            assert_eq!(img.width() as u64, case["width"].as_u64().expect("w"), "{source}");
            assert_eq!(img.height() as u64, case["height"].as_u64().expect("h"), "{source}");
            let expected = case["rgb_hex"].as_str().expect("hex");
            let expected: Vec<u8> = (0..expected.len() / 2)
                .map(|i| u8::from_str_radix(&expected[2 * i..2 * i + 2], 16).expect("hex"))
                .collect();
            let got = img.as_raw();
            if case["exact"].as_bool() == Some(true) {
                assert!(got == &expected, "{source} ({}): differs from PIL", case["pil_mode"]);
            } else {
                let diffs: Vec<i32> = got
                    .iter()
                    .zip(&expected)
                    .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
                    .collect();
                let max = diffs.iter().copied().max().unwrap_or(0);
                let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
                eprintln!("{source}: zune-jpeg vs libjpeg-turbo (PIL): max |diff| {max}, mean {mean:.4}");
                assert!(
                    max <= 8 && mean < 1.0,
                    "{source}: JPEG decode too far from PIL: max {max}, mean {mean}"
                );
            }
        }
    }

    fn png_bytes(img: &DynamicImage) -> Vec<u8> {
        let mut buf = Vec::new();
        img.write_to(&mut Cursor::new(&mut buf), ImageFormat::Png)
            .expect("encode png");
        buf
    }

    fn load(p: &Preprocess, bytes: &[u8]) -> Result<(ImageInfo, Vec<f32>), ImageError> {
        let mut out = vec![0f32; p.output_len()];
        p.load_bytes(bytes, &mut out).map(|i| (i, out))
    }

    /// Output for a known RGB picture of the same size (no resize involved).
    fn reference(p: &Preprocess, rgb: &RgbImage) -> Vec<f32> {
        let mut out = vec![0f32; p.output_len()];
        p.from_rgb8(rgb, &mut out).expect("from_rgb8");
        out
    }

    #[test]
    fn input_layouts_convert_like_pil() {
        let (w, h) = (6u32, 5u32);
        let p = pre(w, h, Resize::BilinearSquash);
        let val = |x: u32, y: u32, c: u32| ((x * 40 + y * 13 + c * 71) % 256) as u8;
        let rgb = RgbImage::from_fn(w, h, |x, y| Rgb([val(x, y, 0), val(x, y, 1), val(x, y, 2)]));
        let gray_rgb = RgbImage::from_fn(w, h, |x, y| Rgb([val(x, y, 0); 3]));

        let rgba = DynamicImage::ImageRgba8(image::RgbaImage::from_fn(w, h, |x, y| {
            Rgba([val(x, y, 0), val(x, y, 1), val(x, y, 2), (x * 50) as u8])
        }));
        assert_eq!(
            load(&p, &png_bytes(&rgba)).expect("rgba").1,
            reference(&p, &rgb),
            "RGBA: alpha dropped"
        );

        let l = DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| Luma([val(x, y, 0)])));
        assert_eq!(
            load(&p, &png_bytes(&l)).expect("L").1,
            reference(&p, &gray_rgb),
            "L: replicated"
        );

        let la = DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_fn(w, h, |x, y| LumaA([val(x, y, 0), 9])));
        assert_eq!(load(&p, &png_bytes(&la)).expect("LA").1, reference(&p, &gray_rgb), "LA");

        // 16-bit: the high byte of each sample (v >> 8), whatever the low byte.
        let wide = |v: u8, x: u32| u16::from(v) << 8 | ((x * 37) & 0xff) as u16;
        let rgb16 = DynamicImage::ImageRgb16(image::ImageBuffer::from_fn(w, h, |x, y| {
            Rgb([wide(val(x, y, 0), x), wide(val(x, y, 1), y), wide(val(x, y, 2), x + y)])
        }));
        assert_eq!(
            load(&p, &png_bytes(&rgb16)).expect("rgb16").1,
            reference(&p, &rgb),
            "RGB16"
        );
        let l16 = DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(w, h, |x, y| Luma([wide(val(x, y, 0), x)])));
        assert_eq!(
            load(&p, &png_bytes(&l16)).expect("l16").1,
            reference(&p, &gray_rgb),
            "L16"
        );

        // The same picture as BMP, PNM and lossless WebP decodes to the same values.
        for format in [ImageFormat::Bmp, ImageFormat::Pnm, ImageFormat::Tiff, ImageFormat::Gif] {
            let mut buf = Vec::new();
            let src = if format == ImageFormat::Gif { &gray_rgb } else { &rgb };
            DynamicImage::ImageRgb8(src.clone())
                .write_to(&mut Cursor::new(&mut buf), format)
                .expect("encode");
            let (info, out) = load(&p, &buf).unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert_eq!((info.width, info.height), (w, h));
            assert_eq!(out, reference(&p, src), "{format:?}");
        }
    }

    #[test]
    fn normalisation_is_x_over_255_minus_mean_over_std() {
        let p = Preprocess {
            mean: [0.1, 0.5, 0.9],
            std: [0.2, 0.5, 2.0],
            ..pre(2, 1, Resize::BilinearSquash)
        };
        let img = RgbImage::from_raw(2, 1, vec![0, 128, 255, 17, 200, 3]).expect("img");
        let out = reference(&p, &img);
        let f = |v: u8, c: usize| (f32::from(v) / 255.0 - p.mean[c]) / p.std[c];
        assert_eq!(out, vec![f(0, 0), f(17, 0), f(128, 1), f(200, 1), f(255, 2), f(3, 2)]);
        // A rescale that is not 1/integer multiplies.
        let q = Preprocess {
            rescale: 0.3,
            mean: [0.0; 3],
            std: [1.0; 3],
            ..pre(2, 1, Resize::BilinearSquash)
        };
        assert_eq!(reference(&q, &img)[0], 0.0);
        assert_eq!(reference(&q, &img)[1], 17.0 * 0.3f32);
    }

    fn exif_app1(orientation: u16) -> Vec<u8> {
        // "Exif\0\0" + little-endian TIFF header + one IFD entry (0x0112, SHORT, 1).
        let mut tiff = b"II*\0".to_vec();
        tiff.extend_from_slice(&8u32.to_le_bytes());
        tiff.extend_from_slice(&1u16.to_le_bytes());
        tiff.extend_from_slice(&0x0112u16.to_le_bytes());
        tiff.extend_from_slice(&3u16.to_le_bytes());
        tiff.extend_from_slice(&1u32.to_le_bytes());
        tiff.extend_from_slice(&orientation.to_le_bytes());
        tiff.extend_from_slice(&[0, 0]);
        tiff.extend_from_slice(&0u32.to_le_bytes());
        let mut payload = b"Exif\0\0".to_vec();
        payload.extend_from_slice(&tiff);
        let mut seg = vec![0xFF, 0xE1];
        seg.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        seg.extend_from_slice(&payload);
        seg
    }

    #[test]
    fn jpeg_exif_orientation_is_applied() {
        // 32x16: left half red, right half blue.
        let img = RgbImage::from_fn(32, 16, |x, _| if x < 16 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) });
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .write_image(img.as_raw(), 32, 16, image::ExtendedColorType::Rgb8)
            .expect("jpeg");
        let plain = load(&pre(32, 16, Resize::BilinearSquash), &jpeg).expect("plain jpeg");
        assert_eq!(
            plain.0,
            ImageInfo {
                width: 32,
                height: 16,
                format: Some("jpeg")
            }
        );

        // Orientation 6: rotate 90 degrees clockwise: the left half becomes the top half.
        let mut tagged = jpeg[..2].to_vec();
        tagged.extend_from_slice(&exif_app1(6));
        tagged.extend_from_slice(&jpeg[2..]);
        let p = pre(16, 32, Resize::BilinearSquash);
        let (info, out) = load(&p, &tagged).expect("tagged jpeg");
        assert_eq!((info.width, info.height), (16, 32));
        let plane = 16 * 32;
        let red_top = out[8 * 16 + 8]; // R channel, row 8
        let red_bottom = out[24 * 16 + 8]; // R channel, row 24
        let blue_bottom = out[2 * plane + 24 * 16 + 8];
        assert!(
            red_top > 0.8 && red_bottom < -0.8 && blue_bottom > 0.8,
            "{red_top} {red_bottom} {blue_bottom}"
        );
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let p = pre(4, 4, Resize::BilinearSquash);
        let mut out = vec![0f32; p.output_len()];

        let missing = Path::new("/nonexistent/dir/cat.png");
        let e = p.load_file(missing, &mut out).expect_err("missing");
        assert!(
            matches!(e, ImageError::Read { .. }) && e.to_string().contains("/nonexistent/dir/cat.png"),
            "{e}"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.png");
        std::fs::write(&empty, b"").expect("write");
        let e = p.load_file(&empty, &mut out).expect_err("empty");
        assert!(
            matches!(e, ImageError::Empty { .. }) && e.to_string().contains("empty.png"),
            "{e}"
        );
        assert!(matches!(p.load_bytes(&[], &mut out), Err(ImageError::Empty { .. })));

        let e = p.load_file(dir.path(), &mut out).expect_err("directory");
        assert!(matches!(e, ImageError::Read { .. }), "{e}");

        let e = p.load_bytes(b"hello, this is text", &mut out).expect_err("text");
        assert!(
            matches!(e, ImageError::UnknownFormat { .. }) && e.to_string().contains("68 65 6c"),
            "{e}"
        );

        // An ICO header: recognised, but not compiled in.
        let e = p
            .load_bytes(&[0, 0, 1, 0, 1, 0, 16, 16, 0, 0, 1, 0, 32, 0, 0, 0, 0, 0], &mut out)
            .expect_err("ico");
        assert!(matches!(e, ImageError::Unsupported { .. }), "{e}");

        let good = png_bytes(&DynamicImage::ImageRgb8(RgbImage::from_fn(40, 30, |x, y| {
            Rgb([x as u8, y as u8, 7])
        })));
        for cut in [8, 20, 40, good.len() / 2, good.len() - 13] {
            let e = p.load_bytes(&good[..cut], &mut out).expect_err("truncated");
            assert!(matches!(e, ImageError::Corrupt { .. }), "cut at {cut}: {e}");
        }
        let mut corrupt = good.clone();
        let mid = corrupt.len() / 2;
        corrupt[mid..mid + 8].copy_from_slice(b"garbage!");
        let e = p.load_bytes(&corrupt, &mut out).expect_err("corrupt");
        assert!(matches!(e, ImageError::Corrupt { .. }), "{e}");

        // A header claiming 10^10 pixels with no data: refused from the header, nothing allocated.
        let e = p.load_bytes(b"P6\n100000 100000\n255\n", &mut out).expect_err("huge");
        assert!(
            matches!(
                e,
                ImageError::TooLarge {
                    pixels: 10_000_000_000,
                    ..
                }
            ),
            "{e}"
        );
        let e = p
            .load_bytes(b"P6\n9000 8000\n255\n\x01\x02", &mut out)
            .expect_err("72 MP");
        assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
        // Within max_pixels but a lying header: the decode fails, bounded by the header's size.
        let e = p
            .load_bytes(b"P6\n2000 2000\n255\n\x01\x02", &mut out)
            .expect_err("short");
        assert!(matches!(e, ImageError::Corrupt { .. }), "{e}");
        let small = Preprocess {
            max_pixels: 1000,
            ..p.clone()
        };
        let e = small.load_bytes(&good, &mut out).expect_err("over max_pixels");
        assert!(
            e.to_string()
                .contains("40x30 = 1200 pixels, more than the limit of 1000"),
            "{e}"
        );

        let e = p.load_bytes(b"P6\n0 0\n255\n", &mut out).expect_err("zero");
        assert!(
            matches!(
                e,
                ImageError::ZeroSize {
                    width: 0,
                    height: 0,
                    ..
                }
            ),
            "{e}"
        );
        let e = p.from_rgb8(&RgbImage::new(0, 3), &mut out).expect_err("zero frame");
        assert!(
            matches!(
                e,
                ImageError::ZeroSize {
                    width: 0,
                    height: 3,
                    ..
                }
            ),
            "{e}"
        );

        let e = p.load_bytes(&good, &mut [0f32; 5]).expect_err("short out");
        assert!(matches!(e, ImageError::OutputLength { got: 5, needed: 48, .. }), "{e}");
    }

    /// A 64 x 48 JPEG with detail in every block, and where its scan data starts.
    fn detailed_jpeg(quality: u8) -> (Vec<u8>, usize) {
        let img = RgbImage::from_fn(64, 48, |x, y| {
            Rgb([(x * 4) as u8, (y * 5) as u8, ((x * y) % 256) as u8])
        });
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, quality)
            .write_image(img.as_raw(), 64, 48, image::ExtendedColorType::Rgb8)
            .expect("jpeg");
        let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).expect("SOS");
        let length = usize::from(u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]));
        (jpeg, sos + 2 + length)
    }

    #[test]
    fn truncated_jpegs_are_corrupt_not_grey() {
        let p = pre(16, 16, Resize::BilinearSquash);
        for quality in [50, 95] {
            let (jpeg, scan) = detailed_jpeg(quality);
            assert!(load(&p, &jpeg).is_ok(), "the whole file decodes");
            // Cut anywhere in the scan data (the lenient decoder filled the
            // rest with grey and this was captioned).
            let scan_bytes = jpeg.len() - 2 - scan;
            for cut in [
                scan + 1,
                scan + scan_bytes / 4,
                scan + scan_bytes / 2,
                scan + scan_bytes * 3 / 4,
            ] {
                let e = load(&p, &jpeg[..cut]).expect_err("truncated");
                assert!(
                    matches!(e, ImageError::Corrupt { .. }) && e.to_string().contains("jpeg"),
                    "quality {quality}, cut at {cut} of {}: {e}",
                    jpeg.len()
                );
            }
            // Cut in the headers.
            for cut in [3, scan / 2, scan - 1] {
                assert!(load(&p, &jpeg[..cut]).is_err(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn decoder_messages_are_one_line() {
        // Found by the `image_jpeg` fuzz target: zune-jpeg's I/O errors end
        // with a newline, which reached the error line.
        let p = pre(4, 4, Resize::BilinearSquash);
        let e = load(&p, &[0xFF, 0xD8, 0xFF]).expect_err("a JPEG of three bytes");
        let text = e.to_string();
        assert!(matches!(e, ImageError::Corrupt { .. }), "{text}");
        assert!(!text.contains(['\n', '\r']), "{text:?}");
    }

    #[test]
    fn settings_are_validated_and_deserialised() {
        let mut out = vec![0f32; 48];
        let frame = RgbImage::new(2, 2);
        let bad = Preprocess {
            std: [0.5, 0.0, 0.5],
            ..pre(4, 4, Resize::BilinearSquash)
        };
        assert!(matches!(bad.from_rgb8(&frame, &mut out), Err(ImageError::Config(_))));
        let bad = pre(4, 2, Resize::BicubicShortestEdgeCenterCrop);
        assert!(matches!(bad.validate(), Err(ImageError::Config(_))));
        assert!(matches!(
            pre(0, 4, Resize::BicubicSquash).validate(),
            Err(ImageError::Config(_))
        ));

        let vision = serde_json::json!({
            "image_size": 224, "height": 224, "width": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
            "resize": "bilinear_squash", "rescale": 0.00392156862745098, "channel_order": "RGB", "layout": "NCHW",
        });
        let p: Preprocess = serde_json::from_value(vision).expect("vision");
        assert_eq!(p, pre(224, 224, Resize::BilinearSquash));
        for (s, r) in [
            ("bicubic_squash", Resize::BicubicSquash),
            (
                "bicubic_shortest_edge_center_crop",
                Resize::BicubicShortestEdgeCenterCrop,
            ),
        ] {
            assert_eq!(serde_json::from_value::<Resize>(Value::from(s)).expect("resize"), r);
        }
        assert!(serde_json::from_value::<Resize>(Value::from("nearest")).is_err());
    }

    #[test]
    fn shortest_edge_sizes_follow_transformers() {
        assert_eq!(shortest_edge_size(451, 300, 224), (336, 224));
        assert_eq!(shortest_edge_size(300, 451, 224), (224, 336));
        assert_eq!(shortest_edge_size(512, 512, 224), (224, 224));
        assert_eq!(shortest_edge_size(5, 7, 9), (9, 12));
    }
}
