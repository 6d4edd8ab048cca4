"""``--weights q8``: every matrix in 8-bit groups of 32 (GGUF Q8_0), multiplied packed."""

from __future__ import annotations

from kvtier.weights import register
from kvtier.weights.base import Format
from kvtier.weights.quant import quantize


@register
class Q8(Format):
    name = "q8"
    help = "8-bit groups of 32 with an fp16 scale (GGUF Q8_0 layout), kept packed: 8.5 bits a weight"

    def pack(self, name, w, raw, dtype):
        if raw is not None and raw.bits == 8:  # the GGUF's own Q8_0 bytes
            raw.dtype = dtype
            return raw
        return quantize(w, 8, dtype)
