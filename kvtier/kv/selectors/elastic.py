"""``elastic``: Elastic Cache — the least important tokens are merged into their nearest kept
anchor instead of dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.kv.selectors.base import Selector, View, pin
from kvtier.registry import param, register


@register
@dataclass(frozen=True)
class Elastic(Selector):
    """Elastic Cache: keep the most attended tokens as anchors; merge every other token into its nearest anchor."""

    name = "elastic"
    accumulates = True
    merges = True
    ratio: float = param(0.5, "fraction of the tokens merged away", min=0.0, max=0.99)
    budget: int = param(0, "tokens (anchors) kept (overrides ratio when > 0)", min=0)
    recent: int = param(8, "newest tokens always kept as they are", min=0)
    sinks: int = param(4, "first tokens always kept as they are, nothing merged into them "
                       "(attention sinks)", min=0)

    def score(self, view: View) -> torch.Tensor:
        scores = view.acc / (view.length - view.pos).clamp(min=1)  # mean attention received
        fixed = (view.pos < self.sinks) | (view.pos >= view.length - self.recent)
        return pin(scores, fixed)


def merge(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor,
          sinks: int = 0):
    """Merge every token not in ``keep`` into the kept token nearest to it in position (per KV
    head). A merged entry is the count-weighted mean of its keys and of its values, and its
    bias (log count) makes it weigh in the softmax as all of them: tokens with equal keys lose
    no attention mass. k, v ``(Hkv, n, D)``; pos, bias ``(Hkv, n)``; keep ``(Hkv, m)`` ascending.
    A token with bias -inf (out of a sliding window) stands for nothing and adds nothing.
    Kept tokens at positions below ``sinks`` (attention sinks) take in no other token: merging
    into a sink changes what every query attends most (SmolLM2 at 2K, ratio 0.5: +57 % PPL
    against +2 % without). A token with no other anchor is dropped.
    Returns k, v, pos, bias of the kept tokens."""
    hkv, _, d = k.shape
    kept_pos = pos.gather(1, keep).float()  # (Hkv, m)
    dist = (pos.float()[:, :, None] - kept_pos[:, None, :]).abs()  # (Hkv, n, m)
    if sinks:
        dist = dist.masked_fill((kept_pos[:, None, :] < sinks) & (dist > 0), float("inf"))
    nearest, owner = dist.min(-1)  # the anchor each token joins (itself for a kept token)
    count = bias.exp().masked_fill(nearest.isinf(), 0.0)  # tokens each entry already stands for
    m = keep.shape[1]
    total = torch.zeros(hkv, m).scatter_add_(1, owner, count)
    w = (count / total.gather(1, owner).clamp_min(1e-30))[..., None]  # (Hkv, n, 1); count 0: weight 0
    idx = owner[..., None].expand(-1, -1, d)
    k_m = torch.zeros(hkv, m, d).scatter_add_(1, idx, k.float() * w).to(k.dtype)
    v_m = torch.zeros(hkv, m, d).scatter_add_(1, idx, v.float() * w).to(v.dtype)
    return k_m, v_m, pos.gather(1, keep), total.log()
