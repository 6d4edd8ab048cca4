"""SLO-aware split of each step's token budget between prefill chunks and decode tokens.

semi-PD's loop: over recent requests, when the p90 time to first token misses its target, give
prefill a larger share of the step; when the p90 time per output token misses, give decode more
(a smaller prefill share); when both miss, hold. Nexus's cost model beside it: a step's latency
is predicted from what it moves and computes (a least-squares fit over recent steps)::

    seconds = a + b * prefill tokens + c * prefill attention (token pairs) + d * KV bytes decode reads

``a`` is the weights read once per step, ``b`` the matmuls per prefill token, ``c`` a chunk's
queries against its past, ``d`` decode attention, which reads every byte the decoding
sequences hold (so a 2-bit cache's decode costs less than a dense one's).

Time per output token is a request's own: the mean time between its tokens, as vLLM and
``kvtier bench serve`` report it, not the time of one step. So before every step the prefill
share is capped by each decoding request's *slack*, the time the next step may take with that
request's mean still within the target (``target x tokens so far - time since its first
token``): a request that has decoded ahead of its target lends a long prefill chunk its spare
time; one that has just started, or is behind, keeps the chunks short.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from kvtier.config import EngineConfig

STEP = 0.1        # share moved per adjustment
EVERY = 8         # steps between adjustments (and refits of the cost model)
WINDOW = 64       # step costs kept for the cost model
RECENT = 8        # requests' latencies kept: the last few requests, so a miss shows at once


class SloController:
    def __init__(self, config: EngineConfig, scheduler):
        self.ttft_slo, self.tpot_slo = config.ttft_slo, config.tpot_slo
        self.scheduler, self.budget = scheduler, config.max_batched_tokens
        self.share = config.prefill_share
        self.ttft: deque[float] = deque(maxlen=RECENT)  # finished prompts' time to first token
        self.tpot: deque[float] = deque(maxlen=RECENT)  # finished requests' time per output token
        self.steps: deque[Cost] = deque(maxlen=WINDOW)
        self.coef: list[float] | None = None  # the cost model, refitted every EVERY steps
        self.n = 0
        self.history: list[float] = []  # the share after each adjustment (for reports)

    @property
    def active(self) -> bool:
        return self.ttft_slo is not None or self.tpot_slo is not None

    def cost(self, out) -> Cost | None:
        """What the step ``out`` is about to move and compute (taken before it runs, while the
        caches are all there); None when no target is set."""
        if not self.active:
            return None
        prefill = pairs = kv_read = 0
        firsts = []
        for item in out.items:
            n = len(item.tokens)
            if item.samples and not item.seq.output_ids:
                firsts.append(item.seq)  # its first token comes out of this step
            if item.seq.prefilling:
                prefill += n
                pairs += n * (item.seq.n_computed + (n + 1) / 2)
            elif item.seq.cache is not None:
                kv_read += item.seq.cache.nbytes()
        return Cost(prefill, pairs, kv_read, firsts=firsts)

    def observe(self, out, cost: Cost | None, seconds: float) -> None:
        """A step ran: record its cost and the latencies it completed; every few steps move the
        prefill share; then cap it for the next step by the decoding requests' slack."""
        if not self.active:
            return
        cost.seconds = seconds
        self.steps.append(cost)
        for seq in cost.firsts:
            if seq.timing.first_token is not None:
                self.ttft.append(seq.timing.first_token - seq.timing.arrival)
        for item in out.items:
            if item.seq.finished and (t := tpot(item.seq)) is not None:
                self.tpot.append(t)
        self.n += 1
        if self.n % EVERY == 0:
            self.adjust()
        share = self.share
        cap = self.prefill_cap()
        if cap is not None:
            share = min(share, max(STEP / 2, cap / self.budget))
        self.scheduler.prefill_share = share

    def adjust(self) -> None:
        """semi-PD's move of the share, by the p90 of the recent requests' latencies (those
        still decoding counted at their mean so far); the cost model is refitted."""
        tpots = list(self.tpot) + [t for s in self.scheduler.running if (t := tpot(s)) is not None]
        ttft_miss = self.ttft_slo is not None and len(self.ttft) >= 2 and _p90(self.ttft) > self.ttft_slo
        tpot_miss = self.tpot_slo is not None and len(tpots) >= 2 and _p90(tpots) > self.tpot_slo
        if ttft_miss and not tpot_miss:
            self.share = min(1.0, self.share + STEP)
        elif tpot_miss and not ttft_miss:
            self.share = max(STEP / 2, self.share - STEP)
        self.coef = self.fit()
        self.history.append(self.share)

    def fit(self) -> list[float] | None:
        """``[a, b, c, d]`` of the cost model over the recent steps (None with too few)."""
        if len(self.steps) < 8:
            return None
        x = torch.tensor([c.features for c in self.steps], dtype=torch.float64)
        y = torch.tensor([c.seconds for c in self.steps], dtype=torch.float64)
        return [float(v) for v in torch.linalg.lstsq(x, y[:, None]).solution[:, 0]]

    def slack(self, now: float | None = None) -> float | None:
        """Seconds the next step may take with every decoding request's mean time per output
        token still within the target (None: no target, or nothing decoding). A request with
        ``n`` tokens out has ``n`` gaps after the next one."""
        if self.tpot_slo is None:
            return None
        now = time.perf_counter() if now is None else now
        spare = [self.tpot_slo * len(s.output_ids) - (now - s.timing.first_token)
                 for s in self.scheduler.running
                 if s.output_ids and not s.prefilling and s.timing.first_token is not None]
        return min(spare) if spare else None

    def prefill_cap(self, now: float | None = None) -> int | None:
        """Prefill tokens the next step may take within the decoding requests' slack, by the
        fitted cost model at the last step's decode bytes and the recent chunks' mean context;
        None without a target, data or a decoding request."""
        if self.coef is None or (slack := self.slack(now)) is None:
            return None
        a, b, c, d = self.coef
        last = self.steps[-1]
        chunks = [s for s in self.steps if s.prefill]
        context = sum(s.pairs for s in chunks) / max(1, sum(s.prefill for s in chunks))  # per token
        per_token = b + c * context / 1e6
        if per_token <= 0:
            return None
        return max(1, int((slack - a - d * last.kv_read / 1e6) / per_token))


def tpot(seq) -> float | None:
    """A request's time per output token so far: the mean gap between its tokens (None before
    its second token)."""
    t = seq.timing
    n = len(seq.output_ids)
    if n < 2 or t.first_token is None or t.last_token is None:
        return None
    return (t.last_token - t.first_token) / (n - 1)


@dataclass
class Cost:
    """What one step moved and computed, and how long it took."""

    prefill: int          # prefill tokens
    pairs: float          # prefill attention: each chunk token times the positions it attends
    kv_read: int          # bytes the decoding sequences' caches hold (decode attention reads them)
    seconds: float = 0.0
    firsts: list = field(default_factory=list)  # sequences whose first token the step samples

    @property
    def features(self) -> list[float]:
        return [1.0, float(self.prefill), self.pairs / 1e6, self.kv_read / 1e6]


def _p90(values) -> float:
    return float(torch.tensor(list(values)).quantile(0.9))
