"""The engine on its own thread, fed by the server's event loop.

The HTTP handlers never touch the engine: they send commands (add, abort) through a queue and
receive :class:`Delta` events on an asyncio queue per request. The thread runs ``engine.step()``
while there is work and sleeps on an event otherwise; after each step it hands every changed
sequence's new text, tokens and log-probabilities to its request, and keeps a snapshot of the
numbers ``/metrics`` shows (so scraping never races the engine).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtier.config import SamplingParams
from kvtier.engine.engine import Engine
from kvtier.engine.sequence import Sequence
from kvtier.errors import KvtierError

log = logging.getLogger("kvtier.serve")


@dataclass
class Delta:
    """What one request got in one step."""

    index: int                       # which of the request's n choices
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # (token, logprob, [(alt, logprob), ...]) per token
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Served:
    """What the API tells clients of the engine behind it (one engine or a set of replicas)."""

    default_kv: str
    max_context: int
    vocab_size: int
    prefix_cache: dict[str, bool]  # per cache spec served: whether it shares prefix blocks


@dataclass
class Snapshot:
    running: int = 0
    waiting: int = 0
    kv_bytes: list = field(default_factory=list)  # (tier, bytes)
    kv_usage: float = 0.0
    bytes_per_token: dict = field(default_factory=dict)
    prefix_queries: int = 0
    prefix_hits: int = 0
    prefix_bytes: int = 0


def _deliver(items: list[tuple[asyncio.Queue, Delta]]) -> None:
    for q, delta in items:
        q.put_nowait(delta)


class Worker:
    """Runs the engine on its own thread. ``make`` builds the engine there: the thread that
    runs the model must be the one that loaded it. libgomp keeps one pool of OpenMP threads per
    thread that starts parallel regions, and once its threads outnumber the cores it stops
    spinning between regions; a model loaded on the main thread and run on this one decoded
    SmolLM2 2.3x slower on 2 cores (63 against 27 ms a token)."""

    def __init__(self, make: Engine | Callable[[], Engine], metrics=None):
        """``make``: an engine already built (in-process tests), or how to build one."""
        self.engine: Engine | None = make if isinstance(make, Engine) else None
        self.make, self.metrics = make, metrics
        self._ready = threading.Event()
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.stopping = False
        self.snapshot = Snapshot()
        self._owners: dict[int, tuple] = {}  # seq id -> (loop, asyncio queue, index, request id)
        self._last_snapshot = 0.0
        self.thread = threading.Thread(target=self._run, name="kvtier-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        """Start the thread and wait until it has built the engine (its error, raised here)."""
        self.thread.start()
        self._ready.wait()
        if self.engine is None:
            self.thread.join()
            raise self.error

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=30)

    @property
    def queued(self) -> int:
        """Requests waiting (not yet admitted), as last seen plus those not yet taken in."""
        return self.snapshot.waiting + self.commands.qsize()

    def served(self, extra_kv: list[str]) -> Served:
        """The engine's description, for the default spec and the ``extra_kv`` a request may name."""
        e = self.engine
        kvs = sorted({e.default_kv, *extra_kv})
        return Served(e.default_kv, e.model.max_context, e.model.hf_config.vocab_size,
                      {kv: e.runner_for(kv).shares_prefixes and e.prefixes is not None for kv in kvs})

    async def headers(self, seqs: list) -> dict[str, str]:
        """Response headers for a request just submitted (a replica's id behind Ray)."""
        return {}

    # called from the event loop
    def submit(self, request_id: str, prompt_ids: list[int], params: list[SamplingParams], kv: str | None,
               priority: int) -> tuple[asyncio.Queue, list]:
        """Queue a request of ``len(params)`` choices; events arrive on the returned queue. The
        second value fills with the sequences once the engine has taken them (for abort)."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        seqs: list = []
        self.commands.put(("add", (request_id, prompt_ids, params, kv, priority, loop, out, seqs)))
        self.wake.set()
        return out, seqs

    def abort(self, seqs: list) -> None:
        if seqs:
            self.commands.put(("abort", list(seqs)))
            self.wake.set()

    # the engine thread
    def _run(self) -> None:
        try:
            if self.engine is None:
                self.engine = self.make()
        except BaseException as e:  # start() raises it on the caller's thread
            self.error = e
            return
        finally:
            self._ready.set()
        try:
            while not self.stopping or self.engine.has_work():
                self._commands()
                if not self.engine.has_work():
                    self._snap(force=True)
                    self.wake.wait(0.5)
                    self.wake.clear()
                    continue
                changed = self.engine.step()
                out: dict = {}  # loop -> [(queue, delta)]: one wake-up of each event loop a step
                for seq in changed:
                    self._emit(seq, out)
                for loop, items in out.items():
                    loop.call_soon_threadsafe(_deliver, items)
                self._snap()
        except BaseException as e:  # the engine is broken: fail every request, say why
            self.error = e
            log.exception("kvtier engine failed")
            for seq_id, (loop, q, index, _) in list(self._owners.items()):
                loop.call_soon_threadsafe(q.put_nowait, Delta(index, finish_reason="error", error=str(e)))

    def _commands(self) -> None:
        while True:
            try:
                kind, args = self.commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request_id, ids, params, kv, priority, loop, out, seqs = args
                try:
                    for index, p in enumerate(params):
                        seq = self.engine.add(ids, p, kv=kv, priority=priority)
                        seq.request_id = request_id
                        self._owners[seq.id] = (loop, out, index, request_id)
                        seqs.append(seq)
                except KvtierError as e:
                    for seq in seqs:
                        self.engine.abort(seq)
                        self._owners.pop(seq.id, None)
                    loop.call_soon_threadsafe(out.put_nowait, e)
            elif kind == "abort":
                for seq in args:
                    if not seq.finished:
                        self.engine.abort(seq)
                        self._done(seq)
                    self._owners.pop(seq.id, None)

    def _emit(self, seq: Sequence, out: dict) -> None:
        owner = self._owners.get(seq.id)
        if owner is None:
            return
        loop, q, index, _ = owner
        seen = seq.emitted
        new = seq.output_ids[seen:]
        seq.emitted = len(seq.output_ids)
        delta = Delta(index, self.engine.visible_text(seq), new, seq.logprobs[seen:] if seq.logprobs else [])
        if self.metrics is not None and new:
            self.metrics.tokens(seq, len(new))
        if seq.finished:
            delta.finish_reason, delta.error = seq.finish_reason, seq.error
            delta.prompt_tokens, delta.completion_tokens = len(seq.prompt_ids), len(seq.output_ids)
            delta.cached_tokens = seq.n_cached
            self._done(seq)
            del self._owners[seq.id]
        if delta.text or delta.tokens or delta.finish_reason:
            out.setdefault(loop, []).append((q, delta))

    def _done(self, seq: Sequence) -> None:
        t = seq.timing
        ttft = (t.first_token - t.arrival) if t.first_token else float("nan")
        total = (t.finished or time.perf_counter()) - t.arrival
        log.info("request %s seq %d: prompt %d tokens (%d cached), %d generated, queue %.3f s, "
                 "TTFT %.3f s, total %.3f s, finish %s", seq.request_id or "-", seq.id,
                 len(seq.prompt_ids), seq.n_cached, len(seq.output_ids), t.queue_s, ttft, total,
                 seq.finish_reason)
        if self.metrics is not None:
            self.metrics.finished(seq)

    def _snap(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_snapshot < 0.25:
            return
        self._last_snapshot = now
        e = self.engine
        held = e.kv_bytes()
        per_token = {}
        for seq in e.scheduler.running:
            if seq.cache is not None and seq.cache.length:
                per_token.setdefault(seq.kv, []).append(seq.cache.nbytes() / seq.cache.length)
        stats = e.prefixes.stats if e.prefixes is not None else None
        total = sum(b for _, b in held)
        self.snapshot = Snapshot(
            running=len(e.scheduler.running), waiting=len(e.scheduler.waiting), kv_bytes=held,
            kv_usage=total / e.budget if e.budget else 0.0,
            bytes_per_token={k: sum(v) / len(v) for k, v in per_token.items()},
            prefix_queries=stats.queries if stats else 0, prefix_hits=stats.hits if stats else 0,
            prefix_bytes=e.prefixes.nbytes if e.prefixes is not None else 0)
        if self.metrics is not None:
            self.metrics.update(self.snapshot)
