//! The prompt: chat template, tokenizer, and streaming detokenization.
//!
//! Mirrors the exporter's reference (`prompt_pieces` in
//! `scripts/export/common.py` and `OrtModel.prompt` in `ortrun.py`): the
//! prompt is a list of text pieces around the image; each piece is tokenized
//! on its own with `add_special_tokens = false` and the ids concatenated. Added
//! tokens written in the text (`<|im_start|>`) are recognised as such, as in
//! the reference, so user text can contain them too. With an image:
//!
//! ```text
//! [system_prefix system_prompt system_suffix user_prefix image_prefix] <image tokens>
//! [image_suffix USER_TEXT user_suffix assistant_prefix]
//! ```
//!
//! and without one the single piece `system_prefix system_prompt
//! system_suffix user_prefix USER_TEXT user_suffix assistant_prefix` (no
//! `image_prefix` / `image_suffix`). `bos_token_id` is prepended only when
//! `add_bos` is true. Decoding skips special tokens, as the fixtures'
//! `tokenizer.decode(ids, skip_special_tokens=True)` does.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::kv::TokenKind;

/// The manifest's `chat_template` object (every field required, no others).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatTemplate {
    pub system_prefix: String,
    pub system_prompt: String,
    pub system_suffix: String,
    pub user_prefix: String,
    pub image_prefix: String,
    pub image_suffix: String,
    /// Used when no user text is given.
    pub default_user_prompt: String,
    pub user_suffix: String,
    pub assistant_prefix: String,
    /// Where the image goes; only `user_before_text` exists.
    pub image_position: String,
    /// Must be true: each piece is tokenized on its own.
    pub tokenize_pieces_separately: bool,
}

/// The only `image_position` the format defines.
pub const IMAGE_POSITION_USER_BEFORE_TEXT: &str = "user_before_text";

/// The marker tokens of a split picture (the manifest's
/// `vision.split.tokens`), as the Idefics3 processor writes them:
/// `get_image_prompt_string` in transformers'
/// `models/idefics3/processing_idefics3.py`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitTokens {
    /// Around every tile and the global image: `<fake_token_around_image>`.
    pub fake_image: String,
    /// Before tile (r, c), 1-based, with `{r}` and `{c}` in it: `<row_{r}_col_{c}>`.
    pub row_col: String,
    /// Before the global image: `<global-img>`.
    pub global_image: String,
    /// The token an image row stands for in the processor's ids (`<image>`);
    /// the prompt has the vision graph's rows there instead.
    pub image: String,
}

/// How one picture's rows sit in the prompt: `rows x cols` tiles (none:
/// the picture is one image) of `tokens_per_tile` rows each, then the
/// global image's. Its rows in the vision output are tile-major, row by
/// row, then the global image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PictureLayout {
    pub rows: usize,
    pub cols: usize,
    pub tokens_per_tile: usize,
}

/// Every picture takes tokens, and no more pictures or rows than a
/// [`TokenKind`] can name.
fn check_layouts(layouts: &[PictureLayout]) -> Result<(), PromptError> {
    if layouts.iter().any(|layout| layout.tokens_per_tile == 0) {
        return Err(PromptError::ZeroImageTokens);
    }
    let most = layouts.iter().map(PictureLayout::image_rows).max().unwrap_or(0);
    if layouts.len() > TokenKind::MAX_IMAGES || most > TokenKind::MAX_CELLS {
        return Err(PromptError::Template(format!(
            "{} pictures of up to {most} tokens: at most {} pictures of {} tokens each",
            layouts.len(),
            TokenKind::MAX_IMAGES,
            TokenKind::MAX_CELLS
        )));
    }
    Ok(())
}

impl PictureLayout {
    /// A picture of `tokens` rows, not split: the template's image prefix and suffix around it.
    pub const fn single(tokens: usize) -> Self {
        PictureLayout {
            rows: 0,
            cols: 0,
            tokens_per_tile: tokens,
        }
    }

    /// Whether the picture has tiles.
    pub const fn is_split(&self) -> bool {
        self.rows > 0 && self.cols > 0
    }

    /// Image rows in the prompt: every tile's and the global image's (saturating).
    pub fn image_rows(&self) -> usize {
        let frames = match self.is_split() {
            true => self.rows.saturating_mul(self.cols).saturating_add(1),
            false => 1,
        };
        frames.saturating_mul(self.tokens_per_tile)
    }
}

impl ChatTemplate {
    /// Rejects values this code would not reproduce faithfully.
    pub fn validate(&self) -> Result<(), PromptError> {
        if self.image_position != IMAGE_POSITION_USER_BEFORE_TEXT {
            return Err(PromptError::Template(format!(
                "unknown image_position {:?} (the only one supported is {IMAGE_POSITION_USER_BEFORE_TEXT:?})",
                self.image_position
            )));
        }
        if !self.tokenize_pieces_separately {
            return Err(PromptError::Template(
                "tokenize_pieces_separately = false is not supported: the format tokenizes each text piece on its own"
                    .into(),
            ));
        }
        if self.default_user_prompt.trim().is_empty() {
            return Err(PromptError::Template("default_user_prompt is empty".into()));
        }
        Ok(())
    }
}

/// Everything that can go wrong building or decoding a prompt.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// `tokenizer.json` cannot be read or parsed.
    #[error("cannot load tokenizer {path}: {reason}")]
    TokenizerLoad { path: String, reason: String },

    /// A chat template value we do not support.
    #[error("invalid chat_template: {0}")]
    Template(String),

    /// `add_bos` is true but no usable `bos_token_id` was given.
    #[error("add_bos is true but bos_token_id is {bos:?} (the tokenizer has {vocab} tokens)")]
    Bos { bos: Option<u32>, vocab: usize },

    /// The user gave an empty or whitespace-only prompt.
    #[error("empty prompt: give some text, or no prompt at all for the model's default ({default:?})")]
    EmptyPrompt { default: String },

    /// An image that stands for no tokens.
    #[error("an image must take at least one token position (got image_tokens = 0)")]
    ZeroImageTokens,

    /// The tokenizer failed on a piece of text.
    #[error("cannot tokenize {piece:?}: {reason}")]
    Encode { piece: String, reason: String },

    /// An id the tokenizer does not know.
    #[error("token id {id} is outside the tokenizer's vocabulary of {vocab}")]
    UnknownToken { id: u32, vocab: usize },

    /// The tokenizer failed to decode.
    #[error("cannot decode token ids: {0}")]
    Decode(String),
}

/// A prompt: its text token ids and the kind of every position.
///
/// Position `p` is an image row when `kinds[p]` is an image kind (its
/// picture index and row say which), else the next id of `ids`. So
/// `kinds.len()` is the prompt's length and `ids` holds its text tokens in
/// order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub kinds: Vec<TokenKind>,
}

impl Prompt {
    /// Positions the prompt takes: text tokens plus image rows.
    pub fn len(&self) -> usize {
        self.kinds.len()
    }

    /// True for a prompt of no positions (never built by [`PromptTokenizer::build`]).
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }

    /// Image rows in the prompt.
    pub fn image_tokens(&self) -> usize {
        self.kinds.iter().filter(|k| k.is_image()).count()
    }

    /// The ids with `placeholder` at each image position (the fixtures' form, with -1).
    pub fn ids_with_placeholder(&self, placeholder: i64) -> Vec<i64> {
        let mut ids = self.ids.iter();
        self.kinds
            .iter()
            .map(|k| match k.is_image() {
                true => placeholder,
                // Invariant: `ids` has one id per non-image kind.
                false => ids.next().map_or(placeholder, |&i| i64::from(i)),
            })
            .collect()
    }

    /// Appends one piece of text, tokenized on its own; tokens overlapping
    /// the bytes `user` of `text` are the user's, the rest template.
    fn push_text(
        &mut self,
        tok: &PromptTokenizer,
        text: &str,
        user: std::ops::Range<usize>,
    ) -> Result<(), PromptError> {
        if text.is_empty() {
            return Ok(());
        }
        let enc = tok.tokenizer.encode(text, false).map_err(|e| PromptError::Encode {
            piece: text.chars().take(80).collect(),
            reason: e.to_string(),
        })?;
        self.ids.extend_from_slice(enc.get_ids());
        self.kinds.extend(enc.get_offsets().iter().map(|&(start, end)| {
            if start.max(user.start) < end.min(user.end) {
                TokenKind::USER
            } else {
                TokenKind::TEMPLATE
            }
        }));
        Ok(())
    }

    /// As [`Self::push_text`], with the user's text in several byte ranges.
    fn push_text_ranges(
        &mut self,
        tok: &PromptTokenizer,
        text: &str,
        user: &[std::ops::Range<usize>],
    ) -> Result<(), PromptError> {
        if text.is_empty() {
            return Ok(());
        }
        let enc = tok.tokenizer.encode(text, false).map_err(|e| PromptError::Encode {
            piece: text.chars().take(80).collect(),
            reason: e.to_string(),
        })?;
        self.ids.extend_from_slice(enc.get_ids());
        self.kinds.extend(enc.get_offsets().iter().map(|&(start, end)| {
            match user.iter().any(|u| start.max(u.start) < end.min(u.end)) {
                true => TokenKind::USER,
                false => TokenKind::TEMPLATE,
            }
        }));
        Ok(())
    }
}

/// Who speaks a turn of [`PromptTokenizer::build_chat`] (system text is
/// given on its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatRole {
    User,
    Assistant,
}

/// One turn of a conversation: its text and, for a user turn, how many
/// pictures come before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatTurn<'a> {
    pub role: ChatRole,
    pub text: &'a str,
    pub images: usize,
}

/// The largest `tokenizer.json` read (the demo model's is 1.8 MB).
const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// Words the tokenizer's split cache holds (see [`PromptTokenizer::new`]).
const WORD_CACHE_WORDS: usize = 256;

/// A Hugging Face tokenizer with the model's chat template and BOS rule.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    bos: Option<u32>,
    vocab: usize,
    /// The markers of split pictures (a model with `vision.split`).
    split: Option<SplitTokens>,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("vocab", &self.vocab)
            .field("bos", &self.bos)
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}

impl PromptTokenizer {
    /// Loads `tokenizer.json`. `bos` is prepended to every prompt when
    /// `add_bos` is true (it must then be a known id); otherwise it is unused.
    pub fn from_file(
        tokenizer_json: &Path,
        template: ChatTemplate,
        bos: Option<u32>,
        add_bos: bool,
    ) -> Result<Self, PromptError> {
        let load_error = |reason: String| PromptError::TokenizerLoad {
            path: tokenizer_json.display().to_string(),
            reason,
        };
        // A regular file of a sane size: not a FIFO, a device or a folder.
        let json =
            crate::regular_file::read(tokenizer_json, MAX_TOKENIZER_BYTES).map_err(|e| load_error(e.to_string()))?;
        let tokenizer = Tokenizer::from_bytes(&json).map_err(|e| load_error(e.to_string()))?;
        Self::new(tokenizer, template, bos, add_bos)
    }

    /// As [`Self::from_file`], from the JSON text in memory.
    pub fn from_bytes(
        json: &[u8],
        template: ChatTemplate,
        bos: Option<u32>,
        add_bos: bool,
    ) -> Result<Self, PromptError> {
        let tokenizer = Tokenizer::from_bytes(json).map_err(|e| PromptError::TokenizerLoad {
            path: "(in-memory tokenizer.json)".into(),
            reason: e.to_string(),
        })?;
        Self::new(tokenizer, template, bos, add_bos)
    }

    fn new(
        mut tokenizer: Tokenizer,
        template: ChatTemplate,
        bos: Option<u32>,
        add_bos: bool,
    ) -> Result<Self, PromptError> {
        template.validate()?;
        // The tokenizer caches the words it has split. A camera memory
        // brings new words with every frame (its id in the header), so the
        // default 10,000-word cache made a long stream's resident memory
        // creep for its first 10,000 frames; a small cache bounds it early.
        let mut model = tokenizer.get_model().clone();
        model.resize_cache(WORD_CACHE_WORDS);
        tokenizer.with_model(model);
        let vocab = tokenizer.get_vocab_size(true);
        let bos = if add_bos {
            match bos {
                Some(id) if (id as usize) < vocab => Some(id),
                _ => return Err(PromptError::Bos { bos, vocab }),
            }
        } else {
            None
        };
        Ok(Self {
            tokenizer,
            template,
            bos,
            vocab,
            split: None,
        })
    }

    /// The chat template in use.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Tokens in the tokenizer, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// The prompt for one picture of `image_tokens` rows, or none.
    pub fn build(&self, user_text: Option<&str>, image_tokens: Option<usize>) -> Result<Prompt, PromptError> {
        self.build_images(user_text, image_tokens.as_slice())
    }

    /// The prompt's token ids and kinds, with `images[i]` rows for picture
    /// `i`, each wrapped in the template's image prefix and suffix, all
    /// before the user's text (the template's `user_before_text`; pictures
    /// in a row share one text piece between them: `image_suffix
    /// image_prefix`). `user_text` `None` uses the template's default prompt;
    /// an empty or whitespace-only text is an error. The text is used as
    /// given (not trimmed), as in the reference.
    pub fn build_images(&self, user_text: Option<&str>, images: &[usize]) -> Result<Prompt, PromptError> {
        let layouts: Vec<PictureLayout> = images.iter().map(|&n| PictureLayout::single(n)).collect();
        self.build_pictures(user_text, &layouts)
    }

    // ---- a camera memory's pieces (docs/memory.md) ------------------------
    //
    // One continuing chat in the model's own template: the system turn once,
    // then one user turn per frame, and a user turn per question with the
    // model's answer as the assistant turn. Each piece is tokenized as the
    // one-shot prompt tokenizes its pieces.

    /// The memory's start: BOS (if the model adds one) and the system turn.
    pub fn memory_opening(&self) -> Result<Prompt, PromptError> {
        let t = &self.template;
        let mut prompt = Prompt {
            ids: self.bos.into_iter().collect(),
            kinds: Vec::new(),
        };
        prompt.kinds.resize(prompt.ids.len(), TokenKind::TEMPLATE);
        let system = [&t.system_prefix, &t.system_prompt, &t.system_suffix].map(String::as_str);
        prompt.push_text(self, &system.concat(), 0..0)?;
        Ok(prompt)
    }

    /// One frame as a user turn: `header` (its time and id), the picture's
    /// `rows` in the template's image prefix and suffix, and then either the
    /// end of the turn or, to caption it, `caption_prompt` (`Some(None)`:
    /// the model's default prompt) and the assistant prefix.
    pub fn memory_frame(
        &self,
        header: &str,
        layout: &PictureLayout,
        caption_prompt: Option<Option<&str>>,
    ) -> Result<Prompt, PromptError> {
        let rows = layout.image_rows();
        if layout.tokens_per_tile == 0 {
            return Err(PromptError::ZeroImageTokens);
        }
        if rows > TokenKind::MAX_CELLS {
            return Err(PromptError::Template(format!(
                "a frame of {rows} tokens: at most {}",
                TokenKind::MAX_CELLS
            )));
        }
        let t = &self.template;
        let mut prompt = Prompt {
            ids: Vec::new(),
            kinds: Vec::new(),
        };
        let mut piece = format!("{}{header}", t.user_prefix);
        self.push_picture(&mut prompt, &mut piece, &mut Vec::new(), 0, layout)?;
        match caption_prompt {
            None => {
                piece.push_str(&t.user_suffix);
                prompt.push_text(self, &piece, 0..0)?;
            }
            Some(user_text) => {
                let user = self.user_text(user_text)?;
                let user_start = piece.len();
                for s in [user, &t.user_suffix, &t.assistant_prefix] {
                    piece.push_str(s);
                }
                prompt.push_text(self, &piece, user_start..user_start + user.len())?;
            }
        }
        Ok(prompt)
    }

    /// A question as a user turn, ending with the assistant prefix.
    pub fn memory_question(&self, question: &str) -> Result<Prompt, PromptError> {
        let t = &self.template;
        let user = self.user_text(Some(question))?;
        let piece = format!("{}{user}{}{}", t.user_prefix, t.user_suffix, t.assistant_prefix);
        let mut prompt = Prompt {
            ids: Vec::new(),
            kinds: Vec::new(),
        };
        let start = t.user_prefix.len();
        prompt.push_text(self, &piece, start..start + user.len())?;
        Ok(prompt)
    }

    /// What closes an assistant turn that stays in the memory: `last`, an
    /// answer token that was chosen but not fed back (an answer cut at its
    /// token limit), then the template's turn end (`user_suffix`, which in
    /// ChatML-style templates ends every turn).
    pub fn memory_turn_end(&self, last: Option<u32>) -> Result<Prompt, PromptError> {
        let mut prompt = Prompt {
            ids: last.into_iter().collect(),
            kinds: Vec::new(),
        };
        prompt.kinds.resize(prompt.ids.len(), TokenKind::GENERATED);
        prompt.push_text(self, &self.template.user_suffix, 0..0)?;
        Ok(prompt)
    }

    /// A whole conversation in the model's template (an OpenAI-style chat
    /// request): the system turn (`system`, else the template's system
    /// prompt), then each turn in order, each closed by the template's turn
    /// end (`user_suffix`, which ends every turn in ChatML-style templates),
    /// and the assistant prefix for the answer. A user turn's pictures
    /// (`images` of them, laid out as `pictures` says, in order) come before its text, as
    /// the template's `user_before_text` says; a user turn with no text
    /// takes the default prompt. Pictures are numbered across the whole
    /// conversation. With one user turn and no system text this is
    /// [`Self::build_images`]'s prompt. Users' and earlier assistants' text
    /// is the user's kind, the template's pieces the template's.
    pub fn build_chat(
        &self,
        system: Option<&str>,
        turns: &[ChatTurn<'_>],
        layouts: &[PictureLayout],
    ) -> Result<Prompt, PromptError> {
        let t = &self.template;
        let pictures: usize = turns.iter().map(|turn| turn.images).sum();
        if layouts.len() != pictures {
            return Err(PromptError::Template(format!(
                "the turns hold {pictures} pictures but {} layouts were given",
                layouts.len()
            )));
        }
        check_layouts(layouts)?;
        let mut prompt = Prompt {
            ids: self.bos.into_iter().collect(),
            kinds: Vec::new(),
        };
        prompt.kinds.resize(prompt.ids.len(), TokenKind::TEMPLATE);
        // The text since the last picture, and the user's byte ranges in it.
        let mut piece = String::new();
        let mut user: Vec<std::ops::Range<usize>> = Vec::new();
        let push_user = |piece: &mut String, user: &mut Vec<std::ops::Range<usize>>, text: &str| {
            let start = piece.len();
            piece.push_str(text);
            user.push(start..piece.len());
        };
        piece.push_str(&t.system_prefix);
        match system {
            Some(text) => push_user(&mut piece, &mut user, text),
            None => piece.push_str(&t.system_prompt),
        }
        piece.push_str(&t.system_suffix);
        let mut picture = 0;
        for turn in turns {
            match turn.role {
                ChatRole::User => {
                    piece.push_str(&t.user_prefix);
                    for _ in 0..turn.images {
                        self.push_picture(&mut prompt, &mut piece, &mut user, picture, &layouts[picture])?;
                        picture += 1;
                    }
                    let text = match turn.text.trim().is_empty() {
                        true => t.default_user_prompt.as_str(),
                        false => turn.text,
                    };
                    push_user(&mut piece, &mut user, text);
                }
                ChatRole::Assistant => {
                    if turn.images > 0 {
                        return Err(PromptError::Template("an assistant turn cannot hold pictures".into()));
                    }
                    piece.push_str(&t.assistant_prefix);
                    push_user(&mut piece, &mut user, turn.text);
                }
            }
            piece.push_str(&t.user_suffix);
        }
        piece.push_str(&t.assistant_prefix);
        prompt.push_text_ranges(self, &piece, &user)?;
        Ok(prompt)
    }

    /// `user_text` or the default prompt; empty text is an error.
    fn user_text<'s>(&'s self, user_text: Option<&'s str>) -> Result<&'s str, PromptError> {
        match user_text {
            None => Ok(self.template.default_user_prompt.as_str()),
            Some(s) if s.trim().is_empty() => Err(PromptError::EmptyPrompt {
                default: self.template.default_user_prompt.clone(),
            }),
            Some(s) => Ok(s),
        }
    }

    /// Token ids of one piece of text, no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        let mut v = Vec::new();
        self.encode_into(text, &mut v)?;
        Ok(v)
    }

    fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), PromptError> {
        if text.is_empty() {
            return Ok(());
        }
        let enc = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| PromptError::Encode {
                piece: text.chars().take(80).collect(),
                reason: e.to_string(),
            })?;
        out.extend_from_slice(enc.get_ids());
        Ok(())
    }

    /// The text of `ids`, special tokens skipped. Invalid UTF-8 (a byte-level
    /// token sequence cut inside a character) becomes U+FFFD, as in Python.
    pub fn decode(&self, ids: &[u32]) -> Result<String, PromptError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(PromptError::UnknownToken { id, vocab: self.vocab });
        }
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| PromptError::Decode(e.to_string()))
    }

    /// An incremental decoder for streaming generated ids.
    pub fn decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tok: self,
            stream: self.tokenizer.decode_stream(true),
            pending: Vec::with_capacity(MAX_PENDING_TOKENS + 1),
            piece: String::new(),
        }
    }
}

/// Most tokens held back waiting for a UTF-8 character to complete; past
/// this the replacement character is emitted (only a broken model gets here).
const MAX_PENDING_TOKENS: usize = 8;

/// `tokenizers`' incremental decoder over the tokenizer a `tokenizer.json` loads.
type TokenizersStream<'a> = tokenizers::DecodeStream<
    'a,
    tokenizers::models::ModelWrapper,
    tokenizers::normalizers::NormalizerWrapper,
    tokenizers::pre_tokenizers::PreTokenizerWrapper,
    tokenizers::processors::PostProcessorWrapper,
    tokenizers::decoders::DecoderWrapper,
>;

/// Incremental detokenization on `tokenizers`' [`tokenizers::DecodeStream`].
///
/// Each [`Self::push`] returns the text that became final with that id.
/// Text ending in an incomplete UTF-8 sequence (a character split across
/// byte-level tokens) is held back until the character completes;
/// [`Self::finish`] returns whatever is still held, as U+FFFD where a
/// character never completed. The concatenation of all pieces equals
/// [`PromptTokenizer::decode`] of all ids (the tests check it for every
/// tokenizer shipped). What is ours: the vocabulary check, the cap of
/// [`MAX_PENDING_TOKENS`] held back (`DecodeStream` alone would hold a
/// broken model's bytes forever, re-decoding more each step), and `finish`.
/// `DecodeStream` re-decodes only a short window of ids each step.
pub struct StreamDecoder<'a> {
    tok: &'a PromptTokenizer,
    stream: TokenizersStream<'a>,
    /// Ids pushed since the last piece came out.
    pending: Vec<u32>,
    /// The last piece (the returned `&str` borrows it).
    piece: String,
}

impl std::fmt::Debug for StreamDecoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl StreamDecoder<'_> {
    /// Feeds one generated id; returns the newly final text (often empty).
    pub fn push(&mut self, id: u32) -> Result<&str, PromptError> {
        if id as usize >= self.tok.vocab {
            return Err(PromptError::UnknownToken {
                id,
                vocab: self.tok.vocab,
            });
        }
        self.pending.push(id);
        match self.stream.step(id).map_err(|e| PromptError::Decode(e.to_string()))? {
            Some(text) => {
                self.pending.clear();
                self.piece = text;
                Ok(&self.piece)
            }
            None if self.pending.len() > MAX_PENDING_TOKENS => self.flush(),
            None => Ok(""),
        }
    }

    /// Returns the text still held back and resets the decoder.
    pub fn finish(&mut self) -> Result<&str, PromptError> {
        self.flush()
    }

    /// Emits the held-back ids as they decode (U+FFFD for a broken
    /// character, as a full decode gives it) and starts afresh. They decode
    /// alone as in context: each ends a prefix that is not whole text, so
    /// they are byte pieces, and the text before them ended on a character.
    fn flush(&mut self) -> Result<&str, PromptError> {
        self.piece = match self.pending.is_empty() {
            true => String::new(),
            false => self.tok.decode(&self.pending)?,
        };
        self.pending.clear();
        self.stream = self.tok.tokenizer.decode_stream(true);
        Ok(&self.piece)
    }
}

// ---- split pictures (Idefics3 / SmolVLM) ----------------------------------

impl PromptTokenizer {
    /// Writes split pictures with `tokens` (a model with `vision.split`).
    pub fn with_split_tokens(mut self, tokens: Option<SplitTokens>) -> Self {
        self.split = tokens;
        self
    }

    /// [`Self::build_images`] for pictures of any layout: a picture that is
    /// not split goes between the template's image prefix and suffix; a
    /// split one is written as the Idefics3 processor writes it (one line
    /// per tile row, the global image after an empty line):
    ///
    /// ```text
    /// <fake><row_1_col_1>TILE<fake><row_1_col_2>TILE\n
    /// <fake><row_2_col_1>TILE<fake><row_2_col_2>TILE\n
    /// \n<fake><global-img>GLOBAL<fake>
    /// ```
    ///
    /// Tile (r, c)'s rows are the picture's vision rows
    /// `[(r * cols + c) * n, +n)`, the global image's the last n.
    pub fn build_pictures(&self, user_text: Option<&str>, pictures: &[PictureLayout]) -> Result<Prompt, PromptError> {
        let t = &self.template;
        let user = self.user_text(user_text)?;
        check_layouts(pictures)?;
        let mut prompt = Prompt {
            ids: self.bos.into_iter().collect(),
            kinds: Vec::new(),
        };
        prompt.kinds.resize(prompt.ids.len(), TokenKind::TEMPLATE);
        let head = [&t.system_prefix, &t.system_prompt, &t.system_suffix, &t.user_prefix].map(String::as_str);
        let mut piece = head.concat();
        for (index, layout) in pictures.iter().enumerate() {
            self.push_picture(&mut prompt, &mut piece, &mut Vec::new(), index, layout)?;
        }
        let user_start = piece.len();
        for s in [user, &t.user_suffix, &t.assistant_prefix] {
            piece.push_str(s);
        }
        prompt.push_text(self, &piece, user_start..user_start + user.len())?;
        Ok(prompt)
    }

    /// Picture `index`: the text pending in `piece` and the picture's own
    /// text before each of its images is tokenized, its rows appended; what
    /// follows its last image is left in `piece`.
    fn push_picture(
        &self,
        prompt: &mut Prompt,
        piece: &mut String,
        user: &mut Vec<std::ops::Range<usize>>,
        index: usize,
        layout: &PictureLayout,
    ) -> Result<(), PromptError> {
        let n = layout.tokens_per_tile;
        // `user`: the user's byte ranges in the pending text (none after the
        // first image).
        let mut image = |prompt: &mut Prompt, piece: &mut String, frame: usize| -> Result<(), PromptError> {
            prompt.push_text_ranges(self, piece, user)?;
            user.clear();
            piece.clear();
            prompt
                .kinds
                .extend((frame * n..(frame + 1) * n).map(|cell| TokenKind::image(index, cell)));
            Ok(())
        };
        if !layout.is_split() {
            piece.push_str(&self.template.image_prefix);
            image(prompt, piece, 0)?;
            piece.push_str(&self.template.image_suffix);
            return Ok(());
        }
        let Some(tokens) = &self.split else {
            return Err(PromptError::Template(format!(
                "picture {index} is split into {}x{} tiles, but the model has no vision.split tokens",
                layout.rows, layout.cols
            )));
        };
        for r in 0..layout.rows {
            for c in 0..layout.cols {
                piece.push_str(&tokens.fake_image);
                let tag = tokens
                    .row_col
                    .replace("{r}", &(r + 1).to_string())
                    .replace("{c}", &(c + 1).to_string());
                piece.push_str(&tag);
                image(prompt, piece, r * layout.cols + c)?;
            }
            piece.push('\n');
        }
        piece.push('\n');
        piece.push_str(&tokens.fake_image);
        piece.push_str(&tokens.global_image);
        image(prompt, piece, layout.rows * layout.cols)?;
        piece.push_str(&tokens.fake_image);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::path::PathBuf;

    fn repo(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    fn json(path: &Path) -> Value {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).expect("json")
    }

    /// The tokenizer of a model folder, built from its manifest.
    fn model_tokenizer(dir: &Path) -> PromptTokenizer {
        let m = json(&dir.join("manifest.json"));
        let template: ChatTemplate = serde_json::from_value(m["chat_template"].clone()).expect("chat_template");
        let bos = m["bos_token_id"].as_u64().map(|b| b as u32);
        let add_bos = m["add_bos"].as_bool().expect("add_bos");
        PromptTokenizer::from_file(&dir.join("tokenizer.json"), template, bos, add_bos).expect("tokenizer")
    }

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    }

    /// Streams `ids` one at a time and checks the pieces add up to the full decode.
    fn streamed(tok: &PromptTokenizer, ids: &[u32]) -> String {
        let mut d = tok.decoder();
        let mut s = String::new();
        for &id in ids {
            s.push_str(d.push(id).expect("push"));
        }
        s.push_str(d.finish().expect("finish"));
        assert_eq!(s, tok.decode(ids).expect("decode"), "stream != decode for {ids:?}");
        s
    }

    fn image_tokens_in(prompt_ids: &[i64]) -> Option<usize> {
        let n = prompt_ids.iter().filter(|&&i| i == -1).count();
        (n > 0).then_some(n)
    }

    #[test]
    fn tiny_prompts_match_the_fixtures() {
        let tok = model_tokenizer(&repo("models/tiny"));
        let fx = json(&repo("models/fixtures/tiny_expected.json"));
        let cases = fx["cases"].as_array().expect("cases");
        assert!(cases.len() >= 3);
        for case in cases {
            let expected: Vec<i64> = case["prompt_ids"]
                .as_array()
                .expect("p")
                .iter()
                .map(|x| x.as_i64().expect("i"))
                .collect();
            let user = case["user_text"].as_str();
            let prompt = tok.build(user, image_tokens_in(&expected)).expect("build");
            assert_eq!(prompt.ids_with_placeholder(-1), expected, "{user:?}");
            assert_eq!(prompt.len() as u64, case["prompt_len"].as_u64().expect("prompt_len"));
            let out = ids(&case["expected_ids"]);
            let text = case["expected_text"].as_str().expect("expected_text");
            assert_eq!(tok.decode(&out).expect("decode"), text);
            assert_eq!(streamed(&tok, &out), text);
        }
    }

    #[test]
    fn demo_prompts_match_the_fixtures() {
        let dir = repo(".cache/models/demo-fp32");
        if !dir.join("tokenizer.json").exists() {
            eprintln!(
                "note: {} absent (scripts/build-demo-model.sh builds it); demo prompt test skipped",
                dir.display()
            );
            return;
        }
        let tok = model_tokenizer(&dir);
        let fx = json(&repo("models/fixtures/demo_expected.json"));
        let user = fx["user_prompt"].as_str();
        assert_eq!(user, Some(tok.template().default_user_prompt.as_str()));
        for case in fx["cases"].as_array().expect("cases") {
            let expected: Vec<i64> = case["prompt_ids"]
                .as_array()
                .expect("p")
                .iter()
                .map(|x| x.as_i64().expect("i"))
                .collect();
            let n = image_tokens_in(&expected);
            assert_eq!(n, Some(49));
            // The fixtures use the default prompt: None and the explicit text give the same ids.
            assert_eq!(tok.build(None, n).expect("build").ids_with_placeholder(-1), expected);
            assert_eq!(tok.build(user, n).expect("build").ids_with_placeholder(-1), expected);
            for (variant, out) in case["expected_ids"].as_object().expect("expected_ids") {
                let text = case["text"][variant].as_str().expect("text");
                assert_eq!(streamed(&tok, &ids(out)), text, "{variant}");
            }
        }
    }

    #[test]
    fn split_prompts_equal_the_hf_processor_ids() {
        let m = json(&repo("models/tiny-idefics3-split/manifest.json"));
        let template: ChatTemplate = serde_json::from_value(m["chat_template"].clone()).expect("template");
        let tokens: SplitTokens = serde_json::from_value(m["vision"]["split"]["tokens"].clone()).expect("tokens");
        let n = m["vision"]["image_tokens"].as_u64().expect("image_tokens") as usize;
        let path = repo("models/tiny-idefics3-split/tokenizer.json");
        let plain = PromptTokenizer::from_file(&path, template.clone(), None, false).expect("tokenizer");
        let tok = PromptTokenizer::from_file(&path, template, None, false)
            .expect("tokenizer")
            .with_split_tokens(Some(tokens));
        let fx = json(&repo("models/fixtures/idefics3/tiny_split_expected.json"));
        let image_id = fx["image_token_id"].as_i64().expect("image_token_id");
        for case in fx["cases"].as_array().expect("cases") {
            let name = case["name"].as_str().expect("name");
            let layouts: Vec<PictureLayout> = case["rows_cols"]
                .as_array()
                .expect("rows_cols")
                .iter()
                .map(|rc| PictureLayout {
                    rows: rc[0].as_u64().expect("rows") as usize,
                    cols: rc[1].as_u64().expect("cols") as usize,
                    tokens_per_tile: n,
                })
                .collect();
            let expected: Vec<i64> = case["input_ids"]
                .as_array()
                .expect("input_ids")
                .iter()
                .map(|x| x.as_i64().expect("id"))
                .collect();
            let p = tok.build_pictures(case["user_text"].as_str(), &layouts).expect("build");
            assert_eq!(p.ids_with_placeholder(image_id), expected, "{name}");
            // A chat of one user turn holding the pictures is the same prompt.
            let turn = [ChatTurn {
                role: ChatRole::User,
                text: case["user_text"].as_str().unwrap_or(""),
                images: layouts.len(),
            }];
            assert_eq!(tok.build_chat(None, &turn, &layouts).expect("chat"), p, "{name}: chat");
            // Image rows in prompt order are each picture's vision rows in
            // order: its tiles row by row, then its global image.
            let cells: Vec<(u32, u32)> = p
                .kinds
                .iter()
                .filter_map(|k| match k.class() {
                    crate::kv::KindClass::Image { index, cell } => Some((index, cell)),
                    _ => None,
                })
                .collect();
            let want: Vec<(u32, u32)> = layouts
                .iter()
                .enumerate()
                .flat_map(|(i, l)| (0..l.image_rows() as u32).map(move |c| (i as u32, c)))
                .collect();
            assert_eq!(cells, want, "{name}");
            // A tokenizer without the markers refuses a split picture.
            let e = plain.build_pictures(None, &layouts).expect_err("no split tokens");
            assert!(e.to_string().contains("no vision.split tokens"), "{e}");
        }
        // A picture that is not split is written as before, with the
        // template's prefix and suffix.
        let single = tok.build_pictures(None, &[PictureLayout::single(n)]).expect("single");
        assert_eq!(single, tok.build_images(None, &[n]).expect("images"));
        assert_eq!(single, plain.build_images(None, &[n]).expect("images"));
        let zero = PictureLayout {
            rows: 2,
            cols: 2,
            tokens_per_tile: 0,
        };
        assert!(matches!(
            tok.build_pictures(None, &[zero]),
            Err(PromptError::ZeroImageTokens)
        ));
    }

    fn tiny_template() -> ChatTemplate {
        let m = json(&repo("models/tiny/manifest.json"));
        serde_json::from_value(m["chat_template"].clone()).expect("chat_template")
    }

    fn tiny(template: ChatTemplate, bos: Option<u32>, add_bos: bool) -> Result<PromptTokenizer, PromptError> {
        PromptTokenizer::from_file(&repo("models/tiny/tokenizer.json"), template, bos, add_bos)
    }

    fn rows_of(turns: &[ChatTurn<'_>], rows: usize) -> Vec<PictureLayout> {
        vec![PictureLayout::single(rows); turns.iter().map(|turn| turn.images).sum()]
    }

    /// Each picture its own token count (a dynamic-resolution model's
    /// pictures differ), and one count per picture.
    #[test]
    fn chat_pictures_take_their_own_token_counts() {
        let tok = tiny(tiny_template(), Some(1), false).expect("tok");
        let turn = [ChatTurn {
            role: ChatRole::User,
            text: "Two",
            images: 2,
        }];
        let single = PictureLayout::single;
        let chat = tok.build_chat(None, &turn, &[single(2), single(4)]).expect("chat");
        assert_eq!(chat, tok.build_images(Some("Two"), &[2, 4]).expect("one shot"));
        assert_eq!(chat.image_tokens(), 6);
        assert!(
            tok.build_chat(None, &turn, &[single(2)]).is_err(),
            "one layout for two pictures"
        );
        assert!(
            tok.build_chat(None, &turn, &[single(2), single(0)]).is_err(),
            "a picture of no tokens"
        );
    }

    #[test]
    fn a_chat_of_one_user_turn_is_the_one_shot_prompt_and_turns_follow_the_template() {
        let tok = tiny(tiny_template(), Some(1), false).expect("tok");
        let user = |text, images| ChatTurn {
            role: ChatRole::User,
            text,
            images,
        };
        for (text, images) in [("Hi", 0), ("What is this?", 1), ("", 1), ("Two", 2)] {
            let chat = tok
                .build_chat(None, &[user(text, images)], &vec![PictureLayout::single(5); images])
                .expect("chat");
            let user_text = (!text.is_empty()).then_some(text);
            let one_shot = tok.build_images(user_text, &vec![5; images]).expect("one shot");
            assert_eq!(chat, one_shot, "{text:?} with {images} pictures");
        }
        // Two user turns around an assistant's: each turn ends with the
        // template's turn end; the pictures are numbered across turns.
        let turns = [
            user("First", 1),
            ChatTurn {
                role: ChatRole::Assistant,
                text: "An answer",
                images: 0,
            },
            user("Second", 1),
        ];
        let chat = tok
            .build_chat(Some("Be brief."), &turns, &rows_of(&turns, 3))
            .expect("chat");
        assert_eq!(chat.image_tokens(), 6);
        let pictures: Vec<_> = chat.kinds.iter().filter(|k| k.is_image()).collect();
        assert_ne!(pictures[0], pictures[3], "the second picture has its own index");
        let t = tok.template();
        let text_only = tok
            .build_chat(Some("Be brief."), &[user("First", 0), turns[1], user("Second", 0)], &[])
            .expect("text only");
        let whole = [
            t.system_prefix.as_str(),
            "Be brief.",
            &t.system_suffix,
            &t.user_prefix,
            "First",
            &t.user_suffix,
            &t.assistant_prefix,
            "An answer",
            &t.user_suffix,
            &t.user_prefix,
            "Second",
            &t.user_suffix,
            &t.assistant_prefix,
        ]
        .concat();
        assert_eq!(text_only.ids, tok.encode(&whole).expect("encode"));
        let user_ids: Vec<u32> = text_only
            .ids
            .iter()
            .zip(&text_only.kinds)
            .filter(|(_, k)| k.is_user())
            .map(|(&i, _)| i)
            .collect();
        let user_text = tok.decode(&user_ids).expect("decode");
        for part in ["Be brief.", "First", "An answer", "Second"] {
            assert!(user_text.contains(part), "{user_text:?} lacks {part:?}");
        }
        let bad = [ChatTurn {
            role: ChatRole::Assistant,
            text: "x",
            images: 1,
        }];
        assert!(tok.build_chat(None, &bad, &rows_of(&bad, 3)).is_err());
    }

    #[test]
    fn prompt_shapes_and_errors() {
        let tok = tiny(tiny_template(), Some(1), false).expect("tok");
        // Text only: one piece, no image prefix/suffix.
        let p = tok.build(Some("Hi"), None).expect("text only");
        assert_eq!(p.image_tokens(), 0);
        let t = tok.template();
        let whole = [
            t.system_prefix.as_str(),
            &t.system_prompt,
            &t.system_suffix,
            &t.user_prefix,
            "Hi",
            &t.user_suffix,
            &t.assistant_prefix,
        ]
        .concat();
        assert_eq!(p.ids, tok.encode(&whole).expect("encode"));
        // The user's text is `user`, the rest template.
        let user_ids: Vec<u32> = p
            .ids
            .iter()
            .zip(&p.kinds)
            .filter(|(_, k)| k.is_user())
            .map(|(&i, _)| i)
            .collect();
        assert_eq!(tok.decode(&user_ids).expect("decode").trim(), "Hi");
        // With an image: the pieces are tokenized separately.
        let p = tok.build(None, Some(5)).expect("image");
        assert_eq!(p.image_tokens(), 5);
        let first_image = p.kinds.iter().position(|k| k.is_image()).expect("image rows");
        let before = &p.ids[..first_image];
        let after = &p.ids[first_image..];
        assert_eq!(p.len(), before.len() + 5 + after.len());
        assert_eq!(p.kinds[first_image + 4], TokenKind::image(0, 4));
        let tail = [
            t.image_suffix.as_str(),
            &t.default_user_prompt,
            &t.user_suffix,
            &t.assistant_prefix,
        ]
        .concat();
        assert_eq!(after, tok.encode(&tail).expect("encode"));
        let text_kinds = p.kinds.iter().filter(|k| !k.is_image());
        let user_ids: Vec<u32> = p
            .ids
            .iter()
            .zip(text_kinds)
            .filter(|(_, k)| k.is_user())
            .map(|(&i, _)| i)
            .collect();
        assert_eq!(
            tok.decode(&user_ids).expect("decode").trim(),
            t.default_user_prompt.trim()
        );
        // Two pictures: each between its prefix and suffix, then the text.
        let two = tok.build_images(Some("Which one?"), &[3, 2]).expect("two images");
        let letters: String = two.kinds.iter().map(|k| k.letter()).collect();
        assert_eq!(letters.matches('i').count(), 5);
        assert_eq!(two.kinds.iter().filter(|k| **k == TokenKind::image(1, 1)).count(), 1);
        assert!(letters.find("iii").expect("first") < letters.rfind("ii").expect("second"));
        assert!(letters.rfind('i') < letters.find('u'), "{letters}");

        for empty in ["", "   ", "\n\t "] {
            let e = tok.build(Some(empty), Some(4)).expect_err("empty");
            assert!(
                matches!(e, PromptError::EmptyPrompt { .. }) && e.to_string().starts_with("empty prompt"),
                "{e}"
            );
        }
        assert!(matches!(tok.build(None, Some(0)), Err(PromptError::ZeroImageTokens)));

        // add_bos puts the BOS id first; without a valid id it is an error.
        let with_bos = tiny(tiny_template(), Some(1), true).expect("bos");
        let p2 = with_bos.build(None, Some(5)).expect("bos prompt");
        assert_eq!(p2.ids[0], 1);
        assert_eq!(&p2.ids[1..], &p.ids[..]);
        assert_eq!(p2.kinds[0], TokenKind::TEMPLATE);
        assert!(matches!(
            tiny(tiny_template(), None, true),
            Err(PromptError::Bos { bos: None, .. })
        ));
        assert!(matches!(
            tiny(tiny_template(), Some(1_000_000), true),
            Err(PromptError::Bos { .. })
        ));
    }

    #[test]
    fn template_and_tokenizer_errors() {
        let mut t = tiny_template();
        t.image_position = "user_after_text".into();
        let e = tiny(t, None, false).expect_err("image_position");
        assert!(
            e.to_string().contains("unknown image_position \"user_after_text\""),
            "{e}"
        );
        let mut t = tiny_template();
        t.tokenize_pieces_separately = false;
        assert!(matches!(tiny(t, None, false), Err(PromptError::Template(_))));

        let mut v = serde_json::to_value(json(&repo("models/tiny/manifest.json"))["chat_template"].clone()).expect("v");
        v["extra_field"] = Value::from("x");
        assert!(
            serde_json::from_value::<ChatTemplate>(v).is_err(),
            "unknown template fields are refused"
        );

        let e = PromptTokenizer::from_file(Path::new("/nonexistent/tokenizer.json"), tiny_template(), None, false)
            .expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/tokenizer.json"), "{e}");
        let e = PromptTokenizer::from_bytes(b"{not json", tiny_template(), None, false).expect_err("bad json");
        assert!(matches!(e, PromptError::TokenizerLoad { .. }), "{e}");

        let tok = tiny(tiny_template(), None, false).expect("tok");
        let vocab = tok.vocab_size() as u32;
        assert!(matches!(tok.decode(&[5, vocab]), Err(PromptError::UnknownToken { .. })));
        assert!(matches!(
            tok.decoder().push(vocab + 7),
            Err(PromptError::UnknownToken { .. })
        ));
    }

    /// A SentencePiece-style tokenizer as Llama's (and LLaVA-1.5's)
    /// `tokenizer.json` has it: `▁` for spaces, byte-fallback tokens, a
    /// decoder that strips the first space. Only decoding is exercised.
    fn sentencepiece_style() -> PromptTokenizer {
        let mut vocab = serde_json::Map::new();
        for (i, token) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(token.to_string(), i.into());
        }
        for byte in 0..=255u32 {
            vocab.insert(format!("<0x{byte:02X}>"), (3 + byte).into());
        }
        for (i, token) in ["▁", "▁Hello", "▁w", "ö", "rld", ".", "▁again", "!"].iter().enumerate() {
            vocab.insert(token.to_string(), (259 + i).into());
        }
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                "byte_fallback": true, "vocab": vocab, "merges": []}
        });
        PromptTokenizer::from_bytes(json.to_string().as_bytes(), tiny_template(), Some(1), true).expect("tokenizer")
    }

    #[test]
    fn stream_decoding_equals_decoding_for_a_sentencepiece_tokenizer() {
        let tok = sentencepiece_style();
        let (hello, w, o_umlaut, rld, dot, again, bang, space) = (260, 261, 262, 263, 264, 265, 266, 259);
        // '€' is E2 82 AC, '🙂' is F0 9F 99 82: byte-fallback ids are 3 + byte.
        let euro = [3 + 0xE2, 3 + 0x82, 3 + 0xAC];
        let smile = [3 + 0xF0, 3 + 0x9F, 3 + 0x99, 3 + 0x82];
        let mut cases: Vec<Vec<u32>> = vec![
            vec![hello, w, o_umlaut, rld, dot],
            vec![1, hello, 2, again, bang],
            vec![space, euro[0], euro[1], euro[2], again],
            [&[hello, space][..], &smile, &smile, &[dot]].concat(),
            // A character that never completes, at the end and in the middle.
            vec![hello, euro[0], euro[1]],
            vec![hello, euro[0], again, bang],
            // A broken model: more lone continuation bytes than are held back.
            [vec![hello], vec![3 + 0x82; MAX_PENDING_TOKENS + 3], vec![again]].concat(),
        ];
        cases.push(cases.concat());
        for ids in &cases {
            let full = tok.decode(ids).expect("decode");
            assert_eq!(streamed(&tok, ids), full, "{ids:?}");
        }
        assert_eq!(streamed(&tok, &cases[0]), "Hello wörld.");
        // The decoder strips the first space of the text.
        assert_eq!(streamed(&tok, &cases[2]), "€ again");
    }

    #[test]
    fn stream_decoding_handles_split_characters() {
        let tok = tiny(tiny_template(), None, false).expect("tok");
        // Byte-level tokens for multi-byte characters, split across ids.
        for text in ["héllo wörld €5 — 日本語 🙂!", "a🙂", "🙂", " x\u{7f}y"] {
            let ids = tok.encode(text).expect("encode");
            assert_eq!(tok.decode(&ids).expect("decode"), text);
            // Fed one id at a time, nothing ending in a broken character is emitted early.
            let mut d = tok.decoder();
            let mut s = String::new();
            for &id in &ids {
                let piece = d.push(id).expect("push");
                assert!(!piece.contains('\u{FFFD}'), "{text:?}: premature {piece:?}");
                s.push_str(piece);
            }
            s.push_str(d.finish().expect("finish"));
            assert_eq!(s, text);
        }
        // Special tokens vanish; a dangling lead byte comes out at finish as U+FFFD.
        let mut ids = tok.encode("<|im_start|>ok<|im_end|>").expect("encode");
        assert_eq!(streamed(&tok, &ids), "ok");
        let euro = tok.encode("€").expect("euro");
        if euro.len() > 1 {
            ids.push(euro[0]);
            assert_eq!(streamed(&tok, &ids), "ok\u{FFFD}");
        }
        // A decoder can be reused after finish.
        let mut d = tok.decoder();
        let _ = d.push(ids[1]).expect("push");
        let _ = d.finish().expect("finish");
        let mut s = String::new();
        for &id in &tok.encode("again").expect("encode") {
            s.push_str(d.push(id).expect("push"));
        }
        s.push_str(d.finish().expect("finish"));
        assert_eq!(s, "again");
    }
}
