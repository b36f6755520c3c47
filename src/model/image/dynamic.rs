//! Dynamic resolution (Qwen2-VL, Qwen2.5-VL): the picture's own size, within
//! the model's pixel budget, decides the patch grid and so how many image
//! tokens it costs.
//!
//! The steps are the Hugging Face `Qwen2VLImageProcessor`'s: `smart_resize`
//! the picture to multiples of `patch_size * merge_size` inside
//! `[min_pixels, max_pixels]` (PIL bicubic), rescale and normalise, then cut
//! it into patches of `3 x temporal_patch_size x patch x patch` values (the
//! one frame repeated over time), listed merge-group by merge-group. The
//! vision graph also takes what its tower would compute with Python loops:
//! each patch's (row, column), and the windows its window-attention layers
//! attend within (`get_window_index`).

use super::resample::{resize_rgb8, Filter};
use super::sizing::qwen_smart_resize;
use super::ImageError;

/// The manifest's `vision.dynamic` object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct DynamicResolution {
    /// Side of one vision patch, in pixels (14).
    pub patch_size: u32,
    /// Patches merged into one image token along each side (2).
    pub merge_size: u32,
    /// Frames one patch spans; a picture is repeated to fill them (2).
    pub temporal_patch_size: u32,
    /// Side of a window-attention window, in pixels (112).
    pub window_size: u32,
    /// The picture is scaled up to at least this many pixels.
    pub min_pixels: u64,
    /// The pixel budget: the picture is scaled down to at most this many
    /// pixels, which bounds its image tokens at `max_pixels / factor^2`.
    pub max_pixels: u64,
}

/// The largest pixel budget a manifest may set (its vision graph's full
/// attention holds `(pixels / 196)^2` scores per head).
pub const MAX_BUDGET_PIXELS: u64 = 16 << 20;

/// A picture's patch grid, in patches (both even: whole merge groups).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchGrid {
    pub rows: usize,
    pub cols: usize,
    /// `merge_size` of the model.
    pub merge: usize,
}

impl PatchGrid {
    /// Patches: rows of `pixel_values`.
    pub fn patches(&self) -> usize {
        self.rows * self.cols
    }

    /// Image tokens along the height.
    pub fn token_rows(&self) -> usize {
        self.rows / self.merge
    }

    /// Image tokens along the width.
    pub fn token_cols(&self) -> usize {
        self.cols / self.merge
    }

    /// Image tokens: rows of `image_embeds`.
    pub fn tokens(&self) -> usize {
        self.token_rows() * self.token_cols()
    }
}

impl DynamicResolution {
    /// `patch_size * merge_size`: the multiple both resized sides are.
    pub fn factor(&self) -> u32 {
        self.patch_size * self.merge_size
    }

    /// Values per patch: `3 x temporal_patch_size x patch_size^2`.
    pub fn patch_len(&self) -> usize {
        3 * self.temporal_patch_size as usize * (self.patch_size as usize).pow(2)
    }

    /// The most patches a picture can have under the budget.
    pub fn max_patches(&self) -> usize {
        (self.max_pixels / u64::from(self.patch_size).pow(2)) as usize
    }

    /// The most image tokens one picture can cost.
    pub fn max_tokens(&self) -> usize {
        (self.max_pixels / u64::from(self.factor()).pow(2)) as usize
    }

    pub fn validate(&self) -> Result<(), ImageError> {
        let bad = |m: String| Err(ImageError::Config(m));
        if !(1..=64).contains(&self.patch_size)
            || !(1..=8).contains(&self.merge_size)
            || !(1..=8).contains(&self.temporal_patch_size)
        {
            return bad(format!(
                "dynamic resolution: patch_size {} (1 to 64), merge_size {} and temporal_patch_size {} (1 to 8)",
                self.patch_size, self.merge_size, self.temporal_patch_size
            ));
        }
        let factor = u64::from(self.factor());
        if self.window_size == 0 || !self.window_size.is_multiple_of(self.factor()) {
            return bad(format!(
                "dynamic resolution: window_size {} must be a positive multiple of patch_size x merge_size = {factor}",
                self.window_size
            ));
        }
        if self.min_pixels == 0 || self.min_pixels > self.max_pixels || self.max_pixels < factor * factor {
            return bad(format!(
                "dynamic resolution: min_pixels {} and max_pixels {} must satisfy 0 < min <= max, max >= {}",
                self.min_pixels,
                self.max_pixels,
                factor * factor
            ));
        }
        if self.max_pixels > MAX_BUDGET_PIXELS {
            return bad(format!(
                "dynamic resolution: max_pixels {} is more than the {MAX_BUDGET_PIXELS} this build accepts",
                self.max_pixels
            ));
        }
        Ok(())
    }

    /// The patch grid of a `width x height` picture.
    pub fn grid(&self, width: u32, height: u32) -> Result<PatchGrid, ImageError> {
        let (h, w) = qwen_smart_resize(height, width, self.factor(), self.min_pixels, self.max_pixels)
            .map_err(|e| ImageError::Unsizable(e.to_string()))?;
        let patch = self.patch_size as usize;
        let grid = PatchGrid {
            rows: h as usize / patch,
            cols: w as usize / patch,
            merge: self.merge_size as usize,
        };
        // smart_resize keeps at least one token a side, so a long, thin
        // picture can come out over the budget (transformers lets it): here
        // the budget bounds every buffer and the manifest's image_tokens, so
        // such a picture is refused, naming the budget that would take it.
        if grid.tokens() > self.max_tokens() {
            let factor = u64::from(self.factor());
            return Err(ImageError::Unsizable(format!(
                "picture {width}x{height}: smart_resize makes it {} x {} tokens ({}), more than the {} this model's \
                 pixel budget of {} pixels holds; crop it, or export the model with --max-pixels {} or more",
                grid.token_rows(),
                grid.token_cols(),
                grid.tokens(),
                self.max_tokens(),
                self.max_pixels,
                grid.tokens() as u64 * factor * factor
            )));
        }
        Ok(grid)
    }
}

/// What one picture feeds the vision graph, in buffers sized once for the
/// largest picture the budget allows.
#[derive(Debug, Clone, Default)]
pub struct DynamicPixels {
    /// `pixel_values`: `[patches, patch_len]`.
    pub pixels: Vec<f32>,
    /// `patch_positions`: `[patches, 2]`, (row, column) of each patch.
    pub patch_positions: Vec<i64>,
    /// `window_index`: `[tokens]`, the merge groups in window order.
    pub window_index: Vec<i64>,
    /// `window_reverse`: the inverse permutation of `window_index`.
    pub window_reverse: Vec<i64>,
    /// `window_ids`: `[patches]`, the window of each patch in window order.
    pub window_ids: Vec<i64>,
    pub grid: Option<PatchGrid>,
}

impl DynamicPixels {
    /// Buffers for the largest picture `spec` allows.
    pub fn for_spec(spec: &DynamicResolution) -> Self {
        let patches = spec.max_patches();
        let tokens = spec.max_tokens();
        DynamicPixels {
            pixels: Vec::with_capacity(patches * spec.patch_len()),
            patch_positions: Vec::with_capacity(patches * 2),
            window_index: Vec::with_capacity(tokens),
            window_reverse: Vec::with_capacity(tokens),
            window_ids: Vec::with_capacity(patches),
            grid: None,
        }
    }
}

/// Per-channel normalisation as the Hugging Face processor does it: the
/// rescale in f64 rounded to f32 (`rescale`'s `astype(float32)`), then
/// `(x - mean) / std` in f32.
pub(super) fn channel_tables(rescale: f32, mean: [f32; 3], std: [f32; 3]) -> [[f32; 256]; 3] {
    // 1/255 is stored as f32 in the manifest; the processor multiplies by the
    // f64 1/255.
    let inv = 1.0 / f64::from(rescale);
    let scale = if (inv - inv.round()).abs() <= 1e-6 * inv.round() {
        1.0 / inv.round()
    } else {
        f64::from(rescale)
    };
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, entry) in table.iter_mut().enumerate() {
            let scaled = (v as f64 * scale) as f32;
            *entry = (scaled - mean[c]) / std[c];
        }
    }
    lut
}

/// Resizes the packed RGB8 `src` (`sw x sh`) to its grid, normalises it and
/// writes every input of the vision graph into `out`.
pub(super) fn fill(
    spec: &DynamicResolution,
    lut: &[[f32; 256]; 3],
    src: &[u8],
    sw: usize,
    sh: usize,
    out: &mut DynamicPixels,
) -> Result<PatchGrid, ImageError> {
    let grid = spec.grid(sw as u32, sh as u32)?;
    let p = spec.patch_size as usize;
    let m = grid.merge;
    let (tw, th) = (grid.cols * p, grid.rows * p);
    let resized = resize_rgb8(src, sw, sh, tw, th, Filter::Bicubic);
    let temporal = spec.temporal_patch_size as usize;
    out.pixels.clear();
    out.patch_positions.clear();
    // Patches in the processor's order: merge group by merge group (rows of
    // groups, then columns), the group's patches row by row; each patch is
    // channel, then time (the same frame), then its pixels row by row.
    for group_row in 0..grid.token_rows() {
        for group_col in 0..grid.token_cols() {
            for inner_row in 0..m {
                for inner_col in 0..m {
                    let row = group_row * m + inner_row;
                    let col = group_col * m + inner_col;
                    out.patch_positions.extend([row as i64, col as i64]);
                    for (c, table) in lut.iter().enumerate() {
                        for _ in 0..temporal {
                            for y in row * p..(row + 1) * p {
                                let line = &resized[(y * tw + col * p) * 3..(y * tw + (col + 1) * p) * 3];
                                out.pixels
                                    .extend(line.chunks_exact(3).map(|px| table[usize::from(px[c])]));
                            }
                        }
                    }
                }
            }
        }
    }
    window_inputs(spec, grid, out);
    out.grid = Some(grid);
    Ok(grid)
}

/// `get_window_index` of the Qwen2.5-VL vision tower: the image tokens
/// (merge groups) listed window by window, windows of
/// `window_size / patch_size / merge_size` tokens a side, the last row and
/// column of windows cut short by the picture's edge.
fn window_inputs(spec: &DynamicResolution, grid: PatchGrid, out: &mut DynamicPixels) {
    let side = (spec.window_size / spec.factor()) as usize;
    let (rows, cols) = (grid.token_rows(), grid.token_cols());
    let unit = grid.merge * grid.merge;
    out.window_index.clear();
    out.window_ids.clear();
    let mut window = 0i64;
    for window_row in 0..rows.div_ceil(side) {
        for window_col in 0..cols.div_ceil(side) {
            for row in window_row * side..((window_row + 1) * side).min(rows) {
                for col in window_col * side..((window_col + 1) * side).min(cols) {
                    out.window_index.push((row * cols + col) as i64);
                    out.window_ids.extend(std::iter::repeat_n(window, unit));
                }
            }
            window += 1;
        }
    }
    out.window_reverse.clear();
    out.window_reverse.resize(out.window_index.len(), 0);
    for (at, &token) in out.window_index.iter().enumerate() {
        // window_index is a permutation of 0..tokens (every token is in
        // exactly one window), so `token` is in range.
        out.window_reverse[token as usize] = at as i64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DynamicResolution {
        DynamicResolution {
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            window_size: 112,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 64,
        }
    }

    #[test]
    fn windows_cover_every_token_once_and_reverse_inverts() {
        let s = spec();
        for (rows, cols) in [(4, 4), (6, 10), (16, 12), (20, 34), (2, 2)] {
            let grid = PatchGrid { rows, cols, merge: 2 };
            let mut out = DynamicPixels::default();
            window_inputs(&s, grid, &mut out);
            let mut seen = out.window_index.clone();
            seen.sort_unstable();
            assert_eq!(seen, (0..grid.tokens() as i64).collect::<Vec<_>>());
            for (at, &token) in out.window_index.iter().enumerate() {
                assert_eq!(out.window_reverse[token as usize], at as i64);
            }
            assert_eq!(out.window_ids.len(), grid.patches());
            // ids never go back: each window is one contiguous run
            assert!(out.window_ids.windows(2).all(|w| w[0] <= w[1]));
        }
    }

    #[test]
    fn a_window_is_four_tokens_a_side() {
        // 6 x 10 merged tokens: windows of 4 x 4, cut to 2 rows and 2 columns
        // at the edges: 2 x 3 windows.
        let grid = PatchGrid {
            rows: 12,
            cols: 20,
            merge: 2,
        };
        let mut out = DynamicPixels::default();
        window_inputs(&spec(), grid, &mut out);
        assert_eq!(&out.window_index[..5], &[0, 1, 2, 3, 10]);
        assert_eq!(*out.window_ids.last().unwrap(), 5);
    }

    /// The committed outputs of Hugging Face's `Qwen2VLImageProcessor`
    /// (scripts/fixtures/qwen2vl_fixtures.py): every value equal, bit for
    /// bit, and the index inputs the vision tower's own rules give.
    #[test]
    fn pictures_come_out_as_the_hugging_face_processor_makes_them() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fixtures/qwen2vl");
        let mut checked = 0;
        for name in ["chelsea-crop-61x93", "coffee-crop-130x47", "chelsea-224"] {
            let meta: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap()).unwrap();
            let proc = &meta["processor"];
            let spec = DynamicResolution {
                patch_size: 14,
                merge_size: 2,
                temporal_patch_size: 2,
                window_size: 56,
                min_pixels: proc["min_pixels"].as_u64().unwrap(),
                max_pixels: proc["max_pixels"].as_u64().unwrap(),
            };
            let floats = |key: &str| -> [f32; 3] {
                let v: Vec<f32> = proc[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect();
                [v[0], v[1], v[2]]
            };
            let lut = channel_tables(1.0 / 255.0, floats("image_mean"), floats("image_std"));
            let (rgb, _) = super::super::decode_file_rgb8(&dir.join(format!("{name}.png")), 1 << 24).unwrap();
            let mut out = DynamicPixels::for_spec(&spec);
            let grid = fill(
                &spec,
                &lut,
                rgb.as_raw(),
                rgb.width() as usize,
                rgb.height() as usize,
                &mut out,
            )
            .unwrap();
            let thw = meta["grid_thw"].as_array().unwrap();
            assert_eq!(
                (grid.rows as u64, grid.cols as u64),
                (thw[1].as_u64().unwrap(), thw[2].as_u64().unwrap())
            );
            let expected = crate::model::image::read_f32_fixture(&dir.join(format!("{name}.f32")));
            assert_eq!(out.pixels.len(), expected.len(), "{name}");
            let differ = out
                .pixels
                .iter()
                .zip(&expected)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differ, 0, "{name}: {differ} of {} values differ", expected.len());
            let index = &meta["index_inputs"]["window_size_56"];
            let ints = |key: &str| -> Vec<i64> {
                let v = &index[key];
                let flat: Vec<i64> = match v.as_array().unwrap().first() {
                    Some(serde_json::Value::Array(_)) => v
                        .as_array()
                        .unwrap()
                        .iter()
                        .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
                        .collect(),
                    _ => v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect(),
                };
                flat
            };
            assert_eq!(out.patch_positions, ints("patch_positions"), "{name}");
            assert_eq!(out.window_index, ints("window_index"), "{name}");
            assert_eq!(out.window_reverse, ints("window_reverse"), "{name}");
            assert_eq!(out.window_ids, ints("window_ids"), "{name}");
            checked += 1;
        }
        assert_eq!(checked, 3);
    }

    #[test]
    fn the_budget_bounds_the_grid() {
        let s = spec();
        let grid = s.grid(4000, 3000).unwrap();
        assert!(grid.tokens() <= s.max_tokens());
        assert!(grid.patches() <= s.max_patches());
        assert!(s.grid(100_000, 10).is_err(), "aspect ratio over 200");
        // Long and thin: smart_resize's floor of one token a side leaves it
        // over the budget (transformers gives 1 x 55 tokens; the budget holds 16).
        let small = DynamicResolution {
            max_pixels: 28 * 28 * 16,
            ..s
        };
        let err = small.grid(4000, 21).unwrap_err().to_string();
        assert!(
            err.contains("1 x 55 tokens (55), more than the 16") && err.contains("--max-pixels 43120 or more"),
            "{err}"
        );
        assert_eq!(small.grid(448, 448).unwrap().tokens(), 16);
    }
}
