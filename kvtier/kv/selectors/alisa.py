"""``alisa``: ALISA's sparse window attention — a window of recent tokens plus the tokens
with the highest attention accumulated over the steps so far, re-chosen while decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.kv.selectors.base import Selector, View, pin
from kvtier.registry import param, register


@register
@dataclass(frozen=True)
class Alisa(Selector):
    """ALISA: sparse window attention — recent window + highest accumulated attention, re-chosen every few steps."""

    name = "alisa"
    accumulates = True
    ratio: float = param(0.5, "fraction of the tokens removed", min=0.0, max=0.99)
    budget: int = param(0, "tokens kept (overrides ratio when > 0)", min=0)
    local: float = param(0.5, "share of the kept tokens that is the recent window", min=0.0, max=1.0)
    every: int = param(16, "decode steps between re-choices (ALISA chooses step by step)", min=1)

    @property
    def slack(self) -> int:
        return self.every

    def score(self, view: View) -> torch.Tensor:
        # globally dynamic tokens: attention summed over every query so far (not normalised:
        # a token that kept mattering step after step ranks high); locally static: the newest
        return pin(view.acc, view.pos >= view.length - int(self.local * view.keep))
