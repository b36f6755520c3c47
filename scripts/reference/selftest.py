"""Checks of the policy model alone (no decoder): the worked example of ELASTIC_CACHE.md and
hand-computed 8-entry compressions. Run by `python -m reference` before anything else, or alone:
`python -m reference.selftest`."""
from __future__ import annotations

import torch

from .policies import PolicyCache


def _fake_prefill(c: PolicyCache, scores, layers: int = 2):
    T = len(scores)
    x = torch.arange(T, dtype=torch.float32)[:, None, None].expand(T, 1, 2).clone()
    cs = torch.tensor(scores, dtype=torch.float32)
    c.prefill([x.clone() for _ in range(layers)], [-x.clone() for _ in range(layers)], [cs.clone() for _ in range(layers)])


def _worked_example(policy: str, after: int, first: int, evictions: int):
    g = torch.Generator().manual_seed(0)
    c = PolicyCache(policy, 0.5)
    _fake_prefill(c, torch.rand(650, generator=g).tolist())
    assert len(c) == after and c.P == 300, (policy, len(c), c.P)
    first_step = None
    for step in range(1, 201):
        S = len(c)
        ranks_before = [l.pos.tolist() for l in c.layers]
        n_before = c.decode_removals
        k = torch.zeros(1, 1, 2)
        c.decode([k, k], [k, k], [torch.rand(S + 1, generator=g) for _ in range(2)])
        if c.decode_removals > n_before:
            assert c.decode_removals == n_before + 1
            first_step = first_step or step
            for l, removed in enumerate(c.removed_positions[-1]):
                assert ranks_before[l].index(removed) == 300, "eviction not at rank 300"
    assert first_step == first and len(c) == 425 and c.decode_removals == evictions, \
        (policy, first_step, len(c), c.decode_removals)


def _hand_checked():
    # L = 8, keep 0.5 -> excess 4, target 4; candidates are cache indices 1..6
    scores = [1.0, 0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.4]
    c = PolicyCache("elastic-ref", 0.5)
    _fake_prefill(c, scores)
    # perm = argsort([.5,.1,.9,.3,.7,.2]) = [1,5,3,0,4,2], f = 4: kept {r+1 : perm[r] > 4} = {2};
    # thrown {r : perm[r] <= 4} = {0,2,3,4,5} -> all into index 2, which counts itself twice
    l = c.layers[0]
    assert l.pos.tolist() == [0, 2, 7], l.pos.tolist()
    assert torch.allclose(l.k[:, 0, 0], torch.tensor([0.0, 16 / 6, 7.0])), l.k[:, 0, 0]
    assert torch.allclose(l.v[:, 0, 0], -torch.tensor([0.0, 16 / 6, 7.0]))
    c = PolicyCache("elastic", 0.5)
    _fake_prefill(c, scores)
    # anchors: the two best candidates, positions 3 (0.9) and 5 (0.7); 1, 2, 4 (tie -> lower) -> 3; 6 -> 5
    l = c.layers[1]
    assert l.pos.tolist() == [0, 3, 5, 7] and l.m.tolist() == [1, 4, 2, 1], (l.pos.tolist(), l.m.tolist())
    assert torch.allclose(l.k[:, 0, 1], torch.tensor([0.0, 2.5, 5.5, 7.0]))
    assert c.P == 1
    c = PolicyCache("h2o", 0.5)
    _fake_prefill(c, scores)
    assert c.layers[0].pos.tolist() == [0, 3, 6, 7], c.layers[0].pos.tolist()
    c = PolicyCache("local", 0.5)
    _fake_prefill(c, scores)
    assert c.layers[0].pos.tolist() == [0, 5, 6, 7]


def selftest():
    _worked_example("elastic", 325, 2, 100)
    _worked_example("elastic-ref", 324, 4, 99)
    _hand_checked()


if __name__ == "__main__":
    selftest()
    print("ok")
