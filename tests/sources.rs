//! The library's stream parts with real sources: the grabber over an OS
//! pipe and over GStreamer pipelines, and `stream::run` captioning a folder
//! with the tiny model through a caller's sink (as a service would).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use elastic_edge::error::Error;
use elastic_edge::generate::{GenerateParams, Generator};
use elastic_edge::kv::{KeepRatio, KvCache, KvPool, PolicyConfig, PolicyKind, PoolBacking};
use elastic_edge::model::{LoadOptions, Model};
use elastic_edge::source::pipe::PipeSource;
use elastic_edge::source::{Backoff, Grabber, NextFrame, PipeFormat, SourceOptions, SourceSpec, SourceState, StopFlag};
use elastic_edge::stream::{self, CaptionRecord, CaptionSink, StreamConfig, StreamEnd};
use image::{codecs::jpeg::JpegEncoder, ExtendedColorType, ImageEncoder, Rgb, RgbImage};

fn jpeg(shade: u8) -> Vec<u8> {
    let image = RgbImage::from_pixel(16, 16, Rgb([shade, 0, 0]));
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, 90)
        .write_image(image.as_raw(), 16, 16, ExtendedColorType::Rgb8)
        .unwrap();
    bytes
}

fn quick_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(40),
    }
}

/// Takes frames until the source ends, sleeping `delay` after each.
fn take_all(grabber: &Grabber, delay: Duration) -> Vec<u64> {
    let mut ids = Vec::new();
    loop {
        match grabber.next_frame(Duration::from_secs(30)) {
            NextFrame::Frame(frame) => ids.push(frame.id),
            NextFrame::Ended => return ids,
            other => panic!("{other:?}"),
        }
        std::thread::sleep(delay);
    }
}

#[test]
fn a_pipe_whose_writer_dies_mid_frame_is_lost_retried_and_ends() {
    let (reader, mut writer) = std::io::pipe().unwrap();
    let source = PipeSource::new(reader, PipeFormat::Mjpeg, "pipe:mjpeg".into(), 1 << 20);
    let grabber = Grabber::start(Box::new(source), quick_backoff(), StopFlag::new()).unwrap();
    let frame = jpeg(200);
    let producer = std::thread::spawn(move || {
        for _ in 0..3 {
            writer.write_all(&frame).unwrap();
            std::thread::sleep(Duration::from_millis(30));
        }
        writer.write_all(&frame[..frame.len() / 2]).unwrap();
    });
    let ids = take_all(&grabber, Duration::ZERO);
    producer.join().unwrap();
    assert_eq!(*ids.last().unwrap(), 2, "{ids:?}");
    let status = grabber.finish();
    assert_eq!(status.counters.frames_received, 3);
    assert_eq!(status.counters.frames_dropped + ids.len() as u64, 3);
    assert_eq!(status.state, SourceState::Finished);
    assert_eq!(status.counters.source_losses, 1);
    assert_eq!(status.counters.reconnect_attempts, 1);
    assert!(status.last_frame_unix_ms.is_some());
}

#[test]
fn a_slow_consumer_of_a_pipe_gets_the_newest_frame_and_the_rest_are_counted_dropped() {
    let (reader, mut writer) = std::io::pipe().unwrap();
    let source = PipeSource::new(reader, PipeFormat::Mjpeg, "pipe:mjpeg".into(), 1 << 20);
    let grabber = Grabber::start(Box::new(source), quick_backoff(), StopFlag::new()).unwrap();
    let producer = std::thread::spawn(move || {
        for shade in 0..40u8 {
            writer.write_all(&jpeg(shade)).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let ids = take_all(&grabber, Duration::from_millis(60));
    producer.join().unwrap();
    let counters = grabber.counters();
    assert_eq!(counters.frames_received, 40);
    assert!(ids.len() < 20, "{ids:?}");
    assert_eq!(*ids.last().unwrap(), 39);
    assert_eq!(counters.frames_dropped + ids.len() as u64, 40, "{counters:?} {ids:?}");
}

fn tiny_generator_parts() -> (Model, KvCache) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
    let model = Model::load(
        &dir,
        &LoadOptions {
            threads: Some(1),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let shape = model.manifest.kv_shape();
    let pool = KvPool::with_capacity(shape, 512, &PoolBacking::Anonymous).unwrap();
    let cache = KvCache::new(
        pool,
        PolicyKind::Elastic,
        &PolicyConfig::default(),
        KeepRatio::new(1.0).unwrap(),
    )
    .unwrap();
    (model, cache)
}

fn folder_of_pictures(count: u8) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..count {
        RgbImage::from_pixel(20, 20, Rgb([i * 30, 80, 160]))
            .save(dir.path().join(format!("{i:02}.png")))
            .unwrap();
    }
    dir
}

/// A service-like sink: keeps records, can fail writes and stop the
/// stream.
struct ServiceSink {
    records: Vec<CaptionRecord>,
    fail_writes: bool,
    stop_after: Option<(usize, StopFlag)>,
}

impl CaptionSink for ServiceSink {
    fn on_record(&mut self, record: &CaptionRecord) -> elastic_edge::Result<()> {
        self.records.push(record.clone());
        if let Some((n, stop)) = &self.stop_after {
            if self.records.len() >= *n {
                stop.stop();
            }
        }
        if self.fail_writes {
            return Err(Error::Output {
                target: "test sink".into(),
                source: std::io::Error::other("disk full"),
            });
        }
        Ok(())
    }

    fn on_memory_record(&mut self, record: &stream::MemoryRecord) -> elastic_edge::Result<()> {
        panic!("no memory in these tests: frame {}", record.frame_id)
    }

    fn on_answer(&mut self, record: &stream::AnswerRecord) -> elastic_edge::Result<()> {
        panic!("no memory in these tests: {:?}", record.question)
    }
}

#[test]
fn run_captions_every_interval_through_the_callers_sink_with_one_pool() {
    let (mut model, cache) = tiny_generator_parts();
    let mut generator = Generator::new(&mut model, cache).unwrap();
    let dir = folder_of_pictures(4);
    let stop = StopFlag::new();
    let spec: SourceSpec = format!("dir:{}", dir.path().display()).parse().unwrap();
    let source = spec.open(&SourceOptions::default(), &stop).unwrap();
    let grabber = Grabber::start(source, Backoff::default(), stop.clone()).unwrap();
    let config = StreamConfig {
        every: Duration::from_millis(150),
        params: GenerateParams {
            max_new_tokens: 3,
            ..GenerateParams::default()
        },
        ..StreamConfig::default()
    };
    let mut sink = ServiceSink {
        records: Vec::new(),
        fail_writes: false,
        stop_after: None,
    };
    let started = Instant::now();
    let summary = stream::run(&mut generator, &grabber, &config, &stop, &mut sink).unwrap();
    assert_eq!(summary.end, StreamEnd::SourceEnded);
    assert_eq!(summary.counters.captions, 4);
    assert_eq!(summary.counters.source.frames_received, 4);
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "three intervals of 150 ms"
    );
    let ids: Vec<u64> = sink.records.iter().map(|r| r.frame_id).collect();
    assert_eq!(ids, [0, 1, 2, 3]);
    assert!(sink
        .records
        .iter()
        .all(|r| r.result.pool_slots == 512 && r.result.policy == PolicyKind::Elastic));
    assert_eq!(sink.records[3].counters.captions, 4);
    let json = serde_json::to_value(&sink.records[0]).unwrap();
    for key in [
        "time",
        "unix_ms",
        "frame_id",
        "frame_time",
        "caption",
        "timings_ms",
        "cache_entries",
        "counters",
    ] {
        assert!(json.get(key).is_some(), "{key}: {json}");
    }
    assert_eq!(json["counters"]["frames_dropped"], 0);
}

#[test]
fn sink_errors_are_counted_and_the_stop_flag_ends_after_the_caption_in_flight() {
    let (mut model, cache) = tiny_generator_parts();
    let mut generator = Generator::new(&mut model, cache).unwrap();
    let dir = folder_of_pictures(3);
    let stop = StopFlag::new();
    let spec: SourceSpec = format!("dir:{}", dir.path().display()).parse().unwrap();
    let options = SourceOptions {
        looping: true,
        ..SourceOptions::default()
    };
    let source = spec.open(&options, &stop).unwrap();
    let grabber = Grabber::start(source, Backoff::default(), stop.clone()).unwrap();
    let mut sink = ServiceSink {
        records: Vec::new(),
        fail_writes: true,
        stop_after: Some((5, stop.clone())),
    };
    let summary = stream::run(&mut generator, &grabber, &StreamConfig::default(), &stop, &mut sink).unwrap();
    assert_eq!(summary.end, StreamEnd::Stopped);
    assert_eq!(
        summary.counters.captions, 5,
        "the caption in flight finished, no other started"
    );
    assert_eq!(summary.counters.output_errors, 5);
    assert_eq!(
        sink.records[4].counters.output_errors, 4,
        "a record carries the errors before it"
    );
    assert_eq!(grabber.finish().state, SourceState::Stopped);
}

#[test]
fn an_empty_prompt_fails_at_the_start() {
    let (mut model, cache) = tiny_generator_parts();
    let mut generator = Generator::new(&mut model, cache).unwrap();
    let dir = folder_of_pictures(1);
    let stop = StopFlag::new();
    let spec = SourceSpec::Dir(dir.path().into());
    let grabber = Grabber::start(
        spec.open(&SourceOptions::default(), &stop).unwrap(),
        Backoff::default(),
        stop.clone(),
    )
    .unwrap();
    let config = StreamConfig {
        prompt: Some("  ".into()),
        ..StreamConfig::default()
    };
    let mut records = 0;
    let mut sink = |_: stream::StreamRecord<'_>| -> elastic_edge::Result<()> {
        records += 1;
        Ok(())
    };
    let err = stream::run(&mut generator, &grabber, &config, &stop, &mut sink).unwrap_err();
    assert!(err.to_string().contains("empty prompt"), "{err}");
    assert_eq!(records, 0);
}

#[cfg(feature = "gstreamer")]
mod gstreamer_grabber {
    use super::*;

    fn open(pipeline: &str, stop: &StopFlag) -> Box<dyn elastic_edge::source::FrameSource> {
        SourceSpec::Gst(pipeline.into())
            .open(&SourceOptions::default(), stop)
            .unwrap()
    }

    #[test]
    fn a_slow_consumer_of_videotestsrc_drops_frames_and_they_are_counted() {
        let stop = StopFlag::new();
        let source = open(
            "videotestsrc num-buffers=45 ! video/x-raw,width=32,height=24,framerate=30/1 ! videoconvert ! appsink",
            &stop,
        );
        let grabber = Grabber::start(source, quick_backoff(), stop).unwrap();
        let ids = take_all(&grabber, Duration::from_millis(150));
        let status = grabber.finish();
        assert_eq!(status.state, SourceState::Finished);
        assert_eq!(status.counters.frames_received, 45);
        assert!(
            status.counters.frames_dropped >= 15,
            "1.5 s of 30 fps video, a frame taken every 150 ms: {status:?}"
        );
        assert_eq!(status.counters.frames_dropped + ids.len() as u64, 45, "{status:?}");
        assert_eq!(*ids.last().unwrap(), 44);
    }

    #[test]
    fn a_missing_camera_shows_reconnecting_with_its_error_until_stopped() {
        let stop = StopFlag::new();
        let source = open("v4l2src device=/dev/video-missing ! videoconvert ! appsink", &stop);
        let grabber = Grabber::start(source, quick_backoff(), stop.clone()).unwrap();
        let monitor = grabber.monitor();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            let status = monitor.status();
            if matches!(status.state, SourceState::Reconnecting { attempt, .. } if attempt >= 3) {
                break status;
            }
            assert!(Instant::now() < deadline, "{status:?}");
            std::thread::sleep(Duration::from_millis(10));
        };
        let SourceState::Reconnecting {
            last_error,
            retry_in_ms,
            ..
        } = &status.state
        else {
            unreachable!()
        };
        assert!(
            last_error.contains("Cannot identify device '/dev/video-missing'"),
            "{last_error}"
        );
        assert_eq!(*retry_in_ms, 40, "20 ms doubling, capped at 40");
        assert_eq!(status.counters.source_losses, 1);
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["state"], "reconnecting");
        assert!(json["attempt"].as_u64().unwrap() >= 3);
        stop.stop();
        assert!(matches!(grabber.next_frame(Duration::from_secs(1)), NextFrame::Stopped));
        assert_eq!(grabber.finish().state, SourceState::Stopped);
    }

    #[test]
    fn stopping_interrupts_a_pipeline_waiting_for_frames() {
        let stop = StopFlag::new();
        // A live source at one frame every 10 s (the first comes after its
        // 10 s latency): the grabber waits inside GStreamer.
        let source = open(
            "videotestsrc is-live=true ! video/x-raw,width=16,height=16,framerate=1/10 ! videoconvert ! appsink",
            &stop,
        );
        let grabber = Grabber::start(source, quick_backoff(), stop.clone()).unwrap();
        assert!(matches!(
            grabber.next_frame(Duration::from_millis(500)),
            NextFrame::TimedOut
        ));
        assert_eq!(grabber.status().state, SourceState::Starting);
        let started = Instant::now();
        stop.stop();
        assert_eq!(grabber.finish().state, SourceState::Stopped);
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    }
}
