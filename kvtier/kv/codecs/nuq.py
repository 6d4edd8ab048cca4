"""``nuq``: non-uniform KV quantization with isolated outliers (KVQuant).

Keys are stored *before* RoPE and quantized per channel over a block's tokens (pre-RoPE key
outliers sit in fixed channels); values per token, in groups of ``group`` channels. Each group
is normalised to [-1, 1] by its range (a one-byte log scale for the half-range, code 0 for a
group of zeros, and an int8 count of half-range / 8 for the centre, as ``rotatekv`` stores
them) and each element is then the nearest of ``2 ** bits`` levels of a **non-uniform
codebook**, one for keys and one for values per layer. The codebooks are fitted once per
model by k-means on the calibration pass's own pre-RoPE keys and values
(:mod:`kvtier.kv.calibration`), normalised exactly as
encoding normalises them, each element weighted by its group's half-range squared: the fit
minimises the squared error in the activations' own units. (KVQuant weights by a Fisher
sensitivity from gradients; kvtier's inference forward has none, so this is the unweighted
objective on the real scale.)

**Dense-and-sparse:** before the ranges are taken, the ``outliers`` fraction of each block's
elements that lie farthest from their group (in units of the group's standard deviation) are
set apart; their codes are still written, and the difference between the true value and what
the code decodes to is kept in fp16 with the element's index (int16) in the block. Decoding
adds them back, so an outlier costs 4 bytes and never stretches its group's range. Their
bytes are fields of the block, counted like every other byte.

Attention runs on the codes (:meth:`Nuq.attend`, native in ``kvtier/kernels/nuqattn.c``): per
block, each code is one lookup in the layer's codebook times its group's scale plus its centre,
the outliers' differences are added, and the keys are rotated by RoPE at their positions
inside the kernel, before the dot product; nothing dense is written to memory.

An uncalibrated ``nuq`` (no statistics, e.g. a codec built on its own) uses the levels fitted
to Gaussian groups normalised the same way instead (:func:`gaussian_levels`).

Paper: Hooper et al., "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache
Quantization", 2024, https://arxiv.org/abs/2401.18079
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch

from kvtier import kernels
from kvtier.config import BLOCK_SIZE
from kvtier.errors import KvtierError
from kvtier.kv.codecs.base import Codec, SlidingResidual, rope_pieces
from kvtier.kv.codecs.packing import pack, unpack
from kvtier.kv.codecs.rotatekv import ZERO_STEPS, scale_code, scale_value
from kvtier.registry import param, register

ITERATIONS = 30  # Lloyd iterations of the codebook fit


@functools.cache
def gaussian_levels(bits: int) -> torch.Tensor:
    """The codebook before calibration: k-means levels of Gaussian groups of 64 normalised by
    their own range, as :meth:`Nuq.encode` normalises a group."""
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    u = ((x - (hi + lo) / 2) / ((hi - lo) / 2)).flatten()
    return fit_levels(u, torch.ones_like(u), bits)


def fit_levels(u: torch.Tensor, w: torch.Tensor, bits: int) -> torch.Tensor:
    """Weighted 1-D k-means of ``u`` (values in [-1, 1]) with weights ``w``: ``2 ** bits`` sorted
    levels (fp32). Starts from the weighted quantiles; an empty cell keeps its level."""
    n = 2 ** bits
    ok = torch.isfinite(u) & torch.isfinite(w)
    if not ok.all():
        u, w = u[ok], w[ok]
    if u.numel() < n or not (w > 0).any():
        raise KvtierError(f"nuq: {u.numel()} calibration values cannot fit {n} codebook levels")
    order = torch.argsort(u)
    u, w = u[order].double(), w[order].double()
    cdf = torch.cumsum(w, 0) / w.sum()
    levels = u[torch.searchsorted(cdf, (torch.arange(n, dtype=torch.float64) + 0.5) / n).clamp_(max=len(u) - 1)]
    for _ in range(ITERATIONS):
        cells = torch.bucketize(u, (levels[1:] + levels[:-1]) / 2)
        mass = torch.zeros(n, dtype=torch.float64).index_add_(0, cells, w)
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, cells, w * u)
        new = torch.where(mass > 0, total / mass.clamp_min(1e-300), levels)
        new, _ = new.sort()
        if torch.allclose(new, levels, atol=1e-7):
            break
        levels = new
    return levels.float()


def _outliers(x: torch.Tensor, dim: int, count: int) -> torch.Tensor:
    """Indices ``(h, n, count)`` into each block's flattened elements of the ``count`` farthest
    from their group's mean in units of the group's standard deviation (groups along ``dim``)."""
    mu, sd = x.mean(dim, keepdim=True), x.std(dim, keepdim=True)
    z = ((x - mu).abs() / (sd + 1e-6)).flatten(2)
    return z.topk(count, dim=-1, sorted=False).indices


def _normalise(x: torch.Tensor, dim: int, idx: torch.Tensor | None):
    """Groups along ``dim`` of ``x (h, n, ...)``, their outliers ``idx`` set apart: one-byte
    half-range codes, int8 centres (in half-range / 8) and the elements in [-1, 1] (fp32)."""
    xr = x
    if idx is not None:  # outliers take their group's mean, so they do not stretch its range
        mu = x.mean(dim, keepdim=True).expand_as(x).flatten(2)
        xr = x.flatten(2).scatter(-1, idx, mu.gather(-1, idx)).reshape(x.shape)
    lo, hi = xr.amin(dim, keepdim=True), xr.amax(dim, keepdim=True)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    # the centre must fit in int8 steps of half / 8: a group far from 0 gets a coarser scale
    need = torch.maximum(half, mid.abs() * ZERO_STEPS / 127)
    sc = torch.where(need > 0, scale_code(need).clamp_(min=1), 0).to(torch.uint8)  # 0: an all-zero group
    scale = _scale(sc)
    live = scale > 0  # a group of zeros has scale 0, centre 0 and every element at 0
    zero = torch.where(live, mid / torch.where(live, scale, 1.0) * ZERO_STEPS, 0.0).round_().clamp_(-127, 127)
    u = ((x - zero / ZERO_STEPS * scale) / torch.where(live, scale, 1.0)).clamp_(-1, 1)
    return sc, zero.to(torch.int8), u, scale


def _scale(sc: torch.Tensor) -> torch.Tensor:
    """A scale code's value; code 0 is exactly zero (a group of zeros decodes to zeros)."""
    return torch.where(sc > 0, scale_value(sc), 0.0)


def _expand(q: torch.Tensor, sc: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_normalise`: levels ``q`` (in [-1, 1]) back to values."""
    scale = _scale(sc)
    return (q + zero.float() / ZERO_STEPS) * scale


@register
@dataclass(frozen=True)
class Nuq(SlidingResidual, Codec):
    """KVQuant: pre-RoPE per-channel keys, per-token values, calibrated non-uniform codebooks, fp16 outliers."""

    name = "nuq"
    width = "bits"  # bits per element (mixed)
    calibrated = True
    pre_rope = True
    group_blocks = 64  # attention on the codes: fewer, larger steps
    bits: int = param(2, "bits per key/value code", choices=(2, 3, 4))
    outliers: float = param(0.005, "fraction of each block's keys and of its values kept apart in fp16 "
                            "(with an int16 index each)", min=0.0, max=0.1)
    group: int = param(64, "channels per value group (one scale and centre per token and group)",
                       choices=(16, 32, 64, 128, 256))
    sinks: int = param(4, "first tokens kept in 16 bits (attention sinks)", min=0, max=64)
    residual: int = param(64, "newest tokens kept in 16 bits beyond the residual block", min=0, max=4096)
    k_levels: torch.Tensor | None = field(default=None, init=False, compare=False, repr=False)
    v_levels: torch.Tensor | None = field(default=None, init=False, compare=False, repr=False)
    _fits: dict = field(default_factory=dict, init=False, compare=False, repr=False)  # per layer

    def levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value codebooks (uncalibrated: the Gaussian levels)."""
        if self.k_levels is None:
            return gaussian_levels(self.bits), gaussian_levels(self.bits)
        return self.k_levels, self.v_levels

    def n_outliers(self, block_size: int, head_dim: int) -> int:
        return round(self.outliers * block_size * head_dim)

    def for_layer(self, ctx):
        if ctx.head_dim % self.group and self.group < ctx.head_dim:
            raise KvtierError(f"nuq: group={self.group} must divide the head dimension {ctx.head_dim}")
        stats = ctx.stats
        if stats is None or "kpre_sample" not in stats:
            return self
        key = (ctx.index, stats["kpre_sample"].data_ptr(), stats["v_sample"].data_ptr())
        if key not in self._fits:  # once per layer (and head slice) for every cache of this codec
            self._fits[key] = self._fit(stats["kpre_sample"].float(), stats["v_sample"].float())
        bound = replace(self)
        object.__setattr__(bound, "_fits", self._fits)
        object.__setattr__(bound, "k_levels", self._fits[key][0])
        object.__setattr__(bound, "v_levels", self._fits[key][1])
        return bound

    def _fit(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codebooks from calibration samples ``(Hkv, S, D)``, normalised as :meth:`encode` does."""
        h, s, d = k.shape
        b = BLOCK_SIZE
        n = s // b
        g = min(self.group, d)
        out = []
        for x, dim in ((k[:, :n * b].reshape(h, n, b, d), 2),
                       (v[:, :n * b].reshape(h, n, b, d // g, g), 4)):
            count = self.n_outliers(b, d)
            idx = _outliers(x, dim, count) if count else None
            _, _, u, scale = _normalise(x, dim, idx)
            w = scale.expand_as(x).pow(2).flatten(2)
            keep = torch.ones_like(w, dtype=torch.bool)
            if idx is not None:
                keep.scatter_(-1, idx, False)
            out.append(fit_levels(u.flatten(2)[keep], w[keep], self.bits))
        return out[0], out[1]

    def state_bytes(self) -> int:
        return 0 if self.k_levels is None else 4 * (self.k_levels.numel() + self.v_levels.numel())

    def fields(self, block_size, head_dim):
        if head_dim % 8 or head_dim % min(self.group, head_dim):
            raise KvtierError(f"nuq: head dimension {head_dim} must be a multiple of 8 and of group={self.group}")
        if block_size * head_dim > 2 ** 15:
            raise KvtierError(f"nuq: blocks of {block_size} x {head_dim} elements do not fit int16 outlier indices")
        packed, groups = head_dim * self.bits // 8, head_dim // min(self.group, head_dim)
        out = {"k": ((block_size, packed), torch.uint8),
               "k_scale": ((head_dim,), torch.uint8), "k_zero": ((head_dim,), torch.int8),
               "v": ((block_size, packed), torch.uint8),
               "v_scale": ((block_size, groups), torch.uint8), "v_zero": ((block_size, groups), torch.int8)}
        count = self.n_outliers(block_size, head_dim)
        if count:
            for x in "kv":
                out[f"{x}_oi"], out[f"{x}_od"] = ((count,), torch.int16), ((count,), torch.float16)
        return out

    def _encode_one(self, x: torch.Tensor, dim: int, levels: torch.Tensor):
        """One of K or V, groups along ``dim``: codes ``(h, n, B, D)``, scale and centre codes,
        and the outliers' indices and fp16 differences (or None)."""
        h, n = x.shape[:2]
        count = self.n_outliers(x.shape[2], x[0, 0].numel() // x.shape[2])
        idx = _outliers(x, dim, count) if count else None
        sc, zero, u, _ = _normalise(x, dim, idx)
        q = torch.bucketize(u.contiguous(), (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
        extra = None
        if idx is not None:
            back = _expand(levels[q.long()], sc, zero).flatten(2)
            extra = (idx.to(torch.int16), (x.flatten(2).gather(-1, idx) - back.gather(-1, idx)).half())
        return q, sc, zero, extra

    def encode(self, k, v):
        h, n, b, d = k.shape
        g = min(self.group, d)
        kl, vl = self.levels()
        kq, ks, kz, kx = self._encode_one(k.float(), 2, kl)
        vq, vs, vz, vx = self._encode_one(v.float().reshape(h, n, b, d // g, g), 4, vl)
        out = {"k": pack(kq, self.bits), "k_scale": ks.squeeze(2), "k_zero": kz.squeeze(2),
               "v": pack(vq.reshape(h, n, b, d), self.bits),
               "v_scale": vs.reshape(h, n, b, -1), "v_zero": vz.reshape(h, n, b, -1)}
        for x, extra in (("k", kx), ("v", vx)):
            if extra is not None:
                out[f"{x}_oi"], out[f"{x}_od"] = extra
        return out

    def _decode_one(self, data, x: str, levels: torch.Tensor) -> torch.Tensor:
        codes = unpack(data[x], self.bits).long()  # (h, n, B, D)
        h, n, b, d = codes.shape
        vals = levels.to(codes.device)[codes]
        if x == "k":  # per channel over the block
            out = _expand(vals, data["k_scale"].unsqueeze(2), data["k_zero"].unsqueeze(2))
        else:
            g = min(self.group, d)
            out = _expand(vals.reshape(h, n, b, d // g, g), data["v_scale"].unsqueeze(-1),
                          data["v_zero"].unsqueeze(-1)).reshape(h, n, b, d)
        if f"{x}_oi" in data:
            out = out.reshape(h, n, b * d).scatter_add(-1, data[f"{x}_oi"].long(), data[f"{x}_od"].float())
        return out.reshape(h, n * b, d)

    def decode(self, data, dtype):
        kl, vl = self.levels()
        return self._decode_one(data, "k", kl).to(dtype), self._decode_one(data, "v", vl).to(dtype)

    def attend(self, q, data, rope=None):
        """Softmax pieces on the codes: the native kernel where it runs, else :meth:`attend_torch`."""
        if rope is None:  # keys before RoPE need their positions
            return None
        kl, vl = self.levels()
        fast = kernels.nuq_attend(q, data, rope, kl, vl, self.bits, min(self.group, q.shape[-1]))
        return fast if fast is not None else self.attend_torch(q, data, rope)

    def native_job(self, data, rows, rope=None):
        """:meth:`attend` as a job of the batched decode kernel (RoPE turned in its kernel)."""
        if rope is None:
            return None
        kl, vl = self.levels()
        d = data["v"].shape[-1] * 8 // self.bits
        return kernels.nuq_job(data, rope, kl, vl, self.bits, min(self.group, d), rows)

    def attend_torch(self, q, data, rope):
        """The reference of the kernel: each block's codes looked up, scaled, outliers added,
        keys rotated by RoPE at their positions, then softmax pieces in fp32."""
        return rope_pieces(q, *self.decode(data, torch.float32), rope)
