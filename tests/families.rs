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

/// Qwen2.5-VL: each picture's grid from its own size, window attention,
/// multimodal RoPE; one picture and two in one prompt. The prompt's ids,
/// its length and the greedy answer are transformers', whole and with the
/// prompt fed in chunks that cut through the pictures.
#[test]
fn qwen2_5_vl_answers_as_transformers_does() {
    let Some((dir, expected)) = family_model("qwen2_5_vl") else {
        return;
    };
    let mut model = load(&dir);
    let max_new = expected["max_new_tokens"].as_u64().unwrap() as usize;
    let image_token = {
        let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        tokenizer.token_to_id("<|image_pad|>").unwrap()
    };
    for case in expected["cases"].as_array().unwrap() {
        let pictures: Vec<PathBuf> = case["pictures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| repo().join(p.as_str().unwrap()))
            .collect();
        let grids: Vec<usize> = case["grids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| numbers(g).iter().product::<u64>() as usize)
            .collect();
        let prompt = model.prompt.build_images(None, &grids).unwrap();
        let prompt_ids: Vec<u64> = prompt
            .ids_with_placeholder(i64::from(image_token))
            .iter()
            .map(|&id| id as u64)
            .collect();
        assert_eq!(
            prompt_ids,
            numbers(&case["prompt_ids"]),
            "{pictures:?}: the prompt's ids"
        );
        let answer: Vec<u32> = numbers(&case["answer_ids"]).iter().map(|&id| id as u32).collect();
        let images: Vec<ImageInput<'_>> = pictures.iter().map(|p| ImageInput::File(p)).collect();
        for chunk in [None, Some(5)] {
            let cache = cache(&model, PolicyKind::Full, 1.0);
            let mut generator = Generator::new(&mut model, cache).unwrap();
            generator.set_prefill_chunk(chunk);
            let generation = generator
                .generate(&images, None, &params(max_new), &mut |_| {})
                .unwrap();
            assert_eq!(generation.prompt_tokens, prompt_ids.len());
            assert_eq!(generation.token_ids, answer, "{pictures:?}, prefill chunk {chunk:?}");
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
