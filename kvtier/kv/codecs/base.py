"""The codec base class: how one full block of keys and values is stored.

A codec declares the tensors ("fields") it stores per KV head and block, encodes a batch of
full blocks into them and decodes a group of blocks back to full precision. The pool
(:mod:`kvtier.kv.blocks`) owns the storage; a codec holds no per-sequence state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class Codec(ABC):
    """Base of every codec. Subclasses are dataclasses registered by name."""

    name: ClassVar[str]
    kind: ClassVar[str] = "codec"

    @abstractmethod
    def fields(self, block_size: int, head_dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The stored tensors of one block of one KV head: ``{name: (shape, dtype)}``."""

    @abstractmethod
    def encode(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode full blocks.

        k, v: ``(Hkv, n, B, D)`` in the compute dtype. Returns ``{field: (Hkv, n, *shape)}``.
        """

    @abstractmethod
    def decode(self, data: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a group of blocks.

        data: ``{field: (Hkv, n, *shape)}``. Returns k, v as ``(Hkv, n * B, D)`` in ``dtype``.
        """
