"""Checks of the policy model alone (no decoder): the worked example of ELASTIC_CACHE.md, hand-computed
8-entry compressions for each policy, `elastic` with every component off equal to `elastic-paper`, and
hand-computed 10-entry cases for each component of docs/policies.md. Run by `python -m reference` before
anything else, or alone: `python -m reference.selftest`."""
from __future__ import annotations

import torch

from .policies import (GENERATED, IMAGE, PAPER, TEMPLATE, USER, PolicyCache, Settings, generated_kind,
                       image_kind, template_kind, user_kind)


def _fake_prefill(c: PolicyCache, scores, layers: int = 2, kinds=None):
    """Key = position, value = -position (one KV head, two dims), the same scores in every layer."""
    T = len(scores)
    x = torch.arange(T, dtype=torch.float32)[:, None, None].expand(T, 1, 2).clone()
    cs = torch.tensor(scores, dtype=torch.float32)
    c.prefill([x.clone() for _ in range(layers)], [-x.clone() for _ in range(layers)],
              [cs.clone() for _ in range(layers)], kinds)


def _decode(c: PolicyCache, colsum, layers: int = 2):
    """One decode step: the new token's key = value = 100 + its position."""
    k = torch.full((1, 1, 2), 100.0 + c.n)
    cs = torch.tensor(colsum, dtype=torch.float32)
    c.decode([k.clone() for _ in range(layers)], [k.clone() for _ in range(layers)],
             [cs.clone() for _ in range(layers)])


def _worked_example(policy: str, after: int, first: int, evictions: int, settings: Settings = PAPER):
    g = torch.Generator().manual_seed(0)
    c = PolicyCache(policy, 0.5, settings)
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
    for policy in ("elastic-paper", "elastic"):
        c = PolicyCache(policy, 0.5)
        _fake_prefill(c, scores)
        # anchors: the two best candidates, positions 3 (0.9) and 5 (0.7); 1, 2, 4 (tie -> lower) -> 3; 6 -> 5
        l = c.layers[1]
        assert l.pos.tolist() == [0, 3, 5, 7] and l.m.tolist() == [1, 4, 2, 1], (l.pos.tolist(), l.m.tolist())
        assert torch.allclose(l.k[:, 0, 1], torch.tensor([0.0, 2.5, 5.5, 7.0]))
        # the merged importance is the sum: 3 <- 1, 2, 4: .9+.5+.1+.3; 5 <- 6: .7+.2
        assert torch.allclose(l.score, torch.tensor([1.0, 1.8, 0.9, 0.4])), l.score
        assert c.P == 1
    c = PolicyCache("h2o", 0.5)
    _fake_prefill(c, scores)
    assert c.layers[0].pos.tolist() == [0, 3, 6, 7], c.layers[0].pos.tolist()
    c = PolicyCache("local", 0.5)
    _fake_prefill(c, scores)
    assert c.layers[0].pos.tolist() == [0, 5, 6, 7]


def _same(a: PolicyCache, b: PolicyCache):
    assert len(a) == len(b) and a.P == b.P and a.target == b.target
    assert a.removed_positions == b.removed_positions and a.decode_removals == b.decode_removals
    for la, lb in zip(a.layers, b.layers):
        for f in ("pos", "k", "v", "m", "score", "kind"):
            assert torch.equal(getattr(la, f), getattr(lb, f)), f


def _elastic_off_is_paper():
    """docs/policies.md: all components off and distance 25 is elastic-paper exactly (random scores, a text
    / image / text prompt, 60 decode steps with random column sums)."""
    for keep in (0.2, 0.5, 0.8):
        g = torch.Generator().manual_seed(int(keep * 10))
        kinds = [template_kind()] * 10 + [image_kind(0, r) for r in range(30)] + [user_kind()] * 12 \
            + [template_kind()] * 8
        scores = torch.rand(60, generator=g).tolist()
        caches = [PolicyCache("elastic-paper", keep), PolicyCache("elastic", keep, PAPER),
                  PolicyCache("elastic", keep, Settings(distance=25, merge_window=None))]
        for c in caches:
            _fake_prefill(c, scores, kinds=kinds)
        for _ in range(60):
            cs = torch.rand(len(caches[0]) + 1, generator=g).tolist()
            for c in caches:
                _decode(c, cs)
        for c in caches[1:]:
            _same(caches[0], c)
        assert caches[0].decode_removals > 0


# The 10-entry layer of the component cases: template, template, picture 0 (4 rows), user, user,
# template, template (the end of the chat template).
KINDS10 = [template_kind(), template_kind()] + [image_kind(0, r) for r in range(4)] + [user_kind()] * 2 \
    + [template_kind()] * 2


def _layer(c: PolicyCache, i: int = 0):
    l = c.layers[i]
    return l.pos.tolist(), l.m.tolist()


def _protect_instruction():
    # The user text (positions 6, 7) scores lowest. keep 0.8: L = 10, target 8.
    scores = [5.0, 0.9, 0.8, 0.1, 0.7, 0.2, 0.05, 0.04, 0.6, 0.5]
    c = PolicyCache("elastic", 0.8, PAPER)
    _fake_prefill(c, scores, kinds=KINDS10)
    # paper: tail 1; candidates 1..8, 6 anchors: 1, 2, 4, 8, 5, 3; 6 -> 5, 7 -> 8: the instruction merged away
    assert _layer(c) == ([0, 1, 2, 3, 4, 5, 8, 9], [1, 1, 1, 1, 1, 2, 2, 1]), _layer(c)
    assert c.tail == [1, 1]
    c = PolicyCache("elastic", 0.8, PAPER.with_(protect_instruction=True))
    _fake_prefill(c, scores, kinds=KINDS10)
    # instruction = entries after the last image entry (5) = 4, tail = max(1, min(4, 8 // 2)) = 4: 6..9 kept;
    # candidates 1..5, 3 anchors: 1, 2, 4; 3 -> 2 (tie: lower), 5 -> 4
    assert c.tail == [4, 4]
    assert _layer(c) == ([0, 1, 2, 4, 6, 7, 8, 9], [1, 1, 2, 2, 1, 1, 1, 1]), _layer(c)
    assert c.layers[0].kind[:, 0].tolist() == [TEMPLATE, TEMPLATE, IMAGE, IMAGE, USER, USER, TEMPLATE, TEMPLATE]
    # keep 0.5, target 5: the share caps the tail at floor(5 / 2) = 2
    c = PolicyCache("elastic", 0.5, PAPER.with_(protect_instruction=True))
    _fake_prefill(c, scores, kinds=KINDS10)
    assert c.tail == [2, 2] and _layer(c)[0] == [0, 1, 2, 8, 9], (c.tail, _layer(c))
    # text only: instruction = from the first user entry (2) to the end = 8; keep 0.8 -> tail min(8, 4) = 4
    text = [template_kind()] * 2 + [user_kind()] * 5 + [template_kind()] * 3
    c = PolicyCache("elastic", 0.8, PAPER.with_(protect_instruction=True))
    _fake_prefill(c, scores, kinds=text)
    assert c.tail == [4, 4], c.tail
    # no image and no user entry: instruction 0, tail = protect
    c = PolicyCache("elastic", 0.8, PAPER.with_(protect_instruction=True))
    _fake_prefill(c, scores, kinds=[template_kind()] * 10)
    assert c.tail == [1, 1], c.tail
    # elastic-ref ignores the component
    c = PolicyCache("elastic-ref", 0.8, PAPER.with_(protect_instruction=True))
    _fake_prefill(c, scores, kinds=KINDS10)
    assert c.tail == [1, 1]


# Anchors at keep 0.5 (target 5, K = 3) for these scores: 1 (template), 3 (image row 1), 7 (user).
SCORES_MERGE = [5.0, 0.9, 0.1, 0.8, 0.2, 0.3, 0.05, 0.7, 0.04, 0.5]


def _bounded_merging():
    c = PolicyCache("elastic", 0.5, PAPER)
    _fake_prefill(c, SCORES_MERGE, kinds=KINDS10)
    # paper: 2 -> 1 (tie with 3: lower), 4 -> 3, 5 -> 3 (tie with 7: lower), 6 -> 7, 8 -> 7:
    # the image row 2 goes into the template anchor 1
    assert _layer(c) == ([0, 1, 3, 7, 9], [1, 2, 3, 3, 1]), _layer(c)
    assert torch.allclose(c.layers[0].k[:, 0, 0], torch.tensor([0.0, 1.5, 4.0, 7.0, 9.0]))
    assert c.prompt_dropped == [0, 0]

    c = PolicyCache("elastic", 0.5, PAPER.with_(merge_kind=True))
    _fake_prefill(c, SCORES_MERGE, kinds=KINDS10)
    # merge_kind: image rows 2, 4, 5 only into the image anchor 3; 6 (user), 8 (template) into 7 (the text
    # class: template and user together); nothing into 1
    assert _layer(c) == ([0, 1, 3, 7, 9], [1, 1, 4, 3, 1]), _layer(c)
    l = c.layers[1]
    assert torch.allclose(l.k[:, 0, 0], torch.tensor([0.0, 1.0, 3.5, 7.0, 9.0]))
    assert l.kind.tolist() == [list(template_kind()), list(template_kind()), list(image_kind(0, 1)),
                               list(user_kind()), list(template_kind())]  # an anchor keeps its own kind

    c = PolicyCache("elastic", 0.5, PAPER.with_(merge_window=1))
    _fake_prefill(c, SCORES_MERGE, kinds=KINDS10)
    # merge_window 1: 2 -> 1 (tie: lower), 4 -> 3, 6 -> 7, 8 -> 7; 5 is 2 from both 3 and 7: dropped
    assert _layer(c) == ([0, 1, 3, 7, 9], [1, 2, 2, 3, 1]), _layer(c)
    assert torch.allclose(c.layers[0].k[:, 0, 0], torch.tensor([0.0, 1.5, 3.5, 7.0, 9.0]))
    assert c.prompt_dropped == [1, 1] and c.prompt_removed == 5

    c = PolicyCache("elastic", 0.5, PAPER.with_(merge_window=1, merge_kind=True))
    _fake_prefill(c, SCORES_MERGE, kinds=KINDS10)
    # both: 2 -> 3 (the only image anchor within 1), 4 -> 3, 5 dropped, 6 -> 7, 8 -> 7
    assert _layer(c) == ([0, 1, 3, 7, 9], [1, 1, 3, 3, 1]), _layer(c)
    assert c.prompt_dropped == [1, 1]

    # merge_window 0: every member dropped (evict-only elastic)
    c = PolicyCache("elastic", 0.5, PAPER.with_(merge_window=0))
    _fake_prefill(c, SCORES_MERGE, kinds=KINDS10)
    assert _layer(c) == ([0, 1, 3, 7, 9], [1] * 5) and c.prompt_dropped == [5, 5]


def _normalize_scores():
    # raw scores fall with position for the early candidates; divided by N - position (N = 10) the late
    # ones win: 1: 3/9 = .333, 2: 2.5/8 = .3125, 3: 2/7 = .286, 4: 1/6 = .167, 5: .5/5 = .1,
    # 6: .75/4 = .1875, 7: 1.5/3 = .5, 8: 1.25/2 = .625
    scores = [5.0, 3.0, 2.5, 2.0, 1.0, 0.5, 0.75, 1.5, 1.25, 0.25]
    c = PolicyCache("elastic", 0.5, PAPER)
    _fake_prefill(c, scores, kinds=KINDS10)
    # raw: anchors 1, 2, 3; 4..8 -> 3
    assert _layer(c) == ([0, 1, 2, 3, 9], [1, 1, 1, 6, 1]), _layer(c)
    c = PolicyCache("elastic", 0.5, PAPER.with_(normalize_scores=True))
    _fake_prefill(c, scores, kinds=KINDS10)
    # normalised: anchors 8, 7, 1; 2 -> 1, 3 -> 1, 4 -> 1 (3 from both 1 and 7: lower), 5 -> 7, 6 -> 7
    assert _layer(c) == ([0, 1, 7, 8, 9], [1, 4, 3, 1, 1]), _layer(c)
    l = c.layers[0]
    assert torch.allclose(l.k[:, 0, 0], torch.tensor([0.0, 2.5, 6.0, 8.0, 9.0]))
    # the stored importance stays the raw sum: 1 <- 2, 3, 4: 3+2.5+2+1; 7 <- 5, 6: 1.5+.5+.75
    assert torch.allclose(l.score, torch.tensor([5.0, 8.5, 2.75, 1.25, 0.25])), l.score


def _heavy_decode():
    scores = [0.01] + SCORES_MERGE[1:]  # the sink scores lowest: it is still never removed
    runs = {}
    for name, st in (("paper", PAPER), ("heavy", PAPER.with_(decode_eviction="heavy")),
                     ("heavy+fold", PAPER.with_(decode_eviction="heavy", merge_on_evict=True))):
        c = PolicyCache("elastic", 0.5, st)
        _fake_prefill(c, scores, kinds=KINDS10)
        assert _layer(c) == ([0, 1, 3, 7, 9], [1, 2, 3, 3, 1]) and c.P == 1
        # stage-1 importance: 1 <- 2: .9+.1; 3 <- 4, 5: .8+.2+.3; 7 <- 6, 8: .7+.05+.04
        assert torch.allclose(c.layers[0].score, torch.tensor([0.01, 1.0, 1.3, 0.79, 0.5]))
        _decode(c, [0.1, 0.1, 0.1, 0.1, 0.1, 1.0])  # position 10: 6 entries, n 11, excess trunc(.5) = 0
        assert len(c) == 6 and c.decode_removals == 0
        _decode(c, [0.0] * 6 + [1.0])  # position 11: 7 entries, n 12, excess 1
        assert c.decode_removals == 1
        runs[name] = c
    # paper: rank P = 1, position 1
    assert runs["paper"].removed_positions == [[1, 1]]
    assert runs["paper"].layers[0].pos.tolist() == [0, 3, 7, 9, 10, 11]
    # heavy: importance now 0: .11, 1: 1.1, 3: 1.4, 7: .89, 9: .6, 10: 1.0, 11: 1.0; len 7, w = floor(6 * .5) = 3,
    # ranks 1..3 (positions 1, 3, 7): the lowest is 7 (9 scores lower but is recent, 0 lower but a sink)
    c = runs["heavy"]
    assert c.removed_positions == [[7, 7]], c.removed_positions
    assert c.layers[0].pos.tolist() == [0, 1, 3, 9, 10, 11]
    assert c.layers[0].kind[-1].tolist() == list(generated_kind()) and c.layers[0].kind[-1, 0] == GENERATED
    assert torch.allclose(c.layers[0].score, torch.tensor([0.11, 1.1, 1.4, 0.6, 1.0, 1.0]))
    # heavy + merge_on_evict: 7 folds into the nearer neighbour 9 (2 away; 3 is 4 away): m 3 + 1, key
    # (7*3 + 9*1) / 4 = 7.5, importance .6 + .89
    c = runs["heavy+fold"]
    assert c.removed_positions == [[7, 7]] and c.merged_into == [[9, 9]]
    l = c.layers[0]
    assert l.pos.tolist() == [0, 1, 3, 9, 10, 11] and l.m.tolist() == [1, 2, 3, 4, 1, 1]
    assert torch.allclose(l.k[3], torch.tensor([7.5, 7.5])) and torch.allclose(l.v[3], torch.tensor([-7.5, -7.5]))
    assert abs(float(l.score[3]) - 1.49) < 1e-6


def _merge_on_evict():
    # fixed point P = 1: the leaving entry (position 1, key 1.5, m 2) cannot fold into the sink, so into 3
    # (key 4, m 3): key (4*3 + 1.5*2) / 5 = 3
    c = PolicyCache("elastic", 0.5, PAPER.with_(merge_on_evict=True))
    _fake_prefill(c, SCORES_MERGE, kinds=KINDS10)
    _decode(c, [0.0] * 6)
    _decode(c, [0.0] * 7)
    assert c.removed_positions == [[1, 1]] and c.merged_into == [[3, 3]]
    l = c.layers[0]
    assert l.pos.tolist() == [0, 3, 7, 9, 10, 11] and l.m.tolist() == [1, 5, 3, 1, 1, 1]
    assert torch.allclose(l.k[1], torch.tensor([3.0, 3.0]))
    # a tie: anchors 2, 4, 6, distance 3 -> P = 5 - 3 = 2, the leaving entry 4 is 2 from 2 and from 6: the lower
    scores = [5.0, 0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.05, 0.04, 0.5]
    c = PolicyCache("elastic", 0.5, PAPER.with_(merge_on_evict=True, distance=3))
    _fake_prefill(c, scores, kinds=KINDS10)
    assert _layer(c)[0] == [0, 2, 4, 6, 9] and c.P == 2
    _decode(c, [0.0] * 6)
    _decode(c, [0.0] * 7)
    assert c.removed_positions == [[4, 4]] and c.merged_into == [[2, 2]], (c.removed_positions, c.merged_into)


def _fractional_distance():
    scores = SCORES_MERGE
    for dist, P in ((25, 1), (1, 4), (3, 2), (0.1, 4), (0.5, 2), (0.0, 5), (1.0, 1)):
        # C0 = 5: d = ceil(f * 5): 0.1 -> 1, 0.5 -> ceil(2.5) = 3, 0.0 -> 0, 1.0 -> 5 (P = max(sink, 0))
        c = PolicyCache("elastic", 0.5, PAPER.with_(distance=dist))
        _fake_prefill(c, scores, kinds=KINDS10)
        assert c.P == P, (dist, c.P, P)
    # the worked example: C0 = 325; 0.05 -> ceil(16.25) = 17 -> P 308; 0.1 -> ceil(32.5) = 33 -> P 292
    g = torch.Generator().manual_seed(0)
    sc = torch.rand(650, generator=g).tolist()
    for dist, P in ((0.05, 308), (0.1, 292)):
        for policy in ("elastic", "elastic-ref"):
            c = PolicyCache(policy, 0.5, PAPER.with_(distance=dist))
            _fake_prefill(c, sc, layers=1)
            assert c.P == P, (policy, dist, c.P)
    for bad in (dict(distance=1.5), dict(distance=-1), dict(recent=1.0), dict(decode_eviction="x"),
                dict(distance=True)):
        try:
            PAPER.with_(**bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


def selftest():
    _worked_example("elastic-paper", 325, 2, 100)
    _worked_example("elastic", 325, 2, 100)
    _worked_example("elastic-ref", 324, 4, 99)
    _hand_checked()
    _elastic_off_is_paper()
    _protect_instruction()
    _bounded_merging()
    _normalize_scores()
    _heavy_decode()
    _merge_on_evict()
    _fractional_distance()


if __name__ == "__main__":
    selftest()
    print("ok")
