"""A Python reference client of the graph contract with ONNX Runtime.

It does what the Rust side does: embeds tokens from the memory-mapped table,
runs the vision graph, prefills (optionally in chunks, first chunk with S=0),
keeps the cache itself ([1, S, kv_heads, head_dim] per layer), and decodes
greedily. Used by the verification and to write the fixtures.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np

from .common import preprocess, prompt_pieces


class OrtModel:
    def __init__(self, model_dir: str, threads: int = 0):
        import onnxruntime as ort
        self.dir = model_dir
        self.m = json.load(open(os.path.join(model_dir, "manifest.json")))
        m = self.m
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.dec = ort.InferenceSession(os.path.join(model_dir, m["files"]["decoder"]), so,
                                        providers=["CPUExecutionProvider"])
        self.vis = None
        if m.get("vision"):
            self.vis = ort.InferenceSession(os.path.join(model_dir, m["files"]["vision"]), so,
                                            providers=["CPUExecutionProvider"])
        self.np_dtype = np.float16 if m["dtype"] == "float16" else np.float32
        self.embed = np.memmap(os.path.join(model_dir, m["files"]["embed_tokens"]), dtype=self.np_dtype,
                               mode="r", shape=(m["vocab"], m["hidden"]))
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(os.path.join(model_dir, m["files"]["tokenizer"]))
        self.L = m["layers"]

    # ---------------------------------------------------------- pieces
    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.vis.run(None, {"pixel_values": pixel_values.astype(self.np_dtype if self.m["vision"]["input_dtype"] == "float16" else np.float32)})[0]

    def pixel_values(self, img) -> np.ndarray:
        v = self.m["vision"]
        return preprocess(img, v["image_size"], v["mean"], v["std"])

    def prompt(self, user_text: Optional[str], img=None):
        """-> (embeds [1,P,hidden], token ids with -1 at image positions, image_embeds or None)"""
        pieces = prompt_pieces(self.m["chat_template"], user_text, img is not None)
        embs, ids, ie = [], [], None
        if self.m.get("add_bos"):
            ids.append(self.m["bos_token_id"])
            embs.append(np.asarray(self.embed[[self.m["bos_token_id"]]]))
        for p in pieces:
            if p is None:
                ie = self.image_embeds(self.pixel_values(img))
                embs.append(ie[0])
                ids += [-1] * ie.shape[1]
            else:
                t = self.encode(p)
                ids += t
                embs.append(np.asarray(self.embed[t]))
        return np.concatenate(embs, 0)[None].astype(self.np_dtype), ids, ie

    # ---------------------------------------------------------- decoder
    def empty_cache(self):
        m = self.m
        z = np.zeros((1, 0, m["kv_heads"], m["head_dim"]), self.np_dtype)
        return {"k": [z] * self.L, "v": [z] * self.L, "bias": np.zeros((self.L, 0), self.np_dtype), "pos": []}

    def step(self, cache, embeds: np.ndarray, positions: List[int]):
        feed = {"inputs_embeds": embeds.astype(self.np_dtype),
                "position_ids": np.array([positions], np.int64),
                "past_bias": cache["bias"]}
        for l in range(self.L):
            feed[f"past_key_{l}"] = cache["k"][l]
            feed[f"past_value_{l}"] = cache["v"][l]
        names = [o.name for o in self.dec.get_outputs()]
        out = dict(zip(names, self.dec.run(None, feed)))
        T = embeds.shape[1]
        for l in range(self.L):
            cache["k"][l] = np.concatenate([cache["k"][l], out[f"new_key_{l}"]], 1)
            cache["v"][l] = np.concatenate([cache["v"][l], out[f"new_value_{l}"]], 1)
        cache["bias"] = np.concatenate([cache["bias"], np.zeros((self.L, T), self.np_dtype)], 1)
        cache["pos"] += positions
        return out

    def generate(self, embeds: np.ndarray, max_new: int, chunk: int = 0) -> List[int]:
        """Greedy, full cache. chunk>0 prefills in chunks of that many tokens."""
        cache = self.empty_cache()
        P = embeds.shape[1]
        chunk = chunk or P
        out = None
        for s in range(0, P, chunk):
            e = embeds[:, s:s + chunk]
            out = self.step(cache, e, list(range(s, s + e.shape[1])))
        ids: List[int] = []
        stops = set(self.m["stop_token_ids"])
        pos = P
        for _ in range(max_new):
            nxt = int(np.argmax(out["logits"][0]))
            ids.append(nxt)
            if nxt in stops:
                break
            out = self.step(cache, np.asarray(self.embed[[nxt]])[None], [pos])
            pos += 1
        return ids
