"""Peer ``hf-quanto``: transformers' own ``QuantizedCache`` with the optimum-quanto backend.

transformers' model (the HF folder kvtier converts the GGUF into, fp32) with its KIVI-like
cache: int2/int4 groups of ``group`` elements along each token's head vector with a scale and
a zero point each, the newest tokens in a full-precision residual that is quantized (with the
whole history, dequantized and re-quantized) every ``residual`` tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvtier.bench.peers import Peer, register
from kvtier.errors import KvtierError
from kvtier.registry import param


@register
@dataclass(frozen=True)
class HFQuanto(Peer):
    """transformers' QuantizedCache, optimum-quanto backend (int2/int4 KV, full-precision residual)."""

    name: ClassVar[str] = "hf-quanto"
    needs: ClassVar[tuple[str, str]] = ("optimum.quanto", "optimum-quanto")
    compute: ClassVar[str] = "fp32"
    bits: int = param(4, "integer bits per key/value element", choices=(2, 4))
    group: int = param(64, "elements sharing one scale and zero point (q_group_size)", choices=(32, 64, 128))
    residual: int = param(128, "newest tokens kept in full precision (residual_length)", min=1)

    def load(self, model: str):
        from transformers import AutoModelForCausalLM

        from kvtier.models.loader import resolve

        self.require()
        hf = AutoModelForCausalLM.from_pretrained(resolve(model), dtype=torch.float32).eval()
        self.new_cache(hf)  # a model QuantizedCache cannot serve fails here, before any timing
        return hf

    def new_cache(self, hf):
        from transformers import QuantizedCache

        try:
            return QuantizedCache("quanto", hf.config, nbits=self.bits, q_group_size=self.group,
                                  residual_length=self.residual)
        except (ValueError, ImportError) as e:  # e.g. sliding-window layers (Gemma 3)
            raise KvtierError(f"{self}: transformers' QuantizedCache cannot run this model: {e}") from None

    def score(self, hf, wins: list[list[int]], eval_tokens: int, progress=None):
        """kvtier.bench.ppl.score's protocol: prefill C - T tokens, then T teacher-forced steps."""
        from kvtier.bench.ppl import Score

        ids = torch.tensor(wins)  # (B, C): all windows as one batch, no padding needed
        context = ids.shape[1]
        prefix = context - eval_tokens
        cache = self.new_cache(hf)
        nll = torch.zeros(len(wins), dtype=torch.float64)
        with torch.inference_mode():
            logits = hf(ids[:, :prefix], cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            if progress:
                progress(prefix * len(wins))
            t0 = time.perf_counter()
            for j in range(prefix, context):
                nll += torch.nn.functional.cross_entropy(logits.float(), ids[:, j], reduction="none").double()
                if j + 1 < context:
                    logits = hf(ids[:, j:j + 1], cache=cache, use_cache=True).logits[:, -1]
                if progress:
                    progress(len(wins))
            decode_s = time.perf_counter() - t0
        nbytes, elements = held(cache)
        return Score(nll.tolist(), eval_tokens, nbytes, len(wins) * cache.get_seq_length(), elements,
                     decode_s, (eval_tokens - 1) * len(wins))

    def timing(self, hf, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        from kvtier.bench.speed import transformers_timing

        return transformers_timing(hf, prompt, new_tokens, cache=self.new_cache(hf))


def held(cache) -> tuple[int, int]:
    """(bytes, key/value elements) a QuantizedCache holds: quanto's packed codes, scales and
    zero points, plus the full-precision residual tensors, read from the tensors themselves."""
    nbytes = elements = 0
    seen: set[int] = set()  # storages already counted
    for layer in cache.layers:
        for t in (layer._quantized_keys, layer._quantized_values, layer.keys, layer.values):
            if t is not None:
                nbytes += _storage_bytes(t, seen)
                elements += t.numel()  # a quanto tensor reports its logical (B, H, S, D) shape
    return nbytes, elements


def _storage_bytes(t: torch.Tensor, seen: set[int]) -> int:
    """Bytes of every plain tensor storage inside ``t`` (quanto tensors nest: codes -> packed)."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        inner, _ = t.__tensor_flatten__()
        return sum(_storage_bytes(getattr(t, name), seen) for name in inner)
    storage = t.untyped_storage()
    if storage.data_ptr() in seen or storage.nbytes() == 0:
        return 0
    seen.add(storage.data_ptr())
    return storage.nbytes()
