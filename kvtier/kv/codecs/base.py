"""The codec base class: how one full block of keys and values is stored.

A codec declares the tensors ("fields") it stores per KV head and block, encodes a batch of
full blocks into them and decodes a group of blocks back to full precision. The pool
(:mod:`kvtier.kv.blocks`) owns the storage; a codec holds no per-sequence state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvtier.registry import param


@dataclass(frozen=True)
class LayerContext:
    """What a codec may know about the layer it stores: handed to :meth:`Codec.for_layer`.

    stats: this layer's calibration statistics (:mod:`kvtier.kv.calibration`), ``{name:
    (Hkv, D) fp32}`` for ``k`` (post-RoPE keys), ``kpre`` (pre-RoPE keys) and ``v``, each as
    ``*_absmax``, ``*_rms`` and ``*_mean`` per channel, and ``kpre_sample``, ``v_sample``
    ``(Hkv, S, D)`` fp16 (calibration tokens themselves); None unless the codec sets ``calibrated``.
    rope: the layer's rotary embedding (``rope.rotate(x, start, inverse)``), or None.
    model_stats: every layer's statistics (the model's, whole), for a codec that decides across
    layers (``mixed``); None unless the codec sets ``calibrated``.
    """

    index: int
    n_kv: int
    head_dim: int
    stats: dict[str, torch.Tensor] | None = None
    rope: Any = None
    model_stats: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SlidingResidual:
    """Mixin for a codec with a ``residual`` parameter: a different number of recent tokens in
    16 bits on sliding-window layers. On a model such as Gemma 3, whose sliding layers hold 512
    tokens, a residual of 192 keeps most of a sliding layer in 16 bits; ``residual_sliding=0``
    encodes all but the residual block there and keeps the global layers' residual as it is."""

    residual_sliding: int = param(-1, "newest tokens kept in 16 bits beyond the residual block on sliding-window "
                                  "layers (-1: as residual)", min=-1, max=4096, quiet=True)

    def residual_at(self, window: int | None) -> int:
        return self.residual if window is None or self.residual_sliding < 0 else self.residual_sliding


class Codec(ABC):
    """Base of every codec. Subclasses are dataclasses registered by name."""

    name: ClassVar[str]
    kind: ClassVar[str] = "codec"
    calibrated: ClassVar[bool] = False  # for_layer() needs the layer's calibration statistics
    # The cache around the codec reads these (a codec may make them parameters):
    residual: ClassVar[int] = 0   # newest tokens kept unencoded, beyond the residual block
    sinks: ClassVar[int] = 0      # first tokens of a sequence kept unencoded (attention sinks)
    pre_rope: ClassVar[bool] = False  # encode keys before RoPE (the cache un-rotates/re-rotates)
    # sinks and residual tokens: a compressing codec keeps them in 16 bits when the compute dtype
    # is wider (KIVI keeps its residual in fp16); None: the compute dtype
    plain_dtype: ClassVar[torch.dtype | None] = torch.float16
    group_blocks: ClassVar[int] = 16  # blocks attention decodes at once (1,024 tokens stay in cache)
    width: ClassVar[str | None] = None  # the parameter that sets bits per element, if one does (mixed)

    def residual_at(self, window: int | None) -> int:
        """Newest tokens kept unencoded beyond the residual block on a layer with this sliding
        ``window`` (None: a global layer); :class:`SlidingResidual` sets the two apart."""
        return self.residual

    def for_layer(self, ctx: LayerContext) -> Codec:
        """The codec as used by one layer (per-layer calibrated state); default: itself."""
        return self

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

    def state_bytes(self) -> int:
        """Bytes of per-layer state a bound codec holds (e.g. a calibrated permutation)."""
        return 0

    def attend(self, q: torch.Tensor, data: dict[str, torch.Tensor], rope: torch.Tensor | None = None):
        """Softmax pieces of attention computed on the encoded blocks, without decoding them.

        q: ``(Hkv, R, D)`` pre-scaled query rows; data: ``{field: (Hkv, n, *shape)}``; rope: for
        a codec that stores keys before RoPE, the unit cos and sin at the blocks' positions,
        ``(N, 2, D)`` or per head ``(Hkv, N, 2, D)`` (:meth:`kvtier.models.base.Rope.rows`),
        which attention applies to the keys itself; None for every other codec.
        Returns ``(m, l, o)`` as :func:`kvtier.attention.blockwise.partial` does, or None
        when this codec has no such path (attention then decodes the blocks first).
        """
        return

    def native_job(self, data: dict[str, torch.Tensor], rows: int, rope: torch.Tensor | None = None):
        """The same attention as :meth:`attend`, as a job the batched decode kernel runs among a
        sequence's other parts (:class:`kvtier.kernels.SpanJob`), one KV head per task, for
        ``rows`` query rows per KV head; None where this codec has none (its runs are then
        attended by :meth:`attend` and merged in Python). data and rope: as :meth:`attend`'s;
        the job keeps them."""
        return None


def attends_on_codes(codec: Codec) -> bool:
    """Whether a codec has attention on its encoded form (it overrides :meth:`Codec.attend`;
    its kernel may still decline some shapes, which are then decoded)."""
    return type(codec).attend is not Codec.attend


def rope_pieces(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor):
    """Softmax pieces ``m, l, o`` of pre-scaled queries ``q (h, R, D)`` over decoded pre-RoPE keys
    ``k`` rotated by the unit cos/sin rows ``rope`` (rotate-half layout) and values ``v``, in
    fp32: the reference of the kernels of codecs that store keys before RoPE."""
    cos, sin = rope[..., 0, :].float(), rope[..., 1, :].float()
    half = k.shape[-1] // 2
    return plain_pieces(q, k * cos + torch.cat([-k[..., half:], k[..., :half]], -1) * sin, v)


def plain_pieces(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Softmax pieces ``m, l, o`` of pre-scaled queries ``q (h, R, D)`` over decoded keys and
    values ``(h, N, D)``, in fp32: the reference of the kernels on codes."""
    s = torch.matmul(q.float(), k.float().transpose(1, 2))  # (h, R, N)
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    return m, p.sum(-1, keepdim=True), torch.matmul(p, v.float())
