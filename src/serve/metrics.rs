//! The service's counters and histograms, rendered in Prometheus' text
//! exposition format (version 0.0.4) for `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

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

#[derive(Clone, Debug, Default)]
struct Histogram {
    /// Observations at or below each bound (cumulative when rendered).
    counts: [u64; LATENCY_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| seconds <= b) {
            self.counts[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in LATENCY_BUCKETS.iter().zip(self.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    captions: BTreeMap<&'static str, u64>,
    errors: BTreeMap<&'static str, u64>,
    latency: Histogram,
    ttft: Histogram,
    generated_tokens: u64,
    merged: u64,
    evicted: u64,
    pool_bytes: u64,
    pool_slots: u64,
    cache_entries: u64,
    http_requests: BTreeMap<(&'static str, u16), u64>,
    /// The camera memory's latest figures (`None`: no memory).
    memory: Option<MemoryFigures>,
    memory_frame_latency: Histogram,
    answer_latency: Histogram,
}

/// Every figure `/metrics` shows, behind one lock (held for microseconds).
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
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

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while the lock was held cannot leave these counters
        // inconsistent in a way that matters: keep serving them.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The pool's size, known once the cache is built.
    pub fn set_pool(&self, bytes: u64, slots: usize) {
        let mut inner = self.lock();
        inner.pool_bytes = bytes;
        inner.pool_slots = slots as u64;
    }

    /// A caption done.
    pub fn caption(&self, origin: Origin, figures: &CaptionFigures) {
        let mut inner = self.lock();
        *inner.captions.entry(origin.name()).or_default() += 1;
        inner.latency.observe(figures.caption_ms / 1e3);
        inner.ttft.observe(figures.time_to_first_token_ms / 1e3);
        inner.generated_tokens += figures.tokens as u64;
        inner.merged += figures.merged;
        inner.evicted += figures.evicted;
        inner.pool_bytes = figures.pool_bytes;
        inner.pool_slots = figures.pool_slots as u64;
        inner.cache_entries = figures.cache_entries as u64;
    }

    /// A frame taken into the camera memory (`frame_ms`: its whole step).
    pub fn remembered(&self, frame_ms: f64, figures: &MemoryFigures) {
        let mut inner = self.lock();
        inner.memory_frame_latency.observe(frame_ms / 1e3);
        inner.cache_entries = figures.cache_entries as u64;
        inner.memory = Some(*figures);
    }

    /// A question answered from the camera memory.
    pub fn question(&self, answer_ms: f64, figures: &MemoryFigures) {
        let mut inner = self.lock();
        inner.answer_latency.observe(answer_ms / 1e3);
        inner.cache_entries = figures.cache_entries as u64;
        inner.memory = Some(*figures);
    }

    /// Questions answered from the memory so far.
    pub fn questions(&self) -> u64 {
        self.lock().memory.as_ref().map_or(0, |m| m.questions)
    }

    pub fn error(&self, kind: &'static str) {
        *self.lock().errors.entry(kind).or_default() += 1;
    }

    pub fn http_request(&self, route: &'static str, status: u16) {
        *self.lock().http_requests.entry((route, status)).or_default() += 1;
    }

    /// Captions so far, by origin.
    pub fn captions(&self, origin: Origin) -> u64 {
        self.lock().captions.get(origin.name()).copied().unwrap_or(0)
    }

    pub fn errors(&self, kind: &'static str) -> u64 {
        self.lock().errors.get(kind).copied().unwrap_or(0)
    }

    /// The exposition text. `source` is `None` when no camera is configured,
    /// else its counters and its state's name (one of [`SOURCE_STATES`]).
    pub fn render(&self, source: Option<(GrabberCounters, &str)>, sse_clients: usize, uptime_s: f64) -> String {
        let inner = self.lock();
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, rows: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in rows {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let plain = |v: u64| vec![(String::new(), v.to_string())];

        let figures = source.map(|(f, _)| f).unwrap_or_default();
        metric(
            "elastic_edge_frames_total",
            "counter",
            "Frames delivered by the source.",
            &plain(figures.frames_received),
        );
        metric(
            "elastic_edge_frames_dropped_total",
            "counter",
            "Frames replaced by a newer one before they were captioned (latest frame wins).",
            &plain(figures.frames_dropped),
        );
        metric(
            "elastic_edge_frames_corrupt_total",
            "counter",
            "Frames that could not be decoded.",
            &plain(figures.frames_corrupt),
        );
        metric(
            "elastic_edge_source_losses_total",
            "counter",
            "Times the frame source was lost.",
            &plain(figures.source_losses),
        );
        metric(
            "elastic_edge_source_reconnect_attempts_total",
            "counter",
            "Attempts to reconnect a lost source.",
            &plain(figures.reconnect_attempts),
        );
        let current = source.map(|(_, s)| s);
        metric(
            "elastic_edge_source_state",
            "gauge",
            "The frame source's state (1 for the current one; all 0 without a source).",
            &SOURCE_STATES
                .iter()
                .map(|s| (format!("{{state=\"{s}\"}}"), u64::from(current == Some(*s)).to_string()))
                .collect::<Vec<_>>(),
        );
        let captions: Vec<_> = [Origin::Stream, Origin::Http]
            .iter()
            .map(|o| {
                (
                    format!("{{origin=\"{}\"}}", o.name()),
                    inner.captions.get(o.name()).copied().unwrap_or(0).to_string(),
                )
            })
            .collect();
        metric(
            "elastic_edge_captions_total",
            "counter",
            "Captions generated, by origin (stream: the camera; http: POST /caption).",
            &captions,
        );
        let mut errors: Vec<_> = [kind::CAPTION, kind::IMAGE, kind::OUTPUT, kind::REQUEST]
            .iter()
            .map(|k| {
                (
                    format!("{{kind=\"{k}\"}}"),
                    inner.errors.get(k).copied().unwrap_or(0).to_string(),
                )
            })
            .collect();
        // The grabber's own errors, counted where they happen.
        errors.push(("{kind=\"corrupt_frame\"}".into(), figures.frames_corrupt.to_string()));
        errors.push(("{kind=\"source_lost\"}".into(), figures.source_losses.to_string()));
        metric(
            "elastic_edge_errors_total",
            "counter",
            "Errors, by kind (each is also logged): caption (the model failed), image (a frame or POSTed \
             image did not decode), output (the caption file), request (a bad or oversized POST), \
             corrupt_frame and source_lost (the frame source).",
            &errors,
        );
        metric(
            "elastic_edge_generated_tokens_total",
            "counter",
            "Tokens generated over all captions.",
            &plain(inner.generated_tokens),
        );
        metric(
            "elastic_edge_cache_merged_total",
            "counter",
            "KV entries merged into others by the cache policy, summed over layers.",
            &plain(inner.merged + inner.memory.as_ref().map_or(0, |m| m.merged)),
        );
        metric(
            "elastic_edge_cache_evicted_total",
            "counter",
            "KV entries evicted by the cache policy, summed over layers.",
            &plain(inner.evicted + inner.memory.as_ref().map_or(0, |m| m.evicted)),
        );
        metric(
            "elastic_edge_kv_pool_bytes",
            "gauge",
            "Bytes of the KV pool (fixed at start).",
            &plain(inner.pool_bytes),
        );
        metric(
            "elastic_edge_kv_pool_slots",
            "gauge",
            "Slots of the KV pool (fixed at start).",
            &plain(inner.pool_slots),
        );
        metric(
            "elastic_edge_cache_entries",
            "gauge",
            "KV entries live at the end of the last caption.",
            &plain(inner.cache_entries),
        );
        if let Some(memory) = &inner.memory {
            metric(
                "elastic_edge_memory_frames_total",
                "counter",
                "Frames taken into the camera memory.",
                &plain(memory.frames_seen),
            );
            metric(
                "elastic_edge_memory_frames",
                "gauge",
                "Frames with at least one KV entry left in the memory.",
                &plain(memory.frames_in_memory as u64),
            );
            metric(
                "elastic_edge_memory_questions_total",
                "counter",
                "Questions answered from the memory.",
                &plain(memory.questions),
            );
            metric(
                "elastic_edge_memory_max_position",
                "gauge",
                "The largest position in the memory (kept below the model's max_positions).",
                &plain(memory.max_position as u64),
            );
            metric(
                "elastic_edge_memory_rebases_total",
                "counter",
                "Times the memory's positions were re-based into the model's range.",
                &plain(memory.rebases),
            );
        }
        let requests: Vec<_> = inner
            .http_requests
            .iter()
            .map(|((route, status), n)| (format!("{{route=\"{route}\",status=\"{status}\"}}"), n.to_string()))
            .collect();
        metric(
            "elastic_edge_http_requests_total",
            "counter",
            "HTTP requests answered, by route and status.",
            &requests,
        );
        metric(
            "elastic_edge_sse_clients",
            "gauge",
            "Clients connected to the caption event stream.",
            &plain(sse_clients as u64),
        );
        metric(
            "elastic_edge_uptime_seconds",
            "gauge",
            "Seconds since the service started.",
            &[(String::new(), format!("{uptime_s:.3}"))],
        );
        inner.latency.render(
            &mut out,
            "elastic_edge_caption_latency_seconds",
            "Time to caption one image, from decoding it to the last token.",
        );
        inner.ttft.render(
            &mut out,
            "elastic_edge_time_to_first_token_seconds",
            "Time from the image to the first generated token.",
        );
        if inner.memory.is_some() {
            inner.memory_frame_latency.render(
                &mut out,
                "elastic_edge_memory_frame_seconds",
                "Time to take one frame into the memory (and caption it, with memory.captions).",
            );
            inner.answer_latency.render(
                &mut out,
                "elastic_edge_memory_answer_seconds",
                "Time to answer one question from the memory.",
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        for s in [0.005, 0.02, 0.02, 3.0, 500.0] {
            h.observe(s);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.01\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.025\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"2.5\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"5\"} 4\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"120\"} 4\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("x_count 5\n"), "{out}");
    }

    #[test]
    fn every_sample_line_belongs_to_a_declared_metric() {
        let metrics = Metrics::default();
        metrics.error(kind::OUTPUT);
        metrics.http_request("/healthz", 200);
        let text = metrics.render(
            Some((
                GrabberCounters {
                    frames_received: 9,
                    frames_dropped: 3,
                    frames_corrupt: 1,
                    source_losses: 2,
                    reconnect_attempts: 4,
                },
                "reconnecting",
            )),
            2,
            1.5,
        );
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
        assert!(text.contains("elastic_edge_source_state{state=\"reconnecting\"} 1\n"));
        assert!(text.contains("elastic_edge_source_state{state=\"running\"} 0\n"));
        assert!(text.contains("elastic_edge_errors_total{kind=\"output\"} 1\n"));
        assert!(text.contains("elastic_edge_errors_total{kind=\"source_lost\"} 2\n"));
        assert!(text.contains("elastic_edge_http_requests_total{route=\"/healthz\",status=\"200\"} 1\n"));
    }
}
