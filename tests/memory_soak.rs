//! The camera memory's soak: 2,000 frames through `stream --memory` on the
//! tiny model with a small budget. A test binary of its own, so no other
//! test runs beside it and its resident memory is the binary's alone.

use std::path::Path;
use std::process::Command;

use image::{Rgb, RgbImage};
use serde_json::Value;

const FRAMES: usize = 2000;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[test]
fn two_thousand_frames_in_a_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..7u8 {
        RgbImage::from_fn(32, 32, |x, y| {
            Rgb([i * 35, (x * 7) as u8, (y * 7 + u32::from(i) * 20) as u8])
        })
        .save(dir.path().join(format!("{i:02}.png")))
        .unwrap();
    }
    let questions = dir.path().join("questions.jsonl");
    std::fs::write(
        &questions,
        "{\"at_frame\": 500, \"question\": \"What did you see at first?\"}\n\
         {\"at_frame\": 1999, \"question\": \"What do you see now?\"}\n",
    )
    .unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
    let budget = 64 * 1024;
    let output = Command::new(env!("CARGO_BIN_EXE_elastic-edge"))
        .arg("stream")
        .args(["--model", &model.display().to_string(), "--threads", "1"])
        .args(["--source", &format!("dir:{}", dir.path().display()), "--loop"])
        .args(["--max-frames", &FRAMES.to_string(), "--kv-budget", &budget.to_string()])
        .args(["--memory", "--max-new-tokens", "4"])
        .args(["--questions", &questions.display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (answers, frames): (Vec<&Value>, Vec<&Value>) = lines.iter().partition(|r| r.get("answer").is_some());
    assert_eq!(frames.len(), FRAMES);
    assert_eq!(answers.len(), 2, "{stderr}");
    assert_eq!(answers[0]["frame_id"], 500);

    let max_positions = frames[0]["max_positions"].as_u64().unwrap();
    for record in lines.iter() {
        assert!(record["pool_bytes"].as_u64().unwrap() <= budget);
        assert!(record["max_position"].as_u64().unwrap() < max_positions, "{record}");
        assert!(record["cache_entries"].as_u64().unwrap() <= record["pool_slots"].as_u64().unwrap());
    }
    let last = frames[FRAMES - 1];
    assert!(
        last["rebases"].as_u64().unwrap() > 0,
        "2,000 frames pass the tiny model's positions"
    );
    assert!(last["evicted"].as_u64().unwrap() + last["merged"].as_u64().unwrap() > 0);
    assert!(last["frames_in_memory"].as_u64().unwrap() >= 1);

    // Memory flat: the resident set after frame 200 and at the end.
    let resident = |i: usize| frames[i]["resident_bytes"].as_i64().unwrap();
    if resident(200) > 0 {
        let growth = resident(FRAMES - 1) - resident(200);
        assert!(growth.abs() <= 1 << 20, "resident memory moved by {growth} bytes");
    }
    // Time flat: frames 200-400 against the last 200.
    let frame_ms =
        |range: std::ops::Range<usize>| median(range.map(|i| frames[i]["frame_ms"].as_f64().unwrap()).collect());
    let (early, late) = (frame_ms(200..400), frame_ms(FRAMES - 200..FRAMES));
    assert!(
        late <= 1.5 * early,
        "median frame time {early:.2} ms early, {late:.2} ms late"
    );
}
