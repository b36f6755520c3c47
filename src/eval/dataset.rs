//! The evaluation dataset: JSON Lines, one sample a line:
//!
//! ```json
//! {"id": "...", "kind": "caption", "images": ["paths relative to the file"],
//!  "prompt": "...", "reference": "optional answer for perplexity",
//!  "source": "optional provenance"}
//! ```
//!
//! `"image": "one path"` (the old form) is still accepted in place of
//! `"images"`, not beside it. At most [`MAX_IMAGES`] pictures a sample.
//! `kind` is one of caption, detail, question, text, multi-image; when it is
//! absent it follows from the pictures: text for none, question for one,
//! multi-image for two or more. A kind that contradicts the pictures (text
//! with a picture, multi-image with fewer than two) is a bad line.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{error_chain, Error, Result};
use crate::model::image::Preprocess;

/// The most pictures one sample may have.
pub const MAX_IMAGES: usize = 3;

/// The longest line read: a longer one is reported and skipped without
/// being held (the dev set's longest is 12 KB).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// The largest dataset file read.
pub const MAX_DATASET_BYTES: u64 = 256 << 20;

/// Reasons listed when no line is usable.
const REASONS_LISTED: usize = 5;

/// What a prompt asks for; the reports split their tables by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PromptKind {
    /// A short description of one picture.
    #[serde(rename = "caption")]
    Caption,
    /// A detailed description of a picture.
    #[serde(rename = "detail")]
    Detail,
    /// A question about a picture.
    #[serde(rename = "question")]
    Question,
    /// A text-only instruction (no picture).
    #[serde(rename = "text")]
    Text,
    /// A prompt about two or more pictures.
    #[serde(rename = "multi-image")]
    MultiImage,
}

impl PromptKind {
    pub const ALL: [PromptKind; 5] = [
        PromptKind::Caption,
        PromptKind::Detail,
        PromptKind::Question,
        PromptKind::Text,
        PromptKind::MultiImage,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            PromptKind::Caption => "caption",
            PromptKind::Detail => "detail",
            PromptKind::Question => "question",
            PromptKind::Text => "text",
            PromptKind::MultiImage => "multi-image",
        }
    }

    /// The kind of a line that names none: text for no picture, question
    /// for one, multi-image for more.
    pub const fn for_images(count: usize) -> PromptKind {
        match count {
            0 => PromptKind::Text,
            1 => PromptKind::Question,
            _ => PromptKind::MultiImage,
        }
    }

    /// Why `count` pictures do not fit this kind, if they do not.
    fn contradiction(self, count: usize) -> Option<String> {
        match self {
            PromptKind::Text if count > 0 => Some(format!("kind \"text\" with {count} picture(s)")),
            PromptKind::MultiImage if count < 2 => Some(format!("kind \"multi-image\" with {count} picture(s)")),
            _ => None,
        }
    }
}

impl std::fmt::Display for PromptKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for PromptKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        PromptKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown kind {s:?}: expected one of caption, detail, question, text, multi-image"))
    }
}

#[derive(Clone, Debug)]
pub struct Sample {
    pub id: String,
    /// Its line in the dataset file (from 1).
    pub line: usize,
    pub kind: PromptKind,
    /// The pictures, in prompt order (none for a text-only sample).
    pub images: Vec<PathBuf>,
    pub prompt: String,
    pub reference: Option<String>,
}

impl Sample {
    /// The pictures as the generator takes them.
    pub fn image_inputs(&self) -> Vec<crate::generate::ImageInput<'_>> {
        self.images
            .iter()
            .map(|p| crate::generate::ImageInput::File(p))
            .collect()
    }
}

/// A line that was left out, and why.
#[derive(Clone, Debug)]
pub struct Skipped {
    pub line: usize,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: Option<String>,
    kind: Option<String>,
    image: Option<String>,
    images: Option<Vec<String>>,
    prompt: Option<String>,
    reference: Option<String>,
    #[allow(dead_code)]
    source: Option<String>,
}

/// Reads a dataset. A bad line (longer than [`MAX_LINE_BYTES`], not UTF-8,
/// not JSON, no prompt, an unknown kind, a missing picture, too many
/// pictures, a kind the pictures contradict) is an error naming its line
/// number with `strict`, else skipped and reported. A path that is not a
/// regular file, or is larger than [`MAX_DATASET_BYTES`], is refused
/// before it is read; when no line is usable, the error gives the first
/// lines' reasons.
pub fn load(path: &Path, strict: bool) -> Result<(Vec<Sample>, Vec<Skipped>)> {
    let file_error = |reason: String| Error::DatasetFile {
        path: path.to_path_buf(),
        reason,
    };
    let (file, meta) = crate::regular_file::open(path).map_err(|e| file_error(format!("cannot read: {e}")))?;
    if meta.len() > MAX_DATASET_BYTES {
        return Err(file_error(format!(
            "{} bytes, more than the {MAX_DATASET_BYTES} a dataset may have",
            meta.len()
        )));
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut reader = BufReader::new(file);
    let mut raw = Vec::new();
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    let mut line = 0;
    loop {
        let read = read_line(&mut reader, &mut raw).map_err(|e| Error::Dataset {
            path: path.to_path_buf(),
            line: line + 1,
            reason: format!("cannot read: {e}"),
        })?;
        let Some(length) = read else { break };
        line += 1;
        let parsed = match (length, std::str::from_utf8(&raw)) {
            (Length::TooLong, _) => Err(format!("longer than {MAX_LINE_BYTES} bytes")),
            (Length::Fits, Err(e)) => Err(format!("not UTF-8 (byte {} of the line)", e.valid_up_to() + 1)),
            (Length::Fits, Ok(text)) if text.trim().is_empty() => continue,
            (Length::Fits, Ok(text)) => parse(text, base, line),
        };
        match parsed {
            Ok(sample) => samples.push(sample),
            Err(reason) if strict => {
                return Err(Error::Dataset {
                    path: path.to_path_buf(),
                    line,
                    reason,
                })
            }
            Err(reason) => skipped.push(Skipped { line, reason }),
        }
    }
    if samples.is_empty() {
        return Err(file_error(no_usable_sample(&skipped)));
    }
    Ok((samples, skipped))
}

/// Checks every picture of `samples` the way the model will read it
/// (`preprocess`: decoded and resized; `None`: a model without a vision
/// graph, which takes no picture). A sample with a picture that fails is
/// an error naming its line with `strict`, else left out and reported, so
/// one undecodable picture does not stop a sweep hours in. Each picture is
/// read once however many samples name it.
pub fn check_pictures(
    path: &Path,
    samples: Vec<Sample>,
    preprocess: Option<&Preprocess>,
    strict: bool,
) -> Result<(Vec<Sample>, Vec<Skipped>)> {
    let mut out = vec![0f32; preprocess.map_or(0, Preprocess::output_len)];
    let mut checked: HashMap<PathBuf, Option<String>> = HashMap::new();
    let mut kept = Vec::with_capacity(samples.len());
    let mut skipped = Vec::new();
    for sample in samples {
        let mut failure = None;
        for picture in &sample.images {
            let result = checked.entry(picture.clone()).or_insert_with(|| match preprocess {
                None => Some("the model has no vision graph: it takes no picture".to_string()),
                Some(p) => p.load_file(picture, &mut out).err().map(|e| error_chain(&e)),
            });
            if let Some(reason) = result {
                failure = Some(reason.clone());
                break;
            }
        }
        match failure {
            None => kept.push(sample),
            Some(reason) if strict => {
                return Err(Error::Dataset {
                    path: path.to_path_buf(),
                    line: sample.line,
                    reason,
                })
            }
            Some(reason) => skipped.push(Skipped {
                line: sample.line,
                reason,
            }),
        }
    }
    if kept.is_empty() {
        return Err(Error::DatasetFile {
            path: path.to_path_buf(),
            reason: no_usable_sample(&skipped),
        });
    }
    Ok((kept, skipped))
}

/// "no usable sample", with the first lines' reasons.
fn no_usable_sample(skipped: &[Skipped]) -> String {
    if skipped.is_empty() {
        return "no usable sample: the file has no lines".into();
    }
    let mut text = String::from("no usable sample: ");
    let listed: Vec<String> = skipped
        .iter()
        .take(REASONS_LISTED)
        .map(|s| format!("line {}: {}", s.line, s.reason))
        .collect();
    text.push_str(&listed.join("; "));
    if skipped.len() > REASONS_LISTED {
        text.push_str(&format!("; and {} more bad lines", skipped.len() - REASONS_LISTED));
    }
    text
}

/// Whether a line fitted [`MAX_LINE_BYTES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Length {
    Fits,
    TooLong,
}

/// Reads one line into `line` (without its newline), keeping at most
/// [`MAX_LINE_BYTES`] of it: the rest of a longer line is read past, not
/// held. `None` at the end of the file.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> std::io::Result<Option<Length>> {
    line.clear();
    let mut length = Length::Fits;
    let mut any = false;
    loop {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            return Ok(any.then_some(length));
        }
        any = true;
        let (chunk, ended) = match buffer.iter().position(|&b| b == b'\n') {
            Some(end) => (&buffer[..end], true),
            None => (buffer, false),
        };
        if line.len() + chunk.len() > MAX_LINE_BYTES {
            length = Length::TooLong;
            line.clear();
        } else if length == Length::Fits {
            line.extend_from_slice(chunk);
        }
        let used = chunk.len() + usize::from(ended);
        reader.consume(used);
        if ended {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some(length));
        }
    }
}

fn parse(raw: &str, base: &Path, line: usize) -> std::result::Result<Sample, String> {
    let parsed: Line = serde_json::from_str(raw)
        .map_err(|e| format!("not a JSON sample: {}", crate::error::one_line(&e.to_string())))?;
    let prompt = parsed.prompt.filter(|p| !p.trim().is_empty()).ok_or("no \"prompt\"")?;
    let relative = match (parsed.image, parsed.images) {
        (Some(_), Some(_)) => return Err("both \"image\" and \"images\": give one".into()),
        (Some(one), None) => vec![one],
        (None, Some(several)) => several,
        (None, None) => Vec::new(),
    };
    if relative.len() > MAX_IMAGES {
        return Err(format!("{} pictures: at most {MAX_IMAGES}", relative.len()));
    }
    let kind = match parsed.kind {
        Some(name) => name.parse::<PromptKind>()?,
        None => PromptKind::for_images(relative.len()),
    };
    if let Some(reason) = kind.contradiction(relative.len()) {
        return Err(reason);
    }
    let mut images = Vec::with_capacity(relative.len());
    for relative in relative {
        let path = base.join(&relative);
        if !path.is_file() {
            return Err(format!("image {} does not exist", path.display()));
        }
        images.push(path);
    }
    Ok(Sample {
        id: parsed.id.unwrap_or_else(|| format!("line-{line}")),
        line,
        kind,
        images,
        prompt,
        reference: parsed.reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `dataset` fuzz target: serde quotes an unknown field as
    /// sent, and a JSON key may hold a line break.
    #[test]
    fn a_field_name_with_a_line_break_is_reported_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.jsonl");
        std::fs::write(&data, "{\"prompt\": \"hi\", \"im\\nage\": \"a.png\"}\n").unwrap();
        let err = load(&data, false).unwrap_err().to_string();
        assert!(!err.contains(['\n', '\r']), "{err:?}");
        assert!(err.contains("unknown field `im age`"), "{err}");
    }

    #[test]
    fn bad_lines_are_skipped_or_fatal() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"x").unwrap();
        let data = dir.path().join("data.jsonl");
        std::fs::write(
            &data,
            concat!(
                "{\"id\": \"one\", \"image\": \"a.png\", \"prompt\": \"What is it?\"}\n",
                "not json\n",
                "\n",
                "{\"id\": \"two\"}\n",
                "{\"id\": \"three\", \"image\": \"missing.png\", \"prompt\": \"p\"}\n",
                "{\"prompt\": \"text only\", \"reference\": \"an answer\"}\n",
            ),
        )
        .unwrap();
        let (samples, skipped) = load(&data, false).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[1].id, "line-6");
        assert_eq!(samples[1].reference.as_deref(), Some("an answer"));
        let lines: Vec<usize> = skipped.iter().map(|s| s.line).collect();
        assert_eq!(lines, vec![2, 4, 5]);
        let err = load(&data, true).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    /// Writes `lines` as a dataset beside pictures a.png, b.png, c.png and
    /// d.png, and loads it without `strict`.
    fn load_lines(lines: &[&str]) -> (tempfile::TempDir, Vec<Sample>, Vec<Skipped>) {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.png", "b.png", "c.png", "d.png"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let data = dir.path().join("data.jsonl");
        std::fs::write(&data, lines.join("\n")).unwrap();
        let (samples, skipped) = load(&data, false).unwrap();
        (dir, samples, skipped)
    }

    #[test]
    fn kinds_follow_the_pictures_when_absent() {
        let (dir, samples, skipped) = load_lines(&[
            r#"{"id": "t", "prompt": "p"}"#,
            r#"{"id": "q", "image": "a.png", "prompt": "p"}"#,
            r#"{"id": "q2", "images": ["a.png"], "prompt": "p"}"#,
            r#"{"id": "m", "images": ["a.png", "b.png"], "prompt": "p"}"#,
            r#"{"id": "e", "images": [], "prompt": "p"}"#,
        ]);
        assert!(skipped.is_empty(), "{skipped:?}");
        let kinds: Vec<PromptKind> = samples.iter().map(|s| s.kind).collect();
        use PromptKind::*;
        assert_eq!(kinds, vec![Text, Question, Question, MultiImage, Text]);
        assert_eq!(samples[1].images, vec![dir.path().join("a.png")]);
        assert_eq!(samples[1].images, samples[2].images);
        assert_eq!(
            samples[3].images,
            vec![dir.path().join("a.png"), dir.path().join("b.png")]
        );
        assert!(samples[0].images.is_empty());
    }

    #[test]
    fn named_kinds_and_sources_are_read() {
        let (_dir, samples, skipped) = load_lines(&[
            r#"{"id": "c", "kind": "caption", "image": "a.png", "prompt": "p", "source": "skimage"}"#,
            r#"{"id": "d", "kind": "detail", "images": ["a.png"], "prompt": "p"}"#,
            r#"{"id": "q", "kind": "question", "images": ["a.png", "b.png"], "prompt": "p"}"#,
            r#"{"id": "t", "kind": "text", "prompt": "p", "reference": "r"}"#,
            r#"{"id": "m", "kind": "multi-image", "images": ["a.png", "b.png", "c.png"], "prompt": "p"}"#,
        ]);
        assert!(skipped.is_empty(), "{skipped:?}");
        let kinds: Vec<PromptKind> = samples.iter().map(|s| s.kind).collect();
        assert_eq!(kinds, PromptKind::ALL.to_vec());
        assert_eq!(samples[4].images.len(), 3);
    }

    #[test]
    fn bad_kinds_and_picture_counts_are_reported_by_line() {
        let (_dir, samples, skipped) = load_lines(&[
            r#"{"id": "ok", "prompt": "p"}"#,
            r#"{"id": "unknown", "kind": "poem", "prompt": "p"}"#,
            r#"{"id": "missing", "images": ["a.png", "nope.png"], "prompt": "p"}"#,
            r#"{"id": "four", "images": ["a.png", "b.png", "c.png", "d.png"], "prompt": "p"}"#,
            r#"{"id": "text-pic", "kind": "text", "image": "a.png", "prompt": "p"}"#,
            r#"{"id": "multi-one", "kind": "multi-image", "images": ["a.png"], "prompt": "p"}"#,
            r#"{"id": "multi-none", "kind": "multi-image", "prompt": "p"}"#,
            r#"{"id": "both", "image": "a.png", "images": ["b.png"], "prompt": "p"}"#,
            r#"{"id": "not-a-list", "images": "a.png", "prompt": "p"}"#,
        ]);
        assert_eq!(samples.len(), 1);
        let lines: Vec<usize> = skipped.iter().map(|s| s.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5, 6, 7, 8, 9]);
        let reasons: Vec<&str> = skipped.iter().map(|s| s.reason.as_str()).collect();
        assert!(reasons[0].contains("unknown kind \"poem\""), "{}", reasons[0]);
        assert!(reasons[1].contains("nope.png") && reasons[1].contains("does not exist"));
        assert!(reasons[2].contains("at most 3"), "{}", reasons[2]);
        assert!(reasons[3].contains("\"text\""), "{}", reasons[3]);
        assert!(reasons[4].contains("\"multi-image\" with 1"), "{}", reasons[4]);
        assert!(reasons[5].contains("\"multi-image\" with 0"), "{}", reasons[5]);
        assert!(reasons[6].contains("both"), "{}", reasons[6]);
        assert!(reasons[7].contains("not a JSON sample"), "{}", reasons[7]);
    }

    #[test]
    fn a_bad_kind_is_fatal_with_strict() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.jsonl");
        std::fs::write(
            &data,
            "{\"prompt\": \"p\"}\n{\"kind\": \"text\", \"image\": \"a.png\", \"prompt\": \"p\"}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("a.png"), b"x").unwrap();
        let err = load(&data, true).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("\"text\""), "{err}");
    }

    #[test]
    fn long_and_undecodable_lines_are_skipped_by_number() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.jsonl");
        let mut bytes = b"{\"prompt\": \"first\"}\r\n".to_vec();
        bytes.extend(std::iter::repeat_n(b'x', 2 * MAX_LINE_BYTES + 17));
        bytes.extend_from_slice(b"\n{\"prompt\": \"caf\xe9\"}\n{\"prompt\": \"last\"}");
        std::fs::write(&data, &bytes).unwrap();
        let (samples, skipped) = load(&data, false).unwrap();
        let prompts: Vec<(&str, usize)> = samples.iter().map(|s| (s.prompt.as_str(), s.line)).collect();
        assert_eq!(prompts, vec![("first", 1), ("last", 4)]);
        let reasons: Vec<(usize, &str)> = skipped.iter().map(|s| (s.line, s.reason.as_str())).collect();
        assert_eq!(
            reasons,
            vec![(2, "longer than 1048576 bytes"), (3, "not UTF-8 (byte 16 of the line)")]
        );
        let err = load(&data, true).unwrap_err().to_string();
        assert!(err.ends_with("line 2: longer than 1048576 bytes"), "{err}");
    }

    #[test]
    fn no_usable_sample_says_why_and_devices_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.jsonl");
        let lines: Vec<String> = (0..7).map(|i| format!("{{\"id\": \"{i}\"}}")).collect();
        std::fs::write(&data, format!("not json\n{}\n", lines.join("\n"))).unwrap();
        let err = load(&data, false).unwrap_err().to_string();
        assert!(
            err.contains("no usable sample: line 1: not a JSON sample")
                && err.contains("line 2: no \"prompt\"")
                && err.contains("and 3 more bad lines")
                && !err.contains("line 0"),
            "{err}"
        );
        std::fs::write(&data, "\n\n").unwrap();
        let err = load(&data, false).unwrap_err().to_string();
        assert!(err.contains("the file has no lines"), "{err}");
        let err = load(Path::new("/dev/zero"), false).unwrap_err().to_string();
        assert_eq!(err, "/dev/zero: cannot read: not a regular file (a character device)");
        let err = load(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("not a regular file (a directory)"), "{err}");
    }

    #[test]
    fn pictures_that_do_not_decode_are_skipped_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let good = image::RgbImage::from_pixel(8, 6, image::Rgb([10, 20, 30]));
        good.save(dir.path().join("good.png")).unwrap();
        std::fs::write(dir.path().join("bad.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
        let data = dir.path().join("data.jsonl");
        std::fs::write(
            &data,
            concat!(
                "{\"image\": \"good.png\", \"prompt\": \"p\"}\n",
                "{\"images\": [\"good.png\", \"bad.png\"], \"prompt\": \"p\"}\n",
                "{\"prompt\": \"text only\"}\n",
                "{\"image\": \"bad.png\", \"prompt\": \"again\"}\n",
            ),
        )
        .unwrap();
        let (samples, _) = load(&data, false).unwrap();
        let preprocess: Preprocess = serde_json::from_value(serde_json::json!({
            "width": 4, "height": 4, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
            "rescale": 0.00392156862745098, "resize": "bilinear_squash",
        }))
        .unwrap();
        let (kept, skipped) = check_pictures(&data, samples.clone(), Some(&preprocess), false).unwrap();
        assert_eq!(kept.iter().map(|s| s.line).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(skipped.iter().map(|s| s.line).collect::<Vec<_>>(), vec![2, 4]);
        assert!(skipped[0].reason.contains("bad.png") && skipped[0].reason.contains("corrupt"));
        let err = check_pictures(&data, samples.clone(), Some(&preprocess), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2: image") && err.contains("bad.png"), "{err}");
        let pictures: Vec<Sample> = samples.iter().filter(|s| !s.images.is_empty()).cloned().collect();
        let (kept, skipped) = check_pictures(&data, pictures.clone(), None, false).unwrap_or_default();
        assert!(kept.is_empty() && skipped.is_empty());
        let err = check_pictures(&data, pictures, None, false).unwrap_err().to_string();
        assert!(
            err.contains("no usable sample: line 1: the model has no vision graph"),
            "{err}"
        );
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in PromptKind::ALL {
            assert_eq!(kind.name().parse::<PromptKind>(), Ok(kind));
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{}\"", kind.name()));
        }
    }
}
