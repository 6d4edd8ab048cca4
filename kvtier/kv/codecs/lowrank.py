"""``lowrank``: SVDQuant's split applied to the KV cache, a low-rank part plus a 4-bit residual.

Per block of B tokens and per KV head, the block ``X (B, D)`` is split into its best rank-r
approximation ``L R`` (truncated SVD: ``L = U_r S_r (B, r)``, ``R = V_r^T (r, D)``, both stored
in fp16) and the remainder ``X - L R``, quantized per token to ``bits``-bit integers with
:func:`kvtier.kv.codecs.intq.quantize` (an fp16 scale and zero point per token, over the whole
head). The low-rank part absorbs what the outliers have in common (the large, slowly varying
outlier channels of the keys, a shared offset of the values), so the remainder quantizes
with a small range. The remainder is computed against the fp16-rounded factors, so the
decoder sees exactly what the encoder quantized.

SVDQuant takes the low-rank branch from the weights, offline; a KV cache has no weights and
the calibration statistics hold only per-channel magnitudes, not a basis, so the basis is
computed per block and its cost is paid per block: ``2 * r * (B + D)`` bytes per block and head.

Bytes per token and KV head (keys and values each): ``D * bits / 8`` codes + 4 (scale, zero)
+ ``2 * r * (B + D) / B`` (factors); with B = D = 64, bits=4 and rank=1: 32 + 4 + 4 = 40
bytes, i.e. 80 bytes for keys and values, 5.0 bits per element. The first ``sinks`` tokens
(attention sinks) are kept unencoded by the cache.

Measured on SmolLM2-135M (``kvtier bench ppl``, 2K context, 2 windows; KL of the next-token
distribution to the fp32 cache's): +0.61 % PPL, KL 0.0078; without sinks -0.11 % PPL but
KL 0.0147 (the PPL of 512 tokens moves by ~1 % by chance; KL does not); int(bits=4), at
4.5 bits: +1.38 %, KL 0.0144. Variants tried (attention-output error, 2K tokens of every
layer): the rank-1 part lowers the values' error by a fifth (0.100 -> 0.078), rank 2 gains
little more for 0.5 bit; per-channel remainders for the keys, or keeping the top-r
calibrated channels in fp16 instead of a per-block basis, did no better.

Attention runs on the codes in a native kernel (``kernels/lrattn.c``): a score is
``scale * (q . code) + zero * sum(q) + left . (right q)``, with ``right q`` once per block, and
the output gains ``(sum of p * left) @ right`` once per block.

Paper: Li et al., "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion
Models", ICLR 2025, https://arxiv.org/abs/2411.05007
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier import kernels
from kvtier.errors import KvtierError
from kvtier.kv.codecs.base import Codec, plain_pieces
from kvtier.kv.codecs.intq import quantize
from kvtier.kv.codecs.packing import pack, unpack_float
from kvtier.registry import param, register


@register
@dataclass(frozen=True)
class LowRank(Codec):
    """SVDQuant-style: a per-block rank-r fp16 part absorbs outliers, the remainder is int-k per token."""

    name = "lowrank"
    group_blocks = 64  # attention on the codes: fewer, larger steps
    rank: int = param(1, "rank of the fp16 low-rank part of each block and head", min=1, max=16)
    bits: int = param(4, "bits per remainder element", choices=(2, 4, 8))
    sinks: int = param(4, "first tokens kept in full precision (attention sinks)", min=0, max=64)

    def fields(self, block_size, head_dim):
        if self.rank > min(block_size, head_dim):
            raise KvtierError(f"lowrank: rank={self.rank} exceeds the block ({block_size} tokens "
                              f"x {head_dim} channels)")
        r = self.rank
        shapes = {"q": ((block_size, head_dim * self.bits // 8), torch.uint8),
                  "scale": ((block_size, 1), torch.float16), "zero": ((block_size, 1), torch.float16),
                  "left": ((block_size, r), torch.float16), "right": ((r, head_dim), torch.float16)}
        return {f"{x}_{f}": spec for x in "kv" for f, spec in shapes.items()}

    def encode(self, k, v):
        out = {}
        for name, x in (("k", k), ("v", v)):
            x = x.float()
            u, s, vh = torch.linalg.svd(x, full_matrices=False)  # (h, n, B, D), (h, n, D), (h, n, D, D)
            left = (u[..., :self.rank] * s[..., None, :self.rank]).half()  # (h, n, B, r)
            right = vh[..., :self.rank, :].half()                           # (h, n, r, D)
            rest = x - left.float() @ right.float()
            q, scale, zero = quantize(rest, self.bits, dim=-1)              # per token
            out.update({f"{name}_q": pack(q, self.bits), f"{name}_scale": scale, f"{name}_zero": zero,
                        f"{name}_left": left, f"{name}_right": right})
        return out

    def decode(self, data, dtype):
        out = []
        for name in "kv":
            q = unpack_float(data[f"{name}_q"], self.bits)  # (h, n, B, D)
            rest = torch.addcmul(data[f"{name}_zero"].float(), q, data[f"{name}_scale"].float())
            x = torch.baddbmm(rest.flatten(0, 1), data[f"{name}_left"].float().flatten(0, 1),
                              data[f"{name}_right"].float().flatten(0, 1))
            h, n, b, d = q.shape
            out.append(x.reshape(h, n * b, d).to(dtype))
        return out[0], out[1]

    def attend(self, q, data, rope=None):
        """Softmax pieces on the codes in the native kernel (kernels/lrattn.c: the low-rank part
        applied to the query and the output, never expanded), or None (no kernel: decoded)."""
        return kernels.lowrank_attend(q, data, self.bits, self.rank)

    def native_job(self, data, rows, rope=None):
        """:meth:`attend` as a job of the batched decode kernel."""
        return kernels.lowrank_job(data, self.bits, self.rank, rows)

    def attend_torch(self, q, data):
        """The reference of the kernel: the blocks decoded, softmax pieces in fp32."""
        return plain_pieces(q, *self.decode(data, torch.float32))
