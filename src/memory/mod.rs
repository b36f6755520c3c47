//! Camera memory: one bounded KV context across frames that questions can
//! be asked of.
//!
//! ```text
//! system turn                        once, at the start
//! user: "Frame 12 at 10:04:31: " <image rows> [caption prompt]   per frame
//!   [assistant: caption <turn end>]                       --memory-captions
//! user: question  assistant: answer <turn end>              per question
//! ```
//!
//! The pool is never reset: each piece is appended after what it holds and
//! the policy compresses whenever the pool is full, so its bytes never pass
//! the budget however long the stream runs. Questions and their answers stay
//! in the memory (the robot remembers what it was asked and said); they
//! compete for the budget like frames. Positions are re-based before they
//! would leave the model's range ([`Generator::rebase_positions`]); the
//! frames' spans move with them, which is how `frames_in_memory` is counted.

use std::collections::VecDeque;
use std::time::{Instant, SystemTime};

use crate::error::{Error, Result};
use crate::generate::{GenerateParams, Generation, Generator, ImageInput, StopReason, Timings};
use crate::kv::PolicyKind;
use crate::model::prompt::{PictureLayout, Prompt};

/// How frames enter the memory.
#[derive(Clone, Debug, Default)]
pub struct MemoryOptions {
    /// Caption each frame and keep the caption in the memory (an assistant
    /// turn after the frame); otherwise frames are only read.
    pub captions: bool,
    /// The captioning prompt (default: the model's).
    pub caption_prompt: Option<String>,
    /// How captions are generated.
    pub caption_params: GenerateParams,
}

/// Where one frame's tokens are, in the pool's positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrameSpan {
    frame_id: u64,
    /// First position of the frame's piece.
    start: u32,
    /// The position after its piece (and its caption).
    end: u32,
}

/// What a memory holds now: the figures every memory record carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryFigures {
    /// Frames with at least one entry left in some layer.
    pub frames_in_memory: usize,
    /// Frames appended since the start.
    pub frames_seen: u64,
    /// Questions answered from the memory since the start.
    pub questions: u64,
    /// Live entries per layer.
    pub cache_entries: usize,
    pub pool_slots: usize,
    /// The pool's bytes (K, V and metadata): fixed at the start.
    pub pool_bytes: u64,
    /// Entries merged and dropped since the start, summed over layers.
    pub merged: u64,
    pub evicted: u64,
    /// The largest position of a live entry; stays below `max_positions`.
    pub max_position: usize,
    pub max_positions: usize,
    /// Times the positions were re-based.
    pub rebases: u64,
}

/// One frame appended.
#[derive(Clone, Debug)]
pub struct FrameAdded {
    /// Tokens the frame's piece took (header, picture, turn).
    pub prompt_tokens: usize,
    /// Its caption, with `--memory-captions`.
    pub caption: Option<Generation>,
    pub timings: Timings,
    /// From the start of the frame's piece to the end of its caption.
    pub frame_ms: f64,
}

/// A memory over one [`Generator`]'s pool.
#[derive(Debug)]
pub struct Memory {
    options: MemoryOptions,
    opened: bool,
    /// Spans of the frames that may still have entries, oldest first.
    frames: VecDeque<FrameSpan>,
    frames_seen: u64,
    questions: u64,
    rebases: u64,
}

impl Memory {
    /// A memory over `generator`'s pool, which it empties. Refuses a pool
    /// too small for one frame, the system turn and the policy's protected
    /// entries (naming the smallest budget that works), a model without a
    /// vision graph and the `full` policy (which cannot forget, so the pool
    /// would fill).
    pub fn new(generator: &mut Generator<'_>, options: MemoryOptions, allow_full: bool) -> Result<Self> {
        let model = generator.model();
        let Some(vision) = &model.manifest.vision else {
            return Err(Error::Shape(format!(
                "model {} has no vision graph: it cannot remember frames",
                model.manifest.name
            )));
        };
        if generator.cache().policy() == PolicyKind::Full && !allow_full {
            return Err(Error::Policy(
                "full cannot be a memory's policy: it never forgets, so the pool fills; choose elastic, h2o or local"
                    .into(),
            ));
        }
        let tok = &model.prompt;
        let opening = tok.memory_opening()?.len();
        let caption_prompt = options.captions.then_some(options.caption_prompt.as_deref());
        let frame = tok
            .memory_frame(
                &frame_header(u64::MAX, SystemTime::UNIX_EPOCH),
                &largest_frame(vision),
                caption_prompt,
            )?
            .len();
        let answer = if options.captions {
            options.caption_params.max_new_tokens + tok.memory_turn_end(Some(0))?.len()
        } else {
            0
        };
        let cache = generator.cache();
        let min_slots = cache.min_entries() + opening + frame + 1;
        let pool = cache.pool();
        if pool.capacity() < min_slots {
            let per_slot = pool.shape().bytes_per_slot();
            return Err(Error::BudgetTooSmall {
                budget_bytes: pool.bytes(),
                bytes_per_slot: per_slot,
                slots: pool.capacity(),
                min_slots,
                min_bytes: min_slots as u64 * per_slot,
                why: "the system turn, one frame and the policy's protected entries",
            });
        }
        let max_positions = model.manifest.max_positions;
        if 2 * (opening + frame + answer) > max_positions {
            return Err(Error::Plan(format!(
                "a frame and its caption take {} positions: too many for the model's {max_positions}",
                frame + answer
            )));
        }
        generator.reset_cache();
        Ok(Memory {
            options,
            opened: false,
            frames: VecDeque::new(),
            frames_seen: 0,
            questions: 0,
            rebases: 0,
        })
    }

    /// Appends one frame (and its caption, with `--memory-captions`).
    /// `on_text` hears the caption as it is generated.
    pub fn add_frame(
        &mut self,
        generator: &mut Generator<'_>,
        frame_id: u64,
        captured_at: SystemTime,
        image: ImageInput<'_>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<FrameAdded> {
        let started = Instant::now();
        let layout = match generator.model().manifest.vision {
            Some(_) => generator.picture_layout(image)?,
            None => PictureLayout::single(0),
        };
        let caption_prompt = self.options.captions.then_some(self.options.caption_prompt.as_deref());
        let piece =
            generator
                .model()
                .prompt
                .memory_frame(&frame_header(frame_id, captured_at), &layout, caption_prompt)?;
        let answer = match self.options.captions {
            true => self.options.caption_params.max_new_tokens,
            false => 0,
        };
        self.open(generator, &piece, answer)?;
        let start = position(generator.cache().next_position());
        let images = [image];
        let (caption, timings) = if self.options.captions {
            let generation = generator.generate_piece(&piece, &images, &self.options.caption_params, on_text)?;
            self.close_turn(generator, &generation)?;
            let timings = generation.timings;
            (Some(generation), timings)
        } else {
            (None, generator.prefill_piece(&piece, &images)?)
        };
        let end = position(generator.cache().next_position());
        self.frames.push_back(FrameSpan { frame_id, start, end });
        self.frames_seen += 1;
        if self.frames.len() > generator.cache().pool().capacity() {
            self.forget_empty_frames(generator);
        }
        Ok(FrameAdded {
            prompt_tokens: piece.len(),
            caption,
            timings,
            frame_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Answers `question` from what the memory holds; the question and the
    /// answer stay in it. A `max_new_tokens` of 0, or more than the pool
    /// can hold next to its protected entries, is refused before any work.
    pub fn ask(
        &mut self,
        generator: &mut Generator<'_>,
        question: &str,
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let cache = generator.cache();
        let most = cache.pool().capacity().saturating_sub(cache.min_entries() + 1);
        if params.max_new_tokens == 0 || params.max_new_tokens > most {
            return Err(Error::Request(format!(
                "max_tokens must be between 1 and {most} (what the KV budget holds beside the protected entries), not {}",
                params.max_new_tokens
            )));
        }
        let piece = generator.model().prompt.memory_question(question)?;
        self.open(generator, &piece, params.max_new_tokens)?;
        let generation = generator.generate_piece(&piece, &[], params, on_text)?;
        self.close_turn(generator, &generation)?;
        self.questions += 1;
        Ok(generation)
    }

    /// The teacher-forced NLL of `answer` to `question` from the memory as
    /// it is, and the answer's token count (for `eval`'s perplexity); the
    /// question and the scored answer stay in the memory, as an asked
    /// question's would.
    pub fn score(&mut self, generator: &mut Generator<'_>, question: &str, answer: &[u32]) -> Result<(f64, usize)> {
        let piece = generator.model().prompt.memory_question(question)?;
        self.open(generator, &piece, answer.len())?;
        let scored = generator.score_piece(&piece, &[], answer)?;
        let turn_end = generator.model().prompt.memory_turn_end(answer.last().copied())?;
        generator.prefill_piece(&turn_end, &[])?;
        self.questions += 1;
        Ok(scored)
    }

    /// The memory's figures now.
    pub fn figures(&mut self, generator: &Generator<'_>) -> MemoryFigures {
        self.forget_empty_frames(generator);
        let cache = generator.cache();
        let pool = cache.pool();
        let stats = cache.stats();
        MemoryFigures {
            frames_in_memory: self.frames.len(),
            frames_seen: self.frames_seen,
            questions: self.questions,
            cache_entries: pool.len(),
            pool_slots: pool.capacity(),
            pool_bytes: pool.bytes(),
            merged: stats.merged,
            evicted: stats.evicted,
            max_position: cache.max_position().unwrap_or(0),
            max_positions: generator.model().manifest.max_positions,
            rebases: self.rebases,
        }
    }

    /// Drops the spans of frames with no entry left (they never get one
    /// back), so the list is bounded by the live positions.
    fn forget_empty_frames(&mut self, generator: &Generator<'_>) {
        let pool = generator.cache().pool();
        let mut live: Vec<u32> = (0..pool.shape().layers)
            .flat_map(|layer| pool.positions(layer).iter().copied())
            .collect();
        live.sort_unstable();
        live.dedup();
        self.frames.retain(|span| {
            let first = live.partition_point(|&p| p < span.start);
            live.get(first).is_some_and(|&p| p < span.end)
        });
    }

    /// The frame ids with entries left, oldest first (as of the last
    /// [`Self::figures`]).
    pub fn frame_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.frames.iter().map(|span| span.frame_id)
    }

    /// Before a piece: the system turn if this is the first, and a re-base
    /// if the piece and `answer` tokens would leave the model's positions.
    fn open(&mut self, generator: &mut Generator<'_>, piece: &Prompt, answer: usize) -> Result<()> {
        if !self.opened {
            let opening = generator.model().prompt.memory_opening()?;
            generator.reset_cache();
            generator.prefill_piece(&opening, &[])?;
            self.opened = true;
        }
        // The piece, its answer and the turn end that closes it.
        let room = piece.len() + answer + 4;
        if let Some(map) = generator.rebase_positions(room)? {
            self.rebases += 1;
            for span in &mut self.frames {
                span.start = map.map(span.start);
                span.end = map.map(span.end);
            }
        }
        Ok(())
    }

    /// Feeds back what closes an assistant turn kept in the memory.
    fn close_turn(&self, generator: &mut Generator<'_>, generation: &Generation) -> Result<()> {
        // A stop string ends the loop before its last token is fed back.
        let unfed = match generation.stop {
            StopReason::MaxTokens | StopReason::StopString => generation.token_ids.last().copied(),
            StopReason::StopToken => None,
        };
        let turn_end = generator.model().prompt.memory_turn_end(unfed)?;
        generator.prefill_piece(&turn_end, &[])?;
        Ok(())
    }
}

/// The text before a frame's picture: its id and capture time (UTC).
/// The most rows one frame can take: the manifest's count (a dynamic
/// model's budget), or a split model's most tiles.
fn largest_frame(vision: &crate::model::manifest::VisionSpec) -> PictureLayout {
    match &vision.split {
        Some(split) if split.splitting => {
            let side = split.longest_edge.div_ceil(split.tile.max(1)) as usize;
            PictureLayout {
                rows: side,
                cols: side,
                tokens_per_tile: vision.image_tokens,
            }
        }
        _ => PictureLayout::single(vision.image_tokens),
    }
}

pub fn frame_header(frame_id: u64, captured_at: SystemTime) -> String {
    let time = jiff::Timestamp::try_from(captured_at)
        .map(|t| t.strftime("%H:%M:%S").to_string())
        .unwrap_or_else(|_| "--:--:--".into());
    format!("Frame {frame_id} at {time}: ")
}

/// Positions fit u32: the pool stores them so.
fn position(p: usize) -> u32 {
    u32::try_from(p).unwrap_or(u32::MAX)
}
