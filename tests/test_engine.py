"""The engine on the tiny random Llama: continuous batching gives each sequence what it gets
alone, the prefix cache gives the same logits as a cold prefill, bytes are charged exactly,
the sampler's knobs do what they say; and the Python API refuses bad input."""

from __future__ import annotations

import math

import pytest

from conftest import tokens
from kvtier.config import EngineConfig, SamplingParams
from kvtier.engine import Engine
from kvtier.engine.engine import skipped_layers
from kvtier.engine.runner import ModelRunner
from kvtier.errors import KvtierError
from kvtier.models.loader import Loaded


class Tok:
    """A tokenizer for the 256-token tiny models: a token id is a character."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 26) for i in ids)

    def __call__(self, text, add_special_tokens=True):
        return type("E", (), {"input_ids": [ord(c) % 256 for c in text]})()


@pytest.fixture
def make(llama):
    def make(**cfg):
        loaded = Loaded(llama, Tok(), None, "tiny-llama")
        return Engine(EngineConfig(dtype="fp32", **cfg), loaded=loaded)
    return make


def run_all(engine, seqs):
    for _ in range(10_000):
        if all(s.finished for s in seqs):
            return
        engine.step()
    raise AssertionError("did not finish")


def greedy(n):
    return SamplingParams(max_tokens=n, ignore_eos=True)


def test_continuous_batching_equals_one_at_a_time(make):
    engine = make(max_batched_tokens=48)
    prompts = [tokens(n, seed=n) for n in (5, 70, 130, 9)]
    alone = []
    for p in prompts:
        s = engine.add(p, greedy(12))
        run_all(engine, [s])
        alone.append(s.output_ids)
    engine = make(max_batched_tokens=48, prefix_cache=False)
    seqs = [engine.add(p, greedy(12)) for p in prompts[:2]]
    for _ in range(3):
        engine.step()
    seqs += [engine.add(p, greedy(12)) for p in prompts[2:]]  # join mid-way
    run_all(engine, seqs)
    assert [s.output_ids for s in seqs] == alone


def test_prefix_cache_hit_gives_the_cold_prefill_tokens(make):
    doc = tokens(200, seed=7)
    cold = make(prefix_cache=False)
    a = cold.add(doc + [1, 2, 3], greedy(10))
    run_all(cold, [a])
    engine = make()
    first = engine.add(doc + [4, 5], greedy(3))
    run_all(engine, [first])
    assert first.n_cached == 0 and engine.prefixes.nbytes > 0
    b = engine.add(doc + [1, 2, 3], greedy(10))
    run_all(engine, [b])
    assert b.n_cached == 192  # three full 64-token blocks of the shared 200 tokens
    assert b.output_ids == a.output_ids
    stats = engine.prefixes.stats
    assert stats.hits == 192 and stats.queries == len(first.ids) - 3 + len(b.ids) - 10


def test_prefix_cache_entries_hold_encoded_bytes_and_leave_least_recently_used_first(make):
    engine = make(kv="int(bits=2,group=16)")
    docs = [tokens(130, seed=s) for s in (1, 2)]
    for d in docs:
        run_all(engine, [engine.add(d, greedy(1))])
    blocks = list(engine.prefixes.blocks.values())
    assert len(blocks) == 4  # two full blocks of each document
    dense = make()
    run_all(dense, [dense.add(docs[0], greedy(1))])
    assert engine.prefixes.nbytes * 2 < dense.prefixes.nbytes  # 2-bit blocks are kept as 2-bit bytes
    hit = engine.add(docs[1] + [9], greedy(1))
    run_all(engine, [hit])
    assert hit.n_cached == 128
    freed = engine.reclaim(1)
    assert freed > 0 and engine.prefixes.stats.evicted_blocks == 1
    gone = set(b.key for b in blocks) - set(engine.prefixes.blocks)
    assert gone == {blocks[1].key}  # document 0's deepest block: least recently used


def _shared_slots(seq):
    """Per layer: the shared-pool slots ``seq``'s block table points at."""
    return [[s for s, w in zip(layer.slots, layer.where) if layer.pools[w].shared] for layer in seq.cache.layers]


@pytest.mark.parametrize("kv", ["dense(dtype=fp32)", "int(bits=2,group=16)"])
def test_cached_prefix_is_held_once_and_read_by_every_sequence(make, kv):
    doc = tokens(200, seed=3)
    cold = make(kv=kv, prefix_cache=False)
    alone = []
    for tail in ([1, 2], [3, 4, 5], [6]):
        s = cold.add(doc + tail, greedy(8))
        run_all(cold, [s])
        alone.append(s.output_ids)
    engine = make(kv=kv)
    first = engine.add(doc + [9], greedy(1))
    run_all(engine, [first])
    pools = engine.prefixes.pools[str(first.kv)]
    cached = engine.prefixes.nbytes
    assert [p.holders(s) for p, s in zip(pools, [0] * len(pools))] == [1] * len(pools)  # the cache alone
    seqs = [engine.add(doc + tail, greedy(8)) for tail in ([1, 2], [3, 4, 5], [6])]
    engine.step()  # all three admitted, each pointed at the three cached blocks
    assert all(s.n_cached == 192 for s in seqs)
    assert _shared_slots(seqs[0]) == _shared_slots(seqs[1]) == _shared_slots(seqs[2])
    assert all(p.holders(s) == 4 for p, slots in zip(pools, _shared_slots(seqs[0])) for s in slots)
    own = sum(s.cache.nbytes() - s.cache.shared_bytes() for s in seqs)
    assert engine.prefixes.nbytes == cached  # nothing copied
    assert engine.kv_bytes()[0][1] == own + cached
    assert engine.held(engine.scheduler.running) < sum(s.cache.nbytes() for s in seqs)
    run_all(engine, seqs)
    if kv.startswith("dense"):  # (a cold prefill attends its prompt before encoding; a hit, after)
        assert [s.output_ids for s in seqs] == alone  # attention on the shared blocks: same tokens
    assert all(p.holders(s) == 1 for b in engine.prefixes.blocks.values() for p, s in zip(pools, b.slots))
    assert engine.reclaim(10 ** 9) == cached and engine.prefixes.nbytes == 0
    assert all(not p.refs for p in pools)  # every slot back to the free list


def test_prompts_prefilled_together_end_up_sharing_one_copy(make):
    engine = make()
    doc = tokens(150, seed=5)
    a, b = engine.add(doc + [1], greedy(4)), engine.add(doc + [2], greedy(4))
    engine.step()  # both prefill at once: nothing is cached yet
    assert a.n_cached == b.n_cached == 0
    assert _shared_slots(a) == _shared_slots(b) and _shared_slots(a)[0] == [0, 1]
    pool = engine.prefixes.pools[a.kv][0]
    assert pool.holders(0) == 3  # the cache, a and b: b's own copy was freed for the cached one
    assert engine.kv_bytes()[0][1] == sum(s.cache.nbytes() - s.cache.shared_bytes() for s in (a, b)) \
        + engine.prefixes.nbytes
    run_all(engine, [a, b])
    assert pool.holders(0) == 1


def test_eviction_skips_blocks_a_running_sequence_reads(make):
    engine = make()
    doc = tokens(140, seed=8)
    run_all(engine, [engine.add(doc, greedy(1))])
    reader = engine.add(doc + [7], greedy(50))
    engine.step()
    assert reader.n_cached == 128
    assert engine.reclaim(10 ** 9) == 0  # both blocks are read by a running sequence
    run_all(engine, [reader])
    assert engine.reclaim(10 ** 9) > 0 and not engine.prefixes.blocks


@pytest.mark.parametrize("kv", ["dense(dtype=bf16)", "int(bits=4,group=16)", "int(bits=2,group=16,residual=32)", "dense(dtype=fp16)"])
def test_bytes_charged_are_the_bytes_held(llama, kv):
    runner = ModelRunner(llama, kv)
    for n in (1, 63, 64, 65, 200):
        cache = runner.new_cache()
        runner.feed([cache], [tokens(n)])
        assert runner.bytes_for(n) == cache.nbytes(), n
        cache.close()


def test_kv_budget_admits_by_bytes_and_everyone_finishes(make):
    runner_bytes = make().runner.bytes_for(140)
    engine = make(kv_budget=str(int(2.5 * runner_bytes)), prefix_cache=False)
    seqs = [engine.add(tokens(100, seed=i), greedy(40)) for i in range(4)]
    engine.step()
    assert len(engine.scheduler.running) == 2  # the budget holds two, not four
    peak = 0
    while not all(s.finished for s in seqs):
        engine.step()
        peak = max(peak, engine.held(engine.scheduler.running))
    assert all(s.finish_reason == "length" and len(s.output_ids) == 40 for s in seqs)
    assert peak <= engine.budget


def test_abort_frees_the_cache(make):
    engine = make()
    s = engine.add(tokens(100), greedy(50))
    engine.step()
    assert s.cache is not None
    engine.abort(s)
    assert s.cache is None and s.finish_reason == "abort" and not engine.has_work()


def test_stop_strings_and_sampling_knobs(make):
    engine = make()
    g = engine.add(tokens(20), greedy(12))
    run_all(engine, [g])
    cut = g.text[3:5]
    s = engine.add(tokens(20), SamplingParams(max_tokens=12, stop=[cut], ignore_eos=True))
    run_all(engine, [s])
    assert s.finish_reason == "stop" and s.text == g.text[:g.text.find(cut)]
    seeded = [engine.add(tokens(20), SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True))
              for _ in range(2)]
    run_all(engine, seeded)
    assert seeded[0].output_ids == seeded[1].output_ids  # a seed gives the same tokens, whatever shares the step
    k1 = engine.add(tokens(20), SamplingParams(max_tokens=8, temperature=5.0, top_k=1, seed=1, ignore_eos=True))
    run_all(engine, [k1])
    assert k1.output_ids == g.output_ids[:8]  # top_k=1 is greedy at any temperature
    lp = engine.add(tokens(20), SamplingParams(max_tokens=3, logprobs=2, ignore_eos=True))
    run_all(engine, [lp])
    for tok, logprob, alts in lp.logprobs:
        assert alts[0][0] == tok and math.isclose(alts[0][1], logprob) and len(alts) == 2


def test_layer_skipping_is_balanced_over_the_middle():
    assert skipped_layers(30, 0.2) == frozenset({4, 8, 12, 17, 21, 25})  # 6 of 30, evenly over 2..27
    assert skipped_layers(30, 0.0) == frozenset()
    assert all(2 <= i < 28 for i in skipped_layers(30, 0.5))
    assert skipped_layers(3, 0.5) == frozenset()  # nothing between the first two and the last two


def test_python_api_refuses_bad_sampling_values():
    for bad in ({"temperature": float("nan")}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 2.0},
                {"max_tokens": 2.5}, {"top_k": -3}, {"seed": "x"}, {"stop": [""]}):
        with pytest.raises(KvtierError):
            SamplingParams(**bad)


@pytest.mark.e2e
def test_llm_generate_refuses_empty_and_bad_input():
    from kvtier.api import LLM

    llm = LLM(dtype="fp32")
    for call, words in ((lambda: llm.generate([]), "at least one prompt"),
                        (lambda: llm.generate("hi", temperature=float("nan")), "finite"),
                        (lambda: llm.generate("hi", max_new_tokens=2.5), "integer"),
                        (lambda: llm.generate("hi", top_p=0), "top_p"),
                        (lambda: llm.generate("hi \udcff"), "not valid text")):
        with pytest.raises(KvtierError, match=words):
            call()
    out = llm.generate(["The capital of France is", "Once upon a time"], max_new_tokens=4)
    assert [len(c.token_ids) for c in out] == [4, 4] and all(c.kv_bytes > 0 for c in out)
