"""``kvtier plan --validate``: predict every measured row of kvtier's own bench JSON and compare.

It reads ``bench speed`` rows (``kvtier_decode_tok_s``), ``bench offload`` rows
(``decode_tok_s`` with ``tiers`` / ``attend`` / ``page_cache``) and the GPU scripts' rows
(``ms_per_step``; a file whose ``device`` names an H200 is predicted on the shipped ``h200``
hardware with the Llama-3-8B shape those scripts build). Rows the model does not cover are
counted as skipped with the reason: peers, layer skipping, read-ahead, the recompute tier.

Attend choice: rows that differ only in a fixed ``attend`` mode (local, fetch, split) form a
configuration; the prediction is right when the mode it predicts fastest among the measured
ones is the measured fastest. (``auto`` rows are predicted like the mode they chose; ``bench
offload`` gives their speed over the best fixed mode as ``auto_vs_best_fixed``.)
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from kvtier.errors import KvtierError
from kvtier.kv import tiers as tierspec
from kvtier.plan import hardware as hwmod
from kvtier.plan.costs import Step, cost
from kvtier.plan.shapes import shape


def _share(attend: str | None) -> float:
    if not attend:
        return 0.0
    return tierspec.parse_attend(attend)[1]


def _rows(path: Path) -> tuple[list[dict], dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KvtierError(f"--validate {path}: cannot read it as JSON ({e})") from None
    if isinstance(data, list):
        return data, {}
    rows = data.get("results", data.get("rows"))
    if not isinstance(rows, list):
        raise KvtierError(f"--validate {path}: no 'results' rows (give JSON that kvtier bench wrote)")
    return rows, data


def predict_row(row: dict, meta: dict, hw_cpu, hw_gpu) -> tuple[dict | None, str | None]:
    """(prediction row, None) or (None, why the row is skipped)."""
    if row.get("peer"):
        return None, "peer row"
    if "ms_per_step" in row:  # the GPU scripts
        if "H200" not in str(meta.get("device", "")):
            return None, "GPU row of an unknown device"
        kv = row.get("kv") or "dense(dtype=bf16)"
        tiers = row.get("tiers")
        share = _share(row.get("attend") or (row.get("layout") if row.get("layout") in ("fetch",) else None))
        step = Step(shape("llama3-8b"), row["context"], 1, kv, "dense", "bf16", tiers, (share,) if tiers else ())
        c = cost(step, hw_gpu)
        measured = 1000.0 / row["ms_per_step"]
        mode = None if not tiers else (row.get("attend") or row.get("layout"))
        return {"kind": "gpu", "model": "llama3-8b (random weights)", "kv": kv, "context": row["context"],
                "weights": "dense", "tiers": tiers, "attend": mode, "page_cache": None,
                "measured_tok_s": measured, "predicted_tok_s": c.tok_s}, None
    if "kvtier_decode_tok_s" in row:
        if row.get("skip_layers"):
            return None, "layer skipping"
        model = shape(row["model"])
        step = Step(model, row["context"], 1, row["kv"], row.get("weights", "dense"), row["dtype"])
        c = cost(step, hw_cpu)
        return {"kind": "speed", "model": row["model"], "kv": row["kv"], "context": row["context"],
                "weights": step.weights, "tiers": None, "attend": None, "page_cache": None,
                "measured_tok_s": row["kvtier_decode_tok_s"], "predicted_tok_s": c.tok_s}, None
    if "decode_tok_s" in row and "tiers" in row:
        if row.get("prefetch"):
            return None, "read-ahead (--prefetch) is not modelled"
        if row.get("rss_run"):
            return None, "resident-memory run"
        tiers = None if row["tiers"] == "all in RAM" else row["tiers"]
        if tiers and "recompute" in tiers:
            return None, "recompute tier"
        model = shape(row["model"])
        step = Step(model, row["context"], 1, row["method"], row.get("weights", "dense"), row["dtype"], tiers,
                    (_share(row.get("attend")),) if tiers else (), page_cache=row.get("page_cache") or "warm")
        c = cost(step, hw_cpu)
        return {"kind": "offload", "model": row["model"], "kv": row["method"], "context": row["context"],
                "weights": step.weights, "tiers": tiers, "attend": row.get("attend"),
                "page_cache": row.get("page_cache"), "measured_tok_s": row["decode_tok_s"],
                "predicted_tok_s": c.tok_s}, None
    return None, "not a bench speed, bench offload or GPU script row"


def validate(paths: list[Path], hardware: str = "this") -> dict:
    """``{"rows": [...], "summary": {...}, "skipped": {reason: count}}``."""
    hw_cpu = hwmod.load(hardware)
    hw_gpu = hwmod.load("h200")
    out, skipped = [], defaultdict(int)
    for path in paths:
        rows, meta = _rows(Path(path))
        for row in rows:
            try:
                got, why = predict_row(row, meta, hw_cpu, hw_gpu)
            except KvtierError as e:
                got, why = None, str(e)
            if got is None:
                skipped[why] += 1
                continue
            got["file"] = str(path)
            got["error"] = got["predicted_tok_s"] / got["measured_tok_s"] - 1
            out.append(got)
    # attend choice: the configurations measured in more than one mode
    groups = defaultdict(list)
    for r in out:
        if r["attend"] and r["attend"] != "auto" and r["tiers"]:  # fixed modes only
            groups[(r["file"], r["model"], r["kv"], r["context"], r["tiers"], r["page_cache"])].append(r)
    choices = []
    for key, rs in groups.items():
        modes = {r["attend"] for r in rs}
        if len(modes) < 2:
            continue
        measured = max(rs, key=lambda r: r["measured_tok_s"])["attend"]
        predicted = max(rs, key=lambda r: r["predicted_tok_s"])["attend"]
        choices.append({"file": key[0], "model": key[1], "kv": key[2], "context": key[3], "tiers": key[4],
                        "page_cache": key[5], "modes": sorted(modes), "measured_fastest": measured,
                        "predicted_fastest": predicted, "right": measured == predicted})
    errors = [abs(r["error"]) for r in out]
    summary = {"rows": len(out), "median_abs_error": statistics.median(errors) if errors else None,
               "attend_choice_accuracy": (sum(c["right"] for c in choices) / len(choices)) if choices else None,
               "attend_configurations": len(choices), "hardware": hw_cpu.name, "gpu_hardware": hw_gpu.name}
    by_file = defaultdict(list)
    for r in out:
        by_file[r["file"]].append(abs(r["error"]))
    summary["median_abs_error_by_file"] = {f: statistics.median(e) for f, e in by_file.items()}
    return {"rows": out, "attend_choices": choices, "summary": summary, "skipped": dict(skipped)}
