//! Property tests of the pool and the policies over random shapes, budgets,
//! scores and step sequences. The expected results are computed here from
//! the definitions in ELASTIC_CACHE.md, naively, independent of the policy
//! code.

mod common;

use std::collections::HashMap;

use common::{decode, key0, positions_by_rank, prefill, token_value};
use elastic_edge::kv::{KeepRatio, KvDtype, PolicyConfig, PolicyKind};
use proptest::prelude::*;

fn dtype() -> impl Strategy<Value = KvDtype> {
    prop_oneof![Just(KvDtype::F32), Just(KvDtype::F16)]
}

fn close(got: f32, expected: f64, dtype: KvDtype) -> bool {
    let tolerance = match dtype {
        KvDtype::F32 => 1e-5 * expected.abs().max(1.0),
        // Half an f16 ulp below 16 is at most 2^-8.
        KvDtype::F16 => 2f64.powi(-8) * 1.01,
    };
    (got as f64 - expected).abs() <= tolerance
}

/// Pseudo-random attention from a seed, with frequent ties.
fn attention_from(seed: u64) -> impl FnMut(usize, u32) -> f32 {
    move |layer, position| {
        let mut x = seed ^ ((layer as u64) << 32) ^ position as u64;
        x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 29;
        (x % 8) as f32 * 0.125
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Stage 1 of the paper: kept = sinks + protected tail + exactly the
    /// top-k candidates by importance; every other candidate is merged into
    /// its nearest anchor by position, which becomes the mean of its members.
    #[test]
    fn elastic_prompt_merges_into_top_k_anchors(
        len in 4usize..240,
        keep in 0.05f64..1.0,
        sink in 0usize..4,
        protect in 0usize..4,
        seed in any::<u64>(),
        dtype in dtype(),
    ) {
        let layers = 2;
        let config = PolicyConfig { sink, protect, ..PolicyConfig::default() };
        let mut cache = common::cache(common::shape(layers, dtype), (len + 1).max(sink + protect + 1), PolicyKind::ElasticPaper, &config, keep);
        let mut attention = attention_from(seed);
        prefill(&mut cache, len, &mut attention);

        let excess = KeepRatio::new(keep).unwrap().excess(len, len);
        let target = (len - excess).max(sink + protect).min(len);
        prop_assert_eq!(cache.pool().len(), target);

        let head = sink.min(len);
        let tail = protect.min(len - head);
        for layer in 0..layers {
            // Expected anchors: sort candidates by importance (desc), then
            // position (asc), take k.
            let mut candidates: Vec<usize> = (head..len - tail).collect();
            candidates.sort_by(|&a, &b| {
                attention(layer, b as u32).total_cmp(&attention(layer, a as u32)).then(a.cmp(&b))
            });
            let k = target - head - tail;
            let mut anchors: Vec<usize> = candidates[..k.min(candidates.len())].to_vec();
            anchors.sort();
            let mut expected: Vec<usize> = (0..head).chain(anchors.iter().copied()).chain(len - tail..len).collect();
            expected.sort();
            let kept: Vec<usize> = positions_by_rank(&cache, layer).iter().map(|&p| p as usize).collect();
            prop_assert_eq!(&kept, &expected, "layer {}", layer);

            // Expected members: nearest anchor by position, ties to the lower.
            let mut members: HashMap<usize, Vec<usize>> = anchors.iter().map(|&a| (a, vec![a])).collect();
            if !anchors.is_empty() {
                for p in head..len - tail {
                    if anchors.contains(&p) {
                        continue;
                    }
                    let nearest = *anchors
                        .iter()
                        .min_by_key(|&&a| (a.abs_diff(p), a))
                        .unwrap();
                    members.get_mut(&nearest).unwrap().push(p);
                }
            }
            let pool = cache.pool();
            for slot in 0..pool.len() {
                let position = pool.positions(layer)[slot] as usize;
                let group = members.get(&position).cloned().unwrap_or_else(|| vec![position]);
                prop_assert_eq!(pool.merge_counts(layer)[slot] as usize, group.len());
                let mean = group.iter().map(|&p| token_value(layer, p, 0) as f64).sum::<f64>() / group.len() as f64;
                prop_assert!(close(key0(&cache, layer, slot), mean, dtype),
                    "layer {} position {}: key {} vs mean {}", layer, position, key0(&cache, layer, slot), mean);
            }
        }
    }

    /// Any policy, any budget, any sequence of prompt and decode steps: the
    /// pool never exceeds its capacity, the cache meets the keep ratio after
    /// every step, metadata stays consistent, unmerged entries keep their own
    /// values, sinks and the newest token survive.
    #[test]
    fn any_sequence_keeps_the_invariants(
        kind in prop_oneof![
            Just(PolicyKind::Local), Just(PolicyKind::H2o), Just(PolicyKind::Elastic), Just(PolicyKind::ElasticPaper),
            Just(PolicyKind::ElasticRef), Just(PolicyKind::Full)
        ],
        capacity in 4usize..96,
        keep in 0.1f64..1.0,
        prompt in 1usize..200,
        generated in 0usize..80,
        merge_on_evict in any::<bool>(),
        seed in any::<u64>(),
        dtype in dtype(),
    ) {
        let layers = 3;
        let config = PolicyConfig { merge_on_evict, ..PolicyConfig::default() };
        let mut cache = common::cache(common::shape(layers, dtype), capacity, kind, &config, keep);
        if cache.admit(prompt, generated).is_err() {
            prop_assert_eq!(kind, PolicyKind::Full);
            return Ok(());
        }
        let mut attention = attention_from(seed);
        prefill(&mut cache, prompt, &mut attention);
        check(&cache, kind, &config)?;
        // The prompt leaves room for the first generated token.
        prop_assert!(cache.pool().free() > 0 || kind == PolicyKind::Full);
        for _ in 0..generated {
            decode(&mut cache, &mut attention);
            check(&cache, kind, &config)?;
        }
        prop_assert!(cache.stats().peak_len <= capacity);
    }

    /// H2O's importance stays with its entry through every eviction: each
    /// live entry's score is the sum of the attention it received.
    #[test]
    fn h2o_scores_follow_their_entries(
        capacity in 8usize..64,
        keep in 0.1f64..0.9,
        prompt in 1usize..120,
        generated in 1usize..60,
        seed in any::<u64>(),
    ) {
        let layers = 2;
        let mut cache = common::cache(common::shape(layers, KvDtype::F32), capacity, PolicyKind::H2o, &PolicyConfig::default(), keep);
        let mut received: HashMap<(usize, u32), f32> = HashMap::new();
        let step = std::cell::Cell::new(0u64);
        let mut base = attention_from(seed);
        let mut attention = |layer: usize, p: u32| {
            let a = base(layer, p) + (step.get() % 5) as f32;
            *received.entry((layer, p)).or_insert(0.0) += a;
            a
        };
        prefill(&mut cache, prompt, &mut attention);
        for _ in 0..generated {
            step.set(step.get() + 1);
            decode(&mut cache, &mut attention);
        }
        for layer in 0..layers {
            let pool = cache.pool();
            for slot in 0..pool.len() {
                let p = pool.positions(layer)[slot];
                prop_assert_eq!(pool.scores(layer)[slot], received[&(layer, p)]);
            }
        }
    }
}

fn check(cache: &elastic_edge::kv::KvCache, kind: PolicyKind, config: &PolicyConfig) -> Result<(), TestCaseError> {
    let pool = cache.pool();
    let len = pool.len();
    prop_assert!(len <= pool.capacity());
    let keep = cache.keep();
    let floor = match kind {
        PolicyKind::Full => 0,
        PolicyKind::Local => config.sink + 1,
        PolicyKind::H2o => 1,
        PolicyKind::Elastic | PolicyKind::ElasticPaper => config.sink + config.protect,
        PolicyKind::ElasticRef => config.sink + config.protect + 1,
    };
    prop_assert!(
        keep.excess(len, cache.processed()) == 0 || len <= floor + 1,
        "over the keep ratio: {} entries after {} tokens",
        len,
        cache.processed()
    );
    for layer in 0..pool.shape().layers {
        let order = pool.order(layer);
        let mut seen = vec![false; len];
        for &slot in order {
            prop_assert!(!seen[slot as usize], "slot {} twice in the order index", slot);
            seen[slot as usize] = true;
        }
        let by_rank = positions_by_rank(cache, layer);
        prop_assert!(
            by_rank.windows(2).all(|w| w[0] < w[1]),
            "positions not increasing: {:?}",
            by_rank
        );
        prop_assert_eq!(
            *by_rank.last().unwrap() as usize,
            cache.processed() - 1,
            "the newest token is gone"
        );
        if matches!(
            kind,
            PolicyKind::Elastic | PolicyKind::ElasticPaper | PolicyKind::Local | PolicyKind::ElasticRef
        ) {
            let sinks = config.sink.min(cache.processed());
            prop_assert!(
                by_rank.iter().take(sinks).map(|&p| p as usize).eq(0..sinks),
                "a sink is gone"
            );
        }
        let counts = pool.merge_counts(layer);
        prop_assert!(counts.iter().all(|&c| c >= 1));
        if kind != PolicyKind::ElasticRef {
            // The reference double-counts some tokens on purpose.
            prop_assert!(counts.iter().map(|&c| c as usize).sum::<usize>() <= cache.processed());
        }
        for (slot, &count) in counts.iter().enumerate() {
            if count == 1 {
                let p = pool.positions(layer)[slot] as usize;
                prop_assert_eq!(
                    key0(cache, layer, slot),
                    token_value(layer, p, 0),
                    "slot {} lost its values",
                    slot
                );
            }
        }
    }
    Ok(())
}
