"""Export real LVLM families from a Hugging Face checkpoint folder to the graph contract.

    python -m export.families CHECKPOINT_DIR OUT_DIR [--dtype fp32|fp16] [--name NAME]

Supported (by config.json "architectures"/"model_type"):
  LlavaForConditionalGeneration   (LLaVA-1.5: CLIP vision tower, MLP projector, Llama decoder)
  Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration
                                  (SmolVLM / Idefics3: SigLIP-style encoder, pixel-shuffle connector,
                                   Llama decoder; with do_image_splitting the vision graph takes a
                                   batch of tiles, else one global image)
The decoder is re-implemented by export.decoder.ContractDecoder from the checkpoint's
weights; the vision graph wraps the checkpoint's own vision tower + projector.

`python -m export.families --selftest` builds tiny randomly initialised configurations
of both classes (Idefics3 with and without image splitting), exports them and checks ONNX
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

KNOWN = {
    "LlavaForConditionalGeneration": "llava",
    "Idefics3ForConditionalGeneration": "idefics3",
    "SmolVLMForConditionalGeneration": "idefics3",
}


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
    else:
        from transformers import Idefics3ForConditionalGeneration as C
    try:
        model = C.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    except Exception as e:  # missing shards, wrong shapes, ...
        die(f"could not load {ckpt} as {C.__name__}: {e}")
    return cfg, model


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
    where a key is missing), or None when do_image_splitting is false."""
    if not pp.get("do_image_splitting", True):
        return None
    if not pp.get("do_resize", True):
        die("preprocessor_config.json: do_resize false with do_image_splitting is not supported")
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
    side = -(-edge // tile)
    need = [SPLIT_TOKENS["fake_image"], SPLIT_TOKENS["global_image"], SPLIT_TOKENS["image"]]
    need += [SPLIT_TOKENS["row_col"].format(r=r, c=c) for r in range(1, side + 1) for c in range(1, side + 1)]
    missing = [t for t in need if t not in added]
    if missing:
        die(f"tokenizer.json lacks the added tokens {missing[:4]}... that split pictures are written with")
    return {"longest_edge": edge, "tile": tile, "resample": resample, "tokens": dict(SPLIT_TOKENS)}


def export(ckpt: str, out: str, dtype_name: str = "fp32", name: str | None = None, decoder_format: int = 2,
           scores: bool = True, description: str | None = None) -> str:
    check_files(ckpt)
    family = detect(ckpt)
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


def tiny_idefics3(ck: str, splitting: bool):
    """A tiny random Idefics3 checkpoint in ck (tokenizer, weights, preprocessor_config.json)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig
    os.makedirs(ck, exist_ok=True)
    V = _tiny_tokenizer(ck, IDEFICS3_SPECIALS)
    text = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    cfg = Idefics3Config(text_config=text.to_dict(),
                         vision_config={"hidden_size": 32, "intermediate_size": 64,
                                        "num_hidden_layers": 2, "num_attention_heads": 2,
                                        "image_size": 32, "patch_size": 4},
                         scale_factor=2, image_token_id=3)
    model = Idefics3ForConditionalGeneration(cfg)
    pp = dict(TINY_SPLIT_PP) if splitting else {"do_image_splitting": False, "image_mean": [0.5] * 3,
                                                 "image_std": [0.5] * 3, "rescale_factor": 1 / 255}
    _widen(model)
    model.save_pretrained(ck)
    write_json(os.path.join(ck, "preprocessor_config.json"), pp)


def _widen(model) -> None:
    with torch.no_grad():  # random weights: widen the logits so greedy is decisive
        for n, p in model.named_parameters():
            if "norm" not in n and "embed" not in n and p.dim() == 2:
                p.mul_(3.0)


def selftest() -> Dict:
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
            if variant.endswith("-split"):
                results[f"{variant}-processor"] = check_split(ck, ref, os.path.join(root, variant + "-onnx-format2"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["published-configs"] = _check_published_configs()
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
        want = {"longest_edge": edge, "tile": tile, "resample": "lanczos", "tokens": SPLIT_TOKENS}
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


def check_split(ck: str, ref, out: str, max_new: int = 12) -> Dict:
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
        for p in pictures:
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


def _check_export(ck: str, ref, family: str, root: str, decoder_format: int, variant: str) -> Dict:
    from .ortrun import OrtModel
    out = os.path.join(root, f"{variant}-onnx-format{decoder_format}")
    export(ck, out, decoder_format=decoder_format)
    om = OrtModel(out)
    # vision
    px = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
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
    ap.add_argument("--tiny-split", metavar="OUT_DIR",
                    help="write the tiny split Idefics3 model there and its fixture (models/fixtures/idefics3)")
    add_format_args(ap)
    a = ap.parse_args()
    check_format_args(a)
    if a.tiny_split:
        write_tiny_split(a.tiny_split)
        return
    if a.selftest:
        r = selftest()
        print(json.dumps(r, indent=1))
        return
    if not a.checkpoint or not a.out:
        ap.error("CHECKPOINT_DIR and OUT_DIR are required (or --selftest)")
    export(a.checkpoint, a.out, a.dtype, a.name, a.decoder_format, a.decoder_scores == "on")


if __name__ == "__main__":
    main()
