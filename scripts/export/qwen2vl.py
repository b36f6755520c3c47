"""Qwen2.5-VL vision graph (issue #17): dynamic resolution, window attention, patch merger.

    python -m export.qwen2vl --selftest      # tiny random model, ONNX Runtime vs transformers

One image per run (grid_t = 1). The runtime does the preprocessing (Qwen2VLImageProcessor's
smart_resize + PIL bicubic resize + rescale/normalize + patch flattening) and computes the four
index inputs with `vision_index_inputs` (plain integer rules, no model needed); the graph has no
data-dependent loops.

Contract of `vision.onnx` (family qwen2_5_vl). P = patch_size (14), T = temporal_patch_size (2),
m = spatial_merge_size (2), u = m*m, N = grid_h*grid_w patches, M = N/u image tokens:

inputs
  pixel_values    float32 [N, C*T*P*P]  exactly the rows of Qwen2VLImageProcessor's pixel_values for
                                        one image: rows in the merge-grouped order (below), columns
                                        ordered (channel, t, y in patch, x in patch); for a still
                                        image both t slices are the same picture.
  patch_positions int64 [N, 2]          (row, col) of each row's patch in the patch grid, same order
                                        as pixel_values (HF rot_pos_emb's pos_ids). The graph turns
                                        them into the 2-D rotary embedding (inv_freq is a constant).
  window_index    int64 [M]             HF get_window_index's window_index: merged token ids (in the
                                        merge-grouped order) listed window by window.
  window_reverse  int64 [M]             argsort(window_index), applied after the merger.
  window_ids      int64 [N]             window number of each patch of the window-reordered sequence
                                        (patch j of the reordered sequence is patch
                                        u*window_index[j//u] + j%u of the input order).
output
  image_embeds    [1, M, out_hidden]    model dtype (float16 graph: float32 pixel_values in, float16
                                        out); equal to HF model.model.visual(pixel_values, grid_thw).

Row orders (grid_h, grid_w even; hm = grid_h/m, wm = grid_w/m):
  merge-grouped order: row k = ((bi*wm + bj)*m + di)*m + dj  is patch (bi*m+di, bj*m+dj):
    each 2x2 block of patches (one future image token) is 4 consecutive rows, the blocks row-major.
  window order: ws = window_size // m // P merged tokens per window side (4 for Qwen2.5-VL's 112,
    2 for the self-test's 56); windows tile the hm x wm token grid from the top-left (the last
    row/column of windows is cut short, never padded into the sequence); windows in row-major
    order, tokens row-major inside each window. Token (i, j) has merge-grouped id i*wm + j.
  window_ids: 0, 1, ... per non-empty window in that order, repeated for the u patches of each
    token; window layers attend only between equal ids (additive 0/-inf mask from Equal), the
    layers in fullatt_block_indexes attend over all N.

Memory: the attention here is plain eager matmul + softmax over the whole sequence in every layer
(the window layers only mask), so each layer materialises scores [heads, N, N] (plus the softmax
output, both float32 after the float32 softmax) and the graph holds one [N, N] mask. For
Qwen2.5-VL (16 heads): 16*N^2*4 bytes per score tensor, e.g. N = 1024 patches (about 448x448
pixels, 256 image tokens) -> 64 MiB; N = 4096 (~896x896, 1024 tokens) -> 1 GiB; N = 16384
(~1792x1792) -> 16 GiB. Peak is roughly 2-3 such tensors, so a Jetson default of max_pixels
~ 28*28*1024 (N <= 4096) keeps attention near 2-3 GiB; the compute is also O(N^2) per layer.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Dict

import numpy as np
import torch
from torch import nn


# Qwen2-VL's tower has no window attention (every block attends over the whole picture): its window
# inputs are computed with this nominal size and change nothing (the merger reads whole merge groups,
# which the window order keeps together, and the order is undone after it).
QWEN2_VL_WINDOW = 112


def _vc(vision_config, name):
    if name == "window_size" and not (vision_config.get(name) if isinstance(vision_config, dict)
                                      else getattr(vision_config, name, None)):
        return QWEN2_VL_WINDOW
    return vision_config[name] if isinstance(vision_config, dict) else getattr(vision_config, name)


def out_hidden(vision_config) -> int:
    """The merger's output width: out_hidden_size (Qwen2.5-VL) or hidden_size (Qwen2-VL)."""
    return int(getattr(vision_config, "out_hidden_size", None) or vision_config.hidden_size)


def vision_index_inputs(grid_h: int, grid_w: int, vision_config) -> Dict[str, np.ndarray]:
    """The four index inputs of vision.onnx for one image of grid_h x grid_w patches (both even)."""
    m = int(_vc(vision_config, "spatial_merge_size"))
    ws = int(_vc(vision_config, "window_size")) // m // int(_vc(vision_config, "patch_size"))
    if grid_h % m or grid_w % m or grid_h <= 0 or grid_w <= 0:
        raise ValueError(f"grid {grid_h}x{grid_w} is not a positive multiple of the merge size {m}")
    hm, wm = grid_h // m, grid_w // m
    # merge-grouped patch order: k = ((bi*wm + bj)*m + di)*m + dj -> patch (bi*m+di, bj*m+dj)
    bi, bj, di, dj = np.meshgrid(np.arange(hm), np.arange(wm), np.arange(m), np.arange(m), indexing="ij")
    patch_positions = np.stack([(bi * m + di).reshape(-1), (bj * m + dj).reshape(-1)], -1).astype(np.int64)
    # windows of ws x ws merged tokens, row-major windows, row-major inside a window
    i, j = np.meshgrid(np.arange(hm), np.arange(wm), indexing="ij")
    nww = -(-wm // ws)
    win = (i // ws) * nww + (j // ws)                 # window of token (i, j)
    inner = (i % ws) * ws + (j % ws)                  # row-major position inside its window
    token = i * wm + j
    order = np.lexsort((inner.reshape(-1), win.reshape(-1)))  # sort by window, then inner
    window_index = token.reshape(-1)[order].astype(np.int64)
    _, tok_win = np.unique(win.reshape(-1)[order], return_inverse=True)  # renumber non-empty windows 0..W-1
    window_ids = np.repeat(tok_win.astype(np.int64), m * m)
    window_reverse = np.argsort(window_index, kind="stable").astype(np.int64)
    return {"patch_positions": patch_positions, "window_index": window_index,
            "window_reverse": window_reverse, "window_ids": window_ids}


class Qwen25Vision(nn.Module):
    """The checkpoint's own vision tower (`model.model.visual`) driven by the five contract inputs;
    attention is eager matmul + masked softmax, so the graph has no per-window loop."""

    def __init__(self, visual):
        super().__init__()
        self.v = visual
        cfg = visual.config
        self.unit = cfg.spatial_merge_size ** 2
        self.heads = cfg.num_heads
        # Qwen2-VL: every block attends over the whole picture
        self.full = set(getattr(cfg, "fullatt_block_indexes", None) or range(cfg.depth))
        # kept as a python list so .to(float16) of the wrapper cannot round it: float32 constant
        self.inv_freq = visual.rotary_pos_emb.inv_freq.detach().float().tolist()

    def forward(self, pixel_values, patch_positions, window_index, window_reverse, window_ids):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
        v = self.v
        x = v.patch_embed(pixel_values)                          # [N, D], rows in merge-grouped order
        d = x.shape[-1]
        x = x.reshape(-1, self.unit, d)[window_index].reshape(-1, d)   # window order
        inv = torch.tensor(self.inv_freq, dtype=torch.float32)
        freqs = (patch_positions.to(torch.float32)[:, :, None] * inv).flatten(1)  # [N, 2*len(inv)]: row, col
        f = freqs.shape[-1]
        freqs = freqs.reshape(-1, self.unit, f)[window_index].reshape(-1, f)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if len(self.full) == len(v.blocks):
            # Qwen2-VL: no window layers, so window_ids would drop out of the graph; a zero from it
            # keeps the contract's five inputs (exact: the ids are finite).
            x = x + (window_ids[:1, None] * 0).to(x.dtype)
        same = window_ids[:, None] == window_ids[None, :]
        win_mask = torch.where(same, torch.zeros((), dtype=x.dtype), torch.full((), float("-inf"), dtype=x.dtype))
        hd = d // self.heads
        for li, blk in enumerate(v.blocks):
            a = blk.attn
            h = blk.norm1(x)
            qkv = a.qkv(h).reshape(-1, 3, self.heads, hd).permute(1, 0, 2, 3)
            q, k, val = qkv[0], qkv[1], qkv[2]                  # [N, heads, hd]
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, val = q.transpose(0, 1), k.transpose(0, 1), val.transpose(0, 1)  # [heads, N, hd]
            s = torch.matmul(q, k.transpose(1, 2)) * a.scaling
            if li not in self.full:
                s = s + win_mask
            p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
            o = torch.matmul(p, val).transpose(0, 1).reshape(-1, d)
            x = x + a.proj(o)
            x = x + blk.mlp(blk.norm2(x))
        y = v.merger(x)                                          # [M, out_hidden], window order
        return y[window_reverse][None]


INPUT_NAMES = ["pixel_values", "patch_positions", "window_index", "window_reverse", "window_ids"]


def example_inputs(grid_h: int, grid_w: int, vision_config, seed: int = 0) -> Dict[str, np.ndarray]:
    c = int(_vc(vision_config, "in_channels")) * int(_vc(vision_config, "temporal_patch_size")) \
        * int(_vc(vision_config, "patch_size")) ** 2
    px = np.random.default_rng(seed).standard_normal((grid_h * grid_w, c)).astype(np.float32)
    return {"pixel_values": px, **vision_index_inputs(grid_h, grid_w, vision_config)}


def export_vision(model, path: str, dtype=torch.float32, grid=(4, 6)) -> None:
    """Export model.model.visual of a Qwen2_5_VLForConditionalGeneration to the contract above.
    dtype float16: the weights are cast, pixel_values stay a float32 input, image_embeds is float16."""
    from .decoder import set_output_shapes
    import copy
    visual = model.model.visual if hasattr(model, "model") and hasattr(model.model, "visual") else model.visual
    if next(visual.parameters()).dtype != dtype:  # a copy: casting back and forth would round the caller's weights
        visual = copy.deepcopy(visual).to(dtype)
    wrapper = Qwen25Vision(visual)

    class Cast(nn.Module):
        def __init__(s, w):
            super().__init__()
            s.w = w

        def forward(s, px, pos, wi, wr, wid):
            return s.w(px.to(dtype), pos, wi, wr, wid).to(dtype)

    ex = example_inputs(grid[0], grid[1], visual.config)
    args = tuple(torch.from_numpy(ex[n]) for n in INPUT_NAMES)
    dyn = {"pixel_values": {0: "N"}, "patch_positions": {0: "N"}, "window_index": {0: "M"},
           "window_reverse": {0: "M"}, "window_ids": {0: "N"}, "image_embeds": {1: "M"}}
    with torch.no_grad():
        torch.onnx.export(Cast(wrapper).eval(), args, path, input_names=INPUT_NAMES,
                          output_names=["image_embeds"], dynamic_axes=dyn, opset_version=17,
                          do_constant_folding=True, dynamo=False)
    set_output_shapes(path, {"image_embeds": [1, "M", out_hidden(visual.config)]})


# ------------------------------------------------------------------ self-test

TINY_VISION = {"depth": 4, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "patch_size": 14,
               "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
               "fullatt_block_indexes": [1, 3], "in_channels": 3, "hidden_act": "silu"}
TINY_TEXT = {"vocab_size": 300, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
             "rope_scaling": {"type": "mrope", "mrope_section": [4, 4, 4]}}
GRIDS = [(2, 2), (4, 4), (6, 10), (16, 12), (20, 34), (8, 8), (2, 14)]


def tiny_model(seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    vis = dict(TINY_VISION, out_hidden_size=TINY_TEXT["hidden_size"])
    cfg = Qwen2_5_VLConfig(vision_config=vis, text_config=dict(TINY_TEXT), attn_implementation="eager")
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random init is near-identity: widen weights so every part matters
        for n, p in model.model.visual.named_parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
            elif "norm" in n or "ln_q" in n:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def check_index_inputs(visual, grid_h: int, grid_w: int) -> Dict:
    """vision_index_inputs vs transformers' own rot_pos_emb and get_window_index for one grid."""
    got = vision_index_inputs(grid_h, grid_w, visual.config)
    thw = torch.tensor([[1, grid_h, grid_w]])
    with torch.no_grad():
        ref_rot = visual.rot_pos_emb(thw)                      # rotary_pos_emb_full[pos_ids].flatten(1)
        full = visual.rotary_pos_emb(max(grid_h, grid_w))
        mine_rot = full[torch.from_numpy(got["patch_positions"])].flatten(1)
    wi, cu = visual.get_window_index(thw)
    cu = torch.unique_consecutive(torch.tensor(cu))
    lengths = (cu[1:] - cu[:-1]).numpy()
    ref_ids = np.repeat(np.arange(len(lengths)), lengths)
    ok = {"patch_positions": bool(torch.equal(ref_rot, mine_rot)),
          "window_index": bool(np.array_equal(wi.numpy(), got["window_index"])),
          "window_reverse": bool(np.array_equal(torch.argsort(wi).numpy(), got["window_reverse"])),
          "window_ids": bool(np.array_equal(ref_ids, got["window_ids"]))}
    # the rotary check above compares embeddings; also the positions themselves against HF's recipe
    hp = torch.arange(grid_h)[:, None].expand(-1, grid_w)
    wp = torch.arange(grid_w)[None, :].expand(grid_h, -1)
    m = visual.spatial_merge_size
    grp = lambda t: t.reshape(grid_h // m, m, grid_w // m, m).permute(0, 2, 1, 3).flatten()  # noqa: E731
    ok["patch_positions_ids"] = bool(np.array_equal(torch.stack([grp(hp), grp(wp)], -1).numpy(),
                                                    got["patch_positions"]))
    return {"windows": int(len(lengths)), **ok}


def check_window_index_112(grid_h: int, grid_w: int, vc: Dict) -> Dict:
    """window_index / window_ids for a config without building its (large) tower: transformers'
    get_window_index only reads the sizes off self."""
    from types import SimpleNamespace
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel as T
    me = SimpleNamespace(window_size=vc["window_size"], spatial_merge_size=vc["spatial_merge_size"],
                         patch_size=vc["patch_size"], spatial_merge_unit=vc["spatial_merge_size"] ** 2)
    wi, cu = T.get_window_index(me, torch.tensor([[1, grid_h, grid_w]]))
    cu = torch.unique_consecutive(torch.tensor(cu))
    lengths = (cu[1:] - cu[:-1]).numpy()
    got = vision_index_inputs(grid_h, grid_w, vc)
    return {"windows": int(len(lengths)),
            "window_index": bool(np.array_equal(wi.numpy(), got["window_index"])),
            "window_reverse": bool(np.array_equal(torch.argsort(wi).numpy(), got["window_reverse"])),
            "window_ids": bool(np.array_equal(np.repeat(np.arange(len(lengths)), lengths), got["window_ids"]))}


def selftest() -> Dict:
    import onnxruntime as ort
    model = tiny_model()
    visual = model.model.visual
    root = tempfile.mkdtemp(prefix="ee-qwen2vl-")
    out: Dict = {"vision_config": TINY_VISION, "grids": {}}
    try:
        paths = {}
        for name, dt in (("fp32", torch.float32), ("fp16", torch.float16)):
            paths[name] = os.path.join(root, f"vision-{name}.onnx")
            export_vision(model, paths[name], dt)
        out["onnx_bytes"] = {k: os.path.getsize(p) for k, p in paths.items()}
        sess = {k: ort.InferenceSession(p, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
        out["graph_inputs"] = {i.name: [i.type, i.shape] for i in sess["fp32"].get_inputs()}
        out["graph_outputs"] = {o.name: [o.type, o.shape] for o in sess["fp32"].get_outputs()}
        ok = True
        for gh, gw in GRIDS:
            idx = check_index_inputs(visual, gh, gw)
            feeds = example_inputs(gh, gw, visual.config, seed=gh * 100 + gw)
            with torch.no_grad():
                ref = visual(torch.from_numpy(feeds["pixel_values"]), grid_thw=torch.tensor([[1, gh, gw]]))
            ref = ref.reshape(1, -1, ref.shape[-1]).numpy()
            r = {"N": gh * gw, "M": gh * gw // 4, **idx, "ref_abs_max": float(np.abs(ref).max())}
            for k, s in sess.items():
                o = s.run(["image_embeds"], feeds)[0]
                assert o.shape == ref.shape, (o.shape, ref.shape)
                r[f"{k}_dtype"] = str(o.dtype)
                r[f"{k}_max_abs_err"] = float(np.abs(o.astype(np.float32) - ref).max())
            if idx["windows"] > 1:  # the window mask must matter: one window for all gives another answer
                wrong = dict(feeds, window_ids=np.zeros_like(feeds["window_ids"]))
                r["all_one_window_differs_by"] = float(np.abs(sess["fp32"].run(["image_embeds"], wrong)[0] - ref).max())
                idx["mask_matters"] = r["all_one_window_differs_by"] > 1e-2
            r["ok"] = all(idx[k] for k in idx if k != "windows") and r["fp32_max_abs_err"] < 1e-4 \
                and r["fp16_max_abs_err"] < 2e-2 * max(1.0, r["ref_abs_max"])
            ok &= r["ok"]
            out["grids"][f"{gh}x{gw}"] = r
        # the committed preprocessing fixtures (real pictures, their window-56 index inputs) through the graph
        fx = os.path.join(os.path.dirname(__file__), "..", "..", "models", "fixtures", "qwen2vl")
        out["fixtures"] = {}
        for name in sorted(f[:-5] for f in os.listdir(fx) if f.endswith(".json") and f != "smart_resize_cases.json") \
                if os.path.isdir(fx) else []:
            meta = json.load(open(os.path.join(fx, name + ".json")))
            px = np.fromfile(os.path.join(fx, meta["pixel_values"]["file"]), "<f4").reshape(meta["pixel_values"]["shape"])
            ix = meta["index_inputs"]["window_size_56"]
            feeds = {"pixel_values": px, **{k: np.asarray(ix[k], np.int64) for k in INPUT_NAMES[1:]}}
            _, gh, gw = meta["grid_thw"]
            same = all(np.array_equal(feeds[k], v) for k, v in vision_index_inputs(gh, gw, visual.config).items())
            with torch.no_grad():
                ref = visual(torch.from_numpy(px), grid_thw=torch.tensor([meta["grid_thw"]])).numpy()[None]
            err = float(np.abs(sess["fp32"].run(["image_embeds"], feeds)[0] - ref).max())
            out["fixtures"][name] = {"grid": [gh, gw], "index_inputs_match": same, "fp32_max_abs_err": err}
            ok &= same and err < 1e-4
        # Qwen2.5-VL's real window (112 px = 4x4 merged tokens) on the same grids and a few more
        real = {"spatial_merge_size": 2, "patch_size": 14, "window_size": 112}
        w112 = {f"{gh}x{gw}": check_window_index_112(gh, gw, real)
                for gh, gw in GRIDS + [(12, 12), (16, 16), (34, 50), (6, 4), (4, 10)]}
        out["window_112_index_checks"] = w112
        ok &= all(all(v for k, v in r.items() if k != "windows") for r in w112.values())
        out["ok"] = bool(ok)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--selftest", action="store_true")
    a = ap.parse_args()
    if not a.selftest:
        ap.error("only --selftest for now (a checkpoint export needs the qwen2_5_vl decoder family too)")
    r = selftest()
    print(json.dumps(r, indent=1))
    if not r["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
