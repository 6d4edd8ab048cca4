"""Bit packing shared by the integer and 4-bit codecs, in planes.

A row of ``n`` codes of ``bits`` bits is cut into ``8 // bits`` planes of consecutive codes
(plane i = codes ``i*n/p .. (i+1)*n/p - 1``) and byte j holds code j of every plane, plane i at
bit ``i * bits``. Unpacking plane i is then one shift and one mask over the bytes, with no
interleaving: attention on packed codes (:meth:`Codec.attend`) multiplies plane by plane.
Three-bit codes pack eight to three bytes (planes of n/8 codes in a 24-bit word).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def planes(bits: int) -> int:
    """How many planes a row of ``bits``-bit codes is cut into."""
    return 8 if bits == 3 else 8 // bits


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q: integers in ``[0, 2**bits)``, last dim divisible by :func:`planes` -> uint8 ``(..., n*bits/8)``."""
    if bits == 8:
        return q.to(torch.uint8)
    p = planes(bits)
    cut = q.to(torch.int32).reshape(*q.shape[:-1], p, q.shape[-1] // p)  # (..., planes, n/p)
    shifts = torch.arange(0, p * bits, bits, dtype=torch.int32, device=q.device)[:, None]
    word = (cut << shifts).sum(-2)  # (..., n/p)
    if bits == 3:  # a 24-bit word per 8 codes -> 3 byte planes
        word = torch.stack([(word >> s) & 255 for s in (0, 8, 16)], -2).flatten(-2)
    return word.to(torch.uint8)


def unpack(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``(..., m)`` -> integers ``(..., m * 8 // bits)`` as uint8."""
    if bits == 8:
        return p
    if bits == 3:
        b = p.to(torch.int32).reshape(*p.shape[:-1], 3, p.shape[-1] // 3)
        word = b[..., 0, :] | (b[..., 1, :] << 8) | (b[..., 2, :] << 16)
        return torch.cat([(word >> (3 * i)) & 7 for i in range(8)], -1).to(torch.uint8)
    mask = (1 << bits) - 1
    return torch.cat([(p >> s) & mask for s in range(0, 8, bits)], -1)


def plane(p: torch.Tensor, bits: int, i: int) -> torch.Tensor:
    """Plane ``i`` of packed bytes ``(..., m)`` as uint8 codes ``(..., m)`` (bits 2 and 4)."""
    return (p >> (i * bits)) & ((1 << bits) - 1) if bits < 8 else p


@functools.cache
def _byte_table(bits: int, values: tuple[float, ...] | None) -> torch.Tensor:
    """``(256, 8 // bits)``: the codes a byte holds, mapped through ``values`` (identity if None)."""
    byte = torch.arange(256, dtype=torch.int32)[:, None]
    codes = (byte >> torch.arange(0, 8, bits, dtype=torch.int32)) & ((1 << bits) - 1)
    return torch.tensor(values)[codes] if values is not None else codes.float()


def unpack_float(p: torch.Tensor, bits: int, values: tuple[float, ...] | None = None) -> torch.Tensor:
    """Unpack to fp32 in one gather per byte: uint8 ``(..., m)`` -> ``(..., m * 8 // bits)``.

    ``values[code]`` is the number a code stands for (e.g. the E2M1 grid); default the code itself.
    """
    if bits == 3:
        q = unpack(p, 3).float()
        return q if values is None else torch.tensor(values, device=p.device)[q.long()]
    table = _byte_table(bits, values).to(p.device)
    return F.embedding(p.int(), table).transpose(-1, -2).flatten(-2)  # (..., planes, m) -> rows
