//! `elastic-edge stream` end to end, through the real binary and the
//! committed tiny model: folders and globs, frames piped into stdin,
//! GStreamer pipelines (with the `gstreamer` feature), bad input, a full
//! disk, a source lost mid-stream, and stopping on a signal.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use image::{codecs::jpeg::JpegEncoder, ExtendedColorType, ImageEncoder, Rgb, RgbImage};
use serde_json::Value;

fn tiny_model() -> String {
    format!("{}/models/tiny", env!("CARGO_MANIFEST_DIR"))
}

fn stream_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_elastic-edge"));
    command
        .arg("stream")
        .args(["--model", &tiny_model(), "--threads", "1", "--max-new-tokens", "4"])
        .args(args);
    command
}

/// Runs `stream` with `input` on stdin (closed after it).
fn stream(args: &[&str], input: &[u8]) -> Output {
    let mut child = stream_command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        // The binary may exit before reading everything (a bad spec).
        let _ = stdin.write_all(&input);
    });
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    output
}

fn records(output: &Output) -> Vec<Value> {
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The last stderr line: the stream's summary.
fn summary(output: &Output) -> String {
    let text = stderr(output);
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("stream done"))
        .unwrap_or_else(|| panic!("no summary in: {text}"));
    line.to_string()
}

/// A picture whose colour says which it is.
fn picture(index: u8) -> RgbImage {
    RgbImage::from_pixel(40, 30, Rgb([index.wrapping_mul(40), 100, 255 - index]))
}

fn jpeg(image: &RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, 90)
        .write_image(image.as_raw(), image.width(), image.height(), ExtendedColorType::Rgb8)
        .unwrap();
    bytes
}

fn ppm(image: &RgbImage) -> Vec<u8> {
    let mut bytes = format!("P6\n{} {}\n255\n", image.width(), image.height()).into_bytes();
    bytes.extend_from_slice(image.as_raw());
    bytes
}

fn file_names(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            Path::new(r["frame_path"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// A folder with 3 pictures, written out of order, a corrupt JPEG and a
/// text file.
fn frames_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, index) in [("frame-03.png", 3), ("frame-01.png", 1), ("frame-02.jpg", 2)] {
        picture(index).save(dir.path().join(name)).unwrap();
    }
    std::fs::write(dir.path().join("frame-02b.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    std::fs::write(dir.path().join("readme.txt"), "not a frame").unwrap();
    dir
}

#[test]
fn a_folder_is_captioned_in_name_order_and_a_corrupt_file_is_skipped_and_counted() {
    let dir = frames_folder();
    let spec = format!("dir:{}", dir.path().display());
    let output = stream(&["--source", &spec], b"");
    assert!(output.status.success(), "{}", stderr(&output));
    let records = records(&output);
    assert_eq!(file_names(&records), ["frame-01.png", "frame-02.jpg", "frame-03.png"]);
    let ids: Vec<u64> = records.iter().map(|r| r["frame_id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [0, 1, 2]);
    for record in &records {
        assert!(
            (1..=4).contains(&record["tokens"].as_u64().unwrap()),
            "--max-new-tokens 4: {record}"
        );
        assert!(record["time"].as_str().unwrap().ends_with('Z'), "{record}");
        assert!(record["unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
        assert_eq!(record["frame_width"], 40);
        assert!(record["timings_ms"]["vision_ms"].as_f64().unwrap() > 0.0);
        assert!(record["pool_bytes"].as_u64().unwrap() > 0);
        assert!(record["caption"].is_string());
    }
    let last = &records[2]["counters"];
    assert_eq!(last["frames_received"], 3);
    assert_eq!(last["frames_corrupt"], 1, "frame-02b.jpg: {last}");
    assert_eq!(last["frames_dropped"], 0, "file sources wait for the captioner");
    assert_eq!(last["captions"], 3);
    let stderr = stderr(&output);
    assert!(
        stderr.contains("frame-02b.jpg") && stderr.contains("(skipped)"),
        "{stderr}"
    );
    assert!(summary(&output).contains("3 captions, 3 frames received, 0 dropped, 1 corrupt"));
}

#[test]
fn a_glob_loops_until_max_frames() {
    let dir = frames_folder();
    let pattern = format!("{}/frame-0?.png", dir.path().display());
    let output = stream(&["--source", &pattern, "--loop", "--max-frames", "5"], b"");
    assert!(output.status.success(), "{}", stderr(&output));
    let records = records(&output);
    assert_eq!(
        file_names(&records),
        [
            "frame-01.png",
            "frame-03.png",
            "frame-01.png",
            "frame-03.png",
            "frame-01.png"
        ]
    );
    let ids: Vec<u64> = records.iter().map(|r| r["frame_id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [0, 1, 2, 3, 4]);
    assert!(summary(&output).contains("(--max-frames reached): 5 captions"));
}

#[test]
fn every_spaces_the_captions() {
    let dir = frames_folder();
    let spec = format!("dir:{}", dir.path().display());
    let output = stream(&["--source", &spec, "--every", "300ms"], b"");
    assert!(output.status.success(), "{}", stderr(&output));
    let times: Vec<u64> = records(&output)
        .iter()
        .map(|r| r["unix_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(times.len(), 3);
    for pair in times.windows(2) {
        assert!(pair[1] - pair[0] >= 290, "{times:?}");
    }
}

#[test]
fn mjpeg_on_stdin() {
    let mut input = Vec::new();
    for index in 0..6 {
        input.extend(jpeg(&picture(index)));
    }
    let output = stream(&["--source", "stdin:mjpeg"], &input);
    assert!(output.status.success(), "{}", stderr(&output));
    let records = records(&output);
    assert!(!records.is_empty());
    let ids: Vec<u64> = records.iter().map(|r| r["frame_id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(*ids.last().unwrap(), 5, "the newest frame is captioned last");
    let last = &records.last().unwrap()["counters"];
    assert_eq!(last["frames_received"], 6);
    // Latest frame wins: every frame is captioned or dropped.
    assert_eq!(
        last["captions"].as_u64().unwrap() + last["frames_dropped"].as_u64().unwrap(),
        6,
        "{last}"
    );
    assert!(summary(&output).contains("(the source ended)"));
}

#[test]
fn ppm_on_stdin_with_a_corrupt_frame() {
    let mut input = ppm(&picture(1));
    input.extend_from_slice(b"P6\n0 0\n255\n");
    input.extend(ppm(&picture(2)));
    let output = stream(&["--source", "stdin:ppm"], &input);
    assert!(output.status.success(), "{}", stderr(&output));
    let records = records(&output);
    let last = &records.last().unwrap()["counters"];
    assert_eq!(last["frames_received"], 2, "{last}");
    assert_eq!(last["frames_corrupt"], 1, "{last}");
    assert_eq!(records.last().unwrap()["frame_id"], 2, "the corrupt frame used id 1");
    assert_eq!(records.last().unwrap()["frame_width"], 40);
}

#[test]
fn stdin_closed_mid_frame_is_a_lost_source_that_is_retried_then_ends() {
    let frame = jpeg(&picture(1));
    let mut input = frame.clone();
    input.extend(&frame);
    input.extend_from_slice(&frame[..frame.len() / 2]);
    let output = stream(&["--source", "stdin:mjpeg"], &input);
    assert!(output.status.success(), "{}", stderr(&output));
    let stderr = stderr(&output);
    assert!(
        stderr.contains("lost: the input ended in the middle of frame #2") && stderr.contains("reconnecting in 0.5 s"),
        "{stderr}"
    );
    assert!(
        summary(&output).contains("2 frames received")
            && summary(&output).contains("1 source losses, 1 reconnection attempts"),
        "{}",
        summary(&output)
    );
}

#[test]
fn a_full_disk_is_logged_and_counted_and_the_stream_goes_on() {
    let dir = frames_folder();
    let spec = format!("dir:{}", dir.path().display());
    let output = stream(&["--source", &spec, "--output", "/dev/full"], b"");
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr(&output);
    assert_eq!(
        stderr
            .matches("the caption could not be written (writing /dev/full: No space left on device")
            .count(),
        3,
        "{stderr}"
    );
    assert!(summary(&output).contains("3 captions") && summary(&output).contains("3 output errors"));
    assert!(
        stderr
            .trim_end()
            .ends_with("elastic-edge: 3 of 3 captions could not be written"),
        "{stderr}"
    );
}

#[test]
fn output_file_gets_one_line_per_caption_appended() {
    let dir = frames_folder();
    let out = dir.path().join("captions.jsonl");
    let spec = format!("dir:{}", dir.path().display());
    for _ in 0..2 {
        let output = stream(&["--source", &spec, "--output", out.to_str().unwrap()], b"");
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(output.stdout.is_empty());
    }
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 6);
    assert!(text.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()));
}

#[test]
fn bad_sources_are_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(String, &str)> = vec![
        (format!("dir:{}", dir.path().display()), "no image files in the folder"),
        ("stdin:gif".into(), "unknown stdin format"),
        (format!("{}/missing.png", dir.path().display()), "no such file"),
        (format!("{}/*.png", dir.path().display()), "no file matches the pattern"),
    ];
    for (spec, expected) in cases {
        let output = stream(&["--source", &spec], b"");
        assert_eq!(
            output.status.code(),
            Some(if spec == "stdin:gif" { 2 } else { 1 }),
            "{spec}"
        );
        let stderr = stderr(&output);
        assert!(stderr.contains(expected), "{spec}: {stderr}");
        assert!(output.stdout.is_empty());
        if spec != "stdin:gif" {
            assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        }
    }
    let output = stream(&["--source", "stdin:mjpeg", "--every", "soon"], b"");
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("invalid interval \"soon\""),
        "{}",
        stderr(&output)
    );
}

#[test]
fn help_documents_the_source_grammar() {
    let output = Command::new(env!("CARGO_BIN_EXE_elastic-edge"))
        .args(["stream", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for form in [
        "dir:PATH",
        "glob:PATTERN",
        "stdin:mjpeg",
        "stdin:ppm",
        "gst:PIPELINE",
        "nvarguscamerasrc",
        "rtspsrc",
    ] {
        assert!(help.contains(form), "{form}: {help}");
    }
}

#[cfg(not(feature = "gstreamer"))]
#[test]
fn gst_sources_need_the_feature() {
    let output = stream(&["--source", "gst:videotestsrc ! appsink"], b"");
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("rebuild with `cargo build --features gstreamer`"));
}

/// Sends `signal` once `ready` holds for the stderr read so far, then
/// collects the output.
fn signal_when(mut child: Child, signal: &str, ready: impl Fn(&str) -> bool) -> (Output, String) {
    use std::io::Read;
    let mut stderr_pipe = child.stderr.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match stderr_pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => sender.send(buf[..n].to_vec()).unwrap(),
            }
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready(&seen) {
        assert!(Instant::now() < deadline, "never ready: {seen}");
        if let Ok(chunk) = receiver.recv_timeout(Duration::from_millis(100)) {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    reader.join().unwrap();
    while let Ok(chunk) = receiver.try_recv() {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    (output, seen)
}

#[test]
fn sigint_stops_a_stream_blocked_on_an_open_stdin() {
    let mut child = stream_command(&["--source", "stdin:mjpeg"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The producer stays connected: the grabber is blocked reading stdin.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&jpeg(&picture(1))).unwrap();
    stdin.flush().unwrap();
    let started = Instant::now();
    let (output, stderr) = signal_when(child, "INT", |seen| seen.contains("captioned"));
    drop(stdin);
    assert!(output.status.success(), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        stderr.contains("stream done (stopped): 1 captions, 1 frames received"),
        "{stderr}"
    );
    assert_eq!(records(&output).len(), 1);
}

#[cfg(feature = "gstreamer")]
mod gstreamer_sources {
    use super::*;

    /// Starts `stream` with nothing on stdin, its output captured.
    fn spawn_stream(args: &[&str]) -> std::process::Child {
        stream_command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts")
    }

    #[test]
    fn videotestsrc_frames_are_captioned_latest_first() {
        let output = stream(
            &[
                "--source",
                "gst:videotestsrc num-buffers=30 ! video/x-raw,width=64,height=48,framerate=30/1 ! videoconvert ! appsink",
                "--every",
                "200ms",
            ],
            b"",
        );
        assert!(output.status.success(), "{}", stderr(&output));
        let records = records(&output);
        assert!(
            records.len() >= 3,
            "a second of video, a caption every 200 ms: {}",
            records.len()
        );
        assert!(records
            .iter()
            .all(|r| r["frame_width"] == 64 && r["frame_height"] == 48));
        let last = &records.last().unwrap()["counters"];
        assert_eq!(last["frames_received"], 30, "{last}");
        let (captions, dropped) = (
            last["captions"].as_u64().unwrap(),
            last["frames_dropped"].as_u64().unwrap(),
        );
        assert_eq!(captions + dropped, 30, "{last}");
        assert!(
            dropped >= 10,
            "captions every 200 ms of a 30 fps source drop most frames: {last}"
        );
    }

    #[test]
    fn a_pipeline_without_appsink_gets_one() {
        let output = stream(
            &["--source", "gst:videotestsrc num-buffers=3", "--max-frames", "1"],
            b"",
        );
        assert!(output.status.success(), "{}", stderr(&output));
        assert_eq!(records(&output).len(), 1);
    }

    #[test]
    fn a_video_file_made_in_the_test_is_read_through_decodebin() {
        let dir = tempfile::tempdir().unwrap();
        let video = dir.path().join("clip.avi");
        make_video(&video, 20);
        let spec = format!(
            "gst:filesrc location={} ! decodebin ! videoconvert ! appsink",
            video.display()
        );
        let output = stream(&["--source", &spec], b"");
        assert!(output.status.success(), "{}", stderr(&output));
        let records = records(&output);
        assert!(!records.is_empty());
        assert!(records
            .iter()
            .all(|r| r["frame_width"] == 96 && r["frame_height"] == 72));
        let last = &records.last().unwrap()["counters"];
        assert_eq!(last["frames_received"], 20, "{last}");
        assert_eq!(last["frames_corrupt"], 0, "{last}");
    }

    /// `videotestsrc ! jpegenc ! avimux ! filesink`, run to the end.
    fn make_video(path: &Path, frames: u32) {
        use gstreamer as gst;
        use gstreamer::prelude::*;
        gst::init().unwrap();
        let pipeline = gst::parse::launch(&format!(
            "videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,width=96,height=72,framerate=30/1 \
             ! jpegenc ! avimux ! filesink location={}",
            path.display()
        ))
        .unwrap();
        pipeline.set_state(gst::State::Playing).unwrap();
        let bus = pipeline.bus().unwrap();
        let message = bus
            .timed_pop_filtered(
                gst::ClockTime::from_seconds(30),
                &[gst::MessageType::Eos, gst::MessageType::Error],
            )
            .expect("the encoder finishes");
        assert!(matches!(message.view(), gst::MessageView::Eos(_)), "{message:?}");
        pipeline.set_state(gst::State::Null).unwrap();
        assert!(std::fs::metadata(path).unwrap().len() > 1000);
    }

    #[test]
    fn an_unparsable_pipeline_is_one_error_line_before_the_model_loads() {
        for (pipeline, reason) in [
            ("gst:videotestsrc ! ! appsink", "syntax error"),
            (
                "gst:videotestsrc ! nosuchelement ! appsink",
                "no element \"nosuchelement\"",
            ),
        ] {
            // A missing model: the pipeline is refused first.
            let output = Command::new(env!("CARGO_BIN_EXE_elastic-edge"))
                .args(["stream", "--source", pipeline, "--model", "/nonexistent"])
                .output()
                .unwrap();
            assert_eq!(output.status.code(), Some(1));
            let stderr = stderr(&output);
            assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
            assert!(
                stderr.contains("GStreamer cannot parse the pipeline") && stderr.contains(reason),
                "{stderr}"
            );
            assert!(output.stdout.is_empty());
        }
    }

    #[test]
    fn a_pipeline_that_errors_mid_stream_is_reconnected_and_sigterm_stops_it() {
        let child = spawn_stream(&[
            "--source",
            "gst:videotestsrc ! identity error-after=8 ! video/x-raw,width=32,height=24,framerate=30/1 ! videoconvert ! appsink",
            "--every",
            "100ms",
        ]);
        // The third loss means two reconnections happened; a frame numbered
        // 8 or more was captured after the first (identity fails on the 8th).
        let (output, stderr) = signal_when(child, "TERM", |seen| {
            seen.matches("reconnecting in").count() >= 3 && captioned_ids(seen).iter().any(|&id| id >= 8)
        });
        assert!(output.status.success(), "{stderr}");
        assert!(stderr.contains("Failed after iterations as requested"), "{stderr}");
        let summary = stderr
            .lines()
            .find(|l| l.contains("stream done (stopped)"))
            .unwrap_or_else(|| panic!("{stderr}"));
        let count = |what: &str| -> u64 {
            let before = summary.split(what).next().unwrap();
            before.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!(count(" source losses") >= 3, "{summary}");
        assert!(count(" reconnection attempts") >= 2, "{summary}");
        // Frame ids go on across reconnections.
        let ids: Vec<u64> = records(&output)
            .iter()
            .map(|r| r["frame_id"].as_u64().unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert!(*ids.last().unwrap() >= 8, "{ids:?}");
    }

    /// The frame ids of the "frame N captioned" progress lines.
    fn captioned_ids(stderr: &str) -> Vec<u64> {
        stderr
            .lines()
            .filter_map(|l| l.strip_prefix("elastic-edge: frame "))
            .filter_map(|l| l.split(' ').next()?.parse().ok())
            .collect()
    }

    #[test]
    fn a_missing_camera_is_retried_with_growing_waits_until_sigint() {
        let child = spawn_stream(&[
            "--source",
            "gst:v4l2src device=/dev/video-missing ! videoconvert ! appsink",
        ]);
        let (output, stderr) = signal_when(child, "INT", |seen| seen.contains("(attempt 2)"));
        assert!(output.status.success(), "{stderr}");
        assert!(
            stderr.contains("Cannot identify device '/dev/video-missing'"),
            "{stderr}"
        );
        assert!(
            stderr.contains("reconnecting in 0.5 s (attempt 1)")
                && stderr.contains("reconnecting in 1.0 s (attempt 2)"),
            "{stderr}"
        );
        assert!(stderr.contains("stream done (stopped): 0 captions"), "{stderr}");
        assert!(stderr.contains("1 source losses"), "{stderr}");
        assert!(output.stdout.is_empty());
    }
}
