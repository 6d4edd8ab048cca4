"""Peer ``llamacpp``: llama.cpp (through llama-cpp-python) on the same GGUF file kvtier loads.

llama.cpp runs the GGUF's quantized weights directly, with a KV cache of type ``kv`` for both
keys and values (f16, or q8_0 / q4_0 blocks of 32 elements with one fp16 scale each), through
its flash attention (``fa=on``, the only path for a quantized cache) or its plain attention.
It uses as many threads as torch does, so both sides get the same cores.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from kvtier.bench.peers import Peer, register
from kvtier.errors import KvtierError
from kvtier.registry import param

KV_TYPES = {"f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0", "q4_0": "GGML_TYPE_Q4_0"}


@register
@dataclass(frozen=True)
class LlamaCpp(Peer):
    """llama.cpp via llama-cpp-python on the same GGUF: its weights, f16/q8_0/q4_0 KV, flash attention
    on or off."""

    name: ClassVar[str] = "llamacpp"
    needs: ClassVar[tuple[str, str]] = ("llama_cpp", "llama-cpp-python")
    compute: ClassVar[str] = "gguf"  # the GGUF's quantized weights, fp32 activations
    kv: str = param("f16", "ggml type of the K and V cache", choices=tuple(KV_TYPES))
    fa: str = param("on", "flash attention (needed by a quantized cache; off: ggml's plain attention, which "
                    "decodes an f16 cache 2.8x faster at 8K on an AVX-512 Xeon)", choices=("on", "off"), quiet=True)

    def __post_init__(self):
        if self.fa == "off" and self.kv != "f16":
            raise KvtierError(f"llamacpp: a {self.kv} cache needs flash attention (fa=on); only f16 runs without it")

    def load(self, model: str) -> Path:
        """The GGUF file of a named model or a .gguf path (llama.cpp reads nothing else)."""
        from kvtier.models.loader import NAMED

        self.require()
        path = NAMED[model]() if model in NAMED else Path(model).expanduser()
        if path.suffix != ".gguf" or not path.is_file():
            raise KvtierError(f"{self.name} runs GGUF files: give a named model ({', '.join(NAMED)}) "
                              f"or a .gguf path, not {model}")
        return path

    def open(self, gguf: Path, n_ctx: int, logits_all: bool):
        import llama_cpp

        kind = getattr(llama_cpp, KV_TYPES[self.kv])
        threads = torch.get_num_threads()
        return llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads,
                               n_threads_batch=threads, flash_attn=self.fa == "on", type_k=kind, type_v=kind,
                               logits_all=logits_all, verbose=False)

    def score(self, gguf: Path, wins: list[list[int]], eval_tokens: int, progress=None):
        """kvtier.bench.ppl.score's protocol, one window at a time: prefill C - T tokens, then T
        teacher-forced single-token steps, each reading llama.cpp's (quantized) cache."""
        from kvtier.bench.ppl import Score

        context = len(wins[0])
        prefix = context - eval_tokens
        llm = self.open(gguf, context, logits_all=True)
        nll, decode_s = [], 0.0
        try:
            for w in wins:
                llm.reset()  # the next eval drops every cell from position 0 on
                llm.eval(w[:prefix])
                if progress:
                    progress(prefix)
                total = 0.0
                t0 = time.perf_counter()
                for j in range(prefix, context):
                    total += _nll(llm.scores[j - 1], w[j])  # logits at j - 1 predict token j
                    if j + 1 < context:
                        llm.eval([w[j]])
                    if progress:
                        progress(1)
                decode_s += time.perf_counter() - t0
                nll.append(total)
            held = llm.n_tokens  # C - 1: the last token is scored, never fed
            per_token, elements = self.kv_layout(llm)
        finally:
            llm.close()
        tokens = held * len(wins)
        return Score(nll, eval_tokens, per_token * tokens, tokens, elements * tokens, decode_s,
                     (eval_tokens - 1) * len(wins))

    def timing(self, gguf: Path, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        """(prefill seconds, seconds per decode step) for one greedy generation, as kvtier_timing."""
        llm = self.open(gguf, len(prompt) + new_tokens, logits_all=False)
        try:
            t0 = time.perf_counter()
            llm.eval(prompt)
            tok = _greedy(llm)
            t1 = time.perf_counter()
            for _ in range(new_tokens - 1):
                llm.eval([tok])
                tok = _greedy(llm)
            t2 = time.perf_counter()
        finally:
            llm.close()
        return t1 - t0, (t2 - t1) / max(new_tokens - 1, 1)

    def kv_layout(self, llm) -> tuple[int, int]:
        """(bytes, key/value elements) per token of llama.cpp's KV buffers: ggml's own row size
        of the K and V types (f16 2 B/element, q8_0 34 B and q4_0 18 B per 32) for every layer's
        n_kv_heads x head_dim. Sliding-window layers (Gemma 3) hold fewer cells than this."""
        import llama_cpp
        from llama_cpp._ggml import libggml

        row_size = libggml.ggml_row_size
        row_size.argtypes, row_size.restype = [ctypes.c_int, ctypes.c_int64], ctypes.c_size_t
        kind = getattr(llama_cpp, KV_TYPES[self.kv])
        meta, model = llm.metadata, llm.model
        arch = meta.get("general.architecture", "llama")
        layers = llama_cpp.llama_model_n_layer(model)
        kv_heads = llama_cpp.llama_model_n_head_kv(model)
        head_dim = llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
        k_dim = kv_heads * int(meta.get(f"{arch}.attention.key_length", head_dim))
        v_dim = kv_heads * int(meta.get(f"{arch}.attention.value_length", head_dim))
        return layers * (row_size(kind, k_dim) + row_size(kind, v_dim)), layers * (k_dim + v_dim)


def _nll(logits: np.ndarray, target: int) -> float:
    """-log softmax(logits)[target] in fp64."""
    x = logits.astype(np.float64)
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()) - x[target])


def _greedy(llm) -> int:
    import llama_cpp

    row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # the last token's logits, (n_vocab,)
    return int(np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).argmax())
