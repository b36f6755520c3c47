//! `stream --memory`: the stream's frames go into one continuing
//! [`Memory`] instead of one caption each, and questions from a file are
//! answered from it after the frame they name.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::generate::{GenerateParams, StopReason, Timings};
use crate::kv::PolicyKind;
use crate::memory::{MemoryFigures, MemoryOptions};

/// How a stream remembers.
#[derive(Clone, Debug, Default)]
pub struct MemoryStreamConfig {
    pub options: MemoryOptions,
    /// Questions to ask, in the order they are due.
    pub questions: Vec<Question>,
    /// How answers are generated (a question's own `max_tokens` overrides
    /// the token limit).
    pub answer_params: GenerateParams,
}

/// One line of a questions file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// Its line in the file, from 1.
    pub line: usize,
    /// Asked once the first frame with this id or a later one is in memory.
    pub at_frame: u64,
    pub question: String,
    pub max_tokens: Option<usize>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QuestionLine {
    at_frame: u64,
    question: String,
    #[serde(default)]
    max_tokens: Option<usize>,
}

/// The most a questions file may hold: it is read whole.
const MAX_QUESTIONS_FILE_BYTES: u64 = 16 << 20;

/// Reads a questions file: JSON Lines `{"at_frame": N, "question": "...",
/// "max_tokens": M}` (`max_tokens` optional). A line that is not such an
/// object, or whose question is empty, is reported by line number (the
/// returned warnings) and skipped. Questions come back ordered by
/// `at_frame`, ties in file order.
pub fn read_questions(path: &Path) -> Result<(Vec<Question>, Vec<String>)> {
    let bad = |reason: String| Error::Dataset {
        path: path.to_path_buf(),
        line: 0,
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() > MAX_QUESTIONS_FILE_BYTES {
        return Err(bad(format!(
            "{} bytes: a questions file holds at most {MAX_QUESTIONS_FILE_BYTES}",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut questions = Vec::new();
    let mut warnings = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<QuestionLine>(line) {
            Ok(q) if q.question.trim().is_empty() => {
                warnings.push(format!("{}: line {line_no}: the question is empty; skipped", path.display()));
            }
            Ok(q) if q.max_tokens == Some(0) => {
                warnings.push(format!("{}: line {line_no}: max_tokens is 0; skipped", path.display()));
            }
            Ok(q) => questions.push(Question {
                line: line_no,
                at_frame: q.at_frame,
                question: q.question,
                max_tokens: q.max_tokens,
            }),
            Err(e) => warnings.push(format!(
                "{}: line {line_no}: not a question ({e}); expected {{\"at_frame\": N, \"question\": \"...\"}}; skipped",
                path.display()
            )),
        }
    }
    questions.sort_by_key(|q| q.at_frame);
    Ok((questions, warnings))
}

/// The questions still to ask, in the order they are due.
#[derive(Debug, Default)]
pub(crate) struct DueQuestions(VecDeque<Question>);

impl DueQuestions {
    pub(crate) fn new(questions: &[Question]) -> Self {
        DueQuestions(questions.iter().cloned().collect())
    }

    /// The next question due once frame `frame_id` is in memory.
    pub(crate) fn next_due(&mut self, frame_id: u64) -> Option<Question> {
        match self.0.front() {
            Some(q) if q.at_frame <= frame_id => self.0.pop_front(),
            _ => None,
        }
    }

    /// What was never asked (the stream ended first).
    pub(crate) fn remaining(&self) -> impl Iterator<Item = &Question> {
        self.0.iter()
    }
}

/// One frame taken into the memory: a memory stream's record.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemoryRecord {
    /// When the frame was in memory, RFC 3339 UTC with milliseconds.
    pub time: String,
    pub unix_ms: u64,
    pub frame_id: u64,
    pub frame_time: String,
    /// As [`CaptionRecord::frame_path`](super::CaptionRecord): lossy.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "super::lossy_path")]
    pub frame_path: Option<PathBuf>,
    pub frame_width: u32,
    pub frame_height: u32,
    pub frame_age_ms: f64,
    /// The frame's caption (`--memory-captions`), kept in the memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    /// Tokens the frame's piece took (header, picture, turn).
    pub prompt_tokens: usize,
    /// From the frame's first token to the end of its caption.
    pub frame_ms: f64,
    pub timings_ms: Timings,
    pub policy: PolicyKind,
    #[serde(flatten)]
    pub memory: MemoryFigures,
    /// This process's resident memory after the frame (Linux; 0 elsewhere).
    pub resident_bytes: u64,
    pub counters: super::StreamCounters,
}

/// One question answered from the memory.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AnswerRecord {
    pub time: String,
    pub unix_ms: u64,
    pub question: String,
    pub answer: String,
    /// The newest frame in memory when it was asked.
    pub frame_id: u64,
    /// The question's line in the questions file (`None`: asked otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    pub tokens: usize,
    pub prompt_tokens: usize,
    pub stop: StopReason,
    pub answer_ms: f64,
    pub timings_ms: Timings,
    pub policy: PolicyKind,
    #[serde(flatten)]
    pub memory: MemoryFigures,
}

/// Resident memory now, for records (0 where `/proc` is missing).
pub(crate) fn resident_bytes() -> u64 {
    crate::bench::memory::rss_bytes().unwrap_or(0)
}

/// `time` and `unix_ms` of a record finished now.
pub(crate) fn now() -> (String, u64) {
    let t = SystemTime::now();
    (super::rfc3339(t), super::unix_ms(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_files_skip_bad_lines_by_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.jsonl");
        std::fs::write(
            &path,
            "{\"at_frame\": 5, \"question\": \"Late?\"}\n\
             not json\n\
             \n\
             {\"at_frame\": 2, \"question\": \"Early?\", \"max_tokens\": 9}\n\
             {\"at_frame\": 3, \"question\": \"  \"}\n\
             {\"at_frame\": -1, \"question\": \"Negative?\"}\n\
             {\"at_frame\": 3, \"question\": \"Zero\", \"max_tokens\": 0}\n\
             {\"at_frame\": 2, \"question\": \"Second early?\", \"extra\": 1}\n",
        )
        .unwrap();
        let (questions, warnings) = read_questions(&path).unwrap();
        let asked: Vec<(usize, u64)> = questions.iter().map(|q| (q.line, q.at_frame)).collect();
        assert_eq!(asked, [(4, 2), (1, 5)]);
        assert_eq!(questions[0].max_tokens, Some(9));
        let lines: Vec<&str> = warnings.iter().map(|w| w.split(": ").nth(1).unwrap()).collect();
        assert_eq!(lines, ["line 2", "line 5", "line 6", "line 7", "line 8"]);

        let mut due = DueQuestions::new(&questions);
        assert_eq!(due.next_due(1), None);
        assert_eq!(due.next_due(3).map(|q| q.line), Some(4));
        assert_eq!(due.next_due(3), None);
        assert_eq!(due.remaining().count(), 1);
        assert_eq!(due.next_due(9).map(|q| q.line), Some(1));

        assert!(read_questions(dir.path()).is_err(), "a folder is refused");
        assert!(read_questions(&dir.path().join("missing")).is_err());
    }
}
