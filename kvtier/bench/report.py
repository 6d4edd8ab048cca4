"""Benchmark output: a table on the terminal, a JSON record, a PNG plot."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvtier.errors import KvtierError


def ppl_table(rows: list[dict]) -> Table:
    t = Table(title="perplexity with a compressed cache (same windows, same run)")
    for col in ("model", "context", "method", "PPL", "dense PPL", "ΔPPL", "KV B/token",
                "bits/elem", "decode tok/s", "vs dense"):
        t.add_column(col, justify="left" if col in ("model", "method") else "right")
    for r in rows:
        t.add_row(r["model"], str(r["context"]), label(r), f"{r['ppl']:.4f}",
                  f"{r['dense_ppl']:.4f}", f"{100 * (r['ppl'] / r['dense_ppl'] - 1):+.2f}%",
                  f"{r['kv_bytes_per_token']:,.1f}", _bits(r), f"{r['decode_tok_s']:.1f}",
                  f"{r['decode_tok_s'] / r['dense_decode_tok_s']:.2f}x")
    return t


def label(r: dict) -> str:
    """A row's method, marked when it is a peer (another tool measured the same way)."""
    name = r.get("method", r.get("kv"))
    if r.get("weights") not in (None, "dense", "peer"):
        name += f", {r['weights']} weights"
    if r.get("skip_layers"):
        name += f", {r['skip_layers']:.0%} of layers skipped"
    return f"{name} (peer)" if r.get("peer") else name


def _bits(r: dict) -> str:
    return f"{r['bits_per_element']:.2f}" if "bits_per_element" in r else "-"


def speed_table(rows: list[dict]) -> Table:
    t = Table(title="speed: kvtier vs transformers generate + DynamicCache (medians, same run)")
    for col in ("model", "dtype", "kv", "context", "prefill tok/s", "tf prefill", "ratio",
                "decode tok/s", "tf decode", "ratio", "vs first", "MB/step", "of read BW"):
        t.add_column(col, justify="left" if col in ("model", "dtype", "kv") else "right")
    for r in (r for r in rows if not r.get("peer")):
        share = r.get("bandwidth_share")
        t.add_row(r["model"], r["dtype"], label(r), str(r["context"]), f"{r['kvtier_prefill_tok_s']:.1f}",
                  f"{r['transformers_prefill_tok_s']:.1f}", f"{r['prefill_ratio']:.2f}x",
                  f"{r['kvtier_decode_tok_s']:.2f}", f"{r['transformers_decode_tok_s']:.2f}",
                  f"{r['decode_ratio']:.2f}x", f"{r.get('vs_first', 1.0):.2f}x",
                  f"{r['bytes_per_step'] / 1e6:,.0f}" if "bytes_per_step" in r else "-",
                  f"{share:.0%} of {r['stream_gb_s']:.1f} GB/s" if share is not None else "-")
    return t


def profile_table(rows: list[dict]) -> Table:
    """``bench speed --profile``: one decode step split by part, in ms and as a share."""
    parts = list(dict.fromkeys(p for r in rows for p in r.get("profile_ms", {}) if p != "step"))
    t = Table(title="where a decode step goes (ms per step, one profiled run after the timed ones)")
    for col in ("model", "kv", "context", "step", *parts):
        t.add_column(col, justify="left" if col in ("model", "kv") else "right")
    for r in (r for r in rows if "profile_ms" in r):
        p = r["profile_ms"]
        t.add_row(r["model"], label(r), str(r["context"]), f"{p['step']:.1f}",
                  *(f"{p.get(x, 0):.1f} ({p.get(x, 0) / p['step']:.0%})" for x in parts))
    return t


def peer_speed_table(rows: list[dict]) -> Table:
    """Peer rows of ``bench speed``: each peer against kvtier's row at the same context."""
    t = Table(title="speed: peers on the same prompts (medians, same run; ratio = kvtier / peer)")
    for col in ("model", "peer", "weights", "context", "prefill tok/s", "kvtier prefill", "ratio",
                "decode tok/s", "kvtier decode", "ratio"):
        t.add_column(col, justify="left" if col in ("model", "peer", "weights") else "right")
    for r in (r for r in rows if r.get("peer")):
        t.add_row(r["model"], label(r), r["dtype"], str(r["context"]), f"{r['prefill_tok_s']:.1f}",
                  f"{r['kvtier_prefill_tok_s']:.1f}", f"{r['prefill_ratio']:.2f}x",
                  f"{r['decode_tok_s']:.2f}", f"{r['kvtier_decode_tok_s']:.2f}", f"{r['decode_ratio']:.2f}x")
    return t


def show(table: Table) -> None:
    console = Console()
    if not console.is_terminal:  # piped to a file: print whole rows, never truncate
        console = Console(width=220)
    console.print(table)


def write_json(path: str | Path, rows: list[dict], **meta) -> None:
    try:
        Path(path).write_text(json.dumps({"results": rows, **meta}, indent=2) + "\n")
    except OSError as e:
        raise KvtierError(f"cannot write --json {path}: {e.strerror}") from None


def read_json(path: str | Path) -> list[dict]:
    """The result rows of a JSON file written by :func:`write_json`."""
    try:
        rows = json.loads(Path(path).read_text())["results"]
    except OSError as e:
        raise KvtierError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise KvtierError(f"{path} is not a kvtier results file (JSON with a 'results' list)") from None
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and ("ppl" in r or "correct" in r) for r in rows):
        raise KvtierError(f"{path} holds no bench ppl or bench retrieval rows")
    return rows


def _increase(r: dict) -> float:
    return 100 * (r["ppl"] / r["dense_ppl"] - 1)


def ppl_plot(path: str | Path, rows: list[dict]) -> None:
    """Pareto plot: PPL increase against bits per KV element (everything held counted), one
    marker per method, one panel per context, the frontier (no method both smaller and
    better) drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({(r["model"], r["context"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    markers = "os^vD<>pX*hP"
    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4.2), squeeze=False)
    for ax, (model, ctx) in zip(axes[0], contexts):
        panel = [r for r in rows if (r["model"], r["context"]) == (model, ctx)]
        for r in panel:
            i = methods.index(r["method"])
            ax.scatter(r["bits_per_element"], _increase(r), label=label(r),
                       marker=markers[i % len(markers)], color=plt.cm.tab20(i % 20), s=40,
                       edgecolors="black" if r.get("peer") else "none")  # peers: outlined
        front, best = [], float("inf")
        for r in sorted(panel, key=lambda r: (r["bits_per_element"], _increase(r))):
            if _increase(r) < best:
                best = _increase(r)
                front.append((r["bits_per_element"], best))
        ax.step(*zip(*front), where="post", color="grey", lw=0.8, alpha=0.7)
        ax.set(title=f"{model} @ {ctx} tokens", xlabel="bits per KV element (measured, all held)",
               ylabel="PPL increase vs dense fp32 (%)")
        ax.set_yscale("symlog", linthresh=1.0)  # small and large increases on one axis
        ax.axhline(0, color="grey", lw=0.5)
        ax.margins(x=0.1, y=0.15)
        ax.grid(alpha=0.3)
    _save(fig, axes[0], path)


def offload_table(rows: list[dict]) -> Table:
    """``bench offload``: each tier layout against all in RAM (same run)."""
    from kvtier.kv.tiers import format_size

    t = Table(title="decode with the KV cache on tiers vs all in RAM (medians, same run; one process per row)")
    for col in ("model", "context", "method", "tiers", "RAM budget", "KV/RAM", "attend", "prefetch", "pages",
                "decode tok/s", "vs RAM", "auto vs best fixed", "moved B/tok", "disk read B/tok", "peak RSS",
                "KV on disk"):
        t.add_column(col, justify="left" if col in ("model", "method", "attend") else "right")
    for r in rows:
        tiered = r["kv_to_ram_budget"] is not None
        kinds = "RAM" if not tiered else "+".join(x.split(":")[0] for x in r["tiers"].split(","))
        t.add_row(r["model"], str(r["context"]), r["method"] + (f" ({r['new_tokens']} tokens)" if r.get("rss_run") else ""),
                  kinds, format_size(r["ram_budget_bytes"]) if tiered else "-",
                  f"{r['kv_to_ram_budget']:.1f}x" if tiered else "-",
                  (r.get("attend_chosen") or r["attend"]) if r["attend"] == "auto" else r["attend"] or "-",
                  "-" if r["prefetch"] is None else ("on" if r["prefetch"] else "off"), r.get("page_cache") or "-",
                  f"{r['decode_tok_s']:.2f}", f"{r['vs_ram']:.2f}x",
                  f"{r['auto_vs_best_fixed']:.2f}x" if "auto_vs_best_fixed" in r else "-",
                  f"{r['bytes_moved_per_token']:,.0f}",
                  f"{r['disk_read_per_token']:,.0f}", format_size(r["peak_rss_bytes"]),
                  format_size(r["kv_bytes_by_tier"][-1]) if r["kv_bytes_by_tier"] else "-")
    return t


def offload_plot(path: str | Path, rows: list[dict]) -> None:
    """Decode tok/s against KV/RAM-budget ratio, one line per method x attend x prefetch, the
    all-in-RAM speed as a dashed line; one panel per model and context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = sorted({(r["model"], r["context"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    for ax, (model, ctx) in zip(axes[0], panels):
        panel = [r for r in rows if (r["model"], r["context"]) == (model, ctx) and not r.get("rss_run")]
        for i, method in enumerate(dict.fromkeys(r["method"] for r in panel)):
            ram = next(r for r in panel if r["method"] == method)["ram_decode_tok_s"]
            ax.axhline(ram, color=plt.cm.tab10(i), ls="--", lw=0.8, label=f"{method}: all in RAM")
            lines = {}
            for r in panel:
                if r["method"] == method and r["kv_to_ram_budget"] is not None:
                    key = (f"{method}: recompute" if r["prefetch"] is None else
                           f"{method}: {r['attend']}, prefetch {'on' if r['prefetch'] else 'off'}, {r['page_cache']}")
                    lines.setdefault(key, []).append((r["kv_to_ram_budget"], r["decode_tok_s"]))
            for j, (key, pts) in enumerate(lines.items()):
                pts.sort()
                ax.plot(*zip(*pts), marker="os^vDx<>"[j % 8], color=plt.cm.tab10(i),
                        ls=["-", ":", "-.", (0, (5, 1))][j % 4], label=key)
        ax.set_xscale("log")
        ticks = sorted({round(r["kv_to_ram_budget"], 1) for r in panel if r["kv_to_ram_budget"]})
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(title=f"{model} @ {ctx} tokens", xlabel="KV bytes / RAM budget", ylabel="decode tok/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    _save(fig, axes[0], path)


def _save(fig, axes, path: str | Path) -> None:
    """One legend for all panels (each label once) outside them at the right, then write the
    PNG, widened to the longest label."""

    legend = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    fig.tight_layout()
    fig.legend(list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(1.0, 0.5),
               fontsize=7, frameon=False)
    _write(fig, path, 120)


def _write(fig, path: str | Path, dpi: int) -> None:
    """Write the PNG (one-line error when the path is not writable) and free the figure."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    except OSError as e:
        raise KvtierError(f"cannot write --plot {path}: {e.strerror}") from None
    finally:
        plt.close(fig)


def retrieval_table(summary: list[dict]) -> Table:
    t = Table(title="retrieval with a compressed cache (same cases; bytes held after compression vs dense)")
    for col in ("model", "mode", "method", "correct", "accuracy", "bytes vs dense", "read/step",
                "same outcome as kvpress"):
        t.add_column(col, justify="left" if col in ("model", "mode", "method") else "right")
    for s in sorted(summary, key=lambda s: (s["model"], s["mode"], s["peer"], -s["bytes_ratio"], s["method"])):
        agree = f"{100 * s['agree_with_kvpress']:.0f}%" if "agree_with_kvpress" in s else "-"
        t.add_row(s["model"], s["mode"], label(s), f"{s['correct']}/{s['cases']}",
                  f"{100 * s['correct'] / s['cases']:.0f}%", f"{s['bytes_ratio']:.3f}",
                  f"{s['read_share']:.3f}" if "read_share" in s else "-", agree)
    return t


def retrieval_heatmap(path: str | Path, rows: list[dict]) -> None:
    """Accuracy per needle depth (rows) and context length (columns), one panel per method and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["depth"] is not None]
    panels = sorted({(r["mode"], label(r)) for r in rows})
    if not panels:
        raise KvtierError("--plot: these cases have no depth and length (a --cases file); nothing to draw")
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["context_tokens"] for r in rows})
    cols = min(4, len(panels))
    n_rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.2 * cols, 2.9 * n_rows), squeeze=False)
    for ax, (mode, name) in zip(axes.flat, panels):
        grid = [[0.0] * len(lengths) for _ in depths]
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                got = [r["correct"] for r in rows if (r["mode"], label(r)) == (mode, name)
                       and r["depth"] == d and r["context_tokens"] == n]
                grid[i][j] = sum(got) / len(got) if got else float("nan")
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths], fontsize=7)
        ax.set_title("\n".join(textwrap.wrap(name, 48)) + f"\n{mode}", fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.supxlabel("context length")
    fig.supylabel("needle depth")
    fig.tight_layout()
    _write(fig, path, 110)


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def serve_table(rows: list[dict]) -> Table:
    """``bench serve``: one row per server x kv x load (same prompts for every server)."""
    from kvtier.kv.tiers import format_size

    t = Table(title="serving: streamed greedy chat requests against each server (same prompts, same run; "
                    "latencies in seconds)")
    for col in ("server", "kv", "load", "done", "failed", "out tok/s", "req/s", "TTFT p50", "p90", "p99",
                "TPOT p50", "p90", "ITL p90", "goodput", "peak RSS", "peak KV", "prefix hits"):
        t.add_column(col, justify="left" if col in ("server", "kv", "load") else "right",
                     overflow="fold" if col == "kv" else "ellipsis")  # a spec is long: wrap it whole
    for r in rows:
        load = f"{r['concurrency']} at once" if r["concurrency"] else f"{r['rate']:g} req/s"
        t.add_row(r["server"], r["kv"], load, f"{r['completed']}/{r['requests']}", str(r["failed"]),
                  f"{r['output_tok_s']:.1f}", f"{r['req_s']:.2f}", _secs(r["ttft_p50_s"]),
                  _secs(r["ttft_p90_s"]), _secs(r["ttft_p99_s"]), _secs(r["tpot_p50_s"]),
                  _secs(r["tpot_p90_s"]), _secs(r["itl_p90_s"]), f"{r['goodput_req_s']:.2f}",
                  format_size(r["peak_rss_bytes"]) if r["peak_rss_bytes"] else "-",
                  format_size(r["kv_bytes_peak"]) if r["kv_bytes_peak"] is not None else "-",
                  f"{r['prefix_hit_rate']:.0%}" if r.get("prefix_hit_rate") is not None else "-")
    return t


def serve_plot(path: str | Path, rows: list[dict]) -> None:
    """Output tok/s against p90 TTFT (left) and p90 TPOT (right), one line per server x kv
    through its concurrencies (each point marked with N); open-loop rows as their own line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), squeeze=False)
    lines: dict[str, list[dict]] = {}
    for r in rows:
        if r["completed"]:
            kind = "" if r["concurrency"] else ", Poisson"
            lines.setdefault(f"{r['server']} {r['kv']}{kind}", []).append(r)
    for i, (name, pts) in enumerate(lines.items()):
        pts.sort(key=lambda r: r["concurrency"] or r["rate"])
        for ax, key in zip(axes[0], ("ttft_p90_s", "tpot_p90_s")):
            xy = [(r[key], r["output_tok_s"], r) for r in pts if r[key] is not None]
            if not xy:
                continue
            ax.plot([x for x, _, _ in xy], [y for _, y, _ in xy], marker="os^vDx<>"[i % 8],
                    color=plt.cm.tab10(i % 10), label=name)
            for x, y, r in xy:
                ax.annotate(f"{r['concurrency']}" if r["concurrency"] else f"{r['rate']:g}/s", (x, y),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    for ax, what in zip(axes[0], ("time to first token, p90 (s)", "time per output token, p90 (s)")):
        ax.set(xlabel=what, ylabel="output tok/s")
        ax.set_xscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 0.2, 2, 20: not 2x10^-1
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=6)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].set_title("throughput vs TTFT as concurrency grows")
    axes[0][1].set_title("throughput vs TPOT as concurrency grows")
    _save(fig, axes[0], path)
