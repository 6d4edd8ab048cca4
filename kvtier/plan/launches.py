"""How many operations kvtier dispatches per decode step: counted on kvtier's own code, not
guessed.

A tiny random model of the same family, with the planned model's heads and head size (so the
same attention paths are taken) but narrow matrices, decodes one step under a dispatch counter
(every ATen operation the step runs, plus each native-kernel call counts once). Five such steps
at different layer counts, batch sizes and context lengths solve for the counts the cost model
multiplies by the probe's per-launch time:

``ops = base + B * per_seq + L * (per_layer + B * (per_seq_layer + G * per_group))``

where L is the layer count, B the batch and G the 1,024-token groups each layer's attention
decodes (``Codec.group_blocks`` blocks of ``block_size`` tokens).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvtier.plan.shapes import Shape


@dataclass(frozen=True)
class Launches:
    """Operations per decode step, by where they come from (see the module docstring)."""

    base: float
    per_seq: float
    per_layer: float
    per_seq_layer: float
    per_group: float

    def step(self, layers: int, batch: int, groups_per_layer: list[float]) -> float:
        """Operations of one decode step; ``groups_per_layer``: groups each layer attends."""
        g = sum(groups_per_layer)
        return (self.base + batch * self.per_seq + layers * (self.per_layer + batch * self.per_seq_layer)
                + batch * g * self.per_group)


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _native(on: bool):
    """Native kernels on (as on a CPU) or off (the PyTorch path a GPU runs)."""
    from kvtier import kernels

    if on:
        yield
        return
    saved = kernels.library
    kernels.library = lambda: None
    try:
        yield
    finally:
        kernels.library = saved


def tiny(shape: Shape, layers: int, dtype: torch.dtype):
    """A random model of ``shape``'s family and heads, ``layers`` layers, narrow matrices."""
    from transformers import Gemma3TextConfig, LlamaConfig

    from kvtier.models.gemma3 import Gemma3
    from kvtier.models.llama import Llama

    h = 8 * shape.n_heads  # narrow, a multiple of the head count (as transformers asks)
    common = dict(vocab_size=128, hidden_size=h, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv, head_dim=shape.head_dim,
                  max_position_embeddings=1 << 20)
    if shape.family == "gemma3":
        c = Gemma3TextConfig(**common, query_pre_attn_scalar=shape.head_dim, sliding_window=1 << 19,
                             layer_types=["full_attention"] * layers)
        cls = Gemma3
    else:
        c, cls = LlamaConfig(**common), Llama
    g = torch.Generator().manual_seed(0)
    d, hq, hkv = shape.head_dim, shape.n_heads, shape.n_kv

    def w(*s):
        return (torch.randn(*s, generator=g) * 0.05).to(dtype)

    weights = {"model.embed_tokens.weight": w(128, h), "model.norm.weight": w(h) + 1, "lm_head.weight": w(128, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights |= {p + "self_attn.q_proj.weight": w(hq * d, h), p + "self_attn.k_proj.weight": w(hkv * d, h),
                    p + "self_attn.v_proj.weight": w(hkv * d, h), p + "self_attn.o_proj.weight": w(h, hq * d),
                    p + "mlp.gate_proj.weight": w(64, h), p + "mlp.up_proj.weight": w(64, h),
                    p + "mlp.down_proj.weight": w(h, 64)}
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            weights[p + n + ".weight"] = w(h) + 1
        if shape.family == "gemma3":
            weights[p + "self_attn.q_norm.weight"] = w(d) + 1
            weights[p + "self_attn.k_norm.weight"] = w(d) + 1
    return cls(c, weights)


def _one(shape: Shape, kv: str, layers: int, batch: int, groups: int, dtype, native: bool) -> int:
    from kvtier.engine import ModelRunner, sample
    from kvtier.spec import parse

    model = tiny(shape, layers, dtype)
    runner = ModelRunner(model, kv)
    span = min(parse(kv).codec.group_blocks, 64) * runner.block_size  # dense: one run whatever its length
    context = groups * span + runner.block_size // 2  # whole groups plus a partial residual block
    g = torch.Generator().manual_seed(1)
    caches = [runner.new_cache(reserve=context + 4) for _ in range(batch)]
    for cache in caches:  # random keys/values appended directly: no prefill needed to count a step
        for layer in cache.layers:
            k, v = (torch.randn(shape.n_kv, context, shape.head_dim, generator=g).to(dtype) for _ in "kv")
            layer.append(k, v)
    with _native(native):
        toks = sample(runner.feed(caches, [[1]] * batch))  # warm: first-use paths
        counter = _Counter()
        with counter:
            sample(runner.feed(caches, [[int(t)] for t in toks]))
    for c in caches:
        c.close()
    return counter.n


@functools.cache
def count(shape: Shape, kv: str, dtype: torch.dtype = torch.bfloat16, native: bool = True) -> Launches:
    """The :class:`Launches` of ``kv`` on ``shape``'s family (cached per process)."""
    r = {key: _one(shape, kv, *key, dtype, native) for key in
         [(1, 1, 1), (2, 1, 1), (2, 1, 3), (2, 2, 1), (1, 2, 1)]}
    # r(L, B, G) = base + B*ps + L*(pl + B*(psl + G*pg))
    pg = (r[2, 1, 3] - r[2, 1, 1]) / (2 * 2)
    psl_pg = (r[2, 2, 1] - r[1, 2, 1] - (r[2, 1, 1] - r[1, 1, 1]))  # = psl + pg (per extra seq per layer)
    pl_1 = r[2, 1, 1] - r[1, 1, 1]  # = pl + psl + pg
    pl = pl_1 - psl_pg
    psl = psl_pg - pg
    ps = r[1, 2, 1] - r[1, 1, 1] - psl_pg
    base = r[1, 1, 1] - ps - pl_1
    return Launches(base=base, per_seq=ps, per_layer=pl, per_seq_layer=psl, per_group=pg)
