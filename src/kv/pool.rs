//! The KV pool: one memory mapping, sized once from a byte budget, never grown.
//!
//! Layout, like llama2.c's `key_cache`/`value_cache`, in one of two orders
//! (the decoder graph's, see [`KvLayout`]):
//!
//! ```text
//! format 2: [layer][k | v][kv_head][capacity][head_dim]   one [1, KV, C, D] tensor per layer
//!           that GroupQueryAttention reads and appends to in place
//! format 1: [layer][k | v][slot][kv_head][head_dim]       the first `len` slots are one
//!           [1, len, KV, D] tensor the graph reads; its new rows go to the next slots
//! ```
//!
//! in f16 or f32. Either way the live entries are the first `len` slots.
//!
//! Every layer holds the same number of live entries (`len`), but each layer
//! chooses its own: per layer and slot we keep the entry's logical position
//! (its index in the sequence, which orders entries), its merge count and its
//! accumulated attention importance. Slots are not kept in position order:
//! removing an entry moves the last slot into the hole (O(1) data movement),
//! and a per-layer `order` index (slots sorted by position) answers "the
//! entry at rank r". Attention does not care about slot order because keys
//! carry their rotary position already.

use std::fs::OpenOptions;
use std::path::PathBuf;

use half::{f16, slice::HalfFloatSliceExt};
use memmap2::{MmapMut, MmapOptions};

use crate::error::{Error, Result};
use crate::kv::kind::TokenKind;
use crate::kv::rope::Rope;

/// The element type of the pool (and of the decoder graph's K/V tensors).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    F16,
    F32,
}

impl KvDtype {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            KvDtype::F16 => "f16",
            KvDtype::F32 => "f32",
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f16" | "float16" => Ok(KvDtype::F16),
            "f32" | "float32" => Ok(KvDtype::F32),
            other => Err(Error::Shape(format!(
                "unknown KV dtype {other:?} (expected f16 or f32)"
            ))),
        }
    }
}

/// A pool element: plain old data that converts to and from f32 for merging.
pub trait KvElement: bytemuck::Pod + Send + Sync {
    const DTYPE: KvDtype;
    fn to_f32(self) -> f32;
    fn from_f32(value: f32) -> Self;
    /// Converts a row to f32 (`dst.len() == src.len()`).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Converts a row from f32 (`dst.len() == src.len()`).
    fn narrow(src: &[f32], dst: &mut [Self]);

    /// `acc = row * weight` (`first`) or `acc += row * weight`, in f32;
    /// `widened` is scratch of the row's length.
    fn accumulate(acc: &mut [f32], widened: &mut [f32], row: &[Self], weight: f32, first: bool) {
        Self::widen(row, widened);
        add_scaled(acc, widened, weight, first);
    }
}

fn add_scaled(acc: &mut [f32], row: &[f32], weight: f32, first: bool) {
    if first {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a = v * weight;
        }
    } else {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v * weight;
        }
    }
}

impl KvElement for f32 {
    const DTYPE: KvDtype = KvDtype::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(value: f32) -> Self {
        value
    }
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn accumulate(acc: &mut [f32], _widened: &mut [f32], row: &[f32], weight: f32, first: bool) {
        add_scaled(acc, row, weight, first);
    }
}

impl KvElement for f16 {
    const DTYPE: KvDtype = KvDtype::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(value: f32) -> Self {
        f16::from_f32(value)
    }
    // Whole rows at a time: `half` checks for F16C once per slice instead of
    // once per element, and converts several lanes per instruction.
    fn widen(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn narrow(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
}

/// The order of one layer's K (or V) block, which the decoder graph fixes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvLayout {
    /// `[kv_head][capacity][head_dim]` (decoder format 2): the whole block is
    /// the graph's `[1, kv_heads, capacity, head_dim]` past and present.
    #[default]
    HeadMajor,
    /// `[slot][kv_head][head_dim]` (decoder format 1): the first `len` slots
    /// are the graph's `[1, len, kv_heads, head_dim]` past.
    SlotMajor,
}

/// The per-entry geometry of a model's KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: KvDtype,
    pub layout: KvLayout,
}

/// Metadata bytes per layer and slot: position (u32), merge count (u32),
/// importance (f32), token kind (u32) and the order index (u32). Counted in
/// the budget.
pub const META_BYTES_PER_LAYER_SLOT: u64 = 20;

impl KvShape {
    /// The demo model's decoder (SmolLM2-135M): 30 layers, 3 KV heads of 64.
    pub const fn smollm2_135m(dtype: KvDtype) -> Self {
        KvShape {
            layers: 30,
            kv_heads: 3,
            head_dim: 64,
            dtype,
            layout: KvLayout::HeadMajor,
        }
    }

    /// Every dimension positive, and one slot's bytes (K, V and metadata
    /// of every layer) a number that fits: the sizes below are only
    /// meaningful for a shape that passes.
    pub fn validate(&self) -> Result<()> {
        if self.layers == 0 || self.kv_heads == 0 || self.head_dim == 0 {
            return Err(Error::Shape(format!(
                "layers ({}), kv_heads ({}) and head_dim ({}) must all be positive",
                self.layers, self.kv_heads, self.head_dim
            )));
        }
        let kv = self
            .kv_heads
            .checked_mul(self.head_dim)
            .and_then(|row| row.checked_mul(2 * self.dtype.size()))
            .and_then(|layer| layer.checked_mul(self.layers))
            .and_then(|kv| u64::try_from(kv).ok());
        let meta = (self.layers as u64).checked_mul(META_BYTES_PER_LAYER_SLOT);
        if kv.zip(meta).and_then(|(kv, meta)| kv.checked_add(meta)).is_none() {
            return Err(Error::Shape(format!(
                "{} layers x {} kv heads x {} dims: one slot's size overflows",
                self.layers, self.kv_heads, self.head_dim
            )));
        }
        Ok(())
    }

    /// Where one entry's K (or V) row lies in a layer's block of `capacity`
    /// slots: `(pieces, piece length, stride between pieces, stride between
    /// slots)`, in elements. Format 1 keeps a row whole; format 2 splits it
    /// into one piece per KV head, `capacity` slots apart.
    const fn row_pieces(&self, capacity: usize) -> (usize, usize, usize, usize) {
        match self.layout {
            KvLayout::SlotMajor => (1, self.row_len(), 0, self.row_len()),
            KvLayout::HeadMajor => (
                self.kv_heads,
                self.head_dim,
                capacity.saturating_mul(self.head_dim),
                self.head_dim,
            ),
        }
    }

    /// Elements in one entry's K (or V) for one layer (saturating: see
    /// [`Self::validate`]).
    pub const fn row_len(&self) -> usize {
        self.kv_heads.saturating_mul(self.head_dim)
    }

    /// Bytes of K and V for one slot across all layers (saturating).
    pub const fn kv_bytes_per_slot(&self) -> u64 {
        (self.layers as u64)
            .saturating_mul(2)
            .saturating_mul(self.row_len() as u64)
            .saturating_mul(self.dtype.size() as u64)
    }

    /// Everything one slot costs: K, V and metadata in every layer
    /// (saturating).
    pub const fn bytes_per_slot(&self) -> u64 {
        self.kv_bytes_per_slot()
            .saturating_add((self.layers as u64).saturating_mul(META_BYTES_PER_LAYER_SLOT))
    }
}

/// Where the pool's memory comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PoolBacking {
    /// Anonymous private memory (the default).
    #[default]
    Anonymous,
    /// A file, created or truncated to the pool's size: `/dev/shm/...` to
    /// share it, a hugetlbfs mount for huge pages, or a disk file.
    File(PathBuf),
}

impl PoolBacking {
    /// The file when one is given (`--kv-file`), else anonymous memory.
    pub fn from_file(path: Option<&std::path::Path>) -> Self {
        path.map_or(PoolBacking::Anonymous, |p| PoolBacking::File(p.to_path_buf()))
    }
}

/// One layer's tensors for a decoder step: the live past (read by the graph
/// in place) and the next `t` free slots (written by the graph in place).
pub struct LayerStepView<'a, E> {
    pub past_key: &'a [E],
    pub past_value: &'a [E],
    pub new_key: &'a mut [E],
    pub new_value: &'a mut [E],
}

/// A copy of a pool's live entries (K, V and metadata of every layer), to
/// start several sequences from the same encoded prompt. Only `eval` uses
/// it; the pool itself is never resized.
#[derive(Clone, Debug, Default)]
pub struct PoolSnapshot {
    len: usize,
    /// `[layer][k|v][len rows]` in the pool's bytes.
    data: Vec<u8>,
    position: Vec<u32>,
    merged: Vec<u32>,
    score: Vec<f32>,
    kind: Vec<TokenKind>,
    order: Vec<u32>,
}

impl PoolSnapshot {
    /// Bytes this snapshot holds.
    pub fn bytes(&self) -> usize {
        self.data.len() + 20 * self.position.len()
    }
}

/// The pool. See the module documentation for the layout.
pub struct KvPool {
    shape: KvShape,
    capacity: usize,
    len: usize,
    data: MmapMut,
    /// `[layer][slot]`: logical position of the entry (its sequence index).
    position: Vec<u32>,
    /// `[layer][slot]`: how many original tokens the entry stands for.
    merged: Vec<u32>,
    /// `[layer][slot]`: accumulated attention importance.
    score: Vec<f32>,
    /// `[layer][slot]`: what the entry came from (an anchor keeps its own).
    kind: Vec<TokenKind>,
    /// `[layer][rank]`: slots sorted by ascending position.
    order: Vec<u32>,
    /// Scratch for `retain`, one flag per slot.
    keep_mark: Vec<bool>,
    /// Scratch for `merge`: f32 accumulators for a K and a V row, and one
    /// row converted from the pool's dtype.
    merge_acc: Vec<f32>,
    /// Scratch for merges whose members are also anchors (the reference
    /// variant's quirk): results wait here until every member was read.
    merge_stash: Vec<f32>,
    merge_stash_meta: Vec<(u32, u32, f32)>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("shape", &self.shape)
            .field("capacity", &self.capacity)
            .field("len", &self.len)
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl KvPool {
    /// A pool of exactly `capacity` slots.
    pub fn with_capacity(shape: KvShape, capacity: usize, backing: &PoolBacking) -> Result<Self> {
        shape.validate()?;
        if capacity == 0 {
            return Err(Error::Shape("a KV pool needs at least one slot".into()));
        }
        let bytes = (capacity as u64)
            .checked_mul(shape.kv_bytes_per_slot())
            .filter(|b| usize::try_from(*b).is_ok())
            .ok_or_else(|| Error::Shape(format!("{capacity} slots overflow the address space")))?;
        let data = map(bytes, backing)?;
        let meta = shape.layers * capacity;
        let row = shape.row_len();
        Ok(KvPool {
            shape,
            capacity,
            len: 0,
            data,
            position: vec![0; meta],
            merged: vec![0; meta],
            score: vec![0.0; meta],
            kind: vec![TokenKind::TEMPLATE; meta],
            order: vec![0; meta],
            keep_mark: vec![false; capacity],
            merge_acc: vec![0.0; 3 * row],
            // Reserved once: a merge has at most one anchor per live entry,
            // and aliased merges stash one key and value piece per anchor.
            merge_stash: Vec::with_capacity(2 * capacity * shape.row_pieces(capacity).1),
            merge_stash_meta: Vec::with_capacity(capacity),
        })
    }

    /// The largest pool that fits `budget_bytes` (K, V and metadata).
    pub fn with_budget(shape: KvShape, budget_bytes: u64, backing: &PoolBacking) -> Result<Self> {
        shape.validate()?;
        let per_slot = shape.bytes_per_slot();
        let slots = usize::try_from(budget_bytes / per_slot).unwrap_or(usize::MAX);
        if slots == 0 {
            return Err(Error::BudgetTooSmall {
                budget_bytes,
                bytes_per_slot: per_slot,
                slots,
                min_slots: 1,
                min_bytes: per_slot,
                why: "one entry in every layer",
            });
        }
        Self::with_capacity(shape, slots, backing)
    }

    pub fn shape(&self) -> &KvShape {
        &self.shape
    }

    /// Slots per layer; the hard limit on live entries.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Live entries per layer.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn free(&self) -> usize {
        self.capacity - self.len
    }

    /// Bytes this pool holds: the mapping plus its metadata.
    pub fn bytes(&self) -> u64 {
        self.capacity as u64 * self.shape.bytes_per_slot()
    }

    /// Forgets every entry (a new sequence). Memory stays mapped.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// A copy of the live entries.
    pub fn snapshot(&self) -> PoolSnapshot {
        let row_bytes = self.shape.row_len() * self.shape.dtype.size();
        let elem = self.shape.dtype.size();
        let mut snap = PoolSnapshot {
            len: self.len,
            data: Vec::with_capacity(self.shape.layers * 2 * self.len * row_bytes),
            ..PoolSnapshot::default()
        };
        for layer in 0..self.shape.layers {
            for kv in 0..2 {
                for piece in self.live_pieces(layer, kv) {
                    snap.data
                        .extend_from_slice(&self.data[piece.start * elem..piece.end * elem]);
                }
            }
            let range = self.meta_range(layer);
            snap.position.extend_from_slice(&self.position[range.clone()]);
            snap.merged.extend_from_slice(&self.merged[range.clone()]);
            snap.score.extend_from_slice(&self.score[range.clone()]);
            snap.kind.extend_from_slice(&self.kind[range.clone()]);
            snap.order.extend_from_slice(&self.order[range]);
        }
        snap
    }

    /// Makes the pool hold exactly what `snap` copied (from a pool of the
    /// same shape; it must fit this one's capacity).
    pub fn restore(&mut self, snap: &PoolSnapshot) -> Result<()> {
        let row_bytes = self.shape.row_len() * self.shape.dtype.size();
        if snap.len > self.capacity || snap.data.len() != self.shape.layers * 2 * snap.len * row_bytes {
            return Err(Error::Shape(format!(
                "a snapshot of {} entries ({} bytes) does not fit a pool of {} slots of this shape",
                snap.len,
                snap.data.len(),
                self.capacity
            )));
        }
        let elem = self.shape.dtype.size();
        self.len = snap.len;
        let mut from = 0;
        for layer in 0..self.shape.layers {
            for kv in 0..2 {
                for piece in self.live_pieces(layer, kv) {
                    let bytes = (piece.end - piece.start) * elem;
                    self.data[piece.start * elem..piece.end * elem].copy_from_slice(&snap.data[from..from + bytes]);
                    from += bytes;
                }
            }
            let range = self.meta_range(layer);
            let from = layer * snap.len..(layer + 1) * snap.len;
            self.position[range.clone()].copy_from_slice(&snap.position[from.clone()]);
            self.merged[range.clone()].copy_from_slice(&snap.merged[from.clone()]);
            self.score[range.clone()].copy_from_slice(&snap.score[from.clone()]);
            self.kind[range.clone()].copy_from_slice(&snap.kind[from.clone()]);
            self.order[range].copy_from_slice(&snap.order[from]);
        }
        Ok(())
    }

    // ---- metadata, per layer, for the first `len` slots ---------------------

    fn meta_range(&self, layer: usize) -> std::ops::Range<usize> {
        let start = layer * self.capacity;
        start..start + self.len
    }

    /// Logical positions of the live entries, in slot order.
    pub fn positions(&self, layer: usize) -> &[u32] {
        &self.position[self.meta_range(layer)]
    }

    /// Merge counts of the live entries, in slot order.
    pub fn merge_counts(&self, layer: usize) -> &[u32] {
        &self.merged[self.meta_range(layer)]
    }

    /// The decoder's `past_bias` for the live entries, `[layer][slot]` into
    /// `out` (`layers * len` values): ln(m) for an entry that stands for m
    /// merged ones, so attention weighs it like m copies of itself; 0 for a
    /// plain entry.
    pub fn write_merge_count_bias<E: KvElement>(&self, out: &mut [E]) -> Result<()> {
        if out.len() != self.shape.layers * self.len {
            return Err(Error::Shape(format!(
                "attention bias of {} values for {} layers x {} entries",
                out.len(),
                self.shape.layers,
                self.len
            )));
        }
        if self.len == 0 {
            return Ok(());
        }
        for (layer, row) in out.chunks_exact_mut(self.len).enumerate() {
            for (bias, &count) in row.iter_mut().zip(self.merge_counts(layer)) {
                *bias = E::from_f32((count as f32).ln());
            }
        }
        Ok(())
    }

    /// Token kinds of the live entries, in slot order.
    pub fn kinds(&self, layer: usize) -> &[TokenKind] {
        &self.kind[self.meta_range(layer)]
    }

    /// Accumulated importance of the live entries, in slot order.
    pub fn scores(&self, layer: usize) -> &[f32] {
        &self.score[self.meta_range(layer)]
    }

    /// Live slots sorted by ascending position: `order(l)[r]` is the slot of
    /// the entry with rank `r`.
    pub fn order(&self, layer: usize) -> &[u32] {
        &self.order[self.meta_range(layer)]
    }

    /// The rank (index in position order) of a live slot.
    pub fn rank_of(&self, layer: usize, slot: usize) -> Result<usize> {
        if slot >= self.len {
            return Err(Error::Plan(format!("slot {slot} is not live (len {})", self.len)));
        }
        let base = layer * self.capacity;
        rank_by_position(
            &self.order[base..base + self.len],
            &self.position[base..base + self.capacity],
            slot,
        )
    }

    // ---- K/V data ------------------------------------------------------------

    fn check_dtype<E: KvElement>(&self) -> Result<()> {
        if E::DTYPE != self.shape.dtype {
            return Err(Error::DtypeMismatch {
                pool: self.shape.dtype.name(),
                asked: E::DTYPE.name(),
            });
        }
        Ok(())
    }

    fn elems<E: KvElement>(&self) -> Result<&[E]> {
        self.check_dtype::<E>()?;
        // The mapping is page-aligned and its length a multiple of the element
        // size, so this cast cannot fail; map the error anyway.
        bytemuck::try_cast_slice(&self.data[..]).map_err(|e| Error::Shape(e.to_string()))
    }

    /// Element offset of the start of `(layer, k=0|v=1)`'s block.
    fn block_offset(&self, layer: usize, kv: usize) -> usize {
        (layer * 2 + kv) * self.capacity * self.shape.row_len()
    }

    /// Element ranges holding the live entries of `(layer, kv)`: one range
    /// in format 1, one per KV head in format 2.
    fn live_pieces(&self, layer: usize, kv: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        let (pieces, _, piece_stride, slot_stride) = self.shape.row_pieces(self.capacity);
        let start = self.block_offset(layer, kv);
        let live = self.len * slot_stride;
        (0..pieces).map(move |piece| start + piece * piece_stride..start + piece * piece_stride + live)
    }

    fn require_layout(&self, layout: KvLayout, what: &str) -> Result<()> {
        if self.shape.layout != layout {
            return Err(Error::Shape(format!(
                "{what} needs a pool laid out {layout:?}, this one is {:?}",
                self.shape.layout
            )));
        }
        Ok(())
    }

    /// The live keys of one layer: `[len, kv_heads, head_dim]`, no copy
    /// (format-1 layout only; see [`Self::key_head`]).
    pub fn keys<E: KvElement>(&self, layer: usize) -> Result<&[E]> {
        self.require_layout(KvLayout::SlotMajor, "a layer's keys as one tensor")?;
        let start = self.block_offset(layer, 0);
        Ok(&self.elems::<E>()?[start..start + self.len * self.shape.row_len()])
    }

    /// The live values of one layer: `[len, kv_heads, head_dim]`, no copy
    /// (format-1 layout only).
    pub fn values<E: KvElement>(&self, layer: usize) -> Result<&[E]> {
        self.require_layout(KvLayout::SlotMajor, "a layer's values as one tensor")?;
        let start = self.block_offset(layer, 1);
        Ok(&self.elems::<E>()?[start..start + self.len * self.shape.row_len()])
    }

    /// The key (`kv` 0) or value (`kv` 1) of one live entry for one KV head:
    /// `head_dim` values, in either layout.
    pub fn head_row<E: KvElement>(&self, layer: usize, kv: usize, slot: usize, head: usize) -> Result<&[E]> {
        if layer >= self.shape.layers || kv > 1 || slot >= self.len || head >= self.shape.kv_heads {
            return Err(Error::Plan(format!(
                "layer {layer}, {} of slot {slot}, head {head}: outside {} layers x {} live slots x {} heads",
                if kv == 0 { "key" } else { "value" },
                self.shape.layers,
                self.len,
                self.shape.kv_heads
            )));
        }
        let start = self.block_offset(layer, kv)
            + match self.shape.layout {
                KvLayout::SlotMajor => slot * self.shape.row_len() + head * self.shape.head_dim,
                KvLayout::HeadMajor => (head * self.capacity + slot) * self.shape.head_dim,
            };
        Ok(&self.elems::<E>()?[start..start + self.shape.head_dim])
    }

    /// Writes the K and V rows (`[kv_heads, head_dim]` each) of the free slot
    /// `slot` (at or after `len`), in either layout: how a client without a
    /// graph (tests, benchmarks) fills the slots `append` then makes live.
    pub fn write_free_row<E: KvElement>(&mut self, layer: usize, slot: usize, key: &[E], value: &[E]) -> Result<()> {
        let row = self.shape.row_len();
        if layer >= self.shape.layers
            || slot < self.len
            || slot >= self.capacity
            || key.len() != row
            || value.len() != row
        {
            return Err(Error::Plan(format!(
                "writing slot {slot} of layer {layer} ({} and {} values) in a pool of {} live of {} slots, rows of {row}",
                key.len(),
                value.len(),
                self.len,
                self.capacity
            )));
        }
        self.check_dtype::<E>()?;
        let (_, piece_len, piece_stride, slot_stride) = self.shape.row_pieces(self.capacity);
        let blocks = [self.block_offset(layer, 0), self.block_offset(layer, 1)];
        let elems: &mut [E] =
            bytemuck::try_cast_slice_mut(&mut self.data[..]).map_err(|e| Error::Shape(e.to_string()))?;
        for (block, source) in blocks.into_iter().zip([key, value]) {
            for (piece, part) in source.chunks_exact(piece_len).enumerate() {
                let start = block + piece * piece_stride + slot * slot_stride;
                elems[start..start + piece_len].copy_from_slice(part);
            }
        }
        Ok(())
    }

    /// Per layer, the whole K and V blocks (`[kv_heads, capacity, head_dim]`
    /// each): decoder format 2 binds each as the graph's past and present, so
    /// GroupQueryAttention appends its new rows at slot `len` in place. Call
    /// [`KvPool::append`] after the graph wrote them.
    pub fn cache_blocks<E: KvElement>(&mut self) -> Result<impl Iterator<Item = (&mut [E], &mut [E])>> {
        self.check_dtype::<E>()?;
        self.require_layout(KvLayout::HeadMajor, "binding the pool as the graph's cache")?;
        let block = self.capacity * self.shape.row_len();
        let elems: &mut [E] =
            bytemuck::try_cast_slice_mut(&mut self.data[..]).map_err(|e| Error::Shape(e.to_string()))?;
        Ok(elems
            .chunks_exact_mut(2 * block)
            .map(move |layer| layer.split_at_mut(block)))
    }

    /// Per layer: the live past to read and the next `t` slots to write, all
    /// in place (format-1 layout). Call [`KvPool::append`] after the graph
    /// wrote them.
    pub fn step_views<E: KvElement>(&mut self, t: usize) -> Result<impl Iterator<Item = LayerStepView<'_, E>>> {
        self.check_dtype::<E>()?;
        self.require_layout(KvLayout::SlotMajor, "a format-1 decoder step")?;
        if self.len + t > self.capacity {
            return Err(Error::CapacityExceeded {
                needed: self.len + t,
                capacity: self.capacity,
            });
        }
        let row = self.shape.row_len();
        let block = self.capacity * row;
        let past = self.len * row;
        let new = t * row;
        let elems: &mut [E] =
            bytemuck::try_cast_slice_mut(&mut self.data[..]).map_err(|e| Error::Shape(e.to_string()))?;
        Ok(elems.chunks_exact_mut(2 * block).map(move |layer| {
            let (keys, values) = layer.split_at_mut(block);
            let (past_key, free_key) = keys.split_at_mut(past);
            let (past_value, free_value) = values.split_at_mut(past);
            LayerStepView {
                past_key,
                past_value,
                new_key: &mut free_key[..new],
                new_value: &mut free_value[..new],
            }
        }))
    }

    // ---- mutations -------------------------------------------------------------

    /// Makes the `kinds.len()` slots after the live ones live, in every
    /// layer, with consecutive logical positions from `first_position`, those
    /// kinds, merge count 1 and zero importance. Their K/V must already be
    /// written (see `step_views`).
    pub fn append(&mut self, first_position: usize, kinds: &[TokenKind]) -> Result<()> {
        let t = kinds.len();
        if self.len + t > self.capacity {
            return Err(Error::CapacityExceeded {
                needed: self.len + t,
                capacity: self.capacity,
            });
        }
        let last = first_position
            .checked_add(t)
            .and_then(|end| u32::try_from(end).ok())
            .ok_or_else(|| Error::Plan(format!("position {first_position}+{t} overflows u32")))?;
        let first = last - t as u32;
        for layer in 0..self.shape.layers {
            let base = layer * self.capacity;
            if self.len > 0 {
                let newest = self.order[base + self.len - 1] as usize;
                if self.position[base + newest] >= first {
                    return Err(Error::Plan(format!(
                        "new position {first} is not after the newest entry ({})",
                        self.position[base + newest]
                    )));
                }
            }
            for (i, &kind) in kinds.iter().enumerate() {
                let slot = self.len + i;
                self.position[base + slot] = first + i as u32;
                self.merged[base + slot] = 1;
                self.score[base + slot] = 0.0;
                self.kind[base + slot] = kind;
                self.order[base + slot] = slot as u32;
            }
        }
        self.len += t;
        Ok(())
    }

    /// Adds one step's attention column sums (`[len]`, in slot order: the
    /// past slots then the new ones) to a layer's importance.
    pub fn add_scores(&mut self, layer: usize, colsum: &[f32]) -> Result<()> {
        if colsum.len() != self.len {
            return Err(Error::Shape(format!(
                "attention column sums have {} entries, the cache {}",
                colsum.len(),
                self.len
            )));
        }
        let range = self.meta_range(layer);
        for (score, add) in self.score[range].iter_mut().zip(colsum) {
            *score += add;
        }
        Ok(())
    }

    /// Removes one entry from every layer (`victims[layer]` is a live slot).
    /// The last slot moves into the hole; nothing else moves.
    pub fn evict(&mut self, victims: &[u32]) -> Result<()> {
        if victims.len() != self.shape.layers {
            return Err(Error::Plan(format!(
                "{} eviction victims for {} layers",
                victims.len(),
                self.shape.layers
            )));
        }
        if let Some(&bad) = victims.iter().find(|&&v| v as usize >= self.len) {
            return Err(Error::Plan(format!("evicting slot {bad} of {}", self.len)));
        }
        let last = self.len - 1;
        for (layer, &victim) in victims.iter().enumerate() {
            let victim = victim as usize;
            let base = layer * self.capacity;
            let rank = self.rank_of(layer, victim)?;
            self.order.copy_within(base + rank + 1..base + self.len, base + rank);
            if victim != last {
                self.move_entry(layer, last, victim);
                let rank_of_moved = rank_by_position(
                    &self.order[base..base + last],
                    &self.position[base..base + self.capacity],
                    victim,
                )?;
                self.order[base + rank_of_moved] = victim as u32;
            }
        }
        self.len = last;
        Ok(())
    }

    /// Moves entry `from` into slot `to` of one layer: K, V and metadata.
    /// The order index is the caller's to fix.
    fn move_entry(&mut self, layer: usize, from: usize, to: usize) {
        let elem = self.shape.dtype.size();
        let (pieces, piece_len, piece_stride, slot_stride) = self.shape.row_pieces(self.capacity);
        let piece_bytes = piece_len * elem;
        for kv in 0..2 {
            let block = self.block_offset(layer, kv);
            for piece in 0..pieces {
                let src = (block + piece * piece_stride + from * slot_stride) * elem;
                let dst = (block + piece * piece_stride + to * slot_stride) * elem;
                self.data.copy_within(src..src + piece_bytes, dst);
            }
        }
        let base = layer * self.capacity;
        self.position[base + to] = self.position[base + from];
        self.merged[base + to] = self.merged[base + from];
        self.score[base + to] = self.score[base + from];
        self.kind[base + to] = self.kind[base + from];
    }

    /// Merges entries of one layer into anchors: each `(member, anchor)` pair
    /// folds the member into the anchor. An anchor becomes the mean of the
    /// original tokens it and its members stand for (weighted by merge
    /// counts, so repeated merging stays a plain mean), its merge count their
    /// sum, its importance their sum. Members stay live until `retain` drops
    /// them. Values are read before any is written, so a member may itself be
    /// an anchor (or the anchor itself); the mean is accumulated in f32.
    pub fn merge(&mut self, layer: usize, pairs: &mut [(u32, u32)]) -> Result<()> {
        if layer >= self.shape.layers {
            return Err(Error::Plan(format!("layer {layer} of {}", self.shape.layers)));
        }
        if let Some(&(m, a)) = pairs
            .iter()
            .find(|&&(m, a)| m as usize >= self.len || a as usize >= self.len)
        {
            return Err(Error::Plan(format!(
                "merging slot {m} into {a} with {} live entries",
                self.len
            )));
        }
        pairs.sort_unstable_by_key(|&(member, anchor)| (anchor, member));
        let aliased = pairs
            .iter()
            .any(|&(member, _)| pairs.binary_search_by_key(&member, |&(_, a)| a).is_ok());
        match self.shape.dtype {
            KvDtype::F16 => self.merge_sorted::<f16>(layer, pairs, aliased),
            KvDtype::F32 => self.merge_sorted::<f32>(layer, pairs, aliased),
        }
    }

    fn merge_sorted<E: KvElement>(&mut self, layer: usize, pairs: &[(u32, u32)], aliased: bool) -> Result<()> {
        // Rows are merged piece by piece (one piece per KV head in format 2);
        // counts and importance change only after every piece was read.
        let (pieces, piece_len, piece_stride, slot_stride) = self.shape.row_pieces(self.capacity);
        let key_block = self.block_offset(layer, 0);
        let value_block = self.block_offset(layer, 1);
        let meta_base = layer * self.capacity;
        let KvPool {
            data,
            merged,
            score,
            merge_acc,
            merge_stash,
            merge_stash_meta,
            ..
        } = self;
        let elems: &mut [E] = bytemuck::try_cast_slice_mut(&mut data[..]).map_err(|e| Error::Shape(e.to_string()))?;
        let (acc_key, rest) = merge_acc.split_at_mut(piece_len);
        let (acc_value, rest) = rest.split_at_mut(piece_len);
        let widened = &mut rest[..piece_len];
        merge_stash_meta.clear();
        for group in pairs.chunk_by(|a, b| a.1 == b.1) {
            let anchor = group[0].1 as usize;
            let mut total = merged[meta_base + anchor] as f64;
            let mut importance = score[meta_base + anchor];
            for &(member, _) in group {
                total += merged[meta_base + member as usize] as f64;
                importance += score[meta_base + member as usize];
            }
            merge_stash_meta.push((
                anchor as u32,
                u32::try_from(total as u64).unwrap_or(u32::MAX),
                importance,
            ));
        }
        for piece in 0..pieces {
            let key_base = key_block + piece * piece_stride;
            let value_base = value_block + piece * piece_stride;
            let key_at = |slot: usize| key_base + slot * slot_stride;
            let value_at = |slot: usize| value_base + slot * slot_stride;
            merge_stash.clear();
            for group in pairs.chunk_by(|a, b| a.1 == b.1) {
                let anchor = group[0].1 as usize;
                let anchor_count = merged[meta_base + anchor];
                let mut total = anchor_count as f64;
                let weight = anchor_count as f32;
                E::accumulate(acc_key, widened, &elems[key_at(anchor)..][..piece_len], weight, true);
                E::accumulate(
                    acc_value,
                    widened,
                    &elems[value_at(anchor)..][..piece_len],
                    weight,
                    true,
                );
                for &(member, _) in group {
                    let member = member as usize;
                    let count = merged[meta_base + member];
                    let weight = count as f32;
                    E::accumulate(acc_key, widened, &elems[key_at(member)..][..piece_len], weight, false);
                    E::accumulate(
                        acc_value,
                        widened,
                        &elems[value_at(member)..][..piece_len],
                        weight,
                        false,
                    );
                    total += count as f64;
                }
                let inv = (1.0 / total) as f32;
                if aliased {
                    merge_stash.extend(acc_key.iter().chain(acc_value.iter()).map(|v| v * inv));
                } else {
                    store_mean(&mut elems[key_at(anchor)..][..piece_len], acc_key, inv);
                    store_mean(&mut elems[value_at(anchor)..][..piece_len], acc_value, inv);
                }
            }
            if aliased {
                for (&(anchor, _, _), stashed) in
                    merge_stash_meta.iter().zip(merge_stash.chunks_exact_mut(2 * piece_len))
                {
                    let anchor = anchor as usize;
                    let (key, value) = stashed.split_at_mut(piece_len);
                    store_mean(&mut elems[key_at(anchor)..][..piece_len], key, 1.0);
                    store_mean(&mut elems[value_at(anchor)..][..piece_len], value, 1.0);
                }
            }
        }
        for &(anchor, total, importance) in merge_stash_meta.iter() {
            merged[meta_base + anchor as usize] = total;
            score[meta_base + anchor as usize] = importance;
        }
        Ok(())
    }

    /// Moves every live entry to `new_position(layer, old)` and rotates its
    /// key by the difference (keys are stored after RoPE; values carry no
    /// position). The map must keep each layer's order (never map a later
    /// entry before an earlier one; equal positions are allowed): it is
    /// checked before anything changes, so the order index stays valid.
    pub fn remap_positions<E: KvElement>(
        &mut self,
        rope: &Rope,
        mut new_position: impl FnMut(usize, u32) -> u32,
    ) -> Result<()> {
        self.check_dtype::<E>()?;
        if rope.head_dim() != self.shape.head_dim {
            return Err(Error::Shape(format!(
                "RoPE over {} dimensions for heads of {}",
                rope.head_dim(),
                self.shape.head_dim
            )));
        }
        for layer in 0..self.shape.layers {
            let base = layer * self.capacity;
            let mut previous: Option<u32> = None;
            for &slot in &self.order[base..base + self.len] {
                let moved = new_position(layer, self.position[base + slot as usize]);
                if previous.is_some_and(|p| moved < p) {
                    return Err(Error::Plan(format!(
                        "a position remap must keep the order: layer {layer} maps an entry back to {moved}"
                    )));
                }
                previous = Some(moved);
            }
        }
        let capacity = self.capacity;
        let (pieces, piece_len, piece_stride, _) = self.shape.row_pieces(capacity);
        let blocks: Vec<usize> = (0..self.shape.layers)
            .map(|layer| self.block_offset(layer, 0))
            .collect();
        let elems: &mut [E] =
            bytemuck::try_cast_slice_mut(&mut self.data[..]).map_err(|e| Error::Shape(e.to_string()))?;
        for (layer, block) in blocks.into_iter().enumerate() {
            let base = layer * capacity;
            for slot in 0..self.len {
                let old = self.position[base + slot];
                let moved = new_position(layer, old);
                let delta = i64::from(moved) - i64::from(old);
                // The live slots of a piece are contiguous: slot stride = piece length.
                for piece in 0..pieces {
                    let start = block + piece * piece_stride + slot * piece_len;
                    rope.rotate(&mut elems[start..start + piece_len], delta);
                }
                self.position[base + slot] = moved;
            }
        }
        Ok(())
    }

    /// Keeps exactly the listed slots in every layer and drops the rest.
    /// `keep` is `[layer][k]` flattened; each layer lists `k` distinct live
    /// slots. Kept entries from the tail move into holes at the front, so at
    /// most `len - k` entries move per layer.
    pub fn retain(&mut self, keep: &[u32]) -> Result<()> {
        let layers = self.shape.layers;
        if !keep.len().is_multiple_of(layers) {
            return Err(Error::Plan(format!(
                "keep list of {} entries for {layers} layers",
                keep.len()
            )));
        }
        let k = keep.len() / layers;
        if k > self.len {
            return Err(Error::Plan(format!("keeping {k} of {} entries", self.len)));
        }
        for layer in 0..layers {
            let len = self.len;
            let mark = &mut self.keep_mark[..len];
            mark.fill(false);
            for &slot in &keep[layer * k..(layer + 1) * k] {
                let slot = slot as usize;
                if slot >= len || mark[slot] {
                    return Err(Error::Plan(format!(
                        "layer {layer}: slot {slot} is not live or listed twice"
                    )));
                }
                mark[slot] = true;
            }
            let mut hole = 0;
            for source in k..len {
                if !self.keep_mark[source] {
                    continue;
                }
                while self.keep_mark[hole] {
                    hole += 1;
                }
                self.move_entry(layer, source, hole);
                hole += 1;
            }
            let base = layer * self.capacity;
            let (order, position) = (&mut self.order[base..base + k], &self.position[base..base + k]);
            for (rank, slot) in order.iter_mut().enumerate() {
                *slot = rank as u32;
            }
            order.sort_unstable_by_key(|&slot| position[slot as usize]);
        }
        self.len = k;
        Ok(())
    }
}

/// Finds the rank of `slot` in `order` (slots sorted by position).
fn rank_by_position(order: &[u32], position: &[u32], slot: usize) -> Result<usize> {
    let wanted = position[slot];
    order
        .binary_search_by_key(&wanted, |&s| position[s as usize])
        .map_err(|_| Error::Plan(format!("slot {slot} (position {wanted}) missing from the order index")))
}

/// `row = acc * scale`, rounded to the pool's dtype. Scales `acc` in place.
fn store_mean<E: KvElement>(row: &mut [E], acc: &mut [f32], scale: f32) {
    if scale != 1.0 {
        acc.iter_mut().for_each(|a| *a *= scale);
    }
    E::narrow(acc, row);
}

fn map(bytes: u64, backing: &PoolBacking) -> Result<MmapMut> {
    // Checked by the caller: `bytes` fits in usize.
    let len = bytes as usize;
    match backing {
        PoolBacking::Anonymous => MmapOptions::new()
            .len(len)
            .populate()
            .map_anon()
            .map_err(|source| Error::PoolAlloc { bytes, source }),
        PoolBacking::File(path) => {
            let file_error = |source| Error::PoolFile {
                path: path.clone(),
                source,
            };
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(file_error)?;
            file.set_len(bytes).map_err(file_error)?;
            // SAFETY: the file was just created or truncated by us and is only
            // reached through this mapping while the pool lives; another
            // process writing it would corrupt the cache's values, not memory
            // safety of anything but those f16/f32 bit patterns.
            unsafe { MmapOptions::new().len(len).populate().map_mut(&file) }.map_err(file_error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(dtype: KvDtype) -> KvShape {
        KvShape {
            layers: 2,
            kv_heads: 2,
            head_dim: 3,
            dtype,
            layout: KvLayout::SlotMajor,
        }
    }

    /// Appends `t` entries whose every element is `position + 0.25 * layer`
    /// (keys) and its negation (values).
    fn push<E: KvElement>(pool: &mut KvPool, t: usize, first_position: usize) {
        for (layer, view) in pool.step_views::<E>(t).unwrap().enumerate() {
            let row = view.new_key.len() / t;
            for i in 0..t {
                let v = (first_position + i) as f32 + 0.25 * layer as f32;
                view.new_key[i * row..(i + 1) * row].fill(E::from_f32(v));
                view.new_value[i * row..(i + 1) * row].fill(E::from_f32(-v));
            }
        }
        let kinds: Vec<TokenKind> = (0..t).map(|i| TokenKind::image(0, first_position + i)).collect();
        pool.append(first_position, &kinds).unwrap();
    }

    fn key_of(pool: &KvPool, layer: usize, slot: usize) -> f32 {
        let row = pool.shape().row_len();
        pool.keys::<f32>(layer).unwrap()[slot * row]
    }

    #[test]
    fn a_shape_whose_slot_size_overflows_is_refused() {
        let huge = KvShape {
            layers: 30,
            kv_heads: 3,
            head_dim: 1 << 61,
            dtype: KvDtype::F32,
            layout: KvLayout::HeadMajor,
        };
        let err = huge.validate().unwrap_err().to_string();
        assert!(err.contains("one slot's size overflows"), "{err}");
        assert_eq!(huge.bytes_per_slot(), u64::MAX, "saturates, never panics");
        assert!(KvPool::with_budget(huge, 1 << 20, &PoolBacking::Anonymous).is_err());
        assert!(KvShape::smollm2_135m(KvDtype::F16).validate().is_ok());
    }

    #[test]
    fn budget_sizes_the_pool_and_counts_metadata() {
        let s = shape(KvDtype::F16);
        // 2 layers * 2 (k,v) * 6 elems * 2 bytes = 48 bytes of K/V, 40 of metadata.
        assert_eq!(s.bytes_per_slot(), 88);
        let pool = KvPool::with_budget(s, 880, &PoolBacking::Anonymous).unwrap();
        assert_eq!(pool.capacity(), 10);
        assert!(pool.bytes() <= 880);
        let pool = KvPool::with_budget(s, 967, &PoolBacking::Anonymous).unwrap();
        assert_eq!(pool.capacity(), 10);
    }

    #[test]
    fn budget_too_small_is_an_error() {
        let err = KvPool::with_budget(shape(KvDtype::F32), 10, &PoolBacking::Anonymous).unwrap_err();
        assert!(matches!(err, Error::BudgetTooSmall { min_bytes: 136, .. }), "{err}");
    }

    #[test]
    fn zero_shape_is_an_error() {
        let mut s = shape(KvDtype::F32);
        s.kv_heads = 0;
        assert!(matches!(
            KvPool::with_capacity(s, 4, &PoolBacking::Anonymous),
            Err(Error::Shape(_))
        ));
    }

    #[test]
    fn views_read_what_steps_wrote_in_place() {
        let mut pool = KvPool::with_capacity(shape(KvDtype::F32), 8, &PoolBacking::Anonymous).unwrap();
        push::<f32>(&mut pool, 3, 0);
        push::<f32>(&mut pool, 1, 3);
        assert_eq!(pool.len(), 4);
        for layer in 0..2 {
            let keys = pool.keys::<f32>(layer).unwrap();
            assert_eq!(keys.len(), 4 * 6);
            assert_eq!(keys[3 * 6], 3.0 + 0.25 * layer as f32);
            assert_eq!(pool.values::<f32>(layer).unwrap()[6], -(1.0 + 0.25 * layer as f32));
            assert_eq!(pool.positions(layer), &[0, 1, 2, 3]);
            assert_eq!(pool.order(layer), &[0, 1, 2, 3]);
        }
        // The past views point into the mapping itself: no copy.
        let key_ptr = pool.keys::<f32>(1).unwrap().as_ptr();
        let view_ptr = pool.step_views::<f32>(1).unwrap().nth(1).unwrap().past_key.as_ptr();
        assert_eq!(key_ptr, view_ptr);
    }

    #[test]
    fn wrong_dtype_view_is_an_error() {
        let pool = KvPool::with_capacity(shape(KvDtype::F16), 2, &PoolBacking::Anonymous).unwrap();
        assert!(matches!(pool.keys::<f32>(0), Err(Error::DtypeMismatch { .. })));
    }

    #[test]
    fn step_past_capacity_is_refused() {
        let mut pool = KvPool::with_capacity(shape(KvDtype::F32), 2, &PoolBacking::Anonymous).unwrap();
        assert!(matches!(
            pool.step_views::<f32>(3).map(|_| ()),
            Err(Error::CapacityExceeded { needed: 3, capacity: 2 })
        ));
        assert!(pool.append(0, &[TokenKind::USER; 3]).is_err());
    }

    #[test]
    fn positions_must_grow() {
        let mut pool = KvPool::with_capacity(shape(KvDtype::F32), 4, &PoolBacking::Anonymous).unwrap();
        push::<f32>(&mut pool, 2, 5);
        assert!(matches!(pool.append(6, &[TokenKind::USER]), Err(Error::Plan(_))));
    }

    #[test]
    fn evict_moves_the_last_slot_into_the_hole() {
        let mut pool = KvPool::with_capacity(shape(KvDtype::F32), 8, &PoolBacking::Anonymous).unwrap();
        push::<f32>(&mut pool, 5, 0);
        pool.add_scores(0, &[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        pool.evict(&[1, 4]).unwrap();
        assert_eq!(pool.len(), 4);
        // Layer 0: slot 4 (position 4) moved into slot 1.
        assert_eq!(pool.positions(0), &[0, 4, 2, 3]);
        assert_eq!(pool.scores(0), &[1.0, 5.0, 3.0, 4.0]);
        assert_eq!(
            pool.kinds(0)[1],
            TokenKind::image(0, 4),
            "the kind moves with its entry"
        );
        assert_eq!(key_of(&pool, 0, 1), 4.0);
        assert_eq!(pool.order(0), &[0, 2, 3, 1]);
        // Layer 1: the last slot itself went; nothing moved.
        assert_eq!(pool.positions(1), &[0, 1, 2, 3]);
        assert_eq!(pool.order(1), &[0, 1, 2, 3]);
        assert_eq!(pool.rank_of(0, 1).unwrap(), 3);
    }

    #[test]
    fn a_snapshot_restores_every_entry_and_its_metadata() {
        let mut pool = KvPool::with_capacity(shape(KvDtype::F32), 8, &PoolBacking::Anonymous).unwrap();
        push::<f32>(&mut pool, 5, 0);
        pool.add_scores(1, &[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        pool.evict(&[1, 4]).unwrap();
        let snap = pool.snapshot();
        let before = (
            pool.keys::<f32>(1).unwrap().to_vec(),
            pool.values::<f32>(0).unwrap().to_vec(),
        );
        let meta = |p: &KvPool| {
            (
                p.positions(0).to_vec(),
                p.scores(1).to_vec(),
                p.kinds(0).to_vec(),
                p.order(0).to_vec(),
            )
        };
        let expected = meta(&pool);
        pool.clear();
        push::<f32>(&mut pool, 7, 10);
        pool.restore(&snap).unwrap();
        assert_eq!(pool.len(), 4);
        assert_eq!(meta(&pool), expected);
        assert_eq!(
            (
                pool.keys::<f32>(1).unwrap().to_vec(),
                pool.values::<f32>(0).unwrap().to_vec()
            ),
            before
        );
        let mut small = KvPool::with_capacity(shape(KvDtype::F32), 3, &PoolBacking::Anonymous).unwrap();
        assert!(small.restore(&snap).is_err(), "four entries do not fit three slots");
    }

    #[test]
    fn merge_is_the_count_weighted_mean() {
        let mut pool = KvPool::with_capacity(shape(KvDtype::F32), 8, &PoolBacking::Anonymous).unwrap();
        push::<f32>(&mut pool, 4, 0);
        pool.merge(0, &mut [(1, 0), (2, 0)]).unwrap();
        assert_eq!(key_of(&pool, 0, 0), 1.0); // mean of 0, 1, 2
        assert_eq!(pool.merge_counts(0)[0], 3);
        // Merging the merged entry again keeps the mean of all four tokens.
        pool.merge(0, &mut [(3, 0)]).unwrap();
        assert_eq!(key_of(&pool, 0, 0), 1.5);
        assert_eq!(pool.merge_counts(0)[0], 4);
        assert_eq!(pool.values::<f32>(0).unwrap()[0], -1.5);
        // Layer 1 untouched.
        assert_eq!(key_of(&pool, 1, 0), 0.25);
    }

    #[test]
    fn merge_count_bias_is_ln_m_per_layer_and_slot() {
        let mut pool = KvPool::with_capacity(shape(KvDtype::F16), 8, &PoolBacking::Anonymous).unwrap();
        push::<f16>(&mut pool, 4, 0);
        pool.merge(0, &mut [(1, 0), (2, 0)]).unwrap();
        pool.merge(1, &mut [(3, 2)]).unwrap();
        let mut bias = [f16::from_f32(9.0); 8];
        pool.write_merge_count_bias(&mut bias).unwrap();
        let got: Vec<f32> = bias.iter().map(|b| b.to_f32()).collect();
        let ln = |m: f32| f16::from_f32(m.ln()).to_f32();
        // Row of layer 0, then row of layer 1, each `len` long.
        assert_eq!(got[0], ln(3.0));
        assert_eq!(got[6], ln(2.0));
        for (i, value) in got.iter().enumerate() {
            let count = pool.merge_counts(i / 4)[i % 4] as f32;
            assert_eq!(*value, ln(count), "value {i}");
        }
        let mut short = [0.0f32; 7];
        assert!(matches!(pool.write_merge_count_bias(&mut short), Err(Error::Shape(_))));
    }

    #[test]
    fn merge_reads_originals_when_members_are_anchors() {
        let mut pool = KvPool::with_capacity(shape(KvDtype::F32), 8, &PoolBacking::Anonymous).unwrap();
        push::<f32>(&mut pool, 4, 0);
        // 0 -> 1 and 1 -> 2: slot 2 must average the ORIGINAL slot 1 (1.0).
        // 3 -> 3 counts slot 3 twice, as torch's scatter_reduce(mean) does.
        pool.merge(0, &mut [(0, 1), (1, 2), (3, 3)]).unwrap();
        assert_eq!(key_of(&pool, 0, 1), 0.5);
        assert_eq!(key_of(&pool, 0, 2), 1.5);
        assert_eq!(key_of(&pool, 0, 3), 3.0);
        assert_eq!(pool.merge_counts(0), &[1, 2, 2, 2]);
    }

    #[test]
    fn retain_compacts_and_keeps_order() {
        let mut pool = KvPool::with_capacity(shape(KvDtype::F32), 8, &PoolBacking::Anonymous).unwrap();
        push::<f32>(&mut pool, 6, 10);
        pool.retain(&[0, 3, 5, /* layer 1 */ 4, 1, 2]).unwrap();
        assert_eq!(pool.len(), 3);
        let mut kept0: Vec<u32> = pool.order(0).iter().map(|&s| pool.positions(0)[s as usize]).collect();
        kept0.sort();
        assert_eq!(kept0, vec![10, 13, 15]);
        let by_rank: Vec<u32> = pool.order(1).iter().map(|&s| pool.positions(1)[s as usize]).collect();
        assert_eq!(by_rank, vec![11, 12, 14]);
        for slot in 0..3 {
            assert_eq!(key_of(&pool, 1, slot), pool.positions(1)[slot] as f32 + 0.25);
        }
        assert!(pool.retain(&[0, 0, 1, 2]).is_err(), "duplicate slot");
        assert!(pool.retain(&[0, 7]).is_err(), "dead slot");
    }

    #[test]
    fn f16_pool_round_trips() {
        let mut pool = KvPool::with_capacity(shape(KvDtype::F16), 4, &PoolBacking::Anonymous).unwrap();
        push::<f16>(&mut pool, 3, 0);
        pool.merge(1, &mut [(1, 0), (2, 0)]).unwrap();
        let row = pool.shape().row_len();
        assert_eq!(pool.keys::<f16>(1).unwrap()[0].to_f32(), 1.25);
        assert_eq!(pool.values::<f16>(1).unwrap()[row].to_f32(), -1.25);
    }

    #[test]
    fn file_backed_pool_maps_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.bin");
        let mut pool = KvPool::with_capacity(shape(KvDtype::F32), 4, &PoolBacking::File(path.clone())).unwrap();
        push::<f32>(&mut pool, 2, 0);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            4 * shape(KvDtype::F32).kv_bytes_per_slot()
        );
    }

    #[test]
    fn unmappable_file_is_an_error() {
        let err = KvPool::with_capacity(
            shape(KvDtype::F32),
            4,
            &PoolBacking::File("/nonexistent-dir/pool.bin".into()),
        )
        .unwrap_err();
        assert!(matches!(err, Error::PoolFile { .. }));
        assert!(err.to_string().contains("/nonexistent-dir/pool.bin"), "{err}");
    }
}
