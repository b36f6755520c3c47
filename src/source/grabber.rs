//! Latest frame wins: a source runs on its own thread and only its newest
//! frame is kept, in a single slot, so a slow consumer never makes a queue
//! grow. A frame overwritten before it was taken is counted as dropped.
//! A lost live source is reconnected with capped exponential backoff, and
//! the state (running, reconnecting with the last error, ended) can be read
//! from any thread through a [`GrabberMonitor`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Frame, FrameSource, StopFlag};
use crate::error::{error_chain, Error, Result, SourceFailure};

/// How long to wait before each reconnection attempt: `initial`, doubling
/// per failed attempt, at most `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The wait before attempt `attempt` (1 for the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.initial.saturating_mul(1 << doublings).min(self.max)
    }
}

/// What the source is doing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SourceState {
    /// Opened, no frame yet.
    Starting,
    /// Delivering frames.
    Running,
    /// Lost; waiting to try again.
    Reconnecting {
        /// Failed attempts since the last frame (1 for the first wait).
        attempt: u32,
        last_error: String,
        /// The wait before this attempt.
        retry_in_ms: u64,
    },
    /// A finite source reached its end.
    Finished,
    /// Stopped by its stop flag.
    Stopped,
    /// Stopped by an error retrying cannot fix.
    Failed { error: String },
    /// A live source that has delivered nothing (no frame, not even a
    /// corrupt one) for [`SILENT_AFTER`] while it was starting or running:
    /// lost, as "no frame for 10 s" is documented, although a source
    /// blocked in a read (standard input) cannot be retried until the read
    /// returns. Back to running with the next frame.
    Silent {
        /// Since the last sign of life (or the start).
        no_frame_for_ms: u64,
    },
}

/// A live source silent this long reads as [`SourceState::Silent`] (the
/// same as [`SourceOptions`](super::SourceOptions)' default stall timeout,
/// after which a GStreamer source reports itself lost).
pub const SILENT_AFTER: Duration = Duration::from_secs(10);

impl SourceState {
    /// Whether no more frames will come.
    pub fn is_ended(&self) -> bool {
        matches!(
            self,
            SourceState::Finished | SourceState::Stopped | SourceState::Failed { .. }
        )
    }
}

/// What the grabber counted since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GrabberCounters {
    /// Frames the source delivered.
    pub frames_received: u64,
    /// Frames overwritten in the slot before anyone took them.
    pub frames_dropped: u64,
    /// Frames that could not be decoded, skipped.
    pub frames_corrupt: u64,
    /// Times a source that was delivering (or starting) was lost.
    pub source_losses: u64,
    /// Reconnection attempts, successful or not.
    pub reconnect_attempts: u64,
}

/// A snapshot for a health endpoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GrabberStatus {
    pub spec: String,
    pub live: bool,
    #[serde(flatten)]
    pub state: SourceState,
    pub counters: GrabberCounters,
    /// When the last frame arrived (unix milliseconds), if one did.
    pub last_frame_unix_ms: Option<u64>,
}

/// What [`Grabber::next_frame`] found.
#[derive(Debug)]
pub enum NextFrame {
    /// The newest frame (taken: the next call waits for a newer one).
    Frame(Frame),
    /// The source ended and every frame was taken.
    Ended,
    /// The stop flag was set.
    Stopped,
    /// Nothing new within the timeout.
    TimedOut,
}

/// Runs a source on its own thread, keeping its newest frame.
pub struct Grabber {
    shared: Arc<Shared>,
    stop: StopFlag,
    thread: Option<JoinHandle<()>>,
}

/// A handle for reading a grabber's status from other threads.
#[derive(Clone)]
pub struct GrabberMonitor {
    shared: Arc<Shared>,
}

struct Shared {
    spec: String,
    live: bool,
    slot: Mutex<Slot>,
    /// Signalled when a frame is put in or taken out, or the source ends.
    slot_changed: Condvar,
    state: Mutex<SourceState>,
    frames_received: AtomicU64,
    frames_dropped: AtomicU64,
    frames_corrupt: AtomicU64,
    source_losses: AtomicU64,
    reconnect_attempts: AtomicU64,
    /// 0 until the first frame.
    last_frame_unix_ms: AtomicU64,
    /// When the grabber started; `progress_ms` counts from it.
    started: Instant,
    /// The last time the source answered (a frame, a corrupt frame, an
    /// error, a reconnection), in milliseconds since `started`.
    progress_ms: AtomicU64,
    /// Set when the `Grabber` is dropped, to end the thread without setting
    /// the caller's stop flag.
    quit: AtomicBool,
}

struct Slot {
    frame: Option<Frame>,
    ended: bool,
}

/// How often waits look at the stop flag (a signal handler can only set an
/// atomic, it cannot notify a condition variable).
const POLL: Duration = Duration::from_millis(20);

/// How long dropping a grabber waits for its thread; a source blocked in a
/// read (standard input) cannot be interrupted, and its thread is left to
/// end with the process.
const JOIN_GRACE: Duration = Duration::from_secs(2);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent, so a panic
    // elsewhere while holding the lock does not invalidate it.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Grabber {
    /// Starts reading `source` on a thread until it ends or `stop` is set.
    /// A live source's unread frame is overwritten by the next (counted as
    /// dropped); a file source waits until its frame is taken.
    pub fn start(source: Box<dyn FrameSource>, backoff: Backoff, stop: StopFlag) -> Result<Grabber> {
        let shared = Arc::new(Shared {
            spec: source.spec().to_string(),
            live: source.is_live(),
            slot: Mutex::new(Slot {
                frame: None,
                ended: false,
            }),
            slot_changed: Condvar::new(),
            state: Mutex::new(SourceState::Starting),
            frames_received: AtomicU64::new(0),
            frames_dropped: AtomicU64::new(0),
            frames_corrupt: AtomicU64::new(0),
            source_losses: AtomicU64::new(0),
            reconnect_attempts: AtomicU64::new(0),
            last_frame_unix_ms: AtomicU64::new(0),
            started: Instant::now(),
            progress_ms: AtomicU64::new(0),
            quit: AtomicBool::new(false),
        });
        let thread_shared = Arc::clone(&shared);
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("frame-grabber".into())
            .spawn(move || {
                let mut source = source;
                let end = thread_shared.run(source.as_mut(), backoff, &thread_stop);
                match &end {
                    SourceState::Failed { error } => log::error!("source {}: {error}", thread_shared.spec),
                    SourceState::Finished => log::info!("source {}: finished", thread_shared.spec),
                    _ => {}
                }
                *lock(&thread_shared.state) = end;
                lock(&thread_shared.slot).ended = true;
                thread_shared.slot_changed.notify_all();
            })
            .map_err(|source| Error::Thread {
                what: "frame grabber",
                source,
            })?;
        Ok(Grabber {
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Waits up to `timeout` for a frame newer than the last one taken.
    pub fn next_frame(&self, timeout: Duration) -> NextFrame {
        let shared = &*self.shared;
        let deadline = Instant::now() + timeout;
        let mut slot = lock(&shared.slot);
        loop {
            if self.stop.is_stopped() {
                return NextFrame::Stopped;
            }
            if let Some(frame) = slot.frame.take() {
                // A file source waits for the slot to empty.
                shared.slot_changed.notify_all();
                return NextFrame::Frame(frame);
            }
            if slot.ended {
                return NextFrame::Ended;
            }
            let now = Instant::now();
            if now >= deadline {
                return NextFrame::TimedOut;
            }
            slot = shared
                .slot_changed
                .wait_timeout(slot, POLL.min(deadline - now))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// A handle to read the status from another thread.
    pub fn monitor(&self) -> GrabberMonitor {
        GrabberMonitor {
            shared: Arc::clone(&self.shared),
        }
    }

    pub fn status(&self) -> GrabberStatus {
        self.shared.status()
    }

    pub fn counters(&self) -> GrabberCounters {
        self.shared.counters()
    }

    /// Stops the thread (without setting the caller's stop flag) and waits
    /// briefly for it; returns the final status.
    pub fn finish(mut self) -> GrabberStatus {
        self.shut_down();
        self.shared.status()
    }

    fn shut_down(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        self.shared.slot_changed.notify_all();
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + JOIN_GRACE;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        if thread.is_finished() {
            if thread.join().is_err() {
                log::error!("source {}: the grabber thread panicked", self.shared.spec);
            }
        } else {
            log::warn!(
                "source {}: the grabber is blocked reading its source; leaving it to end with the process",
                self.shared.spec
            );
        }
    }
}

impl Drop for Grabber {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl GrabberMonitor {
    pub fn status(&self) -> GrabberStatus {
        self.shared.status()
    }

    pub fn counters(&self) -> GrabberCounters {
        self.shared.counters()
    }
}

impl Shared {
    fn status(&self) -> GrabberStatus {
        let last = self.last_frame_unix_ms.load(Ordering::SeqCst);
        let mut state = lock(&self.state).clone();
        if self.live && matches!(state, SourceState::Starting | SourceState::Running) {
            let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let silent_ms = now_ms.saturating_sub(self.progress_ms.load(Ordering::SeqCst));
            if u128::from(silent_ms) > SILENT_AFTER.as_millis() {
                state = SourceState::Silent {
                    no_frame_for_ms: silent_ms,
                };
            }
        }
        GrabberStatus {
            spec: self.spec.clone(),
            live: self.live,
            state,
            counters: self.counters(),
            last_frame_unix_ms: (last > 0).then_some(last),
        }
    }

    fn counters(&self) -> GrabberCounters {
        GrabberCounters {
            frames_received: self.frames_received.load(Ordering::SeqCst),
            frames_dropped: self.frames_dropped.load(Ordering::SeqCst),
            frames_corrupt: self.frames_corrupt.load(Ordering::SeqCst),
            source_losses: self.source_losses.load(Ordering::SeqCst),
            reconnect_attempts: self.reconnect_attempts.load(Ordering::SeqCst),
        }
    }

    fn stopping(&self, stop: &StopFlag) -> bool {
        stop.is_stopped() || self.quit.load(Ordering::SeqCst)
    }

    fn set_state(&self, state: SourceState) {
        *lock(&self.state) = state;
    }

    /// The source answered: it is not silent.
    fn progress(&self) {
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.progress_ms.store(now_ms, Ordering::SeqCst);
    }

    /// Sleeps, waking early to stop; returns whether to stop.
    fn sleep(&self, duration: Duration, stop: &StopFlag) -> bool {
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            if self.stopping(stop) {
                return true;
            }
            std::thread::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())));
        }
        self.stopping(stop)
    }

    /// The thread's loop; returns the final state.
    fn run(&self, source: &mut dyn FrameSource, backoff: Backoff, stop: &StopFlag) -> SourceState {
        // Failed attempts since the last frame: sets the backoff.
        let mut failures = 0u32;
        let mut last_error = String::new();
        let mut lost = false;
        loop {
            if self.stopping(stop) {
                return SourceState::Stopped;
            }
            if lost {
                let delay = backoff.delay(failures);
                self.set_state(SourceState::Reconnecting {
                    attempt: failures,
                    last_error: last_error.clone(),
                    retry_in_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                });
                // The error names the source.
                log::warn!(
                    "{last_error}; reconnecting in {:.1} s (attempt {failures})",
                    delay.as_secs_f64()
                );
                if self.sleep(delay, stop) {
                    return SourceState::Stopped;
                }
                self.reconnect_attempts.fetch_add(1, Ordering::SeqCst);
                let reconnected = source.reconnect();
                self.progress();
                match reconnected {
                    Ok(()) => lost = false,
                    Err(err) if err.source_failure() == SourceFailure::Lost => {
                        failures = failures.saturating_add(1);
                        last_error = error_chain(&err);
                        continue;
                    }
                    Err(err) => {
                        return SourceState::Failed {
                            error: error_chain(&err),
                        }
                    }
                }
            }
            let next = source.next_frame();
            self.progress();
            match next {
                Ok(Some(frame)) => {
                    if failures > 0 {
                        log::warn!("source {}: back after {failures} failed attempt(s)", self.spec);
                        failures = 0;
                    }
                    self.frames_received.fetch_add(1, Ordering::SeqCst);
                    self.last_frame_unix_ms
                        .store(unix_ms(frame.captured_at).max(1), Ordering::SeqCst);
                    {
                        let mut state = lock(&self.state);
                        if *state != SourceState::Running {
                            *state = SourceState::Running;
                        }
                    }
                    if self.publish(frame, stop) {
                        return SourceState::Stopped;
                    }
                }
                // A source blocked on a live feed returns None when asked to stop.
                Ok(None) if self.stopping(stop) => return SourceState::Stopped,
                Ok(None) => return SourceState::Finished,
                Err(err) => match err.source_failure() {
                    SourceFailure::CorruptFrame => {
                        self.frames_corrupt.fetch_add(1, Ordering::SeqCst);
                        log::warn!("{} (skipped)", error_chain(&err));
                    }
                    SourceFailure::Lost => {
                        if failures == 0 {
                            self.source_losses.fetch_add(1, Ordering::SeqCst);
                        }
                        failures = failures.saturating_add(1);
                        last_error = error_chain(&err);
                        lost = true;
                    }
                    SourceFailure::Fatal => {
                        return SourceState::Failed {
                            error: error_chain(&err),
                        }
                    }
                },
            }
        }
    }

    /// Puts a frame in the slot. A live source overwrites an untaken frame
    /// (counted as dropped); a file source waits for the slot to empty.
    /// Returns whether to stop.
    fn publish(&self, frame: Frame, stop: &StopFlag) -> bool {
        let mut slot = lock(&self.slot);
        if !self.live {
            while slot.frame.is_some() {
                if self.stopping(stop) {
                    return true;
                }
                slot = self
                    .slot_changed
                    .wait_timeout(slot, POLL)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        if slot.frame.replace(frame).is_some() {
            self.frames_dropped.fetch_add(1, Ordering::SeqCst);
        }
        drop(slot);
        self.slot_changed.notify_all();
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbImage;
    use std::collections::VecDeque;

    /// A source that plays a script of results (a stand-in for a camera's
    /// behaviour, to test the grabber's own logic: its counting, backoff
    /// and states), pausing `interval` before each.
    struct Scripted {
        script: VecDeque<Result<Option<()>>>,
        next_id: u64,
        interval: Duration,
        live: bool,
        reconnects: Arc<AtomicU64>,
    }

    impl FrameSource for Scripted {
        fn next_frame(&mut self) -> Result<Option<Frame>> {
            std::thread::sleep(self.interval);
            match self.script.pop_front() {
                None | Some(Ok(None)) => Ok(None),
                Some(Ok(Some(()))) => {
                    self.next_id += 1;
                    Ok(Some(Frame::new(self.next_id - 1, RgbImage::new(2, 2), None)))
                }
                Some(Err(e)) => Err(e),
            }
        }
        fn reconnect(&mut self) -> Result<()> {
            self.reconnects.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn is_live(&self) -> bool {
            self.live
        }
        fn spec(&self) -> &str {
            "scripted"
        }
    }

    fn frames(n: usize) -> Vec<Result<Option<()>>> {
        (0..n).map(|_| Ok(Some(()))).collect()
    }

    fn lost() -> Result<Option<()>> {
        Err(Error::SourceLost {
            spec: "scripted".into(),
            reason: "unplugged".into(),
        })
    }

    fn corrupt() -> Result<Option<()>> {
        Err(Error::FrameCorrupt {
            spec: "scripted".into(),
            frame: "#?".into(),
            reason: "bad bytes".into(),
        })
    }

    fn scripted(script: Vec<Result<Option<()>>>, interval: Duration, live: bool) -> (Box<Scripted>, Arc<AtomicU64>) {
        let reconnects = Arc::new(AtomicU64::new(0));
        let source = Scripted {
            script: script.into(),
            next_id: 0,
            interval,
            live,
            reconnects: Arc::clone(&reconnects),
        };
        (Box::new(source), reconnects)
    }

    fn take_all(grabber: &Grabber, consumer_delay: Duration) -> Vec<u64> {
        let mut ids = Vec::new();
        loop {
            match grabber.next_frame(Duration::from_secs(10)) {
                NextFrame::Frame(frame) => ids.push(frame.id),
                NextFrame::Ended => return ids,
                other => panic!("{other:?}"),
            }
            std::thread::sleep(consumer_delay);
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let delays: Vec<u128> = (1..=6).map(|a| backoff.delay(a).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn a_slow_consumer_of_a_live_source_gets_the_newest_frames_and_drops_are_counted() {
        let (source, _) = scripted(frames(40), Duration::from_millis(5), true);
        let grabber = Grabber::start(source, Backoff::default(), StopFlag::new()).unwrap();
        let ids = take_all(&grabber, Duration::from_millis(40));
        let counters = grabber.counters();
        assert_eq!(counters.frames_received, 40);
        assert!(
            ids.len() < 20,
            "a 40 ms consumer of a 5 ms source takes few frames: {ids:?}"
        );
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert_eq!(*ids.last().unwrap(), 39, "the last frame is not lost");
        assert_eq!(
            counters.frames_dropped,
            40 - ids.len() as u64,
            "every frame is taken or dropped"
        );
        assert_eq!(grabber.status().state, SourceState::Finished);
    }

    #[test]
    fn a_file_source_waits_for_its_consumer() {
        let (source, _) = scripted(frames(10), Duration::ZERO, false);
        let grabber = Grabber::start(source, Backoff::default(), StopFlag::new()).unwrap();
        assert_eq!(
            take_all(&grabber, Duration::from_millis(5)),
            (0..10).collect::<Vec<_>>()
        );
        assert_eq!(grabber.counters().frames_dropped, 0);
    }

    #[test]
    fn corrupt_frames_are_skipped_and_losses_reconnect_with_backoff() {
        let mut script = frames(2);
        script.push(corrupt());
        script.extend(frames(1));
        script.extend([lost(), lost(), lost()]);
        script.extend(frames(2));
        script.push(lost());
        script.extend(frames(1));
        let (source, reconnects) = scripted(script, Duration::ZERO, false);
        let backoff = Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(50),
        };
        let started = Instant::now();
        let grabber = Grabber::start(source, backoff, StopFlag::new()).unwrap();
        assert_eq!(take_all(&grabber, Duration::ZERO), (0..6).collect::<Vec<_>>());
        let counters = grabber.counters();
        assert_eq!(counters.frames_corrupt, 1);
        assert_eq!(counters.source_losses, 2, "three failures in a row are one loss");
        assert_eq!(counters.reconnect_attempts, 4);
        assert_eq!(reconnects.load(Ordering::SeqCst), 4);
        // Waits 20 + 40 + 50 (capped) for the first loss, 20 for the second.
        assert!(
            started.elapsed() >= Duration::from_millis(130),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn the_state_shows_reconnection_and_the_stop_flag_ends_it() {
        let (source, _) = scripted((0..1000).map(|_| lost()).collect(), Duration::ZERO, true);
        let stop = StopFlag::new();
        let backoff = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(10),
        };
        let grabber = Grabber::start(source, backoff, stop.clone()).unwrap();
        let monitor = grabber.monitor();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let SourceState::Reconnecting {
                attempt, last_error, ..
            } = monitor.status().state
            {
                if attempt >= 3 {
                    assert!(last_error.contains("unplugged"), "{last_error}");
                    break;
                }
            }
            assert!(Instant::now() < deadline, "{:?}", monitor.status());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(monitor.counters().source_losses, 1);
        stop.stop();
        assert!(matches!(grabber.next_frame(Duration::from_secs(1)), NextFrame::Stopped));
        let status = grabber.finish();
        assert_eq!(status.state, SourceState::Stopped);
        let json = serde_json::to_value(monitor.status()).unwrap();
        assert_eq!(json["state"], "stopped");
        assert_eq!(json["counters"]["source_losses"], 1);
    }

    #[test]
    fn a_fatal_error_ends_the_source_with_it() {
        let fatal = Err(Error::SourceConfig {
            spec: "scripted".into(),
            reason: "gone for good".into(),
        });
        let (source, _) = scripted(vec![Ok(Some(())), fatal], Duration::ZERO, true);
        let grabber = Grabber::start(source, Backoff::default(), StopFlag::new()).unwrap();
        assert_eq!(take_all(&grabber, Duration::ZERO), vec![0]);
        match grabber.status().state {
            SourceState::Failed { error } => assert!(error.contains("gone for good"), "{error}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn dropping_the_grabber_ends_its_thread_without_setting_the_callers_flag() {
        let (source, _) = scripted((0..1000).map(|_| lost()).collect(), Duration::ZERO, true);
        let stop = StopFlag::new();
        let grabber = Grabber::start(source, Backoff::default(), stop.clone()).unwrap();
        let monitor = grabber.monitor();
        let status = grabber.finish();
        assert_eq!(status.state, SourceState::Stopped);
        assert_eq!(monitor.status().state, SourceState::Stopped);
        assert!(!stop.is_stopped());
    }
}
