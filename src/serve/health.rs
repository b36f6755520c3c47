//! What `GET /healthz` answers and what the watchdog trusts: the captioning
//! thread's heartbeat, the conditions that make the service degraded (the
//! source away, the last caption or output write failing), and the last
//! error of any kind.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::source::GrabberCounters;

/// The last error, of any kind, for the operator.
#[derive(Clone, Debug, Serialize)]
pub struct LastError {
    pub kind: &'static str,
    pub message: String,
    /// Seconds since the Unix epoch.
    pub at: f64,
}

#[derive(Debug)]
struct Inner {
    heartbeat: Instant,
    /// The captioning thread is between captions, not inside one.
    idle: bool,
    last_error: Option<LastError>,
    /// The latest stream caption failed (cleared by the next success).
    caption_failing: Option<String>,
    /// The latest write to the caption file failed (cleared by the next one).
    output_failing: Option<String>,
    last_caption_at: Option<f64>,
    stopping: bool,
}

/// Shared between the captioning thread (which writes) and the HTTP and
/// main threads (which read).
#[derive(Debug)]
pub struct Health {
    inner: Mutex<Inner>,
    started: Instant,
    /// A heartbeat older than this means the captioning thread is stuck.
    stall_after: Duration,
}

/// The source as health sees it: its state's name and why, if not running.
#[derive(Clone, Debug, Serialize)]
pub struct SourceHealth {
    pub spec: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Frames received, dropped, corrupt; losses and reconnection attempts.
    pub counters: GrabberCounters,
}

/// The body of `GET /healthz`.
#[derive(Debug, Serialize)]
pub struct HealthReport {
    /// `ok` or `degraded`.
    pub status: &'static str,
    /// Why it is degraded (empty when ok).
    pub reasons: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceHealth>,
    pub last_error: Option<LastError>,
    pub last_caption_age_s: Option<f64>,
    pub uptime_s: f64,
}

impl HealthReport {
    pub fn ok(&self) -> bool {
        self.reasons.is_empty()
    }
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Health {
    pub fn new(stall_after: Duration) -> Self {
        Health {
            inner: Mutex::new(Inner {
                heartbeat: Instant::now(),
                idle: true,
                last_error: None,
                caption_failing: None,
                output_failing: None,
                last_caption_at: None,
                stopping: false,
            }),
            started: Instant::now(),
            stall_after,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain values, each written whole: usable after a panic elsewhere.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The captioning thread is alive (`idle`: waiting for work).
    pub fn beat(&self, idle: bool) {
        let mut inner = self.lock();
        inner.heartbeat = Instant::now();
        inner.idle = idle;
    }

    /// Whether the captioning thread has beaten within `within`.
    pub fn alive_within(&self, within: Duration) -> bool {
        self.lock().heartbeat.elapsed() <= within
    }

    pub fn error(&self, kind: &'static str, message: &str) {
        self.lock().last_error = Some(LastError {
            kind,
            message: message.to_string(),
            at: unix_now(),
        });
    }

    /// A stream caption's outcome: `Err` keeps health degraded until the
    /// next one succeeds.
    pub fn stream_caption(&self, outcome: Result<(), &str>) {
        let mut inner = self.lock();
        match outcome {
            Ok(()) => {
                inner.caption_failing = None;
                inner.last_caption_at = Some(unix_now());
            }
            Err(message) => inner.caption_failing = Some(message.to_string()),
        }
    }

    pub fn output(&self, outcome: Result<(), &str>) {
        self.lock().output_failing = outcome.err().map(str::to_string);
    }

    pub fn set_stopping(&self) {
        self.lock().stopping = true;
    }

    pub fn report(&self, source: Option<SourceHealth>) -> HealthReport {
        let inner = self.lock();
        let mut reasons = Vec::new();
        if inner.stopping {
            reasons.push("stopping".to_string());
        }
        let since_beat = inner.heartbeat.elapsed();
        if since_beat > self.stall_after {
            reasons.push(format!(
                "the captioning thread has not reported for {:.0} s ({})",
                since_beat.as_secs_f64(),
                if inner.idle { "waiting" } else { "inside a caption" }
            ));
        }
        if let Some(source) = &source {
            // Starting is not degraded: a camera that is not there yet is
            // reported lost (reconnecting) by the grabber.
            if source.state != "running" && source.state != "starting" {
                reasons.push(match &source.detail {
                    Some(detail) => format!("source {}: {detail}", source.state),
                    None => format!("source {}", source.state),
                });
            }
        }
        if let Some(message) = &inner.caption_failing {
            reasons.push(format!("the last caption failed: {message}"));
        }
        if let Some(message) = &inner.output_failing {
            reasons.push(format!("the caption file cannot be written: {message}"));
        }
        let now = unix_now();
        HealthReport {
            status: if reasons.is_empty() { "ok" } else { "degraded" },
            reasons,
            source,
            last_error: inner.last_error.clone(),
            last_caption_age_s: inner.last_caption_at.map(|t| (now - t).max(0.0)),
            uptime_s: self.started.elapsed().as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degraded_while_a_condition_holds() {
        let health = Health::new(Duration::from_secs(60));
        assert!(health.report(None).ok());
        health.output(Err("No space left on device"));
        health.error("output", "No space left on device");
        let report = health.report(None);
        assert_eq!(report.status, "degraded");
        assert!(report.reasons[0].contains("No space left"), "{:?}", report.reasons);
        health.output(Ok(()));
        let report = health.report(None);
        assert!(report.ok());
        assert_eq!(
            report.last_error.unwrap().kind,
            "output",
            "the last error stays visible"
        );

        let source = SourceHealth {
            spec: "cam".into(),
            state: "reconnecting",
            detail: Some("device gone".into()),
            counters: GrabberCounters::default(),
        };
        let report = health.report(Some(source));
        assert_eq!(report.reasons, ["source reconnecting: device gone"]);
    }

    #[test]
    fn a_silent_captioning_thread_is_a_stall() {
        let health = Health::new(Duration::from_millis(20));
        health.beat(false);
        assert!(health.alive_within(Duration::from_secs(1)));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!health.alive_within(Duration::from_millis(20)));
        let report = health.report(None);
        assert!(report.reasons[0].contains("inside a caption"), "{:?}", report.reasons);
    }
}
