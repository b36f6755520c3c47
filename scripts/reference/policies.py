"""An independent Python model of the KV cache policies (full, local, h2o, elastic-paper, elastic-ref and
the configurable elastic).

Written from shared/ELASTIC_CACHE.md, docs/policies.md and the rules in scripts/reference/README.md, not
from the Rust code. One `PolicyCache` holds, per layer, the entries in POSITION order:

    pos   [N] int64    logical position (0-based index in the sequence)
    k, v  [N, KV, D]   float32, keys post-RoPE
    m     [N] int64    merge count (1 = unmerged)
    score [N] float32  accumulated attention importance (attn_colsum sums)
    kind  [N, 3] int64 (type, picture, cell): type TEMPLATE / IMAGE / USER / GENERATED; picture and cell
                       are the image's index in the prompt and the row within it (-1 for the other types)

Attention over the past is permutation invariant, so position order is as good as any slot order.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import List, Optional, Sequence, Tuple, Union

import torch

POLICIES = ["full", "local", "h2o", "elastic-paper", "elastic-ref", "elastic"]
ELASTIC_ALL = ("elastic", "elastic-paper", "elastic-ref")  # docs/policies.md's elastic*
ELASTIC_COMPONENTS = ("elastic", "elastic-paper")  # the policies that take the components

TEMPLATE, IMAGE, USER, GENERATED = 0, 1, 2, 3
KIND_CHAR = {TEMPLATE: "t", IMAGE: "i", USER: "u", GENERATED: "g"}
Kind = Tuple[int, int, int]  # (type, picture, cell)


def template_kind() -> Kind:
    return (TEMPLATE, -1, -1)


def user_kind() -> Kind:
    return (USER, -1, -1)


def image_kind(picture: int, cell: int) -> Kind:
    return (IMAGE, picture, cell)


def generated_kind() -> Kind:
    return (GENERATED, -1, -1)


def kinds_string(kinds: Sequence[Kind]) -> str:
    return "".join(KIND_CHAR[k[0]] for k in kinds)


def trunc(x: float) -> int:
    """Truncation toward zero of a float64 (Python's int())."""
    return int(x)


@dataclass(frozen=True)
class Settings:
    """docs/policies.md's knobs. The defaults are the paper's (elastic-paper); a knob a policy has no use
    for is ignored by that policy. `distance`: an int is a count, a float a fraction of the compressed
    length (d = ceil(f * C0))."""
    sink: int = 1
    protect: int = 1
    distance: Union[int, float] = 25
    recent: float = 0.5
    protect_instruction: bool = False
    merge_window: Optional[int] = None
    merge_kind: bool = False
    normalize_scores: bool = False
    decode_eviction: str = "fixed-point"
    merge_on_evict: bool = False
    merge_count_bias: bool = False

    def validate(self) -> "Settings":
        def count(name, v):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: a count >= 0, got {v!r}")
        count("sink", self.sink)
        count("protect", self.protect)
        if isinstance(self.distance, bool) or not isinstance(self.distance, (int, float)):
            raise ValueError(f"distance: a count or a fraction, got {self.distance!r}")
        if isinstance(self.distance, int):
            count("distance", self.distance)
        elif not (0.0 <= self.distance <= 1.0):
            raise ValueError(f"distance: a fraction must be in [0, 1], got {self.distance!r}")
        if not (0.0 < self.recent < 1.0):
            raise ValueError(f"recent: must be in (0, 1), got {self.recent!r}")
        if self.merge_window is not None:
            count("merge_window", self.merge_window)
        if self.decode_eviction not in ("fixed-point", "heavy"):
            raise ValueError(f"decode_eviction: fixed-point or heavy, got {self.decode_eviction!r}")
        for name in ("protect_instruction", "merge_kind", "normalize_scores", "merge_on_evict",
                     "merge_count_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: true or false")
        return self

    def to_json(self) -> dict:
        return asdict(self)

    def with_(self, **kw) -> "Settings":
        return replace(self, **kw).validate()


PAPER = Settings()


class Layer:
    __slots__ = ("pos", "k", "v", "m", "score", "kind")

    def __init__(self, pos, k, v, m, score, kind):
        self.pos, self.k, self.v, self.m, self.score, self.kind = pos, k, v, m, score, kind

    def __len__(self):
        return int(self.pos.shape[0])

    def take(self, idx: List[int]) -> None:
        t = torch.tensor(idx, dtype=torch.long)
        self.pos, self.k, self.v, self.m, self.score, self.kind = (
            self.pos[t], self.k[t], self.v[t], self.m[t], self.score[t], self.kind[t])

    def remove(self, i: int) -> None:
        n = len(self)
        self.take([j for j in range(n) if j != i])

    def append(self, pos: int, k, v, score: float, kind: Kind) -> None:
        self.pos = torch.cat([self.pos, torch.tensor([pos], dtype=torch.long)])
        self.k = torch.cat([self.k, k])
        self.v = torch.cat([self.v, v])
        self.m = torch.cat([self.m, torch.ones(1, dtype=torch.long)])
        self.score = torch.cat([self.score, torch.tensor([score], dtype=torch.float32)])
        self.kind = torch.cat([self.kind, torch.tensor([kind], dtype=torch.long)])

    def merge_class(self, i: int) -> int:
        """merge_kind's class: the picture index for an image entry, -1 (text) for every other."""
        t, pic, _ = self.kind[i].tolist()
        return pic if t == IMAGE else -1

    def fold(self, into: int, members: List[int], k0, v0, m0, s0) -> None:
        """Entry `into` becomes the count-weighted mean (float32) of itself and `members` (values read from
        the snapshots k0, v0, m0, s0); merge counts and importances add up (float32, `into` first, then the
        members in the order given)."""
        ma = float(m0[into])
        ks = k0[into] * ma
        vs = v0[into] * ma
        tot = int(m0[into])
        sc = s0[into].clone()
        for c in members:
            mc = float(m0[c])
            ks = ks + k0[c] * mc
            vs = vs + v0[c] * mc
            tot += int(m0[c])
            sc = sc + s0[c]
        self.k[into] = ks / float(tot)
        self.v[into] = vs / float(tot)
        self.m[into] = tot
        self.score[into] = sc


def _top(scores: List[float], positions: List[int], k: int) -> List[int]:
    """Indices of the k highest scores, ties: lower position first."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], positions[i]))
    return order[:k]


class PolicyCache:
    def __init__(self, policy: str, keep: float, settings: Settings = PAPER):
        if policy not in POLICIES:
            raise ValueError(policy)
        settings.validate()
        self.policy, self.keep, self.s = policy, keep, settings
        self.sink, self.protect = settings.sink, settings.protect
        self.merged_bias = settings.merge_count_bias  # past_bias ln(m) for an entry standing for m merged ones
        self.components = policy in ELASTIC_COMPONENTS
        self.layers: List[Layer] = []
        self.n = 0  # tokens processed so far
        self.P: Optional[int] = None  # elastic fixed point
        self.d: Optional[int] = None  # the distance as a count
        self.target: Optional[int] = None
        self.prompt_removed = 0
        self.prompt_dropped: Optional[List[int]] = None  # per layer: stage-1 members dropped (no eligible anchor)
        self.tail: Optional[List[int]] = None  # per layer: the protected tail of stage 1
        self.decode_removals = 0
        self.removed_positions: List[List[int]] = []  # per decode removal: the removed position per layer
        self.merged_into: List[List[Optional[int]]] = []  # merge_on_evict: the position folded into (None: dropped)
        self.min_score_gap = math.inf  # smallest score gap at a selection decision (fragility)

    # ------------------------------------------------------------ bookkeeping
    @property
    def min_entries(self) -> int:
        return {"elastic": self.sink + self.protect, "elastic-paper": self.sink + self.protect,
                "elastic-ref": self.sink + self.protect + 1, "local": self.sink + 1, "h2o": 1,
                "full": 0}[self.policy]

    def __len__(self):
        lens = {len(l) for l in self.layers}
        assert len(lens) == 1, lens
        return lens.pop()

    @property
    def heavy(self) -> bool:
        return self.components and self.s.decode_eviction == "heavy"

    @property
    def accumulates(self) -> str:
        if self.policy == "h2o" or self.heavy:
            return "always"
        return "prompt" if self.policy in ELASTIC_ALL else "never"

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
    def prefill(self, new_k, new_v, colsums, kinds: Optional[Sequence[Kind]] = None) -> None:
        """The whole prompt went through the model in one step from an empty cache.
        new_k/new_v: per layer [T, KV, D]; colsums: per layer [T] float32; kinds: per prompt token
        (default: all user, as for a prompt of raw ids)."""
        assert not self.layers
        T = new_k[0].shape[0]
        if kinds is None:
            kinds = [user_kind()] * T
        assert len(kinds) == T
        kt = torch.tensor(list(kinds), dtype=torch.long).reshape(T, 3)
        for k, v, cs in zip(new_k, new_v, colsums):
            score = cs.clone().float() if self.accumulates != "never" else torch.zeros(T)
            self.layers.append(Layer(torch.arange(T), k.clone().float(), v.clone().float(),
                                     torch.ones(T, dtype=torch.long), score, kt.clone()))
        self.n = T
        if self.policy == "full":
            return
        L = T
        excess = max(0, trunc(L - self.n * self.keep))
        target = max(self.min_entries, L - excess)
        self.target = target
        if self.policy in ELASTIC_ALL:
            self.prompt_dropped = [0] * len(self.layers)
            self.tail = [min(self.protect, max(0, L - min(self.sink, L)))] * len(self.layers)
        if target < L:
            for li, l in enumerate(self.layers):
                if self.policy in ELASTIC_COMPONENTS:
                    self._compress_elastic(li, l, target)
                else:
                    getattr(self, "_compress_" + self.policy.replace("-", "_"))(l, target)
            self.prompt_removed = L - len(self)
        if self.policy in ELASTIC_ALL:
            C0 = min(target, L)
            dist = self.s.distance
            self.d = dist if isinstance(dist, int) else int(math.ceil(dist * C0))  # float64 product
            self.P = max(self.sink, C0 - self.d)

    def _compress_local(self, l: Layer, target: int) -> None:
        L = len(l)
        s = self.sink
        l.take(list(range(s)) + list(range(L - (target - s), L)))

    def _compress_h2o(self, l: Layer, target: int) -> None:
        L = len(l)
        recent = min(max(int(math.floor(target * self.s.recent)), 1), target)
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

    def _instruction(self, l: Layer) -> int:
        """Entries after the layer's last image entry; without one, from its first user entry to its end
        (0 when it has none)."""
        types = l.kind[:, 0].tolist()
        L = len(types)
        img = [i for i, t in enumerate(types) if t == IMAGE]
        if img:
            return L - 1 - img[-1]
        users = [i for i, t in enumerate(types) if t == USER]
        return L - users[0] if users else 0

    def _compress_elastic(self, li: int, l: Layer, target: int) -> None:
        """Stage 1 of elastic / elastic-paper with the components of docs/policies.md."""
        st = self.s
        L = len(l)
        head = min(st.sink, L)
        if target < head + st.protect:
            raise ValueError(f"target {target} below sink {head} + protect {st.protect}")
        tail = st.protect
        if st.protect_instruction:
            tail = max(st.protect, min(self._instruction(l), target // 2))
        tail = min(tail, target - head, L - head)
        self.tail[li] = tail
        cand = list(range(head, L - tail))
        K = target - head - tail
        keep_tail = list(range(L - tail, L))
        if K <= 0:
            self.prompt_dropped[li] = len(cand)
            l.take(list(range(head)) + keep_tail)
            return
        if st.normalize_scores:
            N = int(l.pos.max()) + 1
            sel = l.score / (N - l.pos).to(torch.float32)  # float32 division
        else:
            sel = l.score
        sc = [float(sel[i]) for i in cand]
        ps = [int(l.pos[i]) for i in cand]
        anchors = sorted(cand[i] for i in _top(sc, ps, K))
        if K < len(cand):
            srt = sorted(sc, reverse=True)
            self._gap(srt[K - 1], srt[K])
        aset = set(anchors)
        members = {a: [] for a in anchors}
        dropped = 0
        for c in cand:
            if c in aset:
                continue
            pc = int(l.pos[c])
            elig = anchors
            if st.merge_window is not None:
                elig = [a for a in elig if abs(pc - int(l.pos[a])) <= st.merge_window]
            if st.merge_kind:
                cls = l.merge_class(c)
                elig = [a for a in elig if l.merge_class(a) == cls]
            if not elig:
                dropped += 1
                continue
            best = min(elig, key=lambda a: (abs(pc - int(l.pos[a])), int(l.pos[a])))
            members[best].append(c)
        self.prompt_dropped[li] = dropped
        k0, v0, m0, s0 = l.k.clone(), l.v.clone(), l.m.clone(), l.score.clone()  # read before writing
        for a in anchors:
            if members[a]:
                l.fold(a, members[a], k0, v0, m0, s0)
        l.take(list(range(head)) + anchors + keep_tail)

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
            l.append(pos, k.float(), v.float(), sc, generated_kind())
        self.n += 1
        if self.policy == "full":
            return
        ln = len(self)
        excess = trunc(ln - self.n * self.keep)
        count = min(excess, ln - self.min_entries) if excess > 0 else 0
        for _ in range(count):
            removed, into = [], []
            for l in self.layers:
                i = self._victim(l)
                removed.append(int(l.pos[i]))
                if self.policy in ELASTIC_ALL and self.s.merge_on_evict:
                    j = self._neighbour(l, i)
                    if j is not None:
                        l.fold(j, [i], l.k.clone(), l.v.clone(), l.m.clone(), l.score.clone())
                    into.append(None if j is None else int(l.pos[j]))
                l.remove(i)
            self.removed_positions.append(removed)
            if self.policy in ELASTIC_ALL and self.s.merge_on_evict:
                self.merged_into.append(into)
            self.decode_removals += 1

    def _neighbour(self, l: Layer, i: int) -> Optional[int]:
        """merge_on_evict: the nearer of ranks i-1 and i+1 by position (ties: the lower); a sink entry is
        never a merge target; None when neither exists."""
        opts = [j for j in (i - 1, i + 1) if min(self.sink, len(l)) <= j < len(l)]
        if not opts:
            return None
        pi = int(l.pos[i])
        return min(opts, key=lambda j: (abs(int(l.pos[j]) - pi), int(l.pos[j])))

    def _victim(self, l: Layer) -> int:
        ln = len(l)
        if self.policy == "local":
            return self.sink
        if self.heavy:
            w = min(max(int(math.floor((ln - 1) * self.s.recent)), 1), ln - 1)
            lo, hi = min(self.sink, ln - 1), ln - w
            if hi <= lo:
                return lo  # no rank outside the sink and the recent window: the oldest non-sink entry
            sc = [float(x) for x in l.score[lo:hi]]
            best = min(range(hi - lo), key=lambda r: (sc[r], r))
            if hi - lo > 1:
                srt = sorted(sc)
                self._gap(srt[0], srt[1])
            return lo + best
        if self.policy in ELASTIC_ALL:
            return min(self.P, ln - 1)
        if self.policy == "h2o":
            r = min(max(int(math.floor((ln - 1) * self.s.recent)), 1), ln - 1)
            window = ln - r
            sc = [float(x) for x in l.score[:window]]
            best = min(range(window), key=lambda i: (sc[i], int(l.pos[i])))
            if window > 1:
                srt = sorted(sc)
                self._gap(srt[0], srt[1])
            return best
        raise AssertionError(self.policy)
