"""Decoder format 2: the pool is the graph's cache (see docs/model-format.md).

The graph is written node by node with onnx.helper from the same weights as
the format-1 module (decoder.ContractDecoder), in the shape ONNX Runtime's CPU
kernels are fastest at:

  SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (residual
  add fused into the norm), one packed QKV MatMul, GroupQueryAttention with
  RoPE inside at the client's position_ids, one packed gate|up MatMul.

Each layer's K and V are inputs `past_key_{l}` / `past_value_{l}` of shape
[1, kv_heads, C, head_dim] (C = the pool's capacity) and outputs
`present_key_{l}` / `present_value_{l}` of the same shape: the client binds
both to the same pool memory, so GroupQueryAttention appends the T new rows at
slots [S, S+T) in place and copies nothing of the past (checked by
ortrun.OrtModel.step and verify.formats_agree). Inputs besides the cache:

  inputs_embeds          [1, T, hidden]   model dtype
  position_ids           [1, T]           int64, RoPE positions (gaps allowed);
                         [3, T] with multimodal RoPE (Qwen2-VL: time, height, width)
  attention_bias         [layers, S+T]    model dtype, additive per layer and
                                          entry (0, -inf, ln m); the new T are 0
  seqlens_k              [1]              int32, S + T - 1
  total_sequence_length  []               int32, S + T

Outputs: `logits` [1, vocab] float32 (last position), the presents, and with
`scores=True` `attn_colsum_{l}` [1, S+T] float32 (GroupQueryAttention's
post-softmax probabilities, qk_output=2, summed over the T queries and
averaged over the query heads: what the policies read).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List

import numpy as np
import torch

from .decoder import ContractDecoder

GQA_DOMAIN = "com.microsoft"
OPSET = 17
MIN_ORT = "1.22"  # GroupQueryAttention with attention_bias and position_ids
MIN_ORT_SCORES = "1.23"  # ... and qk_output on the CPU provider


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return t.detach().to(torch.float32).numpy().astype(dtype)


def build_graph(model: ContractDecoder, dtype: torch.dtype, scores: bool):
    """-> onnx.ModelProto of the format-2 decoder (weights as initializers)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = model.cfg
    half = dtype == torch.float16
    np_dt = np.float16 if half else np.float32
    onnx_dt = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    nodes: List = []
    inits: List = []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array, name))
        return name

    def node(op: str, ins, outs, domain: str = "", **attrs):
        nodes.append(helper.make_node(op, list(ins), list(outs), domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def linear_t(w: torch.Tensor) -> np.ndarray:  # torch [out, in] -> ONNX MatMul B [in, out]
        return np.ascontiguousarray(_np(w, np_dt).T)

    i64 = lambda name, vals: init(name, np.array(vals, np.int64))
    emb_shape = node("Shape", ["inputs_embeds"], ["embeds_shape"])
    t_dim = node("Slice", [emb_shape, i64("c_1", [1]), i64("c_2", [2])], ["T_dim"])
    if c.mrope_section is None:
        # RoPE caches [max_positions, head_dim / 2], as the format-1 module computes them
        pos = torch.arange(c.max_positions, dtype=torch.float32)[:, None]
        freqs = pos * model.inv_freq.float()[None, :]
        cos = init("rope_cos", freqs.cos().numpy().astype(np_dt))
        sin = init("rope_sin", freqs.sin().numpy().astype(np_dt))
        gqa_positions = "position_ids"
    else:
        cos, sin, gqa_positions = _mrope_tables(c, model, node, init, i64, t_dim, np_dt, onnx_dt)

    # attention_bias [L, S+T] -> per layer [1, 1, T, S+T]
    bias_shape = node("Shape", ["attention_bias"], ["bias_shape"])
    total_dim = node("Slice", [bias_shape, i64("c_1b", [1]), i64("c_2b", [2])], ["total_dim"])
    expand_to = node("Concat", [i64("c_11", [1, 1]), t_dim, total_dim], ["bias_expand_shape"], axis=0)

    x = "inputs_embeds"
    residual = None
    groups = c.heads // c.kv_heads
    for l, layer in enumerate(model.layers):
        a = layer.self_attn
        # norm before attention: the residual add of the previous MLP fused in
        if residual is None:
            h = node("SimplifiedLayerNormalization", [x, init(f"ln_in_{l}", _np(layer.input_layernorm.weight, np_dt))],
                     [f"h_attn_{l}"], axis=-1, epsilon=c.rms_eps, stash_type=1)
            residual = x
        else:
            h, _, _, residual = node("SkipSimplifiedLayerNormalization",
                                     [x, residual, init(f"ln_in_{l}", _np(layer.input_layernorm.weight, np_dt))],
                                     [f"h_attn_{l}", "", "", f"res_attn_{l}"], domain=GQA_DOMAIN, epsilon=c.rms_eps)
        w_qkv = np.concatenate([linear_t(a.q_proj.weight), linear_t(a.k_proj.weight), linear_t(a.v_proj.weight)], 1)
        qkv = node("MatMul", [h, init(f"w_qkv_{l}", w_qkv)], [f"qkv_{l}"])
        if c.attention_bias:
            b = np.concatenate([_np(a.q_proj.bias, np_dt), _np(a.k_proj.bias, np_dt), _np(a.v_proj.bias, np_dt)])
            qkv = node("Add", [qkv, init(f"b_qkv_{l}", b)], [f"qkv_b_{l}"])
        row = node("Gather", ["attention_bias", i64(f"c_layer_{l}", l)], [f"bias_row_{l}"], axis=0)
        row = node("Unsqueeze", [row, i64(f"c_axes_012_{l}", [0, 1, 2])], [f"bias_row4_{l}"])
        bias = node("Expand", [row, expand_to], [f"bias_{l}"])
        outs = [f"attn_{l}", f"present_key_{l}", f"present_value_{l}"]
        if scores:
            outs.append(f"probs_{l}")
        node("GroupQueryAttention",
             [qkv, "", "", f"past_key_{l}", f"past_value_{l}", "seqlens_k", "total_sequence_length",
              cos, sin, gqa_positions, bias],
             outs, domain=GQA_DOMAIN, num_heads=c.heads, kv_num_heads=c.kv_heads, do_rotary=1,
             rotary_interleaved=0, scale=1.0 / float(np.sqrt(c.head_dim)), **({"qk_output": 2} if scores else {}))
        if scores:
            # [1, heads, T, S+T] -> sum over T -> mean over heads -> [1, S+T]
            s = node("ReduceSum", [f"probs_{l}", i64(f"c_axes_2_{l}", [2])], [f"probs_sum_{l}"], keepdims=0)
            if half:
                s = node("Cast", [s], [f"probs_sum32_{l}"], to=TensorProto.FLOAT)
            node("ReduceMean", [s], [f"attn_colsum_{l}"], axes=[1], keepdims=0)
        o = node("MatMul", [f"attn_{l}", init(f"w_o_{l}", linear_t(a.o_proj.weight))], [f"o_{l}"])
        h2, _, _, residual = node("SkipSimplifiedLayerNormalization",
                                  [o, residual, init(f"ln_post_{l}", _np(layer.post_attention_layernorm.weight, np_dt))],
                                  [f"h_mlp_{l}", "", "", f"res_mlp_{l}"], domain=GQA_DOMAIN, epsilon=c.rms_eps)
        m = layer.mlp
        w_gu = np.concatenate([linear_t(m.gate_proj.weight), linear_t(m.up_proj.weight)], 1)
        gu = node("MatMul", [h2, init(f"w_gate_up_{l}", w_gu)], [f"gate_up_{l}"])
        gate, up = node("Split", [gu, i64(f"c_split_{l}", [c.intermediate, c.intermediate])],
                        [f"gate_{l}", f"up_{l}"], axis=-1)
        sig = node("Sigmoid", [gate], [f"gate_sig_{l}"])
        act = node("Mul", [gate, sig], [f"gate_silu_{l}"])
        act = node("Mul", [act, up], [f"act_{l}"])
        x = node("MatMul", [act, init(f"w_down_{l}", linear_t(m.down_proj.weight))], [f"mlp_{l}"])

    # the last position only, then the final norm (its residual add fused) and the head
    last = node("Slice", [x, i64("c_m1", [-1]), i64("c_big", [2 ** 62]), i64("c_ax1", [1])], ["mlp_last"])
    res_last = node("Slice", [residual, "c_m1", "c_big", "c_ax1"], ["res_last"])
    normed = node("SkipSimplifiedLayerNormalization", [last, res_last, init("ln_final", _np(model.norm.weight, np_dt))],
                  ["final_norm"], domain=GQA_DOMAIN, epsilon=c.rms_eps)
    logits = node("MatMul", [normed, init("w_lm_head", linear_t(model.lm_head.weight))], ["logits_3d"])
    if half:
        logits = node("Cast", [logits], ["logits_3d_f32"], to=TensorProto.FLOAT)
    node("Reshape", [logits, i64("c_logits_shape", [1, c.vocab])], ["logits"])

    cache_shape = [1, c.kv_heads, "C", c.head_dim]
    inputs = [helper.make_tensor_value_info("inputs_embeds", onnx_dt, [1, "T", c.hidden]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                            [1 if c.mrope_section is None else 3, "T"]),
              helper.make_tensor_value_info("attention_bias", onnx_dt, [c.layers, "S_plus_T"]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    for l in range(c.layers):
        inputs += [helper.make_tensor_value_info(f"past_key_{l}", onnx_dt, cache_shape),
                   helper.make_tensor_value_info(f"past_value_{l}", onnx_dt, cache_shape)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, c.vocab])]
    for l in range(c.layers):
        outputs += [helper.make_tensor_value_info(f"present_key_{l}", onnx_dt, cache_shape),
                    helper.make_tensor_value_info(f"present_value_{l}", onnx_dt, cache_shape)]
    if scores:
        outputs += [helper.make_tensor_value_info(f"attn_colsum_{l}", TensorProto.FLOAT, [1, "S_plus_T"])
                    for l in range(c.layers)]
    graph = helper.make_graph(nodes, "elastic_edge_decoder_v2", inputs, outputs, initializer=inits)
    mp = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(GQA_DOMAIN, 1)],
                           producer_name="elastic-edge scripts/export/decoder_v2.py")
    mp.ir_version = 10
    return mp


def _mrope_tables(c, model, node, init, i64, t_dim, np_dt, onnx_dt):
    """Multimodal RoPE (Qwen2-VL): position_ids is [3, T] (time, height, width; equal for
    text), and rotary frequency j turns by the component its section names
    (mrope_section: the first s0 frequencies time, the next s1 height, the last s2 width).
    The T tokens' cos/sin rows are computed here, once for all layers, and handed to
    GroupQueryAttention as its cache with the tokens reading rows 0..T-1 (it wants at
    least S+T rows, so the table is padded with zero rows it never reads).
    -> (cos, sin, the positions GroupQueryAttention reads)."""
    from onnx import TensorProto
    component = np.repeat(np.arange(3), c.mrope_section).astype(np.int64)  # [head_dim / 2]
    per_freq = node("Gather", ["position_ids", init("mrope_component", component)], ["mrope_pos"], axis=0)
    per_token = node("Transpose", [per_freq], ["mrope_pos_t"], perm=[1, 0])  # [T, head_dim / 2]
    angles = node("Mul", [node("Cast", [per_token], ["mrope_pos_f"], to=TensorProto.FLOAT),
                          init("mrope_inv_freq", model.inv_freq.float().numpy().astype(np.float32))],
                  ["mrope_angles"])
    total = node("Reshape", [node("Cast", ["total_sequence_length"], ["total_i64"], to=TensorProto.INT64),
                             i64("c_shape_1", [1])], ["total_1"])
    pads = node("Concat", [i64("c_00", [0, 0]), node("Sub", [total, t_dim], ["past_rows"]), i64("c_0", [0])],
                ["mrope_pads"], axis=0)
    tables = []
    for fn in ("Cos", "Sin"):
        v = node(fn, [angles], [f"mrope_{fn.lower()}_f32"])
        if onnx_dt != TensorProto.FLOAT:
            v = node("Cast", [v], [f"mrope_{fn.lower()}_dt"], to=onnx_dt)
        tables.append(node("Pad", [v, pads], [f"mrope_{fn.lower()}"]))
    t_scalar = node("Squeeze", [t_dim, i64("c_axis0", [0])], ["T_scalar"])
    rows = node("Range", [init("c_zero", np.array(0, np.int64)), t_scalar, init("c_one", np.array(1, np.int64))],
                ["mrope_rows"])
    gqa_positions = node("Unsqueeze", [rows, i64("c_axis0u", [0])], ["mrope_rows_2d"])
    return tables[0], tables[1], gqa_positions


FAST_GRAPH = "decoder_fast.onnx"  # the same weights without attn_colsum: what decode steps run
SHARED_WEIGHTS = "decoder.weights"  # one copy of the weights both graphs read
WEIGHTS_MAGIC = b"EEWEIGHT"
WEIGHTS_ALIGN = 64  # every tensor starts at a multiple of this (SIMD loads straight from the map)
INLINE_BELOW = 1024  # bytes: shape constants and the like stay inside the graphs
_ELEM = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16"}


def save(mp, path: str, weights_file: str | None = None) -> None:
    """Saves the graph; with weights_file, the initializers go to that file next to it
    (what a checkpoint over protobuf's 2 GB needs)."""
    import onnx
    if weights_file is None:
        onnx.save(mp, path)
        return
    onnx.save(mp, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=weights_file, size_threshold=1024, convert_attribute=False)


def save_sharing_weights(graphs, d: str) -> None:
    """Writes each graph (file name -> ModelProto) into d with every initializer of
    INLINE_BELOW bytes or more stored once in d/SHARED_WEIGHTS as ONNX external data.

    The file: the tensors, each at a multiple of WEIGHTS_ALIGN, then a JSON index
    {"tensors": [{name, dtype, shape, offset, bytes}]}, then the index's length
    (u64 little-endian) and WEIGHTS_MAGIC. The runtime maps the file once and hands
    the same memory to both sessions (ONNX Runtime's AddInitializer with a shared
    prepacked-weights container), so the second graph costs no second copy; any
    other ONNX Runtime client loads the graphs as ordinary external-data models.
    An initializer of the same name must hold the same bytes in every graph."""
    import struct
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import set_external_data

    index = {}
    with open(os.path.join(d, SHARED_WEIGHTS), "wb") as f:
        for file_name, mp in graphs.items():
            for t in mp.graph.initializer:
                array = numpy_helper.to_array(t)
                data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
                if len(data) < INLINE_BELOW:
                    continue
                if t.data_type not in _ELEM:
                    raise SystemExit(f"error: initializer {t.name} of {file_name} has ONNX type {t.data_type}, "
                                     f"which the weights index does not name")
                entry = index.get(t.name)
                if entry is None:
                    pad = -f.tell() % WEIGHTS_ALIGN
                    f.write(b"\0" * pad)
                    entry = {"name": t.name, "dtype": _ELEM[t.data_type], "shape": list(array.shape),
                             "offset": f.tell(), "bytes": len(data), "data": hashlib.sha256(data).digest()}
                    f.write(data)
                    index[t.name] = entry
                elif entry["data"] != hashlib.sha256(data).digest() or entry["shape"] != list(array.shape):
                    raise SystemExit(f"error: initializer {t.name} differs between the graphs sharing {SHARED_WEIGHTS}")
                t.raw_data = b"\0"  # set_external_data wants a raw_data field to replace
                for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    t.ClearField(field)
                set_external_data(t, SHARED_WEIGHTS, offset=entry["offset"], length=entry["bytes"])
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
        trailer = json.dumps({"tensors": [{k: v for k, v in e.items() if k != "data"} for e in index.values()]},
                             separators=(",", ":")).encode()
        f.write(trailer)
        f.write(struct.pack("<Q", len(trailer)))
        f.write(WEIGHTS_MAGIC)
    for file_name, mp in graphs.items():
        onnx.save(mp, os.path.join(d, file_name))


def export_decoder_v2(model: ContractDecoder, path: str, dtype, scores: bool = True,
                      weights_file: str | None = None, quantize=None) -> List[str]:
    """Writes the format-2 decoder to `path`; with scores and fp32 activations (fp32, int4),
    also the fast graph (no attn_colsum) beside it, both over one shared weights file. quantize: a function
    ModelProto -> ModelProto applied to each graph (int4). -> the extra files written."""
    graph = build_graph(model, dtype, scores)
    if quantize is not None:
        graph = quantize(graph)
    # fp16 keeps one graph with its weights inside: ONNX Runtime 1.31's CPU provider keeps fp32
    # copies of fp16 weights per session (a second session would double them), and through its
    # C API it refuses an fp16 graph whose weights are external data ("The kernel ... doesn't
    # have an implementation that can cache computed pre-packed weights"; its Python API loads it).
    if not scores or dtype == torch.float16:
        save(graph, path, weights_file)
        return []
    fast = build_graph(model, dtype, False)
    if quantize is not None:
        fast = quantize(fast)
    save_sharing_weights({os.path.basename(path): graph, FAST_GRAPH: fast}, os.path.dirname(path))
    return [FAST_GRAPH, SHARED_WEIGHTS]


def add_format_args(ap) -> None:
    """The exporters' shared flags choosing the decoder graph."""
    ap.add_argument("--decoder-format", type=int, choices=(1, 2), default=2,
                    help="2 (default): the pool is the graph's cache (GroupQueryAttention, fused norms; "
                         f"ONNX Runtime >= {MIN_ORT}, >= {MIN_ORT_SCORES} with scores); "
                         "1: past and new K/V as separate tensors, for older runtimes (>= 1.20)")
    ap.add_argument("--decoder-scores", choices=("on", "off"), default="on",
                    help="on (default): the graph also outputs the attention column sums H2O and Elastic "
                         "Cache read; off: without them (what CUDA's GroupQueryAttention needs; policies "
                         "full and local only). Format 1 always has them")


def check_format_args(a) -> None:
    if a.decoder_format == 1 and a.decoder_scores == "off":
        raise SystemExit("error: --decoder-scores off needs --decoder-format 2 (format 1 always outputs the scores)")


def export_any(model: ContractDecoder, path: str, dtype, decoder_format: int, scores: bool,
               quantize=None) -> List[str]:
    """Writes decoder.onnx in the chosen format (format 2 with scores: also the fast graph
    and the shared weights). -> the extra files written beside it."""
    if decoder_format == 1:
        from .decoder import export_decoder
        export_decoder(model, path, dtype)
        if quantize is not None:
            import onnx
            onnx.save(quantize(onnx.load(path)), path)
        return []
    return export_decoder_v2(model, path, dtype, scores, quantize=quantize)
