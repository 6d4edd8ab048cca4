"""Bit packing shared by the integer codecs: ``8 // bits`` values per byte, lowest bits first."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q: integers in ``[0, 2**bits)``, last dim divisible by ``8 // bits`` -> uint8 ``(..., n*bits/8)``."""
    if bits == 8:
        return q.to(torch.uint8)
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=q.device)
    grouped = q.to(torch.int32).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``(..., m)`` -> integers ``(..., m * 8 // bits)`` as uint8."""
    if bits == 8:
        return p
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=p.device)
    q = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(*p.shape[:-1], -1)


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
    table = _byte_table(bits, values).to(p.device)
    return F.embedding(p.int(), table).flatten(-2)
