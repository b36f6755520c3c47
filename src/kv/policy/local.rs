//! `local` (StreamingLLM): the first `sink` entries plus the most recent
//! ones. Needs no attention scores.

use super::{CachePolicy, Compression, Phase, PolicyKind, Scratch};
use crate::error::Result;
use crate::kv::pool::KvPool;

pub struct Local {
    sink: usize,
    scratch: Scratch,
}

impl Local {
    pub(crate) fn new(sink: usize, scratch: Scratch) -> Self {
        Local { sink, scratch }
    }
}

impl CachePolicy for Local {
    fn kind(&self) -> super::PolicyKind {
        PolicyKind::Local
    }

    fn min_entries(&self) -> usize {
        self.sink + 1
    }

    fn wants_scores(&self, _phase: Phase) -> bool {
        false
    }

    fn compress_prompt(&mut self, pool: &mut KvPool, target: usize, _last: bool) -> Result<Compression> {
        let len = pool.len();
        let removed = len.saturating_sub(target);
        if removed == 0 {
            return Ok(Compression::default());
        }
        let sink = self.sink.min(target);
        self.scratch.retain_ranks(pool, |_, _, ranks| {
            ranks.extend(0..sink as u32);
            ranks.extend((len - (target - sink)) as u32..len as u32);
        })?;
        Ok(Compression {
            merged: 0,
            evicted: (removed * pool.shape().layers) as u64,
        })
    }

    fn evict_generated(&mut self, pool: &mut KvPool, count: usize) -> Result<Compression> {
        for _ in 0..count {
            let sink = self.sink.min(pool.len() - 1);
            self.scratch.evict_by_rank(pool, |_, _| sink)?;
        }
        Ok(Compression {
            merged: 0,
            evicted: (count * pool.shape().layers) as u64,
        })
    }

    fn reset(&mut self) {}
}
