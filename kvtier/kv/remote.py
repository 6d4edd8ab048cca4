"""The ``ray:`` tier: KV blocks held by an actor on another node of a Ray cluster.

``--tiers cpu:2GiB,ray:8GiB``: blocks pushed down from the last local tier go, encoded as they
are, to a :class:`KVHolder` actor on another Ray node (the node with the most free memory that
is not this one; this node when it is alone). Infinite-LLM's DistAttention then decides what
crosses the network on each decode step:

- ``attend=local``: the holder attends its own blocks of a layer (on their codes where the codec
  can) and sends back only the softmax pieces ``(m, l, o)``, which merge by log-sum-exp with the
  local ones. Per layer and step: the query and one piece, a few KB.
- ``attend=fetch``: the blocks come back and are attended here (the baseline).

Demotions are sent without waiting (the tier's slots are chosen here and Ray runs one caller's
calls to an actor in order); attention waits for its answer. A holder that is gone (its node
died, it was killed) raises a :class:`~kvtier.errors.KvtierError` that names it: the sequence
ends with that error, never with wrong output.

Traffic counted: the bytes of the tensors sent and received (``store.traffic``: ``cpu->ray`` for
demotions, ``ray attend`` for queries and pieces, ``fetch`` for blocks brought back), not Ray's
own framing.
"""

from __future__ import annotations

import os

import torch

from kvtier.errors import KvtierError
from kvtier.kv.blocks import BlockPool
from kvtier.kv.codecs.base import attends_on_codes

NAMESPACE = "kvtier"


def connect():
    """The ``ray`` module, connected to a cluster (``RAY_ADDRESS``, else the local one)."""
    try:
        import ray
    except ImportError:
        raise KvtierError("the ray: tier needs Ray: pip install 'kvtier[ray]'") from None
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS", "auto")
        try:
            ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise KvtierError(f"the ray: tier found no Ray cluster at {address!r} ({e}); start one with "
                              "'ray start --head' or set RAY_ADDRESS") from None
    return ray


class KVHolder:
    """The actor that holds one engine's ``ray:`` blocks: one :class:`BlockPool` per (sequence,
    layer), written at the slots the engine chose, and attention over them."""

    def __init__(self, threads: int = 1):
        torch.set_num_threads(threads)
        self.pools: dict[tuple[int, int], BlockPool] = {}
        self.ropes: dict[tuple[int, int], object] = {}

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def open(self, key, codec, n_kv: int, head_dim: int, block_size: int, rope) -> None:
        self.pools[key] = BlockPool(codec, n_kv, head_dim, block_size)
        self.ropes[key] = rope

    def put(self, key, slots: list[int], fields: dict[str, torch.Tensor]) -> None:
        self.pools[key].write(slots, fields)

    def fields(self, key, slots: list[int]) -> dict[str, torch.Tensor]:
        return {k: t.contiguous() for k, t in self.pools[key].fields_of(slots).items()}

    def attend(self, key, runs: list[tuple[list[int], int]], q: torch.Tensor, dtype: torch.dtype):
        """Softmax pieces of pre-scaled query rows ``q (Hkv, R, D)`` over the blocks of ``runs``
        (``(slots, position of the first token)`` each), combined into one."""
        from kvtier.attention.blockwise import combine, partial

        pool, rope = self.pools[key], self.ropes[key]
        codec, pieces = pool.codec, []
        for slots, start in runs:
            fields = pool.fields_of(slots)
            span = rope.span(start, len(slots) * pool.block_size) if codec.pre_rope else None
            piece = codec.attend(q, fields, span) if attends_on_codes(codec) else None
            if piece is None:
                k, v = codec.decode(fields, dtype)
                if codec.pre_rope:
                    k = rope.rotate(k.float(), start).to(dtype)
                piece = partial(q, k, v, None)
            pieces.append(tuple(x.float() for x in piece))
        return combine(pieces)

    def drop(self, seq: int) -> None:
        """A sequence has ended: free all its layers' blocks."""
        for key in [k for k in self.pools if k[0] == seq]:
            del self.pools[key], self.ropes[key]

    def nbytes(self) -> int:
        """Bytes the holder's pools have allocated (what its process holds for blocks)."""
        return sum(p.reserved_bytes() for p in self.pools.values())


class RemoteTier:
    """One engine's ``ray:`` tier: its holder actor, started on another node when there is one."""

    def __init__(self, tier, threads: int = 1):
        ray = connect()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        others = [n for n in nodes if n["NodeID"] != here]
        target = max(others or nodes, key=lambda n: n.get("Resources", {}).get("memory", 0))
        self.node, self.remote = target["NodeID"], bool(others)
        actor = ray.remote(num_cpus=0, max_restarts=0)(KVHolder)
        self.holder = actor.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node, soft=False)).remote(threads)
        self.tier, self.lost = tier, None
        self._ray = ray
        self.call(self.holder.node.remote())  # started (or a clear error now, not mid-step)

    def describe(self) -> str:
        where = "another node" if self.remote else "this node (the cluster has no other)"
        return f"ray: tier holder on {where}, {self.node[:12]}"

    def call(self, ref):
        """Wait for a holder call; a holder that is gone raises a KvtierError naming it."""
        if self.lost is not None:
            raise self.lost
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayError as e:
            self.lost = KvtierError(
                f"the ray: tier's blocks are lost: their holder on node {self.node[:12]} is gone "
                f"({type(e).__name__}); the sequences that had blocks there end here")
            raise self.lost from None

    def pool(self, seq: int, layer: int, codec, n_kv: int, head_dim: int, block_size: int, rope) -> RemotePool:
        return RemotePool(self, (seq, layer), codec, n_kv, head_dim, block_size, rope)

    def drop(self, seq: int) -> None:
        if self.lost is None:
            self.holder.drop.remote(seq)

    def nbytes(self) -> int:
        """Bytes the holder has allocated for blocks (asks it)."""
        return self.call(self.holder.nbytes.remote())


class RemotePool(BlockPool):
    """A layer's pool on the ``ray:`` tier: slots are chosen here, the bytes live in the holder."""

    def __init__(self, tier: RemoteTier, key, codec, n_kv: int, head_dim: int, block_size: int, rope):
        super().__init__(codec, n_kv, head_dim, block_size, "cpu")  # no tensors held here
        self.tier, self.key, self.head_dim = tier, key, head_dim
        self.rope = _portable(rope) if codec.pre_rope else None
        self.opened = False

    def reserve(self, n_slots: int) -> None:
        pass

    def put(self, encoded: dict[str, torch.Tensor], blocks=(), tokens: int = 0) -> list[int]:
        if self.tier.lost is not None:
            raise self.tier.lost
        holder = self.tier.holder
        if not self.opened:
            holder.open.remote(self.key, self.codec, self.n_kv, self.head_dim, self.block_size, self.rope)
            self.opened = True
        slots = self.allocate(next(iter(encoded.values())).shape[1])
        holder.put.remote(self.key, slots, {k: t.detach().to("cpu").contiguous() for k, t in encoded.items()})
        return slots

    def fields_of(self, slots: list[int]) -> dict[str, torch.Tensor]:
        return self.tier.call(self.tier.holder.fields.remote(self.key, list(slots)))

    def attend(self, runs: list[tuple[list[int], int]], q: torch.Tensor, dtype: torch.dtype):
        return self.tier.call(self.tier.holder.attend.remote(self.key, runs, q.detach().to("cpu"), dtype))

    def reserved_bytes(self) -> int:
        return 0  # held by the holder (RemoteTier.nbytes)


class RemoteRuns:
    """A layer's consecutive ``ray:`` block runs as one attention part: one holder call per
    layer and step, whatever the number of runs."""

    def __init__(self, layer, tier: int):
        self.layer, self.tier, self.runs = layer, tier, []

    def score(self, q: torch.Tensor):
        layer = self.layer
        pool = layer.pools[self.tier]
        m, l, o = pool.attend([(list(r.slots), r.start) for r in self.runs], q, layer.dtype)
        traffic = layer.home.store.traffic
        traffic.add("ray attend", q.numel() * q.element_size() + sum(x.numel() * x.element_size() for x in (m, l, o)))
        return m, l, o

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks, brought back and decoded (a prefill chunk attending them)."""
        ks, vs = zip(*(r.read() for r in self.runs))
        return torch.cat(ks, 1), torch.cat(vs, 1)


def _portable(rope):
    """The layer's rotary embedding without its grown cos/sin table (the holder grows its own)."""
    from kvtier.models.base import Rope

    return Rope(rope.inv_freq, rope.scaling) if isinstance(rope, Rope) else rope
