"""A Python reference client of the graph contract with ONNX Runtime.

It does what the Rust side does: embeds tokens from the memory-mapped table,
runs the vision graph, prefills (optionally in chunks, first chunk with S=0),
keeps the cache itself ([1, S, kv_heads, head_dim] per layer), and decodes
greedily. Used by the verification and to write the fixtures.

Both decoder formats: for format 2 each step copies the cache into one
[1, kv_heads, capacity, head_dim] buffer per layer and binds it as both
past and present, as the Rust pool does, then reads the new rows back.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np

from .common import preprocess, prompt_pieces


class OrtModel:
    def __init__(self, model_dir: str, threads: int = 0, decoder: str = "decoder"):
        """decoder: the manifest's files key of the graph to run ("decoder_fast": the one
        without attention sums)."""
        import onnxruntime as ort
        self.dir = model_dir
        self.m = json.load(open(os.path.join(model_dir, "manifest.json")))
        m = self.m
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.dec = ort.InferenceSession(os.path.join(model_dir, m["files"][decoder]), so,
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
        self.format = m["format_version"]
        self.outputs = [o.name for o in self.dec.get_outputs()]

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

    def step(self, cache, embeds: np.ndarray, positions: List[int], spare: int = 0, fill: float = 0.0):
        """Runs the decoder on T new tokens at `positions`, appends their K/V to the cache and
        returns the outputs by name (new_key_l / new_value_l as [1, T, kv_heads, head_dim] in
        both formats). Format 2 only: `spare` free rows after S+T in the buffer, set to `fill`."""
        if self.format == 2:
            return self._step_in_place(cache, embeds, positions, spare, fill)
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

    def _step_in_place(self, cache, embeds: np.ndarray, positions: List[int], spare: int, fill: float):
        import onnxruntime as ort
        L, T, S = self.L, embeds.shape[1], cache["k"][0].shape[1]
        kv, hd, C = self.m["kv_heads"], self.m["head_dim"], S + T + spare
        bias = np.concatenate([cache["bias"], np.zeros((L, T), self.np_dtype)], 1)
        io = self.dec.io_binding()
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds.astype(self.np_dtype)))
        pos = np.asarray(positions, np.int64)  # [T], or [3, T] with multimodal RoPE
        io.bind_cpu_input("position_ids", np.ascontiguousarray(pos if pos.ndim == 2 else pos[None]))
        io.bind_cpu_input("attention_bias", np.ascontiguousarray(bias))
        io.bind_cpu_input("seqlens_k", np.array([S + T - 1], np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(S + T, np.int32))
        pasts = {}
        for l in range(L):
            for which in ("key", "value"):
                buf = np.full((1, kv, C, hd), fill, self.np_dtype)
                buf[0, :, :S] = cache["k" if which == "key" else "v"][l][0].transpose(1, 0, 2)
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                io.bind_ortvalue_input(f"past_{which}_{l}", value)
                io.bind_ortvalue_output(f"present_{which}_{l}", value)
                pasts[which, l] = (buf.copy(), value)  # the OrtValue may share buf's memory
        rest = [n for n in self.outputs if not n.startswith("present_")]
        for n in rest:
            io.bind_output(n)
        self.dec.run_with_iobinding(io)
        got = io.get_outputs()
        out = {n: got[2 * L + i].numpy() for i, n in enumerate(rest)}
        for (which, l), (before, value) in pasts.items():
            after = value.numpy()
            if not np.array_equal(after[0, :, :S], before[0, :, :S], equal_nan=True) or \
                    not np.array_equal(after[0, :, S + T:], before[0, :, S + T:], equal_nan=True):
                raise SystemExit(f"error: the format-2 decoder wrote {which} rows of layer {l} outside [S, S+T)")
            out[f"new_{which}_{l}"] = np.ascontiguousarray(after[:, :, S:S + T].transpose(0, 2, 1, 3))
        for l in range(L):
            cache["k"][l] = np.concatenate([cache["k"][l], out[f"new_key_{l}"]], 1)
            cache["v"][l] = np.concatenate([cache["v"][l], out[f"new_value_{l}"]], 1)
        cache["bias"] = bias
        cache["pos"] += [int(p) for p in (pos if pos.ndim == 1 else pos[0])]
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
