//! Cases checked by hand: the worked example of ELASTIC_CACHE.md (a
//! 650-token prompt at keep 0.5, then 200 generated tokens) and the authors'
//! argsort selection on an 8-token prompt.

mod common;

use common::{decode, key0, positions_by_rank, prefill};
use elastic_edge::kv::{KvDtype, PolicyConfig, PolicyKind};

struct Run {
    after_prompt: usize,
    first_eviction_step: usize,
    evictions: usize,
    final_len: usize,
    fixed_point_respected: bool,
}

fn run(kind: PolicyKind) -> Run {
    let shape = common::shape(3, KvDtype::F32);
    let mut cache = common::cache(shape, 1024, kind, &PolicyConfig::default(), 0.5);
    // Importance falling with position, with a bump, so anchors are not
    // simply the first entries.
    let mut attention = |layer: usize, p: u32| {
        1.0 / (1.0 + p as f32)
            + if (p as usize + layer).is_multiple_of(7) {
                0.5
            } else {
                0.0
            }
    };
    prefill(&mut cache, 650, &mut attention);
    let after_prompt = cache.pool().len();
    let mut first_eviction_step = 0;
    let mut evictions = 0;
    let mut fixed_point_respected = true;
    for step in 1..=200 {
        let before: Vec<Vec<u32>> = (0..3).map(|l| positions_by_rank(&cache, l)).collect();
        let len_before = cache.pool().len();
        decode(&mut cache, &mut attention);
        if cache.pool().len() == len_before {
            evictions += 1;
            if first_eviction_step == 0 {
                first_eviction_step = step;
            }
            // The entry at rank P = 300 left; every other one stayed.
            for (layer, before) in before.iter().enumerate() {
                let mut expected = before.clone();
                expected.remove(300);
                expected.push(649 + step as u32);
                fixed_point_respected &= positions_by_rank(&cache, layer) == expected;
            }
        }
    }
    Run {
        after_prompt,
        first_eviction_step,
        evictions,
        final_len: cache.pool().len(),
        fixed_point_respected,
    }
}

#[test]
fn paper_variant_matches_the_worked_example() {
    let run = run(PolicyKind::ElasticPaper);
    assert_eq!(run.after_prompt, 325);
    assert_eq!(run.first_eviction_step, 2);
    assert_eq!(run.evictions, 100);
    assert_eq!(run.final_len, 425);
    assert!(run.fixed_point_respected);
}

#[test]
fn reference_variant_matches_the_worked_example() {
    let run = run(PolicyKind::ElasticRef);
    assert_eq!(run.after_prompt, 324);
    assert_eq!(run.first_eviction_step, 4);
    assert_eq!(run.evictions, 99);
    assert_eq!(run.final_len, 425);
    assert!(run.fixed_point_respected);
}

/// 8 tokens, keep 0.5 (f = 4, target 4), sink 1, protect 1. Candidates are
/// ranks 1..=6 with importance [0.9, 0.1, 0.5, 0.3, 0.8, 0.2].
fn eight_token_prompt(kind: PolicyKind) -> Vec<(u32, u32, f32)> {
    let importance = [0.0, 0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.0];
    let mut cache = common::cache(common::shape(1, KvDtype::F32), 16, kind, &PolicyConfig::default(), 0.5);
    prefill(&mut cache, 8, &mut |_, p| importance[p as usize]);
    let pool = cache.pool();
    let mut entries: Vec<(u32, u32, f32)> = (0..pool.len())
        .map(|slot| {
            (
                pool.positions(0)[slot],
                pool.merge_counts(0)[slot],
                key0(&cache, 0, slot),
            )
        })
        .collect();
    entries.sort_by_key(|e| e.0);
    entries
}

#[test]
fn reference_variant_reproduces_the_argsort_quirk() {
    // perm = argsort(importance[1..7]) = [1, 5, 3, 2, 4, 0]. Kept: ranks r
    // with perm[r] > 4, plus 1: only rank 2, the LEAST important candidate.
    // Thrown: r with perm[r] <= 4, not shifted: ranks 0, 2, 3, 4, 5, all
    // averaged into rank 2 together with its own value (rank 2 twice).
    // Keys (layer 0, element 0) of positions 0..8: 0 14 11 8 5 2 16 13.
    let entries = eight_token_prompt(PolicyKind::ElasticRef);
    assert_eq!(entries.len(), 3, "one under the target of 4");
    assert_eq!(entries[0], (0, 1, 0.0));
    assert_eq!((entries[1].0, entries[1].1), (2, 6));
    assert!((entries[1].2 - 37.0 / 6.0).abs() < 1e-6, "{}", entries[1].2);
    assert_eq!(entries[2], (7, 1, 13.0));
}

#[test]
fn paper_variant_on_the_same_prompt() {
    // Top-2 anchors: ranks 1 (0.9) and 5 (0.8). Rank 3 is 2 from both and
    // goes to the lower; rank 2 to 1; ranks 4 and 6 to 5.
    let entries = eight_token_prompt(PolicyKind::ElasticPaper);
    assert_eq!(entries.len(), 4);
    assert_eq!(entries[0], (0, 1, 0.0));
    assert_eq!(entries[1], (1, 3, 11.0)); // (14 + 11 + 8) / 3
    assert_eq!((entries[2].0, entries[2].1), (5, 3));
    assert!((entries[2].2 - 23.0 / 3.0).abs() < 1e-6); // (2 + 5 + 16) / 3
    assert_eq!(entries[3], (7, 1, 13.0));
}

#[test]
fn rotary_positions_are_true_positions_unless_asked_otherwise() {
    let mut attention = |_: usize, p: u32| 1.0 / (1.0 + p as f32);
    let shape = common::shape(2, KvDtype::F32);
    let mut paper = common::cache(shape, 1024, PolicyKind::ElasticPaper, &PolicyConfig::default(), 0.5);
    prefill(&mut paper, 650, &mut attention);
    assert_eq!(paper.rope_position(0), 650);
    let ablation = PolicyConfig {
        cache_length_positions: true,
        ..PolicyConfig::default()
    };
    let mut by_length = common::cache(shape, 1024, PolicyKind::ElasticPaper, &ablation, 0.5);
    prefill(&mut by_length, 650, &mut attention);
    assert_eq!(by_length.rope_position(0), 325);
    let mut reference = common::cache(shape, 1024, PolicyKind::ElasticRef, &PolicyConfig::default(), 0.5);
    prefill(&mut reference, 650, &mut attention);
    assert_eq!(reference.rope_position(0), 324);
}
