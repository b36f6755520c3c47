//! `full`: the uncompressed baseline. It never removes an entry, so a prompt
//! and answer that outgrow the pool are an error, not a silent truncation.

use super::{CachePolicy, Compression, Phase, PolicyKind};
use crate::error::{Error, Result};
use crate::kv::pool::KvPool;

pub struct Full;

impl CachePolicy for Full {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Full
    }

    fn min_entries(&self) -> usize {
        0
    }

    fn wants_scores(&self, _phase: Phase) -> bool {
        false
    }

    fn compress_prompt(&mut self, pool: &mut KvPool, target: usize, _last: bool) -> Result<Compression> {
        if target < pool.len() {
            return Err(Error::CapacityExceeded {
                needed: pool.len() + 1,
                capacity: pool.capacity(),
            });
        }
        Ok(Compression::default())
    }

    fn evict_generated(&mut self, pool: &mut KvPool, count: usize) -> Result<Compression> {
        Err(Error::CapacityExceeded {
            needed: pool.len() + count,
            capacity: pool.capacity(),
        })
    }

    fn reset(&mut self) {}
}
