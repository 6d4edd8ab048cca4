"""Shared fixtures: tiny random models of both families (fast), the real SmolLM2 (loaded once)."""

from __future__ import annotations

import pytest
import torch

torch.manual_seed(0)


def tiny_hf(family: str, **overrides):
    """A random transformers model with a tiny config, fp32, eval mode."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    if family == "gemma3":
        cfg = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
                               head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                               max_position_embeddings=512, **overrides)
        model = Gemma3ForCausalLM(cfg)
        # random norms: Gemma's zero-initialised (1 + w) norms would hide a wrong offset
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    else:
        cls_cfg, cls = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
        cfg = cls_cfg(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      **overrides)
        model = cls(cfg)
        if family == "qwen2":
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("bias"):
                        p.normal_(0, 0.5)
    return model.float().eval()


def ours_from_hf(hf_model):
    """Our forward on the same weights as ``hf_model``."""
    from kvtier.models.gemma3 import Gemma3
    from kvtier.models.llama import Llama

    weights = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    cls = Gemma3 if hf_model.config.model_type.startswith("gemma3") else Llama
    return cls(hf_model.config, weights)


@pytest.fixture(scope="session")
def smollm2():
    from kvtier.models import load

    return load("smollm2-135m")


@pytest.fixture(scope="module")
def llama():
    """Our forward on a tiny random Llama (3 layers, GQA 4/2)."""
    return ours_from_hf(tiny_hf("llama"))


@pytest.fixture(scope="module")
def gemma():
    """Our forward on a tiny random Gemma 3 (6 layers, sliding window 16)."""
    return ours_from_hf(tiny_hf("gemma3"))


def tokens(n: int, seed: int = 0) -> list[int]:
    """``n`` fixed random token ids of the tiny models' 256-token vocabulary."""
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
