"""Decisions the cost model makes, each returned with the numbers that made it.

- :func:`attend`: per lower tier, attend in place (``local``), copy to the first tier
  (``fetch``) or fetch a share (``split:SHARE``), the share searched on a grid. kvtier runs a
  split's copy and its in-place part one after the other today (issue 20 overlaps them), so the
  split is costed as their sum; the overlapped time ``max(copy, in place)`` is reported beside.
- :func:`devices`: which device runs the weight matmuls (GEMM-like at large batch) and the
  attention (GEMV-like at any batch) at a batch, as NeuPIMs and Duplex place them by Op/B.
- :func:`codec`: the cheapest codec whose KV fits a byte budget within a perplexity bound,
  from a ``bench ppl`` JSON or the table shipped with kvtier.
- :func:`batch`: the largest batch whose predicted decode step meets a time-per-token SLO
  and whose KV fits the tiers (or the device's memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvtier.errors import KvtierError
from kvtier.plan.costs import Step, cost, parse_tiers
from kvtier.plan.hardware import Hardware

GRID = tuple(i / 20 for i in range(21))  # split shares tried: 0, 0.05, ..., 1
PPL_TABLE = Path(__file__).parent / "ppl_table.json"  # shipped: bench ppl rows, SmolLM2 8K


@dataclass
class Decision:
    """What was chosen, why (``because``: one line with the numbers) and the alternatives."""

    what: str
    choice: str
    because: str
    options: list[dict] = field(default_factory=list)

    def row(self) -> dict:
        return {"decision": self.what, "choice": self.choice, "because": self.because, "options": self.options}


def mode_name(share: float) -> str:
    return "local" if share <= 0 else "fetch" if share >= 1 else f"split:{share:g}"


def attend(step: Step, hw: Hardware) -> tuple[tuple, Decision]:
    """The fastest placement for each lower tier of ``step.tiers`` (the others held at their
    current choice while one is searched, lowest tier first)."""
    from kvtier.plan.costs import placement

    kinds, by_tier, _ = placement(step)
    lower = len(kinds) - 1
    if lower < 1:
        return (), Decision("attend", "local", "no lower tier: every block is attended where the model runs")
    shares = [0.0] * lower
    options = []
    for t in range(lower):
        tried = []
        for sh in GRID:
            trial = list(shares)
            trial[t] = sh
            c = cost(replace(step, attend=tuple(trial)), hw)
            copy = sum(o.seconds for o in c.ops if o.kind == "transfer" and o.name.startswith("fetch"))
            fetched_attn = sum(o.seconds for o in c.ops if o.name.startswith("attention (fetched"))
            in_place = sum(o.seconds for o in c.ops if o.name.endswith("in place)"))
            rest = c.seconds - copy - fetched_attn - in_place
            overlapped = rest + max(copy + fetched_attn, in_place)
            tried.append((c.seconds, sh, overlapped))
        best = min(tried)
        shares[t] = best[1]
        for secs, sh, over in tried:
            if sh in (0.0, 1.0) or sh == best[1]:
                options.append({"tier": kinds[t + 1], "attend": mode_name(sh), "step_ms": 1e3 * secs,
                                "overlapped_step_ms": 1e3 * over})
        over_best = min(tried, key=lambda x: x[2])
        options.append({"tier": kinds[t + 1], "attend": mode_name(over_best[1]) + " (overlapped, issue 20)",
                        "step_ms": None, "overlapped_step_ms": 1e3 * over_best[2]})
    local = cost(replace(step, attend=(0.0,) * lower), hw).seconds
    fetch = cost(replace(step, attend=(1.0,) * lower), hw).seconds
    chosen = cost(replace(step, attend=tuple(shares)), hw).seconds
    names = ", ".join(f"{k}={mode_name(sh)}" for k, sh in zip(kinds[1:], shares))
    because = (f"predicted step {chosen * 1e3:.1f} ms against local {local * 1e3:.1f} ms and fetch "
               f"{fetch * 1e3:.1f} ms ({step.page_cache} page cache"
               + (f", {by_tier[1] / 2**20:.0f} MiB below the first tier)" if len(by_tier) > 1 else ")"))
    return tuple(shares), Decision("attend", names, because, options)


def devices(step: Step, hw: Hardware) -> Decision:
    """Per operation kind, the device with the least predicted time at ``step.batch``."""
    from kvtier.plan.costs import _roofline

    base = cost(step, hw)
    options, picks = [], {}
    for op in base.ops:
        if op.kind not in ("gemv", "gemm", "attention"):
            continue
        for name, dev in hw.devices.items():
            if op.kind == "attention":
                bw = dev.attend.get("dense") if name == "cpu" else None
                bw = bw or dev.bandwidth()
                fixed = 0.0
            else:
                bw = dev.gemv.get(step.weights) or dev.bandwidth()
                fixed = dev.gemv_fixed.get(step.weights, 0.0) * op.calls
            secs, bound = _roofline(op.bytes, op.flops, bw, dev.flops(step.dtype), fixed)
            options.append({"op": op.name, "device": name, "op_per_byte": op.op_b, "ms": 1e3 * secs, "bound": bound})
        best = min((o for o in options if o["op"] == op.name), key=lambda o: o["ms"])
        picks[op.name] = (best["device"], op.op_b)
    if len(hw.devices) == 1:
        return Decision("devices", "cpu", "one device on this machine: every operation runs on the CPU", options)
    mats = {n: d for n, (d, _) in picks.items() if not n.startswith("attention")}
    attn = {n: d for n, (d, _) in picks.items() if n.startswith("attention")}
    mat_ob = max((ob for n, (_, ob) in picks.items() if not n.startswith("attention")), default=0)
    attn_ob = max((ob for n, (_, ob) in picks.items() if n.startswith("attention")), default=0)
    choice = (f"matmuls on {'/'.join(sorted(set(mats.values())))}, "
              f"attention on {'/'.join(sorted(set(attn.values())))}")
    because = (f"at batch {step.batch} the weight matmuls run at Op/B {mat_ob:.1f} and attention at "
               f"{attn_ob:.1f}; each goes to the device with the least roofline time")
    return Decision("devices", choice, because, options)


def crossover_batch(step: Step, hw: Hardware, a: str, b: str, limit: int = 4096) -> int | None:
    """The smallest batch at which device ``b`` runs the weight matmuls faster than ``a``."""
    from kvtier.plan.costs import _roofline

    da, db = hw.devices[a], hw.devices[b]
    for batch in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
        if batch > limit:
            break
        c = cost(replace(step, batch=batch), hw)
        ta = tb = 0.0
        for op in c.ops:
            if op.kind in ("gemv", "gemm"):
                ta += _roofline(op.bytes, op.flops, da.gemv.get(step.weights) or da.bandwidth(),
                                da.flops(step.dtype))[0]
                tb += _roofline(op.bytes, op.flops, db.gemv.get(step.weights) or db.bandwidth(),
                                db.flops(step.dtype))[0]
        if tb < ta:
            return batch
    return None


def ppl_rows(path: Path | None) -> tuple[list[dict], str]:
    """Rows ``{method, ppl, dense_ppl}`` of a ``bench ppl`` JSON (or the shipped table)."""
    src = Path(path) if path else PPL_TABLE
    try:
        data = json.loads(src.read_text())
    except (OSError, ValueError) as e:
        raise KvtierError(f"--ppl {src}: cannot read it as a bench ppl JSON ({e})") from None
    rows = data.get("results", data) if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        raise KvtierError(f"--ppl {src}: no rows; give the JSON `kvtier bench ppl --json` wrote")
    dense = {(r.get("model"), r.get("context")): r["ppl"] for r in rows
             if str(r.get("method", "")).startswith("dense") and "ppl" in r}
    out = []
    for r in rows:
        base = r.get("dense_ppl") or dense.get((r.get("model"), r.get("context")))
        if "ppl" in r and base and "method" in r:
            out.append({"method": r["method"], "ppl": r["ppl"], "delta": r["ppl"] / base - 1,
                        "model": r.get("model"), "context": r.get("context")})
    if not out:
        raise KvtierError(f"--ppl {src}: no rows with a dense baseline at the same model and context")
    return out, str(src)


def codec(step: Step, hw: Hardware, budget: float, bound: float, ppl: Path | None = None) -> Decision:
    """The codec with the least predicted step time among those within ``bound`` (a fraction,
    0.03 = +3 % PPL) whose KV bytes at ``step.context`` fit ``budget``."""
    rows, src = ppl_rows(ppl)
    options = []
    for r in rows:
        try:
            c = cost(replace(step, kv=r["method"], tiers=None, attend=()), hw)
        except KvtierError as e:  # a selector row, or a codec the model's heads cannot take
            options.append({"kv": r["method"], "ppl_delta": r["delta"], "skipped": str(e)})
            continue
        options.append({"kv": r["method"], "ppl_delta": r["delta"], "kv_bytes": c.kv_bytes,
                        "step_ms": 1e3 * c.seconds, "fits": c.kv_bytes <= budget and r["delta"] <= bound})
    ok = [o for o in options if o.get("fits")]
    if not ok:
        return Decision("codec", "none", f"no codec in {src} fits {budget / 2**20:.1f} MiB within "
                        f"+{bound * 100:.1f} % PPL at {step.context} tokens x {step.batch}", options)
    best = min(ok, key=lambda o: (o["step_ms"], o["kv_bytes"]))
    because = (f"{best['kv_bytes'] / 2**20:.1f} MiB of KV (budget {budget / 2**20:.1f} MiB), "
               f"{best['ppl_delta'] * 100:+.2f} % PPL (bound +{bound * 100:.1f} %), predicted step "
               f"{best['step_ms']:.1f} ms: the fastest of {len(ok)} that fit (table: {src})")
    return Decision("codec", best["kv"], because, options)


def batch(step: Step, hw: Hardware, slo_s: float, memory: float | None = None, limit: int = 4096) -> Decision:
    """The largest batch with a predicted decode step at most ``slo_s`` whose KV fits
    ``memory`` bytes (default: the tiers' budgets, else the compute device's memory)."""
    from kvtier.kv import tiers as tierspec

    if memory is None:
        if step.tiers:
            memory = float(sum(t.budget for t in parse_tiers(step.tiers)))
        else:
            dev = hw.devices[hw.compute()]
            memory = dev.memory or float("inf")
    best, options, n = None, [], 1
    while n <= limit:
        c = cost(replace(step, batch=n), hw)
        fits = c.kv_bytes <= memory
        options.append({"batch": n, "step_ms": 1e3 * c.seconds, "tok_s": c.tok_s, "kv_bytes": c.kv_bytes,
                        "fits": fits, "meets_slo": c.seconds <= slo_s})
        if not fits or c.seconds > slo_s:
            break
        best = (n, c)
        n *= 2
    if best is None:
        return Decision("batch", "none", f"even one sequence misses the SLO ({options[0]['step_ms']:.1f} ms "
                        f"> {slo_s * 1e3:.1f} ms) or does not fit {tierspec.format_size(memory)}", options)
    lo, hi = best[0], n
    while hi - lo > 1:  # between the last good power of two and the first bad one
        mid = (lo + hi) // 2
        c = cost(replace(step, batch=mid), hw)
        if c.seconds <= slo_s and c.kv_bytes <= memory:
            lo, best = mid, (mid, c)
        else:
            hi = mid
    n, c = best
    why = "the next one misses the SLO" if n < limit else "the search limit"
    return Decision("batch", str(n), f"{n} sequences of {step.context} tokens: predicted step "
                    f"{c.seconds * 1e3:.1f} ms (SLO {slo_s * 1e3:.1f} ms), {c.tok_s:.0f} tok/s, KV "
                    f"{tierspec.format_size(c.kv_bytes)} of {tierspec.format_size(memory)}; {why}", options)

