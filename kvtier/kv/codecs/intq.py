"""``int``: KIVI-style asymmetric integer quantization of the KV cache.

Keys are quantized per channel over the tokens of a block (key outliers live in fixed
channels); values per token over groups of ``group`` channels. Each group stores a scale and a
zero point (fp16); codes are bit-packed, ``8 // bits`` per byte. The newest tokens stay in the
full-precision residual block until their block fills (KIVI's residual).

Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", 2024,
https://arxiv.org/abs/2402.02750
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.errors import KvtierError
from kvtier.kv.codecs.base import Codec
from kvtier.kv.codecs.packing import pack, unpack_float
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
class Int(Codec):
    """KIVI-style asymmetric int-k: keys per channel over the block, values per token over channel groups."""

    name = "int"
    bits: int = param(4, "bits per key/value element", choices=(2, 4, 8))
    group: int = param(64, "channels per value quantization group (divides head_dim)", min=8, max=1024)

    def fields(self, block_size, head_dim):
        if head_dim % self.group:
            raise KvtierError(f"int: group={self.group} must divide the head dimension {head_dim}")
        packed = head_dim * self.bits // 8
        return {"k": ((block_size, packed), torch.uint8),
                "k_scale": ((head_dim,), torch.float16), "k_zero": ((head_dim,), torch.float16),
                "v": ((block_size, packed), torch.uint8),
                "v_scale": ((block_size, head_dim // self.group), torch.float16),
                "v_zero": ((block_size, head_dim // self.group), torch.float16)}

    def encode(self, k, v):
        h, n, b, d = k.shape
        kq, ks, kz = quantize(k.float(), self.bits, dim=2)  # per channel, over the block's tokens
        vq, vs, vz = quantize(v.float().reshape(h, n, b, d // self.group, self.group), self.bits, dim=4)
        return {"k": pack(kq, self.bits), "k_scale": ks.squeeze(2), "k_zero": kz.squeeze(2),
                "v": pack(vq.reshape(h, n, b, d), self.bits),
                "v_scale": vs.squeeze(4), "v_zero": vz.squeeze(4)}

    def decode(self, data, dtype):
        kq = unpack_float(data["k"], self.bits)  # (Hkv, n, B, D)
        h, n, b, d = kq.shape
        k = torch.addcmul(data["k_zero"].unsqueeze(2).float(), kq, data["k_scale"].unsqueeze(2).float())
        vq = unpack_float(data["v"], self.bits).reshape(h, n, b, d // self.group, self.group)
        v = torch.addcmul(data["v_zero"].unsqueeze(-1).float(), vq, data["v_scale"].unsqueeze(-1).float())
        return k.reshape(h, n * b, d).to(dtype), v.reshape(h, n * b, d).to(dtype)
