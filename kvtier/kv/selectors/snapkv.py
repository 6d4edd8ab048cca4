"""``snapkv``: SnapKV — the last ``window`` queries vote for the tokens to keep."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtier.kv.selectors.base import Selector, View, group_attention, pin
from kvtier.registry import param, register


@register
@dataclass(frozen=True)
class SnapKV(Selector):
    """SnapKV: attention of an observation window of recent queries, pooled, per KV head."""

    name = "snapkv"
    ratio: float = param(0.5, "fraction of the tokens removed", min=0.0, max=0.99)
    budget: int = param(0, "tokens kept (overrides ratio when > 0)", min=0)
    window: int = param(32, "recent queries that vote (their own tokens are always kept)", min=1)
    kernel: int = param(7, "width of the average pooling over neighbouring tokens (odd)", min=1)
    ada: float = param(0.0, "per-head budgets (AdaKV): the heads share the layer's budget, each keeping "
                       "at least this part of its even share (0: the same count per head)",
                       min=0.0, max=1.0, quiet=True)

    @property
    def queries(self) -> int:  # type: ignore[override]
        return self.window

    def score(self, view: View) -> torch.Tensor:
        votes, w = vote(view, self.window, self.kernel)
        return pin(votes.mean(1), view.pos >= view.length - w)  # mean over the group's heads


def vote(view: View, window: int, kernel: int) -> tuple[torch.Tensor, int]:
    """Attention of the last ``window`` queries, averaged over them and pooled over ``kernel``
    neighbouring tokens: ``(Hkv, G, n)`` per query head, and the window used."""
    w = min(window, view.q.shape[1])
    q_pos = torch.arange(view.length - w, view.length)
    scores = group_attention(view.q[:, -w:], view.k, q_pos, view.pos, window=view.window).mean(2)  # (Hkv, G, n)
    if kernel > 1:
        hkv, g, n = scores.shape
        scores = F.avg_pool1d(scores.reshape(hkv * g, 1, n), kernel, 1, kernel // 2,
                              count_include_pad=True).reshape(hkv, g, n)
    return scores, w
