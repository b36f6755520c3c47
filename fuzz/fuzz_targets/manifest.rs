//! `manifest.json` text through parsing and every check `Manifest::load`
//! makes (dimensions, vision settings, file names, the graph contract).
//!
//! Contract: an error is one line, never a panic; an accepted manifest has
//! every dimension within the build's bounds, sizes computed from them that
//! do not overflow, preprocessing that validates, token ids inside the
//! vocabulary and every file name inside the model folder.
#![no_main]

use std::path::{Component, Path};

use elastic_edge::model::manifest::{
    DecoderFormat, Manifest, MAX_HEADS, MAX_HEAD_DIM, MAX_HIDDEN, MAX_IMAGE_TOKENS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB,
};
use elastic_edge_fuzz::assert_one_line;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `Manifest::load` reads the file as UTF-8 text.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = Path::new("/nonexistent/model");
    let manifest = match Manifest::parse(text, &dir.join("manifest.json")) {
        Ok(manifest) => manifest,
        Err(e) => return assert_one_line(&e.to_string()),
    };
    for (value, max) in [
        (manifest.layers, MAX_LAYERS),
        (manifest.heads, MAX_HEADS),
        (manifest.kv_heads, MAX_HEADS),
        (manifest.head_dim, MAX_HEAD_DIM),
        (manifest.hidden, MAX_HIDDEN),
        (manifest.vocab, MAX_VOCAB),
        (manifest.max_positions, MAX_POSITIONS),
    ] {
        assert!(
            (1..=max).contains(&value),
            "accepted a dimension {value} outside 1..={max}"
        );
    }
    assert!(manifest.max_positions >= 2);
    assert_eq!(manifest.heads % manifest.kv_heads, 0);
    assert!(manifest.rope_theta.is_finite() && manifest.rope_theta > 0.0);
    let shape = manifest.kv_shape();
    shape.validate().expect("an accepted manifest's KV shape");
    // No saturation: the checked product is what the pool sizes with.
    let kv = (shape.layers as u64) * 2 * (shape.row_len() as u64) * (shape.dtype.size() as u64);
    assert_eq!(shape.kv_bytes_per_slot(), kv);
    for id in [manifest.bos_token_id, manifest.eos_token_id].into_iter().flatten() {
        assert!((id as usize) < manifest.vocab);
    }
    assert!(manifest.stop_token_ids.iter().all(|&id| (id as usize) < manifest.vocab));
    assert_eq!(manifest.embed_tokens.shape, [manifest.vocab, manifest.hidden]);
    if let Some(vision) = &manifest.vision {
        let pre = manifest.preprocess().expect("a vision spec without preprocessing");
        pre.validate().expect("an accepted manifest's preprocessing");
        assert!(pre.output_len() <= 3 * 4096 * 4096);
        assert!((1..=MAX_IMAGE_TOKENS).contains(&vision.image_tokens));
        assert!(vision.image_tokens < manifest.max_positions);
        assert!(manifest.files.vision.is_some() && manifest.graphs.vision.is_some());
    } else {
        assert!(manifest.files.vision.is_none() && manifest.graphs.vision.is_none());
    }
    let files = &manifest.files;
    let names = [
        &files.decoder,
        &files.embed_tokens,
        &files.tokenizer,
        &manifest.embed_tokens.file,
    ]
    .into_iter()
    .chain(files.vision.as_ref())
    .chain(files.decoder_fast.as_ref())
    .chain(files.decoder_weights.as_ref())
    .chain(manifest.file_hashes.keys());
    for name in names {
        let path = dir.join(name);
        assert!(
            path.starts_with(dir) && path != dir && !path.components().any(|c| c == Component::ParentDir),
            "accepted the file name {name:?}, which is not inside the model folder"
        );
    }
    // Format 2 adds seqlens_k and total_sequence_length.
    let format_inputs = match manifest.decoder_format() {
        DecoderFormat::PastAndNew => 3,
        DecoderFormat::InPlace => 5,
    };
    assert_eq!(manifest.graphs.decoder.inputs.len(), format_inputs + 2 * manifest.layers);
    // A fast graph shares its weights with a format-2 graph that has scores.
    assert_eq!(files.decoder_fast.is_some(), files.decoder_weights.is_some());
    if files.decoder_fast.is_some() {
        assert_eq!(manifest.decoder_format(), DecoderFormat::InPlace);
        assert!(manifest.decoder_scores());
    }
});
