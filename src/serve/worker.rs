//! The captioning thread: it owns the generator (one model, one KV pool)
//! and runs one loop ([`work`]) that chooses the next piece of work: a
//! waiting request first (`POST /caption`, `POST /memory/ask`: a client
//! holds a connection open), then the camera's newest frame when its
//! interval is due, else a short wait for a request. One piece at a time,
//! whoever asked; requests arrive as [`Job`]s on a bounded channel.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::events::Event;
use super::metrics::{kind, CaptionFigures, Origin};
use super::openai::{ChatAnswer, ChatJob, Extension};
use super::Shared;
use crate::error::{error_chain, Error, Result};
use crate::generate::{GenerateParams, Generator, ImageInput, StopReason};
use crate::model::prompt::{ChatTurn, PictureLayout};
use crate::sampling::Sampling;
use crate::source::{Grabber, NextFrame, StopFlag};
use crate::stream::{self, AnswerRecord, CaptionRecord, CaptionResult, CaptionSink, JsonLines, MemoryRecord, Stream};

/// A request for the captioning thread.
pub enum Job {
    /// `POST /caption`: the image's bytes and the question.
    Caption {
        image: Vec<u8>,
        prompt: Option<String>,
        /// The request's; the config gives the rest of the settings.
        sampling: Sampling,
        stop_strings: Vec<String>,
        /// Capacity 1: the answer never blocks the captioning thread.
        reply: SyncSender<std::result::Result<PostCaption, JobError>>,
    },
    /// `POST /memory/ask`: a question over the camera's memory.
    Ask {
        question: String,
        max_tokens: usize,
        reply: SyncSender<std::result::Result<AnswerRecord, JobError>>,
    },
    /// `POST /v1/chat/completions`: a conversation (or, `job.memory`, a
    /// question for the memory). `events` has room for every piece of the
    /// answer and its end, so the captioning thread never waits on it.
    Chat {
        job: ChatJob,
        events: SyncSender<ChatEvent>,
    },
}

/// What a chat job sends back: the answer's text as it comes (when
/// streamed), then its end.
#[derive(Debug)]
pub enum ChatEvent {
    Text(String),
    Done(std::result::Result<ChatAnswer, JobError>),
}

/// The room a chat job's `events` channel needs: a piece per token at
/// most, and the end.
pub fn chat_events_room(job: &ChatJob) -> usize {
    job.params.max_new_tokens + 2
}

/// Why a job failed, as HTTP sees it.
#[derive(Debug)]
pub enum JobError {
    /// The client's fault (an image that does not decode, a prompt that
    /// does not fit, more tokens than the budget holds): 400.
    BadRequest(String),
    /// Not possible in this state (no frame in the memory yet): 409.
    Conflict(String),
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

/// The stream's sink (records to `/caption/latest`, the event stream and
/// the output file) and the answerer of jobs.
pub struct Captioner {
    shared: Arc<Shared>,
    /// The caption file: a failed write (a full disk) is logged, counted and
    /// shown by health; the next record tries again.
    output: Option<JsonLines<std::fs::File>>,
    /// For POSTs (the stream has its own copy).
    params: GenerateParams,
    /// The configured question, for a POST without `?prompt=`.
    prompt: Option<String>,
}

/// The captioning thread's loop, until `stop`: see the module's comment.
/// `grabber` is the camera (`None`: requests only); when its source ends
/// the loop goes on serving requests.
pub fn work(
    generator: &mut Generator<'_>,
    stream: &mut Stream<'_>,
    grabber: Option<&Grabber>,
    every: Duration,
    jobs: &Receiver<Job>,
    stop: &StopFlag,
    captioner: &mut Captioner,
) {
    let mut camera = grabber;
    let mut next_frame = Instant::now();
    while !stop.is_stopped() {
        captioner.shared.health.beat(true);
        // 1. A waiting request.
        match jobs.try_recv() {
            Ok(job) => {
                captioner.serve(generator, stream, job);
                continue;
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
        }
        // 2. The camera's newest frame, once its interval is due.
        if let Some(source) = camera.filter(|_| Instant::now() >= next_frame) {
            match source.next_frame(stream::POLL) {
                NextFrame::Frame(frame) => {
                    next_frame = Instant::now() + every;
                    if let Err(e) = stream.take(generator, frame, source.counters(), captioner) {
                        // Only with a limit on failures in a row, which a
                        // service does not set: stop taking frames.
                        log::error!("the stream stopped: {}", error_chain(&e));
                        camera = None;
                    }
                }
                NextFrame::TimedOut => {}
                NextFrame::Ended => {
                    log::info!(
                        "the stream ended after {} frames; serving requests only",
                        stream.counters().captions
                    );
                    camera = None;
                }
                NextFrame::Stopped => return,
            }
            continue;
        }
        // 3. Nothing due: wait for a request until the next frame is.
        let wait = match camera {
            Some(_) => next_frame.saturating_duration_since(Instant::now()).min(super::TICK),
            None => super::TICK,
        };
        match jobs.recv_timeout(wait) {
            Ok(job) => captioner.serve(generator, stream, job),
            Err(RecvTimeoutError::Timeout) => {}
            // The HTTP side is gone (shutting down): nothing more will come.
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
        }
    }
}

impl Captioner {
    pub fn new(
        shared: Arc<Shared>,
        output: Option<JsonLines<std::fs::File>>,
        params: GenerateParams,
        prompt: Option<String>,
    ) -> Self {
        Captioner {
            shared,
            output,
            params,
            prompt,
        }
    }

    fn serve(&mut self, generator: &mut Generator<'_>, stream: &mut Stream<'_>, job: Job) {
        match job {
            Job::Caption {
                image,
                prompt,
                sampling,
                stop_strings,
                reply,
            } => {
                let params = GenerateParams {
                    sampling,
                    stop_strings,
                    ..self.params.clone()
                };
                let outcome = self.caption(generator, &image, prompt.as_deref(), &params);
                // The requester may have given up (timed out, disconnected).
                let _ = reply.try_send(outcome);
            }
            Job::Ask {
                question,
                max_tokens,
                reply,
            } => {
                let params = GenerateParams {
                    max_new_tokens: max_tokens,
                    ..self.params.clone()
                };
                let outcome = self.ask(generator, stream, &question, &params);
                let _ = reply.try_send(outcome);
            }
            Job::Chat { job, events } => {
                let outcome = match job.memory {
                    true => self.chat_memory(generator, stream, &job),
                    false => self.chat(generator, &job, &events),
                };
                let _ = events.try_send(ChatEvent::Done(outcome));
            }
        }
    }

    fn caption(
        &mut self,
        generator: &mut Generator<'_>,
        image: &[u8],
        prompt: Option<&str>,
        params: &GenerateParams,
    ) -> std::result::Result<PostCaption, JobError> {
        let health = &self.shared.health;
        health.beat(false);
        let started = Instant::now();
        let prompt = prompt.or(self.prompt.as_deref());
        let generated = generator.generate(&[ImageInput::Bytes(image)], prompt, params, &mut |_| health.beat(false));
        health.beat(true);
        match generated {
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
            Err(err) => Err(self.job_error("POST /caption", &err)),
        }
    }

    /// A question over the memory; the answer also goes to the event
    /// stream and the output file, beside the frames it was asked about.
    fn ask(
        &mut self,
        generator: &mut Generator<'_>,
        stream: &mut Stream<'_>,
        question: &str,
        params: &GenerateParams,
    ) -> std::result::Result<AnswerRecord, JobError> {
        self.shared.health.beat(false);
        let answered = stream.ask(generator, question, params, self);
        self.shared.health.beat(true);
        match answered {
            Ok(record) => {
                self.shared.metrics.question(record.answer_ms, &record.memory);
                let _ = self.publish(record.frame_id, &record, false);
                Ok(record)
            }
            Err(err @ Error::MemoryEmpty) => {
                self.shared.metrics.error(kind::REQUEST);
                Err(JobError::Conflict(err.to_string()))
            }
            Err(err) => Err(self.job_error("POST /memory/ask", &err)),
        }
    }

    /// A conversation in the model's template, from an empty pool (the
    /// stream's captions start from one too); the text goes to `events` as
    /// it comes when the client streams, and a client gone ends it.
    fn chat(
        &mut self,
        generator: &mut Generator<'_>,
        job: &ChatJob,
        events: &SyncSender<ChatEvent>,
    ) -> std::result::Result<ChatAnswer, JobError> {
        let route = "POST /v1/chat/completions";
        let health = &self.shared.health;
        health.beat(false);
        let started = Instant::now();
        let model = generator.model();
        let pictures = job.turns.iter().map(|t| t.images.len()).sum::<usize>();
        // Each picture's rows (its own size decides them for a dynamic or
        // split model) before the prompt is built around them.
        let layouts: Vec<PictureLayout> = match &model.manifest.vision {
            Some(_) => {
                let laid_out: Result<Vec<PictureLayout>> = job
                    .turns
                    .iter()
                    .flat_map(|t| t.images.iter())
                    .map(|image| generator.picture_layout(ImageInput::Bytes(image)))
                    .collect();
                match laid_out {
                    Ok(layouts) => layouts,
                    Err(e) => return Err(self.job_error(route, &e)),
                }
            }
            None if pictures > 0 => {
                self.shared.metrics.error(kind::REQUEST);
                return Err(JobError::BadRequest(format!(
                    "model {} has no vision graph: send text only",
                    model.manifest.name
                )));
            }
            None => Vec::new(),
        };
        let turns: Vec<ChatTurn<'_>> = job
            .turns
            .iter()
            .map(|t| ChatTurn {
                role: t.role,
                text: &t.text,
                images: t.images.len(),
            })
            .collect();
        let prompt = match model.prompt.build_chat(job.system.as_deref(), &turns, &layouts) {
            Ok(prompt) => prompt,
            Err(e) => return Err(self.job_error(route, &Error::Prompt(e))),
        };
        if let Err(e) = job.params.check(&model.manifest) {
            return Err(self.job_error(route, &e));
        }
        let images: Vec<ImageInput<'_>> = job
            .turns
            .iter()
            .flat_map(|t| t.images.iter().map(|i| ImageInput::Bytes(i)))
            .collect();
        generator.reset_cache();
        let generated = generator.try_generate_piece(&prompt, &images, &job.params, &mut |piece| {
            health.beat(false);
            if job.stream {
                // Never full (see `chat_events_room`); disconnected when the
                // client left.
                if events.try_send(ChatEvent::Text(piece.to_string())).is_err() {
                    return Err(Error::Request("the client left".into()));
                }
            }
            Ok(())
        });
        health.beat(true);
        match generated {
            Ok(generation) => {
                let total_ms = started.elapsed().as_secs_f64() * 1e3;
                let result = CaptionResult::new(&generation, generator.cache(), total_ms);
                self.shared.metrics.caption(Origin::Http, &CaptionFigures::of(&result));
                Ok(ChatAnswer {
                    text: generation.text.clone(),
                    prompt_tokens: generation.prompt_tokens,
                    completion_tokens: generation.token_ids.len(),
                    stop: generation.stop,
                    extension: Extension {
                        policy: result.policy,
                        keep: result.keep,
                        pool_bytes: result.pool_bytes,
                        pool_slots: result.pool_slots,
                        cache_entries: result.cache_entries,
                        merged: result.merged,
                        evicted: result.evicted,
                        stop: stop_name(generation.stop),
                        total_ms,
                        timings_ms: generation.timings,
                        frame_id: None,
                    },
                })
            }
            Err(err) => Err(self.job_error(route, &err)),
        }
    }

    /// `"model": "memory"`: the question asked of the camera memory, as
    /// `POST /memory/ask` asks it.
    fn chat_memory(
        &mut self,
        generator: &mut Generator<'_>,
        stream: &mut Stream<'_>,
        job: &ChatJob,
    ) -> std::result::Result<ChatAnswer, JobError> {
        // Invariant of `openai::parse_request`: a memory job has one user turn.
        let question = job.turns.last().map_or("", |t| t.text.as_str());
        // The request's length, sampling and stop strings.
        let record = self.ask(generator, stream, question, &job.params)?;
        let pool = generator.cache().pool();
        Ok(ChatAnswer {
            text: record.answer.clone(),
            prompt_tokens: record.prompt_tokens,
            completion_tokens: record.tokens,
            stop: record.stop,
            extension: Extension {
                policy: record.policy,
                keep: generator.cache().keep().get(),
                pool_bytes: pool.bytes(),
                pool_slots: pool.capacity(),
                cache_entries: pool.len(),
                merged: generator.cache().stats().merged,
                evicted: generator.cache().stats().evicted,
                stop: stop_name(record.stop),
                total_ms: record.answer_ms,
                timings_ms: record.timings_ms,
                frame_id: Some(record.frame_id),
            },
        })
    }

    /// Counts, logs and sorts a failed job into the client's fault or ours.
    fn job_error(&self, route: &str, err: &Error) -> JobError {
        let message = error_chain(err);
        let (kind, outcome) = match err {
            Error::Image(_) => (kind::IMAGE, JobError::BadRequest(message.clone())),
            Error::Prompt(_)
            | Error::CapacityExceeded { .. }
            | Error::Request(_)
            | Error::NewTokens { .. }
            | Error::Sampling { .. }
            | Error::StopStrings(_) => (kind::REQUEST, JobError::BadRequest(message.clone())),
            _ => (kind::CAPTION, JobError::Failed(message.clone())),
        };
        log::warn!("{route}: {message}");
        self.shared.metrics.error(kind);
        self.shared.health.error(kind, &message);
        outcome
    }
}

fn stop_name(stop: StopReason) -> &'static str {
    match stop {
        StopReason::StopToken => "stop_token",
        StopReason::MaxTokens => "max_tokens",
        StopReason::StopString => "stop_string",
    }
}

impl Captioner {
    /// A record that cannot be written as JSON (paths are written lossily,
    /// so this is not expected): counted as an output error and shown in
    /// health, never dropped silently.
    fn unserialisable(&self, id: u64, e: serde_json::Error) -> Error {
        let err = Error::Output {
            target: format!("frame {id}'s record"),
            source: e.into(),
        };
        let message = error_chain(&err);
        log::error!("{message}");
        self.shared.metrics.error(kind::OUTPUT);
        self.shared.health.output(Err(&message));
        self.shared.health.error(kind::OUTPUT, &message);
        err
    }

    /// A memory stream's record to the event stream, the output file and
    /// (`latest`: a frame's record) `/caption/latest`.
    fn publish(&mut self, id: u64, record: &impl Serialize, latest: bool) -> Result<()> {
        let shared = &self.shared;
        let data: Arc<str> = match serde_json::to_string(record) {
            Ok(json) => json.into(),
            Err(e) => return Err(self.unserialisable(id, e)),
        };
        if latest {
            shared.set_latest(Arc::clone(&data));
        }
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
            Err(e) => return Err(self.unserialisable(record.frame_id, e)),
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
        self.shared.metrics.remembered(record.frame_ms, &record.memory);
        self.publish(record.frame_id, record, true)
    }

    fn on_answer(&mut self, record: &AnswerRecord) -> Result<()> {
        self.shared.health.beat(true);
        self.shared.metrics.question(record.answer_ms, &record.memory);
        self.publish(record.frame_id, record, false)
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

    fn on_text(&mut self, _piece: &str) {
        self.shared.health.beat(false);
    }
}
