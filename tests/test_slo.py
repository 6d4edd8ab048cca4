"""The SLO controller: semi-PD's loop moves the prefill share the way each missed target asks,
the Nexus-style cost model recovers a step's costs, and prefill is capped by the time the
decoding requests can spare with their mean time per output token within the target."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from kvtier.config import EngineConfig
from kvtier.engine.sequence import Timing
from kvtier.engine.slo import EVERY, STEP, Cost, SloController, tpot


class Sched:
    prefill_share = 0.5

    def __init__(self, running=()):
        self.running = list(running)


def controller(running=(), **cfg) -> SloController:
    return SloController(EngineConfig(prefill_share=0.5, **cfg), Sched(running))


def decoding(tokens: int, first: float, last: float | None = None):
    """A running request past its prompt with ``tokens`` out, its first at ``first``."""
    return SimpleNamespace(output_ids=[7] * tokens, prefilling=False, finished=False,
                           timing=Timing(arrival=0.0, first_token=first, last_token=last))


@pytest.mark.parametrize("ttft, tpot_, moved", [(9.0, 0.01, +STEP), (0.1, 0.9, -STEP), (9.0, 0.9, 0.0), (0.1, 0.01, 0.0)])
def test_the_share_moves_toward_the_target_that_misses(ttft, tpot_, moved):
    slo = controller(ttft_slo=1.0, tpot_slo=0.1)
    slo.ttft.extend([ttft] * 8)
    slo.tpot.extend([tpot_] * 8)
    slo.adjust()
    assert slo.share == pytest.approx(0.5 + moved)


def test_a_requests_time_per_output_token_is_the_mean_gap_between_its_tokens():
    assert tpot(decoding(5, first=10.0, last=12.0)) == pytest.approx(0.5)
    assert tpot(decoding(1, first=10.0, last=10.0)) is None  # one token: no gap yet
    # requests still decoding count at their mean so far: one far behind makes TPOT miss
    slo = controller(running=[decoding(3, first=0.0, last=4.0)], tpot_slo=0.5)
    slo.tpot.extend([0.1] * 2)
    slo.adjust()
    assert slo.share == pytest.approx(0.5 - STEP)


def fitted(running, a=0.02, b=2e-4, c=5e-3, d=4e-3, tpot_slo=0.2) -> SloController:
    rng = random.Random(0)
    slo = controller(running=running, tpot_slo=tpot_slo)
    for _ in range(40):
        p = rng.choice([0, 64, 256, 512])
        ctx = rng.randrange(0, 4096)
        cost = Cost(p, p * (ctx + (p + 1) / 2), rng.randrange(1, 50) * 10 ** 6)
        cost.seconds = a + b * cost.prefill + c * cost.pairs / 1e6 + d * cost.kv_read / 1e6
        slo.steps.append(cost)
    slo.coef = slo.fit()
    return slo


def test_the_cost_model_recovers_a_steps_costs_and_caps_prefill_by_the_decoders_slack():
    a, b, c, d = 0.02, 2e-4, 5e-3, 4e-3  # s, s/token, s per 1e6 token pairs, s/MB read
    now = 100.0
    ahead = decoding(20, first=now - 1.0)   # 20 tokens in 1 s against 0.2 s each: 2.8 s to spare
    behind = decoding(5, first=now - 0.7)   # 0.2 s to spare: it bounds the step
    slo = fitted([ahead, behind])
    assert slo.coef == pytest.approx([a, b, c, d], rel=1e-6)
    assert slo.slack(now) == pytest.approx(0.2 * 5 - 0.7)
    last = slo.steps[-1]
    chunks = [s for s in slo.steps if s.prefill]
    per_pair = sum(s.pairs for s in chunks) / sum(s.prefill for s in chunks)
    cap = slo.prefill_cap(now)
    assert cap == int((0.2 * 5 - 0.7 - a - d * last.kv_read / 1e6) / (b + c * per_pair / 1e6))
    alone = fitted([ahead])  # only the request that is ahead: it lends a longer chunk
    assert alone.prefill_cap(now) > cap
    slo.steps.append(Cost(0, 0, last.kv_read + 20 * 10 ** 6, a + d * (last.kv_read / 1e6 + 20)))
    assert slo.prefill_cap(now) < cap  # decode reads more bytes: less room for prefill
    assert fitted([]).prefill_cap(now) is None  # nothing decoding: prefill is not capped


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
    assert len(slo.history) == 2 and slo.coef is not None


def test_a_prompts_time_to_first_token_is_recorded_whatever_the_size_of_its_last_chunk():
    """The step that ends a prompt samples its first token; a chunk of many tokens counts
    (the sample is known before the step, not after it, when the chunk's tokens are computed)."""
    seq = SimpleNamespace(output_ids=[], prefilling=True, finished=False, n_computed=0, n_pending=300,
                          cache=None, timing=Timing(arrival=1.0))
    item = SimpleNamespace(seq=seq, tokens=[5] * 300, samples=True)
    out = SimpleNamespace(items=[item])
    slo = controller(ttft_slo=1.0)
    cost = slo.cost(out)
    seq.output_ids, seq.prefilling, seq.timing.first_token = [9], False, 1.8  # the step ran
    slo.observe(out, cost, 0.8)
    assert list(slo.ttft) == [pytest.approx(0.8)]
