"""Weight formats: how a model's matrices are held in memory and multiplied.

One file per format, registered by name (``dense``, ``q8``, ``q4``, ``w8a8``, ``w4a8``, ``w4a4``); ``--weights NAME`` picks
one for every matrix of the model. A format turns a float matrix (and, when the model came
from a GGUF, the file's own packed tensor) into a :class:`~kvtier.weights.base.Linear`, the one
object the model families call: ``lin(x)``, ``lin.rows(ids)`` for embeddings, ``lin.nbytes``.
"""

from __future__ import annotations

import torch

from kvtier.errors import KvtierError
from kvtier.weights.base import Dense, Format, Linear, is_matrix

_FORMATS: dict[str, type[Format]] = {}


def register(cls: type[Format]) -> type[Format]:
    assert cls.name not in _FORMATS, f"weight format {cls.name!r} registered twice"
    _FORMATS[cls.name] = cls
    return cls


def formats() -> dict[str, type[Format]]:
    """Every registered format, by name."""
    from kvtier.weights import dense, q4, q8, w4a, w8a8  # noqa: F401  (register on import)
    return dict(_FORMATS)


def get(name: str) -> Format:
    found = formats().get(name)
    if found is None:
        raise KvtierError(f"--weights {name!r}: use one of {', '.join(formats())}")
    return found()


def pack(weights: dict[str, torch.Tensor | Linear], fmt: str = "dense", raw: dict | None = None,
         dtype: torch.dtype | None = None) -> dict[str, torch.Tensor | Linear]:
    """Every matrix of ``weights`` as a :class:`Linear` in format ``fmt``; norms, biases and
    other vectors stay tensors. ``raw``: packed tensors read from the model's GGUF, by name,
    which a format may keep as they are. ``dtype``: the compute dtype (default: the weights')."""
    f = get(fmt)
    out: dict[str, torch.Tensor | Linear] = {}
    for name, w in weights.items():
        if isinstance(w, Linear) or not is_matrix(name, w):
            out[name] = w
        else:
            out[name] = f.pack(name, w, (raw or {}).get(name), dtype or w.dtype)
    return out


def cat(parts: list[torch.Tensor | Linear]) -> torch.Tensor | Linear:
    """Matrices stacked along their output rows (fusing q/k/v or gate/up into one matmul)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    return type(parts[0]).cat(parts)


__all__ = ["Dense", "Format", "Linear", "cat", "formats", "get", "pack", "register"]
