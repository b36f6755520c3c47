//! The evaluation dataset: JSON Lines, one sample a line:
//! `{"id": "...", "image": "path relative to the file (optional)",
//!   "prompt": "...", "reference": "optional answer for perplexity"}`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct Sample {
    pub id: String,
    pub image: Option<PathBuf>,
    pub prompt: String,
    pub reference: Option<String>,
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
    image: Option<String>,
    prompt: Option<String>,
    reference: Option<String>,
}

/// Reads a dataset. A bad line (not JSON, no prompt, a missing image) is an
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
    let image = match parsed.image {
        None => None,
        Some(relative) => {
            let path = base.join(&relative);
            if !path.is_file() {
                return Err(format!("image {} does not exist", path.display()));
            }
            Some(path)
        }
    };
    Ok(Sample {
        id: parsed.id.unwrap_or_else(|| format!("line-{line}")),
        image,
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
}
