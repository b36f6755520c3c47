//! The captioning thread's side of the service: it owns the generator (one
//! model, one KV pool) and serves the camera, through the stream loop
//! ([`crate::stream::run`], with [`Captioner`] as its sink), and `POST
//! /caption`, whose requests arrive as [`Job`]s on a bounded channel and are
//! captioned between frames. One caption at a time, whoever asked.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::events::Event;
use super::metrics::{kind, CaptionFigures, Origin};
use super::Shared;
use crate::error::{error_chain, Error, Result};
use crate::generate::{GenerateParams, Generator, ImageInput};
use crate::stream::{self, AnswerRecord, CaptionRecord, CaptionResult, CaptionSink, JsonLines, MemoryRecord};

/// One `POST /caption`: the image's bytes, the question, where to answer.
pub struct Job {
    pub image: Vec<u8>,
    pub prompt: Option<String>,
    /// Capacity 1: the answer never blocks the captioning thread.
    pub reply: SyncSender<std::result::Result<PostCaption, JobError>>,
}

/// Why a job failed, as HTTP sees it.
#[derive(Debug)]
pub enum JobError {
    /// The client's fault (an image that does not decode, a prompt that
    /// does not fit): 400.
    BadRequest(String),
    /// Ours: 500.
    Failed(String),
}

/// The answer to `POST /caption`.
#[derive(Clone, Debug, Serialize)]
pub struct PostCaption {
    /// When the caption was finished, RFC 3339 UTC.
    pub time: String,
    pub unix_ms: u64,
    #[serde(flatten)]
    pub result: CaptionResult,
}

/// The stream loop's sink, and the server of jobs between frames.
pub struct Captioner {
    shared: Arc<Shared>,
    jobs: Receiver<Job>,
    /// The caption file: a failed write (a full disk) is logged, counted and
    /// shown by health; the next record tries again.
    output: Option<JsonLines<std::fs::File>>,
    /// For POSTs (the stream loop has its own copy).
    params: GenerateParams,
    /// The configured question, for a POST without `?prompt=`.
    prompt: Option<String>,
}

impl Captioner {
    pub fn new(
        shared: Arc<Shared>,
        jobs: Receiver<Job>,
        output: Option<JsonLines<std::fs::File>>,
        params: GenerateParams,
        prompt: Option<String>,
    ) -> Self {
        Captioner {
            shared,
            jobs,
            output,
            params,
            prompt,
        }
    }

    /// Captions every job waiting now.
    pub fn serve_pending(&mut self, generator: &mut Generator<'_>) {
        loop {
            match self.jobs.try_recv() {
                Ok(job) => self.caption_job(generator, job),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
            }
        }
    }

    /// Waits up to `timeout` for a job and captions it (the loop without a
    /// camera).
    pub fn serve_waiting(&mut self, generator: &mut Generator<'_>, timeout: Duration) {
        self.shared.health.beat(true);
        match self.jobs.recv_timeout(timeout) {
            Ok(job) => {
                self.caption_job(generator, job);
                self.serve_pending(generator);
            }
            Err(RecvTimeoutError::Timeout) => {}
            // The HTTP side is gone (shutting down): nothing more will come.
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(timeout),
        }
    }

    fn caption_job(&mut self, generator: &mut Generator<'_>, job: Job) {
        let health = &self.shared.health;
        health.beat(false);
        let started = Instant::now();
        let prompt = job.prompt.as_deref().or(self.prompt.as_deref());
        let generated = generator.generate(&[ImageInput::Bytes(&job.image)], prompt, &self.params, &mut |_| {
            health.beat(false)
        });
        health.beat(true);
        let outcome = match generated {
            Ok(generation) => {
                let caption_ms = started.elapsed().as_secs_f64() * 1e3;
                let result = CaptionResult::new(&generation, generator.cache(), caption_ms);
                self.shared.metrics.caption(Origin::Http, &CaptionFigures::of(&result));
                let finished = SystemTime::now();
                Ok(PostCaption {
                    time: stream::rfc3339(finished),
                    unix_ms: stream::unix_ms(finished),
                    result,
                })
            }
            Err(err) => {
                let message = error_chain(&err);
                let (kind, outcome) = match &err {
                    Error::Image(_) => (kind::IMAGE, JobError::BadRequest(message.clone())),
                    Error::Prompt(_) | Error::CapacityExceeded { .. } => {
                        (kind::REQUEST, JobError::BadRequest(message.clone()))
                    }
                    _ => (kind::CAPTION, JobError::Failed(message.clone())),
                };
                log::warn!("POST /caption: {message}");
                self.shared.metrics.error(kind);
                self.shared.health.error(kind, &message);
                Err(outcome)
            }
        };
        // The requester may have given up (timed out, disconnected).
        let _ = job.reply.try_send(outcome);
    }
}

impl Captioner {
    /// A memory stream's record to `/caption/latest`, the event stream and
    /// the output file.
    fn publish(&mut self, id: u64, record: &impl Serialize) -> Result<()> {
        let shared = &self.shared;
        let data: Arc<str> = match serde_json::to_string(record) {
            Ok(json) => json.into(),
            // Plain data with string keys: serialising cannot fail.
            Err(e) => {
                log::error!("frame {id}: the record does not serialise: {e}");
                return Ok(());
            }
        };
        shared.set_latest(Arc::clone(&data));
        shared.events.publish(&Event {
            id,
            data: Arc::clone(&data),
        });
        if let Some(output) = &mut self.output {
            if let Err(err) = output.write(record) {
                let message = error_chain(&err);
                shared.metrics.error(kind::OUTPUT);
                shared.health.output(Err(&message));
                shared.health.error(kind::OUTPUT, &message);
                return Err(err);
            }
            shared.health.output(Ok(()));
        }
        Ok(())
    }
}

impl CaptionSink for Captioner {
    fn on_record(&mut self, record: &CaptionRecord) -> Result<()> {
        let shared = &self.shared;
        shared.health.beat(true);
        shared
            .metrics
            .caption(Origin::Stream, &CaptionFigures::of(&record.result));
        shared.health.stream_caption(Ok(()));
        let data: Arc<str> = match serde_json::to_string(record) {
            Ok(json) => json.into(),
            // Plain data with string keys: serialising cannot fail.
            Err(e) => {
                log::error!("frame {}: the record does not serialise: {e}", record.frame_id);
                return Ok(());
            }
        };
        shared.set_latest(Arc::clone(&data));
        shared.events.publish(&Event {
            id: record.frame_id,
            data: Arc::clone(&data),
        });
        if let Some(output) = &mut self.output {
            match output.write(record) {
                Ok(()) => shared.health.output(Ok(())),
                Err(err) => {
                    // The stream loop logs it; health and metrics show it.
                    let message = error_chain(&err);
                    shared.metrics.error(kind::OUTPUT);
                    shared.health.output(Err(&message));
                    shared.health.error(kind::OUTPUT, &message);
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    fn on_memory_record(&mut self, record: &MemoryRecord) -> Result<()> {
        self.shared.health.beat(true);
        self.shared.health.stream_caption(Ok(()));
        self.publish(record.frame_id, record)
    }

    fn on_answer(&mut self, record: &AnswerRecord) -> Result<()> {
        self.shared.health.beat(true);
        self.publish(record.frame_id, record)
    }

    fn on_caption_error(&mut self, frame_id: u64, error: &Error) {
        let kind = match error {
            Error::Image(_) => kind::IMAGE,
            _ => kind::CAPTION,
        };
        let message = format!("frame {frame_id}: {}", error_chain(error));
        self.shared.metrics.error(kind);
        self.shared.health.error(kind, &message);
        self.shared.health.stream_caption(Err(&message));
    }

    fn on_idle(&mut self, generator: &mut Generator<'_>) {
        self.shared.health.beat(true);
        self.serve_pending(generator);
    }

    fn on_text(&mut self, _piece: &str) {
        self.shared.health.beat(false);
    }
}
