//! An eval dataset file (JSON Lines) through `eval::dataset::load`, strict
//! and not: line splitting, UTF-8, JSON, kinds, pictures.
//!
//! Contract: an error is one line, never a panic; every non-blank line is
//! either a sample or a skipped line with its number (strict: an error, or
//! the same samples with none skipped); an accepted sample has a prompt,
//! at most `MAX_IMAGES` pictures that exist, and a kind they agree with.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use elastic_edge::eval::dataset::{load, PromptKind, MAX_IMAGES, MAX_LINE_BYTES};
use elastic_edge_fuzz::assert_one_line;
use libfuzzer_sys::fuzz_target;

/// A folder with one real picture (`pic.png`) for lines to name.
fn folder() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("fuzz-dataset")
            .tempdir()
            .expect("a temporary folder");
        std::fs::write(
            dir.path().join("pic.png"),
            include_bytes!("../../tests/data/resize/pattern_1x1.png"),
        )
        .expect("the picture");
        dir
    })
}

/// Lines `load` must account for: all but blank ones.
fn counted_lines(data: &[u8]) -> usize {
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    if data.is_empty() {
        return 0;
    }
    body.split(|&b| b == b'\n')
        .filter(|line| !std::str::from_utf8(line).is_ok_and(|text| text.trim().is_empty()))
        .count()
}

fuzz_target!(|data: &[u8]| {
    // Longer lines take another path, tested in the library's tests.
    assert!(data.len() < MAX_LINE_BYTES, "run with -max_len below {MAX_LINE_BYTES}");
    let path: PathBuf = folder().path().join("data.jsonl");
    std::fs::write(&path, data).expect("writing the dataset");
    let lines = data.split(|&b| b == b'\n').count();
    let counted = counted_lines(data);

    let lenient = load(&path, false);
    let strict = load(&path, true);
    match &lenient {
        Ok((samples, skipped)) => {
            assert!(!samples.is_empty());
            assert_eq!(samples.len() + skipped.len(), counted, "lines lost or counted twice");
            let mut numbers: Vec<usize> = samples
                .iter()
                .map(|s| s.line)
                .chain(skipped.iter().map(|s| s.line))
                .collect();
            numbers.sort_unstable();
            numbers.dedup();
            assert_eq!(numbers.len(), counted, "two results for one line");
            assert!(numbers.iter().all(|&n| (1..=lines).contains(&n)));
            for skip in skipped {
                assert_one_line(&skip.reason);
            }
            for sample in samples {
                assert!(!sample.prompt.trim().is_empty());
                assert!(sample.images.len() <= MAX_IMAGES);
                assert!(sample.images.iter().all(|p| p.is_file()));
                match sample.kind {
                    PromptKind::Text => assert!(sample.images.is_empty()),
                    PromptKind::MultiImage => assert!(sample.images.len() >= 2),
                    _ => {}
                }
            }
        }
        Err(e) => {
            assert_one_line(&e.to_string());
            assert!(strict.is_err(), "strict accepts what lenient refuses");
        }
    }
    match strict {
        Ok((samples, skipped)) => {
            assert!(skipped.is_empty());
            let (lenient_samples, lenient_skipped) = lenient.expect("lenient refuses what strict accepts");
            assert!(lenient_skipped.is_empty());
            assert_eq!(samples.len(), lenient_samples.len());
        }
        Err(e) => assert_one_line(&e.to_string()),
    }
});
