"""Export real LVLM families from a Hugging Face checkpoint folder to the graph contract.

    python -m export.families CHECKPOINT_DIR OUT_DIR [--dtype fp32|fp16] [--name NAME]

Supported (by config.json "architectures"/"model_type"):
  LlavaForConditionalGeneration   (LLaVA-1.5: CLIP vision tower, MLP projector, Llama decoder)
  Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration
                                  (SmolVLM / Idefics3: SigLIP-style encoder, pixel-shuffle connector,
                                   Llama decoder; with do_image_splitting the vision graph takes a
                                   batch of tiles, else one global image)
  Qwen2_5_VLForConditionalGeneration
                                  (Qwen2.5-VL: dynamic resolution within a pixel budget, window
                                   attention and patch merger (export.qwen2vl), Qwen2 decoder with
                                   multimodal RoPE; format 2 only)
  Qwen2VLForConditionalGeneration (Qwen2-VL: the same, every vision block over the whole picture)
The decoder is re-implemented by export.decoder.ContractDecoder from the checkpoint's
weights; the vision graph wraps the checkpoint's own vision tower + projector.

`python -m export.families --selftest` builds tiny randomly initialised configurations
of each family (Idefics3 with and without image splitting), exports them and checks ONNX
Runtime against PyTorch, and the split prompts against the Hugging Face processor.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Dict

import numpy as np
import torch
from torch import nn

from .common import AtomicDir, die, log, write_json
from .decoder import DecoderConfig, build_from_state_dict, set_output_shapes, state_dict_from_hf_llama
from .decoder_v2 import add_format_args, check_format_args, export_any
from .manifest import write_manifest
from .qwen2vl import QWEN2_VL_WINDOW

KNOWN = {
    "LlavaForConditionalGeneration": "llava",
    "Idefics3ForConditionalGeneration": "idefics3",
    "SmolVLMForConditionalGeneration": "idefics3",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
}

# Qwen2.5-VL's pixel budget unless --max-pixels says otherwise: 1024 image tokens at most
# (28 x 28 pixels each). Its vision graph's attention holds [heads, N, N] float32 scores over
# N = 4 x tokens patches, about 1 GiB at this budget (export.qwen2vl).
QWEN_MAX_PIXELS = 28 * 28 * 1024


class LlavaVision(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, pixel_values):
        f = self.m.model.get_image_features(pixel_values=pixel_values)
        if isinstance(f, (list, tuple)):  # one entry per image in recent transformers
            f = f[0]
        return f if f.dim() == 3 else f[None]


class Idefics3Vision(nn.Module):
    """Full images of the encoder's size, no padding: vision encoder + pixel-shuffle connector. The
    batch axis is free: a split picture's tiles and its global image go through in one run."""

    def __init__(self, model, image_size: int, patch: int):
        super().__init__()
        self.m = model
        self.grid = image_size // patch
        # position ids exactly as Idefics3VisionEmbeddings computes them for a full image
        # (bucketize of fractional coordinates), precomputed so the graph needs no bucketize
        emb = model.model.vision_model.embeddings
        n = emb.num_patches_per_side
        boundaries = torch.arange(1 / n, 1.0, 1 / n)
        idx = torch.arange(self.grid, dtype=torch.float32)
        b = torch.bucketize(idx / self.grid * (1 - 1e-6), boundaries, right=True)
        self.register_buffer("pos_ids", (b[:, None] * n + b[None, :]).flatten(), persistent=False)

    def forward(self, pixel_values):
        # The checkpoint's embeddings compute position ids with a data-dependent loop (ragged images)
        # that does not export; for one full image they are the constant pos_ids.
        vm = self.m.model.vision_model
        emb = vm.embeddings
        x = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = x + emb.position_embedding(self.pos_ids)[None]
        h = vm.encoder(inputs_embeds=x, attention_mask=None).last_hidden_state
        h = vm.post_layernorm(h)
        return self.m.model.connector(h)


def detect(ckpt: str) -> str:
    cp = os.path.join(ckpt, "config.json")
    if not os.path.isfile(cp):
        die(f"{ckpt} has no config.json: pass a Hugging Face checkpoint folder (config.json, *.safetensors, "
            "tokenizer files, preprocessor_config.json)")
    cfg = json.load(open(cp))
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in KNOWN:
            return KNOWN[a]
    mt = cfg.get("model_type")
    if mt in ("llava", "idefics3", "smolvlm"):
        return "llava" if mt == "llava" else "idefics3"
    if mt in ("qwen2_5_vl", "qwen2_vl"):
        return mt
    die(f"{ckpt}: architecture {archs or mt!r} is not supported by the exporter; supported: "
        f"{', '.join(KNOWN)}")


def check_files(ckpt: str) -> None:
    weights = [f for f in os.listdir(ckpt) if f.endswith((".safetensors", ".bin"))]
    if not weights:
        die(f"{ckpt} has no weights (*.safetensors or pytorch_model*.bin): copy the whole checkpoint folder")
    if not (os.path.isfile(os.path.join(ckpt, "tokenizer.json"))):
        die(f"{ckpt} has no tokenizer.json (the fast tokenizer file): copy it from the checkpoint")
    if not os.path.isfile(os.path.join(ckpt, "preprocessor_config.json")):
        die(f"{ckpt} has no preprocessor_config.json (image size, mean, std): copy it from the checkpoint")


def load(ckpt: str, family: str):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(ckpt)
    if family == "llava":
        from transformers import LlavaForConditionalGeneration as C
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as C
    elif family == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration as C
    else:
        from transformers import Idefics3ForConditionalGeneration as C
    try:
        model = C.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    except Exception as e:  # missing shards, wrong shapes, ...
        die(f"could not load {ckpt} as {C.__name__}: {e}")
    return cfg, model


def qwen_parts(ckpt: str, cfg, model, pp: Dict, vocab_ids: Dict, max_pixels: int | None):
    """Qwen2.5-VL: the Qwen2 decoder (q/k/v bias, multimodal RoPE), the vision tower with its
    dynamic-resolution inputs (export.qwen2vl), the Qwen chat template."""
    text_cfg = cfg.text_config
    dcfg = DecoderConfig.from_hf(text_cfg)
    if dcfg.mrope_section is None:
        die(f"{ckpt}: a Qwen2.5-VL config without rope_scaling.mrope_section")
    sd = model.state_dict()
    prefix = "model.language_model."
    dec_sd = state_dict_from_hf_llama(sd, prefix, None if cfg.tie_word_embeddings else "lm_head.weight",
                                      prefix + "embed_tokens.weight")
    embed = sd[prefix + "embed_tokens.weight"].float()
    vc = cfg.vision_config
    patch, merge, temporal = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
    factor = patch * merge
    # transformers 4.57 keeps min/max_pixels in size {shortest_edge, longest_edge}; older files at top level
    size = pp.get("size") or {}
    min_pixels = int(pp.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
    budget = int(max_pixels or min(QWEN_MAX_PIXELS, int(pp.get("max_pixels") or size.get("longest_edge")
                                                             or QWEN_MAX_PIXELS)))
    if budget < max(min_pixels, factor * factor):
        die(f"--max-pixels {budget} is below the checkpoint's min_pixels {min_pixels} (or one {factor}x{factor} "
            f"token): the smallest budget that works is {max(min_pixels, factor * factor)}")
    tokens_max = budget // (factor * factor)
    side = int(np.sqrt(budget)) // factor * factor  # what a square picture gets (informational)
    vis_meta = {"image_size": side, "height": side, "width": side, "mean": pp.get("image_mean"),
                "std": pp.get("image_std"), "resize": "bicubic_smart_resize",
                "rescale": pp.get("rescale_factor", 1 / 255), "channel_order": "RGB", "layout": "patches",
                "input_dtype": "float32", "image_tokens": tokens_max, "projector": {"kind": cfg.model_type},
                "dynamic": {"patch_size": patch, "merge_size": merge, "temporal_patch_size": temporal,
                            "window_size": getattr(vc, "window_size", None) or QWEN2_VL_WINDOW,
                            "min_pixels": min_pixels, "max_pixels": budget}}
    tpl = {"system_prefix": "<|im_start|>system\n", "system_prompt": "You are a helpful assistant.",
           "system_suffix": "<|im_end|>\n", "user_prefix": "<|im_start|>user\n",
           "image_prefix": "<|vision_start|>", "image_suffix": "<|vision_end|>",
           "default_user_prompt": "Describe this image.", "user_suffix": "<|im_end|>\n",
           "assistant_prefix": "<|im_start|>assistant\n", "image_position": "user_before_text",
           "tokenize_pieces_separately": True}
    stops = [i for i in (vocab_ids.get("<|im_end|>"), vocab_ids.get("<|endoftext|>")) if i is not None]
    if not stops:
        die(f"{ckpt}/tokenizer.json has neither <|im_end|> nor <|endoftext|>: not a Qwen tokenizer")
    tokens = {"bos_token_id": None, "add_bos": False, "eos_token_id": stops[0], "pad_token_id": stops[-1],
              "stop_token_ids": stops}
    return dcfg, dec_sd, embed, vis_meta, tpl, tokens


def family_parts(ckpt: str, family: str, cfg, model):
    pp = json.load(open(os.path.join(ckpt, "preprocessor_config.json")))
    tok = json.load(open(os.path.join(ckpt, "tokenizer.json")))
    vocab_ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    text_cfg = cfg.text_config
    dcfg = DecoderConfig.from_hf(text_cfg)
    sd = model.state_dict()
    split = None
    if family == "llava":
        prefix = "model.language_model."
        vc = cfg.vision_config
        size = vc.image_size
        n_img = (size // vc.patch_size) ** 2 + (0 if cfg.vision_feature_select_strategy == "default" else 1)
        vision = LlavaVision(model)
        crop = pp.get("crop_size", {}) or {}
        resize = "bicubic_shortest_edge_center_crop" if crop else "bilinear_squash"
        tpl = {"system_prefix": "", "system_prompt": "", "system_suffix": "", "user_prefix": "USER: ",
               "image_prefix": "", "image_suffix": "\n", "default_user_prompt": "Describe the image briefly.",
               "user_suffix": " ", "assistant_prefix": "ASSISTANT:", "image_position": "user_before_text",
               "tokenize_pieces_separately": True}
        bos = vocab_ids.get("<s>", getattr(text_cfg, "bos_token_id", 1))
        stops = [getattr(text_cfg, "eos_token_id", 2) or 2]
        add_bos = True
    else:
        prefix = "model.text_model."
        vc = cfg.vision_config
        size = vc.image_size
        grid = size // vc.patch_size
        n_img = (grid // cfg.scale_factor) ** 2
        vision = Idefics3Vision(model, size, vc.patch_size)
        resize = "bilinear_squash"
        split = idefics3_split_settings(pp, size, tok)
        if split is not None:
            resize = "lanczos_squash" if split["resample"] == "lanczos" else f"{split['resample']}_squash"
        tpl = {"system_prefix": "", "system_prompt": "", "system_suffix": "", "user_prefix": "<|im_start|>User:",
               "image_prefix": "<fake_token_around_image><global-img>", "image_suffix": "<fake_token_around_image>",
               "default_user_prompt": "Can you describe this image?", "user_suffix": "<end_of_utterance>\n",
               "assistant_prefix": "Assistant:", "image_position": "user_before_text",
               "tokenize_pieces_separately": True}
        bos = vocab_ids.get("<|im_start|>", getattr(text_cfg, "bos_token_id", 1))
        stops = [i for i in (vocab_ids.get("<end_of_utterance>"), getattr(text_cfg, "eos_token_id", None))
                 if i is not None]
        add_bos = False
    dec_sd = state_dict_from_hf_llama(sd, prefix, "lm_head.weight", prefix + "embed_tokens.weight")
    embed = sd[prefix + "embed_tokens.weight"].float()
    mean = pp.get("image_mean", [0.5, 0.5, 0.5])
    std = pp.get("image_std", [0.5, 0.5, 0.5])
    vis_meta = {"image_size": size, "height": size, "width": size, "mean": mean, "std": std, "resize": resize,
                "rescale": pp.get("rescale_factor", 1 / 255), "channel_order": "RGB", "layout": "NCHW",
                "input_dtype": "float32", "image_tokens": n_img, "projector": {"kind": family}}
    if split is not None:
        vis_meta["split"] = split
    tokens = {"bos_token_id": bos, "add_bos": add_bos, "eos_token_id": stops[0], "pad_token_id": stops[0],
              "stop_token_ids": stops}
    return dcfg, dec_sd, embed, vision, vis_meta, tpl, tokens


SPLIT_TOKENS = {"fake_image": "<fake_token_around_image>", "row_col": "<row_{r}_col_{c}>",
                "global_image": "<global-img>", "image": "<image>"}
PIL_FILTERS = {1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values


def idefics3_split_settings(pp: Dict, size: int, tok: Dict):
    """The manifest's vision.split from preprocessor_config.json (Idefics3ImageProcessor's defaults
    where a key is missing). With do_image_splitting false, "splitting": false: the picture is only
    its global image, made by the processor's two resizes (long side, then the square)."""
    splitting = bool(pp.get("do_image_splitting", True))
    if not pp.get("do_resize", True):
        die("preprocessor_config.json: do_resize false is not supported (the picture must be resized to tiles)")
    tile = (pp.get("max_image_size") or {"longest_edge": 364})["longest_edge"]
    edge = (pp.get("size") or {"longest_edge": 4 * 364}).get("longest_edge")
    if tile != size:
        die(f"preprocessor_config.json: max_image_size.longest_edge {tile} differs from the vision encoder's "
            f"image_size {size}; the graph takes tiles of the encoder's size")
    if edge is None:
        die("preprocessor_config.json: size must have longest_edge for image splitting")
    resample = PIL_FILTERS.get(pp.get("resample", 1))
    if resample is None:
        die(f"preprocessor_config.json: resample {pp.get('resample')!r} is not one of {PIL_FILTERS}")
    # Each marker must be one token, as the processor's prompt has it.
    added = {t["content"] for t in tok.get("added_tokens", [])}
    side = -(-edge // tile) if splitting else 0
    need = [SPLIT_TOKENS["fake_image"], SPLIT_TOKENS["global_image"], SPLIT_TOKENS["image"]]
    need += [SPLIT_TOKENS["row_col"].format(r=r, c=c) for r in range(1, side + 1) for c in range(1, side + 1)]
    missing = [t for t in need if t not in added]
    if missing:
        die(f"tokenizer.json lacks the added tokens {missing[:4]}... that split pictures are written with")
    return {"longest_edge": edge, "tile": tile, "resample": resample, "tokens": dict(SPLIT_TOKENS),
            "splitting": splitting}


def export(ckpt: str, out: str, dtype_name: str = "fp32", name: str | None = None, decoder_format: int = 2,
           scores: bool = True, description: str | None = None, max_pixels: int | None = None) -> str:
    check_files(ckpt)
    family = detect(ckpt)
    if family in ("qwen2_5_vl", "qwen2_vl"):
        return export_qwen(ckpt, out, dtype_name, name, decoder_format, scores, max_pixels, family)
    cfg, model = load(ckpt, family)
    dcfg, dec_sd, embed, vision, vis_meta, tpl, tokens = family_parts(ckpt, family, cfg, model)
    dtype = torch.float16 if dtype_name == "fp16" else torch.float32
    size = vis_meta["image_size"]
    with AtomicDir(out) as tmp:
        log(f"{family}: exporting decoder.onnx ({dcfg.layers} layers, format {decoder_format})")
        extra = export_any(build_from_state_dict(dcfg, dec_sd, dtype), os.path.join(tmp, "decoder.onnx"), dtype,
                           decoder_format, scores)
        log(f"{family}: exporting vision.onnx ({size}x{size} -> {vis_meta['image_tokens']} tokens)")

        class Cast(nn.Module):
            def __init__(s, v):
                super().__init__()
                s.v = v

            def forward(s, px):
                return s.v(px.float()).to(dtype)

        split = "split" in vis_meta  # a batch of tiles: N free
        batch = "N" if split else 1
        with torch.no_grad():
            torch.onnx.export(Cast(vision), (torch.zeros(2 if split else 1, 3, size, size),),
                              os.path.join(tmp, "vision.onnx"),
                              input_names=["pixel_values"], output_names=["image_embeds"], opset_version=17,
                              do_constant_folding=True, dynamo=False,
                              dynamic_axes={"pixel_values": {0: "N"}, "image_embeds": {0: "N"}} if split else None)
        set_output_shapes(os.path.join(tmp, "vision.onnx"),
                          {"image_embeds": [batch, vis_meta["image_tokens"], dcfg.hidden]})
        embed.numpy().astype("<f2" if dtype == torch.float16 else "<f4").tofile(os.path.join(tmp, "embed_tokens.bin"))
        js = json.load(open(os.path.join(ckpt, "tokenizer.json")))
        js["post_processor"] = None  # the client adds BOS itself when add_bos is true
        write_json(os.path.join(tmp, "tokenizer.json"), js)
        write_manifest(tmp, name=name or os.path.basename(os.path.abspath(ckpt)),
                       description=description or f"{family} checkpoint exported from {ckpt}",
                       dtype="float16" if dtype == torch.float16 else "float32", cfg=dcfg, tokens=tokens,
                       vision=vis_meta, chat_template=tpl, extra_files=extra,
                       build={"key": "", "exporter": "scripts/export/families.py", "family": family,
                              "torch": torch.__version__})
    return out


def export_qwen(ckpt: str, out: str, dtype_name: str, name: str | None, decoder_format: int, scores: bool,
                max_pixels: int | None, family: str = "qwen2_5_vl") -> str:
    """Qwen2.5-VL, or Qwen2-VL (the same parts; its tower attends over the whole picture in every block)."""
    from .qwen2vl import export_vision
    if decoder_format != 2:
        die(f"{family}'s multimodal RoPE needs --decoder-format 2 (the format-1 graph takes one position a token)")
    cfg, model = load(ckpt, family)
    pp = json.load(open(os.path.join(ckpt, "preprocessor_config.json")))
    tok = json.load(open(os.path.join(ckpt, "tokenizer.json")))
    vocab_ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    dcfg, dec_sd, embed, vis_meta, tpl, tokens = qwen_parts(ckpt, cfg, model, pp, vocab_ids, max_pixels)
    dtype = torch.float16 if dtype_name == "fp16" else torch.float32
    with AtomicDir(out) as tmp:
        log(f"{family}: exporting decoder.onnx ({dcfg.layers} layers, multimodal RoPE {dcfg.mrope_section})")
        extra = export_any(build_from_state_dict(dcfg, dec_sd, dtype), os.path.join(tmp, "decoder.onnx"), dtype,
                           decoder_format, scores)
        d = vis_meta["dynamic"]
        log(f"{family}: exporting vision.onnx (dynamic resolution, {d['min_pixels']} to {d['max_pixels']} "
            f"pixels: up to {vis_meta['image_tokens']} tokens a picture)")
        export_vision(model, os.path.join(tmp, "vision.onnx"), dtype)
        embed.numpy().astype("<f2" if dtype == torch.float16 else "<f4").tofile(os.path.join(tmp, "embed_tokens.bin"))
        tok["post_processor"] = None
        write_json(os.path.join(tmp, "tokenizer.json"), tok)
        man = write_manifest(tmp, name=name or os.path.basename(os.path.abspath(ckpt)),
                             description=f"{family} checkpoint exported from {ckpt}",
                             dtype="float16" if dtype == torch.float16 else "float32", cfg=dcfg, tokens=tokens,
                             vision=vis_meta, chat_template=tpl, extra_files=extra,
                             build={"key": "", "exporter": "scripts/export/families.py", "family": family,
                                    "torch": torch.__version__})
        if man["graphs"]["vision"]["inputs"][0]["name"] != "pixel_values":
            die("vision.onnx's first input is not pixel_values")
    return out


def _qwen_prompt_embeds(om, px, thw, vision_config, input_ids, image_id: int):
    """The vision graph a picture a run, as the Rust client feeds it, and the prompt's embeddings
    (its rows where the processor has image_id). -> (rows per picture, embeds [1, P, hidden])."""
    from .qwen2vl import vision_index_inputs
    rows, at = [], 0
    for (_, h, w) in thw.tolist():
        n = h * w
        feed = {"pixel_values": px["pixel_values"][at:at + n].numpy(), **vision_index_inputs(h, w, vision_config)}
        rows.append(om.vis.run(None, feed)[0][0])
        at += n
    embeds, picture, i = [], 0, 0
    while i < len(input_ids):
        if input_ids[i] == image_id:
            embeds.append(rows[picture])
            i += len(rows[picture])
            picture += 1
        else:
            embeds.append(np.asarray(om.embed[[input_ids[i]]]))
            i += 1
    return rows, np.concatenate(embeds, 0)[None].astype(om.np_dtype)


def _qwen_greedy(om, cache, out, pos, max_new: int):
    """Greedy ids after a prefill whose outputs are `out`, text tokens at three equal positions
    going on from the prompt's largest (stop token dropped)."""
    got, nxt_pos = [], int(pos.max()) + 1
    for _ in range(max_new):
        nxt = int(np.argmax(out["logits"][0]))
        if nxt in om.m["stop_token_ids"]:
            break
        got.append(nxt)
        out = om.step(cache, np.asarray(om.embed[[nxt]])[None], np.full((3, 1), nxt_pos))
        nxt_pos += 1
    return got


def mrope_positions(ids, image_token_id: int, grids) -> np.ndarray:
    """[3, len(ids)] multimodal RoPE positions of a prompt whose pictures are runs of
    image_token_id, grids[i] = (rows, cols) of picture i in image tokens: what the Rust
    client computes (src/model/mrope.rs), checked against transformers' get_rope_index."""
    pos = np.zeros((3, len(ids)), np.int64)
    nxt, i, picture = 0, 0, 0
    while i < len(ids):
        if ids[i] == image_token_id:
            rows, cols = grids[picture]
            for cell in range(rows * cols):
                pos[:, i + cell] = (nxt, nxt + cell // cols, nxt + cell % cols)
            nxt += max(rows, cols)
            i += rows * cols
            picture += 1
        else:
            pos[:, i] = nxt
            nxt += 1
            i += 1
    return pos


# ------------------------------------------------------------------ self-test

def _tiny_tokenizer(d: str, extra):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=300, special_tokens=extra, show_progress=False,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["USER: describe the image briefly. ASSISTANT: a cat on a mat"] * 4, trainer=tr)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(d)
    return tok.get_vocab_size()


IDEFICS3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                     "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
# The tiny split model's processor: tiles of 32 (the encoder's size), long side 96 (up to 3 x 3 tiles);
# scripts/fixtures/idefics3_fixtures.py writes the pictures' pixel_values with the same settings.
TINY_SPLIT_PP = {"do_image_splitting": True, "size": {"longest_edge": 96}, "max_image_size": {"longest_edge": 32},
                 "resample": 1, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "rescale_factor": 1 / 255}


# Random-weight SmolVLM shapes for the self-test at the published sizes (models/configs), with 4 text
# and 4 vision layers: (text, vision, scale_factor, the published preprocessor config's folder).
SMOLVLM_SHAPES = {
    "smolvlm-256m": (dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                          head_dim=64, vocab_size=49280, rope_theta=100000.0),
                     dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, image_size=512,
                          patch_size=16), 4, "smolvlm-256m-instruct"),
    "smolvlm-2.2b": (dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32,
                          vocab_size=49155, rope_theta=273768.0),
                     dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, image_size=384,
                          patch_size=14), 3, "smolvlm-instruct"),
}


def tiny_idefics3(ck: str, splitting: bool, shapes: str = "tiny"):
    """A random Idefics3 checkpoint in ck (tokenizer, weights, preprocessor_config.json): tiny, or
    SMOLVLM_SHAPES[shapes] with the published preprocessor config."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig
    os.makedirs(ck, exist_ok=True)
    V = _tiny_tokenizer(ck, IDEFICS3_SPECIALS)
    if shapes == "tiny":
        text_shape = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        vision_shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "image_size": 32, "patch_size": 4}
        scale, pp = 2, dict(TINY_SPLIT_PP, do_image_splitting=splitting)
    else:
        text_shape, vision_shape, scale, published = SMOLVLM_SHAPES[shapes]
        text_shape = dict(text_shape, num_hidden_layers=4)
        vision_shape = dict(vision_shape, num_hidden_layers=4)
        _fill_vocab(os.path.join(ck, "tokenizer.json"), text_shape["vocab_size"])
        pp = json.load(open(os.path.join(REPO, "models", "configs", published, "preprocessor_config.json")))
        pp["do_image_splitting"] = splitting
    text = LlamaConfig(max_position_embeddings=512 if shapes == "tiny" else 8192, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2, tie_word_embeddings=True, **text_shape)
    cfg = Idefics3Config(text_config=text.to_dict(), vision_config=vision_shape, scale_factor=scale,
                         image_token_id=3)
    model = Idefics3ForConditionalGeneration(cfg)
    if shapes == "tiny":
        _widen(model)
    model.save_pretrained(ck)
    write_json(os.path.join(ck, "preprocessor_config.json"), pp)


def _widen(model) -> None:
    with torch.no_grad():  # random weights: widen the logits so greedy is decisive
        for n, p in model.named_parameters():
            if "norm" not in n and "embed" not in n and p.dim() == 2:
                p.mul_(3.0)


def selftest(keep: str | None = None) -> Dict:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    results = {}
    root = tempfile.mkdtemp(prefix="ee-families-")
    try:
        for family, variant in (("llava", "llava"), ("idefics3", "idefics3"), ("idefics3", "idefics3-split")):
            ck = os.path.join(root, variant)
            if family == "llava":
                os.makedirs(ck)
                V = _tiny_tokenizer(ck, ["<unk>", "<s>", "</s>", "<image>"])
                text = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=2)
                vis = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
                cfg = LlavaConfig(vision_config=vis, text_config=text, image_token_index=3,
                                  vision_feature_layer=-2, vision_feature_select_strategy="default")
                model = LlavaForConditionalGeneration(cfg)
                pp = {"image_mean": [0.481, 0.458, 0.408], "image_std": [0.269, 0.261, 0.276],
                      "crop_size": {"height": 32, "width": 32}, "rescale_factor": 1 / 255}
                _widen(model)
                model.save_pretrained(ck)
                write_json(os.path.join(ck, "preprocessor_config.json"), pp)
            else:
                tiny_idefics3(ck, splitting=variant.endswith("-split"))
            ref = load(ck, family)[1]
            for decoder_format in (2, 1):
                results[f"{variant}-format{decoder_format}"] = _check_export(ck, ref, family, root, decoder_format,
                                                                             variant)
            out = os.path.join(root, variant + "-onnx-format2")
            if family == "idefics3":
                r = check_split(ck, ref, out)
                results[f"{variant}-processor"] = r
                cases = [{"pictures": [os.path.relpath(os.path.join(FIXTURES, p), REPO) for p in c["pictures"]],
                          "user_text": c["user_text"], "prompt_ids": c["input_ids"], "answer_ids": c["expected_ids"]}
                         for c in r["cases"]]
                image_token = SPLIT_TOKENS["image"]
            else:
                r = check_llava(ck, ref, out)
                results[f"{variant}-processor"] = r
                cases, image_token = r["cases"], "<image>"
            if keep and variant in ("llava", "idefics3"):
                _keep(out, os.path.join(keep, f"tiny-{variant}"), image_token, cases, 12)
        results.update(qwen_selftest(root, os.path.join(keep, "tiny-qwen2_5_vl") if keep else None))
        results.update(qwen_selftest(root, os.path.join(keep, "tiny-qwen2_vl") if keep else None, arch="qwen2_vl"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["published-configs"] = _check_published_configs()
    return results


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_PICTURES = ["models/fixtures/qwen2vl/chelsea-crop-61x93.png", "models/fixtures/qwen2vl/coffee-crop-130x47.png"]


# Random-weight shapes for the self-test: "tiny", or the published sizes of Qwen2.5-VL-3B-Instruct
# (hidden 2048, 16 heads, 2 KV heads of 128, vocabulary 151936; vision 1280 wide, 16 heads) with
# 4 decoder layers and 4 vision blocks so the export runs here in minutes.
QWEN_SHAPES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
             dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64, window_size=56,
                  fullatt_block_indexes=[1]), None),
    "qwen2.5-vl-3b": (dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=16,
                           num_key_value_heads=2, rope_theta=1000000.0,
                           rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
                      dict(depth=4, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=2048,
                           window_size=112, fullatt_block_indexes=[3]), 151936),
}


def _fill_vocab(path: str, size: int) -> None:
    """Gives the tiny tokenizer at path one added token for every id up to size, so a model of a
    published vocabulary's width can decode whatever its random weights pick."""
    tok = json.load(open(path))
    have = len(tok["model"]["vocab"]) + len([t for t in tok["added_tokens"] if t["content"] not in tok["model"]["vocab"]])
    tok["added_tokens"] += [{"id": i, "content": f"<|filler_{i}|>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True} for i in range(have, size)]
    write_json(path, tok)


def qwen_selftest(root: str, keep: str | None = None, shapes: str = "tiny", arch: str = "qwen2_5_vl") -> Dict:
    """A random Qwen2.5-VL (window attention over several windows, multimodal RoPE) of QWEN_SHAPES[shapes],
    exported and checked against transformers on one and on two pictures: the prompt ids, get_rope_index's
    positions, the vision rows, the last logits, every layer's new K/V and attention column sums, and the
    greedy answer. keep: also leave the model there with expected.json (the Rust tests' reference:
    pictures, transformers' prompt ids and answers)."""
    import time
    from PIL import Image
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor)
    from .ortrun import OrtModel
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    torch.manual_seed(0)
    ck = os.path.join(root, arch)
    os.makedirs(ck)
    V = _tiny_tokenizer(ck, QWEN_SPECIALS)
    ids = {t: PreTrainedTokenizerFast(tokenizer_file=os.path.join(ck, "tokenizer.json")).convert_tokens_to_ids(t)
           for t in QWEN_SPECIALS}
    text_shape, vision_shape, vocab = QWEN_SHAPES[shapes]
    if vocab:
        _fill_vocab(os.path.join(ck, "tokenizer.json"), vocab)
    text = dict(text_shape, vocab_size=vocab or V, max_position_embeddings=4096)
    vision = dict(vision_shape, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    Config, Model = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    if arch == "qwen2_vl":  # its tower's own field names, no window attention
        Config, Model = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision = dict(depth=vision["depth"], embed_dim=vision["hidden_size"], hidden_size=vision["out_hidden_size"],
                      num_heads=vision["num_heads"], mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
    cfg = Config(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], bos_token_id=ids["<|endoftext|>"],
                           eos_token_id=ids["<|im_end|>"], tie_word_embeddings=False)
    model = Model(cfg).eval()
    if shapes == "tiny":
        with torch.no_grad():  # random init is near-identity: widen the weights so every part matters
            for n, p in model.named_parameters():
                if p.dim() >= 2 and "embed" not in n:
                    p.mul_(3.0)
    model.save_pretrained(ck)
    pp = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 28 * 28 * 48,
          "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
          "image_std": [0.26862954, 0.26130258, 0.27577711], "rescale_factor": 1 / 255}
    write_json(os.path.join(ck, "preprocessor_config.json"), pp)
    ref = load(ck, arch)[1]
    out = keep or os.path.join(root, f"{arch}-onnx")
    started = time.time()
    export(ck, out, name=f"tiny-{arch}" if shapes == "tiny" else f"random-{shapes}-4-layers")
    export_s = time.time() - started
    om = OrtModel(out)
    m = om.m
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(ck, "tokenizer.json"))
    proc = Qwen2VLImageProcessor(**{k: v for k, v in pp.items() if k != "image_processor_type"})
    tpl = m["chat_template"]
    results, cases, om16 = {}, [], None
    for count in (1, 2):
        pictures = [Image.open(os.path.join(repo, p)).convert("RGB") for p in QWEN_PICTURES[:count]]
        px = proc(images=pictures, return_tensors="pt")
        thw = px["image_grid_thw"]
        grids = [(int(h) // 2, int(w) // 2) for _, h, w in thw.tolist()]
        head = tpl["system_prefix"] + tpl["system_prompt"] + tpl["system_suffix"] + tpl["user_prefix"]
        prompt = head + "".join(tpl["image_prefix"] + "<|image_pad|>" * (r * c) + tpl["image_suffix"]
                                for r, c in grids)
        prompt += tpl["default_user_prompt"] + tpl["user_suffix"] + tpl["assistant_prefix"]
        input_ids = hf_tok(prompt, add_special_tokens=False)["input_ids"]
        image_id = ids["<|image_pad|>"]
        rows, emb = _qwen_prompt_embeds(om, px, thw, cfg.vision_config, input_ids, image_id)
        with torch.no_grad():
            t_ie = ref.model.get_image_features(px["pixel_values"], thw)
        t_ie = torch.cat(list(t_ie), 0) if isinstance(t_ie, (list, tuple)) else t_ie
        verr = float(np.abs(np.concatenate(rows, 0) - t_ie.numpy()).max())
        pos = mrope_positions(input_ids, image_id, grids)
        ii = torch.tensor([input_ids])
        with torch.no_grad():
            hf_pos, _ = ref.model.get_rope_index(ii, thw, None, torch.ones_like(ii))
            hf = ref(input_ids=ii, pixel_values=px["pixel_values"], image_grid_thw=thw, output_attentions=True,
                     use_cache=True)
            logits = hf.logits[0, -1].numpy()
            g = ref.generate(input_ids=ii, attention_mask=torch.ones_like(ii), pixel_values=px["pixel_values"],
                             image_grid_thw=thw, max_new_tokens=12, do_sample=False,
                             eos_token_id=m["stop_token_ids"], pad_token_id=m["pad_token_id"])[0, len(input_ids):]
        g = g.tolist()
        if g and g[-1] in m["stop_token_ids"]:
            g = g[:-1]
        positions_match = bool(np.array_equal(pos, hf_pos[:, 0].numpy()))
        cache = om.empty_cache()
        o = om.step(cache, emb, pos)
        lerr = float(np.abs(o["logits"][0] - logits).max())
        kv_err, colsum_err = 0.0, 0.0
        for l in range(m["layers"]):
            layer = hf.past_key_values.layers[l] if hasattr(hf.past_key_values, "layers") else None
            k_hf = (layer.keys if layer is not None else hf.past_key_values.key_cache[l])[0].transpose(0, 1)
            v_hf = (layer.values if layer is not None else hf.past_key_values.value_cache[l])[0].transpose(0, 1)
            kv_err = max(kv_err, float(np.abs(o[f"new_key_{l}"][0] - k_hf.numpy()).max()),
                         float(np.abs(o[f"new_value_{l}"][0] - v_hf.numpy()).max()))
            col_hf = hf.attentions[l][0].sum(1).mean(0).numpy()
            colsum_err = max(colsum_err, float(np.abs(o[f"attn_colsum_{l}"][0] - col_hf).max()))
        got = _qwen_greedy(om, cache, o, pos, 12)
        # fp16 (what a Jetson's GPU runs): the same answer on the tiny model
        fp16 = None
        if shapes == "tiny":
            if om16 is None:
                export(ck, os.path.join(root, f"{arch}-onnx-fp16"), dtype_name="fp16", name=f"tiny-{arch}-fp16")
                om16 = OrtModel(os.path.join(root, f"{arch}-onnx-fp16"))
            _, emb16 = _qwen_prompt_embeds(om16, px, thw, cfg.vision_config, input_ids, image_id)
            cache16 = om16.empty_cache()
            fp16 = _qwen_greedy(om16, cache16, om16.step(cache16, emb16, pos), pos, 12)
        tol = 1e-4 if shapes == "tiny" else 2e-3  # 2048-wide sums in another order
        ok = positions_match and got == g and verr < tol and lerr < tol and kv_err < tol and colsum_err < 1e-5 \
            and fp16 in (None, g)
        results[f"{arch}-{shapes}-{count}-pictures"] = {
            "grids": grids, "vision_max_abs_err": verr, "logits_max_abs_err": lerr,
            "logits_max_abs": float(np.abs(logits).max()), "new_kv_max_abs_err": kv_err,
            "colsum_max_abs_err": colsum_err, "positions_match_get_rope_index": positions_match,
            "greedy_transformers": g, "greedy_onnxruntime": got, "greedy_fp16": fp16, "export_s": round(export_s, 1),
            "ok": ok}
        log(f"selftest {arch} ({shapes}), {count} picture(s) {grids}: vision err {verr:.2g}, logits err "
            f"{lerr:.2g}, new K/V err {kv_err:.2g}, column sums err {colsum_err:.2g}, positions match "
            f"{positions_match}, greedy match {got == g}")
        if not ok:
            die(f"selftest {arch} with {count} picture(s) failed: {results}")
        cases.append({"pictures": QWEN_PICTURES[:count], "user_text": None, "prompt_ids": input_ids,
                      "answer_ids": g, "grids": grids})
    if keep:
        write_json(os.path.join(keep, "expected.json"), {
            "note": "transformers' prompt ids and greedy answers (12 tokens at most, stop token dropped) for "
                    "the default prompt; written by python -m export.families --selftest --keep",
            "image_token": "<|image_pad|>", "max_new_tokens": 12, "cases": cases})
    return results


def _check_published_configs() -> Dict:
    """vision.split from the published SmolVLM preprocessor configs (models/configs, no weights), with
    a tokenizer holding the processor's markers (the published ones have <row_r_col_c> up to 6 x 6)."""
    configs = os.path.join(FIXTURES, "..", "..", "configs")
    markers = [SPLIT_TOKENS["fake_image"], SPLIT_TOKENS["global_image"], SPLIT_TOKENS["image"]]
    markers += [SPLIT_TOKENS["row_col"].format(r=r, c=c) for r in range(1, 7) for c in range(1, 7)]
    tok = {"added_tokens": [{"content": t} for t in markers]}
    out = {}
    for name, edge, tile in (("smolvlm-instruct", 1536, 384), ("smolvlm-256m-instruct", 2048, 512)):
        d = os.path.join(configs, name)
        if not os.path.isdir(d):
            continue
        pp = json.load(open(os.path.join(d, "preprocessor_config.json")))
        size = json.load(open(os.path.join(d, "config.json")))["vision_config"]["image_size"]
        got = idefics3_split_settings(pp, size, tok)
        want = {"longest_edge": edge, "tile": tile, "resample": "lanczos", "tokens": SPLIT_TOKENS,
                "splitting": True}
        if got != want:
            die(f"models/configs/{name}: vision.split {got}, expected {want}")
        out[name] = got
    return out


# The split prompts checked against the processor (and written to the tiny split model's fixture):
# (name, fixture pictures, user text).
SPLIT_CASES = [
    ("one picture", ["chelsea-crop-61x93"], "describe the image briefly."),
    ("two pictures", ["coffee-crop-130x47", "astronaut-crop-20x24"], "which one is a cat?"),
]
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models", "fixtures", "idefics3")


def split_prompt(om, user_text: str, layouts):
    """The prompt as the Rust client builds it for split pictures (prompt.rs, build_pictures): the
    text pieces between images tokenized one by one, an image row where the processor has <image>.
    -> token ids with None at image rows."""
    m = om.m
    tpl, tokens, n = m["chat_template"], m["vision"]["split"]["tokens"], m["vision"]["image_tokens"]
    ids, piece = [], tpl["system_prefix"] + tpl["system_prompt"] + tpl["system_suffix"] + tpl["user_prefix"]

    def image():
        nonlocal piece
        ids.extend(om.encode(piece) if piece else [])
        ids.extend([None] * n)
        piece = ""

    for rows, cols in layouts:
        if rows == 0:
            piece += tpl["image_prefix"]
            image()
            piece += tpl["image_suffix"]
            continue
        for r in range(rows):
            for c in range(cols):
                piece += tokens["fake_image"] + tokens["row_col"].replace("{r}", str(r + 1)).replace("{c}", str(c + 1))
                image()
            piece += "\n"
        piece += "\n" + tokens["fake_image"] + tokens["global_image"]
        image()
        piece += tokens["fake_image"]
    piece += user_text + tpl["user_suffix"] + tpl["assistant_prefix"]
    ids.extend(om.encode(piece))
    return ids


def check_split(ck: str, ref, out: str, max_new: int = 12, fixtures: bool = True) -> Dict:
    """A split model against transformers: (a) the processor's input_ids equal the client's prompt
    (its image token where the client puts image rows), the processor's pixel_values equal the
    committed fixtures (what the Rust preprocessing gives bit for bit); (b) the model's logits and
    greedy ids on the processor's inputs equal ONNX Runtime's, fed as the Rust client feeds it
    (vision graph once per picture over its tiles, rows in prompt order)."""
    from PIL import Image
    from transformers import AutoTokenizer, Idefics3ImageProcessor, Idefics3Processor
    from .ortrun import OrtModel
    om = OrtModel(out)
    m = om.m
    pp = json.load(open(os.path.join(ck, "preprocessor_config.json")))
    n = m["vision"]["image_tokens"]
    proc = Idefics3Processor(image_processor=Idefics3ImageProcessor(**pp), tokenizer=AutoTokenizer.from_pretrained(ck),
                             image_seq_len=n)
    image_id = proc.image_token_id
    tpl = m["chat_template"]
    cases, worst = [], {"logits": 0.0, "image_embeds": 0.0}
    for name, pictures, user_text in SPLIT_CASES:
        imgs = [Image.open(os.path.join(FIXTURES, p + ".png")).convert("RGB") for p in pictures]
        text = tpl["user_prefix"] + "<image>" * len(imgs) + user_text + tpl["user_suffix"] + tpl["assistant_prefix"]
        inputs = proc(images=[imgs], text=[text], return_tensors="pt")
        inputs.pop("token_type_ids", None)  # the tokenizer's; the model takes none
        hf_ids = inputs["input_ids"][0].tolist()
        info = proc.image_processor([imgs], return_row_col_info=True)
        layouts = list(zip(info["rows"][0], info["cols"][0]))
        mine = split_prompt(om, user_text, layouts)
        if [image_id if i is None else i for i in mine] != hf_ids:
            die(f"split prompt {name!r}: the client's ids differ from Idefics3Processor's:\n{mine}\n{hf_ids}")
        px = inputs["pixel_values"][0].numpy()
        start = 0
        for p in pictures if fixtures and m["vision"]["split"].get("splitting", True) else []:
            want = np.fromfile(os.path.join(FIXTURES, p + ".f32"), "<f4").reshape(-1, 3, 32, 32)
            if not np.array_equal(px[start:start + len(want)], want):
                die(f"split prompt {name!r}: the processor's pixel_values for {p} differ from the fixture")
            start += len(want)
        # (b): the vision graph over each picture's frames, rows in prompt order
        rows, start = [], 0
        for (r, c) in layouts:
            frames = r * c + 1
            rows.append(om.image_embeds(px[start:start + frames]).reshape(-1, m["hidden"]))
            start += frames
        rows = np.concatenate(rows, 0)
        with torch.no_grad():
            t_ie = ref.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                pixel_attention_mask=inputs["pixel_attention_mask"])
        worst["image_embeds"] = max(worst["image_embeds"], float(np.abs(rows - t_ie.reshape(rows.shape).numpy()).max()))
        it = iter(rows)
        emb = np.stack([next(it) if i is None else np.asarray(om.embed[i]) for i in mine])[None].astype(om.np_dtype)
        cache = om.empty_cache()
        o_logits = om.step(cache, emb, list(range(emb.shape[1])))["logits"][0]
        with torch.no_grad():
            t_logits = ref(**inputs).logits[0, -1].numpy()
            g = ref.generate(**inputs, max_new_tokens=max_new, do_sample=False, eos_token_id=m["stop_token_ids"],
                             pad_token_id=m["stop_token_ids"][0])[0, len(hf_ids):].tolist()
        worst["logits"] = max(worst["logits"], float(np.abs(o_logits - t_logits).max()))
        # The answer's NLL under teacher forcing: what the client's `score` computes.
        full = torch.cat([inputs["input_ids"], torch.tensor([g])], 1)
        with torch.no_grad():
            lp = torch.log_softmax(ref(input_ids=full, attention_mask=torch.ones_like(full),
                                       pixel_values=inputs["pixel_values"],
                                       pixel_attention_mask=inputs["pixel_attention_mask"]).logits[0].double(), -1)
        nll = -sum(float(lp[len(hf_ids) - 1 + i, t]) for i, t in enumerate(g))
        got = om.generate(emb, max_new)
        if got != g:
            die(f"split prompt {name!r}: ONNX Runtime's greedy ids {got} differ from transformers' {g}")
        cases.append({"name": name, "pictures": [p + ".png" for p in pictures], "user_text": user_text,
                      "rows_cols": [list(map(int, rc)) for rc in layouts], "frames": int(px.shape[0]),
                      "input_ids": hf_ids, "expected_ids": g, "expected_ids_nll": nll,
                      "logits_first8": [float(v) for v in t_logits[:8]]})
    if worst["logits"] > 1e-4 or worst["image_embeds"] > 1e-4:
        die(f"split model vs transformers: {worst} (at most 1e-4)")
    log(f"split: the processor's ids and pixel_values match; vs transformers {worst}, greedy ids equal")
    return {"image_token_id": image_id, "max_abs_err": worst, "cases": cases, "ok": True}


REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LLAVA_CASES = [(["models/fixtures/qwen2vl/chelsea-crop-61x93.png"], None),
               (["models/fixtures/qwen2vl/coffee-crop-130x47.png", "models/fixtures/images/astronaut-224.png"],
                "which one is a cat?")]


def check_llava(ck: str, ref, out: str, max_new: int = 12) -> Dict:
    """LLaVA against transformers with its own processor (CLIPImageProcessor + LlavaProcessor): one
    picture and two in one prompt, the template's text around them; ONNX Runtime fed the processor's
    pixel_values through the vision graph, its rows where the processor has <image>: logits and
    greedy ids equal transformers'. -> the cases (processor ids, answers) for the Rust tests."""
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor
    from .ortrun import OrtModel
    om = OrtModel(out)
    m = om.m
    pp = json.load(open(os.path.join(ck, "preprocessor_config.json")))
    size = m["vision"]["image_size"]
    ip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size=pp["crop_size"], do_center_crop=True,
                            resample=3, image_mean=pp["image_mean"], image_std=pp["image_std"],
                            rescale_factor=pp["rescale_factor"])
    proc = LlavaProcessor(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(ck),
                          patch_size=ref.config.vision_config.patch_size, num_additional_image_tokens=1,
                          vision_feature_select_strategy=ref.config.vision_feature_select_strategy)
    tpl, image_id = m["chat_template"], ref.config.image_token_index
    cases, worst = [], 0.0
    for pictures, user_text in LLAVA_CASES:
        imgs = [Image.open(os.path.join(REPO, p)).convert("RGB") for p in pictures]
        text = "<s>" + tpl["system_prefix"] + tpl["system_prompt"] + tpl["system_suffix"] + tpl["user_prefix"]
        text += "".join(tpl["image_prefix"] + "<image>" + tpl["image_suffix"] for _ in imgs)
        text += (user_text or tpl["default_user_prompt"]) + tpl["user_suffix"] + tpl["assistant_prefix"]
        inputs = proc(images=imgs, text=[text], return_tensors="pt")
        inputs.pop("token_type_ids", None)  # the tokenizer's; the model takes none
        ids = inputs["input_ids"][0].tolist()
        px = inputs["pixel_values"].numpy()  # one vision run a picture, as the client runs it
        rows = np.concatenate([om.image_embeds(px[i:i + 1]).reshape(-1, m["hidden"]) for i in range(len(px))])
        it = iter(rows)
        emb = np.stack([next(it) if i == image_id else np.asarray(om.embed[i]) for i in ids])[None]
        cache = om.empty_cache()
        o_logits = om.step(cache, emb.astype(om.np_dtype), list(range(len(ids))))["logits"][0]
        with torch.no_grad():
            t_logits = ref(**inputs).logits[0, -1].numpy()
            g = ref.generate(**inputs, max_new_tokens=max_new, do_sample=False, eos_token_id=m["stop_token_ids"],
                             pad_token_id=m["stop_token_ids"][0])[0, len(ids):].tolist()
        if g and g[-1] in m["stop_token_ids"]:
            g = g[:-1]
        worst = max(worst, float(np.abs(o_logits - t_logits).max()))
        got = om.generate(emb.astype(om.np_dtype), max_new)
        if got and got[-1] in m["stop_token_ids"]:
            got = got[:-1]
        if got != g:
            die(f"llava with {len(imgs)} picture(s): ONNX Runtime's greedy ids {got} differ from transformers' {g}")
        cases.append({"pictures": pictures, "user_text": user_text, "prompt_ids": ids, "answer_ids": g})
    if worst > 1e-4:
        die(f"llava vs transformers on the processor's inputs: logits differ by {worst} (at most 1e-4)")
    log(f"llava: one and two pictures through LlavaProcessor: logits within {worst:.2g}, greedy ids equal")
    return {"logits_max_abs_err": worst, "cases": cases, "ok": True}


def _keep(out: str, dest: str, image_token: str, cases, max_new: int) -> None:
    """Leaves a self-test export at dest with expected.json, the Rust tests' reference."""
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    shutil.copytree(out, dest)
    write_json(os.path.join(dest, "expected.json"), {
        "note": "the Hugging Face processor's prompt ids and transformers' greedy answers (stop token dropped); "
                "written by python -m export.families --selftest --keep",
        "image_token": image_token, "max_new_tokens": max_new, "cases": cases})


def _check_export(ck: str, ref, family: str, root: str, decoder_format: int, variant: str) -> Dict:
    from .ortrun import OrtModel
    out = os.path.join(root, f"{variant}-onnx-format{decoder_format}")
    export(ck, out, decoder_format=decoder_format)
    om = OrtModel(out)
    # vision
    size = om.m["vision"]["image_size"]
    px = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        if family == "llava":
            t_ie = ref.model.get_image_features(pixel_values=torch.from_numpy(px))
            t_ie = t_ie[0] if isinstance(t_ie, (list, tuple)) else t_ie
        else:
            t_ie = ref.model.get_image_features(pixel_values=torch.from_numpy(px)[:, None])
        t_ie = t_ie.reshape(1, -1, t_ie.shape[-1])
    o_ie = om.image_embeds(px)
    verr = float(np.abs(o_ie - t_ie.numpy()).max())
    # decoder + greedy on a prompt with the image
    pieces = ["USER: ", None, "\ndescribe the image briefly. ASSISTANT:"]
    embs = []
    for p in pieces:
        embs.append(o_ie[0] if p is None else np.asarray(om.embed[om.encode(p)]))
    emb = np.concatenate(embs, 0)[None]
    from .verify import decoder_vs_hf
    dv = decoder_vs_hf(ref, om, emb)
    e = torch.from_numpy(emb)
    with torch.no_grad():
        g = ref.generate(inputs_embeds=e, attention_mask=torch.ones(e.shape[:2], dtype=torch.long),
                         max_new_tokens=12, do_sample=False, eos_token_id=om.m["stop_token_ids"],
                         pad_token_id=om.m["stop_token_ids"][0])[0].tolist()
    got = om.generate(emb, 12)
    from .verify import fast_graph_agrees
    fast = fast_graph_agrees(out, 1e-4)
    got_fast = OrtModel(out, decoder="decoder_fast").generate(emb, 12) if fast else got
    ok = got == g and got_fast == g and verr < 1e-4 and dv["max_abs_err"]["logits"] < 1e-4
    result = {"vision_max_abs_err": verr, **dv, "fast_graph_vs_scores_graph": fast, "greedy_transformers": g,
              "greedy_onnxruntime": got, "greedy_fast_graph": got_fast, "ok": ok}
    log(f"selftest {variant} format {decoder_format}: vision err {verr:.2g}, decoder {dv['max_abs_err']}, "
        f"greedy match {got == g}")
    if not ok:
        die(f"selftest {variant} format {decoder_format} failed: {result}")
    return result


def smolvlm_selftest(shapes: str, keep: str | None) -> Dict:
    """A random SmolVLM of SMOLVLM_SHAPES[shapes] (published widths, 4 text and 4 vision layers, the published
    preprocessor config: image splitting into tiles of 512 or 384): exported in format 2 and checked against
    transformers (vision rows, logits, new K/V, column sums, greedy ids; then through Idefics3Processor with one
    and two split pictures). keep: the export is left there."""
    import time
    root = tempfile.mkdtemp(prefix="ee-smolvlm-")
    try:
        torch.manual_seed(0)
        ck = os.path.join(root, shapes)
        tiny_idefics3(ck, True, shapes)
        ref = load(ck, "idefics3")[1]
        started = time.time()
        r = {"export_and_check": _check_export(ck, ref, "idefics3", root, 2, shapes)}
        r["export_and_check_s"] = round(time.time() - started, 1)
        out = os.path.join(root, f"{shapes}-onnx-format2")
        r["processor"] = check_split(ck, ref, out, fixtures=False)
        r["files_bytes"] = {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))}
        if keep:
            if os.path.isdir(keep):
                shutil.rmtree(keep)
            shutil.copytree(out, keep)
        return r
    finally:
        shutil.rmtree(root, ignore_errors=True)


def write_tiny_split(out: str) -> Dict:
    """The committed tiny split model (models/tiny-idefics3-split) and what transformers gives on it
    (models/fixtures/idefics3/tiny_split_expected.json); deterministic, seeded."""
    torch.manual_seed(0)
    root = tempfile.mkdtemp(prefix="ee-tiny-split-")
    try:
        ck = os.path.join(root, "ckpt")
        tiny_idefics3(ck, splitting=True)
        ref = load(ck, "idefics3")[1]
        export(ck, out, name="tiny-idefics3-split",
               description="tiny random Idefics3 with image splitting (export.families --tiny-split)")
        result = check_split(ck, ref, out, max_new=16)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    doc = {"model": "models/tiny-idefics3-split",
           "written_by": "cd scripts && python -m export.families --tiny-split ../models/tiny-idefics3-split",
           "processor": "Idefics3Processor (Idefics3ImageProcessor with the model's preprocessor settings, "
                        "the tiny tokenizer), transformers greedy generate on its inputs",
           "preprocessor": TINY_SPLIT_PP, **result}
    write_json(os.path.join(FIXTURES, "tiny_split_expected.json"), doc)
    return doc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--name")
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--shapes", choices=sorted(set(QWEN_SHAPES) | set(SMOLVLM_SHAPES)), default="tiny",
                    help="with --selftest: tiny (every family), or one family at published widths with 4 layers: "
                         "qwen2.5-vl-3b (5 minutes, 17 GB of memory), smolvlm-256m, smolvlm-2.2b")
    ap.add_argument("--keep", metavar="DIR",
                    help="with --selftest: leave the tiny Qwen2.5-VL export in DIR/tiny-qwen2_5_vl with the "
                         "transformers answers the Rust tests compare against")
    ap.add_argument("--max-pixels", type=int,
                    help=f"Qwen2.5-VL: the pixel budget of one picture (default {QWEN_MAX_PIXELS} = 1024 tokens, "
                         "or the checkpoint's max_pixels if lower)")
    ap.add_argument("--tiny-split", metavar="OUT_DIR",
                    help="write the tiny split Idefics3 model there and its fixture (models/fixtures/idefics3)")
    add_format_args(ap)
    a = ap.parse_args()
    check_format_args(a)
    if a.selftest and a.shapes in SMOLVLM_SHAPES:
        r = smolvlm_selftest(a.shapes, os.path.join(a.keep, f"random-{a.shapes}") if a.keep else None)
        print(json.dumps(r, indent=1))
        return
    if a.selftest and a.shapes != "tiny":
        root = tempfile.mkdtemp(prefix="ee-families-")
        try:
            r = qwen_selftest(root, os.path.join(a.keep, f"random-{a.shapes}") if a.keep else None, a.shapes)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(json.dumps(r, indent=1))
        return
    if a.tiny_split:
        write_tiny_split(a.tiny_split)
        return
    if a.selftest:
        r = selftest(a.keep)
        print(json.dumps(r, indent=1))
        return
    if not a.checkpoint or not a.out:
        ap.error("CHECKPOINT_DIR and OUT_DIR are required (or --selftest)")
    export(a.checkpoint, a.out, a.dtype, a.name, a.decoder_format, a.decoder_scores == "on",
           max_pixels=a.max_pixels)


if __name__ == "__main__":
    main()
