//! The generation loop: one image and a prompt in, text out.
//!
//! ```text
//! image --vision graph--> image embeds ┐
//! prompt --tokenizer--> ids --table--> ┴ prompt embeds
//!   prefill: chunks that fit the pool; the decoder reads past K/V straight
//!            from the pool, its new K/V go into the pool's next slots;
//!            the policy compresses (stage 1)
//!   decode:  one token a step, the policy evicts (stage 2)
//! logits --sampler--> token --tokenizer--> text, streamed
//! ```

use std::time::Instant;

use crate::error::{Error, Result};
use crate::kv::{CacheStats, KindClass, KvCache, KvDtype, KvElement, PromptSnapshot};
use crate::kv::{PositionMap, Rope};
use crate::model::image::dynamic::DynamicPixels;
use crate::model::image::{decode_file_rgb8, decode_rgb8};
use crate::model::mrope;
use crate::model::prompt::{PictureLayout, Prompt};
use crate::model::{Decoder, Embeddings, Manifest, Model, ModelElement};
pub use crate::sampling::Sampling;
use crate::sampling::{check_stop_strings, Sampler, StopStrings};
use half::f16;

#[derive(Clone, Debug, PartialEq)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation ends as soon as the text contains one of these; the text
    /// returned and streamed ends before it (its tokens stay in
    /// `token_ids`, the last one unfed). Honoured with `ignore_stop` too.
    pub stop_strings: Vec<String>,
    /// Keep generating through stop tokens (for benchmarks of long outputs).
    pub ignore_stop: bool,
}

/// The most tokens one answer may ask for on the command line, in a
/// service's config or in a request: a typo guard, as buffers are sized
/// for the answer before it starts.
pub const MAX_NEW_TOKENS_LIMIT: usize = 4096;

impl GenerateParams {
    /// Refuses, before any work, an answer length that cannot be right:
    /// none, more than [`MAX_NEW_TOKENS_LIMIT`], or as many as the model's
    /// positions (the prompt needs at least one of them).
    pub fn check(&self, manifest: &Manifest) -> Result<()> {
        if self.max_new_tokens == 0 || self.max_new_tokens > MAX_NEW_TOKENS_LIMIT {
            return Err(Error::NewTokens {
                max_new_tokens: self.max_new_tokens,
                reason: format!("must be between 1 and {MAX_NEW_TOKENS_LIMIT}"),
            });
        }
        check_positions(self.max_new_tokens, manifest)?;
        self.sampling.check()?;
        check_stop_strings(&self.stop_strings)
    }
}

/// An answer of `max_new_tokens` must leave the prompt at least one of the
/// model's positions.
fn check_positions(max_new_tokens: usize, manifest: &Manifest) -> Result<()> {
    if max_new_tokens >= manifest.max_positions {
        return Err(Error::NewTokens {
            max_new_tokens,
            reason: format!(
                "model {} has {} positions, which must hold the prompt and the answer",
                manifest.name, manifest.max_positions
            ),
        });
    }
    Ok(())
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_new_tokens: 64,
            sampling: Sampling::GREEDY,
            stop_strings: Vec::new(),
            ignore_stop: false,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    StopToken,
    MaxTokens,
    /// The text reached one of [`GenerateParams::stop_strings`].
    StopString,
}

/// Wall-clock times of one generation, in milliseconds.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Timings {
    pub image_decode_ms: f64,
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub time_to_first_token_ms: f64,
    pub decode_ms: f64,
    pub decode_tokens_per_s: f64,
    /// Time spent inside the decoder's `session.run` during decode; the rest
    /// of `decode_ms` is ours (pool, policy, sampling, tokenizer).
    pub decode_run_ms: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub stop: StopReason,
    /// The stop token that ended generation, if one did (not in `token_ids`).
    pub stop_token: Option<u32>,
    pub timings: Timings,
    pub cache: CacheStats,
    /// Entries in the cache at the end.
    pub cache_entries: usize,
    pub pool_bytes: u64,
    pub pool_capacity: usize,
}

/// The decode steps of the last generation, timed without allocating: the
/// buffers are reserved before the loop and only pushed to inside it.
#[derive(Clone, Debug, Default)]
pub struct StepTrace {
    /// `ms[i]`: wall time from choosing generated token `i` to choosing
    /// token `i + 1` (detokenizing and streaming token `i`, the policy, the
    /// decoder run over it, sampling). Token 0's time is the time to first
    /// token, not in here, so `ms.len()` is one less than the tokens.
    pub ms: Vec<f64>,
    /// `entries[i]`: the cache entries the decoder read in step `i`.
    pub entries: Vec<u32>,
}

impl StepTrace {
    fn start(&mut self, steps: usize) {
        self.ms.clear();
        self.entries.clear();
        self.ms.reserve(steps);
        self.entries.reserve(steps);
    }

    /// Within the reserved capacity: never allocates.
    fn record(&mut self, ms: f64, entries: usize) {
        if self.ms.len() < self.ms.capacity() && self.entries.len() < self.entries.capacity() {
            self.ms.push(ms);
            self.entries.push(u32::try_from(entries).unwrap_or(u32::MAX));
        }
    }
}

/// A text callback that cannot fail, as one that can.
fn infallible<'a>(on_text: &'a mut dyn FnMut(&str)) -> impl FnMut(&str) -> Result<()> + 'a {
    move |piece| {
        on_text(piece);
        Ok(())
    }
}

/// What the prompt is: a chat turn (image and text through the template)
/// or token ids as they are.
#[derive(Clone, Copy)]
enum PromptInput<'a> {
    Chat {
        images: &'a [ImageInput<'a>],
        user_text: Option<&'a str>,
    },
    Ids(&'a [u32]),
    /// A prompt encoded before, restored instead of run again.
    Encoded(&'a EncodedPrompt),
    /// A built piece that continues the sequence in the pool (a memory's
    /// next frame or question): nothing is reset.
    Piece {
        prompt: &'a Prompt,
        images: &'a [ImageInput<'a>],
    },
}

/// A prompt that went through the decoder, before stage 1: its cache
/// entries with their attention sums, and the first answer token's logits.
/// `eval` encodes each sample once and starts every policy from it; the
/// results are those of encoding it again (the prompt's attention does not
/// depend on the policy, and the sums are collected whatever the policy).
#[derive(Clone, Debug)]
pub struct EncodedPrompt {
    cache: PromptSnapshot,
    logits: Vec<f32>,
}

impl EncodedPrompt {
    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        self.cache.bytes() + 4 * self.logits.len()
    }
}

/// The picture to caption.
#[derive(Clone, Copy)]
pub enum ImageInput<'a> {
    File(&'a std::path::Path),
    Bytes(&'a [u8]),
    Rgb8(&'a image::RgbImage),
}

/// Prompt tokens per decoder run unless told otherwise. Measured on the
/// demo model (docs/performance.md): 128-token runs prefill a 1024-token
/// prompt about twice as fast as one run and with a third of the memory.
pub const DEFAULT_PREFILL_CHUNK: usize = 128;

/// The `--prefill-chunk` / `prefill_chunk` setting: 0 is the whole prompt in
/// one run, any other number the most tokens per run.
pub fn prefill_chunk_setting(tokens: usize) -> Option<usize> {
    (tokens > 0).then_some(tokens)
}

/// Runs generations with one model and one KV pool; buffers are sized once
/// and reused, so many captions in one process do not grow memory.
pub struct Generator<'m> {
    model: &'m mut Model,
    cache: KvCache,
    pixels: Vec<f32>,
    /// A dynamic-resolution model's vision inputs, sized for its largest
    /// picture.
    dynamic_pixels: Option<DynamicPixels>,
    /// The grids, in image tokens `(rows, cols)`, of the prompt's pictures
    /// (what multimodal RoPE places their tokens by).
    grids: Vec<(usize, usize)>,
    /// Multimodal RoPE: the prompt's per-token offsets and one run's
    /// `[3][T]` positions.
    mrope_offsets: Vec<[i64; 3]>,
    /// The positions the prompt's pictures skip.
    mrope_skip: usize,
    graph_positions: Vec<i64>,
    probabilities: Vec<f32>,
    candidates: Vec<u32>,
    trace: StepTrace,
    /// Most prompt tokens per decoder run (`None`: as many as the pool takes).
    prefill_chunk: Option<usize>,
    /// How the pictures of the last `encode_images` sit in the prompt.
    layouts: Vec<PictureLayout>,
}

impl<'m> Generator<'m> {
    pub fn new(model: &'m mut Model, cache: KvCache) -> Result<Self> {
        if cache.pool().shape() != &model.manifest.kv_shape() {
            return Err(Error::Shape(format!(
                "the KV pool is {:?} but the model needs {:?}",
                cache.pool().shape(),
                model.manifest.kv_shape()
            )));
        }
        if cache.policy_needs_scores() && !model.decoder.has_scores() {
            return Err(Error::Plan(format!(
                "policy {} needs the attention column sums, which the decoder of model {} does not give \
                 ({}); use --policy full or local, or a model exported with them",
                cache.policy_kind(),
                model.manifest.name,
                model.decoder_summary()
            )));
        }
        model.decoder.size_for(cache.pool().capacity());
        let vocab = model.manifest.vocab;
        let dynamic = model
            .manifest
            .vision
            .as_ref()
            .and_then(|v| v.preprocess.dynamic.as_ref());
        let pixels = match &model.manifest.vision {
            Some(v) if dynamic.is_none() => vec![0.0; v.preprocess.output_len()],
            _ => Vec::new(),
        };
        if model.manifest.mrope_section.is_some() && cache.positions_follow_cache_length() {
            return Err(Error::Plan(format!(
                "policy {} places tokens at their cache index, which cannot carry the picture positions of \
                 model {}'s multimodal RoPE: use elastic's default positions, or another policy",
                cache.policy_kind(),
                model.manifest.name
            )));
        }
        Ok(Generator {
            dynamic_pixels: dynamic.map(DynamicPixels::for_spec),
            grids: Vec::new(),
            mrope_offsets: Vec::new(),
            mrope_skip: 0,
            graph_positions: Vec::new(),
            model,
            cache,
            pixels,
            probabilities: vec![0.0; vocab],
            candidates: Vec::with_capacity(vocab),
            trace: StepTrace::default(),
            prefill_chunk: Some(DEFAULT_PREFILL_CHUNK),
            layouts: Vec::new(),
        })
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    pub fn model(&self) -> &Model {
        self.model
    }

    /// How `image`'s rows will sit in a prompt for this model: the
    /// manifest's count of tokens; for a dynamic-resolution model its
    /// grid's at the picture's own size; for a split one its tiles and
    /// global image (an encoded picture is decoded to learn its size). What
    /// a prompt built before the picture is encoded needs (chats, a
    /// memory's frames).
    pub fn picture_layout(&self, image: ImageInput<'_>) -> Result<PictureLayout> {
        let Some(vision) = &self.model.manifest.vision else {
            return Err(Error::Shape(format!(
                "model {} has no vision graph; caption text only",
                self.model.manifest.name
            )));
        };
        let pre = &vision.preprocess;
        if pre.dynamic.is_none() && vision.split.is_none() {
            return Ok(PictureLayout::single(vision.image_tokens));
        }
        let (width, height) = match image {
            ImageInput::Rgb8(rgb) => rgb.dimensions(),
            ImageInput::File(path) => decode_file_rgb8(path, pre.max_pixels)?.0.dimensions(),
            ImageInput::Bytes(bytes) => decode_rgb8(std::io::Cursor::new(bytes), "(in-memory image)", pre.max_pixels)?
                .0
                .dimensions(),
        };
        match (&pre.dynamic, &vision.split) {
            (Some(spec), _) => Ok(PictureLayout::single(spec.grid(width, height)?.tokens())),
            (None, Some(split)) => {
                let plan = split.plan(width, height)?;
                Ok(PictureLayout {
                    rows: plan.rows as usize,
                    cols: plan.cols as usize,
                    tokens_per_tile: vision.image_tokens,
                })
            }
            (None, None) => Ok(PictureLayout::single(vision.image_tokens)),
        }
    }

    /// Empties the pool for a new sequence (a memory's start).
    pub fn reset_cache(&mut self) {
        self.cache.reset();
    }

    /// Caps the prompt tokens of one decoder run (`None`: as many as the pool
    /// takes; default [`DEFAULT_PREFILL_CHUNK`]). A run over `t` new tokens
    /// and `s` past ones holds `heads * t * (s + t)` attention probabilities
    /// per layer, so a long prompt in one run costs memory quadratic in its
    /// length (5 GB for 2048 tokens of the demo model); chunks bound it.
    /// The policy sees the same attention sums and compresses at the same
    /// points whatever the chunk: a query's attention does not depend on the
    /// chunking, and runs only split what the pool has already taken.
    pub fn set_prefill_chunk(&mut self, tokens: Option<usize>) {
        self.prefill_chunk = tokens.map(|t| t.max(1));
    }

    /// The decode steps of the last generation.
    pub fn trace(&self) -> &StepTrace {
        &self.trace
    }

    /// Captions (or answers about) the pictures, in the order given (none:
    /// a text-only prompt); `on_text` receives the text as it is generated.
    /// Nothing is streamed before the prompt is known to fit, and an error
    /// mid-way is returned as an error.
    pub fn generate(
        &mut self,
        images: &[ImageInput<'_>],
        user_text: Option<&str>,
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        self.try_generate(images, user_text, params, &mut infallible(on_text))
    }

    /// As [`Self::generate`], with a text callback that may fail (a
    /// caption streamed to a pipe whose reader left): its error ends the
    /// generation at once and is returned.
    pub fn try_generate(
        &mut self,
        images: &[ImageInput<'_>],
        user_text: Option<&str>,
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Generation> {
        self.generate_input(PromptInput::Chat { images, user_text }, params, on_text)
    }

    /// Continues `prompt_ids` as they are: no chat template, no image (for
    /// benchmarks with a prompt of an exact length).
    pub fn generate_ids(
        &mut self,
        prompt_ids: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        if prompt_ids.is_empty() {
            return Err(Error::Shape("the prompt has no tokens".into()));
        }
        self.generate_input(PromptInput::Ids(prompt_ids), params, &mut infallible(on_text))
    }

    fn generate_input(
        &mut self,
        input: PromptInput<'_>,
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Generation> {
        match self.model.manifest.kv_dtype() {
            KvDtype::F32 => self.generate_typed::<f32>(input, params, on_text),
            KvDtype::F16 => self.generate_typed::<f16>(input, params, on_text),
        }
    }

    fn generate_typed<E: ModelElement>(
        &mut self,
        input: PromptInput<'_>,
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Generation> {
        // Before anything is sized for the answer.
        check_positions(params.max_new_tokens, &self.model.manifest)?;
        params.sampling.check()?;
        check_stop_strings(&params.stop_strings)?;
        let mut timings = Timings::default();
        let hidden = self.model.manifest.hidden;
        self.trace.start(params.max_new_tokens);
        let (prompt_tokens, start) = self.prefill::<E>(input, params.max_new_tokens, &mut timings)?;

        // 4. Decode.
        let mut sampler = Sampler::new(params.sampling);
        let mut stop_strings = StopStrings::new(&params.stop_strings);
        let mut token_ids = Vec::with_capacity(params.max_new_tokens);
        let mut text = String::new();
        let model = &mut *self.model;
        let mut detokenizer = model.prompt.decoder();
        let mut token_embed: Vec<E> = vec![E::from_f32(0.0); hidden];
        let decode_start = Instant::now();
        model.decoder.reset_timer();
        let mut stop = StopReason::MaxTokens;
        let mut stop_token = None;
        let mut first_token_at = None;
        let mut last_token_at = decode_start;
        while token_ids.len() < params.max_new_tokens {
            let token = sampler.sample(
                model.decoder.logits(),
                &token_ids,
                &mut self.probabilities,
                &mut self.candidates,
            );
            let now = Instant::now();
            if first_token_at.is_none() {
                first_token_at = Some(now);
                timings.time_to_first_token_ms = ms(start) + timings.image_decode_ms + timings.vision_ms;
            } else {
                let step_ms = now.duration_since(last_token_at).as_secs_f64() * 1e3;
                self.trace.record(step_ms, model.decoder.last_past());
            }
            last_token_at = now;
            if !params.ignore_stop && model.manifest.stop_token_ids.contains(&token) {
                stop = StopReason::StopToken;
                stop_token = Some(token);
                break;
            }
            token_ids.push(token);
            text.push_str(detokenizer.push(token)?);
            let advance = stop_strings.advance(&mut text);
            if !advance.ready.is_empty() {
                on_text(&text[advance.ready])?;
            }
            if advance.stopped {
                stop = StopReason::StopString;
                break;
            }
            if token_ids.len() == params.max_new_tokens {
                break;
            }
            feed_token::<E>(
                &mut model.decoder,
                &model.embeddings,
                &mut self.cache,
                &mut token_embed,
                token,
            )?;
        }
        if stop != StopReason::StopString {
            text.push_str(detokenizer.finish()?);
            let advance = stop_strings.advance(&mut text);
            if advance.stopped {
                stop = StopReason::StopString;
            }
            let rest = stop_strings.finish(&text);
            if !rest.is_empty() {
                on_text(&text[rest])?;
            }
        }
        timings.decode_ms = ms(decode_start);
        timings.decode_run_ms = model.decoder.run_ms();
        let decoded = token_ids.len().saturating_sub(1);
        if decoded > 0 {
            let since_first = first_token_at.map_or(timings.decode_ms, ms);
            timings.decode_tokens_per_s = decoded as f64 / (since_first / 1e3);
        }
        Ok(Generation {
            text,
            token_ids,
            prompt_tokens,
            stop,
            stop_token,
            timings,
            cache: self.cache.stats(),
            cache_entries: self.cache.pool().len(),
            pool_bytes: self.cache.pool().bytes(),
            pool_capacity: self.cache.pool().capacity(),
        })
    }

    /// Runs the pictures and the prompt through the decoder without stage 1
    /// and keeps the result (`None` when the prompt did not fit the pool
    /// whole, so it was compressed on the way: then there is nothing
    /// policy-independent to keep).
    pub fn encode_prompt(
        &mut self,
        images: &[ImageInput<'_>],
        user_text: Option<&str>,
    ) -> Result<Option<EncodedPrompt>> {
        let mut timings = Timings::default();
        self.cache.collect_prompt_scores(true);
        let input = PromptInput::Chat { images, user_text };
        let encoded = match self.model.manifest.kv_dtype() {
            KvDtype::F32 => self.encode::<f32>(input, 1, &mut timings),
            KvDtype::F16 => self.encode::<f16>(input, 1, &mut timings),
        };
        self.cache.collect_prompt_scores(false);
        encoded?;
        Ok(self.cache.snapshot().map(|cache| EncodedPrompt {
            cache,
            logits: self.model.decoder.logits().to_vec(),
        }))
    }

    /// [`Self::generate`] from a prompt encoded before.
    pub fn generate_encoded(
        &mut self,
        prompt: &EncodedPrompt,
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        self.generate_input(PromptInput::Encoded(prompt), params, &mut infallible(on_text))
    }

    /// [`Self::score`] from a prompt encoded before.
    pub fn score_encoded(&mut self, prompt: &EncodedPrompt, answer: &[u32]) -> Result<(f64, usize)> {
        match self.model.manifest.kv_dtype() {
            KvDtype::F32 => self.score_input::<f32>(PromptInput::Encoded(prompt), answer),
            KvDtype::F16 => self.score_input::<f16>(PromptInput::Encoded(prompt), answer),
        }
    }

    /// Appends `prompt` (its image rows from `images`) to the sequence in the
    /// pool, without resetting it, then generates as [`Self::generate`]
    /// does. The pool compresses under its policy whenever it is full.
    pub fn generate_piece(
        &mut self,
        prompt: &Prompt,
        images: &[ImageInput<'_>],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        self.generate_input(PromptInput::Piece { prompt, images }, params, &mut infallible(on_text))
    }

    /// As [`Self::generate_piece`], with a text callback that may fail (a
    /// streamed answer whose client left): its error ends the generation.
    pub fn try_generate_piece(
        &mut self,
        prompt: &Prompt,
        images: &[ImageInput<'_>],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Generation> {
        self.generate_input(PromptInput::Piece { prompt, images }, params, on_text)
    }

    /// Appends `prompt` to the sequence in the pool and generates nothing.
    /// Returns the piece's timings (no decode).
    pub fn prefill_piece(&mut self, prompt: &Prompt, images: &[ImageInput<'_>]) -> Result<Timings> {
        let mut timings = Timings::default();
        let input = PromptInput::Piece { prompt, images };
        match self.model.manifest.kv_dtype() {
            KvDtype::F32 => self.prefill::<f32>(input, 0, &mut timings)?,
            KvDtype::F16 => self.prefill::<f16>(input, 0, &mut timings)?,
        };
        Ok(timings)
    }

    /// [`Self::score`] of `answer` after appending `prompt` to the sequence.
    pub fn score_piece(&mut self, prompt: &Prompt, images: &[ImageInput<'_>], answer: &[u32]) -> Result<(f64, usize)> {
        let input = PromptInput::Piece { prompt, images };
        match self.model.manifest.kv_dtype() {
            KvDtype::F32 => self.score_input::<f32>(input, answer),
            KvDtype::F16 => self.score_input::<f16>(input, answer),
        }
    }

    /// Keeps the sequence's positions inside the model's `max_positions`
    /// with `room` tokens to come ([`KvCache::rebase`]): the keys are
    /// rotated with the model's own RoPE. Returns the map applied, if any.
    pub fn rebase_positions(&mut self, room: usize) -> Result<Option<PositionMap>> {
        let manifest = &self.model.manifest;
        let rope = Rope::new(manifest.head_dim, manifest.rope_theta)?;
        self.cache.rebase(&rope, room, manifest.max_positions)
    }

    /// Encodes the image and the prompt and prefills the cache with them
    /// (stage 1 included), leaving the first answer token's logits. Returns
    /// the prompt's length and when prefill started.
    fn prefill<E: ModelElement>(
        &mut self,
        input: PromptInput<'_>,
        max_new_tokens: usize,
        timings: &mut Timings,
    ) -> Result<(usize, Instant)> {
        let (prompt_tokens, start) = self.encode::<E>(input, max_new_tokens, timings)?;
        self.cache.end_prompt()?;
        timings.prefill_ms = ms(start);
        Ok((prompt_tokens, start))
    }

    /// Steps 1 to 3 of [`Self::prefill`]: everything but stage 1.
    fn encode<E: ModelElement>(
        &mut self,
        input: PromptInput<'_>,
        max_new_tokens: usize,
        timings: &mut Timings,
    ) -> Result<(usize, Instant)> {
        let hidden = self.model.manifest.hidden;
        let (embeds, prompt_tokens) = match input {
            PromptInput::Encoded(encoded) => {
                let start = Instant::now();
                self.cache.restore(&encoded.cache)?;
                self.cache.admit(encoded.cache.len(), max_new_tokens)?;
                self.admit_positions(0, max_new_tokens)?;
                self.model.decoder.logits_mut().copy_from_slice(&encoded.logits);
                return Ok((encoded.cache.len(), start));
            }
            PromptInput::Chat { images, user_text } => {
                // 1. The pictures, through the vision graph.
                let image_embeds = self.encode_images::<E>(images, timings)?;
                // 2. The prompt, in the template's order.
                let prompt = self.model.prompt.build_pictures(user_text, &self.layouts)?;
                self.cache.reset();
                self.cache.admit(prompt.len(), max_new_tokens)?;
                self.admit_positions(prompt.len(), max_new_tokens)?;
                self.plan_mrope(&prompt.kinds)?;
                (self.embed_prompt(&prompt, &image_embeds)?, prompt.len())
            }
            PromptInput::Piece { prompt, images } => {
                let image_embeds = self.encode_images::<E>(images, timings)?;
                check_piece_images(prompt, &image_embeds, hidden)?;
                self.cache.continue_sequence();
                self.cache
                    .admit(self.cache.pool().len() + prompt.len(), max_new_tokens)?;
                self.admit_positions(prompt.len(), max_new_tokens)?;
                self.plan_mrope(&prompt.kinds)?;
                (self.embed_prompt(prompt, &image_embeds)?, prompt.len())
            }
            PromptInput::Ids(ids) => {
                self.cache.reset();
                self.cache.admit(ids.len(), max_new_tokens)?;
                self.admit_positions(ids.len(), max_new_tokens)?;
                // Raw ids are all the user's: what `commit` gives unlisted tokens.
                self.cache.set_prompt_kinds(&[]);
                self.grids.clear();
                self.plan_mrope(&vec![crate::kv::TokenKind::USER; ids.len()])?;
                let mut embeds: Vec<E> = vec![E::from_f32(0.0); ids.len() * hidden];
                self.model.embeddings.gather(ids, &mut embeds)?;
                (embeds, ids.len())
            }
        };

        // 3. Prefill: the policy decides how many tokens the pool takes next
        // (compressing when it is full); those are run in runs of at most
        // `prefill_chunk`, which all fit, so the run size never moves a
        // compression.
        let start = Instant::now();
        let mut done = 0;
        let mut positions: Vec<i64> = Vec::with_capacity(prompt_tokens.max(1));
        let mrope = self.model.manifest.mrope_section.is_some();
        let skipped_before = self.cache.skipped_positions();
        while done < prompt_tokens {
            let taken_until = done + self.cache.begin_prompt_chunk(prompt_tokens - done)?;
            while done < taken_until {
                let t = self
                    .prefill_chunk
                    .map_or(taken_until - done, |c| c.min(taken_until - done));
                positions.clear();
                positions.extend((0..t).map(|i| self.cache.rope_position(i) as i64));
                if mrope {
                    let offsets = self.mrope_offsets.get(done..done + t).ok_or_else(|| {
                        Error::Shape(format!(
                            "multimodal RoPE offsets for {} of {prompt_tokens} tokens",
                            done + t
                        ))
                    })?;
                    mrope::fill_positions(&positions, skipped_before, offsets, &mut self.graph_positions);
                }
                self.model.decoder.step::<E>(
                    &mut self.cache,
                    &embeds[done * hidden..(done + t) * hidden],
                    if mrope { &self.graph_positions } else { &positions },
                )?;
                done += t;
            }
        }
        if mrope {
            // The prompt's pictures are in: the tokens after them go on from
            // the positions their grids end at.
            self.cache.skip_positions(self.mrope_skip);
        }
        Ok((prompt_tokens, start))
    }

    /// With multimodal RoPE, the offsets of the prompt's tokens from their
    /// sequence positions, from its pictures' grids.
    fn plan_mrope(&mut self, kinds: &[crate::kv::TokenKind]) -> Result<()> {
        if self.model.manifest.mrope_section.is_none() {
            return Ok(());
        }
        self.mrope_skip = mrope::prompt_offsets(kinds, &self.grids, &mut self.mrope_offsets)?;
        Ok(())
    }

    /// Refuses a prompt and answer whose positions would leave the model's
    /// range: its RoPE table ends there (format 2 reads it, and the model
    /// never saw positions beyond it), so the answer could not finish.
    fn admit_positions(&self, prompt_tokens: usize, max_new_tokens: usize) -> Result<()> {
        let manifest = &self.model.manifest;
        let last = self.cache.last_position_after(prompt_tokens + max_new_tokens);
        if last >= manifest.max_positions {
            return Err(Error::NewTokens {
                max_new_tokens,
                reason: format!(
                    "after the prompt's {prompt_tokens} tokens the answer would reach position {last}, past \
                     the {} positions of model {}: ask for fewer tokens",
                    manifest.max_positions, manifest.name
                ),
            });
        }
        Ok(())
    }

    /// Teacher forcing: the negative log-likelihood of `answer` after the
    /// prompt, feeding the answer's own tokens back and applying the cache
    /// policy after every step, as generation would. Returns the NLL summed
    /// over the answer's tokens (natural log) and their count.
    pub fn score(
        &mut self,
        images: &[ImageInput<'_>],
        user_text: Option<&str>,
        answer: &[u32],
    ) -> Result<(f64, usize)> {
        match self.model.manifest.kv_dtype() {
            KvDtype::F32 => self.score_input::<f32>(PromptInput::Chat { images, user_text }, answer),
            KvDtype::F16 => self.score_input::<f16>(PromptInput::Chat { images, user_text }, answer),
        }
    }

    fn score_input<E: ModelElement>(&mut self, input: PromptInput<'_>, answer: &[u32]) -> Result<(f64, usize)> {
        let mut timings = Timings::default();
        self.prefill::<E>(input, answer.len(), &mut timings)?;
        let hidden = self.model.manifest.hidden;
        let mut token_embed: Vec<E> = vec![E::from_f32(0.0); hidden];
        let mut nll = 0.0;
        for (i, &token) in answer.iter().enumerate() {
            nll -= log_softmax_at(self.model.decoder.logits(), token as usize)?;
            if i + 1 == answer.len() {
                break;
            }
            let model = &mut *self.model;
            feed_token::<E>(
                &mut model.decoder,
                &model.embeddings,
                &mut self.cache,
                &mut token_embed,
                token,
            )?;
        }
        Ok((nll, answer.len()))
    }

    fn encode_images<E: ModelElement>(
        &mut self,
        images: &[ImageInput<'_>],
        timings: &mut Timings,
    ) -> Result<Vec<Vec<E>>> {
        self.grids.clear();
        self.layouts.clear();
        images
            .iter()
            .map(|&image| self.encode_image::<E>(image, timings))
            .collect()
    }

    /// The prompt's embeddings: text rows from the table, image rows from
    /// the vision graph's output, in the prompt's order. Tells the cache
    /// the kinds of the tokens about to come.
    fn embed_prompt<E: KvElement + Copy>(&mut self, prompt: &Prompt, image_embeds: &[Vec<E>]) -> Result<Vec<E>> {
        let hidden = self.model.manifest.hidden;
        self.cache.set_prompt_kinds(&prompt.kinds);
        let mut embeds: Vec<E> = vec![E::from_f32(0.0); prompt.len() * hidden];
        let mut text_ids = prompt.ids.iter();
        for (kind, row) in prompt.kinds.iter().zip(embeds.chunks_exact_mut(hidden)) {
            match kind.class() {
                KindClass::Image { index, cell } => {
                    let cell = cell as usize;
                    let Some(picture) = image_embeds.get(index as usize) else {
                        return Err(Error::Shape(format!(
                            "the prompt names picture {index} of {}",
                            image_embeds.len()
                        )));
                    };
                    row.copy_from_slice(&picture[cell * hidden..(cell + 1) * hidden]);
                }
                _ => {
                    // Invariant of `Prompt`: one id per text position.
                    let Some(&id) = text_ids.next() else {
                        return Err(Error::Shape("the prompt has fewer ids than text positions".into()));
                    };
                    self.model.embeddings.gather(&[id], row)?;
                }
            }
        }
        Ok(embeds)
    }

    fn encode_image<E: ModelElement>(&mut self, image: ImageInput<'_>, timings: &mut Timings) -> Result<Vec<E>> {
        if self.model.manifest.split().is_some() {
            return self.encode_split_image::<E>(image, timings);
        }
        let (Some(preprocess), Some(vision)) = (&self.model.preprocess, self.model.vision.as_mut()) else {
            return Err(Error::Shape(format!(
                "model {} has no vision graph; caption text only",
                self.model.manifest.name
            )));
        };
        let start = Instant::now();
        if let Some(feed) = self.dynamic_pixels.as_mut() {
            match image {
                ImageInput::File(path) => preprocess.load_file_dynamic(path, feed)?,
                ImageInput::Bytes(bytes) => preprocess.load_bytes_dynamic(bytes, feed)?,
                ImageInput::Rgb8(rgb) => preprocess.from_rgb8_dynamic(rgb, feed)?,
            };
            let grid = feed
                .grid
                .ok_or_else(|| Error::Shape("the picture's grid was not computed".into()))?;
            timings.image_decode_ms += ms(start);
            let start = Instant::now();
            let embeds = vision.encode_dynamic::<E>(feed, &self.model.manifest.name)?;
            timings.vision_ms += ms(start);
            self.grids.push((grid.token_rows(), grid.token_cols()));
            self.layouts
                .push(PictureLayout::single(embeds.len() / self.model.manifest.hidden));
            return Ok(embeds);
        }
        match image {
            ImageInput::File(path) => preprocess.load_file(path, &mut self.pixels)?,
            ImageInput::Bytes(bytes) => preprocess.load_bytes(bytes, &mut self.pixels)?,
            ImageInput::Rgb8(rgb) => preprocess.from_rgb8(rgb, &mut self.pixels)?,
        };
        timings.image_decode_ms += ms(start);
        let start = Instant::now();
        let embeds = vision.encode::<E>(&self.pixels, &self.model.manifest.name)?;
        timings.vision_ms += ms(start);
        self.layouts
            .push(PictureLayout::single(embeds.len() / self.model.manifest.hidden));
        Ok(embeds)
    }
}

// ---- split pictures (Idefics3 / SmolVLM) ----------------------------------

impl Generator<'_> {
    /// A picture cut into tiles (the manifest's `vision.split`): the tiles
    /// and the global image through the vision graph in one run, their rows
    /// tile by tile then the global image's; its layout is recorded for the
    /// prompt.
    fn encode_split_image<E: ModelElement>(&mut self, image: ImageInput<'_>, timings: &mut Timings) -> Result<Vec<E>> {
        let model = &mut *self.model;
        let (Some(split), Some(preprocess), Some(vision), Some(spec)) = (
            model.manifest.split(),
            &model.preprocess,
            model.vision.as_mut(),
            model.manifest.vision.as_ref(),
        ) else {
            return Err(Error::Shape(format!(
                "model {} has no vision graph; caption text only",
                model.manifest.name
            )));
        };
        let start = Instant::now();
        let picture = match image {
            ImageInput::File(path) => split.load_file(preprocess, path, &mut self.pixels)?,
            ImageInput::Bytes(bytes) => split.load_bytes(preprocess, bytes, &mut self.pixels)?,
            ImageInput::Rgb8(rgb) => split.from_rgb8(preprocess, rgb, &mut self.pixels)?,
        };
        timings.image_decode_ms += ms(start);
        let start = Instant::now();
        let embeds = vision.encode_tiles::<E>(&self.pixels, picture.frames, &model.manifest.name)?;
        timings.vision_ms += ms(start);
        self.layouts.push(PictureLayout {
            rows: picture.rows,
            cols: picture.cols,
            tokens_per_tile: spec.image_tokens,
        });
        Ok(embeds)
    }
}

/// One token fed back (generated or teacher-forced), with the policy around
/// it: room made before the step, the keep ratio enforced after it.
fn feed_token<E: ModelElement>(
    decoder: &mut Decoder,
    embeddings: &Embeddings,
    cache: &mut KvCache,
    embed: &mut [E],
    token: u32,
) -> Result<()> {
    cache.begin_token()?;
    embeddings.gather(&[token], embed)?;
    // One row, or three equal ones (time, height, width) for a text token
    // under multimodal RoPE.
    let position = [cache.rope_position(0) as i64 - cache.skipped_positions() as i64; 3];
    decoder.step::<E>(cache, embed, &position[..decoder.position_rows()])?;
    cache.end_token()
}

/// A built piece's image rows must name the pictures given, each with the
/// rows the vision graph made.
fn check_piece_images<E>(prompt: &Prompt, image_embeds: &[Vec<E>], hidden: usize) -> Result<()> {
    let mut rows = vec![0usize; image_embeds.len()];
    for kind in &prompt.kinds {
        if let KindClass::Image { index, cell } = kind.class() {
            let Some(count) = rows.get_mut(index as usize) else {
                return Err(Error::Shape(format!(
                    "the piece names picture {index} but {} were given",
                    image_embeds.len()
                )));
            };
            if cell as usize != *count {
                return Err(Error::Shape(format!(
                    "picture {index}'s rows are out of order in the piece"
                )));
            }
            *count += 1;
        }
    }
    for (index, (&count, embeds)) in rows.iter().zip(image_embeds).enumerate() {
        if count * hidden != embeds.len() {
            return Err(Error::Shape(format!(
                "the piece has {count} rows for picture {index}, the vision graph made {}",
                embeds.len() / hidden
            )));
        }
    }
    Ok(())
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// `log softmax(logits)[index]`, computed stably in f64.
fn log_softmax_at(logits: &[f32], index: usize) -> Result<f64> {
    let Some(&chosen) = logits.get(index) else {
        return Err(Error::Shape(format!(
            "token {index} is outside the {} logits",
            logits.len()
        )));
    };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    Ok(chosen as f64 - max - sum.ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_is_normalised() {
        let logits = [1.0f32, 2.0, 3.0];
        let total: f64 = (0..3).map(|i| log_softmax_at(&logits, i).unwrap().exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!(log_softmax_at(&logits, 3).is_err());
    }

    #[test]
    fn the_step_trace_never_grows_past_its_reservation() {
        let mut trace = StepTrace::default();
        trace.start(4);
        let (ms, entries) = (trace.ms.capacity(), trace.entries.capacity());
        for i in 0..10 {
            trace.record(i as f64, i);
        }
        assert_eq!((trace.ms.capacity(), trace.entries.capacity()), (ms, entries));
        assert_eq!(trace.ms.len(), ms.min(entries));
        assert_eq!(trace.entries[..4], [0, 1, 2, 3]);
        trace.start(2);
        assert!(trace.ms.is_empty() && trace.entries.is_empty());
    }
}
