"""Prefill and decode speed of kvtier against transformers' generate + DynamicCache.

Same weights, same prompt (real text), same greedy decoding, in the same process; each side
is repeated and the medians compared. Peers (``kvtier.bench.peers``, e.g. llama.cpp) are timed
on the same prompts in the same interleaved repeats and give one row each per context, with
``"peer": true`` and their ratio against kvtier's row.
"""

from __future__ import annotations

import statistics
import time

import torch

from kvtier.bench.bandwidth import read_bandwidth
from kvtier.engine import ModelRunner, sample


def kvtier_timing(runner: ModelRunner, prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
    """(prefill seconds, seconds per decode step, KV bytes held at the end) for one greedy
    generation."""
    cache = runner.new_cache(reserve=len(prompt) + new_tokens)
    t0 = time.perf_counter()
    logits = runner.feed([cache], [prompt])
    tok = sample(logits)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        tok = sample(runner.feed([cache], [[int(tok)]]))
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / max(new_tokens - 1, 1), cache.nbytes()


def profiled_decode(runner: ModelRunner, prompt: list[int], new_tokens: int) -> dict[str, float]:
    """Milliseconds per decode step by part (:class:`kvtier.profile.Profile`), one greedy run."""
    from kvtier.profile import Profile

    cache = runner.new_cache(reserve=len(prompt) + new_tokens)
    tok = sample(runner.feed([cache], [prompt]))
    runner.model.profile = profile = Profile()
    try:
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            tok = sample(runner.feed([cache], [[int(tok)]]))
        total = time.perf_counter() - t0
    finally:
        runner.model.profile = None
    steps = max(new_tokens - 1, 1)
    return {part: 1000 * s / steps for part, s in profile.split(total).items()} | {"step": 1000 * total / steps}


class _Clock:
    """A transformers streamer that timestamps each token as generate() emits it."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def transformers_timing(hf_model, prompt: list[int], new_tokens: int, cache=None) -> tuple[float, float]:
    """As kvtier_timing, through ``generate`` with ``cache`` (default: a new DynamicCache)."""
    from transformers import DynamicCache

    clock = _Clock()
    ids = torch.tensor([prompt])
    cache = DynamicCache() if cache is None else cache
    t0 = time.perf_counter()
    with torch.inference_mode():
        hf_model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          streamer=clock, pad_token_id=0)
    first, last = clock.times[1], clock.times[-1]  # times[0] is the prompt being "streamed"
    return first - t0, (last - first) / max(new_tokens - 1, 1)


def run(models, contexts: list[int], ids: list[int], new_tokens: int = 32, repeats: int = 3,
        kv: str | list[str] = "dense(dtype=fp32)", progress=None, peers: list = (),
        skips: list[float] = (0.0,), profile: bool = False) -> list[dict]:
    """kvtier against transformers: one row per weight format (``models``: one loaded model per
    format, or one), cache spec, share of layers skipped (layer skipping, ``skips``) and context
    (``vs_first``: decode speed against the first row's at that context, same run), then each
    peer (one row per context, against that first row)."""
    from transformers import AutoModelForCausalLM

    from kvtier.dtypes import dtype_name
    from kvtier.engine.engine import skipping

    models = models if isinstance(models, (list, tuple)) else [models]
    loaded = models[0]
    dtype = loaded.model.dtype  # transformers runs in the same compute dtype
    hf = AutoModelForCausalLM.from_pretrained(loaded.folder, dtype=dtype).eval()
    kvs = [kv] if isinstance(kv, str) else kv
    variants = [(ModelRunner(m.model, k), share) for m in models for share in sorted({0.0, *skips}) for k in kvs]
    runners = [r for r, _ in variants]
    runner = runners[0]
    handles = [p.load(loaded.name) for p in peers]
    stream = read_bandwidth()
    rows, peer_rows = [], []
    for c in contexts:
        prompt = ids[:c - new_tokens]  # decoding ends at c tokens of context
        times_of, theirs, peers_t = [[] for _ in runners], [], [[] for _ in peers]
        for _ in range(repeats):  # interleaved, so drift in machine load hits every side
            for (r, share), times in zip(variants, times_of):
                with skipping(r.model, share):
                    times.append(kvtier_timing(r, prompt, new_tokens))
                if progress:
                    progress()
            theirs.append(transformers_timing(hf, prompt, new_tokens))
            if progress:
                progress()
            for p, h, times in zip(peers, handles, peers_t):
                times.append(p.timing(h, prompt, new_tokens))
                if progress:
                    progress()
        tp = statistics.median(len(prompt) / p for p, _ in theirs)
        td = statistics.median(1 / d for _, d in theirs)
        first_kd = None
        for (r, share), ours in zip(variants, times_of):
            p_ = statistics.median(len(prompt) / p for p, _, _ in ours)
            d_ = statistics.median(1 / d for _, d, _ in ours)
            step_bytes = r.model.weight_bytes() + ours[-1][2]  # every weight and KV byte, once
            first_kd = first_kd or d_
            rows.append({"model": loaded.name, "kv": str(r.spec), "skip_layers": share,
                         "weights": r.model.weight_format, "weight_bytes": r.model.weight_bytes(),
                         "dtype": dtype_name(dtype), "context": c,
                         "new_tokens": new_tokens, "repeats": repeats,
                         "kvtier_prefill_tok_s": p_, "transformers_prefill_tok_s": tp,
                         "prefill_ratio": p_ / tp,
                         "kvtier_decode_tok_s": d_, "transformers_decode_tok_s": td,
                         "decode_ratio": d_ / td, "vs_first": d_ / first_kd,
                         "kvtier_decode_ms": 1000 / d_, "transformers_decode_ms": 1000 / td,
                         "kv_bytes": ours[-1][2], "bytes_per_step": step_bytes,
                         "read_gb_s": step_bytes * d_ / 1e9, "stream_gb_s": stream / 1e9,
                         "bandwidth_share": step_bytes * d_ / stream}
                        | ({"profile_ms": profiled_decode(r, prompt, new_tokens)} if profile else {}))
        kp, kd = rows[-len(runners)]["kvtier_prefill_tok_s"], first_kd
        for p, times in zip(peers, peers_t):
            pp = statistics.median(len(prompt) / t for t, _ in times)
            pd = statistics.median(1 / d for _, d in times)
            peer_rows.append({"model": loaded.name, "kv": str(p), "peer": True, "dtype": p.compute,
                              "context": c, "new_tokens": new_tokens, "repeats": repeats,
                              "prefill_tok_s": pp, "decode_tok_s": pd, "decode_ms": 1000 / pd,
                              "kvtier_kv": str(runner.spec), "kvtier_weights": runner.model.weight_format,
                              "kvtier_prefill_tok_s": kp,
                              "kvtier_decode_tok_s": kd, "prefill_ratio": kp / pp, "decode_ratio": kd / pd})
    return rows + peer_rows
