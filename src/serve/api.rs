//! The service's routes:
//!
//! | route | answer |
//! |---|---|
//! | `GET /healthz` | JSON health; 200 when ok, 503 when degraded |
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /caption/latest` | the last stream caption's record; 404 before the first |
//! | `GET /captions/stream`, `GET /events` | server-sent events, one `caption` event per stream caption |
//! | `POST /caption[?prompt=...]` | captions the image in the body (413 over the limit, 400 if it does not decode; 409 while the memory is on: a caption would reset the pool the memory lives in) |
//! | `POST /memory/ask` | JSON `{"question": "...", "max_tokens": 64}` (max_tokens optional): answers from the camera memory between frames, queued like `POST /caption`; 200 with the question, the answer, `frame_id` (the newest frame in memory) and the memory's figures; 400 for an empty question or a max_tokens of 0 or above what the budget holds, 409 when `[memory]` is off or no frame is in memory yet |
//!
//! A question and its answer stay in the memory, as a robot remembers what
//! it was asked; the budget holds either way (docs/memory.md).
//!
//! Every failure is an HTTP answer with a JSON `{"error": ...}` body; no
//! request can take a thread down.

use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use super::config::MAX_NEW_TOKENS_LIMIT;
use super::http::{BodyError, Connection, Handler, Request, Response};
use super::metrics::kind;
use super::worker::{Job, JobError};
use super::Shared;

/// How long a POST waits for its caption (a queue of a few, each seconds
/// long on a Jetson).
const POST_TIMEOUT: Duration = Duration::from_secs(300);
/// An event-stream client hears at least this often (a comment when no
/// caption came), which also finds clients that left.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// What the routes need to know of the config.
#[derive(Clone, Copy, Debug)]
pub struct Routes {
    /// The largest request body, in bytes (`http.max_body`).
    pub max_body: u64,
    /// `[memory] enabled`: `POST /memory/ask` answers, `POST /caption` does not.
    pub memory: bool,
}

/// Tokens of an answer when the question does not say.
const DEFAULT_ANSWER_TOKENS: usize = 64;

/// The routes over `shared`, sending jobs to `jobs`.
pub fn handler(shared: Arc<Shared>, jobs: SyncSender<Job>, routes: Routes) -> Arc<Handler> {
    Arc::new(move |request: Request, connection: &mut Connection| {
        let route = route_name(&request.path);
        let status = route_request(&shared, &jobs, routes, request, connection);
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
        _ => "other",
    }
}

/// Answers one request; returns the status sent.
fn route_request(
    shared: &Shared,
    jobs: &SyncSender<Job>,
    routes: Routes,
    request: Request,
    connection: &mut Connection,
) -> u16 {
    let method = request.method.as_str();
    let response = match (method, request.path.as_str()) {
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
    let image = match connection.read_body(request, max_body) {
        Ok(body) if body.is_empty() => return bad(400, "empty body: POST the image's bytes (PNG, JPEG, ...)"),
        Ok(body) => body,
        Err(BodyError::TooLarge { limit }) => {
            return bad(
                413,
                &format!("the image is over the limit of {limit} bytes (http.max_body)"),
            )
        }
        Err(BodyError::Malformed(reason)) => return bad(400, &reason),
        Err(BodyError::Io(e)) => return bad(400, &format!("reading the body: {e}")),
    };
    let (reply, answer) = mpsc::sync_channel(1);
    queue_and_wait(jobs, Job::Caption { image, prompt, reply }, &answer)
}

/// The body of `POST /memory/ask`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AskBody {
    question: String,
    max_tokens: Option<usize>,
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
        Err(BodyError::TooLarge { limit }) => {
            return bad(
                413,
                &format!("the body is over the limit of {limit} bytes (http.max_body)"),
            )
        }
        Err(BodyError::Malformed(reason)) => return bad(400, &reason),
        Err(BodyError::Io(e)) => return bad(400, &format!("reading the body: {e}")),
    };
    let ask: AskBody = match serde_json::from_slice(&body) {
        Ok(ask) => ask,
        Err(e) => {
            return bad(
                400,
                &format!("the body is not {{\"question\": \"...\", \"max_tokens\": N}}: {e}"),
            )
        }
    };
    if ask.question.trim().is_empty() {
        return bad(400, "the question is empty");
    }
    let max_tokens = ask.max_tokens.unwrap_or(DEFAULT_ANSWER_TOKENS);
    if max_tokens == 0 || max_tokens > MAX_NEW_TOKENS_LIMIT {
        return bad(
            400,
            &format!("max_tokens {max_tokens} is outside 1..={MAX_NEW_TOKENS_LIMIT}"),
        );
    }
    let (reply, answer) = mpsc::sync_channel(1);
    queue_and_wait(
        jobs,
        Job::Ask {
            question: ask.question,
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
