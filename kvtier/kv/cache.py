"""The KV cache of one sequence: per layer, full blocks in a codec's pool plus a residual block.

New tokens go to the residual block, kept in the compute dtype; when it fills, it is encoded
once as a block and never touched again. A sliding-window layer frees the blocks that no
future query can see.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from kvtier.errors import KvtierError
from kvtier.kv.blocks import BlockPool
from kvtier.kv.codecs.base import Codec, LayerContext

TABLE_ENTRY_BYTES = 8  # per held block: int32 slot + int32 start position


class Part:
    """A run of keys/values at positions ``start .. start + n - 1``, for attention.

    Either held (``k, v``: ``(Hkv, n, D)``) or encoded: ``get()`` then decodes the blocks on
    demand, so attention can decode one group at a time and drop it after use.
    """

    def __init__(self, k: torch.Tensor | None, v: torch.Tensor | None, start: int):
        self.k, self.v, self.start = k, v, start
        self.n, self.n_kv = (k.shape[1], k.shape[0]) if k is not None else (0, 0)
        self.load: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.score: Callable | None = None  # q -> softmax pieces on the encoded form (Codec.attend)

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

    def __init__(self, codec: Codec, n_kv: int, head_dim: int, block_size: int = 64,
                 window: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", ctx: LayerContext | None = None):
        ctx = ctx or LayerContext(0, n_kv, head_dim)
        self.codec = codec.for_layer(ctx)
        self.rope = ctx.rope
        if codec.pre_rope and self.rope is None:
            raise KvtierError(f"{codec.name}: pre-RoPE keys need the model's RoPE (use ModelRunner)")
        self.pool = BlockPool(self.codec, n_kv, head_dim, block_size, device)
        self.n_kv, self.head_dim = n_kv, head_dim
        self.block_size, self.window, self.dtype = block_size, window, dtype
        self.n_sinks, self.keep = codec.sinks, codec.residual
        wide = dtype.itemsize > 2
        plain = codec.plain_dtype if codec.plain_dtype is not None and wide else dtype  # sinks, residual
        self.sink_k = torch.empty((n_kv, self.n_sinks, head_dim), dtype=plain, device=device)
        self.sink_v = torch.empty_like(self.sink_k)
        self.residual_k = torch.empty((n_kv, block_size + self.keep, head_dim), dtype=plain, device=device)
        self.residual_v = torch.empty_like(self.residual_k)
        self.n_residual = 0
        self.slots: list[int] = []  # block table: pool slot of each held block, oldest first
        self.first_block = 0       # index of the oldest held block
        self.length = 0            # tokens appended so far = position of the next token

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
            self._push(k[:, i:], v[:, i:], self.length + i)
        self.length += t
        self._slide()

    def _push(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> None:
        """Add tokens at ``pos ..`` to the residual; seal every block that is ``keep`` tokens old."""
        B, r = self.block_size, self.n_residual
        n = r + k.shape[1]
        n_seal = max(0, (n - self.keep) // B)
        if not n_seal:
            self.residual_k[:, r:n], self.residual_v[:, r:n] = k, v
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
        if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise KvtierError(f"non-finite key/value (NaN or Inf) in tokens {pos}..{pos + k.shape[1] * k.shape[2] - 1}: "
                              "the model's activations overflowed; run with --dtype fp32")
        if self.codec.pre_rope:
            h, n, b, d = k.shape
            k = self.rope.rotate(k.reshape(h, n * b, d).float(), pos, inverse=True).reshape(h, n, b, d)
        self.slots += self.pool.add(k.to(self.dtype), v.to(self.dtype))

    def _slide(self) -> None:
        """Free blocks no query can attend any more (query q sees keys k with q - k < window)."""
        if not self.window:
            return
        oldest_needed = self.length - self.window  # the newest token may still be querying
        n_out = max(0, min(len(self.slots),
                           (oldest_needed - self.n_sinks) // self.block_size - self.first_block))
        if n_out:
            self.pool.release(self.slots[:n_out])
            del self.slots[:n_out]
            self.first_block += n_out

    def block_start(self, j: int) -> int:
        """Position of the first token of block ``j``."""
        return self.n_sinks + j * self.block_size

    def parts(self) -> list[Part]:
        """Everything held, oldest first: sinks, groups of encoded blocks (decoded on demand), residual."""
        out = []
        n_sink = min(self.length, self.n_sinks)
        if self.window and self.length - self.window >= n_sink:
            n_sink = 0  # a sliding layer: the sinks are outside every future query's window
        if n_sink:
            out.append(Part(self.sink_k[:, :n_sink].to(self.dtype), self.sink_v[:, :n_sink].to(self.dtype), 0))
        step = self.codec.group_blocks
        for g in range(0, len(self.slots), step):
            slots = self.slots[g: g + step]
            start = self.block_start(self.first_block + g)
            score = None if self.codec.pre_rope else partial(self._score, slots)
            out.append(Part.encoded(start, len(slots) * self.block_size, self.n_kv,
                                    partial(self._read, slots, start), score))
        if self.n_residual:
            r = self.n_residual
            out.append(Part(self.residual_k[:, :r].to(self.dtype), self.residual_v[:, :r].to(self.dtype),
                            self.length - r))
        return out

    def _score(self, slots: list[int], q: torch.Tensor):
        return self.codec.attend(q, self.pool.fields_of(slots))

    def _read(self, slots: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.pool.read(slots, self.dtype)
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
        blocks = len(self.slots) * (self.pool.slot_bytes() + TABLE_ENTRY_BYTES)
        return blocks + plain + self.codec.state_bytes()


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
