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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The most pictures one sample may have.
pub const MAX_IMAGES: usize = 3;

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

/// Reads a dataset. A bad line (not JSON, no prompt, an unknown kind, a
/// missing picture, too many pictures, a kind the pictures contradict) is an
/// error naming its line number with `strict`, else skipped and reported.
pub fn load(path: &Path, strict: bool) -> Result<(Vec<Sample>, Vec<Skipped>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Dataset {
        path: path.to_path_buf(),
        line: 0,
        reason: format!("cannot read: {e}"),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        match parse(raw, base, line) {
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
        return Err(Error::Dataset {
            path: path.to_path_buf(),
            line: 0,
            reason: "no usable sample".into(),
        });
    }
    Ok((samples, skipped))
}

fn parse(raw: &str, base: &Path, line: usize) -> std::result::Result<Sample, String> {
    let parsed: Line = serde_json::from_str(raw).map_err(|e| format!("not a JSON sample: {e}"))?;
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
        kind,
        images,
        prompt,
        reference: parsed.reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn kinds_round_trip_through_their_names() {
        for kind in PromptKind::ALL {
            assert_eq!(kind.name().parse::<PromptKind>(), Ok(kind));
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{}\"", kind.name()));
        }
    }
}
