//! `elastic-edge bench` through the binary, on the committed tiny model:
//! the report's fields are present and agree with each other. No timed
//! assertion: only that times are positive and consistent.

use std::process::{Command, Output};

use serde_json::Value;

fn tiny() -> String {
    format!("{}/models/tiny", env!("CARGO_MANIFEST_DIR"))
}

fn elastic_edge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_elastic-edge"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn one_error_line(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(1), "exit code");
    assert!(output.stdout.is_empty(), "nothing on stdout");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("[bench]")).collect();
    assert_eq!(lines.len(), 1, "one error line, got: {stderr}");
    lines[0].to_string()
}

const PROMPT: usize = 48;
const GEN: usize = 70;

fn run_json(extra: &[&str]) -> Value {
    let tiny = tiny();
    let (p, g) = (PROMPT.to_string(), GEN.to_string());
    let mut args = vec![
        "bench",
        "--model",
        &tiny,
        "--prompt-tokens",
        &p,
        "--gen-tokens",
        &g,
        "--threads",
        "1",
        "--json",
    ];
    args.extend_from_slice(extra);
    let output = elastic_edge(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("stdout is one JSON object")
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} is a number in {v}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is a whole number in {v}"))
}

#[test]
fn full_and_elastic_report_consistent_fields() {
    let report = run_json(&[
        "--policies",
        "full,elastic",
        "--keep",
        "0.2",
        "--bandwidth-buffer",
        "8MiB",
        "--bandwidth-passes",
        "2",
    ]);
    assert_eq!(report["model"], "tiny");
    // 2 layers x (k, v) x 2 KV heads x 16 dims x 4 bytes.
    assert_eq!(u(&report, "kv_bytes_per_entry"), 512);
    // The graph and the weights it shares with the fast graph (not that
    // graph too: a step runs one of them).
    let size = |file: &str| std::fs::metadata(format!("{}/{file}", tiny())).unwrap().len();
    let decoder = size("decoder.onnx") + size("decoder.weights");
    assert_eq!(u(&report, "decoder_weight_bytes"), decoder);
    let bandwidth = f(&report["bandwidth"], "bytes_per_s");
    assert!(bandwidth > 0.0);
    assert_eq!(u(&report["bandwidth"], "buffer_bytes"), 8 << 20);

    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    let (full, elastic) = (&cases[0], &cases[1]);
    assert_eq!(full["policy"], "full");
    assert_eq!(elastic["policy"], "elastic");
    assert_eq!(f(elastic, "keep"), 0.2);
    // A slot is 512 bytes of K/V plus 20 bytes of metadata per layer.
    let per_slot = 512 + 2 * 20;
    for case in cases {
        assert_eq!(u(case, "prompt_tokens"), PROMPT as u64);
        assert_eq!(
            u(case, "gen_tokens"),
            GEN as u64,
            "exactly the tokens asked for, through stop tokens"
        );
        assert_eq!(u(case, "pool_bytes"), u(case, "pool_slots") * per_slot);
        assert!(u(case, "cache_entries") <= u(case, "pool_slots"));
        for key in [
            "time_to_first_token_ms",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "decode_run_ms",
            "mean_step_ms",
            "floor_ms",
            "step_over_floor",
        ] {
            assert!(f(case, key) > 0.0, "{key} in {case}");
        }
        assert!(f(case, "decode_run_ms") <= f(case, "decode_ms"));
        let share = f(case, "outside_run_share");
        assert!((0.0..1.0).contains(&share), "{share}");
        // The step time at 64 generated tokens; 128 is not reached.
        let steps = case["step_ms"].as_object().unwrap();
        assert!(steps["64"].as_f64().unwrap() > 0.0);
        assert_eq!(steps.len(), 1, "{steps:?}");
        assert!(u(case, "peak_rss_bytes") > u(case, "pool_bytes"));
        assert_eq!(case["first_tokens"].as_array().unwrap().len(), 16);
        // The floor is the weights plus the K/V read, over the bandwidth.
        let floor = (decoder as f64 + f(case, "mean_kv_bytes_read")) / bandwidth * 1e3;
        assert!((f(case, "floor_ms") - floor).abs() <= 1e-9 * floor, "{case}");
    }
    // Full: sized for the sequence, holds every token fed back (the last
    // generated one is not); each step read the prompt and the answer so far.
    assert_eq!(u(full, "pool_slots"), (PROMPT + GEN) as u64);
    assert_eq!(u(full, "cache_entries"), (PROMPT + GEN - 1) as u64);
    assert_eq!(u(full, "merged") + u(full, "evicted"), 0);
    let mean_read = PROMPT as f64 + (GEN - 2) as f64 / 2.0;
    assert_eq!(f(full, "mean_kv_bytes_read"), mean_read * 512.0);
    // Elastic at keep 0.2: a pool of a fifth of the sequence plus one slot,
    // and it compressed to fit.
    let fifth = ((PROMPT + GEN) as f64 * 0.2).ceil() as u64 + 1;
    assert_eq!(u(elastic, "pool_slots"), fifth);
    assert!(u(elastic, "cache_entries") <= u(full, "cache_entries"));
    assert!(u(elastic, "pool_bytes") * 4 < u(full, "pool_bytes"));
    assert!(u(elastic, "merged") + u(elastic, "evicted") > 0);
    assert!(f(elastic, "mean_kv_bytes_read") < f(full, "mean_kv_bytes_read"));
}

#[test]
fn one_budget_for_every_run_and_no_bandwidth() {
    let report = run_json(&["--policies", "full,local", "--kv-budget", "200tokens", "--no-bandwidth"]);
    assert!(report["bandwidth"].is_null());
    for case in report["cases"].as_array().unwrap() {
        assert_eq!(u(case, "pool_slots"), 200);
        assert!(case["floor_ms"].is_null() && case["step_over_floor"].is_null());
    }
}

#[test]
fn markdown_table_by_default() {
    let tiny = tiny();
    let output = elastic_edge(&[
        "bench",
        "--model",
        &tiny,
        "--prompt-tokens",
        "20",
        "--gen-tokens",
        "5",
        "--policies",
        "full,h2o",
        "--no-bandwidth",
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| 20 + 5 |")).collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(
        rows[0].contains("| full |") && rows[1].contains("| h2o 0.2 |"),
        "{stdout}"
    );
    assert!(stdout.contains("| prompt + gen | policy | pool MiB |"), "{stdout}");
    // Progress went to stderr.
    assert!(String::from_utf8_lossy(&output.stderr).contains("[bench] full"));
}

#[test]
fn the_prompt_is_exact_and_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny();
    let mut prompts = Vec::new();
    for name in ["a.json", "b.json"] {
        let path = dir.path().join(name);
        let output = elastic_edge(&[
            "bench",
            "--model",
            &tiny,
            "--prompt-tokens",
            "700",
            "--gen-tokens",
            "1",
            "--policies",
            "full",
            "--warmup-tokens",
            "0",
            "--no-bandwidth",
            "--write-prompt",
            path.to_str().unwrap(),
        ]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let ids: Vec<u32> = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        prompts.push(ids);
    }
    assert_eq!(prompts[0].len(), 700);
    assert_eq!(prompts[0], prompts[1]);
    assert!(prompts[0].iter().all(|&id| id < 384), "inside the tiny vocabulary");
    // The benchmark text through the model's tokenizer, repeated and cut.
    let tokenizer = tokenizers::Tokenizer::from_file(format!("{tiny}/tokenizer.json")).unwrap();
    let text = tokenizer
        .encode_fast(elastic_edge::bench::PROMPT_TEXT, false)
        .unwrap()
        .get_ids()
        .to_vec();
    let expected: Vec<u32> = text.iter().copied().cycle().take(700).collect();
    assert_eq!(prompts[0], expected);
}

#[test]
fn memory_bandwidth_alone() {
    let output = elastic_edge(&[
        "bench",
        "--memory-bandwidth",
        "--bandwidth-buffer",
        "8MiB",
        "--bandwidth-passes",
        "2",
        "--threads",
        "2",
        "--json",
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let bw: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(u(&bw, "threads"), 2);
    assert_eq!(u(&bw, "passes"), 2);
    assert!(f(&bw, "bytes_per_s") >= f(&bw, "median_bytes_per_s"));
}

#[test]
fn a_prompt_the_budget_cannot_hold_is_one_error_line() {
    let tiny = tiny();
    let output = elastic_edge(&[
        "bench",
        "--model",
        &tiny,
        "--prompt-tokens",
        "100",
        "--gen-tokens",
        "10",
        "--kv-budget",
        "64tokens",
        "--policies",
        "full,elastic",
    ]);
    let line = one_error_line(&output);
    assert!(line.contains("110 entries needed, 64 fit"), "{line}");

    // Longer than the model's positions (the tiny model has 1024).
    let output = elastic_edge(&["bench", "--model", &tiny, "--long-context", "--prompt-tokens", "8"]);
    let line = one_error_line(&output);
    assert!(line.contains("2560 positions, but model tiny has 1024"), "{line}");

    let output = elastic_edge(&["bench", "--model", &tiny, "--prompt-tokens", "0"]);
    let line = one_error_line(&output);
    assert!(
        line.contains("--prompt-tokens and --gen-tokens must be at least 1"),
        "{line}"
    );

    let output = elastic_edge(&["bench", "--model", &tiny, "--bandwidth-buffer", "10tokens"]);
    assert_eq!(output.status.code(), Some(2), "a usage error from the parser");
}

#[test]
fn prefill_in_chunks_gives_the_same_tokens() {
    // A pool that holds the prompt: the policy compresses once, after the
    // prompt, from the same attention sums whatever the chunks.
    let args = ["--policies", "full,h2o", "--no-bandwidth", "--kv-budget", "200tokens"];
    let plain = run_json(&[&args[..], &["--prefill-chunk", "0"]].concat());
    let chunked = run_json(&[&args[..], &["--prefill-chunk", "7"]].concat());
    assert!(plain["prefill_chunk"].is_null(), "0 is the whole prompt");
    assert_eq!(chunked["prefill_chunk"], 7);
    assert_eq!(run_json(&args)["prefill_chunk"], 128, "the default is caption's");
    for (a, b) in plain["cases"]
        .as_array()
        .unwrap()
        .iter()
        .zip(chunked["cases"].as_array().unwrap())
    {
        assert_eq!(a["policy"], b["policy"]);
        assert_eq!(a["first_tokens"], b["first_tokens"], "{}", a["policy"]);
        assert_eq!(a["cache_entries"], b["cache_entries"]);
    }
}
