"""The scheduler on tiny shapes, with a fake KV store: exact admission, chunking, preemption
and order (no model runs here)."""

from __future__ import annotations

from kvtier.config import EngineConfig, SamplingParams
from kvtier.engine.scheduler import Scheduler
from kvtier.engine.sequence import Sequence, Status


class FakeMemory:
    """Each token costs ``per_token`` bytes; a hit is given by ``cached`` prompt tokens."""

    def __init__(self, budget: int, per_token: int = 1, swap: bool = False):
        self.budget, self.per_token, self.swap = budget, per_token, swap
        self.prefix, self.freed, self.swapped = 0, [], []

    def held(self, running, extra):
        return self.prefix + sum(max(s.n_computed + extra, len(s.ids) if s.prefilling else 0) * self.per_token
                                 for s in running)

    def need(self, seq):
        if seq.status is Status.SWAPPED:  # its blocks come back into the budget's count
            return (seq.n_computed + 1) * self.per_token
        return len(seq.ids) * self.per_token

    def allocate(self, seq):
        seq.cache = "cache"

    def reclaim(self, nbytes):
        freed = min(nbytes, self.prefix)
        self.prefix -= freed
        return freed

    def free(self, seq):
        self.freed.append(seq.id)
        seq.cache = None

    def swap_out(self, seq):
        if self.swap:
            self.swapped.append(seq.id)
            seq.cache = "swapped"
        return self.swap


def seq(i, n_prompt, priority=0, max_tokens=8):
    s = Sequence(i, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens), "dense", priority)
    s.timing.arrival = float(i)  # arrival order = id
    return s


def plan(out):
    return [(item.seq.id, len(item.tokens)) for item in out.items]


def step(sched, out, token=7):
    tokens = [token if item.samples else None for item in out.items]
    sched.postprocess(out, tokens, lambda s, t: s.output_ids.append(t))


def test_decode_first_then_prefill_chunks_within_the_token_budget():
    sched = Scheduler(EngineConfig(max_batched_tokens=10, max_seqs=8), FakeMemory(1000))
    a, b = seq(0, 12), seq(1, 5)
    sched.add(a), sched.add(b)
    out = sched.schedule()
    assert plan(out) == [(0, 10)]           # a's prompt takes the whole budget; b waits
    step(sched, out)
    out = sched.schedule()
    assert plan(out) == [(0, 2), (1, 5)]    # a's last chunk, then b admitted
    assert [i.samples for i in out.items] == [True, True]
    step(sched, out)
    out = sched.schedule()
    assert plan(out) == [(0, 1), (1, 1)]    # both decode
    assert out.decode_tokens == 2 and out.prefill_tokens == 0


def test_prefill_share_caps_chunks_beside_decode():
    sched = Scheduler(EngineConfig(max_batched_tokens=10, max_seqs=8, prefill_share=0.3), FakeMemory(1000))
    a = seq(0, 3)
    sched.add(a)
    step(sched, sched.schedule())
    sched.add(seq(1, 20))
    out = sched.schedule()
    assert plan(out) == [(0, 1), (1, 3)]    # 0.3 of 10 tokens for prefill while a decodes


def test_admission_is_by_bytes_not_tokens():
    # budget 100 bytes: two 40-token prompts at 1 B/token fit, the third waits
    mem = FakeMemory(100)
    sched = Scheduler(EngineConfig(max_batched_tokens=1000, max_seqs=8), mem)
    for i in range(3):
        sched.add(seq(i, 40))
    assert plan(sched.schedule()) == [(0, 40), (1, 40)]
    # a codec 4x smaller admits all three (a rotatekv sequence costs a fraction of a dense one)
    mem = FakeMemory(100 * 4, per_token=4)
    sched = Scheduler(EngineConfig(max_batched_tokens=1000, max_seqs=8), mem)
    for i in range(3):
        sched.add(seq(i, 40))
    assert [i for i, _ in plan(sched.schedule())] == [0, 1]
    mem = FakeMemory(100, per_token=1)
    mem.need = lambda s: len(s.ids) // 4  # the small codec
    mem.held = lambda running, extra: sum(max(s.n_computed + extra, len(s.ids)) // 4 for s in running)
    sched = Scheduler(EngineConfig(max_batched_tokens=1000, max_seqs=8), mem)
    for i in range(3):
        sched.add(seq(i, 40))
    assert [i for i, _ in plan(sched.schedule())] == [0, 1, 2]


def test_priority_orders_admission_and_nothing_overtakes_a_blocked_request():
    sched = Scheduler(EngineConfig(max_batched_tokens=1000, max_seqs=8), FakeMemory(50))
    sched.add(seq(0, 30, priority=1))
    sched.add(seq(1, 30, priority=0))  # more important, arrived later
    sched.add(seq(2, 5, priority=1))
    assert plan(sched.schedule()) == [(1, 30)]  # then 0 does not fit; 2 (smaller) may not overtake it


def test_prefix_cache_gives_room_before_anyone_is_preempted():
    mem = FakeMemory(100)
    mem.prefix = 70
    sched = Scheduler(EngineConfig(max_batched_tokens=1000, max_seqs=8), mem)
    sched.add(seq(0, 50))
    assert plan(sched.schedule()) == [(0, 50)]
    assert mem.prefix == 50  # 20 bytes reclaimed: 70 held + 50 needed - 100


def test_preemption_recomputes_the_least_important_newest_sequence():
    mem = FakeMemory(50)
    sched = Scheduler(EngineConfig(max_batched_tokens=1000, max_seqs=8), mem)
    a, b, c = seq(0, 20, max_tokens=50), seq(1, 20, max_tokens=50), seq(2, 20, priority=-1, max_tokens=50)
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    assert plan(out) == [(2, 20), (0, 20)]  # c first (priority), then a; b does not fit (40 + 20 > 50)
    step(sched, out)
    for _ in range(20):  # decoding grows (b still waits) until c and a's next tokens pass 50 bytes
        out = sched.schedule()
        if out.preempted:
            break
        step(sched, out)
    assert [s.id for s in out.preempted] == [0]  # a: lower priority than c
    assert a.status is Status.WAITING and a.n_computed == 0 and a.cache is None and mem.freed == [0]
    assert len(a.output_ids) > 0  # its tokens so far are kept and run again when it comes back
    assert plan(out) == [(2, 1)]


def test_preemption_swaps_to_a_lower_tier_and_resumes_in_place():
    mem = FakeMemory(60, swap=True)
    sched = Scheduler(EngineConfig(max_batched_tokens=1000, max_seqs=8), mem)
    a, b = seq(0, 25, max_tokens=50), seq(1, 25, max_tokens=50)
    sched.add(a), sched.add(b)
    out = sched.schedule()
    assert plan(out) == [(0, 25), (1, 25)]
    step(sched, out)
    for _ in range(10):
        out = sched.schedule()
        if out.preempted:
            break
        step(sched, out)
    assert [s.id for s in out.preempted] == [1] and mem.swapped == [1]
    assert b.status is Status.SWAPPED and b.n_computed > 0 and mem.freed == []
    step(sched, out)
    out = sched.schedule()
    assert plan(out) == [(0, 1)] and b.status is Status.SWAPPED  # no room yet
    a.status = Status.FINISHED  # a ends: b resumes where it was, nothing recomputed
    sched.postprocess(out, [None], lambda s, t: None)
    out = sched.schedule()
    assert plan(out) == [(1, 1)] and b.status is Status.RUNNING and mem.freed == [0]


def test_max_seqs_bounds_a_step():
    sched = Scheduler(EngineConfig(max_batched_tokens=1000, max_seqs=2), FakeMemory(10_000))
    for i in range(4):
        sched.add(seq(i, 3))
    assert [i for i, _ in plan(sched.schedule())] == [0, 1]
