"""``--weights q4``: matrices in 4-bit groups of 32 (GGUF Q4_1 layout), multiplied packed.

A GGUF's own Q4_0/Q4_1 tensors are kept byte for byte, so SmolLM2's Q4_1 file gives exactly
the weights it holds; its Q8_0 embedding stays 8-bit. Other tensors are quantized from the float
weights: to 4 bits, except the embedding and output matrices, which stay 8-bit (as llama.cpp's
Q4 files keep them): they are the largest and the most sensitive.
"""

from __future__ import annotations

from kvtier.weights import register
from kvtier.weights.base import Format
from kvtier.weights.quant import quantize

EIGHT_BIT = ("embed_tokens", "lm_head")


@register
class Q4(Format):
    name = "q4"
    help = ("4-bit groups of 32 with fp16 scale and minimum (GGUF Q4_1 layout), kept packed: 5 bits "
            "a weight; a GGUF's own Q4_0/Q4_1/Q8_0 tensors are used as they are")

    def pack(self, name, w, raw, dtype):
        bits = 8 if any(e in name for e in EIGHT_BIT) else 4
        if raw is not None and raw.bits == bits:  # the GGUF's own bytes
            raw.dtype = dtype
            return raw
        return quantize(w, bits, dtype)
