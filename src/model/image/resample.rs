//! PIL's antialiased resampling (`Image.resize` with `BILINEAR`, `BICUBIC` or
//! `LANCZOS`) for packed RGB u8, reproduced bit for bit.
//!
//! The arithmetic follows Pillow's `src/libImaging/Resample.c` (checked
//! against Pillow 11.3 with the fixtures in `tests/data/pil_resize.json`):
//!
//! - per output index `i`, the filter is centred on `center = (i + 0.5) * scale`
//!   (`scale = in / out`, f64) and stretched by `filterscale = max(scale, 1)`,
//!   so a downscale averages over all the source pixels it covers;
//! - taps `[xmin, xmin + n)` with `xmin = trunc(center - support + 0.5)` and
//!   `xmax = trunc(center + support + 0.5)` clamped to the image, weights
//!   `filter((x + xmin - center + 0.5) / filterscale)` normalised by their sum;
//! - weights become fixed point with 22 fractional bits (`PRECISION_BITS =
//!   32 - 8 - 2`), rounded half away from zero; each output is
//!   `(2^21 + sum(pixel * weight)) >> 22` clipped to 0..=255;
//! - two separable passes, horizontal then vertical, each rounded and clipped
//!   to u8 in between; a pass whose size does not change is skipped (it would
//!   be the identity anyway).
//!
//! Sizes must be below 2^24 to match PIL (it computes `in1 - in0` in f32);
//! larger ones (a shortest-edge resize of a 60000 x 1 picture) are resized
//! all the same, only not bit for bit. Only the output window asked for is
//! computed ([`resize_rgb8_window`]), so memory follows the window, not the
//! resized size.

/// The resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// PIL `Image.BILINEAR`: triangle, support 1.
    Bilinear,
    /// PIL `Image.BICUBIC`: Keys cubic with a = -0.5, support 2.
    Bicubic,
    /// PIL `Image.LANCZOS`: `sinc(x) sinc(x / 3)` on `[-3, 3)`, support 3
    /// (the Idefics3 / SmolVLM processor's default).
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        if self == Filter::Lanczos {
            // Pillow's window is half-open and not folded to |x|: -3 is in, 3 is out.
            return if (-3.0..3.0).contains(&x) {
                sinc(x) * sinc(x / 3.0)
            } else {
                0.0
            };
        }
        let x = if x < 0.0 { -x } else { x };
        match self {
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                // Pillow: ((a + 2) x - (a + 3)) x x + 1 and (((x - 5) x + 8) x - 4) a, a = -0.5,
                // with the constants folded exactly as a C compiler does.
                if x < 1.0 {
                    (1.5 * x - 2.5) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
                } else {
                    0.0
                }
            }
            Filter::Lanczos => 0.0, // handled above
        }
    }
}

/// Pillow's `sinc_filter`: `sin(pi x) / (pi x)`, in this order of operations.
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The fixed-point weights of one pass, for the output indices
/// `first .. first + bounds.len()` of an `out_size` resize: output `i` reads
/// source indices `bounds[i].0 .. bounds[i].0 + bounds[i].1`. Weights come
/// from a table when it is small, else are computed when needed with the
/// same arithmetic (so the same bits): a pass over a 64-million-pixel edge
/// would need a table of gigabytes.
struct Coeffs {
    filter: Filter,
    scale: f64,
    /// `1 / filterscale`.
    ss: f64,
    first: usize,
    bounds: Vec<(usize, usize)>,
    /// Each output's sum of raw filter values (the normaliser).
    norms: Vec<f64>,
    /// Where output `i`'s weights start in `table` (empty: computed).
    offsets: Vec<usize>,
    table: Vec<i32>,
}

/// The most weights kept in a table (16 MiB); past that they are computed.
const MAX_TABLE_WEIGHTS: usize = 4 << 20;

impl Coeffs {
    /// Weights of the outputs `first .. first + count` of an `in_size` to
    /// `out_size` pass (`first + count <= out_size`).
    fn new(in_size: usize, out_size: usize, first: usize, count: usize, filter: Filter) -> Self {
        Self::with_table_limit(in_size, out_size, first, count, filter, MAX_TABLE_WEIGHTS)
    }

    fn with_table_limit(
        in_size: usize,
        out_size: usize,
        first: usize,
        count: usize,
        filter: Filter,
        max_table: usize,
    ) -> Self {
        // (double)(in1 - in0) / outSize, with in0 = 0 and in1 = (float)in_size
        let scale = in_size as f32 as f64 / out_size as f64;
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        let support = filter.support() * filterscale;
        let ksize = (support.ceil() as usize).saturating_mul(2).saturating_add(1);
        let mut coeffs = Coeffs {
            filter,
            scale,
            ss: 1.0 / filterscale,
            first,
            bounds: Vec::with_capacity(count),
            norms: Vec::with_capacity(count),
            offsets: Vec::new(),
            table: Vec::new(),
        };
        let mut taps = 0usize;
        for i in first..first + count {
            let center = coeffs.center(i);
            // C's (int) cast truncates toward zero; negative values clamp to 0 either way.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin).min(ksize);
            let mut ww = 0.0;
            for x in 0..n {
                ww += coeffs.raw(center, xmin, x);
            }
            coeffs.bounds.push((xmin, n));
            coeffs.norms.push(ww);
            taps = taps.saturating_add(n);
        }
        if taps <= max_table {
            coeffs.offsets.reserve(count);
            coeffs.table.reserve(taps);
            for i in 0..count {
                coeffs.offsets.push(coeffs.table.len());
                for x in 0..coeffs.bounds[i].1 {
                    let w = coeffs.compute(i, x);
                    coeffs.table.push(w);
                }
            }
        }
        coeffs
    }

    fn center(&self, absolute: usize) -> f64 {
        (absolute as f64 + 0.5) * self.scale
    }

    /// The filter's value for tap `x` of an output centred on `center`.
    fn raw(&self, center: f64, xmin: usize, x: usize) -> f64 {
        self.filter.eval((x as f64 + xmin as f64 - center + 0.5) * self.ss)
    }

    /// Weight `x` of output `i` (relative to `first`), normalised and in
    /// fixed point, rounded half away from zero.
    fn compute(&self, i: usize, x: usize) -> i32 {
        let (xmin, _) = self.bounds[i];
        let kx = self.raw(self.center(self.first + i), xmin, x);
        let ww = self.norms[i];
        let w = if ww != 0.0 { kx / ww } else { kx };
        let fixed = w * f64::from(1u32 << PRECISION_BITS);
        if w < 0.0 {
            (-0.5 + fixed) as i32
        } else {
            (0.5 + fixed) as i32
        }
    }

    #[inline]
    fn weight(&self, i: usize, x: usize) -> i32 {
        match self.offsets.get(i) {
            Some(&offset) => self.table[offset + x],
            None => self.compute(i, x),
        }
    }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// The part of a resize's output wanted: columns `x0 .. x0 + width` and rows
/// `y0 .. y0 + height` of the `dw x dh` result (a centre crop, or all of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub x0: usize,
    pub y0: usize,
    pub width: usize,
    pub height: usize,
}

/// Resizes packed RGB u8 (`src.len() == 3 * sw * sh`) to `dw x dh` exactly as
/// PIL's `Image.resize((dw, dh), filter)` does for an RGB image. Returns the
/// packed RGB output; empty if a size is zero or `src` has the wrong length.
pub fn resize_rgb8(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize, filter: Filter) -> Vec<u8> {
    let all = Window {
        x0: 0,
        y0: 0,
        width: dw,
        height: dh,
    };
    resize_rgb8_window(src, sw, sh, dw, dh, all, filter)
}

/// [`resize_rgb8`], keeping only `window` of the result: the same bytes as
/// resizing whole and cropping, but only the window is computed and held.
/// Memory beyond `src` is bounded by the window (an i32 accumulator per
/// output byte, one resized row) and at most 16 MiB of weights, whatever
/// `dw` and `dh` are: a 60000 x 1 picture resized so its short edge is 336
/// would otherwise be 20 million columns wide. Returns an empty vector if a
/// size is zero, `src` has the wrong length or the window is not inside
/// the output.
pub fn resize_rgb8_window(
    src: &[u8],
    sw: usize,
    sh: usize,
    dw: usize,
    dh: usize,
    window: Window,
    filter: Filter,
) -> Vec<u8> {
    let Window { x0, y0, width, height } = window;
    let fits = sw.checked_mul(sh).and_then(|p| p.checked_mul(3)) == Some(src.len())
        && x0.checked_add(width).is_some_and(|end| end <= dw)
        && y0.checked_add(height).is_some_and(|end| end <= dh);
    if sw == 0 || sh == 0 || width == 0 || height == 0 || !fits {
        return Vec::new(); // callers check sizes first; never index out of bounds
    }
    let need_h = dw != sw;
    let need_v = dh != sh;
    let stride = width * 3;
    let hor = need_h.then(|| Coeffs::new(sw, dw, x0, width, filter));
    // One source row through the horizontal pass (or cropped, without one).
    let horizontal = |y: usize, out: &mut [u8]| {
        let in_row = &src[y * sw * 3..(y + 1) * sw * 3];
        let Some(hor) = &hor else {
            out.copy_from_slice(&in_row[x0 * 3..(x0 + width) * 3]);
            return;
        };
        for (i, px) in out.chunks_exact_mut(3).enumerate() {
            let (xmin, n) = hor.bounds[i];
            let taps = &in_row[xmin * 3..(xmin + n) * 3];
            let (mut s0, mut s1, mut s2) = (HALF, HALF, HALF);
            for (x, p) in taps.chunks_exact(3).enumerate() {
                let w = hor.weight(i, x);
                s0 = s0.wrapping_add(i32::from(p[0]).wrapping_mul(w));
                s1 = s1.wrapping_add(i32::from(p[1]).wrapping_mul(w));
                s2 = s2.wrapping_add(i32::from(p[2]).wrapping_mul(w));
            }
            px[0] = clip8(s0);
            px[1] = clip8(s1);
            px[2] = clip8(s2);
        }
    };
    let mut out = vec![0u8; height * stride];
    if !need_v {
        for (j, out_row) in out.chunks_exact_mut(stride).enumerate() {
            horizontal(y0 + j, out_row);
        }
        return out;
    }
    // The vertical pass, one source row at a time: each row that the
    // window's outputs read goes through the horizontal pass once and is
    // added, weighted, to the outputs whose taps cover it. The taps of
    // successive outputs move forward, so those outputs are a sliding range.
    // Sums wrap as PIL's int32 sums do; the order of the terms is the same.
    let vert = Coeffs::new(sh, dh, y0, height, filter);
    let first = vert.bounds.first().map_or(0, |b| b.0);
    let last = vert.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(first);
    let mut acc = vec![HALF; height * stride];
    let mut row = vec![0u8; stride];
    let (mut lo, mut hi) = (0, 0);
    for y in first..last {
        while lo < height && vert.bounds[lo].0 + vert.bounds[lo].1 <= y {
            lo += 1;
        }
        while hi < height && vert.bounds[hi].0 <= y {
            hi += 1;
        }
        if lo >= hi {
            continue;
        }
        horizontal(y, &mut row);
        for j in lo..hi {
            let (ymin, n) = vert.bounds[j];
            if y >= ymin + n {
                continue;
            }
            let w = vert.weight(j, y - ymin);
            for (a, &p) in acc[j * stride..(j + 1) * stride].iter_mut().zip(&row) {
                *a = a.wrapping_add(i32::from(p).wrapping_mul(w));
            }
        }
    }
    for (o, &a) in out.iter_mut().zip(&acc) {
        *o = clip8(a);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_when_sizes_match() {
        let src: Vec<u8> = (0..5 * 4 * 3).map(|v| (v * 7 % 256) as u8).collect();
        assert_eq!(resize_rgb8(&src, 5, 4, 5, 4, Filter::Bilinear), src);
        assert_eq!(resize_rgb8(&src, 5, 4, 5, 4, Filter::Bicubic), src);
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(37usize, 16usize), (5, 32), (300, 224), (1, 7), (4000, 3)] {
            for f in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
                let c = Coeffs::new(i, o, 0, o, f);
                for (idx, &(_, n)) in c.bounds.iter().enumerate() {
                    let s: i64 = (0..n).map(|x| i64::from(c.weight(idx, x))).sum();
                    assert!((s - (1 << PRECISION_BITS)).abs() <= n as i64, "{i}->{o} {f:?}: {s}");
                }
            }
        }
    }

    #[test]
    fn computed_weights_are_the_table_s() {
        for (i, o, first, count) in [
            (37usize, 16usize, 0, 16),
            (300, 224, 50, 100),
            (4000, 3, 1, 2),
            (2, 900, 400, 7),
        ] {
            for f in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
                let table = Coeffs::new(i, o, first, count, f);
                let computed = Coeffs::with_table_limit(i, o, first, count, f, 0);
                assert!(!table.offsets.is_empty() && computed.offsets.is_empty());
                assert_eq!(table.bounds, computed.bounds);
                for (idx, &(_, n)) in table.bounds.iter().enumerate() {
                    for x in 0..n {
                        assert_eq!(table.weight(idx, x), computed.weight(idx, x), "{i}->{o} {f:?}");
                    }
                }
            }
        }
    }

    /// The straightforward two passes over the whole output, as this file
    /// did before it computed only a window: every weight in a table, the
    /// horizontal pass over all the rows the vertical pass reads, then the
    /// vertical pass.
    fn whole_then_crop(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize, win: Window, f: Filter) -> Vec<u8> {
        let table = |c: &Coeffs| -> Vec<Vec<i32>> {
            c.bounds
                .iter()
                .enumerate()
                .map(|(i, &(_, n))| (0..n).map(|x| c.weight(i, x)).collect())
                .collect()
        };
        let mid: Vec<u8> = if dw != sw {
            let hor = Coeffs::new(sw, dw, 0, dw, f);
            let weights = table(&hor);
            let mut mid = Vec::with_capacity(sh * dw * 3);
            for y in 0..sh {
                for (i, &(xmin, _)) in hor.bounds.iter().enumerate() {
                    for c in 0..3 {
                        let mut s = HALF;
                        for (x, &w) in weights[i].iter().enumerate() {
                            s = s.wrapping_add(i32::from(src[(y * sw + xmin + x) * 3 + c]).wrapping_mul(w));
                        }
                        mid.push(clip8(s));
                    }
                }
            }
            mid
        } else {
            src.to_vec()
        };
        let full: Vec<u8> = if dh != sh {
            let vert = Coeffs::new(sh, dh, 0, dh, f);
            let weights = table(&vert);
            let mut full = Vec::with_capacity(dh * dw * 3);
            for (j, &(ymin, _)) in vert.bounds.iter().enumerate() {
                for b in 0..dw * 3 {
                    let mut s = HALF;
                    for (y, &w) in weights[j].iter().enumerate() {
                        s = s.wrapping_add(i32::from(mid[(ymin + y) * dw * 3 + b]).wrapping_mul(w));
                    }
                    full.push(clip8(s));
                }
            }
            full
        } else {
            mid
        };
        let mut out = Vec::new();
        for y in win.y0..win.y0 + win.height {
            out.extend_from_slice(&full[(y * dw + win.x0) * 3..(y * dw + win.x0 + win.width) * 3]);
        }
        out
    }

    #[test]
    fn a_window_is_the_whole_resize_cropped() {
        let mut seed = 12345u32;
        let mut next = move |m: u32| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (seed >> 8) % m
        };
        for case in 0..120 {
            let (sw, sh) = (1 + next(40) as usize, 1 + next(40) as usize);
            let (dw, dh) = (1 + next(50) as usize, 1 + next(50) as usize);
            let (width, height) = (1 + next(dw as u32) as usize, 1 + next(dh as u32) as usize);
            let (x0, y0) = (
                next((dw - width + 1) as u32) as usize,
                next((dh - height + 1) as u32) as usize,
            );
            let win = Window { x0, y0, width, height };
            let src: Vec<u8> = (0..sw * sh * 3).map(|_| next(256) as u8).collect();
            for f in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
                let got = resize_rgb8_window(&src, sw, sh, dw, dh, win, f);
                let want = whole_then_crop(&src, sw, sh, dw, dh, win, f);
                assert_eq!(got, want, "case {case}: {sw}x{sh} -> {dw}x{dh} {win:?} {f:?}");
            }
        }
        // Outside the output, or a wrong source length: nothing.
        let src = vec![0u8; 4 * 3 * 3];
        let win = Window {
            x0: 2,
            y0: 0,
            width: 3,
            height: 1,
        };
        assert!(resize_rgb8_window(&src, 4, 3, 4, 5, win, Filter::Bicubic).is_empty());
        assert!(resize_rgb8(&src[1..], 4, 3, 4, 5, Filter::Bicubic).is_empty());
    }

    #[test]
    fn an_extreme_aspect_resize_computes_only_its_window() {
        // 200,000 x 1 with its short edge to 32: 6.4 million columns wide,
        // 600 MB if computed whole; the centre 32 x 32 is all that is held.
        let (sw, sh, size) = (200_000usize, 1usize, 32usize);
        let src: Vec<u8> = (0..sw * sh * 3).map(|i| (i % 251) as u8).collect();
        let dw = size * sw;
        let win = Window {
            x0: (dw - size) / 2,
            y0: 0,
            width: size,
            height: size,
        };
        let out = resize_rgb8_window(&src, sw, sh, dw, size, win, Filter::Bicubic);
        assert_eq!(out.len(), size * size * 3);
        // 1 x 200,000 squashed: the vertical pass reads its rows one at a time.
        let out = resize_rgb8(&src, 1, sw, size, size, Filter::Bilinear);
        assert_eq!(out.len(), size * size * 3);
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 13 * 9 * 3];
        for f in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            let out = resize_rgb8(&src, 13, 9, 31, 4, f);
            assert!(out.iter().all(|&v| v == 77), "{f:?}");
        }
    }
}
