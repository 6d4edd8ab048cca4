"""``--weights dense``: every matrix a plain tensor in the compute dtype (``--dtype``)."""

from __future__ import annotations

from kvtier.weights import register
from kvtier.weights.base import Dense, Format


@register
class DenseFormat(Format):
    name = "dense"
    help = "plain tensors in the compute dtype (--dtype): fp32 or bf16"

    def pack(self, name, w, raw, dtype):
        return Dense(w.to(dtype))
