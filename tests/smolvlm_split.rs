//! SmolVLM / Idefics3 image splitting end to end: the committed tiny split
//! model (`models/tiny-idefics3-split`, random weights) against what
//! transformers gave on the Hugging Face processor's inputs for the same
//! pictures (`models/fixtures/idefics3/tiny_split_expected.json`, written by
//! `python -m export.families --tiny-split`).

use std::path::PathBuf;

use elastic_edge::generate::{GenerateParams, Generator, ImageInput, Sampling};
use elastic_edge::kv::{KeepRatio, KvBudget, KvCache, KvPool, PolicyConfig, PolicyKind, PoolBacking};
use elastic_edge::model::{LoadOptions, Model};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn expected() -> Value {
    let path = repo().join("models/fixtures/idefics3/tiny_split_expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn load() -> Model {
    let options = LoadOptions {
        threads: Some(1),
        ..LoadOptions::default()
    };
    Model::load(&repo().join("models/tiny-idefics3-split"), &options).expect("tiny split model")
}

fn full_cache(model: &Model) -> KvCache {
    let shape = model.manifest.kv_shape();
    let pool = KvPool::with_budget(
        shape,
        KvBudget::Tokens(512).bytes(shape.bytes_per_slot()),
        &PoolBacking::Anonymous,
    )
    .expect("pool");
    KvCache::new(
        pool,
        PolicyKind::Full,
        &PolicyConfig::default(),
        KeepRatio::new(1.0).expect("keep"),
    )
    .expect("cache")
}

fn pictures(case: &Value) -> Vec<PathBuf> {
    let dir = repo().join("models/fixtures/idefics3");
    case["pictures"]
        .as_array()
        .expect("pictures")
        .iter()
        .map(|p| dir.join(p.as_str().expect("name")))
        .collect()
}

/// Greedy ids and the answer's teacher-forced NLL equal transformers' on
/// the processor's inputs, for one split picture and for two in one prompt
/// (each with its own rows and columns).
#[test]
fn split_pictures_give_transformers_ids_and_scores() {
    let fx = expected();
    let mut model = load();
    assert!(model.manifest.split().is_some());
    let cache = full_cache(&model);
    let mut generator = Generator::new(&mut model, cache).expect("generator");
    let params = GenerateParams {
        max_new_tokens: 16,
        sampling: Sampling::GREEDY,
        stop_strings: Vec::new(),
        ignore_stop: false,
    };
    for case in fx["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let paths = pictures(case);
        let images: Vec<ImageInput<'_>> = paths.iter().map(|p| ImageInput::File(p.as_path())).collect();
        let text = case["user_text"].as_str();
        let want: Vec<u32> = case["expected_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        let generation = generator
            .generate(&images, text, &params, &mut |_| {})
            .expect("generate");
        let mut got = generation.token_ids.clone();
        got.extend(generation.stop_token);
        assert_eq!(got, want, "{name}");
        assert_eq!(
            generation.prompt_tokens,
            case["input_ids"].as_array().expect("input_ids").len(),
            "{name}: the processor's prompt length"
        );
        let (nll, count) = generator.score(&images, text, &want).expect("score");
        let hf = case["expected_ids_nll"].as_f64().expect("nll");
        eprintln!(
            "{name}: NLL {nll} vs transformers {hf} (|diff| {:.2e})",
            (nll - hf).abs()
        );
        assert_eq!(count, want.len());
        // fp32 graphs against torch's fp32 in double log-softmax: 1e-6 a token.
        assert!((nll - hf).abs() < 1e-4, "{name}: NLL {nll} vs {hf}");
    }
}

/// The pictures' order matters: swapping them changes the score, so each
/// picture's rows go where its own tokens are.
#[test]
fn each_picture_keeps_its_own_rows() {
    let fx = expected();
    let case = &fx["cases"][1];
    let paths = pictures(case);
    assert_eq!(paths.len(), 2);
    let mut model = load();
    let cache = full_cache(&model);
    let mut generator = Generator::new(&mut model, cache).expect("generator");
    let answer: Vec<u32> = vec![20, 20, 20, 20];
    let text = case["user_text"].as_str();
    let forward = [ImageInput::File(&paths[0]), ImageInput::File(&paths[1])];
    let swapped = [ImageInput::File(&paths[1]), ImageInput::File(&paths[0])];
    let (a, _) = generator.score(&forward, text, &answer).expect("score");
    let (b, _) = generator.score(&swapped, text, &answer).expect("score");
    assert!((a - b).abs() > 1e-6, "{a} vs {b}");
}

/// A picture over the model's pixel cap is refused before decoding, with
/// one line that says why.
#[test]
fn a_picture_over_the_pixel_cap_is_one_clear_error() {
    let mut model = load();
    let cache = full_cache(&model);
    let mut generator = Generator::new(&mut model, cache).expect("generator");
    let params = GenerateParams::default();
    // A 9000 x 8000 header (72 megapixels) with no data behind it.
    let huge = b"P6\n9000 8000\n255\n\x01\x02".as_slice();
    let e = generator
        .generate(&[ImageInput::Bytes(huge)], None, &params, &mut |_| {})
        .expect_err("over the cap");
    let text = e.to_string();
    assert!(
        text.contains("9000x8000 = 72000000 pixels, more than the limit of 64000000"),
        "{text}"
    );
    assert!(!text.contains('\n'), "{text:?}");
}

/// `vision.split` is checked with the rest of the manifest: tiles of the
/// graph's input size, markers with `{r}` and `{c}`, and a batch axis on
/// the vision graph only with splitting.
#[test]
fn the_split_manifest_is_validated() {
    use elastic_edge::model::Manifest;
    let path = repo().join("models/tiny-idefics3-split/manifest.json");
    let text = std::fs::read_to_string(&path).expect("manifest");
    let good: Value = serde_json::from_str(&text).expect("json");
    let manifest = Manifest::parse(&text, &path).expect("the committed manifest");
    let split = manifest.split().expect("split");
    assert_eq!((split.longest_edge, split.tile, split.max_frames()), (96, 32, 10));
    let refused = |edit: &dyn Fn(&mut Value), needle: &str| {
        let mut v = good.clone();
        edit(&mut v);
        let e = Manifest::parse(&v.to_string(), &path).expect_err(needle);
        assert!(e.to_string().contains(needle), "{needle}: {e}");
    };
    refused(&|v| v["vision"]["split"]["tile"] = 16.into(), "field vision.split: ");
    refused(
        &|v| v["vision"]["split"]["tokens"]["row_col"] = "<row_{r}>".into(),
        "vision.split.tokens.row_col",
    );
    refused(
        &|v| v["vision"]["split"]["longest_edge"] = 4096.into(),
        "field vision.split",
    );
    // Without splitting the graph must take one picture.
    refused(
        &|v| {
            v["vision"].as_object_mut().expect("vision").remove("split");
        },
        "field graphs.vision.inputs: pixel_values has shape [String(\"N\"), Number(3), Number(32), Number(32)], expected [1, 3, 32, 32]",
    );
}

/// `caption --together` with two split pictures: one prompt, each picture
/// with its own rows and columns (the processor's prompt length); a picture
/// over the pixel cap is one error line and a failing exit.
#[test]
fn the_binary_captions_split_pictures_together_and_refuses_a_huge_one() {
    use std::process::Command;
    let fx = expected();
    let case = &fx["cases"][1];
    let paths = pictures(case);
    let model = repo().join("models/tiny-idefics3-split");
    let run = |images: &[&std::path::Path]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_elastic-edge"));
        command.args(["caption", "--model"]).arg(&model);
        for image in images {
            command.arg("--image").arg(image);
        }
        command
            .args([
                "--together",
                "--json",
                "--policy",
                "full",
                "--max-new-tokens",
                "16",
                "--prompt",
            ])
            .arg(case["user_text"].as_str().expect("text"));
        command.output().expect("the binary runs")
    };
    let output = run(&[&paths[0], &paths[1]]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    assert_eq!(json["prompt_tokens"], case["input_ids"].as_array().expect("ids").len());
    assert_eq!(json["tokens"], 16);

    let dir = tempfile::tempdir().expect("tempdir");
    let huge = dir.path().join("huge.ppm");
    std::fs::write(&huge, b"P6\n9000 8000\n255\n\x01\x02").expect("write");
    let output = run(&[&huge]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("more than the limit of 64000000"), "{stderr}");
}
