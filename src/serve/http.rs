//! The service's HTTP/1.1 server: hyper on a small tokio runtime.
//!
//! One tokio worker thread accepts connections and drives hyper; each
//! request's route runs on one of tokio's blocking threads, with the
//! request head and a [`Connection`] to read the body from and answer on
//! (the routes block on the captioning thread, which stays the one owner of
//! the model). The routes are in [`super::api`].
//!
//! What hyper does for us: request heads (at most [`MAX_HEAD`] bytes and
//! [`MAX_HEADERS`] headers, else 431), chunked bodies, `Expect:
//! 100-continue` (sent only when a route reads the body, so a refused body
//! is never asked for), keep-alive, and the header-read timer. What is ours:
//! the connection cap, the limits on bodies (a declared length over the
//! route's limit is refused before anything is read; bodies are never
//! allocated from their declared length), a body that stalls or a client
//! that stops reading closed after `idle_timeout`, and bounded event
//! streams.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Result};

/// The largest request head (request line and headers), in bytes; hyper's
/// smallest read buffer is 8 KiB.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 48;
/// The longest a whole body may take to arrive, however steadily it comes.
const BODY_DEADLINE: Duration = Duration::from_secs(300);
/// At most this much of a body a route did not read is read and dropped, so
/// the client sees the answer rather than a connection reset.
const DRAIN_LIMIT: usize = 64 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);
/// Pieces of an event stream waiting for a client; a client that lets this
/// many pile up is dropped.
const STREAM_QUEUE: usize = 256;

/// The server's limits (`[http]` in the config).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// A request head must arrive within this, timed from when the server
    /// waits for it: on connect, and after each answer on a kept-alive
    /// connection (so it is also how long an idle connection stays).
    pub header_timeout: Duration,
    /// A body that sends nothing for this long, or a client that reads
    /// nothing of its answer for this long, loses its connection.
    pub idle_timeout: Duration,
}

/// Connection counts, read at scrape time by `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    open: AtomicUsize,
    refused: AtomicU64,
}

impl ConnectionStats {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections refused (503) because [`Limits::max_connections`] were open.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// A request head, as the routes see it.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// What follows `?`, undecoded.
    pub query: Option<String>,
    /// The declared `Content-Length`, if any.
    pub content_length: Option<u64>,
    /// The `Authorization` header, if one came (never logged).
    pub authorization: Option<String>,
}

impl Request {
    fn from_head<B>(head: &hyper::Request<B>) -> Self {
        let header = |name: hyper::header::HeaderName| {
            head.headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(|value| value.trim().to_string())
        };
        Request {
            method: head.method().as_str().to_string(),
            path: head.uri().path().to_string(),
            query: head.uri().query().map(str::to_string),
            // hyper has checked it is one number.
            content_length: header(hyper::header::CONTENT_LENGTH).and_then(|length| length.parse().ok()),
            authorization: header(hyper::header::AUTHORIZATION),
        }
    }

    /// The value of query parameter `name`, percent-decoded (`+` is a
    /// space); `Err` for bad escapes or text that is not UTF-8.
    pub fn query_param(&self, name: &str) -> std::result::Result<Option<String>, String> {
        let Some(query) = &self.query else {
            return Ok(None);
        };
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if percent_decode(key)? == name {
                return percent_decode(value).map(Some);
            }
        }
        Ok(None)
    }
}

/// Why a body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// Over the limit (declared or counted): 413.
    TooLarge { limit: u64 },
    /// Bad chunked framing: 400.
    Malformed(String),
    /// The client went away or stalled.
    Io(io::Error),
}

/// A response with a complete body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        match serde_json::to_vec(value) {
            Ok(mut body) => {
                body.push(b'\n');
                Response::new(status, "application/json", body)
            }
            Err(e) => Response::error(500, &format!("cannot serialise the response: {e}")),
        }
    }

    /// `{"error": message}` with `status`.
    pub fn error(status: u16, message: &str) -> Self {
        let mut body = serde_json::json!({ "error": message, "status": status }).to_string();
        body.push('\n');
        Response::new(status, "application/json", body)
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// As hyper sends it. A header that is not valid HTTP is left out (and
    /// logged): none of ours comes from a client.
    fn to_hyper(&self, body: ResponseBody) -> hyper::Response<ResponseBody> {
        let mut response = hyper::Response::new(body);
        *response.status_mut() =
            hyper::StatusCode::from_u16(self.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(hyper::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let content_type = std::iter::once(("content-type", self.content_type.to_string()));
        for (name, value) in content_type.chain(self.headers.iter().map(|(n, v)| (*n, v.clone()))) {
            match (HeaderName::from_bytes(name.as_bytes()), HeaderValue::try_from(value)) {
                (Ok(name), Ok(value)) => {
                    headers.insert(name, value);
                }
                _ => log::warn!("http: header {name:?} is not valid HTTP; left out"),
            }
        }
        response
    }
}

/// A response body: whole, or the pieces of an event stream as they come.
#[derive(Debug)]
pub enum ResponseBody {
    Whole(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ResponseBody::Whole(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Stream(pieces) => pieces.poll_recv(cx).map(|piece| piece.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ResponseBody::Whole(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Whole(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// A route's ask for the body: read at most `limit` bytes.
struct BodyAsk {
    limit: u64,
    reply: oneshot::Sender<std::result::Result<Vec<u8>, BodyError>>,
}

/// One request's way back to its client, handed to the routes with it.
pub struct Connection {
    answer: Option<oneshot::Sender<hyper::Response<ResponseBody>>>,
    body: Option<oneshot::Sender<BodyAsk>>,
    stream: Option<mpsc::Sender<Bytes>>,
    pub peer: Option<SocketAddr>,
}

fn gone(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, what.to_string())
}

impl Connection {
    /// Reads the whole body, refusing more than `limit` bytes; a declared
    /// length over the limit is refused before anything is read.
    pub fn read_body(&mut self, request: &Request, limit: u64) -> std::result::Result<Vec<u8>, BodyError> {
        if request.content_length.is_some_and(|length| length > limit) {
            return Err(BodyError::TooLarge { limit });
        }
        let ask = self
            .body
            .take()
            .ok_or_else(|| BodyError::Io(gone("the body was read already")))?;
        let (reply, body) = oneshot::channel();
        ask.send(BodyAsk { limit, reply })
            .map_err(|_| BodyError::Io(gone("the connection closed")))?;
        // Dropped unanswered only when the server stops.
        body.blocking_recv()
            .unwrap_or_else(|_| Err(BodyError::Io(gone("the service is stopping"))))
    }

    /// Sends a complete response.
    pub fn respond(&mut self, response: &Response) -> io::Result<()> {
        let answer = self.answer.take().ok_or_else(|| gone("answered already"))?;
        let body = ResponseBody::Whole(Some(Bytes::copy_from_slice(&response.body)));
        answer
            .send(response.to_hyper(body))
            .map_err(|_| gone("the client left"))
    }

    /// Starts a `text/event-stream` response whose body lasts until the
    /// route ends or the client leaves; then [`Connection::send_event`],
    /// [`Connection::send_data`] and [`Connection::send_comment`].
    pub fn start_event_stream(&mut self) -> io::Result<()> {
        let answer = self.answer.take().ok_or_else(|| gone("answered already"))?;
        let (pieces, body) = mpsc::channel(STREAM_QUEUE);
        let head = Response::new(200, "text/event-stream", Vec::new()).with_header("x-accel-buffering", "no");
        answer
            .send(head.to_hyper(ResponseBody::Stream(body)))
            .map_err(|_| gone("the client left"))?;
        self.stream = Some(pieces);
        self.push(Bytes::from_static(b": captions from elastic-edge\n\n"))
    }

    /// One server-sent event; `data` must be one line (JSON is).
    pub fn send_event(&mut self, event: &str, id: u64, data: &str) -> io::Result<()> {
        self.push(format!("event: {event}\nid: {id}\ndata: {data}\n\n").into())
    }

    /// One unnamed server-sent event (`data: ...`, as OpenAI streams); `data`
    /// must be one line (JSON is).
    pub fn send_data(&mut self, data: &str) -> io::Result<()> {
        self.push(format!("data: {data}\n\n").into())
    }

    /// A comment line: keeps the connection alive, and finds a client gone.
    pub fn send_comment(&mut self, text: &str) -> io::Result<()> {
        self.push(format!(": {text}\n\n").into())
    }

    /// Queues one piece of the event stream. Never blocks: a client that
    /// has [`STREAM_QUEUE`] pieces unread is dropped (its stream ends).
    fn push(&mut self, piece: Bytes) -> io::Result<()> {
        let pieces = self.stream.as_ref().ok_or_else(|| gone("no event stream"))?;
        match pieces.try_send(piece) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.stream = None;
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client is not reading: dropped",
                ))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.stream = None;
                Err(gone("the client left"))
            }
        }
    }
}

/// The routes: given the request and its connection, answer it.
pub type Handler = dyn Fn(Request, &mut Connection) + Send + Sync;

/// The running server; dropping it does not stop it, [`HttpServer::stop`] does.
pub struct HttpServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Binds `addr` and serves on a thread of its own.
    pub fn start(addr: SocketAddr, limits: Limits, handler: Arc<Handler>, stats: Arc<ConnectionStats>) -> Result<Self> {
        let service_io = |what: &str| {
            let what = what.to_string();
            move |source| Error::ServiceIo { what, source }
        };
        let listener = std::net::TcpListener::bind(addr).map_err(service_io(&format!("listening on {addr}")))?;
        let addr = listener.local_addr().map_err(service_io("the listening address"))?;
        listener
            .set_nonblocking(true)
            .map_err(service_io("the listening socket"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            // A route blocks a thread while it waits for the model; the
            // connection cap bounds how many wait.
            .max_blocking_threads(limits.max_connections.saturating_add(8))
            .thread_name("http")
            .enable_io()
            .enable_time()
            .build()
            .map_err(service_io("starting the HTTP runtime"))?;
        let listener = {
            let _inside = runtime.enter();
            TcpListener::from_std(listener).map_err(service_io("the listening socket"))?
        };
        let (stop, stopped) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("http-accept".into())
            .spawn(move || {
                runtime.block_on(accept_loop(listener, limits, handler, stats, stopped));
                // Connections still open (event streams, say) are dropped.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(service_io("starting the HTTP thread"))?;
        Ok(HttpServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address (the port, when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the server's thread is still running.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops accepting; requests in progress get a moment to finish, then
    /// their connections close.
    pub fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long requests in progress have to finish once the server stops.
const STOP_GRACE: Duration = Duration::from_millis(500);

async fn accept_loop(
    listener: TcpListener,
    limits: Limits,
    handler: Arc<Handler>,
    stats: Arc<ConnectionStats>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait instead of spinning.
                    log::warn!("http: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        if stats.open.fetch_add(1, Ordering::SeqCst) >= limits.max_connections {
            stats.open.fetch_sub(1, Ordering::SeqCst);
            stats.refused.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(refuse(stream));
            continue;
        }
        let open = OpenGuard(Arc::clone(&stats));
        let handler = Arc::clone(&handler);
        let stop = stop.clone();
        tokio::spawn(async move {
            let _open = open;
            serve_connection(stream, peer, limits, handler, stop).await;
        });
    }
    tokio::time::sleep(STOP_GRACE).await;
}

/// Counts a connection open until its task ends.
struct OpenGuard(Arc<ConnectionStats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The answer to a connection over the cap, written without hyper.
async fn refuse(mut stream: TcpStream) {
    let body = serde_json::json!({ "error": "too many connections", "status": 503 }).to_string() + "\n";
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\nretry-after: 1\r\ncache-control: no-store\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    limits: Limits,
    handler: Arc<Handler>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(StallLimit {
        stream,
        limit: limits.idle_timeout,
        stalled: None,
    });
    let service = hyper::service::service_fn(move |request| answer(request, Arc::clone(&handler), peer, limits));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let outcome = tokio::select! {
        outcome = connection.as_mut() => outcome,
        _ = stop.changed() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = outcome {
        log::debug!("http: connection from {peer}: {e}");
    }
}

/// Answers one request: its route runs on a blocking thread; this task
/// reads the body when the route asks, and returns the route's answer.
async fn answer(
    request: hyper::Request<Incoming>,
    handler: Arc<Handler>,
    peer: SocketAddr,
    limits: Limits,
) -> std::result::Result<hyper::Response<ResponseBody>, Infallible> {
    let head = Request::from_head(&request);
    let expects_continue = request
        .headers()
        .get(hyper::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut body = Some(request.into_body());
    let (answer, mut answered) = oneshot::channel();
    let (body_asks, mut body_asked) = oneshot::channel::<BodyAsk>();
    let mut connection = Connection {
        answer: Some(answer),
        body: Some(body_asks),
        stream: None,
        peer: Some(peer),
    };
    // The route keeps `connection` until it returns: an event stream lives
    // as long as the route feeds it.
    let route = tokio::task::spawn_blocking(move || handler(head, &mut connection));
    let mut asking = true;
    let response = loop {
        tokio::select! {
            response = &mut answered => break response,
            ask = &mut body_asked, if asking => {
                asking = false;
                if let (Ok(ask), Some(body)) = (ask, body.take()) {
                    let _ = ask.reply.send(read_body(body, ask.limit, limits.idle_timeout).await);
                }
            }
        }
    };
    // A route that did not read the body: read what comes of it, briefly,
    // so the client reads the answer instead of a reset (unless it waits
    // for 100 Continue and has sent nothing).
    if let Some(body) = body.filter(|_| !expects_continue) {
        tokio::spawn(drain(body));
    }
    Ok(response.unwrap_or_else(|_| {
        // The route returned without answering, or panicked.
        let failed = match route.is_finished() {
            true => "the route did not answer",
            false => "the route failed",
        };
        Response::error(500, failed).to_hyper(ResponseBody::Whole(None))
    }))
}

async fn read_body(mut body: Incoming, limit: u64, idle: Duration) -> std::result::Result<Vec<u8>, BodyError> {
    let deadline = Instant::now() + BODY_DEADLINE;
    let mut out = Vec::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(BodyError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("nothing of the body came for {} s", idle.as_secs_f64()),
                )))
            }
            Ok(None) => return Ok(out),
            Ok(Some(Err(e))) if e.is_incomplete_message() || e.is_closed() => {
                return Err(BodyError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    e.to_string(),
                )))
            }
            Ok(Some(Err(e))) => return Err(BodyError::Malformed(format!("the body is malformed: {e}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if (out.len() as u64).saturating_add(data.len() as u64) > limit {
                return Err(BodyError::TooLarge { limit });
            }
            out.extend_from_slice(&data);
        }
        if Instant::now() > deadline {
            return Err(BodyError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the body took over {} s", BODY_DEADLINE.as_secs()),
            )));
        }
    }
}

async fn drain(mut body: Incoming) {
    let read = async {
        let mut read = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len());
            if read > DRAIN_LIMIT {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

/// A socket whose writes fail once they have waited `limit` for the client
/// to read: a client that stops reading its answer (or an event stream)
/// does not keep its connection.
struct StallLimit {
    stream: TcpStream,
    limit: Duration,
    /// Running while a write waits.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl StallLimit {
    fn on_write<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for the idle timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for StallLimit {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallLimit {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.on_write(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.on_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        this.on_write(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

fn percent_decode(text: &str) -> std::result::Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape in {text:?}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn request(query: &str) -> Request {
        Request {
            method: "POST".into(),
            path: "/caption".into(),
            query: Some(query.into()),
            content_length: None,
            authorization: None,
        }
    }

    #[test]
    fn query_parameters_are_decoded() {
        let r = request("x=1&prompt=What+is%20on%20the%20table%3F&y");
        assert_eq!(
            r.query_param("prompt").unwrap().as_deref(),
            Some("What is on the table?")
        );
        assert_eq!(r.query_param("y").unwrap().as_deref(), Some(""));
        assert_eq!(r.query_param("z").unwrap(), None);
        assert!(request("prompt=%zz").query_param("prompt").is_err());
        assert!(request("prompt=%ff").query_param("prompt").is_err());
        assert!(request("prompt=%4").query_param("prompt").is_err());
        assert_eq!(
            request("prompt=%C3%A9t%C3%A9")
                .query_param("prompt")
                .unwrap()
                .as_deref(),
            Some("été")
        );
    }

    const LIMITS: Limits = Limits {
        max_connections: 8,
        header_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(2),
    };

    /// A server whose one route echoes the body's length, over real sockets;
    /// `/stream` sends an event stream of `n` events.
    fn echo_server(limit: u64, limits: Limits) -> (HttpServer, Arc<ConnectionStats>) {
        let handler: Arc<Handler> = Arc::new(move |request: Request, connection: &mut Connection| {
            if request.path == "/stream" {
                let n: u64 = request.query_param("n").unwrap().unwrap().parse().unwrap();
                connection.start_event_stream().unwrap();
                for id in 0..n {
                    if connection.send_event("e", id, &"x".repeat(1000)).is_err() {
                        return;
                    }
                }
                return;
            }
            let response = match connection.read_body(&request, limit) {
                Ok(body) => Response::new(200, "text/plain", body.len().to_string()),
                Err(BodyError::TooLarge { .. }) => Response::error(413, "too large"),
                Err(BodyError::Malformed(m)) => Response::error(400, &m),
                Err(BodyError::Io(e)) => Response::error(400, &e.to_string()),
            };
            let _ = connection.respond(&response);
        });
        let stats = Arc::new(ConnectionStats::default());
        let server = HttpServer::start("127.0.0.1:0".parse().unwrap(), limits, handler, Arc::clone(&stats)).unwrap();
        (server, stats)
    }

    fn connect(server: &HttpServer) -> std::net::TcpStream {
        let stream = std::net::TcpStream::connect(server.local_addr()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream
    }

    /// One request and everything the server sends until it closes.
    fn exchange(server: &HttpServer, raw: &[u8]) -> String {
        let mut stream = connect(server);
        // The server may answer before reading everything: ignore a reset.
        let _ = stream.write_all(raw);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[test]
    fn bodies_by_length_and_by_chunks_within_the_limit() {
        let (mut server, _) = echo_server(10, LIMITS);
        let answer = exchange(
            &server,
            b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        );
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("\r\n\r\n5"),
            "{answer}"
        );
        let answer = exchange(
            &server,
            b"POST /x HTTP/1.1\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
        );
        assert!(answer.ends_with("\r\n\r\n7"), "{answer}");
        let answer = exchange(
            &server,
            b"POST /x HTTP/1.1\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nabcdefgh\r\n8\r\nabcdefgh\r\n0\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        let answer = exchange(
            &server,
            b"POST /x HTTP/1.1\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        let answer = exchange(&server, b"POST /x HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(answer.ends_with("\r\n\r\n0"), "no length, no body: {answer}");
        // Two requests on one kept-alive connection.
        let answer = exchange(
            &server,
            b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\nabPOST /x HTTP/1.1\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc",
        );
        assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
        assert!(answer.ends_with("\r\n\r\n3"), "{answer}");
        server.stop();
        assert!(!server.is_running());
    }

    #[test]
    fn a_huge_declared_length_is_refused_without_reading_or_allocating() {
        let (mut server, _) = echo_server(10, LIMITS);
        let answer = exchange(
            &server,
            b"POST /x HTTP/1.1\r\nContent-Length: 999999999999999\r\nExpect: 100-continue\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        assert!(!answer.contains("100 Continue"), "no 100 for a refused body: {answer}");
        for bad in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        ] {
            let answer = exchange(&server, bad);
            assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        }
        let mut huge = b"GET / HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b"X-Filler: 0123456789\r\n", 1000).flatten());
        let answer = exchange(&server, &huge);
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_HEADERS + 1 {
            many.extend(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        let answer = exchange(&server, &many);
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        let line = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(100_000));
        let answer = exchange(&server, line.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 4"), "a 100 KB request line: {answer}");
        server.stop();
    }

    #[test]
    fn slow_and_idle_clients_lose_their_connection_and_the_cap_answers_503() {
        let (mut server, stats) = echo_server(10, LIMITS);
        // A head dripped a byte at a time, and a connection that says nothing.
        let mut slow = connect(&server);
        let mut idle = connect(&server);
        let started = Instant::now();
        let mut closed = false;
        for byte in b"GET /x HTTP/1.1\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a')) {
            if slow.write_all(&[*byte]).is_err() || started.elapsed() > Duration::from_secs(8) {
                closed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            closed && started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
        let mut nothing = Vec::new();
        let _ = idle.read_to_end(&mut nothing);
        assert!(started.elapsed() < Duration::from_secs(6));
        // A body that stops: 400 after the idle timeout.
        let mut stalled = connect(&server);
        stalled
            .write_all(b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nab")
            .unwrap();
        let mut answer = String::new();
        let _ = stalled.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");

        // Over the cap: 503, counted.
        let held: Vec<_> = (0..LIMITS.max_connections).map(|_| connect(&server)).collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.open() < LIMITS.max_connections && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let answer = exchange(&server, b"GET / HTTP/1.1\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(stats.refused() >= 1);
        drop(held);
        server.stop();
    }

    #[test]
    fn an_event_stream_client_that_stops_reading_is_dropped() {
        let (mut server, stats) = echo_server(10, LIMITS);
        // 100 000 events of 1 KB: far more than the socket buffers hold.
        let mut reader = connect(&server);
        reader.write_all(b"GET /stream?n=100000 HTTP/1.1\r\n\r\n").unwrap();
        let mut first = [0u8; 64];
        reader.read_exact(&mut first).unwrap();
        assert!(first.starts_with(b"HTTP/1.1 200 OK"));
        // Read nothing more: the route is dropped, then the connection.
        let deadline = Instant::now() + Duration::from_secs(20);
        while stats.open() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(stats.open(), 0, "the stalled stream's connection closed");
        server.stop();
    }
}
