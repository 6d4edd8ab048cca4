"""One layer's decode attention over a long context: every codec's attention on its codes
(the native kernels) against the same codec's blocks decoded by PyTorch and then attended (the
path attention took before the kernel) and against dense attention in PyTorch (fp32, and bf16
through kvtier's own dense path), in SmolLM2's shape (3 KV heads of 64, 3 query rows each) and Gemma 3's (1 KV
head of 256, 4 query rows). Calibrated codecs are bound to random per-channel statistics, so
their reorderings are real (codebooks stay the defaults: the kernels' cost is the same).
Medians of 15.

    .venv/bin/python scripts/bench_kernels.py --tokens 8192 --threads 1 --json results/x.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvtier import kernels, registry, spec
from kvtier.attention.blockwise import partial
from kvtier.kv.codecs.base import LayerContext, attends_on_codes
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


def decoded(codec, data, q, rope):
    """The path without a kernel: the run's blocks decoded in bf16, RoPE applied to keys stored
    before it, then attended (kvtier.kv.cache.LayerKV._read and blockwise.partial)."""
    k, v = codec.decode(data, torch.bfloat16)
    if codec.pre_rope:
        k = rope.rotate(k.float(), 0).bfloat16()
    return partial(q.bfloat16(), k, v, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", action="append", default=None,
                    help="cache specs (default: every codec with attention on its codes)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if kernels.library() is None:
        raise SystemExit("kvtier: the native kernels did not build; nothing to measure")
    methods = a.methods or [n for n, c in registry.methods().items()
                            if c.kind == "codec" and n != "dense" and attends_on_codes(c())]
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    for shape, (h, r, d) in SHAPES.items():
        n = a.tokens // 64
        rope = Rope(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
        cs = rope.span(0, n * 64)
        k, v = torch.randn(h, n, 64, d), torch.randn(h, n, 64, d)
        q = torch.randn(h, r, d) / d ** 0.5
        dk, dv = k.reshape(h, -1, d), v.reshape(h, -1, d)
        bk, bv, bq = dk.bfloat16(), dv.bfloat16(), q.bfloat16()
        stats = {f"{x}_{f}": torch.rand(h, d) + 0.1 for x in ("k", "kpre", "v") for f in ("rms", "absmax", "mean")}
        first = len(rows)
        rows.append({"shape": shape, "kv": "dense fp32 (PyTorch)",
                     "ms": median_ms(lambda: torch.softmax(q @ dk.transpose(1, 2), -1) @ dv)})
        rows.append({"shape": shape, "kv": "dense bf16 (kvtier)", "ms": median_ms(lambda: partial(bq, bk, bv, None))})
        for name in methods:
            codec = spec.parse(name).codec.for_layer(LayerContext(0, h, d, stats, rope))
            data = {f: t.contiguous() for f, t in codec.encode(k, v).items()}  # as the pool holds them
            if codec.attend(q, data, cs if codec.pre_rope else None) is None:
                raise SystemExit(f"kvtier: {name} has no attention on its codes for this shape")
            rows.append({"shape": shape, "kv": spec.format_method(codec),
                         "ms": median_ms(lambda codec=codec, data=data:
                                         codec.attend(q, data, cs if codec.pre_rope else None)),
                         "decoded_ms": median_ms(lambda codec=codec, data=data: decoded(codec, data, q, rope), 5)})
        for row in rows[first:]:
            then = ""
            if "decoded_ms" in row:
                then = f"  decoded {row['decoded_ms']:7.3f} ms ({row['decoded_ms'] / row['ms']:.1f}x)"
            print(f"{row['shape']:8s} {row['kv']:70s} {row['ms']:7.3f} ms{then}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"tokens": a.tokens, "threads": a.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
