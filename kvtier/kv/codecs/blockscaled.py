"""Shared machinery of the micro-scaled block formats (OCP MX and NVIDIA NV).

Along the head dimension, each token's keys and values are cut into blocks of ``block``
elements that share one scale: a power of two stored as E8M0 (MX, blocks of 32) or an FP8
E4M3 scale times one FP32 scale per tensor (NV, blocks of 16; here a tensor is one KV block of
one head). Elements are stored as real bit patterns: INT8, FP8 E4M3, FP4 E2M1 (two per byte)
or INT4 (two per byte). With ``hadamard=true`` the head dimension is first rotated by a
normalised Walsh-Hadamard matrix, which spreads outlier channels over the block.

Attention runs on the codes in a native kernel (``kernels/bsattn.c``): elements by lookup
table, times their block's scale. The rotation is orthogonal and commutes with the dot
product, so the query is rotated once per call and the output once.

Paper: Chen et al., "INT v.s. FP: A Comprehensive Study of Fine-Grained Low-bit Quantization
Formats", 2025, https://arxiv.org/abs/2510.25602; OCP Microscaling Formats (MX) v1.0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvtier import kernels
from kvtier.errors import KvtierError
from kvtier.kv.codecs.base import Codec, plain_pieces
from kvtier.kv.codecs.packing import pack, unpack_float
from kvtier.registry import param

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E4M3_MAX = 448.0
E2M1_VALUES = tuple(E2M1_GRID.tolist()) + tuple((-E2M1_GRID).tolist())  # by 4-bit code
INT4_VALUES = tuple(float(c - 8) for c in range(16))


@functools.cache
def hadamard(d: int) -> torch.Tensor:
    """Normalised Walsh-Hadamard matrix ``(d, d)``: orthogonal and symmetric, so H @ H = I."""
    if d & (d - 1):
        raise KvtierError(f"hadamard=true needs a power-of-two head dimension, not {d}")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / d ** 0.5


# element formats: values already divided by their scale -> codes, and back
def encode_elements(y: torch.Tensor, element: str) -> torch.Tensor:
    if element == "int8":  # 1.6 fixed point: [-127, 127] / 64
        return (y * 64).round_().clamp_(-127, 127).to(torch.int8).view(torch.uint8)
    if element == "e4m3":
        return y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    if element == "e2m1":  # sign bit, then the index of the nearest magnitude on the grid
        mids = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2
        idx = torch.bucketize(y.abs().clamp(max=6.0).contiguous(), mids.to(y.device))
        return pack(((y < 0).to(torch.uint8) << 3) | idx.to(torch.uint8), 4)
    if element == "int4":  # symmetric [-7, 7], stored offset by 8
        return pack((y.round().clamp(-7, 7) + 8).to(torch.uint8), 4)
    raise AssertionError(element)


def decode_elements(codes: torch.Tensor, element: str) -> torch.Tensor:
    if element == "int8":
        return codes.view(torch.int8).float() / 64
    if element == "e4m3":
        return codes.view(torch.float8_e4m3fn).float()
    if element == "e2m1":  # code = sign << 3 | magnitude index
        return unpack_float(codes, 4, E2M1_VALUES)
    if element == "int4":
        return unpack_float(codes, 4, INT4_VALUES)
    raise AssertionError(element)


@functools.cache
def element_values(element: str) -> torch.Tensor:
    """The value of every code of an element format, fp32: 16 (4-bit) or 256 (one byte)."""
    if element in ("e2m1", "int4"):
        return torch.tensor(E2M1_VALUES if element == "e2m1" else INT4_VALUES)
    return decode_elements(torch.arange(256, dtype=torch.uint8), element).contiguous()


@functools.cache
def scale_values(scale: str) -> torch.Tensor:
    """The value of every scale byte, fp32: E8M0 (MX) or FP8 E4M3 (NV, before the tensor scale)."""
    byte = torch.arange(256, dtype=torch.uint8)
    if scale == "e8m0":
        return torch.exp2(byte.float() - 127)
    return byte.view(torch.float8_e4m3fn).float()


@dataclass(frozen=True)
class BlockScaled(Codec):
    """Base of the MX/NV codecs; subclasses set the class constants below."""

    element: ClassVar[str]        # int8 | e4m3 | e2m1 | int4
    bits: ClassVar[int]           # bits per element
    block: ClassVar[int]          # elements sharing a scale
    element_max: ClassVar[float]  # largest element magnitude
    scale: ClassVar[str]          # "e8m0" (MX) or "e4m3+fp32" (NV)
    group_blocks = 64  # attention on the codes: fewer, larger steps
    hadamard: bool = param(False, "rotate the head dimension by a Walsh-Hadamard matrix first")

    def fields(self, block_size, head_dim):
        if head_dim % self.block:
            raise KvtierError(f"{self.name}: head dimension {head_dim} is not a multiple of its block {self.block}")
        if self.hadamard:
            hadamard(head_dim)  # fails early on a non-power-of-two head dimension
        shapes = {"codes": ((block_size, head_dim * self.bits // 8), torch.uint8),
                  "scales": ((block_size, head_dim // self.block), torch.uint8)}
        if self.scale != "e8m0":
            shapes["tensor_scale"] = ((1,), torch.float32)
        return {f"{x}_{f}": spec for x in "kv" for f, spec in shapes.items()}

    def encode(self, k, v):
        out = {}
        for name, x in (("k", k), ("v", v)):
            x = x.float()
            if self.hadamard:
                x = x @ hadamard(x.shape[-1]).to(x.device)
            out.update({f"{name}_{f}": t for f, t in self._encode(x).items()})
        return out

    def _encode(self, x):
        h, n, b, d = x.shape
        blocks = x.reshape(h, n, b, d // self.block, self.block)
        amax = blocks.abs().amax(-1, keepdim=True)  # (h, n, b, d/block, 1)
        if self.scale == "e8m0":  # power of two putting the block max in the element's top binade
            exp = torch.floor(torch.log2(amax.clamp(min=2.0 ** -126))) - _emax(self.element_max)
            exp = exp.clamp(-127, 127)
            scale, stored = torch.exp2(exp), (exp + 127).to(torch.uint8)
            fields = {}
        else:  # FP8 block scale times one FP32 scale per tensor (one KV block of one head)
            g = amax.amax((2, 3, 4), keepdim=True) / (E4M3_MAX * self.element_max)  # (h, n, 1, 1, 1)
            g = torch.where(g > 0, g, torch.ones_like(g))
            s8 = (amax / self.element_max / g).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
            scale = s8.float() * g
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            stored = s8.view(torch.uint8)
            fields = {"tensor_scale": g.reshape(h, n, 1)}
        codes = encode_elements((blocks / scale).reshape(h, n, b, d), self.element)
        return {"codes": codes, "scales": stored.squeeze(-1), **fields}

    def decode(self, data, dtype):
        out = []
        for name in "kv":
            scales = data[f"{name}_scales"]  # (h, n, b, d/block)
            if self.scale == "e8m0":
                scale = torch.exp2(scales.float() - 127)
            else:
                g = data[f"{name}_tensor_scale"].unsqueeze(-1)  # (h, n, 1, 1)
                scale = scales.view(torch.float8_e4m3fn).float() * g
            y = decode_elements(data[f"{name}_codes"], self.element)  # (h, n, b, d)
            h, n, b, d = y.shape
            x = (y.reshape(h, n, b, d // self.block, self.block) * scale.unsqueeze(-1)).reshape(h, n * b, d)
            if self.hadamard:
                x = x @ hadamard(d).to(x.device)
            out.append(x.to(dtype))
        return out[0], out[1]


    def attend(self, q, data, rope=None):
        """Softmax pieces on the codes in the native kernel (elements by lookup, block scales
        folded in), or None (no kernel: the blocks are decoded). A Hadamard rotation commutes
        with the dot product: ``q . (y H) = (q H) . y`` and ``sum p (y H) = (sum p y) H``, so
        the query is rotated once and the output once."""
        had = hadamard(q.shape[-1]).to(q.device) if self.hadamard else None
        qh = q.float() @ had if had is not None else q
        fields = [data.get(f"{x}_{f}") for x in "kv" for f in ("codes", "scales", "tensor_scale")]
        pieces = kernels.blockscaled_attend(qh, fields, element_values(self.element), scale_values(self.scale),
                                            self.bits, self.block)
        if pieces is None or had is None:
            return pieces
        m, l, o = pieces
        return m, l, o @ had

    def native_job(self, data, rows, rope=None):
        """:meth:`attend` as a job of the batched decode kernel (the Hadamard rotation as its
        turn of the head space)."""
        fields = [data.get(f"{x}_{f}") for x in "kv" for f in ("codes", "scales", "tensor_scale")]
        job = kernels.blockscaled_job(fields, element_values(self.element), scale_values(self.scale), self.bits,
                                      self.block, rows)
        if job is None or not self.hadamard:
            return job
        h, d = fields[0].shape[0], fields[0].shape[-1] * 8 // self.bits
        turn = hadamard(d).expand(h, d, d)
        return job.turned(turn, turn)

    def attend_torch(self, q, data):
        """The reference of the kernel: the blocks decoded, softmax pieces in fp32."""
        return plain_pieces(q, *self.decode(data, torch.float32))


def _emax(element_max: float) -> float:
    """Exponent of the element format's largest power of two (E2M1: 2, E4M3: 8, INT8 1.6: 0)."""
    return float(torch.floor(torch.log2(torch.tensor(element_max))))
