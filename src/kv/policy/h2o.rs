//! `h2o` (Heavy-Hitter Oracle): importance is the attention an entry has
//! received from every query so far, prompt and answer; keep the heaviest
//! plus a window of the most recent. The importance lives in the pool beside
//! each entry, so it follows its entry through every move.

use super::{top_k_by_score, CachePolicy, Compression, Phase, PolicyKind, Scratch};
use crate::error::Result;
use crate::kv::pool::KvPool;

pub struct H2o {
    recent_fraction: f64,
    scratch: Scratch,
}

impl H2o {
    pub(crate) fn new(recent_fraction: f64, scratch: Scratch) -> Self {
        H2o {
            recent_fraction,
            scratch,
        }
    }

    /// The recent window for a cache of `size` entries (at least the newest).
    fn recent(&self, size: usize) -> usize {
        ((size as f64 * self.recent_fraction) as usize).clamp(1, size.max(1))
    }
}

impl CachePolicy for H2o {
    fn kind(&self) -> PolicyKind {
        PolicyKind::H2o
    }

    fn min_entries(&self) -> usize {
        1
    }

    fn wants_scores(&self, _phase: Phase) -> bool {
        true
    }

    fn compress_prompt(&mut self, pool: &mut KvPool, target: usize, _last: bool) -> Result<Compression> {
        let len = pool.len();
        let removed = len.saturating_sub(target);
        if removed == 0 {
            return Ok(Compression::default());
        }
        let recent = self.recent(target);
        let heavy = target - recent;
        self.scratch.retain_ranks(pool, |layer, pool, ranks| {
            let (order, scores) = (pool.order(layer), pool.scores(layer));
            ranks.extend(0..(len - recent) as u32);
            top_k_by_score(ranks, heavy, |r| scores[order[r as usize] as usize]);
            ranks.truncate(heavy);
            ranks.extend((len - recent) as u32..len as u32);
        })?;
        Ok(Compression {
            merged: 0,
            evicted: (removed * pool.shape().layers) as u64,
        })
    }

    fn evict_generated(&mut self, pool: &mut KvPool, count: usize) -> Result<Compression> {
        for _ in 0..count {
            let len = pool.len();
            let candidates = len - self.recent(len - 1).min(len - 1);
            // The lightest entry outside the recent window; ties go to the
            // older one.
            self.scratch.evict_by_rank(pool, |layer, pool| {
                let (order, scores) = (pool.order(layer), pool.scores(layer));
                let mut lightest = 0;
                for rank in 1..candidates {
                    if scores[order[rank] as usize] < scores[order[lightest] as usize] {
                        lightest = rank;
                    }
                }
                lightest
            })?;
        }
        Ok(Compression {
            merged: 0,
            evicted: (count * pool.shape().layers) as u64,
        })
    }

    fn reset(&mut self) {}
}
