//! Bad input against the real binary on the tiny model: each case must end
//! with a non-zero exit, one clear line on stderr naming the problem and
//! nothing on stdout, within a bounded time and under an address-space
//! limit (`prlimit --as`, where it is installed), so a case that tries to
//! allocate gigabytes fails instead of taking the machine.
//!
//! Flag values that do not parse are clap's errors: exit code 2, the first
//! line names the flag and the reason, then clap's hint to try `--help`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Address space each run may use: the tiny model, ONNX Runtime, a 32 MiB
/// pool and thread stacks fit with room to spare.
const ADDRESS_SPACE: u64 = 2 << 30;
/// Wall-clock limit of one run (a debug build on a busy machine).
const TIME_LIMIT: Duration = Duration::from_secs(60);
/// A refusal must come sooner: before any real work.
const ERROR_TIME: Duration = Duration::from_secs(20);

struct Run {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
    took: Duration,
}

impl Run {
    /// Non-zero exit, one line on stderr containing every one of `wanted`,
    /// nothing on stdout. Returns the line.
    fn one_error_line(&self, wanted: &[&str]) -> String {
        let what = format!("exit {:?}, stderr: {}", self.status, self.stderr);
        assert_eq!(self.status.code(), Some(1), "{what}");
        assert!(
            self.stdout.is_empty(),
            "stdout: {:?}",
            String::from_utf8_lossy(&self.stdout)
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one error line: {what}");
        let line = lines[0];
        assert!(line.starts_with("elastic-edge: "), "{line}");
        for w in wanted {
            assert!(line.contains(w), "{line:?} does not name {w:?}");
        }
        assert!(!self.stderr.contains("panicked") && !self.stderr.contains("backtrace"));
        assert!(self.took < ERROR_TIME, "{line}: took {:?}", self.took);
        line.to_string()
    }

    /// A flag value clap refused: exit code 2, nothing on stdout, the first
    /// line naming the flag and containing every one of `wanted`.
    fn flag_error(&self, flag: &str, wanted: &[&str]) -> String {
        let what = format!("exit {:?}, stderr: {}", self.status, self.stderr);
        assert_eq!(self.status.code(), Some(2), "{what}");
        assert!(
            self.stdout.is_empty(),
            "stdout: {:?}",
            String::from_utf8_lossy(&self.stdout)
        );
        let first = self.stderr.lines().next().unwrap_or_default();
        assert!(first.starts_with("error: ") && first.contains(flag), "{what}");
        for w in wanted {
            assert!(first.contains(w), "{first:?} does not name {w:?}");
        }
        first.to_string()
    }

    fn succeeded(&self) {
        assert!(self.status.success(), "exit {:?}, stderr: {}", self.status, self.stderr);
    }
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn tiny() -> String {
    repo("models/tiny").display().to_string()
}

fn gradient() -> String {
    repo("models/tiny/gradient.png").display().to_string()
}

/// The binary with `args`, stdin from `/dev/null`, under the limits.
fn run(args: &[&str]) -> Run {
    run_with(args, |_| {})
}

fn run_with(args: &[&str], setup: impl FnOnce(&mut Command)) -> Run {
    let binary = env!("CARGO_BIN_EXE_elastic-edge");
    let mut command = if Path::new("/usr/bin/prlimit").exists() {
        let mut c = Command::new("/usr/bin/prlimit");
        c.arg(format!("--as={ADDRESS_SPACE}")).arg("--").arg(binary);
        c
    } else {
        Command::new(binary)
    };
    command
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("ELASTIC_EDGE_MODEL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    setup(&mut command);
    let started = Instant::now();
    let mut child = command.spawn().expect("the binary starts");
    // (Not piped when the caller gave stdout elsewhere.)
    let stdout = child.stdout.take();
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut stdout) = stdout {
            let _ = stdout.read_to_end(&mut v);
        }
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} ran past {TIME_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    Run {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: String::from_utf8_lossy(&err.join().expect("stderr reader")).into_owned(),
        took,
    }
}

/// `caption` of the tiny model's picture with `extra` flags.
fn caption(extra: &[&str]) -> Run {
    let (model, image) = (tiny(), gradient());
    let mut args = vec!["caption", "--model", &model, "--image", &image];
    args.extend_from_slice(extra);
    run(&args)
}

/// `stream` of the tiny model's picture with `extra` flags.
fn stream(extra: &[&str]) -> Run {
    let (model, image) = (tiny(), gradient());
    let source = format!("file:{image}");
    let mut args = vec!["stream", "--model", &model, "--source", &source];
    args.extend_from_slice(extra);
    run(&args)
}

/// A service config for the tiny model with `extra` tables, in `dir`.
fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("serve.toml");
    std::fs::write(&path, format!("[model]\ndir = {:?}\n{extra}", tiny())).unwrap();
    path
}

fn serve_check(config: &Path) -> Run {
    run(&["serve", "--config", &config.display().to_string(), "--check"])
}

#[test]
fn answer_lengths_are_checked_before_any_work() {
    // 10^12 tokens once reserved 8 TB for the step trace and aborted.
    for huge in ["1000000000000", "4097", "0", "-5", "99999999999999999999999"] {
        let run = caption(&["--max-new-tokens", huge]);
        run.flag_error("--max-new-tokens", &["from 1 to 4096"]);
        let run = stream(&["--max-new-tokens", huge]);
        run.flag_error("--max-new-tokens", &["from 1 to 4096"]);
    }
    // Within the limit but not within the tiny model's 1024 positions.
    let line = caption(&["--max-new-tokens", "1024"]).one_error_line(&["--max-new-tokens 1024", "1024 positions"]);
    eprintln!("{line}");
    stream(&["--max-new-tokens", "2000"]).one_error_line(&["--max-new-tokens 2000", "1024 positions"]);
    let eval = run(&[
        "eval",
        "--model",
        &tiny(),
        "--data",
        &repo("datasets/dev.jsonl").display().to_string(),
        "--max-new-tokens",
        "5000",
    ]);
    eval.flag_error("--max-new-tokens", &["from 1 to 4096"]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[caption]\nmax_new_tokens = 2000\n");
    serve_check(&config).one_error_line(&["caption.max_new_tokens", "1024 positions"]);
    // The largest that fits still captions.
    caption(&["--max-new-tokens", "8"]).succeeded();
}

#[test]
fn thread_counts_are_bounded_by_the_cpus() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let over = (cpus + 1).to_string();
    for bad in ["100000", over.as_str()] {
        caption(&["--threads", bad]).flag_error("--threads", &["more than the", "CPUs"]);
        stream(&["--threads", bad]).flag_error("--threads", &["more than the", "CPUs"]);
    }
    caption(&["--threads", "0"]).flag_error("--threads", &["at least 1"]);
    caption(&["--threads", "-3"]).flag_error("--threads", &["not a whole number"]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "threads = 100000\n");
    serve_check(&config).one_error_line(&["model.threads", "100000 is more than the"]);
    caption(&["--threads", &cpus.to_string(), "--max-new-tokens", "4"]).succeeded();
}

/// A FIFO at `path` (nothing ever writes to it).
fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().expect("mkfifo runs");
    assert!(status.success());
}

/// A copy of the tiny model in `dir/model`, for altering.
fn tiny_copy(dir: &Path) -> PathBuf {
    let copy = dir.join("model");
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(repo("models/tiny")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() && !entry.file_name().to_string_lossy().starts_with('.') {
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
    }
    copy
}

#[test]
fn fifos_and_devices_are_refused_before_they_are_opened() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("frame.png");
    mkfifo(&fifo);
    let fifo_name = fifo.display().to_string();

    // Pictures: a FIFO blocked for ever, /dev/zero was "empty (0 bytes)".
    let (model, image) = (tiny(), gradient());
    let line = run(&["caption", "--model", &model, "--image", &fifo_name])
        .one_error_line(&[&fifo_name, "not a regular file (a FIFO)"]);
    eprintln!("{line}");
    let line = run(&["caption", "--model", &model, "--image", "/dev/zero"])
        .one_error_line(&["/dev/zero", "a character device"]);
    assert!(!line.contains("empty"), "{line}");
    eprintln!("{line}");

    // Model files: the manifest, a graph, the tokenizer; a folder as a graph was "4096 bytes".
    for (name, kind) in [
        ("manifest.json", "a FIFO"),
        ("decoder.onnx", "a FIFO"),
        ("tokenizer.json", "a FIFO"),
        ("embed_tokens.bin", "a directory"),
        ("vision.onnx", "a directory"),
    ] {
        let case = tempfile::tempdir().unwrap();
        let copy = tiny_copy(case.path());
        let file = copy.join(name);
        std::fs::remove_file(&file).unwrap();
        if kind == "a FIFO" {
            mkfifo(&file);
        } else {
            std::fs::create_dir(&file).unwrap();
        }
        let copy_name = copy.display().to_string();
        let line = run(&["caption", "--model", &copy_name, "--image", &image])
            .one_error_line(&[name, &format!("not a regular file ({kind})")]);
        eprintln!("{line}");
        let doctor = run(&["doctor", "--model", &copy_name]);
        doctor.succeeded();
        let stdout = String::from_utf8_lossy(&doctor.stdout);
        assert!(stdout.contains(&format!("not a regular file ({kind})")), "{stdout}");
    }

    // A config file and the ONNX Runtime library.
    let config = dir.path().join("serve.toml");
    mkfifo(&config);
    serve_check(&config).one_error_line(&["serve.toml", "not a regular file (a FIFO)"]);
    let library = dir.path().join("libonnxruntime.so");
    mkfifo(&library);
    run(&["--onnxruntime", &library.display().to_string(), "doctor"])
        .one_error_line(&["libonnxruntime.so", "not a regular file (a FIFO)"]);
    // A stream of one FIFO.
    let source = format!("file:{fifo_name}");
    run(&["stream", "--model", &model, "--source", &source]).one_error_line(&["not a regular file"]);
    // Questions for a memory stream.
    let source = format!("file:{image}");
    for questions in [fifo_name.as_str(), "/dev/zero"] {
        let args = [
            "stream",
            "--model",
            &model,
            "--source",
            &source,
            "--memory",
            "--questions",
            questions,
        ];
        run(&args).one_error_line(&["--questions", questions, "not a regular file ("]);
    }
}

/// `eval` of `data` on the tiny model: one cheap policy and keep, short answers.
fn eval(data: &Path, out: &Path, extra: &[&str]) -> Run {
    let (model, data, out) = (tiny(), data.display().to_string(), out.display().to_string());
    let mut args = vec![
        "eval",
        "--model",
        &model,
        "--data",
        &data,
        "--out",
        &out,
        "--policies",
        "local",
        "--keep",
        "0.5",
        "--max-new-tokens",
        "4",
        "--kv-budget",
        "1MiB",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn dataset_files_and_lines_are_bounded_and_reported_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // Not a regular file: /dev/zero once read 9.5 GB in 30 s.
    eval(Path::new("/dev/zero"), &out, &[]).one_error_line(&["/dev/zero", "not a regular file (a character device)"]);
    let fifo = dir.path().join("fifo.jsonl");
    mkfifo(&fifo);
    eval(&fifo, &out, &[]).one_error_line(&["not a regular file (a FIFO)"]);

    // Every line bad: the reasons, not "line 0".
    let data = dir.path().join("bad.jsonl");
    let mut bytes = vec![b'{'; 3 << 20];
    bytes.extend_from_slice(b"\n{\"prompt\": \"\xff\"}\nnot json\n");
    std::fs::write(&data, bytes).unwrap();
    let run = eval(&data, &out, &[]);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    let last = run.stderr.lines().last().unwrap_or_default();
    for wanted in [
        "no usable sample: line 1: longer than 1048576 bytes",
        "line 2: not UTF-8",
        "line 3: not a JSON sample",
    ] {
        assert!(last.contains(wanted), "{last}");
    }
    assert!(!run.stderr.contains("line 0"), "{}", run.stderr);
    assert!(run.stdout.is_empty());
    // With --strict, the first bad line stops it.
    eval(&data, &out, &["--strict"]).one_error_line(&["line 1: longer than 1048576 bytes"]);

    // One undecodable picture among good ones: skipped by line; the sweep runs.
    std::fs::write(dir.path().join("broken.png"), b"\x89PNG\r\n\x1a\n and then nothing").unwrap();
    std::fs::copy(gradient(), dir.path().join("good.png")).unwrap();
    let data = dir.path().join("mixed.jsonl");
    std::fs::write(
        &data,
        "{\"image\": \"good.png\", \"prompt\": \"What is it?\"}\n{\"image\": \"broken.png\", \"prompt\": \"And this?\"}\n",
    )
    .unwrap();
    let run = eval(&data, &out, &[]);
    run.succeeded();
    assert!(
        run.stderr.contains("line 2: image") && run.stderr.contains("broken.png") && run.stderr.contains("(skipped)"),
        "{}",
        run.stderr
    );
    eval(&data, &out, &["--strict"]).one_error_line(&["mixed.jsonl: line 2: image", "broken.png"]);
}

/// A copy of the tiny model whose manifest asks for `resize` (the tiny
/// vision graph takes 32 x 32 whatever brings the picture there).
fn tiny_with_resize(dir: &Path, resize: &str) -> String {
    let copy = tiny_copy(dir);
    let manifest = copy.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["vision"]["resize"] = resize.into();
    std::fs::write(&manifest, json.to_string()).unwrap();
    copy.display().to_string()
}

/// A gray PNG of `width` x `height` (small on disk: it compresses well).
fn gray_png(path: &Path, width: u32, height: u32) {
    use image::ImageEncoder;
    let pixels: Vec<u8> = (0..u64::from(width) * u64::from(height))
        .map(|i| (i % 7 * 30) as u8)
        .collect();
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    image::codecs::png::PngEncoder::new_with_quality(
        file,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::NoFilter,
    )
    .write_image(&pixels, width, height, image::ExtendedColorType::L8)
    .unwrap();
}

#[test]
fn extreme_aspect_pictures_are_resized_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let picture = |name: &str, width: u32, height: u32| {
        let path = dir.path().join(name);
        gray_png(&path, width, height);
        path.display().to_string()
    };
    let wide = picture("wide.png", 2_000_000, 1);
    let tall = picture("tall.png", 1, 2_000_000);
    // Shortest edge to 32, then the centre crop: the resized picture was
    // 64 million columns (or rows) by 32, 6 GB; under the 2 GiB limit it
    // must caption.
    let crop = tempfile::tempdir().unwrap();
    let crop = tiny_with_resize(crop.path(), "bicubic_shortest_edge_center_crop");
    for image in [&wide, &tall] {
        run(&["caption", "--model", &crop, "--image", image, "--max-new-tokens", "2"]).succeeded();
    }
    // Squashed: the horizontal pass once held every row of a tall picture
    // (a debug build takes seconds per 100,000 rows, hence a shorter one).
    let shorter = picture("shorter.png", 1, 200_000);
    let squash = tempfile::tempdir().unwrap();
    let bicubic = tiny_with_resize(squash.path(), "bicubic_squash");
    for model in [&tiny(), &bicubic] {
        for image in [&wide, &shorter] {
            run(&["caption", "--model", model, "--image", image, "--max-new-tokens", "2"]).succeeded();
        }
    }
}

/// A copy of the tiny model with `change` applied to its manifest.
fn tiny_with_manifest(dir: &Path, change: impl FnOnce(&mut serde_json::Value)) -> String {
    let copy = tiny_copy(dir);
    let manifest = copy.join("manifest.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    change(&mut json);
    std::fs::write(&manifest, json.to_string()).unwrap();
    copy.display().to_string()
}

#[test]
fn hostile_manifests_are_refused_naming_the_field() {
    use serde_json::{json, Value};
    // `/a/b`: the key b of the object a, inserted if missing.
    let set = |pointer: &'static str, value: Value| {
        move |m: &mut Value| {
            let mut at = m;
            for key in pointer.trim_start_matches('/').split('/') {
                at = &mut at[key];
            }
            *at = value;
        }
    };
    type Change = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Change, &str)> = vec![
        // 2^61: once a "capacity overflow" panic in the pool's sizing.
        (
            "head_dim",
            Box::new(set("/head_dim", json!(1u64 << 61))),
            "more than the 4096",
        ),
        (
            "layers",
            Box::new(set("/layers", json!(1u64 << 40))),
            "more than the 1024",
        ),
        ("kv_heads", Box::new(set("/kv_heads", json!(u64::MAX))), "more than the"),
        (
            "hidden",
            Box::new(set("/hidden", json!(1_000_000_000))),
            "more than the",
        ),
        ("vocab", Box::new(set("/vocab", json!(0))), "must be positive"),
        (
            "max_positions",
            Box::new(set("/max_positions", json!(1u64 << 62))),
            "more than the",
        ),
        (
            "rope_theta",
            Box::new(set("/rope_theta", json!(-1.0))),
            "positive and finite",
        ),
        (
            "bos_token_id",
            Box::new(set("/bos_token_id", json!(1_000_000))),
            "outside the vocabulary",
        ),
        // 2^64 - 1 once disabled the pixel limit.
        (
            "vision.max_pixels",
            Box::new(set("/vision/max_pixels", json!(u64::MAX))),
            "outside 1..=",
        ),
        (
            "vision.width",
            Box::new(set("/vision/width", json!(100_000))),
            "outside 1..=4096",
        ),
        (
            "vision.image_tokens",
            Box::new(set("/vision/image_tokens", json!(1u64 << 40))),
            "outside",
        ),
        // Names that point outside the folder are never opened.
        (
            "files.decoder",
            Box::new(set("/files/decoder", json!("../../../../../../etc/passwd"))),
            "outside the model folder",
        ),
        (
            "files.tokenizer",
            Box::new(set("/files/tokenizer", json!("/etc/passwd"))),
            "absolute path",
        ),
        (
            "embed_tokens.file",
            Box::new(set("/embed_tokens/file", json!("/dev/zero"))),
            "absolute path",
        ),
        (
            "file_hashes.../secret",
            Box::new(|m: &mut Value| {
                m["file_hashes"]["../secret"] = json!({"sha256": "00", "bytes": 1});
            }),
            "outside the model folder",
        ),
    ];
    let image = gradient();
    for (field, change, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_with_manifest(dir.path(), change);
        let line = run(&["caption", "--model", &model, "--image", &image]).one_error_line(&[
            "manifest.json",
            &format!("field {field}: "),
            reason,
        ]);
        eprintln!("{line}");
        let doctor = run(&["doctor", "--model", &model]);
        doctor.succeeded();
        assert!(String::from_utf8_lossy(&doctor.stdout).contains(&format!("field {field}: ")));
    }
    // The pool's geometry from doctor's flags, when no model is found.
    // (doctor has printed the runtime's lines by then.)
    let doctor = run(&["doctor", "--model", "/nonexistent", "--head-dim", "2305843009213693952"]);
    assert_eq!(doctor.status.code(), Some(1), "{}", doctor.stderr);
    assert_eq!(doctor.stderr.lines().count(), 1, "{}", doctor.stderr);
    assert!(doctor.stderr.contains("one slot's size overflows"), "{}", doctor.stderr);
}

#[test]
fn truncated_jpegs_are_refused_not_captioned() {
    use image::ImageEncoder;
    let dir = tempfile::tempdir().unwrap();
    let picture = image::RgbImage::from_fn(96, 64, |x, y| image::Rgb([(x * 2) as u8, (y * 3) as u8, (x ^ y) as u8]));
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .write_image(picture.as_raw(), 96, 64, image::ExtendedColorType::Rgb8)
        .unwrap();
    let whole = dir.path().join("whole.jpg");
    std::fs::write(&whole, &jpeg).unwrap();
    let (model, whole) = (tiny(), whole.display().to_string());
    run(&["caption", "--model", &model, "--image", &whole, "--max-new-tokens", "2"]).succeeded();
    // Cut in the middle of the scan data: it was decoded with grey for the
    // rest, captioned, exit 0.
    let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    let cut = dir.path().join("cut.jpg");
    std::fs::write(&cut, &jpeg[..sos + (jpeg.len() - sos) / 2]).unwrap();
    let cut = cut.display().to_string();
    let line =
        run(&["caption", "--model", &model, "--image", &cut]).one_error_line(&[&cut, "corrupt or truncated (jpeg)"]);
    eprintln!("{line}");
    // In a stream it is a corrupt frame, skipped and counted.
    let source = format!("file:{cut}");
    let stream = run(&["stream", "--model", &model, "--source", &source]);
    assert!(stream.stderr.contains("1 corrupt"), "{}", stream.stderr);
    assert!(stream.stdout.is_empty());
}

/// The binary with `args` under the limits, its stdout the write end of a
/// pipe whose read end `reader` decides about: `None` closes it before the
/// binary starts, `Some(n)` reads `n` bytes (or up to the first newline when
/// `n` is 0) and then closes it. Returns the run and the bytes read.
fn run_into_pipe(args: &[&str], read: Option<usize>) -> (Run, Vec<u8>) {
    let (mut reader, writer) = std::io::pipe().expect("pipe");
    let mut got = Vec::new();
    let reading = match read {
        None => {
            drop(reader);
            None
        }
        Some(n) => Some(std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            while reader.read(&mut byte).unwrap_or(0) == 1 {
                got.push(byte[0]);
                if (n > 0 && got.len() == n) || (n == 0 && byte[0] == b'\n') {
                    break;
                }
            }
            got
        })),
    };
    let run = run_with(args, move |c| {
        c.stdout(writer);
    });
    let got = reading.map(|t| t.join().expect("reader")).unwrap_or_default();
    (run, got)
}

#[test]
fn a_closed_stdout_ends_the_command_with_an_error_not_a_panic() {
    let (model, image) = (tiny(), gradient());
    // doctor | (a reader already gone): a panic with a backtrace, exit 101.
    let (doctor, _) = run_into_pipe(&["doctor", "--model", &model], None);
    assert_eq!(doctor.status.code(), Some(1), "{}", doctor.stderr);
    assert_eq!(
        doctor.stderr.trim_end(),
        "elastic-edge: writing stdout: Broken pipe (os error 32)"
    );

    // caption | head -c 10: the whole answer was generated first.
    let long = [
        "caption",
        "--model",
        &model,
        "--image",
        &image,
        "--max-new-tokens",
        "900",
        "--ignore-stop",
    ];
    let (whole, text) = run_into_pipe(&long, Some(usize::MAX));
    whole.succeeded();
    assert!(text.len() > 1000, "{} bytes", text.len());
    let (cut, got) = run_into_pipe(&long, Some(10));
    assert_eq!(got.len(), 10);
    assert_eq!(cut.status.code(), Some(1), "{}", cut.stderr);
    assert!(
        cut.stderr
            .trim_end()
            .ends_with("writing stdout: Broken pipe (os error 32)"),
        "{}",
        cut.stderr
    );
    // With stdout closed it stops at the first piece instead of generating
    // the whole answer into nothing: faster than the whole answer. The best
    // of five runs each, so a busy machine's pauses do not decide it. (The
    // start-up is most of a run and the tiny model's whole answer only some
    // 60-100 ms more than one token, so a finer bound, "nearer one token
    // than the whole", failed on a loaded machine with the code unchanged.)
    let best = |args: &[&str], read: Option<usize>| {
        (0..5)
            .map(|_| run_into_pipe(args, read).0)
            .min_by_key(|run| run.took)
            .expect("five runs")
    };
    let one: Vec<&str> = long.iter().map(|a| if *a == "900" { "1" } else { a }).collect();
    let (closed, whole, one) = (
        best(&long, None),
        best(&long, Some(usize::MAX)),
        best(&one, Some(usize::MAX)),
    );
    assert_eq!(closed.status.code(), Some(1), "{}", closed.stderr);
    assert!(
        closed.took < whole.took,
        "stopped at the first piece: {:?} against {:?} for one token and {:?} for the whole answer",
        closed.took,
        one.took,
        whole.took
    );
    let json: Vec<&str> = long.iter().copied().chain(["--json"]).collect();
    let (json, _) = run_into_pipe(&json, None);
    assert_eq!(json.status.code(), Some(1), "{}", json.stderr);

    // stream --loop | head -1: it went on captioning for ever.
    let source = format!("file:{image}");
    let looping = [
        "stream",
        "--model",
        &model,
        "--source",
        &source,
        "--loop",
        "--max-new-tokens",
        "2",
    ];
    let (stream, line) = run_into_pipe(&looping, Some(0));
    assert!(line.ends_with(b"}\n"), "{}", String::from_utf8_lossy(&line));
    assert_eq!(stream.status.code(), Some(1), "{}", stream.stderr);
    let last = stream.stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("writing stdout: Broken pipe") && last.contains("its reader is gone"),
        "{last}"
    );
    assert!(!stream.stderr.contains("panicked"));

    // caption >&- : exit 0 and the caption lost.
    let closed = run_with(&["caption", "--model", &model, "--image", &image], |c| {
        use std::os::unix::process::CommandExt;
        // SAFETY: close(2) is async-signal-safe; the child closes its own stdout.
        unsafe {
            c.pre_exec(|| {
                libc::close(1);
                Ok(())
            });
        }
    });
    assert_eq!(closed.status.code(), Some(1), "{}", closed.stderr);
    assert!(closed.stderr.contains("stdout is closed"), "{}", closed.stderr);
    assert_eq!(closed.stderr.lines().count(), 1);
}

#[test]
fn sampling_flags_and_frame_counts_are_checked() {
    for bad in ["-1", "NaN", "inf", "-inf", "1e39", "warm"] {
        caption(&["--temperature", bad]).flag_error("--temperature", &[]);
        stream(&["--temperature", bad]).flag_error("--temperature", &[]);
    }
    let line = caption(&["--temperature", "-1"]).flag_error("--temperature", &["0 or more"]);
    eprintln!("{line}");
    for bad in ["NaN", "0", "1.5", "-0.1", "inf"] {
        caption(&["--temperature", "0.7", "--top-p", bad]).flag_error("--top-p", &["(0, 1]"]);
    }
    // --max-frames 0 captioned one frame; it is refused (at least 1).
    let line = stream(&["--max-frames", "0"]).flag_error("--max-frames", &["at least 1"]);
    stream(&["--max-frames", "-2"]).flag_error("--max-frames", &["not a whole number"]);
    eprintln!("{line}");
    caption(&["--temperature", "0.7", "--top-p", "1", "--max-new-tokens", "4"]).succeeded();
    stream(&["--max-frames", "1", "--max-new-tokens", "2"]).succeeded();
}

#[test]
fn size_messages_point_the_right_way() {
    // 1e30 said "must be at least one byte"; it is too large.
    for huge in ["1e30", "1000000000000000000000000000000", "2PiB"] {
        let line = run(&["doctor", "--kv-budget", huge]).flag_error("--kv-budget", &["more than the largest accepted"]);
        assert!(!line.contains("at least one byte"), "{line}");
    }
    run(&["doctor", "--kv-budget", "0.5"]).flag_error("--kv-budget", &["at least one byte"]);
    // 1TiB was "unknown unit": it parses (clap stops at the first bad value,
    // which here is the one after it).
    for big in ["1TiB", "1TB", "1tib", "2T"] {
        caption(&["--kv-budget", big, "--temperature", "-1"]).flag_error("--temperature", &[]);
    }
    // --bandwidth-buffer 0 said "invalid KV budget".
    let line = run(&["bench", "--memory-bandwidth", "--bandwidth-buffer", "0"])
        .flag_error("--bandwidth-buffer", &["at least one byte"]);
    assert!(!line.contains("KV budget"), "{line}");
    eprintln!("{line}");
    run(&["bench", "--memory-bandwidth", "--bandwidth-buffer", "8tokens"])
        .flag_error("--bandwidth-buffer", &["a token count is not a size"]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[http]\nmax_body = \"1e30\"\n");
    serve_check(&config).one_error_line(&["http.max_body", "more than the largest accepted"]);
}

#[test]
fn kv_budgets_larger_than_the_memory_are_refused_naming_the_largest_that_fits() {
    // 20GiB on a 23 GB machine started filling it (the pool's pages are
    // populated when it is mapped); 1PiB is more than any machine here.
    let wanted = [
        "--kv-budget: a KV pool of",
        "does not fit in memory",
        "the largest budget that fits is",
        "--kv-over-memory",
    ];
    let line = caption(&["--kv-budget", "1PiB"]).one_error_line(&wanted);
    eprintln!("{line}");
    caption(&["--kv-budget", "4000000000tokens"]).one_error_line(&wanted);
    stream(&["--kv-budget", "1PiB"]).one_error_line(&wanted);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    eval(&repo("datasets/dev.jsonl"), &out, &["--kv-budget", "1PiB"]).one_error_line(&wanted);
    run(&["bench", "--model", &tiny(), "--kv-budget", "1PiB"]).one_error_line(&wanted);
    let config = write_config(dir.path(), "[cache]\nkv_budget = \"1PiB\"\n");
    serve_check(&config).one_error_line(&["cache.kv_budget", "does not fit in memory", "cache.kv_over_memory"]);
    // doctor says what fits, then refuses the same way.
    let doctor = run(&["doctor", "--model", &tiny(), "--kv-budget", "1PiB"]);
    assert_eq!(doctor.status.code(), Some(1), "{}", doctor.stderr);
    assert_eq!(doctor.stderr.lines().count(), 1, "{}", doctor.stderr);
    assert!(doctor.stderr.contains("does not fit in memory"), "{}", doctor.stderr);
    assert!(String::from_utf8_lossy(&doctor.stdout).contains("the largest --kv-budget is"));

    // A file-backed pool may go over with the override (this one is then
    // too large for the file system: a different error).
    let kv = dir.path().join("pool.kv").display().to_string();
    let line = caption(&["--kv-budget", "1PiB", "--kv-file", &kv, "--kv-over-memory"])
        .one_error_line(&["cannot map KV pool file", "pool.kv"]);
    assert!(!line.contains("does not fit in memory"), "{line}");
    let alone = caption(&["--kv-budget", "1PiB", "--kv-over-memory"]);
    assert_eq!(alone.status.code(), Some(2), "{}", alone.stderr);
    assert!(alone.stderr.contains("required arguments were not provided") && alone.stderr.contains("--kv-file"));
    let config = write_config(dir.path(), "[cache]\nkv_budget = \"1PiB\"\nkv_over_memory = true\n");
    serve_check(&config).one_error_line(&["cache.kv_over_memory", "only a file-backed pool"]);
    // What fits still captions.
    caption(&["--kv-budget", "1MiB", "--max-new-tokens", "2"]).succeeded();
}

/// A copy of the tiny model's picture in `dir` under a name that is not
/// UTF-8 (`caf\xe9.png`, Latin-1).
fn non_utf8_picture(dir: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let path = dir.join(std::ffi::OsStr::from_bytes(b"caf\xe9.png"));
    std::fs::copy(gradient(), &path).unwrap();
    path
}

#[test]
fn file_names_that_are_not_utf8_are_written_lossily_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let picture = non_utf8_picture(dir.path());
    let model = tiny();
    // caption --json panicked after generating: the caption was lost.
    let args = [
        "caption",
        "--model",
        &model,
        "--max-new-tokens",
        "2",
        "--json",
        "--image",
    ];
    let json = run_with(&args, |c| {
        c.arg(&picture);
    });
    json.succeeded();
    let stdout = String::from_utf8(json.stdout).expect("JSON is UTF-8");
    let record: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert!(
        record["image"].as_str().unwrap().ends_with("caf\u{FFFD}.png"),
        "{record}"
    );
    assert!(record["caption"].is_string());
    // stream: the record "did not serialise" and counted as an output error.
    let source = format!("dir:{}", dir.path().display());
    let streamed = run(&[
        "stream",
        "--model",
        &model,
        "--source",
        &source,
        "--max-new-tokens",
        "2",
    ]);
    streamed.succeeded();
    let stdout = String::from_utf8(streamed.stdout).expect("JSON is UTF-8");
    let record: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert!(
        record["frame_path"].as_str().unwrap().ends_with("caf\u{FFFD}.png"),
        "{record}"
    );
    assert!(streamed.stderr.contains("0 output errors"), "{}", streamed.stderr);
}

#[test]
fn a_stream_of_only_corrupt_pictures_fails_with_or_without_loop() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.png"), b"not a picture").unwrap();
    std::fs::write(dir.path().join("b.jpg"), b"\xff\xd8\xff\xe0 and then nothing").unwrap();
    let source = format!("dir:{}", dir.path().display());
    let model = tiny();
    // Without --loop it exited 0 (with it, 1).
    for extra in [&[][..], &["--loop"][..]] {
        let mut args = vec!["stream", "--model", &model, "--source", &source];
        args.extend_from_slice(extra);
        let run = run(&args);
        assert_eq!(run.status.code(), Some(1), "{extra:?}: {}", run.stderr);
        assert!(run.stdout.is_empty());
        let last = run.stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("elastic-edge: source dir:")
                && last.contains("none of its 2 files could be decoded: no frame to use"),
            "{extra:?}: {last}"
        );
        assert!(run.stderr.contains("2 corrupt"), "{}", run.stderr);
    }
    // One good picture among them still streams and ends with success.
    std::fs::copy(gradient(), dir.path().join("c.png")).unwrap();
    run(&[
        "stream",
        "--model",
        &model,
        "--source",
        &source,
        "--max-new-tokens",
        "2",
    ])
    .succeeded();
}

#[test]
fn a_file_that_rots_in_place_is_caught_by_doctor_and_then_by_every_load() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_copy(dir.path());
    let model_name = model.display().to_string();
    let image = gradient();
    // A first load hashes every file and writes .verified.
    run(&[
        "caption",
        "--model",
        &model_name,
        "--image",
        &image,
        "--max-new-tokens",
        "2",
    ])
    .succeeded();
    assert!(model.join(".verified").is_file());
    // One byte of the tokenizer changes; size and modification time do not.
    let tokenizer = model.join("tokenizer.json");
    let modified = std::fs::metadata(&tokenizer).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&tokenizer).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&tokenizer, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&tokenizer)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    // doctor said "files check out: sizes and sha256".
    let doctor = run(&["doctor", "--model", &model_name]);
    doctor.succeeded();
    let stdout = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        stdout.contains("tokenizer.json: sha256") && stdout.contains("differs from the manifest's"),
        "{stdout}"
    );
    assert!(!stdout.contains("files check out"), "{stdout}");
    // The stamp that vouched for it is gone: the next load hashes and refuses.
    run(&["caption", "--model", &model_name, "--image", &image])
        .one_error_line(&["tokenizer.json: sha256", "differs from the manifest's"]);
    // A model that checks out says what was checked.
    let doctor = run(&["doctor", "--model", &tiny()]);
    let stdout = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        stdout.contains("files check out: sizes and sha256 of all 7 files, hashed now"),
        "{stdout}"
    );
}

#[test]
fn doctor_refuses_geometry_flags_that_a_model_overrides() {
    // They were silently ignored when a model was found.
    let line = run(&["doctor", "--model", &tiny(), "--layers", "4", "--head-dim", "8"]).one_error_line(&[
        "geometry flags (--layers, --head-dim) apply only when no model is found",
        "model tiny",
        "2 layers, 2 KV heads of 16, f32",
    ]);
    eprintln!("{line}");
    // Without a model they size the pool.
    let doctor = run(&["doctor", "--model", "/nonexistent", "--layers", "4", "--dtype", "f32"]);
    doctor.succeeded();
    assert!(String::from_utf8_lossy(&doctor.stdout).contains("shape: 4 layers x 3 kv heads x 64 dims, f32"));
}

/// A copy of the tiny model whose manifest says the decoder has one KV
/// head (the graph has two): consistent with itself, not with its graph.
fn tiny_with_one_kv_head(dir: &Path) -> String {
    tiny_with_manifest(dir, |m| {
        m["kv_heads"] = 1.into();
        // [1, kv_heads, C, head_dim] in format 2, [1, S, kv_heads, head_dim] in format 1
        let heads_axis = if m["format_version"] == 2 { 1 } else { 2 };
        for side in ["inputs", "outputs"] {
            for tensor in m["graphs"]["decoder"][side].as_array_mut().unwrap() {
                let name = tensor["name"].as_str().unwrap().to_string();
                if name.contains("key") || name.contains("value") {
                    tensor["shape"][heads_axis] = 1.into();
                }
            }
        }
    })
}

#[test]
fn a_graph_that_does_not_match_its_manifest_is_the_models_fault_not_the_pictures() {
    // It failed at the first decoder step as "<picture>: ONNX Runtime: ..."
    // over several lines.
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_with_one_kv_head(dir.path());
    let image = gradient();
    let line = run(&["caption", "--model", &model, "--image", &image]).one_error_line(&[
        "decoder.onnx: the decoder graph does not match its manifest",
        "input \"past_key_0\" has shape [1, 2, ?, 16] in the graph, [1, 1, C, 16] in graphs.decoder.inputs",
    ]);
    assert!(!line.contains("gradient.png"), "{line}");
    eprintln!("{line}");
    // The vision graph: 32 x 32 pixels in the graph, 64 x 64 in the manifest.
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_with_manifest(dir.path(), |m| {
        for key in ["height", "width", "image_size"] {
            m["vision"][key] = 64.into();
        }
        for tensor in m["graphs"]["vision"]["inputs"].as_array_mut().unwrap() {
            if tensor["name"] == "pixel_values" {
                tensor["shape"] = serde_json::json!([1, 3, 64, 64]);
            }
        }
    });
    let source = format!("file:{image}");
    run(&["stream", "--model", &model, "--source", &source]).one_error_line(&[
        "vision.onnx: the vision graph does not match its manifest",
        "pixel_values",
    ]);
}

/// A decoder.weights whose trailer or index lies (and whose manifest hash
/// was made to match, as a hand-built model's would) is one error line
/// naming the file, before any caption starts.
#[test]
fn a_shared_weights_file_with_a_bad_index_is_one_line_naming_it() {
    use sha2::Digest;
    let image = gradient();
    let weights = std::fs::read(repo("models/tiny/decoder.weights")).unwrap();
    let n = weights.len();
    let index_len = u64::from_le_bytes(weights[n - 16..n - 8].try_into().unwrap()) as usize;
    let index = String::from_utf8(weights[n - 16 - index_len..n - 16].to_vec()).unwrap();
    let data = &weights[..n - 16 - index_len];
    let with_index = |index: &str| {
        let mut file = data.to_vec();
        file.extend_from_slice(index.as_bytes());
        file.extend_from_slice(&(index.len() as u64).to_le_bytes());
        file.extend_from_slice(b"EEWEIGHT");
        file
    };
    let mut lying_length = weights.clone();
    lying_length[n - 16..n - 8].copy_from_slice(&(n as u64 * 2).to_le_bytes());
    // The first tensor made one row longer than its bytes.
    let first_shape = index.find("\"shape\":[").unwrap() + "\"shape\":[".len();
    let wrong_shape = format!("{}1000,{}", &index[..first_shape], &index[first_shape..]);
    let cases: [(Vec<u8>, &[&str]); 4] = [
        (lying_length, &["decoder.weights", "its index claims"]),
        (with_index(&wrong_shape), &["decoder.weights", "is not its"]),
        (with_index("{\"tensors\": 7}"), &["decoder.weights", "its index"]),
        (weights[..n - 1].to_vec(), &["decoder.weights", "EEWEIGHT"]),
    ];
    for (file, wanted) in cases {
        let dir = tempfile::tempdir().unwrap();
        let sha: String = sha2::Sha256::digest(&file).iter().map(|b| format!("{b:02x}")).collect();
        let model = tiny_with_manifest(dir.path(), |m| {
            m["file_hashes"]["decoder.weights"]["sha256"] = sha.into();
            m["file_hashes"]["decoder.weights"]["bytes"] = file.len().into();
        });
        std::fs::write(Path::new(&model).join("decoder.weights"), &file).unwrap();
        run(&["caption", "--model", &model, "--image", &image]).one_error_line(wanted);
    }
}

// The corpus: one case a line, each the arguments and what the one error
// line must name (`one_error_line`: exit 1, nothing on stdout, bounded time
// and address space) or, for a flag clap refuses, the flag and the reason.

/// `args` as `&str`s, for `run`.
fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A PNG chunk: length, type, data, CRC.
fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    // CRC-32 (IEEE), bit by bit: a few bytes, no table needed.
    let mut crc = !0u32;
    for byte in kind.iter().chain(data) {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(&(!crc).to_be_bytes());
    chunk
}

/// A PNG whose header says `width` x `height` and whose data is `idat`.
fn png_claiming(width: u32, height: u32, idat: Option<&[u8]>) -> Vec<u8> {
    let mut header = width.to_be_bytes().to_vec();
    header.extend_from_slice(&height.to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &header));
    if let Some(idat) = idat {
        png.extend(png_chunk(b"IDAT", idat));
    }
    png.extend(png_chunk(b"IEND", b""));
    png
}

#[test]
fn corpus_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.display().to_string()
    };
    // A few zlib bytes for an IDAT (a stored block of 100 zeros).
    let mut idat = vec![0x78, 0x01, 0x01, 100, 0, !100, 0xff];
    idat.extend_from_slice(&[0; 100]);
    idat.extend_from_slice(&[0, 100, 0, 1]);
    let folder = dir.path().join("folder.png");
    std::fs::create_dir(&folder).unwrap();
    let cases: Vec<(String, Vec<&str>)> = vec![
        (file("empty.png", b""), vec!["is empty (0 bytes)"]),
        (
            file("text.png", b"hello\n"),
            vec!["unrecognised format (first bytes 68 65"],
        ),
        (
            file("header.png", b"\x89PNG\r\n\x1a\n"),
            vec!["corrupt or truncated (png)"],
        ),
        (file("cut.gif", b"GIF89a\x10"), vec!["corrupt or truncated (gif)"]),
        (file("cut.bmp", b"BM\0\0"), vec!["corrupt or truncated (bmp)"]),
        (
            file("cut.webp", b"RIFF\x10\0\0\0WEBPVP8 "),
            vec!["corrupt or truncated (webp)"],
        ),
        (file("cut.tiff", b"II*\0"), vec!["corrupt or truncated (tiff)"]),
        (
            file("soi.jpg", b"\xff\xd8"),
            vec!["unrecognised format (first bytes ff d8)"],
        ),
        (
            file("huge.ppm", b"P6\n99999 99999\n255\n"),
            vec!["99999x99999 = 9999800001 pixels, more than the limit of 64000000"],
        ),
        (
            file("huge.png", &png_claiming(100_000, 100_000, Some(&idat))),
            vec!["100000x100000 = 10000000000 pixels, more than the limit"],
        ),
        (
            file("no-data.png", &png_claiming(100_000, 100_000, None)),
            vec!["corrupt or truncated (png)"],
        ),
        (
            file("zero.png", &png_claiming(0, 10, Some(&idat))),
            vec!["corrupt or truncated (png)"],
        ),
        (folder.display().to_string(), vec!["not a regular file (a directory)"]),
        (
            "/nonexistent/picture.png".into(),
            vec!["cannot read image", "No such file"],
        ),
        ("/dev/null".into(), vec!["not a regular file (a character device)"]),
    ];
    let model = tiny();
    for (image, wanted) in cases {
        let line = run(&["caption", "--model", &model, "--image", &image]).one_error_line(&wanted);
        assert!(line.contains(&image), "{line}");
    }
}

#[test]
fn corpus_model_folders() {
    let dir = tempfile::tempdir().unwrap();
    let case = |name: &str, change: &dyn Fn(&Path)| {
        let at = dir.path().join(name);
        std::fs::create_dir(&at).unwrap();
        let copy = tiny_copy(&at);
        change(&copy);
        copy.display().to_string()
    };
    let manifest_field = |key: &'static str, value: serde_json::Value| {
        move |m: &Path| {
            let path = m.join("manifest.json");
            let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            json[key] = value.clone();
            std::fs::write(&path, json.to_string()).unwrap();
        }
    };
    let write = |file: &'static str, bytes: Vec<u8>| move |m: &Path| std::fs::write(m.join(file), &bytes).unwrap();
    let decoder = std::fs::read(repo("models/tiny/decoder.onnx")).unwrap();
    let mut rotten = decoder.clone();
    let middle = rotten.len() / 2;
    rotten[middle] ^= 1;
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let a_file = dir.path().join("a-file");
    std::fs::write(&a_file, "{}").unwrap();
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            "/nonexistent/model".into(),
            vec!["no model in /nonexistent/model: not a folder"],
        ),
        (a_file.display().to_string(), vec!["a-file: not a folder"]),
        (empty.display().to_string(), vec!["manifest.json: No such file"]),
        (
            case("no-manifest", &|m| {
                std::fs::remove_file(m.join("manifest.json")).unwrap()
            }),
            vec!["manifest.json: No such file"],
        ),
        (
            case("empty-manifest", &write("manifest.json", Vec::new())),
            vec!["manifest.json: field (json): EOF while parsing"],
        ),
        (
            case("text-manifest", &write("manifest.json", b"not json".to_vec())),
            vec!["manifest.json: field (json): expected"],
        ),
        (
            case("array-manifest", &write("manifest.json", b"[1, 2]".to_vec())),
            vec!["manifest.json: field (json): invalid type"],
        ),
        (
            case("huge-manifest", &write("manifest.json", vec![b' '; 17 << 20])),
            vec!["manifest.json: ", "more than the 16777216 such a file may have"],
        ),
        (
            case("no-decoder", &|m| std::fs::remove_file(m.join("decoder.onnx")).unwrap()),
            vec!["model file", "decoder.onnx: cannot read: No such file"],
        ),
        (
            case("cut-decoder", &write("decoder.onnx", decoder[..1000].to_vec())),
            vec![
                "decoder.onnx: 1000 bytes, the manifest says",
                "file_hashes.decoder.onnx.bytes",
            ],
        ),
        (
            case("rotten-decoder", &write("decoder.onnx", rotten)),
            vec![
                "decoder.onnx: sha256",
                "differs from the manifest's",
                "rebuild the model",
            ],
        ),
        (
            case("format-version", &manifest_field("format_version", 99.into())),
            vec!["field format_version: 99 is not supported"],
        ),
        (
            case("format", &manifest_field("format", "other".into())),
            vec!["field format: \"other\", expected \"elastic-edge-model\""],
        ),
        (
            case("no-layers", &manifest_field("layers", 0.into())),
            vec!["field layers: must be positive"],
        ),
        (
            case("layers-text", &manifest_field("layers", "two".into())),
            vec!["manifest.json: field (json): invalid type: string \"two\""],
        ),
    ];
    let image = gradient();
    for (model, wanted) in cases {
        run(&["caption", "--model", &model, "--image", &image]).one_error_line(&wanted);
    }
}

#[test]
fn corpus_flags() {
    let (model, image) = (tiny(), gradient());
    let caption_args = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["caption", "--model", &model, "--image", &image]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    // Refused by clap: exit 2, the flag named on the first line.
    let refused: Vec<(&[&str], &str, &[&str])> = vec![
        (&["--kv-budget", "12XB"], "--kv-budget", &["unknown unit \"XB\""]),
        (
            &["--kv-budget", "lots"],
            "--kv-budget",
            &["does not start with a number"],
        ),
        (&["--keep", "0"], "--keep", &["outside (0, 1]"]),
        (&["--keep", "1.5"], "--keep", &["outside (0, 1]"]),
        (&["--keep", "half"], "--keep", &["not a number"]),
        (
            &["--policy", "lru"],
            "--policy",
            &["expected one of full, local, h2o, elastic"],
        ),
        (&["--device", "tpu"], "--device", &[]),
        (&["--seed", "x"], "--seed", &[]),
        (&["--prefill-chunk", "-1"], "--prefill-chunk", &[]),
        (&["--seed", "-1"], "--seed", &[]),
        (&["--max-new-tokens", "many"], "--max-new-tokens", &["from 1 to 4096"]),
    ];
    for (extra, flag, wanted) in refused {
        let args = caption_args(extra);
        run(&refs(&args)).flag_error(flag, wanted);
    }
    let source = format!("file:{image}");
    for (extra, flag, wanted) in [
        (&["--every", "fast"][..], "--every", &["invalid interval \"fast\""][..]),
        (&["--every", "-2s"][..], "--every", &[][..]),
    ] {
        let mut args = vec!["stream", "--model", &model, "--source", &source];
        args.extend_from_slice(extra);
        run(&args).flag_error(flag, wanted);
    }
    for (spec, wanted) in [("stdin:h264", "unknown stdin format \"h264\""), ("", "--source")] {
        run(&["stream", "--model", &model, "--source", spec]).flag_error("--source", &[wanted]);
    }
    // Accepted by clap, refused before any work: one line.
    let failing: Vec<(&[&str], &[&str])> = vec![
        (&["--prompt", "   "], &["the prompt is empty"]),
        (
            &["--device", "cuda"],
            &["--device cuda takes float16 only", "use the fp16 model on a GPU"],
        ),
        (
            &["--kv-file", "/nonexistent-dir/pool.kv"],
            &["cannot map KV pool file /nonexistent-dir/pool.kv"],
        ),
        (&["--kv-budget", "1KiB"], &["KV budget too small", "raise --kv-budget"]),
    ];
    for (extra, wanted) in failing {
        let args = caption_args(extra);
        run(&refs(&args)).one_error_line(wanted);
    }
}

#[test]
fn corpus_config_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = format!("[model]\ndir = {:?}\n", tiny());
    let cases: Vec<(&str, String, &[&str])> = vec![
        ("empty", String::new(), &["(top level): missing field `model`"]),
        ("not-toml", "this is = = not toml".into(), &["line 1: "]),
        (
            "unknown-key",
            format!("{model}colour = 1\n"),
            &["model.colour: unknown field `colour`"],
        ),
        (
            "unknown-table",
            format!("{model}[extra]\na = 1\n"),
            &["extra: unknown field `extra`"],
        ),
        ("empty-dir", "[model]\ndir = \"\"\n".into(), &["model.dir: is empty"]),
        (
            "no-model",
            "[model]\ndir = \"/nonexistent\"\n".into(),
            &["model.dir: no model in /nonexistent"],
        ),
        (
            "keep",
            format!("{model}[cache]\nkeep = 2.0\n"),
            &["cache.keep: keep ratio 2 is outside (0, 1]"],
        ),
        (
            "keep-type",
            format!("{model}[cache]\nkeep = \"half\"\n"),
            &["cache.keep: invalid type: string \"half\""],
        ),
        (
            "policy",
            format!("{model}[cache]\npolicy = \"lru\"\n"),
            &["cache.policy: unknown variant `lru`"],
        ),
        (
            "budget",
            format!("{model}[cache]\nkv_budget = \"lots\"\n"),
            &["cache.kv_budget: invalid KV budget \"lots\""],
        ),
        (
            "knob",
            format!("{model}[cache]\nsink = -1\n"),
            &["cache.sink: invalid value: integer `-1`"],
        ),
        (
            "interval",
            format!("{model}[stream]\ninterval = \"fast\"\n"),
            &["stream.interval: invalid interval \"fast\""],
        ),
        (
            "source",
            format!("{model}[stream]\nsource = \"stdin:h264\"\n"),
            &["stream.source: ", "unknown stdin format"],
        ),
        (
            "listen",
            format!("{model}[http]\nlisten = \"nonsense\"\n"),
            &["http.listen: \"nonsense\" is not an address and port"],
        ),
        (
            "max-body",
            format!("{model}[http]\nmax_body = \"0\"\n"),
            &["http.max_body: \"0\": it must be at least one byte"],
        ),
        (
            "threads",
            format!("{model}threads = 0\n"),
            &["model.threads: must be at least 1"],
        ),
        (
            "device",
            format!("{model}device = \"tpu\"\n"),
            &["model.device: unknown variant `tpu`"],
        ),
        (
            "prompt",
            format!("{model}[caption]\nprompt = \"  \"\n"),
            &["caption.prompt: is empty"],
        ),
        (
            "tokens",
            format!("{model}[caption]\nmax_new_tokens = 0\n"),
            &["caption.max_new_tokens: 0 is outside 1..=4096"],
        ),
        (
            "huge",
            format!("# {}\n", "x".repeat(2 << 20)),
            &["(file): cannot read it: ", "more than the 1048576 such a file may have"],
        ),
    ];
    for (name, text, wanted) in cases {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let line = serve_check(&path).one_error_line(wanted);
        assert!(line.contains(&format!("{name}.toml: ")), "{line}");
    }
    let binary = dir.path().join("binary.toml");
    std::fs::write(&binary, b"\xff\xfe[model]\n").unwrap();
    serve_check(&binary).one_error_line(&["binary.toml: (file): cannot read it: not UTF-8 text (byte 0)"]);
    serve_check(Path::new("/nonexistent/serve.toml"))
        .one_error_line(&["/nonexistent/serve.toml: (file): cannot read it: No such file"]);
}

#[test]
fn corpus_dataset_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gradient(), dir.path().join("good.png")).unwrap();
    let out = dir.path().join("out");
    let cases: Vec<(&str, &str, &[&str])> = vec![
        ("empty", "", &["no usable sample: the file has no lines"]),
        ("blank", "\n\n   \n", &["no usable sample: the file has no lines"]),
        ("array", "[1, 2]\n", &["no usable sample: line 1: not a JSON sample"]),
        ("no-prompt", "{\"id\": \"a\", \"images\": [\"good.png\"]}\n", &["line 1: no \"prompt\""]),
        ("empty-prompt", "{\"id\": \"a\", \"images\": [\"good.png\"], \"prompt\": \"\"}\n", &["line 1: no \"prompt\""]),
        (
            "four-pictures",
            "{\"id\": \"a\", \"kind\": \"multi-image\", \"images\": [\"good.png\", \"good.png\", \"good.png\", \"good.png\"], \"prompt\": \"x\"}\n",
            &["line 1: 4 pictures: at most 3"],
        ),
        ("missing-picture", "{\"id\": \"a\", \"images\": [\"nope.png\"], \"prompt\": \"x\"}\n", &["line 1: image ", "nope.png does not exist"]),
        (
            "bad-kind",
            "{\"id\": \"a\", \"kind\": \"bogus\", \"images\": [\"good.png\"], \"prompt\": \"x\"}\n",
            &["line 1: unknown kind \"bogus\""],
        ),
        ("not-a-picture", "{\"id\": \"a\", \"images\": [\"/etc/hostname\"], \"prompt\": \"x\"}\n", &["line 1: image /etc/hostname"]),
    ];
    for (name, text, wanted) in cases {
        let data = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&data, text).unwrap();
        let line = eval(&data, &out, &[]).one_error_line(wanted);
        assert!(line.contains(&format!("{name}.jsonl: ")), "{line}");
    }
    eval(Path::new("/nonexistent/data.jsonl"), &out, &[])
        .one_error_line(&["/nonexistent/data.jsonl: cannot read: No such file"]);
    eval(dir.path(), &out, &[]).one_error_line(&["cannot read: not a regular file (a directory)"]);
}

#[test]
fn corpus_stream_sources() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let text = dir.path().join("text.png");
    std::fs::write(&text, "hello\n").unwrap();
    let model = tiny();
    let cases: Vec<(String, &[&str])> = vec![
        ("bogus:xyz".into(), &["source file:bogus:xyz: no such file"]),
        (
            "file:/nonexistent.png".into(),
            &["source file:/nonexistent.png: no such file"],
        ),
        (
            "dir:/nonexistent".into(),
            &["source dir:/nonexistent: cannot read the folder"],
        ),
        ("glob:/nonexistent/*.png".into(), &["no file matches the pattern"]),
        (format!("dir:{}", empty.display()), &["no image files in the folder"]),
        (
            format!("dir:{}", dir.path().join("text.png").display()),
            &["cannot read the folder: Not a directory"],
        ),
    ];
    for (spec, wanted) in cases {
        run(&["stream", "--model", &model, "--source", &spec]).one_error_line(wanted);
    }
    if !cfg!(feature = "gstreamer") {
        run(&["stream", "--model", &model, "--source", "gst:videotestsrc"]).one_error_line(&["no GStreamer support"]);
    }
    // A source that opens but gives nothing usable: the last line says so.
    let source = format!("file:{}", text.display());
    let run = run(&["stream", "--model", &model, "--source", &source]);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr
            .trim_end()
            .ends_with("none of its 1 files could be decoded: no frame to use"),
        "{}",
        run.stderr
    );
    let output = format!("{}/no-such-dir/out.jsonl", dir.path().display());
    let image = format!("file:{}", gradient());
    run_output(&model, &image, &output);
}

/// `stream --output` into a folder that does not exist.
fn run_output(model: &str, source: &str, output: &str) {
    run(&["stream", "--model", model, "--source", source, "--output", output])
        .one_error_line(&["writing ", "no-such-dir/out.jsonl: No such file"]);
}

#[test]
fn an_answer_past_the_models_positions_is_refused_before_any_work() {
    // 62 prompt tokens + 1000 would pass the tiny model's 1024 positions,
    // where its RoPE table ends.
    let (model, image) = (tiny(), gradient());
    let args = [
        "caption",
        "--model",
        &model,
        "--image",
        &image,
        "--max-new-tokens",
        "1000",
    ];
    run(&args).one_error_line(&[
        "max_new_tokens 1000",
        "would reach position 1061, past the 1024 positions of model tiny",
    ]);
}

#[test]
fn a_format_1_decoder_goes_to_the_gpu_provider_which_this_build_lacks() {
    let model = repo("models/tiny-format1").display().to_string();
    let image = gradient();
    run(&["caption", "--model", &model, "--image", &image, "--device", "cuda"])
        .one_error_line(&["registering the cuda execution provider", "not enabled in this build"]);
}
