"""``h2o``: heavy hitters — keep the tokens that received the most attention so far."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.kv.selectors.base import Selector, View, pin
from kvtier.registry import param, register


@register
@dataclass(frozen=True)
class H2O(Selector):
    """H2O: heavy hitters by attention accumulated over every query, per KV head, plus recent tokens."""

    name = "h2o"
    accumulates = True
    ratio: float = param(0.5, "fraction of the tokens removed", min=0.0, max=0.99)
    budget: int = param(0, "tokens kept (overrides ratio when > 0)", min=0)
    recent: int = param(0, "newest tokens always kept (H2O's local window)", min=0)
    ada: float = param(0.0, "per-head budgets (AdaKV): the heads share the layer's budget, each keeping "
                       "at least this part of its even share (0: the same count per head)",
                       min=0.0, max=1.0, quiet=True)

    def score(self, view: View) -> torch.Tensor:
        # mean attention received: a token at position p was seen by (length - p) queries
        # (kvpress's ObservedAttentionPress normalises the same way)
        scores = view.acc / (view.length - view.pos).clamp(min=1)
        return pin(scores, view.pos >= view.length - self.recent) if self.recent else scores
