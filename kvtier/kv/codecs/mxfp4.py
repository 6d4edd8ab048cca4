"""``mxfp4``: MXFP4 block format for the KV cache (see :mod:`kvtier.kv.codecs.blockscaled`)."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.kv.codecs.blockscaled import BlockScaled
from kvtier.registry import register


@register
@dataclass(frozen=True)
class MxFp4(BlockScaled):
    """MXFP4: FP4 E2M1 elements packed two per byte, blocks of 32 with a shared E8M0 scale."""

    name = "mxfp4"
    element, bits, block, element_max, scale = "e2m1", 4, 32, 6.0, "e8m0"
