"""The objects every weight format provides: a :class:`Linear` per matrix, a :class:`Format`
that makes them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def is_matrix(name: str, w: torch.Tensor) -> bool:
    """A weight a format packs: a 2-D matrix (projections, embeddings), not a norm's vector."""
    return w.dim() == 2 and "norm" not in name


class Linear:
    """One weight matrix ``W (N, K)``, however it is held.

    ``lin(x, bias)``: ``x (M, K) -> (M, N)`` in ``x``'s dtype; ``lin.rows(ids)``: rows of W as an
    embedding table, ``(len(ids), K)`` in the compute dtype; ``lin.dense()``: W in fp32 (the
    reference every packed format is tested against); ``lin.nbytes``: bytes held.
    """

    shape: tuple[int, int]
    dtype: torch.dtype  # the compute dtype

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    @classmethod
    def cat(cls, parts: list[Linear]) -> Linear:
        raise NotImplementedError


class Dense(Linear):
    """A plain tensor in the compute dtype (``--weights dense``, kvtier's behaviour before
    packed formats)."""

    def __init__(self, w: torch.Tensor):
        self.w = w
        self.shape, self.dtype = tuple(w.shape), w.dtype

    def __call__(self, x, bias=None):
        return F.linear(x, self.w, bias)

    def rows(self, ids):
        return F.embedding(ids, self.w)

    def dense(self):
        return self.w.float()

    @property
    def nbytes(self):
        return self.w.numel() * self.w.element_size()

    @classmethod
    def cat(cls, parts):
        return cls(torch.cat([p.w for p in parts]))


class Format:
    """How a format packs one matrix. ``raw``: the GGUF's own packed tensor of that name when
    the model came from one (a :class:`~kvtier.weights.quant.GroupQuant`), else None."""

    name: str
    help: str

    def pack(self, name: str, w: torch.Tensor, raw, dtype: torch.dtype) -> Linear:
        raise NotImplementedError
