"""Prefix reuse: requests sharing a long prefix, one after another, through the engine; the
time to first token of the first (cold) request against the later ones (prefix-cache hits).
Then the same number of requests at once on the warm cache: the bytes held at the peak (the
prefix once, in the shared pools, plus each sequence's own blocks) against what every sequence
would hold with its own copy.

    .venv/bin/python scripts/serve_prefix.py --prefix-tokens 4096 --requests 16 --kv dense --json results/x.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from kvtier.bench import data
from kvtier.config import EngineConfig, SamplingParams
from kvtier.dtypes import compute_dtype
from kvtier.engine import Engine
from kvtier.models import load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix-tokens", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--kv", action="append", default=[])
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    loaded = load("smollm2-135m", compute_dtype("auto"))
    ids = loaded.tokenizer(data.load_text("kjv")[:200_000], add_special_tokens=False).input_ids
    prefix = ids[:a.prefix_tokens]
    rows = []
    for kv in a.kv or ["dense"]:
        engine = Engine(EngineConfig(kv=kv), loaded=loaded)
        ttft, cached = [], []
        for i in range(a.requests):
            question = ids[a.prefix_tokens + 40 * i: a.prefix_tokens + 40 * i + 30]
            s = engine.add(prefix + question, SamplingParams(max_tokens=a.max_tokens, ignore_eos=True))
            while not s.finished:
                engine.step()
            ttft.append(s.timing.first_token - s.timing.arrival)
            cached.append(s.n_cached)
        together = [engine.add(prefix + ids[a.prefix_tokens + 40 * i: a.prefix_tokens + 40 * i + 30],
                               SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)) for i in range(a.requests)]
        held_peak = copies_peak = 0
        while not all(s.finished for s in together):
            engine.step()
            live = [s for s in together if s.cache is not None]
            held = engine.kv_bytes()[0][1]
            if held > held_peak:
                held_peak, copies_peak = held, sum(s.cache.nbytes() for s in live)
        later = statistics.median(ttft[1:])
        row = {"kv": str(engine.runner.spec), "prefix_tokens": a.prefix_tokens, "requests": a.requests,
               "ttft_first_s": ttft[0], "ttft_later_median_s": later, "ttft_later_max_s": max(ttft[1:]),
               "ratio_later_over_first": later / ttft[0], "cached_tokens": cached,
               "prefix_cache_bytes": engine.prefixes.nbytes,
               "together_held_bytes_peak": held_peak, "together_own_copies_bytes": copies_peak,
               "together_cached_tokens": [s.n_cached for s in together]}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if a.json:  # after every row: a run cut short keeps what it measured
            with open(a.json, "w") as f:
                json.dump({"results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
