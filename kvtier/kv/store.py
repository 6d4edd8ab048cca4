"""The tiered store: byte budgets per tier, shared by every sequence and layer of one runner.

A block is sealed on the first (fastest) tier. When a tier is over its budget, its coldest
blocks — least recently attended, oldest first among equals — move one tier down in their
encoded form (codec bytes, never dequantized). Attention then runs where each block lives
(``attend="local"``: each tier's device scores its own blocks, the pieces merge by
log-sum-exp) or copies every block to the first tier first (``attend="fetch"``, the
FlexGen-style baseline).

A sequence whose blocks cannot move (the disk is full, every tier is at its budget) is marked
failed — its blocks stay where they are, nothing half-written is read — and the engine ends
that request with the error while the other sequences go on.
"""

from __future__ import annotations

import heapq
import itertools
import time
import weakref
import zlib
from dataclasses import dataclass, field

import torch

from kvtier.errors import KvtierError
from kvtier.kv import disk
from kvtier.kv import tiers as tierspec
from kvtier.kv.blocks import BlockPool
from kvtier.kv.prefetch import Prefetcher
from kvtier.kv.tiers import Tier, format_size
from kvtier.progress import note

EXTENT = 16  # disk block slots per extent: one extent reads as one view


@dataclass
class Traffic:
    """Bytes that crossed between tiers or devices (demotions, fetch copies, partial results)
    and bytes attention read from the disk tier."""

    moved: int = 0
    disk_read: int = 0
    recomputed: int = 0  # tokens run again to rebuild dropped blocks
    recompute_s: float = 0.0
    by_kind: dict = field(default_factory=dict)

    def add(self, kind: str, n: int, moved: bool = True) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + n
        self.moved += n if moved else 0


class TierStore:
    """Tiers (fastest first) with budgets; see the module docstring.

    Parameters
    ----------
    tiers : a tier spec (``"cpu:2GiB,disk:/path:50GiB"``) or parsed :class:`Tier` list.
    attend : ``local`` (attention where blocks live), ``fetch`` (copy them to the first tier),
        ``split:SHARE`` (fetch that share of each lower tier's runs) or ``auto`` (the cost model,
        :mod:`kvtier.plan`, picks one of those per tier when the runner attaches: :meth:`choose`).
    compute : the device the model runs on.
    """

    def __init__(self, tiers: str | list[Tier], attend: str = "local", compute: torch.device | str = "cpu",
                 prefetch: bool = False):
        self.tiers = tierspec.parse(tiers, compute) if isinstance(tiers, str) else list(tiers)
        self.attend, share = tierspec.parse_attend(attend)
        # per lower tier: the share of its runs copied to the first tier (0 local, 1 fetch)
        self.shares = [share] * (len(self.tiers) - 1)
        self.decision = None  # attend=auto: the cost model's decision, with its numbers
        self.compute = torch.device(compute)
        self.writer = None
        self.prefetcher = None
        self.remote = None  # the ray: tier's holder (kvtier.kv.remote)
        for t in self.tiers:
            if t.kind == "disk":
                folder = tierspec.check_path(t)
                freed = disk.remove_leftovers(folder)
                if freed:
                    note(f"removed {format_size(freed)} of block files left by a crashed run in {folder}")
                self.writer = disk.Writer()
                self.prefetcher = Prefetcher() if prefetch else None
            if t.kind == "ray":
                if self.attend == "auto":
                    raise KvtierError("attend=auto has no cost model for the ray: tier; give attend=local "
                                      "(attention where the blocks live) or attend=fetch")
                from kvtier.kv.remote import RemoteTier

                self.remote = RemoteTier(t)
                note(self.remote.describe())
        self.used = [0] * len(self.tiers)  # bytes charged to each tier
        self.plain = 0  # of used[0]: sink and residual buffers, which never move
        self.layers: weakref.WeakSet = weakref.WeakSet()
        self.clock = 0
        self.traffic = Traffic()
        self.runner = None  # the ModelRunner using this store (recompute runs its model)
        self._ids = itertools.count()

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.tiers)

    def choose(self, model, kv, context: int | None = None) -> None:
        """``attend=auto``: let the cost model pick local, fetch or a split share for each
        lower tier, for ``model`` with cache spec ``kv`` on this machine (its probe, or the
        shipped file for this CPU class), and say what it chose and why."""
        if self.attend != "auto":
            return
        from kvtier.plan import auto_attend

        self.shares, self.decision = auto_attend(model, kv, self, context)
        note(f"attend=auto: {self.decision.choice} ({self.decision.because})")

    def describe_attend(self) -> str:
        if self.attend != "auto" or self.decision is None:
            return self.attend
        return f"auto: {self.decision.choice}"

    def sequence(self) -> SeqTiers:
        return SeqTiers(self, next(self._ids))

    def tick(self) -> None:
        """One forward step has begun (attention marks the blocks it reads with the clock)."""
        self.clock += 1

    @property
    def recomputes(self) -> bool:
        return self.tiers[-1].kind == "recompute"

    def charge(self, tier: int, nbytes: int) -> None:
        self.used[tier] += nbytes

    def settle(self) -> None:
        """Move the coldest blocks down until every tier but the last is within its budget.

        Coldest first across layers and sequences (least recently read; blocks read this step
        or the last one count as equally hot), oldest first within a layer — attention reads a
        layer's blocks together, so a layer's oldest block on a tier is also its coldest. A
        heap over layers keeps this cheap however many blocks are held."""
        for t in range(len(self.tiers) - 1):
            over = self.used[t] - self.tiers[t].budget
            if over <= 0:
                continue
            now, heap = self.clock - 1, []
            for layer in self.layers:
                if layer.home.error is None and t in layer.where:
                    heapq.heappush(heap, self._coldest(layer, t, now))
            moving: dict[int, tuple] = {}
            while over > 0 and heap:
                *_, j, layer = heapq.heappop(heap)
                moving.setdefault(id(layer), (layer, []))[1].append(j)
                over -= layer.pools[t].slot_bytes()
                nxt = next((i for i in range(j + 1, len(layer.where)) if layer.where[i] == t), None)
                if nxt is not None:
                    heapq.heappush(heap, self._coldest(layer, t, now, nxt))
            for layer, blocks in moving.values():
                try:
                    layer.move(blocks, t + 1)
                except KvtierError as e:
                    layer.home.fail(e)
        last = len(self.tiers) - 1
        if self.used[last] > self.tiers[last].budget:
            for layer in [la for la in self.layers if la.home.error is None and last in la.where]:
                layer.home.fail(KvtierError(
                    f"the KV cache does not fit in --tiers {self}: the last tier holds "
                    f"{format_size(self.used[last])} over its {format_size(self.tiers[last].budget)} budget; "
                    "raise a budget or use a smaller codec"))
                break

    @staticmethod
    def _coldest(layer, tier: int, now: int, j: int | None = None) -> tuple:
        j = layer.where.index(tier) if j is None else j
        return min(layer.read_at, now), layer.block_start(layer.first_block + j), id(layer), j, layer



class SeqTiers:
    """One sequence's place in the store: its disk file (made on first use) and its error."""

    def __init__(self, store: TierStore, index: int):
        self.store, self.index = store, index
        self.file: disk.DiskFile | None = None
        self.error: KvtierError | None = None
        self.plain = 0  # bytes of sink and residual buffers charged to the first tier
        self.layers: list = []  # this sequence's LayerKVs (set by SeqKV)
        self.ids: list[int] = []  # every token fed so far (the runner appends; recompute reads)

    def recompute(self) -> None:
        """Rebuild every dropped block of this sequence (all layers at once): run the model
        again over the token ids up to the newest dropped block, with the same cache spec, and
        put those blocks back on the first tier (they settle down again at the next step)."""
        store = self.store
        drop = len(store.tiers) - 1
        ends = [layer.block_start(layer.first_block + j + 1) + layer.keep
                for layer in self.layers for j, w in enumerate(layer.where) if w == drop]
        if not ends:
            return
        if not self.ids:
            raise KvtierError("blocks were dropped to the recompute tier but this cache has no token ids "
                              "to rebuild them from; feed it through ModelRunner.run")
        upto = min(max(ends), len(self.ids))
        from kvtier.engine.runner import ModelRunner

        t0 = time.perf_counter()
        src = store.runner
        again = ModelRunner(src.model, src.spec, block_size=src.block_size, prefill_chunk=src.prefill_chunk,
                            device=src.device)
        again.stats = src.stats
        temp = again.new_cache(reserve=upto)
        try:
            again.feed([temp], [self.ids[:upto]])
            for layer, fresh in zip(self.layers, temp.layers):
                layer.refill(drop, fresh)
        finally:
            temp.close()
        store.traffic.recomputed += upto
        store.traffic.recompute_s += time.perf_counter() - t0

    def read_ahead(self, layer: int) -> None:
        """Attention on ``layer`` has begun: read the next layer's disk blocks ahead (after
        the last layer, the first: the next decode step starts there)."""
        prefetcher = self.store.prefetcher
        if prefetcher is None or self.file is None or not self.layers:
            return
        nxt = self.layers[(layer + 1) % len(self.layers)]
        for pool, ranges in nxt.disk_ranges():
            prefetcher.submit(pool.file.mapping(), ranges)

    def fail(self, error: KvtierError) -> None:
        if self.error is None:
            self.error = error

    def pools(self, codec, n_kv: int, head_dim: int, block_size: int, layer: int, rope=None) -> list:
        """One pool per tier for one layer of this sequence (``rope``: the layer's rotary
        embedding, which the ray: tier's holder needs for a codec that stores keys before it)."""
        out = []
        pin = self.store.compute.type == "cuda" and torch.cuda.is_available()
        for t in self.store.tiers:
            if t.kind == "recompute":
                out.append(Dropped())
            elif t.kind == "disk":
                spec = codec.fields(block_size, head_dim)
                out.append(disk.DiskPool(self._file(t), spec, n_kv, min(codec.group_blocks, EXTENT), layer,
                                         _codec_id(codec)))
            elif t.kind == "ray":
                out.append(self.store.remote.pool(self.index, layer, codec, n_kv, head_dim, block_size, rope))
            else:
                out.append(BlockPool(codec, n_kv, head_dim, block_size, t.device,
                                     pin=pin and t.kind == "cpu"))
        return out

    def _file(self, tier: Tier) -> disk.DiskFile:
        if self.file is None:
            self.file = disk.DiskFile(tierspec.check_path(tier), self.store.writer, self.index)
        return self.file

    def hold_plain(self, nbytes: int) -> None:
        """Charge the sink and residual buffers (always on the first tier) to its budget."""
        first, store = self.store.tiers[0], self.store
        if store.plain + nbytes > first.budget:
            raise KvtierError(f"the {first.kind} tier budget {format_size(first.budget)} cannot hold even the "
                              f"newest (residual) blocks: this sequence needs {format_size(nbytes)} for them"
                              + (f" beside {format_size(store.plain)} for the sequences already running"
                                 if store.plain else "")
                              + f"; raise {first.kind}: in --tiers")
        self.plain += nbytes
        store.plain += nbytes
        store.charge(0, nbytes)

    def close(self) -> None:
        if self.store.remote is not None:
            self.store.remote.drop(self.index)
        self.store.charge(0, -self.plain)
        self.store.plain -= self.plain
        self.plain = 0
        if self.file is not None:
            self.file.close()
            self.file = None


class Dropped:
    """The recompute tier's pool: blocks moved here are dropped (only their place in the block
    table is kept); :meth:`SeqTiers.recompute` rebuilds them from the token ids before
    attention reads them. It holds no bytes."""

    def release(self, slots: list[int]) -> None:
        pass

    def run_key(self, slot: int) -> int:
        return 0

    def slot_bytes(self) -> int:
        return 0

    def fields_of(self, slots):
        raise KvtierError("internal: a dropped block was read before it was recomputed")


def _codec_id(codec) -> int:
    return zlib.crc32(str(codec).encode())
