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
    /// Elastic Cache with this project's components (docs/policies.md).
    #[serde(rename = "elastic")]
    Elastic,
    /// Elastic Cache exactly as the paper describes it.
    #[serde(rename = "elastic-paper")]
    ElasticPaper,
    /// Elastic Cache as the authors' code behaves (to cross-check numbers).
    #[serde(rename = "elastic-ref")]
    ElasticRef,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 6] = [
        PolicyKind::Full,
        PolicyKind::Local,
        PolicyKind::H2o,
        PolicyKind::Elastic,
        PolicyKind::ElasticPaper,
        PolicyKind::ElasticRef,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            PolicyKind::Full => "full",
            PolicyKind::Local => "local",
            PolicyKind::H2o => "h2o",
            PolicyKind::Elastic => "elastic",
            PolicyKind::ElasticPaper => "elastic-paper",
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
        PolicyKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            Error::Policy(format!(
                "{s:?}: expected one of full, local, h2o, elastic, elastic-paper, elastic-ref"
            ))
        })
    }
}

/// Where stage 2's fixed point sits before the end of the compressed
/// prompt: a count of entries, or a share of the compressed length.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Distance {
    Entries(usize),
    Fraction(f64),
}

impl Distance {
    /// The paper's 25 entries.
    pub const PAPER: Distance = Distance::Entries(25);

    /// The distance in entries for a compressed prompt of `len` entries.
    pub fn entries(self, len: usize) -> usize {
        match self {
            Distance::Entries(n) => n,
            Distance::Fraction(f) => (f * len as f64).ceil() as usize,
        }
    }
}

impl std::fmt::Display for Distance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Distance::Entries(n) => write!(f, "{n}"),
            Distance::Fraction(x) => write!(f, "{x:?}"),
        }
    }
}

impl std::str::FromStr for Distance {
    type Err = Error;
    /// `25` (entries) or `0.05` (a fraction in [0, 1]: written with a point).
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if !s.contains(['.', 'e', 'E']) {
            return s.parse().map(Distance::Entries).map_err(|_| {
                Error::Policy(format!(
                    "distance {s:?}: expected a count of entries (25) or a fraction (0.05)"
                ))
            });
        }
        match s.parse::<f64>() {
            Ok(f) if (0.0..=1.0).contains(&f) => Ok(Distance::Fraction(f)),
            Ok(f) => Err(Error::Policy(format!("distance {f}: a fraction must be within [0, 1]"))),
            Err(_) => Err(Error::Policy(format!(
                "distance {s:?}: expected a count of entries (25) or a fraction (0.05)"
            ))),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Distance {
    /// An integer is a count, a float a fraction (`distance = 0.05`), a
    /// string either.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Number(f64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Count(n) => n.to_string(),
            Raw::Number(f) => format!("{f:?}"),
            Raw::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How stage 2 of Elastic Cache picks the entry that leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DecodeEviction {
    /// The paper's: the entry at the fixed point `P`.
    FixedPoint,
    /// The lightest entry outside the recent window, by attention
    /// accumulated over prompt and answer (H2O's decode rule).
    Heavy,
}

/// `--merge-window`: how far (in positions) a merged entry may be from its
/// anchor, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeWindow {
    Off,
    Positions(u32),
}

impl std::str::FromStr for MergeWindow {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "off" | "none" => Ok(MergeWindow::Off),
            n => n
                .parse()
                .map(MergeWindow::Positions)
                .map_err(|_| Error::Policy(format!("merge window {n:?}: expected a count of positions or off"))),
        }
    }
}

impl<'de> serde::Deserialize<'de> for MergeWindow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(MergeWindow::Positions(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// The share of H2O's recent window, in (0, 1).
fn parse_recent(s: &str) -> Result<f64> {
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f < 1.0 => Ok(f),
        _ => Err(Error::Policy(format!(
            "recent {s:?}: expected a share within (0, 1), e.g. 0.5"
        ))),
    }
}

fn deserialize_recent<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    let f = <f64 as serde::Deserialize>::deserialize(d)?;
    parse_recent(&f.to_string()).map_err(serde::de::Error::custom)
}

/// The policies' knobs, as the command line (`#[command(flatten)]`) and the
/// service's `[cache]` table spell them (docs/policies.md). A knob a policy
/// does not use is ignored by it; a component left unset takes the
/// policy's default ([`ElasticOptions::resolve`]).
#[derive(Clone, Debug, PartialEq, clap::Args, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// First entries never removed, never merge targets (attention sinks).
    #[arg(long, default_value_t = 1, help_heading = "Cache policy knobs")]
    pub sink: usize,
    /// Last prompt entries never removed nor merged at instruction encoding
    /// (elastic, elastic-paper, elastic-ref).
    #[arg(long, default_value_t = 1, help_heading = "Cache policy knobs")]
    pub protect: usize,
    /// Elastic Cache's stage-2 fixed point sits this far before the end of
    /// the compressed prompt: entries (25) or a share of it (0.05).
    /// Default: elastic 0.05, elastic-paper and elastic-ref 25.
    #[arg(long, value_parser = parse_distance, help_heading = "Cache policy knobs")]
    pub distance: Option<Distance>,
    /// Share of the cache kept as a recent window, in (0, 1): h2o, and
    /// elastic with --decode-eviction heavy.
    #[arg(long = "recent", default_value_t = 0.5, value_parser = parse_recent_arg, help_heading = "Cache policy knobs")]
    #[serde(rename = "recent", deserialize_with = "deserialize_recent")]
    pub recent_fraction: f64,
    /// Elastic: never merge away the instruction (the text after the last
    /// picture and the assistant prefix, at most half the kept entries).
    /// Default: elastic true, elastic-paper false.
    #[arg(long, value_name = "BOOL", help_heading = "Cache policy knobs")]
    pub protect_instruction: Option<bool>,
    /// Elastic: merge an entry only into an anchor at most this many
    /// positions away (else it is dropped), or off. Default: elastic 0 (no
    /// merging: it measured worse on the demo model), elastic-paper off.
    #[arg(long, value_name = "N|off", value_parser = parse_merge_window, help_heading = "Cache policy knobs")]
    pub merge_window: Option<MergeWindow>,
    /// Elastic: merge a picture's entries only with the same picture's, text
    /// only with text. Default: elastic true, elastic-paper false.
    #[arg(long, value_name = "BOOL", help_heading = "Cache policy knobs")]
    pub merge_kind: Option<bool>,
    /// Elastic: rank prompt entries by attention per query that could see
    /// them, not the raw sum (which favours early positions). Default:
    /// false.
    #[arg(long, value_name = "BOOL", help_heading = "Cache policy knobs")]
    pub normalize_scores: Option<bool>,
    /// Elastic: stage 2 drops the entry at the fixed point (the paper) or
    /// the lightest outside the recent window (heavy). Default: elastic
    /// heavy, elastic-paper fixed-point.
    #[arg(long, value_enum, help_heading = "Cache policy knobs")]
    pub decode_eviction: Option<DecodeEviction>,
    /// Elastic*: merge the entry leaving in stage 2 into its nearer
    /// neighbour instead of dropping it (an ablation; the paper evicts).
    #[arg(long, help_heading = "Cache policy knobs")]
    pub merge_on_evict: bool,
    /// Elastic: give a new token the cache length as its rotary position
    /// instead of its true position (an ablation; elastic-ref always does,
    /// as the authors' code does).
    #[arg(long, help_heading = "Cache policy knobs")]
    pub cache_length_positions: bool,
    /// Add ln(m) to the attention logits of an entry that stands for m
    /// merged ones, as if it were m copies (an ablation; the paper's merged
    /// entries are plain means).
    #[arg(long, help_heading = "Cache policy knobs")]
    pub merge_count_bias: bool,
}

fn parse_distance(s: &str) -> std::result::Result<Distance, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

fn parse_merge_window(s: &str) -> std::result::Result<MergeWindow, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

fn parse_recent_arg(s: &str) -> std::result::Result<f64, String> {
    parse_recent(s).map_err(|e| e.to_string())
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            sink: 1,
            protect: 1,
            distance: None,
            recent_fraction: 0.5,
            protect_instruction: None,
            merge_window: None,
            merge_kind: None,
            normalize_scores: None,
            decode_eviction: None,
            merge_on_evict: false,
            cache_length_positions: false,
            merge_count_bias: false,
        }
    }
}

/// Elastic Cache's components, resolved for one policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ElasticOptions {
    pub distance: Distance,
    pub protect_instruction: bool,
    pub merge_window: Option<u32>,
    pub merge_kind: bool,
    pub normalize_scores: bool,
    pub decode_eviction: DecodeEviction,
}

impl ElasticOptions {
    /// The paper's algorithm: every component off.
    pub const PAPER: ElasticOptions = ElasticOptions {
        distance: Distance::PAPER,
        protect_instruction: false,
        merge_window: None,
        merge_kind: false,
        normalize_scores: false,
        decode_eviction: DecodeEviction::FixedPoint,
    };

    /// The product's `elastic`, chosen by measurement on the dev set
    /// (docs/results.md, "Choosing elastic's components"): on the demo
    /// model every form of merging we measured cost quality, so the default
    /// merges nothing (`merge_window` 0: a member is dropped); merging is one
    /// flag away (`--merge-window off`).
    pub const PRODUCT: ElasticOptions = ElasticOptions {
        distance: Distance::Fraction(0.05),
        protect_instruction: true,
        merge_window: Some(0),
        merge_kind: true,
        normalize_scores: false,
        decode_eviction: DecodeEviction::Heavy,
    };

    /// `kind`'s defaults with what `config` sets on top. `elastic-ref`
    /// takes only the distance: it reproduces the authors' code.
    pub fn resolve(kind: PolicyKind, config: &PolicyConfig) -> ElasticOptions {
        let base = match kind {
            PolicyKind::Elastic => ElasticOptions::PRODUCT,
            _ => ElasticOptions::PAPER,
        };
        let distance = config.distance.unwrap_or(base.distance);
        if kind == PolicyKind::ElasticRef {
            return ElasticOptions { distance, ..base };
        }
        ElasticOptions {
            distance,
            protect_instruction: config.protect_instruction.unwrap_or(base.protect_instruction),
            merge_window: match config.merge_window {
                None => base.merge_window,
                Some(MergeWindow::Off) => None,
                Some(MergeWindow::Positions(n)) => Some(n),
            },
            merge_kind: config.merge_kind.unwrap_or(base.merge_kind),
            normalize_scores: config.normalize_scores.unwrap_or(base.normalize_scores),
            decode_eviction: config.decode_eviction.unwrap_or(base.decode_eviction),
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
            "recent: the share {} is outside (0, 1)",
            config.recent_fraction
        )));
    }
    let scratch = Scratch::new(layers, capacity);
    Ok(match kind {
        PolicyKind::Full => Box::new(Full),
        PolicyKind::Local => Box::new(Local::new(config.sink, scratch)),
        PolicyKind::H2o => Box::new(H2o::new(config.recent_fraction, scratch)),
        PolicyKind::Elastic | PolicyKind::ElasticPaper => {
            Box::new(Elastic::new(kind, ElasticVariant::Paper, config, scratch))
        }
        PolicyKind::ElasticRef => Box::new(Elastic::new(kind, ElasticVariant::Reference, config, scratch)),
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
