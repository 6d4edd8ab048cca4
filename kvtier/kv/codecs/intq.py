"""``int``: KIVI-style asymmetric integer quantization of the KV cache.

Keys are quantized per channel over the tokens of a block (key outliers live in fixed
channels); values per token over groups of ``group`` channels. Each group stores a scale and a
zero point (fp16); codes are bit-packed in planes (:mod:`~kvtier.kv.codecs.packing`). The newest
tokens stay in full precision: the residual block plus ``residual`` more (KIVI's residual).

Attention runs on the packed codes (2, 4 and 8 bits): a key block's per-channel scales fold
into the query, its zero points into one dot product per block, and a value's per-token scale
into the attention weights, so each step only shifts, masks and converts the codes. Key codes
are stored channel-major within a block (``(packed, B)``: one byte row per channel pair/quad
for all B tokens), so the native kernel (:mod:`kvtier.kernels`) accumulates the scores of a
block's tokens in vector registers; :meth:`Int.attend_torch` is the same computation in PyTorch.

Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", 2024,
https://arxiv.org/abs/2402.02750
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier import kernels
from kvtier.errors import KvtierError
from kvtier.kv.codecs.base import Codec, SlidingResidual
from kvtier.kv.codecs.packing import pack, plane, planes, unpack_float
from kvtier.registry import param, register


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of ``x`` with one (scale, zero) per slice along ``dim``.

    Returns integer codes (uint8, same shape as x) and fp16 scale and zero (``dim`` kept, size 1).
    """
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2 ** bits - 1)).half()
    zero = lo.half()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
    q = ((x - zero.float()) / safe).round_().clamp_(0, 2 ** bits - 1)
    return q.to(torch.uint8), scale, zero


@register
@dataclass(frozen=True)
class Int(SlidingResidual, Codec):
    """KIVI-style asymmetric int-k: keys per channel over the block, values per token over channel groups."""

    name = "int"
    width = "bits"  # bits per element (mixed)
    group_blocks = 64  # attention on packed codes: fewer, larger steps
    bits: int = param(4, "bits per key/value element", choices=(2, 3, 4, 8))
    group: int = param(64, "channels per value quantization group (divides head_dim)", min=8, max=1024)
    residual: int = param(0, "newest tokens kept in full precision beyond the residual block", min=0, max=4096)

    def fields(self, block_size, head_dim):
        if head_dim % self.group or head_dim % 8:
            raise KvtierError(f"int: group={self.group} must divide the head dimension {head_dim}")
        packed = head_dim * self.bits // 8
        return {"k": ((packed, block_size), torch.uint8),  # channel-major: see attend
                "k_scale": ((head_dim,), torch.float16), "k_zero": ((head_dim,), torch.float16),
                "v": ((block_size, packed), torch.uint8),
                "v_scale": ((block_size, head_dim // self.group), torch.float16),
                "v_zero": ((block_size, head_dim // self.group), torch.float16)}

    def encode(self, k, v):
        fast = kernels.int_encode(k, v, self.bits, self.group)  # the same bytes, natively
        return fast if fast is not None else self.encode_torch(k, v)

    def encode_torch(self, k, v):
        """The PyTorch path of :meth:`encode` (no compiler, 3 bits, or kernels turned off)."""
        h, n, b, d = k.shape
        kq, ks, kz = quantize(k.float(), self.bits, dim=2)  # per channel, over the block's tokens
        vq, vs, vz = quantize(v.float().reshape(h, n, b, d // self.group, self.group), self.bits, dim=4)
        return {"k": pack(kq, self.bits).transpose(-1, -2).contiguous(), "k_scale": ks.squeeze(2), "k_zero": kz.squeeze(2),
                "v": pack(vq.reshape(h, n, b, d), self.bits),
                "v_scale": vs.squeeze(4), "v_zero": vz.squeeze(4)}

    def decode(self, data, dtype):
        fast = kernels.int_decode(data, self.bits, self.group, dtype) if self.bits != 3 else None
        return fast if fast is not None else self.decode_torch(data, dtype)

    def decode_torch(self, data, dtype):
        """The PyTorch path of :meth:`decode` (the native decoder's oracle)."""
        kq = unpack_float(data["k"].transpose(-1, -2), self.bits)  # (Hkv, n, B, D)
        h, n, b, d = kq.shape
        k = torch.addcmul(data["k_zero"].unsqueeze(2).float(), kq, data["k_scale"].unsqueeze(2).float())
        vq = unpack_float(data["v"], self.bits).reshape(h, n, b, d // self.group, self.group)
        v = torch.addcmul(data["v_zero"].unsqueeze(-1).float(), vq, data["v_scale"].unsqueeze(-1).float())
        return k.reshape(h, n * b, d).to(dtype), v.reshape(h, n * b, d).to(dtype)

    def attend(self, q, data, rope=None):
        if self.bits == 3:
            return None
        fast = kernels.int_attend(q, data, self.bits, self.group)
        return fast if fast is not None else self.attend_torch(q, data)

    def attend_torch(self, q, data):
        """The PyTorch path of :meth:`attend` (no compiler, or kernels turned off)."""
        h, n, m, b = data["k"].shape  # m packed bytes per token = D / planes
        p_count = planes(self.bits)
        d, dt = m * p_count, q.dtype
        # codes are centred (c - mid) so that the two terms below do not cancel in bf16:
        # keys: s[r, t] = sum_c (q[r, c] * scale[c]) * (code[t, c] - mid) + sum_c q[r, c] * centre[c]
        mid = (2 ** self.bits - 1) / 2
        qf = q.float().unsqueeze(1)                              # (h, 1, R, D)
        ks = data["k_scale"].float().unsqueeze(2)                # (h, n, 1, D)
        qs = (qf * ks).to(dt)                                    # (h, n, R, D)
        s = (qf * (data["k_zero"].float().unsqueeze(2) + mid * ks)).sum(-1, keepdim=True)  # (h, n, R, 1)
        for i in range(p_count):
            codes = plane(data["k"], self.bits, i).to(dt) - mid   # (h, n, m, B)
            s = s + torch.matmul(qs[..., i * m:(i + 1) * m], codes).float()
        s = s.permute(0, 2, 1, 3).reshape(h, q.shape[1], n * b)   # (h, R, n*B)
        top = s.amax(-1, keepdim=True)
        p = torch.exp(s - top)
        # values: o[r, c] = sum_t (p[r, t] * scale[t, g(c)]) * code[t, c] + sum_t p[r, t] * zero[t, g(c)]
        vs = data["v_scale"].float().reshape(h, 1, n * b, -1)      # (h, 1, N, groups)
        vz = data["v_zero"].float().reshape(h, n * b, -1) + mid * vs[:, 0]  # (h, N, groups)
        pw = (p.unsqueeze(-1) * vs).to(dt)                         # (h, R, N, groups)
        g = self.group
        out = []
        for i in range(p_count):
            codes = (plane(data["v"], self.bits, i).to(dt) - mid).reshape(h, n * b, m)
            for j in range(0, m, g) if g <= m else [0]:
                grp = (i * m + j) // g
                out.append(torch.matmul(pw[..., grp], codes[..., j:j + min(g, m)]))
        o = torch.cat(out, -1).float()                             # (h, R, D)
        zero = torch.matmul(p, vz)                                 # (h, R, groups)
        o = o + zero.repeat_interleave(g, -1)[..., :d] if g < d else o + zero
        return top, p.sum(-1, keepdim=True), o
