"""``nvint4``: NVINT4 block format for the KV cache (see :mod:`kvtier.kv.codecs.blockscaled`)."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.kv.codecs.blockscaled import BlockScaled
from kvtier.registry import register


@register
@dataclass(frozen=True)
class NvInt4(BlockScaled):
    """NVINT4: symmetric INT4 elements, blocks of 16 with an FP8 E4M3 scale, one FP32 scale per tensor."""

    name = "nvint4"
    element, bits, block, element_max, scale = "int4", 4, 16, 7.0, "e4m3+fp32"
