"""``nvfp4``: NVFP4 block format for the KV cache (see :mod:`kvtier.kv.codecs.blockscaled`)."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.kv.codecs.blockscaled import BlockScaled
from kvtier.registry import register


@register
@dataclass(frozen=True)
class NvFp4(BlockScaled):
    """NVFP4: FP4 E2M1 elements, blocks of 16 with an FP8 E4M3 scale, one FP32 scale per tensor."""

    name = "nvfp4"
    element, bits, block, element_max, scale = "e2m1", 4, 16, 6.0, "e4m3+fp32"
