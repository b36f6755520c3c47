//! How big a picture becomes for each model family's image processor, and
//! how many LLM tokens it then costs: the one place in the project for these
//! rules. Pure arithmetic, no I/O.
//!
//! Each function follows the transformers 4.57 Python it names step for
//! step, floats included (Python's `/` is an f64 division, `int()` truncates,
//! `round()` rounds half to even, `math.ceil`/`math.floor` as in Rust), so
//! its sizes match the Hugging Face processor's to the pixel. The test
//! vectors come from those Python functions (`scripts/fixtures/sizing_vectors.py`).

/// A picture size or a processor setting the rules cannot size.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SizingError {
    /// A side of 0 pixels (Python divides by it).
    #[error("picture {width}x{height}: both sides must be at least one pixel")]
    EmptyPicture { width: u32, height: u32 },

    /// Qwen2-VL's `smart_resize` refuses a long side over 200 times the short one.
    #[error(
        "picture {width}x{height}: its aspect ratio {ratio:.1} is over 200, which Qwen2-VL's smart_resize refuses"
    )]
    AspectRatio { width: u32, height: u32, ratio: f64 },

    /// A processor or config setting of 0 (a patch size, a tile size, ...).
    #[error("{what} is 0; it must be at least 1")]
    ZeroSetting { what: &'static str },

    /// A setting the rule cannot use (a patch larger than the image, ...).
    #[error("{what}: {reason}")]
    BadSetting { what: &'static str, reason: String },

    /// A size the rule computes does not fit in 32 bits.
    #[error("picture {width}x{height}: the resized size overflows 32 bits")]
    Overflow { width: u32, height: u32 },
}

fn nonzero(value: u32, what: &'static str) -> Result<u32, SizingError> {
    if value == 0 {
        return Err(SizingError::ZeroSetting { what });
    }
    Ok(value)
}

fn picture(height: u32, width: u32) -> Result<(), SizingError> {
    if height == 0 || width == 0 {
        return Err(SizingError::EmptyPicture { width, height });
    }
    Ok(())
}

/// A computed side as `u32`, or the overflow error for `height x width`.
fn side(value: f64, height: u32, width: u32) -> Result<u32, SizingError> {
    // Every side is computed from non-negative values, so only the top can overflow.
    if value.is_finite() && value <= f64::from(u32::MAX) {
        Ok(value as u32)
    } else {
        Err(SizingError::Overflow { width, height })
    }
}

/// Qwen2-VL / Qwen2.5-VL's `smart_resize`
/// (transformers `models/qwen2_vl/image_processing_qwen2_vl.py`): the size,
/// `(height, width)`, both multiples of `factor` (`patch_size * merge_size`,
/// 28 for both families), nearest to the picture's with its pixel count in
/// `[min_pixels, max_pixels]` and its aspect ratio kept as closely as
/// possible.
///
/// Each side is rounded to the nearest multiple of `factor` (half to even,
/// as Python's `round`); if that has more than `max_pixels` both sides are
/// scaled down by `sqrt(h * w / max_pixels)` and floored to multiples (at
/// least `factor`), if fewer than `min_pixels` scaled up by
/// `sqrt(min_pixels / (h * w))` and ceiled. A long side over 200 times the
/// short one is an error, as in transformers.
pub fn qwen_smart_resize(
    height: u32,
    width: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32), SizingError> {
    picture(height, width)?;
    let factor = nonzero(factor, "the resize factor (patch_size * merge_size)")?;
    let (h, w, f) = (f64::from(height), f64::from(width), f64::from(factor));
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(SizingError::AspectRatio { width, height, ratio });
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    // Python compares exact integers: so do we (each side is a whole number
    // under 2^33, exact in f64, and their product fits in u128).
    let pixels = (h_bar as u128) * (w_bar as u128);
    if pixels > u128::from(max_pixels) {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if pixels < u128::from(min_pixels) {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((side(h_bar, height, width)?, side(w_bar, height, width)?))
}

/// What one picture becomes for Qwen2-VL / Qwen2.5-VL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QwenGrid {
    /// The `smart_resize` size, `(height, width)`.
    pub resized: (u32, u32),
    /// The vision tower's patch grid, `(height / patch, width / patch)`
    /// (transformers' `image_grid_thw` without its time axis).
    pub patches: (u32, u32),
    /// LLM image tokens (`<|image_pad|>`): each `merge x merge` block of
    /// patches is one, so `(height / factor) * (width / factor)`. The
    /// `<|vision_start|>` and `<|vision_end|>` around them are not counted.
    pub tokens: u64,
}

/// The Qwen2-VL / Qwen2.5-VL grid of a `height x width` picture, with the
/// preprocessor's `patch_size`, `merge_size`, `min_pixels` and
/// `max_pixels` (the processor's `image_grid_thw.prod() // merge_size**2`).
pub fn qwen_image_grid(
    height: u32,
    width: u32,
    patch_size: u32,
    merge_size: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<QwenGrid, SizingError> {
    let patch = nonzero(patch_size, "patch_size")?;
    let merge = nonzero(merge_size, "merge_size")?;
    let factor = patch.checked_mul(merge).ok_or(SizingError::BadSetting {
        what: "patch_size * merge_size",
        reason: "overflows 32 bits".into(),
    })?;
    let resized = qwen_smart_resize(height, width, factor, min_pixels, max_pixels)?;
    let patches = (resized.0 / patch, resized.1 / patch);
    let tokens = u64::from(resized.0 / factor) * u64::from(resized.1 / factor);
    Ok(QwenGrid {
        resized,
        patches,
        tokens,
    })
}

/// transformers' `MAX_IMAGE_SIZE` in the Idefics3 and SmolVLM processors: no
/// side is resized past 4096 pixels.
pub const IDEFICS3_MAX_IMAGE_SIZE: u32 = 4096;

/// The Idefics3 / SmolVLM image processor's settings that decide sizes
/// (its `preprocessor_config.json`, with the model's `image_seq_len`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idefics3Params {
    /// `size["longest_edge"]` when `do_resize` is true: the picture's long
    /// side is first brought to this (up or down); `None` skips that step.
    pub longest_edge: Option<u32>,
    /// `max_image_size["longest_edge"]`: the vision encoder's input side,
    /// the tiles' size.
    pub tile: u32,
    /// `do_image_splitting`: tiles plus a global image, or the global image alone.
    pub splitting: bool,
    /// LLM tokens per image (tile or global), see [`idefics3_image_seq_len`].
    pub image_seq_len: u32,
}

/// What one picture becomes for Idefics3 / SmolVLM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idefics3Split {
    /// After `resize` to `longest_edge` (the picture's own size when
    /// `do_resize` is false), `(height, width)`.
    pub resized: (u32, u32),
    /// After `resize_for_vision_encoder` (both sides multiples of the
    /// tile), `(height, width)`; the resized size when not splitting.
    pub encoder_size: (u32, u32),
    /// Tile rows and columns; 0 and 0 when the picture is not split (too
    /// small, or splitting is off), then only the global image is encoded.
    pub rows: u32,
    pub cols: u32,
    /// Images the vision encoder runs on: `rows * cols` tiles plus the
    /// global one.
    pub images: u32,
    /// LLM image tokens (`<image>`): `images * image_seq_len`. The markers
    /// around them (`<fake_token_around_image>`, `<row_r_col_c>`,
    /// `<global-img>`, line breaks) are not counted.
    pub tokens: u64,
}

/// `image_seq_len` of an Idefics3 / SmolVLM model: the vision encoder's
/// `(image_size / patch_size)^2` patches after the connector's pixel
/// shuffle by `scale_factor` in each direction, as transformers computes
/// it: `int(((image_size // patch_size) ** 2) / (scale_factor ** 2))`
/// (81 for SmolVLM-Instruct: 384 / 14 = 27, 27^2 / 9).
pub fn idefics3_image_seq_len(image_size: u32, patch_size: u32, scale_factor: u32) -> Result<u32, SizingError> {
    let patch = nonzero(patch_size, "vision_config.patch_size")?;
    let scale = nonzero(scale_factor, "scale_factor")?;
    let side = u64::from(nonzero(image_size, "vision_config.image_size")? / patch);
    let tokens = side * side / (u64::from(scale) * u64::from(scale));
    match u32::try_from(tokens) {
        Ok(0) => Err(SizingError::BadSetting {
            what: "image_seq_len",
            reason: format!(
                "image_size {image_size} / patch_size {patch_size} is smaller than scale_factor {scale_factor}: \
                 no token per image"
            ),
        }),
        Ok(tokens) => Ok(tokens),
        Err(_) => Err(SizingError::BadSetting {
            what: "image_seq_len",
            reason: "overflows 32 bits".into(),
        }),
    }
}

/// `_resize_output_size_rescale_to_max_len`: the long side to `max_len`,
/// the other by the aspect ratio, truncated and made even; at least 1.
fn rescale_to_max_len(height: u32, width: u32, max_len: u32) -> Result<(u32, u32), SizingError> {
    let aspect = f64::from(width) / f64::from(height);
    let (mut h, mut w) = if width >= height {
        (side((f64::from(max_len) / aspect).trunc(), height, width)?, max_len)
    } else {
        (max_len, side((f64::from(max_len) * aspect).trunc(), height, width)?)
    };
    if width >= height && h % 2 != 0 {
        h = h.checked_add(1).ok_or(SizingError::Overflow { width, height })?;
    }
    if width < height && w % 2 != 0 {
        w = w.checked_add(1).ok_or(SizingError::Overflow { width, height })?;
    }
    Ok((h.max(1), w.max(1)))
}

/// `_resize_output_size_scale_below_upper_bound`: a long side over
/// `max_len` comes down to it, the other by the aspect ratio (truncated);
/// at least 1.
fn scale_below_upper_bound(height: u32, width: u32, max_len: u32) -> Result<(u32, u32), SizingError> {
    let aspect = f64::from(width) / f64::from(height);
    let (h, w) = if width >= height && width > max_len {
        (side((f64::from(max_len) / aspect).trunc(), height, width)?, max_len)
    } else if height > width && height > max_len {
        (max_len, side((f64::from(max_len) * aspect).trunc(), height, width)?)
    } else {
        (height, width)
    };
    Ok((h.max(1), w.max(1)))
}

/// `math.ceil(x / tile) * tile` in Python's floats.
fn ceil_to(x: f64, tile: u32, height: u32, width: u32) -> Result<u32, SizingError> {
    side((x / f64::from(tile)).ceil() * f64::from(tile), height, width)
}

/// `resize_for_vision_encoder`: the long side up to a multiple of the tile,
/// the other from it by the aspect ratio (truncated), then up to a multiple.
fn resize_for_vision_encoder(height: u32, width: u32, tile: u32) -> Result<(u32, u32), SizingError> {
    let aspect = f64::from(width) / f64::from(height);
    let (h, w) = if width >= height {
        let w = ceil_to(f64::from(width), tile, height, width)?;
        let h = (f64::from(w) / aspect).trunc();
        (ceil_to(h, tile, height, width)?, w)
    } else {
        let h = ceil_to(f64::from(height), tile, height, width)?;
        let w = (f64::from(h) * aspect).trunc();
        (h, ceil_to(w, tile, height, width)?)
    };
    if h == 0 || w == 0 {
        return Err(SizingError::EmptyPicture { width, height });
    }
    Ok((h, w))
}

/// The Idefics3 / SmolVLM image processor's sizes for a `height x width`
/// picture (transformers `models/idefics3/image_processing_idefics3.py`,
/// `preprocess`, which SmolVLM's processor repeats):
///
/// 1. with `do_resize`, `resize` to `size["longest_edge"]`: the long side
///    becomes exactly that (small pictures are scaled up), the short side
///    follows the aspect ratio, truncated and made even, and no side passes
///    4096;
/// 2. with `do_image_splitting`, `resize_for_vision_encoder`: the long side
///    up to a multiple of the tile, the short side scaled from it and then
///    up to a multiple (so both are);
/// 3. `split_image`: a picture larger than one tile on either side is cut
///    into `rows x cols` tiles, plus the whole picture resized to one tile
///    (the global image); one that fits in a tile is the global image alone
///    (rows and cols 0). Without splitting, the picture is resized to one
///    tile, aspect ratio ignored.
///
/// This follows `preprocess`, what the model is fed; transformers'
/// `get_number_of_image_patches` resizes to `longest_edge` even when
/// `do_resize` is false, so there it can count other tiles.
pub fn idefics3_split(height: u32, width: u32, params: &Idefics3Params) -> Result<Idefics3Split, SizingError> {
    picture(height, width)?;
    let tile = nonzero(params.tile, "max_image_size.longest_edge")?;
    let seq_len = u64::from(nonzero(params.image_seq_len, "image_seq_len")?);
    let resized = match params.longest_edge {
        Some(edge) => {
            let edge = nonzero(edge, "size.longest_edge")?;
            let (h, w) = rescale_to_max_len(height, width, edge)?;
            scale_below_upper_bound(h, w, IDEFICS3_MAX_IMAGE_SIZE)?
        }
        None => (height, width),
    };
    let (encoder_size, rows, cols) = if params.splitting {
        let (h, w) = resize_for_vision_encoder(resized.0, resized.1, tile)?;
        if h > tile || w > tile {
            // Both sides are multiples of the tile here, so the ceilings
            // in transformers are exact quotients.
            ((h, w), h.div_ceil(tile), w.div_ceil(tile))
        } else {
            ((h, w), 0, 0)
        }
    } else {
        (resized, 0, 0)
    };
    let tiles = rows.checked_mul(cols).ok_or(SizingError::Overflow { width, height })?;
    let images = if tiles > 0 { tiles + 1 } else { 1 };
    Ok(Idefics3Split {
        resized,
        encoder_size,
        rows,
        cols,
        images,
        tokens: u64::from(images) * seq_len,
    })
}

/// LLaVA-1.5's image tokens: CLIP resizes the short side to `image_size`
/// and centre-crops a square, so every picture is `(image_size /
/// patch_size)^2` patches; the "full" `vision_feature_select_strategy`
/// keeps the CLS token too (one more), "default" drops it.
pub fn llava_image_tokens(image_size: u32, patch_size: u32, keep_cls: bool) -> Result<u64, SizingError> {
    let patch = nonzero(patch_size, "vision_config.patch_size")?;
    let side = u64::from(nonzero(image_size, "vision_config.image_size")? / patch);
    if side == 0 {
        return Err(SizingError::BadSetting {
            what: "vision_config.patch_size",
            reason: format!("{patch_size} is larger than image_size {image_size}"),
        });
    }
    Ok(side * side + u64::from(keep_cls))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every vector below is printed by scripts/fixtures/sizing_vectors.py
    // (transformers 4.57.1, the configs in models/configs/).

    /// (height, width, resized height, resized width, patches): transformers'
    /// `smart_resize(h, w, 28, 3136, 12845056)` and the processor's
    /// `get_number_of_image_patches(h, w, {})` for Qwen2.5-VL-3B.
    const QWEN_3B: &[(u32, u32, u32, u32, u64)] = &[
        (720, 1280, 728, 1288, 4784),
        (480, 640, 476, 644, 1564),
        (224, 224, 224, 224, 256),
        (200, 3000, 196, 2996, 2996),
        (3000, 200, 2996, 196, 2996),
        (1080, 1920, 1092, 1932, 10764),
        (1, 1, 56, 56, 16),
        (14, 14, 56, 56, 16),
        (28, 28, 56, 56, 16),
        (42, 70, 56, 56, 16),
        (97, 389, 84, 392, 168),
        (4000, 3000, 4004, 2996, 61204),
        (4032, 3024, 4032, 3024, 62208),
        (10000, 10000, 3556, 3556, 64516),
        (50, 10000, 56, 9996, 2856),
        (383, 385, 392, 392, 784),
        (384, 384, 392, 392, 784),
        (385, 384, 392, 392, 784),
        (56, 56, 56, 56, 16),
        (55, 57, 56, 56, 16),
        (70, 42, 56, 56, 16),
        (14, 2800, 28, 812, 116),
    ];

    /// `smart_resize(h, w, 28, 3136, 1003520)`: the processor's defaults
    /// when a preprocessor config sets no pixel bounds.
    const QWEN_DEFAULT_BOUNDS: &[(u32, u32, u32, u32)] =
        &[(720, 1280, 728, 1288), (1080, 1920, 728, 1316), (4000, 3000, 1148, 840)];

    /// (height, width, resized height, resized width, rows, cols, images):
    /// `Idefics3ImageProcessor(**preprocessor_config)` run on a blank
    /// picture with `return_row_col_info=True` (rows, cols, and the length
    /// of its `pixel_values`), the resized size from its
    /// `_resize_output_size_rescale_to_max_len` then
    /// `_resize_output_size_scale_below_upper_bound(.., 4096)`.
    /// SmolVLMImageProcessor gives the same for every size.
    const SMOLVLM_INSTRUCT: &[(u32, u32, u32, u32, u32, u32, u32)] = &[
        (720, 1280, 864, 1536, 3, 4, 13),
        (480, 640, 1152, 1536, 3, 4, 13),
        (224, 224, 1536, 1536, 4, 4, 17),
        (200, 3000, 102, 1536, 1, 4, 5),
        (3000, 200, 1536, 102, 4, 1, 5),
        (1080, 1920, 864, 1536, 3, 4, 13),
        (1, 1, 1536, 1536, 4, 4, 17),
        (14, 14, 1536, 1536, 4, 4, 17),
        (28, 28, 1536, 1536, 4, 4, 17),
        (42, 70, 922, 1536, 3, 4, 13),
        (97, 389, 384, 1536, 1, 4, 5),
        (4000, 3000, 1536, 1152, 4, 3, 13),
        (4032, 3024, 1536, 1152, 4, 3, 13),
        (10000, 10000, 1536, 1536, 4, 4, 17),
        (50, 10000, 8, 1536, 1, 4, 5),
        (383, 385, 1528, 1536, 4, 4, 17),
        (384, 384, 1536, 1536, 4, 4, 17),
        (385, 384, 1536, 1532, 4, 4, 17),
        (1536, 1, 1536, 2, 4, 1, 5),
        (3, 601, 8, 1536, 1, 4, 5),
    ];

    /// The same for SmolVLM-256M-Instruct (longest edge 2048, tiles of 512).
    const SMOLVLM_256M: &[(u32, u32, u32, u32, u32, u32, u32)] = &[
        (720, 1280, 1152, 2048, 3, 4, 13),
        (480, 640, 1536, 2048, 3, 4, 13),
        (224, 224, 2048, 2048, 4, 4, 17),
        (200, 3000, 136, 2048, 1, 4, 5),
        (3000, 200, 2048, 136, 4, 1, 5),
        (1080, 1920, 1152, 2048, 3, 4, 13),
        (1, 1, 2048, 2048, 4, 4, 17),
        (14, 14, 2048, 2048, 4, 4, 17),
        (28, 28, 2048, 2048, 4, 4, 17),
        (42, 70, 1228, 2048, 3, 4, 13),
        (97, 389, 510, 2048, 1, 4, 5),
        (4000, 3000, 2048, 1536, 4, 3, 13),
        (4032, 3024, 2048, 1536, 4, 3, 13),
        (10000, 10000, 2048, 2048, 4, 4, 17),
        (50, 10000, 10, 2048, 1, 4, 5),
        (383, 385, 2038, 2048, 4, 4, 17),
        (384, 384, 2048, 2048, 4, 4, 17),
        (385, 384, 2048, 2042, 4, 4, 17),
        (1536, 1, 2048, 2, 4, 1, 5),
        (3, 601, 10, 2048, 1, 4, 5),
    ];

    /// SmolVLM-Instruct's processor with `do_resize=False`: small pictures
    /// are one tile, large ones many.
    const SMOLVLM_NO_RESIZE: &[(u32, u32, u32, u32, u32, u32, u32)] = &[
        (720, 1280, 720, 1280, 3, 4, 13),
        (480, 640, 480, 640, 2, 2, 5),
        (224, 224, 224, 224, 0, 0, 1),
        (200, 3000, 200, 3000, 1, 8, 9),
        (3000, 200, 3000, 200, 8, 1, 9),
        (1080, 1920, 1080, 1920, 3, 5, 16),
        (1, 1, 1, 1, 0, 0, 1),
        (14, 14, 14, 14, 0, 0, 1),
        (28, 28, 28, 28, 0, 0, 1),
        (42, 70, 42, 70, 0, 0, 1),
        (97, 389, 97, 389, 1, 2, 3),
        (4000, 3000, 4000, 3000, 11, 9, 100),
        (4032, 3024, 4032, 3024, 11, 9, 100),
        (10000, 10000, 10000, 10000, 27, 27, 730),
        (50, 10000, 50, 10000, 1, 27, 28),
        (383, 385, 383, 385, 2, 2, 5),
        (384, 384, 384, 384, 0, 0, 1),
        (385, 384, 385, 384, 2, 2, 5),
        (1536, 1, 1536, 1, 4, 1, 5),
        (3, 601, 3, 601, 1, 2, 3),
    ];

    /// SmolVLM-Instruct's processor with `do_image_splitting=False`.
    const SMOLVLM_NO_SPLIT: &[(u32, u32, u32, u32, u32, u32, u32)] = &[
        (720, 1280, 864, 1536, 0, 0, 1),
        (480, 640, 1152, 1536, 0, 0, 1),
        (224, 224, 1536, 1536, 0, 0, 1),
        (200, 3000, 102, 1536, 0, 0, 1),
        (3000, 200, 1536, 102, 0, 0, 1),
        (1080, 1920, 864, 1536, 0, 0, 1),
        (1, 1, 1536, 1536, 0, 0, 1),
        (14, 14, 1536, 1536, 0, 0, 1),
        (28, 28, 1536, 1536, 0, 0, 1),
        (42, 70, 922, 1536, 0, 0, 1),
        (97, 389, 384, 1536, 0, 0, 1),
        (4000, 3000, 1536, 1152, 0, 0, 1),
        (4032, 3024, 1536, 1152, 0, 0, 1),
        (10000, 10000, 1536, 1536, 0, 0, 1),
        (50, 10000, 8, 1536, 0, 0, 1),
        (383, 385, 1528, 1536, 0, 0, 1),
        (384, 384, 1536, 1536, 0, 0, 1),
        (385, 384, 1536, 1532, 0, 0, 1),
        (1536, 1, 1536, 2, 0, 0, 1),
        (3, 601, 8, 1536, 0, 0, 1),
    ];

    #[test]
    fn qwen_smart_resize_matches_transformers() {
        for &(h, w, rh, rw, patches) in QWEN_3B {
            assert_eq!(qwen_smart_resize(h, w, 28, 3136, 12_845_056), Ok((rh, rw)), "{h}x{w}");
            let grid = qwen_image_grid(h, w, 14, 2, 3136, 12_845_056).unwrap();
            assert_eq!(grid.resized, (rh, rw));
            assert_eq!(
                u64::from(grid.patches.0) * u64::from(grid.patches.1),
                patches,
                "{h}x{w}"
            );
            assert_eq!(grid.tokens, patches / 4, "{h}x{w}");
        }
        for &(h, w, rh, rw) in QWEN_DEFAULT_BOUNDS {
            assert_eq!(qwen_smart_resize(h, w, 28, 3136, 1_003_520), Ok((rh, rw)), "{h}x{w}");
        }
    }

    #[test]
    fn a_camera_frame_is_1196_qwen_image_tokens() {
        // 720 / 28 = 25.7 and 1280 / 28 = 45.7 round to 26 x 46 merged patches.
        let grid = qwen_image_grid(720, 1280, 14, 2, 3136, 12_845_056).unwrap();
        assert_eq!(grid.resized, (728, 1288));
        assert_eq!(grid.patches, (52, 92));
        assert_eq!(grid.tokens, 1196);
    }

    #[test]
    fn qwen_rounds_half_to_even_as_python() {
        // 70 / 28 = 2.5 rounds to 2 in Python (to 3 away from zero), 126 /
        // 28 = 4.5 to 4; the pixel bounds are wide enough not to move them.
        assert_eq!(qwen_smart_resize(70, 126, 28, 1, u64::MAX), Ok((56, 112)));
        // round(42 / 28) = round(1.5) = 2.
        assert_eq!(qwen_smart_resize(42, 42, 28, 1, u64::MAX), Ok((56, 56)));
    }

    #[test]
    fn qwen_refuses_what_transformers_refuses() {
        // smart_resize(1536, 1, ...) and (3, 601): ValueError, aspect ratio over 200.
        for (h, w) in [(1536, 1), (3, 601), (1, 201)] {
            let err = qwen_smart_resize(h, w, 28, 3136, 12_845_056).unwrap_err();
            assert!(matches!(err, SizingError::AspectRatio { .. }), "{err}");
            assert!(err.to_string().contains("over 200"), "{err}");
        }
        // Exactly 200 is allowed.
        assert!(qwen_smart_resize(1, 200, 28, 3136, 12_845_056).is_ok());
        assert_eq!(
            qwen_smart_resize(0, 5, 28, 3136, 12_845_056),
            Err(SizingError::EmptyPicture { width: 5, height: 0 })
        );
        assert!(matches!(
            qwen_image_grid(10, 10, 0, 2, 1, 100),
            Err(SizingError::ZeroSetting { .. })
        ));
        // A min_pixels no 32-bit side holds.
        assert!(matches!(
            qwen_smart_resize(1, 1, 28, u64::MAX, u64::MAX),
            Err(SizingError::Overflow { .. })
        ));
    }

    fn smolvlm(longest_edge: Option<u32>, tile: u32, splitting: bool, seq: u32) -> Idefics3Params {
        Idefics3Params {
            longest_edge,
            tile,
            splitting,
            image_seq_len: seq,
        }
    }

    fn check_idefics3(vectors: &[(u32, u32, u32, u32, u32, u32, u32)], params: &Idefics3Params) {
        for &(h, w, rh, rw, rows, cols, images) in vectors {
            let split = idefics3_split(h, w, params).unwrap();
            assert_eq!(split.resized, (rh, rw), "{h}x{w}");
            assert_eq!((split.rows, split.cols, split.images), (rows, cols, images), "{h}x{w}");
            assert_eq!(split.tokens, u64::from(images) * u64::from(params.image_seq_len));
            if params.splitting {
                let (eh, ew) = split.encoder_size;
                assert!(eh % params.tile == 0 && ew % params.tile == 0, "{h}x{w}: {eh}x{ew}");
            }
        }
    }

    #[test]
    fn idefics3_splitting_matches_transformers() {
        check_idefics3(SMOLVLM_INSTRUCT, &smolvlm(Some(1536), 384, true, 81));
        check_idefics3(SMOLVLM_256M, &smolvlm(Some(2048), 512, true, 64));
        check_idefics3(SMOLVLM_NO_RESIZE, &smolvlm(None, 384, true, 81));
        check_idefics3(SMOLVLM_NO_SPLIT, &smolvlm(Some(1536), 384, false, 81));
    }

    #[test]
    fn a_camera_frame_is_13_smolvlm_images() {
        // 1280x720: long side to 1536, short to 864, up to 1152 = 3 tiles of
        // 384; 3 x 4 tiles plus the global image, 81 tokens each.
        let split = idefics3_split(720, 1280, &smolvlm(Some(1536), 384, true, 81)).unwrap();
        assert_eq!(split.resized, (864, 1536));
        assert_eq!(split.encoder_size, (1152, 1536));
        assert_eq!((split.rows, split.cols, split.images, split.tokens), (3, 4, 13, 1053));
        // A picture of one tile or less, not resized first: the global image alone.
        let split = idefics3_split(224, 224, &smolvlm(None, 384, true, 81)).unwrap();
        assert_eq!((split.rows, split.cols, split.images, split.tokens), (0, 0, 1, 81));
    }

    #[test]
    fn image_seq_len_is_the_shuffled_patch_grid() {
        // int(((384 // 14) ** 2) / (3 ** 2)) and int(((512 // 16) ** 2) / (4 ** 2)).
        assert_eq!(idefics3_image_seq_len(384, 14, 3), Ok(81));
        assert_eq!(idefics3_image_seq_len(512, 16, 4), Ok(64));
        // Idefics3's own default: int(((364 // 14) ** 2) / (2 ** 2)) = 169.
        assert_eq!(idefics3_image_seq_len(364, 14, 2), Ok(169));
        assert!(idefics3_image_seq_len(14, 14, 2).is_err());
        assert!(idefics3_image_seq_len(384, 0, 3).is_err());
    }

    #[test]
    fn idefics3_refuses_empty_pictures_and_zero_settings() {
        let params = smolvlm(Some(1536), 384, true, 81);
        assert_eq!(
            idefics3_split(0, 10, &params),
            Err(SizingError::EmptyPicture { width: 10, height: 0 })
        );
        assert!(idefics3_split(10, 10, &smolvlm(Some(1536), 0, true, 81)).is_err());
        assert!(idefics3_split(10, 10, &smolvlm(Some(0), 384, true, 81)).is_err());
    }

    #[test]
    fn llava_is_a_fixed_grid() {
        // (336 // 14) ** 2 = 576, the CLS token dropped by "default".
        assert_eq!(llava_image_tokens(336, 14, false), Ok(576));
        assert_eq!(llava_image_tokens(336, 14, true), Ok(577));
        assert!(llava_image_tokens(10, 14, false).is_err());
    }
}
