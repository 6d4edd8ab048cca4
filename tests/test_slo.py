"""The SLO controller: semi-PD's loop moves the prefill share the way each missed target asks,
and the Nexus-style cost model recovers a step's costs and caps prefill by them."""

from __future__ import annotations

import random

import pytest

from kvtier.config import EngineConfig
from kvtier.engine.slo import EVERY, STEP, Cost, SloController


class Sched:
    prefill_share = 0.5


def controller(**cfg) -> SloController:
    return SloController(EngineConfig(prefill_share=0.5, **cfg), Sched())


@pytest.mark.parametrize("ttft, tpot, moved", [(9.0, 0.01, +STEP), (0.1, 0.9, -STEP), (9.0, 0.9, 0.0), (0.1, 0.01, 0.0)])
def test_the_share_moves_toward_the_target_that_misses(ttft, tpot, moved):
    slo = controller(ttft_slo=1.0, tpot_slo=0.1)
    slo.ttft.extend([ttft] * 8)
    slo.tpot.extend([tpot] * 8)
    slo.adjust()
    assert slo.share == pytest.approx(0.5 + moved)
    assert slo.scheduler.prefill_share == pytest.approx(0.5 + moved)  # no cost data yet: no cap


def test_the_cost_model_recovers_a_steps_costs_and_caps_prefill_by_them():
    a, b, c, d = 0.02, 2e-4, 5e-3, 4e-3  # s, s/token, s per 1e6 token pairs, s/MB read
    rng = random.Random(0)
    slo = controller(tpot_slo=0.2)
    for _ in range(40):
        p = rng.choice([0, 64, 256, 512])
        ctx = rng.randrange(0, 4096)
        cost = Cost(p, p * (ctx + (p + 1) / 2), rng.randrange(1, 50) * 10 ** 6)
        seconds = a + b * cost.prefill + c * cost.pairs / 1e6 + d * cost.kv_read / 1e6
        slo.steps.append(cost)
        cost.seconds = seconds
    assert slo.fit() == pytest.approx([a, b, c, d], rel=1e-6)
    cap = slo.prefill_cap()
    last = slo.steps[-1]
    chunks = [s for s in slo.steps if s.prefill]
    per_pair = sum(s.pairs for s in chunks) / sum(s.prefill for s in chunks)
    budget = 0.2 - a - d * last.kv_read / 1e6
    assert cap == int(budget / (b + c * per_pair / 1e6))
    more_bytes = Cost(0, 0, last.kv_read + 20 * 10 ** 6, a + d * (last.kv_read / 1e6 + 20))
    slo.steps.append(more_bytes)  # decode reads more bytes: less room for prefill
    assert slo.prefill_cap() < cap


def test_the_controller_adjusts_every_few_steps_and_only_with_a_target():
    class Out:
        items: tuple = ()
    idle = controller()
    assert idle.cost(Out()) is None
    for _ in range(2 * EVERY):
        idle.observe(Out(), None, 0.1)
    assert idle.history == []
    slo = controller(tpot_slo=0.1)
    for _ in range(2 * EVERY):
        slo.observe(Out(), slo.cost(Out()), 0.1)
    assert len(slo.history) == 2
