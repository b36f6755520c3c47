"""Shared helpers: paths, hashing, image preprocessing, prompt assembly, atomic output."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CACHE = os.path.join(REPO, ".cache")
ASSETS = os.path.join(CACHE, "assets")  # extracted from the pinned wheels by setup-python.sh

_T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - _T0:7.1f}s] {msg}", flush=True)


def die(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def asset(*parts: str) -> str:
    p = os.path.join(ASSETS, *parts)
    if not os.path.exists(p):
        die(f"missing {p}: run scripts/setup-python.sh first (it downloads and extracts the pinned wheels)")
    return p


# ---------------------------------------------------------------- images

def load_image_rgb(path: str):
    from PIL import Image
    im = Image.open(path)
    return im.convert("RGB")


def preprocess(img, size: int, mean: List[float], std: List[float]) -> np.ndarray:
    """The manifest's "resize": "bilinear_squash": resize the whole image to size x size
    (aspect ratio not kept) with PIL's antialiased bilinear filter, then
    (x / 255 - mean) / std per channel, NCHW float32."""
    from PIL import Image
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32) / 255.0  # HWC
    a = (a - np.array(mean, np.float32)) / np.array(std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None])


# ---------------------------------------------------------------- prompts

def prompt_pieces(tpl: Dict, user_text: Optional[str], with_image: bool) -> List:
    """The prompt as a list of text pieces and the marker None for the image tokens.
    Each text piece is tokenized on its own (no special tokens added) and the ids are
    concatenated; the image embeddings go where None stands."""
    if user_text is None:
        user_text = tpl["default_user_prompt"]
    head = tpl["system_prefix"] + tpl["system_prompt"] + tpl["system_suffix"] + tpl["user_prefix"]
    pieces: List = []
    if with_image:
        pieces += [head + tpl["image_prefix"], None, tpl["image_suffix"] + user_text + tpl["user_suffix"]
                   + tpl["assistant_prefix"]]
    else:
        pieces += [head + user_text + tpl["user_suffix"] + tpl["assistant_prefix"]]
    return pieces


# ---------------------------------------------------------------- atomic output

class AtomicDir:
    """Write a model into DEST.tmp-PID, rename to DEST only when complete."""

    def __init__(self, dest: str):
        self.dest = os.path.abspath(dest)
        self.tmp = f"{self.dest}.tmp-{os.getpid()}"

    def __enter__(self) -> str:
        os.makedirs(os.path.dirname(self.dest), exist_ok=True)
        for name in os.listdir(os.path.dirname(self.dest)):
            full = os.path.join(os.path.dirname(self.dest), name)
            if name.startswith(os.path.basename(self.dest) + ".tmp-"):
                shutil.rmtree(full, ignore_errors=True)  # stale half-written output
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, et, ev, tb):
        if et is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if os.path.exists(self.dest):
            old = f"{self.dest}.old-{os.getpid()}"
            os.rename(self.dest, old)
        os.rename(self.tmp, self.dest)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return False


def file_entries(d: str, names: List[str]) -> Dict[str, Dict]:
    out = {}
    for n in names:
        p = os.path.join(d, n)
        out[n] = {"sha256": sha256_file(p), "bytes": os.path.getsize(p)}
    return out


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
