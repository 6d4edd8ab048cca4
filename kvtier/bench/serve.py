"""``kvtier bench serve``: a load generator against OpenAI-compatible servers that it starts itself.

Each server (kvtier's, or a peer from :mod:`kvtier.bench.peers.servers`) runs as a subprocess
on a free 127.0.0.1 port; the bench waits until it answers, sends one warm-up request, runs
each load and stops it (SIGTERM, then SIGKILL), always. A load is a fixed number of streamed,
greedy chat requests, closed-loop at N in flight or open-loop at a seeded Poisson rate, each
bounded by a per-request timeout and the whole load by a run timeout. Every request is timed
from its SSE stream: TTFT (send -> first content), the gaps between content chunks (ITL),
TPOT = (e2e - TTFT) / (tokens - 1) and e2e, with output tokens from the final usage chunk.
A request that fails (HTTP error, timeout, broken stream) counts in ``failed``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvtier.errors import KvtierError
from kvtier.progress import note

if TYPE_CHECKING:  # the CLI reads LoadConfig at start-up: keep this module's imports light
    from kvtier.bench.peers.servers import Launch, Server

HOST = "127.0.0.1"  # every server the bench starts binds loopback only


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class LoadConfig:
    """One bench's load; the CLI's defaults and help come from here."""

    requests: int = _opt(16, "requests per row (per concurrency or rate)")
    prompt_tokens: int = _opt(1000, "tokens of KJV text in each prompt (before the chat template)")
    max_tokens: int = _opt(128, "output tokens per request (sent with ignore_eos, so every server makes them all)")
    prefix_tokens: int = _opt(0, "tokens every prompt of a row shares at its start (0: no two prompts share a prefix)")
    prefix_groups: int = _opt(1, "with --prefix-tokens: distinct shared prefixes per row, each starting an equal "
                              "share of its prompts, in a seeded random order")
    ttft_slo: float = _opt(10.0, "goodput target: time to first token, seconds")
    tpot_slo: float = _opt(0.25, "goodput target: time per output token after the first, seconds")
    request_timeout: float = _opt(600.0, "seconds one request may take before it counts as failed")
    run_timeout: float = _opt(3600.0, "seconds one row's whole load may take; unfinished requests count as failed")
    open_slots: int = _opt(16, "with --rate only: parallel slots of servers that fix them at start (llama-server -np)")
    seed: int = _opt(0, "seed of the Poisson arrivals")


def helptext(name: str) -> str:
    return LoadConfig.__dataclass_fields__[name].metadata["help"]


@dataclass(frozen=True)
class Load:
    """One row's load: closed-loop at ``concurrency`` in flight, or open-loop at ``rate`` req/s."""

    concurrency: int | None = None
    rate: float | None = None

    def __post_init__(self):
        assert (self.concurrency is None) != (self.rate is None), "a load is closed or open, not both"


@dataclass
class Sample:
    """One request as its client saw it (seconds from its send)."""

    ok: bool
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.ok and self.tokens > 1 else None


# ---- the client ---------------------------------------------------------------------------

async def request(client, url: str, body: dict, timeout: float) -> Sample:
    """POST one streamed completion and time it from its SSE events."""
    import httpx

    t0 = time.perf_counter()
    times, usage, done, finished = [], None, False, False
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode("utf-8", "replace")[:200]
                    return Sample(False, error=f"HTTP {r.status_code}: {text}")
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event: lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if event.get("error"):
                        return Sample(False, error=f"error event: {str(event['error'])[:200]}")
                    now = time.perf_counter()
                    for choice in event.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content") or choice.get("text")
                        if text:
                            times.append(now)
                        finished = finished or bool(choice.get("finish_reason"))
                    usage = event.get("usage") or usage
    except TimeoutError:
        return Sample(False, error=f"timed out after {timeout:g} s")
    except httpx.HTTPError as e:
        return Sample(False, error=f"{type(e).__name__}: {e}"[:200])
    except (ValueError, AttributeError) as e:  # a data: line that is not a JSON event
        return Sample(False, error=f"bad stream event: {e}"[:200])
    if not (done or finished):  # transformers serve ends on a finish_reason, with no [DONE]
        return Sample(False, error="stream ended without [DONE] or a finish_reason")
    if not times:
        return Sample(False, error="no content in the stream")
    tokens = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") else len(times)
    return Sample(True, ttft=times[0] - t0, e2e=time.perf_counter() - t0, itl=[b - a for a, b in zip(times, times[1:])],
                  tokens=tokens, prompt_tokens=(usage or {}).get("prompt_tokens"))


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of ``n`` Poisson arrivals at ``rate`` per second."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def run_load(base_url: str, bodies: list[dict], load: Load, cfg: LoadConfig,
                   progress=None) -> tuple[list[Sample], float]:
    """Send every body once under ``load``; (one sample per body, wall seconds). ``progress()``
    is called as each request ends."""
    import httpx

    url = base_url.rstrip("/") + "/v1/chat/completions"
    results: list[Sample | None] = [None] * len(bodies)
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.request_timeout), limits=limits,
                                 trust_env=False) as client:  # trust_env: never a proxy for loopback

        async def one(i: int) -> None:
            results[i] = await request(client, url, bodies[i], cfg.request_timeout)
            if progress:
                progress()

        async def closed() -> None:
            todo = iter(range(len(bodies)))  # shared: each worker takes the next request

            async def worker():
                for i in todo:
                    await one(i)
            await asyncio.gather(*(worker() for _ in range(min(load.concurrency, len(bodies)))))

        async def open_loop() -> None:
            tasks, start = [], time.perf_counter()
            for i, at in enumerate(arrivals(len(bodies), load.rate, cfg.seed)):
                await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)

        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(cfg.run_timeout):
                await (closed() if load.concurrency else open_loop())
        except TimeoutError:
            pass  # the requests still missing are counted below
        wall = time.perf_counter() - t0
    missing = Sample(False, error=f"not finished within the run timeout ({cfg.run_timeout:g} s)")
    return [r if r is not None else missing for r in results], wall


def chat_body(model_id: str, messages: list[dict], max_tokens: int) -> dict:
    return {"model": model_id, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


# ---- rows ---------------------------------------------------------------------------------

def _pct(values: list[float], q: float) -> float | None:
    """The q-th percentile, interpolated linearly between order statistics (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (k - lo))


def summarize(samples: list[Sample], wall: float, cfg: LoadConfig) -> dict:
    """The measured fields of one row."""
    ok = [s for s in samples if s.ok]
    ttft, tpot = [s.ttft for s in ok], [s.tpot for s in ok if s.tpot is not None]
    itl = [x for s in ok for x in s.itl]
    e2e = [s.e2e for s in ok]
    good = [s for s in ok if s.ttft <= cfg.ttft_slo and (s.tpot is None or s.tpot <= cfg.tpot_slo)]
    short = [s for s in ok if s.tokens < cfg.max_tokens]  # a server that stopped early (ignored ignore_eos)
    prompt = [s.prompt_tokens for s in ok if s.prompt_tokens is not None]
    out_tokens = sum(s.tokens for s in ok)
    wall = max(wall, 1e-9)
    row = {"completed": len(ok), "failed": len(samples) - len(ok), "short": len(short), "output_tokens": out_tokens,
           "wall_s": wall, "output_tok_s": out_tokens / wall, "req_s": len(ok) / wall,
           "goodput_req_s": len(good) / wall,
           "prompt_tokens_served": sum(prompt) / len(prompt) if prompt else None}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}_s"] = _pct(values, q)
    errors = list(dict.fromkeys(s.error for s in samples if not s.ok))
    row["errors"] = errors[:5]
    return row


# ---- prompts ------------------------------------------------------------------------------

def passages(tokenizer, text: str, starts: list[int], tokens: list[int]) -> list[str]:
    """A passage of ``tokens[j]`` tokens from each character offset ``starts[j]`` of ``text``
    (moved on to the next word)."""
    out = []
    for start, n in zip(starts, tokens):
        span = 8 * n + 64  # characters: the KJV averages about 4 per SmolLM2 token
        start = min(text.find(" ", start) + 1 if start else 0, max(len(text) - span, 0))
        ids = tokenizer.encode(text[start:start + span], add_special_tokens=False)
        if len(ids) < n:
            raise KvtierError(f"the text has too few tokens for {n}-token passages; use fewer --prompt-tokens")
        out.append(tokenizer.decode(ids[:n]).strip())
    return out


def kjv_prompts(model: str, rows: int, cfg: LoadConfig) -> list[list[list[dict]]]:
    """Per row, ``cfg.requests`` chat messages of ``prompt_tokens`` KJV tokens each, cut at
    offsets spread through the whole book: rows and requests never share a passage, so no
    prompt hits a prefix cache unless ``prefix_tokens`` is set; then every prompt of a row
    starts with that row's own shared passage of that many tokens."""
    from transformers import AutoTokenizer

    from kvtier.bench.data import load_text
    from kvtier.models.loader import resolve

    tok = AutoTokenizer.from_pretrained(resolve(model))
    text = load_text("kjv")
    import random

    shared, own = cfg.prefix_tokens, cfg.prompt_tokens - cfg.prefix_tokens
    groups = cfg.prefix_groups if shared else 1
    per_row = cfg.requests + groups  # the row's shared heads, then its requests
    count = rows * per_row
    starts = [j * (len(text) - 8 * cfg.prompt_tokens) // count for j in range(count)]
    sizes = [(shared if j % per_row < groups else own) for j in range(count)]
    keep = [j for j in range(count) if sizes[j] > 0]
    got = dict(zip(keep, passages(tok, text, [starts[j] for j in keep], [sizes[j] for j in keep])))
    out = []
    for r in range(rows):
        head_of = [i % groups for i in range(cfg.requests)]
        random.Random(cfg.seed + r).shuffle(head_of)  # the groups' prompts interleaved, not in turn
        out.append([[{"role": "user", "content": f"{got.get(r * per_row + g, '')} "
                                                 f"{got.get(r * per_row + groups + i, '')}".strip()}]
                    for i, g in enumerate(head_of)])
    return out


def longest(model: str, messages: list[list[dict]]) -> int:
    """Tokens of the longest conversation's text in ``model``'s tokenizer (template not counted)."""
    from transformers import AutoTokenizer

    from kvtier.models.loader import resolve

    tok = AutoTokenizer.from_pretrained(resolve(model))
    return max(sum(len(tok.encode(m["content"], add_special_tokens=False)) for m in conv) for conv in messages)


def read_prompts(path: str, requests: int) -> list[list[dict]]:
    """``requests`` chat messages from a JSON-lines file (cycled when it has fewer lines)."""
    try:
        lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError as e:
        raise KvtierError(f"--prompts {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise KvtierError(f"--prompts {path}: not UTF-8 text") from None
    out = []
    for n, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except ValueError:
            raise KvtierError(f"--prompts {path}:{n}: not a JSON object") from None
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            out.append([{"role": "user", "content": item["prompt"]}])
        elif isinstance(item, dict) and isinstance(item.get("messages"), list) and item["messages"] and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in item["messages"]):
            out.append(item["messages"])
        else:
            raise KvtierError(f'--prompts {path}:{n}: write {{"prompt": "..."}} or '
                              '{"messages": [{"role": "user", "content": "..."}]} on each line')
    if not out:
        raise KvtierError(f"--prompts {path}: no prompts in the file")
    return [out[i % len(out)] for i in range(requests)]


# ---- the server process -------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Running:
    """A started server: its process, where it listens and what it logs."""

    server: Server
    proc: subprocess.Popen
    url: str
    log: Path
    start_s: float = 0.0
    model_id: str = ""

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


def _ready(running: Running, timeout: float) -> None:
    """Wait until the server's health route answers 200; show the seconds waited."""
    import httpx
    from rich.console import Console

    console = Console(stderr=True)
    what, t0, last = f"starting {running.server} on {running.url}", time.perf_counter(), 0.0
    with console.status(what) if console.is_terminal else _nothing() as status:
        while True:
            waited = time.perf_counter() - t0
            if running.proc.poll() is not None:
                raise KvtierError(f"{running.server} exited with code {running.proc.returncode} while starting; "
                                  f"the end of its log ({running.log}):\n{running.tail()}")
            try:
                if httpx.get(running.url + running.server.health, timeout=2, trust_env=False).status_code == 200:
                    running.start_s = waited
                    return
            except httpx.HTTPError:
                pass
            if waited > timeout:
                raise KvtierError(f"{running.server} did not answer {running.server.health} within {timeout:g} s; "
                                  f"the end of its log ({running.log}):\n{running.tail()}")
            if status is not None:
                status.update(f"{what} ({waited:.0f} s)")
            elif waited - last >= 30:
                note(f"{what}: waiting ({waited:.0f} s)")
                last = waited
            time.sleep(1.0)


@contextmanager
def _nothing():
    yield None


def _model_id(running: Running, fallback: str) -> str:
    """The first model id the server lists at /v1/models (the name requests must give)."""
    import httpx

    try:
        return httpx.get(running.url + "/v1/models", timeout=10, trust_env=False).json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return fallback


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left after ``timeout``."""
    import psutil

    if proc.poll() is None:
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        _signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
            proc.wait(10)
        _, alive = psutil.wait_procs(tree, timeout=5)
        for p in alive:  # children that left the group or ignored the signal
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    else:
        _signal(proc, signal.SIGKILL)  # children of a leader that already exited


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group the bench created for this server (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def started(server: Server, launch: Launch, log_dir: Path):
    """Start ``server`` for ``launch`` on a free loopback port; yield it ready; always stop it."""
    port = free_port()
    log = log_dir / f"{server.name}-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(server.command(port, launch), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **server.env(launch)},
                                start_new_session=True)
    running = Running(server, proc, f"http://{HOST}:{port}", log)
    try:
        _ready(running, server.start_timeout)
        running.model_id = _model_id(running, Path(launch.model).name)
        yield running
    finally:
        stop(proc)


class Watch:
    """Samples the server's process-tree RSS (every ``period`` s) and its KV bytes (from its
    metrics route, every third sample) on a thread while a load runs; peaks only."""

    def __init__(self, running: Running, period: float = 0.5):
        import httpx

        self.running, self.period = running, period
        self.peak_rss, self.peak_kv = 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        # one client for every poll: a new one per request builds an SSL context each time,
        # which cost the load generator a third of a core (taken from the server it measures)
        self._http = httpx.Client(timeout=5, trust_env=False)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample(metrics=True)  # one more after the load: the held bytes at the end
        self._http.close()

    def _loop(self) -> None:
        tick = 0
        while not self._stop.is_set():
            self._sample(metrics=tick % 3 == 0)
            tick += 1
            self._stop.wait(self.period)

    def _sample(self, metrics: bool) -> None:
        import httpx
        import psutil

        try:
            root = psutil.Process(self.running.proc.pid)
            rss = 0
            for p in [root, *root.children(recursive=True)]:
                try:
                    rss += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
        except psutil.NoSuchProcess:
            pass
        path = self.running.server.metrics
        if metrics and path:
            try:
                text = self._http.get(self.running.url + path).text
            except httpx.HTTPError:
                return
            kv = self.running.server.kv_held(text, "")
            if kv is not None:
                self.peak_kv = kv if self.peak_kv is None else max(self.peak_kv, kv)


# ---- the run loop -------------------------------------------------------------------------

def measure(running: Running, launch: Launch, load: Load, messages: list[list[dict]], cfg: LoadConfig,
            prompt_tokens: int | None) -> dict:
    """One row: ``load`` with ``messages`` against a started server."""
    from kvtier.progress import bar

    server = running.server
    bodies = [server.request(chat_body(running.model_id, m, cfg.max_tokens)) for m in messages]
    what = f"{load.concurrency} at once" if load.concurrency else f"{load.rate:g} req/s"
    before = _prefix_counts(running)
    with Watch(running) as watch, bar(len(bodies), f"{server.name} {server.label(launch)}, {what}") as step:
        samples, wall = asyncio.run(run_load(running.url, bodies, load, cfg, progress=step))
    after = _prefix_counts(running)
    hit_rate = None
    if before is not None and after is not None and after[0] > before[0]:
        hit_rate = (after[1] - before[1]) / (after[0] - before[0])
    kv = watch.peak_kv if server.metrics else server.kv_held(None, running.log_text())
    return {"server": server.name, "kv": server.label(launch), "spec": str(server),
            "concurrency": load.concurrency, "rate": load.rate, "prompt_tokens": prompt_tokens,
            "prefix_tokens": cfg.prefix_tokens, "prefix_groups": cfg.prefix_groups if cfg.prefix_tokens else None,
            "prefix_hit_rate": hit_rate, "max_tokens": cfg.max_tokens, "requests": len(bodies),
            **summarize(samples, wall, cfg), "ttft_slo_s": cfg.ttft_slo, "tpot_slo_s": cfg.tpot_slo,
            "peak_rss_bytes": watch.peak_rss or None, "kv_bytes_peak": kv,
            "kv_bytes_source": server.kv_source if kv is not None else None,
            "start_s": running.start_s, "log": str(running.log)}


def _prefix_counts(running: Running) -> tuple[float, float] | None:
    """The server's prefix-cache (queries, hits) in tokens so far, or None where it says none."""
    import httpx

    if not running.server.metrics:
        return None
    try:
        text = httpx.get(running.url + running.server.metrics, timeout=10, trust_env=False).text
    except httpx.HTTPError:
        return None
    return running.server.prefix_counts(text)


def warm_up(running: Running) -> None:
    """One short request before the rows (first-request allocation and compilation); it must
    succeed, or the server cannot serve the load."""
    body = running.server.request(chat_body(running.model_id, [{"role": "user", "content": "Say hello."}], 4))
    sample = asyncio.run(request_once(running.url, body))
    if not sample.ok:
        raise KvtierError(f"{running.server} started but its warm-up request failed: {sample.error}; "
                          f"the end of its log ({running.log}):\n{running.tail()}")


async def request_once(base_url: str, body: dict, timeout: float = 600.0) -> Sample:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), trust_env=False) as client:
        return await request(client, base_url.rstrip("/") + "/v1/chat/completions", body, timeout)


def bench(targets: list[tuple[Server, Launch]], loads: list[Load], messages: list[list[list[dict]]],
          cfg: LoadConfig, prompt_tokens: int | None, log_dir: Path, on_row=None) -> tuple[list[dict], list[str]]:
    """Every load against every (server, launch): (rows, one error line per server that failed).

    ``messages[r]`` are row r's prompts, the same for every server. A server whose slots are
    fixed at start (llama-server) is started once per load with slots = its concurrency;
    the others once for all loads. A server that fails to start is reported, not fatal."""
    from kvtier.bench.peers.servers import Launch
    for server, _ in targets:
        server.require()
    rows, errors = [], []
    for server, launch in targets:
        groups = ([[(r, load)] for r, load in enumerate(loads)] if server.per_slots
                  else [list(enumerate(loads))])
        for group in groups:
            slots = (group[0][1].concurrency or cfg.open_slots) if server.per_slots else launch.slots
            try:
                with started(server, Launch(launch.model, launch.kv, slots, launch.context, launch.extra),
                             log_dir) as running:
                    note(f"{server} ready after {running.start_s:.0f} s (log {running.log})")
                    warm_up(running)
                    for r, load in group:
                        row = measure(running, launch, load, messages[r], cfg, prompt_tokens)
                        rows.append(row)
                        if on_row:
                            on_row(row)
            except KvtierError as e:
                errors.append(f"{server}: {e}")
                note(f"{server} failed: {e}")
                break
    return rows, errors
