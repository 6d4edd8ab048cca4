"""The scheduler: which sequences run in the next forward, and how many tokens each feeds.

Each step has a token budget (``max_batched_tokens``) and a sequence budget (``max_seqs``),
spent as vLLM v1 does, with no separate phases: first one token for every running sequence
that is decoding, then prefill chunks — of running sequences still in their prompt, then of
waiting ones admitted now — up to the prefill share of the budget (:mod:`kvtier.engine.slo`
moves that share to meet latency targets).

Admission is by KV **bytes**: a waiting sequence is admitted when the bytes its prompt will
hold, at its own codec's real block sizes, fit beside what the running sequences and the
prefix cache hold. When decoding outgrows the budget the prefix cache gives back room first;
then the least important running sequence (highest ``priority`` value, newest first among
equals) is preempted: with a lower tier its encoded blocks move down there and it resumes in
place later (swap), without one its cache is freed and its tokens are run again when it is
readmitted (recompute).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Protocol

from kvtier.config import EngineConfig
from kvtier.engine.sequence import Sequence, Status


@dataclass
class Scheduled:
    """One sequence's share of a step: the tokens it feeds now."""

    seq: Sequence
    tokens: list[int]

    @property
    def samples(self) -> bool:
        """The chunk ends the sequence's pending tokens: a token is sampled after it."""
        return len(self.tokens) == self.seq.n_pending


@dataclass
class SchedulerOutput:
    items: list[Scheduled] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def prefill_tokens(self) -> int:
        return sum(len(i.tokens) for i in self.items if i.seq.prefilling)

    @property
    def decode_tokens(self) -> int:
        return sum(1 for i in self.items if not i.seq.prefilling)

    def __bool__(self) -> bool:
        return bool(self.items)


class Memory(Protocol):
    """What the scheduler asks of the KV store (the engine implements it)."""

    budget: int

    def held(self, running: list[Sequence], extra: int) -> int:
        """Bytes held by ``running`` once each has ``extra`` more tokens (a sequence still in its
        prompt: all of its prompt), plus the prefix cache."""

    def need(self, seq: Sequence) -> int:
        """Bytes ``seq`` adds when admitted now."""

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` a cache (filled from the prefix cache where its prompt starts so)."""

    def reclaim(self, nbytes: int) -> int:
        """Free up to ``nbytes`` of cached prefixes; returns the bytes freed."""

    def free(self, seq: Sequence) -> None:
        """Free ``seq``'s cache."""

    def swap_out(self, seq: Sequence) -> bool:
        """Move ``seq``'s blocks down a tier; False when there is no lower tier."""


class Scheduler:
    def __init__(self, config: EngineConfig, memory: Memory):
        self.config, self.memory = config, memory
        self.waiting: list[Sequence] = []   # waiting and swapped, in admission order
        self.running: list[Sequence] = []
        self.prefill_share = config.prefill_share

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.cache is not None:
            self.memory.free(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @staticmethod
    def _order(seq: Sequence) -> tuple:
        return seq.priority, seq.timing.arrival, seq.id

    def schedule(self) -> SchedulerOutput:
        cfg, out = self.config, SchedulerOutput()
        self._fit(out)
        budget = cfg.max_batched_tokens
        running = sorted(self.running, key=self._order)
        for seq in running:  # decode first: one token each
            if not seq.prefilling and len(out.items) < cfg.max_seqs and budget > 0:
                out.items.append(Scheduled(seq, seq.ids[-1:]))
                budget -= 1
        decoding = bool(out.items)
        cap = min(budget, max(1, int(self.prefill_share * cfg.max_batched_tokens))) if decoding else budget
        for seq in running:  # prefill chunks of sequences already admitted
            if seq.prefilling and cap > 0 and len(out.items) < cfg.max_seqs:
                n = min(seq.n_pending, cap)
                out.items.append(Scheduled(seq, seq.ids[seq.n_computed: seq.n_computed + n]))
                cap -= n
        self.waiting.sort(key=self._order)
        while self.waiting and cap > 0 and len(out.items) < cfg.max_seqs:
            seq = self.waiting[0]
            if seq in out.preempted or not self._admits(seq):
                break  # in priority order: nothing less important overtakes it
            self.waiting.pop(0)
            if seq.status is Status.WAITING:
                self.memory.allocate(seq)
            seq.status = Status.RUNNING
            if seq.timing.scheduled is None:
                seq.timing.scheduled = _now()
            self.running.append(seq)
            n = min(seq.n_pending, cap)
            out.items.append(Scheduled(seq, seq.ids[seq.n_computed: seq.n_computed + n]))
            cap -= n
        return out

    def _admits(self, seq: Sequence) -> bool:
        m = self.memory
        need = m.need(seq)
        over = m.held(self.running, 1) + need - m.budget
        if over > 0:
            m.reclaim(over)
            over = m.held(self.running, 1) + need - m.budget
        return over <= 0 or not self.running  # one sequence alone always runs (it may still fail)

    def _fit(self, out: SchedulerOutput) -> None:
        """Before a step: make room for every running sequence's next token."""
        m = self.memory
        over = m.held(self.running, 1) - m.budget
        if over <= 0:
            return
        m.reclaim(over)
        while len(self.running) > 1 and m.held(self.running, 1) > m.budget:
            victim = max(self.running, key=self._order)
            self.preempt(victim)
            out.preempted.append(victim)

    def preempt(self, seq: Sequence) -> None:
        """Take ``seq`` off the running set: swap its blocks down a tier, or free its cache to
        recompute it later. It waits at its priority."""
        self.running.remove(seq)
        seq.n_preempted += 1
        if self.memory.swap_out(seq):
            seq.status = Status.SWAPPED
        else:
            self.memory.free(seq)
            seq.n_computed = 0
            seq.status = Status.WAITING
        self.waiting.append(seq)

    def postprocess(self, out: SchedulerOutput, tokens: list[int | None],
                    accept: Callable[[Sequence, int], None]) -> list[Sequence]:
        """After the forward: count each item's fed tokens, hand its sampled token (None for a
        prefill chunk that does not end its prompt) to ``accept`` (which appends it and may
        finish the sequence), and release the sequences that finished. Returns them."""
        for item, tok in zip(out.items, tokens):
            item.seq.n_computed += len(item.tokens)
            if tok is not None and not item.seq.finished:
                accept(item.seq, tok)
        done = [s for s in self.running if s.finished]
        for seq in done:
            self.running.remove(seq)
            if seq.cache is not None:
                self.memory.free(seq)
        return done


def _now() -> float:
    import time

    return time.perf_counter()
