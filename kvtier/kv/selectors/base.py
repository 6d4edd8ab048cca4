"""The selector base class: which tokens of a layer's cache to keep.

A selector scores the tokens a layer holds, per KV head, and the cache keeps the top scorers
(:mod:`kvtier.kv.select` does the keeping and rebuilds the codec's blocks from the kept tokens,
so memory really shrinks). Budgets follow kvpress: ``ratio`` is the fraction removed, or
``budget`` an absolute number of tokens to keep (it wins when set). The cache is compressed
once at the end of the first prefill and then held at that size while decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvtier.errors import KvtierError


@dataclass
class View:
    """What a selector may look at: one layer's held tokens, in full precision.

    k, v: ``(Hkv, n, D)``; pos: ``(Hkv, n)`` each token's position in the sequence; q: the
    newest queries ``(Hq, w, D)`` (post-RoPE, at positions ``length - w ..``), pre-scaled by
    ``1/sqrt(D)``; acc: ``(Hkv, n)`` attention each token received from every query so far
    (mean over the heads of its group), or None unless the selector ``accumulates``; keep: how
    many tokens per KV head will be kept; window: the layer's sliding window, or None.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    q: torch.Tensor | None
    acc: torch.Tensor | None
    length: int
    keep: int = 0
    window: int | None = None  # the layer's sliding window: queries see only keys inside it


class Selector:
    """Base of every selector. Subclasses are dataclasses registered by name with ``ratio``
    and ``budget`` fields."""

    name: ClassVar[str]
    kind: ClassVar[str] = "selector"
    queries: ClassVar[int] = 0        # newest queries it needs to see
    accumulates: ClassVar[bool] = False  # needs the attention every token received so far

    ratio: float
    budget: int

    def bind(self, model, index: int) -> Selector:
        """The selector as used by layer ``index`` of ``model`` (calibrated state); default: itself."""
        return self

    def target(self, n: int) -> int:
        """Tokens to keep out of ``n`` (the length at the first compression)."""
        if self.budget:
            return min(n, self.budget)
        return min(n, max(1, int(n * (1 - self.ratio))))  # kvpress's count

    def score(self, view: View) -> torch.Tensor:
        """``(Hkv, n)`` scores of the held tokens; the top scorers of each KV head are kept.
        Every evicting selector defines it; block selectors (``sparse``) pick blocks instead and
        are never asked."""
        raise KvtierError(f"internal: {self.name} picks blocks; it does not score tokens")


def group_attention(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                    rows: int = 256, window: int | None = None) -> torch.Tensor:
    """Softmax attention weights of queries over keys, ``(Hkv, G, T, n)`` in fp32, causal by
    position (a query sees keys at positions <= its own, and within ``window`` of it). q:
    ``(Hq, T, D)`` pre-scaled; k: ``(Hkv, n, D)``; q_pos ``(T,)``; k_pos ``(Hkv, n)``.
    Computed ``rows`` queries at a time; a query that sees no key gets all-zero weights."""
    hq, t, d = q.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    qg = q.float().reshape(hkv, g * t, d)
    out = []
    for a in range(0, t, rows):
        idx = torch.arange(a, min(a + rows, t))
        qa = qg.reshape(hkv, g, t, d)[:, :, idx].reshape(hkv, -1, d)
        s = torch.bmm(qa, k.float().transpose(1, 2)).reshape(hkv, g, len(idx), n)
        seen = k_pos[:, None, None, :] <= q_pos[idx][None, None, :, None]
        if window is not None:
            seen &= q_pos[idx][None, None, :, None] - k_pos[:, None, None, :] < window
        out.append(torch.softmax(s.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0))
    return torch.cat(out, 2)


def pin(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Scores with the tokens where ``keep`` is true raised above every other (always kept)."""
    return torch.where(keep, scores.max() + 1 + scores.abs().max(), scores)
