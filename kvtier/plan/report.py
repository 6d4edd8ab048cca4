"""``kvtier plan``'s output: tables on the terminal, a JSON record, a roofline PNG."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvtier.errors import KvtierError
from kvtier.kv.tiers import format_size, parse_size
from kvtier.plan import decide, distributed
from kvtier.plan import hardware as hwmod
from kvtier.plan.costs import Cost, Step, cost, parse_tiers
from kvtier.plan.shapes import shape

console = Console(width=160)


def _num(x: float) -> str:
    for unit, k in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= k:
            return f"{x / k:.2f}{unit}"
    return f"{x:.0f}"


def ops_table(c: Cost) -> Table:
    s = c.step
    title = (f"{s.phase} step: {s.model.name}, {s.context:,} tokens x {s.batch}, kv {s.kv}, weights "
             f"{s.weights}, {s.dtype}" + (f", tiers {s.tiers}" if s.tiers else "") + f" on {c.hardware.name}")
    t = Table(title=title)
    for col in ("operation", "device", "bytes", "FLOPs", "Op/B", "predicted ms", "share", "bound", "detail"):
        t.add_column(col, justify="left" if col in ("operation", "device", "bound", "detail") else "right")
    total = c.seconds
    for op in c.ops:
        t.add_row(op.name, op.device, _num(op.bytes) if op.bytes else "-", _num(op.flops) if op.flops else "-",
                  f"{op.op_b:.2f}" if op.bytes and op.flops else "-", f"{op.seconds * 1e3:.2f}",
                  f"{op.seconds / total:.0%}", op.bound, op.detail)
    t.add_row("step", "", _num(sum(o.bytes for o in c.ops)), _num(sum(o.flops for o in c.ops)), "",
              f"{total * 1e3:.2f}", "100%", "", f"{c.tok_s:,.1f} tok/s predicted")
    return t


def passes_table(c: Cost) -> Table:
    t = Table(title="attention passes over the held KV (FuseMax's bound: one pass)")
    for col in ("kernel", "passes", "lower bound", "buffer between passes", "held KV", "how"):
        t.add_column(col)
    for p in c.passes:
        t.add_row(p["kernel"], str(p["passes"]), str(p["lower_bound_passes"]), format_size(p["buffer_bytes"]),
                  format_size(p["bytes_read"]), p["note"])
    return t


def tiers_line(c: Cost) -> str:
    parts = [f"{k} {format_size(b)}" for k, b in zip(c.tier_kinds, c.kv_by_tier)]
    return f"KV held: {format_size(c.kv_bytes)} ({', '.join(parts)})"


def roofline(path: str, c: Cost) -> None:
    """Each device's roofline (min(peak, bandwidth x Op/B)) and each operation at its Op/B and
    achieved FLOP/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    xs = [10 ** (i / 10) for i in range(-30, 41)]
    for name, dev in c.hardware.devices.items():
        peak, bw = dev.flops(c.step.dtype), dev.bandwidth(c.hardware.threads)
        ax.plot(xs, [min(peak, bw * x) for x in xs], label=f"{name}: {bw / 1e9:.0f} GB/s, {peak / 1e12:.2f} TFLOP/s")
    for op in c.ops:
        if op.flops and op.bytes and op.seconds:
            ax.scatter([op.op_b], [op.flops / op.seconds], s=40)
            ax.annotate(op.name, (op.op_b, op.flops / op.seconds), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Op/B (FLOPs per byte moved)")
    ax.set_ylabel("FLOP/s (achieved, predicted)")
    ax.set_title(f"roofline: {c.step.model.name} {c.step.phase}, {c.step.context:,} tokens x {c.step.batch}, "
                 f"{c.step.kv}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def validation_table(v: dict) -> Table:
    t = Table(title="predicted against measured decode tok/s")
    for col in ("file", "kind", "model", "kv", "context", "weights", "attend", "pages", "measured", "predicted",
                "error"):
        t.add_column(col, justify="right" if col in ("context", "measured", "predicted", "error") else "left")
    for r in v["rows"]:
        t.add_row(Path(r["file"]).name, r["kind"], r["model"], r["kv"], str(r["context"]), r["weights"],
                  str(r["attend"] or "-"), str(r["page_cache"] or "-"), f"{r['measured_tok_s']:.2f}",
                  f"{r['predicted_tok_s']:.2f}", f"{r['error'] * 100:+.0f}%")
    return t


def _write(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, default=str))


def run(cfg, files: list[str]) -> None:
    """The whole `kvtier plan` command for a :class:`~kvtier.config.PlanConfig`."""
    if cfg.probe:
        from kvtier.plan.probe import probe

        folder = Path(cfg.tier_folder).expanduser() if cfg.tier_folder else None
        if folder is not None and not folder.is_dir():
            raise KvtierError(f"--tier-folder {folder} is not a folder")
        hw = probe(folder, progress=lambda m: console.print(f"[dim]probe: {m}[/dim]"))
        hw.save(hwmod.probed_path())
        console.print(f"probed this machine: cached in {hwmod.probed_path()} (--hardware this)")
        if not (cfg.validate or files):
            _show_hardware(hw)
            return
    if cfg.validate or files:
        if not files:
            raise KvtierError("--validate needs bench JSON files: kvtier plan --validate results/speed_*.json")
        from kvtier.plan.validate import validate

        v = validate([Path(f) for f in files], cfg.hardware)
        console.print(validation_table(v))
        s = v["summary"]
        acc = s["attend_choice_accuracy"]
        console.print(f"{s['rows']} rows: median |error| of predicted decode tok/s "
                      f"{s['median_abs_error'] * 100:.1f} %; fastest attend mode predicted right in "
                      + (f"{acc * 100:.0f} % of {s['attend_configurations']} configurations" if acc is not None
                         else "no configuration (no row compares attend modes)")
                      + (f"; skipped: {', '.join(f'{n} {k}' for k, n in v['skipped'].items())}"
                         if v["skipped"] else ""))
        if cfg.json:
            _write(cfg.json, v)
        return
    hw = hwmod.load(cfg.hardware)
    if cfg.hardware == "this" and not hwmod.probed_path().exists():
        console.print("[dim]no probe of this machine yet: using the shipped cpu-2core file "
                      "(run kvtier plan --probe to measure this one)[/dim]")
    step = Step(shape(cfg.model), cfg.context, cfg.batch, cfg.kv, cfg.weights, cfg.dtype, cfg.tiers, (),
                cfg.phase, cfg.chunk, cfg.page_cache)
    decisions = []
    if cfg.tiers:
        from kvtier.kv import tiers as tierspec

        if cfg.attend == "auto":
            shares, d = decide.attend(step, hw)
            decisions.append(d)
        else:
            _, share = tierspec.parse_attend(cfg.attend)
            shares = (share,) * (len(parse_tiers(cfg.tiers)) - 1)
        step = replace(step, attend=tuple(shares))
    c = cost(step, hw)
    console.print(ops_table(c))
    console.print(passes_table(c))
    console.print(tiers_line(c))
    decisions.append(decide.devices(step, hw))
    if "pim" in hw.devices:  # NeuPIMs / Duplex: GEMV-like work on the PIM, GEMM-like on the xPU
        other, big = "pim", "gpu" if "gpu" in hw.devices else "cpu"
        x = decide.crossover_batch(step, hw, other, big)
        decisions.append(decide.Decision(
            "gemv/gemm split", f"weight matmuls on {big} from batch {x}" if x else f"weight matmuls on {other}",
            f"below batch {x} the weight matmuls are GEMV-like (low Op/B) and {other} is faster; from "
            f"{x} on they are GEMM-like and {big} is" if x else f"{other} is faster at every batch tried (to 4096)"))
    if cfg.kv_budget:
        decisions.append(decide.codec(step, hw, parse_size(cfg.kv_budget), cfg.ppl_bound / 100,
                                      Path(cfg.ppl) if cfg.ppl else None))
    if cfg.slo_tpot:
        decisions.append(decide.batch(step, hw, cfg.slo_tpot / 1000))
    for d in decisions:
        console.print(f"[bold]{d.what}[/bold]: {d.choice} — {d.because}")
    sim = []
    machines = cfg.machines or hw.machines
    if machines > 1:
        counts = sorted({1, *[m for m in (2, 4, 8, 16, 32) if m <= machines], machines})
        contexts = sorted({cfg.context, 131072, 262144, 524288, 1048576})
        sim = distributed.table(replace(step, tiers=None, attend=()), replace(hw, machines=machines),
                                contexts, counts)
        t = Table(title=f"SIMULATION, not measured: {step.model.name}'s KV split across machines "
                        f"(DistAttention), network {hw.network / 1e9:.0f} GB/s")
        for col in ("context", "machines", "step ms", "tok/s", "attention ms", "network ms", "KV per machine",
                    "fits"):
            t.add_column(col, justify="right")
        for r in sim:
            t.add_row(f"{r['context']:,}", str(r["machines"]), f"{r['step_ms']:.1f}", f"{r['tok_s']:.2f}",
                      f"{r['attention_ms']:.1f}", f"{r['network_ms']:.2f}", format_size(r["kv_bytes_per_machine"]),
                      "yes" if r["fits"] else "no")
        console.print(t)
    if cfg.plot:
        roofline(cfg.plot, c)
    if cfg.json:
        _write(cfg.json, {"step": {k: v for k, v in vars(step).items() if k != "model"} | {"model": step.model.name},
                          "hardware": c.hardware.name, "hardware_source": c.hardware.source,
                          "ops": [o.row() for o in c.ops], "step_s": c.seconds, "tok_s": c.tok_s,
                          "kv_bytes": c.kv_bytes, "kv_bytes_by_tier": dict(zip(c.tier_kinds, c.kv_by_tier)),
                          "attention_passes": c.passes, "decisions": [d.row() for d in decisions],
                          "simulation": sim})


def _show_hardware(hw) -> None:
    t = Table(title=f"{hw.name} ({hw.source})")
    for col in ("device", "measure", "value"):
        t.add_column(col)
    for name, d in hw.devices.items():
        for th, bw in d.mem_bw.items():
            t.add_row(name, f"memory read, {th} threads" if th else "memory read", f"{bw / 1e9:.1f} GB/s")
        for k, v in d.peak.items():
            t.add_row(name, f"matmul {k}", f"{v / 1e12:.2f} TFLOP/s")
        for k, v in d.gemv.items():
            t.add_row(name, f"matrix-vector, {k} weights", f"{v / 1e9:.1f} GB/s")
        for k, v in d.attend.items():
            t.add_row(name, f"decode attention, {k}", f"{v / 1e9:.2f} GB/s")
        t.add_row(name, "per dispatched operation", f"{d.launch * 1e6:.1f} us")
    if hw.disk:
        t.add_row("disk", "mapped reads, warm / cold", f"{hw.disk.warm / 1e9:.2f} / {hw.disk.cold / 1e9:.2f} GB/s")
        t.add_row("disk", "sequential reads, cold", f"{hw.disk.cold_read / 1e9:.2f} GB/s")
    for li in hw.links:
        t.add_row(f"{li.src}->{li.dst}", "copy pinned / pageable",
                  f"{li.pinned / 1e9:.1f} / {li.pageable / 1e9:.1f} GB/s")
    console.print(t)

