"""A layer's cache whose tokens a selector chooses: eviction that really frees memory.

During a prefill the layer holds every token in full precision (as kvpress does while it
scores). At the end of the first prefill :meth:`SelectKV.compress` scores the tokens with the
selector, keeps the top scorers of each KV head and encodes only those with the spec's codec,
so the savings multiply (``snapkv(ratio=0.5)+rotatekv(bits=2)``). While decoding, the cache
is held at that size: every ``slack`` new tokens it is compacted back to its target.

Each KV head keeps its own tokens, so a layer holds them in a per-head order; their real
positions are kept (int32, counted in the bytes) for codecs that store keys before RoPE and
for the selectors. Attention sees the kept tokens as one run just before the newest token:
every one of them is visible to every later query, except, on a sliding-window layer, those
whose real position has left the window (masked, then dropped first at the next compaction).
A sliding layer keeps the selector's share of its window.

With per-head budgets (a selector's ``ada``, AdaKV) the KV heads of a layer compete for the
layer's budget: the layer keeps its ``n_kv x target`` best tokens wherever they are, each head
keeping at least ``ada`` of its even share. Heads then hold different numbers of tokens, each in
its own one-head cache, so memory really falls by the budget (kvpress masks the dropped entries
and holds them all). Positions and selector state are kept as rows left-padded to the longest
head (padding slots sit at position ``PAD``, after every query, so no query sees them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvtier.dtypes import DTYPES
from kvtier.kv.cache import LayerKV, Part
from kvtier.kv.codecs.base import Codec
from kvtier.kv.codecs.dense import Dense
from kvtier.kv.selectors.base import Selector, View, group_attention
from kvtier.kv.selectors.elastic import merge

PAD = 1 << 30  # position of a padding slot in a per-head-budget layer's rows: no query sees it


class _HeldPositions:
    """The RoPE a codec inside :class:`SelectKV` sees: index ``i`` of the held tokens is
    rotated at head h's real position ``pos[h, i]``, not at ``i``."""

    def __init__(self, rope, owner: SelectKV, head: int | None = None):
        self.rope, self.owner, self.head = rope, owner, head  # head: a one-head cache's head

    def positions(self, start: int, n: int) -> torch.Tensor:
        """Real positions ``(Hkv, n)`` (``(1, n)`` for a one-head cache) of held tokens ``start ..``."""
        pos, h = self.owner.pos, self.head
        if h is not None:  # row h, after its left padding
            start += pos.shape[1] - int(self.owner.counts[h])
            pos = pos[h: h + 1]
        return pos[:, start: start + n]

    def rotate(self, x: torch.Tensor, start: int, inverse: bool = False) -> torch.Tensor:
        return self.rope.rotate_at(x, self.positions(start, x.shape[1]), inverse)

    def span(self, start: int, n: int) -> torch.Tensor:
        """Unit cos/sin rows per head ``(Hkv, n, 2, D)`` at the held tokens' real positions, for
        a codec that applies RoPE inside attention."""
        return self.rope.rows(self.positions(start, n))

    def __getattr__(self, name):
        return getattr(self.rope, name)


class SelectKV:
    """One layer of one sequence's cache with a selector in front of the codec.

    make: builds an empty :class:`LayerKV` for a codec and a RoPE (the runner's settings), or
    with ``head=h`` a one-head cache for KV head h (per-head budgets).
    window: the layer's sliding window, or None.
    slack: new tokens allowed above the target before a decode-time compaction.
    """

    def __init__(self, selector: Selector, codec: Codec, make: Callable[..., LayerKV],
                 rope, dtype: torch.dtype, window: int | None = None, slack: int = 64):
        self.selector, self.codec, self.make = selector, codec, make
        self.slack = getattr(selector, "slack", slack)
        self.ada = float(getattr(selector, "ada", 0.0))  # > 0: per-head budgets (AdaKV's safeguard)
        # a merging selector's first tokens (attention sinks) take in no merged token
        self.sinks = int(getattr(selector, "sinks", 0)) if getattr(selector, "merges", False) else 0
        self.base_rope = rope
        self.rope = _HeldPositions(rope, self) if rope is not None else None
        staging = next(name for name, t in DTYPES.items() if t == dtype)
        self.kv = make(Dense(dtype=staging), self.rope, window=None)  # every token, until the first compression
        self.heads: list[LayerKV] | None = None  # one cache per KV head, once per-head budgets differ
        self.counts: torch.Tensor | None = None  # (Hkv,) tokens each of those holds
        self.n_kv, self.head_dim, self.index = self.kv.n_kv, self.kv.head_dim, self.kv.index
        self.window = window
        self.pos = torch.empty((self.n_kv, 0), dtype=torch.int32)  # real position of each held token
        self.acc = torch.empty((self.n_kv, 0)) if selector.accumulates else None
        # log of how many tokens each held entry stands for (a selector that merges)
        self.bias = torch.empty((self.n_kv, 0)) if getattr(selector, "merges", False) else None
        self.q: torch.Tensor | None = None  # the newest queries (selector.queries of them)
        self.scale = 1.0
        self.target: int | None = None  # tokens held after the first compression
        self.length = 0

    # what the model calls
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        t = k.shape[1]
        new = torch.arange(self.length, self.length + t, dtype=torch.int32)
        self.pos = torch.cat([self.pos, new.expand(self.n_kv, t)], 1)
        if self.acc is not None:
            self.acc = torch.cat([self.acc, self.acc.new_zeros(self.n_kv, t)], 1)
        if self.bias is not None:
            self.bias = torch.cat([self.bias, self.bias.new_zeros(self.n_kv, t)], 1)
        if self.heads is None:
            self.kv.append(k, v)
        else:
            self.counts += t
            for h, layer in enumerate(self.heads):
                layer.append(k[h: h + 1], v[h: h + 1])
        self.length += t

    def parts(self, queries: int = 1) -> list[Part]:
        """The held tokens, placed as the run just before the newest position, for ``queries``
        new queries at the next positions (a prefill chunk, before its tokens are stored)."""
        return self._parts(self.length, queries)

    def select(self, q: torch.Tensor) -> list[Part]:
        return self._parts(self.length - q.shape[1], q.shape[1])  # their tokens are stored

    def held(self) -> None:
        """A decode query attends what :meth:`select` picks (see :meth:`LayerKV.held`)."""
        return None

    def slot(self) -> None:
        """New tokens go through :meth:`append` (positions and scores grow with them)."""
        return None

    def _parts(self, first: int, t: int) -> list[Part]:
        """The held tokens for ``t`` queries at positions ``first ..``; on a sliding layer each
        query masks the held tokens that left its window (a bias per query when t > 1). With
        per-head budgets the heads' tokens come as one part, padding masked."""
        shift = self.length - self.pos.shape[1]
        outside = self._gone(first, t) if self.target is not None else None  # (Hkv, t, n)
        gone = outside
        if self.heads is None:
            out = self.kv.parts()
        else:  # decoded and padded only if attention needs the keys as one tensor
            part = Part.encoded(0, self.pos.shape[1], self.n_kv, self._held, None)
            if t == 1 and self.bias is None and outside is None:  # a decode query: each head on its own
                part.heads = [layer.parts() for layer in self.heads]
            out = [part]
            pad = (self.pos >= PAD)[:, None, :]
            gone = pad if gone is None else gone | pad
        for p in out:
            cut = slice(p.start, p.start + p.n)
            b = None if self.bias is None else self.bias[:, cut]
            if gone is not None and gone[..., cut].any():
                base = torch.zeros(self.n_kv, p.n) if b is None else b
                b = base[:, None, :].expand(-1, t, -1).masked_fill(gone[..., cut], float("-inf"))
                b = b[:, 0] if t == 1 else b
            if b is not None and b.any():  # merged entries add their log count; gone ones -inf
                p.bias, p.score = b, None  # (attention on decoded keys)
            p.start += shift
        return out

    def _gone(self, first: int, t: int = 1) -> torch.Tensor | None:
        """``(Hkv, t, n)``: the held tokens outside the window of each query at positions
        ``first .. first + t - 1`` (a query at p sees keys at p - window < k <= p), or None."""
        if self.window is None or first + t - 1 - self.window < 0:
            return None
        edge = torch.arange(first, first + t) - self.window
        return self.pos[:, None, :] <= edge[None, :, None]

    def observe(self, q: torch.Tensor, scale: float) -> None:
        """The layer's queries of this step ``(Hq, T, D)``, after their tokens were appended:
        kept for the selector, attention received accumulated; compacts while decoding."""
        self.scale = scale
        want = self.selector.queries
        if want:
            q = q.detach()
            self.q = q[:, -want:] if self.q is None else torch.cat([self.q, q], 1)[:, -want:]
        if self.acc is not None:
            k, _ = self._held()
            t = q.shape[1]
            w = group_attention(q * scale, k, torch.arange(self.length - t, self.length), self.pos,
                                window=self.window)
            self.acc += w.sum(2).mean(1)  # summed over the new queries, mean over the group's heads
        if q.shape[1] == 1 and self.target is not None and self.n_held > self.target + self.slack:
            self._compact(self.target)

    def compress(self) -> None:
        """End of the first prefill: keep the selector's choice, encoded by the codec."""
        if self.target is None and self.length:
            seen = self.length if self.window is None else min(self.length, self.window)
            self.target = self.selector.target(seen)
            if self.target <= self.kv.length:  # (a recorder keeping everything never compacts)
                self._compact(self.target)

    def branch(self, src: SelectKV) -> None:
        """Start from ``src``'s uncompressed state (tokens, positions, queries, accumulated
        attention): one prefill, then each selector makes its own choice (benchmarks)."""
        if src.target is not None and src.kv.length != src.length:
            raise ValueError("branch from a layer that still holds every token")
        k, v = src._held()
        self.kv.append(k, v)
        self.pos, self.length, self.scale = src.pos.clone(), src.length, src.scale
        if self.acc is not None:
            self.acc = src.acc.clone()
        if self.bias is not None:
            self.bias = torch.zeros_like(self.acc if self.acc is not None else self.pos, dtype=torch.float32)
        if self.selector.queries:
            self.q = src.q[:, -self.selector.queries:].clone()

    # the rest of the layer interface
    def _held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held keys and values ``(Hkv, n, D)``, decoded; per-head rows left-padded with zeros."""
        if self.heads is not None:
            rows = [self._decoded(layer) for layer in self.heads]
            return _pad([k[0] for k, _ in rows], 0.0), _pad([v[0] for _, v in rows], 0.0)
        return self._decoded(self.kv)

    @staticmethod
    def _decoded(layer: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
        kv = [p.get() for p in layer.parts()]
        return torch.cat([k for k, _ in kv], 1), torch.cat([v for _, v in kv], 1)

    def _compact(self, n_keep: int) -> None:
        k, v = self._held()
        q = None if self.q is None else self.q * self.scale
        view = View(k, v, self.pos, q, self.acc, self.length, n_keep, self.window)
        scores = self.selector.score(view).float()
        gone = self._gone(self.length)
        if gone is not None:  # out of the next query's sliding window: dropped first
            gone = gone[:, 0]
            scores = scores.masked_fill(gone, float("-inf"))
        if self.ada:
            self._store_ragged(k, v, gone, self._choose(scores, n_keep))
            return
        idx = scores.topk(n_keep, dim=-1).indices.sort(-1).values  # (Hkv, n_keep), in order
        if self.bias is not None:  # the others are merged into their nearest kept token
            bias = self.bias if gone is None else self.bias.masked_fill(gone, float("-inf"))
            k, v, self.pos, self.bias = merge(k, v, self.pos, bias, idx, self.sinks)
        else:
            pick = idx[..., None].expand(-1, -1, k.shape[-1])
            k, v = k.gather(1, pick), v.gather(1, pick)
            self.pos = self.pos.gather(1, idx)
        if self.acc is not None:
            self.acc = self.acc.gather(1, idx)
        self.kv.close()
        self.kv = self.make(self.codec, self.rope, window=None)
        self.kv.append(k, v)

    def _choose(self, scores: torch.Tensor, n_keep: int) -> list[torch.Tensor]:
        """Per-head budgets (AdaKV): the layer's ``n_kv x n_keep`` top scorers over every head,
        each head first keeping its ``ada x n_keep`` best. Returns each head's kept indices,
        ascending (padding never kept)."""
        hkv, n = scores.shape
        pad = self.pos >= PAD
        scores = scores.masked_fill(pad, float("-inf"))
        safe = min(n_keep, max(1, int(self.ada * n_keep)))  # kvpress's AdaKVPress: at least one
        if safe:
            top = scores.topk(safe, dim=-1).indices
            scores = scores.scatter(1, top, float("inf"))
        keep = torch.zeros(hkv * n, dtype=torch.bool)
        keep[scores.reshape(-1).topk(min(hkv * n_keep, hkv * n), sorted=False).indices] = True
        keep = keep.reshape(hkv, n) & ~pad
        return [row.nonzero()[:, 0] for row in keep]

    def _store_ragged(self, k: torch.Tensor, v: torch.Tensor, gone: torch.Tensor | None,
                      idx: list[torch.Tensor]) -> None:
        """Keep tokens ``idx[h]`` of each head ``h`` (merging the others when the selector
        merges), each head in its own one-head cache encoded by the codec."""
        rows = []
        for h, i in enumerate(idx):
            kh, vh, pos = k[h: h + 1], v[h: h + 1], self.pos[h: h + 1]
            if self.bias is not None:
                dead = pos >= PAD if gone is None else (pos >= PAD) | gone[h: h + 1]
                kh, vh, pos, bias = merge(kh, vh, pos, self.bias[h: h + 1].masked_fill(dead, float("-inf")), i[None],
                                          self.sinks)
            else:
                kh, vh, pos, bias = kh[:, i], vh[:, i], pos[:, i], None
            acc = None if self.acc is None else self.acc[h, i]
            rows.append((kh[0], vh[0], pos[0], None if bias is None else bias[0], acc))
        self.pos = _pad([r[2] for r in rows], PAD)
        self.counts = torch.tensor([len(r[2]) for r in rows])
        if self.bias is not None:
            self.bias = _pad([r[3] for r in rows], 0.0)
        if self.acc is not None:
            self.acc = _pad([r[4] for r in rows], 0.0)
        self.close()
        self.heads = []
        for h, (kh, vh, *_) in enumerate(rows):
            rope = _HeldPositions(self.base_rope, self, h) if self.base_rope is not None else None
            layer = self.make(self.codec, rope, window=None, head=h)
            layer.append(kh[None], vh[None])
            self.heads.append(layer)
        self.kv = None

    @property
    def n_held(self) -> int:
        """Tokens held per KV head (the mean over heads with per-head budgets)."""
        if self.heads is not None:
            return int(self.counts.sum()) // self.n_kv
        return self.kv.n_held

    def _layers(self) -> list[LayerKV]:
        return self.heads if self.heads is not None else [self.kv]

    def reserve(self, n_tokens: int) -> None:
        for layer in self._layers():
            layer.reserve(n_tokens)

    def close(self) -> None:
        for layer in self._layers():
            layer.close()

    def n_elements(self) -> int:
        """Key and value elements of every token a dense cache would hold (every token seen, or
        the sliding window), so bits per element include what the selector saved."""
        seen = self.length if self.window is None else min(self.length, self.window)
        return 2 * seen * self.n_kv * self.head_dim

    def nbytes(self) -> int:
        """Bytes held: the codec's blocks and buffers, each held token's position (int32), and
        the selector's state (accumulated attention, the newest queries)."""
        state = 4 * self.pos.numel()
        state += 0 if self.acc is None else 4 * self.acc.numel()
        state += 0 if self.bias is None else 4 * self.bias.numel()
        state += 0 if self.q is None else self.q.numel() * self.q.element_size()
        state += 0 if self.counts is None else 8 * self.counts.numel()
        return sum(layer.nbytes() for layer in self._layers()) + state


def _pad(rows: list[torch.Tensor], fill: float) -> torch.Tensor:
    """Rows of different lengths ``(n_h, ...)`` stacked left-padded with ``fill``: ``(H, max n_h, ...)``."""
    m = max(len(r) for r in rows)
    out = rows[0].new_full((len(rows), m, *rows[0].shape[1:]), fill)
    for h, r in enumerate(rows):
        out[h, m - len(r):] = r
    return out
