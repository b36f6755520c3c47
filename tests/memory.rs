//! Camera memory on the committed tiny model: many frames in one bounded
//! context, questions over it, positions re-based by rotating stored keys.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use elastic_edge::error::Error;
use elastic_edge::generate::{GenerateParams, Generator, ImageInput, Sampling};
use elastic_edge::kv::{KeepRatio, KvCache, KvPool, PolicyConfig, PolicyKind, PoolBacking};
use elastic_edge::memory::{Memory, MemoryOptions};
use elastic_edge::model::{LoadOptions, Model};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> Model {
    let options = LoadOptions {
        threads: Some(1),
        ..LoadOptions::default()
    };
    Model::load(&repo().join("models/tiny"), &options).unwrap()
}

fn cache(model: &Model, kind: PolicyKind, config: &PolicyConfig, slots: usize) -> KvCache {
    let pool = KvPool::with_capacity(model.manifest.kv_shape(), slots, &PoolBacking::Anonymous).unwrap();
    KvCache::new(pool, kind, config, KeepRatio::FULL).unwrap()
}

fn greedy(max_new_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_new_tokens,
        sampling: Sampling::GREEDY,
        stop_strings: Vec::new(),
        ignore_stop: false,
    }
}

/// The tiny model's frames: two pictures in turn, so frames differ.
fn frame(i: u64) -> image::RgbImage {
    let shade = if i.is_multiple_of(2) { 40 } else { 200 };
    image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([shade, (x * 8) as u8, (y * 8) as u8]))
}

fn at(i: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + i)
}

#[test]
fn a_memory_keeps_its_budget_and_positions_over_many_frames() {
    let mut model = tiny();
    let max_positions = model.manifest.max_positions;
    let cache = cache(&model, PolicyKind::Elastic, &PolicyConfig::default(), 120);
    let budget = cache.pool().bytes();
    let mut generator = Generator::new(&mut model, cache).unwrap();
    let options = MemoryOptions {
        captions: true,
        caption_prompt: None,
        caption_params: greedy(6),
    };
    let mut memory = Memory::new(&mut generator, options, false).unwrap();
    let mut seen_rebase = false;
    for i in 0..150 {
        let added = memory
            .add_frame(&mut generator, i, at(i), ImageInput::Rgb8(&frame(i)), &mut |_| {})
            .unwrap();
        assert!(added.caption.is_some());
        let figures = memory.figures(&generator);
        assert!(figures.pool_bytes <= budget);
        assert!(figures.cache_entries <= figures.pool_slots);
        assert!(figures.max_position < max_positions, "frame {i}: {figures:?}");
        assert!(figures.frames_in_memory >= 1 && figures.frames_in_memory as u64 <= figures.frames_seen);
        seen_rebase |= figures.rebases > 0;
        if i % 40 == 39 {
            let answer = memory
                .ask(&mut generator, "What did you see first?", &greedy(5), &mut |_| {})
                .unwrap();
            assert!(!answer.token_ids.is_empty() || answer.stop_token.is_some());
        }
    }
    // 150 frames of ~30 positions is past the tiny model's 1024.
    assert!(seen_rebase, "positions were never re-based");
    let figures = memory.figures(&generator);
    assert_eq!(figures.frames_seen, 150);
    assert_eq!(figures.questions, 3);
    assert!(figures.evicted + figures.merged > 0);
    // The newest frame is always in memory.
    assert_eq!(memory.frame_ids().last(), Some(149));
}

/// With no sink, StreamingLLM keeps one contiguous window, so a re-base is
/// a uniform shift: rotating the stored keys must leave what the model
/// computes unchanged (the answer's NLL to float precision, the same ids).
#[test]
fn a_uniform_rebase_leaves_the_model_unchanged() {
    let config = PolicyConfig {
        sink: 0,
        ..PolicyConfig::default()
    };
    let run = |rebase: bool| {
        let mut model = tiny();
        let cache = cache(&model, PolicyKind::Local, &config, 90);
        let mut generator = Generator::new(&mut model, cache).unwrap();
        let mut memory = Memory::new(&mut generator, MemoryOptions::default(), false).unwrap();
        for i in 0..12 {
            memory
                .add_frame(&mut generator, i, at(i), ImageInput::Rgb8(&frame(i)), &mut |_| {})
                .unwrap();
        }
        let before = generator.cache().next_position();
        if rebase {
            // Ask for room up to the end of the range: the map must apply.
            let room = generator.model().manifest.max_positions - before + 1;
            let map = generator.rebase_positions(room).unwrap().expect("a re-base");
            assert!(generator.cache().next_position() < before);
            assert_eq!(
                map.next(),
                generator.cache().pool().len(),
                "a uniform shift closes no gap"
            );
        }
        let nll = memory
            .score(&mut generator, "What is in the picture?", &[5, 17, 40, 2])
            .unwrap();
        let answer = memory.ask(&mut generator, "And now?", &greedy(8), &mut |_| {}).unwrap();
        (nll.0, answer.token_ids, generator.cache().next_position())
    };
    let (plain_nll, plain_ids, plain_next) = run(false);
    let (moved_nll, moved_ids, moved_next) = run(true);
    assert!(moved_next < plain_next);
    assert!(
        (plain_nll - moved_nll).abs() < 1e-4 * plain_nll.abs().max(1.0),
        "NLL {plain_nll} before, {moved_nll} after the re-base"
    );
    assert_eq!(plain_ids, moved_ids);
}

#[test]
fn a_memory_refuses_what_cannot_work() {
    let mut model = tiny();
    // Too small for the system turn and one frame.
    let small = cache(&model, PolicyKind::Elastic, &PolicyConfig::default(), 12);
    let mut generator = Generator::new(&mut model, small).unwrap();
    let err = Memory::new(&mut generator, MemoryOptions::default(), false).unwrap_err();
    let Error::BudgetTooSmall {
        min_slots, min_bytes, ..
    } = err
    else {
        panic!("{err}")
    };
    assert!(min_slots > 12);
    assert!(err_text(min_bytes).contains("bytes"));
    drop(generator);

    let full = cache(&model, PolicyKind::Full, &PolicyConfig::default(), 200);
    let mut generator = Generator::new(&mut model, full).unwrap();
    assert!(matches!(
        Memory::new(&mut generator, MemoryOptions::default(), false),
        Err(Error::Policy(_))
    ));
    drop(generator);

    let ok = cache(&model, PolicyKind::Elastic, &PolicyConfig::default(), 200);
    let mut generator = Generator::new(&mut model, ok).unwrap();
    let mut memory = Memory::new(&mut generator, MemoryOptions::default(), false).unwrap();
    for bad in [0, 10_000] {
        let err = memory
            .ask(&mut generator, "Anything?", &greedy(bad), &mut |_| {})
            .unwrap_err();
        assert!(matches!(err, Error::Request(_)), "{err}");
    }
    let err = memory.ask(&mut generator, "  ", &greedy(4), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("empty prompt"), "{err}");
}

fn err_text(min_bytes: u64) -> String {
    format!("{min_bytes} bytes")
}
