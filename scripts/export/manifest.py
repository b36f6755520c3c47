"""Writes manifest.json for a model directory (see docs/model-format.md)."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from .common import file_entries, write_json
from .decoder import DecoderConfig

_ONNX_DT = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 16: "bfloat16"}


def graph_io(path: str) -> Dict[str, List[Dict]]:
    import onnx
    m = onnx.load(path, load_external_data=False)

    def desc(vi):
        t = vi.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return {"name": vi.name, "dtype": _ONNX_DT.get(t.elem_type, str(t.elem_type)), "shape": shape}

    inits = {i.name for i in m.graph.initializer}
    return {"inputs": [desc(i) for i in m.graph.input if i.name not in inits],
            "outputs": [desc(o) for o in m.graph.output]}


def write_manifest(d: str, *, name: str, description: str, dtype: str, cfg: DecoderConfig,
                   tokens: Dict, vision: Optional[Dict], chat_template: Dict, build: Dict,
                   extra_files: List[str] = ()) -> Dict:
    """format_version follows the decoder graph: 2 when it takes the pool as its cache
    (an `attention_bias` input), 1 for past and new K/V as separate tensors."""
    files = {"decoder": "decoder.onnx", "embed_tokens": "embed_tokens.bin", "tokenizer": "tokenizer.json"}
    if vision is not None:
        files["vision"] = "vision.onnx"
    from .decoder_v2 import FAST_GRAPH, SHARED_WEIGHTS
    if FAST_GRAPH in extra_files:  # format 2 with scores: decode steps run the graph without them
        files["decoder_fast"] = FAST_GRAPH
        files["decoder_weights"] = SHARED_WEIGHTS
    names = list(dict.fromkeys(list(files.values()) + list(extra_files)))
    graphs = {"decoder": graph_io(os.path.join(d, files["decoder"]))}
    if vision is not None:
        graphs["vision"] = graph_io(os.path.join(d, files["vision"]))
    man = {
        "format": "elastic-edge-model",
        "format_version": 2 if any(i["name"] == "attention_bias" for i in graphs["decoder"]["inputs"]) else 1,
        "name": name,
        "description": description,
        "architecture": "llama",
        "dtype": dtype,
        "layers": cfg.layers,
        "heads": cfg.heads,
        "kv_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden": cfg.hidden,
        "intermediate": cfg.intermediate,
        "vocab": cfg.vocab,
        "rope_theta": cfg.rope_theta,
        **({"mrope_section": cfg.mrope_section} if cfg.mrope_section else {}),
        "rms_eps": cfg.rms_eps,
        "max_positions": cfg.max_positions,
        **tokens,
        "vision": vision,
        "chat_template": chat_template,
        "embed_tokens": {"file": files["embed_tokens"], "dtype": dtype, "shape": [cfg.vocab, cfg.hidden],
                         "byte_order": "little", "layout": "row-major"},
        "files": files,
        "file_hashes": file_entries(d, names),
        "graphs": graphs,
        "build": build,
    }
    write_json(os.path.join(d, "manifest.json"), man)
    return man
