"""``sparse``: Mustafar — per-token magnitude pruning of keys and values, stored as a bitmap
plus the packed non-zeros; attention runs on that form."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtier import kernels
from kvtier.dtypes import DTYPES
from kvtier.errors import KvtierError
from kvtier.kv.codecs.base import Codec
from kvtier.kv.codecs.packing import pack, unpack
from kvtier.registry import param, register


@register
@dataclass(frozen=True)
class Sparse(Codec):
    """Mustafar: keep each token's largest-magnitude channels of K and V (bitmap + packed non-zeros)."""

    name = "sparse"
    group_blocks = 64  # attention on the sparse form: fewer, larger steps
    ratio: float = param(0.5, "fraction of each token's channels pruned", min=0.0, max=0.95)
    dtype: str = param("fp16", "storage dtype of the kept values", choices=("fp16", "bf16"))
    sinks: int = param(4, "first tokens kept dense (attention sinks)", min=0)

    def kept(self, head_dim: int) -> int:
        return max(1, math.ceil((1 - self.ratio) * head_dim))

    def fields(self, block_size, head_dim):
        if head_dim % 8:
            raise KvtierError(f"sparse: head_dim {head_dim} must be a multiple of 8 (one bitmap byte per 8 channels)")
        nnz, vt = self.kept(head_dim), DTYPES[self.dtype]
        return {"k_map": ((block_size, head_dim // 8), torch.uint8), "k_val": ((block_size, nnz), vt),
                "v_map": ((block_size, head_dim // 8), torch.uint8), "v_val": ((block_size, nnz), vt)}

    def _prune(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``(..., D)`` -> bitmap ``(..., D/8)`` and the kept values ``(..., nnz)`` in channel order."""
        nnz = self.kept(x.shape[-1])
        idx = x.abs().topk(nnz, dim=-1).indices.sort(-1).values
        mask = torch.zeros(x.shape, dtype=torch.uint8, device=x.device).scatter_(-1, idx, 1)
        return pack(mask, 1), x.gather(-1, idx).to(DTYPES[self.dtype])

    def encode(self, k, v):
        k_map, k_val = self._prune(k)
        v_map, v_val = self._prune(v)
        return {"k_map": k_map, "k_val": k_val, "v_map": v_map, "v_val": v_val}

    @staticmethod
    def _index(bitmap: torch.Tensor, nnz: int) -> torch.Tensor:
        """Channel index of each kept value: bitmap ``(..., D/8)`` -> ``(..., nnz)``."""
        mask = unpack(bitmap, 1)  # (..., D), 0/1
        # every row has exactly nnz ones: their positions, in order
        return (mask.to(torch.int16) * 2 - 1).topk(nnz, dim=-1, sorted=False).indices.sort(-1).values

    def _dense(self, bitmap, val, dtype):
        h, n, b, _ = val.shape
        d = bitmap.shape[-1] * 8
        idx = self._index(bitmap, val.shape[-1])
        out = torch.zeros((h, n, b, d), dtype=dtype, device=val.device)
        return out.scatter_(-1, idx, val.to(dtype)).reshape(h, n * b, d)

    def decode(self, data, dtype):
        return self._dense(data["k_map"], data["k_val"], dtype), self._dense(data["v_map"], data["v_val"], dtype)

    def attend(self, q, data, rope=None):
        """Scores from the kept key values only, the output scattered from the kept value
        values: the dense K and V are never formed. The native kernel (kernels/spattn.c)
        walks each row's bitmap; without it, :meth:`attend_torch`."""
        fast = kernels.sparse_attend(q, data)
        return fast if fast is not None else self.attend_torch(q, data)

    def native_job(self, data, rows, rope=None):
        """:meth:`attend` as a job of the batched decode kernel."""
        return kernels.sparse_job(data, rows)

    def attend_torch(self, q, data):
        """The same on the sparse form in PyTorch: the query gathered at each row's kept
        channels, the weighted kept values scattered back."""
        k_val, v_val = data["k_val"], data["v_val"]
        h, n, b, nnz = k_val.shape
        d = data["k_map"].shape[-1] * 8
        kidx = self._index(data["k_map"], nnz).long()  # (h, n, b, nnz)
        qg = torch.gather(q.float()[:, :, None, :].expand(-1, -1, n * b, -1), -1,
                          kidx.reshape(h, 1, n * b, nnz).expand(-1, q.shape[1], -1, -1))  # (h, R, T, nnz)
        s = (qg * k_val.float().reshape(h, 1, n * b, nnz)).sum(-1)  # (h, R, T)
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s - m)
        vidx = self._index(data["v_map"], nnz).reshape(h, n * b * nnz).long()
        w = p[..., None] * v_val.float().reshape(h, 1, n * b, nnz)  # (h, R, T, nnz)
        o = torch.zeros((h, q.shape[1], d), device=q.device)
        o.scatter_add_(-1, vidx[:, None].expand(-1, q.shape[1], -1), w.reshape(h, q.shape[1], -1))
        return m, p.sum(-1, keepdim=True), o
