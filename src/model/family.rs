//! What a Hugging Face checkpoint costs before it is exported: its
//! decoder's KV geometry and what one picture becomes in LLM tokens, read
//! from the checkpoint's `config.json` and `preprocessor_config.json` (no
//! weights). `doctor --model DIR` prints it for a folder without a
//! `manifest.json`; the picture rules themselves are in
//! [`crate::model::image::sizing`].

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::one_line;
use crate::kv::{KvDtype, KvLayout, KvShape};
use crate::model::image::sizing::{self, Idefics3Params, Idefics3Split, QwenGrid, SizingError};

/// The `architectures` this module sizes, by family.
pub const SUPPORTED_ARCHITECTURES: &[(&str, Family)] = &[
    ("Qwen2_5_VLForConditionalGeneration", Family::Qwen2Vl),
    ("Qwen2VLForConditionalGeneration", Family::Qwen2Vl),
    ("Idefics3ForConditionalGeneration", Family::Idefics3),
    ("SmolVLMForConditionalGeneration", Family::Idefics3),
    ("LlavaForConditionalGeneration", Family::Llava),
];

/// How a family turns a picture into LLM tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Qwen2-VL / Qwen2.5-VL: dynamic resolution (`smart_resize`).
    Qwen2Vl,
    /// Idefics3 / SmolVLM: tiles of the encoder's size plus a global image.
    Idefics3,
    /// LLaVA-1.5: one fixed CLIP grid.
    Llava,
}

impl Family {
    /// The rule's name, for `doctor`.
    pub fn rule(self) -> &'static str {
        match self {
            Family::Qwen2Vl => "Qwen2-VL dynamic resolution",
            Family::Idefics3 => "Idefics3 image splitting",
            Family::Llava => "LLaVA fixed grid",
        }
    }
}

/// A checkpoint whose sizes cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FamilyError {
    #[error("{}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },

    #[error("{}: architectures {found} is not a family doctor can size (supported: {supported})", path.display())]
    Unsupported {
        path: PathBuf,
        found: String,
        supported: String,
    },

    #[error("{}: no field {field} ({what})", path.display())]
    MissingField {
        path: PathBuf,
        field: String,
        what: &'static str,
    },

    #[error("{}: field {field}: {reason}", path.display())]
    BadField {
        path: PathBuf,
        field: String,
        reason: String,
    },

    #[error("{}: {source}", path.display())]
    Sizing { path: PathBuf, source: SizingError },
}

/// The decoder's attention geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderGeometry {
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    /// Whether `head_dim` was in the config (else `hidden / heads`).
    pub head_dim_given: bool,
}

impl DecoderGeometry {
    /// K and V of one token in every layer: `2 * layers * kv_heads * head_dim
    /// * bytes` (saturating; the pool's own metadata is not counted).
    pub fn kv_bytes_per_token(&self, dtype: KvDtype) -> u64 {
        self.shape(dtype).kv_bytes_per_slot()
    }

    /// The pool's geometry for this decoder in `dtype`.
    pub fn shape(&self, dtype: KvDtype) -> KvShape {
        KvShape {
            layers: self.layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            dtype,
            layout: KvLayout::HeadMajor,
        }
    }
}

/// A family's picture rule with the checkpoint's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ImageRule {
    Qwen {
        patch_size: u32,
        merge_size: u32,
        min_pixels: u64,
        max_pixels: u64,
    },
    Idefics3(Idefics3Params),
    Llava {
        image_size: u32,
        patch_size: u32,
        /// `vision_feature_select_strategy` "full": the CLS token is kept.
        keep_cls: bool,
    },
}

/// What one picture becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PictureSizing {
    Qwen(QwenGrid),
    Idefics3(Idefics3Split),
    Llava { side: u32, tokens: u64 },
}

impl PictureSizing {
    /// LLM image tokens the picture costs.
    pub fn tokens(&self) -> u64 {
        match self {
            PictureSizing::Qwen(grid) => grid.tokens,
            PictureSizing::Idefics3(split) => split.tokens,
            PictureSizing::Llava { tokens, .. } => *tokens,
        }
    }
}

/// A checkpoint's sizes: its decoder and its picture rule.
#[derive(Clone, Debug, PartialEq)]
pub struct FamilySizing {
    pub architecture: String,
    pub family: Family,
    pub decoder: DecoderGeometry,
    pub image: ImageRule,
}

/// Qwen2-VL's processor defaults when its config sets no pixel bounds.
const QWEN_DEFAULT_MIN_PIXELS: u64 = 56 * 56;
const QWEN_DEFAULT_MAX_PIXELS: u64 = 28 * 28 * 1280;

impl FamilySizing {
    /// Reads `dir/config.json` and, where the family needs it,
    /// `dir/preprocessor_config.json`.
    pub fn load(dir: &Path) -> Result<Self, FamilyError> {
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        let pre_path = dir.join("preprocessor_config.json");
        let family = family_of(&config, &config_path)?.1;
        let preprocessor = match family {
            // LLaVA's CLIP processor always ends at the encoder's square.
            Family::Llava => Value::Null,
            Family::Qwen2Vl | Family::Idefics3 => read_json(&pre_path)?,
        };
        Self::from_json(&config, &config_path, &preprocessor, &pre_path)
    }

    /// The sizes from the two files' contents (`*_path` name them in errors).
    pub fn from_json(
        config: &Value,
        config_path: &Path,
        preprocessor: &Value,
        preprocessor_path: &Path,
    ) -> Result<Self, FamilyError> {
        let (architecture, family) = family_of(config, config_path)?;
        let cfg = Fields {
            value: config,
            path: config_path,
        };
        let pre = Fields {
            value: preprocessor,
            path: preprocessor_path,
        };
        let decoder = decoder_geometry(&cfg)?;
        let image = match family {
            Family::Qwen2Vl => {
                // The fast processor's rule: min/max_pixels win over size.
                let bound = |key: &str, edge: &str, default: u64| -> Result<u64, FamilyError> {
                    match pre.u64_opt(key)? {
                        Some(v) => Ok(v),
                        None => Ok(pre.u64_opt(&format!("size.{edge}"))?.unwrap_or(default)),
                    }
                };
                ImageRule::Qwen {
                    patch_size: pre.u32_opt("patch_size")?.unwrap_or(14),
                    merge_size: pre.u32_opt("merge_size")?.unwrap_or(2),
                    min_pixels: bound("min_pixels", "shortest_edge", QWEN_DEFAULT_MIN_PIXELS)?,
                    max_pixels: bound("max_pixels", "longest_edge", QWEN_DEFAULT_MAX_PIXELS)?,
                }
            }
            Family::Idefics3 => {
                let image_size = cfg.u32("vision_config.image_size", "the vision encoder's input side")?;
                let patch_size = cfg.u32("vision_config.patch_size", "the vision encoder's patch side")?;
                let scale_factor = cfg.u32("scale_factor", "the connector's pixel shuffle")?;
                let image_seq_len =
                    sizing::idefics3_image_seq_len(image_size, patch_size, scale_factor).map_err(|source| {
                        FamilyError::Sizing {
                            path: config_path.to_path_buf(),
                            source,
                        }
                    })?;
                // transformers' defaults for both booleans are true.
                let do_resize = pre.bool_opt("do_resize")?.unwrap_or(true);
                let longest_edge = if do_resize {
                    Some(pre.u32("size.longest_edge", "the long side pictures are resized to")?)
                } else {
                    None
                };
                ImageRule::Idefics3(Idefics3Params {
                    longest_edge,
                    tile: pre.u32("max_image_size.longest_edge", "the vision encoder's tile side")?,
                    splitting: pre.bool_opt("do_image_splitting")?.unwrap_or(true),
                    image_seq_len,
                })
            }
            Family::Llava => {
                let strategy = match config.get("vision_feature_select_strategy") {
                    None | Some(Value::Null) => "default",
                    Some(Value::String(s)) => s.as_str(),
                    Some(_) => return Err(cfg.bad("vision_feature_select_strategy", "not a string".into())),
                };
                let keep_cls = match strategy {
                    "default" => false,
                    "full" => true,
                    other => {
                        return Err(cfg.bad(
                            "vision_feature_select_strategy",
                            format!("{:?} is neither \"default\" nor \"full\"", one_line(other)),
                        ))
                    }
                };
                ImageRule::Llava {
                    image_size: cfg.u32("vision_config.image_size", "the vision encoder's input side")?,
                    patch_size: cfg.u32("vision_config.patch_size", "the vision encoder's patch side")?,
                    keep_cls,
                }
            }
        };
        Ok(FamilySizing {
            architecture,
            family,
            decoder,
            image,
        })
    }

    /// What a `width x height` picture becomes.
    pub fn picture(&self, width: u32, height: u32) -> Result<PictureSizing, SizingError> {
        Ok(match self.image {
            ImageRule::Qwen {
                patch_size,
                merge_size,
                min_pixels,
                max_pixels,
            } => PictureSizing::Qwen(sizing::qwen_image_grid(
                height, width, patch_size, merge_size, min_pixels, max_pixels,
            )?),
            ImageRule::Idefics3(params) => PictureSizing::Idefics3(sizing::idefics3_split(height, width, &params)?),
            ImageRule::Llava {
                image_size,
                patch_size,
                keep_cls,
            } => {
                if width == 0 || height == 0 {
                    return Err(SizingError::EmptyPicture { width, height });
                }
                PictureSizing::Llava {
                    side: image_size,
                    tokens: sizing::llava_image_tokens(image_size, patch_size, keep_cls)?,
                }
            }
        })
    }
}

/// What one `width x height` picture costs an exported model (its
/// manifest's `vision`): its image tokens, and in words how its resize rule
/// got there.
pub fn exported_picture_cost(
    vision: &crate::model::manifest::VisionSpec,
    width: u32,
    height: u32,
) -> Result<(usize, String), crate::model::image::ImageError> {
    let tokens = vision.image_tokens;
    if let Some(spec) = &vision.preprocess.dynamic {
        let grid = spec.grid(width, height)?;
        let p = spec.patch_size as usize;
        return Ok((
            grid.tokens(),
            format!(
                "smart_resize to {}x{} (within {} to {} pixels), {} x {} tokens",
                grid.cols * p,
                grid.rows * p,
                spec.min_pixels,
                spec.max_pixels,
                grid.token_rows(),
                grid.token_cols()
            ),
        ));
    }
    if let Some(split) = &vision.split {
        let plan = split.plan(width, height)?;
        let how = match plan.rows {
            0 => format!("one {0}x{0} frame", split.tile),
            _ => format!(
                "{} x {} tiles of {} + the global image",
                plan.rows, plan.cols, split.tile
            ),
        };
        return Ok((plan.images as usize * tokens, format!("{how}, {tokens} tokens each")));
    }
    Ok((
        tokens,
        format!("resized to {}x{}", vision.preprocess.width, vision.preprocess.height),
    ))
}

/// What a budget of `slots` buys for pictures of `image_tokens` each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetFit {
    pub slots: u64,
    /// Whole pictures the pool holds at full cache (keep 1).
    pub pictures: u64,
    /// The same when the cache keeps about `keep` of what it processed.
    pub pictures_at_keep: u64,
    /// Slots a prompt of one picture, `text` tokens and `answer` answer
    /// tokens takes at full cache.
    pub prompt_slots: u64,
    /// About `keep` of those.
    pub prompt_slots_at_keep: u64,
}

impl BudgetFit {
    /// `slots` against pictures of `image_tokens`, with a prompt of one
    /// picture, `text` text tokens and `answer` answer tokens, at keep
    /// ratio `keep` (in (0, 1]; Elastic Cache stores about `keep * tokens`).
    pub fn new(slots: u64, image_tokens: u64, keep: f64, text: u64, answer: u64) -> Self {
        // The pool keeps a slot for the first answer token even with none asked.
        let prompt_slots = image_tokens.saturating_add(text).saturating_add(answer.max(1));
        let at_keep = |tokens: u64| (tokens as f64 * keep).ceil() as u64;
        let per_picture_at_keep = at_keep(image_tokens).max(1);
        BudgetFit {
            slots,
            pictures: slots.checked_div(image_tokens).unwrap_or(0),
            pictures_at_keep: slots / per_picture_at_keep,
            prompt_slots,
            prompt_slots_at_keep: at_keep(prompt_slots),
        }
    }

    pub fn fits(&self) -> bool {
        self.prompt_slots <= self.slots
    }

    pub fn fits_at_keep(&self) -> bool {
        self.prompt_slots_at_keep <= self.slots
    }
}

fn read_json(path: &Path) -> Result<Value, FamilyError> {
    let text = std::fs::read_to_string(path).map_err(|e| FamilyError::Read {
        path: path.to_path_buf(),
        reason: format!("cannot read it: {e}"),
    })?;
    serde_json::from_str(&text).map_err(|e| FamilyError::Read {
        path: path.to_path_buf(),
        reason: format!("not JSON: {}", one_line(&e.to_string())),
    })
}

fn family_of(config: &Value, path: &Path) -> Result<(String, Family), FamilyError> {
    let supported = || {
        SUPPORTED_ARCHITECTURES
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(names) = config.get("architectures").and_then(Value::as_array) else {
        return Err(FamilyError::MissingField {
            path: path.to_path_buf(),
            field: "architectures".into(),
            what: "a list naming the model class",
        });
    };
    let found = names.iter().filter_map(Value::as_str).find_map(|name| {
        SUPPORTED_ARCHITECTURES
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(known, family)| (known.to_string(), *family))
    });
    found.ok_or_else(|| FamilyError::Unsupported {
        path: path.to_path_buf(),
        found: one_line(&Value::Array(names.clone()).to_string()),
        supported: supported(),
    })
}

/// The decoder's geometry: its fields under `text_config` (LLaVA, Idefics3,
/// newer Qwen configs) or at the top level (Qwen2-VL and Qwen2.5-VL).
fn decoder_geometry(cfg: &Fields) -> Result<DecoderGeometry, FamilyError> {
    let text = |key: &str, what: &'static str| -> Result<usize, FamilyError> {
        match cfg.text_field(key)? {
            Some(v) => Ok(v),
            None => Err(FamilyError::MissingField {
                path: cfg.path.to_path_buf(),
                field: format!("text_config.{key} (or {key})"),
                what,
            }),
        }
    };
    let layers = text("num_hidden_layers", "the decoder's layer count")?;
    let heads = text("num_attention_heads", "the decoder's attention heads")?;
    let hidden = text("hidden_size", "the decoder's width")?;
    // transformers' Llama and Qwen2 configs: no KV head count means one per head.
    let kv_heads = cfg.text_field("num_key_value_heads")?.unwrap_or(heads);
    let given = cfg.text_field("head_dim")?;
    if heads == 0 {
        return Err(cfg.bad("num_attention_heads", "is 0".into()));
    }
    let head_dim = given.unwrap_or(hidden / heads);
    for (field, value) in [
        ("num_hidden_layers", layers),
        ("num_key_value_heads", kv_heads),
        ("head_dim", head_dim),
    ] {
        if value == 0 {
            return Err(cfg.bad(field, "is 0".into()));
        }
    }
    Ok(DecoderGeometry {
        layers,
        heads,
        kv_heads,
        head_dim,
        hidden,
        head_dim_given: given.is_some(),
    })
}

/// Dotted-path lookups in one JSON file, with errors naming it.
struct Fields<'a> {
    value: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn get(&self, field: &str) -> Option<&Value> {
        field
            .split('.')
            .try_fold(self.value, |v, key| v.get(key))
            .filter(|v| !v.is_null())
    }

    fn bad(&self, field: &str, reason: String) -> FamilyError {
        FamilyError::BadField {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            reason,
        }
    }

    fn u64_opt(&self, field: &str) -> Result<Option<u64>, FamilyError> {
        self.get(field)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| self.bad(field, format!("{} is not a whole number", one_line(&v.to_string()))))
            })
            .transpose()
    }

    fn u32_opt(&self, field: &str) -> Result<Option<u32>, FamilyError> {
        self.u64_opt(field)?
            .map(|v| u32::try_from(v).map_err(|_| self.bad(field, format!("{v} is too large"))))
            .transpose()
    }

    fn u32(&self, field: &str, what: &'static str) -> Result<u32, FamilyError> {
        self.u32_opt(field)?.ok_or_else(|| FamilyError::MissingField {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            what,
        })
    }

    fn bool_opt(&self, field: &str) -> Result<Option<bool>, FamilyError> {
        self.get(field)
            .map(|v| v.as_bool().ok_or_else(|| self.bad(field, "not true or false".into())))
            .transpose()
    }

    /// A decoder field: `text_config.key`, else `key`.
    fn text_field(&self, key: &str) -> Result<Option<usize>, FamilyError> {
        let nested = format!("text_config.{key}");
        let field = if self.get(&nested).is_some() {
            nested
        } else {
            key.to_string()
        };
        self.u64_opt(&field)?
            .map(|v| usize::try_from(v).map_err(|_| self.bad(&field, format!("{v} is too large"))))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs(name: &str) -> FamilySizing {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/configs").join(name);
        FamilySizing::load(&dir).unwrap()
    }

    #[test]
    fn the_committed_configs_size_as_their_families() {
        let qwen = configs("qwen2.5-vl-3b-instruct");
        assert_eq!(qwen.family, Family::Qwen2Vl);
        // head_dim = 2048 / 16; 2 x 36 x 2 x 128 x 2 bytes.
        assert_eq!(
            (qwen.decoder.layers, qwen.decoder.kv_heads, qwen.decoder.head_dim),
            (36, 2, 128)
        );
        assert_eq!(qwen.decoder.kv_bytes_per_token(KvDtype::F16), 36_864);
        assert_eq!(qwen.decoder.kv_bytes_per_token(KvDtype::F32), 73_728);
        assert_eq!(qwen.picture(1280, 720).unwrap().tokens(), 1196);

        let smol = configs("smolvlm-instruct");
        assert_eq!(smol.family, Family::Idefics3);
        assert_eq!(
            (smol.decoder.layers, smol.decoder.kv_heads, smol.decoder.head_dim),
            (24, 32, 64)
        );
        assert_eq!(smol.decoder.kv_bytes_per_token(KvDtype::F16), 196_608);
        assert_eq!(smol.picture(1280, 720).unwrap().tokens(), 13 * 81);

        let small = configs("smolvlm-256m-instruct");
        assert!(small.decoder.head_dim_given);
        assert_eq!(
            (small.decoder.layers, small.decoder.kv_heads, small.decoder.head_dim),
            (30, 3, 64)
        );
        assert_eq!(small.picture(1280, 720).unwrap().tokens(), 13 * 64);

        let llava = configs("llava-1.5-7b");
        assert_eq!(llava.family, Family::Llava);
        assert_eq!(llava.decoder.kv_bytes_per_token(KvDtype::F16), 524_288);
        assert_eq!(llava.picture(1280, 720).unwrap().tokens(), 576);
    }

    fn from(config: &str, pre: &str) -> Result<FamilySizing, FamilyError> {
        FamilySizing::from_json(
            &serde_json::from_str(config).unwrap(),
            Path::new("ckpt/config.json"),
            &serde_json::from_str(pre).unwrap(),
            Path::new("ckpt/preprocessor_config.json"),
        )
    }

    #[test]
    fn a_missing_field_or_an_unknown_architecture_is_named() {
        let err = from(r#"{"architectures": ["BertModel"]}"#, "{}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ckpt/config.json") && err.contains("BertModel"), "{err}");
        assert!(err.contains("LlavaForConditionalGeneration"), "{err}");
        let err = from(
            r#"{"architectures": ["LlavaForConditionalGeneration"], "text_config": {"num_attention_heads": 8, "hidden_size": 64}}"#,
            "null",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ckpt/config.json") && err.contains("num_hidden_layers"),
            "{err}"
        );
        let err = from(
            r#"{"architectures": ["Idefics3ForConditionalGeneration"], "scale_factor": 2,
                "text_config": {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 64},
                "vision_config": {"image_size": 364, "patch_size": 14}}"#,
            r#"{"size": {"longest_edge": 1456}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ckpt/preprocessor_config.json") && err.contains("max_image_size.longest_edge"),
            "{err}"
        );
    }

    #[test]
    fn qwen_fields_at_the_top_level_or_under_text_config_and_its_defaults() {
        let top = from(
            r#"{"architectures": ["Qwen2VLForConditionalGeneration"], "num_hidden_layers": 28,
                "num_attention_heads": 12, "hidden_size": 1536, "num_key_value_heads": 2}"#,
            "{}",
        )
        .unwrap();
        assert_eq!((top.decoder.layers, top.decoder.head_dim), (28, 128));
        // No pixel bounds: the processor's 56*56 and 28*28*1280.
        assert_eq!(
            top.image,
            ImageRule::Qwen {
                patch_size: 14,
                merge_size: 2,
                min_pixels: 3136,
                max_pixels: 1_003_520
            }
        );
        let nested = from(
            r#"{"architectures": ["Qwen2_5_VLForConditionalGeneration"],
                "text_config": {"num_hidden_layers": 28, "num_attention_heads": 12, "hidden_size": 1536}}"#,
            r#"{"size": {"shortest_edge": 100, "longest_edge": 200000}}"#,
        )
        .unwrap();
        // No num_key_value_heads: one per attention head.
        assert_eq!(nested.decoder.kv_heads, 12);
        assert!(matches!(
            nested.image,
            ImageRule::Qwen {
                min_pixels: 100,
                max_pixels: 200_000,
                ..
            }
        ));
    }

    #[test]
    fn a_budget_holds_pictures_and_prompts() {
        // 1000 slots, 300-token pictures: 3 at full cache, 6 at keep 0.5.
        let fit = BudgetFit::new(1000, 300, 0.5, 50, 512);
        assert_eq!((fit.pictures, fit.pictures_at_keep), (3, 6));
        assert_eq!((fit.prompt_slots, fit.prompt_slots_at_keep), (862, 431));
        assert!(fit.fits() && fit.fits_at_keep());
        let fit = BudgetFit::new(500, 300, 0.5, 50, 512);
        assert!(!fit.fits() && fit.fits_at_keep());
    }
}
