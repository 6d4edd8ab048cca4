"""``mxfp8``: MXFP8 block format for the KV cache (see :mod:`kvtier.kv.codecs.blockscaled`)."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.kv.codecs.blockscaled import BlockScaled
from kvtier.registry import register


@register
@dataclass(frozen=True)
class MxFp8(BlockScaled):
    """MXFP8: FP8 E4M3 elements, blocks of 32 with a shared power-of-two E8M0 scale."""

    name = "mxfp8"
    element, bits, block, element_max, scale = "e4m3", 8, 32, 448.0, "e8m0"
