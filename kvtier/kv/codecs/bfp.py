"""``bfp``: block floating point with outlier channels grouped by an offline permutation.

Per token, the head dimension is cut into blocks of ``block`` channels that share one
power-of-two exponent (a uint8 per block); each element is a signed integer mantissa of
``mantissa`` bits (symmetric, ``[-(2^(m-1) - 1), 2^(m-1) - 1]`` stored offset by ``2^(m-1)``,
bit-packed with :func:`kvtier.kv.codecs.packing.pack`). Of the two exponents around the block
maximum, the one with the smaller squared error is kept (rounding the largest element down
can beat halving every other element's resolution).

Before blocking, the channels are permuted so that channels of similar calibrated magnitude
(RMS per channel of the post-RoPE keys and of the values, :mod:`kvtier.kv.calibration`) share
blocks: the few large outlier channels then raise the exponent only of their own block. The
permutation is fixed per layer and KV head, computed once per model from the calibration
statistics and held by the layer's codec (:meth:`Bfp.for_layer`), not stored per block: it is
calibration data of the model, its bytes (int16, keys and values) counted once per layer
(:meth:`Bfp.state_bytes`). An unbound codec (no statistics) uses the identity permutation.
The first ``sinks`` tokens (attention sinks) are kept unencoded by the cache.

Bytes per token and KV head: ``2 * (D * mantissa / 8 + D / block)`` (keys and values); with
the defaults (``mantissa=4``, ``block=16``) and D = 64, 2 * (32 + 4) = 72 bytes, 4.5 bits per
element.

Measured on SmolLM2-135M (``kvtier bench ppl``, 2K context, 2 windows; KL of the next-token
distribution to the fp32 cache's): +4.6 % PPL, KL 0.071; without sinks +8.1 %; with the
identity order +4.8 %, KL 0.060; ``block=8`` (5 bits) +4.1 %. The keys are the weak side:
their largest channel is a nearly constant offset (about -12, the queries large on it too),
and a shared power-of-two exponent over 4-bit mantissas leaves it an error of up to a whole
unit, where KIVI's per-channel range resolves it ~5x finer. Sorting lowers the keys'
relative error by ~9 % but not the attention error: grouped, the large channels share the
coarse step of the largest.

Paper: Trukhanov and Soloveychik, "Accurate Block Quantization in LLMs with Outliers", 2024,
https://arxiv.org/abs/2403.20137
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass

import torch

from kvtier import kernels
from kvtier.errors import KvtierError
from kvtier.kv.codecs.base import Codec, LayerContext, plain_pieces
from kvtier.kv.codecs.blockscaled import scale_values
from kvtier.kv.codecs.packing import pack, unpack_float
from kvtier.registry import param, register

EXP_BIAS = 127  # stored exponent byte = exponent + 127 (as E8M0)


@register
@dataclass(frozen=True)
class Bfp(Codec):
    """Block floating point: per-token blocks of channels share an exponent; channels sorted by calibrated magnitude."""

    name = "bfp"
    calibrated = True
    group_blocks = 64  # attention on the codes: fewer, larger steps
    mantissa: int = param(4, "bits per element: a signed integer mantissa", choices=(3, 4, 8))
    block: int = param(16, "channels sharing one exponent (divides head_dim)", choices=(8, 16, 32, 64))
    sort: bool = param(True, "permute channels by calibrated RMS first, grouping the outliers (the paper's K-sort)")
    sinks: int = param(4, "first tokens kept in full precision (attention sinks)", min=0, max=64)
    # per-head channel orders (Hkv, D) of keys and values, set by for_layer(); None = identity
    perm_k: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    perm_v: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def for_layer(self, ctx: LayerContext) -> Bfp:
        """This codec with the layer's channel orders: largest calibrated RMS first, per head."""
        if ctx.stats is None or not self.sort:
            return self
        bound = copy.copy(self)
        for name in "kv":
            rms = ctx.stats[f"{name}_rms"].float()  # (Hkv, D)
            order = torch.sort(rms, dim=-1, descending=True, stable=True).indices
            object.__setattr__(bound, f"perm_{name}", order.to(torch.int16))
        return bound

    def state_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (self.perm_k, self.perm_v) if p is not None)

    def fields(self, block_size, head_dim):
        if head_dim % self.block:
            raise KvtierError(f"bfp: block={self.block} must divide the head dimension {head_dim}")
        shapes = {"m": ((block_size, head_dim * self.mantissa // 8), torch.uint8),
                  "e": ((block_size, head_dim // self.block), torch.uint8)}
        return {f"{x}_{f}": spec for x in "kv" for f, spec in shapes.items()}

    def encode(self, k, v):
        out = {}
        for name, x in (("k", k), ("v", v)):
            x = x.float()
            perm = getattr(self, f"perm_{name}")
            if perm is not None:  # (Hkv, D) -> gather along channels of every token
                x = torch.take_along_dim(x, perm.to(x.device, torch.long)[:, None, None, :], dim=-1)
            m, e = self._encode(x)
            out[f"{name}_m"], out[f"{name}_e"] = m, e
        return out

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: ``(Hkv, n, B, D)`` fp32 -> packed mantissas ``(Hkv, n, B, D*m/8)``, exponents ``(Hkv, n, B, D/block)``."""
        h, n, b, d = x.shape
        top = 2 ** (self.mantissa - 1) - 1
        blocks = x.reshape(h, n, b, d // self.block, self.block)
        amax = blocks.abs().amax(-1, keepdim=True).clamp(min=2.0 ** -100)
        hi = torch.ceil(torch.log2(amax / top)).clamp(1 - EXP_BIAS, 255 - EXP_BIAS)  # max fits unclipped
        (q, err), (q_lo, err_lo) = (_round(blocks, e, top) for e in (hi, hi - 1))
        lower = err_lo < err  # (h, n, B, D/block, 1): clipping the max costs less
        q, e = torch.where(lower, q_lo, q), torch.where(lower, hi - 1, hi)
        codes = (q + 2 ** (self.mantissa - 1)).to(torch.uint8).reshape(h, n, b, d)
        return pack(codes, self.mantissa), (e + EXP_BIAS).to(torch.uint8).squeeze(-1)

    def decode(self, data, dtype):
        out = []
        for name in "kv":
            q = unpack_float(data[f"{name}_m"], self.mantissa) - 2 ** (self.mantissa - 1)  # (h, n, B, D)
            h, n, b, d = q.shape
            scale = torch.exp2(data[f"{name}_e"].float() - EXP_BIAS)  # (h, n, B, D/block)
            x = (q.reshape(h, n, b, d // self.block, self.block) * scale.unsqueeze(-1)).reshape(h, n * b, d)
            perm = getattr(self, f"perm_{name}")
            if perm is not None:  # scatter back: channel perm[j] is at position j
                x = torch.empty_like(x).scatter_(-1, perm.to(x.device, torch.long)[:, None, :].expand_as(x), x)
            out.append(x.to(dtype))
        return out[0], out[1]

    def attend(self, q, data, rope=None):
        """Softmax pieces on the codes in the native kernel (kernels/bsattn.c: a mantissa times
        its block's power of two), or None (no kernel: the blocks are decoded). The channel
        orders move to the query and the output: ``q . k = q[perm] . x`` for the stored ``x``."""
        qk = q if self.perm_k is None else torch.take_along_dim(q.float(), self.perm_k.long()[:, None, :], -1)
        fields = [data["k_m"], data["k_e"], None, data["v_m"], data["v_e"], None]
        pieces = kernels.blockscaled_attend(qk, fields, _mantissa_values(self.mantissa), scale_values("e8m0"),
                                            self.mantissa, self.block)
        if pieces is None or self.perm_v is None:
            return pieces
        m, l, o = pieces
        return m, l, torch.empty_like(o).scatter_(-1, self.perm_v.long()[:, None, :].expand_as(o), o)

    def native_job(self, data, rows, rope=None):
        """:meth:`attend` as a job of the batched decode kernel: the channel orders as its turn
        of the head space (``q[perm]`` going in, scattered back coming out)."""
        job = kernels.blockscaled_job([data["k_m"], data["k_e"], None, data["v_m"], data["v_e"], None],
                                      _mantissa_values(self.mantissa), scale_values("e8m0"), self.mantissa,
                                      self.block, rows)
        if job is None or self.perm_k is None:
            return job
        return job.turned(_order_matrix(self.perm_k).transpose(1, 2), _order_matrix(self.perm_v))

    def attend_torch(self, q, data):
        """The reference of the kernel: the blocks decoded, softmax pieces in fp32."""
        return plain_pieces(q, *self.decode(data, torch.float32))


def _order_matrix(perm: torch.Tensor) -> torch.Tensor:
    """``(Hkv, D)`` channel orders -> ``(Hkv, D, D)`` fp32 with ``[h, j, perm[h, j]] = 1``: a row
    times it puts element ``j`` at ``perm[j]`` (its transpose gathers ``x[perm]``)."""
    h, d = perm.shape
    out = torch.zeros(h, d, d)
    out.scatter_(2, perm.long().cpu()[:, :, None], 1.0)
    return out


@functools.cache
def _mantissa_values(bits: int) -> torch.Tensor:
    """Each stored mantissa code's value: the code minus its offset ``2^(bits-1)``."""
    return torch.arange(2 ** bits, dtype=torch.float32) - 2 ** (bits - 1)


def _round(blocks: torch.Tensor, e: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mantissas of ``blocks (..., block)`` at exponents ``e (..., 1)`` and each block's squared error."""
    q = (blocks * torch.exp2(-e)).round_().clamp_(-top, top)
    return q, (q * torch.exp2(e) - blocks).square_().sum(-1, keepdim=True)
