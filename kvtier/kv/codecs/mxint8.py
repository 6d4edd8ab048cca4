"""``mxint8``: MXINT8 block format for the KV cache (see :mod:`kvtier.kv.codecs.blockscaled`)."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.kv.codecs.blockscaled import BlockScaled
from kvtier.registry import register


@register
@dataclass(frozen=True)
class MxInt8(BlockScaled):
    """MXINT8: 8-bit integer elements (1.6 fixed point), blocks of 32 with a shared power-of-two E8M0 scale."""

    name = "mxint8"
    element, bits, block, element_max, scale = "int8", 8, 32, 1.984375, "e8m0"
