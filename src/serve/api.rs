//! The service's routes:
//!
//! | route | answer |
//! |---|---|
//! | `GET /healthz` | JSON health; 200 when ok, 503 when degraded |
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /caption/latest` | the last stream caption's record; 404 before the first |
//! | `GET /captions/stream`, `GET /events` | server-sent events, one `caption` event per stream caption |
//! | `POST /caption[?prompt=...]` | captions the image in the body (413 over the limit, 400 if it does not decode) |
//!
//! Every failure is an HTTP answer with a JSON `{"error": ...}` body; no
//! request can take a thread down.

use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

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

/// The routes over `shared`, sending caption jobs to `jobs`.
pub fn handler(shared: Arc<Shared>, jobs: SyncSender<Job>, max_body: u64) -> Arc<Handler> {
    Arc::new(move |request: Request, connection: &mut Connection| {
        let route = route_name(&request.path);
        let status = route_request(&shared, &jobs, max_body, request, connection);
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
        _ => "other",
    }
}

/// Answers one request; returns the status sent.
fn route_request(
    shared: &Shared,
    jobs: &SyncSender<Job>,
    max_body: u64,
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
        ("POST", "/caption") => post_caption(shared, jobs, max_body, &request, connection),
        (_, "/healthz" | "/metrics" | "/caption/latest" | "/captions/stream" | "/events") => {
            Response::error(405, &format!("{method} is not allowed here")).with_header("Allow", "GET")
        }
        (_, "/caption") => Response::error(405, &format!("{method} is not allowed here")).with_header("Allow", "POST"),
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
    match jobs.try_send(Job { image, prompt, reply }) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return Response::error(503, "busy: too many captions queued; try again").with_header("Retry-After", "5")
        }
        Err(TrySendError::Disconnected(_)) => return Response::error(503, "the service is stopping"),
    }
    match answer.recv_timeout(POST_TIMEOUT) {
        Ok(Ok(caption)) => Response::json(200, &caption),
        Ok(Err(JobError::BadRequest(message))) => Response::error(400, &message),
        Ok(Err(JobError::Failed(message))) => Response::error(500, &message),
        Err(RecvTimeoutError::Timeout) => Response::error(504, "the caption took too long"),
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
