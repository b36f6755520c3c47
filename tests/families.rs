//! The model families beyond the demo's, end to end: tiny random-weight
//! exports (`python -m export.families --selftest --keep .cache/models`,
//! which scripts/test.sh runs) against the answers transformers gave for
//! the same pictures and prompt.
//!
//! Without the exports the tests say so and pass, unless
//! `ELASTIC_EDGE_REQUIRE_FAMILY_MODELS` is set (scripts/test.sh sets it).

use std::path::{Path, PathBuf};

use elastic_edge::generate::{GenerateParams, Generator, ImageInput, Sampling};
use elastic_edge::kv::{KeepRatio, KvBudget, KvCache, KvPool, PolicyConfig, PolicyKind, PoolBacking};
use elastic_edge::model::{LoadOptions, Model};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny export of `family`, or `None` (with a note) when it is not built.
fn family_model(family: &str) -> Option<(PathBuf, Value)> {
    // Built by scripts/build-family-models.sh.
    let dir = repo().join(".cache/models").join(format!("tiny-{family}"));
    match std::fs::read_to_string(dir.join("expected.json")) {
        Ok(text) => Some((dir, serde_json::from_str(&text).unwrap())),
        Err(_) if std::env::var_os("ELASTIC_EDGE_REQUIRE_FAMILY_MODELS").is_none() => {
            eprintln!(
                "note: {} is not built (cd scripts && ../.cache/venv/bin/python -m export.families --selftest \
                 --keep ../.cache/models); skipped",
                dir.display()
            );
            None
        }
        Err(err) => panic!("{}: {err}: scripts/test.sh builds it", dir.display()),
    }
}

fn load(dir: &Path) -> Model {
    Model::load(
        dir,
        &LoadOptions {
            threads: Some(1),
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

fn cache(model: &Model, kind: PolicyKind, keep: f64) -> KvCache {
    let shape = model.manifest.kv_shape();
    let budget = KvBudget::Tokens(512);
    let pool = KvPool::with_budget(shape, budget.bytes(shape.bytes_per_slot()), &PoolBacking::Anonymous).unwrap();
    KvCache::new(pool, kind, &PolicyConfig::default(), KeepRatio::new(keep).unwrap()).unwrap()
}

fn numbers(value: &Value) -> Vec<u64> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

fn params(max_new_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_new_tokens,
        sampling: Sampling::GREEDY,
        stop_strings: Vec::new(),
        ignore_stop: false,
    }
}

/// Every family against transformers with its own Hugging Face processor
/// (LLaVA: CLIPImageProcessor; Idefics3/SmolVLM without splitting: its
/// two Lanczos resizes; Qwen2.5-VL: each picture's grid from its own size,
/// window attention, multimodal RoPE; Qwen2-VL: the same without windows),
/// one picture and two in one prompt:
/// the prompt's ids are the processor's, and the greedy answer is
/// transformers', whole and with the prompt fed in chunks that cut
/// through the pictures.
#[test]
fn every_family_answers_as_transformers_does() {
    for family in ["llava", "idefics3", "qwen2_5_vl", "qwen2_vl"] {
        let Some((dir, expected)) = family_model(family) else {
            continue;
        };
        let mut model = load(&dir);
        let max_new = expected["max_new_tokens"].as_u64().unwrap() as usize;
        let image_token = {
            let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
            tokenizer
                .token_to_id(expected["image_token"].as_str().unwrap())
                .unwrap()
        };
        for case in expected["cases"].as_array().unwrap() {
            let pictures: Vec<PathBuf> = case["pictures"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| repo().join(p.as_str().unwrap()))
                .collect();
            let user_text = case["user_text"].as_str();
            let images: Vec<ImageInput<'_>> = pictures.iter().map(|p| ImageInput::File(p)).collect();
            let answer: Vec<u32> = numbers(&case["answer_ids"]).iter().map(|&id| id as u32).collect();
            for chunk in [None, Some(5)] {
                let cache = cache(&model, PolicyKind::Full, 1.0);
                let mut generator = Generator::new(&mut model, cache).unwrap();
                let layouts: Vec<_> = images.iter().map(|&i| generator.picture_layout(i).unwrap()).collect();
                let prompt = generator.model().prompt.build_pictures(user_text, &layouts).unwrap();
                let prompt_ids: Vec<u64> = prompt
                    .ids_with_placeholder(i64::from(image_token))
                    .iter()
                    .map(|&id| id as u64)
                    .collect();
                assert_eq!(
                    prompt_ids,
                    numbers(&case["prompt_ids"]),
                    "{family} {pictures:?}: the prompt's ids"
                );
                generator.set_prefill_chunk(chunk);
                let generation = generator
                    .generate(&images, user_text, &params(max_new), &mut |_| {})
                    .unwrap();
                assert_eq!(generation.prompt_tokens, prompt_ids.len());
                assert_eq!(
                    generation.token_ids, answer,
                    "{family} {pictures:?}, prefill chunk {chunk:?}"
                );
            }
        }
    }
}

/// Compression over multimodal RoPE: Elastic Cache merges and evicts
/// entries whose three positions differ, and an answer still comes; the
/// cache-index positions of the paper's reference variant are refused with
/// one clear error.
#[test]
fn qwen2_5_vl_compresses_under_elastic_cache() {
    let Some((dir, expected)) = family_model("qwen2_5_vl") else {
        return;
    };
    let mut model = load(&dir);
    let case = &expected["cases"][1];
    let pictures: Vec<PathBuf> = case["pictures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| repo().join(p.as_str().unwrap()))
        .collect();
    let images: Vec<ImageInput<'_>> = pictures.iter().map(|p| ImageInput::File(p)).collect();
    let elastic = cache(&model, PolicyKind::Elastic, 0.5);
    let mut generator = Generator::new(&mut model, elastic).unwrap();
    let generation = generator.generate(&images, None, &params(12), &mut |_| {}).unwrap();
    assert!(
        generation.cache.merged + generation.cache.evicted > 0,
        "{:?}",
        generation.cache
    );
    assert!(generation.cache_entries <= generation.prompt_tokens);
    assert!(!generation.token_ids.is_empty());

    let reference = cache(&model, PolicyKind::ElasticRef, 0.5);
    let Err(err) = Generator::new(&mut model, reference) else {
        panic!("cache-index positions were accepted under multimodal RoPE");
    };
    assert!(err.to_string().contains("multimodal RoPE"), "{err}");
}

/// A picture the resize rule cannot size (a side over 200 times the other)
/// and a prompt the pool cannot hold: one error line each, naming what
/// would work, and a non-zero exit.
#[test]
fn qwen2_5_vl_bad_pictures_and_small_budgets_are_one_line() {
    let Some((dir, expected)) = family_model("qwen2_5_vl") else {
        return;
    };
    let scratch = std::env::temp_dir().join(format!("ee-families-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let thin = scratch.join("thin.png");
    image::RgbImage::new(1000, 4).save(&thin).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_elastic-edge"))
            .arg("caption")
            .arg("--model")
            .arg(&dir)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        stderr
    };
    let err = run(&["--image", thin.to_str().unwrap()]);
    assert!(err.contains("aspect ratio 250.0 is over 200"), "{err}");

    let picture = repo().join(expected["cases"][0]["pictures"][0].as_str().unwrap());
    let err = run(&[
        "--image",
        picture.to_str().unwrap(),
        "--policy",
        "full",
        "--kv-budget",
        "20tokens",
    ]);
    let needed = expected["cases"][0]["prompt_ids"].as_array().unwrap().len() + 64;
    assert!(err.contains(&format!("--kv-budget {needed}tokens")), "{err}");
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// A camera memory over a dynamic-resolution model: frames of two sizes
/// (their own grids, so their own rows and skipped positions), compressed
/// under the budget and re-based when positions run out, questions
/// answered; the same memory over the split SmolVLM model's tiles.
#[test]
fn memories_hold_frames_of_their_own_sizes() {
    use elastic_edge::memory::{Memory, MemoryOptions};
    use std::time::{Duration, SystemTime};
    let mut runs = vec![(repo().join("models/tiny-idefics3-split"), 40)];
    if let Some((dir, _)) = family_model("qwen2_5_vl") {
        runs.push((dir, 400));
    }
    let frames: Vec<image::RgbImage> = ["chelsea-crop-61x93", "coffee-crop-130x47"]
        .iter()
        .map(|name| {
            image::open(repo().join(format!("models/fixtures/qwen2vl/{name}.png")))
                .unwrap()
                .to_rgb8()
        })
        .collect();
    for (dir, count) in runs {
        let mut model = load(&dir);
        let max_positions = model.manifest.max_positions;
        let shape = model.manifest.kv_shape();
        let pool = KvPool::with_capacity(shape, 400, &PoolBacking::Anonymous).unwrap();
        let cache = KvCache::new(pool, PolicyKind::Elastic, &PolicyConfig::default(), KeepRatio::FULL).unwrap();
        let mut generator = Generator::new(&mut model, cache).unwrap();
        let options = MemoryOptions {
            captions: false,
            caption_prompt: None,
            caption_params: params(4),
        };
        let mut memory = Memory::new(&mut generator, options, false).unwrap();
        let mut rebases = 0;
        for i in 0..count {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + i);
            let frame = &frames[i as usize % 2];
            memory
                .add_frame(&mut generator, i, at, ImageInput::Rgb8(frame), &mut |_| {})
                .unwrap_or_else(|e| panic!("{}: frame {i}: {e}", dir.display()));
            let figures = memory.figures(&generator);
            assert!(figures.cache_entries <= figures.pool_slots);
            assert!(figures.max_position < max_positions, "frame {i}: {figures:?}");
            rebases = figures.rebases;
            if i % 20 == 19 {
                memory
                    .ask(&mut generator, "What did you see?", &params(4), &mut |_| {})
                    .unwrap_or_else(|e| panic!("{}: question after frame {i}: {e}", dir.display()));
            }
        }
        if count >= 400 {
            assert!(rebases > 0, "{}: {count} frames never re-based", dir.display());
        }
    }
}

/// `doctor` on an exported dynamic-resolution model: what a picture of
/// `--picture`'s size costs under its own grid, and how many a budget holds.
#[test]
fn doctor_sizes_a_dynamic_resolution_picture_by_its_grid() {
    let Some((dir, _)) = family_model("qwen2_5_vl") else {
        return;
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_elastic-edge"))
        .arg("doctor")
        .arg("--model")
        .arg(&dir)
        .args(["--picture", "1280x720", "--kv-budget", "4MiB", "--keep", "0.5"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    // smart_resize(720, 1280) within 28 x 28 x 48 pixels: 140 x 252, 5 x 9 tokens.
    assert!(
        stdout.contains("smart_resize to 252x140 (within 3136 to 37632 pixels), 5 x 9 tokens: 45 image tokens"),
        "{stdout}"
    );
    assert!(stdout.contains("up to 48 tokens a picture"), "{stdout}");
}
