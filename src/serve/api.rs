//! The service's routes:
//!
//! | route | answer |
//! |---|---|
//! | `GET /healthz` | JSON health; 200 when ok, 503 when degraded |
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /caption/latest` | the last stream caption's record; 404 before the first |
//! | `GET /captions/stream`, `GET /events` | server-sent events, one `caption` event per stream caption |
//! | `POST /caption[?prompt=...]` | captions the image in the body (413 over the limit, 400 if it does not decode or a query parameter is bad; 409 while the memory is on: a caption would reset the pool the memory lives in); the query may also give `temperature`, `top_p`, `top_k`, `repetition_penalty`, `seed` (greedy unless it samples, as for `/v1/chat/completions`) and one `stop` string |
//! | `POST /memory/ask` | JSON `{"question": "...", "max_tokens": 64}` (max_tokens optional): answers from the camera memory between frames, queued like `POST /caption`; 200 with the question, the answer, `frame_id` (the newest frame in memory) and the memory's figures; 400 for an empty question or a max_tokens of 0 or above what the budget holds, 409 when `[memory]` is off or no frame is in memory yet |
//!
//! | `POST /v1/chat/completions` | OpenAI's chat completions ([`super::openai`]): messages with images as `data:` URLs, streamed or not; queued like `POST /caption` (the same 409 while the memory is on, unless `"model": "memory"` asks it) |
//! | `GET /v1/models` | the loaded model (and `memory` when it is on), in OpenAI's list shape |
//!
//! With `http.api_key` set, every route but `/healthz` wants
//! `Authorization: Bearer KEY`: 401 without it (OpenAI's error shape on
//! `/v1`, ours elsewhere). The key is compared in constant time and never
//! logged.
//!
//! A question and its answer stay in the memory, as a robot remembers what
//! it was asked; the budget holds either way (docs/memory.md).
//!
//! Every failure is an HTTP answer with a JSON `{"error": ...}` body
//! (`{"error": {"message", "type", "param", "code"}}` on `/v1`); no request
//! can take a thread down.

use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use super::config::{ApiKey, MAX_NEW_TOKENS_LIMIT};
use super::http::{BodyError, Connection, Handler, Request, Response};
use super::metrics::kind;
use super::openai::{self, ApiError};
use super::worker::{chat_events_room, ChatEvent, Job, JobError};
use super::Shared;
use crate::sampling::Sampling;

/// How long a POST waits for its caption (a queue of a few, each seconds
/// long on a Jetson).
const POST_TIMEOUT: Duration = Duration::from_secs(300);
/// An event-stream client hears at least this often (a comment when no
/// caption came), which also finds clients that left.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// What the routes need to know of the config and the model.
#[derive(Clone, Debug)]
pub struct Routes {
    /// The largest request body, in bytes (`http.max_body`).
    pub max_body: u64,
    /// `[memory] enabled`: `POST /memory/ask` answers, `POST /caption` does not.
    pub memory: bool,
    /// The loaded model's name (`GET /v1/models`).
    pub model: String,
    /// When it was loaded, unix seconds (`created` in `GET /v1/models`).
    pub loaded_unix: u64,
    /// Tokens of a chat answer when the request does not say
    /// (`caption.max_new_tokens`).
    pub default_tokens: usize,
    /// `http.api_key`: wanted on every route but `/healthz`.
    pub api_key: Option<ApiKey>,
}

/// Whether `request` may go on: without a key configured, or for
/// `/healthz`, always; else with `Authorization: Bearer KEY`.
fn authorized(routes: &Routes, request: &Request) -> bool {
    let Some(key) = &routes.api_key else {
        return true;
    };
    if request.path == "/healthz" {
        return true;
    }
    let given = request.authorization.as_deref().and_then(|value| {
        let (scheme, token) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    given.is_some_and(|token| key.matches(token))
}

/// Tokens of an answer when the question does not say.
const DEFAULT_ANSWER_TOKENS: usize = 64;

/// The routes over `shared`, sending jobs to `jobs`.
pub fn handler(shared: Arc<Shared>, jobs: SyncSender<Job>, routes: Routes) -> Arc<Handler> {
    Arc::new(move |request: Request, connection: &mut Connection| {
        let route = route_name(&request.path);
        let status = route_request(&shared, &jobs, &routes, request, connection);
        shared.metrics.http_request(route, status);
    })
}

/// The route label of a path, from a fixed set (metrics labels must not
/// grow with what clients send).
fn route_name(path: &str) -> &'static str {
    match path {
        "/healthz" => "/healthz",
        "/metrics" => "/metrics",
        "/caption/latest" => "/caption/latest",
        "/captions/stream" | "/events" => "/captions/stream",
        "/caption" => "/caption",
        "/memory/ask" => "/memory/ask",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/models" => "/v1/models",
        _ => "other",
    }
}

/// Answers one request; returns the status sent.
fn route_request(
    shared: &Shared,
    jobs: &SyncSender<Job>,
    routes: &Routes,
    request: Request,
    connection: &mut Connection,
) -> u16 {
    let method = request.method.as_str();
    let response = match (method, request.path.as_str()) {
        _ if !authorized(routes, &request) => {
            shared.metrics.error(kind::REQUEST);
            log::debug!("http: {method} {}: no or wrong API key", request.path);
            let message = "a valid API key is needed: Authorization: Bearer KEY (http.api_key)";
            match request.path.starts_with("/v1/") {
                true => ApiError::new(401, message).with_code("invalid_api_key").response(),
                false => Response::error(401, message).with_header("WWW-Authenticate", "Bearer"),
            }
        }
        ("GET", "/healthz") => {
            let report = shared.health_report();
            Response::json(if report.ok() { 200 } else { 503 }, &report)
        }
        ("GET", "/metrics") => Response::new(200, "text/plain; version=0.0.4; charset=utf-8", shared.metrics_text()),
        ("GET", "/caption/latest") => match shared.latest() {
            Some(record) => {
                let mut body = record.as_bytes().to_vec();
                body.push(b'\n');
                Response::new(200, "application/json", body)
            }
            None => Response::error(404, "no caption yet"),
        },
        ("GET", "/captions/stream" | "/events") => return event_stream(shared, connection),
        ("POST", "/caption") if routes.memory => {
            shared.metrics.error(kind::REQUEST);
            Response::error(
                409,
                "the camera memory is on ([memory] enabled): a one-off caption would reset the pool it lives in; \
                 ask the memory with POST /memory/ask",
            )
        }
        ("POST", "/caption") => post_caption(shared, jobs, routes.max_body, &request, connection),
        ("POST", "/memory/ask") if !routes.memory => {
            shared.metrics.error(kind::REQUEST);
            Response::error(
                409,
                "the camera memory is off: set [memory] enabled = true in the config",
            )
        }
        ("POST", "/memory/ask") => post_ask(shared, jobs, routes.max_body, &request, connection),
        (_, "/healthz" | "/metrics" | "/caption/latest" | "/captions/stream" | "/events") => {
            Response::error(405, &format!("{method} is not allowed here")).with_header("Allow", "GET")
        }
        (_, "/caption" | "/memory/ask") => {
            Response::error(405, &format!("{method} is not allowed here")).with_header("Allow", "POST")
        }
        ("GET", "/v1/models") => Response::json(200, &openai::models(&routes.model, routes.memory, routes.loaded_unix)),
        ("POST", "/v1/chat/completions") => match chat_completions(shared, jobs, routes, &request, connection) {
            Chat::Respond(response) => response,
            Chat::Streamed(status) => return status,
        },
        (_, "/v1/models") => ApiError::new(405, format!("{method} is not allowed here"))
            .response()
            .with_header("Allow", "GET"),
        (_, "/v1/chat/completions") => ApiError::new(405, format!("{method} is not allowed here"))
            .response()
            .with_header("Allow", "POST"),
        (_, path) if path.starts_with("/v1/") => ApiError::new(404, format!("no route {path}"))
            .with_code("unknown_url")
            .response(),
        _ => Response::error(404, &format!("no route {}", request.path)),
    };
    if let Err(e) = connection.respond(&response) {
        log::debug!("http: the answer to {method} {} was not sent: {e}", request.path);
    }
    response.status
}

fn post_caption(
    shared: &Shared,
    jobs: &SyncSender<Job>,
    max_body: u64,
    request: &Request,
    connection: &mut Connection,
) -> Response {
    let bad = |status: u16, message: &str| {
        shared.metrics.error(kind::REQUEST);
        Response::error(status, message)
    };
    let prompt = match request.query_param("prompt") {
        Ok(Some(prompt)) if prompt.trim().is_empty() => return bad(400, "the prompt is empty"),
        Ok(prompt) => prompt,
        Err(reason) => return bad(400, &format!("bad query: {reason}")),
    };
    let (sampling, stop_strings) = match caption_sampling(request) {
        Ok(settings) => settings,
        Err(message) => return bad(400, &message),
    };
    let image = match connection.read_body(request, max_body) {
        Ok(body) if body.is_empty() => return bad(400, "empty body: POST the image's bytes (PNG, JPEG, ...)"),
        Ok(body) => body,
        Err(e) => {
            let (status, message) = body_refusal(e, "the image");
            return bad(status, &message);
        }
    };
    let (reply, answer) = mpsc::sync_channel(1);
    let job = Job::Caption {
        image,
        prompt,
        sampling,
        stop_strings,
        reply,
    };
    queue_and_wait(jobs, job, &answer)
}

/// `POST /caption`'s sampling query parameters (`temperature`, `top_p`,
/// `top_k`, `repetition_penalty`, `seed`, as `/v1/chat/completions` takes
/// them) and its one `stop` string.
fn caption_sampling(request: &Request) -> std::result::Result<(Sampling, Vec<String>), String> {
    fn field<T: std::str::FromStr>(
        request: &Request,
        name: &str,
        what: &str,
    ) -> std::result::Result<Option<T>, String> {
        match request.query_param(name) {
            Ok(None) => Ok(None),
            Ok(Some(value)) => value
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| format!("{name} {value:?} is not {what}")),
            Err(reason) => Err(format!("bad query: {reason}")),
        }
    }
    let fields = openai::SamplingFields {
        temperature: field(request, "temperature", "a number")?,
        top_p: field(request, "top_p", "a number")?,
        top_k: field(request, "top_k", "a whole number, 0 (off) or more")?,
        repetition_penalty: field(request, "repetition_penalty", "a number")?,
        seed: field(request, "seed", "a whole number")?,
    };
    let sampling = fields.sampling().map_err(|(_, message)| message)?;
    let stop_strings = match request.query_param("stop") {
        Ok(None) => Vec::new(),
        Ok(Some(stop)) if stop.is_empty() => return Err("the stop string is empty".into()),
        Ok(Some(stop)) => vec![stop],
        Err(reason) => return Err(format!("bad query: {reason}")),
    };
    Ok((sampling, stop_strings))
}

/// A body that could not be read, as a status and a message: 413 over
/// `http.max_body`, 400 otherwise. `what` names the body (`the image`).
fn body_refusal(error: BodyError, what: &str) -> (u16, String) {
    match error {
        BodyError::TooLarge { limit } => (
            413,
            format!("{what} is over the limit of {limit} bytes (http.max_body)"),
        ),
        BodyError::Malformed(reason) => (400, reason),
        BodyError::Io(e) => (400, format!("reading the body: {e}")),
    }
}

/// The body of `POST /memory/ask`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AskBody {
    question: String,
    max_tokens: Option<usize>,
}

/// A checked `POST /memory/ask` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub question: String,
    pub max_tokens: usize,
}

/// Reads a `POST /memory/ask` body; the error is the 400's message.
pub fn parse_ask(body: &[u8]) -> Result<Ask, String> {
    let ask: AskBody = serde_json::from_slice(body).map_err(|e| {
        format!(
            "the body is not {{\"question\": \"...\", \"max_tokens\": N}}: {}",
            crate::error::one_line(&e.to_string())
        )
    })?;
    if ask.question.trim().is_empty() {
        return Err("the question is empty".into());
    }
    let max_tokens = ask.max_tokens.unwrap_or(DEFAULT_ANSWER_TOKENS);
    if max_tokens == 0 || max_tokens > MAX_NEW_TOKENS_LIMIT {
        return Err(format!("max_tokens {max_tokens} is outside 1..={MAX_NEW_TOKENS_LIMIT}"));
    }
    Ok(Ask {
        question: ask.question,
        max_tokens,
    })
}

fn post_ask(
    shared: &Shared,
    jobs: &SyncSender<Job>,
    max_body: u64,
    request: &Request,
    connection: &mut Connection,
) -> Response {
    let bad = |status: u16, message: &str| {
        shared.metrics.error(kind::REQUEST);
        Response::error(status, message)
    };
    let body = match connection.read_body(request, max_body) {
        Ok(body) => body,
        Err(e) => {
            let (status, message) = body_refusal(e, "the body");
            return bad(status, &message);
        }
    };
    let Ask { question, max_tokens } = match parse_ask(&body) {
        Ok(ask) => ask,
        Err(message) => return bad(400, &message),
    };
    let (reply, answer) = mpsc::sync_channel(1);
    queue_and_wait(
        jobs,
        Job::Ask {
            question,
            max_tokens,
            reply,
        },
        &answer,
    )
}

/// Queues `job` for the captioning thread (503 when the queue is full) and
/// waits for its answer.
fn queue_and_wait<T: serde::Serialize>(
    jobs: &SyncSender<Job>,
    job: Job,
    answer: &mpsc::Receiver<std::result::Result<T, JobError>>,
) -> Response {
    match jobs.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return Response::error(503, "busy: too many requests queued; try again").with_header("Retry-After", "5")
        }
        Err(TrySendError::Disconnected(_)) => return Response::error(503, "the service is stopping"),
    }
    match answer.recv_timeout(POST_TIMEOUT) {
        Ok(Ok(answer)) => Response::json(200, &answer),
        Ok(Err(JobError::BadRequest(message))) => Response::error(400, &message),
        Ok(Err(JobError::Conflict(message))) => Response::error(409, &message),
        Ok(Err(JobError::Failed(message))) => Response::error(500, &message),
        Err(RecvTimeoutError::Timeout) => Response::error(504, "the answer took too long"),
        // The job was dropped unanswered: the captioning thread stopped.
        Err(RecvTimeoutError::Disconnected) => Response::error(503, "the service is stopping"),
    }
}

/// How `POST /v1/chat/completions` was answered.
enum Chat {
    /// A whole response, still to send.
    Respond(Response),
    /// Streamed already, with this status.
    Streamed(u16),
}

impl From<JobError> for ApiError {
    fn from(error: JobError) -> Self {
        match error {
            JobError::BadRequest(message) => ApiError::new(400, message),
            JobError::Conflict(message) => ApiError::new(409, message),
            JobError::Failed(message) => ApiError::new(500, message),
        }
    }
}

fn chat_completions(
    shared: &Shared,
    jobs: &SyncSender<Job>,
    routes: &Routes,
    request: &Request,
    connection: &mut Connection,
) -> Chat {
    let bad = |error: ApiError| {
        shared.metrics.error(kind::REQUEST);
        Chat::Respond(error.response())
    };
    let body = match connection.read_body(request, routes.max_body) {
        Ok(body) => body,
        Err(e) => {
            let (status, message) = body_refusal(e, "the body");
            let error = ApiError::new(status, message);
            return bad(match status {
                413 => error.with_code("request_too_large"),
                _ => error,
            });
        }
    };
    let job = match openai::parse_request(&body, routes.default_tokens, routes.memory) {
        Ok(job) => job,
        Err(error) => return bad(error),
    };
    drop(body);
    let model = match job.memory {
        true => openai::MEMORY_MODEL.to_string(),
        false => routes.model.clone(),
    };
    let (stream, include_usage, memory) = (job.stream, job.include_usage, job.memory);
    let (events, answers) = mpsc::sync_channel(chat_events_room(&job));
    match jobs.try_send(Job::Chat { job, events }) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return Chat::Respond(
                ApiError::new(503, "busy: too many requests queued; try again")
                    .with_code("queue_full")
                    .response(),
            )
        }
        Err(TrySendError::Disconnected(_)) => {
            return Chat::Respond(ApiError::new(503, "the service is stopping").response())
        }
    }
    let next = || match answers.recv_timeout(POST_TIMEOUT) {
        Ok(event) => Ok(event),
        Err(RecvTimeoutError::Timeout) => Err(ApiError::new(504, "the answer took too long")),
        // The job was dropped unanswered: the captioning thread stopped.
        Err(RecvTimeoutError::Disconnected) => Err(ApiError::new(503, "the service is stopping")),
    };
    let id = openai::completion_id();
    if !stream {
        return Chat::Respond(match next() {
            Ok(ChatEvent::Done(Ok(answer))) => Response::json(200, &openai::completion(&id, &model, &answer)),
            Ok(ChatEvent::Done(Err(error))) => ApiError::from(error).response(),
            // Not sent for a job that does not stream.
            Ok(ChatEvent::Text(_)) => ApiError::new(500, "a piece of text before the answer").response(),
            Err(error) => error.response(),
        });
    }
    // Streamed: a job refused before its first piece is an HTTP error.
    let first = match next() {
        Ok(ChatEvent::Done(Err(error))) => return Chat::Respond(ApiError::from(error).response()),
        Ok(event) => event,
        Err(error) => return Chat::Respond(error.response()),
    };
    if connection.start_event_stream().is_err() {
        return Chat::Streamed(200);
    }
    let send = |connection: &mut Connection, value: &serde_json::Value| connection.send_data(&value.to_string());
    let role = openai::chunk(
        &id,
        &model,
        serde_json::json!({"role": "assistant", "content": ""}),
        None,
    );
    if send(connection, &role).is_err() {
        return Chat::Streamed(200);
    }
    let mut event: Result<ChatEvent, ApiError> = Ok(first);
    loop {
        match event {
            Ok(ChatEvent::Text(piece)) => {
                let delta = openai::chunk(&id, &model, serde_json::json!({ "content": piece }), None);
                if send(connection, &delta).is_err() {
                    // Dropping `answers` ends the generation.
                    log::debug!("http: a chat stream's client left");
                    return Chat::Streamed(200);
                }
            }
            Ok(ChatEvent::Done(Ok(answer))) => {
                let mut chunks = Vec::new();
                // A memory's answer comes whole, at the end.
                if memory && !answer.text.is_empty() {
                    let delta = serde_json::json!({ "content": answer.text });
                    chunks.push(openai::chunk(&id, &model, delta, None));
                }
                chunks.extend(openai::final_chunks(&id, &model, &answer, include_usage));
                for chunk in &chunks {
                    if send(connection, chunk).is_err() {
                        return Chat::Streamed(200);
                    }
                }
                let _ = connection.send_data("[DONE]");
                return Chat::Streamed(200);
            }
            Ok(ChatEvent::Done(Err(error))) => {
                let _ = send(connection, &ApiError::from(error).body());
                return Chat::Streamed(200);
            }
            Err(error) => {
                let _ = send(connection, &error.body());
                return Chat::Streamed(200);
            }
        }
        event = next();
    }
}

/// Streams captions to one client until it leaves or the service stops.
fn event_stream(shared: &Shared, connection: &mut Connection) -> u16 {
    let Some(subscription) = shared.events.subscribe() else {
        let _ = connection.respond(&Response::error(503, "too many event-stream clients"));
        return 503;
    };
    if connection.start_event_stream().is_err() {
        return 200;
    }
    loop {
        let sent = match subscription.events.recv_timeout(KEEPALIVE) {
            Ok(event) => connection.send_event("caption", event.id, &event.data),
            Err(RecvTimeoutError::Timeout) => connection.send_comment("keepalive"),
            // Closed at shutdown, or dropped for falling behind.
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if sent.is_err() {
            log::debug!("http: an event-stream client left");
            break;
        }
    }
    200
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `ask_request` fuzz target: serde quotes an unknown
    /// field as sent, line break and all.
    #[test]
    fn a_bad_ask_body_is_refused_on_one_line() {
        for body in [
            &br#"{"ion\nsWhat": 1}"#[..],
            b"{\"question\": \"\"}",
            b"not json",
            br#"{"question": "Hi", "max_tokens": 0}"#,
        ] {
            let message = parse_ask(body).unwrap_err();
            assert!(!message.contains(['\n', '\r']), "{message:?}");
        }
        let ask = parse_ask(br#"{"question": "What did you see?"}"#).unwrap();
        assert_eq!(ask.max_tokens, DEFAULT_ANSWER_TOKENS);
    }
}
