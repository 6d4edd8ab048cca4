"""RotateKV: its transforms are exact in the full-precision limit (pre-RoPE keys, calibrated
reordering, key centring, grouped-head rotation, sinks), and its calibration is computed once and reused."""

from dataclasses import dataclass

import pytest
import torch
from conftest import ours_from_hf, tiny_hf

from kvtier import kernels, spec
from kvtier.engine import ModelRunner
from kvtier.kv import calibration
from kvtier.kv.codecs.base import Codec, LayerContext
from kvtier.kv.codecs.rotatekv import RotateKV, deal, dequantize, quantize
from kvtier.models.base import Rope
from kvtier.spec import CacheSpec


@dataclass(frozen=True)
class Unquantized(RotateKV):
    """RotateKV with every transform but fp32 storage instead of the quantizer."""

    plain_dtype = None  # sinks and residual in the compute dtype too

    def fields(self, block_size, head_dim):
        return {x: ((block_size, head_dim), torch.float32) for x in "kv"}

    def encode(self, k, v):
        k, v = self.prepare(k, v)
        return {"k": k, "v": v}

    def decode(self, data, dtype):
        h, n, b, d = data["k"].shape
        return self.restore(data["k"].reshape(h, n * b, d), data["v"].reshape(h, n * b, d), dtype)

    attend = Codec.attend  # no kernel for fp32 fields: attention decodes the blocks
    native_job = Codec.native_job


def test_turn_is_exactly_invertible_with_a_calibrated_permutation():
    codec = spec.parse("rotatekv(rotate=128)").codec
    stats = {"kpre_rms": torch.rand(2, 64)}
    bound = codec.for_layer(type("Ctx", (), {"n_kv": 2, "head_dim": 64, "stats": stats})())
    assert sorted(bound.perm.tolist()) == list(range(128)) and bound.state_bytes() == 256
    x = torch.randn(2, 50, 64)
    turned = bound.turn(x)
    assert (turned - x).abs().max() > 0.1  # it really mixes channels (and heads)
    torch.testing.assert_close(bound.turn(turned, inverse=True), x, atol=1e-5, rtol=0)


def test_heads_are_dealt_apart_and_values_follow_their_keys_order():
    """With rotation blocks inside a head, each head's key channels are dealt over its own blocks
    and its values take the same order: a head's turned keys and values depend on that head
    alone, and turning back is exact. Blocks spanning heads deal the keys across heads and leave
    the values in their order."""
    torch.manual_seed(6)
    ctx = LayerContext(0, 2, 64, {"kpre_rms": torch.rand(2, 64)})
    wide = spec.parse("rotatekv(rotate=128)").codec.for_layer(ctx)
    assert wide.vperm is None and (wide.perm[:64] >= 64).any()
    bound = spec.parse("rotatekv(rotate=32)").codec.for_layer(ctx)
    assert bound.vperm.shape == (2, 64) and bound.state_bytes() == 2 * 128  # the values' order derives from perm
    assert torch.equal(bound.perm.reshape(2, 64).long() - torch.tensor([[0], [64]]), bound.vperm.long())
    assert torch.equal(bound.vperm[0].long(), deal(ctx.stats["kpre_rms"][0], 32))
    x = torch.randn(2, 50, 64)
    for turn in (bound.turn, bound.turn_values):
        turned = turn(x)
        torch.testing.assert_close(turn(turned, inverse=True), x, atol=1e-5, rtol=0)
        y = x.clone()
        y[1] += 1.0
        torch.testing.assert_close(turn(y)[0], turned[0])  # head 0 untouched by head 1


def test_one_byte_scales_and_int8_zero_points_cover_small_large_and_offset_groups():
    """Groups from 1e-3 to 300 in spread, centred at 0, 5 or -100, keep 4-bit accuracy; constant
    groups (zero included) come back within the zero point's resolution."""
    torch.manual_seed(0)
    spread = torch.tensor([1e-3, 1.0, 300.0]).view(1, 3, 1)
    offset = torch.tensor([0.0, 5.0, -100.0]).view(1, 3, 1)
    x = torch.randn(8, 3, 32) * spread + offset
    q, sc, zero = quantize(x, 4, dim=2)
    assert (q.dtype, sc.dtype, zero.dtype) == (torch.uint8, torch.uint8, torch.int8)
    assert sc.shape == zero.shape == (8, 3, 1) and int(q.max()) <= 15
    err = (dequantize(q, sc, zero) - x).norm(dim=2) / (x - x.mean(2, keepdim=True)).norm(dim=2)
    assert err.max() < 0.15, err.max()
    flat = torch.tensor([0.0, 5.0, -100.0, 1e-4]).view(4, 1).expand(4, 32)  # 1e-4: below the smallest scale
    back = dequantize(*quantize(flat, 2, dim=1))
    assert torch.equal(back[0], flat[0])
    torch.testing.assert_close(back, flat, rtol=1e-2, atol=2.0 ** -12 / 16)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_pre_rope_rotation_is_exact_in_the_full_precision_limit(family):
    """Keys stored before RoPE, centred, reordered, rotated across heads, sinks kept: with no
    quantization the logits equal the dense fp32 cache's, prefill and decode."""
    hf = tiny_hf(family)
    ours = ours_from_hf(hf)
    ids = torch.randint(0, 256, (300,)).tolist()
    width = ours.n_kv * ours.head_dim
    lossless = CacheSpec((Unquantized(rotate=min(width, 64), group=16, center=True),))
    out = {}
    for name, kv in (("dense", "dense(dtype=fp32)"), ("rotated", lossless)):
        runner = ModelRunner(ours, kv, block_size=16)
        cache = runner.new_cache()
        first = runner.feed([cache], [ids[:200]])
        steps = [runner.feed([cache], [[t]]) for t in ids[200:230]]
        out[name] = torch.cat([first] + steps)
        if name == "rotated":
            codec = cache.layers[0].codec
            assert codec.perm is not None and codec.mean.abs().max() > 0  # calibrated per layer
            assert any(layer.slots for layer in cache.layers)  # blocks really went through the codec
    torch.testing.assert_close(out["rotated"], out["dense"], atol=1e-4, rtol=1e-4)


@pytest.mark.e2e
def test_calibration_is_cached_on_disk_and_reused(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIER_CACHE", str(tmp_path))
    model = smollm2.model
    first = calibration.load(model)
    files = list((tmp_path / "calibration").glob("*.safetensors"))
    assert len(files) == 1
    again = calibration.load(model)
    for a, b in zip(first, again):
        for key in a:
            assert torch.equal(a[key], b[key])
    assert set(first[0]) == {f"{k}_{s}" for k in ("k", "kpre", "v") for s in ("absmax", "rms", "mean")} | {
        "kpre_sample", "v_sample"}
    n_kv, d = model.n_kv, model.head_dim  # 16 blocks of 64 consecutive tokens, from the recorded keys
    assert first[0]["kpre_sample"].shape == first[0]["v_sample"].shape == (n_kv, 1024, d)
    torch.testing.assert_close(first[0]["v_sample"].float().pow(2).mean(1).sqrt(), first[0]["v_rms"],
                               rtol=0.25, atol=0.0)
    files[0].write_bytes(b"not a safetensors file")  # damaged: recomputed, not trusted
    torch.testing.assert_close(calibration.load(model)[3]["v_rms"], first[3]["v_rms"])


def _bound(name: str, n_kv: int, d: int) -> RotateKV:
    """The codec bound to a layer whose calibration gave random channel scales and means."""
    torch.manual_seed(3)
    stats = {"kpre_rms": torch.rand(n_kv, d) * 3 + 0.1, "kpre_mean": torch.randn(n_kv, d)}
    return spec.parse(name).codec.for_layer(LayerContext(0, n_kv, d, stats))


@pytest.mark.parametrize("name,n_kv,d", [
    ("rotatekv", 3, 64),                                 # SmolLM2's shape, rotation blocks spanning heads
    ("rotatekv(bits=4)", 3, 64),
    ("rotatekv(keys=channel,center=true)", 2, 64),
    ("rotatekv(rotate=128,group=32)", 2, 64),            # one rotation over both heads
    ("rotatekv(rotate=16,residual=0)", 2, 64),           # rotations shorter than a vector
    ("rotatekv", 1, 256),                                # Gemma 3's shape
    ("rotatekv(rotate=32,group=16)", 2, 48),             # the scalar path; runs straddling heads
])
@pytest.mark.parametrize("heads", ["shared", "per_head"])
def test_native_kernel_equals_its_reference(name, n_kv, d, heads):
    if kernels.library() is None:
        pytest.skip("no C compiler: the PyTorch path is the only path")
    codec = _bound(name, n_kv, d)
    k = torch.randn(n_kv, 5, 64, d) * torch.linspace(0.2, 3, d) + torch.randn(d)
    v = torch.randn(n_kv, 5, 64, d)
    data = codec.encode(k, v)
    rope = Rope(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    rows = rope.span(77, 320) if heads == "shared" else torch.stack([rope.span(77 + 800 * i, 320) for i in range(n_kv)])
    rows_per_head = 3 if d == 64 else 4
    q = torch.randn(n_kv, rows_per_head, d) * (0.2 if d == 64 else 0.05)
    ref = codec.attend_torch(q, data, rows)
    fast = kernels.rotatekv_attend(q, data, rows, codec._inverse, codec.mean, codec.bits, codec.group,
                                   codec.rotate, codec.keys == "channel", codec._vinverse)
    assert fast is not None
    # the kernel turns a block's keys by its first row and each offset's (angle sums), the
    # reference by the table's row of each position, whose fp32 angles are off by up to 6e-5 rad by
    # position 2000 (keys here reach 10)
    atol = 3e-5 if heads == "shared" else 5e-4
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)
    assert codec.attend(q, data, rows) is not None  # the codec's own call takes the kernel
    # the reference itself: decode (rotated back), RoPE at the positions, attention
    kd, vd = codec.decode(data, torch.float32)
    pos = torch.arange(77, 397) if heads == "shared" else torch.stack([torch.arange(77 + 800 * i, 397 + 800 * i)
                                                                     for i in range(n_kv)])
    s = q @ rope.rotate_at(kd, pos).transpose(1, 2)
    torch.testing.assert_close(ref[2] / ref[1], torch.softmax(s, -1) @ vd, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n_kv,d,rotate", [(3, 64, 64), (1, 256, 64), (2, 64, 128), (2, 64, 16)])
def test_dealing_spreads_the_largest_channels_over_the_blocks(n_kv, d, rotate):
    """The reordering is a permutation that puts the largest channels in different blocks and
    gives every block the same number of channels of each rank tier."""
    torch.manual_seed(1)
    rms = torch.rand(n_kv * d) + 0.1
    perm = deal(rms, rotate)
    blocks = n_kv * d // rotate
    assert sorted(perm.tolist()) == list(range(n_kv * d))
    block_of = torch.empty_like(perm)
    block_of[perm] = torch.arange(n_kv * d) // rotate
    ranked = block_of[torch.argsort(rms, descending=True)].reshape(-1, blocks)
    assert (ranked.sort(1).values == torch.arange(blocks)).all()  # each tier of ranks: one per block


def test_native_kernel_takes_any_reordering():
    """Any reordering, not only the one the codec deals, is undone with the reference's result."""
    if kernels.library() is None:
        pytest.skip("no C compiler: the PyTorch path is the only path")
    torch.manual_seed(4)
    codec = _bound("rotatekv", 3, 64)
    object.__setattr__(codec, "perm", torch.randperm(192).to(torch.int16))
    object.__setattr__(codec, "vperm", torch.stack([torch.randperm(64) for _ in range(3)]).to(torch.int16))
    k, v = torch.randn(3, 3, 64, 64) * torch.linspace(0.2, 3, 64), torch.randn(3, 3, 64, 64)
    data = codec.encode(k, v)
    rope = Rope(1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64))
    q = torch.randn(3, 3, 64) * 0.2
    fast = kernels.rotatekv_attend(q, data, rope.span(5, 192), codec._inverse, None, 2, 64, 64, False,
                                   codec._vinverse)
    assert fast is not None
    for a, b in zip(fast, codec.attend_torch(q, data, rope.span(5, 192))):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4)


def test_kernel_declines_blocks_whose_positions_are_not_consecutive():
    """The kernels read one RoPE row per block and turn it by each token's offset: rows of a
    block whose positions skip one are refused (None), and the codec takes the reference."""
    if kernels.library() is None:
        pytest.skip("no C compiler: the PyTorch path is the only path")
    codec = _bound("rotatekv", 3, 64)
    k, v = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
    data = codec.encode(k, v)
    rope = Rope(1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64))
    positions = torch.arange(192)
    positions[130:] += 1  # block 2 skips a position
    rows = rope.rows(positions)
    q = torch.randn(3, 3, 64) * 0.2
    assert kernels.rotatekv_attend(q, data, rows, codec._inverse, None, 2, 64, 64, False, codec._vinverse) is None
    for a, b in zip(codec.attend(q, data, rows), codec.attend_torch(q, data, rows)):
        torch.testing.assert_close(a, b)
    # consecutive blocks far out are taken, though the table's fp32 angles drift there
    far = rope.span(131072 - 192, 192)
    fast = kernels.rotatekv_attend(q, data, far, codec._inverse, None, 2, 64, 64, False, codec._vinverse)
    ref = codec.attend_torch(q, data, far)
    assert fast is not None
    torch.testing.assert_close(fast[2] / fast[1], ref[2] / ref[1], atol=3e-3, rtol=0)


def test_uncalibrated_and_three_bit_caches_attend_without_the_kernel_or_with_it():
    """Without calibration there is no reordering (inv is None); 3-bit codes have no kernel and
    take the reference."""
    d = 64
    rope = Rope(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    k, v = torch.randn(3, 2, 64, d), torch.randn(3, 2, 64, d)
    q = torch.randn(3, 3, d) * 0.2
    for name in ("rotatekv", "rotatekv(bits=3)"):
        codec = spec.parse(name).codec
        data = codec.encode(k, v)
        ref = codec.attend_torch(q, data, rope.span(0, 128))
        for a, b in zip(codec.attend(q, data, rope.span(0, 128)), ref):
            torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4)
