"""``mixed``: one codec at two widths, the wider one on the layers where the narrow one errs most.

``mixed(codec=rotatekv, avg=3, hi=4, lo=2)`` (or ``codec=int(group=32)``: the inner codec's own
parameters, its width aside) stores a share ``(avg - lo) / (hi - lo)`` of the
model's layers with ``rotatekv(bits=4)`` and the rest with ``rotatekv(bits=2)``: ``avg`` is the
average width of the codes over layers (what the layer's sinks, residual and scales add is on
top, and measured like every other byte). The layers given the wider codes are those where the
narrow codec's relative squared error, on keys plus values, is largest on the layer's own
calibration samples (:mod:`kvtier.kv.calibration`; pre-RoPE keys for every codec, a proxy for
codecs that store keys after RoPE). The choice is made once per model and the same layers are
chosen every time.

Each layer's cache then holds the inner codec itself, bound to the layer as it would be alone:
its native kernels, its calibration and its bytes are unchanged. Any codec that names the
parameter setting its width (``Codec.width``: ``bits`` for ``int``, ``rotatekv`` and ``nuq``,
``stages`` for ``vq`` at its 8-channel sub-vectors) can be mixed.

Mixing by head within a layer is not done here: a layer's blocks share one layout.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import torch

from kvtier import registry
from kvtier.config import BLOCK_SIZE
from kvtier.errors import KvtierError
from kvtier.kv.codecs.base import Codec, LayerContext
from kvtier.registry import param, register


@register
@dataclass(frozen=True)
class Mixed(Codec):
    """Mixed precision by layer: a codec at two widths, the wider where the narrower errs most."""

    name = "mixed"
    calibrated = True
    codec: str = param("rotatekv", "the codec to mix, with its own parameters if any (e.g. int(group=32)); "
                       "one with a width parameter: int, rotatekv, nuq, vq")
    avg: float = param(2.5, "average code width over layers, bits per element", min=1.0, max=8.0)
    hi: int = param(4, "code width on the layers where the narrow codes err most", min=2, max=8)
    lo: int = param(2, "code width on the other layers", min=1, max=4)
    _plans: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        from kvtier.spec import SpecError

        registry.check(self, SpecError)  # each parameter's bounds first, then how they fit together
        if not self.lo < self.hi or not self.lo <= self.avg <= self.hi:
            raise SpecError(f"mixed: need lo < hi and lo <= avg <= hi (got lo={self.lo}, avg={self.avg}, "
                              f"hi={self.hi})")
        for b in (self.lo, self.hi):
            self.at(b)  # a width the inner codec does not take fails here, at parse time

    @functools.cached_property
    def inner(self) -> Codec:
        """The codec to mix, as written (its own width ignored)."""
        from kvtier import spec

        inner = spec.parse(self.codec).codec
        if type(inner).width is None or isinstance(inner, Mixed):
            raise KvtierError(f"mixed: {inner.name} has no width parameter to mix; use int, rotatekv, nuq or vq")
        return inner

    @functools.lru_cache(maxsize=8)  # noqa: B019 (frozen, hashable codec; two widths each)
    def at(self, bits: int) -> Codec:
        """The inner codec at ``bits``."""
        cls = type(self.inner)
        f = {x.name: x for x in registry.params(cls)}[cls.width]
        choices, lo, hi = f.metadata["choices"], f.metadata["min"], f.metadata["max"]
        if (choices and bits not in choices) or (lo is not None and bits < lo) or (hi is not None and bits > hi):
            raise KvtierError(f"mixed: {self.inner.name} does not take {cls.width}={bits}")
        return replace(self.inner, **{cls.width: bits})

    # the cache reads these from the spec's codec before binding it to a layer: the inner codec's
    @property
    def pre_rope(self) -> bool:
        return self.at(self.lo).pre_rope

    @property
    def sinks(self) -> int:
        return self.at(self.lo).sinks

    @property
    def residual(self) -> int:
        return self.at(self.lo).residual

    @property
    def plain_dtype(self):
        return self.at(self.lo).plain_dtype

    def residual_at(self, window):
        return self.at(self.lo).residual_at(window)

    def plan(self, model_stats: list[dict], n_kv: int, head_dim: int) -> list[int]:
        """The width of each layer: ``hi`` on the ``share x layers`` layers (half up) where the
        ``lo`` codec's relative error on the calibration samples is largest."""
        key = id(model_stats)
        if key not in self._plans:
            errs = [self._error(i, s, n_kv, head_dim) for i, s in enumerate(model_stats)]
            n_hi = math.floor((self.avg - self.lo) / (self.hi - self.lo) * len(errs) + 0.5)  # half up
            top = set(sorted(range(len(errs)), key=lambda i: -errs[i])[:n_hi])
            self._plans[key] = ([self.hi if i in top else self.lo for i in range(len(errs))], model_stats)
        return self._plans[key][0]

    def _error(self, i: int, stats: dict, n_kv: int, head_dim: int) -> float:
        codec = self.at(self.lo).for_layer(LayerContext(i, n_kv, head_dim, stats))
        k, v = stats["kpre_sample"].float(), stats["v_sample"].float()
        h, s, d = k.shape
        n = s // BLOCK_SIZE
        k, v = k[:, :n * BLOCK_SIZE], v[:, :n * BLOCK_SIZE]
        k2, v2 = codec.decode(codec.encode(k.reshape(h, n, BLOCK_SIZE, d), v.reshape(h, n, BLOCK_SIZE, d)),
                              torch.float32)
        return float(((k2 - k).pow(2).sum() / k.pow(2).sum()) + ((v2 - v).pow(2).sum() / v.pow(2).sum()))

    def for_layer(self, ctx):
        if ctx.model_stats is None or ctx.stats is None or "kpre_sample" not in ctx.stats:
            return self.at(self.lo).for_layer(ctx)
        bits = self.plan(ctx.model_stats, ctx.n_kv, ctx.head_dim)[ctx.index]
        return self.at(bits).for_layer(ctx)

    # used only unbound (no model): the narrow codec
    def fields(self, block_size, head_dim):
        return self.at(self.lo).fields(block_size, head_dim)

    def encode(self, k, v):
        return self.at(self.lo).encode(k, v)

    def decode(self, data, dtype):
        return self.at(self.lo).decode(data, dtype)
