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
fn doctor_loads_onnxruntime_and_sizes_the_pool() {
    let output = elastic_edge(&["doctor", "--kv-budget", "64MiB"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("onnxruntime:"), "{stdout}");
    // 30 layers x 2 x 3 heads x 64 x 2 bytes + 30 x 16 metadata = 23520 bytes a slot.
    assert!(stdout.contains("kv pool: 2853 slots"), "{stdout}");
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
    let too_small = elastic_edge(&["doctor", "--kv-budget", "1KiB"]);
    assert_eq!(too_small.status.code(), Some(1));
    assert!(stderr_line(&too_small).contains("KV budget too small"));

    // Room for the protected entries but not for a new token as well.
    let two_slots = elastic_edge(&["doctor", "--kv-budget", "2tokens"]);
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
