//! `manifest.json`: what a model folder holds (docs/model-format.md), checked
//! before anything is loaded: every dimension, the graphs' input and output
//! names, dtypes and shapes against the graph contract, and each file's
//! size and sha256.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::kv::{KvDtype, KvLayout, KvShape};
use crate::model::image::split::SplitSpec;
use crate::model::image::{Preprocess, MAX_PIXELS_LIMIT, MAX_TARGET_SIDE};
use crate::model::prompt::ChatTemplate;

/// The manifest format this build reads.
pub const FORMAT: &str = "elastic-edge-model";
/// The newest format this build reads; 1 (format-1 decoder) is read too.
pub const FORMAT_VERSION: u32 = 2;

/// How the decoder graph holds the KV cache (docs/model-format.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecoderFormat {
    /// Format 1: the past is read from the pool as `[1, S, kv_heads,
    /// head_dim]`, the new rows come out as separate outputs written into the
    /// pool's next slots; attention in plain ONNX ops.
    PastAndNew,
    /// Format 2: each layer's pool block `[1, kv_heads, capacity, head_dim]`
    /// is both past and present of GroupQueryAttention, which appends in place.
    InPlace,
}

impl DecoderFormat {
    /// The oldest ONNX Runtime (minor version of 1.x) that runs this format:
    /// GroupQueryAttention takes `attention_bias` and `position_ids` from
    /// 1.22, and gives its probabilities (`qk_output`) on the CPU from 1.23.
    pub const fn min_onnxruntime_minor(self, scores: bool) -> u32 {
        match (self, scores) {
            (DecoderFormat::PastAndNew, _) => 20,
            (DecoderFormat::InPlace, false) => 22,
            (DecoderFormat::InPlace, true) => 23,
        }
    }
}

/// The largest `manifest.json` read (the demo model's is 30 KB).
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// Upper bounds on the manifest's dimensions: far above any model this
/// runs (SmolLM2-135M: 30 layers, 9 heads, 3 KV heads of 64, 576 hidden,
/// 49152 tokens, 8192 positions), low enough that no size computed from
/// them overflows or asks for absurd memory.
pub const MAX_LAYERS: usize = 1024;
pub const MAX_HEADS: usize = 1024;
pub const MAX_HEAD_DIM: usize = 4096;
pub const MAX_HIDDEN: usize = 1 << 16;
pub const MAX_VOCAB: usize = 1 << 24;
pub const MAX_POSITIONS: usize = 1 << 22;
pub const MAX_IMAGE_TOKENS: usize = 1 << 16;

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub architecture: String,
    /// The decoder's float type: `float32` or `float16`.
    pub dtype: String,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub rope_theta: f64,
    /// Multimodal RoPE (Qwen2-VL, Qwen2.5-VL): how many of a head's
    /// `head_dim / 2` rotary frequencies turn with the token's time, height
    /// and width position. `position_ids` is then `[3, T]`
    /// ([`crate::model::mrope`]); absent for plain RoPE (`[1, T]`).
    #[serde(default)]
    pub mrope_section: Option<[usize; 3]>,
    pub max_positions: usize,
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub add_bos: bool,
    pub eos_token_id: Option<u32>,
    pub stop_token_ids: Vec<u32>,
    pub vision: Option<VisionSpec>,
    pub chat_template: ChatTemplate,
    pub embed_tokens: EmbedSpec,
    pub files: ModelFiles,
    pub file_hashes: BTreeMap<String, FileHash>,
    pub graphs: Graphs,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionSpec {
    /// Size, resize, rescale, mean and std of `pixel_values`.
    #[serde(flatten)]
    pub preprocess: Preprocess,
    pub input_dtype: String,
    pub image_tokens: usize,
    /// Idefics3 / SmolVLM image splitting: the graph takes a batch of tiles
    /// (`image_tokens` rows each); absent: one picture per run.
    #[serde(default)]
    pub split: Option<SplitSpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EmbedSpec {
    pub file: String,
    pub dtype: String,
    pub shape: [usize; 2],
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelFiles {
    pub decoder: String,
    /// The decoder graph without attention sums, over the same weights as
    /// `decoder` (format 2 with scores): what steps whose policy scores
    /// nothing run (docs/model-format.md, "The fast graph").
    pub decoder_fast: Option<String>,
    /// The weights `decoder` and `decoder_fast` share ([`super::weights`]).
    pub decoder_weights: Option<String>,
    pub embed_tokens: String,
    pub tokenizer: String,
    pub vision: Option<String>,
}

/// What [`Manifest::verify_files`] checked: every file's size, and the
/// sha256 of `hashed` of them; `trusted` were not hashed because
/// `.verified` recorded the same size and modification time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileCheck {
    pub hashed: usize,
    pub trusted: usize,
}

impl std::fmt::Display for FileCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files = self.hashed + self.trusted;
        match self.trusted {
            0 => write!(f, "sizes and sha256 of all {files} files, hashed now"),
            trusted => write!(
                f,
                "sizes of all {files} files; sha256 of {} hashed now, {trusted} trusted from .verified \
                 (same size and modification time as when last hashed)",
                self.hashed
            ),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct FileHash {
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Graphs {
    pub decoder: GraphIo,
    pub vision: Option<GraphIo>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GraphIo {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    /// Fixed sizes as numbers, dynamic ones as names (`"S"`, `"T"`).
    pub shape: Vec<serde_json::Value>,
}

fn invalid(path: &Path, field: &str, why: impl std::fmt::Display) -> Error {
    Error::Manifest {
        path: path.to_path_buf(),
        field: field.to_string(),
        reason: why.to_string(),
    }
}

impl Manifest {
    /// Reads and checks `dir/manifest.json`; file hashes are checked by
    /// [`Manifest::verify_files`].
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text =
            crate::regular_file::read_to_string(&path, MAX_MANIFEST_BYTES).map_err(|source| Error::ModelMissing {
                dir: dir.to_path_buf(),
                reason: format!("cannot read {}: {source}", path.display()),
            })?;
        Self::parse(&text, &path)
    }

    /// Parses and checks a manifest's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let manifest: Manifest =
            serde_json::from_str(text).map_err(|e| invalid(path, "(json)", crate::error::one_line(&e.to_string())))?;
        manifest.validate(path)?;
        Ok(manifest)
    }

    /// The bytes of every file the manifest lists (saturating).
    pub fn files_bytes(&self) -> u64 {
        self.file_hashes.values().fold(0, |sum, f| sum.saturating_add(f.bytes))
    }

    /// The KV geometry the decoder graph reads and writes.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            dtype: self.kv_dtype(),
            layout: match self.decoder_format() {
                DecoderFormat::PastAndNew => KvLayout::SlotMajor,
                DecoderFormat::InPlace => KvLayout::HeadMajor,
            },
        }
    }

    /// The decoder graph's format (checked in `validate`).
    pub fn decoder_format(&self) -> DecoderFormat {
        if self.format_version == 1 {
            DecoderFormat::PastAndNew
        } else {
            DecoderFormat::InPlace
        }
    }

    /// Whether the decoder graph gives the attention column sums the
    /// H2O and Elastic Cache policies read (format 1 always does; a format-2
    /// graph exported for CUDA does not, as CUDA's GroupQueryAttention has
    /// no probability output).
    pub fn decoder_scores(&self) -> bool {
        self.graphs
            .decoder
            .outputs
            .iter()
            .any(|output| output.name == "attn_colsum_0")
    }

    /// The fast graph's inputs and outputs: the decoder's, less the
    /// attention sums.
    pub fn fast_graph_io(&self) -> GraphIo {
        let mut io = self.graphs.decoder.clone();
        io.outputs.retain(|output| !output.name.starts_with("attn_colsum_"));
        io
    }

    pub fn kv_dtype(&self) -> KvDtype {
        // Checked in `validate`.
        if self.dtype == "float16" {
            KvDtype::F16
        } else {
            KvDtype::F32
        }
    }

    /// The splitting settings of a model whose pictures are cut into tiles.
    pub fn split(&self) -> Option<&SplitSpec> {
        self.vision.as_ref().and_then(|v| v.split.as_ref())
    }

    /// Image preprocessing, for models with a vision graph.
    pub fn preprocess(&self) -> Option<Preprocess> {
        self.vision.as_ref().map(|v| v.preprocess.clone())
    }

    fn validate(&self, path: &Path) -> Result<()> {
        if self.format != FORMAT {
            return Err(invalid(
                path,
                "format",
                format!("{:?}, expected {FORMAT:?}", self.format),
            ));
        }
        if !(1..=FORMAT_VERSION).contains(&self.format_version) {
            return Err(invalid(
                path,
                "format_version",
                format!(
                    "{} is not supported (this build reads 1 to {FORMAT_VERSION})",
                    self.format_version
                ),
            ));
        }
        if !matches!(self.dtype.as_str(), "float32" | "float16") {
            return Err(invalid(
                path,
                "dtype",
                format!("{:?}, expected float32 or float16", self.dtype),
            ));
        }
        if self.embed_tokens.dtype != self.dtype {
            return Err(invalid(path, "embed_tokens.dtype", "differs from the decoder's dtype"));
        }
        for (field, value, max) in [
            ("layers", self.layers, MAX_LAYERS),
            ("heads", self.heads, MAX_HEADS),
            ("kv_heads", self.kv_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            ("hidden", self.hidden, MAX_HIDDEN),
            ("vocab", self.vocab, MAX_VOCAB),
            ("max_positions", self.max_positions, MAX_POSITIONS),
        ] {
            if value == 0 {
                return Err(invalid(path, field, "must be positive"));
            }
            if value > max {
                return Err(invalid(
                    path,
                    field,
                    format!("{value} is more than the {max} this build accepts"),
                ));
            }
        }
        if self.max_positions < 2 {
            return Err(invalid(
                path,
                "max_positions",
                "must hold a prompt and an answer (at least 2)",
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(invalid(
                path,
                "rope_theta",
                format!("{} must be positive and finite", self.rope_theta),
            ));
        }
        self.kv_shape()
            .validate()
            .map_err(|e| invalid(path, "head_dim", e.to_string()))?;
        self.validate_file_names(path)?;
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(invalid(path, "kv_heads", "must divide heads"));
        }
        if self.embed_tokens.shape != [self.vocab, self.hidden] {
            return Err(invalid(
                path,
                "embed_tokens.shape",
                format!(
                    "{:?}, expected [vocab, hidden] = [{}, {}]",
                    self.embed_tokens.shape, self.vocab, self.hidden
                ),
            ));
        }
        for (field, id) in [("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id)] {
            if let Some(id) = id.filter(|&id| id as usize >= self.vocab) {
                return Err(invalid(path, field, format!("{id} is outside the vocabulary")));
            }
        }
        if let Some(&bad) = self.stop_token_ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(invalid(
                path,
                "stop_token_ids",
                format!("{bad} is outside the vocabulary"),
            ));
        }
        match (&self.vision, &self.files.vision, &self.graphs.vision) {
            (None, None, None) => {}
            (Some(vision), Some(_), Some(graph)) => {
                let pre = &vision.preprocess;
                for (field, side) in [("vision.width", pre.width), ("vision.height", pre.height)] {
                    if side == 0 || side > MAX_TARGET_SIDE {
                        return Err(invalid(path, field, format!("{side} is outside 1..={MAX_TARGET_SIDE}")));
                    }
                }
                if pre.max_pixels == 0 || pre.max_pixels > MAX_PIXELS_LIMIT {
                    return Err(invalid(
                        path,
                        "vision.max_pixels",
                        format!("{} is outside 1..={MAX_PIXELS_LIMIT}", pre.max_pixels),
                    ));
                }
                pre.validate().map_err(|e| invalid(path, "vision", e))?;
                if let Some(spec) = &pre.dynamic {
                    if vision.image_tokens != spec.max_tokens() {
                        return Err(invalid(
                            path,
                            "vision.image_tokens",
                            format!(
                                "{} differs from the most tokens the pixel budget gives ({}: max_pixels / \
                                 (patch_size x merge_size)^2)",
                                vision.image_tokens,
                                spec.max_tokens()
                            ),
                        ));
                    }
                }
                if vision.image_tokens == 0 || vision.image_tokens > MAX_IMAGE_TOKENS.min(self.max_positions - 1) {
                    return Err(invalid(
                        path,
                        "vision.image_tokens",
                        format!(
                            "{} is outside 1..={} (and must leave room in max_positions)",
                            vision.image_tokens, MAX_IMAGE_TOKENS
                        ),
                    ));
                }
                if vision.input_dtype != "float32" {
                    return Err(invalid(
                        path,
                        "vision.input_dtype",
                        "only float32 pixel values are supported",
                    ));
                }
                // A split model's graph takes any number of tiles at once.
                let batch = || match vision.split {
                    Some(_) => Dim::Any,
                    None => Dim::Fixed(1),
                };
                if let Some(split) = &vision.split {
                    if pre.dynamic.is_some() {
                        return Err(invalid(
                            path,
                            "vision.split",
                            "a model has vision.split or vision.dynamic, not both",
                        ));
                    }
                    self.validate_split(path, vision, split)?;
                }
                let vision_in = |name: &str, dtype: &str, dims: &[Dim]| {
                    expect_tensor(path, "graphs.vision.inputs", &graph.inputs, name, dtype, dims)
                };
                let tokens = match &pre.dynamic {
                    None => {
                        vision_in(
                            "pixel_values",
                            "float32",
                            &[
                                batch(),
                                Dim::Fixed(3),
                                Dim::Fixed(pre.height as usize),
                                Dim::Fixed(pre.width as usize),
                            ],
                        )?;
                        Dim::Fixed(vision.image_tokens)
                    }
                    // One picture a run, its grid its own (docs/model-format.md).
                    Some(spec) => {
                        vision_in("pixel_values", "float32", &[Dim::Any, Dim::Fixed(spec.patch_len())])?;
                        vision_in("patch_positions", "int64", &[Dim::Any, Dim::Fixed(2)])?;
                        for name in ["window_index", "window_reverse", "window_ids"] {
                            vision_in(name, "int64", &[Dim::Any])?;
                        }
                        Dim::Any
                    }
                };
                expect_tensor(
                    path,
                    "graphs.vision.outputs",
                    &graph.outputs,
                    "image_embeds",
                    &self.dtype,
                    &[batch(), tokens, Dim::Fixed(self.hidden)],
                )?;
            }
            _ => {
                return Err(invalid(
                    path,
                    "vision",
                    "vision, files.vision and graphs.vision must come together",
                ))
            }
        }
        self.validate_decoder(path)
    }

    /// `vision.split`: tiles of the graph's input size, and a picture's
    /// tiles all in the prompt with room to spare.
    fn validate_split(&self, path: &Path, vision: &VisionSpec, split: &SplitSpec) -> Result<()> {
        split
            .validate(&vision.preprocess)
            .map_err(|e| invalid(path, "vision.split", e))?;
        let most = (split.max_frames() as usize).saturating_mul(vision.image_tokens);
        let limit = crate::kv::TokenKind::MAX_CELLS.min(self.max_positions - 1);
        if most > limit {
            return Err(invalid(
                path,
                "vision.split",
                format!(
                    "a picture can take {} frames of {} tokens = {most}, more than the {limit} a picture may have",
                    split.max_frames(),
                    vision.image_tokens
                ),
            ));
        }
        if !split.tokens.row_col.contains("{r}") || !split.tokens.row_col.contains("{c}") {
            return Err(invalid(
                path,
                "vision.split.tokens.row_col",
                format!("{:?} must contain {{r}} and {{c}}", split.tokens.row_col),
            ));
        }
        Ok(())
    }

    /// Every file the manifest names must be inside the model folder: a
    /// relative path without `..` (`../../etc/passwd` or an absolute path
    /// would be opened, hashed and reported on).
    fn validate_file_names(&self, path: &Path) -> Result<()> {
        let mut names: Vec<(String, &str)> = vec![
            ("files.decoder".into(), &self.files.decoder),
            ("files.embed_tokens".into(), &self.files.embed_tokens),
            ("files.tokenizer".into(), &self.files.tokenizer),
            ("embed_tokens.file".into(), &self.embed_tokens.file),
        ];
        if let Some(vision) = &self.files.vision {
            names.push(("files.vision".into(), vision));
        }
        if let Some(fast) = &self.files.decoder_fast {
            names.push(("files.decoder_fast".into(), fast));
        }
        if let Some(weights) = &self.files.decoder_weights {
            names.push(("files.decoder_weights".into(), weights));
        }
        names.extend(
            self.file_hashes
                .keys()
                .map(|k| (format!("file_hashes.{k}"), k.as_str())),
        );
        for (field, name) in names {
            if let Some(reason) = outside_the_folder(name) {
                return Err(invalid(path, &field, format!("{name:?} {reason}")));
            }
        }
        Ok(())
    }

    /// The decoder graph must follow its format's contract
    /// (docs/model-format.md) exactly.
    fn validate_decoder(&self, path: &Path) -> Result<()> {
        match (&self.files.decoder_fast, &self.files.decoder_weights) {
            (None, None) => {}
            (Some(_), Some(_)) => {
                if self.decoder_format() != DecoderFormat::InPlace || !self.decoder_scores() {
                    return Err(invalid(
                        path,
                        "files.decoder_fast",
                        "a fast graph goes with a format-2 decoder that outputs attention sums",
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    path,
                    "files.decoder_fast",
                    "decoder_fast and decoder_weights come together (the two graphs share the weights)",
                ))
            }
        }
        let graph = &self.graphs.decoder;
        let (inputs, outputs) = (&graph.inputs, &graph.outputs);
        let dt = self.dtype.as_str();
        let field_in = "graphs.decoder.inputs";
        let field_out = "graphs.decoder.outputs";
        let format = self.decoder_format();
        let tensor_in =
            |name: &str, dtype: &str, dims: &[Dim]| expect_tensor(path, field_in, inputs, name, dtype, dims);
        let tensor_out =
            |name: &str, dtype: &str, dims: &[Dim]| expect_tensor(path, field_out, outputs, name, dtype, dims);
        tensor_in("inputs_embeds", dt, &[Dim::Fixed(1), Dim::Any, Dim::Fixed(self.hidden)])?;
        let rows = match self.mrope_section {
            None => 1,
            Some(sections) => {
                // Checked: a manifest's numbers may be anything.
                let sum = sections.iter().try_fold(0usize, |sum, &s| sum.checked_add(s));
                if sum != Some(self.head_dim / 2) || format != DecoderFormat::InPlace {
                    return Err(invalid(
                        path,
                        "mrope_section",
                        format!(
                            "{sections:?} must sum to head_dim / 2 = {}, in a format-2 decoder",
                            self.head_dim / 2
                        ),
                    ));
                }
                3
            }
        };
        tensor_in("position_ids", "int64", &[Dim::Fixed(rows), Dim::Any])?;
        tensor_out("logits", "float32", &[Dim::Fixed(1), Dim::Fixed(self.vocab)])?;
        let (kv, new_names, bias, extra_inputs) = match format {
            DecoderFormat::PastAndNew => (
                [
                    Dim::Fixed(1),
                    Dim::Any,
                    Dim::Fixed(self.kv_heads),
                    Dim::Fixed(self.head_dim),
                ],
                ["new_key_", "new_value_"],
                "past_bias",
                0,
            ),
            DecoderFormat::InPlace => {
                tensor_in("seqlens_k", "int32", &[Dim::Fixed(1)])?;
                tensor_in("total_sequence_length", "int32", &[])?;
                (
                    [
                        Dim::Fixed(1),
                        Dim::Fixed(self.kv_heads),
                        Dim::Any,
                        Dim::Fixed(self.head_dim),
                    ],
                    ["present_key_", "present_value_"],
                    "attention_bias",
                    2,
                )
            }
        };
        // One row per layer: each layer merges its own entries.
        tensor_in(bias, dt, &[Dim::Fixed(self.layers), Dim::Any])?;
        // Format 1 always gives the column sums; format 2 for every layer or none.
        let scores = format == DecoderFormat::PastAndNew || self.decoder_scores();
        for layer in 0..self.layers {
            for name in [format!("past_key_{layer}"), format!("past_value_{layer}")] {
                tensor_in(&name, dt, &kv)?;
            }
            for prefix in new_names {
                tensor_out(&format!("{prefix}{layer}"), dt, &kv)?;
            }
            if scores {
                tensor_out(&format!("attn_colsum_{layer}"), "float32", &[Dim::Fixed(1), Dim::Any])?;
            }
        }
        let expected_inputs = 3 + extra_inputs + 2 * self.layers;
        if inputs.len() != expected_inputs {
            return Err(invalid(
                path,
                field_in,
                format!("{} inputs, the contract has {expected_inputs}", inputs.len()),
            ));
        }
        Ok(())
    }

    /// Checks every file the manifest lists: present, of the listed size,
    /// and of the listed sha256. Hashing a large model takes a second or two,
    /// so a file whose size and modification time match a previous
    /// successful check (recorded in `.verified` beside it, when the folder
    /// is writable) is not hashed again: a file that changes in place
    /// without either changing is only caught by
    /// [`Manifest::verify_files_fully`]. Returns what was checked.
    pub fn verify_files(&self, dir: &Path) -> Result<FileCheck> {
        self.verify(dir, false)
    }

    /// As [`Manifest::verify_files`], but every file is hashed whatever
    /// `.verified` says (`doctor`); a mismatch also drops the stamp, so
    /// the next load hashes again.
    pub fn verify_files_fully(&self, dir: &Path) -> Result<FileCheck> {
        self.verify(dir, true)
    }

    fn verify(&self, dir: &Path, full: bool) -> Result<FileCheck> {
        let stamp_path = dir.join(".verified");
        let stamp = std::fs::read_to_string(&stamp_path).unwrap_or_default();
        let mut new_stamp = String::new();
        let mut check = FileCheck::default();
        let mut required: Vec<&str> = vec![&self.files.decoder, &self.files.embed_tokens, &self.files.tokenizer];
        required.extend(self.files.vision.as_deref());
        required.extend(self.files.decoder_fast.as_deref());
        required.extend(self.files.decoder_weights.as_deref());
        for name in required {
            if !self.file_hashes.contains_key(name) {
                return Err(invalid(
                    &dir.join("manifest.json"),
                    "file_hashes",
                    format!("{name} is not listed"),
                ));
            }
        }
        for (name, expected) in &self.file_hashes {
            let path = dir.join(name);
            // Not a FIFO, a device or a folder: those would block, never
            // end or be misread as a size.
            let meta = crate::regular_file::check(&path).map_err(|e| Error::ModelFile {
                path: path.clone(),
                reason: format!("cannot read: {e}"),
            })?;
            if meta.len() != expected.bytes {
                return Err(Error::ModelFile {
                    path,
                    reason: format!(
                        "{} bytes, the manifest says {} (file_hashes.{name}.bytes)",
                        meta.len(),
                        expected.bytes
                    ),
                });
            }
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let line = format!("{name} {} {modified} {}\n", expected.bytes, expected.sha256);
            if full || !stamp.lines().any(|l| format!("{l}\n") == line) {
                check.hashed += 1;
                let actual = sha256_file(&path)?;
                if !actual.eq_ignore_ascii_case(&expected.sha256) {
                    // Best effort: a stamp that vouched for it is wrong.
                    if !stamp.is_empty() {
                        let _ = std::fs::remove_file(&stamp_path);
                    }
                    return Err(Error::ModelFile {
                        path,
                        reason: format!(
                            "sha256 {actual} differs from the manifest's {} (file_hashes.{name}.sha256); \
                             the file is altered or truncated: rebuild the model",
                            expected.sha256
                        ),
                    });
                }
            } else {
                check.trusted += 1;
            }
            new_stamp.push_str(&line);
        }
        if new_stamp != stamp {
            // Best effort: a read-only model folder is hashed every time.
            let _ = std::fs::write(&stamp_path, new_stamp);
        }
        Ok(check)
    }
}

/// Why a file name from the manifest is not a path inside the model
/// folder, if it is not.
fn outside_the_folder(name: &str) -> Option<&'static str> {
    use std::path::Component;
    if name.is_empty() {
        return Some("is empty");
    }
    for component in Path::new(name).components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Some("points outside the model folder (..): name a file inside it"),
            Component::RootDir | Component::Prefix(_) => {
                return Some("is an absolute path: name a file inside the model folder")
            }
        }
    }
    if Path::new(name).components().all(|c| c == Component::CurDir) {
        return Some("names the model folder itself, not a file");
    }
    None
}

enum Dim {
    Fixed(usize),
    Any,
}

fn expect_tensor(path: &Path, field: &str, list: &[TensorSpec], name: &str, dtype: &str, dims: &[Dim]) -> Result<()> {
    let spec = list
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| invalid(path, field, format!("no tensor named {name:?}")))?;
    if spec.dtype != dtype {
        return Err(invalid(
            path,
            field,
            format!("{name} is {}, expected {dtype}", spec.dtype),
        ));
    }
    let fits = spec.shape.len() == dims.len()
        && spec.shape.iter().zip(dims).all(|(got, want)| match want {
            Dim::Any => true,
            Dim::Fixed(n) => got.as_u64() == Some(*n as u64),
        });
    if !fits {
        let want: Vec<String> = dims
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => n.to_string(),
                Dim::Any => "?".into(),
            })
            .collect();
        return Err(invalid(
            path,
            field,
            format!("{name} has shape {:?}, expected [{}]", spec.shape, want.join(", ")),
        ));
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    let (mut file, _) = crate::regular_file::open(path).map_err(|e| Error::ModelFile {
        path: path.to_path_buf(),
        reason: format!("cannot open: {e}"),
    })?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| Error::ModelFile {
            path: path.to_path_buf(),
            reason: format!("cannot read: {e}"),
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
