"""One layer's decode attention over a long context on one thread: the pre-RoPE codecs' native
kernels (`nuq`, `vq`) against dense fp32 attention in PyTorch, in SmolLM2's shape (3 KV heads
of 64, 3 query rows each) and Gemma 3's (1 KV head of 256, 4 query rows). Medians of 15.

    .venv/bin/python scripts/bench_rope_kernels.py --tokens 8192 --json results/x.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvtier import kernels, spec
from kvtier.models.base import Rope

SHAPES = {"smollm2": (3, 3, 64), "gemma3": (1, 4, 256)}  # KV heads, query rows per head, head dim


def median_ms(f, repeats: int = 15) -> float:
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--methods", action="append", default=None)
    ap.add_argument("--json")
    a = ap.parse_args()
    if kernels.library() is None:
        raise SystemExit("kvtier: the native kernels did not build; nothing to measure")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for shape, (h, r, d) in SHAPES.items():
        n = a.tokens // 64
        rope = Rope(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
        cs = rope.span(0, n * 64)
        k, v = torch.randn(h, n, 64, d), torch.randn(h, n, 64, d)
        q = torch.randn(h, r, d) / d ** 0.5
        dk, dv = k.reshape(h, -1, d), v.reshape(h, -1, d)
        rows.append({"shape": shape, "kv": "dense fp32 (PyTorch)",
                     "ms": median_ms(lambda: torch.softmax(q @ dk.transpose(1, 2), -1) @ dv)})
        for name in a.methods or ["nuq", "vq", "vq(dim=16)"]:
            codec = spec.parse(name).codec
            data = codec.encode(k, v)
            rows.append({"shape": shape, "kv": spec.format_method(codec),
                         "ms": median_ms(lambda codec=codec, data=data: codec.attend(q, data, cs))})
        for row in rows[-1 - len(a.methods or [0, 0, 0]):]:
            print(f"{row['shape']:8s} {row['kv']:60s} {row['ms']:.3f} ms", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"tokens": a.tokens, "threads": 1, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
