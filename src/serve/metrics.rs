//! The service's counters and histograms for `GET /metrics`, kept and
//! rendered by `prometheus-client` in Prometheus' text format (version
//! 0.0.4, what the hand-written renderer produced: the same names, types,
//! labels and help texts).
//!
//! Why `prometheus-client` rather than the `prometheus` crate: it is the
//! Prometheus project's own client, has no protobuf dependency, and its
//! collectors read figures at scrape time (the frame source's counters,
//! the event-stream clients), which `prometheus` would have us copy into
//! counters it can only increment.

use std::sync::{Mutex, MutexGuard};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::memory::MemoryFigures;
use crate::source::GrabberCounters;
use crate::stream::CaptionResult;

/// Who asked for a caption.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The camera, every interval.
    Stream,
    /// `POST /caption`.
    Http,
}

impl Origin {
    pub fn name(self) -> &'static str {
        match self {
            Origin::Stream => "stream",
            Origin::Http => "http",
        }
    }
}

/// The frame source's states, as `elastic_edge_source_state` labels them.
pub const SOURCE_STATES: [&str; 7] = [
    "starting",
    "running",
    "silent",
    "reconnecting",
    "finished",
    "stopped",
    "failed",
];

/// What one caption adds to the metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct CaptionFigures {
    /// End to end: image decoding to the last token.
    pub caption_ms: f64,
    pub time_to_first_token_ms: f64,
    pub tokens: usize,
    pub merged: u64,
    pub evicted: u64,
    pub pool_bytes: u64,
    pub pool_slots: usize,
    pub cache_entries: usize,
}

impl CaptionFigures {
    pub fn of(result: &CaptionResult) -> Self {
        CaptionFigures {
            caption_ms: result.caption_ms,
            time_to_first_token_ms: result.timings_ms.time_to_first_token_ms,
            tokens: result.tokens,
            merged: result.merged,
            evicted: result.evicted,
            pool_bytes: result.pool_bytes,
            pool_slots: result.pool_slots,
            cache_entries: result.cache_entries,
        }
    }
}

/// Upper bounds of the latency buckets, in seconds: a caption takes tens of
/// milliseconds on the tiny model and seconds for a 7B model on a Jetson.
const LATENCY_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// A registered metric's help: the registry appends the full stop.
fn help(text: &'static str) -> &'static str {
    text.strip_suffix('.').unwrap_or(text)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OriginLabel {
    origin: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
    status: u16,
}

/// The error kinds counted (`elastic_edge_errors_total{kind=...}`).
pub mod kind {
    /// A caption that failed in the model (ONNX Runtime, the prompt, the cache).
    pub const CAPTION: &str = "caption";
    /// A frame or POSTed image that could not be decoded.
    pub const IMAGE: &str = "image";
    /// The JSON Lines file could not be written.
    pub const OUTPUT: &str = "output";
    /// A request that was malformed (400), too large (413) or whose image or
    /// prompt could not be used.
    pub const REQUEST: &str = "request";
}

const ERROR_KINDS: [&str; 4] = [kind::CAPTION, kind::IMAGE, kind::OUTPUT, kind::REQUEST];

/// What only the caller knows at scrape time.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScrapeInputs {
    /// The frame source's counters and state name.
    pub source: Option<(GrabberCounters, &'static str)>,
    pub sse_clients: usize,
    /// HTTP connections open, and refused at the cap since the start.
    pub http_connections: usize,
    pub http_connections_refused: u64,
    pub uptime_s: f64,
}

/// The figures encoded at scrape time, in families the registry cannot
/// hold: the source's counters, the error kinds counted here and by the
/// grabber, the memory's figures (only with a memory).
#[derive(Debug)]
struct ScrapeFigures {
    errors: [Counter; ERROR_KINDS.len()],
    merged: Counter,
    evicted: Counter,
    memory: Mutex<Option<MemoryFigures>>,
    memory_frame_latency: Histogram,
    answer_latency: Histogram,
    inputs: Mutex<ScrapeInputs>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain figures, each written whole: usable after a panic elsewhere.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn encode_const(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    match metric_type {
        MetricType::Counter => ConstCounter::new(value).encode(metric),
        _ => ConstGauge::new(value as i64).encode(metric),
    }
}

impl Collector for ScrapeFigures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let inputs = *lock(&self.inputs);
        let figures = inputs.source.map(|(f, _)| f).unwrap_or_default();
        for (name, help, value) in [
            (
                "elastic_edge_frames",
                "Frames delivered by the source.",
                figures.frames_received,
            ),
            (
                "elastic_edge_frames_dropped",
                "Frames replaced by a newer one before they were captioned (latest frame wins).",
                figures.frames_dropped,
            ),
            (
                "elastic_edge_frames_corrupt",
                "Frames that could not be decoded.",
                figures.frames_corrupt,
            ),
            (
                "elastic_edge_source_losses",
                "Times the frame source was lost.",
                figures.source_losses,
            ),
            (
                "elastic_edge_source_reconnect_attempts",
                "Attempts to reconnect a lost source.",
                figures.reconnect_attempts,
            ),
        ] {
            encode_const(&mut encoder, name, help, MetricType::Counter, value)?;
        }
        let current = inputs.source.map(|(_, s)| s);
        let mut states = encoder.encode_descriptor(
            "elastic_edge_source_state",
            "The frame source's state (1 for the current one; all 0 without a source).",
            None,
            MetricType::Gauge,
        )?;
        for state in SOURCE_STATES {
            let labels = [("state", state)];
            ConstGauge::new(i64::from(current == Some(state))).encode(states.encode_family(&labels)?)?;
        }
        let mut errors = encoder.encode_descriptor(
            "elastic_edge_errors",
            "Errors, by kind (each is also logged): caption (the model failed), image (a frame or POSTed \
             image did not decode), output (the caption file), request (a bad or oversized POST), \
             corrupt_frame and source_lost (the frame source).",
            None,
            MetricType::Counter,
        )?;
        let grabber = [
            ("corrupt_frame", figures.frames_corrupt),
            ("source_lost", figures.source_losses),
        ];
        let ours = ERROR_KINDS.iter().zip(&self.errors).map(|(k, c)| (*k, c.get()));
        for (kind, value) in ours.chain(grabber) {
            let labels = [("kind", kind)];
            ConstCounter::new(value).encode(errors.encode_family(&labels)?)?;
        }
        let memory = *lock(&self.memory);
        encode_const(
            &mut encoder,
            "elastic_edge_cache_merged",
            "KV entries merged into others by the cache policy, summed over layers.",
            MetricType::Counter,
            self.merged.get() + memory.as_ref().map_or(0, |m| m.merged),
        )?;
        encode_const(
            &mut encoder,
            "elastic_edge_cache_evicted",
            "KV entries evicted by the cache policy, summed over layers.",
            MetricType::Counter,
            self.evicted.get() + memory.as_ref().map_or(0, |m| m.evicted),
        )?;
        if let Some(memory) = &memory {
            for (name, help, metric_type, value) in [
                (
                    "elastic_edge_memory_frames",
                    "Frames taken into the camera memory.",
                    MetricType::Counter,
                    memory.frames_seen,
                ),
                (
                    "elastic_edge_memory_frames",
                    "Frames with at least one KV entry left in the memory.",
                    MetricType::Gauge,
                    memory.frames_in_memory as u64,
                ),
                (
                    "elastic_edge_memory_questions",
                    "Questions answered from the memory.",
                    MetricType::Counter,
                    memory.questions,
                ),
                (
                    "elastic_edge_memory_max_position",
                    "The largest position in the memory (kept below the model's max_positions).",
                    MetricType::Gauge,
                    memory.max_position as u64,
                ),
                (
                    "elastic_edge_memory_rebases",
                    "Times the memory's positions were re-based into the model's range.",
                    MetricType::Counter,
                    memory.rebases,
                ),
            ] {
                encode_const(&mut encoder, name, help, metric_type, value)?;
            }
        }
        encode_const(
            &mut encoder,
            "elastic_edge_sse_clients",
            "Clients connected to the caption event stream.",
            MetricType::Gauge,
            inputs.sse_clients as u64,
        )?;
        encode_const(
            &mut encoder,
            "elastic_edge_http_connections",
            "HTTP connections open.",
            MetricType::Gauge,
            inputs.http_connections as u64,
        )?;
        encode_const(
            &mut encoder,
            "elastic_edge_http_connections_refused",
            "HTTP connections answered 503 and closed because http.max_connections were open.",
            MetricType::Counter,
            inputs.http_connections_refused,
        )?;
        ConstGauge::new(inputs.uptime_s).encode(encoder.encode_descriptor(
            "elastic_edge_uptime_seconds",
            "Seconds since the service started.",
            None,
            MetricType::Gauge,
        )?)?;
        if memory.is_some() {
            self.memory_frame_latency.encode(encoder.encode_descriptor(
                "elastic_edge_memory_frame_seconds",
                "Time to take one frame into the memory (and caption it, with memory.captions).",
                None,
                MetricType::Histogram,
            )?)?;
            self.answer_latency.encode(encoder.encode_descriptor(
                "elastic_edge_memory_answer_seconds",
                "Time to answer one question from the memory.",
                None,
                MetricType::Histogram,
            )?)?;
        }
        Ok(())
    }
}

/// Every figure `/metrics` shows.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    scrape: std::sync::Arc<ScrapeFigures>,
    /// Held while the scrape inputs are set and the text encoded, so two
    /// scrapes at once do not mix their inputs.
    rendering: Mutex<()>,
    captions: Family<OriginLabel, Counter>,
    latency: Histogram,
    ttft: Histogram,
    generated_tokens: Counter,
    pool_bytes: Gauge,
    pool_slots: Gauge,
    cache_entries: Gauge,
    http_requests: Family<RouteLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let scrape = std::sync::Arc::new(ScrapeFigures {
            errors: Default::default(),
            merged: Counter::default(),
            evicted: Counter::default(),
            memory: Mutex::new(None),
            memory_frame_latency: latency_histogram(),
            answer_latency: latency_histogram(),
            inputs: Mutex::new(ScrapeInputs::default()),
        });
        let metrics = Metrics {
            registry: Registry::default(),
            scrape,
            rendering: Mutex::new(()),
            captions: Family::default(),
            latency: latency_histogram(),
            ttft: latency_histogram(),
            generated_tokens: Counter::default(),
            pool_bytes: Gauge::default(),
            pool_slots: Gauge::default(),
            cache_entries: Gauge::default(),
            http_requests: Family::default(),
        };
        // Both origins show from the start, at 0.
        for origin in [Origin::Stream, Origin::Http] {
            let _ = metrics.captions.get_or_create(&OriginLabel { origin: origin.name() });
        }
        let mut metrics = metrics;
        let registry = &mut metrics.registry;
        registry.register(
            "elastic_edge_captions",
            help("Captions generated, by origin (stream: the camera; http: POST /caption)."),
            metrics.captions.clone(),
        );
        registry.register(
            "elastic_edge_generated_tokens",
            help("Tokens generated over all captions."),
            metrics.generated_tokens.clone(),
        );
        registry.register(
            "elastic_edge_kv_pool_bytes",
            help("Bytes of the KV pool (fixed at start)."),
            metrics.pool_bytes.clone(),
        );
        registry.register(
            "elastic_edge_kv_pool_slots",
            help("Slots of the KV pool (fixed at start)."),
            metrics.pool_slots.clone(),
        );
        registry.register(
            "elastic_edge_cache_entries",
            help("KV entries live at the end of the last caption."),
            metrics.cache_entries.clone(),
        );
        registry.register(
            "elastic_edge_http_requests",
            help("HTTP requests answered, by route and status."),
            metrics.http_requests.clone(),
        );
        registry.register(
            "elastic_edge_caption_latency_seconds",
            help("Time to caption one image, from decoding it to the last token."),
            metrics.latency.clone(),
        );
        registry.register(
            "elastic_edge_time_to_first_token_seconds",
            help("Time from the image to the first generated token."),
            metrics.ttft.clone(),
        );
        registry.register_collector(Box::new(std::sync::Arc::clone(&metrics.scrape)));
        metrics
    }
}

impl Metrics {
    /// The pool's size, known once the cache is built.
    pub fn set_pool(&self, bytes: u64, slots: usize) {
        self.pool_bytes.set(bytes as i64);
        self.pool_slots.set(slots as i64);
    }

    /// A caption done.
    pub fn caption(&self, origin: Origin, figures: &CaptionFigures) {
        self.captions
            .get_or_create(&OriginLabel { origin: origin.name() })
            .inc();
        self.latency.observe(figures.caption_ms / 1e3);
        self.ttft.observe(figures.time_to_first_token_ms / 1e3);
        self.generated_tokens.inc_by(figures.tokens as u64);
        self.scrape.merged.inc_by(figures.merged);
        self.scrape.evicted.inc_by(figures.evicted);
        self.set_pool(figures.pool_bytes, figures.pool_slots);
        self.cache_entries.set(figures.cache_entries as i64);
    }

    /// A frame taken into the camera memory (`frame_ms`: its whole step).
    pub fn remembered(&self, frame_ms: f64, figures: &MemoryFigures) {
        self.scrape.memory_frame_latency.observe(frame_ms / 1e3);
        self.cache_entries.set(figures.cache_entries as i64);
        *lock(&self.scrape.memory) = Some(*figures);
    }

    /// A question answered from the camera memory.
    pub fn question(&self, answer_ms: f64, figures: &MemoryFigures) {
        self.scrape.answer_latency.observe(answer_ms / 1e3);
        self.cache_entries.set(figures.cache_entries as i64);
        *lock(&self.scrape.memory) = Some(*figures);
    }

    /// Questions answered from the memory so far.
    pub fn questions(&self) -> u64 {
        lock(&self.scrape.memory).as_ref().map_or(0, |m| m.questions)
    }

    /// Counts an error of `kind` (one of [`kind`]'s).
    pub fn error(&self, kind: &'static str) {
        if let Some(i) = ERROR_KINDS.iter().position(|k| *k == kind) {
            self.scrape.errors[i].inc();
        }
    }

    pub fn http_request(&self, route: &'static str, status: u16) {
        self.http_requests.get_or_create(&RouteLabels { route, status }).inc();
    }

    /// Captions so far, by origin.
    pub fn captions(&self, origin: Origin) -> u64 {
        self.captions
            .get_or_create(&OriginLabel { origin: origin.name() })
            .get()
    }

    pub fn errors(&self, kind: &'static str) -> u64 {
        ERROR_KINDS
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.scrape.errors[i].get())
    }

    /// The exposition text. `source` is `None` when no camera is configured,
    /// else its counters and its state's name (one of [`SOURCE_STATES`]).
    pub fn render(&self, inputs: ScrapeInputs) -> String {
        let _rendering = lock(&self.rendering);
        *lock(&self.scrape.inputs) = inputs;
        let mut out = String::with_capacity(8192);
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry) {
            // Writing to a String fails only if an encoder does.
            log::error!("metrics: encoding failed: {e}");
        }
        out
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let metrics = Metrics::default();
        for seconds in [0.005, 0.02, 0.02, 3.0, 500.0] {
            let figures = CaptionFigures {
                caption_ms: seconds * 1e3,
                ..CaptionFigures::default()
            };
            metrics.caption(Origin::Http, &figures);
        }
        let out = metrics.render(ScrapeInputs {
            uptime_s: 1.0,
            ..ScrapeInputs::default()
        });
        let x = "elastic_edge_caption_latency_seconds";
        assert!(out.contains(&format!("# TYPE {x} histogram\n")), "{out}");
        assert!(out.contains(&format!("{x}_bucket{{le=\"0.01\"}} 1\n")), "{out}");
        assert!(out.contains(&format!("{x}_bucket{{le=\"0.025\"}} 3\n")), "{out}");
        assert!(out.contains(&format!("{x}_bucket{{le=\"2.5\"}} 3\n")), "{out}");
        assert!(out.contains(&format!("{x}_bucket{{le=\"5\"}} 4\n")), "{out}");
        assert!(out.contains(&format!("{x}_bucket{{le=\"120\"}} 4\n")), "{out}");
        assert!(out.contains(&format!("{x}_bucket{{le=\"+Inf\"}} 5\n")), "{out}");
        assert!(out.contains(&format!("{x}_count 5\n")), "{out}");
        assert!(
            out.contains("elastic_edge_captions_total{origin=\"http\"} 5\n"),
            "{out}"
        );
        assert!(
            out.contains("elastic_edge_captions_total{origin=\"stream\"} 0\n"),
            "{out}"
        );
    }

    #[test]
    fn every_sample_line_belongs_to_a_declared_metric() {
        let metrics = Metrics::default();
        metrics.error(kind::OUTPUT);
        metrics.http_request("/healthz", 200);
        let text = metrics.render(ScrapeInputs {
            source: Some((
                GrabberCounters {
                    frames_received: 9,
                    frames_dropped: 3,
                    frames_corrupt: 1,
                    source_losses: 2,
                    reconnect_attempts: 4,
                },
                "reconnecting",
            )),
            sse_clients: 2,
            http_connections: 7,
            http_connections_refused: 5,
            uptime_s: 1.5,
        });
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let base = name
                    .strip_suffix("_bucket")
                    .or_else(|| name.strip_suffix("_sum"))
                    .or_else(|| name.strip_suffix("_count"))
                    .filter(|b| declared.contains(*b))
                    .unwrap_or(name);
                assert!(declared.contains(base), "undeclared sample {line}");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
            }
        }
        assert!(text.contains("elastic_edge_frames_dropped_total 3\n"));
        assert!(text.contains("elastic_edge_http_connections 7\n"));
        assert!(text.contains("elastic_edge_http_connections_refused_total 5\n"));
        assert!(text.contains("elastic_edge_source_state{state=\"reconnecting\"} 1\n"));
        assert!(text.contains("elastic_edge_source_state{state=\"running\"} 0\n"));
        assert!(text.contains("elastic_edge_errors_total{kind=\"output\"} 1\n"));
        assert!(text.contains("elastic_edge_errors_total{kind=\"source_lost\"} 2\n"));
        assert!(text.contains("elastic_edge_http_requests_total{route=\"/healthz\",status=\"200\"} 1\n"));
        assert!(text.contains(
            "# HELP elastic_edge_kv_pool_bytes Bytes of the KV pool (fixed at start).\n# TYPE elastic_edge_kv_pool_bytes gauge\n"
        ));
    }
}
