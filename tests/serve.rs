//! `elastic-edge serve` as systemd and an operator see it: the real binary
//! on the committed tiny model, a real datagram socket bound here as
//! NOTIFY_SOCKET, a real HTTP client on loopback, SIGTERM to stop it.

mod process;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture_png(name: &str) -> PathBuf {
    repo().join("models/fixtures/images").join(name)
}

/// The service's `[model]` and `[cache]` tables on the tiny model.
fn base_config() -> String {
    format!(
        "[model]\ndir = \"{}\"\nthreads = 1\n\n[cache]\nkv_budget = \"64KiB\"\npolicy = \"elastic\"\nkeep = 0.5\n\n\
         [caption]\nmax_new_tokens = 16\n",
        repo().join("models/tiny").display()
    )
}

/// A folder of four frames (three 224x224 photographs, one 32x32 gradient).
fn frames_dir(dir: &Path) -> PathBuf {
    let frames = dir.join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    for name in ["astronaut-224.png", "chelsea-224.png", "coffee-224.png"] {
        std::fs::copy(fixture_png(name), frames.join(name)).unwrap();
    }
    std::fs::copy(repo().join("models/tiny/gradient.png"), frames.join("gradient.png")).unwrap();
    frames
}

/// How a test starts the service.
#[derive(Default)]
struct Launch {
    /// `WATCHDOG_USEC`.
    watchdog_usec: Option<u64>,
    /// Bind the notify socket in the abstract namespace (`@name`).
    abstract_socket: bool,
    /// Give the service a pipe as standard input.
    stdin: bool,
    /// Start it with PR_SET_MDWE (what MemoryDenyWriteExecute= does).
    deny_write_execute: bool,
}

/// A running `serve` and the socket it notifies.
struct Service {
    child: Child,
    notify: UnixDatagram,
    /// Every datagram received so far, in order.
    messages: Vec<String>,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

/// Sets PR_SET_MDWE(PR_MDWE_REFUSE_EXEC_GAIN) in the child before exec; the
/// kernel keeps it across execve.
fn deny_write_execute(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            const PR_SET_MDWE: libc::c_int = 65;
            const PR_MDWE_REFUSE_EXEC_GAIN: libc::c_ulong = 1;
            if libc::prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether this kernel has PR_SET_MDWE (Linux 6.3 and later).
fn mdwe_supported() -> bool {
    let mut probe = Command::new("true");
    deny_write_execute(&mut probe);
    match probe.status() {
        Ok(status) => status.success(),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => false,
        Err(e) => panic!("starting true: {e}"),
    }
}

/// Starts `serve` with `config` (an `[http]` table listening on port 0 is
/// added) in a fresh folder; `Err` with the stderr if it exits instead of
/// sending READY=1.
fn try_start(
    config: &str,
    launch: &Launch,
    dir: tempfile::TempDir,
) -> Result<Service, (ExitStatus, String, Vec<String>)> {
    let config_path = dir.path().join("serve.toml");
    let mut text = config.to_string();
    if !text.contains("[http]") {
        text.push_str("\n[http]\nlisten = \"127.0.0.1:0\"\n");
    }
    std::fs::write(&config_path, text).unwrap();
    let (notify, socket_name) = if launch.abstract_socket {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "elastic-edge-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        (UnixDatagram::bind_addr(&addr).unwrap(), format!("@{name}"))
    } else {
        let path = dir.path().join("notify.sock");
        (UnixDatagram::bind(&path).unwrap(), path.display().to_string())
    };
    notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_elastic-edge"));
    command
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("NOTIFY_SOCKET", &socket_name)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env("RUST_LOG", "info,ort=warn")
        .stdin(if launch.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(usec) = launch.watchdog_usec {
        command.env("WATCHDOG_USEC", usec.to_string());
    }
    if launch.deny_write_execute {
        deny_write_execute(&mut command);
    }
    let mut child = command.spawn().unwrap();
    let stderr = process::drain_stderr(&mut child);
    let mut service = Service {
        child,
        notify,
        messages: Vec::new(),
        addr: "127.0.0.1:0".parse().unwrap(),
        stderr,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = service.child.try_wait().unwrap() {
            // Let the stderr thread catch up with the last line.
            std::thread::sleep(Duration::from_millis(200));
            let stderr = service.stderr.lock().unwrap().clone();
            let messages = std::mem::take(&mut service.messages);
            return Err((status, stderr, messages));
        }
        assert!(Instant::now() < deadline, "no READY=1 within 120 s");
        if let Some(message) = service.receive() {
            if message.split('\n').any(|l| l == "READY=1") {
                // STATUS=listening on http://127.0.0.1:PORT; ...
                let at = message.find("http://").expect("the READY status names the address") + 7;
                let addr = message[at..].split(';').next().unwrap();
                service.addr = addr.parse().unwrap();
                return Ok(service);
            }
        }
    }
}

fn start(config: &str, launch: &Launch) -> Service {
    let dir = tempfile::tempdir().unwrap();
    start_in(config, launch, dir)
}

fn start_in(config: &str, launch: &Launch, dir: tempfile::TempDir) -> Service {
    match try_start(config, launch, dir) {
        Ok(service) => service,
        Err((status, stderr, _)) => panic!("serve exited ({status}) before READY=1:\n{stderr}"),
    }
}

impl Service {
    /// One datagram, if one comes within 200 ms (kept in `messages`).
    fn receive(&mut self) -> Option<String> {
        let mut buf = [0u8; 4096];
        match self.notify.recv(&mut buf) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.messages.push(message.clone());
                Some(message)
            }
            Err(_) => None,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then the exit status (within 60 s) and every datagram.
    fn terminate(mut self) -> (ExitStatus, Vec<String>, String) {
        // SAFETY: a plain kill(2) of our own child.
        assert_eq!(unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            while self.receive().is_some() {}
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "serve did not stop within 60 s of SIGTERM");
        };
        while self.receive().is_some() {}
        std::thread::sleep(Duration::from_millis(100));
        let stderr = self.stderr.lock().unwrap().clone();
        (status, std::mem::take(&mut self.messages), stderr)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // A test that failed half-way leaves no service behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build(),
    )
}

/// GET: the status and the body.
fn get(url: &str) -> (u16, String) {
    let mut response = agent().get(url).call().unwrap();
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap())
}

fn get_json(url: &str) -> (u16, Value) {
    let (status, body) = get(url);
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {body}"));
    (status, value)
}

fn post(url: &str, body: &[u8]) -> (u16, Value) {
    let mut response = agent().post(url).send(body).unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}"));
    (status, value)
}

/// A sample's value in the exposition text (labels included in `name`).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
}

fn metrics(service: &Service) -> String {
    let (status, text) = get(&service.url("/metrics"));
    assert_eq!(status, 200);
    text
}

/// Polls `what` every 50 ms until it returns `Some`, for up to `secs`.
fn wait_for<T>(secs: u64, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Server-sent events from one connection.
struct Events {
    lines: BufReader<ureq::BodyReader<'static>>,
}

impl Events {
    fn connect(url: &str) -> Events {
        let response = agent().get(url).call().unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
        assert_eq!(content_type, "text/event-stream");
        Events {
            lines: BufReader::new(response.into_body().into_reader()),
        }
    }

    /// The next event's `(event, id, data)`, skipping comments.
    fn next(&mut self) -> (String, u64, Value) {
        let (mut event, mut id, mut data) = (String::new(), None, None);
        loop {
            let mut line = String::new();
            assert!(self.lines.read_line(&mut line).unwrap() > 0, "the event stream ended");
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                if let Some(data) = data.take() {
                    return (event, id.expect("an id"), data);
                }
                continue;
            }
            if let Some(v) = line.strip_prefix("event: ") {
                event = v.to_string();
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.parse().unwrap());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = Some(serde_json::from_str(v).unwrap());
            }
        }
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn ready_watchdog_and_stopping_reach_the_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let frames = frames_dir(dir.path());
    let config = format!(
        "{}\n[stream]\nsource = \"{}\"\nloop = true\ninterval = \"100ms\"\n",
        base_config(),
        frames.display()
    );
    let launch = Launch {
        watchdog_usec: Some(1_000_000),
        ..Launch::default()
    };
    let mut service = start_in(&config, &launch, dir);
    let ready = service.messages.last().unwrap().clone();
    assert!(
        ready.starts_with("READY=1\nSTATUS=listening on http://127.0.0.1:"),
        "{ready}"
    );
    assert!(ready.contains("captioning dir:"), "{ready}");

    // WATCHDOG_USEC = 1 s: a ping every half second while the loop is alive.
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(4) {
        if service.receive().is_some_and(|m| m == "WATCHDOG=1") {
            pings += 1;
        }
    }
    assert!(pings >= 4, "{pings} watchdog pings in 4 s: {:?}", service.messages);

    let (status, messages, stderr) = service.terminate();
    assert!(status.success(), "exit {status} after SIGTERM:\n{stderr}");
    let stopping = messages
        .iter()
        .position(|m| m.starts_with("STOPPING=1\n"))
        .unwrap_or_else(|| panic!("no STOPPING=1 in {messages:?}"));
    let ready_at = messages.iter().position(|m| m.starts_with("READY=1")).unwrap();
    assert!(ready_at < stopping);
    assert!(
        messages[stopping..].iter().all(|m| m != "WATCHDOG=1"),
        "no ping after STOPPING: {messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.starts_with("STATUS=loading the model")),
        "{messages:?}"
    );
}

#[test]
fn every_endpoint_through_a_real_client() {
    let dir = tempfile::tempdir().unwrap();
    let frames = frames_dir(dir.path());
    let config = format!(
        "{}\n[stream]\nsource = \"{}\"\nloop = true\ninterval = \"50ms\"\njsonl = \"captions.jsonl\"\n\n\
         [http]\nlisten = \"127.0.0.1:0\"\nmax_body = \"16KiB\"\n",
        base_config(),
        frames.display()
    );
    let jsonl = dir.path().join("captions.jsonl");
    let launch = Launch {
        abstract_socket: true,
        ..Launch::default()
    };
    let service = start_in(&config, &launch, dir);

    // GET /healthz: ok, with the source running.
    let (status, health) = get_json(&service.url("/healthz"));
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["reasons"], serde_json::json!([]));
    assert!(health["source"]["spec"].as_str().unwrap().starts_with("dir:"));

    // GET /caption/latest: a stream caption's record.
    let latest = wait_for(60, "a stream caption", || {
        let (status, body) = get(&service.url("/caption/latest"));
        (status == 200).then(|| serde_json::from_str::<Value>(&body).unwrap())
    });
    assert!(latest["caption"].is_string() && latest["frame_id"].is_u64(), "{latest}");
    assert!(latest["frame_path"].as_str().unwrap().contains("frames/"), "{latest}");
    assert_eq!(latest["policy"], "elastic");

    // Two event-stream clients; one leaves, the other goes on.
    let mut stays = Events::connect(&service.url("/captions/stream"));
    let mut leaves = Events::connect(&service.url("/events"));
    let (event, first_id, first) = leaves.next();
    assert_eq!(event, "caption");
    assert_eq!(first["frame_id"].as_u64(), Some(first_id));
    drop(leaves);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (event, id, data) = stays.next();
        assert_eq!(event, "caption");
        assert_eq!(data["frame_id"].as_u64(), Some(id));
        assert!(data["caption"].is_string());
        ids.push(id);
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    wait_for(30, "the server to drop the client that left", || {
        (metric(&metrics(&service), "elastic_edge_sse_clients") == 1.0).then_some(())
    });

    // POST /caption: a real PNG, with and without a prompt.
    let png = std::fs::read(repo().join("models/tiny/gradient.png")).unwrap();
    let (status, answer) = post(&service.url("/caption"), &png);
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["caption"].is_string() && answer["tokens"].as_u64().unwrap() > 0,
        "{answer}"
    );
    let default_prompt_tokens = answer["prompt_tokens"].as_u64().unwrap();
    let (status, answer) = post(
        &service.url("/caption?prompt=What%20colours%20does%20this%20gradient%20have%3F"),
        &png,
    );
    assert_eq!(status, 200, "{answer}");
    assert_ne!(answer["prompt_tokens"].as_u64().unwrap(), default_prompt_tokens);

    // Over max_body (16 KiB): 413.
    let big = std::fs::read(fixture_png("chelsea-224.png")).unwrap();
    assert!(big.len() > 16 * 1024);
    let (status, answer) = post(&service.url("/caption"), &big);
    assert_eq!(status, 413, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("16384"), "{answer}");
    // A declared terabyte is refused before anything is read.
    let mut raw = TcpStream::connect(service.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    raw.write_all(b"POST /caption HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1000000000000\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    raw.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 413 "), "{reply}");

    // Malformed: not an image, a truncated PNG, nothing, a bad escape: 400.
    let (status, answer) = post(&service.url("/caption"), b"this is not a picture");
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("unrecognised format"),
        "{answer}"
    );
    let (status, answer) = post(&service.url("/caption"), &png[..png.len() / 2]);
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = post(&service.url("/caption"), b"");
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = post(&service.url("/caption?prompt=%zz"), &png);
    assert_eq!(status, 400, "{answer}");

    // Unknown routes and methods.
    let (status, _) = get(&service.url("/nope"));
    assert_eq!(status, 404);
    let response = agent().delete(&service.url("/healthz")).call().unwrap();
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(response.headers()["allow"], "GET");

    // GET /metrics: everything above, counted.
    let text = metrics(&service);
    assert!(text.contains("# TYPE elastic_edge_caption_latency_seconds histogram"));
    assert!(text.contains("# TYPE elastic_edge_time_to_first_token_seconds histogram"));
    assert!(metric(&text, "elastic_edge_captions_total{origin=\"stream\"}") >= 4.0);
    assert_eq!(metric(&text, "elastic_edge_captions_total{origin=\"http\"}"), 2.0);
    assert!(metric(&text, "elastic_edge_frames_total") >= 4.0);
    assert_eq!(metric(&text, "elastic_edge_errors_total{kind=\"image\"}"), 2.0);
    assert_eq!(metric(&text, "elastic_edge_errors_total{kind=\"request\"}"), 4.0);
    assert_eq!(metric(&text, "elastic_edge_errors_total{kind=\"output\"}"), 0.0);
    // 64 KiB buys 118 slots of 552 bytes (K, V and 20 bytes of metadata a layer).
    assert_eq!(metric(&text, "elastic_edge_kv_pool_bytes"), 65136.0);
    assert_eq!(metric(&text, "elastic_edge_source_state{state=\"running\"}"), 1.0);
    // The default elastic drops what it does not keep (merging is opt-in).
    assert!(metric(&text, "elastic_edge_cache_merged_total") + metric(&text, "elastic_edge_cache_evicted_total") > 0.0);
    let count = metric(&text, "elastic_edge_caption_latency_seconds_count");
    assert_eq!(
        count,
        metric(&text, "elastic_edge_caption_latency_seconds_bucket{le=\"+Inf\"}")
    );
    assert!(
        metric(
            &text,
            "elastic_edge_http_requests_total{route=\"/caption\",status=\"413\"}"
        ) >= 2.0
    );

    // Still healthy after all the bad requests; the JSONL file has the records.
    let (status, health) = get_json(&service.url("/healthz"));
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["last_error"]["kind"], "image", "{health}");
    let lines = std::fs::read_to_string(&jsonl).unwrap();
    assert!(lines.lines().count() >= 4);
    for line in lines.lines() {
        let record: Value = serde_json::from_str(line).unwrap();
        assert!(record["caption"].is_string());
    }
    let (status, _, stderr) = service.terminate();
    assert!(status.success(), "{stderr}");
}

#[test]
fn without_a_camera_it_captions_posts_and_has_no_latest() {
    let service = start(&base_config(), &Launch::default());
    let (status, body) = get_json(&service.url("/caption/latest"));
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "no caption yet");
    let (status, health) = get_json(&service.url("/healthz"));
    assert_eq!(status, 200, "{health}");
    assert!(health.get("source").is_none(), "{health}");
    let png = std::fs::read(fixture_png("coffee-224.png")).unwrap();
    let (status, answer) = post(&service.url("/caption"), &png);
    assert_eq!(status, 200, "{answer}");
    // A POSTed caption is the requester's: not the stream's latest.
    let (status, _) = get(&service.url("/caption/latest"));
    assert_eq!(status, 404);
    // No memory configured: nothing to ask.
    let (status, body) = post(&service.url("/memory/ask"), br#"{"question": "What did you see?"}"#);
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("[memory]"), "{body}");
    let (status, _, stderr) = service.terminate();
    assert!(status.success(), "{stderr}");
}

#[test]
fn the_memory_answers_questions_between_frames_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let frames = frames_dir(dir.path());
    // Outside the service's folder, which goes when it stops.
    let output = tempfile::tempdir().unwrap();
    let jsonl = output.path().join("memory.jsonl");
    let config = format!(
        "{}\n[stream]\nsource = \"{}\"\nloop = true\ninterval = \"0\"\njsonl = \"{}\"\n\n\
         [memory]\nenabled = true\n\n[http]\nlisten = \"127.0.0.1:0\"\n",
        base_config(),
        frames.display(),
        jsonl.display()
    );
    let service = start_in(&config, &Launch::default(), dir);
    let ask = service.url("/memory/ask");

    // Frames go into the memory; /caption/latest shows the newest frame's record.
    let latest = wait_for(60, "six frames in memory", || {
        let (status, record) = get_json(&service.url("/caption/latest"));
        (status == 200 && record["frames_seen"].as_u64()? >= 6).then_some(record)
    });
    assert!(latest["pool_bytes"].as_u64().unwrap() <= 64 << 10, "{latest}");
    assert!(
        latest["max_position"].as_u64() < latest["max_positions"].as_u64(),
        "{latest}"
    );
    assert!(latest["frames_in_memory"].as_u64().unwrap() >= 1, "{latest}");

    let (status, answer) = post(&ask, br#"{"question": "What was seen first?", "max_tokens": 6}"#);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["question"], "What was seen first?");
    assert!(answer["answer"].is_string(), "{answer}");
    assert!(answer["tokens"].as_u64().unwrap() <= 6, "{answer}");
    assert!(answer["frame_id"].as_u64().unwrap() >= 5, "{answer}");
    assert_eq!(answer["questions"], 1, "{answer}");
    assert!(answer["pool_bytes"].as_u64().unwrap() <= 64 << 10, "{answer}");
    // Without max_tokens: the default; the memory goes on taking frames.
    let (status, second) = post(&ask, br#"{"question": "And now?"}"#);
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["questions"], 2, "{second}");

    for (body, why) in [
        (&br#"{"question": "  "}"#[..], "empty"),
        (br#"{"question": "Zero?", "max_tokens": 0}"#, "outside"),
        (br#"{"question": "Long?", "max_tokens": 100000}"#, "outside"),
        (
            br#"{"question": "Too long for the pool?", "max_tokens": 4000}"#,
            "budget",
        ),
        (br#"{"question": "x", "temperature": 2}"#, "unknown field"),
        (b"what did you see", "is not"),
    ] {
        let (status, error) = post(&ask, body);
        assert_eq!(status, 400, "{}: {error}", String::from_utf8_lossy(body));
        let message = error["error"].as_str().unwrap();
        assert!(message.contains(why), "{}: {message}", String::from_utf8_lossy(body));
    }
    // A one-off caption would reset the pool the memory lives in.
    let png = std::fs::read(fixture_png("coffee-224.png")).unwrap();
    let (status, error) = post(&service.url("/caption"), &png);
    assert_eq!(status, 409, "{error}");
    let response = agent().get(&ask).call().unwrap();
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(response.headers().get("allow").unwrap(), "POST");

    let text = metrics(&service);
    assert_eq!(metric(&text, "elastic_edge_memory_questions_total"), 2.0);
    assert!(metric(&text, "elastic_edge_memory_frames_total") >= 6.0);
    assert!(metric(&text, "elastic_edge_memory_frames") >= 1.0);
    assert!(metric(&text, "elastic_edge_kv_pool_bytes") <= 65536.0);
    assert_eq!(
        metric(
            &text,
            "elastic_edge_http_requests_total{route=\"/memory/ask\",status=\"400\"}"
        ),
        6.0
    );
    assert_eq!(metric(&text, "elastic_edge_memory_answer_seconds_count"), 2.0);

    let (status, _, stderr) = service.terminate();
    assert!(status.success(), "{stderr}");
    // The answers sit in the output file beside the frames they followed.
    let lines: Vec<Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let answers: Vec<&Value> = lines.iter().filter(|r| r.get("question").is_some()).collect();
    assert_eq!(answers.len(), 2);
    assert!(lines.iter().filter(|r| r.get("frames_in_memory").is_some()).count() >= 6);
}

#[test]
fn a_bad_config_exits_nonzero_naming_the_key() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let model = format!(
        "[model]\ndir = \"{}\"\nthreads = 1\n",
        repo().join("models/tiny").display()
    );
    let cases = [
        (format!("{model}[cache]\nkepp = 0.5\n"), "cache.kepp", "unknown field"),
        (format!("{model}[cache]\nkeep = 1.5\n"), "cache.keep", "outside (0, 1]"),
        (
            format!("{model}[cache]\nkeep = \"half\"\n"),
            "cache.keep",
            "invalid type",
        ),
        (
            format!("{model}[cache]\nkv_budget = \"1KiB\"\n"),
            "cache.kv_budget",
            "KV budget too small",
        ),
        (
            format!("{model}[cache]\npolicy = \"full\"\nkv_budget = \"40tokens\"\n"),
            "cache.kv_budget",
            "the pool must hold the image",
        ),
        (
            format!("{model}[stream]\nsource = \"dir:no-such-folder\"\n"),
            "stream.source",
            "cannot read the folder",
        ),
        (
            "[model]\ndir = \"no-such-model\"\n".to_string(),
            "model.dir",
            "no-such-model",
        ),
        (
            format!("{model}[http]\nlisten = \"{}\"\n", taken.local_addr().unwrap()),
            "http.listen",
            "Address already in use",
        ),
        (
            format!("{model}[stream]\njsonl = \"no-such-folder/c.jsonl\"\n"),
            "stream.jsonl",
            "No such file",
        ),
    ];
    for (config, key, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (status, stderr, messages) = match try_start(&config, &Launch::default(), dir) {
            Ok(_) => panic!("serve started with\n{config}"),
            Err(failure) => failure,
        };
        assert_eq!(status.code(), Some(1), "{config}\n{stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("elastic-edge: ")
                && last.contains(&format!("serve.toml: {key}: "))
                && last.contains(reason),
            "{config}\nexpected the key {key} and {reason:?} in the last line:\n{stderr}"
        );
        assert!(
            !messages.iter().any(|m| m.contains("READY=1")),
            "READY sent for a bad config: {messages:?}"
        );
    }
}

#[test]
fn a_full_disk_is_logged_counted_and_survived() {
    let dir = tempfile::tempdir().unwrap();
    let frames = frames_dir(dir.path());
    let config = format!(
        "{}\n[stream]\nsource = \"{}\"\nloop = true\ninterval = \"50ms\"\njsonl = \"/dev/full\"\n",
        base_config(),
        frames.display()
    );
    let service = start_in(&config, &Launch::default(), dir);
    let text = wait_for(60, "three failed writes", || {
        let text = metrics(&service);
        (metric(&text, "elastic_edge_errors_total{kind=\"output\"}") >= 3.0).then_some(text)
    });
    // Captioning goes on: every caption was made, none could be written.
    assert!(metric(&text, "elastic_edge_captions_total{origin=\"stream\"}") >= 3.0);
    let (status, health) = get_json(&service.url("/healthz"));
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["status"], "degraded");
    let reasons = health["reasons"].to_string();
    assert!(
        reasons.contains("the caption file cannot be written") && reasons.contains("No space left on device"),
        "{health}"
    );
    assert_eq!(health["last_error"]["kind"], "output", "{health}");
    let (status, _) = get(&service.url("/caption/latest"));
    assert_eq!(status, 200);
    let png = std::fs::read(repo().join("models/tiny/gradient.png")).unwrap();
    assert_eq!(post(&service.url("/caption"), &png).0, 200);
    let (status, _, stderr) = service.terminate();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("/dev/full") && stderr.contains("No space left on device"),
        "{stderr}"
    );
}

#[test]
fn a_frame_whose_name_is_not_utf8_reaches_latest_the_file_and_health() {
    use std::os::unix::ffi::OsStrExt;
    // Its record "did not serialise": nothing reached the caption file or
    // /caption/latest while /healthz said ok and no error was counted.
    let dir = tempfile::tempdir().unwrap();
    let frames = dir.path().join("frames");
    std::fs::create_dir(&frames).unwrap();
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9.png");
    std::fs::copy(repo().join("models/tiny/gradient.png"), frames.join(name)).unwrap();
    let jsonl = dir.path().join("captions.jsonl");
    let config = format!(
        "{}\n[stream]\nsource = \"{}\"\nloop = true\ninterval = \"50ms\"\njsonl = \"{}\"\n",
        base_config(),
        frames.display(),
        jsonl.display()
    );
    let service = start_in(&config, &Launch::default(), dir);
    let latest = wait_for(60, "the frame's caption", || {
        let (status, latest) = get_json(&service.url("/caption/latest"));
        (status == 200).then_some(latest)
    });
    assert!(
        latest["frame_path"].as_str().unwrap().ends_with("caf\u{FFFD}.png"),
        "{latest}"
    );
    let written = wait_for(30, "the caption file", || {
        let text = std::fs::read_to_string(&jsonl).unwrap_or_default();
        (!text.is_empty()).then_some(text)
    });
    assert!(written.contains("caf\u{FFFD}.png"), "{written}");
    let (status, health) = get_json(&service.url("/healthz"));
    assert_eq!(status, 200, "{health}");
    assert_eq!(
        metric(&metrics(&service), "elastic_edge_errors_total{kind=\"output\"}"),
        0.0
    );
    let (status, _, stderr) = service.terminate();
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("does not serialise"), "{stderr}");
}

#[test]
fn a_silent_camera_reads_as_lost_after_ten_seconds() {
    // stdin:mjpeg with no data read "ok" in /healthz after 15 s, although
    // no frame for 10 s is documented as a lost source.
    let config = format!(
        "{}\n[stream]\nsource = \"stdin:mjpeg\"\ninterval = \"0\"\n",
        base_config()
    );
    let launch = Launch {
        stdin: true,
        ..Launch::default()
    };
    let service = start(&config, &launch);
    let started = Instant::now();
    let (status, health) = get_json(&service.url("/healthz"));
    assert_eq!(status, 200, "{health}");
    let health = wait_for(30, "health to report the silence", || {
        let (status, health) = get_json(&service.url("/healthz"));
        (status == 503).then_some(health)
    });
    assert!(started.elapsed() >= Duration::from_secs(10), "{health}");
    assert_eq!(health["source"]["state"], "silent", "{health}");
    let reasons = health["reasons"].to_string();
    assert!(reasons.contains("source silent: no frame for 1"), "{health}");
    let text = metrics(&service);
    assert!(
        text.contains("elastic_edge_source_state{state=\"silent\"} 1\n"),
        "{text}"
    );
    let (status, _, stderr) = service.terminate();
    assert!(status.success(), "{stderr}");
}

/// A binary PPM (P6) frame of `w` x `h` in one colour.
fn ppm(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
    let mut bytes = format!("P6\n{w} {h}\n255\n").into_bytes();
    for _ in 0..w * h {
        bytes.extend_from_slice(&rgb);
    }
    bytes
}

#[test]
fn a_lost_source_is_counted_and_health_degrades_while_posts_still_work() {
    let config = format!(
        "{}\n[stream]\nsource = \"stdin:ppm\"\ninterval = \"0\"\n",
        base_config()
    );
    let launch = Launch {
        stdin: true,
        ..Launch::default()
    };
    let mut service = start(&config, &launch);
    let mut stdin = service.child.stdin.take().unwrap();
    stdin.write_all(&ppm(40, 30, [200, 30, 30])).unwrap();
    stdin.flush().unwrap();
    wait_for(60, "the first frame's caption", || {
        (get(&service.url("/caption/latest")).0 == 200).then_some(())
    });
    let (status, health) = get_json(&service.url("/healthz"));
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["source"]["state"], "running", "{health}");

    // A corrupt frame (0x0), a good one, then half a frame and the writer
    // goes away: the camera unplugged mid-frame.
    stdin.write_all(b"P6\n0 4\n255\n").unwrap();
    stdin.write_all(&ppm(40, 30, [30, 200, 30])).unwrap();
    let truncated = ppm(40, 30, [30, 30, 200]);
    stdin.write_all(&truncated[..truncated.len() / 2]).unwrap();
    drop(stdin);

    let mut states = Vec::new();
    let health = wait_for(60, "health to report the loss", || {
        let (status, health) = get_json(&service.url("/healthz"));
        let state = health["source"]["state"].as_str().unwrap().to_string();
        if states.last() != Some(&state) {
            states.push(state);
        }
        (status == 503 && health["source"]["counters"]["source_losses"] == 1).then_some(health)
    });
    assert_eq!(health["status"], "degraded");
    assert!(
        health["reasons"][0].as_str().unwrap().starts_with("source "),
        "{health}"
    );
    let text = metrics(&service);
    assert_eq!(metric(&text, "elastic_edge_source_losses_total"), 1.0);
    assert_eq!(metric(&text, "elastic_edge_errors_total{kind=\"source_lost\"}"), 1.0);
    assert_eq!(metric(&text, "elastic_edge_frames_corrupt_total"), 1.0);
    assert_eq!(metric(&text, "elastic_edge_errors_total{kind=\"corrupt_frame\"}"), 1.0);
    assert!(metric(&text, "elastic_edge_frames_total") >= 2.0);
    // A pipe cannot be reopened: after the backoff the grabber finds its
    // end; health stays degraded and says so.
    let health = wait_for(30, "the source to end", || {
        let (_, health) = get_json(&service.url("/healthz"));
        (health["source"]["state"] == "finished").then_some(health)
    });
    assert!(health["reasons"].to_string().contains("source finished"), "{health}");
    eprintln!("source states seen by /healthz: {states:?}");

    // The service is up: POST still captions.
    let png = std::fs::read(repo().join("models/tiny/gradient.png")).unwrap();
    assert_eq!(post(&service.url("/caption"), &png).0, 200);
    let (status, _, stderr) = service.terminate();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("lost"), "the loss is logged:\n{stderr}");
}

#[test]
fn runs_under_memory_deny_write_execute() {
    if !mdwe_supported() {
        eprintln!("skipped: this kernel has no PR_SET_MDWE");
        return;
    }
    // First, that the setting reaches an exec'd program: a W+X mapping fails.
    let mut probe = Command::new("python3");
    probe.args([
        "-c",
        "import mmap\ntry:\n    mmap.mmap(-1, 4096, prot=7)\n    print('mapped')\nexcept OSError as e:\n    print('refused', e.errno)",
    ]);
    deny_write_execute(&mut probe);
    let output = probe.output().expect("python3 checks that PR_SET_MDWE survives exec");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "refused 13",
        "{output:?}"
    );

    // Then the service, captioning frames and a POST, as under
    // MemoryDenyWriteExecute=yes.
    let dir = tempfile::tempdir().unwrap();
    let frames = frames_dir(dir.path());
    let config = format!(
        "{}\n[stream]\nsource = \"{}\"\nloop = true\ninterval = \"0\"\n",
        base_config(),
        frames.display()
    );
    let launch = Launch {
        deny_write_execute: true,
        ..Launch::default()
    };
    let service = start_in(&config, &launch, dir);
    wait_for(60, "four stream captions", || {
        let text = metrics(&service);
        (metric(&text, "elastic_edge_captions_total{origin=\"stream\"}") >= 4.0).then_some(())
    });
    let png = std::fs::read(fixture_png("astronaut-224.png")).unwrap();
    assert_eq!(post(&service.url("/caption"), &png).0, 200);
    let (status, _, stderr) = service.terminate();
    assert!(status.success(), "{stderr}");
}

/// One raw request on its own connection: the status and the body.
fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The server may answer before reading everything: ignore a reset.
    let _ = stream.write_all(raw);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

fn chat_request(body: &str) -> Vec<u8> {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Idle, slow and hostile clients: 200 idle connections, a head dripped a
/// byte at a time, a 100 KB request line, a connection over the cap, and
/// 500 bad requests. Health answers 200 throughout, every bad request gets
/// its 4xx (OpenAI-shaped on /v1), slow clients lose their connection after
/// the configured timeouts, the refusals are in /metrics, and the resident
/// memory does not grow across the 500.
#[test]
fn idle_slow_and_hostile_clients_leave_health_answering_and_memory_flat() {
    let config = format!(
        "{}\n[http]\nlisten = \"127.0.0.1:0\"\nmax_body = \"64KiB\"\nmax_connections = 220\n\
         header_timeout = \"3s\"\nidle_timeout = \"1s\"\n",
        base_config()
    );
    let service = start(&config, &Launch::default());
    let healthy = || {
        let (status, health) = get_json(&service.url("/healthz"));
        assert_eq!(status, 200, "{health}");
    };

    // 200 idle connections: health still answers while they are open (the
    // server accepts in order, so they were accepted before these two
    // requests, and header_timeout is 3 s)...
    let started = Instant::now();
    let mut idle: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(service.addr).unwrap()).collect();
    healthy();
    let text = metrics(&service);
    if started.elapsed() < Duration::from_secs(2) {
        assert!(metric(&text, "elastic_edge_http_connections") >= 200.0, "{text}");
    }
    // ...and the server closes them after header_timeout.
    for stream in &mut idle {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "idle connections closed after {:?}",
        started.elapsed()
    );
    drop(idle);

    // A head dripped a byte every 100 ms is cut off after header_timeout.
    let mut slow = TcpStream::connect(service.addr).unwrap();
    let started = Instant::now();
    let head = b"GET /healthz HTTP/1.1\r\nX-Slow: ";
    let cut = head.iter().chain(std::iter::repeat(&b'a')).any(|byte| {
        std::thread::sleep(Duration::from_millis(100));
        slow.write_all(&[*byte]).is_err() || started.elapsed() > Duration::from_secs(12)
    });
    assert!(
        cut && started.elapsed() < Duration::from_secs(5),
        "slow head cut after {:?}",
        started.elapsed()
    );
    healthy();

    // A request line of 100 KB.
    let line = format!("GET /{} HTTP/1.1\r\nConnection: close\r\n\r\n", "a".repeat(100_000));
    let (status, _) = raw_exchange(service.addr, line.as_bytes());
    assert!((400..500).contains(&status), "{status}");

    // Over the cap (220): a 503, counted once the connections go.
    let held: Vec<TcpStream> = (0..220).map(|_| TcpStream::connect(service.addr).unwrap()).collect();
    wait_for(10, "220 connections open", || {
        let (status, _) = raw_exchange(service.addr, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n");
        (status == 503).then_some(())
    });
    drop(held);
    wait_for(10, "the held connections to close", || {
        let (status, _) = raw_exchange(service.addr, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n");
        (status == 200).then_some(())
    });
    let text = metrics(&service);
    assert!(
        metric(&text, "elastic_edge_http_connections_refused_total") >= 1.0,
        "{text}"
    );

    // 500 bad requests, each with its 4xx; RSS after 100 and after 500.
    let over = format!(
        "{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
        "x".repeat(70_000)
    );
    let cases: Vec<(Vec<u8>, u16, bool)> = vec![
        (chat_request("{\"messages\": ["), 400, true),
        (
            chat_request(r#"{"messages": [{"role": "system", "content": "Be brief."}]}"#),
            400,
            true,
        ),
        (
            chat_request(
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!notbase64"}}]}]}"#,
            ),
            400,
            true,
        ),
        (
            chat_request(r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}"#),
            400,
            true,
        ),
        (
            chat_request(r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100000000}"#),
            400,
            true,
        ),
        (
            chat_request(r#"{"messages": [{"role": "robot", "content": "Hi"}]}"#),
            400,
            true,
        ),
        (chat_request(&over), 413, true),
        (
            b"POST /caption HTTP/1.1\r\nConnection: close\r\nContent-Length: 9\r\n\r\nnot a png".to_vec(),
            400,
            false,
        ),
        (b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(), 404, false),
        (
            b"BREW /healthz HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            405,
            false,
        ),
    ];
    let pid = service.pid();
    let mut rss_100 = 0;
    for i in 0..500 {
        let (raw, want, openai) = &cases[i % cases.len()];
        let (status, body) = raw_exchange(service.addr, raw);
        assert_eq!(status, *want, "case {}: {body}", i % cases.len());
        let error: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
        if *openai {
            assert!(
                error["error"]["message"].is_string() && error["error"]["type"].is_string(),
                "{body}"
            );
        } else {
            assert!(error["error"].is_string(), "{body}");
        }
        if i % 50 == 49 {
            healthy();
        }
        if i == 99 {
            rss_100 = rss_bytes(pid);
        }
    }
    let rss_500 = rss_bytes(pid);
    let growth = rss_500 as i64 - rss_100 as i64;
    println!("hostile: RSS after 100 bad requests {rss_100} bytes, after 500 {rss_500} bytes, growth {growth}");
    let (status, _, stderr) = service.terminate();
    assert!(status.success(), "{stderr}");
    assert!(growth <= 2_000_000, "RSS grew by {growth} bytes over 400 bad requests");
}

/// 500 frames through the whole service (source, grabber, stream loop,
/// records to a file and to an event-stream client, a POST every 50
/// frames): the resident memory at frame 500 is within 5 MB of frame 50.
#[test]
fn soak_500_frames_memory_stays_flat() {
    let dir = tempfile::tempdir().unwrap();
    let frames = frames_dir(dir.path());
    let config = format!(
        "{}\n[stream]\nsource = \"{}\"\nloop = true\ninterval = \"0\"\njsonl = \"captions.jsonl\"\n",
        base_config(),
        frames.display()
    );
    let jsonl = dir.path().join("captions.jsonl");
    let service = start_in(&config, &Launch::default(), dir);
    let pid = service.pid();
    let png = std::fs::read(fixture_png("chelsea-224.png")).unwrap();
    let url = service.url("/caption");
    let mut events = Events::connect(&service.url("/events"));
    let started = Instant::now();
    let (mut rss_50, mut rss_500) = (0, 0);
    let mut seen = 0u64;
    while rss_500 == 0 {
        let (_, id, record) = events.next();
        seen += 1;
        assert!(record["pool_bytes"].as_u64().unwrap() <= 65536);
        // Frame ids count from 0: id 49 is the 50th frame.
        if id >= 49 && rss_50 == 0 {
            rss_50 = rss_bytes(pid);
        }
        if id >= 499 {
            rss_500 = rss_bytes(pid);
        }
        if seen.is_multiple_of(50) {
            let url = url.clone();
            let png = png.clone();
            // From another thread, as a client would: the captioning thread
            // serves it between two frames.
            std::thread::spawn(move || assert_eq!(post(&url, &png).0, 200))
                .join()
                .unwrap();
        }
    }
    let elapsed = started.elapsed();
    let growth = rss_500 as i64 - rss_50 as i64;
    println!(
        "soak: RSS at frame 50 = {} bytes ({:.2} MiB), at frame 500 = {} bytes ({:.2} MiB), growth {} bytes; \
         {seen} events in {:.1} s",
        rss_50,
        rss_50 as f64 / 1048576.0,
        rss_500,
        rss_500 as f64 / 1048576.0,
        growth,
        elapsed.as_secs_f64()
    );
    let text = metrics(&service);
    let posted = metric(&text, "elastic_edge_captions_total{origin=\"http\"}");
    assert!(posted >= 9.0, "{posted} POSTs captioned");
    assert!(std::fs::read_to_string(&jsonl).unwrap().lines().count() >= 500);
    let (status, _, stderr) = service.terminate();
    assert!(status.success(), "{stderr}");
    assert!(
        growth <= 5_000_000,
        "RSS grew by {growth} bytes between frame 50 ({rss_50}) and frame 500 ({rss_500})"
    );
}

/// A live camera (GStreamer's test source at 30 frames a second) captioned
/// every 300 ms: frames in between are dropped and counted, health is ok.
/// Under PR_SET_MDWE, as MemoryDenyWriteExecute=yes runs it (videoconvert
/// may JIT-compile with orc).
#[cfg(feature = "gstreamer")]
#[test]
fn a_live_gstreamer_camera_drops_frames_between_captions() {
    let config = format!(
        "{}\n[stream]\nsource = \"gst:videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=30/1 \
         ! videoconvert ! appsink\"\ninterval = \"300ms\"\n",
        base_config()
    );
    let launch = Launch {
        deny_write_execute: mdwe_supported(),
        ..Launch::default()
    };
    let service = start(&config, &launch);
    let text = wait_for(60, "three stream captions", || {
        let text = metrics(&service);
        (metric(&text, "elastic_edge_captions_total{origin=\"stream\"}") >= 3.0).then_some(text)
    });
    let frames = metric(&text, "elastic_edge_frames_total");
    let dropped = metric(&text, "elastic_edge_frames_dropped_total");
    let captions = metric(&text, "elastic_edge_captions_total{origin=\"stream\"}");
    assert!(
        frames > captions && dropped > 0.0,
        "{frames} frames, {dropped} dropped, {captions} captions"
    );
    assert_eq!(metric(&text, "elastic_edge_source_state{state=\"running\"}"), 1.0);
    let (status, health) = get_json(&service.url("/healthz"));
    assert_eq!(status, 200, "{health}");
    assert!(
        health["source"]["counters"]["frames_dropped"].as_u64().unwrap() > 0,
        "{health}"
    );
    let (status, _, stderr) = service.terminate();
    assert!(status.success(), "{stderr}");
}
