"""Llama-family decoder written for the elastic-edge graph contract.

The module takes the past K/V of a Rust-owned cache as plain inputs and returns
only what is new, so the cache never lives inside ONNX Runtime:

inputs
  inputs_embeds  [1, T, hidden]            model dtype
  position_ids   [1, T]                    int64, true RoPE positions
  past_key_{l}   [1, S, kv_heads, head_dim] model dtype, post-RoPE
  past_value_{l} [1, S, kv_heads, head_dim] model dtype
  past_bias      [layers, S]               model dtype, additive, one row per layer
                                           (0 / -inf / ln m: each layer merges its
                                           own entries, so each has its own counts)
outputs
  logits         [1, vocab]                float32, last position only
  new_key_{l}    [1, T, kv_heads, head_dim] model dtype, post-RoPE
  new_value_{l}  [1, T, kv_heads, head_dim] model dtype
  attn_colsum_{l} [1, S + T]               float32, attention probability per
                                           key summed over the T queries and
                                           averaged over all query heads

Attention is computed eagerly (softmax in float32) so the column sums are
exact; the past slots may come in any order (keys carry their own RoPE).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

import torch
from torch import nn


@dataclasses.dataclass
class DecoderConfig:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    rms_eps: float
    rope_theta: float
    max_positions: int
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    # Qwen2-VL / Qwen2.5-VL multimodal RoPE: how many of the head's head_dim/2 rotary
    # frequencies take the time, height and width position (None: plain RoPE)
    mrope_section: Optional[List[int]] = None

    @classmethod
    def from_hf(cls, c) -> "DecoderConfig":
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rs = getattr(c, "rope_scaling", None)
        mrope = None
        if rs and (rs.get("type") == "mrope" or "mrope_section" in rs):
            mrope = [int(x) for x in rs["mrope_section"]]
            if len(mrope) != 3 or sum(mrope) != head_dim // 2:
                raise SystemExit(f"error: rope_scaling.mrope_section {mrope} must be three counts summing to "
                                 f"head_dim/2 = {head_dim // 2}")
        elif rs and rs.get("rope_type", rs.get("type", "default")) not in ("default", None):
            raise SystemExit(
                f"error: rope_scaling {rs!r} is not supported by the elastic-edge exporter "
                "(only plain RoPE); export a checkpoint without rope scaling")
        act = getattr(c, "hidden_act", "silu")
        if act != "silu":
            raise SystemExit(f"error: hidden_act {act!r} is not supported (only silu, Llama-style MLP)")
        return cls(
            layers=c.num_hidden_layers,
            heads=c.num_attention_heads,
            kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim,
            hidden=c.hidden_size,
            intermediate=c.intermediate_size,
            vocab=c.vocab_size,
            rms_eps=float(c.rms_norm_eps),
            rope_theta=float(getattr(c, "rope_theta", 10000.0)),
            max_positions=int(getattr(c, "max_position_embeddings", 2048)),
            # Qwen2's q/k/v projections always have a bias (its config has no attention_bias)
            attention_bias=bool(getattr(c, "attention_bias", False)) or c.model_type.startswith("qwen2"),
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            mrope_section=mrope,
        )


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dt)


def rotate_half(x):
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim, bias=b)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=b)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=b)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)

    def forward(self, x, cos, sin, past_k, past_v, mask):
        # x [1,T,hidden]; cos/sin [1,T,1,D]; past_* [1,S,KV,D]; mask [T,S+T] fp32
        c = self.cfg
        T = x.shape[1]
        q = self.q_proj(x).view(1, T, c.heads, c.head_dim)
        k = self.k_proj(x).view(1, T, c.kv_heads, c.head_dim)
        v = self.v_proj(x).view(1, T, c.kv_heads, c.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_all = torch.cat([past_k, k], dim=1)  # [1,S+T,KV,D]
        v_all = torch.cat([past_v, v], dim=1)
        g = c.heads // c.kv_heads
        # query head h = kv * g + j (same grouping as HF repeat_kv)
        qh = q.permute(0, 2, 1, 3).reshape(1, c.kv_heads, g, T, c.head_dim)
        kh = k_all.permute(0, 2, 3, 1).unsqueeze(2)  # [1,KV,1,D,S+T]
        vh = v_all.permute(0, 2, 1, 3).unsqueeze(2)  # [1,KV,1,S+T,D]
        scores = torch.matmul(qh, kh).float() * (1.0 / math.sqrt(c.head_dim))
        scores = scores + mask  # [1,KV,G,T,S+T]
        probs = torch.softmax(scores, dim=-1)
        colsum = probs.sum(dim=3).mean(dim=(1, 2))  # [1,S+T]
        out = torch.matmul(probs.to(x.dtype), vh)  # [1,KV,G,T,D]
        out = out.reshape(1, c.heads, T, c.head_dim).permute(0, 2, 1, 3).reshape(1, T, c.heads * c.head_dim)
        return self.o_proj(out), k, v, colsum


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)


class ContractDecoder(nn.Module):
    """forward(inputs_embeds, position_ids, past_key_0, past_value_0, ..., past_bias)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.layers)])
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, inputs_embeds, position_ids, *rest):
        c = self.cfg
        past = rest[:-1]
        past_bias = rest[-1]
        x = inputs_embeds
        dt = x.dtype
        freqs = position_ids.float()[:, :, None] * self.inv_freq[None, None, :]  # [1,T,D/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # [1,T,1,D]
        cos = emb.cos().to(dt)
        sin = emb.sin().to(dt)
        # mask of layer l [T, S+T]: past entries visible to every new query (+ past_bias[l]),
        # causal among the new ones
        pos0 = position_ids[0]
        zeros_t1 = torch.zeros_like(pos0, dtype=torch.float32)[:, None]  # [T,1]
        idx = torch.ones_like(pos0).cumsum(0)  # [T]
        causal = torch.where(idx[None, :] > idx[:, None],
                             torch.tensor(float("-inf")), torch.tensor(0.0))  # [T,T]
        new_k: List[torch.Tensor] = []
        new_v: List[torch.Tensor] = []
        colsums: List[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            mask = torch.cat([past_bias[i].float()[None, :] + zeros_t1, causal], dim=1)
            a, k, v, cs = layer.self_attn(h, cos, sin, past[2 * i], past[2 * i + 1], mask)
            x = x + a
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            new_k.append(k)
            new_v.append(v)
            colsums.append(cs)
        last = self.norm(x[:, -1, :])
        logits = self.lm_head(last).float()
        outs = [logits]
        for i in range(c.layers):
            outs += [new_k[i], new_v[i]]
        outs += colsums
        return tuple(outs)


def input_names(cfg: DecoderConfig) -> List[str]:
    names = ["inputs_embeds", "position_ids"]
    for l in range(cfg.layers):
        names += [f"past_key_{l}", f"past_value_{l}"]
    names.append("past_bias")
    return names


def output_names(cfg: DecoderConfig) -> List[str]:
    names = ["logits"]
    for l in range(cfg.layers):
        names += [f"new_key_{l}", f"new_value_{l}"]
    names += [f"attn_colsum_{l}" for l in range(cfg.layers)]
    return names


def state_dict_from_hf_llama(sd: Dict[str, torch.Tensor], prefix: str, lm_head_key: str | None,
                             embed_key: str) -> Dict[str, torch.Tensor]:
    """Map a HF Llama text-model state dict (keys under `prefix`) to ContractDecoder keys."""
    out = {}
    for k, v in sd.items():
        if k.startswith(prefix + "layers.") or k == prefix + "norm.weight":
            out[k[len(prefix):]] = v
    if lm_head_key is not None and lm_head_key in sd:
        out["lm_head.weight"] = sd[lm_head_key]
    else:
        out["lm_head.weight"] = sd[embed_key]
    return out


def build_from_state_dict(cfg: DecoderConfig, sd: Dict[str, torch.Tensor], dtype) -> ContractDecoder:
    m = ContractDecoder(cfg)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "inv_freq"]
    if missing or unexpected:
        raise SystemExit(f"error: decoder weights do not match the config: missing={missing[:5]} "
                         f"unexpected={unexpected[:5]}")
    return m.to(dtype).eval()


def example_inputs(cfg: DecoderConfig, dtype, S: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, T, cfg.hidden, generator=g).to(dtype) * 0.05
    pos = torch.arange(S, S + T, dtype=torch.int64)[None, :]
    past = []
    for _ in range(cfg.layers):
        past.append(torch.randn(1, S, cfg.kv_heads, cfg.head_dim, generator=g).to(dtype))
        past.append(torch.randn(1, S, cfg.kv_heads, cfg.head_dim, generator=g).to(dtype))
    bias = torch.zeros(cfg.layers, S, dtype=dtype)
    return (emb, pos, *past, bias)


def export_decoder(model: ContractDecoder, path: str, dtype, opset: int = 17) -> None:
    cfg = model.cfg
    args = example_inputs(cfg, dtype, S=3, T=2)
    ins = input_names(cfg)
    outs = output_names(cfg)
    dyn = {"inputs_embeds": {1: "T"}, "position_ids": {1: "T"}, "past_bias": {1: "S"}, "logits": {}}
    for l in range(cfg.layers):
        dyn[f"past_key_{l}"] = {1: "S"}
        dyn[f"past_value_{l}"] = {1: "S"}
        dyn[f"new_key_{l}"] = {1: "T"}
        dyn[f"new_value_{l}"] = {1: "T"}
        dyn[f"attn_colsum_{l}"] = {1: "S_plus_T"}
    with torch.no_grad():
        torch.onnx.export(model, args, path, input_names=ins, output_names=outs,
                          dynamic_axes=dyn, opset_version=opset, do_constant_folding=True,
                          dynamo=False)
    shapes = {}
    for l in range(cfg.layers):
        shapes[f"new_key_{l}"] = shapes[f"new_value_{l}"] = [1, "T", cfg.kv_heads, cfg.head_dim]
        shapes[f"attn_colsum_{l}"] = [1, "S_plus_T"]
    shapes["logits"] = [1, cfg.vocab]
    set_output_shapes(path, shapes)


def set_output_shapes(path: str, shapes) -> None:
    """Replace the exporter's generated symbolic output dims (e.g. 'Addnew_key_0_dim_3') by the contract's."""
    import onnx
    m = onnx.load(path)
    for o in m.graph.output:
        if o.name in shapes:
            dims = o.type.tensor_type.shape.dim
            del dims[:]
            for v in shapes[o.name]:
                d = dims.add()
                if isinstance(v, str):
                    d.dim_param = v
                else:
                    d.dim_value = v
    onnx.save(m, path)
