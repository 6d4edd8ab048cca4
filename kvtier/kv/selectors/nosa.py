"""``nosa``: NOSA-style block selection — part of each step's blocks chosen without the step's
query (ranked once per prefill by its last queries, so stable from step to step), the rest by
the query's key bounds (Quest)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtier.kv.selectors.base import group_attention
from kvtier.kv.selectors.quest import Quest
from kvtier.registry import param, register


@register
@dataclass(frozen=True)
class Nosa(Quest):
    """NOSA: query-agnostic blocks (attention of the last prefill's last queries, fixed) + query-aware blocks (Quest bounds)."""

    name = "nosa"
    agnostic: float = param(0.5, "share of each step's blocks chosen without the query", min=0.0, max=1.0)
    window: int = param(32, "a prefill's last queries that rank blocks for the agnostic part", min=1)

    @property
    def queries(self) -> int:  # type: ignore[override]
        return self.window

    def rank(self, q: torch.Tensor, k: torch.Tensor, length: int, block_size: int, first: int) -> torch.Tensor:
        """Query-agnostic block scores ``(Hkv, n_blocks)``: attention mass the prompt's last
        ``window`` queries put on each block. q ``(Hq, w, D)`` pre-scaled; k ``(Hkv, n*B, D)``
        the blocks' keys, the first at position ``first``."""
        w = q.shape[1]
        pos = torch.arange(first, first + k.shape[1]).expand(k.shape[0], -1)
        att = group_attention(q, k, torch.arange(length - w, length), pos)  # (Hkv, G, w, n*B)
        return att.sum((1, 2)).reshape(k.shape[0], -1, block_size).sum(-1)

    def fixed(self, scores: torch.Tensor, held: int, k: int) -> torch.Tensor:
        """The query-agnostic blocks: a mask ``(Hkv, held)`` of the top ``agnostic`` share of a
        step's ``k`` blocks, besides the sink block and the ``recent`` ones (always read)."""
        always = torch.zeros(held, dtype=torch.bool)
        always[:int(self.sink_block)] = True
        if self.recent:
            always[-self.recent:] = True
        a = max(0, min(k - int(always.sum()), math.floor(self.agnostic * k)))
        mask = torch.zeros(scores.shape[0], held, dtype=torch.bool)
        if a:
            ranked = scores[:, :held].masked_fill(always, float("-inf"))
            mask.scatter_(1, ranked.topk(a, dim=-1).indices, True)
        return mask
