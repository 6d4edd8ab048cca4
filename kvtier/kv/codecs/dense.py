"""``dense``: keys and values stored uncompressed in fp32, fp16 or bf16."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.dtypes import DTYPES
from kvtier.kv.codecs.base import Codec
from kvtier.registry import param, register


@register
@dataclass(frozen=True)
class Dense(Codec):
    """Uncompressed KV cache in the given storage dtype (the baseline every method is measured against)."""

    name = "dense"
    group_blocks = 1 << 30  # nothing to decode: attention reads the pool as one view
    plain_dtype = None  # the newest tokens stay in the compute dtype
    dtype: str = param("bf16", "storage dtype of keys and values", choices=tuple(DTYPES))

    def fields(self, block_size, head_dim):
        shape = (block_size, head_dim)
        return {"k": (shape, DTYPES[self.dtype]), "v": (shape, DTYPES[self.dtype])}

    def encode(self, k, v):
        return {"k": k.to(DTYPES[self.dtype]), "v": v.to(DTYPES[self.dtype])}

    def decode(self, data, dtype):
        k, v = data["k"], data["v"]  # (Hkv, n, B, D)
        h, n, b, d = k.shape
        return k.reshape(h, n * b, d).to(dtype), v.reshape(h, n * b, d).to(dtype)
