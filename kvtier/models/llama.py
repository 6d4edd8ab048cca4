"""Llama family forward in plain PyTorch: Llama 2/3, SmolLM2, Mistral, Qwen2-style GQA.

RMSNorm, RoPE (with llama3 / linear / yarn scaling through transformers' RoPE init),
SwiGLU MLP, optional q/k/v bias (Qwen2), tied or separate output embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtier import kernels
from kvtier.models.base import Batch, DecoderModel, add_rms_norm, rms_norm, rope_for
from kvtier.weights import cat
from kvtier.weights.quant import KERNEL_ROWS, GroupQuant


class Llama(DecoderModel):
    def __init__(self, hf_config, weights, **kw):
        super().__init__(hf_config, weights, **kw)
        c = hf_config
        self.n_layers, self.n_heads = c.num_hidden_layers, c.num_attention_heads
        self.n_kv = c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.max_context = c.max_position_embeddings
        self.eps = c.rms_norm_eps
        window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", False) else None
        self.windows = [window] * self.n_layers
        self.ropes = self.make_ropes(c)
        self.scale = self.head_dim ** -0.5
        _fuse(self.w, self.n_layers)
        self._blocks: list[kernels.Block | None] | None = None  # made on first use (see layer)

    def embed(self, tokens):
        return self.w["model.embed_tokens.weight"].rows(tokens)

    def layer(self, i, x, delta, batch: Batch):
        """The residual stream ``x`` plus the previous layer's output ``delta`` (None: none)
        through layer ``i``; returns the new stream and this layer's output, not yet added.

        A decode step's few rows on group-quantized matrices run the work around attention in
        two native calls (:class:`kvtier.kernels.Block`, the same kernels with the same numbers);
        otherwise, and under a profile (which times each part), one step at a time."""
        p = f"model.layers.{i}."
        block = self._block(i) if x.shape[0] <= KERNEL_ROWS and self.profile is None else None
        got = None if block is None else block.enter(x, delta, *self.ropes[i].at(batch, x.dtype))
        if got is None:
            x, h = add_rms_norm(x, delta, self.w[p + "input_layernorm.weight"], self.eps)
            o = self.attn(i, h, batch)
        else:
            x, q, k, v = got
            o = self.attention(i, q, k, v, batch, self.scale)
        out = None if block is None else block.leave(o, x)
        if out is not None:
            return out
        h = self.linear(o, p + "self_attn.o_proj")
        x, h = add_rms_norm(x, h, self.w[p + "post_attention_layernorm.weight"], self.eps)
        return x, self.mlp(i, h)

    def _block(self, i: int) -> kernels.Block | None:
        """Layer ``i``'s :class:`kvtier.kernels.Block`, made on first use; None where its
        matrices are not all group-quantized or carry a bias."""
        if self._blocks is None:
            self._blocks = [self._make_block(i) for i in range(self.n_layers)]
        return self._blocks[i]

    def _make_block(self, i: int) -> kernels.Block | None:
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        names = [a + "qkv_proj", a + "o_proj", m + "gate_up_proj", m + "down_proj"]
        mats = [self.w[n + ".weight"] for n in names]
        if (kernels.library() is None or not all(isinstance(w, GroupQuant) for w in mats)
                or any(n + ".bias" in self.w for n in names) or type(self).qk_norm is not Llama.qk_norm
                or type(self).gated is not Llama.gated):
            return None
        p = f"model.layers.{i}."
        norms = [self.w[p + "input_layernorm.weight"], self.w[p + "post_attention_layernorm.weight"]]
        if any(n.dtype != torch.float32 or not n.is_contiguous() for n in norms):
            return None
        return kernels.Block(*norms, self.eps, 0.0, (self.n_heads, self.n_kv, self.head_dim), *mats)

    def attn(self, i, h, batch):
        p = f"model.layers.{i}.self_attn."
        n, d = h.shape[0], self.head_dim
        q, k, v = self.linear(h, p + "qkv_proj").split(
            [self.n_heads * d, self.n_kv * d, self.n_kv * d], -1)
        q, k = self.qk_norm(i, q.view(n, self.n_heads, d), k.view(n, self.n_kv, d))
        rope = self.ropes[i]
        q, k = rope(q, batch), rope(k, batch)
        return self.attention(i, q, k, v.view(n, self.n_kv, d), batch, self.scale)

    def make_ropes(self, c):
        return [rope_for(c, None, self.head_dim)] * self.n_layers

    def qk_norm(self, i, q, k):
        return q, k

    def mlp(self, i, h):
        p = f"model.layers.{i}.mlp."
        return self.linear(self.gated(self.linear(h, p + "gate_up_proj")), p + "down_proj")

    def gated(self, gate_up):
        """SwiGLU's ``silu(gate) * up`` from the fused projection ``(N, 2F)``: one pass in the
        native kernel (:func:`kvtier.kernels.silu_mul`), else in PyTorch."""
        out = kernels.silu_mul(gate_up)
        if out is None:
            gate, up = gate_up.chunk(2, -1)
            out = F.silu(gate) * up
        return out

    def head(self, x):
        x = rms_norm(x, self.w["model.norm.weight"], self.eps)
        return self.output(x)


def _fuse(w: dict[str, torch.Tensor], n_layers: int) -> None:
    """Fuse q/k/v and gate/up projections: one matmul each instead of three and two."""
    for i in range(n_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        w[a + "qkv_proj.weight"] = cat([w.pop(a + f"{x}_proj.weight") for x in "qkv"])
        if a + "q_proj.bias" in w:
            w[a + "qkv_proj.bias"] = torch.cat([w.pop(a + f"{x}_proj.bias") for x in "qkv"])
        w[m + "gate_up_proj.weight"] = cat([w.pop(m + "gate_proj.weight"), w.pop(m + "up_proj.weight")])
