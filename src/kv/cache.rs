//! The KV cache a generation loop talks to: the pool, a policy, the keep
//! ratio and the count of processed tokens. It decides *when* to compress
//! (and to what length); the policy decides *what* goes.
//!
//! One step of the loop, prompt or answer:
//!
//! ```text
//! let t = cache.begin_prompt_chunk(remaining)?;   // or begin_token()? (t = 1)
//! // run the decoder: it reads pool.step_views(t).past_*, writes new_*
//! cache.commit(t)?;                               // entries become live
//! cache.add_scores(layer, colsum)?;               // if cache.wants_scores()
//! cache.end_prompt()? / cache.end_token()?;       // stage 1 / stage 2
//! ```

use crate::error::{Error, Result};
use crate::kv::budget::{KeepRatio, KvBudget};
use crate::kv::kind::TokenKind;
use crate::kv::policy::{build_policy, CachePolicy, Compression, Phase, PolicyConfig, PolicyKind};
use crate::kv::pool::{KvPool, KvShape, PoolBacking, PoolSnapshot};

/// Running totals for one sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Entries folded into others, summed over layers.
    pub merged: u64,
    /// Entries dropped, summed over layers.
    pub evicted: u64,
    /// Compressions that removed something.
    pub compressions: u64,
    /// The most live entries at any time.
    pub peak_len: usize,
}

pub struct KvCache {
    pool: KvPool,
    policy: Box<dyn CachePolicy>,
    keep: KeepRatio,
    processed: usize,
    phase: Phase,
    stats: CacheStats,
    merge_count_bias: bool,
    /// The kinds of the prompt's tokens, from `processed == prompt_start` on.
    prompt_kinds: Vec<TokenKind>,
    prompt_start: usize,
    collect_prompt_scores: bool,
}

/// An encoded prompt (see [`KvCache::snapshot`]).
#[derive(Clone, Debug)]
pub struct PromptSnapshot {
    pool: PoolSnapshot,
    processed: usize,
    peak_len: usize,
}

impl PromptSnapshot {
    /// Entries in the snapshot (the prompt's length).
    pub fn len(&self) -> usize {
        self.processed
    }

    pub fn is_empty(&self) -> bool {
        self.processed == 0
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        self.pool.bytes()
    }
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("pool", &self.pool)
            .field("policy", &self.policy.kind())
            .field("keep", &self.keep)
            .field("processed", &self.processed)
            .finish()
    }
}

impl KvCache {
    /// The one place a budget becomes a pool and a cache: the largest pool
    /// `budget` buys for `shape` (anonymous memory or a file), under policy
    /// `kind` with its knobs. Every command and the service build theirs here.
    pub fn with_budget(
        shape: KvShape,
        budget: KvBudget,
        backing: &PoolBacking,
        kind: PolicyKind,
        config: &PolicyConfig,
        keep: KeepRatio,
    ) -> Result<Self> {
        let pool = KvPool::with_budget(shape, budget.bytes(shape.bytes_per_slot()), backing)?;
        KvCache::new(pool, kind, config, keep)
    }

    /// A cache over `pool`. The `full` policy ignores `keep`.
    pub fn new(pool: KvPool, kind: PolicyKind, config: &PolicyConfig, keep: KeepRatio) -> Result<Self> {
        let policy = build_policy(kind, config, pool.shape().layers, pool.capacity())?;
        // The protected entries plus room for one new token.
        let min_slots = policy.min_entries() + 1;
        if pool.capacity() < min_slots {
            let per_slot = pool.shape().bytes_per_slot();
            return Err(Error::BudgetTooSmall {
                budget_bytes: pool.bytes(),
                bytes_per_slot: per_slot,
                slots: pool.capacity(),
                min_slots,
                min_bytes: min_slots as u64 * per_slot,
                why: "the policy's protected entries (--sink, --protect) plus one new token",
            });
        }
        let keep = if kind == PolicyKind::Full {
            KeepRatio::FULL
        } else {
            keep
        };
        Ok(KvCache {
            pool,
            policy,
            keep,
            processed: 0,
            phase: Phase::Prompt,
            stats: CacheStats::default(),
            merge_count_bias: config.merge_count_bias,
            prompt_kinds: Vec::new(),
            prompt_start: 0,
            collect_prompt_scores: false,
        })
    }

    pub fn pool(&self) -> &KvPool {
        &self.pool
    }

    /// The pool, for the decoder to read and write through `step_views`.
    pub fn pool_mut(&mut self) -> &mut KvPool {
        &mut self.pool
    }

    pub fn policy(&self) -> PolicyKind {
        self.policy.kind()
    }

    pub fn keep(&self) -> KeepRatio {
        self.keep
    }

    /// Tokens processed in this sequence, removed ones included.
    pub fn processed(&self) -> usize {
        self.processed
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Starts a new sequence: the pool empties, the mapping stays.
    pub fn reset(&mut self) {
        self.pool.clear();
        self.policy.reset();
        self.processed = 0;
        self.phase = Phase::Prompt;
        self.stats = CacheStats::default();
        self.prompt_kinds.clear();
        self.prompt_start = 0;
    }

    /// The kinds of the prompt tokens about to be committed, in order (the
    /// prompt builder's). Prompt tokens past the end of this list are `user`.
    pub fn set_prompt_kinds(&mut self, kinds: &[TokenKind]) {
        self.prompt_kinds.clear();
        self.prompt_kinds.extend_from_slice(kinds);
        self.prompt_start = self.processed;
    }

    /// Refuses, before any work, a request that cannot finish: with the
    /// `full` policy the prompt and the answer must fit the pool.
    pub fn admit(&self, prompt_tokens: usize, max_new_tokens: usize) -> Result<()> {
        // The prompt always leaves a slot for the first generated token
        // (`end_prompt` keeps one free), even when none is asked for.
        let needed = prompt_tokens + max_new_tokens.max(1);
        if self.policy.kind() == PolicyKind::Full && needed > self.pool.capacity() {
            return Err(Error::CapacityExceeded {
                needed,
                capacity: self.pool.capacity(),
            });
        }
        Ok(())
    }

    /// Whether the decoder's `past_bias` carries ln(merge count) (see
    /// [`KvPool::write_merge_count_bias`]) rather than zeros.
    pub fn merge_count_bias(&self) -> bool {
        self.merge_count_bias
    }

    /// Whether the step just committed should report attention column sums.
    pub fn wants_scores(&self) -> bool {
        self.policy.wants_scores(self.phase) || (self.collect_prompt_scores && self.phase == Phase::Prompt)
    }

    /// Collects the prompt's attention sums whatever the policy (for a
    /// [`PromptSnapshot`] that other policies will start from).
    pub fn collect_prompt_scores(&mut self, on: bool) {
        self.collect_prompt_scores = on;
    }

    /// The encoded prompt before stage 1: every entry with its importance.
    /// Only before `end_prompt` and before any compression (else `None`).
    pub fn snapshot(&self) -> Option<PromptSnapshot> {
        (self.phase == Phase::Prompt && self.stats.compressions == 0).then(|| PromptSnapshot {
            pool: self.pool.snapshot(),
            processed: self.processed,
            peak_len: self.stats.peak_len,
        })
    }

    /// Starts a sequence from `snapshot`, as if its prompt had just been
    /// encoded under this cache's policy (stage 1 still to come).
    pub fn restore(&mut self, snapshot: &PromptSnapshot) -> Result<()> {
        self.reset();
        self.pool.restore(&snapshot.pool)?;
        self.processed = snapshot.processed;
        self.prompt_start = snapshot.processed;
        self.stats.peak_len = snapshot.peak_len;
        Ok(())
    }

    /// The rotary position of the `i`-th of the next tokens.
    pub fn rope_position(&self, i: usize) -> usize {
        self.policy.rope_position(self.processed + i, self.pool.len() + i)
    }

    /// How many of the `remaining` prompt tokens the next prefill step takes.
    /// All of them when they fit; otherwise a chunk of up to half the pool,
    /// after compressing the entries so far to make room (the hard budget
    /// holds during prefill too).
    pub fn begin_prompt_chunk(&mut self, remaining: usize) -> Result<usize> {
        if remaining <= self.pool.free() {
            return Ok(remaining);
        }
        let capacity = self.pool.capacity();
        let floor = self.policy.min_entries();
        let chunk = remaining
            .min(self.pool.free().max(capacity / 2))
            .min(capacity - floor)
            .max(1);
        if chunk > self.pool.free() {
            self.compress_prompt(capacity - chunk, false)?;
        }
        Ok(chunk)
    }

    /// Makes room for one generated token when the pool is full.
    pub fn begin_token(&mut self) -> Result<()> {
        if self.pool.free() == 0 {
            self.evict_generated(1)?;
        }
        Ok(())
    }

    /// Makes the `t` entries the decoder wrote live, at the next positions.
    pub fn commit(&mut self, t: usize) -> Result<()> {
        const GENERATED: [TokenKind; 1] = [TokenKind::GENERATED];
        let kinds = match self.phase {
            Phase::Generation if t == 1 => &GENERATED[..],
            Phase::Generation => {
                return Err(Error::Plan(format!("{t} tokens in one generation step")));
            }
            Phase::Prompt => {
                let from = self.processed - self.prompt_start;
                if self.prompt_kinds.len() < from + t {
                    self.prompt_kinds.resize(from + t, TokenKind::USER);
                }
                &self.prompt_kinds[from..from + t]
            }
        };
        self.pool.append(self.processed, kinds)?;
        self.processed += t;
        self.stats.peak_len = self.stats.peak_len.max(self.pool.len());
        Ok(())
    }

    /// Adds a layer's attention column sums (`[len]`, slot order) of the step
    /// just committed to that layer's importance.
    pub fn add_scores(&mut self, layer: usize, colsum: &[f32]) -> Result<()> {
        self.pool.add_scores(layer, colsum)
    }

    /// Stage 1: the prompt is encoded; compress to the keep ratio, leaving at
    /// least one free slot for the first generated token.
    pub fn end_prompt(&mut self) -> Result<()> {
        let len = self.pool.len();
        let target = (len - self.keep.excess(len, self.processed))
            .max(self.policy.min_entries())
            .min(self.pool.capacity() - 1);
        self.compress_prompt(target, true)?;
        self.phase = Phase::Generation;
        Ok(())
    }

    /// Stage 2: after a generated token, drop what is over the keep ratio.
    pub fn end_token(&mut self) -> Result<()> {
        let len = self.pool.len();
        let floor = self.policy.min_entries().min(len);
        let count = self.keep.excess(len, self.processed).min(len - floor);
        if count > 0 {
            self.evict_generated(count)?;
        }
        Ok(())
    }

    fn compress_prompt(&mut self, target: usize, last: bool) -> Result<()> {
        let before = self.pool.len();
        let done = self.policy.compress_prompt(&mut self.pool, target, last)?;
        self.record(before, done);
        Ok(())
    }

    fn evict_generated(&mut self, count: usize) -> Result<()> {
        let before = self.pool.len();
        let done = self.policy.evict_generated(&mut self.pool, count)?;
        self.record(before, done);
        Ok(())
    }

    fn record(&mut self, before: usize, done: Compression) {
        if self.pool.len() < before {
            self.stats.compressions += 1;
        }
        self.stats.merged += done.merged;
        self.stats.evicted += done.evicted;
    }
}
