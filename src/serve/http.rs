//! A small HTTP/1.1 server on std threads: one thread per connection (at
//! most `max_connections`), one request per connection (`Connection:
//! close`), request heads parsed by `httparse`, bodies read only up to the
//! route's limit. The routes are in [`super::api`].
//!
//! Why not a server crate: tiny_http 0.12 allocates a request's declared
//! `Content-Length` in one piece when a handler leaves the body unread (as
//! a 413 must), so one request claiming a terabyte aborts the process; an
//! async stack (hyper, axum) would bring a runtime for a handful of routes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The largest request head (request line and headers).
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 48;
/// A client has this long to send its head, and again its body.
const READ_DEADLINE: Duration = Duration::from_secs(30);
/// Each read or write may block this long.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed request head.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// What follows `?`, undecoded.
    pub query: Option<String>,
    pub content_length: Option<u64>,
    pub chunked: bool,
    expect_continue: bool,
    /// The `Authorization` header, if one came (never logged).
    pub authorization: Option<String>,
}

impl Request {
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
}

/// One client connection, handed to the routes with its request.
pub struct Connection {
    stream: TcpStream,
    /// Bytes read past the head (the start of the body).
    pending: Vec<u8>,
    /// Whether the body was read to its end (else the connection is
    /// drained before closing, so the client sees the response, not a reset).
    body_done: bool,
    pub peer: Option<SocketAddr>,
}

impl Connection {
    /// Reads the whole body, refusing more than `limit` bytes. A request
    /// with neither a length nor chunked framing has an empty body (RFC 9112).
    pub fn read_body(&mut self, request: &Request, limit: u64) -> std::result::Result<Vec<u8>, BodyError> {
        if let Some(length) = request.content_length {
            if length > limit {
                return Err(BodyError::TooLarge { limit });
            }
        } else if !request.chunked {
            self.body_done = true;
            return Ok(Vec::new());
        }
        if request.expect_continue {
            self.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(BodyError::Io)?;
        }
        let deadline = Instant::now() + READ_DEADLINE;
        let body = match request.content_length {
            Some(length) => {
                let mut body = Vec::with_capacity(length as usize);
                self.read_exact_into(&mut body, length as usize, deadline)?;
                body
            }
            None => self.read_chunked(limit, deadline)?,
        };
        self.body_done = true;
        Ok(body)
    }

    /// Appends exactly `n` bytes of the body to `out`.
    fn read_exact_into(
        &mut self,
        out: &mut Vec<u8>,
        n: usize,
        deadline: Instant,
    ) -> std::result::Result<(), BodyError> {
        let from_pending = n.min(self.pending.len());
        out.extend(self.pending.drain(..from_pending));
        let mut left = n - from_pending;
        let mut buf = [0u8; 16 * 1024];
        while left > 0 {
            if Instant::now() > deadline {
                return Err(BodyError::Io(io::Error::new(io::ErrorKind::TimedOut, "body too slow")));
            }
            let want = left.min(buf.len());
            match self.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(BodyError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the body ended early",
                    )))
                }
                Ok(got) => {
                    out.extend_from_slice(&buf[..got]);
                    left -= got;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BodyError::Io(e)),
            }
        }
        Ok(())
    }

    /// One CRLF-terminated line of chunked framing (at most 1 KiB).
    fn read_line(&mut self, deadline: Instant) -> std::result::Result<String, BodyError> {
        let mut line = Vec::new();
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                line.extend(self.pending.drain(..=end));
                break;
            }
            line.append(&mut self.pending);
            if line.len() > 1024 {
                return Err(BodyError::Malformed("a chunk header is too long".into()));
            }
            if Instant::now() > deadline {
                return Err(BodyError::Io(io::Error::new(io::ErrorKind::TimedOut, "body too slow")));
            }
            let mut buf = [0u8; 1024];
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(BodyError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the body ended early",
                    )))
                }
                Ok(got) => self.pending.extend_from_slice(&buf[..got]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BodyError::Io(e)),
            }
        }
        let text = String::from_utf8(line).map_err(|_| BodyError::Malformed("a chunk header is not text".into()))?;
        Ok(text.trim_end_matches(['\r', '\n']).to_string())
    }

    fn read_chunked(&mut self, limit: u64, deadline: Instant) -> std::result::Result<Vec<u8>, BodyError> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line(deadline)?;
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size_text, 16)
                .map_err(|_| BodyError::Malformed(format!("bad chunk size {size_text:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.read_line(deadline)?.is_empty() {}
                return Ok(body);
            }
            if (body.len() as u64).saturating_add(size) > limit {
                return Err(BodyError::TooLarge { limit });
            }
            self.read_exact_into(&mut body, size as usize, deadline)?;
            let mut crlf = Vec::with_capacity(2);
            self.read_exact_into(&mut crlf, 2, deadline)?;
            if crlf != b"\r\n" {
                return Err(BodyError::Malformed("a chunk does not end with CRLF".into()));
            }
        }
    }

    /// Writes a complete response.
    pub fn respond(&mut self, response: &Response) -> io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
            response.status,
            reason(response.status),
            response.content_type,
            response.body.len()
        );
        for (name, value) in &response.headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        self.stream.write_all(head.as_bytes())?;
        self.stream.write_all(&response.body)?;
        self.stream.flush()
    }

    /// Starts a `text/event-stream` response whose body lasts until the
    /// connection closes; then [`Connection::send_event`] and
    /// [`Connection::send_comment`].
    pub fn start_event_stream(&mut self) -> io::Result<()> {
        self.stream.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\
              Connection: close\r\nX-Accel-Buffering: no\r\n\r\n: captions from elastic-edge\n\n",
        )?;
        self.stream.flush()
    }

    /// One server-sent event; `data` must be one line (JSON is).
    pub fn send_event(&mut self, event: &str, id: u64, data: &str) -> io::Result<()> {
        let text = format!("event: {event}\nid: {id}\ndata: {data}\n\n");
        self.stream.write_all(text.as_bytes())?;
        self.stream.flush()
    }

    /// One unnamed server-sent event (`data: ...`, as OpenAI streams); `data`
    /// must be one line (JSON is).
    pub fn send_data(&mut self, data: &str) -> io::Result<()> {
        self.stream.write_all(format!("data: {data}\n\n").as_bytes())?;
        self.stream.flush()
    }

    /// A comment line: keeps the connection alive, and finds a client gone.
    pub fn send_comment(&mut self, text: &str) -> io::Result<()> {
        self.stream.write_all(format!(": {text}\n\n").as_bytes())?;
        self.stream.flush()
    }

    /// Closes politely: when the body was left unread, stop writing and
    /// read (and discard) what the client still sends, briefly, so the
    /// response is not lost to a connection reset.
    fn finish(mut self) {
        if self.body_done {
            return;
        }
        let _ = self.stream.shutdown(Shutdown::Write);
        let _ = self.stream.set_read_timeout(Some(Duration::from_millis(500)));
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buf = [0u8; 16 * 1024];
        let mut drained = 0usize;
        while Instant::now() < deadline && drained < 64 << 20 {
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }
}

/// The routes: given the request and its connection, answer it.
pub type Handler = dyn Fn(Request, &mut Connection) + Send + Sync;

/// The running server; dropping it does not stop it, [`HttpServer::stop`] does.
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Binds `addr` and serves on a thread of its own.
    pub fn start(addr: SocketAddr, max_connections: usize, handler: Arc<Handler>) -> Result<Self> {
        let listener = TcpListener::bind(addr).map_err(|source| Error::ServiceIo {
            what: format!("listening on {addr}"),
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| Error::ServiceIo {
            what: "the listening address".into(),
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("http-accept".into())
                .spawn(move || accept_loop(&listener, &stop, &open, max_connections, &handler))
                .map_err(|source| Error::ServiceIo {
                    what: "starting the HTTP thread".into(),
                    source,
                })?
        };
        Ok(HttpServer {
            addr,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// The bound address (the port, when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the accepting thread is still running.
    pub fn is_running(&self) -> bool {
        self.acceptor.as_ref().is_some_and(|a| !a.is_finished())
    }

    /// Stops accepting (connections in progress finish on their own).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocked accept() with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    open: &Arc<AtomicUsize>,
    max_connections: usize,
    handler: &Arc<Handler>,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                // Out of file descriptors, say: wait instead of spinning.
                log::warn!("http: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_nodelay(true);
        if open.fetch_add(1, Ordering::SeqCst) >= max_connections {
            open.fetch_sub(1, Ordering::SeqCst);
            let _ = write_raw(&mut stream, &Response::error(503, "too many connections"));
            continue;
        }
        let guard = OpenGuard(Arc::clone(open));
        let handler = Arc::clone(handler);
        let spawned = std::thread::Builder::new().name("http-conn".into()).spawn(move || {
            let _guard = guard;
            serve_connection(stream, &*handler);
        });
        if let Err(e) = spawned {
            log::warn!("http: cannot start a connection thread: {e}");
        }
    }
}

/// Counts a connection open until its thread ends (or fails to start).
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn write_raw(stream: &mut TcpStream, response: &Response) -> io::Result<()> {
    let mut connection = Connection {
        stream: stream.try_clone()?,
        pending: Vec::new(),
        body_done: true,
        peer: None,
    };
    connection.respond(response)
}

fn serve_connection(stream: TcpStream, handler: &Handler) {
    let peer = stream.peer_addr().ok();
    let mut connection = Connection {
        stream,
        pending: Vec::new(),
        body_done: false,
        peer,
    };
    match read_head(&mut connection) {
        Ok(Some(request)) => {
            if request.content_length.unwrap_or(0) == 0 && !request.chunked {
                connection.body_done = true;
            }
            handler(request, &mut connection);
        }
        Ok(None) => return,
        Err(response) => {
            let _ = connection.respond(&response);
        }
    }
    connection.finish();
}

/// Reads and parses the request head; `Ok(None)` when the client left
/// without sending one, `Err` with the response for a bad one.
fn read_head(connection: &mut Connection) -> std::result::Result<Option<Request>, Response> {
    let deadline = Instant::now() + READ_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        let searched_from = buf.len().saturating_sub(3);
        match connection.stream.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Ok(None),
        }
        if let Some(at) = find(&buf[searched_from..], b"\r\n\r\n") {
            break searched_from + at + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(Response::error(431, "the request head is over 16 KiB"));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(Response::error(400, "incomplete request head")),
        Err(httparse::Error::TooManyHeaders) => return Err(Response::error(431, "too many headers")),
        Err(e) => return Err(Response::error(400, &format!("malformed request: {e}"))),
    }
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        return Err(Response::error(400, "malformed request line"));
    };
    let mut content_length = None;
    let mut chunked = false;
    let mut expect_continue = false;
    let mut authorization = None;
    for header in parsed.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            let length: u64 = value
                .parse()
                .map_err(|_| Response::error(400, "Content-Length is not a number"))?;
            if content_length.is_some_and(|l| l != length) {
                return Err(Response::error(400, "conflicting Content-Length headers"));
            }
            content_length = Some(length);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            if value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else {
                return Err(Response::error(
                    501,
                    &format!("Transfer-Encoding {value:?} is not supported"),
                ));
            }
        } else if header.name.eq_ignore_ascii_case("expect") && value.eq_ignore_ascii_case("100-continue") {
            expect_continue = true;
        } else if header.name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value.to_string());
        }
    }
    if chunked && content_length.is_some() {
        return Err(Response::error(400, "both Content-Length and chunked"));
    }
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path.to_string(), Some(query.to_string())),
        None => (target.to_string(), None),
    };
    connection.pending = buf[head_len..].to_vec();
    Ok(Some(Request {
        method: method.to_string(),
        path,
        query,
        content_length,
        chunked,
        expect_continue,
        authorization,
    }))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
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

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(query: &str) -> Request {
        Request {
            method: "POST".into(),
            path: "/caption".into(),
            query: Some(query.into()),
            content_length: None,
            chunked: false,
            expect_continue: false,
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

    /// A server whose one route echoes the body's length, over real sockets.
    fn echo_server(limit: u64) -> HttpServer {
        let handler: Arc<Handler> = Arc::new(move |request: Request, connection: &mut Connection| {
            let response = match connection.read_body(&request, limit) {
                Ok(body) => Response::new(200, "text/plain", body.len().to_string()),
                Err(BodyError::TooLarge { .. }) => Response::error(413, "too large"),
                Err(BodyError::Malformed(m)) => Response::error(400, &m),
                Err(BodyError::Io(e)) => Response::error(400, &e.to_string()),
            };
            let _ = connection.respond(&response);
        });
        HttpServer::start("127.0.0.1:0".parse().unwrap(), 8, handler).unwrap()
    }

    fn exchange(server: &HttpServer, raw: &[u8]) -> String {
        let mut stream = TcpStream::connect(server.local_addr()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The server may answer before reading everything: ignore a reset.
        let _ = stream.write_all(raw);
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    }

    #[test]
    fn bodies_by_length_and_by_chunks_within_the_limit() {
        let mut server = echo_server(10);
        let answer = exchange(
            &server,
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        );
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("\r\n\r\n5"),
            "{answer}"
        );
        let answer = exchange(
            &server,
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
        );
        assert!(answer.ends_with("\r\n\r\n7"), "{answer}");
        let answer = exchange(
            &server,
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nabcdefgh\r\n8\r\nabcdefgh\r\n0\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        let answer = exchange(
            &server,
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\nffffffffffffffff\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        let answer = exchange(&server, b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        let answer = exchange(&server, b"POST /x HTTP/1.1\r\n\r\n");
        assert!(answer.ends_with("\r\n\r\n0"), "no length, no body: {answer}");
        server.stop();
        assert!(!server.is_running());
    }

    #[test]
    fn a_huge_declared_length_is_refused_without_reading_or_allocating() {
        let mut server = echo_server(10);
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
        server.stop();
    }
}
