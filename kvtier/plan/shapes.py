"""A model's shape, as the cost model needs it: read from a local model's config (no weights
are loaded) or one of the named shapes of larger models the simulation can plan for."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvtier.errors import KvtierError


@dataclass(frozen=True)
class Shape:
    """Layers, heads and widths of a decoder; ``windows[i]``: layer i's sliding window or None;
    ``tied``: the output projection is the embedding table."""

    name: str
    family: str  # a model family kvtier runs: llama or gemma3
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv: int
    head_dim: int
    vocab: int
    windows: tuple
    tied: bool
    max_context: int

    def matrices(self) -> dict[str, tuple[int, int]]:
        """``(N, K)`` of each weight matrix of one layer, as kvtier holds them (q/k/v fused and
        gate/up fused, as the forward calls them)."""
        d, h = self.head_dim, self.hidden
        return {"qkv_proj": ((self.n_heads + 2 * self.n_kv) * d, h), "o_proj": (h, self.n_heads * d),
                "gate_up_proj": (2 * self.intermediate, h), "down_proj": (h, self.intermediate)}


# Shapes of larger models for planning (no weights needed): Llama-3 8B and 70B.
NAMED = {
    "llama3-8b": Shape("llama3-8b", "llama", 32, 4096, 14336, 32, 8, 128, 128256, (None,) * 32, False, 131072),
    "llama3-70b": Shape("llama3-70b", "llama", 80, 8192, 28672, 64, 8, 128, 128256, (None,) * 80, False, 131072),
}


def from_config(name: str, c) -> Shape:
    family = "gemma3" if c.model_type.startswith("gemma3") else "llama"
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n = c.num_hidden_layers
    if family == "gemma3":
        windows = tuple(c.sliding_window if t == "sliding_attention" else None for t in c.layer_types)
    elif getattr(c, "use_sliding_window", False):
        windows = (c.sliding_window,) * n
    else:
        windows = (None,) * n
    tied = bool(getattr(c, "tie_word_embeddings", False))
    return Shape(name, family, n, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                 c.num_key_value_heads, head_dim, c.vocab_size, windows, tied, c.max_position_embeddings)


@functools.cache
def shape(model: str) -> Shape:
    """The shape of ``model``: a named shape (``llama3-8b``, ``llama3-70b``) or a model kvtier
    can load (its config only)."""
    if model in NAMED:
        return NAMED[model]
    from transformers import AutoConfig

    from kvtier.models.loader import resolve

    try:
        folder = resolve(model)
    except KvtierError as e:
        raise KvtierError(f"{e} (or plan for a named shape: {', '.join(NAMED)})") from None
    c = AutoConfig.from_pretrained(folder)
    c = getattr(c, "text_config", None) or c
    return from_config(model, c)


@functools.cache
def row_bytes(fmt: str, k: int, dtype: torch.dtype) -> float:
    """Bytes one row of ``k`` weights takes in weight format ``fmt``: a small matrix packed by
    the format itself, so its scales and group layout are counted as the model holds them."""
    from kvtier import weights

    rows = 32
    lin = weights.get(fmt).pack("probe.weight", torch.randn(rows, k), None, dtype)
    return lin.nbytes / rows
