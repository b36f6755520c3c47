//! Frame sources: where the pictures of a stream come from.
//!
//! A [`FrameSource`] hands out RGB frames one at a time, blocking until the
//! next one is there. A [`SourceSpec`] is the one-string description of a
//! source that a `--source` flag and a config value both hold; its
//! [`SourceSpec::open`] builds the source. The [`grabber::Grabber`] runs a
//! source on its own thread and keeps only the newest frame.
//!
//! Spec grammar (`KIND:ARGUMENT`, or a bare path):
//!
//! | spec | source |
//! |---|---|
//! | `file:PATH` | one image file |
//! | `dir:PATH` | every image file in a folder (by extension), ordered by name |
//! | `glob:PATTERN` | the files matching a glob pattern, ordered by name |
//! | `stdin:mjpeg` | concatenated JPEGs on standard input (`ffmpeg -f image2pipe -c:v mjpeg -`) |
//! | `stdin:ppm` | concatenated binary PPMs (P6) on standard input (`ffmpeg -f image2pipe -c:v ppm -`) |
//! | `gst:PIPELINE` | a GStreamer pipeline ending in `appsink` (cargo feature `gstreamer`) |
//! | `gst:` | the default camera pipeline, [`DEFAULT_GST_PIPELINE`] |
//! | a bare path | a glob if it has `*`, `?` or `[`; a folder if it is one; else a file |

pub mod files;
pub mod grabber;
#[cfg(feature = "gstreamer")]
pub mod gst;
pub mod pipe;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use image::RgbImage;

use crate::error::{Error, Result};

pub use grabber::{Backoff, Grabber, GrabberCounters, GrabberMonitor, GrabberStatus, NextFrame, SourceState};

/// The pipeline `gst:` alone runs: the first V4L2 camera.
pub const DEFAULT_GST_PIPELINE: &str = "v4l2src device=/dev/video0 ! videoconvert ! appsink";

/// A Jetson CSI camera through NVIDIA's Argus source (JetPack's GStreamer).
pub const JETSON_CSI_GST_PIPELINE: &str = "nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1280,height=720,framerate=30/1 ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! appsink";

/// An RTSP camera (H.264/H.265 need a decoder plugin, e.g. gstreamer1.0-libav).
pub const RTSP_GST_PIPELINE: &str =
    "rtspsrc location=rtsp://192.0.2.10:554/stream latency=0 ! decodebin ! videoconvert ! appsink";

/// What `--help` says about `--source`.
pub const SOURCE_SPEC_HELP: &str = "Where frames come from:\n  \
    file:PATH        one image file\n  \
    dir:PATH         the image files of a folder, ordered by name\n  \
    glob:PATTERN     the files matching a pattern, ordered by name ('frames/*.jpg')\n  \
    stdin:mjpeg      concatenated JPEGs on stdin (ffmpeg ... -f image2pipe -c:v mjpeg -)\n  \
    stdin:ppm        concatenated binary PPMs (P6) on stdin (ffmpeg ... -f image2pipe -c:v ppm -)\n  \
    gst:PIPELINE     a GStreamer pipeline ending in appsink (RGB caps are set on it); a pipeline\n                   \
    without appsink gets '! videoconvert ! appsink' appended. Builds with --features gstreamer.\n  \
    gst:             the default camera: 'v4l2src device=/dev/video0 ! videoconvert ! appsink'\n  \
    a bare path      a glob if it has * ? or [, a folder if it is one, else a file\n\
    Jetson CSI camera: gst:'nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1280,height=720,framerate=30/1 ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! appsink'\n\
    RTSP camera: gst:'rtspsrc location=rtsp://HOST:554/stream latency=0 ! decodebin ! videoconvert ! appsink'";

/// One picture from a source.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The source's sequence number, from 0, counting every frame it
    /// delivered (reconnections do not restart it).
    pub id: u64,
    /// When the frame was read from the source (wall clock).
    pub captured_at: SystemTime,
    /// The same moment on the monotonic clock, for ages and intervals.
    pub captured_instant: Instant,
    /// The pixels.
    pub image: RgbImage,
    /// The file it came from, for file sources.
    pub path: Option<PathBuf>,
}

impl Frame {
    /// A frame captured now.
    pub fn new(id: u64, image: RgbImage, path: Option<PathBuf>) -> Frame {
        Frame {
            id,
            captured_at: SystemTime::now(),
            captured_instant: Instant::now(),
            image,
            path,
        }
    }
}

/// A source of frames.
///
/// `next_frame` blocks until the next frame and returns `Ok(None)` at the
/// end of a finite source. Its errors say what to do next (see
/// [`Error::source_failure`]): [`Error::FrameCorrupt`] skips one frame,
/// [`Error::SourceLost`] calls for [`FrameSource::reconnect`] (with backoff,
/// the grabber's job), anything else is fatal.
pub trait FrameSource: Send {
    /// The next frame; `Ok(None)` at the end.
    fn next_frame(&mut self) -> Result<Option<Frame>>;

    /// Tries to get a lost source back (reopen the camera, restart the
    /// pipeline). `Err(SourceLost)` means try again later.
    fn reconnect(&mut self) -> Result<()>;

    /// Whether frames come at the producer's pace (a camera, a pipe), so an
    /// unread frame is overwritten by the next one; a file source instead
    /// waits for the consumer and never drops.
    fn is_live(&self) -> bool;

    /// The spec this source was opened from, for logs.
    fn spec(&self) -> &str;
}

/// How frames are piped in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipeFormat {
    /// Concatenated JPEG images, split on their start and end markers.
    Mjpeg,
    /// Concatenated binary PPM (P6) images.
    Ppm,
}

impl PipeFormat {
    pub fn name(self) -> &'static str {
        match self {
            PipeFormat::Mjpeg => "mjpeg",
            PipeFormat::Ppm => "ppm",
        }
    }
}

/// A parsed `--source` string. `Display` gives back a spec that parses to
/// the same value.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SourceSpec {
    /// One image file.
    File(PathBuf),
    /// The image files of a folder, by name.
    Dir(PathBuf),
    /// The files matching a glob pattern, by name.
    Glob(String),
    /// Frames piped into standard input.
    Stdin(PipeFormat),
    /// A GStreamer pipeline (the default one filled in for `gst:`).
    Gst(String),
}

impl FromStr for SourceSpec {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = |reason: String| Error::SourceConfig {
            spec: text.to_string(),
            reason,
        };
        if text.trim().is_empty() {
            return Err(bad("empty source; see --help for the forms".into()));
        }
        // Only known kinds are prefixes: "./a:b.jpg" stays a path.
        if let Some((kind, argument)) = text.split_once(':') {
            let needs_argument = |what: &str| {
                if argument.is_empty() {
                    Err(bad(format!("{kind}: needs {what} after the colon")))
                } else {
                    Ok(())
                }
            };
            match kind {
                "file" => {
                    needs_argument("a path")?;
                    return Ok(SourceSpec::File(argument.into()));
                }
                "dir" => {
                    needs_argument("a folder")?;
                    return Ok(SourceSpec::Dir(argument.into()));
                }
                "glob" => {
                    needs_argument("a pattern")?;
                    return Ok(SourceSpec::Glob(argument.into()));
                }
                "stdin" => {
                    return match argument {
                        "mjpeg" | "jpeg" => Ok(SourceSpec::Stdin(PipeFormat::Mjpeg)),
                        "ppm" => Ok(SourceSpec::Stdin(PipeFormat::Ppm)),
                        other => Err(bad(format!(
                            "unknown stdin format {other:?}: use stdin:mjpeg or stdin:ppm"
                        ))),
                    };
                }
                "gst" => {
                    let pipeline = argument.trim();
                    let pipeline = if pipeline.is_empty() {
                        DEFAULT_GST_PIPELINE
                    } else {
                        pipeline
                    };
                    return Ok(SourceSpec::Gst(pipeline.to_string()));
                }
                _ => {}
            }
        }
        if text.contains(['*', '?', '[']) {
            Ok(SourceSpec::Glob(text.to_string()))
        } else if std::path::Path::new(text).is_dir() {
            Ok(SourceSpec::Dir(text.into()))
        } else {
            Ok(SourceSpec::File(text.into()))
        }
    }
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceSpec::File(path) => write!(f, "file:{}", path.display()),
            SourceSpec::Dir(path) => write!(f, "dir:{}", path.display()),
            SourceSpec::Glob(pattern) => write!(f, "glob:{pattern}"),
            SourceSpec::Stdin(format) => write!(f, "stdin:{}", format.name()),
            SourceSpec::Gst(pipeline) => write!(f, "gst:{pipeline}"),
        }
    }
}

impl TryFrom<String> for SourceSpec {
    type Error = Error;

    fn try_from(text: String) -> Result<Self> {
        text.parse()
    }
}

impl From<SourceSpec> for String {
    fn from(spec: SourceSpec) -> String {
        spec.to_string()
    }
}

/// Settings of an opened source besides its spec.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// File sources: start again from the first file after the last.
    pub looping: bool,
    /// Frames with more pixels are corrupt (refused before decoding where the
    /// format allows).
    pub max_pixels: u64,
    /// Live GStreamer sources: no frame for this long counts as lost.
    pub stall_timeout: Duration,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            looping: false,
            max_pixels: crate::model::image::DEFAULT_MAX_PIXELS,
            stall_timeout: Duration::from_secs(10),
        }
    }
}

impl SourceSpec {
    /// Opens the source. Errors here are configuration errors: a missing
    /// file or an empty folder, a pipeline that does not parse, GStreamer
    /// asked for in a build without it. A camera that is not there yet is
    /// not an error here: the first `next_frame` reports it lost.
    /// `stop` makes a blocked `next_frame` of a GStreamer source return.
    pub fn open(&self, options: &SourceOptions, stop: &StopFlag) -> Result<Box<dyn FrameSource>> {
        match self {
            SourceSpec::File(_) | SourceSpec::Dir(_) | SourceSpec::Glob(_) => {
                Ok(Box::new(files::FileSource::open(self, options)?))
            }
            SourceSpec::Stdin(format) => Ok(Box::new(pipe::PipeSource::new(
                std::io::stdin(),
                *format,
                self.to_string(),
                options.max_pixels,
            ))),
            #[cfg(feature = "gstreamer")]
            SourceSpec::Gst(pipeline) => Ok(Box::new(gst::GstSource::open(pipeline, options, stop.clone())?)),
            #[cfg(not(feature = "gstreamer"))]
            SourceSpec::Gst(_) => {
                let _ = stop;
                Err(Error::SourceConfig {
                    spec: self.to_string(),
                    reason: "this build has no GStreamer support; rebuild with `cargo build --features gstreamer`"
                        .into(),
                })
            }
        }
    }
}

/// A flag that asks loops and blocked sources to stop. Clones share it; a
/// signal handler can set the inner `AtomicBool` (`signal_hook::flag`).
#[derive(Clone, Debug, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn new() -> StopFlag {
        StopFlag::default()
    }

    /// A flag over an existing atomic (one a signal handler sets, say).
    pub fn from_atomic(flag: Arc<AtomicBool>) -> StopFlag {
        StopFlag(flag)
    }

    /// The shared atomic, to hand to a signal handler.
    pub fn atomic(&self) -> &Arc<AtomicBool> {
        &self.0
    }

    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Sleeps up to `duration`, waking early when the flag is set. Returns
    /// whether it was set.
    pub fn sleep(&self, duration: Duration) -> bool {
        // A signal handler can only set the atomic, so poll it.
        const TICK: Duration = Duration::from_millis(20);
        let deadline = Instant::now() + duration;
        loop {
            if self.is_stopped() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            std::thread::sleep(TICK.min(deadline - now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        let cases = [
            ("file:a.jpg", SourceSpec::File("a.jpg".into())),
            ("dir:frames", SourceSpec::Dir("frames".into())),
            ("glob:frames/*.jpg", SourceSpec::Glob("frames/*.jpg".into())),
            ("frames/*.jpg", SourceSpec::Glob("frames/*.jpg".into())),
            ("stdin:mjpeg", SourceSpec::Stdin(PipeFormat::Mjpeg)),
            ("stdin:ppm", SourceSpec::Stdin(PipeFormat::Ppm)),
            (
                "gst:videotestsrc ! appsink",
                SourceSpec::Gst("videotestsrc ! appsink".into()),
            ),
            ("gst:", SourceSpec::Gst(DEFAULT_GST_PIPELINE.into())),
            ("./odd:name.jpg", SourceSpec::File("./odd:name.jpg".into())),
            (
                "/nonexistent/picture.png",
                SourceSpec::File("/nonexistent/picture.png".into()),
            ),
        ];
        for (text, expected) in cases {
            let spec: SourceSpec = text.parse().unwrap();
            assert_eq!(spec, expected, "{text}");
            assert_eq!(spec.to_string().parse::<SourceSpec>().unwrap(), expected, "{text}");
        }
        let dir = tempfile::tempdir().unwrap();
        let bare: SourceSpec = dir.path().to_str().unwrap().parse().unwrap();
        assert_eq!(bare, SourceSpec::Dir(dir.path().into()));
    }

    #[test]
    fn bad_specs_are_config_errors() {
        for text in ["", "  ", "stdin:png", "file:", "dir:", "glob:"] {
            let err = text.parse::<SourceSpec>().unwrap_err();
            assert!(matches!(err, Error::SourceConfig { .. }), "{text}: {err}");
        }
        let err = "stdin:h264".parse::<SourceSpec>().unwrap_err().to_string();
        assert!(err.contains("stdin:mjpeg or stdin:ppm"), "{err}");
    }

    #[test]
    fn specs_round_trip_through_serde() {
        let spec: SourceSpec = serde_json::from_str("\"dir:frames\"").unwrap();
        assert_eq!(spec, SourceSpec::Dir("frames".into()));
        assert_eq!(serde_json::to_string(&spec).unwrap(), "\"dir:frames\"");
        assert!(serde_json::from_str::<SourceSpec>("\"stdin:gif\"").is_err());
    }

    #[test]
    fn the_stop_flag_cuts_a_sleep_short() {
        let flag = StopFlag::new();
        assert!(!flag.sleep(Duration::from_millis(1)));
        let setter = flag.clone();
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            setter.stop();
        });
        assert!(flag.sleep(Duration::from_secs(10)));
        assert!(started.elapsed() < Duration::from_secs(5));
        thread.join().unwrap();
    }
}
