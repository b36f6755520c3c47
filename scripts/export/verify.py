"""Verification of exported graphs against PyTorch / transformers.

- decoder vs transformers' LlamaForCausalLM (eager attention, output_attentions) on a
  real image prompt, prefilled in two chunks (first with S=0) plus one decode step:
  max abs diff of last-position logits, new K/V (post-RoPE) and attn_colsum;
- slot-order invariance: the second chunk with its past slots shuffled;
- vision graph vs the torch projector;
- greedy generation through ONNX Runtime (full cache, whole and chunked prefill)
  token-exact against transformers `generate` for the sample images.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np
import torch

from .common import REPO, asset, die, load_image_rgb, log, write_json
from .ortrun import OrtModel

MAX_NEW = 32
FIXTURE = os.path.join(REPO, "models", "fixtures", "demo_expected.json")


def _hf_chunks(hf, emb: torch.Tensor, cuts: List[int]):
    """Run HF over emb split at cuts, returning per chunk (logits_last, keys[l], values[l], colsum[l])."""
    past = None
    res = []
    start = 0
    for end in cuts + [emb.shape[1]]:
        with torch.no_grad():
            o = hf(inputs_embeds=emb[:, start:end], past_key_values=past, use_cache=True, output_attentions=True)
        past = o.past_key_values
        L = len(o.attentions)
        ks = [past.layers[l].keys[:, :, start:end].transpose(1, 2).float().numpy() for l in range(L)]
        vs = [past.layers[l].values[:, :, start:end].transpose(1, 2).float().numpy() for l in range(L)]
        cs = [o.attentions[l].float().sum(2).mean(1).numpy() for l in range(L)]
        res.append((o.logits[:, -1].float().numpy(), ks, vs, cs))
        start = end
    return res


def _same(a, b) -> bool:
    """Equal, floats within float32 rounding (CPUs with other SIMD widths sum in another
    order: the image embeddings' sums moved in the 7th digit between two machines)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and \
            abs(a - b) <= 1e-6 + 1e-5 * max(abs(a), abs(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def write_json_if_changed(path: str, obj) -> None:
    """Writes obj as write_json does, only when it differs from the file's content (ids
    exactly, floats beyond rounding): the main job leaves the tracked fixture alone."""
    if os.path.exists(path):
        with open(path) as f:
            try:
                if _same(json.load(f), obj):
                    return
            except ValueError:
                pass
    write_json(path, obj)
    log(f"  updated {os.path.relpath(path, REPO)}")


def decoder_vs_hf(hf, om: OrtModel, emb: np.ndarray) -> Dict:
    P = emb.shape[1]
    cut = P // 2
    L = om.L
    # one more (decode) token: the greedy next token after the prompt
    cache = om.empty_cache()
    o1 = om.step(cache, emb[:, :cut], list(range(cut)))
    past_k = [k.copy() for k in cache["k"]]
    past_v = [v.copy() for v in cache["v"]]
    o2 = om.step(cache, emb[:, cut:], list(range(cut, P)))
    nxt = int(np.argmax(o2["logits"][0]))
    e3 = np.asarray(om.embed[[nxt]])[None]
    o3 = om.step(cache, e3, [P])
    full = np.concatenate([emb, e3], 1)
    ref = _hf_chunks(hf, torch.from_numpy(full.astype(np.float32)), [cut, P])
    err = {"logits": 0.0, "new_key": 0.0, "new_value": 0.0, "attn_colsum": 0.0}
    for o, (lg, ks, vs, cs) in zip([o1, o2, o3], ref):
        err["logits"] = max(err["logits"], float(np.abs(o["logits"] - lg).max()))
        for l in range(L):
            err["new_key"] = max(err["new_key"], float(np.abs(o[f"new_key_{l}"].astype(np.float32) - ks[l]).max()))
            err["new_value"] = max(err["new_value"], float(np.abs(o[f"new_value_{l}"].astype(np.float32) - vs[l]).max()))
            if f"attn_colsum_{l}" in o:  # a graph exported with --decoder-scores off has none
                err["attn_colsum"] = max(err["attn_colsum"], float(np.abs(o[f"attn_colsum_{l}"] - cs[l]).max()))
    # slot-order invariance: chunk 2 with its past slots shuffled
    perm = np.random.default_rng(0).permutation(cut)
    c2 = om.empty_cache()
    c2["k"] = [k[:, perm] for k in past_k]
    c2["v"] = [v[:, perm] for v in past_v]
    c2["bias"] = np.zeros((L, cut), om.np_dtype)
    o2p = om.step(c2, emb[:, cut:], list(range(cut, P)))
    inv = {"logits": float(np.abs(o2p["logits"] - o2["logits"]).max()),
           "attn_colsum": max((float(np.abs(o2p[f"attn_colsum_{l}"][:, :cut] - o2[f"attn_colsum_{l}"][:, perm]).max())
                               for l in range(L) if f"attn_colsum_{l}" in o2), default=0.0)}
    err = {k: float(v) for k, v in err.items()}
    merged = merged_bias_equivalence(om, past_k, past_v, emb[:, cut:], list(range(cut, P)))
    return {"prompt_tokens": P, "chunks": [cut, P - cut, 1], "max_abs_err": err, "shuffled_past_max_abs_diff": inv,
            "merged_bias_vs_duplicated_entry_max_abs_diff": merged}


def merged_bias_equivalence(om: OrtModel, past_k, past_v, emb: np.ndarray, positions: List[int]) -> float:
    """An entry with past_bias ln(2) must attend exactly like two copies of it. Each layer
    doubles a different entry, so a graph that applied one row to every layer fails."""
    L = om.L
    S = past_k[0].shape[1]
    dup = [(7 * l + 1) % S for l in range(L)]
    copies = om.empty_cache()
    copies["k"] = [np.concatenate([k, k[:, [j]]], 1) for k, j in zip(past_k, dup)]
    copies["v"] = [np.concatenate([v, v[:, [j]]], 1) for v, j in zip(past_v, dup)]
    copies["bias"] = np.zeros((L, S + 1), om.np_dtype)
    biased = om.empty_cache()
    biased["k"] = [k.copy() for k in past_k]
    biased["v"] = [v.copy() for v in past_v]
    biased["bias"] = np.zeros((L, S), om.np_dtype)
    for l, j in enumerate(dup):
        biased["bias"][l, j] = np.log(2.0)
    a = om.step(copies, emb, positions)
    b = om.step(biased, emb, positions)
    diff = float(np.abs(a["logits"] - b["logits"]).max())
    if diff > 1e-3:
        die(f"past_bias ln(2) does not act as a duplicated entry (logits differ by {diff:.3g}): "
            "the decoder does not apply past_bias per layer")
    return diff


def _feed_compressed(om_a: OrtModel, om_b: OrtModel, emb: np.ndarray, decode_ids: List[int],
                     outputs: tuple) -> tuple:
    """Runs two decoders of the same weights on one prompt the way a compressed cache feeds
    them: chunked prefill, a gap in the positions, entries biased by -inf and ln m, then decode
    steps of `decode_ids`; om_b writes into a buffer with NaN-filled spare rows (rows outside
    [S, S+T) must stay as they were). -> (max abs differences of the logits and of each layer's
    `outputs`, largest |logit| of om_a, the steps)."""
    P, gap, L = emb.shape[1], 5, om_a.L
    cuts = [0, P // 3, P // 2, P]
    steps = [(emb[:, a:b], list(range(a + gap * (i > 0), b + gap * (i > 0)))) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    for i, token in enumerate(decode_ids):
        steps.append((np.asarray(om_a.embed[[token]])[None], [P + gap + 2 * i]))
    ca, cb = om_a.empty_cache(), om_b.empty_cache()
    err = {k: 0.0 for k in ("logits",) + tuple(outputs)}
    scale = 0.0
    for i, (e, pos) in enumerate(steps):
        oa = om_a.step(ca, e, pos)
        ob = om_b.step(cb, e, pos, spare=3, fill=np.nan)
        scale = max(scale, float(np.abs(oa["logits"]).max()))
        err["logits"] = max(err["logits"], float(np.abs(oa["logits"] - ob["logits"]).max()))
        for l in range(L):
            for k in outputs:
                diff = oa[f"{k}_{l}"].astype(np.float32) - ob[f"{k}_{l}"].astype(np.float32)
                err[k] = max(err[k], float(np.abs(diff).max()))
        if i == 0:  # compress: drop one entry per layer, weigh another as two merged ones
            S = ca["k"][0].shape[1]
            for c in (ca, cb):
                for l in range(L):
                    c["bias"][l, (3 * l + 1) % S] = -np.inf
                    c["bias"][l, (5 * l + 2) % S] = np.log(2.0)
    return {k: float(v) for k, v in err.items()}, scale, steps


def formats_agree(om1: OrtModel, om2: OrtModel, emb: np.ndarray) -> Dict:
    """The format-1 and format-2 graphs of the same weights, fed as a compressed cache feeds
    them (_feed_compressed, format 2 with the NaN spare rows). -> max abs differences; dies
    above 1e-4."""
    err, _, steps = _feed_compressed(om1, om2, emb, [7, 8, 9], ("new_key", "new_value", "attn_colsum"))
    if max(err.values()) > 1e-4:
        die(f"format-1 and format-2 decoders of the same weights differ: {err}")
    return {"max_abs_diff": err, "steps": [len(p) for _, p in steps], "position_gap": 5, "spare_rows_nan": 3}


def fast_graph_agrees(d: str, tolerance: float, relative: bool = False) -> Dict:
    """The fast graph (no attn_colsum) against the graph with scores, fed as formats_agree
    feeds them. -> max abs differences; dies above `tolerance` (with `relative`, the logits'
    difference over their largest magnitude). Nothing when the model has no fast graph.

    The two differ in summation order only: without probabilities to output, ONNX Runtime's
    fp32 GroupQueryAttention takes another kernel (4e-5 on the demo's logits; fp16 is bit
    equal). int4 with int8 activations (accuracy_level 4) turns such differences into other
    rounding of the activations, layer after layer, so it is held to a relative bound."""
    m = json.load(open(os.path.join(d, "manifest.json")))
    if "decoder_fast" not in m["files"]:
        return {}
    full, fast = OrtModel(d), OrtModel(d, decoder="decoder_fast")
    if any(o.startswith("attn_colsum_") for o in fast.outputs):
        die(f"{m['files']['decoder_fast']} outputs attention sums: it is meant to be the graph without them")
    ids = [(7 * i + 3) % m["vocab"] for i in range(24)]
    emb = np.asarray(full.embed[ids])[None]
    err, scale, _ = _feed_compressed(full, fast, emb, [11, 12, 13], ("new_key", "new_value"))
    measured = err["logits"] / scale if relative else max(err.values())
    if not measured <= tolerance:
        die(f"the fast decoder graph differs from the one with scores: {err}, largest |logit| {scale:.3g} "
            f"(tolerance {tolerance}{' relative' if relative else ''})")
    log(f"  fast graph vs graph with scores: max abs diff {err}, largest |logit| {scale:.3g}")
    return {"max_abs_diff": err, "max_abs_logit": scale, "tolerance": tolerance, "relative": relative}


def hf_generate(hf, emb: np.ndarray, stops: List[int]) -> List[int]:
    e = torch.from_numpy(emb.astype(np.float32))
    with torch.no_grad():
        out = hf.generate(inputs_embeds=e, attention_mask=torch.ones(e.shape[:2], dtype=torch.long),
                          max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
    return out[0].tolist()


def verify_demo(parts, d: str, variant: str, out_dir: str, primary: bool = True) -> Dict:
    """primary: the default build (format 2 with scores), whose greedy ids go into the fixture;
    the others (format 1, no scores) are checked the same way and leave the fixture alone."""
    from .demo import SAMPLE_IMAGES, VARIANTS
    om = OrtModel(d)
    stops = om.m["stop_token_ids"]
    dtype = VARIANTS[variant]
    report: Dict = {"variant": variant}
    imgs = {n: load_image_rgb(asset("skimage", "data", n)) for n in SAMPLE_IMAGES}
    # vision graph vs torch
    vis = parts.vision(dtype)
    verr = 0.0
    for img in imgs.values():
        px = om.pixel_values(img)
        with torch.no_grad():
            t = vis(torch.from_numpy(px)).float().numpy()
        verr = max(verr, float(np.abs(om.image_embeds(px).astype(np.float32) - t).max()))
    report["vision_max_abs_err"] = verr
    if variant.startswith("int4"):
        report["fast_graph_vs_scores_graph"] = fast_graph_agrees(d, 0.1, relative=True)
    else:
        report["fast_graph_vs_scores_graph"] = fast_graph_agrees(d, 2e-2 if om.m["dtype"] == "float16" else 1e-4)
    log(f"  vision vs torch: max abs err {verr:.3g}")
    fixture = json.load(open(FIXTURE)) if os.path.exists(FIXTURE) else None
    old_fixture = fixture
    fast = OrtModel(d, decoder="decoder_fast") if "decoder_fast" in om.m["files"] else None
    if variant == "fp32":
        emb, _, _ = om.prompt(None, imgs[SAMPLE_IMAGES[0]])
        report["decoder_vs_transformers"] = decoder_vs_hf(parts.hf, om, emb)
        log(f"  decoder vs transformers: {report['decoder_vs_transformers']}")
        cases = []
        for n, img in imgs.items():
            emb, ids, ie = om.prompt(None, img)
            ref = hf_generate(parts.hf, emb, stops)
            got = om.generate(emb, MAX_NEW)
            got_chunked = om.generate(emb, MAX_NEW, chunk=16)
            text = om.tok.decode(got, skip_special_tokens=True)
            log(f"  {n}: {text!r}  (transformers match: {got == ref}, chunked prefill match: {got_chunked == ref})")
            got_fast = fast.generate(emb, MAX_NEW) if fast else got
            if got != ref or got_chunked != ref or got_fast != ref:
                die(f"greedy ids for {n} differ from transformers generate:\n  transformers {ref}\n  "
                    f"onnxruntime  {got}\n  chunked      {got_chunked}\n  fast graph   {got_fast}")
            px = om.pixel_values(img)
            # the image already resized to the model's input size, so a client's resize is the identity
            size = om.m["vision"]["image_size"]
            rel = f"models/fixtures/images/{os.path.splitext(n)[0]}-{size}.png"
            os.makedirs(os.path.join(REPO, os.path.dirname(rel)), exist_ok=True)
            from PIL import Image
            img.resize((size, size), Image.BILINEAR).save(os.path.join(REPO, rel))
            cases.append({"image": f"skimage/data/{n}", "image_resized": rel, "pixel_values_sum": float(px.astype(np.float64).sum()),
                          "prompt_ids": ids, "image_embeds_sum": float(ie.astype(np.float64).sum()),
                          "image_embeds_first": [float(x) for x in ie[0, 0, :8]],
                          "expected_ids": {"fp32": got}, "text": {"fp32": text}})
        if not primary:
            report["greedy"] = {c["image"]: {"ids": c["expected_ids"]["fp32"], "text": c["text"]["fp32"],
                                             "token_exact_vs_transformers": True} for c in cases}
            return report
        report["greedy"] = {c["image"]: {"ids": c["expected_ids"]["fp32"], "text": c["text"]["fp32"],
                                         "token_exact_vs_transformers": True} for c in cases}
        fixture = {
            "comment": "Written by scripts/build-demo-model.sh (scripts/export/verify.py). Greedy ids, full cache, "
                       "default prompt, max 32 new tokens, stop ids included; prompt_ids has -1 where the image "
                       "tokens go. fp32 ids are token-exact against transformers generate (whole and chunked "
                       "prefill). Images come from the scikit-image==0.26.0 wheel (.cache/assets/skimage/data); "
                       "image_resized is the same image already resized (PIL bilinear) to the input size: "
                       "preprocessing it gives exactly pixel_values_sum.",
            "model": "demo", "max_new_tokens": MAX_NEW, "user_prompt": om.m["chat_template"]["default_user_prompt"],
            "image_size": om.m["vision"]["image_size"], "stop_token_ids": stops, "cases": cases,
        }
        # The other variants' ids and texts are theirs (checked when they are
        # built): kept, not dropped, so rebuilding fp32 alone (the main job)
        # leaves the tracked fixture as it was.
        kept = {c["image"]: c for c in (old_fixture or {}).get("cases", [])}
        for c in cases:
            before = kept.get(c["image"], {})
            for key in ("expected_ids", "text"):
                for other, value in before.get(key, {}).items():
                    c[key].setdefault(other, value)
        write_json_if_changed(FIXTURE, fixture)
    else:
        if fixture is None:
            die(f"{variant} is checked against the fp32 fixture: build fp32 first")
        agree = {}
        for c in fixture["cases"]:
            n = os.path.basename(c["image"])
            emb, _, _ = om.prompt(None, imgs[n])
            got = om.generate(emb, MAX_NEW)
            ref = c["expected_ids"]["fp32"]
            same = 0
            while same < min(len(got), len(ref)) and got[same] == ref[same]:
                same += 1
            c["expected_ids"][variant] = got
            c["text"][variant] = om.tok.decode(got, skip_special_tokens=True)
            agree[c["image"]] = {"ids": got, "text": c["text"][variant], "same_prefix_as_fp32": same,
                                 "exact": got == ref}
            if fast:
                got_fast = fast.generate(emb, MAX_NEW)
                same_fast = 0
                while same_fast < min(len(got), len(got_fast)) and got[same_fast] == got_fast[same_fast]:
                    same_fast += 1
                agree[c["image"]]["fast_graph"] = {"ids": got_fast, "same_prefix_as_scores_graph": same_fast}
                log(f"    fast graph: {om.tok.decode(got_fast, skip_special_tokens=True)!r}  "
                    f"(first {same_fast} tokens as the graph with scores)")
            log(f"  {n}: {c['text'][variant]!r}  (first {same} tokens as fp32, exact {got == ref})")
        report["greedy_vs_fp32"] = agree
        if primary:
            write_json_if_changed(FIXTURE, fixture)
    return report
