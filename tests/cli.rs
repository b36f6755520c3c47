//! The binary end to end: ONNX Runtime is found without any variable set by
//! the user, and bad input gives one clear line and a non-zero exit.

use std::process::{Command, Output};

fn elastic_edge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_elastic-edge"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stderr_line(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one error line, got: {stderr}");
    stderr
}

#[test]
fn doctor_loads_onnxruntime_checks_the_model_and_sizes_the_pool() {
    let tiny = format!("{}/models/tiny", env!("CARGO_MANIFEST_DIR"));
    let output = elastic_edge(&["doctor", "--model", &tiny, "--kv-budget", "1MiB"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("onnxruntime 1.31.1:"), "{stdout}");
    assert!(stdout.contains("CPUExecutionProvider"), "{stdout}");
    // The CPU-only library from PyPI: the reason is given, not a crash.
    assert!(
        stdout.contains("--device cuda: unavailable: ") && stdout.contains("not enabled in this build"),
        "{stdout}"
    );
    assert!(
        stdout.contains("model tiny:") && stdout.contains("files check out"),
        "{stdout}"
    );
    // The manifest's KV bytes per token (2 layers x 2 x 2 heads x 16 x 4
    // bytes) and its image tokens.
    assert!(stdout.contains("KV per token: 512 bytes (f32)"), "{stdout}");
    assert!(
        stdout.contains("a 1280x720 picture (--picture): resized to 32x32: 16 image tokens"),
        "{stdout}"
    );
    assert!(
        stdout.contains("pictures of --picture's size it holds: 118 at full cache"),
        "{stdout}"
    );
    // 2 layers x 2 (k, v) x 2 heads x 16 x 4 bytes + 2 x 20 metadata = 552 bytes a slot.
    assert!(
        stdout.contains("kv pool: 1899 slots, 1048248 bytes (552 per slot)"),
        "{stdout}"
    );
    assert!(stdout.contains("the largest --kv-budget is"), "{stdout}");

    // Without a model, the geometry flags (default: the demo decoder, f16).
    let output = elastic_edge(&["doctor", "--model", "/nonexistent", "--kv-budget", "64MiB"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(stdout.contains("model: no model in /nonexistent"), "{stdout}");
    // 30 layers x 2 x 3 heads x 64 x 2 bytes + 30 x 20 metadata = 23640 bytes a slot.
    assert!(stdout.contains("kv pool: 2838 slots"), "{stdout}");
}

#[test]
fn a_library_that_is_not_onnxruntime_is_named_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"not an ELF file").unwrap();
    let output = elastic_edge(&["--onnxruntime", fake.to_str().unwrap(), "doctor"]);
    assert_eq!(output.status.code(), Some(1));
    let line = stderr_line(&output);
    assert!(line.contains(fake.to_str().unwrap()), "{line}");
    assert!(line.contains("dlopen failed:"), "the dlopen reason is shown: {line}");
}

#[test]
fn a_missing_library_from_the_environment_is_an_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_elastic-edge"))
        .arg("doctor")
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let line = stderr_line(&output);
    assert!(
        line.contains("/nonexistent/libonnxruntime.so") && line.contains("ORT_DYLIB_PATH"),
        "{line}"
    );
}

#[test]
fn bad_budgets_and_ratios_are_one_line_errors() {
    let too_small = elastic_edge(&["doctor", "--model", "/nonexistent", "--kv-budget", "1KiB"]);
    assert_eq!(too_small.status.code(), Some(1));
    assert!(stderr_line(&too_small).contains("KV budget too small"));

    // Room for the protected entries but not for a new token as well.
    let two_slots = elastic_edge(&["doctor", "--model", "/nonexistent", "--kv-budget", "2tokens"]);
    assert_eq!(two_slots.status.code(), Some(1));
    assert!(stderr_line(&two_slots).contains("at least 3 are needed"));

    for (flag, value) in [
        ("--keep", "0"),
        ("--keep", "1.5"),
        ("--kv-budget", "12XB"),
        ("--policy", "lru"),
    ] {
        let output = elastic_edge(&["doctor", flag, value]);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}");
        assert!(String::from_utf8_lossy(&output.stderr).contains(value));
    }
}

#[test]
fn an_unmappable_pool_file_is_an_error() {
    let output = elastic_edge(&["doctor", "--kv-file", "/nonexistent-dir/pool.kv"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr_line(&output).contains("/nonexistent-dir/pool.kv"));
}

fn tiny() -> String {
    format!("{}/models/tiny", env!("CARGO_MANIFEST_DIR"))
}

fn gradient() -> String {
    format!("{}/models/tiny/gradient.png", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn caption_prints_the_caption_and_json_has_the_figures() {
    let output = elastic_edge(&[
        "caption",
        "--model",
        &tiny(),
        "--image",
        &gradient(),
        "--max-new-tokens",
        "8",
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!output.stdout.is_empty());

    let output = elastic_edge(&[
        "caption",
        "--model",
        &tiny(),
        "--image",
        &gradient(),
        "--image",
        &gradient(),
        "--json",
        "--max-new-tokens",
        "8",
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for line in &lines {
        for field in [
            "caption",
            "timings_ms",
            "pool_bytes",
            "cache_entries",
            "merged",
            "evicted",
        ] {
            assert!(line.get(field).is_some(), "{field} missing in {line}");
        }
        assert!(line["timings_ms"]["prefill_ms"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(
        lines[0]["caption"], lines[1]["caption"],
        "the same image, the same greedy caption"
    );
}

/// Runs `caption` on the tiny model and expects one error line containing
/// `needle`, a non-zero exit, and nothing on stdout.
fn caption_fails(extra: &[&str], needle: &str) {
    let mut args = vec!["caption", "--model"];
    let tiny = tiny();
    args.push(&tiny);
    args.extend_from_slice(extra);
    let output = elastic_edge(&args);
    assert_eq!(output.status.code(), Some(1), "{args:?}");
    assert!(
        output.stdout.is_empty(),
        "nothing that looks like a caption: {:?}",
        String::from_utf8_lossy(&output.stdout)
    );
    let line = stderr_line(&output);
    assert!(line.contains(needle), "{args:?}: expected {needle:?} in {line}");
}

#[test]
fn bad_images_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.png");
    caption_fails(&["--image", missing.to_str().unwrap()], "missing.png");

    let empty = dir.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    caption_fails(&["--image", empty.to_str().unwrap()], "empty.png");

    let corrupt = dir.path().join("corrupt.jpg");
    std::fs::write(&corrupt, b"\xff\xd8\xff\xe0 this is not really a jpeg").unwrap();
    caption_fails(&["--image", corrupt.to_str().unwrap()], "corrupt.jpg");

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, b"plain text, not a picture").unwrap();
    caption_fails(&["--image", text.to_str().unwrap()], "notes.txt");

    // A PNG whose header claims 30000 x 30000: refused before decoding.
    let huge = dir.path().join("huge.png");
    std::fs::write(&huge, png_header_only(30_000, 30_000)).unwrap();
    caption_fails(&["--image", huge.to_str().unwrap()], "huge.png");
}

#[test]
fn bad_prompts_models_and_devices_are_one_line_errors() {
    caption_fails(&["--image", &gradient(), "--prompt", "  "], "prompt is empty");
    caption_fails(
        &["--image", &gradient(), "--policy", "full", "--kv-budget", "30tokens"],
        "the smallest budget that holds them is --kv-budget ",
    );
    caption_fails(
        &["--image", &gradient(), "--device", "cuda"],
        "GroupQueryAttention on --device cuda takes float16 only",
    );

    let output = elastic_edge(&["caption", "--model", "/nonexistent/model", "--image", &gradient()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr_line(&output).contains("/nonexistent/model"));

    // An altered file: copy the tiny model and flip one byte of its table.
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let table = dir.path().join("embed_tokens.bin");
    let mut bytes = std::fs::read(&table).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&table, bytes).unwrap();
    let output = elastic_edge(&[
        "caption",
        "--model",
        dir.path().to_str().unwrap(),
        "--image",
        &gradient(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let line = stderr_line(&output);
    assert!(line.contains("embed_tokens.bin") && line.contains("sha256"), "{line}");
}

/// The signature and IHDR chunk of a PNG of the given size, and no data.
fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn eval_sweeps_policies_and_keeps_and_writes_complete_reports() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    std::fs::write(
        &data,
        format!(
            "{{\"id\": \"g\", \"image\": \"{}\", \"prompt\": \"Describe the picture.\"}}\n\
             {{\"id\": \"t\", \"prompt\": \"Hello, who are you?\", \"reference\": \"I am a tiny model.\"}}\n\
             {{\"id\": \"broken\"\n",
            gradient()
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let args = [
        "eval",
        "--model",
        &tiny(),
        "--data",
        data.to_str().unwrap(),
        "--policies",
        "local,elastic",
        "--keep",
        "0.3,0.7",
        "--max-new-tokens",
        "8",
        "--out",
        out.to_str().unwrap(),
    ];
    let output = elastic_edge(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("line 3"),
        "the bad line is reported"
    );
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 1 + 2 * 2, "{csv}");
    assert!(csv.lines().nth(1).unwrap().starts_with("full,1,2,1.000000,"), "{csv}");
    for name in ["results.md", "results.svg", "references.jsonl"] {
        assert!(out.join(name).is_file(), "{name}");
    }
    assert!(!out.join("results.csv.partial").exists());

    // A rerun reuses the cached full-cache answers; --strict stops at line 3.
    let before = std::fs::read_to_string(out.join("references.jsonl")).unwrap();
    assert!(elastic_edge(&args).status.success());
    assert_eq!(std::fs::read_to_string(out.join("references.jsonl")).unwrap(), before);
    let mut strict = args.to_vec();
    strict.push("--strict");
    let output = elastic_edge(&strict);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr_line(&output).contains("line 3"));
}

/// `--reference-model`: another build's full-cache answers score every
/// row, full included (the tiny model's format-1 build: the same weights,
/// so the same greedy answers); a model with another tokenizer is refused.
#[test]
fn eval_against_a_reference_model_scores_every_row_by_its_answers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    std::fs::write(
        &data,
        format!(
            "{{\"id\": \"g\", \"image\": \"{}\", \"prompt\": \"Describe the picture.\"}}\n\
             {{\"id\": \"t\", \"prompt\": \"Hello, who are you?\"}}\n",
            gradient()
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let format1 = format!("{}/models/tiny-format1", env!("CARGO_MANIFEST_DIR"));
    let model = tiny();
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            &model,
            "--data",
            data.to_str().unwrap(),
            "--policies",
            "local",
            "--keep",
            "0.5",
            "--max-new-tokens",
            "8",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        elastic_edge(&args)
    };
    let output = eval(&["--reference-model", &format1]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2, "{csv}");
    // tiny's full cache generated its own answers: those of the format-1 build.
    assert!(csv.lines().nth(1).unwrap().starts_with("full,1,2,1.000000,"), "{csv}");
    // The answers cached are the reference model's: the plain run adds its own.
    let cached = |out: &std::path::Path| {
        std::fs::read_to_string(out.join("references.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(cached(&out), 2);
    assert!(eval(&[]).status.success());
    assert_eq!(cached(&out), 4);

    // Another tokenizer file: its ids might mean other words.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    for entry in std::fs::read_dir(&format1).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), other.join(entry.file_name())).unwrap();
    }
    let tokenizer = std::fs::read_to_string(other.join("tokenizer.json")).unwrap();
    let changed = format!(" {tokenizer}"); // another file; loads the same
    assert_ne!(changed, tokenizer);
    std::fs::write(other.join("tokenizer.json"), &changed).unwrap();
    let manifest = std::fs::read_to_string(other.join("manifest.json")).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    use sha2::Digest;
    let sha: String = sha2::Sha256::digest(changed.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    manifest["file_hashes"]["tokenizer.json"]["sha256"] = sha.into();
    manifest["file_hashes"]["tokenizer.json"]["bytes"] = changed.len().into();
    std::fs::write(other.join("manifest.json"), manifest.to_string()).unwrap();
    let output = eval(&["--reference-model", other.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr_line(&output).contains("its tokenizer is not --model's"),
        "{}",
        stderr_line(&output)
    );
}

/// `caption --together`: every picture in one prompt, one answer (its
/// record names them all and its prompt holds both pictures' tokens); a
/// picture that does not decode fails the one prompt with one line.
#[test]
fn caption_together_answers_once_about_every_picture() {
    let model = tiny();
    let picture = format!("{}/models/fixtures/images/chelsea-224.png", env!("CARGO_MANIFEST_DIR"));
    let caption = |extra: &[&str]| {
        let mut args = vec!["caption", "--model", &model, "--max-new-tokens", "4", "--json"];
        args.extend_from_slice(extra);
        elastic_edge(&args)
    };
    let records = |output: &std::process::Output| -> Vec<serde_json::Value> {
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };
    let gradient = gradient();
    let apart = records(&caption(&["--image", &gradient, "--image", &picture]));
    assert_eq!(apart.len(), 2);
    let together = records(&caption(&["--image", &gradient, "--image", &picture, "--together"]));
    assert_eq!(together.len(), 1);
    assert_eq!(together[0]["images"], serde_json::json!([gradient, picture]));
    // The tiny model's 16 image tokens once more, with the template's
    // image prefix and suffix around them.
    let one = apart[0]["prompt_tokens"].as_u64().unwrap();
    let both = together[0]["prompt_tokens"].as_u64().unwrap();
    assert!(both >= one + 16, "{one} -> {both}");

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let output = caption(&["--image", &gradient, "--image", broken.to_str().unwrap(), "--together"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    assert!(stderr_line(&output).contains("broken.png"), "{}", stderr_line(&output));
}

#[test]
fn doctor_and_caption_share_their_cache_defaults_and_help_explains_them() {
    // doctor's were 64 MiB at keep 0.5, caption's 32 MiB at keep 1.
    let output = elastic_edge(&["doctor", "--model", &tiny()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let output = elastic_edge(&[
        "caption",
        "--model",
        &tiny(),
        "--image",
        &gradient(),
        "--json",
        "--max-new-tokens",
        "2",
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let record: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let slots = record["pool_slots"].as_u64().unwrap();
    assert!(
        stdout.contains(&format!("kv pool: {slots} slots, {} bytes", record["pool_bytes"])),
        "caption's pool is {slots} slots: {stdout}"
    );
    assert_eq!(record["keep"], 1.0);
    assert!(stdout.contains("policy elastic at keep 1:"), "{stdout}");
    // caption --help says what the pool, the keep ratio and the policies are.
    let help = elastic_edge(&["caption", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    for words in [
        "The pool is its memory: one block sized once from --kv-budget",
        "The keep ratio (--keep) is the share of the tokens processed so far",
        "elastic merges the least important entries",
        "h2o (keeps heavy hitters and recent tokens)",
        "local (keeps the first and the latest tokens: StreamingLLM)",
    ] {
        assert!(help.contains(words), "{words:?} not in caption --help");
    }
}

#[test]
fn eval_memory_frames_scores_each_policy_against_the_full_cache() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    let images = format!("{}/models/fixtures/images", env!("CARGO_MANIFEST_DIR"));
    let lines: String = ["astronaut", "chelsea", "coffee"]
        .iter()
        .map(|name| {
            format!("{{\"id\": \"{name}\", \"images\": [\"{images}/{name}-224.png\"], \"prompt\": \"What is it?\"}}\n")
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let out = dir.path().join("out");
    let run = |frames: &str| {
        elastic_edge(&[
            "eval",
            "--model",
            &tiny(),
            "--data",
            data.to_str().unwrap(),
            "--memory-frames",
            frames,
            "--policies",
            "local,elastic",
            "--keep",
            "0.5",
            "--max-new-tokens",
            "4",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let output = run("2");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let csv = std::fs::read_to_string(out.join("memory.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 3, "full, then local and elastic at 0.5: {csv}");
    // One sequence per distinct picture; the full cache is its own reference.
    assert_eq!(&rows[0][..5], ["full", "1", "3", rows[0][3], "1.000000"], "{csv}");
    assert_eq!(rows[0][8], "1.0000", "{csv}");
    assert_eq!((rows[1][0], rows[2][0]), ("local", "elastic"), "{csv}");
    let samples = std::fs::read_to_string(out.join("memory-samples.csv")).unwrap();
    assert_eq!(samples.lines().count(), 1 + 3 * 3, "{samples}");
    let md = std::fs::read_to_string(out.join("memory.md")).unwrap();
    assert!(md.contains("| 0.5 | local |"), "{md}");

    // More frames than distinct pictures: one clear line.
    let output = run("4");
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr_line(&output).contains("distinct pictures"));
}

fn checkpoint(name: &str) -> String {
    format!("{}/models/configs/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn doctor_sizes_a_qwen_checkpoint_from_its_config() {
    let output = elastic_edge(&[
        "doctor",
        "--model",
        &checkpoint("qwen2.5-vl-3b-instruct"),
        "--picture",
        "1280x720",
        "--kv-budget",
        "1GiB",
        "--keep",
        "0.5",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // ONNX Runtime is still checked first.
    assert!(stdout.contains("onnxruntime 1.31.1:"), "{stdout}");
    assert!(stdout.contains("Qwen2_5_VLForConditionalGeneration"), "{stdout}");
    assert!(
        stdout.contains("decoder: 36 layers, 2 KV heads of 128 (hidden 2048 / 16 heads)"),
        "{stdout}"
    );
    // 2 x 36 layers x 2 KV heads x 128 x 2 (or 4) bytes.
    assert!(
        stdout.contains("KV per token: 36864 bytes in f16, 73728 in f32"),
        "{stdout}"
    );
    // smart_resize(720, 1280, 28, ...) = (728, 1288): 26 x 46 merged patches.
    assert!(
        stdout.contains("picture 1280x720: smart_resize to 1288x728") && stdout.contains(": 1196 image tokens"),
        "{stdout}"
    );
    // 1 GiB / (36864 + 36 layers x 20 bytes of metadata) = 28569 slots.
    assert!(stdout.contains(": 28569 slots of 37584 bytes"), "{stdout}");
    assert!(
        stdout.contains("pictures it holds: 23 at full cache, about 47 at --keep 0.5 (policy elastic)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1758 slots at full cache: fits; about 879 at --keep 0.5: fits"),
        "{stdout}"
    );
    // A picture transformers refuses is one error line.
    let output = elastic_edge(&[
        "doctor",
        "--model",
        &checkpoint("qwen2.5-vl-3b-instruct"),
        "--picture",
        "3000x10",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let line = stderr_line(&output);
    assert!(line.contains("--picture") && line.contains("over 200"), "{line}");
}

#[test]
fn doctor_sizes_a_smolvlm_checkpoint_by_its_tiles() {
    let output = elastic_edge(&[
        "doctor",
        "--model",
        &checkpoint("smolvlm-instruct"),
        "--kv-budget",
        "1GiB",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("Idefics3ForConditionalGeneration"), "{stdout}");
    assert!(stdout.contains("decoder: 24 layers, 32 KV heads of 64"), "{stdout}");
    assert!(
        stdout.contains("KV per token: 196608 bytes in f16, 393216 in f32"),
        "{stdout}"
    );
    // The default picture, 1280x720: 1536x864, then 1536x1152 = 3 x 4 tiles
    // of 384 and the global image, 81 tokens each.
    assert!(
        stdout.contains("picture 1280x720: resized to 1536x864 (long side 1536), then 1536x1152")
            && stdout.contains("3 x 4 tiles of 384 + 1 global image = 13 images of 81 tokens: 1053 image tokens"),
        "{stdout}"
    );
    assert!(stdout.contains(": 5448 slots of 197088 bytes"), "{stdout}");
    // At the default keep of 1 there is no compressed figure.
    assert!(stdout.contains("pictures it holds: 5 at full cache\n"), "{stdout}");
    assert!(stdout.contains("1615 slots at full cache: fits\n"), "{stdout}");
    // A budget too small for the prompt says so.
    let output = elastic_edge(&[
        "doctor",
        "--model",
        &checkpoint("smolvlm-instruct"),
        "--kv-budget",
        "1000tokens",
    ]);
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("1615 slots at full cache: does not fit"));
}

#[test]
fn doctor_names_the_supported_families_for_another_architecture() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures": ["BertForMaskedLM"]}"#,
    )
    .unwrap();
    let output = elastic_edge(&["doctor", "--model", dir.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let line = stderr_line(&output);
    assert!(
        line.contains("config.json") && line.contains("BertForMaskedLM"),
        "{line}"
    );
    assert!(
        line.contains("Qwen2_5_VLForConditionalGeneration") && line.contains("LlavaForConditionalGeneration"),
        "{line}"
    );
    // A needed field missing: named, with the file.
    let config = std::fs::read_to_string(format!("{}/config.json", checkpoint("llava-1.5-7b"))).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["vision_config"].as_object_mut().unwrap().remove("patch_size");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let output = elastic_edge(&["doctor", "--model", dir.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let line = stderr_line(&output);
    assert!(
        line.contains("config.json") && line.contains("vision_config.patch_size"),
        "{line}"
    );
}
