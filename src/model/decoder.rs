//! The decoder graph, run straight over the KV pool (docs/model-format.md).
//!
//! One step feeds `T` new tokens:
//!
//! ```text
//! format 2 (in place)   past_key_l = present_key_l = the pool's layer-l K block
//!                       [1, kv_heads, capacity, head_dim]; GroupQueryAttention
//!                       appends the T new rows at slot `len`, nothing else moves
//! format 1              past_key_l = the pool's first `len` slots [1, len, KV, D];
//!                       new_key_l  = the next T slots, written by the graph
//! ```
//!
//! The run goes through ONNX Runtime's C API with every tensor created over
//! memory that already exists (the pool, the step's embeddings, buffers sized
//! once here), so a step allocates nothing on the Rust side: `ort`'s safe
//! `run` wants a map of inputs built per call and cannot bind one buffer as
//! both an input and an output.

use std::ffi::{c_char, c_void, CString};
use std::ptr::{self, NonNull};
use std::time::Instant;

use ort::memory::MemoryInfo;
use ort::session::Session;
use ort::value::PrimitiveTensorElementType;
use ort::AsPointer;

use crate::error::{Error, Result};
use crate::kv::{KvCache, KvElement};
use crate::model::manifest::{DecoderFormat, Manifest};

/// Graph input and output names, as C strings, made once.
struct Names {
    inputs_embeds: CString,
    position_ids: CString,
    bias: CString,
    seqlens_k: CString,
    total_sequence_length: CString,
    logits: CString,
    past_key: Vec<CString>,
    past_value: Vec<CString>,
    /// `new_*` (format 1) or `present_*` (format 2).
    out_key: Vec<CString>,
    out_value: Vec<CString>,
    colsum: Vec<CString>,
}

fn c_name(name: String) -> CString {
    // Graph names made here contain no NUL byte.
    CString::new(name).unwrap_or_default()
}

/// The tensors of one run: pointers into `Names` and values created over
/// existing memory, released after the run. Capacities are reserved once.
struct RunScratch {
    input_names: Vec<*const c_char>,
    inputs: Vec<*const ort::sys::OrtValue>,
    output_names: Vec<*const c_char>,
    outputs: Vec<*mut ort::sys::OrtValue>,
}

// SAFETY: the pointers are only meaningful during one `Decoder::step`, which
// takes `&mut self`; between steps they are cleared and never dereferenced.
unsafe impl Send for RunScratch {}

impl RunScratch {
    fn with_capacity(inputs: usize, outputs: usize) -> Self {
        RunScratch {
            input_names: Vec::with_capacity(inputs),
            inputs: Vec::with_capacity(inputs),
            output_names: Vec::with_capacity(outputs),
            outputs: Vec::with_capacity(outputs),
        }
    }

    fn input(&mut self, name: &CString, value: *mut ort::sys::OrtValue) {
        self.input_names.push(name.as_ptr());
        self.inputs.push(value);
    }

    fn output(&mut self, name: &CString, value: *mut ort::sys::OrtValue) {
        self.output_names.push(name.as_ptr());
        self.outputs.push(value);
    }

    /// Releases the values of the last run and forgets them.
    fn clear(&mut self) {
        let api = ort::api();
        for &value in &self.inputs {
            // SAFETY: created by `tensor` below and owned only here; releasing
            // a value over external data does not free the data.
            unsafe { (api.ReleaseValue)(value.cast_mut()) };
        }
        for &value in &self.outputs {
            // SAFETY: as above.
            unsafe { (api.ReleaseValue)(value) };
        }
        self.input_names.clear();
        self.inputs.clear();
        self.output_names.clear();
        self.outputs.clear();
    }
}

impl Drop for RunScratch {
    fn drop(&mut self) {
        self.clear();
    }
}

/// A tensor of `shape` over `len` elements at `data`, which must stay valid
/// (and, for an output, writable) until the run's values are released.
fn tensor<T: PrimitiveTensorElementType>(
    info: &MemoryInfo,
    data: *const T,
    len: usize,
    shape: &[i64],
) -> Result<*mut ort::sys::OrtValue> {
    let elements: i64 = shape.iter().product();
    if elements < 0 || elements as usize != len {
        return Err(Error::Shape(format!("a tensor of shape {shape:?} over {len} elements")));
    }
    // SAFETY: as `raw_tensor` asks, passed on to the caller (above).
    let value = unsafe {
        raw_tensor(
            info,
            data.cast::<c_void>(),
            len * std::mem::size_of::<T>(),
            shape,
            T::into_tensor_element_type(),
        )
    }?;
    Ok(value.as_ptr())
}

/// An ONNX Runtime value of `shape` and `ty` over `bytes` bytes at `data`,
/// without a copy; released with `ReleaseValue`, which leaves the data.
///
/// # Safety
/// `data` must be valid for `bytes` bytes (and writable, for an output) for
/// as long as the value lives, and `bytes` must be the shape's size in `ty`.
pub(crate) unsafe fn raw_tensor(
    info: &MemoryInfo,
    data: *const c_void,
    bytes: usize,
    shape: &[i64],
    ty: ort::value::TensorElementType,
) -> Result<NonNull<ort::sys::OrtValue>> {
    let api = ort::api();
    let mut value: *mut ort::sys::OrtValue = ptr::null_mut();
    // SAFETY: the caller keeps `data` valid for `bytes` (the function's
    // contract); ONNX Runtime copies the shape and does not take ownership
    // of external data.
    let status = unsafe {
        (api.CreateTensorWithDataAsOrtValue)(
            info.ptr(),
            data.cast_mut(),
            bytes,
            shape.as_ptr(),
            shape.len(),
            ty.into(),
            &mut value,
        )
    };
    check(status, "creating a tensor over existing memory")?;
    NonNull::new(value).ok_or_else(|| Error::Runtime {
        context: "creating a tensor over existing memory".into(),
        reason: "ONNX Runtime returned no value".into(),
    })
}

pub(crate) fn check(status: ort::sys::OrtStatusPtr, context: &str) -> Result<()> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status holds a NUL-terminated message and is ours to
    // release.
    let reason = unsafe {
        let text = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0))
            .to_string_lossy()
            .into_owned();
        (api.ReleaseStatus)(status.0);
        text
    };
    Err(Error::Runtime {
        context: context.into(),
        reason: one_line(&reason),
    })
}

/// ONNX Runtime's messages span lines; an error is one line.
pub(crate) fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// How many steps ran on each decoder graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphRuns {
    /// `files.decoder`: the steps whose policy read attention sums, and
    /// every step of a model without a fast graph.
    pub main: u64,
    /// `files.decoder_fast`: the steps whose policy read none.
    pub fast: u64,
}

/// The decoder's sessions and everything a step needs, sized once.
///
/// Up to two graphs over one copy of the weights: `main` (files.decoder,
/// with attention sums unless exported without) and `fast`
/// (files.decoder_fast, without). A step runs `fast` whenever its policy
/// reads no sums (every step of `full` and `local`, the paper's Elastic
/// Cache while generating) and `main` otherwise (H2O, every prefill of
/// Elastic Cache, and every step of the product `elastic`, whose decode
/// eviction reads the sums).
pub struct Decoder {
    main: Option<Session>,
    fast: Option<Session>,
    format: DecoderFormat,
    /// A loaded graph outputs attention column sums.
    scores: bool,
    runs: GraphRuns,
    names: Names,
    scratch: RunScratch,
    memory: MemoryInfo<'static>,
    layers: usize,
    hidden: usize,
    kv_heads: usize,
    head_dim: usize,
    /// The pool's slots per layer that the buffers below are sized for.
    capacity: usize,
    /// Additive attention bias per layer and entry, in the model's dtype
    /// (f32 storage, reinterpreted for f16).
    bias: Vec<f32>,
    /// One step's attention sums, `[layer][capacity]`.
    colsums: Vec<f32>,
    /// The last position's logits.
    logits: Vec<f32>,
    seqlens_k: [i32; 1],
    total_sequence_length: [i32; 1],
    /// Rows of `position_ids`: 1, or 3 with multimodal RoPE.
    position_rows: usize,
    /// Time inside ONNX Runtime since the last [`Decoder::reset_timer`], ms.
    run_ms: f64,
    /// Entries the last step read.
    past: usize,
    /// The weights both sessions read: declared after them, so dropped
    /// after them.
    _weights: Option<super::weights::SharedWeights>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("format", &self.format)
            .field("scores", &self.scores)
            .field("main", &self.main.is_some())
            .field("fast", &self.fast.is_some())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Decoder {
    /// `main` and `fast` as loaded (at least one); `weights`, when the two
    /// share them, must be what both sessions were given.
    pub(crate) fn new(
        main: Option<Session>,
        fast: Option<Session>,
        weights: Option<super::weights::SharedWeights>,
        manifest: &Manifest,
    ) -> Result<Self> {
        if main.is_none() && fast.is_none() {
            return Err(Error::Plan("a decoder needs at least one graph".into()));
        }
        let layers = manifest.layers;
        let format = manifest.decoder_format();
        let (out_key, out_value) = match format {
            DecoderFormat::PastAndNew => ("new_key", "new_value"),
            DecoderFormat::InPlace => ("present_key", "present_value"),
        };
        let per_layer = |prefix: &str| (0..layers).map(|l| c_name(format!("{prefix}_{l}"))).collect();
        let names = Names {
            inputs_embeds: c_name("inputs_embeds".into()),
            position_ids: c_name("position_ids".into()),
            bias: c_name(
                match format {
                    DecoderFormat::PastAndNew => "past_bias",
                    DecoderFormat::InPlace => "attention_bias",
                }
                .into(),
            ),
            seqlens_k: c_name("seqlens_k".into()),
            total_sequence_length: c_name("total_sequence_length".into()),
            logits: c_name("logits".into()),
            past_key: per_layer("past_key"),
            past_value: per_layer("past_value"),
            out_key: per_layer(out_key),
            out_value: per_layer(out_value),
            colsum: per_layer("attn_colsum"),
        };
        Ok(Decoder {
            scores: main.is_some() && (format == DecoderFormat::PastAndNew || manifest.decoder_scores()),
            main,
            fast,
            runs: GraphRuns::default(),
            _weights: weights,
            format,
            names,
            scratch: RunScratch::with_capacity(5 + 2 * layers, 1 + 3 * layers),
            memory: MemoryInfo::default(),
            layers,
            hidden: manifest.hidden,
            kv_heads: manifest.kv_heads,
            head_dim: manifest.head_dim,
            capacity: 0,
            bias: Vec::new(),
            colsums: Vec::new(),
            logits: vec![0.0; manifest.vocab],
            seqlens_k: [0],
            total_sequence_length: [0],
            position_rows: if manifest.mrope_section.is_some() { 3 } else { 1 },
            run_ms: 0.0,
            past: 0,
        })
    }

    /// Steps run on each graph since the model was loaded.
    pub fn graph_runs(&self) -> GraphRuns {
        self.runs
    }

    /// Whether steps that read no attention sums run the fast graph.
    pub fn has_fast_graph(&self) -> bool {
        self.fast.is_some()
    }

    pub fn format(&self) -> DecoderFormat {
        self.format
    }

    /// Whether the graph gives attention column sums (H2O and Elastic
    /// Cache need them).
    pub fn has_scores(&self) -> bool {
        self.scores
    }

    /// Sizes the step buffers for a pool of `capacity` slots (once per
    /// pool, before its first step).
    pub(crate) fn size_for(&mut self, capacity: usize) {
        if self.capacity != capacity {
            self.capacity = capacity;
            self.bias = vec![0.0; self.layers * capacity];
            self.colsums = vec![0.0; self.layers * capacity];
        }
    }

    /// The last step's logits (of its last position).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    pub(crate) fn logits_mut(&mut self) -> &mut [f32] {
        &mut self.logits
    }

    /// Milliseconds inside ONNX Runtime since the last reset.
    pub fn run_ms(&self) -> f64 {
        self.run_ms
    }

    pub(crate) fn reset_timer(&mut self) {
        self.run_ms = 0.0;
    }

    /// Entries the last step read.
    pub fn last_past(&self) -> usize {
        self.past
    }

    /// Rows of `position_ids` a step takes: 1, or 3 (time, height, width)
    /// with multimodal RoPE.
    pub(crate) fn position_rows(&self) -> usize {
        self.position_rows
    }

    /// One step over `positions.len() / position_rows` new tokens (with
    /// multimodal RoPE `positions` is `[3][T]`): the graph reads the past
    /// from the pool and writes the new K/V into the pool's next slots; then
    /// the entries are committed, the attention sums (when the policy wants
    /// them) go to the policy, and the last position's logits are kept.
    pub(crate) fn step<E: KvElement + PrimitiveTensorElementType + Copy>(
        &mut self,
        cache: &mut KvCache,
        embeds: &[E],
        positions: &[i64],
    ) -> Result<()> {
        let t = positions.len() / self.position_rows;
        if t == 0 || embeds.len() != t * self.hidden || positions.len() != t * self.position_rows {
            return Err(Error::Shape(format!(
                "a decoder step of {} position values ({} a token) with {} embedding values (hidden {})",
                positions.len(),
                self.position_rows,
                embeds.len(),
                self.hidden
            )));
        }
        if cache.pool().capacity() != self.capacity {
            return Err(Error::Shape(format!(
                "the decoder's buffers are sized for {} slots, the pool has {}",
                self.capacity,
                cache.pool().capacity()
            )));
        }
        let past = cache.pool().len();
        if past + t > self.capacity {
            return Err(Error::CapacityExceeded {
                needed: past + t,
                capacity: self.capacity,
            });
        }
        let wants_scores = cache.wants_scores();
        if wants_scores && !self.scores {
            return Err(Error::Plan(
                "the policy needs attention scores, which no loaded decoder graph outputs".into(),
            ));
        }
        let total = past + t;
        let bias_len = match self.format {
            DecoderFormat::PastAndNew => past,
            DecoderFormat::InPlace => total,
        };
        self.write_bias::<E>(cache, past, bias_len);
        let started = Instant::now();
        let ran = self.run::<E>(cache, embeds, positions, wants_scores);
        self.scratch.clear();
        ran?;
        self.run_ms += started.elapsed().as_secs_f64() * 1e3;
        self.past = past;
        cache.commit(t)?;
        if wants_scores {
            let len = cache.pool().len();
            for layer in 0..self.layers {
                cache.add_scores(layer, &self.colsums[layer * self.capacity..][..len])?;
            }
        }
        Ok(())
    }

    /// `[layer][bias_len]`: ln(m) for an entry standing for m merged ones
    /// when the policy asks for it, else 0; the new tokens (format 2) 0.
    fn write_bias<E: KvElement>(&mut self, cache: &KvCache, past: usize, bias_len: usize) {
        let bias: &mut [E] = &mut bytemuck::cast_slice_mut(&mut self.bias)[..self.layers * bias_len];
        let merge_bias = cache.merge_count_bias();
        if bias_len == 0 {
            return;
        }
        for (layer, row) in bias.chunks_exact_mut(bias_len).enumerate() {
            let (old, new) = row.split_at_mut(past);
            if merge_bias {
                for (b, &count) in old.iter_mut().zip(cache.pool().merge_counts(layer)) {
                    *b = E::from_f32((count as f32).ln());
                }
            } else {
                old.fill(E::from_f32(0.0));
            }
            new.fill(E::from_f32(0.0));
        }
    }

    fn run<E: KvElement + PrimitiveTensorElementType + Copy>(
        &mut self,
        cache: &mut KvCache,
        embeds: &[E],
        positions: &[i64],
        wants_scores: bool,
    ) -> Result<()> {
        let rows = self.position_rows;
        let (t, past) = (positions.len() / rows, cache.pool().len());
        let total = past + t;
        let (layers, kv_heads, head_dim) = (self.layers, self.kv_heads, self.head_dim);
        let info = &self.memory;
        let names = &self.names;
        let scratch = &mut self.scratch;
        scratch.input(
            &names.inputs_embeds,
            tensor(info, embeds.as_ptr(), embeds.len(), &[1, t as i64, self.hidden as i64])?,
        );
        scratch.input(
            &names.position_ids,
            tensor(info, positions.as_ptr(), rows * t, &[rows as i64, t as i64])?,
        );
        let bias: &[E] = bytemuck::cast_slice(&self.bias);
        let bias_len = match self.format {
            DecoderFormat::PastAndNew => past,
            DecoderFormat::InPlace => total,
        };
        scratch.input(
            &names.bias,
            tensor(
                info,
                bias.as_ptr(),
                layers * bias_len,
                &[layers as i64, bias_len as i64],
            )?,
        );
        let (past_shape, out_shape) = match self.format {
            DecoderFormat::PastAndNew => (
                [1, past as i64, kv_heads as i64, head_dim as i64],
                [1, t as i64, kv_heads as i64, head_dim as i64],
            ),
            DecoderFormat::InPlace => {
                let cache_shape = [1, kv_heads as i64, self.capacity as i64, head_dim as i64];
                (cache_shape, cache_shape)
            }
        };
        match self.format {
            DecoderFormat::PastAndNew => {
                for (layer, view) in cache.pool_mut().step_views::<E>(t)?.enumerate() {
                    scratch.input(
                        &names.past_key[layer],
                        tensor(info, view.past_key.as_ptr(), view.past_key.len(), &past_shape)?,
                    );
                    scratch.input(
                        &names.past_value[layer],
                        tensor(info, view.past_value.as_ptr(), view.past_value.len(), &past_shape)?,
                    );
                    for (new, name) in [view.new_key, view.new_value]
                        .into_iter()
                        .zip([&names.out_key[layer], &names.out_value[layer]])
                    {
                        scratch.output(
                            name,
                            tensor(info, new.as_mut_ptr().cast_const(), new.len(), &out_shape)?,
                        );
                    }
                }
            }
            DecoderFormat::InPlace => {
                self.seqlens_k = [i32::try_from(total - 1).map_err(|_| Error::CapacityExceeded {
                    needed: total,
                    capacity: i32::MAX as usize,
                })?];
                self.total_sequence_length = [self.seqlens_k[0] + 1];
                scratch.input(&names.seqlens_k, tensor(info, self.seqlens_k.as_ptr(), 1, &[1])?);
                scratch.input(
                    &names.total_sequence_length,
                    tensor(info, self.total_sequence_length.as_ptr(), 1, &[])?,
                );
                for (layer, (key, value)) in cache.pool_mut().cache_blocks::<E>()?.enumerate() {
                    // The same memory as past and present: GroupQueryAttention
                    // sees one buffer and appends in place.
                    for ((block, past_name), present_name) in [key, value]
                        .into_iter()
                        .zip([&names.past_key[layer], &names.past_value[layer]])
                        .zip([&names.out_key[layer], &names.out_value[layer]])
                    {
                        scratch.input(past_name, tensor(info, block.as_ptr(), block.len(), &past_shape)?);
                        scratch.output(
                            present_name,
                            tensor(info, block.as_mut_ptr().cast_const(), block.len(), &out_shape)?,
                        );
                    }
                }
            }
        }
        scratch.output(
            &names.logits,
            tensor(
                info,
                self.logits.as_ptr(),
                self.logits.len(),
                &[1, self.logits.len() as i64],
            )?,
        );
        if wants_scores {
            for (layer, name) in names.colsum.iter().enumerate() {
                let row = &mut self.colsums[layer * self.capacity..][..total];
                scratch.output(
                    name,
                    tensor(info, row.as_mut_ptr().cast_const(), total, &[1, total as i64])?,
                );
            }
        }
        // The fast graph unless this step's sums are read (checked in `step`:
        // then `main` is loaded and outputs them).
        let (session, runs) = match (&self.fast, &self.main) {
            (Some(fast), _) if !wants_scores => (fast, &mut self.runs.fast),
            (_, Some(main)) => (main, &mut self.runs.main),
            // `step` refused a step wanting sums without `main`, and `new` a
            // decoder without a graph.
            _ => return Err(Error::Plan("no loaded decoder graph can run this step".into())),
        };
        *runs += 1;
        let api = ort::api();
        // SAFETY: every name points into `self.names` and every value was
        // created above over memory borrowed for this call (the pool through
        // `cache`, `embeds`, `positions`, this decoder's buffers); the output
        // values are preallocated, so ONNX Runtime writes into that memory
        // and replaces none of them.
        let status = unsafe {
            (api.Run)(
                session.ptr().cast_mut(),
                ptr::null(),
                scratch.input_names.as_ptr(),
                scratch.inputs.as_ptr(),
                scratch.inputs.len(),
                scratch.output_names.as_ptr(),
                scratch.output_names.len(),
                scratch.outputs.as_mut_ptr(),
            )
        };
        check(status, "running the decoder graph")
    }
}
