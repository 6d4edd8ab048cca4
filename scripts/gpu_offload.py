"""GPU check of the tiered store (needs CUDA): attention where each block lives vs fetching.

A random-weight, Llama-3-8B-shaped bf16 model (32 layers, 32 query / 8 KV heads of 128,
hidden 4096, MLP 14336, vocabulary 128,256) on the GPU, its dense bf16 KV cache at 64K-128K
tokens with a small GPU budget and the rest in (pinned) CPU RAM. Decode ms/step for:

- ``all-gpu``: every block on the GPU (no tiers) — the speed of light;
- ``local``: the GPU attends its blocks while the CPU attends the RAM blocks, the pieces merge
  by log-sum-exp; only queries and partial results cross the bus;
- ``fetch``: every RAM block is copied to the GPU each step, then attended there (FlexGen-style);
- ``split:S``: the oldest share S of the RAM blocks is copied and attended on the GPU while the
  CPU attends the rest in place, side by side; the pieces merge by log-sum-exp;
- with ``--codecs``: the same for compressed caches (e.g. ``int(bits=4)``).

The cache is filled by appending random keys/values (a random-weight model's prefill would
produce random-looking KV too; filling directly keeps the check inside the device budget); the
decode steps run the whole model. First a small exactness check: the three layouts give the
same logits. Usage: ``python scripts/gpu_offload.py --contexts 65536,131072 --out result.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig

from kvtier.engine import ModelRunner
from kvtier.models.llama import Llama


def llama(layers: int, seed: int = 0) -> Llama:
    c = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                    max_position_embeddings=131072 + 256, rope_theta=500000.0, rms_norm_eps=1e-5)
    g = torch.Generator(device="cuda").manual_seed(seed)

    def w(*shape, std=0.02):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16) * std

    weights = {"model.embed_tokens.weight": w(c.vocab_size, 4096), "model.norm.weight": w(4096, std=0.1) + 1,
               "lm_head.weight": w(c.vocab_size, 4096)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights |= {p + "self_attn.q_proj.weight": w(4096, 4096), p + "self_attn.k_proj.weight": w(1024, 4096),
                    p + "self_attn.v_proj.weight": w(1024, 4096), p + "self_attn.o_proj.weight": w(4096, 4096),
                    p + "mlp.gate_proj.weight": w(14336, 4096), p + "mlp.up_proj.weight": w(14336, 4096),
                    p + "mlp.down_proj.weight": w(4096, 14336),
                    p + "input_layernorm.weight": w(4096, std=0.1) + 1,
                    p + "post_attention_layernorm.weight": w(4096, std=0.1) + 1}
    return Llama(c, weights)


def filled(runner: ModelRunner, context: int, seed: int = 1):
    """A cache of ``context`` tokens of random keys/values (the same for every layout)."""
    cache = runner.new_cache(reserve=context + 64)
    g = torch.Generator(device="cuda").manual_seed(seed)
    step = 8192
    for layer in cache.layers:
        for s in range(0, context, step):
            n = min(step, context - s)
            k = torch.randn(8, n, 128, generator=g, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(8, n, 128, generator=g, device="cuda", dtype=torch.bfloat16)
            layer.append(k, v)
    torch.cuda.synchronize()
    return cache


def decode(runner: ModelRunner, cache, steps: int, warmup: int = 3):
    """(logits of each step, ms of each timed step)."""
    out, times, tok = [], [], 1000
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = runner.feed([cache], [[tok]])
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - t0))
        out.append(logits.float().cpu())
        tok = int(logits.argmax())
    return torch.cat(out), times


def layouts(gpu_budget: str, shares=(), codecs=()) -> list[tuple[str, str, str | None, str]]:
    """(name, cache spec, tiers, attend) for each measured layout."""
    tiers = f"gpu:{gpu_budget},cpu:200GiB"
    out = [("all-gpu", DENSE, None, "local"), ("local", DENSE, tiers, "local"), ("fetch", DENSE, tiers, "fetch")]
    out += [(f"split:{s:g}", DENSE, tiers, f"split:{s:g}") for s in shares]
    for kv in codecs:
        out += [(f"{kv} all-gpu", kv, None, "local"), (f"{kv} local", kv, tiers, "local"),
                (f"{kv} fetch", kv, tiers, "fetch")]
    return out


DENSE = "dense(dtype=bf16)"


def measure(model, context: int, gpu_budget: str, steps: int, shares=(), codecs=(), skip=()) -> list[dict]:
    rows = []
    for name, kv, tiers, attend in layouts(gpu_budget, shares, codecs):
        if name in skip:
            continue
        try:
            runner = ModelRunner(model, kv, device="cuda", tiers=tiers, attend=attend)
            t0 = time.perf_counter()
            cache = filled(runner, context)
            fill_s = time.perf_counter() - t0
            before = runner.store.traffic.moved if runner.store else 0
            _, times = decode(runner, cache, steps)
        except Exception as e:  # noqa: BLE001 -- a layout that fails is reported, the others still run
            print(json.dumps({"context": context, "layout": name, "error": repr(e)}), flush=True)
            rows.append({"context": context, "layout": name, "kv": kv, "error": repr(e)})
            torch.cuda.empty_cache()
            continue
        moved = (runner.store.traffic.moved - before) if runner.store else 0
        by_tier = cache.nbytes_by_tier() if runner.store else [cache.nbytes()]
        rows.append({"context": context, "layout": name, "kv": kv, "tiers": tiers, "attend": attend,
                     "gpu_budget": gpu_budget, "ms_per_step": statistics.median(times), "ms_all": times,
                     "bytes_moved_per_step": moved / (steps + 3), "kv_bytes_by_tier": by_tier,
                     "kv_bytes": cache.nbytes(), "fill_s": fill_s,
                     "gpu_peak_bytes": torch.cuda.max_memory_allocated()})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "ms_all"}), flush=True)
        cache.close()
        del cache, runner
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        same = [b for b in ok if b["kv"] == r["kv"] and b["tiers"] is None]
        if same:
            r["vs_all_gpu"] = same[0]["ms_per_step"] / r["ms_per_step"]
        fetch = [b for b in ok if b["kv"] == r["kv"] and b["attend"] == "fetch"]
        if fetch and r["tiers"]:
            r["speedup_vs_fetch"] = fetch[0]["ms_per_step"] / r["ms_per_step"]
    return rows


def exactness(shares=()) -> float:
    """Largest logit difference between the layouts on a 2-layer model at 4K tokens."""
    model = llama(2, seed=3)
    outs = []
    for _, kv, tiers, attend in layouts("16MiB", shares):
        runner = ModelRunner(model, kv, device="cuda", tiers=tiers, attend=attend)
        cache = filled(runner, 4096)
        if runner.store:
            assert cache.nbytes_by_tier()[1] > 0, "blocks should be in CPU RAM"
        outs.append(decode(runner, cache, 4, warmup=0)[0])
        cache.close()
    return max((o - outs[0]).abs().max().item() for o in outs[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="65536,131072")
    ap.add_argument("--gpu-budget", default="2GiB")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--shares", default="0.5,0.65", help="attend=split shares to measure")
    ap.add_argument("--codecs", default="", help="cache specs measured (all-gpu/local/fetch) at the first context")
    ap.add_argument("--skip-local-after-first", action="store_true", help="measure attend=local at the first context only")
    ap.add_argument("--out", default="gpu_offload.json")
    a = ap.parse_args()
    shares = [float(x) for x in a.shares.split(",") if x]
    codecs = [x for x in a.codecs.split(";") if x]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    diff = exactness(shares)
    print(f"exactness: max |logit difference| between layouts = {diff:.3g}", flush=True)
    model = llama(32)
    rows = []
    for i, c in enumerate(int(x) for x in a.contexts.split(",")):
        skip = ("local",) if i and a.skip_local_after_first else ()
        rows += measure(model, c, a.gpu_budget, a.steps, shares, codecs if i == 0 else (), skip)
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "cpu_threads": torch.get_num_threads(),
                       "exactness_max_logit_diff": diff, "results": rows}, f, indent=1)
    for r in rows:
        if "error" in r:
            print(f"{r['context']:>7} {r['layout']:>28} failed: {r['error']}")
            continue
        print(f"{r['context']:>7} {r['layout']:>28} {r['ms_per_step']:8.1f} ms/step "
              f"({r.get('vs_all_gpu', float('nan')):.2f}x all-gpu, {r.get('speedup_vs_fetch', float('nan')):.2f}x fetch) "
              f"moved {r['bytes_moved_per_step'] / 2**30:.2f} GiB/step")


if __name__ == "__main__":
    main()
