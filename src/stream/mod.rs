//! Captioning a stream: a [`Grabber`] keeps the newest frame, and every
//! `every` interval the newest frame is captioned with one [`Generator`]
//! (one model, one KV pool, one set of sessions for the whole stream); each
//! caption becomes a [`CaptionRecord`] handed to a [`CaptionSink`]. The
//! `stream` command's sink writes JSON Lines; a service's sink publishes
//! them. [`Stream`] is the state between frames, so a service's own loop
//! can take frames and answer requests in between ([`run`] is the
//! `stream` command's loop).
//!
//! With a memory ([`StreamConfig::memory`], `stream --memory`) the frames
//! go into one continuing context instead ([`crate::memory`]): each frame
//! becomes a [`MemoryRecord`], and questions due after a frame are answered
//! from the memory as [`AnswerRecord`]s.

pub mod memory;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{error_chain, Error, Result};
use crate::generate::{GenerateParams, Generation, Generator, ImageInput, StopReason, Timings};
use crate::kv::{KvCache, PolicyKind};
use crate::memory::Memory;
use crate::source::{Frame, Grabber, GrabberCounters, NextFrame, StopFlag};

pub use memory::{read_questions, AnswerRecord, MemoryRecord, MemoryStreamConfig, Question};

/// How the stream is captioned.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// What to ask (default: the model's captioning prompt).
    pub prompt: Option<String>,
    /// Time from the start of one caption to the start of the next; zero
    /// captions as fast as frames and the model allow.
    pub every: Duration,
    /// Stop after this many captions.
    pub max_captions: Option<u64>,
    pub params: GenerateParams,
    /// Give up (return the error) after this many failed captions in a
    /// row; `None` keeps going (a service that must stay up).
    pub max_consecutive_errors: Option<u32>,
    /// Remember the frames in one context instead of captioning each.
    pub memory: Option<MemoryStreamConfig>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            prompt: None,
            every: Duration::ZERO,
            max_captions: None,
            params: GenerateParams::default(),
            max_consecutive_errors: Some(3),
            memory: None,
        }
    }
}

/// Everything counted so far: the grabber's counts and the captioner's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamCounters {
    #[serde(flatten)]
    pub source: GrabberCounters,
    /// Captions made.
    pub captions: u64,
    /// Frames whose captioning failed.
    pub caption_errors: u64,
    /// Records the sink failed to take (a full disk, say).
    pub output_errors: u64,
    /// Memory streams: questions answered, and questions that failed or
    /// whose frame never came.
    pub questions_answered: u64,
    pub questions_skipped: u64,
}

/// One caption and what it cost: a stream record and a `POST /caption`
/// answer both carry it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaptionResult {
    pub caption: String,
    pub tokens: usize,
    pub prompt_tokens: usize,
    pub stop: StopReason,
    /// The whole caption, image preprocessing to the last token.
    pub caption_ms: f64,
    pub timings_ms: Timings,
    pub policy: PolicyKind,
    pub keep: f64,
    pub pool_bytes: u64,
    pub pool_slots: usize,
    pub cache_entries: usize,
    pub merged: u64,
    pub evicted: u64,
}

impl CaptionResult {
    pub fn new(generation: &Generation, cache: &KvCache, caption_ms: f64) -> Self {
        CaptionResult {
            caption: generation.text.trim().to_string(),
            tokens: generation.token_ids.len(),
            prompt_tokens: generation.prompt_tokens,
            stop: generation.stop,
            caption_ms,
            timings_ms: generation.timings,
            policy: cache.policy(),
            keep: cache.keep().get(),
            pool_bytes: generation.pool_bytes,
            pool_slots: generation.pool_capacity,
            cache_entries: generation.cache_entries,
            merged: generation.cache.merged,
            evicted: generation.cache.evicted,
        }
    }
}

/// One caption of one frame: what the JSON Lines output holds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaptionRecord {
    /// When the caption was finished, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The same moment in unix milliseconds.
    pub unix_ms: u64,
    /// The source's frame number.
    pub frame_id: u64,
    /// When the frame was captured, RFC 3339 UTC.
    pub frame_time: String,
    /// The file the frame came from (file sources); a name that is not
    /// UTF-8 is written lossily (U+FFFD for each bad byte).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy_path")]
    pub frame_path: Option<PathBuf>,
    pub frame_width: u32,
    pub frame_height: u32,
    /// From capture to the start of captioning.
    pub frame_age_ms: f64,
    #[serde(flatten)]
    pub result: CaptionResult,
    /// Totals at the time of this record.
    pub counters: StreamCounters,
}

/// A path as JSON: its text, with U+FFFD for bytes that are not UTF-8
/// (serde's own refuses such a path, and the whole record with it).
pub fn lossy_path<S: serde::Serializer>(path: &Option<PathBuf>, serializer: S) -> std::result::Result<S::Ok, S::Error> {
    match path {
        Some(path) => serializer.serialize_str(&path.to_string_lossy()),
        None => serializer.serialize_none(),
    }
}

/// Where captions go.
pub trait CaptionSink {
    /// Takes one record. An error is logged and counted as an output error;
    /// the stream goes on.
    fn on_record(&mut self, record: &CaptionRecord) -> Result<()>;

    /// A frame could not be captioned (already logged and counted).
    fn on_caption_error(&mut self, _frame_id: u64, _error: &Error) {}

    /// Each piece of a caption's text as it is generated (a service's
    /// watchdog hears from a long caption through this).
    fn on_text(&mut self, _piece: &str) {}

    /// A memory stream's frame record. Errors count as output errors.
    fn on_memory_record(&mut self, record: &MemoryRecord) -> Result<()>;

    /// A question answered from the memory.
    fn on_answer(&mut self, record: &AnswerRecord) -> Result<()>;
}

/// Any of a stream's records.
#[derive(Clone, Copy, Debug, serde::Serialize)]
#[serde(untagged)]
pub enum StreamRecord<'a> {
    Caption(&'a CaptionRecord),
    Memory(&'a MemoryRecord),
    Answer(&'a AnswerRecord),
}

impl<F: FnMut(StreamRecord<'_>) -> Result<()>> CaptionSink for F {
    fn on_record(&mut self, record: &CaptionRecord) -> Result<()> {
        self(StreamRecord::Caption(record))
    }

    fn on_memory_record(&mut self, record: &MemoryRecord) -> Result<()> {
        self(StreamRecord::Memory(record))
    }

    fn on_answer(&mut self, record: &AnswerRecord) -> Result<()> {
        self(StreamRecord::Answer(record))
    }
}

/// A sink that writes each record as one JSON line and flushes it, so a
/// reader (or a crash) never sees half a line of an earlier record.
pub struct JsonLines<W: Write> {
    writer: W,
    /// What the writer is, for errors: `stdout`, a file name.
    target: String,
    line: Vec<u8>,
}

impl<W: Write> JsonLines<W> {
    pub fn new(writer: W, target: impl Into<String>) -> Self {
        JsonLines {
            writer,
            target: target.into(),
            line: Vec::with_capacity(1024),
        }
    }

    /// Writes one record and flushes.
    pub fn write(&mut self, record: &impl serde::Serialize) -> Result<()> {
        let output_error = |source: std::io::Error| Error::Output {
            target: self.target.clone(),
            source,
        };
        self.line.clear();
        serde_json::to_writer(&mut self.line, record).map_err(|e| output_error(e.into()))?;
        self.line.push(b'\n');
        self.writer.write_all(&self.line).map_err(output_error)?;
        self.writer.flush().map_err(output_error)
    }
}

impl JsonLines<std::fs::File> {
    /// Appends to `path` (created if missing): a restarted stream adds to
    /// what an earlier run wrote.
    pub fn append_to(path: &std::path::Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| Error::Output {
                target: path.display().to_string(),
                source,
            })?;
        Ok(JsonLines::new(file, path.display().to_string()))
    }
}

impl<W: Write> CaptionSink for JsonLines<W> {
    fn on_record(&mut self, record: &CaptionRecord) -> Result<()> {
        self.write(record)
    }

    fn on_memory_record(&mut self, record: &MemoryRecord) -> Result<()> {
        self.write(record)
    }

    fn on_answer(&mut self, record: &AnswerRecord) -> Result<()> {
        self.write(record)
    }
}

/// Why the stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamEnd {
    /// The source ended (a finite source, or one that failed for good:
    /// see the grabber's state).
    SourceEnded,
    /// The stop flag was set.
    Stopped,
    /// `max_captions` were made.
    MaxCaptions,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StreamSummary {
    pub end: StreamEnd,
    pub counters: StreamCounters,
}

/// How long a wait for the next frame blocks before it looks at the stop
/// flag again (and, in a service, at the queue of requests).
pub const POLL: Duration = Duration::from_millis(20);

/// A stream between two frames: what has been counted, the memory when
/// there is one, the questions still due. A loop hands it each frame it
/// chooses to take ([`Stream::take`]): [`run`] for the `stream` command,
/// the service's work loop for `serve`, which also asks the memory
/// questions between frames ([`Stream::ask`]).
pub struct Stream<'c> {
    config: &'c StreamConfig,
    memory: Option<(Memory, memory::DueQuestions)>,
    counters: StreamCounters,
    consecutive_errors: u32,
}

impl<'c> Stream<'c> {
    /// Checks the prompt (or, for a memory, that one frame fits the budget)
    /// before the first frame.
    pub fn new(generator: &mut Generator<'_>, config: &'c StreamConfig) -> Result<Self> {
        check_prompt(generator, config)?;
        let memory = match &config.memory {
            Some(m) => Some((
                Memory::new(generator, m.options.clone(), false)?,
                memory::DueQuestions::new(&m.questions),
            )),
            None => None,
        };
        Ok(Stream {
            config,
            memory,
            counters: StreamCounters::default(),
            consecutive_errors: 0,
        })
    }

    pub fn counters(&self) -> StreamCounters {
        self.counters
    }

    /// Whether `max_captions` frames have been taken.
    pub fn is_done(&self) -> bool {
        self.config
            .max_captions
            .is_some_and(|max| self.counters.captions >= max)
    }

    /// Whether frames go into a memory (and questions may be asked).
    pub fn remembers(&self) -> bool {
        self.memory.is_some()
    }

    /// Captions `frame` (or takes it into the memory, then answers the
    /// questions due after it) and hands the records to `sink`. A failed
    /// frame is logged, counted and told to the sink; the error comes back
    /// only after `max_consecutive_errors` failures in a row.
    pub fn take(
        &mut self,
        generator: &mut Generator<'_>,
        frame: Frame,
        source: GrabberCounters,
        sink: &mut dyn CaptionSink,
    ) -> Result<()> {
        let started = Instant::now();
        let frame_age_ms = started.saturating_duration_since(frame.captured_instant).as_secs_f64() * 1e3;
        let outcome = match self.memory.as_mut() {
            Some((memory, _)) => remember(
                generator,
                memory,
                &frame,
                frame_age_ms,
                &mut self.counters,
                source,
                sink,
            ),
            None => caption(
                generator,
                self.config,
                &frame,
                frame_age_ms,
                &mut self.counters,
                source,
                sink,
            ),
        };
        match outcome {
            Ok(()) => self.consecutive_errors = 0,
            Err(err) => {
                self.counters.caption_errors += 1;
                self.consecutive_errors += 1;
                log::error!("frame {}: {}", frame.id, error_chain(&err));
                sink.on_caption_error(frame.id, &err);
                if self
                    .config
                    .max_consecutive_errors
                    .is_some_and(|max| self.consecutive_errors >= max)
                {
                    return Err(err);
                }
                return Ok(());
            }
        }
        if let (Some((memory, due)), Some(memory_config)) = (self.memory.as_mut(), &self.config.memory) {
            while let Some(question) = due.next_due(frame.id) {
                let mut params = memory_config.answer_params.clone();
                if let Some(max) = question.max_tokens {
                    params.max_new_tokens = max;
                }
                match answer(generator, memory, &question.question, &params, sink) {
                    Ok(mut record) => {
                        self.counters.questions_answered += 1;
                        record.line = Some(question.line);
                        if let Err(err) = sink.on_answer(&record) {
                            self.counters.output_errors += 1;
                            log::error!(
                                "questions line {}: the answer could not be written ({}): {:?}",
                                question.line,
                                error_chain(&err),
                                record.answer
                            );
                        }
                    }
                    Err(err) => {
                        self.counters.questions_skipped += 1;
                        log::error!("questions line {}: not answered: {}", question.line, error_chain(&err));
                    }
                }
            }
        }
        Ok(())
    }

    /// Answers `question` from the memory now (a service's `POST
    /// /memory/ask`); the question and its answer stay in the memory. Not
    /// handed to a sink: the caller publishes it. [`Error::MemoryEmpty`]
    /// before the first frame; [`Error::Request`] when the stream has no
    /// memory, or `params` ask for no tokens or more than the budget holds.
    pub fn ask(
        &mut self,
        generator: &mut Generator<'_>,
        question: &str,
        params: &GenerateParams,
        sink: &mut dyn CaptionSink,
    ) -> Result<AnswerRecord> {
        let Some((memory, _)) = self.memory.as_mut() else {
            return Err(Error::Request("this stream has no memory".into()));
        };
        if memory.frame_ids().next().is_none() {
            return Err(Error::MemoryEmpty);
        }
        let record = answer(generator, memory, question, params, sink)?;
        self.counters.questions_answered += 1;
        Ok(record)
    }

    /// The stream's end: questions whose frame never came are logged and
    /// counted.
    pub fn finish(mut self, end: StreamEnd, source: GrabberCounters) -> StreamSummary {
        self.counters.source = source;
        if let Some((_, due)) = &self.memory {
            for q in due.remaining() {
                log::warn!(
                    "questions line {}: frame {} never came; {:?} was not asked",
                    q.line,
                    q.at_frame,
                    q.question
                );
                self.counters.questions_skipped += 1;
            }
        }
        StreamSummary {
            end,
            counters: self.counters,
        }
    }
}

/// Takes the grabber's newest frame every `config.every` until the source
/// ends, `stop` is set (after the frame in flight) or `max_captions` are
/// made. Returns an error only for a configuration that cannot work (an
/// empty prompt, a budget too small for the memory) or
/// `max_consecutive_errors` failed frames in a row.
pub fn run(
    generator: &mut Generator<'_>,
    grabber: &Grabber,
    config: &StreamConfig,
    stop: &StopFlag,
    sink: &mut dyn CaptionSink,
) -> Result<StreamSummary> {
    let mut stream = Stream::new(generator, config)?;
    let mut next_due = Instant::now();
    loop {
        // Wait for the interval, then for a frame newer than the last.
        while Instant::now() < next_due {
            if stop.is_stopped() {
                return Ok(stream.finish(StreamEnd::Stopped, grabber.counters()));
            }
            std::thread::sleep(POLL.min(next_due.saturating_duration_since(Instant::now())));
        }
        let frame = loop {
            if stop.is_stopped() {
                return Ok(stream.finish(StreamEnd::Stopped, grabber.counters()));
            }
            match grabber.next_frame(POLL) {
                NextFrame::Frame(frame) => break frame,
                NextFrame::TimedOut => {}
                NextFrame::Ended => return Ok(stream.finish(StreamEnd::SourceEnded, grabber.counters())),
                NextFrame::Stopped => return Ok(stream.finish(StreamEnd::Stopped, grabber.counters())),
            }
        };
        next_due = Instant::now() + config.every;
        stream.take(generator, frame, grabber.counters(), sink)?;
        if stream.is_done() {
            return Ok(stream.finish(StreamEnd::MaxCaptions, grabber.counters()));
        }
    }
}

/// Captions one frame and hands its record to the sink.
fn caption(
    generator: &mut Generator<'_>,
    config: &StreamConfig,
    frame: &Frame,
    frame_age_ms: f64,
    counters: &mut StreamCounters,
    source: GrabberCounters,
    sink: &mut dyn CaptionSink,
) -> Result<()> {
    let started = Instant::now();
    let generation = generator.generate(
        &[ImageInput::Rgb8(&frame.image)],
        config.prompt.as_deref(),
        &config.params,
        &mut |piece| sink.on_text(piece),
    )?;
    counters.captions += 1;
    counters.source = source;
    let finished = SystemTime::now();
    let record = CaptionRecord {
        time: rfc3339(finished),
        unix_ms: unix_ms(finished),
        frame_id: frame.id,
        frame_time: rfc3339(frame.captured_at),
        frame_path: frame.path.clone(),
        frame_width: frame.image.width(),
        frame_height: frame.image.height(),
        frame_age_ms,
        result: CaptionResult::new(&generation, generator.cache(), started.elapsed().as_secs_f64() * 1e3),
        counters: *counters,
    };
    if let Err(err) = sink.on_record(&record) {
        counters.output_errors += 1;
        log::error!(
            "frame {}: the caption could not be written ({}): {:?}",
            frame.id,
            error_chain(&err),
            record.result.caption
        );
    }
    Ok(())
}

/// Takes one frame into the memory and hands its record to the sink.
fn remember(
    generator: &mut Generator<'_>,
    memory: &mut Memory,
    frame: &Frame,
    frame_age_ms: f64,
    counters: &mut StreamCounters,
    source: GrabberCounters,
    sink: &mut dyn CaptionSink,
) -> Result<()> {
    let added = memory.add_frame(
        generator,
        frame.id,
        frame.captured_at,
        ImageInput::Rgb8(&frame.image),
        &mut |piece| sink.on_text(piece),
    )?;
    counters.captions += 1;
    counters.source = source;
    let (time, unix_ms) = memory::now();
    let record = MemoryRecord {
        time,
        unix_ms,
        frame_id: frame.id,
        frame_time: rfc3339(frame.captured_at),
        frame_path: frame.path.clone(),
        frame_width: frame.image.width(),
        frame_height: frame.image.height(),
        frame_age_ms,
        caption: added.caption.as_ref().map(|g| g.text.trim().to_string()),
        prompt_tokens: added.prompt_tokens,
        frame_ms: added.frame_ms,
        timings_ms: added.timings,
        policy: generator.cache().policy(),
        memory: memory.figures(generator),
        resident_bytes: memory::resident_bytes(),
        counters: *counters,
    };
    if let Err(err) = sink.on_memory_record(&record) {
        counters.output_errors += 1;
        log::error!(
            "frame {}: the record could not be written ({})",
            frame.id,
            error_chain(&err)
        );
    }
    Ok(())
}

/// Answers one question from the memory; the record names the newest
/// frame in memory.
fn answer(
    generator: &mut Generator<'_>,
    memory: &mut Memory,
    question: &str,
    params: &GenerateParams,
    sink: &mut dyn CaptionSink,
) -> Result<AnswerRecord> {
    let started = Instant::now();
    let generation = memory.ask(generator, question, params, &mut |piece| sink.on_text(piece))?;
    let (time, unix_ms) = memory::now();
    Ok(AnswerRecord {
        time,
        unix_ms,
        question: question.to_string(),
        answer: generation.text.trim().to_string(),
        frame_id: memory.frame_ids().last().unwrap_or(0),
        line: None,
        tokens: generation.token_ids.len(),
        prompt_tokens: generation.prompt_tokens,
        stop: generation.stop,
        answer_ms: started.elapsed().as_secs_f64() * 1e3,
        timings_ms: generation.timings,
        policy: generator.cache().policy(),
        memory: memory.figures(generator),
    })
}

/// Fails now, not at every frame, when the prompt is empty or cannot fit the
/// pool (the `full` policy).
pub fn check_prompt(generator: &Generator<'_>, config: &StreamConfig) -> Result<()> {
    if config.memory.is_some() {
        // The memory checks its own pieces when it starts.
        return Ok(());
    }
    let model = generator.model();
    let Some(vision) = &model.manifest.vision else {
        return Err(Error::Shape(format!(
            "model {} has no vision graph: it cannot caption frames",
            model.manifest.name
        )));
    };
    // A split picture takes up to its most frames' rows (the markers aside).
    let frames = model.manifest.split().map_or(1, |split| split.max_frames() as usize);
    let prompt = model
        .prompt
        .build(config.prompt.as_deref(), Some(vision.image_tokens * frames))?;
    generator.cache().admit(prompt.len(), config.params.max_new_tokens)
}

/// `2024-05-01T12:00:00.123Z`.
pub fn rfc3339(time: SystemTime) -> String {
    match jiff::Timestamp::try_from(time) {
        Ok(timestamp) => format!("{timestamp:.3}"),
        // Outside jiff's range (years -9999..=9999): not a real clock.
        Err(_) => format!("@{}ms", unix_ms(time)),
    }
}

/// Milliseconds since the unix epoch (0 before it).
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Parses an interval: a number with an optional unit, `ms`, `s` (the
/// default), `m` or `h`: `2s`, `500ms`, `1.5m`, `0`.
pub fn parse_interval(text: &str) -> Result<Duration> {
    let bad = |reason: &str| Error::Interval {
        input: text.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    if number.is_empty() {
        return Err(bad("no number"));
    }
    let value: f64 = number.parse().map_err(|_| bad("not a number"))?;
    let seconds_per_unit = match unit.trim() {
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad("unknown unit; use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|_| bad("out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse_with_units() {
        let ms = |t: &str| parse_interval(t).unwrap().as_millis();
        assert_eq!(ms("2s"), 2000);
        assert_eq!(ms("2"), 2000);
        assert_eq!(ms("0"), 0);
        assert_eq!(ms("500ms"), 500);
        assert_eq!(ms("1.5m"), 90_000);
        assert_eq!(ms(" 1h "), 3_600_000);
        for bad in ["", "s", "-1s", "2 fortnights", "1.2.3s", "1e400"] {
            assert!(matches!(parse_interval(bad), Err(Error::Interval { .. })), "{bad:?}");
        }
    }

    #[test]
    fn times_are_rfc3339_with_milliseconds() {
        let time = UNIX_EPOCH + Duration::from_millis(1_714_564_800_123);
        assert_eq!(rfc3339(time), "2024-05-01T12:00:00.123Z");
        assert_eq!(unix_ms(time), 1_714_564_800_123);
    }
}
