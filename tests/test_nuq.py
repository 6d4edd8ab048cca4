"""nuq (KVQuant): the codebook fit, the outliers set apart, attention on the codes (native kernel
against its PyTorch reference), calibration on a real model, and sliding layers' residual."""

import pytest
import torch
from conftest import tokens

from kvtier import kernels, spec
from kvtier.bench.data import kjv
from kvtier.engine import ModelRunner
from kvtier.kv import calibration
from kvtier.kv.cache import TABLE_ENTRY_BYTES, LayerKV
from kvtier.kv.codecs.base import LayerContext
from kvtier.kv.codecs.nuq import _normalise, fit_levels, gaussian_levels
from kvtier.models.base import Rope


def test_fit_levels_finds_the_clusters_and_follows_the_weights():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([-0.9, -0.3, 0.1, 0.7])
    u = centres[torch.randint(0, 4, (20_000,), generator=g)] + 0.01 * torch.randn(20_000, generator=g)
    torch.testing.assert_close(fit_levels(u, torch.ones_like(u), 2), centres, atol=5e-3, rtol=0)
    # two clusters per level at 1 bit; weighting one side 100x pulls its level onto it
    x = torch.cat([torch.full((1000,), 0.2), torch.full((1000,), 0.6)])
    w = torch.cat([torch.ones(1000), torch.full((1000,), 100.0)])
    lv = fit_levels(torch.cat([x, -x]), torch.cat([w, w]), 1)
    assert abs(lv[1] - (0.2 + 100 * 0.6) / 101) < 1e-4 and abs(lv[0] + lv[1]) < 1e-6


def test_a_channel_of_zeros_keeps_the_fit_and_the_codes_finite():
    """A key channel that is exactly 0 over a block (Gemma 3 has some) has scale 0: its centre
    and its elements must stay finite, in encoding and in the codebook fit."""
    from kvtier.kv.codecs.nuq import Nuq

    torch.manual_seed(0)
    k, v = torch.randn(1, 512, 64), torch.randn(1, 512, 64)
    k[:, :64, 5] = 0.0
    v[:, 64:128] = 0.0
    sc, zero, u, _ = _normalise(k.reshape(1, 8, 64, 64), 2, None)
    assert torch.isfinite(u).all() and (sc[0, 0, 0, 5] == 0) and zero[0, 0, 0, 5] == 0
    kl, vl = Nuq()._fit(k, v)
    assert torch.isfinite(kl).all() and torch.isfinite(vl).all()


def test_an_outlier_is_kept_exactly_and_does_not_stretch_its_group():
    torch.manual_seed(0)
    k, v = torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64)
    k[0, 0, 10, 3] = v[0, 0, 20, 7] = 50.0  # one spike in a key channel and in a value group
    with_out, without = spec.parse("nuq").codec, spec.parse("nuq(outliers=0)").codec
    k1, v1 = with_out.decode(with_out.encode(k, v), torch.float32)
    k0, v0 = without.decode(without.encode(k, v), torch.float32)
    assert abs(k1[0, 10, 3] - 50) < 0.05 and abs(v1[0, 20, 7] - 50) < 0.05  # fp16 differences
    mask = torch.ones(64, 64, dtype=torch.bool)
    for x, a, b, (t, c) in ((k, k1, k0, (10, 3)), (v, v1, v0, (20, 7))):
        mask[:] = True
        mask[t, c] = False
        err_with = (a[0] - x[0, 0])[mask].norm()
        err_without = (b[0] - x[0, 0])[mask].norm()
        assert err_with < 0.8 * err_without  # the spike's group keeps its fine grid
    codec = spec.parse("nuq(outliers=0.01)").codec
    assert codec.fields(64, 64)["k_oi"] == ((41,), torch.int16)  # 1 % of 4,096, int16 index + fp16


def test_bytes_held_are_the_fields_exactly():
    layer = LayerKV(spec.parse("nuq(residual=0,sinks=0)").codec, n_kv=2, head_dim=64, block_size=64,
                    ctx=_ctx())
    layer.append(torch.randn(2, 200, 64), torch.randn(2, 200, 64))
    # per head and block: 2-bit codes, 1-byte scale + int8 centre per key channel and per value
    # group, 20 outliers each of K and V at 4 bytes
    per_block = 2 * (2 * 64 * 64 * 2 // 8 + 2 * 64 + 2 * 64 * 1 + 2 * 20 * 4)
    assert layer.nbytes() == 3 * (per_block + TABLE_ENTRY_BYTES) + 2 * 2 * 8 * 64 * 2


def _ctx(n_kv=2, d=64):
    rope = Rope(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    return LayerContext(0, n_kv, d, None, rope)


@pytest.mark.parametrize("name", ["nuq", "nuq(bits=4,outliers=0)", "nuq(outliers=0.02,group=32)"])
@pytest.mark.parametrize("heads", ["shared", "per_head"])
def test_native_kernel_equals_its_reference(name, heads):
    if kernels.library() is None:
        pytest.skip("no C compiler: the PyTorch path is the only path")
    codec = spec.parse(name).codec
    torch.manual_seed(1)
    d = 64
    k, v = torch.randn(2, 5, 64, d) * torch.linspace(0.2, 3, d), torch.randn(2, 5, 64, d)
    data = codec.encode(k, v)
    rope = Rope(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    rows = rope.span(77, 5 * 64) if heads == "shared" else torch.stack([rope.span(77, 320), rope.span(900, 320)])
    q = torch.randn(2, 3 if heads == "shared" else 4, d) * 0.2  # 3 (SmolLM2's shape) or 4 query heads per KV head
    ref = codec.attend_torch(q, data, rows)
    fast = kernels.nuq_attend(q, data, rows, *codec.levels(), codec.bits, codec.group)
    assert fast is not None
    # the kernel turns a block's keys by its first row and each offset's (angle sums), the
    # reference by the table's row of each position, whose fp32 angles drift ~1e-4 by position 1200
    atol = 2e-5 if heads == "shared" else 1e-4
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)
    # the reference itself: decode, RoPE at the positions, attention
    kd, vd = codec.decode(data, torch.float32)
    pos = torch.arange(77, 77 + 320) if heads == "shared" else torch.stack([torch.arange(77, 397),
                                                                           torch.arange(900, 1220)])
    kr = rope.rotate_at(kd, pos)
    s = q @ kr.transpose(1, 2)
    torch.testing.assert_close(ref[2] / ref[1], torch.softmax(s, -1) @ vd, atol=1e-5, rtol=1e-4)


def test_head_dim_256_as_gemma():
    if kernels.library() is None:
        pytest.skip("no C compiler: the PyTorch path is the only path")
    codec = spec.parse("nuq").codec
    k, v = torch.randn(1, 2, 64, 256), torch.randn(1, 2, 64, 256)
    data = codec.encode(k, v)
    rope = Rope(1.0 / 10000 ** (torch.arange(0, 256, 2).float() / 256))
    q = torch.randn(1, 4, 256) * 0.05
    fast = kernels.nuq_attend(q, data, rope.span(0, 128), *codec.levels(), 2, 64)
    for a, b in zip(fast, codec.attend_torch(q, data, rope.span(0, 128))):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.e2e
def test_calibrated_codebooks_fit_the_model_better_than_the_default(smollm2):
    """On SmolLM2's own calibration keys and values, the fitted codebooks have a lower weighted
    squared error than a uniform grid, and a model decodes with them close to dense."""
    model = smollm2.model
    stats = calibration.load(model)
    codec = spec.parse("nuq").codec
    for i in (0, 15, 29):
        bound = codec.for_layer(LayerContext(i, model.n_kv, model.head_dim, stats[i], None))
        assert bound.k_levels is not None and bound.state_bytes() == 32
        assert codec.for_layer(LayerContext(i, model.n_kv, model.head_dim, stats[i], None)).k_levels is bound.k_levels
        for name, lv in (("kpre_sample", bound.k_levels), ("v_sample", bound.v_levels)):
            x = stats[i][name].float()
            h, s, d = x.shape
            if name == "kpre_sample":
                x, dim = x.reshape(h, s // 64, 64, d), 2
            else:
                x, dim = x.reshape(h, s // 64, 64, 1, d), 4
            _, _, u, scale = _normalise(x, dim, None)
            w = scale.expand_as(u).pow(2)

            def err(levels, u=u, w=w):
                q = levels[torch.bucketize(u.contiguous(), (levels[1:] + levels[:-1]) / 2)]
                return (w * (q - u).pow(2)).sum()
            # below the uniform grid; the Gaussian default is already close to the fit (real
            # groups normalised by their range look alike), so the fit only has to match it
            assert err(lv) < 0.9 * err(torch.linspace(-1, 1, 4)), (i, name)
            assert err(lv) <= 1.002 * err(gaussian_levels(2)), (i, name)
    text = kjv()  # a passage far from the calibration span
    ids = smollm2.tokenizer(text[len(text) // 2: len(text) // 2 + 8000])["input_ids"][:1110]
    out = {}
    for kv in ("dense(dtype=fp32)", "nuq(bits=4)"):
        runner = ModelRunner(model, kv)
        cache = runner.new_cache()
        out[kv] = runner.feed([cache], [ids[:1100]])
        out[kv] = torch.cat([out[kv]] + [runner.feed([cache], [[t]]) for t in ids[1100:1110]])
        cache.close()
    p, q = torch.log_softmax(out["dense(dtype=fp32)"].float(), -1), torch.log_softmax(out["nuq(bits=4)"].float(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    assert kl < 0.05, kl


def test_residual_sliding_sets_sliding_layers_apart(gemma):
    """On the tiny Gemma (sliding window 16 on most layers), residual_sliding=0 keeps only the
    residual block in 16 bits there; global layers keep their residual."""
    runner = ModelRunner(gemma, "int(bits=4,group=32,residual=32,residual_sliding=0)", block_size=8)
    cache = runner.new_cache()
    runner.feed([cache], [tokens(100)])
    keeps = {layer.window: layer.keep for layer in cache.layers}
    assert keeps[None] == 32 and keeps[16] == 0
    assert spec.format_method(spec.parse("int(residual=32)").codec) == "int(bits=4,group=64,residual=32)"
