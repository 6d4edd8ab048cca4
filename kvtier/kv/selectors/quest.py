"""``quest``: Quest — each decode step attends only the blocks whose key bounds promise the
highest scores for the current query; nothing is deleted."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtier.kv.selectors.base import Selector
from kvtier.registry import param, register


@register
@dataclass(frozen=True)
class Quest(Selector):
    """Quest: per-block key bounds; each step reads the top blocks per KV head (block-sparse attention)."""

    name = "quest"
    sparse = True  # chooses blocks per step, deletes nothing
    top_blocks: int = param(0, "blocks read per step and KV head (0: use share)", min=0)
    share: float = param(0.125, "share of the held KV bytes read per step, key bounds included "
                         "(when top_blocks is 0)", min=0.0, max=1.0)
    sink_block: bool = param(True, "always read the first block (it holds the attention sinks)")
    recent: int = param(1, "newest sealed blocks always read (a local window next to the residual)", min=0)
    dense_layers: int = param(0, "first layers that read every block (Quest leaves the first two dense)", min=0)
    sliding: bool = param(False, "pick blocks inside sliding windows too (else a sliding layer reads its "
                          "whole window)", quiet=True)
    ratio = 0.0
    budget = 0

    def n_blocks(self, held: int, bounds: float = 0.0) -> int:
        """Blocks to read out of ``held``: ``top_blocks``, or as many as fit in ``share`` of the
        held blocks' bytes once every block's key bounds are read (``bounds``: a block's bounds
        over its bytes). A share of 1 reads every block and no bounds; at least one block is
        read even when the bounds alone exceed the share (a small share with a low-bit codec)."""
        if self.top_blocks:
            return max(1, min(held, self.top_blocks))
        if self.share >= 1.0:
            return held
        return max(1, min(held, math.floor((self.share - bounds) * held + 1e-9)))

    def pick(self, q: torch.Tensor, bounds: torch.Tensor, k: int, fixed: torch.Tensor | None = None) -> torch.Tensor:
        """``k`` block indices per KV head ``(Hkv, k)``, ascending, for pre-scaled queries
        ``q: (Hkv, G, D)`` and key bounds ``(Hkv, n, 2, D)`` (channel min, max): the highest
        upper bound of q . k over the block, the best of the group's query heads. The sink
        block, the ``recent`` newest blocks and the ``fixed`` ones come first, within ``k``."""
        lo, hi = bounds[:, :, 0].float(), bounds[:, :, 1].float()  # (Hkv, n, D)
        qf = q.float()[:, :, None, :]  # (Hkv, G, 1, D)
        upper = torch.maximum(qf * lo[:, None], qf * hi[:, None]).sum(-1).amax(1)  # (Hkv, n)
        if self.sink_block:
            upper[:, 0] = float("inf")
        if self.recent:
            upper[:, -self.recent:] = float("inf")
        if fixed is not None:
            upper = torch.where(fixed, torch.full_like(upper, float("inf")), upper)
        return upper.topk(k, dim=-1).indices.sort(-1).values
