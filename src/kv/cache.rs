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
use crate::kv::pool::{KvDtype, KvPool, KvShape, PoolBacking, PoolSnapshot};
use crate::kv::rope::Rope;

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
    /// Processed tokens minus the next position: grows when a long
    /// sequence is re-based ([`KvCache::rebase`]); 0 until then.
    shift: usize,
    /// Positions multimodal RoPE's pictures skipped ([`crate::model::mrope`]):
    /// a token's rotary position is its sequence position less this.
    skipped: usize,
}

/// A re-base of positions ([`KvCache::rebase`]): old position `p` goes to
/// the number of live positions (in any layer) before `p`, scaled down when
/// even that does not fit. It keeps the order of everything, closes the
/// gaps compression left, and is defined for any position, so a caller's
/// own position marks (a memory's frame boundaries) move with it.
#[derive(Clone, Debug, PartialEq)]
pub struct PositionMap {
    /// The distinct live positions, ascending.
    live: Vec<u32>,
    /// Positions the map may use, `0..limit`.
    limit: usize,
}

impl PositionMap {
    /// Where position `p` goes.
    pub fn map(&self, position: u32) -> u32 {
        let rank = self.live.partition_point(|&q| q < position);
        let scaled = if self.live.len() <= self.limit {
            rank
        } else {
            // rank <= live.len(), so the product fits in u128 and the
            // result is at most limit.
            (rank as u128 * self.limit as u128 / self.live.len() as u128) as usize
        };
        u32::try_from(scaled).unwrap_or(u32::MAX)
    }

    /// The first position after every mapped entry.
    pub fn next(&self) -> usize {
        self.live.len().min(self.limit)
    }
}

/// An encoded prompt (see [`KvCache::snapshot`]).
#[derive(Clone, Debug)]
pub struct PromptSnapshot {
    pool: PoolSnapshot,
    processed: usize,
    peak_len: usize,
    skipped: usize,
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
            shift: 0,
            skipped: 0,
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

    /// Entries the policy never removes (sinks, protected prompt entries).
    pub fn min_entries(&self) -> usize {
        self.policy.min_entries()
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
        self.shift = 0;
        self.skipped = 0;
    }

    /// Positions the sequence's pictures skipped under multimodal RoPE.
    pub fn skipped_positions(&self) -> usize {
        self.skipped
    }

    /// Counts `n` more skipped positions (a prompt's pictures, once its
    /// tokens are in).
    pub fn skip_positions(&mut self, n: usize) {
        self.skipped += n;
    }

    /// Goes on with the same sequence: the next tokens are a new prompt
    /// piece (a memory's next frame or question) after what the pool holds,
    /// which stays. Stage 1 runs again at its end.
    pub fn continue_sequence(&mut self) {
        self.phase = Phase::Prompt;
        self.prompt_kinds.clear();
        self.prompt_start = self.processed;
    }

    /// The position the next token gets.
    pub fn next_position(&self) -> usize {
        self.rope_position(0)
    }

    /// The largest position of a live entry (`None` when empty).
    pub fn max_position(&self) -> Option<usize> {
        (0..self.pool.shape().layers)
            .filter_map(|layer| {
                let newest = *self.pool.order(layer).last()?;
                Some(self.pool.positions(layer)[newest as usize] as usize)
            })
            .max()
    }

    /// Keeps positions inside the model's range: when the next `room`
    /// tokens would reach `max_positions`, every live entry moves to the
    /// rank of its position among all live positions (see [`PositionMap`])
    /// and its key is rotated to match, so attention between entries that
    /// were neighbours is unchanged. Returns the map it applied, if any.
    /// Policies that place tokens at their cache index never need this.
    pub fn rebase(&mut self, rope: &Rope, room: usize, max_positions: usize) -> Result<Option<PositionMap>> {
        if self.next_position() + room <= max_positions || self.pool.is_empty() {
            return Ok(None);
        }
        let limit = max_positions
            .checked_sub(room)
            .filter(|&l| l > 0)
            .ok_or_else(|| Error::Plan(format!("{room} new tokens cannot fit {max_positions} positions")))?;
        if self.rope_position(1) != self.processed - self.shift + 1 {
            return Err(Error::Plan(format!(
                "policy {} places tokens at their cache index; there is nothing to re-base",
                self.policy.kind()
            )));
        }
        let mut live: Vec<u32> = (0..self.pool.shape().layers)
            .flat_map(|layer| self.pool.positions(layer).iter().copied())
            .collect();
        live.sort_unstable();
        live.dedup();
        let map = PositionMap { live, limit };
        match self.pool.shape().dtype {
            KvDtype::F32 => self.pool.remap_positions::<f32>(rope, |_, p| map.map(p))?,
            KvDtype::F16 => self.pool.remap_positions::<half::f16>(rope, |_, p| map.map(p))?,
        }
        // The map was needed, so next_position() + room > max_positions:
        // processed - shift >= limit >= map.next(), and this cannot underflow.
        self.shift = self.processed - map.next();
        Ok(Some(map))
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

    /// Whether the policy reads attention column sums in any phase (H2O,
    /// Elastic Cache), so the decoder graph must give them.
    pub fn policy_needs_scores(&self) -> bool {
        self.policy.wants_scores(Phase::Prompt) || self.policy.wants_scores(Phase::Generation)
    }

    /// The policy's kind.
    pub fn policy_kind(&self) -> crate::kv::PolicyKind {
        self.policy.kind()
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
            skipped: self.skipped,
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
        self.skipped = snapshot.skipped;
        Ok(())
    }

    /// The largest rotary position `n` more tokens reach (`n` >= 1). A policy
    /// that places tokens at their cache index never goes past the pool's
    /// last slot; the others count every token processed.
    pub fn last_position_after(&self, n: usize) -> usize {
        let counted = self.processed - self.shift + n.saturating_sub(1);
        if self.policy.rope_position(counted, 0) == counted {
            counted
        } else {
            (self.pool.len() + n.saturating_sub(1)).min(self.pool.capacity().saturating_sub(1))
        }
    }

    /// Whether the policy places tokens at their cache index rather than
    /// their sequence position.
    pub fn positions_follow_cache_length(&self) -> bool {
        self.policy.rope_position(1, 0) != 1
    }

    /// The rotary position of the `i`-th of the next tokens.
    pub fn rope_position(&self, i: usize) -> usize {
        self.policy
            .rope_position(self.processed - self.shift + i, self.pool.len() + i)
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
        self.pool.append(self.processed - self.shift, kinds)?;
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
