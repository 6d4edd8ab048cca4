"""The objects every weight format provides: a :class:`Linear` per matrix, a :class:`Format`
that makes them."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F


def is_matrix(name: str, w: torch.Tensor) -> bool:
    """A weight a format packs: a 2-D matrix (projections, embeddings), not a norm's vector."""
    return w.dim() == 2 and "norm" not in name


class Linear(ABC):
    """One weight matrix ``W (N, K)``, however it is held.

    ``lin(x, bias)``: ``x (M, K) -> (M, N)`` in ``x``'s dtype; ``lin.rows(ids)``: rows of W as an
    embedding table, ``(len(ids), K)`` in the compute dtype; ``lin.dense()``: W in fp32 (the
    reference every packed format is tested against); ``lin.nbytes``: bytes held.
    """

    shape: tuple[int, int]
    dtype: torch.dtype  # the compute dtype

    @abstractmethod
    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x (M, K) -> (M, N)``."""

    @abstractmethod
    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of W."""

    @abstractmethod
    def dense(self) -> torch.Tensor:
        """W in fp32."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held."""

    @classmethod
    @abstractmethod
    def cat(cls, parts: list[Linear]) -> Linear:
        """Matrices stacked along their output rows."""


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


class Format(ABC):
    """How a format packs one matrix. ``raw``: the GGUF's own packed tensor of that name when
    the model came from one (a :class:`~kvtier.weights.quant.GroupQuant`), else None."""

    name: str
    help: str

    @abstractmethod
    def pack(self, name: str, w: torch.Tensor, raw, dtype: torch.dtype) -> Linear:
        """``w`` (float, ``(N, K)``) as this format's :class:`Linear`."""

    def finish(self, model) -> None:
        """After the model is built (its tokenizer and key set): a format that depends on the
        model's activations (``w8a8``) measures them here and packs its matrices for them."""
