"""The ray: tier at a long context: decode speed and the bytes that cross the network per step,
``attend=local`` (DistAttention: the holder attends its blocks, only the pieces come back)
against ``attend=fetch`` (the blocks come back), beside the same cache all in RAM.

It starts a two-node Ray cluster on this machine (two raylets, one CPU each, small object
stores; ``ray.cluster_utils.Cluster``), so the holder runs in another node's process, and
stops it after. Timings: median ms per decode step over ``--steps`` steps, the three layouts in
turn ``--rounds`` times (ratios within the same run).

    .venv/bin/python scripts/bench_ray_tier.py --context 8192 --kv "int(bits=4)" --json results/ray_tier_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvtier.bench import data
from kvtier.engine import ModelRunner
from kvtier.models import load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--kv", default="int(bits=4)")
    ap.add_argument("--weights", default="q4")
    ap.add_argument("--local", default="8MiB", help="the cpu tier's budget: the rest goes to ray:")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    torch.set_num_threads(1)  # the other core is the holder's node
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 << 20,
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=200 << 20)
    ray.init(address=cluster.address, namespace="kvtier", logging_level="ERROR", log_to_driver=False)
    try:
        loaded = load("smollm2-135m", torch.bfloat16, weights=a.weights)
        ids = loaded.tokenizer(data.load_text("kjv")[:400_000], add_special_tokens=False).input_ids
        prompt, nxt = ids[:a.context], ids[a.context: a.context + a.steps]
        layouts = {"all in RAM": None, "ray local": "local", "ray fetch": "fetch"}
        runners, caches = {}, {}
        for name, attend in layouts.items():
            tiers = None if attend is None else f"cpu:{a.local},ray:4GiB"
            runners[name] = ModelRunner(loaded.model, a.kv, tiers=tiers, attend=attend or "local")
        times = {name: [] for name in layouts}
        traffic = {}
        for r in range(a.rounds):
            for name, runner in runners.items():
                cache = runner.new_cache()
                runner.feed([cache], [prompt])
                store = runner.store
                before = dict(store.traffic.by_kind) if store else {}
                steps = []
                for t in nxt:
                    t0 = time.perf_counter()
                    runner.feed([cache], [[t]])
                    steps.append(time.perf_counter() - t0)
                times[name].append(statistics.median(steps) * 1e3)
                if store is not None:
                    after = store.traffic.by_kind
                    moved = {k: (after.get(k, 0) - before.get(k, 0)) / len(nxt) for k in after}
                    traffic[name] = {"by_kind_per_step": moved, "remote_bytes": store.used[1],
                                     "local_bytes": store.used[0],
                                     "network_bytes_per_step": sum(moved.get(k, 0) for k in ("ray attend", "fetch", "cpu->ray"))}
                cache.close()
                print(f"round {r + 1} {name}: {times[name][-1]:.1f} ms/step", flush=True)
        base = statistics.median(times["all in RAM"])
        rows = []
        for name in layouts:
            ms = statistics.median(times[name])
            row = {"layout": name, "kv": a.kv, "weights": a.weights, "context": a.context,
                   "ms_per_step": ms, "tok_s": 1e3 / ms, "vs_all_in_ram": base / ms, "rounds_ms": times[name],
                   **traffic.get(name, {})}
            rows.append(row)
            net = row.get("network_bytes_per_step")
            print(f"{name:>11}: {ms:7.1f} ms/step ({1e3 / ms:5.1f} tok/s, {base / ms:.2f}x all in RAM)"
                  + (f", network {net / 1e3:,.1f} KB/step, {row['remote_bytes'] / 2**20:.1f} MiB on ray:"
                     if net is not None else ""))
        local, fetch = rows[1], rows[2]
        print(f"local/fetch: network bytes {local['network_bytes_per_step'] / fetch['network_bytes_per_step']:.4f}, "
              f"speed {fetch['ms_per_step'] / local['ms_per_step']:.2f}x")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"results": rows, "note": "two-node Ray cluster on one 2-core machine; main process "
                           "1 thread, holder on the other node"}, f, indent=2)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
