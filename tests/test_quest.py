"""Block-sparse attention (quest): bounds hold, the chosen blocks are the top bounds per KV
head, attention over them equals masked reference attention, reading all blocks is exact."""

import pytest
import torch
from conftest import tokens

from kvtier.attention.blockwise import attend
from kvtier.engine import ModelRunner
from kvtier.kv.blockselect import BlockSelectKV
from kvtier.kv.codecs.base import LayerContext
from kvtier.kv.codecs.dense import Dense
from kvtier.kv.selectors.quest import Quest


def layer_with(n_tokens, quest, codec=None, n_kv=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = BlockSelectKV(quest, codec or Dense(dtype="fp32"), n_kv, d, 16, None, torch.float32, "cpu",
                          LayerContext(0, n_kv, d))
    k, v = torch.randn(n_kv, n_tokens, d, generator=g), torch.randn(n_kv, n_tokens, d, generator=g)
    k[:, 40:48] += 3.0  # some blocks stand out
    layer.append(k, v)
    return layer, k, v


def test_bounds_hold_for_every_key():
    layer, k, _ = layer_with(160, Quest(top_blocks=2))
    q = torch.randn(2, 3, 32)
    lo, hi = layer.bounds[:, :, 0].float(), layer.bounds[:, :, 1].float()
    upper = torch.maximum(q[:, :, None] * lo[:, None], q[:, :, None] * hi[:, None]).sum(-1)  # (Hkv, G, n)
    true = torch.einsum("hgd,hnd->hgn", q, k[:, :160]).reshape(2, 3, 10, 16).amax(-1)
    assert torch.all(true <= upper + 1e-2)


@pytest.mark.parametrize("sink", [True, False])
def test_picked_blocks_are_the_top_bounds_per_kv_head(sink):
    quest = Quest(top_blocks=3, sink_block=sink, recent=0)
    layer, _, _ = layer_with(200, quest)
    q = torch.randn(6, 1, 32)
    layer.select(q)
    for h in range(2):
        lo, hi = layer.bounds[h, :, 0].float(), layer.bounds[h, :, 1].float()
        ub = torch.stack([torch.maximum(q[h * 3 + j, 0] * lo, q[h * 3 + j, 0] * hi).sum(-1) for j in range(3)]).amax(0)
        if sink:
            ub[0] = float("inf")
        assert layer.picked[h].tolist() == sorted(ub.topk(3).indices.tolist())


def test_recent_blocks_are_always_read_within_the_count():
    layer, _, _ = layer_with(200, Quest(top_blocks=4, recent=2))  # 12 sealed blocks
    for seed in range(5):
        layer.select(torch.randn(6, 1, 32, generator=torch.Generator().manual_seed(seed)))
        assert layer.picked.shape == (2, 4)
        assert all({0, 10, 11} <= set(row.tolist()) for row in layer.picked)


def test_share_is_a_byte_budget_that_includes_the_key_bounds():
    layer, _, _ = layer_with(1616, Quest(share=0.25))  # 101 sealed blocks of 16 tokens
    n, block = len(layer.slots), layer.pool.slot_bytes()
    layer.select(torch.randn(6, 1, 32))
    k = layer.picked.shape[1]
    assert layer.read_bytes <= 0.25 * n * block  # bounds of every block plus the picked blocks
    assert layer.read_bytes + 2 * (block // 2) > 0.25 * n * block  # one more block would not fit
    assert k < 0.25 * n  # the bounds take their share of the budget
    whole, _, _ = layer_with(1616, Quest(share=1.0))
    whole.select(torch.randn(6, 1, 32))
    assert whole.picked is None and whole.read_bytes == n * block  # every block, no bounds


def test_dense_layers_read_every_block(llama):
    runner = ModelRunner(llama, "quest(share=0.125,dense_layers=1)+dense(dtype=fp32)")
    cache = runner.new_cache()
    runner.feed([cache], [tokens(300)])
    kinds = [isinstance(layer, BlockSelectKV) for layer in cache.layers]
    assert kinds == [False] + [True] * (llama.n_layers - 1)


def test_attention_over_picked_blocks_equals_masked_reference():
    layer, k, v = layer_with(200, Quest(top_blocks=4))  # 12 blocks + 8 residual tokens
    q = torch.randn(6, 1, 32) * 0.3
    out = attend(q, layer.select(q), 199, 1.0)
    keep = torch.zeros(2, 200, dtype=torch.bool)
    keep[:, 192:] = True  # the residual
    for h in range(2):
        for b in layer.picked[h].tolist():
            keep[h, b * 16:(b + 1) * 16] = True
    s = torch.einsum("htd,hnd->htn", q.reshape(2, 3, 32), k)
    p = s.masked_fill(~keep[:, None], float("-inf")).softmax(-1)
    ref = torch.einsum("htn,hnd->htd", p, v).reshape(6, 1, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert layer.read_bytes < layer.nbytes() / 2


def test_reading_every_block_gives_the_codec_logits(llama):
    toks = tokens(300)
    outs = []
    for kv in ["int(bits=4,group=16)", "quest(share=1.0)+int(bits=4,group=16)"]:
        runner = ModelRunner(llama, kv)
        cache = runner.new_cache()
        out = [runner.feed([cache], [toks[:260]])] + [runner.feed([cache], [[t]]) for t in toks[260:]]
        outs.append(torch.cat(out))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)


def test_a_small_share_reads_a_small_share_and_stays_finite(llama):
    runner = ModelRunner(llama, "quest(share=0.125)+int(bits=4,group=16)")
    cache = runner.new_cache()
    logits = runner.feed([cache], [tokens(400)])
    for t in range(8):
        logits = runner.feed([cache], [[t]])
    layers = [layer for layer in cache.layers if isinstance(layer, BlockSelectKV)]
    assert layers and all(layer.picked.shape[1] == 1 for layer in layers)  # at least one block
    assert torch.isfinite(logits).all()


def test_nosa_keeps_its_query_agnostic_blocks_from_step_to_step(llama):
    runner = ModelRunner(llama, "nosa(top_blocks=4,agnostic=0.5,window=16)+dense(dtype=fp32)")
    runner.block_size = 16
    cache = runner.new_cache()
    logits = runner.feed([cache], [tokens(400)])
    layers = [layer for layer in cache.layers if isinstance(layer, BlockSelectKV)]
    assert all(layer.rank is not None and layer.rank.shape == (llama.n_kv, 25) for layer in layers)
    fixed = [layer.selector.fixed(layer.rank, 25, 4) for layer in layers]
    for t in range(6):
        logits = runner.feed([cache], [[t]])
        for layer, f in zip(layers, fixed):  # the agnostic blocks are read at every step
            for h in range(llama.n_kv):
                assert set(f[h].nonzero().flatten().tolist()) <= set(layer.picked[h].tolist())
    assert all(layer.reused >= 0.5 for layer in layers)
    assert torch.isfinite(logits).all()


def test_nosa_agnostic_blocks_are_besides_the_sink_and_recent_ones():
    from kvtier.kv.selectors.nosa import Nosa
    nosa = Nosa(agnostic=0.5, recent=1)
    scores = torch.arange(20.0).flip(0).expand(2, -1).clone()  # block 0 ranks first, block 19 last
    scores[:, 19] = 100.0
    mask = nosa.fixed(scores, 20, 6)
    assert mask.sum(1).tolist() == [3, 3]  # half of 6 blocks
    assert not mask[:, 0].any() and not mask[:, 19].any()  # read anyway
    assert mask[:, 1:4].all()
    assert nosa.fixed(scores, 20, 2).sum() == 0  # the sink and the newest block fill the count


def test_nosa_ranks_again_on_a_later_prefill_chunk(llama):
    runner = ModelRunner(llama, "nosa(top_blocks=4,agnostic=1.0,window=8)+dense(dtype=fp32)")
    runner.block_size = 16
    cache = runner.new_cache()
    runner.feed([cache], [tokens(400)])
    layers = [layer for layer in cache.layers if isinstance(layer, BlockSelectKV)]
    before = [layer.rank.clone() for layer in layers]
    runner.feed([cache], [tokens(40, seed=1)])  # a question after the document
    for layer, old in zip(layers, before):
        assert layer.rank.shape[1] == len(layer.slots) > old.shape[1]
        assert not torch.equal(layer.rank[:, :old.shape[1]], old)  # ranked by the new queries
    runner.feed([cache], [[1]])
    for layer in layers:
        fixed = layer.selector.fixed(layer.rank, len(layer.slots), 4)
        for h in range(llama.n_kv):
            assert set(fixed[h].nonzero().flatten().tolist()) <= set(layer.picked[h].tolist())


def test_on_a_sliding_layer_attention_over_picked_blocks_equals_masked_reference():
    """Blocks inside the window only; the oldest may be partly out, its old tokens masked."""
    g = torch.Generator().manual_seed(3)
    layer = BlockSelectKV(Quest(top_blocks=2, recent=0), Dense(dtype="fp32"), 2, 32, 16, 72, torch.float32,
                          "cpu", LayerContext(0, 2, 32))
    k, v = torch.randn(2, 200, 32, generator=g), torch.randn(2, 200, 32, generator=g)
    layer.append(k, v)
    assert layer.bounds.shape[1] == len(layer.slots) and layer.first_block > 0  # freed with their bounds
    assert not layer.selector.sink_block
    for seed in range(4):
        q = torch.randn(6, 1, 32, generator=torch.Generator().manual_seed(seed)) * 0.5
        q[:, :, :4] += 4.0 * k[:, 130:131, :4].repeat_interleave(3, 0)  # the block partly out of the window
        out = attend(q, layer.select(q), 199, 1.0, window=72)
        keep = torch.zeros(2, 200, dtype=torch.bool)
        keep[:, 192:] = True  # the residual
        for h in range(2):
            for b in layer.picked[h].tolist():
                first = (layer.first_block + b) * 16
                keep[h, first:first + 16] = True
        keep[:, :199 - 72 + 1] = False  # out of the window
        s = torch.einsum("htd,hnd->htn", q.reshape(2, 3, 32), k)
        p = s.masked_fill(~keep[:, None], float("-inf")).softmax(-1)
        ref = torch.einsum("htn,hnd->htd", p, v).reshape(6, 1, 32)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_sliding_layers_pick_blocks_when_asked(gemma):
    toks = tokens(120)
    outs = {}
    for kv in ["dense(dtype=fp32)", "quest(share=1.0,sliding=true)+dense(dtype=fp32)",
               "nosa(top_blocks=1,sliding=true,window=4)+dense(dtype=fp32)"]:
        runner = ModelRunner(gemma, kv)
        runner.block_size = 4
        cache = runner.new_cache()
        out = [runner.feed([cache], [toks[:100]])] + [runner.feed([cache], [[t]]) for t in toks[100:]]
        outs[kv.split("(")[0]] = torch.cat(out)
        if kv.startswith("nosa"):
            sliding = [layer for layer in cache.layers if layer.window is not None]
            assert sliding and all(isinstance(layer, BlockSelectKV) and layer.picked.shape[1] == 1 for layer in sliding)
            assert all(layer.bounds.shape[1] == len(layer.slots) == layer.rank.shape[1] for layer in sliding)
    torch.testing.assert_close(outs["quest"], outs["dense"], atol=1e-5, rtol=0)  # every block: the codec's logits
    assert torch.isfinite(outs["nosa"]).all()
