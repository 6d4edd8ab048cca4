"""Our forward against transformers' forward on the same (tiny, random) weights."""

import pytest
import torch
from conftest import ours_from_hf, tiny_hf

from kvtier.engine import ModelRunner
from kvtier.models.base import Batch

FAMILIES = {
    "llama": {},
    "llama3-rope": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 64}},
    "qwen2": {},
    "gemma3": {},
}


def build(name):
    family = name.split("-")[0].replace("llama3", "llama")
    hf = tiny_hf(family, **FAMILIES[name])
    return hf, ours_from_hf(hf)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    return build(request.param)


IDS = torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(3)).tolist()


def test_prefill_logits_match_transformers(pair):
    hf, ours = pair
    runner = ModelRunner(ours, "dense(dtype=fp32)", block_size=8)
    got = runner.feed([runner.new_cache()], [IDS], logits="all")
    assert (got - hf_logits(hf, IDS)).abs().max() <= 1e-3


@pytest.mark.parametrize("chunk", [1, 13])
def test_chunked_prefill_and_decode_match_transformers(pair, chunk):
    hf, ours = pair
    want = hf_logits(hf, IDS)
    runner = ModelRunner(ours, "dense(dtype=fp32)", block_size=8)
    cache = runner.new_cache()
    rows = []
    for i in range(0, len(IDS), chunk):  # chunk=1 is token-by-token decode
        rows.append(runner.model.forward(Batch.of([cache], [IDS[i:i + chunk]]), logits="all"))
    assert (torch.cat(rows) - want).abs().max() <= 1e-3


def test_batch_of_different_lengths_equals_one_at_a_time(pair):
    _, ours = pair
    runner = ModelRunner(ours, "dense(dtype=fp32)", block_size=8, prefill_chunk=50)
    prompts = [IDS[:70], IDS[5:20], IDS[30:61]]
    alone = [runner.feed([runner.new_cache()], [p])[0] for p in prompts]
    caches = [runner.new_cache() for _ in prompts]
    together = runner.feed(caches, prompts)
    torch.testing.assert_close(together, torch.stack(alone), atol=1e-4, rtol=1e-4)
    # one decode step for all three, each at its own position
    step = runner.feed(caches, [[1], [2], [3]])
    for p, t, row in zip(prompts, [1, 2, 3], step):
        c = runner.new_cache()
        runner.feed([c], [p])
        torch.testing.assert_close(row, runner.feed([c], [[t]])[0], atol=1e-4, rtol=1e-4)


def test_gemma_sliding_layers_hold_only_their_window():
    hf, ours = build("gemma3")
    runner = ModelRunner(ours, "dense(dtype=fp32)", block_size=8)
    cache = runner.new_cache()
    runner.feed([cache], [IDS])
    for layer, window in zip(cache.layers, ours.windows):
        if window:
            assert layer.n_held < window + 2 * 8  # window 16: at most the window + a block either side
        else:
            assert layer.n_held == len(IDS)
