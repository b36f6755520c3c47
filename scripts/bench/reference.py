"""The other engines of scripts/bench-compare.sh, timed the way `elastic-edge bench` times itself.

    reference.py save-hf --gguf FILE --out DIR
    reference.py transformers --model DIR [--dtype float32|float16] --prompt-ids FILE --gen-tokens M --threads N
    reference.py llama --model FILE.gguf --prompt-ids FILE --gen-tokens M --threads N
    reference.py genai --model DIR --prompt-ids FILE --gen-tokens M --threads N

Every timing command feeds exactly the token ids in the prompt file (a JSON array,
written by `elastic-edge bench --write-prompt`), generates exactly M tokens greedily
through any stop token, after one untimed warm-up generation of 8 tokens on the same
prompt, and prints one JSON object on stdout:

  time_to_first_token_ms   prompt in -> first generated token chosen (prefill + one sample)
  prefill_tokens_per_s     prompt tokens / time to first token
  decode_tokens_per_s      (M - 1) / (time from the first to the last generated token)
  step_ms                  {"64": ..., "128": ..., ...}: the median step time over the 32
                           steps ending at that generated token (as elastic-edge bench)
  peak_rss_bytes           ru_maxrss of this process (includes loading)
  first_tokens             the first 16 generated ids (to check it is the same model)

Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

CHECKPOINTS = (64, 128, 256, 512)
WINDOW = 32
WARMUP_TOKENS = 8


def log(msg: str) -> None:
    print(f"[reference] {msg}", file=sys.stderr, flush=True)


def summarise(engine: str, variant: str, prompt: list[int], tokens: list[int], ttft_s: float,
              steps_s: list[float], threads: int, extra: dict | None = None) -> dict:
    """steps_s[i]: time from choosing generated token i to choosing token i + 1."""
    decode_s = sum(steps_s)
    step_ms = {}
    for c in CHECKPOINTS:
        if c <= len(tokens):
            window = steps_s[max(0, c - 1 - WINDOW):c - 1]
            if window:
                step_ms[str(c)] = statistics.median(window) * 1e3
    out = {
        "engine": engine,
        "variant": variant,
        "threads": threads,
        "prompt_tokens": len(prompt),
        "gen_tokens": len(tokens),
        "time_to_first_token_ms": ttft_s * 1e3,
        "prefill_tokens_per_s": len(prompt) / ttft_s,
        "decode_tokens_per_s": (len(tokens) - 1) / decode_s if decode_s > 0 else None,
        "step_ms": step_ms,
        "mean_step_ms": decode_s / len(steps_s) * 1e3 if steps_s else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "first_tokens": tokens[:16],
    }
    out.update(extra or {})
    return out


def load_prompt(path: str) -> list[int]:
    with open(path) as f:
        ids = json.load(f)
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        sys.exit(f"error: {path}: expected a JSON array of token ids")
    return ids


# ------------------------------------------------------------------ save-hf

def save_hf(a) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gdir, gfile = os.path.dirname(a.gguf), os.path.basename(a.gguf)
    log(f"loading {gfile} with transformers (dequantised to float32), as scripts/export/demo.py does")
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
    model.save_pretrained(a.out, safe_serialization=True)
    tok.save_pretrained(a.out)
    # SmolLM2's tokenizer is byte-level BPE (tokenizer.json); the tokenizer.model that
    # save_pretrained writes for a GGUF-loaded tokenizer is not a SentencePiece model,
    # and llama.cpp's converter would try to read it as one.
    spm = os.path.join(a.out, "tokenizer.model")
    if os.path.exists(spm):
        os.remove(spm)
    log(f"wrote {a.out}")


# ------------------------------------------------------------------ transformers

def run_transformers(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval()
    # Greedy through the stop token, like --ignore-stop: no EOS at all.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    prompt = load_prompt(a.prompt_ids)
    ids = torch.tensor([prompt])

    class Clock:
        """A streamer: generate() calls put() with the prompt, then once per new token."""

        def __init__(self):
            self.times: list[float] = []
            self.tokens: list[int] = []
            self.seen_prompt = False

        def put(self, value):
            now = time.perf_counter()
            if not self.seen_prompt:
                self.seen_prompt = True
                return
            self.times.append(now)
            self.tokens.append(int(value.reshape(-1)[0]))

        def end(self):
            pass

    def generate(n: int) -> tuple[float, Clock]:
        clock = Clock()
        with torch.inference_mode():
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, streamer=clock)
        return start, clock

    log(f"transformers {a.dtype}: warm-up")
    generate(WARMUP_TOKENS)
    log(f"transformers {a.dtype}: {len(prompt)} prompt tokens, {a.gen_tokens} generated, {a.threads} threads")
    start, clock = generate(a.gen_tokens)
    steps = [b - x for x, b in zip(clock.times, clock.times[1:])]
    import transformers
    return summarise("transformers", a.dtype, prompt, clock.tokens, clock.times[0] - start, steps, a.threads,
                     {"version": f"transformers {transformers.__version__}, torch {torch.__version__}",
                      "attention": model.config._attn_implementation})


# ------------------------------------------------------------------ llama.cpp

def run_llama(a) -> dict:
    import numpy as np
    import llama_cpp
    prompt = load_prompt(a.prompt_ids)
    n_ctx = len(prompt) + a.gen_tokens + 16
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=n_ctx, n_batch=min(2048, len(prompt)), n_ubatch=512,
                          n_threads=a.threads, n_threads_batch=a.threads, logits_all=False, verbose=False)

    n_vocab = llm.n_vocab()

    def greedy() -> int:
        # The last position's logits, read in place (llama.cpp keeps only those here).
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def generate(n: int) -> tuple[float, list[int], list[float]]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        tok = greedy()
        ttft = time.perf_counter() - start
        tokens, steps = [tok], []
        last = time.perf_counter()
        while len(tokens) < n:
            llm.eval([tok])
            tok = greedy()
            now = time.perf_counter()
            steps.append(now - last)
            last = now
            tokens.append(tok)
        return ttft, tokens, steps

    log(f"llama.cpp {os.path.basename(a.model)}: warm-up")
    generate(WARMUP_TOKENS)
    log(f"llama.cpp {os.path.basename(a.model)}: {len(prompt)} prompt tokens, {a.gen_tokens} generated, {a.threads} threads")
    ttft, tokens, steps = generate(a.gen_tokens)
    variant = os.path.basename(a.model).rsplit(".", 1)[0]
    return summarise("llama.cpp", variant, prompt, tokens, ttft, steps, a.threads,
                     {"version": f"llama-cpp-python {llama_cpp.__version__}", "kv_cache": "f16 (llama.cpp default)",
                      "weights_bytes": os.path.getsize(a.model)})


# ------------------------------------------------------------------ onnxruntime-genai

def run_genai(a) -> dict:
    import onnxruntime_genai as og
    prompt = load_prompt(a.prompt_ids)
    cfg_path = os.path.join(a.model, "genai_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["intra_op_num_threads"] = a.threads
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    model = og.Model(a.model)
    total = len(prompt) + a.gen_tokens

    def generate(n: int) -> tuple[float, list[int], list[float]]:
        params = og.GeneratorParams(model)
        length = len(prompt) + n
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        gen = og.Generator(model, params)
        start = time.perf_counter()
        gen.append_tokens(prompt)
        gen.generate_next_token()
        tokens = [int(gen.get_next_tokens()[0])]
        ttft = time.perf_counter() - start
        steps = []
        last = time.perf_counter()
        while len(tokens) < n and not gen.is_done():
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            now = time.perf_counter()
            steps.append(now - last)
            last = now
        return ttft, tokens, steps

    log(f"onnxruntime-genai {os.path.basename(a.model)}: warm-up")
    generate(WARMUP_TOKENS)
    log(f"onnxruntime-genai {os.path.basename(a.model)}: {len(prompt)} prompt tokens, {a.gen_tokens} generated, {a.threads} threads")
    ttft, tokens, steps = generate(a.gen_tokens)
    if len(tokens) != a.gen_tokens:
        sys.exit(f"error: onnxruntime-genai stopped after {len(tokens)} of {a.gen_tokens} tokens (total {total})")
    weights = sum(os.path.getsize(os.path.join(a.model, f)) for f in os.listdir(a.model)
                  if f.endswith(".onnx") or f.endswith(".onnx.data"))
    return summarise("onnxruntime-genai", os.path.basename(a.model), prompt, tokens, ttft, steps, a.threads,
                     {"version": f"onnxruntime-genai {og.__version__}", "weights_bytes": weights})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save-hf")
    s.add_argument("--gguf", required=True)
    s.add_argument("--out", required=True)
    for name in ("transformers", "llama", "genai"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True)
        s.add_argument("--prompt-ids", required=True)
        s.add_argument("--gen-tokens", type=int, required=True)
        s.add_argument("--threads", type=int, required=True)
        if name == "transformers":
            s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    a = ap.parse_args()
    if a.cmd == "save-hf":
        save_hf(a)
        return
    run = {"transformers": run_transformers, "llama": run_llama, "genai": run_genai}[a.cmd]
    print(json.dumps(run(a)), flush=True)


if __name__ == "__main__":
    main()
