"""vq (CommVQ): the k-means fit, residual stages, bytes held, attention on the codes (native
kernel against its PyTorch reference), and codebooks calibrated on a real model."""

import pytest
import torch

from kvtier import kernels, spec
from kvtier.bench.data import kjv
from kvtier.engine import ModelRunner
from kvtier.errors import KvtierError
from kvtier.kv import calibration
from kvtier.kv.cache import TABLE_ENTRY_BYTES, LayerKV
from kvtier.kv.codecs.base import LayerContext
from kvtier.kv.codecs.vq import fit_books, gaussian_books, kmeans
from kvtier.models.base import Rope


def test_kmeans_finds_the_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 3.0], [0.0, -3.0]])
    x = centres[torch.randint(0, 4, (4000,), generator=g)] + 0.05 * torch.randn(4000, 2, generator=g)
    found = kmeans(x[None], 4)[0]
    dist = torch.cdist(found, centres).amin(0)  # every true centre has a fitted one on it
    assert dist.max() < 0.02, found
    with pytest.raises(KvtierError, match="cannot fit"):
        kmeans(x[None, :100], 256)


def test_each_stage_takes_the_error_down_and_bits_are_as_specified():
    torch.manual_seed(0)
    k, v = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    errs = []
    for stages in (1, 2, 3):
        codec = spec.parse(f"vq(stages={stages})").codec
        data = codec.encode(k, v)
        assert data["k"].shape == (2, 3, 64, 64 // 8 * stages)  # one byte per code: 8 x stages / 8 bits
        k2, _ = codec.decode(data, torch.float32)
        errs.append(((k2 - k.reshape(2, -1, 64)).norm() / k.norm()).item())
    assert errs[0] > 1.3 * errs[1] > 1.3 * 1.3 * errs[2], errs
    assert spec.parse("vq(dim=16)").codec.fields(64, 64)["k"] == ((64, 8), torch.uint8)  # 1 bit


def test_a_vector_of_zeros_decodes_to_zeros():
    codec = spec.parse("vq").codec
    k, v = torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64)
    k[0, 0, 5] = 0.0
    data = codec.encode(k, v)
    assert data["k_scale"][0, 0, 5] == 0
    k2, v2 = codec.decode(data, torch.float32)
    assert torch.equal(k2[0, 5], torch.zeros(64)) and torch.isfinite(k2).all() and torch.isfinite(v2).all()


def test_bytes_held_are_the_fields_exactly():
    layer = LayerKV(spec.parse("vq(residual=0,sinks=0)").codec, n_kv=2, head_dim=64, block_size=64, ctx=_ctx())
    layer.append(torch.randn(2, 200, 64), torch.randn(2, 200, 64))
    # per head and block: 64 tokens x (8 sub-vectors x 2 codes + 1 scale byte), for K and for V
    per_block = 2 * 2 * 64 * (8 * 2 + 1)
    assert layer.nbytes() == 3 * (per_block + TABLE_ENTRY_BYTES) + 2 * 2 * 8 * 64 * 2


def test_dim_must_divide_the_head():
    with pytest.raises(KvtierError, match="must divide"):
        spec.parse("vq(dim=16)").codec.fields(64, 72)


def _ctx(n_kv=2, d=64):
    rope = Rope(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    return LayerContext(0, n_kv, d, None, rope)


@pytest.mark.parametrize("name, d", [("vq", 64), ("vq(dim=16)", 64), ("vq(dim=4,stages=1)", 64), ("vq", 256)])
@pytest.mark.parametrize("heads", ["shared", "per_head"])
def test_native_kernel_equals_its_reference(name, d, heads):
    if kernels.library() is None:
        pytest.skip("no C compiler: the PyTorch path is the only path")
    codec = spec.parse(name).codec
    torch.manual_seed(1)
    k, v = torch.randn(2, 5, 64, d) * torch.linspace(0.2, 3, d), torch.randn(2, 5, 64, d)
    data = codec.encode(k, v)
    rope = Rope(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    rows = rope.span(77, 5 * 64) if heads == "shared" else torch.stack([rope.span(77, 320), rope.span(900, 320)])
    q = torch.randn(2, 3 if heads == "shared" else 4, d) * (0.5 / d ** 0.5)
    ref = codec.attend_torch(q, data, rows)
    fast = kernels.vq_attend(q, data, rows, *codec.books(d), codec.dim, codec.stages)
    assert fast is not None
    # the kernel turns a block's keys by its first row and each offset's (angle sums), the
    # reference by the table's row of each position, whose fp32 angles drift ~1e-4 by position 1200
    atol = 2e-5 if heads == "shared" else 1e-4
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)
    # the reference itself: decode, RoPE at the positions, attention
    kd, vd = codec.decode(data, torch.float32)
    pos = torch.arange(77, 397) if heads == "shared" else torch.stack([torch.arange(77, 397), torch.arange(900, 1220)])
    s = q @ rope.rotate_at(kd, pos).transpose(1, 2)
    torch.testing.assert_close(ref[2] / ref[1], torch.softmax(s, -1) @ vd, atol=1e-5, rtol=1e-4)


@pytest.mark.e2e
def test_calibrated_codebooks_fit_the_model_and_decode_close_to_dense(smollm2):
    """On SmolLM2, codebooks fitted to the calibration keys quantize keys of another passage
    with far less error than the Gaussian codebooks, and a model decodes with them near dense."""
    model = smollm2.model
    stats = calibration.load(model)
    codec = spec.parse("vq").codec
    text = kjv()  # a passage far from the calibration span
    ids = smollm2.tokenizer(text[len(text) // 2: len(text) // 2 + 8000])["input_ids"][:1110]
    runner = ModelRunner(model, "dense(dtype=fp32)")
    cache = runner.new_cache()
    dense = runner.feed([cache], [ids[:1100]])
    dense = torch.cat([dense] + [runner.feed([cache], [[t]]) for t in ids[1100:1110]])
    cache.close()
    # held-out pre-RoPE keys of this passage, recorded as calibration records them
    held = calibration.measure(model, ids[:1024])
    for i in (0, 15, 29):
        bound = codec.for_layer(LayerContext(i, model.n_kv, model.head_dim, stats[i], None))
        assert bound.state_bytes() == 2 * 64 * 2 * 256 * 2  # K and V codebooks, fp16
        assert codec.for_layer(LayerContext(i, model.n_kv, model.head_dim, stats[i], None)).k_book is bound.k_book
        x = held[i]["kpre_sample"].float()[:, None]  # (Hkv, 1, S, D): blocks of one "block"
        data = bound.encode(x, x)
        fitted = (bound.decode(data, torch.float32)[0] - x[:, 0]).norm() / x.norm()
        plain = codec.encode(x, x)
        gauss = (codec.decode(plain, torch.float32)[0] - x[:, 0]).norm() / x.norm()
        assert fitted < 0.7 * gauss, (i, fitted.item(), gauss.item())
    runner = ModelRunner(model, "vq")
    cache = runner.new_cache()
    out = runner.feed([cache], [ids[:1100]])
    out = torch.cat([out] + [runner.feed([cache], [[t]]) for t in ids[1100:1110]])
    cache.close()
    p, q = torch.log_softmax(dense.float(), -1), torch.log_softmax(out.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    assert kl < 0.1, kl
    u = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fit_books(u, 8, 2), fit_books(u, 8, 2))  # the same data, the same codebooks
    assert gaussian_books(64, 8, 2).dtype == torch.float16
