"""Prefill and decode speed of kvtier against transformers' generate + DynamicCache.

Same weights, same prompt (real text), same greedy decoding, in the same process; each side
is repeated and the medians compared.
"""

from __future__ import annotations

import statistics
import time

import torch

from kvtier.engine import ModelRunner, sample


def kvtier_timing(runner: ModelRunner, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step) for one greedy generation."""
    cache = runner.new_cache(reserve=len(prompt) + new_tokens)
    t0 = time.perf_counter()
    logits = runner.run([cache], [prompt])
    tok = sample(logits)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        tok = sample(runner.run([cache], [[int(tok)]]))
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / max(new_tokens - 1, 1)


class _Clock:
    """A transformers streamer that timestamps each token as generate() emits it."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def transformers_timing(hf_model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    from transformers import DynamicCache

    clock = _Clock()
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        hf_model.generate(ids, attention_mask=torch.ones_like(ids), cache=DynamicCache(),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          streamer=clock, pad_token_id=0)
    first, last = clock.times[1], clock.times[-1]  # times[0] is the prompt being "streamed"
    return first - t0, (last - first) / max(new_tokens - 1, 1)


def run(loaded, contexts: list[int], ids: list[int], new_tokens: int = 32, repeats: int = 3,
        kv: str = "dense(dtype=fp32)", progress=None) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from kvtier.dtypes import dtype_name

    dtype = loaded.model.dtype  # transformers runs in the same compute dtype
    hf = AutoModelForCausalLM.from_pretrained(loaded.folder, dtype=dtype).eval()
    runner = ModelRunner(loaded.model, kv)
    rows = []
    for c in contexts:
        prompt = ids[:c - new_tokens]  # decoding ends at c tokens of context
        ours, theirs = [], []
        for _ in range(repeats):  # interleaved, so drift in machine load hits both sides
            ours.append(kvtier_timing(runner, prompt, new_tokens))
            if progress:
                progress()
            theirs.append(transformers_timing(hf, prompt, new_tokens))
            if progress:
                progress()
        kp = statistics.median(len(prompt) / p for p, _ in ours)
        kd = statistics.median(1 / d for _, d in ours)
        tp = statistics.median(len(prompt) / p for p, _ in theirs)
        td = statistics.median(1 / d for _, d in theirs)
        rows.append({"model": loaded.name, "kv": str(runner.spec), "dtype": dtype_name(dtype), "context": c,
                     "new_tokens": new_tokens, "repeats": repeats,
                     "kvtier_prefill_tok_s": kp, "transformers_prefill_tok_s": tp,
                     "prefill_ratio": kp / tp,
                     "kvtier_decode_tok_s": kd, "transformers_decode_tok_s": td,
                     "decode_ratio": kd / td,
                     "kvtier_decode_ms": 1000 / kd, "transformers_decode_ms": 1000 / td})
    return rows
