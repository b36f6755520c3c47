//! Elastic Cache (Liu et al., ECCV 2024).
//!
//! Stage 1, instruction encoding: each layer scores its entries by the
//! attention they received from all prompt queries (column sums, averaged
//! over heads), keeps the first `sink` and last `protect` entries, picks the
//! top-scoring remaining entries as anchors and merges every other entry into
//! its nearest anchor by position (a mean).
//!
//! Stage 2, generation: a truncation index `P` is fixed `distance` entries
//! before the end of the compressed prompt. Whenever the cache is over
//! budget, the entry at rank `P` leaves: everything before `P` is frozen,
//! everything after behaves as a FIFO. No attention scores are needed.
//!
//! [`ElasticVariant::Reference`] reproduces the authors' code where it
//! differs from the paper (see `select_reference`), to cross-check numbers.
//!
//! The product's `elastic` adds components on top of the paper's stages,
//! each an [`ElasticOptions`] switch (docs/policies.md): a protected
//! instruction, a fixed point relative to the compressed length, merging
//! bounded by distance and token kind, normalised importance, and H2O-style
//! decode eviction. With every switch off it is `elastic-paper`.

use super::{
    top_k_by_score, CachePolicy, Compression, DecodeEviction, ElasticOptions, Phase, PolicyConfig, PolicyKind, Scratch,
};
use crate::error::{Error, Result};
use crate::kv::kind::TokenKind;
use crate::kv::pool::KvPool;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElasticVariant {
    /// The paper: top-k anchors, true positions.
    Paper,
    /// The authors' code: argsort-based selection, cache-length positions.
    Reference,
}

pub struct Elastic {
    kind: PolicyKind,
    variant: ElasticVariant,
    sink: usize,
    protect: usize,
    options: ElasticOptions,
    recent_fraction: f64,
    merge_on_evict: bool,
    cache_length_positions: bool,
    /// The fixed eviction rank `P`, set when the prompt is done.
    fixed_point: Option<usize>,
    scratch: Scratch,
    /// Per layer, the rank that leaves in a stage-2 step.
    leaving: Vec<usize>,
    /// Per candidate of one layer: the nearest eligible anchor rank on the
    /// left and on the right (`NONE` if there is none).
    left: Vec<u32>,
    right: Vec<u32>,
}

/// No anchor on that side.
const NONE: u32 = u32::MAX;

impl Elastic {
    pub(crate) fn new(kind: PolicyKind, variant: ElasticVariant, config: &PolicyConfig, scratch: Scratch) -> Self {
        let layers = scratch.victims.capacity();
        let capacity = scratch.ranks.capacity();
        Elastic {
            kind,
            variant,
            sink: config.sink,
            protect: config.protect,
            options: ElasticOptions::resolve(kind, config),
            recent_fraction: config.recent_fraction,
            merge_on_evict: config.merge_on_evict,
            cache_length_positions: config.cache_length_positions,
            fixed_point: None,
            scratch,
            leaving: Vec::with_capacity(layers),
            left: Vec::with_capacity(capacity),
            right: Vec::with_capacity(capacity),
        }
    }

    /// The components in force.
    pub fn options(&self) -> &ElasticOptions {
        &self.options
    }

    /// The protected tail of one layer for a stage-1 target (see
    /// docs/policies.md, component 1).
    fn tail(&self, pool: &KvPool, layer: usize, target: usize) -> usize {
        let len = pool.len();
        let head = self.sink.min(len);
        let mut tail = self.protect;
        if self.options.protect_instruction {
            let (order, kinds) = (pool.order(layer), pool.kinds(layer));
            let kind_at = |rank: usize| kinds[order[rank] as usize];
            let instruction = match (0..len).rev().find(|&r| kind_at(r).is_image()) {
                Some(last_image) => len - 1 - last_image,
                None => (0..len).find(|&r| kind_at(r).is_user()).map_or(0, |first| len - first),
            };
            tail = tail.max(instruction.min(target / 2));
        }
        tail.min(target.saturating_sub(head)).min(len - head)
    }

    /// The truncation index once the prompt is done.
    pub fn fixed_point(&self) -> Option<usize> {
        self.fixed_point
    }

    /// The paper's selection for one layer: anchors are the top-k candidates
    /// by importance; every other candidate goes to the nearest anchor by
    /// position (ties: the lower one). Fills `ranks` with the kept ranks and
    /// `pairs` with `(member slot, anchor slot)`. The components change the
    /// protected tail, the score anchors are ranked by, and which anchors a
    /// member may join (a member with none eligible is dropped).
    fn select_paper(&mut self, pool: &KvPool, layer: usize, target: usize) {
        let len = pool.len();
        let head = self.sink.min(len);
        let tail = self.tail(pool, layer, target);
        let anchors = target - head - tail;
        let options = self.options;
        let Elastic {
            scratch: Scratch { ranks, pairs, .. },
            left,
            right,
            ..
        } = self;
        let (order, scores, positions, kinds) = (
            pool.order(layer),
            pool.scores(layer),
            pool.positions(layer),
            pool.kinds(layer),
        );
        let slot = |rank: u32| order[rank as usize] as usize;

        ranks.clear();
        ranks.extend(head as u32..(len - tail) as u32);
        if options.normalize_scores {
            // Queries that could see the key at position p: N - p.
            let newest = positions[order[len - 1] as usize] as f32 + 1.0;
            top_k_by_score(ranks, anchors, |r| {
                scores[slot(r)] / (newest - positions[slot(r)] as f32).max(1.0)
            });
        } else {
            top_k_by_score(ranks, anchors, |r| scores[slot(r)]);
        }
        ranks.truncate(anchors);

        // Nearest eligible anchor on each side of every candidate, per merge
        // class (one class for all when kinds do not matter): two passes.
        let class_of = |rank: u32| {
            if options.merge_kind {
                kinds[slot(rank)].merge_class() as usize
            } else {
                0
            }
        };
        let candidates = head as u32..(len - tail) as u32;
        let mut last = [NONE; TokenKind::MAX_IMAGES + 1];
        left.clear();
        let mut next = 0;
        for rank in candidates.clone() {
            let class = class_of(rank);
            if next < ranks.len() && ranks[next] == rank {
                next += 1;
                last[class] = rank;
                left.push(NONE);
            } else {
                left.push(last[class]);
            }
        }
        last.fill(NONE);
        right.clear();
        right.resize(left.len(), NONE);
        let mut next = ranks.len();
        for rank in candidates.clone().rev() {
            let class = class_of(rank);
            if next > 0 && ranks[next - 1] == rank {
                next -= 1;
                last[class] = rank;
            } else {
                right[(rank - head as u32) as usize] = last[class];
            }
        }

        pairs.clear();
        let position_of = |rank: u32| positions[slot(rank)] as i64;
        let within = |member: u32, anchor: u32| {
            anchor != NONE
                && options
                    .merge_window
                    .is_none_or(|w| (position_of(member) - position_of(anchor)).abs() <= i64::from(w))
        };
        let mut next = 0;
        for rank in candidates {
            if next < ranks.len() && ranks[next] == rank {
                next += 1;
                continue;
            }
            let i = (rank - head as u32) as usize;
            let (before, after) = (left[i], right[i]);
            let anchor = match (within(rank, before), within(rank, after)) {
                (true, true) => {
                    let here = position_of(rank);
                    if here - position_of(before) <= position_of(after) - here {
                        before
                    } else {
                        after
                    }
                }
                (true, false) => before,
                (false, true) => after,
                (false, false) => continue, // no eligible anchor: the entry is dropped
            };
            pairs.push((order[rank as usize], order[anchor as usize]));
        }
        ranks.extend(0..head as u32);
        ranks.extend((len - tail) as u32..len as u32);
    }

    /// The authors' selection, quirks kept. Over the candidates
    /// `c = ranks[sink .. len - protect]` with `f = len - target`:
    /// `perm = argsort(score[c])` (ascending, stable); kept ranks are
    /// `{r + sink : perm[r] > f}` and thrown ones `{r : perm[r] <= f}` (no
    /// `+ sink`, so a thrown rank may be a kept entry, a sink, or counted
    /// twice). Each thrown entry is averaged into the kept candidate nearest
    /// by rank (ties: the lower), including the anchor's own value. The
    /// result holds `target - 1` entries, one under the paper's.
    fn select_reference(&mut self, pool: &KvPool, layer: usize, target: usize) {
        let Scratch { ranks, pairs, .. } = &mut self.scratch;
        let (order, scores) = (pool.order(layer), pool.scores(layer));
        let len = order.len();
        let head = self.sink.min(len);
        let tail = self.protect.min(len - head);
        let candidates = len - head - tail;
        let forget = (len - target) as u32;

        // perm[r] = candidate index with the r-th lowest score.
        ranks.clear();
        ranks.extend(0..candidates as u32);
        let score_of = |i: u32| scores[order[head + i as usize] as usize];
        ranks.sort_unstable_by(|&a, &b| score_of(a).total_cmp(&score_of(b)).then(a.cmp(&b)));

        // Thrown ranks go to `pairs` as ranks for now; kept ones replace
        // `ranks` in place (the write index never passes the read index).
        pairs.clear();
        let mut kept = 0;
        for r in 0..candidates {
            if ranks[r] > forget {
                ranks[kept] = (r + head) as u32;
                kept += 1;
            } else {
                pairs.push((r as u32, 0));
            }
        }
        ranks.truncate(kept);
        if ranks.is_empty() {
            pairs.clear(); // their code fails here; we drop the thrown entries
        }
        for (thrown, anchor) in pairs.iter_mut() {
            let nearest = nearest_by_rank(ranks, *thrown);
            *anchor = order[nearest as usize];
            *thrown = order[*thrown as usize];
        }
        ranks.extend(0..head as u32);
        ranks.extend((len - tail) as u32..len as u32);
    }
}

/// The value in sorted `anchors` nearest to `rank` (ties: the lower one).
fn nearest_by_rank(anchors: &[u32], rank: u32) -> u32 {
    let at = anchors.partition_point(|&a| a < rank);
    match (at.checked_sub(1).map(|i| anchors[i]), anchors.get(at)) {
        (Some(below), Some(&above)) if rank - below <= above - rank => below,
        (_, Some(&above)) => above,
        (Some(below), None) => below,
        (None, None) => rank,
    }
}

impl CachePolicy for Elastic {
    fn kind(&self) -> PolicyKind {
        self.kind
    }

    fn min_entries(&self) -> usize {
        // The reference variant ends one under its target.
        self.sink + self.protect + usize::from(self.variant == ElasticVariant::Reference)
    }

    fn wants_scores(&self, phase: Phase) -> bool {
        phase == Phase::Prompt || self.options.decode_eviction == DecodeEviction::Heavy
    }

    fn rope_position(&self, processed: usize, cache_len: usize) -> usize {
        if self.variant == ElasticVariant::Reference || self.cache_length_positions {
            cache_len
        } else {
            processed
        }
    }

    fn compress_prompt(&mut self, pool: &mut KvPool, target: usize, last: bool) -> Result<Compression> {
        let len = pool.len();
        if target < len && target < self.sink + self.protect {
            return Err(Error::Plan(format!(
                "elastic target {target} is below the {} protected entries",
                self.sink + self.protect
            )));
        }
        let mut done = Compression::default();
        if target < len {
            let layers = pool.shape().layers;
            self.scratch.keep.clear();
            for layer in 0..layers {
                match self.variant {
                    ElasticVariant::Paper => self.select_paper(pool, layer, target),
                    ElasticVariant::Reference => self.select_reference(pool, layer, target),
                }
                let order = pool.order(layer);
                let Scratch { keep, ranks, pairs, .. } = &mut self.scratch;
                keep.extend(ranks.iter().map(|&r| order[r as usize]));
                // The reference may also merge entries it keeps: count only
                // the members that leave.
                let removed = len - ranks.len();
                let merged = pairs.len().min(removed);
                done.merged += merged as u64;
                done.evicted += (removed - merged) as u64;
                pool.merge(layer, pairs)?;
            }
            pool.retain(&self.scratch.keep)?;
        }
        if last {
            let compressed = target.min(len);
            let distance = self.options.distance.entries(compressed);
            self.fixed_point = Some(compressed.saturating_sub(distance).max(self.sink));
        }
        Ok(done)
    }

    fn evict_generated(&mut self, pool: &mut KvPool, count: usize) -> Result<Compression> {
        let mut done = Compression::default();
        let layers = pool.shape().layers;
        for _ in 0..count {
            let len = pool.len();
            self.leaving.clear();
            match self.options.decode_eviction {
                DecodeEviction::FixedPoint => {
                    let distance = self.options.distance.entries(len);
                    let point = self
                        .fixed_point
                        .unwrap_or_else(|| len.saturating_sub(distance))
                        .max(self.sink)
                        .min(len - 1);
                    self.leaving.resize(layers, point);
                }
                DecodeEviction::Heavy => {
                    // H2O's rule from rank `sink`: the lightest entry outside
                    // the recent window (ties: the older one).
                    let recent = (((len - 1) as f64 * self.recent_fraction) as usize).clamp(1, (len - 1).max(1));
                    let end = len - recent.min(len - 1);
                    for layer in 0..layers {
                        if self.sink >= end {
                            // Nothing between the sinks and the window.
                            self.leaving.push(self.sink.min(len - 1));
                            continue;
                        }
                        let (order, scores) = (pool.order(layer), pool.scores(layer));
                        let mut lightest = self.sink;
                        for rank in self.sink + 1..end {
                            if scores[order[rank] as usize] < scores[order[lightest] as usize] {
                                lightest = rank;
                            }
                        }
                        self.leaving.push(lightest);
                    }
                }
            }
            if self.merge_on_evict && len > 1 {
                // Fold the leaving entry into its nearer neighbour by position
                // (a sink is never a merge target).
                for (layer, &rank) in self.leaving.iter().enumerate() {
                    let (order, positions) = (pool.order(layer), pool.positions(layer));
                    let here = positions[order[rank] as usize];
                    let before = rank.checked_sub(1).filter(|&r| r >= self.sink).map(|r| order[r]);
                    let after = order.get(rank + 1).copied();
                    let into = match (before, after) {
                        (Some(b), Some(a)) => {
                            if here - positions[b as usize] <= positions[a as usize] - here {
                                b
                            } else {
                                a
                            }
                        }
                        (Some(b), None) => b,
                        (None, Some(a)) => a,
                        (None, None) => continue,
                    };
                    let mut pair = [(order[rank], into)];
                    pool.merge(layer, &mut pair)?;
                }
                done.merged += layers as u64;
            } else {
                done.evicted += layers as u64;
            }
            let leaving = &self.leaving;
            self.scratch.evict_by_rank(pool, |layer, _| leaving[layer])?;
        }
        Ok(done)
    }

    fn reset(&mut self) {
        self.fixed_point = None;
    }
}
