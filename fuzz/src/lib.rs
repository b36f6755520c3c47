//! What the fuzz targets share: the contracts every parser's errors keep,
//! small preprocessing settings, and a reader that hands out its bytes in
//! awkward pieces.

use std::io::{ErrorKind, Read};

use elastic_edge::model::image::{Preprocess, Resize};

/// Bad input gets one clear line: a message that is not empty and has no
/// line break (the service logs it, the CLI prints it as one line).
pub fn assert_one_line(message: &str) {
    assert!(!message.trim().is_empty(), "an empty error message");
    assert!(
        !message.contains(['\n', '\r']),
        "an error message of more than one line: {message:?}"
    );
}

/// The CLIP-like settings of the demo model, at a size small enough that a
/// run is fast; `max_pixels` bounds a decode at 8 x 2 MP + 32 MiB.
pub fn preprocess(resize: Resize, width: u32, height: u32) -> Preprocess {
    Preprocess {
        width,
        height,
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        rescale: 1.0 / 255.0,
        resize,
        max_pixels: 2_000_000,
        dynamic: None,
    }
}

/// The range `(v * rescale - mean) / std` spans over v in 0..=255 for one
/// channel, widened by a rounding margin.
pub fn channel_range(pre: &Preprocess, channel: usize) -> (f32, f32) {
    let at = |v: f32| (v * pre.rescale - pre.mean[channel]) / pre.std[channel];
    let (a, b) = (at(0.0), at(255.0));
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    let margin = 1e-4 * (high - low).abs().max(1.0);
    (low - margin, high + margin)
}

/// Runs `pre.load_bytes` and checks its contract: an error is typed and one
/// line; an accepted picture fills exactly `output_len` floats (all written:
/// the buffer starts as NaN), each inside its channel's range.
pub fn check_load_bytes(pre: &Preprocess, bytes: &[u8]) -> Option<(u32, u32)> {
    let mut out = vec![f32::NAN; pre.output_len()];
    match pre.load_bytes(bytes, &mut out) {
        Ok(info) => {
            assert!(
                info.width > 0 && info.height > 0,
                "accepted a {}x{} picture",
                info.width,
                info.height
            );
            let pixels = u64::from(info.width) * u64::from(info.height);
            assert!(
                pixels <= pre.max_pixels,
                "accepted {pixels} pixels over the limit {}",
                pre.max_pixels
            );
            check_pixel_values(pre, &out);
            Some((info.width, info.height))
        }
        Err(e) => {
            assert_one_line(&e.to_string());
            None
        }
    }
}

/// Every float of `pixel_values` written, finite and inside its channel's range.
pub fn check_pixel_values(pre: &Preprocess, out: &[f32]) {
    assert_eq!(out.len(), 3 * pre.width as usize * pre.height as usize);
    let plane = pre.width as usize * pre.height as usize;
    for (channel, values) in out.chunks_exact(plane).enumerate() {
        let (low, high) = channel_range(pre, channel);
        for (i, &v) in values.iter().enumerate() {
            assert!(v.is_finite(), "pixel_values[{channel}][{i}] = {v}");
            assert!(
                (low..=high).contains(&v),
                "pixel_values[{channel}][{i}] = {v} outside {low}..={high}"
            );
        }
    }
}

/// A reader that returns at most `piece` bytes a call and, every fifth
/// call, `Interrupted` (which readers must retry, not report).
pub struct Pieces<'a> {
    data: &'a [u8],
    piece: usize,
    calls: usize,
}

impl<'a> Pieces<'a> {
    pub fn new(data: &'a [u8], piece: usize) -> Self {
        Pieces {
            data,
            piece: piece.max(1),
            calls: 0,
        }
    }
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.calls += 1;
        if self.calls.is_multiple_of(5) {
            return Err(ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(self.piece).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Reads every frame of a pipe source over `data` (in pieces of a size
/// that follows from the input) and checks the splitter's contract: it
/// ends, each call consuming input or ending the source; frames are
/// numbered one by one from 0 and are never larger than `max_pixels`; a
/// bad frame is `FrameCorrupt` and a cut-off one `SourceLost`, each one
/// line; nothing else goes wrong. Returns the frames read.
pub fn check_pipe(data: &[u8], format: elastic_edge::source::PipeFormat, max_pixels: u64) -> usize {
    use elastic_edge::source::pipe::PipeSource;
    use elastic_edge::source::FrameSource;
    use elastic_edge::Error;

    let piece = 1 + data.len() % 61;
    let mut source = PipeSource::new(Pieces::new(data, piece), format, "fuzz".into(), max_pixels);
    let mut next_id = 0;
    let mut frames = 0;
    // Every call consumes input, but for the last two (lost at the end, then the end).
    for _ in 0..data.len() + 3 {
        match source.next_frame() {
            Ok(None) => return frames,
            Ok(Some(frame)) => {
                assert_eq!(frame.id, next_id, "frame ids skip or repeat");
                let (w, h) = frame.image.dimensions();
                assert!(w > 0 && h > 0, "a {w}x{h} frame");
                assert!(
                    u64::from(w) * u64::from(h) <= max_pixels,
                    "a {w}x{h} frame over the limit"
                );
                next_id += 1;
                frames += 1;
            }
            Err(e @ (Error::FrameCorrupt { .. } | Error::SourceLost { .. })) => {
                assert_one_line(&e.to_string());
                if matches!(e, Error::FrameCorrupt { .. }) {
                    next_id += 1;
                }
            }
            Err(other) => panic!("a pipe source failed with neither FrameCorrupt nor SourceLost: {other}"),
        }
    }
    panic!(
        "the source did not end after {} calls on {} bytes",
        data.len() + 3,
        data.len()
    );
}
