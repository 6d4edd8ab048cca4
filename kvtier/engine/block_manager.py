"""The prefix cache: encoded blocks of prompts seen before, found again by their token ids.

A prompt's full blocks are keyed by a chained hash: block j's key covers the cache spec, the
block size and every token id up to the end of block j (the first block also covers the
codec's attention sinks), so equal keys mean equal prefixes.

Cached blocks live in shared pools, one per cache spec and layer (:class:`SharedPool`), in
their *encoded* form (a 2-bit prefix is held as 2-bit bytes). Every holder counts: the cache
itself and each sequence whose block table points at the block. When a prompt's first token
is sampled, its sealed blocks move into the shared pools (a block already cached is not
copied: the sequence's own copy is freed and it points at the cached one). A new sequence whose
prompt starts with cached blocks points at them too and feeds only the rest of its prompt, so
16 requests with one 4K-token prefix hold that prefix once. Blocks only the cache holds stay
until the byte budget needs room; then they leave least recently used first, the deepest
block of a chain first among equals.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

import torch

from kvtier.kv.blocks import SharedPool
from kvtier.kv.cache import SeqKV


@dataclass(eq=False)
class CachedBlock:
    key: bytes
    spec: str
    depth: int                               # block index in its prompt (0 = first)
    slots: list[int]                         # per layer: its slot in that layer's shared pool
    sinks: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer, first block only
    used: int = 0                            # clock of the last hit or insert

    @property
    def sink_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.sinks or [])


@dataclass
class PrefixStats:
    """Counters in tokens, as vLLM's ``prefix_cache_queries`` / ``prefix_cache_hits``."""

    queries: int = 0
    hits: int = 0
    evicted_blocks: int = 0


@dataclass
class PrefixCache:
    block_size: int
    blocks: dict[bytes, CachedBlock] = field(default_factory=dict)
    pools: dict[str, list[SharedPool]] = field(default_factory=dict)  # per spec, per layer
    stats: PrefixStats = field(default_factory=PrefixStats)
    _clock: itertools.count = field(default_factory=itertools.count)

    @property
    def nbytes(self) -> int:
        """Bytes the shared pools hold (cached blocks, and blocks left the cache that running
        sequences still read) plus the cached sink tokens."""
        return (sum(p.held_bytes() for pools in self.pools.values() for p in pools)
                + sum(b.sink_bytes for b in self.blocks.values()))

    @staticmethod
    def keys(spec: str, ids: list[int], sinks: int, block_size: int) -> list[bytes]:
        """Chained keys of the full blocks of ``ids`` (block j ends at ``sinks + (j+1) * B``)."""
        h = hashlib.sha256(f"{spec}|{block_size}|{sinks}".encode()).digest()
        out, start = [], 0
        end = sinks + block_size
        while end <= len(ids):
            h = hashlib.sha256(h + repr(ids[start:end]).encode()).digest()
            out.append(h)
            start, end = end, end + block_size
        return out

    def match(self, spec: str, ids: list[int], sinks: int, count: bool = True) -> list[CachedBlock]:
        """The longest run of cached blocks that starts ``ids``, leaving at least one token to
        run (its logits choose the first new token). ``count``: a real lookup (marks the blocks
        used, counts the query and its hits); off for an estimate."""
        hit = []
        for k in self.keys(spec, ids[:-1], sinks, self.block_size):
            b = self.blocks.get(k)
            if b is None:
                break
            hit.append(b)
        if count:
            now = next(self._clock)
            for b in hit:
                b.used = now
            self.stats.queries += len(ids)
            self.stats.hits += sinks + len(hit) * self.block_size if hit else 0
        return hit

    def block_bytes(self, spec: str) -> int:
        """Bytes one cached block holds over all layers (0 before the spec's first block)."""
        return sum(p.slot_bytes() for p in self.pools.get(spec, []))

    def insert(self, spec: str, ids: list[int], cache: SeqKV) -> int:
        """Move the sealed blocks of ``cache`` (which holds ``ids``) into the shared pools; a block
        cached already replaces the cache's copy. Returns the number of blocks newly cached."""
        layers = cache.layers
        sinks = layers[0].n_sinks
        keys = self.keys(spec, ids, sinks, self.block_size)
        sealed = min(len(layer.slots) for layer in layers)
        if any(layer.first_block for layer in layers):
            return 0  # a layer dropped blocks (cannot happen for the specs that share)
        pools = self.pools.get(spec)
        if pools is None:
            pools = self.pools[spec] = [SharedPool(layer.codec, layer.n_kv, layer.head_dim, layer.block_size,
                                                   layer.pool.device) for layer in layers]
        now, new = next(self._clock), []
        for j, key in enumerate(keys[:sealed]):
            b = self.blocks.get(key)
            if b is not None:
                b.used = now
                for layer, pool, slot in zip(layers, pools, b.slots):
                    layer.share(j, pool, slot)
            else:
                new.append(j)
        if not new:
            return 0
        moved = [layer.share_new(new, pool) for layer, pool in zip(layers, pools)]  # one copy a layer
        for pool, slots in zip(pools, moved):
            pool.ref(slots)  # the cache's own hold
        for i, j in enumerate(new):
            first = None
            if j == 0 and sinks:
                first = [(layer.sink_k[:, :sinks].clone(), layer.sink_v[:, :sinks].clone()) for layer in layers]
            self.blocks[keys[j]] = CachedBlock(keys[j], spec, j, [slots[i] for slots in moved], first, now)
        return len(new)

    def fill(self, cache: SeqKV, spec: str, hit: list[CachedBlock]) -> int:
        """Start the empty ``cache`` from the blocks of ``hit`` (pointed at, not copied); returns
        the tokens it now holds."""
        if not hit:
            return 0
        for i, (layer, pool) in enumerate(zip(cache.layers, self.pools[spec])):
            layer.adopt(pool, [b.slots[i] for b in hit], hit[0].sinks[i] if hit[0].sinks else None)
        return cache.length

    def evict(self, nbytes: int) -> int:
        """Free at least ``nbytes`` of blocks only the cache holds (least recently used first,
        deepest first among equals); returns the bytes freed."""
        freed = 0
        for b in sorted(self.blocks.values(), key=lambda b: (b.used, -b.depth)):
            if freed >= nbytes:
                break
            pools = self.pools[b.spec]
            if any(p.holders(s) > 1 for p, s in zip(pools, b.slots)):
                continue  # a running sequence reads it: leaving would free nothing
            del self.blocks[b.key]
            for p, s in zip(pools, b.slots):
                p.release([s])
            freed += self.block_bytes(b.spec) + b.sink_bytes
            self.stats.evicted_blocks += 1
        return freed

    def clear(self) -> None:
        self.evict(self.nbytes + 1)
