"""SLO-aware split of each step's token budget between prefill chunks and decode tokens.

semi-PD's loop: over a window of recent requests, when the p90 time to first token misses its
target, give prefill a larger share of the step; when the p90 time per output token misses,
give decode more (a smaller prefill share); when both miss, hold. Nexus's cost model beside
it: a step's latency is predicted from its prefill tokens and decode tokens (a least-squares
fit over recent steps), and the prefill share is capped so that a step with the running
decode tokens stays within the TPOT target.
"""

from __future__ import annotations

from collections import deque

import torch

from kvtier.config import EngineConfig

STEP = 0.1        # share moved per adjustment
EVERY = 8         # steps between adjustments
WINDOW = 64       # samples kept of each latency, and steps kept for the cost model


class SloController:
    def __init__(self, config: EngineConfig, scheduler):
        self.ttft_slo, self.tpot_slo = config.ttft_slo, config.tpot_slo
        self.scheduler, self.budget = scheduler, config.max_batched_tokens
        self.share = config.prefill_share
        self.ttft: deque[float] = deque(maxlen=WINDOW)
        self.tpot: deque[float] = deque(maxlen=WINDOW)
        self.steps: deque[tuple[int, int, float]] = deque(maxlen=WINDOW)  # prefill, decode tokens, seconds
        self.n = 0
        self.history: list[float] = []  # the share after each adjustment (for reports)

    @property
    def active(self) -> bool:
        return self.ttft_slo is not None or self.tpot_slo is not None

    def observe(self, out, seconds: float) -> None:
        """A step ran: record its latencies; every few steps move the prefill share."""
        if not self.active:
            return
        prefill, decode = out.prefill_tokens, out.decode_tokens
        self.steps.append((prefill, decode, seconds))
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
        ttft_miss = self.ttft_slo is not None and len(self.ttft) >= 4 and _p90(self.ttft) > self.ttft_slo
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

    def prefill_cap(self) -> int | None:
        """Prefill tokens a step may take and still meet the TPOT target, by the fitted cost
        model ``seconds = a + b * prefill + c * decode``; None without a target or data."""
        if self.tpot_slo is None or len(self.steps) < 8:
            return None
        x = torch.tensor([[1.0, p, d] for p, d, _ in self.steps], dtype=torch.float64)
        y = torch.tensor([s for *_, s in self.steps], dtype=torch.float64)
        coef = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
        a, b, c = (float(v) for v in coef)
        if b <= 0:
            return None
        decode = self.steps[-1][1]
        return max(1, int((self.tpot_slo - a - c * decode) / b))


def _p90(values) -> float:
    return float(torch.tensor(list(values)).quantile(0.9))
