"""Time one decode step of SmolLM2-135M (bf16, CPU) with batched decode attention against the
per-sequence path it replaces, at several batch sizes and cache specs.

Every sequence holds ``--context`` tokens (one prefill, copied into the others through
snapshot/restore: same bytes, own memory). The two paths alternate step by step on the same
caches (``KVTIER_BATCHED=1`` / ``0``) and each reports the median of its steps, so a noisy
shared machine moves both alike. Besides the whole step, the time spent in the model's
``attention`` (all 30 layers: appending, gathering parts, attending) is reported on its own:
on a CPU without native bf16 the linear layers dominate a step.

    .venv/bin/python scripts/bench_batched_decode.py --batch 1 16 64 --steps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import kvtier.models
from kvtier.engine import ModelRunner
from kvtier.kv.cache import SeqKV

PATHS = {"batched": "1", "per-seq": "0"}


def copies(runner: ModelRunner, prompt: list[int], n: int) -> list[SeqKV]:
    """``n`` caches holding ``prompt``: one prefill, then restored copies."""
    first = runner.new_cache(reserve=len(prompt) + 64)
    runner.run([first], [prompt])
    snaps = [layer.snapshot() for layer in first.layers]
    out = [first]
    for _ in range(n - 1):
        cache = runner.new_cache(reserve=len(prompt) + 64)
        for layer, (counters, tensors) in zip(cache.layers, snaps):
            layer.restore(counters, tensors)
        out.append(cache)
    return out


class Timed:
    """The model's ``attention`` with the time spent in it added up (seconds)."""

    def __init__(self, model):
        self.inner, self.total = model.attention, 0.0
        model.attention = self

    def __call__(self, *args):
        t = time.perf_counter()
        try:
            return self.inner(*args)
        finally:
            self.total += time.perf_counter() - t


def step_ms(runner: ModelRunner, caches: list[SeqKV], path: str, attention: Timed) -> tuple[float, float]:
    """One decode step of every cache on ``path``: (whole step, attention) in ms."""
    os.environ["KVTIER_BATCHED"] = PATHS[path]
    feed = [[17]] * len(caches)
    attention.total = 0.0
    t = time.perf_counter()
    runner.run(caches, feed)
    return (time.perf_counter() - t) * 1e3, attention.total * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--specs", nargs="+", default=["dense(dtype=bf16)", "int(bits=4)"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per path (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = kvtier.models.load("smollm2-135m", torch.bfloat16).model
    prompt = torch.randint(100, 20000, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"SmolLM2-135M bf16, {args.context} tokens per sequence, {args.threads} threads, "
          f"median of {args.steps} steps per path (alternating)")
    attention = Timed(model)
    print(f"{'':<26} {'step ms':^31} {'attention ms':^31}")
    print(f"{'spec':<20} {'seqs':>5} " + f"{'batched':>10} {'per-seq':>10} {'ratio':>9} " * 2)
    for kv in args.specs:
        runner = ModelRunner(model, kv)
        for n in args.batch:
            caches = copies(runner, prompt, n)
            times = {p: [] for p in PATHS}
            for p in PATHS:  # warm-up: first-call costs (kernel load, allocations)
                step_ms(runner, caches, p, attention)
            for _ in range(args.steps):
                for p in PATHS:
                    times[p].append(step_ms(runner, caches, p, attention))
            row = f"{kv:<20} {n:>5} "
            for i in (0, 1):  # whole step, attention
                b, s = (statistics.median(t[i] for t in times[p]) for p in PATHS)
                row += f"{b:>10.1f} {s:>10.1f} {s / b:>8.2f}x "
            print(row, flush=True)
            for c in caches:
                c.close()
    os.environ.pop("KVTIER_BATCHED", None)


if __name__ == "__main__":
    main()
