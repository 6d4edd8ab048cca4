"""Time the serving engine without its HTTP server: the `kvtier bench serve` load (KJV chat
prompts of about 1,030 tokens, greedy, `ignore_eos`) added at once to one `Engine` and stepped to
the end. Reports output tok/s, TTFT p50/p90 (from the first step) and where the steps went:
prefill steps (each with the decode tokens that rode along) and decode-only steps.

What it leaves out is what `kvtier bench serve` adds: HTTP, streaming and the worker thread.
Compare its numbers only with a run of the same command on the same machine.

    .venv/bin/python scripts/bench_engine.py --kv "int(bits=4)" --weights q4 --requests 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvtier.bench.serve import LoadConfig, kjv_prompts
from kvtier.config import EngineConfig, SamplingParams
from kvtier.engine.engine import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kv", default="int(bits=4)")
    ap.add_argument("--weights", default="q4")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    engine = Engine(EngineConfig(kv=args.kv, weights=args.weights, max_batched_tokens=args.max_batched_tokens))
    load = LoadConfig(requests=args.requests, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens)
    prompts = []
    for messages in kjv_prompts("smollm2-135m", 1, load)[0]:
        ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids))
    seqs = [engine.add(p, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)) for p in prompts]

    first: dict[int, float] = {}
    prefill_steps, decode_steps = [], []
    t0 = time.perf_counter()
    while engine.has_work():
        prefilling = any(s.prefilling for s in seqs)
        t = time.perf_counter()
        engine.step()
        (prefill_steps if prefilling else decode_steps).append(time.perf_counter() - t)
        for s in seqs:
            if s.output_ids and s.id not in first:
                first[s.id] = time.perf_counter() - t0
    total = time.perf_counter() - t0

    ttft = sorted(first.values())
    out = sum(len(s.output_ids) for s in seqs)
    print(f"{args.kv}, --weights {args.weights}: {args.requests} requests of {len(prompts[0])} tokens, "
          f"{out} tokens out in {total:.2f} s: {out / total:.1f} tok/s")
    deciles = statistics.quantiles(ttft, n=10) if len(ttft) > 1 else ttft * 9
    print(f"TTFT p50 {deciles[4]:.2f} s, p90 {deciles[8]:.2f} s")
    print(f"{len(prefill_steps)} prefill steps: {sum(prefill_steps):.2f} s "
          f"(median {statistics.median(prefill_steps) * 1e3:.0f} ms); {len(decode_steps)} decode-only steps: "
          f"{sum(decode_steps):.2f} s (median {statistics.median(decode_steps) * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
