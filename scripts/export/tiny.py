"""The tiny test model: random weights, the full graph contract, < 2 MB.

    python -m export.tiny [--out models/tiny] [--fixture models/fixtures/tiny_expected.json]

Deterministic (seeded): regenerating gives the same files and fixture with the pinned
environment of scripts/export/requirements.txt. The fixture's greedy ids come from the
PyTorch reference module (full cache) and are checked against ONNX Runtime here.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from torch import nn

from .common import REPO, AtomicDir, log, preprocess, prompt_pieces, write_json, load_image_rgb
from .decoder import ContractDecoder, DecoderConfig
from .decoder_v2 import export_any
from .manifest import write_manifest

SEED = 1234
IMAGE_SIZE = 32
PATCH = 8
MEAN = [0.5, 0.5, 0.5]
STD = [0.5, 0.5, 0.5]
CFG = DecoderConfig(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=128, vocab=384,
                    rms_eps=1e-5, rope_theta=10000.0, max_positions=1024)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = {
    "system_prefix": "<|im_start|>system\n",
    "system_prompt": "You are a tiny test model.",
    "system_suffix": "<|im_end|>\n",
    "user_prefix": "<|im_start|>user\n",
    "image_prefix": "Picture: ",
    "image_suffix": "\n",
    "default_user_prompt": "Describe the picture.",
    "user_suffix": "<|im_end|>\n",
    "assistant_prefix": "<|im_start|>assistant\n",
    "image_position": "user_before_text",
    "tokenize_pieces_separately": True,
}
PROMPTS = [  # (user text, with image)
    ("Hello, who are you?", False),
    ("Describe the picture.", True),
    ("What colour is the sky in this picture?", True),
]
MAX_NEW = 16
CORPUS = """You are a tiny test model. Describe the picture. What colour is the sky in this picture?
Hello, who are you? The picture shows a cat on a mat. A red gradient, a green gradient and a blue sky.
The quick brown fox jumps over the lazy dog. Pictures of cats, dogs, cars, coffee cups and rockets.
An astronaut in a white suit stands next to a flag. A cup of espresso on a saucer. Answer in one sentence.
""" * 4


class TinyVision(nn.Module):
    """pixel_values [1,3,32,32] -> patchify conv (8x8) -> GELU -> linear -> [1,16,hidden]."""

    def __init__(self, hidden: int):
        super().__init__()
        self.patch = nn.Conv2d(3, 32, kernel_size=PATCH, stride=PATCH)
        self.proj = nn.Linear(32, hidden)

    def forward(self, pixel_values):
        f = nn.functional.gelu(self.patch(pixel_values.float()))  # [1,32,4,4]
        return self.proj(f.flatten(2).transpose(1, 2))  # [1,16,hidden]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CFG.vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    if tok.get_vocab_size() != CFG.vocab:
        # pad with unused added tokens so the vocab matches the embedding table
        tok.add_tokens([f"<|unused{i}|>" for i in range(CFG.vocab - tok.get_vocab_size())])
    assert tok.get_vocab_size() == CFG.vocab, tok.get_vocab_size()
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    return tok


def gradient_image(path: str) -> None:
    from PIL import Image
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    a = np.stack([x * 255 // (IMAGE_SIZE - 1), y * 255 // (IMAGE_SIZE - 1),
                  np.full_like(x, 160)], -1).astype(np.uint8)
    Image.fromarray(a, "RGB").save(path, optimize=True)


def seeded_decoder():
    """The tiny decoder and its embedding table from SEED; the torch RNG is
    left where the vision module's initialisation continues. The policy
    reference (scripts/reference) rebuilds the model through this too."""
    torch.manual_seed(SEED)
    dec = ContractDecoder(CFG)
    with torch.no_grad():
        for n, p in dec.named_parameters():
            if n.endswith("layernorm.weight") or n == "norm.weight":
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (1.5 / p.shape[-1] ** 0.5) * (4.0 if n == "lm_head.weight" else 1.0))
    dec.eval()
    embed = torch.randn(CFG.vocab, CFG.hidden) * 0.5
    return dec, embed


def write_model(dest: str, tok, dec, vis, embed, decoder_format: int):
    """Exports the tiny model to dest in one decoder format; -> its fixture (checked against torch)."""
    with AtomicDir(dest) as tmp:
        log(f"tiny: exporting decoder.onnx (format {decoder_format}) / vision.onnx to {os.path.relpath(dest, REPO)}")
        extra = export_any(dec, os.path.join(tmp, "decoder.onnx"), torch.float32, decoder_format, scores=True)
        with torch.no_grad():
            torch.onnx.export(vis, (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),), os.path.join(tmp, "vision.onnx"),
                              input_names=["pixel_values"], output_names=["image_embeds"], opset_version=17,
                              do_constant_folding=True, dynamo=False)
        embed.numpy().astype("<f4").tofile(os.path.join(tmp, "embed_tokens.bin"))
        tok.save(os.path.join(tmp, "tokenizer.json"))
        gradient_image(os.path.join(tmp, "gradient.png"))
        g = IMAGE_SIZE // PATCH
        vision = {"image_size": IMAGE_SIZE, "height": IMAGE_SIZE, "width": IMAGE_SIZE, "mean": MEAN, "std": STD,
                  "resize": "bilinear_squash", "rescale": 1.0 / 255.0, "channel_order": "RGB", "layout": "NCHW",
                  "input_dtype": "float32", "image_tokens": g * g, "grid": [g, g],
                  "projector": {"kind": "random-patch-linear"}}
        tokens = {"bos_token_id": 1, "add_bos": False, "eos_token_id": 2, "pad_token_id": 2,
                  "stop_token_ids": [2, 0]}
        build = {"key": f"tiny-seed{SEED}-format{decoder_format}", "exporter": "scripts/export/tiny.py",
                 "seed": SEED, "torch": torch.__version__}
        write_manifest(tmp, name="tiny", description="random weights, for tests only", dtype="float32",
                       cfg=CFG, tokens=tokens, vision=vision, chat_template=CHAT_TEMPLATE, build=build,
                       extra_files=["gradient.png"] + extra)
        fixture = reference_fixture(tmp, tok, dec, vis, embed)
        from .verify import fast_graph_agrees
        fast = fast_graph_agrees(tmp, 1e-4)
        if fast:
            fixture["fast_graph_vs_scores_graph"] = fast["max_abs_diff"]
        total = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        log(f"tiny: {total / 1024:.0f} KiB in all")
        if total > 2 * 1024 * 1024:
            raise SystemExit(f"error: tiny model is {total} bytes, over 2 MB")
    return fixture


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "models", "tiny"),
                    help="the format-2 model (the one the tests use)")
    ap.add_argument("--out-format1", default=os.path.join(REPO, "models", "tiny-format1"),
                    help="the same weights with a format-1 decoder (older ONNX Runtime)")
    ap.add_argument("--fixture", default=os.path.join(REPO, "models", "fixtures", "tiny_expected.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    tok = build_tokenizer()
    dec, embed = seeded_decoder()
    vis = TinyVision(CFG.hidden).eval()
    fixture = write_model(a.out, tok, dec, vis, embed, 2)
    fixture_v1 = write_model(a.out_format1, tok, dec, vis, embed, 1)
    for c2, c1 in zip(fixture["cases"], fixture_v1["cases"]):
        if c2["expected_ids"] != c1["expected_ids"]:
            raise SystemExit(f"error: tiny model: format 1 and 2 disagree: {c1['expected_ids']} / {c2['expected_ids']}")
    from .ortrun import OrtModel
    from .verify import formats_agree
    om2, om1 = OrtModel(a.out), OrtModel(a.out_format1)
    emb, _, _ = om2.prompt(PROMPTS[0][0], load_image_rgb(os.path.join(a.out, "gradient.png")))
    fixture["format1_vs_format2"] = formats_agree(om1, om2, emb)
    log(f"tiny: format 1 vs format 2: {fixture['format1_vs_format2']}")
    write_json(a.fixture, fixture)


def torch_greedy(dec: ContractDecoder, embed: torch.Tensor, emb: torch.Tensor, stops):
    """Greedy with a full cache through the reference module; returns ids, prefill outputs, min margin."""
    c = dec.cfg
    past = [torch.zeros(1, 0, c.kv_heads, c.head_dim) for _ in range(2 * c.layers)]
    P = emb.shape[1]
    with torch.no_grad():
        out = dec(emb, torch.arange(P)[None], *past, torch.zeros(c.layers, 0))
    first = out
    ids, margins = [], []
    pos = P
    for _ in range(MAX_NEW):
        lg = out[0][0]
        top2 = torch.topk(lg, 2).values
        margins.append(float(top2[0] - top2[1]))
        nxt = int(lg.argmax())
        ids.append(nxt)
        if nxt in stops:
            break
        past = [torch.cat([past[i], out[1 + i]], 1) for i in range(2 * c.layers)]
        with torch.no_grad():
            out = dec(embed[[nxt]][None], torch.tensor([[pos]]), *past, torch.zeros(c.layers, past[0].shape[1]))
        pos += 1
    return ids, first, min(margins)


def reference_fixture(d: str, tok, dec, vis, embed):
    from .ortrun import OrtModel
    from .verify import merged_bias_equivalence
    om = OrtModel(d)
    stops = om.m["stop_token_ids"]
    img = load_image_rgb(os.path.join(d, "gradient.png"))
    cases = []
    for text, with_image in PROMPTS:
        pieces = prompt_pieces(CHAT_TEMPLATE, text, with_image)
        ids, embs, ie = [], [], None
        for p in pieces:
            if p is None:
                px = preprocess(img, IMAGE_SIZE, MEAN, STD)
                with torch.no_grad():
                    ie = vis(torch.from_numpy(px))
                embs.append(ie[0])
                ids += [-1] * ie.shape[1]
            else:
                t = tok.encode(p, add_special_tokens=False).ids
                ids += t
                embs.append(embed[torch.tensor(t)])
        emb = torch.cat(embs, 0)[None]
        out_ids, first, margin = torch_greedy(dec, embed, emb, stops)
        # the same through ONNX Runtime, the way Rust does it (whole and chunked prefill)
        oemb, oids, oie = om.prompt(text, img if with_image else None)
        assert oids == ids, (oids, ids)
        got = om.generate(oemb, MAX_NEW)
        got_chunked = om.generate(oemb, MAX_NEW, chunk=7)
        if got != out_ids or got_chunked != out_ids:
            raise SystemExit(f"error: tiny model: onnxruntime greedy {got} / chunked {got_chunked} != torch {out_ids}")
        emb_err = float(np.abs(oemb - emb.numpy()).max())
        cut = len(ids) // 2
        half = om.empty_cache()
        om.step(half, oemb[:, :cut], list(range(cut)))
        merged_diff = merged_bias_equivalence(om, half["k"], half["v"], oemb[:, cut:], list(range(cut, len(ids))))
        L = CFG.layers
        case = {
            "user_text": text,
            "image": "models/tiny/gradient.png" if with_image else None,
            "prompt_ids": ids,
            "prompt_len": len(ids),
            "expected_ids": out_ids,
            "expected_text": tok.decode(out_ids, skip_special_tokens=False),
            "min_top2_logit_margin": margin,
            "prefill": {
                "logits_argmax": int(first[0][0].argmax()),
                "logits_first8": [float(x) for x in first[0][0, :8]],
                "logits_sum": float(first[0].double().sum()),
                "new_key_0_sum": float(first[1].double().sum()),
                "attn_colsum_0": [float(x) for x in first[1 + 2 * L][0]],
                f"attn_colsum_{L - 1}_sum": float(first[1 + 2 * L + L - 1].double().sum()),
            },
            "onnxruntime_embeds_max_abs_err": emb_err,
            "merged_bias_vs_duplicated_entry_max_abs_diff": merged_diff,
        }
        if ie is not None:
            px = preprocess(img, IMAGE_SIZE, MEAN, STD)
            case["pixel_values_sum"] = float(px.astype(np.float64).sum())
            case["image_embeds_sum"] = float(ie.double().sum())
            case["image_embeds_first8"] = [float(x) for x in ie[0, 0, :8]]
        cases.append(case)
        log(f"tiny: {text!r} image={with_image}: {len(ids)} prompt tokens -> {out_ids} (margin {margin:.3f})")
    return {
        "comment": "Written by python -m export.tiny (from scripts/). Reference: the PyTorch "
                   "module (float32), greedy, full cache, max 16 new tokens, stop ids included; checked against "
                   "ONNX Runtime 1.31 (whole prefill and chunks of 7). prompt_ids has -1 where the image tokens go; "
                   "text pieces are tokenized separately without special tokens. attn_colsum sums are over S+T=P.",
        "model": "models/tiny", "max_new_tokens": MAX_NEW, "stop_token_ids": [2, 0], "cases": cases,
    }


if __name__ == "__main__":
    main()
