"""``window``: StreamingLLM — the first ``sinks`` tokens plus the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.kv.selectors.base import Selector, View
from kvtier.registry import param, register


@register
@dataclass(frozen=True)
class Window(Selector):
    """StreamingLLM: keep the attention sinks and a window of the most recent tokens."""

    name = "window"
    sinks: int = param(4, "first tokens always kept (attention sinks)", min=0)
    recent: int = param(0, "recent tokens kept; 0: as many as ratio/budget leave", min=0)
    ratio: float = param(0.5, "fraction of the tokens removed", min=0.0, max=0.99)
    budget: int = param(0, "tokens kept (overrides ratio when > 0)", min=0)

    def target(self, n: int) -> int:
        if self.recent:
            return min(n, self.sinks + self.recent)
        return super().target(n)

    def score(self, view: View) -> torch.Tensor:
        pos = view.pos.float()
        return torch.where(view.pos < self.sinks, pos.new_tensor(float(view.length)) + 1, pos)
