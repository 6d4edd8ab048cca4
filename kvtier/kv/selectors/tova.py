"""``tova``: TOVA — keep the tokens the newest query attends to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.kv.selectors.base import Selector, View, group_attention, pin
from kvtier.registry import param, register


@register
@dataclass(frozen=True)
class Tova(Selector):
    """TOVA: evict the tokens with the lowest attention from the newest query (mean over all heads)."""

    name = "tova"
    queries = 1
    ratio: float = param(0.5, "fraction of the tokens removed", min=0.0, max=0.99)
    budget: int = param(0, "tokens kept (overrides ratio when > 0)", min=0)

    def score(self, view: View) -> torch.Tensor:
        last = torch.tensor([view.length - 1])
        w = group_attention(view.q[:, -1:], view.k, last, view.pos, window=view.window)  # (Hkv, G, 1, n)
        # one ranking for every head (TOVA averages over all heads); the newest token stays
        scores = w.mean((1, 2)).mean(0, keepdim=True).expand_as(view.pos)
        return pin(scores, view.pos == view.length - 1)
