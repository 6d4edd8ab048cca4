"""Decode speed, bytes moved and resident memory with the KV cache on tiers, against all in RAM.

For each context and cache spec the document (real text) is prefilled once and saved
(:mod:`kvtier.kv.persist`); every configuration then runs in its own process — so its peak
resident memory is its own — which loads the saved cache into its tiers and decodes greedily.
The all-in-RAM configuration runs first and last in the same benchmark and its median is
``ram_decode_tok_s``. A RAM budget for a ratio r is 1/r of the cache's bytes (it must hold at
least the sink and residual buffers; the rest of it holds the newest blocks); ``kv_to_ram_budget``
is the cache's bytes at the end of decoding over that budget.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvtier.errors import KvtierError


def rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    got = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            got[key] = int(value.split()[0]) * 1024
    return got["VmRSS"], got["VmHWM"]


def reset_peak() -> None:
    """Make the peak resident memory start again from the current (Linux ``clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(job: dict) -> dict:
    """One configuration, in this process: load the saved cache into the tiers, decode."""
    import torch

    from kvtier.dtypes import compute_dtype
    from kvtier.engine import ModelRunner, sample
    from kvtier.kv import persist
    from kvtier.kv.store import TierStore
    from kvtier.models import load

    torch.set_num_threads(job["threads"])
    loaded = load(job["model"], compute_dtype(job["dtype"]))
    store = TierStore(job["tiers"], job["attend"], prefetch=job["prefetch"]) if job["tiers"] else None
    runner = ModelRunner(loaded.model, job["kv"], tiers=store)
    prefix = persist.open_prefix(job["prefix"], runner, job["model"])
    model_bytes = loaded.model.weight_bytes()
    speeds, moved, read, peaks, samples, recompute_tok_s = [], [], [], [], [], []
    for _ in range(job["repeats"]):
        cache = persist.restore(prefix, runner)
        before = rss()[0]
        reset_peak()
        m0, d0 = (store.traffic.moved, store.traffic.disk_read) if store else (0, 0)
        r0, rs0 = (store.traffic.recomputed, store.traffic.recompute_s) if store else (0, 0.0)
        tok = sample(runner.feed([cache], [prefix.token_ids[-1:]]))
        dt = 0.0
        for i in range(job["new_tokens"] - 1):
            if job.get("cold"):
                evict(cache)
            t0 = time.perf_counter()
            tok = sample(runner.feed([cache], [[int(tok)]]))
            dt += time.perf_counter() - t0
            if job["sample_every"] and (i + 1) % job["sample_every"] == 0:
                samples.append((i + 1, rss()[0]))
        n = job["new_tokens"] - 1
        if store and store.traffic.recompute_s > rs0:
            recompute_tok_s.append((store.traffic.recomputed - r0) / (store.traffic.recompute_s - rs0))
        speeds.append(n / dt)
        if store:
            moved.append((store.traffic.moved - m0) / n)
            read.append((store.traffic.disk_read - d0) / n)
        peaks.append(rss()[1])
        kv_bytes, by_tier = cache.nbytes(), cache.nbytes_by_tier() if store else None
        cache.close()
    return {"decode_tok_s": statistics.median(speeds), "decode_tok_s_runs": speeds,
            "bytes_moved_per_token": statistics.median(moved) if moved else 0.0,
            "disk_read_per_token": statistics.median(read) if read else 0.0,
            "prefetched_bytes": store.prefetcher.nbytes if store and store.prefetcher else 0,
            "peak_rss_bytes": max(peaks), "rss_before_decode_bytes": before, "model_bytes": model_bytes,
            "kv_bytes": kv_bytes, "kv_bytes_by_tier": by_tier, "rss_samples": samples,
            "recompute_tok_s": statistics.median(recompute_tok_s) if recompute_tok_s else None,
            "attend_chosen": store.describe_attend() if store else None}


def evict(cache) -> None:
    """Drop the sequence's block file from the kernel's page cache (written back first), so the
    next step reads the disk tier from the device, not from RAM ("cold")."""
    file = cache.home.file if cache.home is not None else None
    if file is not None:
        os.fdatasync(file.fd)
        os.posix_fadvise(file.fd, 0, 0, os.POSIX_FADV_DONTNEED)


def spawn(job: dict, timeout: int = 3600) -> dict:
    """Run :func:`child` in a fresh process; its last stdout line is the result."""
    r = subprocess.run([sys.executable, "-m", "kvtier.bench.offload", json.dumps(job)], capture_output=True,
                       text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise KvtierError(f"bench offload: the run {job['tiers'] or 'all in RAM'} ({job['kv']}, "
                          f"attend={job['attend']}) failed: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def prefill(loaded, kv: str, ids: list[int], path: Path) -> tuple[int, int]:
    """Prefill ``ids[:-1]`` with ``kv`` and save the cache; returns (block bytes, plain bytes)."""
    from kvtier.engine import ModelRunner
    from kvtier.kv import persist

    runner = ModelRunner(loaded.model, kv)
    cache = runner.new_cache(reserve=len(ids))
    runner.feed([cache], [ids[:-1]])
    persist.save(path, runner, cache, ids, loaded.name)
    blocks = sum(sum(layer.nbytes_by_tier()) for layer in cache.layers)
    plain = sum(layer.plain_bytes() for layer in cache.layers)
    cache.close()
    return blocks, plain


def run(loaded, dtype: str, contexts: list[int], ids: list[int], kvs: list[str], ratios: list[float],
        attends: list[str], prefetch: list[bool], folder: str, new_tokens: int = 32, repeats: int = 3,
        threads: int | None = None, progress=None, rss_tokens: int = 0, cold: list[bool] = (False,),
        recompute: bool = True) -> list[dict]:
    """Rows as documented in the module docstring (``results`` of the JSON)."""
    import torch

    from kvtier.kv.tiers import format_size
    from kvtier.progress import note

    threads = threads or torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvtier-offload-") as tmp:
        for c in contexts:
            doc = ids[: c - new_tokens]
            for n_kv, kv in enumerate(kvs):
                path = Path(tmp) / "prefix.kvcache"
                blocks, plain = prefill(loaded, kv, doc, path)
                base = {"model": loaded.name, "dtype": dtype, "kv": kv, "prefix": str(path), "threads": threads,
                        "new_tokens": new_tokens, "repeats": repeats, "sample_every": 0, "attend": "local",
                        "prefetch": False, "tiers": None}

                def done(got):
                    if progress:
                        progress()
                    return got

                ram = done(spawn(base))
                found, budgets = [], []
                disk = format_size(4 * blocks + (64 << 20))
                for r in ratios:
                    budget = int((blocks + plain) / r)
                    if budget < plain:
                        note(f"{kv} at {c} tokens: a RAM budget of 1/{r:g} of the cache ({format_size(budget)}) "
                             f"cannot hold the residual buffers ({format_size(plain)}); skipped")
                        continue
                    budgets.append((r, budget))
                    tiers = f"cpu:{budget}B,disk:{folder}:{disk}"
                    for attend in attends:
                        for pf in prefetch:
                            for is_cold in cold:
                                job = {**base, "tiers": tiers, "attend": attend, "prefetch": pf, "cold": is_cold}
                                found.append((r, budget, job, done(spawn(job))))
                    if recompute and n_kv == 0:  # a few steps: each one reruns the dropped span
                        job = {**base, "tiers": f"cpu:{budget}B,recompute", "new_tokens": min(new_tokens, 4),
                               "repeats": 1}
                        found.append((r, budget, job, done(spawn(job))))
                again = done(spawn(base))
                ram_tok_s = statistics.median(ram["decode_tok_s_runs"] + again["decode_tok_s_runs"])
                common = {"model": loaded.name, "context": c, "method": kv, "dtype": dtype, "threads": threads,
                          "new_tokens": new_tokens, "repeats": repeats, "ram_decode_tok_s": ram_tok_s}
                rows.append({**common, "tiers": "all in RAM", "attend": None, "prefetch": None, "page_cache": None,
                             "kv_to_ram_budget": None, **_fields(ram, ram_tok_s)})
                for r, budget, job, got in found:
                    dropping = job["tiers"].endswith("recompute")
                    rows.append({**common, "tiers": job["tiers"], "attend": job["attend"],
                                 "prefetch": None if dropping else job["prefetch"],
                                 "page_cache": None if dropping else ("cold" if job.get("cold") else "warm"),
                                 "new_tokens": job["new_tokens"], "repeats": job["repeats"],
                                 "kv_to_ram_budget": (blocks + plain if dropping else got["kv_bytes"]) / budget,
                                 "nominal_ratio": r, "ram_budget_bytes": budget, **_fields(got, ram_tok_s)})
                    if got["recompute_tok_s"]:  # the disk bandwidth below which recomputing wins
                        rows[-1]["break_even_disk_bytes_s"] = got["recompute_tok_s"] * (blocks + plain) / len(doc)
                if rss_tokens and budgets:
                    r, budget = budgets[-1]  # the smallest budget that ran
                    job = {**base, "tiers": f"cpu:{budget}B,disk:{folder}:{disk}", "prefetch": True, "repeats": 1,
                           "new_tokens": rss_tokens, "sample_every": max(1, rss_tokens // 20)}
                    got = done(spawn(job))
                    rows.append({**common, "tiers": job["tiers"], "attend": "local", "prefetch": True,
                                 "page_cache": "warm", "repeats": 1, "new_tokens": rss_tokens,
                                 "kv_to_ram_budget": got["kv_bytes"] / budget, "nominal_ratio": r,
                                 "ram_budget_bytes": budget, "rss_run": True, **_fields(got, ram_tok_s),
                                 "rss_samples": got["rss_samples"]})
    return against_auto(rows)


def against_auto(rows: list[dict]) -> list[dict]:
    """``attend=auto`` rows get ``auto_vs_best_fixed``: their speed over the fastest fixed
    mode (local, fetch, split) measured in the same configuration."""
    def key(r):
        return (r["model"], r["context"], r["method"], r["tiers"], r["prefetch"], r["page_cache"])

    fixed: dict = {}
    for r in rows:
        if r["attend"] and r["attend"] != "auto" and not r.get("rss_run"):
            fixed[key(r)] = max(fixed.get(key(r), 0.0), r["decode_tok_s"])
    for r in rows:
        if r["attend"] == "auto" and key(r) in fixed:
            r["auto_vs_best_fixed"] = r["decode_tok_s"] / fixed[key(r)]
    return rows


def _fields(got: dict, ram_tok_s: float) -> dict:
    return {"decode_tok_s": got["decode_tok_s"], "vs_ram": got["decode_tok_s"] / ram_tok_s,
            "bytes_moved_per_token": got["bytes_moved_per_token"],
            "disk_read_per_token": got["disk_read_per_token"], "prefetched_bytes": got["prefetched_bytes"],
            "peak_rss_bytes": got["peak_rss_bytes"], "model_bytes": got["model_bytes"],
            "kv_bytes": got["kv_bytes"], "kv_bytes_by_tier": got["kv_bytes_by_tier"],
            "decode_tok_s_runs": got["decode_tok_s_runs"], "recompute_tok_s": got["recompute_tok_s"],
            "attend_chosen": got.get("attend_chosen")}


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (threads, mappings): the result is out
