"""The prefix cache: encoded blocks of prompts seen before, found again by their token ids.

A prompt's full blocks are keyed by a chained hash: block j's key covers the cache spec, the
block size and every token id up to the end of block j (the first block also covers the
codec's attention sinks), so equal keys mean equal prefixes. Entries hold each layer's
*encoded* fields of that block (a 2-bit prefix is kept as 2-bit bytes) plus, for the first
block, the sink tokens. A new sequence whose prompt starts with cached blocks gets a cache
filled from them and feeds only the rest of its prompt.

Entries are copied into the sequence's own block pools (each sequence owns its pools today),
so a hit saves the prefill compute, not the bytes of the running copy. Entries nobody needs
stay until the byte budget needs room; then they leave least recently used first, the
deepest block of a chain first among equals.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

import torch

from kvtier.kv.cache import SeqKV


@dataclass(eq=False)
class CachedBlock:
    key: bytes
    depth: int                               # block index in its prompt (0 = first)
    fields: list[dict[str, torch.Tensor]]    # per layer: {field: (Hkv, 1, *shape)}
    sinks: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer, first block only
    nbytes: int
    used: int = 0                            # clock of the last hit or insert


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
    stats: PrefixStats = field(default_factory=PrefixStats)
    nbytes: int = 0
    _clock: itertools.count = field(default_factory=itertools.count)

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

    def match(self, spec: str, ids: list[int], sinks: int) -> list[CachedBlock]:
        """The longest run of cached blocks that starts ``ids``, leaving at least one token to
        run (its logits choose the first new token)."""
        keys = self.keys(spec, ids[:-1], sinks, self.block_size)
        hit = []
        for k in keys:
            b = self.blocks.get(k)
            if b is None:
                break
            hit.append(b)
        now = next(self._clock)
        for b in hit:
            b.used = now
        n = sinks + len(hit) * self.block_size if hit else 0
        self.stats.queries += len(ids)
        self.stats.hits += n
        return hit

    def insert(self, spec: str, ids: list[int], cache: SeqKV) -> int:
        """Keep the sealed blocks of ``cache`` (which holds ``ids``) that are not cached yet.
        Returns the bytes added."""
        layers = cache.layers
        sinks = layers[0].n_sinks
        keys = self.keys(spec, ids, sinks, self.block_size)
        sealed = min(len(layer.slots) for layer in layers)
        if any(layer.first_block for layer in layers):
            return 0  # a layer dropped blocks (cannot happen for the specs that share)
        now, added = next(self._clock), 0
        for j, key in enumerate(keys[:sealed]):
            if key in self.blocks:
                self.blocks[key].used = now
                continue
            fields = [{name: t.clone() for name, t in layer.pool.fields_of([layer.slots[j]]).items()}
                      for layer in layers]
            nbytes = sum(t.numel() * t.element_size() for f in fields for t in f.values())
            first = None
            if j == 0 and sinks:
                first = [(layer.sink_k[:, :sinks].clone(), layer.sink_v[:, :sinks].clone()) for layer in layers]
                nbytes += sum(k.numel() * k.element_size() * 2 for k, _ in first)
            self.blocks[key] = CachedBlock(key, j, fields, first, nbytes, now)
            self.nbytes += nbytes
            added += nbytes
        return added

    def fill(self, cache: SeqKV, hit: list[CachedBlock]) -> int:
        """Put the blocks of ``hit`` into the empty ``cache``; returns the tokens it now holds."""
        if not hit:
            return 0
        for i, layer in enumerate(cache.layers):
            sinks = layer.n_sinks
            tensors = {"residual_k": layer.residual_k[:, :0], "residual_v": layer.residual_v[:, :0]}
            if sinks:
                tensors["sink_k"], tensors["sink_v"] = hit[0].sinks[i]
            else:
                tensors["sink_k"], tensors["sink_v"] = layer.sink_k[:, :0], layer.sink_v[:, :0]
            for name in layer.pool.spec:
                tensors["f." + name] = torch.cat([b.fields[i][name] for b in hit], 1)
            n = sinks + len(hit) * self.block_size
            layer.restore({"length": n, "first_block": 0, "n_residual": 0}, tensors)
        return cache.length

    def evict(self, nbytes: int) -> int:
        """Free at least ``nbytes`` (least recently used first, deepest first among equals);
        returns the bytes freed."""
        freed = 0
        for b in sorted(self.blocks.values(), key=lambda b: (b.used, -b.depth)):
            if freed >= nbytes:
                break
            del self.blocks[b.key]
            self.nbytes -= b.nbytes
            freed += b.nbytes
            self.stats.evicted_blocks += 1
        return freed

    def clear(self) -> None:
        self.evict(self.nbytes + 1)
