"""SLO-aware split of each step's token budget between prefill chunks and decode tokens.

semi-PD's loop: over a window of recent requests, when the p90 time to first token misses its
target, give prefill a larger share of the step; when the p90 time per output token misses,
give decode more (a smaller prefill share); when both miss, hold. Nexus's cost model beside
it: a step's latency is predicted from what it moves and computes (a least-squares fit over
recent steps)::

    seconds = a + b * prefill tokens + c * prefill attention (token pairs) + d * KV bytes decode reads

``a`` is the weights read once per step, ``b`` the matmuls per prefill token, ``c`` a chunk's
queries against its past, ``d`` decode attention, which reads every byte the decoding
sequences hold (so a 2-bit cache's decode costs less than a dense one's). The prefill share is
capped so that a step with this step's decode bytes stays within the TPOT target.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from kvtier.config import EngineConfig

STEP = 0.1        # share moved per adjustment
EVERY = 8         # steps between adjustments
WINDOW = 64       # step times kept (for the TPOT p90 and the cost model)
RECENT = 8        # time-to-first-token samples kept: the last few requests, so a miss shows at once


class SloController:
    def __init__(self, config: EngineConfig, scheduler):
        self.ttft_slo, self.tpot_slo = config.ttft_slo, config.tpot_slo
        self.scheduler, self.budget = scheduler, config.max_batched_tokens
        self.share = config.prefill_share
        self.ttft: deque[float] = deque(maxlen=RECENT)
        self.tpot: deque[float] = deque(maxlen=WINDOW)
        self.steps: deque[Cost] = deque(maxlen=WINDOW)
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
        for item in out.items:
            n = len(item.tokens)
            if item.seq.prefilling:
                prefill += n
                pairs += n * (item.seq.n_computed + (n + 1) / 2)
            elif item.seq.cache is not None:
                kv_read += item.seq.cache.nbytes()
        return Cost(prefill, pairs, kv_read)

    def observe(self, out, cost: Cost | None, seconds: float) -> None:
        """A step ran: record its latencies; every few steps move the prefill share."""
        if not self.active:
            return
        cost.seconds = seconds
        self.steps.append(cost)
        for item in out.items:
            seq = item.seq
            if len(seq.output_ids) == 1 and item.samples and seq.timing.first_token is not None:
                self.ttft.append(seq.timing.first_token - seq.timing.arrival)
            elif not seq.prefilling and len(seq.output_ids) > 1:
                self.tpot.append(seconds)
        self.n += 1
        if self.n % EVERY == 0:
            self.adjust()

    def adjust(self) -> None:
        ttft_miss = self.ttft_slo is not None and len(self.ttft) >= 2 and _p90(self.ttft) > self.ttft_slo
        tpot_miss = self.tpot_slo is not None and len(self.tpot) >= 4 and _p90(self.tpot) > self.tpot_slo
        if ttft_miss and not tpot_miss:
            self.share = min(1.0, self.share + STEP)
        elif tpot_miss and not ttft_miss:
            self.share = max(STEP / 2, self.share - STEP)
        share = self.share
        cap = self.prefill_cap()
        if cap is not None:
            share = min(share, max(STEP / 2, cap / self.budget))
        self.scheduler.prefill_share = share
        self.history.append(share)

    def fit(self) -> list[float] | None:
        """``[a, b, c, d]`` of the cost model over the recent steps (None with too few)."""
        if len(self.steps) < 8:
            return None
        x = torch.tensor([c.features for c in self.steps], dtype=torch.float64)
        y = torch.tensor([c.seconds for c in self.steps], dtype=torch.float64)
        return [float(v) for v in torch.linalg.lstsq(x, y[:, None]).solution[:, 0]]

    def prefill_cap(self) -> int | None:
        """Prefill tokens a step may take and still meet the TPOT target, by the fitted cost
        model at the last step's decode bytes and the recent chunks' mean context; None
        without a target or data."""
        if self.tpot_slo is None or (coef := self.fit()) is None:
            return None
        a, b, c, d = coef
        last = self.steps[-1]
        chunks = [s for s in self.steps if s.prefill]
        context = sum(s.pairs for s in chunks) / max(1, sum(s.prefill for s in chunks))  # per token
        per_token = b + c * context / 1e6
        if per_token <= 0:
            return None
        return max(1, int((self.tpot_slo - a - d * last.kv_read / 1e6) / per_token))


@dataclass
class Cost:
    """What one step moved and computed, and how long it took."""

    prefill: int          # prefill tokens
    pairs: float          # prefill attention: each chunk token times the positions it attends
    kv_read: int          # bytes the decoding sequences' caches hold (decode attention reads them)
    seconds: float = 0.0

    @property
    def features(self) -> list[float]:
        return [1.0, float(self.prefill), self.pairs / 1e6, self.kv_read / 1e6]


def _p90(values) -> float:
    return float(torch.tensor(list(values)).quantile(0.9))
