"""Which kinds of matrix a format may quantize further: each kind tried alone on the
calibration text, the rest left as they were (``w8a8``'s weight-only fallback, ``w4a4``'s
8-bit activations)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def kind(name: str) -> str:
    """``model.layers.3.mlp.down_proj.weight`` -> ``down_proj``."""
    return name.rsplit(".", 2)[-2]


def perplexity(model, ids: list[int], chunk: int = 128) -> float:
    """The model's perplexity on ``ids``, 128 tokens of logits at a time (a vocabulary is wide)."""
    from kvtier.engine import ModelRunner

    runner = ModelRunner(model, "dense")
    cache, nll = runner.new_cache(len(ids)), 0.0
    for a in range(0, len(ids) - 1, chunk):
        logits = runner.feed([cache], [ids[a:a + chunk]], logits="all").float()[: len(ids) - 1 - a]
        nll += F.cross_entropy(logits, torch.tensor(ids[a + 1:a + 1 + len(logits)]), reduction="sum").item()
    return math.exp(nll / (len(ids) - 1))


def costly_kinds(model, ids: list[int], names: list[str], base: Callable[[str], object],
                 tried: Callable[[str], object], limit: float) -> set[str]:
    """The kinds of the matrices ``names`` whose ``tried(name)`` form, that kind alone (every other
    matrix in its ``base(name)`` form), raises the perplexity on ``ids`` by more than ``limit``
    over all in the base form. Leaves the matrices in their base form."""
    for n in names:
        model.w[n] = base(n)
    reference = perplexity(model, ids)
    costly = set()
    for k in sorted({kind(n) for n in names}):
        for n in names:
            model.w[n] = tried(n) if kind(n) == k else base(n)
        if perplexity(model, ids) > reference * (1 + limit):
            costly.add(k)
    for n in names:
        model.w[n] = base(n)
    return costly
