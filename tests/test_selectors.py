"""Token selectors: kept tokens are the top scorers per KV head, budgets are exact, memory
really falls (and multiplies with a codec), decode keeps the cache bounded, batches match
one-at-a-time runs, and each selector's scores match a plain computation."""

import pytest
import torch
from conftest import tokens

from kvtier.attention import blockwise
from kvtier.engine import ModelRunner
from kvtier.errors import KvtierError
from kvtier.kv.cache import Part
from kvtier.kv.select import PAD, SelectKV
from kvtier.kv.selectors.base import group_attention

SELECTORS = ["window(ratio=0.5)", "tova(ratio=0.5)", "snapkv(ratio=0.5,window=16)", "h2o(ratio=0.5)"]


def spy(runner):
    """Record, per selector layer, the scores and queries it used at each compaction."""
    seen = []
    sel = runner.spec.selectors[0]
    score = type(sel).score

    def recording(self, view):
        out = score(self, view)
        seen.append((view, out))
        return out
    return seen, recording


def prefill(runner, toks):
    cache = runner.new_cache()
    logits = runner.feed([cache], [toks])
    return cache, logits


@pytest.mark.parametrize("kv", SELECTORS)
def test_kept_tokens_are_the_top_scorers_per_kv_head(llama, kv, monkeypatch):
    runner = ModelRunner(llama, kv + "+dense(dtype=fp32)")
    seen, recording = spy(runner)
    monkeypatch.setattr(type(runner.spec.selectors[0]), "score", recording)
    cache, _ = prefill(runner, tokens(300))
    layers = [layer for layer in cache.layers if isinstance(layer, SelectKV)]
    assert len(seen) == len(layers) == llama.n_layers
    for layer, (view, scores) in zip(layers, seen):
        assert layer.n_held == 150 and layer.pos.shape == (llama.n_kv, 150)  # budget exact
        for h in range(llama.n_kv):
            kept = set(layer.pos[h].tolist())
            top = set(view.pos[h, scores[h].topk(150).indices].tolist())
            assert kept == top
        k_held, _ = layer._held()  # the kept keys are the original keys of those tokens
        assert torch.equal(k_held, view.k.gather(1, layer.pos.long()[..., None].expand(-1, -1, view.k.shape[-1])))


def test_ratio_zero_keeps_the_codec_logits(llama):
    """Nothing evicted: the selector's layer is exactly the codec's cache (positions, parts, masks)."""
    toks = tokens(340)
    for codec in ["dense(dtype=fp32)", "int(bits=4,group=16)"]:
        outs = []
        for kv in [codec, "tova(ratio=0)+" + codec]:
            runner = ModelRunner(llama, kv)
            cache, first = prefill(runner, toks[:300])
            steps = [runner.feed([cache], [[t]]) for t in toks[300:340]]
            outs.append(torch.cat([first, *steps]))
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)


def test_selector_scores_match_a_plain_computation(llama, monkeypatch):
    toks = tokens(200)
    queries = []
    observe = SelectKV.observe
    monkeypatch.setattr(SelectKV, "observe", lambda self, q, s: (queries.append((self.index, q * s)), observe(self, q, s)))
    for kv in ["tova(ratio=0.5)", "snapkv(ratio=0.5,window=16,kernel=1)", "h2o(ratio=0.5)", "window(ratio=0.5,sinks=4)"]:
        queries.clear()
        runner = ModelRunner(llama, kv + "+dense(dtype=fp32)")
        seen, recording = spy(runner)
        monkeypatch.setattr(type(runner.spec.selectors[0]), "score", recording)
        runner.feed([runner.new_cache()], [toks[:120], ][:1])
        view, scores = seen[0]  # layer 0
        q = torch.cat([qq for i, qq in queries if i == 0], 1)  # every query of layer 0, (Hq, T, D)
        g = q.shape[0] // view.k.shape[0]
        s = torch.einsum("gtd,gnd->gtn", q, view.k.repeat_interleave(g, 0))
        s = s.masked_fill(torch.ones(120, 120).triu(1).bool(), float("-inf")).softmax(-1)  # (Hq, T, n)
        name = kv.split("(")[0]
        if name == "tova":
            ref = s[:, -1].mean(0).expand(view.k.shape[0], -1)
            torch.testing.assert_close(scores[:, :-1], ref[:, :-1])
        elif name == "snapkv":
            ref = s[:, -16:].mean(1).reshape(-1, g, 120).mean(1)
            torch.testing.assert_close(scores[:, :-16], ref[:, :-16])
        elif name == "h2o":
            ref = s.sum(1).reshape(-1, g, 120).mean(1) / torch.arange(120, 0, -1)
            torch.testing.assert_close(scores, ref)
        else:
            kept = scores.topk(60).indices.sort().values
            assert kept[0].tolist() == [0, 1, 2, 3] + list(range(64, 120))


def test_group_attention_is_causal_by_position():
    q, k = torch.randn(4, 3, 8), torch.randn(2, 5, 8)
    w = group_attention(q, k, torch.tensor([2, 3, 4]), torch.tensor([[0, 1, 2, 3, 4]] * 2))
    assert w.shape == (2, 2, 3, 5) and torch.all(w[:, :, 0, 3:] == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 3))


@pytest.mark.parametrize("codec", ["dense(dtype=fp32)", "int(bits=4,group=16)"])
def test_bytes_fall_by_the_ratio_times_the_codec(llama, codec):
    """Bytes held = the codec's bytes for the kept tokens (exactly) + positions + the newest query."""
    toks = tokens(640)
    full, _ = prefill(ModelRunner(llama, codec), toks)
    for ratio in (0.5, 0.75):
        kept = int(640 * (1 - ratio))
        cache, _ = prefill(ModelRunner(llama, f"tova(ratio={ratio})+{codec}"), toks)
        assert all(layer.n_held == kept for layer in cache.layers)
        state = sum(4 * layer.pos.numel() + layer.q.numel() * 4 for layer in cache.layers)
        same, _ = prefill(ModelRunner(llama, codec), toks[:kept])
        assert cache.nbytes() - state == same.nbytes()
        if codec.startswith("dense"):  # a codec's residual and sinks are a fixed cost at this size
            assert cache.nbytes() == pytest.approx(full.nbytes() * (1 - ratio), rel=0.08)


def test_decode_keeps_the_cache_at_its_budget(llama):
    runner = ModelRunner(llama, "tova(budget=96)+int(bits=4,group=16)")
    cache, logits = prefill(runner, tokens(200))
    sizes = []
    for _ in range(200):
        logits = runner.feed([cache], [[int(logits[0].argmax())]])
        sizes.append(cache.layers[0].n_held)
    assert max(sizes) <= 96 + 64 and sizes.count(96) >= 2 and cache.length == 400
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kv", ["snapkv(ratio=0.5,window=16)+int(bits=4,group=16)", "h2o(budget=100)"])
def test_batch_of_different_lengths_matches_one_at_a_time(llama, kv):
    a, b = tokens(260, seed=1), tokens(180, seed=2)
    runner = ModelRunner(llama, kv)
    alone = []
    for toks in (a, b):
        cache, logits = prefill(runner, toks)
        alone.append([logits] + [runner.feed([cache], [[t]]) for t in range(5)])
    caches = [runner.new_cache(), runner.new_cache()]
    together = [[row] for row in runner.feed(caches, [a, b])]
    for t in range(5):
        for out, row in zip(together, runner.feed(caches, [[t], [t]])):
            out.append(row)
    for one, both in zip(alone, together):
        torch.testing.assert_close(torch.stack(both), torch.cat(one), atol=1e-4, rtol=0)


def test_sliding_layers_keep_the_selectors_share_of_their_window(gemma):
    dense, _ = prefill(ModelRunner(gemma, "dense(dtype=fp32)"), tokens(120))
    cache, logits = prefill(ModelRunner(gemma, "snapkv(ratio=0.5,window=8)+dense(dtype=fp32)"), tokens(120))
    assert all(isinstance(layer, SelectKV) for layer in cache.layers)
    for w, layer, plain in zip(gemma.windows, cache.layers, dense.layers):
        assert layer.n_held == (60 if w is None else w // 2)  # half of what attention could see
        assert layer.nbytes() < plain.nbytes() * 0.75  # a sliding layer's bytes fall too
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kv", ["tova(ratio=0.25)", "snapkv(ratio=0.25,window=8)", "h2o(ratio=0.25)",
                                "elastic(ratio=0.25)", "h2o(ratio=0.25,ada=0.2)"])
def test_sliding_layers_never_attend_outside_their_window(gemma, kv):
    runner = ModelRunner(gemma, kv + "+dense(dtype=fp32)")
    cache, logits = prefill(runner, tokens(100))
    for layer in cache.layers:
        if isinstance(layer, SelectKV) and layer.window:
            layer.slack = 8
    masked = 0
    for step in range(30):
        logits = runner.feed([cache], [[int(logits[0].argmax())]])
        assert torch.isfinite(logits).all()
        for layer in cache.layers:
            if isinstance(layer, SelectKV) and layer.window:  # as the next query will see them
                parts = layer.parts(1)
                bias = torch.cat([p.bias if p.bias is not None else torch.zeros(layer.n_kv, p.n) for p in parts], 1)
                gone = layer.pos <= cache.length - layer.window
                pad = layer.pos >= PAD  # per-head budgets: rows left-padded to the longest head
                assert torch.isneginf(bias[gone | pad]).all() and torch.isfinite(bias[~gone & ~pad]).all()
                assert layer.n_held <= 12 + 8  # three quarters of the window, plus the slack
                masked += int(gone.sum())
    assert masked  # tokens did leave the window between compactions


def test_a_chunk_after_compression_sees_each_querys_own_window(gemma):
    """A multi-token chunk (a question after the document) on a sliding layer whose held tokens
    are out of order: each query attends exactly the held tokens inside its own window."""
    from kvtier.attention.blockwise import attend
    from kvtier.kv.cache import Part

    runner = ModelRunner(gemma, "tova(ratio=0.5)+dense(dtype=fp32)")
    cache, logits = prefill(runner, tokens(100))
    for t in range(5):
        logits = runner.feed([cache], [[t]])
    layer = next(layer for layer in cache.layers if isinstance(layer, SelectKV) and layer.window)
    w, start, t = layer.window, layer.length, 12
    g = torch.Generator().manual_seed(0)
    hq = gemma.n_heads
    q = torch.randn(hq, t, gemma.head_dim, generator=g)
    k, v = (torch.randn(layer.n_kv, t, gemma.head_dim, generator=g) for _ in range(2))
    out = attend(q, layer.parts(t) + [Part(k, v, start)], start, 0.1, w)
    held_k, held_v = layer._held()
    keys, values = torch.cat([held_k, k], 1), torch.cat([held_v, v], 1)
    pos = torch.cat([layer.pos, torch.arange(start, start + t).expand(layer.n_kv, -1)], 1)
    qpos = torch.arange(start, start + t)
    seen = (pos[:, None, :] <= qpos[None, :, None]) & (qpos[None, :, None] - pos[:, None, :] < w)  # (Hkv, T, N)
    assert (~seen[:, :, :layer.n_held]).any()  # some held tokens are outside some query's window
    qg = q.reshape(layer.n_kv, hq // layer.n_kv, t, -1)
    s = torch.einsum("hgtd,hnd->hgtn", qg * 0.1, keys).masked_fill(~seen[:, None], float("-inf"))
    ref = torch.einsum("hgtn,hnd->hgtd", s.softmax(-1), values).reshape(hq, t, -1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_nothing_evicted_on_sliding_layers_gives_the_dense_logits(gemma):
    """Tokens leave the window while decoding: masked at once, dropped at each compaction."""
    toks = tokens(140)
    outs = []
    for kv in ["dense(dtype=fp32)", "tova(ratio=0)+dense(dtype=fp32)"]:
        runner = ModelRunner(gemma, kv)
        cache = runner.new_cache()
        out = [runner.feed([cache], [toks[:100]])]
        for layer in cache.layers:
            if isinstance(layer, SelectKV) and layer.window:
                layer.slack = 8  # compact every 8 steps (global layers: not within this run)
        out += [runner.feed([cache], [[t]]) for t in toks[100:]]
        outs.append(torch.cat(out))
        held = [layer.n_held for layer in cache.layers if isinstance(layer, SelectKV) and layer.window]
    assert held and all(h <= 16 + 8 for h in held)  # the window plus the slack
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=0)


def test_specs_that_cannot_run_are_refused(llama, tmp_path):
    with pytest.raises(KvtierError, match="one selector"):
        ModelRunner(llama, "tova(ratio=0.5)+window(ratio=0.5)+dense")
    with pytest.raises(KvtierError, match="tiered store"):
        ModelRunner(llama, "tova(ratio=0.5)", tiers="cpu:1MiB")
    with pytest.raises(KvtierError, match="ratio"):
        ModelRunner(llama, "tova(ratio=1.5)")


def test_alisa_keeps_its_recent_window_and_rechooses_while_decoding(llama):
    runner = ModelRunner(llama, "alisa(budget=80,local=0.5,every=8)+dense(dtype=fp32)")
    cache, logits = prefill(runner, tokens(200))
    for step in range(40):
        logits = runner.feed([cache], [[int(logits[0].argmax())]])
        for layer in cache.layers:
            assert layer.n_held <= 80 + 8
            if layer.n_held == 80:  # just re-chosen: the newest 40 tokens are all there, every head
                newest = set(range(cache.length - 40, cache.length))
                assert all(newest <= set(row.tolist()) for row in layer.pos)


def test_compresskv_calibrates_heads_and_spreads_the_budget_over_layers(llama):
    from kvtier.kv.selectors.compresskv import calibration

    cal = calibration(llama)
    assert cal["retrieval"].shape == (llama.n_layers, llama.n_heads) and torch.all(cal["error"] > 0)
    torch.testing.assert_close(calibration(llama)["retrieval"], cal["retrieval"])  # deterministic
    runner = ModelRunner(llama, "compresskv(ratio=0.5,heads=1,spread=2)+dense(dtype=fp32)")
    cache, logits = prefill(runner, tokens(400))
    held = [layer.n_held for layer in cache.layers]
    assert sum(held) == pytest.approx(200 * llama.n_layers, abs=llama.n_layers)  # the mean budget
    assert all(100 <= h <= 400 for h in held)
    bound = [layer.selector for layer in cache.layers]
    assert all(int(s.weights.sum()) == 1 for s in bound)  # one retrieval head per layer
    assert torch.isfinite(logits).all()


def test_merged_entries_preserve_attention_mass():
    from kvtier.attention.blockwise import partial
    from kvtier.kv.selectors.elastic import merge

    g = torch.Generator().manual_seed(0)
    hkv, n, d = 2, 40, 16
    anchors = torch.randn(hkv, 10, d, generator=g)
    k = anchors.repeat_interleave(4, 1)  # each run of 4 tokens shares its anchor's key
    v = torch.randn(hkv, n, d, generator=g)
    pos = torch.arange(n).expand(hkv, -1)
    keep = (torch.arange(10) * 4 + 1).expand(hkv, -1)  # one kept token per run, the others merge into it
    km, vm, _, bias = merge(k, v, pos, torch.zeros(hkv, n), keep)
    assert km.shape == (hkv, 10, d) and torch.allclose(bias.exp(), torch.full((hkv, 10), 4.0))
    q = torch.randn(hkv, 3, d, generator=g)
    m1, l1, o1 = partial(q, k, v, None)
    m2, l2, o2 = partial(q, km, vm, None, bias)
    torch.testing.assert_close(l2 * torch.exp(m2 - m1), l1)  # the same total attention mass
    torch.testing.assert_close(o2 / l2, o1 / l1)  # and the same output


def test_nothing_is_merged_into_the_attention_sinks():
    from kvtier.kv.selectors.elastic import merge

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 12, 8, generator=g), torch.randn(1, 12, 8, generator=g)
    pos = torch.arange(12)[None]
    keep = torch.tensor([[0, 1, 6, 11]])  # two sinks; tokens 2-5 lie nearest sink 1
    km, vm, _, bias = merge(k, v, pos, torch.zeros(1, 12), keep, sinks=2)
    torch.testing.assert_close(km[:, :2], k[:, :2])  # the sinks as they were
    torch.testing.assert_close(vm[:, :2], v[:, :2])
    assert bias.exp()[0].tolist() == pytest.approx([1.0, 1.0, 7.0, 3.0])  # 2-8 join token 6
    torch.testing.assert_close(vm[0, 2], v[0, 2:9].mean(0))
    _, _, _, alone = merge(k, v, pos, torch.zeros(1, 12), keep[:, :2], sinks=2)
    assert alone.exp()[0].tolist() == pytest.approx([1.0, 1.0])  # no other anchor: the rest is dropped
    _, _, _, old = merge(k, v, pos, torch.zeros(1, 12), keep)
    assert old.exp()[0, 1] == pytest.approx(3.0)  # without sinks, tokens 2-3 would join token 1


def test_elastic_merges_to_its_budget_and_runs_decode_and_a_second_prefill(llama):
    toks = tokens(300)
    runner = ModelRunner(llama, "elastic(ratio=0)+dense(dtype=fp32)")
    _, a = prefill(runner, toks)
    _, b = prefill(ModelRunner(llama, "dense(dtype=fp32)"), toks)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    runner = ModelRunner(llama, "elastic(ratio=0.5)+int(bits=4,group=16)")
    cache, logits = prefill(runner, toks[:200])
    assert all(layer.n_held == 100 for layer in cache.layers)
    assert all(torch.isclose(layer.bias.exp().sum(1), torch.tensor(200.0)).all() for layer in cache.layers)
    logits = runner.feed([cache], [toks[200:230]])  # a second prefill over merged entries
    for t in toks[230:240]:
        logits = runner.feed([cache], [[t]])
    assert torch.isfinite(logits).all()


def test_scores_on_a_sliding_layer_count_only_keys_inside_the_window():
    q = torch.randn(4, 3, 8)  # 4 query heads over 2 KV heads, queries at positions 10, 11, 12
    k = torch.randn(2, 6, 8)
    k_pos = torch.tensor([[0, 5, 8, 9, 11, 12], [1, 6, 7, 10, 11, 12]])
    w = group_attention(q, k, torch.tensor([10, 11, 12]), k_pos, window=4)  # (Hkv, G, T, n)
    qp = torch.tensor([10, 11, 12])[None, None, :, None]
    inside = (k_pos[:, None, None, :] <= qp) & (qp - k_pos[:, None, None, :] < 4)
    assert torch.all(w[~inside.expand_as(w)] == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 3))
    none = group_attention(q[:, :1], k, torch.tensor([4]), k_pos + 100, window=4)
    assert torch.all(none == 0)  # a query that sees no key


# per-head budgets (AdaKV): heads compete for the layer's budget, each in its own cache

def test_per_head_budgets_keep_the_layers_top_scorers_over_all_heads(llama, monkeypatch):
    """The layer keeps its n_kv x target best tokens wherever they are, each head at least its
    safeguard share; the heads really hold different numbers of tokens."""
    runner = ModelRunner(llama, "snapkv(ratio=0.75,window=16,ada=0.2)+dense(dtype=fp32)")
    seen, recording = spy(runner)
    monkeypatch.setattr(type(runner.spec.selectors[0]), "score", recording)
    cache, _ = prefill(runner, tokens(400))
    uneven = False
    for layer, (view, scores) in zip(cache.layers, seen):
        target = 100
        assert int(layer.counts.sum()) == llama.n_kv * target and layer.n_held == target  # exact
        assert [h.n_held for h in layer.heads] == layer.counts.tolist()  # each head holds its own
        uneven |= len(set(layer.counts.tolist())) > 1
        safe = scores.topk(20, -1).indices
        rest = scores.scatter(1, safe, float("inf")).reshape(-1)
        chosen = rest.topk(llama.n_kv * target).indices
        for h in range(llama.n_kv):
            mine = chosen[(chosen // 400) == h] % 400
            assert set(layer.pos[h][layer.pos[h] < (1 << 30)].tolist()) == set(view.pos[h, mine].tolist())
        k_held, v_held = layer._held()  # left-padded rows: the original keys of the kept tokens
        for h in range(llama.n_kv):
            n = int(layer.counts[h])
            idx = layer.pos[h, -n:].long()
            assert torch.equal(k_held[h, -n:], view.k[h, idx]) and torch.equal(v_held[h, -n:], view.v[h, idx])
            assert not k_held[h, :-n].any()
    assert uneven


@pytest.mark.parametrize("codec", ["dense(dtype=fp32)", "int(bits=4,group=16)"])
def test_per_head_budgets_with_a_full_safeguard_give_the_uniform_logits(llama, codec):
    """ada=1 gives every head exactly its own top tokens: the one-head caches, padding and
    per-head positions must then reproduce the uniform layer's logits, prefill and decode."""
    toks = tokens(300)
    outs = []
    for kv in [f"snapkv(budget=90,window=16)+{codec}", f"snapkv(budget=90,window=16,ada=1.0)+{codec}"]:
        runner = ModelRunner(llama, kv)
        cache, logits = prefill(runner, toks)
        steps = [logits]
        for _ in range(90):  # past a decode-time compaction
            steps.append(runner.feed([cache], [[int(steps[-1][0].argmax())]]))
        outs.append(torch.cat(steps))
        if "ada" in kv:
            assert all(layer.heads is not None for layer in cache.layers)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("codec", ["int(bits=4,group=16)", "rotatekv(bits=4,group=16,rotate=16,residual=0)", "nuq(group=16,residual=0)", "sparse"])
def test_per_head_budgets_attend_each_head_on_its_own_codes_when_decoding(llama, codec):
    """A decode query over per-head caches scores each head's own parts (on their codes), with
    no padded copy: the same output as attention over the padded, masked keys."""
    cache, _ = prefill(ModelRunner(llama, f"snapkv(ratio=0.75,window=16,ada=0.2)+{codec}"), tokens(600))
    layer = cache.layers[1]
    assert len(set(layer.counts.tolist())) > 1  # ragged
    (part,) = layer.parts()
    assert part.heads is not None and part.k is None  # nothing decoded to build it
    assert any(p.score is not None for parts in part.heads for p in parts)  # encoded runs, on codes
    q = torch.randn(llama.n_kv * 3, 1, llama.head_dim)
    fast = blockwise.attend(q, [part], layer.length, 0.25)
    k, v = part.get()  # the padded, masked reference
    padded = Part(k, v, part.start)
    padded.bias = part.bias
    torch.testing.assert_close(fast, blockwise.reference(q, [padded], layer.length, 0.25), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("codec", ["rotatekv(bits=4,group=16,rotate=16,residual=0)", "nuq(group=16,residual=0)"])
def test_codecs_that_apply_rope_in_attention_see_the_kept_tokens_real_positions(llama, codec):
    """A selector's kept tokens sit at scattered positions: a pre-RoPE codec's attention on its
    codes (RoPE inside the kernel) must rotate each key at its real position, as decoding does."""
    cache, _ = prefill(ModelRunner(llama, f"snapkv(ratio=0.75,window=16)+{codec}"), tokens(600))
    parts = cache.layers[1].parts()
    assert any(p.score is not None for p in parts)
    q = torch.randn(llama.n_kv * 3, 1, llama.head_dim)
    n = cache.layers[1].length
    decoded = [Part(*p.get(), p.start) for p in parts]
    torch.testing.assert_close(blockwise.attend(q, parts, n, 0.25), blockwise.reference(q, decoded, n, 0.25),
                               atol=1e-5, rtol=1e-4)


def test_per_head_budgets_really_shrink_memory(llama):
    """Bytes held with per-head budgets: the kept tokens only (kvpress would hold every token),
    about what the same total held evenly costs."""
    toks = tokens(640)
    full, _ = prefill(ModelRunner(llama, "dense(dtype=fp32)"), toks)
    even, _ = prefill(ModelRunner(llama, "snapkv(ratio=0.75,window=16)+dense(dtype=fp32)"), toks)
    ada, _ = prefill(ModelRunner(llama, "snapkv(ratio=0.75,window=16,ada=0.2)+dense(dtype=fp32)"), toks)
    for layer in ada.layers:
        data = sum(2 * h.n_held * h.head_dim * 4 for h in layer.heads)
        assert data == 2 * 160 * llama.n_kv * llama.head_dim * 4  # the kept entries, fp32
        assert sum(h.nbytes() for h in layer.heads) >= data
    assert ada.nbytes() == pytest.approx(even.nbytes(), rel=0.02)
    assert ada.nbytes() < 0.3 * full.nbytes()


def test_per_head_budgets_stay_at_budget_while_decoding_and_batch(llama):
    runner = ModelRunner(llama, "h2o(budget=96,ada=0.2)+int(bits=4,group=16)")
    cache, logits = prefill(runner, tokens(200))
    sizes = []
    for _ in range(150):
        logits = runner.feed([cache], [[int(logits[0].argmax())]])
        sizes.append(int(cache.layers[0].counts.sum()))
    assert max(sizes) <= llama.n_kv * (96 + 64) and sizes.count(llama.n_kv * 96) >= 2
    assert torch.isfinite(logits).all()
    a, b = tokens(260, seed=1), tokens(180, seed=2)
    alone = [prefill(runner, toks)[1] for toks in (a, b)]
    together = runner.feed([runner.new_cache(), runner.new_cache()], [a, b])
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-4, rtol=0)
