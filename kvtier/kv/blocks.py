"""A pool of block slots for one layer, stored in the codec's fields.

Each field lives in one tensor ``(Hkv, capacity, *shape)``: the slot axis is second so that a
run of consecutive slots reads as a view, ``(Hkv, n, B, D) -> (Hkv, n * B, D)``, with no copy.
Slots freed (a sliding window moving on) are reused before the pool grows.

A :class:`BlockPool` belongs to one sequence. A :class:`SharedPool` holds blocks several
sequences' block tables point into (the prefix cache's): each slot counts its holders and is
freed when the last one lets go.
"""

from __future__ import annotations

import math

import torch

from kvtier.kv.codecs.base import Codec


class BlockPool:
    shared = False  # one holder: the sequence whose layer made the pool

    def __init__(self, codec: Codec, n_kv: int, head_dim: int, block_size: int,
                 device: torch.device | str = "cpu", pin: bool = False):
        self.codec, self.n_kv, self.block_size = codec, n_kv, block_size
        self.spec = codec.fields(block_size, head_dim)
        self.device, self.pin = torch.device(device), pin  # pin: page-locked, for fast GPU copies
        self.data = {name: torch.empty((n_kv, 0, *shape), dtype=dtype, device=self.device)
                     for name, (shape, dtype) in self.spec.items()}
        self.free: list[int] = []
        self.top = 0  # slots [0, top) have been handed out at least once
        self.generation = 0  # counts reallocations of the field tensors (views of older ones are stale)

    @property
    def capacity(self) -> int:
        return next(iter(self.data.values())).shape[1]

    def reserve(self, n_slots: int) -> None:
        """Make room for ``n_slots`` slots in all (grows the field tensors, keeps contents)."""
        if n_slots <= self.capacity:
            return
        for name, old in self.data.items():
            new = torch.empty((self.n_kv, n_slots, *old.shape[2:]), dtype=old.dtype, device=self.device,
                              pin_memory=self.pin)
            held = min(self.top, old.shape[1])  # top may already count slots being written
            new[:, :held] = old[:, :held]
            self.data[name] = new
        self.generation += 1

    def add(self, k: torch.Tensor, v: torch.Tensor) -> list[int]:
        """Encode full blocks ``k, v: (Hkv, n, B, D)`` into slots; returns the slots used."""
        return self.put(self.codec.encode(k, v))

    def put(self, encoded: dict[str, torch.Tensor], blocks=(), tokens: int = 0) -> list[int]:
        """Store encoded blocks ``{field: (Hkv, n, *shape)}`` (from any device) in slots.
        ``blocks`` and ``tokens`` (their indices and length) matter only to the disk tier."""
        slots = self.allocate(next(iter(encoded.values())).shape[1])
        self.write(slots, encoded)
        return slots

    def allocate(self, n: int) -> list[int]:
        """``n`` slots for new blocks: freed ones first (lowest first), then fresh ones."""
        slots = sorted(self.free)[:n]
        self.free = [s for s in self.free if s not in slots]
        fresh = n - len(slots)
        slots += range(self.top, self.top + fresh)
        self.top += fresh
        return slots

    def write(self, slots: list[int], encoded: dict[str, torch.Tensor]) -> None:
        """Store encoded blocks ``{field: (Hkv, n, *shape)}`` in ``slots`` (grown to fit)."""
        top = max(slots) + 1 if slots else 0
        if top > self.capacity:
            self.reserve(max(2 * self.capacity, top, 4))
        self.top = max(self.top, top)  # slots written at given places (the ray: tier's holder)
        index = _as_index(slots)
        for name, t in encoded.items():
            self.data[name][:, index] = t.to(self.device)

    def release(self, slots: list[int]) -> None:
        self.free.extend(slots)

    def fields_of(self, slots: list[int]) -> dict[str, torch.Tensor]:
        """The stored fields of ``slots`` (in that order), ``{field: (Hkv, n, *shape)}``; a view
        when the slots are consecutive."""
        index = _as_index(slots)
        if isinstance(index, slice):
            return {name: t[:, index] for name, t in self.data.items()}
        idx = torch.tensor(index, device=self.device)
        return {name: t.index_select(1, idx) for name, t in self.data.items()}

    def read(self, slots: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the blocks in ``slots`` (in that order): k, v ``(Hkv, len(slots) * B, D)``."""
        return self.codec.decode(self.fields_of(slots), dtype)

    def run_key(self, slot: int) -> int:
        """Slots with the same key can be read together as one view (all of them, here)."""
        return 0

    def slot_bytes(self) -> int:
        """Bytes one slot holds across all fields (packed data, scales, everything stored), from
        the codec's field shapes and dtypes (so an empty pool answers too)."""
        return sum(dtype.itemsize * self.n_kv * math.prod(shape) for shape, dtype in self.spec.values())

    def reserved_bytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in self.data.values())


def consecutive(slots: list[int]) -> bool:
    """The slots are consecutive and ascending: :meth:`BlockPool.fields_of` gives views of them,
    no copy."""
    return bool(slots) and slots[-1] - slots[0] == len(slots) - 1 and all(
        b - a == 1 for a, b in zip(slots, slots[1:]))


def _as_index(slots: list[int]) -> slice | list[int]:
    """A slice when the slots are consecutive and ascending (a view, no copy)."""
    return slice(slots[0], slots[-1] + 1) if consecutive(slots) else list(slots)


class SharedPool(BlockPool):
    """Blocks held by several holders at once (the prefix cache and the sequences reading a
    cached prefix): :meth:`ref` adds a holder to slots, :meth:`release` takes one away, and a
    slot is freed for reuse when nobody holds it. A slot :meth:`put` fills has no holder yet."""

    shared = True

    def __init__(self, codec: Codec, n_kv: int, head_dim: int, block_size: int,
                 device: torch.device | str = "cpu"):
        super().__init__(codec, n_kv, head_dim, block_size, device)
        self.refs: dict[int, int] = {}

    def put(self, encoded: dict[str, torch.Tensor], blocks=(), tokens: int = 0) -> list[int]:
        slots = super().put(encoded, blocks, tokens)
        for s in slots:
            self.refs[s] = 0
        return slots

    def ref(self, slots: list[int]) -> None:
        for s in slots:
            self.refs[s] += 1

    def release(self, slots: list[int]) -> None:
        for s in slots:
            n = self.refs[s] - 1
            if n > 0:
                self.refs[s] = n
            else:
                del self.refs[s]
                self.free.append(s)

    def holders(self, slot: int) -> int:
        return self.refs.get(slot, 0)

    def held_bytes(self) -> int:
        """Bytes of the slots someone holds."""
        return len(self.refs) * self.slot_bytes()
