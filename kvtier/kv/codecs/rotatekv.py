"""``rotatekv``: 2-bit KV quantization made accurate by rotations (RotateKV).

Keys are stored *before* RoPE (the cache un-rotates them, and re-applies RoPE when it reads
them back): pre-RoPE keys keep their outliers in fixed channels, which RoPE would smear over
channel pairs position by position. With ``center``, each key channel's calibrated mean is
subtracted first and added back on read: on SmolLM2 the means carry 66-81 % of the keys'
energy and centring cuts the stored keys' error 3x, yet perplexity at 8K did not improve
(Gemma 3: +16.1 % against +18.4 %), so it is off by default. Per layer, the key channels of all
KV heads are concatenated, reordered by a calibrated permutation and rotated by a
block-diagonal Walsh-Hadamard matrix of ``rotate`` channels per block: the reordering
(:func:`deal`) deals the outlier channels out evenly over the blocks, so each rotation spreads
one outlier's energy over its block. When a block is no wider than a head, each head is dealt
over its own blocks: dealing across heads (the paper's grouped-head rotation) gave the same
error on SmolLM2's calibration keys (7.28 % against 7.21 % relative squared error, 2 bits) and
keeps every KV head apart, so attention runs head by head. Wider blocks span heads. Keys are
then quantized per token (or per channel over the block's tokens, ``keys``), values (without
RoPE, not centred; in the keys' order within each head when the heads are apart, else their
own, then rotated by the same blocks) per token, in groups of ``group`` channels; each group's
range is clipped to the ratio that minimises its squared error. (Values in their own order cost
Gemma 3 +20.68 % PPL at 8K against +18.40 % in the keys' order, and dealt by their own RMS
+22.38 %, though that cut their squared error from 11.0 % to 9.8 %.) A
group's scale is one byte (a log scale) and its zero point an int8 count of scale / 8: half
what an fp16 pair costs. Those bytes pay for 192 recent tokens in 16 bits instead of 64,
which took SmolLM2 at 8K from +13.7 % to +5.7 % PPL at 2.68 bits per element. The first
``sinks`` tokens (attention sinks, which carry massive activations) and the newest tokens
(the residual block plus ``residual``) are kept in 16 bits by the cache.

Attention runs on the codes in a native kernel (``kernels/rkvattn.c``). A rotation that mixes
channels does not commute with RoPE, which turns each position by its own angles, so each
key is rotated back per token, in registers (a fast Walsh-Hadamard transform and the inverse
reordering), then turned by RoPE and scored; values are summed under the weights in the rotated space, each
head's rows over its own blocks only (their reordering never leaves the head), and rotated back
and put back in order once per call.

With ``rope=post`` the rotation moves to where it commutes with attention: keys are stored
after RoPE, and each KV head's channels are reordered and rotated within the head. A score is
then ``q . k = (turn q) . (turn k)``, so each decode step rotates the query once and the
blocks are quantized as ``int`` stores them (keys per channel over the block, values per
token), attended by ``int``'s kernel; the output is rotated back once. Its quality cost
against ``rope=pre`` is measured in docs/speed.md.

The permutations and the key means are calibration data of the model (one per layer, computed
once from a short real text, :mod:`kvtier.kv.calibration`); their bytes are counted once per
layer.

Paper: Su et al., "RotateKV: Accurate and Robust 2-Bit KV Cache Quantization for LLMs via
Outlier-Aware Adaptive Rotations", 2025, https://arxiv.org/abs/2501.16383
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch

from kvtier import kernels
from kvtier.errors import KvtierError
from kvtier.kv.codecs.base import Codec, SlidingResidual, rope_pieces
from kvtier.kv.codecs.blockscaled import hadamard
from kvtier.kv.codecs.intq import Int
from kvtier.kv.codecs.packing import pack, unpack_float
from kvtier.registry import param, register

CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6)  # range ratios tried per quantization group
ZERO_STEPS = 8  # the zero point is stored as an int8 count of scale / ZERO_STEPS


def scale_code(scale: torch.Tensor) -> torch.Tensor:
    """A positive scale as one byte: ``2 ** (c / 12 - 12)`` (steps of 5.9 %, 2^-12 .. 2^9.25)."""
    return (12 * (scale.clamp_min(2.0 ** -13).log2() + 12)).round_().clamp_(0, 255).to(torch.uint8)


def scale_value(code: torch.Tensor) -> torch.Tensor:
    return torch.exp2(code.float() / 12 - 12)


def quantize(x: torch.Tensor, bits: int, dim: int):
    """Asymmetric quantization with one (scale, zero) per slice along ``dim``, the range clipped
    to whichever of :data:`CLIPS` gives the least squared error. The scale is stored as one byte
    (:func:`scale_code`) and the zero point as an int8 multiple of scale / 8; codes are rounded
    against the stored pair, so the grid is exactly the one decoding uses. Returns uint8 codes,
    uint8 scale codes and int8 zero points (``dim`` kept, size 1): ``x ~ (q + zero / 8) * scale``."""
    top = 2 ** bits - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    best = None
    for r in CLIPS:
        low = mid - r * half
        # the zero point must fit in int8: a group far from 0 gets a coarser scale
        sc = scale_code(torch.maximum(2 * r * half / top, low.abs() * ZERO_STEPS / 127))
        scale = scale_value(sc)
        zero = (low / scale * ZERO_STEPS).round_().clamp_(-127, 127)
        offset = zero / ZERO_STEPS
        q = (x / scale - offset).round_().clamp_(0, top)
        err = ((q + offset) * scale - x).pow(2).sum(dim, keepdim=True)
        if best is None:
            best = [q, sc, zero, err]
        else:
            better = err < best[3]
            best = [torch.where(better, new, old) for new, old in zip((q, sc, zero, err), best)]
    q, sc, zero, _ = best
    return q.to(torch.uint8), sc, zero.to(torch.int8)


def deal(rms: torch.Tensor, rotate: int) -> torch.Tensor:
    """The calibrated reordering of a layer's key channels: position ``p`` of the rotated vector
    holds channel ``perm[p]``. The channels are dealt out round-robin, largest RMS first: block
    ``j`` gets ranks ``j, j + blocks, ...``, so the outliers spread evenly over the blocks.
    (Dealing each channel to a block at its own offset, which the kernel could undo with a few
    masked moves instead of a gather, raised the keys' squared error on SmolLM2's calibration
    text from 7.3 % to 10.4 %: where a channel sits inside its block matters too.)"""
    blocks = rms.numel() // rotate
    return torch.argsort(rms, descending=True).reshape(rotate, blocks).t().reshape(-1)


def dequantize(q: torch.Tensor, sc: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize` (scale and zero broadcast over ``q``)."""
    return (q + zero.float() / ZERO_STEPS) * scale_value(sc)


@register
@dataclass(frozen=True)
class RotateKV(SlidingResidual, Codec):
    """RotateKV: pre-RoPE keys, calibrated channel reordering, grouped-head Hadamard rotation, sinks kept."""

    name = "rotatekv"
    width = "bits"  # bits per element (mixed)
    calibrated = True
    bits: int = param(2, "bits per key/value element", choices=(2, 3, 4))
    sinks: int = param(4, "first tokens kept in full precision (attention sinks)", min=0, max=64)
    residual: int = param(192, "newest tokens kept in 16 bits beyond the residual block", min=0, max=4096)
    keys: str = param("token", "key quantization groups: per channel over a block's tokens, or per token",
                      choices=("channel", "token"))
    rotate: int = param(64, "channels per Hadamard block, spanning heads when larger than head_dim",
                        choices=(16, 32, 64, 128, 256, 512))
    group: int = param(64, "channels sharing one scale and zero point (per-token groups)", choices=(16, 32, 64))
    center: bool = param(False, "subtract each key channel's calibrated mean before rotating (added back on read)")
    rope: str = param("pre", "where the rotation sits: pre (keys before RoPE, rotation across heads; undone "
                      "per token in the kernel) or post (after RoPE, within each head; the query turned instead)",
                      choices=("pre", "post"), quiet=True)
    perm: torch.Tensor | None = field(default=None, init=False, compare=False, repr=False)  # per layer
    apart: int = field(default=0, init=False, compare=False, repr=False)  # KV heads kept apart (0: not)
    mean: torch.Tensor | None = field(default=None, init=False, compare=False, repr=False)  # (Hkv, D)

    @property
    def pre_rope(self) -> bool:  # the cache un-rotates keys before encoding them
        return self.rope == "pre"

    group_blocks = Int.group_blocks  # attention on the codes: fewer, larger steps

    @functools.cached_property
    def _inverse(self) -> torch.Tensor | None:
        """``rope=pre``: the rotated position of each key channel, int32 (the kernel's gather)."""
        return None if self.perm is None else torch.argsort(self.perm.long()).to(torch.int32)

    @functools.cached_property
    def vperm(self) -> torch.Tensor | None:
        """The values' order: the keys' within each head when the heads are apart, ``(Hkv, D)``
        (derived from ``perm``, not stored); else None (values in their own order)."""
        if not self.apart or self.perm is None:
            return None
        local = self.perm.long().reshape(self.apart, -1)
        return local - torch.arange(self.apart)[:, None] * local.shape[1]

    @functools.cached_property
    def _vinverse(self) -> torch.Tensor | None:
        """``rope=pre``: each value channel's position in its head's stored order, ``(Hkv * D,)``
        int32 (the kernel reads the output rows through it)."""
        return None if self.vperm is None else torch.argsort(self.vperm.long(), dim=1).to(torch.int32).reshape(-1)

    @functools.cached_property
    def _inner(self) -> Int:
        """``rope=post``: how the rotated blocks are stored and attended (made once per codec)."""
        return Int(bits=self.bits, group=self.group)

    def for_layer(self, ctx):
        if self.rope == "post":
            return self._for_layer_post(ctx)
        width = ctx.n_kv * ctx.head_dim
        if width % self.rotate:
            raise KvtierError(f"rotatekv: rotate={self.rotate} must divide n_kv_heads x head_dim = {width}")
        if ctx.stats is None:
            return self
        rms, d = ctx.stats["kpre_rms"].float(), ctx.head_dim  # (Hkv, D) pre-RoPE key channels
        bound = replace(self)
        if d % self.rotate == 0:  # blocks inside a head: each head's keys dealt over its own, values alike
            perm = torch.cat([deal(r, self.rotate) + j * d for j, r in enumerate(rms)])
            object.__setattr__(bound, "apart", len(rms))
        else:  # blocks spanning heads: the keys dealt over all of them
            perm = deal(rms.reshape(-1), self.rotate)
        object.__setattr__(bound, "perm", perm.to(torch.int16))
        if self.center:
            object.__setattr__(bound, "mean", ctx.stats["kpre_mean"].float().contiguous())
        return bound

    def _for_layer_post(self, ctx):
        if ctx.head_dim % self.rotate:
            raise KvtierError(f"rotatekv(rope=post): rotate={self.rotate} must divide the head dimension "
                              f"{ctx.head_dim} (the rotation stays within each head)")
        if self.center:
            raise KvtierError("rotatekv(rope=post) does not take center=true: a key mean after RoPE moves "
                              "with the position")
        if ctx.stats is None:
            return self
        rms = ctx.stats["k_rms"].float()  # (Hkv, D) post-RoPE key channels
        blocks = ctx.head_dim // self.rotate
        order = torch.argsort(rms, dim=1, descending=True)  # per head
        perm = order.reshape(ctx.n_kv, self.rotate, blocks).transpose(1, 2).reshape(ctx.n_kv, -1)
        bound = replace(self)
        object.__setattr__(bound, "perm", perm.to(torch.int16))
        return bound

    def _turn_heads(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``rope=post``: each head's channels reordered and rotated, ``(Hkv, N, D)`` fp32."""
        h, n, d = x.shape
        had = hadamard(self.rotate).to(x.device)
        perm = None if self.perm is None else self.perm.long().to(x.device)[:, None, :].expand(h, n, d)
        if not inverse:
            if perm is not None:
                x = x.gather(2, perm)
            return (x.reshape(h, n, -1, self.rotate) @ had).reshape(h, n, d)
        x = (x.reshape(h, n, -1, self.rotate) @ had).reshape(h, n, d)
        return x if perm is None else torch.empty_like(x).scatter_(2, perm, x)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.perm, self.mean) if t is not None)

    def fields(self, block_size, head_dim):
        if self.rope == "post":
            return self._inner.fields(block_size, head_dim)
        if head_dim % 8 or head_dim % self.group:
            raise KvtierError(f"rotatekv: head dimension {head_dim} must be a multiple of 8 and of group={self.group}")
        packed = head_dim * self.bits // 8
        groups = (block_size, head_dim // self.group)
        scales = (head_dim,) if self.keys == "channel" else groups
        return {"k": ((block_size, packed), torch.uint8),
                "k_scale": (scales, torch.uint8), "k_zero": (scales, torch.int8),
                "v": ((block_size, packed), torch.uint8),
                "v_scale": (groups, torch.uint8), "v_zero": (groups, torch.int8)}

    def turn(self, x: torch.Tensor, inverse: bool = False, reorder: bool = True) -> torch.Tensor:
        """Reorder (keys only: ``reorder``) and rotate a layer's channels: x ``(Hkv, N, D)`` fp32
        -> same shape.

        Exactly invertible (a permutation and an orthogonal, symmetric Hadamard): turn(turn(x),
        inverse=True) == x up to float rounding."""
        h, n, d = x.shape
        flat = x.permute(1, 0, 2).reshape(n, h * d)  # (N, Hkv*D): heads side by side
        had = hadamard(self.rotate).to(x.device)
        perm = None if self.perm is None or not reorder else self.perm.long().to(x.device)
        if not inverse:
            if perm is not None:
                flat = flat[:, perm]
            flat = (flat.reshape(n, -1, self.rotate) @ had).reshape(n, h * d)
        else:
            flat = (flat.reshape(n, -1, self.rotate) @ had).reshape(n, h * d)
            if perm is not None:
                flat = flat[:, torch.argsort(perm)]
        return flat.reshape(n, h, d).permute(1, 0, 2)

    def turn_values(self, v: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Reorder each head's value channels (``vperm``: the keys' order within the head) and
        rotate them by the keys' blocks:
        ``(Hkv, N, D)`` fp32 -> same shape, a head's channels staying in its own blocks."""
        h, n, d = v.shape
        perm = None if self.vperm is None else self.vperm.long().to(v.device)[:, None, :].expand(h, n, d)
        if not inverse:
            return self.turn(v if perm is None else v.gather(2, perm), reorder=False)
        v = self.turn(v, inverse=True, reorder=False)
        return v if perm is None else torch.empty_like(v).scatter_(2, perm, v)

    def _grouped(self, x: torch.Tensor):
        """Per-token quantization of ``(Hkv, n, B, D)`` in groups of ``group`` channels."""
        h, n, b, d = x.shape
        q, sc, zero = quantize(x.reshape(h, n, b, d // self.group, self.group), self.bits, dim=4)
        return pack(q.reshape(h, n, b, d), self.bits), sc.reshape(h, n, b, -1), zero.reshape(h, n, b, -1)

    def _ungrouped(self, data, name):
        q = unpack_float(data[name], self.bits)
        h, n, b, d = q.shape
        sc, zero = data[name + "_scale"].unsqueeze(-1), data[name + "_zero"].unsqueeze(-1)
        return dequantize(q.reshape(h, n, b, -1, self.group), sc, zero).reshape(h, n * b, d)

    def prepare(self, k, v):
        """What gets quantized: keys centred, reordered and rotated; values reordered within each
        head and rotated (:meth:`turn_values`). ``(Hkv, n, B, D)`` -> fp32."""
        h, n, b, d = k.shape
        k = k.float()
        if self.mean is not None:
            k = k - self.mean[:, None, None, :]
        k = self.turn(k.reshape(h, n * b, d)).reshape(h, n, b, d)
        return k, self.turn_values(v.float().reshape(h, n * b, d)).reshape(h, n, b, d)

    def restore(self, k, v, dtype):
        """Inverse of :meth:`prepare` on ``(Hkv, N, D)``."""
        k = self.turn(k, inverse=True)
        if self.mean is not None:
            k = k + self.mean[:, None, :]
        return k.to(dtype), self.turn_values(v, inverse=True).to(dtype)

    def encode(self, k, v):
        if self.rope == "post":
            h, n, b, d = k.shape
            kt = self._turn_heads(k.float().reshape(h, n * b, d)).reshape(h, n, b, d)
            vt = self._turn_heads(v.float().reshape(h, n * b, d)).reshape(h, n, b, d)
            return self._inner.encode(kt, vt)
        k, v = self.prepare(k, v)
        if self.keys == "channel":  # per channel over the block's tokens
            kq, ks, kz = quantize(k, self.bits, dim=2)
            kq, ks, kz = pack(kq, self.bits), ks.squeeze(2), kz.squeeze(2)
        else:
            kq, ks, kz = self._grouped(k)
        vq, vs, vz = self._grouped(v)
        return {"k": kq, "k_scale": ks, "k_zero": kz, "v": vq, "v_scale": vs, "v_zero": vz}

    def attend(self, q, data, rope=None):
        """Softmax pieces on the codes. ``rope=pre``: the native kernel decodes each token of
        every head in registers, rotates it back and applies RoPE (else :meth:`attend_torch`).
        ``rope=post``: the query rotated like the keys, attention on the packed codes, the
        output rotated back: ``q . k = (turn q) . (turn k)`` and ``turn`` is orthogonal."""
        if self.rope != "post":
            if rope is None:  # keys before RoPE need their positions
                return None
            fast = kernels.rotatekv_attend(q, data, rope, self._inverse, self.mean, self.bits, self.group,
                                           self.rotate, self.keys == "channel", self._vinverse)
            return fast if fast is not None else self.attend_torch(q, data, rope)
        pieces = self._inner.attend(self._turn_heads(q.float()).to(q.dtype), data)
        if pieces is None:
            return None
        m, l, o = pieces
        return m, l, self._turn_heads(o.float(), inverse=True)

    def native_job(self, data, rows, rope=None):
        """:meth:`attend` (``rope=pre``) as a job of the batched decode kernel, when the heads are
        apart (rotation blocks inside a head, keys dealt within it): else None."""
        if self.rope != "pre" or rope is None:
            return None
        return kernels.rotatekv_job(data, rope, self._inverse, self.mean, self.bits, self.group, self.rotate,
                                    self.keys == "channel", self._vinverse, rows)

    def attend_torch(self, q, data, rope):
        """The reference of the kernel (``rope=pre``): the blocks decoded and rotated back, the
        keys turned by RoPE at their positions, softmax pieces in fp32."""
        return rope_pieces(q, *self.decode(data, torch.float32), rope)

    def decode(self, data, dtype):
        if self.rope == "post":
            k, v = self._inner.decode(data, torch.float32)
            return self._turn_heads(k, inverse=True).to(dtype), self._turn_heads(v, inverse=True).to(dtype)
        if self.keys == "channel":
            kq = unpack_float(data["k"], self.bits)  # (Hkv, n, B, D)
            h, n, b, d = kq.shape
            k = dequantize(kq, data["k_scale"].unsqueeze(2), data["k_zero"].unsqueeze(2)).reshape(h, n * b, d)
        else:
            k = self._ungrouped(data, "k")
        return self.restore(k, self._ungrouped(data, "v"), dtype)
