"""The ``kvtier`` command line: generate, methods, bench ppl, bench speed."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from kvtier.cli_options import command, flags, split
from kvtier.dtypes import compute_dtype, dtype_name
from kvtier.errors import KvtierError
from kvtier.config import MAX_NEW_TOKENS
from kvtier.models.loader import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run long-context LLMs on the memory you have: a compressed, tiered KV cache.")
bench = typer.Typer(no_args_is_help=True, help="Measure quality, bytes and speed side by side.")
app.add_typer(bench, name="bench")
cachecmd = typer.Typer(no_args_is_help=True, help="Save a document's KV cache once; continue from it in later runs.")
app.add_typer(cachecmd, name="cache")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="named model (smollm2-135m, gemma3-270m), HF folder or .gguf file")]
TiersOpt = Annotated[str | None, typer.Option(help="where KV blocks may live, fastest first, with byte budgets, "
                                                   "e.g. cpu:2GiB,disk:/path/to/dir:50GiB; end with ,recompute to "
                                                   "drop the coldest blocks and rebuild them from the token ids "
                                                   "(default: all in RAM)")]
WeightsOpt = Annotated[str, typer.Option(help="weight format: dense (the compute dtype), q8 (8-bit groups, "
                                              "GGUF Q8_0), q4 (4-bit groups, GGUF Q4_1; a GGUF's own Q4 "
                                              "tensors used as they are), w8a8 (int8 weights x int8 "
                                              "activations, OutlierTune), w4a8 or w4a4 (q4's weights x 8- or "
                                              "4-bit activations, summed in int32), multiplied packed")]
WeightsListOpt = Annotated[list[str] | None, typer.Option("--weights", help="weight formats to compare: dense, "
                                                          "q8, q4, w8a8, w4a8, w4a4; repeat for more (default: dense)")]
AttendOpt = Annotated[str, typer.Option(help="with --tiers: local (attention where each block lives), "
                                             "fetch (copy blocks to the first tier first), split[:SHARE] "
                                             "(fetch that share of each lower tier's blocks, attend the rest "
                                             "in place, side by side) or auto (kvtier plan's cost model "
                                             "picks per tier)")]
TEXT_HELP = ("kjv (the King James Bible), essays (Paul Graham's, from RULER's data), wiki (SQuAD's "
             "Wikipedia articles, from RULER's data) or a path to a UTF-8 text file")


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KvtierError(f"{flag} takes comma-separated integers, e.g. 2048,8192; got {text!r}") from None
    if not values or min(values) < 1:
        raise KvtierError(f"{flag} takes positive integers; got {text!r}")
    return values


def _shares(text: str, flag: str) -> list[float]:
    """Comma-separated shares in [0, 1), as a curve: 0 (the full model) first, then ascending."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KvtierError(f"{flag} takes comma-separated shares, e.g. 0.1,0.2,0.3; got {text!r}") from None
    if not values or not all(0 <= v < 1 for v in values):  # NaN fails this too
        raise KvtierError(f"{flag} takes shares of at least 0 and below 1; got {text!r}")
    return sorted({0.0, *values})


def _weight_formats(names: list[str] | None) -> list[str]:
    from kvtier import weights

    names = list(dict.fromkeys(names or ["dense"]))
    for n in names:
        weights.get(n)  # a bad name fails before any model loads
    return names


SkipOpt = Annotated[str, typer.Option("--skip-layers", help="also run with these shares of the middle layers "
                                      "skipped (layer skipping), comma-separated, e.g. 0.1,0.2,0.3")]


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt, or - to read it from stdin")],
    model: ModelOpt = DEFAULT_MODEL,
    kv: Annotated[str, typer.Option(help="KV cache spec, see `kvtier methods`")] = "dense",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate at most")] = MAX_NEW_TOKENS,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="nucleus sampling mass")] = 1.0,
    chat: Annotated[bool, typer.Option(help="wrap the prompt in the model's chat template")] = False,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    dtype: Annotated[str, typer.Option(help="compute dtype: auto (bf16 where the CPU/GPU has native bf16), fp32, bf16")] = "auto",
    weights: WeightsOpt = "dense",
    tiers: TiersOpt = None,
    attend: AttendOpt = "local",
    prefetch: Annotated[bool, typer.Option(help="with a disk tier: ask the kernel to read the next layer's "
                                            "blocks ahead (off: it did not pay on a 2-core machine)")] = False,
    cache: Annotated[str | None, typer.Option(help="continue a document saved with `kvtier cache save` "
                                                   "(the prompt follows it)")] = None,
):
    """Generate text, streaming tokens as they come; report the KV bytes held at the end."""
    from kvtier import spec as specs
    from kvtier.textio import check_text, read_text

    specs.parse(kv)  # a bad spec or bad text fails before the model loads
    prompt = read_text("-") if prompt == "-" else check_text(prompt)
    from kvtier.api import LLM

    llm = LLM(model=model, kv=kv, dtype=dtype, weights=weights, tiers=tiers, attend=attend, prefetch=prefetch)
    prefix = llm.load_cache(cache) if cache else None
    result = None
    for piece in llm.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, chat=chat, seed=seed, prefix=prefix):
        if isinstance(piece, str):
            sys.stdout.write(piece)
            sys.stdout.flush()
        else:
            result = piece
    sys.stdout.write("\n")
    n = len(result.token_ids)
    print(f"[kvtier] kv {llm.spec}: {result.kv_bytes:,} bytes held for {result.kv_tokens} tokens "
          f"({result.kv_bytes_per_token:,.0f} B/token) | prompt {result.prompt_tokens} tokens, "
          f"prefill {result.prompt_tokens / max(result.prefill_s, 1e-9):.0f} tok/s | "
          f"{n} new tokens, decode {n / max(result.decode_s, 1e-9):.1f} tok/s | weights {llm.model.weight_format} "
          f"{llm.model.weight_bytes() / 1e6:,.0f} MB | {result.finish_reason}",
          file=sys.stderr)
    if llm.runner.store:
        store = llm.runner.store
        placed = ", ".join(f"{t.kind} {b:,}" for t, b in zip(store.tiers, result.kv_bytes_by_tier))
        print(f"[kvtier] tiers {store} (attend={store.describe_attend()}): blocks at the end: {placed} bytes | "
              f"moved between tiers {store.traffic.moved:,} bytes, read from disk {store.traffic.disk_read:,} bytes"
              + (f", recomputed {store.traffic.recomputed:,} tokens in {store.traffic.recompute_s:.1f} s"
                 if store.recomputes else ""), file=sys.stderr)


@cachecmd.command("save")
def cache_save(
    document: Annotated[str, typer.Argument(help="a UTF-8 text file, or - to read stdin")],
    out: Annotated[str, typer.Argument(help="the file to write, e.g. doc.kvcache")],
    model: ModelOpt = DEFAULT_MODEL,
    kv: Annotated[str, typer.Option(help="KV cache spec, see `kvtier methods`")] = "dense",
    dtype: Annotated[str, typer.Option(help="compute dtype: auto, fp32, bf16")] = "auto",
):
    """Prefill a document once and save its (compressed) cache; then ask about it with
    `kvtier generate --cache OUT "question"`, in this run or any later one."""
    import time

    from kvtier import spec as specs
    from kvtier.textio import read_text

    specs.parse(kv)
    text = read_text(document)
    from kvtier.api import LLM

    llm = LLM(model=model, kv=kv, dtype=dtype)
    t0 = time.perf_counter()
    prefix = llm.save_cache(text, out)
    print(f"[kvtier] saved {prefix.length + 1} tokens ({llm.spec}) to {out}: {prefix.nbytes:,} bytes "
          f"({prefix.nbytes / (prefix.length + 1):,.0f} B/token) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


@cachecmd.command("info")
def cache_info(path: Annotated[str, typer.Argument(help="a file written by `kvtier cache save`")]):
    """Show what a saved cache holds and what it needs to be loaded."""
    import json
    from pathlib import Path

    from kvtier.kv import persist

    meta = persist.read_meta(Path(path))
    n = len(json.loads(meta["tokens"]))
    print(f"{path}: format {meta['format']} v{meta['version']}, model {meta['model']} "
          f"(fingerprint {meta['fingerprint']}), kv {meta['spec']}, dtype {meta['dtype']}, "
          f"block size {meta['block_size']}, {n} tokens, {Path(path).stat().st_size:,} bytes")


@app.command()
def methods():
    """List the registered KV-cache methods with their parameters, defaults and descriptions."""
    import dataclasses

    from rich.console import Console
    from rich.table import Table

    from kvtier import registry

    t = Table(title="kvtier methods (compose with +, e.g. dense(dtype=fp16))")
    for col in ("method", "kind", "parameters (default; allowed)", "description"):
        t.add_column(col)
    for name, cls in registry.methods().items():
        lines = []
        for f in registry.params(cls):
            meta = f.metadata
            allowed = "|".join(map(str, meta["choices"])) if meta.get("choices") else (
                f"{meta.get('min', '')}..{meta.get('max', '')}" if meta.get("min") is not None else "")
            default = f.default if f.default is not dataclasses.MISSING else "required"
            lines.append(f"{f.name}={default}" + (f" ({allowed})" if allowed else "") + f": {meta['help']}")
        t.add_row(name, cls.kind, "\n".join(lines) or "-", registry.describe(cls))
    Console().print(t)


@bench.command("ppl")
def bench_ppl(
    methods: Annotated[list[str], typer.Option("--methods", help="a cache spec or a peer, e.g. "
                                               "\"llamacpp(kv=q8_0)\", \"hf-quanto(bits=4)\"; repeat for more")],
    model: ModelOpt = DEFAULT_MODEL,
    context: Annotated[str, typer.Option(help="context lengths, comma-separated")] = "2048",
    eval_tokens: Annotated[int, typer.Option(min=1, help="tokens scored at the end of each window")] = 256,
    windows: Annotated[int, typer.Option(min=1, help="windows spread evenly through the text")] = 4,
    text: Annotated[str, typer.Option(help=TEXT_HELP)] = "kjv",
    json_path: Annotated[str | None, typer.Option("--json", help="write results as JSON")] = None,
    plot: Annotated[str | None, typer.Option(help="write a PNG: PPL increase vs bits per element (Pareto)")] = None,
    dtype: Annotated[str, typer.Option(help="compute dtype (fp32 isolates the cache's effect)")] = "fp32",
    skip_layers: SkipOpt = "0",
    weights: WeightsListOpt = None,
):
    """Perplexity with each cache (or peer) against the dense fp32 cache on the same tokens; with
    several --weights, every format against the first one's dense cache."""
    from kvtier.bench import data, peers, ppl, report
    from kvtier.models import load
    from kvtier.progress import status

    contexts = _ints(context, "--context")
    skips = _shares(skip_layers, "--skip-layers")
    for m in methods:  # a bad spec or a peer not installed fails before the model loads
        if isinstance(p := peers.method(m), peers.Peer):
            p.require()
    compute = compute_dtype(dtype)
    formats = _weight_formats(weights)
    raw = data.load_text(text)
    models = [load(model, compute, weights=w) for w in formats]
    with status("tokenizing the text"):
        ids = models[0].tokenizer(raw, add_special_tokens=False).input_ids
    ours = [m for m in methods if not isinstance(peers.method(m), peers.Peer)]  # peers run once
    baselines: dict = {}
    rows = [r | {"text": text} for i, m in enumerate(models)
            for r in ppl.run(m.model, model, methods if i == 0 else ours, contexts, eval_tokens, ids, windows,
                             skips=skips, reference=models[0].model, baselines=baselines)]
    report.show(report.ppl_table(rows))
    if json_path:
        report.write_json(json_path, rows)
    if plot:
        report.ppl_plot(plot, rows)


@bench.command("merge")
def bench_merge(
    files: Annotated[list[str], typer.Argument(help="JSON files written by bench ppl --json or bench retrieval --json")],
    json_path: Annotated[str | None, typer.Option("--json", help="write the rows of all files as one JSON")] = None,
    plot: Annotated[str | None, typer.Option(help="write a PNG: PPL increase vs bits per element (Pareto), "
                                             "or the retrieval heatmap")] = None,
):
    """Combine several bench ppl runs, or several bench retrieval runs on the same cases (e.g.
    peers or methods run separately), into one table, JSON and plot."""
    from kvtier.bench import report, retrieval

    rows = [r for f in files for r in report.read_json(f)]
    kinds = {"correct" in r for r in rows}
    if len(kinds) > 1:
        raise KvtierError("these files mix bench ppl and bench retrieval results: merge each kind on its own")
    if kinds == {True}:
        _retrieval_out(retrieval.merge(rows), json_path, plot)
        return
    report.show(report.ppl_table(rows))
    if json_path:
        report.write_json(json_path, rows)
    if plot:
        report.ppl_plot(plot, rows)


@bench.command("speed")
def bench_speed(
    model: ModelOpt = DEFAULT_MODEL,
    context: Annotated[str, typer.Option(help="context lengths (prompt + new tokens), comma-separated")] = "1024,8192",
    new_tokens: Annotated[int, typer.Option(min=2, help="tokens decoded per run")] = 32,
    repeats: Annotated[int, typer.Option(min=1, help="runs per side; medians are reported")] = 3,
    kv: Annotated[list[str] | None, typer.Option(help="kvtier's cache spec (default: dense in the compute "
                                                    "dtype); repeat to compare, e.g. --kv dense --kv 'int(bits=4)'")] = None,
    dtype: Annotated[str, typer.Option(help="compute dtype of both sides: auto, fp32, bf16")] = "auto",
    text: Annotated[str, typer.Option(help=TEXT_HELP)] = "kjv",
    json_path: Annotated[str | None, typer.Option("--json", help="write results as JSON")] = None,
    peer: Annotated[list[str] | None, typer.Option("--peers", help="also time a peer, e.g. "
                                                      "\"llamacpp(kv=f16)\"; repeat for more")] = None,
    skip_layers: SkipOpt = "0",
    weights: WeightsListOpt = None,
    profile: Annotated[bool, typer.Option(help="also split one decode step of each row: weight matmuls, "
                                                "attention, KV store, the rest (Python, framework)")] = False,
):
    """Prefill and decode tok/s of kvtier against transformers' generate (DynamicCache) and peers;
    each row's bytes read per step as a share of this machine's measured read bandwidth."""
    from kvtier import spec as specs
    from kvtier.bench import data, peers, report, speed
    from kvtier.models import load
    from kvtier.progress import bar

    contexts = _ints(context, "--context")
    skips = _shares(skip_layers, "--skip-layers")
    chosen = []
    for name in peer or []:
        if (p := peers.parse(name)) is None:
            raise KvtierError(f"--peers {name!r} names no peer; peers: {', '.join(peers.peers())}")
        p.require()
        chosen.append(p)
    compute = compute_dtype(dtype)
    kvs = [str(specs.parse(k)) for k in (kv or [f"dense(dtype={dtype_name(compute)})"])]
    formats = _weight_formats(weights)
    raw = data.load_text(text)
    models = [load(model, compute, weights=w) for w in formats]
    loaded = models[0]
    for c in contexts:
        if c > loaded.model.max_context or c <= new_tokens:
            raise KvtierError(f"--context {c} must be above --new-tokens {new_tokens} and at most "
                              f"{loaded.model.max_context}, the longest {model} allows")
    ids = loaded.tokenizer(raw, add_special_tokens=False).input_ids
    if len(ids) < max(contexts):
        raise KvtierError(f"the text has {len(ids)} tokens, fewer than --context {max(contexts)}")
    with bar((1 + len(models) * len(kvs) * len(skips) + len(chosen)) * repeats * len(contexts),
             f"speed {model}") as step:
        rows = speed.run(models, contexts, ids, new_tokens, repeats, kvs, progress=step, peers=chosen, skips=skips,
                         profile=profile)
    report.show(report.speed_table(rows))
    if profile:
        report.show(report.profile_table(rows))
    if chosen:
        report.show(report.peer_speed_table(rows))
    if json_path:
        report.write_json(json_path, rows)


RETRIEVAL_METHODS = ["dense"] + [f"{s}(ratio={r})" for r in (0.5, 0.75, 0.875) for s in ("window", "tova", "snapkv", "h2o")] + [
    "tova(ratio=0.5)+int(bits=4)", "snapkv(ratio=0.5)+int(bits=4)", "tova(ratio=0.75)+mxint8", "tova(ratio=0.5)+rotatekv(bits=2)"]


@bench.command("retrieval")
def bench_retrieval(
    model: ModelOpt = DEFAULT_MODEL,
    methods: Annotated[list[str] | None, typer.Option("--methods", help="cache specs, repeat for more "
                                                      "(default: dense, window/tova/snapkv/h2o at ratios "
                                                      "0.5/0.75/0.875 and four compositions with codecs)")] = None,
    tasks: Annotated[str, typer.Option(help="passkey (fact in KJV text) and/or needle (RULER-style, "
                                       "Paul Graham essays)")] = "passkey",
    context: Annotated[str, typer.Option(help="context lengths in tokens, comma-separated")] = "2048,4096,6144,8192",
    depths: Annotated[str, typer.Option(help="needle depths in percent, comma-separated")] = "0,25,50,75,100",
    modes: Annotated[str, typer.Option(help="agnostic (context compressed before the question) "
                                       "and/or aware (compressed with it)")] = "agnostic,aware",
    cases: Annotated[str | None, typer.Option(help="your own cases instead: JSON lines with "
                                              "context, question, answer")] = None,
    peers: Annotated[str, typer.Option(help="'kvpress' also runs kvpress's same-named presses on the same "
                                       "cases (set up with scripts/kvpress-setup.sh); '' for none")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens generated per answer")] = 12,
    chat: Annotated[bool, typer.Option(help="wrap context and question in the model's chat template where it "
                                       "has one, as kvpress does (--no-chat: plain text)")] = True,
    seed: Annotated[int, typer.Option(help="seed of the generated cases")] = 0,
    intro: Annotated[str, typer.Option(help="text that opens every generated context, e.g. an "
                                       "instruction to find and remember the fact")] = "",
    dtype: Annotated[str, typer.Option(help="compute dtype: auto, fp32, bf16")] = "bf16",
    json_path: Annotated[str | None, typer.Option("--json", help="write every case and the summary as JSON")] = None,
    plot: Annotated[str | None, typer.Option(help="write a PNG heatmap: accuracy per depth x length")] = None,
):
    """Passkey / needle retrieval with each cache spec (and kvpress), question-agnostic and -aware."""
    from kvtier import spec as specs
    from kvtier.bench import data, retrieval
    from kvtier.models import load

    methods = methods or RETRIEVAL_METHODS
    for m in methods:
        specs.parse(m)  # a bad spec fails before the model loads
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    if not mode_list or set(mode_list) - {"agnostic", "aware"}:
        raise KvtierError(f"--modes {modes}: use agnostic and/or aware")
    peer_list = [p.strip() for p in peers.split(",") if p.strip()]
    if set(peer_list) - {"kvpress"}:
        raise KvtierError(f"--peers {peers}: the retrieval peer is kvpress")
    if cases and intro:
        raise KvtierError("--intro opens generated contexts; with --cases, write it into your cases' context")
    loaded = load(model, compute_dtype(dtype))
    if cases:
        todo = retrieval.read_cases(cases)
    else:
        todo = []
        for task in [t.strip() for t in tasks.split(",") if t.strip()]:
            hay = data.load_text("kjv" if task == "passkey" else "essays")
            todo += retrieval.make_cases(loaded.tokenizer, task, hay, _ints(context, "--context"),
                                         [float(d) for d in depths.split(",") if d.strip()], seed, intro, chat)
    rows = retrieval.run(loaded, model, methods, todo, mode_list, max_new_tokens, chat)
    if "kvpress" in peer_list:
        dense = {(r["mode"], r["case"]): r["dense_kv_bytes"] for r in rows}
        rows += retrieval.run_kvpress(loaded.folder, model, methods, todo, mode_list, max_new_tokens, chat, dense)
    _retrieval_out(rows, json_path, plot)


def _retrieval_out(rows: list[dict], json_path: str | None, plot: str | None) -> None:
    """The retrieval table, and the JSON (rows and summary) and heatmap when asked for."""
    from kvtier.bench import report, retrieval

    summary = retrieval.summary(rows)
    report.show(report.retrieval_table(summary))
    if json_path:
        report.write_json(json_path, rows, summary=summary)
    if plot:
        report.retrieval_heatmap(plot, rows)


@bench.command("offload")
def bench_offload(
    model: ModelOpt = DEFAULT_MODEL,
    context: Annotated[str, typer.Option(help="context lengths (document + new tokens), comma-separated")] = "8192",
    kv: Annotated[list[str] | None, typer.Option(help="cache specs to compare; repeat "
                                                   "(default: dense and int(bits=2))")] = None,
    ratios: Annotated[str, typer.Option(help="KV bytes / RAM budget ratios, comma-separated")] = "2,10,50",
    attend: Annotated[str, typer.Option(help="attention placements to compare: local, fetch, split[:SHARE], "
                                             "auto (the cost model picks; its row gives its speed over the "
                                             "best fixed one)")] = "local,fetch",
    prefetch: Annotated[str, typer.Option(help="read-ahead settings to compare: on,off")] = "on,off",
    disk: Annotated[str | None, typer.Option(help="folder for the disk tier (default: a temporary folder)")] = None,
    new_tokens: Annotated[int, typer.Option(min=2, help="tokens decoded per run")] = 32,
    repeats: Annotated[int, typer.Option(min=1, help="runs per configuration; medians are reported")] = 3,
    rss_tokens: Annotated[int, typer.Option(min=0, help="also decode this many tokens at the smallest "
                                            "budget, sampling resident memory (0: skip)")] = 0,
    page_cache: Annotated[str, typer.Option(help="warm (the disk tier's pages may sit in the OS page cache) "
                                            "and/or cold (evicted before every step: reads hit the device)")] = "warm,cold",
    recompute: Annotated[bool, typer.Option(help="also run cpu:BUDGET,recompute (dropped blocks rebuilt "
                                            "from token ids) for the first --kv, a few steps")] = True,
    dtype: Annotated[str, typer.Option(help="compute dtype: auto, fp32, bf16")] = "auto",
    text: Annotated[str, typer.Option(help=TEXT_HELP)] = "kjv",
    json_path: Annotated[str | None, typer.Option("--json", help="write results as JSON")] = None,
    plot: Annotated[str | None, typer.Option(help="write a PNG: decode tok/s vs KV/RAM-budget ratio")] = None,
):
    """Decode tok/s, bytes moved per token and peak resident memory with the cache on
    cpu+disk tiers (attend=local vs fetch, prefetch on/off) against all in RAM, same run."""
    import tempfile

    from kvtier import spec as specs
    from kvtier.bench import data, offload, report
    from kvtier.kv import tiers as tierspec
    from kvtier.models import load
    from kvtier.progress import bar

    contexts = _ints(context, "--context")
    try:
        ratio_list = [float(x) for x in ratios.split(",") if x.strip()]
    except ValueError:
        raise KvtierError(f"--ratios takes comma-separated numbers, e.g. 2,10,50; got {ratios!r}") from None
    if not ratio_list or min(ratio_list) <= 1:
        raise KvtierError(f"--ratios must be above 1 (KV bytes / RAM budget); got {ratios!r}")
    attends = [a.strip() for a in attend.split(",") if a.strip()]
    if not attends:
        raise KvtierError(f"--attend {attend!r}: use local, fetch, split[:SHARE], auto or a comma-separated list")
    for a in attends:
        tierspec.parse_attend(a)
    onoff = {"on": True, "off": False}
    if not prefetch.strip() or {p.strip() for p in prefetch.split(",")} - set(onoff):
        raise KvtierError(f"--prefetch {prefetch!r}: use on, off or on,off")
    pf = [onoff[p.strip()] for p in prefetch.split(",")]
    states = [x.strip() for x in page_cache.split(",") if x.strip()]
    if not states or set(states) - {"warm", "cold"}:
        raise KvtierError(f"--page-cache {page_cache!r}: use warm, cold or warm,cold")
    kvs = [str(specs.parse(k)) for k in (kv or ["dense", "int(bits=2)"])]
    compute = compute_dtype(dtype)
    scratch = None if disk else tempfile.TemporaryDirectory(prefix="kvtier-disk-")
    folder = disk or scratch.name
    tierspec.check_path(tierspec.Tier("disk", 1, folder))
    raw = data.load_text(text)
    loaded = load(model, compute)
    for c in contexts:
        if c > loaded.model.max_context or c <= new_tokens + 1:
            raise KvtierError(f"--context {c} must be above --new-tokens {new_tokens} and at most "
                              f"{loaded.model.max_context}, the longest {model} allows")
    ids = loaded.tokenizer(raw, add_special_tokens=False).input_ids
    if len(ids) < max(contexts):
        raise KvtierError(f"the text has {len(ids)} tokens, fewer than --context {max(contexts)}")
    per_kv = 2 + len(ratio_list) * len(attends) * len(pf) * len(states) + (1 if rss_tokens else 0)
    runs = len(contexts) * (len(kvs) * per_kv + (len(ratio_list) if recompute else 0))
    with bar(runs, f"offload {model}") as step:
        rows = offload.run(loaded, dtype_name(compute), contexts, ids, kvs, ratio_list, attends, pf, folder,
                           new_tokens, repeats, progress=step, rss_tokens=rss_tokens,
                           cold=[x == "cold" for x in states], recompute=recompute)
    if scratch is not None:
        scratch.cleanup()
    report.show(report.offload_table(rows))
    if json_path:
        report.write_json(json_path, rows)
    if plot:
        report.offload_plot(plot, rows)


from kvtier.bench.serve import LoadConfig as _Serve, helptext as _serve_help  # noqa: E402  (light: no torch)


@bench.command("serve")
def bench_serve(
    model: ModelOpt = DEFAULT_MODEL,
    kv: Annotated[list[str] | None, typer.Option(help="kvtier cache specs to serve, one `kvtier serve` "
                                                   "each; repeat (default: dense)")] = None,
    concurrency: Annotated[str | None, typer.Option(help="closed loop: requests in flight, comma-separated "
                                                         "(default: 1,4,16, or none with --rate)")] = None,
    rate: Annotated[str | None, typer.Option(help="open loop: Poisson arrival rates in requests/s, comma-separated")] = None,
    requests: Annotated[int, typer.Option(min=1, help=_serve_help("requests"))] = _Serve.requests,
    prompt_tokens: Annotated[int, typer.Option(min=1, help=_serve_help("prompt_tokens"))] = _Serve.prompt_tokens,
    max_tokens: Annotated[int, typer.Option(min=1, help=_serve_help("max_tokens"))] = _Serve.max_tokens,
    prefix_tokens: Annotated[int, typer.Option(min=0, help=_serve_help("prefix_tokens"))] = _Serve.prefix_tokens,
    prefix_groups: Annotated[int, typer.Option(min=1, help=_serve_help("prefix_groups"))] = _Serve.prefix_groups,
    prompts: Annotated[str | None, typer.Option(help='JSON lines, one {"prompt": ...} or {"messages": [...]} '
                                                     "each, instead of KJV passages")] = None,
    peers: Annotated[str | None, typer.Option(help="peer servers, comma-separated: vllm, llamacpp, transformers, "
                                                   "with parameters as in llamacpp(kv=q8_0) "
                                                   "(install: bash scripts/bench-serve-setup.sh)")] = None,
    with_kvtier: Annotated[bool, typer.Option("--kvtier/--no-kvtier", help="serve kvtier itself (off: peers only)")] = True,
    server_args: Annotated[list[str] | None, typer.Option(help="extra arguments for `kvtier serve`, as one "
                                                               "string, e.g. '--max-seqs 32'; repeat to compare "
                                                               "settings (one server each, per --kv)")] = None,
    ray: Annotated[str | None, typer.Option(help="also kvtier on Ray Serve (kvtier serve --ray) with these replica "
                                                 "counts, comma-separated, e.g. 1,2: rows beside the "
                                                 "single-process ones")] = None,
    routing: Annotated[str, typer.Option(help="with --ray: the routings to compare, comma-separated: prefix, "
                                              "round-robin")] = "prefix",
    ttft_slo: Annotated[float, typer.Option(min=0.0, help=_serve_help("ttft_slo"))] = _Serve.ttft_slo,
    tpot_slo: Annotated[float, typer.Option(min=0.0, help=_serve_help("tpot_slo"))] = _Serve.tpot_slo,
    request_timeout: Annotated[float, typer.Option(min=0.1, help=_serve_help("request_timeout"))] = _Serve.request_timeout,
    run_timeout: Annotated[float, typer.Option(min=0.1, help=_serve_help("run_timeout"))] = _Serve.run_timeout,
    open_slots: Annotated[int, typer.Option(min=1, help=_serve_help("open_slots"))] = _Serve.open_slots,
    seed: Annotated[int, typer.Option(help=_serve_help("seed"))] = _Serve.seed,
    json_path: Annotated[str | None, typer.Option("--json", help="write results as JSON")] = None,
    plot: Annotated[str | None, typer.Option(help="write a PNG: output tok/s vs p90 TTFT and p90 TPOT")] = None,
):
    """Serve the same streamed chat load from kvtier and its peers, each started here on a
    loopback port: TTFT, TPOT, ITL, throughput, goodput, peak RSS and KV bytes per row."""
    import math
    import shlex

    from kvtier import spec as specs
    from kvtier.bench import report, serve
    from kvtier.bench.peers import servers
    from kvtier.paths import cache_dir

    conc = _ints(concurrency, "--concurrency") if concurrency else ([] if rate else [1, 4, 16])
    try:
        rates = [float(x) for x in (rate or "").split(",") if x.strip()]
    except ValueError:
        raise KvtierError(f"--rate takes comma-separated numbers (requests/s), e.g. 0.5,2; got {rate!r}") from None
    if rate is not None and (not rates or not all(math.isfinite(r) and r > 0 for r in rates)):
        raise KvtierError(f"--rate takes positive numbers (requests/s); got {rate!r}")
    if prefix_tokens > prompt_tokens:
        raise KvtierError(f"--prefix-tokens {prefix_tokens} is more than --prompt-tokens {prompt_tokens}")
    if prompts and prefix_tokens:
        raise KvtierError("--prefix-tokens shapes KJV prompts; with --prompts, give the shared prefix in the file")
    if not all(math.isfinite(x) for x in (ttft_slo, tpot_slo, request_timeout, run_timeout)):
        raise KvtierError("--ttft-slo, --tpot-slo and the timeouts must be finite numbers")
    extras = []
    for text in server_args or [""]:
        try:
            extras.append(tuple(shlex.split(text)))
        except ValueError as e:
            raise KvtierError(f"--server-args {text!r}: {e}") from None
    if ray:
        routings = [r.strip() for r in routing.split(",") if r.strip()]
        if not routings or any(r not in ("prefix", "round-robin") for r in routings):
            raise KvtierError(f"--routing {routing!r}: give prefix, round-robin or both, comma-separated")
        extras += [(*e, "--ray", "--replicas", str(n), "--routing", r)
                   for e in list(extras) for n in _ints(ray, "--ray") for r in routings]
    kvs = [str(specs.parse(k)) for k in (kv or ["dense"])] if with_kvtier else []
    peer_list = servers.parse_list(peers) if peers else []
    if not kvs and not peer_list:
        raise KvtierError("nothing to serve: --no-kvtier needs --peers")
    cfg = serve.LoadConfig(requests=requests, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                           prefix_tokens=prefix_tokens, prefix_groups=prefix_groups, ttft_slo=ttft_slo, tpot_slo=tpot_slo,
                           request_timeout=request_timeout, run_timeout=run_timeout, open_slots=open_slots,
                           seed=seed)
    loads = [serve.Load(concurrency=c) for c in conc] + [serve.Load(rate=r) for r in rates]
    for s in [servers.Kvtier()] * bool(kvs) + peer_list:
        s.require()  # before the tokenizer or any model loads
    if prompts:
        messages = [serve.read_prompts(prompts, requests)] * len(loads)
        context = serve.longest(model, messages[0]) + max_tokens + 64  # + the chat template
    else:
        messages = serve.kjv_prompts(model, len(loads), cfg)
        context = prompt_tokens + max_tokens + 64  # + the chat template
    slots = max(conc, default=open_slots)
    targets = [(servers.Kvtier(), servers.Launch(model, k, slots, context, extra)) for extra in extras for k in kvs]
    targets += [(p, servers.Launch(model, "dense", slots, context)) for p in peer_list]
    rows, errors = serve.bench(targets, loads, messages, cfg, None if prompts else prompt_tokens,
                               cache_dir("serve-logs"))
    if rows:
        report.show(report.serve_table(rows))
        if json_path:
            report.write_json(json_path, rows, model=model, errors=errors)
        if plot:
            report.serve_plot(plot, rows)
    if errors:
        raise KvtierError("some servers did not run: " + " | ".join(e.splitlines()[0] for e in errors))


def _serve(**kwargs):
    """Serve the model over an OpenAI-compatible HTTP API (completions, chat, models, health,
    metrics), with continuous batching over the compressed KV store; with --ray, several engine
    replicas on Ray Serve behind the one endpoint."""
    from kvtier import spec as specs
    from kvtier.config import ClusterConfig, EngineConfig, ServerConfig
    from kvtier.serve import check, serve

    engine_cfg, server_cfg, cluster = split(kwargs, EngineConfig, ServerConfig, ClusterConfig)
    specs.parse(engine_cfg.kv)  # bad input fails before the model loads
    for s in (server_cfg.allowed_kv or "").split(";"):
        if s.strip():
            specs.parse(s)
    check(server_cfg)
    if cluster.ray:
        from kvtier.serve.cluster import serve_cluster

        serve_cluster(engine_cfg, server_cfg, cluster)
    else:
        serve(engine_cfg, server_cfg)


def _register_serve() -> None:
    from kvtier.config import ClusterConfig, EngineConfig, ServerConfig

    app.command("serve", help=_serve.__doc__)(command(flags(EngineConfig, ServerConfig, ClusterConfig), _serve))


_register_serve()


def _plan(files: list[str] | None = None, **kwargs):
    """Predict a decode step (or prefill chunk) operation by operation — bytes, FLOPs, Op/B and
    time on this machine's measured hardware — and choose where each runs: the attend mode per
    tier, the device split, a codec for a KV budget, the largest batch for an SLO. --probe
    measures this machine; --validate compares predictions with kvtier's bench JSON."""
    from kvtier.config import PlanConfig
    from kvtier.plan.report import run

    (cfg,) = split(kwargs, PlanConfig)
    run(cfg, files or [])


def _register_plan() -> None:
    import inspect

    from kvtier.config import PlanConfig

    files = inspect.Parameter("files", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                              annotation=Annotated[list[str] | None, typer.Argument(
                                  help="with --validate: bench JSON files (bench speed, bench offload, "
                                       "the GPU scripts' results)", show_default=False)])
    app.command("plan", help=_plan.__doc__)(command([files, *flags(PlanConfig)], _plan))


_register_plan()


def main() -> None:
    # typer handles usage errors (exit 2) and --help; kvtier's own errors become one line here
    try:
        app()
    except (KvtierError, OSError) as e:
        print(f"kvtier: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
