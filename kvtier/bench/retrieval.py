"""Retrieval with a compressed cache: passkey and needle-in-a-haystack on real text.

A case is a context with one fact hidden at a depth, a question about it and the answer; an
answer counts when it appears in the generated text. Prompts are laid out as kvpress's
pipeline lays them out (the chat template around context and question, or BOS + context and
question + newline for a model without one), so kvtier's rows and kvpress's rows see the same
tokens. Two modes:

- ``agnostic``: the context is compressed before the question is seen; the question follows;
- ``aware``: context and question are compressed together.

Each case is prefilled once, in full precision, recording what every selector needs (the
newest queries, the attention each token received); each selector then compresses its own
copy of that state (:meth:`kvtier.kv.select.SelectKV.branch`). Specs without a selector, or
whose codec differs on Gemma's sliding layers, get a prefill of their own.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from kvtier import spec as specs
from kvtier.config import BLOCK_SIZE
from kvtier.engine import ModelRunner
from kvtier.errors import KvtierError
from kvtier.kv.blockselect import BlockSelectKV
from kvtier.kv.cache import LayerKV
from kvtier.kv.codecs.dense import Dense
from kvtier.kv.select import SelectKV
from kvtier.kv.selectors.base import Selector
from kvtier.progress import bar

WORDS = ["amber", "bright", "copper", "distant", "eager", "frozen", "golden", "hollow", "ivory",
         "jagged", "lunar", "marble", "narrow", "olive", "purple", "quiet", "rusty", "silver"]
NOUNS = ["harbor", "lantern", "meadow", "falcon", "orchard", "glacier", "compass", "violin",
         "canyon", "beacon", "thicket", "quarry", "river", "saddle", "tower", "willow"]


def make_cases(tokenizer, task: str, haystack: str, contexts: list[int], depths: list[float],
               seed: int = 0, intro: str = "", chat: bool = False) -> list[dict]:
    """One case per (context, depth): ``task`` is ``passkey`` or ``needle``; the haystack is
    cut from ``haystack`` at a different place for each case. ``intro`` (an instruction such as
    the classic passkey preamble) opens every context and counts in its length, and so do the
    tokens the chat template adds when ``chat`` lays the prompt out in it (the plain layout's
    cases are those of earlier runs)."""
    rng = random.Random(seed)
    ids = tokenizer(haystack, add_special_tokens=False).input_ids
    cases = []
    for n in contexts:
        for depth in depths:
            if task == "passkey":
                key = str(rng.randint(10000, 99999))
                fact = f" The pass key is {key}. Remember it. {key} is the pass key. "
                question, lead = "What is the pass key?", "The pass key is"
            elif task == "needle":
                key, word = str(rng.randint(1000000, 9999999)), f"{rng.choice(WORDS)}-{rng.choice(NOUNS)}"
                fact = f" One of the special magic numbers for {word} is: {key}. "
                question = f"What is the special magic number for {word} mentioned in the provided text?"
                lead = f"The special magic number for {word} mentioned in the provided text is"
            else:
                raise KvtierError(f"unknown task {task!r}: use passkey or needle")
            bare = {"context": intro + fact, "question": question, "answer_prefix": lead}
            extra = sum(map(len, prompt(tokenizer, bare, "agnostic", chat))) - sum(map(len, prompt(
                tokenizer, bare, "agnostic", False)))  # the chat template's own tokens
            room = n - len(tokenizer(intro + fact + question + lead, add_special_tokens=False).input_ids) - 40 - extra
            if room < 64 or len(ids) < room:
                raise KvtierError(f"--context {n} is too short for a {task} case (or the haystack too small)")
            at = rng.randrange(0, len(ids) - room + 1)
            text = tokenizer.decode(ids[at: at + room])
            cut = int(len(text) * depth / 100)
            stop = text.find(". ", cut)  # the fact goes between two sentences
            cut = len(text) if depth >= 100 or stop < 0 else stop + 1
            cases.append({"task": task, "context_tokens": n, "depth": depth,
                          "context": intro + text[:cut] + fact + text[cut:] + "\n",
                          "question": question, "answer_prefix": lead, "answer": key})
    return cases


def read_cases(path: str) -> list[dict]:
    """A user's cases: JSON lines with ``context``, ``question`` and ``answer`` (and optionally
    ``answer_prefix``, the start of the answer written after the assistant's turn begins)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise KvtierError(f"--cases {path}: no such file (JSON lines with context, question, answer)")
    cases = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            case = json.loads(line)
        except json.JSONDecodeError as e:
            raise KvtierError(f"--cases {path} line {n}: not JSON ({e.msg})") from None
        missing = [k for k in ("context", "question", "answer") if not isinstance(case.get(k), str)]
        if missing:
            raise KvtierError(f"--cases {path} line {n}: needs string fields {', '.join(missing)}")
        cases.append({"task": "cases", "context_tokens": None, "depth": None} | case)
    if not cases:
        raise KvtierError(f"--cases {path} holds no case")
    return cases


def prompt(tokenizer, case: dict, mode: str, chat: bool = True) -> tuple[list[int], list[int]]:
    """(tokens compressed, tokens after): kvpress's layout of context and question, as plain
    text (BOS + context, then question + newline + answer prefix) or in the chat template."""
    context, question = case["context"], case["question"]
    if mode == "aware":
        context, question = context + question, ""
    if chat and getattr(tokenizer, "chat_template", None):
        sep = "#" * (len(context) + 10)
        text = tokenizer.apply_chat_template([{"role": "user", "content": context + sep}],
                                             add_generation_prompt=True, tokenize=False)
        context, suffix = text.split(sep)
    else:
        context, suffix = (tokenizer.bos_token or "") + context, "\n"
    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids
    return enc(context), enc(question + suffix + case.get("answer_prefix", ""))


@dataclass(frozen=True)
class _Record(Selector):
    """Keeps every token, records what the benchmark's selectors need (not registered)."""

    name: ClassVar[str] = "record"
    need: int = 0
    acc: bool = False
    ratio: float = 0.0
    budget: int = 0

    @property
    def queries(self) -> int:  # type: ignore[override]
        return self.need

    @property
    def accumulates(self) -> bool:  # type: ignore[override]
        return self.acc

    def target(self, n: int) -> int:
        return 1 << 62  # never compacts: a sliding layer keeps the tokens outside its window too

    def score(self, view):
        return view.pos.float()


def _branch(runner: ModelRunner, record):
    """A cache for ``runner``'s spec starting from the recorded prefill, or None when a layer
    cannot start from it (a codec on a layer without the selector)."""
    cache = runner.new_cache()
    for i, (dst, src) in enumerate(zip(cache.layers, record.layers)):
        if isinstance(dst, SelectKV):
            dst.branch(src)
        elif type(dst) is LayerKV and type(src) is LayerKV and dst.codec == src.codec:
            cache.layers[i] = copy.deepcopy(src)
        else:
            cache.close()
            return None
    return cache


def _dense_bytes(record) -> int:
    """Bytes a 16-bit dense cache holds after the recorded prefill: the baseline of every bytes
    ratio, whatever the compute dtype. With fp32 staging, and on a sliding layer (its own
    window), the recorded keys and values are stored again in such a cache and measured."""
    total = 0
    for layer in record.layers:
        if not isinstance(layer, SelectKV):
            total += layer.nbytes()
            continue
        codec = layer.kv.codec
        if codec.dtype in ("fp16", "bf16") and layer.window is None:
            total += layer.kv.nbytes()
            continue
        plain = layer.make(codec if codec.dtype != "fp32" else Dense(dtype="bf16"), layer.rope)
        plain.append(*layer._held())
        total += plain.nbytes()
        plain.close()
    return total


def _answer(runner: ModelRunner, cache, rest: list[int], eos: set[int], max_new: int) -> list[int]:
    logits = runner.feed([cache], [rest])
    out = []
    for _ in range(max_new):
        tok = int(logits[0].argmax())
        if tok in eos:
            break
        out.append(tok)
        logits = runner.feed([cache], [[tok]])
    return out


def run(loaded, model_name: str, methods: list[str], cases: list[dict], modes: list[str],
        max_new_tokens: int = 12, chat: bool = True, block_size: int = BLOCK_SIZE) -> list[dict]:
    """Every spec on every case in every mode; one row per (spec, mode, case)."""
    from kvtier.engine.engine import eos_ids

    model, tok = loaded.model, loaded.tokenizer
    parsed = {str(specs.parse(m)): specs.parse(m) for m in methods}
    runners = {label: ModelRunner(model, s, block_size) for label, s in parsed.items()}
    sels = [s.selectors[0] for s in parsed.values() if s.selectors]
    staging = Dense(dtype={torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[model.dtype])
    recorder = ModelRunner(model, specs.CacheSpec((
        _Record(need=max([s.queries for s in sels], default=0), acc=any(s.accumulates for s in sels)),
        staging)), block_size)
    eos = eos_ids(tok, model.hf_config)
    layout = "chat" if chat and getattr(tok, "chat_template", None) else "plain"  # recorded in every row
    rows = []
    for mode in modes:  # every case checked before any runs: a long one fails in seconds, not at the end
        for i, case in enumerate(cases):
            first, rest = prompt(tok, case, mode, chat)
            if len(first) + len(rest) + max_new_tokens > model.max_context:
                raise KvtierError(f"case {i} is {len(first) + len(rest)} tokens and {max_new_tokens} more are "
                                  f"generated; {model_name} allows {model.max_context}: use shorter contexts")
    with bar(len(cases) * len(modes), f"retrieval {model_name}") as step:
        for mode in modes:
            for i, case in enumerate(cases):
                first, rest = prompt(tok, case, mode, chat)
                record = recorder.new_cache()
                recorder.feed([record], [first])
                dense = _dense_bytes(record)
                for label, runner in runners.items():
                    cache = _branch(runner, record) if runner.spec.selectors else None
                    if cache is None:  # its own prefill (compressed at its end)
                        cache = runner.new_cache()
                        runner.feed([cache], [first])
                    else:
                        cache.compress()
                    held = cache.nbytes()
                    try:
                        ids = _answer(runner, cache, rest, eos, max_new_tokens)
                        read = _read_share(cache)
                    finally:
                        cache.close()
                    text = tok.decode(ids, skip_special_tokens=True)
                    rows.append(_row(label, model_name, mode, i, case, text, held, dense) | {"layout": layout}
                                | ({"read_share": read} if read is not None else {}))
                record.close()
                step(1)
    return rows


def _read_share(cache) -> float | None:
    """With block-sparse attention: the share of the sealed KV bytes the last decode step read,
    over every layer (chosen blocks plus their key bounds; layers that read every block, such
    as dense first layers and sliding-window layers, count in full; sinks and residual
    excluded), else None."""
    if not any(isinstance(layer, BlockSelectKV) for layer in cache.layers):
        return None
    held = read = 0
    for layer in cache.layers:
        full = len(layer.slots) * layer.pool.slot_bytes()
        held += full
        read += layer.read_bytes if isinstance(layer, BlockSelectKV) else full
    return read / max(held, 1)


def _row(label, model_name, mode, i, case, text, held, dense, peer=False) -> dict:
    return {"method": label, "model": model_name, "mode": mode, "case": i, "task": case["task"],
            "context_tokens": case["context_tokens"], "depth": case["depth"], "answer": case["answer"],
            "text": text, "correct": case["answer"] in text, "kv_bytes": held, "dense_kv_bytes": dense,
            "bytes_ratio": held / dense} | ({"peer": True} if peer else {})


def summary(rows: list[dict]) -> list[dict]:
    """Accuracy and bytes held per (method, mode); agreement of kvtier rows with the same-named
    kvpress rows (the same right/wrong outcome on the same case)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["mode"]), []).append(r)
    out = []
    for (model, method, mode), rs in groups.items():
        s = {"model": model, "method": method, "mode": mode, "cases": len(rs),
             "correct": sum(r["correct"] for r in rs),
             "bytes_ratio": sum(r["bytes_ratio"] for r in rs) / len(rs), "peer": bool(rs[0].get("peer"))}
        if "read_share" in rs[0]:
            s["read_share"] = sum(r["read_share"] for r in rs) / len(rs)
        twin = groups.get((model, "kvpress:" + method, mode))
        if twin:
            same = {r["case"]: r["correct"] for r in twin}
            s["agree_with_kvpress"] = sum(same.get(r["case"]) == r["correct"] for r in rs) / len(rs)
        out.append(s)
    return out


def merge(rows: list[dict]) -> list[dict]:
    """Rows of several retrieval runs as one run: a (model, method, mode, case) seen twice is
    kept once; runs whose cases differ (another seed, length or depth) are refused."""
    cases: dict[tuple, tuple] = {}
    out: dict[tuple, dict] = {}
    for r in rows:
        case = (r["model"], r["mode"], r["case"])
        what = (r["answer"], r["context_tokens"], r["depth"])
        if cases.setdefault(case, what) != what:
            raise KvtierError(f"these runs hold different cases (case {r['case']} of {r['model']}): merge "
                              "runs made with the same --tasks, --context, --depths and --seed (or --cases)")
        out.setdefault((r["model"], r["method"], r["mode"], r["case"]), r)
    return list(out.values())


KVPRESS_PYTHON = Path(__file__).resolve().parents[2] / ".venv-kvpress" / "bin" / "python"


def kvpress_presses(methods: list[str]) -> list[dict]:
    """The kvpress press for each spec that has a same-named one: a selector over the dense
    codec (window, tova, snapkv, h2o) with a ratio, inside kvpress's ``AdaKVPress`` when the
    spec has per-head budgets (``ada``); plus kvpress without a press."""
    out = [{"press": "dense", "ratio": 0.0}]
    for m in methods:
        s = specs.parse(m)
        if not s.selectors or s.codec.name != "dense":
            continue
        sel = s.selectors[0]
        if sel.name not in ("window", "tova", "snapkv", "h2o") or sel.budget or getattr(sel, "recent", 0):
            continue
        if sel.name == "h2o" and getattr(sel, "ada", 0):
            continue  # kvpress's AdaKVPress does not take ObservedAttention
        extra = {"window": {"sinks": getattr(sel, "sinks", 4)},
                 "snapkv": {"window": getattr(sel, "window", 32), "kernel": getattr(sel, "kernel", 7)}}
        ada = {"ada": sel.ada} if getattr(sel, "ada", 0) else {}  # AdaKVPress around the press
        out.append({"press": sel.name, "ratio": sel.ratio, "spec": str(s)} | extra.get(sel.name, {}) | ada)
    return out


def run_kvpress(folder: Path, model_name: str, methods: list[str], cases: list[dict], modes: list[str],
                max_new_tokens: int = 12, chat: bool = True, dense: dict | None = None) -> list[dict]:
    """kvpress's presses on the same cases, in its own environment (scripts/kvpress-setup.sh);
    rows labelled ``kvpress:<the kvtier spec>``. Bytes are relative to ``dense`` (kvtier's dense
    cache per (mode, case), as in kvtier's rows) when given, else to kvpress's own dense cache;
    kvpress's own dense bytes are kept as ``own_dense_kv_bytes``. They differ on models with
    sliding-window layers: kvpress's cache holds every token there."""
    python = Path(os.environ.get("KVTIER_KVPRESS_PYTHON", KVPRESS_PYTHON))
    if not python.exists():
        raise KvtierError(f"the kvpress peer needs its own environment ({python} is missing): "
                          "run bash scripts/kvpress-setup.sh")
    presses = kvpress_presses(methods)
    for p in presses:
        p["label"] = "kvpress:" + p.get("spec", str(specs.parse("dense(dtype=bf16)")))
    with tempfile.TemporaryDirectory(prefix="kvtier-kvpress-") as tmp:
        t = Path(tmp)
        todo = [case | {"mode": mode, "max_new_tokens": max_new_tokens, "chat": chat}
                for mode in modes for case in cases]
        (t / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in todo))
        (t / "presses.json").write_text(json.dumps(presses))
        script = Path(__file__).parent / "peers" / "kvpress_run.py"
        done = subprocess.run([str(python), str(script), str(folder), str(t / "cases.jsonl"),
                               str(t / "presses.json"), str(t / "out.jsonl")], stderr=sys.stderr, check=False)
        if done.returncode:
            raise KvtierError(f"kvpress failed (exit {done.returncode}); its messages are above")
        got = [json.loads(line) for line in (t / "out.jsonl").read_text().splitlines()]
    own = {g["case"]: g["kv_bytes"] for g in got if g["label"] == presses[0]["label"]}
    rows = []
    for g in got:
        c, i = todo[g["case"]], g["case"] % len(cases)
        ref = (dense or {}).get((c["mode"], i), own[g["case"]])
        rows.append(_row(g["label"], model_name, c["mode"], i, c, g["text"], g["kv_bytes"], ref, peer=True)
                    | {"own_dense_kv_bytes": own[g["case"]]})
    return rows
