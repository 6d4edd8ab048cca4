"""Group-quantized matrices kept packed: the layouts of GGUF Q8_0, Q4_0 and Q4_1.

``W (N, K)`` in groups of 32 along K, each with an fp16 scale ``d`` (and for 4-bit an fp16
minimum ``m``)::

    bits=8: W[n, 32g + j] = d[n, g] * codes[n, 32g + j]                  codes int8 (N, K)
    bits=4: W[n, 32g + j] = d[n, g] * q + m[n, g]                         codes uint8 (N, K/2)
            q = codes[n, 16g + j] & 15 (j < 16), codes[n, 16g + j - 16] >> 4 (j >= 16)

Q4_0 (``W = d * (q - 8)``) is held as Q4_1 with ``m = -8 d``, which is exact in fp16. A
decode step multiplies on the packed bytes in the native kernel (``kernels/qmatmul.c``); a
long prefill chunk dequantizes each matrix once (to the compute dtype) and runs a blocked matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtier import kernels
from kvtier.weights.base import Linear

GROUP = 32
# Rows of x up to which the packed kernel beats dequantize + blocked matmul (measured on a
# 2-core AVX-512 machine with SmolLM2's matrices: the kernel reads the weights once per call,
# the blocked matmul wins once the arithmetic, not the bytes, is the cost).
KERNEL_ROWS = 32


class GroupQuant(Linear):
    """``W (N, K)`` quantized in groups of 32 (see the module docstring for the layout)."""

    def __init__(self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, bits: int,
                 dtype: torch.dtype = torch.float32):
        assert bits in (4, 8) and d.dtype == torch.float16 and (m is None or m.dtype == torch.float16)
        self.codes, self.d, self.m, self.bits, self.dtype = codes.contiguous(), d.contiguous(), \
            None if m is None else m.contiguous(), bits, dtype
        self.shape = (d.shape[0], d.shape[1] * GROUP)

    def __call__(self, x, bias=None):
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = kernels.qmatmul(x2, self.codes, self.d, self.m, self.bits) if x2.shape[0] <= KERNEL_ROWS else None
        if y is None:
            w = kernels.qdequant(self.codes, self.d, self.m, self.bits, x.shape[-1], x.dtype)
            w = self.dense() if w is None else w
            y = F.linear(x2, w.to(x.dtype))
        elif y.dtype != x.dtype:
            y = y.to(x.dtype)
        if bias is not None:
            y = y + bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.shape[0])

    def rows(self, ids):
        return dequantize(self.codes[ids], self.d[ids], None if self.m is None else self.m[ids],
                          self.bits).to(self.dtype)

    def dense(self):
        return dequantize(self.codes, self.d, self.m, self.bits)

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.codes, self.d, self.m) if t is not None)

    @classmethod
    def cat(cls, parts):
        if len({p.bits for p in parts}) > 1:  # e.g. q4 rows beside a GGUF's Q8_0 rows: widen
            return cls.cat([p if p.bits == 8 else quantize(p.dense(), 8, p.dtype) for p in parts])
        ms = [p.m for p in parts]
        if any(m is None for m in ms) and parts[0].bits == 4:
            ms = [p.m if p.m is not None else torch.zeros_like(p.d) for p in parts]
        return cls(torch.cat([p.codes for p in parts]), torch.cat([p.d for p in parts]),
                   None if ms[0] is None else torch.cat(ms), parts[0].bits, parts[0].dtype)

    def permute_rows(self, index: torch.Tensor) -> GroupQuant:
        """The same matrix with its rows reordered (``W[index]``): packed rows move whole."""
        return GroupQuant(self.codes[index], self.d[index], None if self.m is None else self.m[index],
                          self.bits, self.dtype)


def dequantize(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The PyTorch reference: packed fields -> fp32 ``(N, K)``."""
    n, g = d.shape
    if bits == 8:
        q = codes.view(n, g, GROUP).float()
    else:
        c = codes.view(n, g, GROUP // 2)
        q = torch.cat([c & 15, c >> 4], -1).float()
    w = q * d.float()[..., None]
    if m is not None:
        w = w + m.float()[..., None]
    return w.reshape(n, g * GROUP)


def quantize(w: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> GroupQuant:
    """Round-to-nearest group quantization of ``w (N, K)`` as GGUF does: Q8_0 (symmetric,
    ``d = max|w| / 127``) for 8 bits, Q4_1 (``m = min``, ``d = (max - min) / 15``) for 4."""
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"a {n}x{k} matrix: group quantization needs K divisible by {GROUP}")
    g = w.float().reshape(n, k // GROUP, GROUP)
    # the arithmetic of gguf-py's quantizer (scale inverted in fp32, halves rounded away from
    # zero), so a matrix quantized here has the bytes llama.cpp's converter would write
    if bits == 8:
        d = g.abs().amax(-1) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros(()))
        x = g * inv[..., None]
        codes = (x.sign() * (x.abs() + 0.5).floor()).clamp(-127, 127).to(torch.int8)
        return GroupQuant(codes.reshape(n, k), d.half(), None, 8, dtype)
    lo, hi = g.amin(-1), g.amax(-1)
    d = (hi - lo) / 15
    inv = torch.where(d > 0, 1 / d, torch.zeros(()))
    q = ((g - lo[..., None]) * inv[..., None] + 0.5).floor().clamp(0, 15).to(torch.uint8)
    codes = q[..., : GROUP // 2] | (q[..., GROUP // 2:] << 4)
    return GroupQuant(codes.reshape(n, k // 2), d.half(), lo.half(), 4, dtype)
