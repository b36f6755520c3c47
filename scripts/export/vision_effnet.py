"""EfficientNet-Lite0 + the training-free class-name projector of the demo model.

pixel_values [1,3,H,W] -> EfficientNet-Lite0 features [1,1280,H/32,W/32]
-> the ImageNet classifier applied to every spatial cell (a 1x1 "conv")
-> softmax(logits / temperature) -> top-k classes, renormalised
-> image token = sum_k p_k * E[class_k], where E[c] is the mean of the
   decoder's own input embeddings of the sub-tokens of class c's name.
One image token per spatial cell, in row-major order.
"""
from __future__ import annotations

import os
from typing import List

import torch
from torch import nn


def load_effnet(code_dir: str, weights_path: str, image_size: int):
    import sys
    if code_dir not in sys.path:
        sys.path.insert(0, code_dir)
    from efficientnet_lite_pytorch import EfficientNet  # noqa: E402

    m = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    sd = torch.load(weights_path, map_location="cpu", weights_only=True)
    ret = m.load_state_dict(sd, strict=True)
    del ret
    return m.eval()


def imagenet_class_names(info_dir: str) -> List[str]:
    synsets = [l.strip() for l in open(os.path.join(info_dir, "imagenet_synsets.txt")) if l.strip()]
    lemma = {}
    for line in open(os.path.join(info_dir, "imagenet_synset_to_lemma.txt")):
        if "\t" in line:
            k, v = line.rstrip("\n").split("\t", 1)
            lemma[k] = v
    if len(synsets) != 1000:
        raise SystemExit(f"error: expected 1000 ImageNet synsets in {info_dir}, found {len(synsets)}")
    return [lemma[s] for s in synsets]


def class_embeddings(names: List[str], tokenizer, embed: torch.Tensor, lemmas: int = 1) -> torch.Tensor:
    """[1000, hidden]: mean embedding of the sub-tokens of each class name (first `lemmas` synonyms)."""
    rows = []
    for n in names:
        parts = [p.strip() for p in n.split(",") if p.strip()][:lemmas]
        ids: List[int] = []
        for p in parts:
            ids += tokenizer.encode(" " + p, add_special_tokens=False)
        rows.append(embed[torch.tensor(ids)].float().mean(0))
    return torch.stack(rows)


class EffNetProjector(nn.Module):
    def __init__(self, effnet, class_emb: torch.Tensor, topk: int, temperature: float, scale: float):
        super().__init__()
        self.effnet = effnet
        self.register_buffer("class_emb", class_emb.clone())
        self.topk = topk
        self.temperature = temperature
        self.scale = scale

    def forward(self, pixel_values):
        f = self.effnet.extract_features(pixel_values.float())  # [1,1280,h,w]
        f = f.flatten(2).transpose(1, 2)  # [1,N,1280]
        logits = self.effnet._fc(f)  # [1,N,1000]
        p = torch.softmax(logits / self.temperature, dim=-1)
        top_p, top_i = torch.topk(p, self.topk, dim=-1)  # [1,N,k]
        top_p = top_p / top_p.sum(-1, keepdim=True)
        e = self.class_emb[top_i]  # [1,N,k,hidden]
        out = (top_p.unsqueeze(-1) * e).sum(2) * self.scale
        return out.to(self.class_emb.dtype)
