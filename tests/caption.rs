//! End to end on real graphs: the committed tiny model (random weights, the
//! same graph contract as the demo model) against the ids its PyTorch
//! reference produced, and the demo model against transformers when it has
//! been built (scripts/build-demo-model.sh; scripts/test.sh builds it).

use std::path::{Path, PathBuf};

use elastic_edge::generate::{GenerateParams, Generator, ImageInput, Sampling, StopReason};
use elastic_edge::kv::policy::MergeWindow;
use elastic_edge::kv::{KeepRatio, KvBudget, KvCache, KvPool, PolicyConfig, PolicyKind, PoolBacking};
use elastic_edge::model::{LoadOptions, Model};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> Value {
    let path = repo().join("models/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
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

fn cache(model: &Model, kind: PolicyKind, keep: f64, budget: KvBudget) -> KvCache {
    cache_with(model, kind, keep, budget, &PolicyConfig::default())
}

fn cache_with(model: &Model, kind: PolicyKind, keep: f64, budget: KvBudget, config: &PolicyConfig) -> KvCache {
    let shape = model.manifest.kv_shape();
    let pool = KvPool::with_budget(shape, budget.bytes(shape.bytes_per_slot()), &PoolBacking::Anonymous).unwrap();
    KvCache::new(pool, kind, config, KeepRatio::new(keep).unwrap()).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Generates greedily and returns the ids with the stop token appended when
/// one ended generation (the fixtures' convention).
fn greedy(generator: &mut Generator<'_>, image: Option<&Path>, text: Option<&str>, max_new_tokens: usize) -> Vec<u32> {
    let params = GenerateParams {
        max_new_tokens,
        sampling: Sampling::GREEDY,
        stop_strings: Vec::new(),
        ignore_stop: false,
    };
    let image = image.map(ImageInput::File);
    let generation = generator
        .generate(image.as_slice(), text, &params, &mut |_| {})
        .unwrap();
    let mut ids = generation.token_ids.clone();
    ids.extend(generation.stop_token);
    assert_eq!(
        generation.stop == StopReason::StopToken,
        generation.stop_token.is_some()
    );
    ids
}

/// A step whose policy reads no attention sums runs the fast graph (full
/// and local always, the paper's Elastic Cache while generating: it evicts
/// at a fixed point); the others the graph with sums (H2O, and the product
/// `elastic`, whose decode eviction reads the sums of every step). The answers are the
/// PyTorch reference's either way, and a single-graph load runs only the
/// graph with sums.
#[test]
fn steps_that_read_no_scores_run_the_fast_graph() {
    let expected = fixture("tiny_expected.json");
    let case = &expected["cases"][1];
    let image = repo().join(case["image"].as_str().unwrap());
    let text = case["user_text"].as_str();
    let want = ids(&case["expected_ids"]);
    let dir = repo().join("models/tiny");
    for single_graph in [false, true] {
        let options = LoadOptions {
            threads: Some(1),
            single_graph,
            ..LoadOptions::default()
        };
        for (kind, keep) in [
            (PolicyKind::Full, 1.0),
            (PolicyKind::Local, 1.0),
            (PolicyKind::ElasticPaper, 1.0),
            (PolicyKind::Elastic, 1.0),
            (PolicyKind::H2o, 1.0),
        ] {
            let mut model = Model::load(&dir, &options).unwrap();
            let cache = cache(&model, kind, keep, KvBudget::Tokens(512));
            let mut generator = Generator::new(&mut model, cache).unwrap();
            let got = greedy(&mut generator, Some(&image), text, want.len());
            drop(generator);
            assert_eq!(got, want, "{kind}, single graph {single_graph}");
            let runs = model.decoder_graph_runs();
            let decode_steps = want.len() as u64 - 1;
            match (single_graph, kind) {
                (true, _) => assert_eq!(runs.fast, 0, "{kind}: {runs:?}"),
                (false, PolicyKind::Full | PolicyKind::Local) => {
                    assert_eq!(runs.main, 0, "{kind}: {runs:?}");
                    assert!(runs.fast > decode_steps, "{kind}: {runs:?}");
                }
                (false, PolicyKind::ElasticPaper) => {
                    assert!(runs.main >= 1, "the prefill is scored: {runs:?}");
                    assert_eq!(runs.fast, decode_steps, "generation reads no sums: {runs:?}");
                }
                (false, _) => assert_eq!(runs.fast, 0, "{kind} scores every step: {runs:?}"),
            }
        }
    }
}

/// The committed tiny model in both decoder formats: format 2 (the pool is
/// the graph's cache) and format 1 (past and new K/V apart), same weights.
const TINY_FORMATS: [&str; 2] = ["models/tiny", "models/tiny-format1"];

#[test]
fn tiny_model_full_cache_matches_pytorch() {
    let expected = fixture("tiny_expected.json");
    for dir in TINY_FORMATS {
        let mut model = load(&repo().join(dir));
        let cache = cache(&model, PolicyKind::Full, 1.0, KvBudget::Tokens(512));
        let mut generator = Generator::new(&mut model, cache).unwrap();
        let max_new = expected["max_new_tokens"].as_u64().unwrap() as usize;
        for case in expected["cases"].as_array().unwrap() {
            let image = case["image"].as_str().map(|p| repo().join(p));
            let text = case["user_text"].as_str();
            let got = greedy(&mut generator, image.as_deref(), text, max_new);
            assert_eq!(got, ids(&case["expected_ids"]), "{dir} case {text:?}");
        }
    }
}

#[test]
fn elastic_with_room_and_keep_one_equals_the_full_cache() {
    // Nothing is over the keep ratio and the pool has room: no compression.
    let expected = fixture("tiny_expected.json");
    let mut model = load(&repo().join("models/tiny"));
    let cache = cache(&model, PolicyKind::Elastic, 1.0, KvBudget::Tokens(90));
    let mut generator = Generator::new(&mut model, cache).unwrap();
    for case in expected["cases"].as_array().unwrap() {
        let image = case["image"].as_str().map(|p| repo().join(p));
        let got = greedy(&mut generator, image.as_deref(), case["user_text"].as_str(), 16);
        assert_eq!(got, ids(&case["expected_ids"]));
        assert_eq!(generator.cache().stats().merged + generator.cache().stats().evicted, 0);
    }
}

#[test]
fn a_prompt_longer_than_the_pool_is_chunked_and_compressed() {
    // 24 slots for prompts of 44 to 69 tokens: prefill runs in chunks with
    // compression in between, and the pool is never exceeded. Splitting
    // what the pool takes into smaller decoder runs (5 tokens, or one at a
    // time) moves no compression: the same tokens and the same counts.
    let expected = fixture("tiny_expected.json");
    let mut model = load(&repo().join("models/tiny"));
    for kind in [
        PolicyKind::Elastic,
        PolicyKind::H2o,
        PolicyKind::Local,
        PolicyKind::ElasticRef,
    ] {
        let cache = cache(&model, kind, 1.0, KvBudget::Tokens(24));
        let mut generator = Generator::new(&mut model, cache).unwrap();
        for case in expected["cases"].as_array().unwrap() {
            let image = case["image"].as_str().map(|p| repo().join(p));
            let mut runs = Vec::new();
            for chunk in [None, Some(5), Some(1)] {
                generator.set_prefill_chunk(chunk);
                let got = greedy(&mut generator, image.as_deref(), case["user_text"].as_str(), 16);
                assert!(!got.is_empty());
                let stats = generator.cache().stats();
                assert!(stats.peak_len <= 24, "{kind}: {stats:?}");
                assert!(stats.merged + stats.evicted > 0, "{kind}: nothing was compressed");
                runs.push((got, stats.merged, stats.evicted, generator.cache().pool().len()));
            }
            assert_eq!(runs[0], runs[1], "{kind}: runs of 5 tokens changed the result");
            assert_eq!(runs[0], runs[2], "{kind}: runs of 1 token changed the result");
        }
    }
}

#[test]
fn full_cache_refuses_a_prompt_the_pool_cannot_hold() {
    let mut model = load(&repo().join("models/tiny"));
    let cache = cache(&model, PolicyKind::Full, 1.0, KvBudget::Tokens(30));
    let mut generator = Generator::new(&mut model, cache).unwrap();
    let params = GenerateParams::default();
    let err = generator
        .generate(&[], Some("Hello, who are you?"), &params, &mut |_| panic!("no text"))
        .unwrap_err();
    // The smallest budget that works, named: the prompt and the 64-token answer.
    let err = err.to_string();
    let needed: usize = err
        .split(" entries needed")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(needed > 30 + 64, "{err}");
    assert!(err.contains(&format!("--kv-budget {needed}tokens")), "{err}");
}

/// The demo model, full cache, against transformers' greedy ids (fp32; fp16
/// and int4 against what ONNX Runtime's Python API gave the exporter); each
/// variant skipped (with a note) when it has not been built. fp32 and int4
/// run the fast graph here (full reads no attention sums).
#[test]
fn demo_model_full_cache_matches_transformers() {
    let expected = fixture("demo_expected.json");
    for variant in ["fp32", "fp16", "int4"] {
        let dir = repo().join(".cache/models").join(format!("demo-{variant}"));
        if !dir.join("manifest.json").is_file() {
            eprintln!("note: {} not built; run scripts/build-demo-model.sh", dir.display());
            continue;
        }
        let mut model = load(&dir);
        let cache = cache(&model, PolicyKind::Full, 1.0, KvBudget::Tokens(512));
        let mut generator = Generator::new(&mut model, cache).unwrap();
        let max_new = expected["max_new_tokens"].as_u64().unwrap() as usize;
        for case in expected["cases"].as_array().unwrap() {
            // The pre-resized copy: PIL's resize is the reference's, ours is
            // checked bit-exact separately.
            let image = repo().join(case["image_resized"].as_str().unwrap());
            let got = greedy(&mut generator, Some(&image), None, max_new);
            let want = ids(&case["expected_ids"][variant]);
            assert_eq!(got, want, "{variant} {}", image.display());
        }
    }
}

/// Every policy at keep 0.5 generates what the independent Python reference
/// of the policies (scripts/reference, on the PyTorch decoder) generates:
/// the Rust policies are the algorithms they claim to be. Demo cases are
/// skipped when the demo model has not been built.
#[test]
fn policies_match_the_python_reference() {
    let expected = fixture("policy_expected.json");
    let mut checked = 0;
    for (model_name, dir) in [
        ("tiny", "models/tiny"),
        ("tiny", "models/tiny-format1"),
        ("demo", ".cache/models/demo-fp32"),
    ] {
        let dir = repo().join(dir);
        if !dir.join("manifest.json").is_file() {
            eprintln!("note: {} not built; its policy cases are skipped", dir.display());
            continue;
        }
        let mut model = load(&dir);
        for case in expected["cases"].as_array().unwrap() {
            if case["model"] != model_name {
                continue;
            }
            let kind: PolicyKind = case["policy"].as_str().unwrap().parse().unwrap();
            let keep = case["keep"].as_f64().unwrap();
            let max_new = if model_name == "tiny" { 16 } else { 32 };
            let merge_count_bias = case["merged_bias"].as_bool().unwrap();
            // Every knob is explicit in the fixture; a null window is off.
            let mut config: PolicyConfig = serde_json::from_value(case["settings"].clone()).unwrap();
            config.merge_window = Some(config.merge_window.unwrap_or(MergeWindow::Off));
            assert_eq!(config.merge_count_bias, merge_count_bias);
            // The prompt's token kinds are the reference's.
            let image_tokens = case["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| i.as_i64() == Some(-1))
                .count();
            let prompt = model
                .prompt
                .build(case["user_text"].as_str(), (image_tokens > 0).then_some(image_tokens))
                .unwrap();
            let letters: String = prompt.kinds.iter().map(|k| k.letter()).collect();
            assert_eq!(letters, case["prompt_kinds"].as_str().unwrap(), "prompt kinds");
            let cache = cache_with(&model, kind, keep, KvBudget::Tokens(512), &config);
            let mut generator = Generator::new(&mut model, cache).unwrap();
            let image = case["image"].as_str().map(|p| repo().join(p));
            let got = greedy(&mut generator, image.as_deref(), case["user_text"].as_str(), max_new);
            let bias = if merge_count_bias { " +ln(m) bias" } else { "" };
            let label = format!(
                "{model_name} case {} {kind} {}{bias}",
                case["fixture_case"], case["settings_label"]
            );
            assert_eq!(got, ids(&case["expected_ids"]), "{label}");
            assert_eq!(
                generator.cache().pool().len() as u64,
                case["final_len"].as_u64().unwrap(),
                "{label}: entries at the end"
            );
            checked += 1;
        }
    }
    assert!(checked >= 96, "only {checked} cases checked");
}

/// Teacher forcing scores the answer generation would give: the greedy
/// token is the least surprising at every step, and without compression the
/// policy does not change the score.
#[test]
fn scoring_agrees_with_greedy_generation() {
    let expected = fixture("tiny_expected.json");
    let case = &expected["cases"][1];
    let image = repo().join(case["image"].as_str().unwrap());
    let text = case["user_text"].as_str();
    let greedy_ids = ids(&case["expected_ids"]);
    let mut model = load(&repo().join("models/tiny"));

    let full = cache(&model, PolicyKind::Full, 1.0, KvBudget::Tokens(512));
    let mut generator = Generator::new(&mut model, full).unwrap();
    let (nll_full, count) = generator.score(&[ImageInput::File(&image)], text, &greedy_ids).unwrap();
    assert_eq!(count, greedy_ids.len());
    assert!(nll_full.is_finite() && nll_full > 0.0);
    // At every position the greedy token beats the same prefix with another
    // token in its place.
    for position in [0, 3, 7] {
        let prefix = &greedy_ids[..=position];
        let (best, _) = generator.score(&[ImageInput::File(&image)], text, prefix).unwrap();
        for other in [5u32, 100, 300] {
            if other == prefix[position] {
                continue;
            }
            let mut changed = prefix.to_vec();
            changed[position] = other;
            let (worse, _) = generator.score(&[ImageInput::File(&image)], text, &changed).unwrap();
            assert!(worse > best, "position {position}: {worse} <= {best}");
        }
    }
    drop(generator);

    let roomy = cache(&model, PolicyKind::Elastic, 1.0, KvBudget::Tokens(512));
    let mut generator = Generator::new(&mut model, roomy).unwrap();
    let (nll_elastic, _) = generator.score(&[ImageInput::File(&image)], text, &greedy_ids).unwrap();
    // Not bit for bit: full runs the fast graph, Elastic Cache's prefill the
    // graph with attention sums, and the two sum in other orders (the
    // exporter checks them within 1e-4; 5e-7 here).
    assert!(
        (nll_full - nll_elastic).abs() < 1e-5 * nll_full.abs(),
        "{nll_full} vs {nll_elastic}"
    );

    let tight = cache(&model, PolicyKind::Elastic, 0.3, KvBudget::Tokens(512));
    let mut generator = Generator::new(&mut model, tight).unwrap();
    let (nll_compressed, _) = generator.score(&[ImageInput::File(&image)], text, &greedy_ids).unwrap();
    assert!(nll_compressed != nll_full, "compression changes the score");
}

/// `eval` encodes a prompt once and starts every policy from it: that gives
/// exactly what encoding it again gives (ids, cache, scores), for every
/// policy, on a prompt with two pictures.
#[test]
fn an_encoded_prompt_gives_what_encoding_it_again_gives() {
    let expected = fixture("tiny_expected.json");
    let case = &expected["cases"][1];
    let image = repo().join(case["image"].as_str().unwrap());
    let text = case["user_text"].as_str();
    let mut model = load(&repo().join("models/tiny"));
    let params = GenerateParams {
        max_new_tokens: 16,
        sampling: Sampling::GREEDY,
        stop_strings: Vec::new(),
        ignore_stop: false,
    };
    for kind in PolicyKind::ALL {
        let cache = cache(&model, kind, 0.4, KvBudget::Tokens(512));
        let mut generator = Generator::new(&mut model, cache).unwrap();
        let images = [ImageInput::File(&image), ImageInput::File(&image)];
        let direct = generator.generate(&images, text, &params, &mut |_| {}).unwrap();
        let direct_cache = (
            generator.cache().pool().len(),
            direct.cache.merged,
            direct.cache.evicted,
        );
        let (nll, count) = generator.score(&images, text, &direct.token_ids).unwrap();

        let encoded = generator
            .encode_prompt(&images, text)
            .unwrap()
            .expect("the prompt fits the pool");
        let again = generator.generate_encoded(&encoded, &params, &mut |_| {}).unwrap();
        assert_eq!(again.token_ids, direct.token_ids, "{kind}");
        assert_eq!(again.prompt_tokens, direct.prompt_tokens, "{kind}");
        assert_eq!(
            (generator.cache().pool().len(), again.cache.merged, again.cache.evicted),
            direct_cache,
            "{kind}: the cache"
        );
        let (nll_again, count_again) = generator.score_encoded(&encoded, &direct.token_ids).unwrap();
        assert_eq!(count_again, count, "{kind}: the tokens scored");
        // An encoded prompt comes from the graph with attention sums (any
        // policy may start from it); `score` under full or local runs the
        // fast graph: equal to float rounding, not bit for bit.
        assert!(
            (nll_again - nll).abs() <= 1e-5 * nll.abs(),
            "{kind}: the score {nll_again} against {nll}"
        );
    }
}
