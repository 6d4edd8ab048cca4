"""ModelRunner: a model plus a cache spec; runs new tokens of many sequences at once.

Prefill and decode share one verb, :meth:`run`: one forward in which each sequence brings its
new tokens (the scheduler decides how many). :meth:`feed` is the offline convenience that cuts
whole prompts into forwards of at most ``prefill_chunk`` tokens.
"""

from __future__ import annotations

from collections import Counter

import torch

from kvtier import spec as specs
from kvtier.config import BLOCK_SIZE
from kvtier.errors import KvtierError
from kvtier.kv import calibration
from kvtier.kv.blockselect import BlockSelectKV
from kvtier.kv.cache import TABLE_ENTRY_BYTES, LayerKV, SeqKV
from kvtier.kv.codecs.base import LayerContext
from kvtier.kv.select import SelectKV
from kvtier.kv.store import TierStore
from kvtier.models.base import Batch


class ModelRunner:
    def __init__(self, model, kv: str | specs.CacheSpec | None = None, block_size: int = BLOCK_SIZE,
                 prefill_chunk: int = 2048, device="cpu", tiers: str | TierStore | None = None,
                 attend: str = "local"):
        if block_size < 1 or prefill_chunk < 1:
            raise ValueError("block_size and prefill_chunk must be positive")
        self.model, self.spec = model, specs.parse(kv)
        # blocks on tiers with budgets (``"cpu:2GiB,disk:/path:50GiB"``), or None: all in RAM
        self.store = tiers if isinstance(tiers, TierStore) else TierStore(tiers, attend, device) if tiers else None
        if self.store:
            self.store.runner = self  # a recompute tier reruns this model
            self.store.choose(model, self.spec)  # attend=auto: the cost model picks per tier
        if len(self.spec.selectors) > 1:
            raise KvtierError(f"spec {self.spec}: give one selector (then a codec), e.g. 'snapkv(ratio=0.5)+int(bits=4)'")
        if self.spec.selectors and self.store:
            raise KvtierError("token selectors do not run on a tiered store yet; drop --tiers or the selector")
        self.block_size, self.prefill_chunk = block_size, prefill_chunk
        self.dtype, self.device = model.dtype, device  # residual blocks in the compute dtype
        self.stats: list[dict] | None = None  # per-layer calibration, loaded when a codec needs it
        self._selectors: dict = {}  # selectors bound to layers
        self._sizes: list | None = None  # per-layer byte sizes, for bytes_for

    def new_cache(self, reserve: int = 0) -> SeqKV:
        """An empty cache for one sequence, with room for ``reserve`` tokens allocated up front."""
        m, codec = self.model, self.spec.codec
        if codec.calibrated and self.stats is None:
            self.stats = calibration.load(m)
        ropes = getattr(m, "ropes", [None] * m.n_layers)
        home = self.store.sequence() if self.store else None
        layers = []
        for i, window in enumerate(m.windows):
            def make(c, rope, i=i, window=window, head=None):
                n_kv, stats = m.n_kv, self.stats and self.stats[i]
                if head is not None:  # one KV head's own cache (per-head budgets)
                    n_kv, stats = 1, stats and {name: t[head: head + 1] for name, t in stats.items()}
                ctx = LayerContext(i, n_kv, m.head_dim, stats, rope, self.stats)
                return LayerKV(c, n_kv, m.head_dim, self.block_size, window, self.dtype, self.device, ctx, home)
            sel = self.spec.selectors[0] if self.spec.selectors else None
            sparse = sel is not None and getattr(sel, "sparse", False)  # reads some blocks, deletes none
            if sparse and (i < sel.dense_layers or (window is not None and not sel.sliding)):
                layers.append(make(codec, ropes[i]))  # dense first layers; a sliding window read whole
            elif sparse:
                ctx = LayerContext(i, m.n_kv, m.head_dim, self.stats and self.stats[i], ropes[i], self.stats)
                layers.append(BlockSelectKV(sel, codec, m.n_kv, m.head_dim, self.block_size, window,
                                            self.dtype, self.device, ctx, home))
            elif sel is not None:  # on a sliding layer: the selector's share of the window
                layers.append(SelectKV(self._bound(sel, i), codec, make, ropes[i], self.dtype, window))
            else:
                layers.append(make(codec, ropes[i]))
        cache = SeqKV(layers, home)
        cache.reserve(reserve)
        return cache

    def _bound(self, selector, i: int):
        """The selector bound to layer ``i`` (calibrated once per runner)."""
        key = (id(selector), i)
        if key not in self._selectors:
            self._selectors[key] = selector.bind(self.model, i)
        return self._selectors[key]

    def _forward(self, batch: Batch, logits: str = "last") -> torch.Tensor:
        """One forward through the model, with the tiered store's clock ticked before it; with
        a recompute tier, blocks rebuilt or sealed during it go back down after it (never
        mid-step, which would drop blocks a later layer is about to read)."""
        if self.store:
            self.store.tick()
        out = self.model.forward(batch, logits=logits)
        if self.store and self.store.recomputes:
            self.store.settle()
        return out

    def run(self, caches: list[SeqKV], chunks: list[list[int]], logits: str = "last") -> torch.Tensor:
        """One forward: each cache receives its chunk of new tokens (the scheduler's batch).

        Returns the logits after each sequence's last new token, ``(n_seqs, V)``, or with
        ``logits="all"`` every token's ``(N, V)``. A sequence whose blocks could not be placed
        is marked on its cache (``cache.error``); the caller ends it."""
        if self.store and self.store.recomputes:  # the ids a dropped block is rebuilt from
            for cache, toks in zip(caches, chunks):
                cache.home.ids.extend(toks)
        return self._forward(Batch.of(caches, chunks, self.device), logits=logits)

    def feed(self, caches: list[SeqKV], chunks: list[list[int]], logits: str = "last") -> torch.Tensor:
        """Offline convenience over :meth:`run`: feed whole prompts, cut into forwards of at
        most ``prefill_chunk`` tokens, short ones packed together; at the end of a prefill the
        caches' selectors choose. Returns each sequence's last logits ``(n_seqs, V)`` (with
        ``logits="all"``, one forward only, every token's)."""
        if logits == "all":
            return self.run(caches, chunks, logits="all")
        out: list[torch.Tensor | None] = [None] * len(caches)
        todo = [(i, list(c)) for i, c in enumerate(chunks) if c]
        while todo:
            budget, picked = self.prefill_chunk, []
            for i, toks in todo:
                if budget == 0:
                    break
                picked.append((i, toks[:budget]))
                budget -= len(picked[-1][1])
            last = self.run([caches[i] for i, _ in picked], [t for _, t in picked])
            done = {i: len(t) for i, t in picked}
            for (i, _), row in zip(picked, last):
                out[i] = row
            todo = [(i, toks[done.get(i, 0):]) for i, toks in todo]
            todo = [(i, toks) for i, toks in todo if toks]
        for cache, toks in zip(caches, chunks):  # end of a prefill: selectors choose now
            if len(toks) > 1:
                cache.compress()
        if len(caches) == 1 and caches[0].error is not None:
            raise caches[0].error  # one sequence: its failure is the caller's (a batch: the engine ends it)
        return torch.stack(out)

    @property
    def shares_prefixes(self) -> bool:
        """Whether prompt prefixes can be reused as encoded blocks: codec-only specs (a selector
        keeps different tokens per sequence), no sliding windows (their old blocks are gone by
        the time a prefill ends) and all blocks in RAM."""
        return not self.spec.selectors and self.store is None and not any(self.model.windows)

    def bytes_for(self, n_tokens: int) -> int:
        """Bytes a cache of this spec holds at ``n_tokens`` tokens, counted as
        :meth:`SeqKV.nbytes` counts them: sealed blocks (slot sizes of the real pools) and their
        block table entries, the sink and residual tokens held, the codec's state. Exact for a
        codec-only spec (tested); a selector's cache is charged as the full-precision staging it
        holds during a prefill, its largest size."""
        if self._sizes is None:
            probe = self.new_cache()
            try:  # layers of one kind (most models have one or two) are counted together
                self._sizes = list(Counter(_layer_sizes(layer) for layer in probe.layers).items())
            finally:
                probe.close()
        total, b = 0, self.block_size
        for (slot, plain, sinks, keep, window, state, full), count in self._sizes:
            if full:  # a selector's staging: every token in the compute dtype
                total += (n_tokens if window is None else min(n_tokens, window + b)) * full * count
                continue
            held_sinks = min(n_tokens, sinks)
            rest = n_tokens - held_sinks
            blocks = max(0, rest - keep) // b
            residual = rest - blocks * b
            if window:  # blocks no query can see any more are freed
                blocks -= max(0, min(blocks, (n_tokens - window - sinks) // b))
            total += (blocks * (slot + TABLE_ENTRY_BYTES) + (held_sinks + residual) * plain + state) * count
        return total


def _layer_sizes(layer) -> tuple:
    """(slot bytes, bytes of one plain token, sinks, codec residual, window, codec state bytes,
    bytes per token when charged per token) of one layer of an empty cache."""
    if isinstance(layer, LayerKV):
        plain = 2 * layer.n_kv * layer.head_dim * layer.residual_k.element_size()
        return (layer.pool.slot_bytes(), plain, layer.n_sinks, layer.keep, layer.window,
                layer.codec.state_bytes(), 0)
    per_token = 2 * layer.n_kv * layer.head_dim * layer.kv.dtype.itemsize + 4 * layer.n_kv
    return 0, 0, 0, 0, layer.window, 0, per_token
