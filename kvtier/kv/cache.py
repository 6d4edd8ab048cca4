"""The KV cache of one sequence: per layer, full blocks in a codec's pool plus a residual block.

New tokens go to the residual block, kept in the compute dtype; when it fills, it is encoded
once as a block and never touched again. A sliding-window layer frees the blocks that no
future query can see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

from kvtier import kernels
from kvtier.config import BLOCK_SIZE
from kvtier.errors import KvtierError
from kvtier.kv.blocks import BlockPool, SharedPool, consecutive
from kvtier.kv.codecs.base import Codec, LayerContext, attends_on_codes
from kvtier.kv.prefetch import release
from kvtier.kv.remote import RemoteRuns
from kvtier.progress import note

if TYPE_CHECKING:
    from kvtier.kv.store import SeqTiers

TABLE_ENTRY_BYTES = 8  # per held block: int32 slot + int32 start position


@dataclass
class BlockRun:
    """What an encoded :class:`Part` is made of: a run of one layer's blocks on one tier, for a
    native kernel that attends on the encoded fields itself."""

    layer: LayerKV
    tier: int
    slots: list[int]
    fetch: bool  # copied to the first tier before attention (``attend=fetch``)
    start: int = 0  # position of the run's first token
    native: object = None  # what a native kernel derived from the fields (kept while the run is)
    views: dict[str, torch.Tensor] | None = None  # the fields, kept while the run is (all in RAM)

    def fields(self) -> dict[str, torch.Tensor]:
        """The encoded fields, read where attention reads them (tier traffic counted). With every
        block in RAM the run is kept across decode steps while its pools' tensors are, and so are
        these fields when they are views (consecutive slots): a gathered copy is not kept, as
        it would hold the run's bytes twice."""
        if self.views is not None:
            return self.views
        fields = self.layer._fields(self.tier, self.slots, self.fetch)
        if self.layer.home is None and consecutive(self.slots):
            self.views = fields
        return fields

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer._read(self.fields(), self.start)

    def score(self, q: torch.Tensor):
        return self.layer._score(self.fields(), len(self.slots), self.start, q)


class Part:
    """A run of keys/values at positions ``start .. start + n - 1``, for attention.

    Either held (``k, v``: ``(Hkv, n, D)``) or encoded: ``get()`` then decodes the blocks on
    demand, so attention can decode one group at a time and drop it after use; ``blocks`` says
    which blocks those are.
    """

    def __init__(self, k: torch.Tensor | None, v: torch.Tensor | None, start: int):
        self.k, self.v, self.start = k, v, start
        self.n, self.n_kv = (k.shape[1], k.shape[0]) if k is not None else (0, 0)
        self.device = k.device if k is not None else None  # where attention on this part runs
        self.load: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.score: Callable | None = None  # q -> softmax pieces on the encoded form (Codec.attend)
        self.done: Callable[[], None] | None = None  # attention has finished with this part
        # added to the scores, (Hkv, n) or per query (Hkv, T, n): merged tokens' log count, -inf masks
        self.bias: torch.Tensor | None = None
        self.blocks: BlockRun | None = None  # an encoded part of a layer's blocks
        # KV heads that hold different tokens (per-head budgets): each head's own parts, which a
        # decode query attends head by head instead of this part's padded, masked keys
        self.heads: list[list[Part]] | None = None

    @classmethod
    def encoded(cls, start: int, n: int, n_kv: int, load: Callable, score: Callable | None) -> Part:
        part = cls(None, None, start)
        part.n, part.n_kv, part.load, part.score = n, n_kv, load, score
        return part

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v ``(Hkv, n, D)`` (decoded now when the part is encoded)."""
        return (self.k, self.v) if self.load is None else self.load()


class LayerKV:
    """One layer of one sequence's cache.

    Positions ``0 .. sinks-1`` (the codec's attention sinks) and the newest tokens (the
    residual block plus the codec's ``residual``) are held in the compute dtype; everything
    between is stored as encoded blocks of ``block_size`` tokens, block j covering positions
    ``sinks + j * block_size ..``. A codec with ``pre_rope`` stores keys before RoPE.
    """

    def __init__(self, codec: Codec, n_kv: int, head_dim: int, block_size: int = BLOCK_SIZE,
                 window: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", ctx: LayerContext | None = None,
                 home: SeqTiers | None = None):
        ctx = ctx or LayerContext(0, n_kv, head_dim)
        self.codec = codec.for_layer(ctx)
        self.rope, self.index = ctx.rope, ctx.index
        if codec.pre_rope and self.rope is None:
            raise KvtierError(f"{codec.name}: pre-RoPE keys need the model's RoPE (use ModelRunner)")
        self.home = home  # this sequence's place in a tiered store, or None: every block in RAM
        if home is None:
            self.pools = [BlockPool(self.codec, n_kv, head_dim, block_size, device)]
        else:
            self.pools = home.pools(self.codec, n_kv, head_dim, block_size, ctx.index, self.rope)
            home.store.layers.add(self)
        self.pool = self.pools[0]  # the first tier, where blocks are sealed
        self.scores = attends_on_codes(self.codec)  # attention on the encoded form
        self.n_kv, self.head_dim = n_kv, head_dim
        self.block_size, self.window, self.dtype = block_size, window, dtype
        self.n_sinks, self.keep = codec.sinks, codec.residual_at(window)
        wide = dtype.itemsize > 2
        plain = codec.plain_dtype if codec.plain_dtype is not None and wide else dtype  # sinks, residual
        self.sink_k = torch.empty((n_kv, self.n_sinks, head_dim), dtype=plain, device=device)
        self.sink_v = torch.empty_like(self.sink_k)
        self.residual_k = torch.empty((n_kv, block_size + self.keep, head_dim), dtype=plain, device=device)
        self.residual_v = torch.empty_like(self.residual_k)
        self.n_residual = 0
        self.slots: list[int] = []  # block table: pool slot of each held block, oldest first
        self.where: list[int] = []    # the tier each held block is on (index into pools)
        self.read_at = 0  # the store's clock when attention last read this layer's blocks (all at once)
        self.first_block = 0       # index of the oldest held block
        self.length = 0            # tokens appended so far = position of the next token
        self._run_cache: tuple | None = None  # (block table key, its BlockRuns), all blocks in RAM
        self.native: object = None  # what a native kernel derived from the residual buffers (kept)

    # select() attends everything held and observe() ignores the queries (a selector's layer
    # says False): a decode step may then read the layer through held() instead
    attends_all = True

    def select(self, q: torch.Tensor) -> list[Part]:
        """The parts a decode query ``(Hq, 1, D)`` (pre-scaled) attends: all of them here."""
        return self.parts()

    def held(self) -> tuple[list[BlockRun], torch.Tensor, torch.Tensor, int, tuple | None] | None:
        """What :meth:`parts` holds, without making the parts, where nothing has to be read or
        moved first: ``(block runs, residual k, residual v, residual tokens, sinks)`` (the
        residual buffers whole, in the dtype they are held in; their first ``residual tokens``
        rows are held; sinks: the attention sinks' k, v ``(Hkv, n, D)`` as stored, or None).
        None with tiers: ask :meth:`parts` then."""
        if self.home is not None or not self.attends_all:
            return None
        n_sink = self._sinks_seen()
        sinks = (self.sink_k[:, :n_sink], self.sink_v[:, :n_sink]) if n_sink else None
        return self._block_runs(), self.residual_k, self.residual_v, self.n_residual, sinks

    def observe(self, q: torch.Tensor, scale: float) -> None:
        """This step's queries, after their tokens were appended (a selector's layer uses them)."""

    def compress(self) -> None:
        """End of a prefill (a selector's layer keeps its choice here)."""

    def reserve(self, n_tokens: int) -> None:
        blocks = max(0, n_tokens - self.n_sinks) // self.block_size
        if self.window:
            blocks = min(blocks, self.window // self.block_size + 2)
        self.pool.reserve(blocks)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append new tokens. k, v: ``(Hkv, T, D)``."""
        t = k.shape[1]
        i = max(0, min(self.n_sinks - self.length, t))
        if i:  # the first tokens of the sequence: attention sinks, kept as they are
            self.sink_k[:, self.length: self.length + i] = k[:, :i]
            self.sink_v[:, self.length: self.length + i] = v[:, :i]
        if i < t:
            self._push(k[:, i:] if i else k, v[:, i:] if i else v, self.length + i)
        self.length += t
        self._slide()

    def slot(self) -> int | None:
        """Where the next single token goes when appending it is a copy into the residual and
        nothing else (no sink to fill, no block to seal): its row of ``residual_k``/``residual_v``
        (``(Hkv, rows, D)``). The caller copies the token there, then calls :meth:`took`; a decode
        step does this for every sequence of a layer in one copy. None otherwise: use :meth:`append`."""
        if self.length < self.n_sinks or self.n_residual + 1 - self.keep >= self.block_size:
            return None
        return self.n_residual

    def took(self) -> None:
        """The token :meth:`slot` placed is in: count it (and free what a window passed)."""
        self.n_residual += 1
        self.length += 1
        self._slide()

    def _push(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> None:
        """Add tokens at ``pos ..`` to the residual; seal every block that is ``keep`` tokens old."""
        B, r = self.block_size, self.n_residual
        n = r + k.shape[1]
        n_seal = max(0, (n - self.keep) // B)
        if not n_seal:  # (narrow + copy_: a decode step does this for every sequence and layer)
            self.residual_k.narrow(1, r, n - r).copy_(k)
            self.residual_v.narrow(1, r, n - r).copy_(v)
            self.n_residual = n
            return
        if r:  # the held residual tokens come first
            k = torch.cat([self.residual_k[:, :r].to(k.dtype), k], 1)
            v = torch.cat([self.residual_v[:, :r].to(v.dtype), v], 1)
        h, _, d = k.shape
        cut = n_seal * B
        self._seal(k[:, :cut].reshape(h, n_seal, B, d), v[:, :cut].reshape(h, n_seal, B, d), pos - r)
        self.residual_k[:, : n - cut], self.residual_v[:, : n - cut] = k[:, cut:], v[:, cut:]
        self.n_residual = n - cut

    def _seal(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> None:
        """Encode full blocks ``(Hkv, n, B, D)`` whose first token is at position ``pos``."""
        if not (kernels.all_finite(k) and kernels.all_finite(v)):
            raise KvtierError(f"non-finite key/value (NaN or Inf) in tokens {pos}..{pos + k.shape[1] * k.shape[2] - 1}: "
                              "the model's activations overflowed; run with --dtype fp32")
        if self.codec.pre_rope:
            h, n, b, d = k.shape
            k = self.rope.rotate(k.reshape(h, n * b, d).float(), pos, inverse=True).reshape(h, n, b, d)
        self._hold(self.pool.add(k.to(self.dtype), v.to(self.dtype)))

    def _hold(self, slots: list[int]) -> None:
        """Enter new blocks (slots of the first tier) in the block table; settle the tiers."""
        self.slots += slots
        self.where += [0] * len(slots)
        if self.home is not None:
            store = self.home.store
            store.charge(0, len(slots) * self.pool.slot_bytes())
            if not store.recomputes:  # with a recompute tier the runner settles between steps,
                store.settle()        # never mid-step (that would drop blocks just rebuilt)

    def _rebuild_dropped(self) -> None:
        """With a recompute tier: drop disk blocks that fail their checksum, then rebuild every
        dropped block of the sequence from its token ids."""
        if self.home is None or not self.home.store.recomputes:
            return
        self._drop_corrupted()
        if len(self.pools) - 1 in self.where:
            self.home.recompute()

    def _drop_corrupted(self) -> None:
        """A disk block whose checksum fails is dropped (and rebuilt) instead of failing the
        sequence. Only blocks not read back yet are checked."""
        drop = len(self.pools) - 1
        for t, pool in enumerate(self.pools):
            if not self._on_disk(t):
                continue
            bad = pool.corrupted()
            if bad:
                lost = [j for j, (s, w) in enumerate(zip(self.slots, self.where)) if w == t and s in bad]
                note(f"disk tier: {len(lost)} block(s) of layer {self.index} failed their checksum; "
                     "recomputing them from the token ids")
                pool.release(sorted(bad))
                self.home.store.charge(t, -len(lost) * pool.slot_bytes())
                for j in lost:
                    self.slots[j], self.where[j] = -1, drop

    def refill(self, drop: int, fresh: LayerKV) -> None:
        """Put back the blocks dropped to tier ``drop``, taken from ``fresh`` (the same layer of
        a cache recomputed from the token ids), on the first tier."""
        js = [j for j, w in enumerate(self.where) if w == drop]
        if not js:
            return
        at = [self.first_block + j - fresh.first_block for j in js]
        if min(at) < 0 or max(at) >= len(fresh.slots):
            raise KvtierError("internal: the recomputed cache does not cover the dropped blocks")
        slots = self.pool.put(fresh.pool.fields_of([fresh.slots[i] for i in at]))
        for j, slot in zip(js, slots):
            self.slots[j], self.where[j] = slot, 0
        self.home.store.charge(0, len(js) * self.pool.slot_bytes())

    # blocks shared with other sequences (the prefix cache)
    def adopt(self, pool: SharedPool, slots: list[int], sinks: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Start this empty layer from a cached prefix: blocks held in the shared ``pool`` join
        the block table as they are (this layer becomes one more holder; nothing is copied),
        after the prefix's sink tokens ``sinks`` (k, v), which are copied."""
        if self.length or self.home is not None:
            raise KvtierError("internal: a cached prefix starts an empty cache with every block in RAM")
        n = 0
        if sinks is not None:
            k, v = sinks
            n = k.shape[1]
            self.sink_k[:, :n], self.sink_v[:, :n] = k, v
        pool.ref(slots)
        self.slots, self.where = list(slots), [self._tier(pool)] * len(slots)
        self.length = n + len(slots) * self.block_size

    def share(self, j: int, pool: SharedPool, slot: int | None = None) -> int:
        """Block ``j`` comes to live in the shared ``pool``: at ``slot`` (a cached block of the
        same tokens; this layer's own copy is freed) or in a new slot there. This layer holds it
        either way. Returns its slot in ``pool``."""
        if slot is None:
            return self.share_new([j], pool)[0]
        tier = self._tier(pool)
        if self.where[j] == tier:
            return self.slots[j]
        pool.ref([slot])
        self.pools[self.where[j]].release([self.slots[j]])
        self.slots[j], self.where[j] = slot, tier
        return slot

    def share_new(self, js: list[int], pool: SharedPool) -> list[int]:
        """:meth:`share` of blocks ``js`` into new slots of ``pool``, copied together (one put for
        the blocks of each tier they come from). Returns their slots in ``pool``."""
        tier = self._tier(pool)
        moving: dict[int, list[int]] = {}  # source tier -> the blocks it gives
        for j in js:
            if self.where[j] != tier:
                moving.setdefault(self.where[j], []).append(j)
        for t, group in moving.items():
            src, owns = self.pools[t], [self.slots[j] for j in group]
            slots = pool.put(src.fields_of(owns))
            pool.ref(slots)
            src.release(owns)
            for j, slot in zip(group, slots):
                self.slots[j], self.where[j] = slot, tier
        return [self.slots[j] for j in js]

    def _tier(self, pool: BlockPool) -> int:
        """The index of ``pool`` in this layer's pools (a shared pool joins at its first use)."""
        for t, p in enumerate(self.pools):
            if p is pool:
                return t
        if self.home is not None:
            raise KvtierError("internal: blocks are shared only when every block is in RAM")
        self.pools.append(pool)
        return len(self.pools) - 1

    def shared_bytes(self) -> int:
        """Bytes of the blocks this layer reads from a shared pool (held once, by the pool)."""
        return sum(self.pools[t].slot_bytes() for t in self.where if self.pools[t].shared)

    def snapshot(self) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        """Everything this layer holds, for saving: counters and tensors (on the CPU). Blocks
        are in encoded form (``f.<field>``, ``(Hkv, n_blocks, *shape)``), gathered from every tier."""
        self._rebuild_dropped()  # dropped blocks are saved too
        n_sink = min(self.length, self.n_sinks)
        r = self.n_residual
        tensors = {"sink_k": self.sink_k[:, :n_sink], "sink_v": self.sink_v[:, :n_sink],
                   "residual_k": self.residual_k[:, :r], "residual_v": self.residual_v[:, :r]}
        runs, j = [], 0
        while j < len(self.slots):  # runs of one tier, in block order
            n = 1
            while j + n < len(self.slots) and self.where[j + n] == self.where[j]:
                n += 1
            runs.append(self.pools[self.where[j]].fields_of(self.slots[j: j + n]))
            j += n
        for name, (shape, dtype) in self.pool.spec.items():
            pieces = [run[name].cpu() for run in runs]
            tensors["f." + name] = torch.cat(pieces, 1) if pieces else torch.empty(
                (self.n_kv, 0, *shape), dtype=dtype)
        counters = {"length": self.length, "first_block": self.first_block, "n_residual": r}
        return counters, {k: t.contiguous().cpu() for k, t in tensors.items()}

    def restore(self, counters: dict[str, int], tensors: dict[str, torch.Tensor], chunk: int = 16) -> None:
        """Fill this empty layer from :meth:`snapshot`'s output; blocks enter the first tier
        ``chunk`` at a time and settle down the tiers as they come."""
        n_sink, r = tensors["sink_k"].shape[1], counters["n_residual"]
        self.sink_k[:, :n_sink], self.sink_v[:, :n_sink] = tensors["sink_k"], tensors["sink_v"]
        self.residual_k[:, :r], self.residual_v[:, :r] = tensors["residual_k"], tensors["residual_v"]
        self.n_residual, self.length = r, counters["length"]
        self.first_block = counters["first_block"]
        fields = {name: tensors["f." + name] for name in self.pool.spec}
        n = next(iter(fields.values())).shape[1]
        self.pool.reserve(min(n, chunk) if self.home is not None else n)
        for a in range(0, n, chunk):
            self._hold(self.pool.put({name: t[:, a: a + chunk] for name, t in fields.items()}))
            if self.home is not None:
                self.home.store.settle()  # not within a step: safe with a recompute tier too

    def move(self, blocks: list[int], to: int) -> None:
        """Move held blocks (indices into the block table) to tier ``to``, in encoded form."""
        store = self.home.store
        for src in sorted({self.where[j] for j in blocks}):
            js = [j for j in blocks if self.where[j] == src]
            old = [self.slots[j] for j in js]
            nbytes = len(js) * self.pools[src].slot_bytes()
            store.charge(src, -nbytes)
            if store.tiers[to].kind == "recompute":  # dropped: nothing is written anywhere
                new = [-1] * len(js)
                store.traffic.add("dropped", nbytes, moved=False)
            else:
                fields = self.pools[src].fields_of(old)
                new = self.pools[to].put(fields, [self.first_block + j for j in js], self.block_size)
                store.charge(to, nbytes)
                store.traffic.add(f"{store.tiers[src].kind}->{store.tiers[to].kind}", nbytes)
            self.pools[src].release(old)
            for j, slot in zip(js, new):
                self.slots[j], self.where[j] = slot, to

    def _slide(self) -> None:
        """Free blocks no query can attend any more (query q sees keys k with q - k < window)."""
        if not self.window:
            return
        oldest_needed = self.length - self.window  # the newest token may still be querying
        n_out = max(0, min(len(self.slots),
                           (oldest_needed - self.n_sinks) // self.block_size - self.first_block))
        if n_out:
            self._drop(n_out)

    def _drop(self, n: int) -> None:
        """Free the ``n`` oldest held blocks."""
        for t, pool in enumerate(self.pools):
            slots = [s for s, w in zip(self.slots[:n], self.where[:n]) if w == t]
            if slots:
                pool.release(slots)
                if self.home is not None:
                    self.home.store.charge(t, -len(slots) * pool.slot_bytes())
        del self.slots[:n], self.where[:n]
        self.first_block += n

    def close(self) -> None:
        """Free every block (the sequence has ended)."""
        self._drop(len(self.slots))
        self._run_cache = None  # its views of the pools go too
        if self.home is not None:
            self.home.store.layers.discard(self)

    def block_start(self, j: int) -> int:
        """Position of the first token of block ``j``."""
        return self.n_sinks + j * self.block_size

    def parts(self, queries: int = 1) -> list[Part]:
        """Everything held, oldest first: sinks, groups of encoded blocks (decoded on demand),
        residual (``queries``, the new queries about to attend, matters to a selector's layer)."""
        out = self._sink_parts()
        self._rebuild_dropped()  # dropped blocks are needed again
        remote = None  # the ray: tier's runs, attended by its holder: one part for all of them
        for run in self._block_runs():
            if self._remote(run.tier) and not run.fetch:
                if remote is None or remote.tier != run.tier or out[-1].start + out[-1].n != run.start:
                    remote = RemoteRuns(self, run.tier)
                    part = Part.encoded(run.start, 0, self.n_kv, remote.read, remote.score)
                    part.device = self._device(run.tier)
                    out.append(part)
                remote.runs.append(run)
                out[-1].n += len(run.slots) * self.block_size
                continue
            remote = None
            part = Part.encoded(run.start, len(run.slots) * self.block_size, self.n_kv, run.read,
                                run.score if self.scores else None)
            part.device = self.pool.device if run.fetch else self._device(run.tier)
            part.blocks = run
            if self._on_disk(run.tier) and not run.fetch:
                part.done = partial(self._release, run.tier, run.slots)
            out.append(part)
        if self.home is not None:
            self.home.read_ahead(self.index)
        return out + self._residual_parts()

    def _block_runs(self) -> list[BlockRun]:
        """The held blocks as runs attention reads together. With every block in RAM the runs
        are kept while the block table and the pools' tensors are unchanged, so a decode step
        does not rebuild them (nor what a native kernel derived from them); on tiers reading a
        run moves it and counts traffic, so they are made afresh."""
        key = None
        if self.home is None:
            key = (self.first_block, tuple(self.slots), tuple(self.where), tuple(p.generation for p in self.pools))
            if self._run_cache is not None and self._run_cache[0] == key:
                return self._run_cache[1]
        runs = [BlockRun(self, self.where[j], self.slots[j: j + n], fetch, self.block_start(self.first_block + j))
                for j, n, fetch in self._placed(self._runs())]
        if key is not None:
            self._run_cache = (key, runs)
        return runs

    def _sinks_seen(self) -> int:
        """Attention sinks a future query may see: none once a sliding window has passed them."""
        n_sink = min(self.length, self.n_sinks)
        if self.window and self.length - self.window >= n_sink:
            return 0  # a sliding layer: the sinks are outside every future query's window
        return n_sink

    def _sink_parts(self) -> list[Part]:
        """The attention sinks, held as they are (none once a sliding window has passed them)."""
        n_sink = self._sinks_seen()
        if not n_sink:
            return []
        return [Part(self.sink_k[:, :n_sink].to(self.dtype), self.sink_v[:, :n_sink].to(self.dtype), 0)]

    def _residual_parts(self) -> list[Part]:
        """The newest tokens, not yet sealed into a block."""
        r = self.n_residual
        if not r:
            return []
        # every decode step, for every sequence and layer: views, and no .to() call when the
        # residual is held in the compute dtype already
        k, v = self.residual_k.narrow(1, 0, r), self.residual_v.narrow(1, 0, r)
        if k.dtype != self.dtype:
            k, v = k.to(self.dtype), v.to(self.dtype)
        return [Part(k, v, self.length - r)]

    def _placed(self, runs: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
        """``(first index, count, fetch)``: the oldest share of each run off the first tier is
        copied to the first tier before attention, the rest attended in place side by side
        (one copy and one in-place part per run: few launches, long transfers). The share is
        the store's for that tier: 0 for ``attend=local``, 1 for ``fetch``, SHARE for ``split``."""
        if self.home is None:
            return [(j, n, False) for j, n in runs]
        shares, out = self.home.store.shares, []
        for j, n in runs:
            tier = self.where[j]
            cut = int(shares[tier - 1] * n + 0.5) if tier > 0 else 0
            out += [(j, cut, True)] if cut else []
            out += [(j + cut, n - cut, False)] if cut < n else []
        return out

    def _runs(self) -> list[tuple[int, int]]:
        """Runs of held blocks attention reads together, ``(first index, count)``: at most
        ``group_blocks`` each, one tier and one view of its pool each. Marks them read."""
        runs, step = [], self.codec.group_blocks
        if self.home is not None:
            self.read_at = self.home.store.clock
        j = 0
        while j < len(self.slots):
            tier, pool = self.where[j], self.pools[self.where[j]]
            key, n = pool.run_key(self.slots[j]), 1
            while (n < step and j + n < len(self.slots) and self.where[j + n] == tier
                   and pool.run_key(self.slots[j + n]) == key):
                n += 1
            runs.append((j, n))
            j += n
        return runs

    def _remote(self, tier: int) -> bool:
        return self.home is not None and self.home.store.tiers[tier].kind == "ray"

    def _on_disk(self, tier: int) -> bool:
        return self.home is not None and self.home.store.tiers[tier].kind == "disk"

    def _release(self, tier: int, slots: list[int]) -> None:
        """Attention is done with these disk blocks: drop their pages from resident memory."""
        pool = self.pools[tier]
        release(pool.file.mapping(), pool.ranges(slots))

    def disk_ranges(self) -> list[tuple]:
        """``(pool, file ranges)`` of this layer's blocks on the disk tier, for read-ahead."""
        out = []
        for tier, pool in enumerate(self.pools):
            if self._on_disk(tier) and tier in self.where:
                out.append((pool, pool.ranges([s for s, w in zip(self.slots, self.where) if w == tier])))
        return out

    def _device(self, tier: int) -> torch.device:
        if self.home is None:
            return self.pool.device
        return self.home.store.tiers[tier].device

    def _fields(self, tier: int, slots: list[int], fetch: bool = False) -> dict[str, torch.Tensor]:
        """The encoded fields of ``slots`` on tier ``tier``, where attention will read them: in
        place (``attend=local``) or copied to the first tier (``attend=fetch``)."""
        fields = self.pools[tier].fields_of(slots)
        if self.home is None or tier == 0:
            return fields
        store = self.home.store
        nbytes = len(slots) * self.pools[tier].slot_bytes()
        if store.tiers[tier].kind == "disk":
            store.traffic.disk_read += nbytes
        if self._remote(tier):  # brought back over the network already
            store.traffic.add("fetch", nbytes)
            return fields
        if fetch:
            store.traffic.add("fetch", nbytes)
            copies = {name: _fetch(t, self.pool.device) for name, t in fields.items()}
            if self._on_disk(tier):
                self._release(tier, slots)
            return copies
        return fields

    def _score(self, fields: dict[str, torch.Tensor], n_blocks: int, start: int, q: torch.Tensor):
        rope = self.rope.span(start, n_blocks * self.block_size) if self.codec.pre_rope else None
        return self.codec.attend(q, fields, rope)

    def _read(self, fields: dict[str, torch.Tensor], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.codec.decode(fields, self.dtype)
        if self.codec.pre_rope:
            k = self.rope.rotate(k.float(), start).to(self.dtype)
        return k, v

    @property
    def n_held(self) -> int:
        return min(self.length, self.n_sinks) + len(self.slots) * self.block_size + self.n_residual

    def n_elements(self) -> int:
        """Key and value elements held (tokens x heads x dims x 2), whatever their encoding."""
        return 2 * self.n_held * self.n_kv * self.head_dim

    def nbytes(self) -> int:
        """Bytes of data held: encoded blocks, sink and residual tokens, the block table and
        the codec's per-layer state."""
        full = min(self.length, self.n_sinks) + self.n_residual
        plain = 2 * full * self.n_kv * self.head_dim * self.residual_k.element_size()
        blocks = sum(self.nbytes_by_tier()) + len(self.slots) * TABLE_ENTRY_BYTES
        return blocks + plain + self.codec.state_bytes()

    def plain_bytes(self) -> int:
        """Bytes of the sink and residual buffers (allocated up front, on the first tier)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.sink_k, self.sink_v, self.residual_k, self.residual_v))

    def nbytes_by_tier(self) -> list[int]:
        """Bytes of encoded blocks on each tier (a pool's slots all hold the same bytes)."""
        return [pool.slot_bytes() * n if (n := self.where.count(t)) else 0 for t, pool in enumerate(self.pools)]


def _fetch(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``t`` ``(Hkv, n, ...)`` on ``device``, head by head: each head's run of a pool
    is contiguous, so each copy is one transfer (from page-locked memory, asynchronous)."""
    out = torch.empty(t.shape, dtype=t.dtype, device=device)
    for h in range(t.shape[0]):
        out[h].copy_(t[h], non_blocking=t.is_pinned())
    return out


class SeqKV:
    """A sequence's cache: one :class:`LayerKV` per layer (``home``: its place in a tiered store)."""

    def __init__(self, layers: list[LayerKV], home: SeqTiers | None = None):
        self.layers, self.home = layers, home
        if home is not None:
            home.hold_plain(sum(layer.plain_bytes() for layer in layers))
            home.layers = layers

    @property
    def error(self) -> KvtierError | None:
        """Why this sequence cannot go on (its blocks could not be placed), or None."""
        return None if self.home is None else self.home.error

    def close(self) -> None:
        """Free every block and the sequence's disk file (the sequence has ended)."""
        for layer in self.layers:
            layer.close()
        if self.home is not None:
            self.home.close()

    def nbytes_by_tier(self) -> list[int]:
        return [sum(col) for col in zip(*(layer.nbytes_by_tier() for layer in self.layers))]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reserve(self, n_tokens: int) -> None:
        for layer in self.layers:
            layer.reserve(n_tokens)

    def compress(self) -> None:
        """End of a prefill: layers with a selector keep only the tokens it chooses."""
        for layer in self.layers:
            layer.compress()

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def shared_bytes(self) -> int:
        """Bytes of blocks read from the prefix cache's shared pools (counted there, once)."""
        return sum(layer.shared_bytes() for layer in self.layers)

    def n_elements(self) -> int:
        return sum(layer.n_elements() for layer in self.layers)
