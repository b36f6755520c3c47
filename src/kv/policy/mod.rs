//! Cache policies: which entries stay when the cache is over its budget.
//!
//! A policy never sees tensors. It reads the pool's per-layer metadata
//! (positions, merge counts, accumulated attention importance, the order
//! index) and tells the pool what to merge, keep or evict; the pool moves
//! the data in place. Two call sites, the same for every policy:
//!
//! - `compress_prompt`: stage 1, after the instruction (prompt) is encoded,
//!   and between prefill chunks when the prompt does not fit the pool;
//! - `evict_generated`: stage 2, during generation, when the cache is over
//!   its keep ratio or the pool has no free slot.

mod elastic;
mod full;
mod h2o;
mod local;

pub use elastic::{Elastic, ElasticVariant};
pub use full::Full;
pub use h2o::H2o;
pub use local::Local;

use crate::error::{Error, Result};
use crate::kv::pool::KvPool;

/// The policies by name, as the command line spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum PolicyKind {
    /// No compression.
    #[serde(rename = "full")]
    Full,
    /// StreamingLLM: sinks plus the most recent entries.
    #[serde(rename = "local")]
    Local,
    /// Heavy hitters plus a recent window.
    #[serde(rename = "h2o")]
    H2o,
    /// Elastic Cache as the paper describes it.
    #[serde(rename = "elastic")]
    Elastic,
    /// Elastic Cache as the authors' code behaves (to cross-check numbers).
    #[serde(rename = "elastic-ref")]
    ElasticRef,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::Full,
        PolicyKind::Local,
        PolicyKind::H2o,
        PolicyKind::Elastic,
        PolicyKind::ElasticRef,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            PolicyKind::Full => "full",
            PolicyKind::Local => "local",
            PolicyKind::H2o => "h2o",
            PolicyKind::Elastic => "elastic",
            PolicyKind::ElasticRef => "elastic-ref",
        }
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| Error::Policy(format!("{s:?}: expected one of full, local, h2o, elastic, elastic-ref")))
    }
}

/// Knobs shared by the policies; the defaults are the paper's.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyConfig {
    /// First entries never removed (attention sinks).
    pub sink: usize,
    /// Last prompt entries never removed nor merged at instruction encoding.
    pub protect: usize,
    /// Elastic: the fixed eviction point sits this many entries before the
    /// end of the compressed prompt.
    pub distance: usize,
    /// Elastic: merge the entry leaving at the fixed point into its nearest
    /// neighbour instead of dropping it (an ablation; the paper evicts).
    pub merge_on_evict: bool,
    /// H2O: share of the budget given to the recent window.
    pub recent_fraction: f64,
    /// Elastic: give a new token the cache length as its rotary position
    /// instead of its true position (an ablation; `elastic-ref` always does,
    /// as the authors' code does).
    pub cache_length_positions: bool,
    /// Add ln(m) to the attention logits of an entry that stands for m
    /// merged ones, as if it were m copies (an ablation; the paper's merged
    /// entries are plain means).
    pub merge_count_bias: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            sink: 1,
            protect: 1,
            distance: 25,
            merge_on_evict: false,
            recent_fraction: 0.5,
            cache_length_positions: false,
            merge_count_bias: false,
        }
    }
}

/// Which stage a step belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Encoding the instruction: system prompt, image tokens, question.
    Prompt,
    /// Generating the answer, one token a step.
    Generation,
}

/// What one compression did, summed over layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Compression {
    /// Entries folded into another entry.
    pub merged: u64,
    /// Entries dropped without merging.
    pub evicted: u64,
}

impl std::ops::AddAssign for Compression {
    fn add_assign(&mut self, other: Compression) {
        self.merged += other.merged;
        self.evicted += other.evicted;
    }
}

/// A cache policy. See the module documentation for when each call comes.
pub trait CachePolicy: Send {
    fn kind(&self) -> PolicyKind;

    /// Entries the policy can never go below (its protected ones).
    fn min_entries(&self) -> usize;

    /// Whether a step's attention column sums feed the importance.
    fn wants_scores(&self, phase: Phase) -> bool;

    /// The rotary position of the token processed as number `processed`
    /// (0-based) when the cache holds `cache_len` entries.
    fn rope_position(&self, processed: usize, _cache_len: usize) -> usize {
        processed
    }

    /// Stage 1: bring the prompt's entries down to `target` (nothing to do
    /// when `target >= pool.len()`). `last` marks the final call, after
    /// which generation starts; it comes even when nothing is removed.
    fn compress_prompt(&mut self, pool: &mut KvPool, target: usize, last: bool) -> Result<Compression>;

    /// Stage 2: remove `count` entries during generation.
    fn evict_generated(&mut self, pool: &mut KvPool, count: usize) -> Result<Compression>;

    /// Forgets per-sequence state (a new prompt starts).
    fn reset(&mut self);
}

/// Builds a policy for a pool of `layers` layers and `capacity` slots; every
/// scratch buffer is sized here, once.
pub fn build_policy(
    kind: PolicyKind,
    config: &PolicyConfig,
    layers: usize,
    capacity: usize,
) -> Result<Box<dyn CachePolicy>> {
    if !(config.recent_fraction > 0.0 && config.recent_fraction < 1.0) {
        return Err(Error::Policy(format!(
            "h2o recent fraction {} is outside (0, 1)",
            config.recent_fraction
        )));
    }
    let scratch = Scratch::new(layers, capacity);
    Ok(match kind {
        PolicyKind::Full => Box::new(Full),
        PolicyKind::Local => Box::new(Local::new(config.sink, scratch)),
        PolicyKind::H2o => Box::new(H2o::new(config.recent_fraction, scratch)),
        PolicyKind::Elastic => Box::new(Elastic::new(ElasticVariant::Paper, config, scratch)),
        PolicyKind::ElasticRef => Box::new(Elastic::new(ElasticVariant::Reference, config, scratch)),
    })
}

/// Buffers a policy fills to tell the pool what to do; allocated once.
pub(crate) struct Scratch {
    /// One slot per layer for `KvPool::evict`.
    victims: Vec<u32>,
    /// `[layer][k]` slots for `KvPool::retain`.
    keep: Vec<u32>,
    /// Ranks under consideration in one layer.
    ranks: Vec<u32>,
    /// `(member, anchor)` slots for `KvPool::merge`.
    pairs: Vec<(u32, u32)>,
}

impl Scratch {
    fn new(layers: usize, capacity: usize) -> Self {
        Scratch {
            victims: Vec::with_capacity(layers),
            keep: Vec::with_capacity(layers * capacity),
            ranks: Vec::with_capacity(capacity),
            pairs: Vec::with_capacity(capacity),
        }
    }

    /// Evicts, in every layer, the entry at the rank `rank_in(layer, pool)`.
    fn evict_by_rank(&mut self, pool: &mut KvPool, rank_in: impl Fn(usize, &KvPool) -> usize) -> Result<()> {
        self.victims.clear();
        for layer in 0..pool.shape().layers {
            let rank = rank_in(layer, pool);
            let slot = *pool
                .order(layer)
                .get(rank)
                .ok_or_else(|| Error::Plan(format!("evicting rank {rank} of {}", pool.len())))?;
            self.victims.push(slot);
        }
        pool.evict(&self.victims)
    }

    /// Keeps, in every layer, the ranks `keep_ranks(layer, pool, out)` pushes.
    fn retain_ranks(
        &mut self,
        pool: &mut KvPool,
        mut keep_ranks: impl FnMut(usize, &KvPool, &mut Vec<u32>),
    ) -> Result<()> {
        self.keep.clear();
        for layer in 0..pool.shape().layers {
            self.ranks.clear();
            keep_ranks(layer, pool, &mut self.ranks);
            let order = pool.order(layer);
            self.keep.extend(self.ranks.iter().map(|&r| order[r as usize]));
        }
        pool.retain(&self.keep)
    }
}

/// Sorts `ranks` so the first `k` hold the highest scores, ties broken
/// toward the lower rank (the older entry); the first `k` end up in rank
/// order. O(n) selection plus O(k log k).
fn top_k_by_score(ranks: &mut [u32], k: usize, score_of: impl Fn(u32) -> f32) {
    if k == 0 || ranks.is_empty() {
        return;
    }
    let by_importance = |a: &u32, b: &u32| score_of(*b).total_cmp(&score_of(*a)).then(a.cmp(b));
    if k < ranks.len() {
        ranks.select_nth_unstable_by(k - 1, by_importance);
    }
    let k = k.min(ranks.len());
    ranks[..k].sort_unstable();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in PolicyKind::ALL {
            assert_eq!(kind.name().parse::<PolicyKind>().unwrap(), kind);
        }
        let err = "lru".parse::<PolicyKind>().unwrap_err().to_string();
        assert!(err.contains("lru") && err.contains("elastic-ref"), "{err}");
    }

    #[test]
    fn top_k_prefers_high_scores_then_old_entries() {
        let scores = [0.5, 0.9, 0.5, 0.1, 0.9, 0.5];
        let mut ranks: Vec<u32> = (0..6).collect();
        top_k_by_score(&mut ranks, 3, |r| scores[r as usize]);
        assert_eq!(&ranks[..3], &[0, 1, 4]);
        let mut ranks: Vec<u32> = (0..6).collect();
        top_k_by_score(&mut ranks, 4, |r| scores[r as usize]);
        assert_eq!(&ranks[..4], &[0, 1, 2, 4]);
    }

    #[test]
    fn bad_recent_fraction_is_an_error() {
        let config = PolicyConfig {
            recent_fraction: 1.0,
            ..PolicyConfig::default()
        };
        assert!(build_policy(PolicyKind::H2o, &config, 2, 8).is_err());
    }
}
