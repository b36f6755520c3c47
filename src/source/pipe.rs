//! Frames piped in (standard input, or any reader): concatenated JPEGs
//! (MJPEG, as `ffmpeg -f image2pipe -c:v mjpeg -` writes) or concatenated
//! binary PPMs (P6).
//!
//! JPEGs are split by walking their markers: segments are skipped by their
//! length (so an EXIF thumbnail's own start and end markers inside APP1 do
//! not cut the frame), entropy-coded data runs to the next marker that is
//! not a stuffed `FF 00` or a restart marker, and the frame ends at EOI.
//! Garbage between frames, a frame that fails to decode or a header that
//! makes no sense is one corrupt frame; reading then resumes at the next
//! start marker. The input ending between frames is the end of the source;
//! ending inside a frame means the producer went away: the source is lost.

use std::io::{BufRead, BufReader, Cursor, ErrorKind, Read};

use image::RgbImage;

use super::{Frame, FrameSource, PipeFormat};
use crate::error::{error_chain, Error, Result};
use crate::model::image::decode_rgb8;

/// Largest encoded JPEG frame accepted; anything longer is garbage.
pub const MAX_JPEG_BYTES: usize = 64 << 20;

/// Longest PPM header (magic, sizes, comments) accepted.
const MAX_PPM_HEADER_BYTES: usize = 4096;

/// Frames from a byte stream.
pub struct PipeSource<R> {
    reader: BufReader<R>,
    format: PipeFormat,
    spec: String,
    max_pixels: u64,
    next_id: u64,
    /// The encoded frame being assembled (JPEG), reused between frames.
    buffer: Vec<u8>,
    /// A start marker (JPEG `FF D8`, PPM `P6`) was already consumed while
    /// skipping garbage: the next frame starts right after it.
    start_consumed: bool,
    /// The last frame broke off inside: skip its rest without reporting it
    /// again.
    resyncing: bool,
}

/// What reading the next frame's bytes found.
enum Read1 {
    Frame,
    End,
}

impl<R: Read + Send> PipeSource<R> {
    pub fn new(reader: R, format: PipeFormat, spec: String, max_pixels: u64) -> PipeSource<R> {
        PipeSource {
            reader: BufReader::with_capacity(1 << 16, reader),
            format,
            spec,
            max_pixels,
            next_id: 0,
            buffer: Vec::new(),
            start_consumed: false,
            resyncing: false,
        }
    }

    fn corrupt(&self, reason: String) -> Error {
        Error::FrameCorrupt {
            spec: self.spec.clone(),
            frame: format!("#{}", self.next_id),
            reason,
        }
    }

    fn lost(&self, reason: String) -> Error {
        Error::SourceLost {
            spec: self.spec.clone(),
            reason,
        }
    }

    fn read_error(&self, err: &std::io::Error) -> Error {
        self.lost(format!("read failed: {err}"))
    }

    /// The next byte; `None` at the end of the input.
    fn byte(&mut self) -> Result<Option<u8>> {
        loop {
            match self.reader.fill_buf() {
                Ok([]) => return Ok(None),
                Ok(buf) => {
                    let b = buf[0];
                    self.reader.consume(1);
                    return Ok(Some(b));
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => return Err(self.read_error(&err)),
            }
        }
    }

    /// The next byte inside a frame: the input ending here loses the source.
    fn byte_in_frame(&mut self) -> Result<u8> {
        match self.byte()? {
            Some(b) => Ok(b),
            None => Err(self.lost(format!(
                "the input ended in the middle of frame #{} ({} bytes read)",
                self.next_id,
                self.buffer.len()
            ))),
        }
    }

    /// Appends `n` bytes of the frame to `buffer`.
    fn take_in_frame(&mut self, n: usize) -> Result<()> {
        let start = self.buffer.len();
        self.buffer.resize(start + n, 0);
        let mut filled = start;
        while filled < self.buffer.len() {
            match self.reader.read(&mut self.buffer[filled..]) {
                Ok(0) => {
                    self.buffer.truncate(filled);
                    return Err(self.lost(format!(
                        "the input ended in the middle of frame #{} ({} bytes read)",
                        self.next_id, filled
                    )));
                }
                Ok(k) => filled += k,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => return Err(self.read_error(&err)),
            }
        }
        Ok(())
    }

    /// Skips to the start marker `first second`. Returns `Ok(None)` at a
    /// clean end, `Ok(Some(skipped))` once the marker is consumed.
    fn seek_start(&mut self, first: u8, second: u8) -> Result<Option<usize>> {
        if self.start_consumed {
            self.start_consumed = false;
            return Ok(Some(0));
        }
        // The rest of a frame already reported corrupt is not news.
        let quiet = std::mem::take(&mut self.resyncing);
        // Whitespace between PPM frames is allowed, not garbage.
        let ppm = self.format == PipeFormat::Ppm;
        let garbage = |b: u8| !(quiet || ppm && b.is_ascii_whitespace());
        let mut skipped = 0usize;
        let mut previous: Option<u8> = None;
        loop {
            let Some(b) = self.byte()? else {
                let dangling = skipped + usize::from(previous.is_some_and(garbage));
                return if dangling == 0 {
                    Ok(None)
                } else {
                    Err(self.corrupt(format!("{dangling} bytes after the last frame are not a frame")))
                };
            };
            if previous == Some(first) && b == second {
                return Ok(Some(skipped));
            }
            skipped += usize::from(previous.is_some_and(garbage));
            previous = Some(b);
        }
    }

    /// Reads one JPEG into `buffer`.
    fn read_jpeg(&mut self) -> Result<Read1> {
        let Some(skipped) = self.seek_start(0xFF, 0xD8)? else {
            return Ok(Read1::End);
        };
        if skipped > 0 {
            self.start_consumed = true;
            return Err(self.corrupt(format!("{skipped} bytes before the next JPEG start marker")));
        }
        self.buffer.clear();
        self.buffer.extend_from_slice(&[0xFF, 0xD8]);
        let mut marker = self.next_marker()?;
        loop {
            if self.buffer.len() > MAX_JPEG_BYTES {
                return Err(self.corrupt(format!("no end marker within {MAX_JPEG_BYTES} bytes")));
            }
            let Some(m) = marker else {
                return Err(self.corrupt("a byte other than a marker between JPEG segments".into()));
            };
            self.buffer.extend_from_slice(&[0xFF, m]);
            match m {
                0xD9 => return Ok(Read1::Frame),
                0xD8 => {
                    // A new frame started before this one ended.
                    self.start_consumed = true;
                    return Err(self.corrupt("a JPEG start marker before the end of the frame".into()));
                }
                0x01 | 0xD0..=0xD7 => marker = self.next_marker()?,
                _ => {
                    let high = self.byte_in_frame()?;
                    let low = self.byte_in_frame()?;
                    let length = usize::from(u16::from_be_bytes([high, low]));
                    if length < 2 {
                        return Err(self.corrupt(format!("segment FF{m:02X} has length {length}")));
                    }
                    self.buffer.extend_from_slice(&[high, low]);
                    self.take_in_frame(length - 2)?;
                    marker = if m == 0xDA {
                        self.entropy_coded_data()?
                    } else {
                        self.next_marker()?
                    };
                }
            }
        }
    }

    /// Reads `FF` (fill bytes `FF` allowed) and a marker code; `None` if the
    /// next byte is not `FF`.
    fn next_marker(&mut self) -> Result<Option<u8>> {
        if self.byte_in_frame()? != 0xFF {
            return Ok(None);
        }
        loop {
            let code = self.byte_in_frame()?;
            if code != 0xFF {
                return Ok(Some(code));
            }
        }
    }

    /// Copies entropy-coded data into `buffer` up to the next real marker
    /// and returns that marker's code (its `FF` is consumed, not copied).
    fn entropy_coded_data(&mut self) -> Result<Option<u8>> {
        loop {
            if self.buffer.len() > MAX_JPEG_BYTES {
                return Err(self.corrupt(format!("no end marker within {MAX_JPEG_BYTES} bytes")));
            }
            // Copy up to the next FF in one go.
            let available = match self.reader.fill_buf() {
                Ok(buf) => buf,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => return Err(self.read_error(&err)),
            };
            if available.is_empty() {
                return Err(self.lost(format!(
                    "the input ended in the middle of frame #{} ({} bytes read)",
                    self.next_id,
                    self.buffer.len()
                )));
            }
            match available.iter().position(|&b| b == 0xFF) {
                None => {
                    let n = available.len();
                    self.buffer.extend_from_slice(available);
                    self.reader.consume(n);
                }
                Some(at) => {
                    self.buffer.extend_from_slice(&available[..at]);
                    self.reader.consume(at + 1);
                    let mut code = self.byte_in_frame()?;
                    while code == 0xFF {
                        code = self.byte_in_frame()?;
                    }
                    match code {
                        // A stuffed FF, or a restart marker: still data.
                        0x00 | 0xD0..=0xD7 => self.buffer.extend_from_slice(&[0xFF, code]),
                        _ => return Ok(Some(code)),
                    }
                }
            }
        }
    }

    fn decode_jpeg(&mut self) -> Result<RgbImage> {
        let name = format!("{} frame #{}", self.spec, self.next_id);
        match decode_rgb8(Cursor::new(&self.buffer[..]), &name, self.max_pixels) {
            Ok((image, _)) => Ok(image),
            Err(err) => Err(self.corrupt(error_chain(&err))),
        }
    }

    /// Reads one PPM (P6) and converts it to 8 bits.
    fn read_ppm(&mut self) -> Result<Option<RgbImage>> {
        let Some(skipped) = self.seek_start(b'P', b'6')? else {
            return Ok(None);
        };
        if skipped > 0 {
            self.start_consumed = true;
            return Err(self.corrupt(format!("{skipped} bytes before the next PPM header")));
        }
        let mut header_bytes = 2;
        let mut fields = [0u64; 3];
        for (i, field) in fields.iter_mut().enumerate() {
            *field = self.ppm_number(&mut header_bytes, i)?;
        }
        let [width, height, maxval] = fields;
        // Exactly one whitespace byte ends the header; ppm_number consumed it.
        if width == 0 || height == 0 {
            return Err(self.corrupt(format!("PPM size {width}x{height}")));
        }
        let pixels = width * height;
        if pixels > self.max_pixels {
            return Err(self.corrupt(format!(
                "PPM of {width}x{height} = {pixels} pixels, more than the limit of {}",
                self.max_pixels
            )));
        }
        if maxval == 0 || maxval > 65535 {
            return Err(self.corrupt(format!("PPM maximum value {maxval} is outside 1..=65535")));
        }
        let bytes_per_sample = if maxval < 256 { 1 } else { 2 };
        // pixels <= max_pixels, so this fits: max_pixels is at most u64 but a
        // frame buffer that large would fail to allocate, not overflow here.
        let Some(len) = pixels
            .checked_mul(3 * bytes_per_sample)
            .and_then(|n| usize::try_from(n).ok())
        else {
            return Err(self.corrupt(format!("PPM of {width}x{height} is too large for this machine")));
        };
        self.buffer.clear();
        self.take_in_frame(len)?;
        let samples: Vec<u8> = if bytes_per_sample == 1 && maxval == 255 {
            std::mem::take(&mut self.buffer)
        } else if bytes_per_sample == 1 {
            self.buffer
                .iter()
                .map(|&v| scale_to_8bit(u64::from(v), maxval))
                .collect()
        } else {
            self.buffer
                .chunks_exact(2)
                .map(|pair| scale_to_8bit(u64::from(u16::from_be_bytes([pair[0], pair[1]])), maxval))
                .collect()
        };
        // The sizes were checked above and fit u32 (pixels <= max_pixels
        // and each side > 0), but a huge max_pixels could pass a side over
        // u32: refuse that as corrupt rather than truncate.
        let (Ok(w), Ok(h)) = (u32::try_from(width), u32::try_from(height)) else {
            return Err(self.corrupt(format!("PPM size {width}x{height} is too large")));
        };
        match RgbImage::from_raw(w, h, samples) {
            Some(image) => Ok(Some(image)),
            None => Err(self.corrupt("PPM pixel data does not match its size".into())),
        }
    }

    /// One decimal field of a PPM header, skipping whitespace and comments,
    /// and the one whitespace byte that ends it.
    fn ppm_number(&mut self, header_bytes: &mut usize, field: usize) -> Result<u64> {
        const NAMES: [&str; 3] = ["width", "height", "maximum value"];
        let mut value: Option<u64> = None;
        loop {
            let b = self.byte_in_frame()?;
            *header_bytes += 1;
            if *header_bytes > MAX_PPM_HEADER_BYTES {
                return Err(self.corrupt(format!("PPM header longer than {MAX_PPM_HEADER_BYTES} bytes")));
            }
            match (b, value) {
                (b'#', None) => {
                    // A comment runs to the end of the line.
                    while self.byte_in_frame()? != b'\n' {
                        *header_bytes += 1;
                        if *header_bytes > MAX_PPM_HEADER_BYTES {
                            return Err(self.corrupt(format!("PPM header longer than {MAX_PPM_HEADER_BYTES} bytes")));
                        }
                    }
                }
                (b, None) if b.is_ascii_whitespace() => {}
                (b'0'..=b'9', _) => {
                    let digit = u64::from(b - b'0');
                    let next = value.unwrap_or(0).checked_mul(10).and_then(|v| v.checked_add(digit));
                    match next {
                        Some(v) if v <= u64::from(u32::MAX) => value = Some(v),
                        _ => return Err(self.corrupt(format!("PPM {} is too large", NAMES[field]))),
                    }
                }
                (b, Some(v)) if b.is_ascii_whitespace() => return Ok(v),
                (b, _) => {
                    return Err(self.corrupt(format!(
                        "unexpected byte 0x{b:02x} in the PPM header's {}",
                        NAMES[field]
                    )))
                }
            }
        }
    }
}

/// `round(v * 255 / maxval)`.
fn scale_to_8bit(v: u64, maxval: u64) -> u8 {
    let v = v.min(maxval);
    // v <= maxval, so the result is <= 255.
    ((v * 255 + maxval / 2) / maxval) as u8
}

impl<R: Read + Send> FrameSource for PipeSource<R> {
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        let image = match self.format {
            PipeFormat::Mjpeg => match self.read_jpeg() {
                Ok(Read1::End) => return Ok(None),
                Ok(Read1::Frame) => self.decode_jpeg(),
                Err(err) => Err(err),
            },
            PipeFormat::Ppm => match self.read_ppm() {
                Ok(None) => return Ok(None),
                Ok(Some(image)) => Ok(image),
                Err(err) => Err(err),
            },
        };
        if let Err(Error::FrameCorrupt { .. }) = &image {
            self.resyncing = !self.start_consumed;
        }
        // A corrupt frame still used up an id, so ids show where frames went missing.
        let id = self.next_id;
        self.next_id += 1;
        Ok(Some(Frame::new(id, image?, None)))
    }

    fn reconnect(&mut self) -> Result<()> {
        // A pipe cannot be reopened: read on. After the writer went away
        // this finds the end of the input, and the source ends.
        Ok(())
    }

    fn is_live(&self) -> bool {
        true
    }

    fn spec(&self) -> &str {
        &self.spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SourceFailure;
    use image::{codecs::jpeg::JpegEncoder, ExtendedColorType, ImageEncoder, Rgb};

    fn solid(width: u32, height: u32, rgb: [u8; 3]) -> RgbImage {
        RgbImage::from_pixel(width, height, Rgb(rgb))
    }

    fn jpeg(image: &RgbImage) -> Vec<u8> {
        let mut bytes = Vec::new();
        JpegEncoder::new_with_quality(&mut bytes, 95)
            .write_image(image.as_raw(), image.width(), image.height(), ExtendedColorType::Rgb8)
            .unwrap();
        bytes
    }

    fn ppm(image: &RgbImage) -> Vec<u8> {
        let mut bytes = format!("P6\n# a comment\n{} {}\n255\n", image.width(), image.height()).into_bytes();
        bytes.extend_from_slice(image.as_raw());
        bytes
    }

    fn source(bytes: Vec<u8>, format: PipeFormat) -> PipeSource<Cursor<Vec<u8>>> {
        PipeSource::new(Cursor::new(bytes), format, format!("test:{}", format.name()), 1 << 20)
    }

    /// A frame's id, size and first pixel, or how it failed.
    type Outcome = std::result::Result<(u64, u32, u32, [u8; 3]), SourceFailure>;

    /// Every result until the end.
    fn drain<R: Read + Send>(source: &mut PipeSource<R>) -> Vec<Outcome> {
        let mut out = Vec::new();
        for _ in 0..100 {
            match source.next_frame() {
                Ok(Some(f)) => out.push(Ok((f.id, f.image.width(), f.image.height(), f.image.get_pixel(0, 0).0))),
                Ok(None) => return out,
                Err(e) => out.push(Err(e.source_failure())),
            }
        }
        panic!("no end: {out:?}");
    }

    fn close(a: [u8; 3], b: [u8; 3]) -> bool {
        a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= 3)
    }

    #[test]
    fn concatenated_jpegs_are_split_on_their_markers() {
        let mut bytes = jpeg(&solid(16, 8, [200, 10, 10]));
        bytes.extend(jpeg(&solid(8, 16, [10, 200, 10])));
        bytes.extend(jpeg(&solid(24, 24, [10, 10, 200])));
        let frames = drain(&mut source(bytes, PipeFormat::Mjpeg));
        assert_eq!(frames.len(), 3, "{frames:?}");
        let (id, w, h, px) = frames[0].unwrap();
        assert_eq!((id, w, h), (0, 16, 8));
        assert!(close(px, [200, 10, 10]), "{px:?}");
        assert_eq!(frames[1].unwrap().0..frames[2].unwrap().0 + 1, 1..3);
        assert_eq!((frames[2].unwrap().1, frames[2].unwrap().2), (24, 24));
    }

    #[test]
    fn start_and_end_markers_inside_a_segment_do_not_split_the_frame() {
        // An APP1 segment holding a fake thumbnail's FF D8 ... FF D9, as EXIF does.
        let real = jpeg(&solid(8, 8, [255, 255, 0]));
        let thumbnail = [0xFF, 0xD8, 0xFF, 0xD9, 0xFF, 0xD9];
        let mut with_app1 = vec![0xFF, 0xD8, 0xFF, 0xE1];
        with_app1.extend_from_slice(&((thumbnail.len() + 2) as u16).to_be_bytes());
        with_app1.extend_from_slice(&thumbnail);
        with_app1.extend_from_slice(&real[2..]);
        let mut bytes = with_app1.clone();
        bytes.extend_from_slice(&with_app1);
        let frames = drain(&mut source(bytes, PipeFormat::Mjpeg));
        assert_eq!(frames.len(), 2, "{frames:?}");
        assert!(frames
            .iter()
            .all(|f| f.is_ok_and(|(_, w, h, px)| (w, h) == (8, 8) && close(px, [255, 255, 0]))));
    }

    #[test]
    fn garbage_and_broken_jpegs_are_corrupt_frames_and_reading_goes_on() {
        let good = jpeg(&solid(8, 8, [0, 0, 255]));
        let mut bytes = b"noise".to_vec();
        bytes.extend(&good);
        // A frame with a valid structure but a broken header: decoding fails.
        bytes.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x04, 0x01, 0x02, 0xFF, 0xD9]);
        // A frame cut short by the start of the next one.
        bytes.extend_from_slice(&good[..good.len() - 4]);
        bytes.extend(&good);
        let frames = drain(&mut source(bytes, PipeFormat::Mjpeg));
        let kinds: Vec<_> = frames.iter().map(|f| f.map(|(id, ..)| id)).collect();
        use SourceFailure::CorruptFrame as C;
        assert_eq!(kinds, vec![Err(C), Ok(1), Err(C), Err(C), Ok(4)], "{frames:?}");
    }

    #[test]
    fn an_input_that_ends_mid_frame_loses_the_source() {
        let good = jpeg(&solid(8, 8, [0, 0, 255]));
        let mut bytes = good.clone();
        bytes.extend_from_slice(&good[..good.len() - 10]);
        let mut s = source(bytes, PipeFormat::Mjpeg);
        assert!(s.next_frame().unwrap().is_some());
        let err = s.next_frame().unwrap_err();
        assert_eq!(err.source_failure(), SourceFailure::Lost);
        assert!(err.to_string().contains("ended in the middle of frame #1"), "{err}");
        s.reconnect().unwrap();
        assert!(
            s.next_frame().unwrap().is_none(),
            "after the writer went away the pipe ends"
        );
    }

    #[test]
    fn ppm_frames_with_comments_and_16_bit_samples() {
        let mut bytes = ppm(&solid(3, 2, [1, 2, 3]));
        bytes.extend_from_slice(b"\n");
        bytes.extend(ppm(&solid(2, 3, [250, 0, 9])));
        // 16-bit: maxval 1023, samples big-endian.
        bytes.extend_from_slice(b"P6 1 1 1023\n");
        bytes.extend_from_slice(&[0x03, 0xFF, 0x00, 0x00, 0x02, 0x00]);
        let frames = drain(&mut source(bytes, PipeFormat::Ppm));
        assert_eq!(
            frames,
            vec![
                Ok((0, 3, 2, [1, 2, 3])),
                Ok((1, 2, 3, [250, 0, 9])),
                Ok((2, 1, 1, [255, 0, 128]))
            ]
        );
    }

    #[test]
    fn bad_ppm_headers_are_corrupt_and_reading_resyncs() {
        let good = ppm(&solid(2, 2, [7, 7, 7]));
        let mut bytes = b"P6 0 2 255\n".to_vec();
        bytes.extend(&good);
        bytes.extend_from_slice(b"P6 2 x 255\n");
        bytes.extend(&good);
        bytes.extend_from_slice(b"P6 4000 4000 255\n"); // over the test's 1 Mpx limit
        bytes.extend(&good);
        let frames = drain(&mut source(bytes, PipeFormat::Ppm));
        use SourceFailure::CorruptFrame as C;
        let kinds: Vec<_> = frames.iter().map(|f| f.map(|(id, ..)| id)).collect();
        assert_eq!(kinds, vec![Err(C), Ok(1), Err(C), Ok(3), Err(C), Ok(5)], "{frames:?}");
    }

    #[test]
    fn a_ppm_cut_short_loses_the_source() {
        let good = ppm(&solid(4, 4, [7, 7, 7]));
        let mut s = source(good[..good.len() - 1].to_vec(), PipeFormat::Ppm);
        assert_eq!(s.next_frame().unwrap_err().source_failure(), SourceFailure::Lost);
    }

    #[test]
    fn an_empty_input_is_an_empty_source() {
        assert!(source(Vec::new(), PipeFormat::Mjpeg).next_frame().unwrap().is_none());
        assert!(source(b"\n".to_vec(), PipeFormat::Ppm).next_frame().unwrap().is_none());
    }
}
