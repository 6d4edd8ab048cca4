"""Gemma 3 (text) forward in plain PyTorch.

Differences from Llama: embeddings scaled by sqrt(hidden); RMSNorm scales by ``1 + weight``;
four norms per layer (input, post-attention, pre- and post-feedforward); RMSNorm on q and k
per head (QK-norm); sliding-window layers (window 512 on the 270M model) interleaved with
global layers, each type with its own RoPE base; GELU-tanh gated MLP; attention scaled by
``query_pre_attn_scalar ** -0.5``. Sliding layers' caches free blocks out of the window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtier.models.base import Batch, add_rms_norm, rms_norm, rope_for
from kvtier.models.llama import Llama


class Gemma3(Llama):
    def __init__(self, hf_config, weights, **kw):
        super().__init__(hf_config, weights, **kw)
        c = hf_config
        self.windows = [c.sliding_window if t == "sliding_attention" else None for t in c.layer_types]
        self.scale = c.query_pre_attn_scalar ** -0.5
        self.embed_scale = torch.tensor(c.hidden_size ** 0.5)
        self.softcap = getattr(c, "final_logit_softcapping", None)

    def embed(self, tokens):
        return self.w["model.embed_tokens.weight"].rows(tokens) * self.embed_scale.to(self.dtype)

    def norm(self, x, name):
        return rms_norm(x, self.w[name + ".weight"], self.eps, offset=1.0)

    def add_norm(self, x, delta, name):
        return add_rms_norm(x, delta, self.w[name + ".weight"], self.eps, offset=1.0)

    def layer(self, i, x, delta, batch: Batch):
        p = f"model.layers.{i}."
        x, h = self.add_norm(x, delta, p + "input_layernorm")
        h = self.linear(self.attn(i, h, batch), p + "self_attn.o_proj")
        x, h = self.add_norm(x, self.norm(h, p + "post_attention_layernorm"), p + "pre_feedforward_layernorm")
        return x, self.norm(self.mlp(i, h), p + "post_feedforward_layernorm")

    def gated(self, gate_up):
        gate, up = gate_up.chunk(2, -1)
        return F.gelu(gate, approximate="tanh") * up

    def make_ropes(self, c):
        return [rope_for(c, t, self.head_dim) for t in c.layer_types]

    def qk_norm(self, i, q, k):
        p = f"model.layers.{i}.self_attn."
        return self.norm(q, p + "q_norm"), self.norm(k, p + "k_norm")

    def head(self, x):
        x = self.norm(x, "model.norm")
        logits = self.output(x)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
