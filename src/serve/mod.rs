//! `elastic-edge serve`: the captioning service of a robot.
//!
//! ```text
//! camera -> grabber thread (latest frame wins, reconnects with backoff)
//!                 |
//!   captioning thread: owns the Generator (one model, one KV pool);
//!     the stream loop captions the newest frame every interval and, in
//!     between, the jobs POST /caption queued
//!                 |  record -> /caption/latest, event stream, JSONL file
//!   HTTP threads: /healthz /metrics /caption/latest /captions/stream POST /caption
//!                 POST /memory/ask, /v1/chat/completions /v1/models (OpenAI's API)
//!   main thread: sd_notify READY / WATCHDOG / STATUS / STOPPING, signals
//! ```
//!
//! One file per concern: [`config`], [`http`] (the server), [`api`] (the
//! routes), [`openai`] (OpenAI's request and response shapes), [`worker`]
//! (the captioning thread), [`events`] (the event stream's fan-out),
//! [`metrics`], [`health`], [`notify`] (sd_notify).

pub mod api;
pub mod config;
pub mod events;
pub mod health;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod openai;
pub mod worker;

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{error_chain, Error, Result};
use crate::generate::{GenerateParams, Generator, Sampling};
use crate::kv::budget::check_fits_memory;
use crate::kv::{KvCache, PoolBacking};
use crate::memory::MemoryOptions;
use crate::model::{LoadOptions, Manifest, Model, ProviderOptions};
use crate::source::{Backoff, Grabber, GrabberMonitor, SourceOptions, SourceState, StopFlag};
use crate::stream::{JsonLines, MemoryStreamConfig, Stream, StreamConfig};

pub use config::ServeConfig;
use events::Broadcaster;
use health::{Health, HealthReport, SourceHealth};
use http::{ConnectionStats, HttpServer};
use metrics::Metrics;
use notify::Notifier;
use worker::Captioner;

/// Most event-stream clients.
const MAX_EVENT_CLIENTS: usize = 16;
/// POSTs waiting for the model beyond the one being captioned.
const JOB_QUEUE: usize = 4;
/// How often the main loop looks at the stop flag and the threads, and the
/// longest the captioning thread waits for a request.
const TICK: Duration = Duration::from_millis(100);

/// What the threads share.
pub struct Shared {
    pub metrics: Metrics,
    pub health: Health,
    pub events: Broadcaster,
    latest: Mutex<Option<Arc<str>>>,
    source: Option<(String, GrabberMonitor)>,
    /// The HTTP server's connection counts.
    connections: Arc<ConnectionStats>,
    started: Instant,
}

impl Shared {
    /// The last stream caption's record, as JSON.
    pub fn latest(&self) -> Option<Arc<str>> {
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_latest(&self, record: Arc<str>) {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(record);
    }

    fn source_health(&self) -> Option<SourceHealth> {
        let (spec, monitor) = self.source.as_ref()?;
        let status = monitor.status();
        let state = state_name(&status.state);
        let detail = match &status.state {
            SourceState::Reconnecting {
                attempt,
                last_error,
                retry_in_ms,
            } => Some(format!("{last_error} (attempt {attempt}, next in {retry_in_ms} ms)")),
            SourceState::Finished => Some("no more frames".to_string()),
            SourceState::Failed { error } => Some(error.clone()),
            SourceState::Silent { no_frame_for_ms } => Some(format!(
                "no frame for {:.0} s: lost (its read has not returned, so it cannot be retried yet)",
                *no_frame_for_ms as f64 / 1e3
            )),
            SourceState::Starting | SourceState::Running | SourceState::Stopped => None,
        };
        Some(SourceHealth {
            spec: spec.clone(),
            state,
            detail,
            counters: status.counters,
        })
    }

    pub fn health_report(&self) -> HealthReport {
        self.health.report(self.source_health())
    }

    pub fn metrics_text(&self) -> String {
        let source = self.source.as_ref().map(|(_, monitor)| {
            let status = monitor.status();
            (status.counters, state_name(&status.state))
        });
        self.metrics.render(metrics::ScrapeInputs {
            source,
            sse_clients: self.events.clients(),
            http_connections: self.connections.open(),
            http_connections_refused: self.connections.refused(),
            uptime_s: self.started.elapsed().as_secs_f64(),
        })
    }
}

fn state_name(state: &SourceState) -> &'static str {
    match state {
        SourceState::Starting => "starting",
        SourceState::Running => "running",
        SourceState::Reconnecting { .. } => "reconnecting",
        SourceState::Finished => "finished",
        SourceState::Stopped => "stopped",
        SourceState::Failed { .. } => "failed",
        SourceState::Silent { .. } => "silent",
    }
}

/// What `serve --check` reports: the config is usable, and the memory the
/// unit should allow.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    pub model: String,
    pub model_bytes: u64,
    pub pool_bytes: u64,
    pub pool_slots: usize,
    /// `MemoryMax=` for the unit: see [`memory_max`].
    pub memory_max_bytes: u64,
}

/// `MemoryMax=` for a model whose files take `model_bytes` and a pool of
/// `pool_bytes`: twice the files (ONNX Runtime holds the weights it reads,
/// and converts fp16 weights to f32 for its CPU kernels: the demo model's
/// peak resident memory was 2.6 times its fp16 files and 1.4 times its
/// fp32 files, pool included), the pool, and 512 MiB for the runtime's
/// arenas, the threads and this process.
pub fn memory_max(model_bytes: u64, pool_bytes: u64) -> u64 {
    model_bytes.saturating_mul(2) + pool_bytes + (512 << 20)
}

/// The model's manifest and the KV cache the config asks for, before any
/// graph is loaded: a bad budget fails in milliseconds, naming its key.
fn plan_cache(config: &ServeConfig) -> Result<(Manifest, KvCache)> {
    let dir = &config.model.dir;
    let manifest = Manifest::load(dir)
        .and_then(|m| {
            let checked = m.verify_files(dir)?;
            log::info!("model {}: files check out: {checked}", dir.display());
            Ok(m)
        })
        .map_err(|e| config.error("model.dir", error_chain(&e)))?;
    caption_params(config)
        .check(&manifest)
        .map_err(|e| config.error("caption.max_new_tokens", error_chain(&e)))?;
    if !config.cache.kv_over_memory {
        // The pool's pages are populated when it is mapped.
        let pool_bytes = config.cache.kv_budget.pool_bytes(manifest.kv_shape().bytes_per_slot());
        check_fits_memory(pool_bytes, manifest.files_bytes()).map_err(|e| {
            config.error(
                "cache.kv_budget",
                format!("{e}; lower it (or, for a pool on disk, set cache.kv_file and cache.kv_over_memory = true)"),
            )
        })?;
    }
    let cache = KvCache::with_budget(
        manifest.kv_shape(),
        config.cache.kv_budget,
        &PoolBacking::from_file(config.cache.kv_file.as_deref()),
        config.cache.policy,
        &config.cache.knobs,
        config.cache.keep,
    )
    .map_err(|e| match e {
        Error::PoolFile { .. } => config.error("cache.kv_file", error_chain(&e)),
        other => config.error("cache.kv_budget", error_chain(&other)),
    })?;
    Ok((manifest, cache))
}

/// `serve --check`: everything but loading the graphs and listening.
pub fn check(config: &ServeConfig) -> Result<CheckReport> {
    let (manifest, cache) = plan_cache(config)?;
    if let Some(spec) = &config.stream.source {
        // Opening proves a folder has files and a pipeline parses; a camera
        // that is not there yet is not an error.
        let stop = StopFlag::new();
        spec.open(&source_options(config), &stop)
            .map_err(|e| config.error("stream.source", error_chain(&e)))?;
    }
    let model_bytes = manifest.files_bytes();
    let pool = cache.pool();
    Ok(CheckReport {
        model: manifest.name.clone(),
        model_bytes,
        pool_bytes: pool.bytes(),
        pool_slots: pool.capacity(),
        memory_max_bytes: memory_max(model_bytes, pool.bytes()),
    })
}

/// How the service generates every caption and answer.
fn caption_params(config: &ServeConfig) -> GenerateParams {
    GenerateParams {
        max_new_tokens: config.caption.max_new_tokens,
        sampling: Sampling::GREEDY,
        stop_strings: Vec::new(),
        ignore_stop: false,
    }
}

fn source_options(config: &ServeConfig) -> SourceOptions {
    SourceOptions {
        looping: config.stream.looping,
        ..SourceOptions::default()
    }
}

fn notify_or_warn(result: Result<()>) {
    if let Err(e) = result {
        log::warn!("{}", error_chain(&e));
    }
}

/// Runs the service until `stop` is set (SIGTERM, SIGINT): loads the model,
/// opens the source, listens, tells systemd it is ready, pings the
/// watchdog while the captioning thread is alive, and stops after the
/// caption in flight. Errors before READY are configuration errors naming
/// their key; a thread that dies afterwards is an error too (systemd
/// restarts the service).
pub fn run(config: &ServeConfig, stop: &StopFlag) -> Result<()> {
    let notifier = Notifier::from_env()?;
    notify_or_warn(notifier.status("loading the model"));
    let (manifest, cache) = plan_cache(config)?;
    // The source before the model: a folder without pictures or a pipeline
    // that does not parse fails in milliseconds.
    let source = match &config.stream.source {
        Some(spec) => Some(
            spec.open(&source_options(config), stop)
                .map_err(|e| config.error("stream.source", error_chain(&e)))?,
        ),
        None => None,
    };
    let stall_after = notifier
        .watchdog()
        .unwrap_or(Duration::from_secs(120))
        .max(Duration::from_secs(30));
    log::info!(
        "model {} from {}; KV pool {} bytes ({} slots), policy {} keep {}",
        manifest.name,
        config.model.dir.display(),
        cache.pool().bytes(),
        cache.pool().capacity(),
        config.cache.policy,
        config.cache.keep.get()
    );
    let options = LoadOptions {
        providers: ProviderOptions {
            device: config.model.device,
            device_id: config.model.device_id,
            tensorrt_cache: config.model.tensorrt_cache.clone(),
            tensorrt_fp16: config.model.tensorrt_fp16,
        },
        threads: config.model.threads,
        onnxruntime: config.model.onnxruntime.clone(),
        single_graph: false,
    };
    let mut model = Model::load(&config.model.dir, &options)?;
    let pool_bytes = cache.pool().bytes();
    let pool_slots = cache.pool().capacity();
    let mut generator = Generator::new(&mut model, cache)?;
    generator.set_prefill_chunk(config.cache.prefill_chunk);

    let params = caption_params(config);
    let memory = config.memory.enabled.then(|| MemoryStreamConfig {
        options: MemoryOptions {
            captions: config.memory.captions,
            caption_prompt: config.caption.prompt.clone(),
            caption_params: params.clone(),
        },
        // Questions come as POST /memory/ask.
        questions: Vec::new(),
        answer_params: params.clone(),
    });
    let stream_config = StreamConfig {
        prompt: config.caption.prompt.clone(),
        every: config.stream.interval,
        max_captions: None,
        params: params.clone(),
        // A service keeps going; health shows the failures.
        max_consecutive_errors: None,
        memory,
    };
    // The prompt (or the memory's first pieces) must fit before READY.
    let mut stream = Stream::new(&mut generator, &stream_config).map_err(|e| match e {
        Error::Prompt(_) => config.error("caption.prompt", error_chain(&e)),
        Error::Shape(_) => config.error("model.dir", error_chain(&e)),
        other if config.memory.enabled => config.error("cache.kv_budget", error_chain(&other)),
        other => config.error(
            "cache.kv_budget",
            format!(
                "{} (the pool must hold the image, the prompt and caption.max_new_tokens)",
                error_chain(&other)
            ),
        ),
    })?;

    let output = match &config.stream.jsonl {
        Some(path) => Some(JsonLines::append_to(path).map_err(|e| config.error("stream.jsonl", error_chain(&e)))?),
        None => None,
    };
    let grabber = match source {
        Some(source) => Some(Grabber::start(source, Backoff::default(), stop.clone())?),
        None => None,
    };

    let metrics = Metrics::default();
    metrics.set_pool(pool_bytes, pool_slots);
    let connections = Arc::new(ConnectionStats::default());
    let shared = Arc::new(Shared {
        metrics,
        health: Health::new(stall_after),
        events: Broadcaster::new(MAX_EVENT_CLIENTS),
        latest: Mutex::new(None),
        source: grabber
            .as_ref()
            .zip(config.stream.source.as_ref())
            .map(|(g, spec)| (spec.to_string(), g.monitor())),
        connections: Arc::clone(&connections),
        started: Instant::now(),
    });
    let (jobs, job_queue) = mpsc::sync_channel(JOB_QUEUE);
    let routes = api::Routes {
        max_body: config.http.max_body,
        memory: config.memory.enabled,
        model: manifest.name.clone(),
        loaded_unix: crate::stream::unix_ms(std::time::SystemTime::now()) / 1000,
        default_tokens: config.caption.max_new_tokens,
        api_key: config.http.api_key.clone(),
    };
    let handler = api::handler(Arc::clone(&shared), jobs, routes);
    let mut server = HttpServer::start(config.http.listen, config.http.limits, handler, connections)
        .map_err(|e| config.error("http.listen", error_chain(&e)))?;
    let mut captioner = Captioner::new(Arc::clone(&shared), output, params, config.caption.prompt.clone());

    let outcome = std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("captioner".into())
            .spawn_scoped(scope, || {
                // The receiver moves to this thread (it is not Sync).
                let jobs = job_queue;
                worker::work(
                    &mut generator,
                    &mut stream,
                    grabber.as_ref(),
                    config.stream.interval,
                    &jobs,
                    stop,
                    &mut captioner,
                )
            })
            .map_err(|source| Error::Thread {
                what: "captioning",
                source,
            })?;
        let ready = format!(
            "listening on http://{}; {}",
            server.local_addr(),
            match &config.stream.source {
                Some(spec) if config.memory.enabled => format!(
                    "remembering {spec} every {:?}; POST /memory/ask to question it",
                    config.stream.interval
                ),
                Some(spec) => format!("captioning {spec} every {:?}", config.stream.interval),
                None => "no camera: POST /caption only".to_string(),
            }
        );
        log::info!("{ready}");
        notify_or_warn(notifier.ready(&ready));

        let outcome = supervise(&notifier, &shared, &server, &worker, stop);

        let stopping = "stopping after the caption in flight";
        log::info!("{stopping}");
        notify_or_warn(notifier.stopping(stopping));
        shared.health.set_stopping();
        stop.stop();
        if worker.join().is_err() {
            log::error!("the captioning thread panicked");
        }
        server.stop();
        shared.events.close();
        outcome
    });
    if let Some(grabber) = grabber {
        grabber.finish();
    }
    outcome
}

/// The main thread while serving: watchdog pings while the captioning
/// thread is alive, status lines, until `stop` or a thread dies.
fn supervise(
    notifier: &Notifier,
    shared: &Shared,
    server: &HttpServer,
    worker: &std::thread::ScopedJoinHandle<'_, ()>,
    stop: &StopFlag,
) -> Result<()> {
    let watchdog = notifier.watchdog();
    let ping_every = watchdog.map(|w| w / 2);
    let mut last_ping: Option<Instant> = None;
    let mut last_status = String::new();
    let mut last_status_at = Instant::now();
    while !stop.is_stopped() {
        if worker.is_finished() {
            return Err(Error::Thread {
                what: "captioning",
                source: std::io::Error::other("the captioning thread ended"),
            });
        }
        if !server.is_running() {
            return Err(Error::Thread {
                what: "HTTP",
                source: std::io::Error::other("the HTTP thread ended"),
            });
        }
        if let (Some(watchdog), Some(every)) = (watchdog, ping_every) {
            let due = last_ping.is_none_or(|t| t.elapsed() >= every);
            // Only while the captioning thread beats: a thread stuck in a
            // caption lets the watchdog fire and systemd restart us.
            if due && shared.health.alive_within(watchdog) {
                notify_or_warn(notifier.watchdog_ping());
                last_ping = Some(Instant::now());
            }
        }
        if last_status_at.elapsed() >= Duration::from_secs(2) {
            let status = status_line(shared);
            if status != last_status {
                notify_or_warn(notifier.status(&status));
                last_status = status;
            }
            last_status_at = Instant::now();
        }
        std::thread::sleep(TICK);
    }
    Ok(())
}

/// systemd's one-line status: what `systemctl status` shows.
fn status_line(shared: &Shared) -> String {
    use metrics::Origin;
    let report = shared.health_report();
    let mut line = format!(
        "{}: {} stream captions, {} POSTed, {} questions",
        report.status,
        shared.metrics.captions(Origin::Stream),
        shared.metrics.captions(Origin::Http),
        shared.metrics.questions()
    );
    if let Some(source) = &report.source {
        line.push_str(&format!("; source {}", source.state));
    }
    if let Some(reason) = report.reasons.first() {
        line.push_str(&format!("; {reason}"));
    }
    line
}
