"""Tables of one scripts/bench-compare.sh run: every engine against elastic-edge's full cache.

(a) is elastic-edge's full cache with the whole prompt in one decoder run (what caption does).

    summarise.py RESULTS_DIR

RESULTS_DIR holds elastic-edge-*.json (reports of `elastic-edge bench --json`) and
reference-*.json (one object each from reference.py). Prints markdown on stdout:
for each case (prompt + generated tokens) one row per engine and weights, with the
ratios of decode and prefill speed to (a), elastic-edge's full cache on the weights of
the same precision (fp32 rows to fp32, fp16 to fp16, 4-bit to int4).
"""
from __future__ import annotations

import glob
import json
import os
import sys

# Which elastic-edge variant a reference row is compared with.
PRECISION = {
    "fp32": "fp32", "float32": "fp32", "smollm2-f32": "fp32", "genai-fp32": "fp32",
    "fp16": "fp16", "float16": "fp16", "smollm2-f16": "fp16", "genai-fp16": "fp16",
    "int4": "int4", "SmolLM2-135M-Instruct.Q4_1": "int4", "genai-int4": "int4",
}


def fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def read(path: str):
    """The JSON in path, or None (with a note on stderr) for an empty or broken file: a failed run."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"[summarise] skipping {path}: {e}", file=sys.stderr)
        return None


def load(results: str):
    rows = []
    for path in sorted(glob.glob(os.path.join(results, "elastic-edge-*.json"))):
        rep = read(path)
        if rep is None:
            continue
        variant = rep["model"].removeprefix("demo-")
        chunk = rep.get("prefill_chunk")
        for c in rep["cases"]:
            pol = "full" if c["policy"] == "full" else f"{c['policy']} {c['keep']}"
            if chunk:
                pol += f", prefill chunk {chunk}"
            rows.append({
                "engine": "elastic-edge", "variant": variant, "what": pol, "precision": variant,
                "case": (c["prompt_tokens"], c["gen_tokens"]), "threads": rep["threads"],
                "ttft": c["time_to_first_token_ms"], "prefill": c["prefill_tokens_per_s"],
                "decode": c["decode_tokens_per_s"], "steps": c["step_ms"], "rss": c["peak_rss_bytes"],
                "pool": c["pool_bytes"], "entries": c["cache_entries"], "floor": c["floor_ms"],
                "over_floor": c["step_over_floor"], "mean_step": c["mean_step_ms"],
                "weights": rep["decoder_weight_bytes"], "first": c["first_tokens"],
                "bandwidth": (rep.get("bandwidth") or {}).get("bytes_per_s"),
                "outside": c["outside_run_share"],
            })
    for path in sorted(glob.glob(os.path.join(results, "reference-*.json"))):
        r = read(path)
        if r is None:
            continue
        rows.append({
            "engine": r["engine"], "variant": r["variant"], "what": r["variant"],
            "precision": PRECISION.get(r["variant"], "?"), "case": (r["prompt_tokens"], r["gen_tokens"]),
            "threads": r["threads"], "ttft": r["time_to_first_token_ms"], "prefill": r["prefill_tokens_per_s"],
            "decode": r["decode_tokens_per_s"], "steps": r["step_ms"], "rss": r["peak_rss_bytes"],
            "first": r["first_tokens"], "version": r.get("version", ""),
        })
    return rows


def main() -> None:
    results = sys.argv[1]
    rows = load(results)
    if not rows:
        sys.exit(f"no results in {results}")
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    for case in sorted({r["case"] for r in rows}):
        print(f"\n### {case[0]} prompt tokens + {case[1]} generated\n")
        print("| engine | weights | cache | TTFT ms | prefill tok/s | decode tok/s | step ms @64 | @128 | @256 | @512 "
              "| peak RSS MiB | decode / (a) | prefill / (a) | first 16 tokens = (a) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        here = [r for r in rows if r["case"] == case]
        base = {r["precision"]: r for r in here if r["engine"] == "elastic-edge" and r["what"] == "full"}
        order = {"elastic-edge": 0, "transformers": 1, "llama.cpp": 2, "onnxruntime-genai": 3}
        here.sort(key=lambda r: (["fp32", "fp16", "int4"].index(r["precision"]) if r["precision"] in
                                 ("fp32", "fp16", "int4") else 9, order.get(r["engine"], 9),
                                 "chunk" in r["what"], r["what"] != "full"))
        for r in here:
            a = base.get(r["precision"])
            ratio = (r["decode"] / a["decode"]) if a and r["decode"] else None
            pratio = (r["prefill"] / a["prefill"]) if a and r["prefill"] else None
            same = "-" if not a or r is a else ("yes" if r["first"] == a["first"] else
                                                 f"{sum(x == y for x, y in zip(r['first'], a['first']))}/16")
            cache = r["what"] if r["engine"] == "elastic-edge" else "full"
            s = r["steps"]
            print(f"| {r['engine']} | {r['variant']} | {cache} | {fmt(r['ttft'], '.0f')} | {fmt(r['prefill'], '.0f')} "
                  f"| {fmt(r['decode'])} | {fmt(s.get('64'), '.2f')} | {fmt(s.get('128'), '.2f')} "
                  f"| {fmt(s.get('256'), '.2f')} | {fmt(s.get('512'), '.2f')} | {fmt(mib(r['rss']), '.0f')} "
                  f"| {fmt(ratio, '.2f')}x | {fmt(pratio, '.2f')}x | {same} |")
        ours = [r for r in here if r["engine"] == "elastic-edge"]
        if ours:
            print("\nelastic-edge against the memory-bandwidth floor (bytes a step reads: decoder weights + live K/V):\n")
            print("| weights | cache | pool MiB | entries at end | decoder weights MiB | bandwidth GB/s "
                  "| floor ms | mean step ms | step / floor | outside session.run |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for r in ours:
                print(f"| {r['variant']} | {r['what']} | {fmt(mib(r['pool']), '.2f')} | {r['entries']} "
                      f"| {fmt(mib(r['weights']), '.1f')} | {fmt(r['bandwidth'] and r['bandwidth'] / 1e9, '.2f')} "
                      f"| {fmt(r['floor'], '.2f')} | {fmt(r['mean_step'], '.2f')} | {fmt(r['over_floor'], '.2f')}x "
                      f"| {fmt(r['outside'] * 100, '.1f')}% |")
    versions = sorted({r["version"] for r in rows if r.get("version")})
    if versions:
        print("\n" + "; ".join(versions))


if __name__ == "__main__":
    main()
