"""An independent Python model of the KV cache policies (full, local, h2o, elastic, elastic-ref).

Written from docs/ELASTIC_CACHE.md and the rules in scripts/reference/README.md, not from the Rust
code. One `PolicyCache` holds, per layer, the entries in POSITION order:

    pos   [N] int64    logical position (0-based index in the sequence)
    k, v  [N, KV, D]   float32, keys post-RoPE
    m     [N] int64    merge count (1 = unmerged)
    score [N] float32  accumulated attention importance (attn_colsum sums)

Attention over the past is permutation invariant, so position order is as good as any slot order.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

POLICIES = ["full", "local", "h2o", "elastic", "elastic-ref"]


def trunc(x: float) -> int:
    """Truncation toward zero of a float64 (Python's int())."""
    return int(x)


class Layer:
    __slots__ = ("pos", "k", "v", "m", "score")

    def __init__(self, pos, k, v, m, score):
        self.pos, self.k, self.v, self.m, self.score = pos, k, v, m, score

    def __len__(self):
        return int(self.pos.shape[0])

    def take(self, idx: List[int]) -> None:
        t = torch.tensor(idx, dtype=torch.long)
        self.pos, self.k, self.v, self.m, self.score = (self.pos[t], self.k[t], self.v[t], self.m[t],
                                                        self.score[t])

    def remove(self, i: int) -> None:
        n = len(self)
        self.take([j for j in range(n) if j != i])

    def append(self, pos: int, k, v, score: float) -> None:
        self.pos = torch.cat([self.pos, torch.tensor([pos], dtype=torch.long)])
        self.k = torch.cat([self.k, k])
        self.v = torch.cat([self.v, v])
        self.m = torch.cat([self.m, torch.ones(1, dtype=torch.long)])
        self.score = torch.cat([self.score, torch.tensor([score], dtype=torch.float32)])


def _top(scores: List[float], positions: List[int], k: int) -> List[int]:
    """Indices of the k highest scores, ties: lower position first."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], positions[i]))
    return order[:k]


class PolicyCache:
    def __init__(self, policy: str, keep: float, sink: int = 1, protect: int = 1, distance: int = 25,
                 h2o_recent: float = 0.5, merged_bias: bool = False):
        if policy not in POLICIES:
            raise ValueError(policy)
        self.policy, self.keep, self.sink, self.protect, self.d = policy, keep, sink, protect, distance
        self.h2o_recent = h2o_recent
        self.merged_bias = merged_bias  # past_bias ln(m) for an entry standing for m merged ones
        self.layers: List[Layer] = []
        self.n = 0  # tokens processed so far
        self.P: Optional[int] = None  # elastic fixed point
        self.target: Optional[int] = None
        self.prompt_removed = 0
        self.decode_removals = 0
        self.removed_positions: List[List[int]] = []  # per decode removal: the removed position per layer
        self.min_score_gap = math.inf  # smallest score gap at a selection decision (fragility)

    # ------------------------------------------------------------ bookkeeping
    @property
    def min_entries(self) -> int:
        return {"elastic": self.sink + self.protect, "elastic-ref": self.sink + self.protect + 1,
                "local": self.sink + 1, "h2o": 1, "full": 0}[self.policy]

    def __len__(self):
        lens = {len(l) for l in self.layers}
        assert len(lens) == 1, lens
        return lens.pop()

    @property
    def accumulates(self) -> str:
        return {"h2o": "always", "elastic": "prompt", "elastic-ref": "prompt"}.get(self.policy, "never")

    def past(self):
        """Decoder inputs: past_key_l, past_value_l for every layer, then past_bias [layers, N]:
        ln(m) of each entry with merged_bias, else 0."""
        out = []
        for l in self.layers:
            out += [l.k[None], l.v[None]]
        if self.merged_bias:
            out.append(torch.stack([l.m.double().log().float() for l in self.layers]))
        else:
            out.append(torch.zeros(len(self.layers), len(self), dtype=torch.float32))
        return out

    def rope_position(self) -> int:
        """RoPE position of the next decoded token."""
        return len(self) if self.policy == "elastic-ref" else self.n

    def _gap(self, a: float, b: float) -> None:
        self.min_score_gap = min(self.min_score_gap, abs(a - b))

    # ------------------------------------------------------------ prompt
    def prefill(self, new_k, new_v, colsums) -> None:
        """The whole prompt went through the model in one step from an empty cache.
        new_k/new_v: per layer [T, KV, D]; colsums: per layer [T] float32."""
        assert not self.layers
        T = new_k[0].shape[0]
        for k, v, cs in zip(new_k, new_v, colsums):
            score = cs.clone().float() if self.accumulates != "never" else torch.zeros(T)
            self.layers.append(Layer(torch.arange(T), k.clone().float(), v.clone().float(),
                                     torch.ones(T, dtype=torch.long), score))
        self.n = T
        if self.policy == "full":
            return
        L = T
        excess = max(0, trunc(L - self.n * self.keep))
        target = max(self.min_entries, L - excess)
        self.target = target
        if self.policy in ("elastic", "elastic-ref"):
            self.P = max(self.sink, min(target, L) - self.d)
        if target < L:
            for l in self.layers:
                getattr(self, "_compress_" + self.policy.replace("-", "_"))(l, target)
            self.prompt_removed = L - len(self)

    def _compress_local(self, l: Layer, target: int) -> None:
        L = len(l)
        s = self.sink
        l.take(list(range(s)) + list(range(L - (target - s), L)))

    def _compress_h2o(self, l: Layer, target: int) -> None:
        L = len(l)
        recent = min(max(int(math.floor(target * self.h2o_recent)), 1), target)
        others = list(range(L - recent))
        sc = [float(l.score[i]) for i in others]
        ps = [int(l.pos[i]) for i in others]
        k = target - recent
        top = _top(sc, ps, k)
        if 0 < k < len(others):
            srt = sorted(sc, reverse=True)
            self._gap(srt[k - 1], srt[k])
        keep = sorted(others[i] for i in top) + list(range(L - recent, L))
        l.take(keep)

    def _compress_elastic(self, l: Layer, target: int) -> None:
        L = len(l)
        s, p = self.sink, self.protect
        if L <= s + p:
            return
        cand = list(range(s, L - p))
        K = target - s - p
        if K <= 0:
            l.take(list(range(s)) + list(range(L - p, L)))
            return
        sc = [float(l.score[i]) for i in cand]
        ps = [int(l.pos[i]) for i in cand]
        anchors = sorted(cand[i] for i in _top(sc, ps, K))
        if K < len(cand):
            srt = sorted(sc, reverse=True)
            self._gap(srt[K - 1], srt[K])
        aset = set(anchors)
        members = {a: [] for a in anchors}
        for c in cand:
            if c in aset:
                continue
            pc = int(l.pos[c])
            best = min(anchors, key=lambda a: (abs(pc - int(l.pos[a])), int(l.pos[a])))
            members[best].append(c)
        k0, v0, m0 = l.k.clone(), l.v.clone(), l.m.clone()  # read everything before writing
        for a in anchors:
            if not members[a]:
                continue
            ma = float(m0[a])
            ks = k0[a] * ma
            vs = v0[a] * ma
            tot = int(m0[a])
            for c in members[a]:
                mc = float(m0[c])
                ks = ks + k0[c] * mc
                vs = vs + v0[c] * mc
                tot += int(m0[c])
            l.k[a] = ks / float(tot)
            l.v[a] = vs / float(tot)
            l.m[a] = tot
        l.take(list(range(s)) + anchors + list(range(L - p, L)))

    def _compress_elastic_ref(self, l: Layer, target: int) -> None:
        L = len(l)
        s, p = self.sink, self.protect
        f = L - target
        c = L - s - p
        sc = l.score[s:L - p]
        perm = torch.sort(sc, stable=True).indices.tolist()  # stable ascending argsort
        srt = torch.sort(sc, stable=True).values.tolist()
        for r in range(c - 1):
            if (perm[r] > f) != (perm[r + 1] > f):
                self._gap(srt[r], srt[r + 1])
        kept = [r + s for r in range(c) if perm[r] > f]
        thrown = [r for r in range(c) if perm[r] <= f]
        if kept:
            k0, v0 = l.k.clone(), l.v.clone()
            groups = {a: [] for a in kept}
            for t in thrown:
                a = min(kept, key=lambda a: (abs(t - a), a))
                groups[a].append(t)
            for a, ts in groups.items():
                if not ts:
                    continue
                ks, vs = k0[a].clone(), v0[a].clone()
                for t in ts:
                    ks = ks + k0[t]
                    vs = vs + v0[t]
                l.k[a] = ks / float(1 + len(ts))
                l.v[a] = vs / float(1 + len(ts))
                l.m[a] = l.m[a] + len(ts)
        l.take(list(range(s)) + kept + list(range(L - p, L)))

    # ------------------------------------------------------------ decode
    def decode(self, new_k, new_v, colsums) -> None:
        """One token went through the model: new_k/new_v per layer [1, KV, D], colsums per layer
        [S + 1] (past in the cache's order, then the new token)."""
        pos = self.n
        for l, k, v, cs in zip(self.layers, new_k, new_v, colsums):
            S = len(l)
            assert cs.shape[0] == S + 1
            sc = 0.0
            if self.accumulates == "always":
                l.score = l.score + cs[:S].float()
                sc = float(cs[S])
            l.append(pos, k.float(), v.float(), sc)
        self.n += 1
        if self.policy == "full":
            return
        ln = len(self)
        excess = trunc(ln - self.n * self.keep)
        count = min(excess, ln - self.min_entries) if excess > 0 else 0
        for _ in range(count):
            removed = []
            for l in self.layers:
                i = self._victim(l)
                removed.append(int(l.pos[i]))
                l.remove(i)
            self.removed_positions.append(removed)
            self.decode_removals += 1

    def _victim(self, l: Layer) -> int:
        ln = len(l)
        if self.policy == "local":
            return self.sink
        if self.policy in ("elastic", "elastic-ref"):
            return min(self.P, ln - 1)
        if self.policy == "h2o":
            r = min(max(int(math.floor((ln - 1) * self.h2o_recent)), 1), ln - 1)
            window = ln - r
            sc = [float(x) for x in l.score[:window]]
            best = min(range(window), key=lambda i: (sc[i], int(l.pos[i])))
            if window > 1:
                srt = sorted(sc)
                self._gap(srt[0], srt[1])
            return best
        raise AssertionError(self.policy)
