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

use super::{top_k_by_score, CachePolicy, Compression, Phase, PolicyConfig, PolicyKind, Scratch};
use crate::error::{Error, Result};
use crate::kv::pool::KvPool;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElasticVariant {
    /// The paper: top-k anchors, true positions.
    Paper,
    /// The authors' code: argsort-based selection, cache-length positions.
    Reference,
}

pub struct Elastic {
    variant: ElasticVariant,
    sink: usize,
    protect: usize,
    distance: usize,
    merge_on_evict: bool,
    cache_length_positions: bool,
    /// The fixed eviction rank `P`, set when the prompt is done.
    fixed_point: Option<usize>,
    scratch: Scratch,
}

impl Elastic {
    pub(crate) fn new(variant: ElasticVariant, config: &PolicyConfig, scratch: Scratch) -> Self {
        Elastic {
            variant,
            sink: config.sink,
            protect: config.protect,
            distance: config.distance,
            merge_on_evict: config.merge_on_evict,
            cache_length_positions: config.cache_length_positions,
            fixed_point: None,
            scratch,
        }
    }

    /// The truncation index once the prompt is done.
    pub fn fixed_point(&self) -> Option<usize> {
        self.fixed_point
    }

    /// The paper's selection for one layer: anchors are the top-k candidates
    /// by importance; every other candidate goes to the nearest anchor by
    /// position (ties: the lower one). Fills `ranks` with the kept ranks and
    /// `pairs` with `(member slot, anchor slot)`.
    fn select_paper(&mut self, pool: &KvPool, layer: usize, target: usize) {
        let Scratch { ranks, pairs, .. } = &mut self.scratch;
        let (order, scores, positions) = (pool.order(layer), pool.scores(layer), pool.positions(layer));
        let len = order.len();
        let head = self.sink.min(len);
        let tail = self.protect.min(len - head);
        let anchors = target - head - tail;

        ranks.clear();
        ranks.extend(head as u32..(len - tail) as u32);
        top_k_by_score(ranks, anchors, |r| scores[order[r as usize] as usize]);
        ranks.truncate(anchors);

        pairs.clear();
        let position_of = |rank: u32| positions[order[rank as usize] as usize] as i64;
        let mut next = 0; // index in `ranks` of the first anchor at or after `rank`
        for rank in head as u32..(len - tail) as u32 {
            if next < ranks.len() && ranks[next] == rank {
                next += 1;
                continue;
            }
            let before = next.checked_sub(1).map(|i| ranks[i]);
            let after = ranks.get(next).copied();
            let anchor = match (before, after) {
                (Some(b), Some(a)) => {
                    let here = position_of(rank);
                    if here - position_of(b) <= position_of(a) - here {
                        b
                    } else {
                        a
                    }
                }
                (Some(b), None) => b,
                (None, Some(a)) => a,
                (None, None) => continue, // no anchor at all: the entry is dropped
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
        match self.variant {
            ElasticVariant::Paper => PolicyKind::Elastic,
            ElasticVariant::Reference => PolicyKind::ElasticRef,
        }
    }

    fn min_entries(&self) -> usize {
        // The reference variant ends one under its target.
        self.sink + self.protect + usize::from(self.variant == ElasticVariant::Reference)
    }

    fn wants_scores(&self, phase: Phase) -> bool {
        phase == Phase::Prompt
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
            self.fixed_point = Some(target.min(len).saturating_sub(self.distance).max(self.sink));
        }
        Ok(done)
    }

    fn evict_generated(&mut self, pool: &mut KvPool, count: usize) -> Result<Compression> {
        let mut done = Compression::default();
        let layers = pool.shape().layers as u64;
        for _ in 0..count {
            let len = pool.len();
            let point = self
                .fixed_point
                .unwrap_or_else(|| len.saturating_sub(self.distance))
                .max(self.sink)
                .min(len - 1);
            if self.merge_on_evict && len > 1 {
                // Fold the leaving entry into its nearer neighbour by position.
                for layer in 0..pool.shape().layers {
                    let (order, positions) = (pool.order(layer), pool.positions(layer));
                    let here = positions[order[point] as usize];
                    let before = point.checked_sub(1).map(|r| order[r]);
                    let after = order.get(point + 1).copied();
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
                    let mut pair = [(order[point], into)];
                    pool.merge(layer, &mut pair)?;
                }
                done.merged += layers;
            } else {
                done.evicted += layers;
            }
            self.scratch.evict_by_rank(pool, |_, _| point)?;
        }
        Ok(done)
    }

    fn reset(&mut self) {
        self.fixed_point = None;
    }
}
