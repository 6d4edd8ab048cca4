"""The KV cache of one sequence: per layer, full blocks in a codec's pool plus a residual block.

New tokens go to the residual block, kept in the compute dtype; when it fills, it is encoded
once as a block and never touched again. A sliding-window layer frees the blocks that no
future query can see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.kv.blocks import BlockPool
from kvtier.kv.codecs.base import Codec

TABLE_ENTRY_BYTES = 8  # per held block: int32 slot + int32 start position


@dataclass
class Part:
    """A group of keys/values for attention. k, v: ``(Hkv, N, D)``; positions start..start+N-1."""

    k: torch.Tensor
    v: torch.Tensor
    start: int


class LayerKV:
    """One layer of one sequence's cache."""

    def __init__(self, codec: Codec, n_kv: int, head_dim: int, block_size: int = 64,
                 window: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.pool = BlockPool(codec, n_kv, head_dim, block_size, device)
        self.n_kv, self.head_dim = n_kv, head_dim
        self.block_size, self.window, self.dtype = block_size, window, dtype
        self.residual_k = torch.empty((n_kv, block_size, head_dim), dtype=dtype, device=device)
        self.residual_v = torch.empty_like(self.residual_k)
        self.n_residual = 0
        self.slots: list[int] = []  # block table: pool slot of each held block, oldest first
        self.first_block = 0       # index (position // B) of the oldest held block
        self.length = 0            # tokens appended so far = position of the next token

    def reserve(self, n_tokens: int) -> None:
        blocks = n_tokens // self.block_size
        if self.window:
            blocks = min(blocks, self.window // self.block_size + 2)
        self.pool.reserve(blocks)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append new tokens. k, v: ``(Hkv, T, D)``."""
        B, t, i = self.block_size, k.shape[1], 0
        if self.n_residual:  # top up the residual block first
            i = min(B - self.n_residual, t)
            self.residual_k[:, self.n_residual: self.n_residual + i] = k[:, :i]
            self.residual_v[:, self.n_residual: self.n_residual + i] = v[:, :i]
            self.n_residual += i
            if self.n_residual == B:
                self._seal(self.residual_k.unsqueeze(1), self.residual_v.unsqueeze(1))
                self.n_residual = 0
        n_full = (t - i) // B
        if n_full:  # whole blocks straight from the input, encoded in one call
            j = i + n_full * B
            h, _, d = k.shape
            self._seal(k[:, i:j].reshape(h, n_full, B, d), v[:, i:j].reshape(h, n_full, B, d))
            i = j
        rest = t - i
        if rest:
            self.residual_k[:, :rest] = k[:, i:]
            self.residual_v[:, :rest] = v[:, i:]
            self.n_residual = rest
        self.length += t
        self._slide()

    def _seal(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.slots += self.pool.add(k.to(self.dtype), v.to(self.dtype))

    def _slide(self) -> None:
        """Free blocks no query can attend any more (query q sees keys k with q - k < window)."""
        if not self.window:
            return
        oldest_needed = self.length - self.window  # the newest token may still be querying
        n_out = max(0, min(len(self.slots), oldest_needed // self.block_size - self.first_block))
        if n_out:
            self.pool.release(self.slots[:n_out])
            del self.slots[:n_out]
            self.first_block += n_out

    def parts(self) -> list[Part]:
        """Everything held, decoded per group, for attention."""
        out = []
        if self.slots:
            k, v = self.pool.read(self.slots, self.dtype)
            out.append(Part(k, v, self.first_block * self.block_size))
        if self.n_residual:
            r = self.n_residual
            out.append(Part(self.residual_k[:, :r], self.residual_v[:, :r], self.length - r))
        return out

    @property
    def n_held(self) -> int:
        return len(self.slots) * self.block_size + self.n_residual

    def n_elements(self) -> int:
        """Key and value elements held (tokens x heads x dims x 2), whatever their encoding."""
        return 2 * self.n_held * self.n_kv * self.head_dim

    def nbytes(self) -> int:
        """Bytes of data held: encoded blocks, residual tokens and the block table."""
        residual = 2 * self.residual_k[:, : self.n_residual].numel() * self.residual_k.element_size()
        return len(self.slots) * (self.pool.slot_bytes() + TABLE_ENTRY_BYTES) + residual


class SeqKV:
    """A sequence's cache: one :class:`LayerKV` per layer."""

    def __init__(self, layers: list[LayerKV]):
        self.layers = layers

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reserve(self, n_tokens: int) -> None:
        for layer in self.layers:
            layer.reserve(n_tokens)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def n_elements(self) -> int:
        return sum(layer.n_elements() for layer in self.layers)
