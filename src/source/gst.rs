//! GStreamer pipelines as frame sources (cargo feature `gstreamer`).
//!
//! The pipeline string must end in an `appsink` (one without gets
//! `! videoconvert ! appsink` appended). We set RGB caps on that appsink,
//! so the pipeline must be able to produce RGB there (a `videoconvert`
//! before it does), and keep at most one buffer in it (`max-buffers=1
//! drop=true`) so GStreamer queues nothing either. A string GStreamer
//! cannot parse, or one naming an element that is not installed, is a
//! configuration error. Everything that goes wrong while playing (a
//! camera that is not there or unplugged, a stream that errors, no frame
//! for `stall_timeout`) loses the source; reconnecting builds the pipeline
//! again from its string. End of stream ends a file pipeline; a live
//! pipeline (a camera) that ends is lost, since a robot's camera should
//! not stop.

use std::time::Instant;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use image::RgbImage;

use super::{Frame, FrameSource, SourceOptions, StopFlag};
use crate::error::{Error, Result};

/// How long one wait for a sample lasts before the stop flag and the bus
/// are looked at again.
const PULL_TIMEOUT_MS: u64 = 100;

/// Frames from a GStreamer pipeline.
pub struct GstSource {
    /// The pipeline as given (after `gst:`).
    description: String,
    spec: String,
    pipeline: gst::Pipeline,
    appsink: gst_app::AppSink,
    /// Set once the pipeline was put in PLAYING.
    playing: bool,
    /// Whether PLAYING said the pipeline is live (no preroll).
    live_pipeline: bool,
    /// When the pipeline was started or last gave a frame.
    last_progress: Instant,
    options: SourceOptions,
    stop: StopFlag,
    next_id: u64,
}

impl GstSource {
    /// Parses the pipeline (a parse error is a configuration error); it is
    /// started by the first `next_frame`.
    pub fn open(description: &str, options: &SourceOptions, stop: StopFlag) -> Result<GstSource> {
        let spec = format!("gst:{description}");
        gst::init().map_err(|e| Error::SourceConfig {
            spec: spec.clone(),
            reason: format!("GStreamer cannot start: {e}"),
        })?;
        let (pipeline, appsink) = build(description, &spec)?;
        Ok(GstSource {
            description: description.to_string(),
            spec,
            pipeline,
            appsink,
            playing: false,
            live_pipeline: false,
            last_progress: Instant::now(),
            options: options.clone(),
            stop,
            next_id: 0,
        })
    }

    fn lost(&self, reason: String) -> Error {
        Error::SourceLost {
            spec: self.spec.clone(),
            reason,
        }
    }

    /// The first error (or end of stream) waiting on the bus, as a loss.
    fn bus_error(&self) -> Option<Error> {
        let bus = self.pipeline.bus()?;
        let message = bus.pop_filtered(&[gst::MessageType::Error])?;
        match message.view() {
            gst::MessageView::Error(err) => {
                let element = err
                    .src()
                    .map(|s| s.path_string().to_string())
                    .unwrap_or_else(|| "the pipeline".into());
                // GStreamer's debug text spans lines; logs want one.
                let debug = err
                    .debug()
                    .map(|d| format!(" ({})", d.split_whitespace().collect::<Vec<_>>().join(" ")))
                    .unwrap_or_default();
                Some(self.lost(format!("{element}: {}{debug}", err.error())))
            }
            _ => None,
        }
    }

    fn start(&mut self) -> Result<()> {
        match self.pipeline.set_state(gst::State::Playing) {
            Ok(success) => {
                self.playing = true;
                self.live_pipeline = success == gst::StateChangeSuccess::NoPreroll;
                self.last_progress = Instant::now();
                Ok(())
            }
            Err(_) => {
                let err = self
                    .bus_error()
                    .unwrap_or_else(|| self.lost("the pipeline refused to start playing".into()));
                // Release the device for the next attempt.
                let _ = self.pipeline.set_state(gst::State::Null);
                Err(err)
            }
        }
    }

    fn frame_from_sample(&mut self, sample: &gst::Sample) -> Result<Frame> {
        let corrupt = |reason: String| Error::FrameCorrupt {
            spec: self.spec.clone(),
            frame: format!("#{}", self.next_id),
            reason,
        };
        let caps = sample.caps().ok_or_else(|| corrupt("a sample without caps".into()))?;
        let info = gst_video::VideoInfo::from_caps(caps).map_err(|e| corrupt(format!("caps {caps}: {e}")))?;
        if info.format() != gst_video::VideoFormat::Rgb {
            return Err(corrupt(format!("the appsink got {:?}, not RGB", info.format())));
        }
        let (width, height) = (info.width(), info.height());
        let pixels = u64::from(width) * u64::from(height);
        if pixels == 0 || pixels > self.options.max_pixels {
            return Err(corrupt(format!(
                "a {width}x{height} frame (limit {} pixels)",
                self.options.max_pixels
            )));
        }
        let buffer = sample
            .buffer()
            .ok_or_else(|| corrupt("a sample without a buffer".into()))?;
        let map = buffer
            .map_readable()
            .map_err(|e| corrupt(format!("cannot map the buffer: {e}")))?;
        let data = map.as_slice();
        let row = width as usize * 3;
        let stride = usize::try_from(info.stride()[0]).map_err(|_| corrupt("a negative stride".into()))?;
        let offset = info.offset()[0];
        let needed = offset + stride * (height as usize - 1) + row;
        if stride < row || data.len() < needed {
            return Err(corrupt(format!(
                "a {}-byte buffer for {width}x{height} RGB with stride {stride}",
                data.len()
            )));
        }
        // Rows are padded to 4 bytes in GStreamer's RGB: copy row by row.
        let mut pixels = Vec::with_capacity(row * height as usize);
        for y in 0..height as usize {
            let start = offset + y * stride;
            pixels.extend_from_slice(&data[start..start + row]);
        }
        let image = RgbImage::from_raw(width, height, pixels).ok_or_else(|| corrupt("pixel count mismatch".into()))?;
        let frame = Frame::new(self.next_id, image, None);
        self.next_id += 1;
        Ok(frame)
    }
}

impl FrameSource for GstSource {
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        if !self.playing {
            self.start()?;
        }
        loop {
            if self.stop.is_stopped() {
                return Ok(None);
            }
            if let Some(err) = self.bus_error() {
                return Err(err);
            }
            if let Some(sample) = self
                .appsink
                .try_pull_sample(gst::ClockTime::from_mseconds(PULL_TIMEOUT_MS))
            {
                self.last_progress = Instant::now();
                return self.frame_from_sample(&sample).map(Some);
            }
            if self.appsink.is_eos() {
                // An error makes the sink EOS too: report it rather than an end.
                if let Some(err) = self.bus_error() {
                    return Err(err);
                }
                if self.live_pipeline {
                    return Err(self.lost("the live pipeline ended (end of stream)".into()));
                }
                return Ok(None);
            }
            if self.last_progress.elapsed() > self.options.stall_timeout {
                return Err(self.lost(format!(
                    "no frame for {:.1} s",
                    self.options.stall_timeout.as_secs_f64()
                )));
            }
        }
    }

    fn reconnect(&mut self) -> Result<()> {
        let _ = self.pipeline.set_state(gst::State::Null);
        let (pipeline, appsink) = build(&self.description, &self.spec)?;
        self.pipeline = pipeline;
        self.appsink = appsink;
        self.playing = false;
        self.start()
    }

    fn is_live(&self) -> bool {
        // Frames come at the pipeline's pace (a file plays at its frame rate).
        true
    }

    fn spec(&self) -> &str {
        &self.spec
    }
}

impl Drop for GstSource {
    fn drop(&mut self) {
        // Frees the camera.
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// Parses the pipeline and sets up its appsink.
fn build(description: &str, spec: &str) -> Result<(gst::Pipeline, gst_app::AppSink)> {
    let config_error = |reason: String| Error::SourceConfig {
        spec: spec.to_string(),
        reason,
    };
    let pipeline = parse(description).map_err(|e| config_error(format!("GStreamer cannot parse the pipeline: {e}")))?;
    let (pipeline, appsink) = match find_appsink(&pipeline) {
        Some(appsink) => (pipeline, appsink),
        None => {
            let extended = format!("{description} ! videoconvert ! appsink");
            let pipeline = parse(&extended).map_err(|e| {
                config_error(format!(
                    "the pipeline has no appsink, and appending '! videoconvert ! appsink' fails: {e}"
                ))
            })?;
            let appsink = find_appsink(&pipeline).ok_or_else(|| config_error("the pipeline has no appsink".into()))?;
            (pipeline, appsink)
        }
    };
    appsink.set_caps(Some(&gst::Caps::builder("video/x-raw").field("format", "RGB").build()));
    appsink.set_max_buffers(1);
    appsink.set_drop(true);
    Ok((pipeline, appsink))
}

/// `gst-launch` syntax to a pipeline; a missing element is an error, not a
/// half-built pipeline.
fn parse(description: &str) -> std::result::Result<gst::Pipeline, gst::glib::Error> {
    let element = gst::parse::launch_full(description, None, gst::ParseFlags::FATAL_ERRORS)?;
    match element.downcast::<gst::Pipeline>() {
        Ok(pipeline) => Ok(pipeline),
        Err(element) => {
            // A single element (just "appsink", say) comes back bare.
            let pipeline = gst::Pipeline::new();
            pipeline
                .add(&element)
                .map_err(|e| gst::glib::Error::new(gst::CoreError::Failed, &e.to_string()))?;
            Ok(pipeline)
        }
    }
}

fn find_appsink(pipeline: &gst::Pipeline) -> Option<gst_app::AppSink> {
    pipeline
        .iterate_recurse()
        .into_iter()
        .filter_map(|element| element.ok())
        .find_map(|element| element.downcast::<gst_app::AppSink>().ok())
}
