"""Capacity under a KV byte budget: how many 4K-token sessions the scheduler admits at once
for each cache spec, and whether every one of them completes.

    .venv/bin/python scripts/serve_capacity.py --budget 512MiB --sessions 32 --prompt-tokens 4096 \
        --max-tokens 16 --kv "dense(dtype=bf16)" --kv "int(bits=2)" --run "int(bits=2)" --json results/x.json

For each ``--kv`` it reports the bytes one session holds at its end (``ModelRunner.bytes_for``,
the real block sizes) and how many sessions the first scheduling step admits; each ``--run``
spec is run to the end (every session through the engine, KJV passages as prompts), recording
the peak of the bytes really held (``cache.nbytes()`` summed over the running sequences).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvtier.bench import data
from kvtier.config import EngineConfig, SamplingParams
from kvtier.dtypes import compute_dtype
from kvtier.engine import Engine
from kvtier.kv.tiers import parse_size
from kvtier.models import load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="512MiB")
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv", action="append", default=[])
    ap.add_argument("--run", action="append", default=[])
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    loaded = load("smollm2-135m", compute_dtype("auto"))
    ids = loaded.tokenizer(data.load_text("kjv")[:4_000_000], add_special_tokens=False).input_ids
    prompts = [ids[i * 5000: i * 5000 + a.prompt_tokens] for i in range(a.sessions)]
    rows = []
    for kv in a.kv:  # admission only: a token budget that never binds, no forward run
        engine = Engine(EngineConfig(kv=kv, kv_budget=a.budget, prefix_cache=False, max_batched_tokens=1 << 20),
                        loaded=loaded)
        per = engine.runner.bytes_for(a.prompt_tokens + a.max_tokens)
        seqs = [engine.add(p, SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)) for p in prompts]
        engine.scheduler.schedule()
        admitted = len(engine.scheduler.running)
        row = {"kv": str(engine.runner.spec), "budget_bytes": parse_size(a.budget), "sessions": a.sessions,
               "prompt_tokens": a.prompt_tokens, "bytes_per_session": per,
               "sessions_that_fit": parse_size(a.budget) // per, "admitted_first_step": admitted}
        if kv in a.run:
            engine = Engine(EngineConfig(kv=kv, kv_budget=a.budget, prefix_cache=False, max_batched_tokens=4096),
                            loaded=loaded)
            seqs = [engine.add(p, SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)) for p in prompts]
            t0, peak, peak_running = time.perf_counter(), 0, 0
            while engine.has_work():
                engine.step()
                running = engine.scheduler.running
                peak = max(peak, sum(s.cache.nbytes() for s in running if s.cache is not None))
                peak_running = max(peak_running, len(running))
                print(f"step {engine.steps}: running {len(running)}, waiting {len(engine.scheduler.waiting)}, "
                      f"held {peak / 2**20:.0f} MiB peak", flush=True) if engine.steps % 20 == 0 else None
            row.update(completed=sum(s.finish_reason == "length" for s in seqs), peak_kv_bytes=peak,
                       peak_running=peak_running, preempted=sum(s.n_preempted for s in seqs),
                       seconds=time.perf_counter() - t0)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
