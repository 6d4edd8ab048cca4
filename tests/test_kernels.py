"""The native kernels against the PyTorch oracle: the compiled packed-int attention gives the
same softmax pieces as the reference over the decoded cache, for every shape it accepts, and
kvtier falls back to PyTorch (with one warning) when it cannot build or does not handle a shape."""

import pytest
import torch

from kvtier import kernels, spec
from kvtier.attention import blockwise
from kvtier.kv.cache import LayerKV, Part
from kvtier.kv.codecs import blockscaled, ovp
from kvtier.kv.codecs.base import LayerContext, plain_pieces

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: PyTorch path only")


def layer_of(codec: str, n_kv: int, d: int, n: int, dtype=torch.float32):
    torch.manual_seed(0)
    layer = LayerKV(spec.parse(codec).codec, n_kv=n_kv, head_dim=d, dtype=dtype)
    k = torch.randn(n_kv, n, d) * torch.linspace(0.2, 3, d)
    k[:, :, 3] += 6.0  # an outlier channel
    layer.append(k.to(dtype), torch.randn(n_kv, n, d).to(dtype))
    return layer


def pieces_of_reference(q, part):
    k, v = part.get()
    return blockwise.partial(q, k.float(), v.float(), None)


def assert_same_pieces(got, want):
    """Same row max and sum, same normalised output (fp32 sums in another order: outputs of
    size ~5 differ by ~1e-5 between thread counts)."""
    (m, l, o), (m2, l2, o2) = got, want
    torch.testing.assert_close(m, m2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l, l2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o / l, o2 / l2, atol=5e-5, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("bits, d, group, rows", [
    (bits, d, group, rows) for bits in (2, 4, 8)
    for d, group, rows in [(64, 64, 3), (64, 16, 1), (128, 32, 4), (128, 128, 8), (96, 32, 5),
                           (64, 64, 9), (256, 64, 4)]
    if (d * bits // 8) % 16 == 0  # shapes the kernel takes; the others fall back (test below)
])
def test_kernel_equals_reference_pieces(bits, d, group, rows):
    layer = layer_of(f"int(bits={bits},group={group})", n_kv=2, d=d, n=64 * 37 + 5)
    q = torch.randn(2, rows, d) / d ** 0.5
    groups = [p for p in layer.parts() if p.score is not None]
    assert groups
    for part in groups:
        data = layer.pool.fields_of(layer.slots[(part.start // 64): (part.start // 64) + part.n // 64])
        fast = kernels.int_attend(q, data, bits, group)
        assert fast is not None
        assert_same_pieces(fast, pieces_of_reference(q, part))


@needs_kernels
def test_kernel_reads_a_pool_view_and_a_gathered_copy_alike():
    layer = layer_of("int(bits=4)", n_kv=3, d=64, n=64 * 12)
    q = torch.randn(3, 3, 64)
    view = layer.pool.fields_of([0, 1, 2, 3])            # consecutive: views into the pool
    copy = {f: t.clone() for f, t in view.items()}       # the same blocks, compact
    gathered = layer.pool.fields_of([5, 3, 8])           # not consecutive: a gathered copy
    assert view["k"].data_ptr() == layer.pool.data["k"].data_ptr()
    a, b = kernels.int_attend(q, view, 4, 64), kernels.int_attend(q, copy, 4, 64)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    ref = blockwise.partial(q, *(t.float() for t in layer.codec.decode(gathered, torch.float32)), None)
    assert_same_pieces(kernels.int_attend(q, gathered, 4, 64), ref)


@needs_kernels
def test_shapes_the_kernel_does_not_take_fall_back_to_pytorch():
    layer = layer_of("int(bits=2,group=8)", n_kv=1, d=64, n=64 * 4)
    q = torch.randn(1, 2, 64)
    data = layer.pool.fields_of(layer.slots)
    assert kernels.int_attend(q, data, 2, 8) is None  # groups of 8 channels: not vectorised
    fast = layer.codec.attend(q, data)
    assert_same_pieces(fast, blockwise.partial(q, *layer.codec.decode(data, torch.float32), None))


@needs_kernels
@pytest.mark.parametrize("name", ["mxfp4", "mxfp4(hadamard=true)", "nvfp4", "nvfp4(hadamard=true)", "nvint4",
                                  "mxint8", "mxfp8(hadamard=true)"])
@pytest.mark.parametrize("n_kv, d, rows", [(3, 64, 3), (1, 256, 4), (2, 128, 5)])
def test_block_scaled_formats_attend_on_their_codes(name, n_kv, d, rows):
    """MX/NV elements looked up and scaled inside the kernel (a Hadamard rotation moved to the
    query and the output) give the reference's pieces over the decoded blocks, views of the
    pool included; the kernel really runs."""
    layer = layer_of(name, n_kv=n_kv, d=d, n=64 * 9 + 5)
    q = torch.randn(n_kv, rows, d) / d ** 0.5
    codec = layer.codec
    data = layer.pool.fields_of(layer.slots)
    had = q.float() @ blockscaled.hadamard(d) if codec.hadamard else q
    fields = [data.get(f"{x}_{f}") for x in "kv" for f in ("codes", "scales", "tensor_scale")]
    assert kernels.blockscaled_attend(had, fields, blockscaled.element_values(codec.element),
                                      blockscaled.scale_values(codec.scale), codec.bits, codec.block) is not None
    assert_same_pieces(codec.attend(q, data), codec.attend_torch(q, data))
    assert_same_pieces(codec.attend_torch(q, data), pieces_of_reference(q, Part(*codec.decode(data, torch.float32), 0)))


@needs_kernels
@pytest.mark.parametrize("name", ["mxfp8", "mxint8", "nvfp4", "mxfp4"])
def test_every_element_code_decodes_as_the_reference(name):
    """The kernel's element decoders (lookup, signed byte, E4M3 bits, subnormals and negative
    zero included) against the reference on blocks holding every code but E4M3's NaN."""
    layer = layer_of(name, n_kv=2, d=64, n=64 * 4)
    codec, data = layer.codec, dict(layer.pool.fields_of(layer.slots))
    codes = data["k_codes"]
    every = torch.arange(256, dtype=torch.int32)  # 4-bit: every pair of codes
    if codec.element == "e4m3":
        every = every[(every & 127) != 127]
    flat = every.to(torch.uint8).repeat(codes.numel() // every.numel() + 1)[:codes.numel()]
    data["k_codes"] = data["v_codes"] = flat.reshape(codes.shape)
    q = torch.randn(2, 3, 64) / 8
    assert_same_pieces(codec.attend(q, data), codec.attend_torch(q, data))


@needs_kernels
@pytest.mark.parametrize("name", ["bfp", "bfp(mantissa=8,block=32)", "bfp(sort=false)"])
def test_bfp_attends_on_its_codes_with_the_channel_orders_moved_to_the_query(name):
    torch.manual_seed(2)
    stats = {"k_rms": torch.rand(3, 64) * 3, "v_rms": torch.rand(3, 64)}
    codec = spec.parse(name).codec.for_layer(LayerContext(0, 3, 64, stats))
    assert (codec.perm_k is None) == (name == "bfp(sort=false)")
    k, v = torch.randn(3, 4, 64, 64) * torch.linspace(0.2, 3, 64), torch.randn(3, 4, 64, 64)
    data = codec.encode(k, v)
    q = torch.randn(3, 3, 64) / 8
    fields = [data["k_m"], data["k_e"], None, data["v_m"], data["v_e"], None]
    values = torch.arange(2 ** codec.mantissa, dtype=torch.float32) - 2 ** (codec.mantissa - 1)
    assert kernels.blockscaled_attend(q, fields, values, blockscaled.scale_values("e8m0"), codec.mantissa,
                                      codec.block) is not None
    assert_same_pieces(codec.attend(q, data), codec.attend_torch(q, data))


@needs_kernels
@pytest.mark.parametrize("name", ["lowrank", "lowrank(bits=2)", "lowrank(bits=8,rank=3)"])
@pytest.mark.parametrize("n_kv, d, rows", [(3, 64, 3), (1, 256, 4), (2, 96, 2)])
def test_lowrank_attends_on_its_codes_and_factors(name, n_kv, d, rows):
    layer = layer_of(name, n_kv=n_kv, d=d, n=64 * 7 + 3)
    q = torch.randn(n_kv, rows, d) / d ** 0.5
    data = layer.pool.fields_of(layer.slots)
    codec = layer.codec
    assert kernels.lowrank_attend(q, data, codec.bits, codec.rank) is not None
    assert_same_pieces(codec.attend(q, data), codec.attend_torch(q, data))


@needs_kernels
@pytest.mark.parametrize("n_kv, d, rows", [(3, 64, 3), (1, 256, 4), (2, 96, 2)])
def test_ovp_attends_on_its_pair_bytes(n_kv, d, rows):
    layer = layer_of("ovp", n_kv=n_kv, d=d, n=64 * 7 + 3)
    q = torch.randn(n_kv, rows, d) / d ** 0.5
    data = layer.pool.fields_of(layer.slots)
    assert kernels.ovp_attend(q, data, ovp._tables(q.device)[0]) is not None
    assert_same_pieces(layer.codec.attend(q, data), layer.codec.attend_torch(q, data))


@needs_kernels
@pytest.mark.parametrize("name", ["sparse", "sparse(ratio=0.7,dtype=bf16)", "sparse(ratio=0)"])
@pytest.mark.parametrize("n_kv, d, rows", [(3, 64, 3), (1, 256, 4), (2, 128, 2), (2, 40, 2)])
def test_sparse_walks_its_bitmaps(name, n_kv, d, rows):
    layer = layer_of(name, n_kv=n_kv, d=d, n=64 * 7 + 3)
    q = torch.randn(n_kv, rows, d) / d ** 0.5
    data = layer.pool.fields_of(layer.slots)
    codec = layer.codec
    assert kernels.sparse_attend(q, data) is not None
    assert_same_pieces(codec.attend(q, data), codec.attend_torch(q, data))
    assert_same_pieces(codec.attend_torch(q, data), plain_pieces(q, *codec.decode(data, torch.float32)))


def test_kernels_off_gives_the_pytorch_path(monkeypatch):
    layer = layer_of("int(bits=4)", n_kv=2, d=64, n=64 * 8)
    q = torch.randn(2, 3, 64)
    data = layer.pool.fields_of(layer.slots)
    monkeypatch.setenv("KVTIER_KERNELS", "0")
    kernels.library.cache_clear()
    try:
        assert kernels.int_attend(q, data, 4, 64) is None
        torch_path = layer.codec.attend(q, data)
    finally:
        monkeypatch.delenv("KVTIER_KERNELS")
        kernels.library.cache_clear()
    assert_same_pieces(torch_path, blockwise.partial(q, *layer.codec.decode(data, torch.float32), None))


def test_a_failing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("KVTIER_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    kernels.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="building the native kernels failed"):
            assert kernels.library() is None
        assert kernels.library() is None  # cached: no second build, no second warning
        assert not list(tmp_path.glob("kernels/*.so"))
    finally:
        kernels.library.cache_clear()


@needs_kernels
def test_decode_in_bf16_matches_the_decoded_cache():
    layer = layer_of("int(bits=4)", n_kv=3, d=64, n=64 * 20 + 7, dtype=torch.bfloat16)
    q = torch.randn(9, 1, 64).bfloat16()
    fast = blockwise.attend(q, layer.parts(), layer.length - 1, 0.125).float()
    decoded = [Part(*(t.float() for t in p.get()), p.start) for p in layer.parts()]
    ref = blockwise.reference(q.float(), decoded, layer.length - 1, 0.125)
    assert (fast - ref).norm() / ref.norm() < 0.01  # the kernel is fp32 inside; bf16 is the output


@needs_kernels
@pytest.mark.parametrize("bits, group, d, b", [(4, 64, 64, 64), (2, 32, 64, 16), (8, 16, 128, 48), (4, 16, 256, 32),
                                             (4, 8, 40, 24)])  # the last: the scalar path (D not 16 lanes)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int_encoder_writes_the_pytorch_encoders_bytes(bits, group, d, b, dtype):
    """The native `int` encoder against the PyTorch one, byte for byte: every field, with a
    constant channel (scale 0), an outlier channel, a constant value group and ties that
    round half to even."""
    codec = spec.parse(f"int(bits={bits},group={group})").codec
    torch.manual_seed(bits * d + b)
    k = torch.randn(3, 5, b, d) * torch.linspace(0.1, 4, d)
    k[..., 7] = 1.5                  # one value over the block: scale 0
    k[..., 3] += 300.0               # an outlier channel
    v = torch.randn(3, 5, b, d)
    v[:, :, 2, :group] = -0.25       # one value over a group
    v[:, :, 5] = torch.arange(d) / 2  # ties on the code grid's halves
    k, v = k.to(dtype), v.to(dtype)
    want = codec.encode_torch(k, v)

    def as_model_rows(x):  # the same blocks read from the model's (tokens, heads, D) rows
        rows = x.reshape(3, 5 * b, d).transpose(0, 1).contiguous()
        return rows.transpose(0, 1).view(3, 5, b, d)

    for kk, vv in ((k, v), (as_model_rows(k), as_model_rows(v))):
        got = kernels.int_encode(kk, vv, bits, group)
        assert got is not None and got.keys() == want.keys()
        for name in want:
            assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
            assert torch.equal(got[name], want[name]), name


@needs_kernels
@pytest.mark.parametrize("bits, group, d, b", [(4, 64, 64, 64), (2, 32, 64, 16), (8, 16, 128, 48), (4, 16, 256, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int_decoder_gives_the_pytorch_decoders_numbers(bits, group, d, b, dtype):
    """The native `int` decoder against the PyTorch one, equal to the last bit, reading a run of
    blocks out of a larger pool (heads strided), including a constant channel and an outlier."""
    codec = spec.parse(f"int(bits={bits},group={group})").codec
    torch.manual_seed(bits * d + b + 1)
    k = torch.randn(3, 7, b, d) * torch.linspace(0.1, 4, d)
    k[..., 7] = 1.5
    k[..., 3] += 300.0
    v = torch.randn(3, 7, b, d) * 3
    pool = codec.encode_torch(k, v)
    run = {name: t[:, 2:6] for name, t in pool.items()}  # four blocks of seven, a view
    got = kernels.int_decode(run, bits, group, dtype)
    want = codec.decode_torch(run, dtype)
    assert got is not None
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype == dtype
        assert torch.equal(g, w)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_all_finite_finds_every_nan_and_inf(dtype):
    """The cache's NaN/Inf check against torch.isfinite, on strided views of the model's rows:
    one bad value anywhere (first, last, in a head the view skips) is found, and only inside the view."""
    rows = torch.randn(40, 3, 64).to(dtype)  # (tokens, heads, D)
    view = rows.transpose(0, 1)[:, 8:40].view(3, 2, 16, 64)  # two blocks of 16 tokens
    assert kernels.all_finite(view) and kernels.all_finite(view.contiguous())
    for at in [(8, 0, 0), (39, 2, 63), (20, 1, 31)]:
        for bad in (float("nan"), float("inf"), float("-inf")):
            x = rows.clone()
            x[at] = bad
            v = x.transpose(0, 1)[:, 8:40].view(3, 2, 16, 64)
            assert not kernels.all_finite(v) and not bool(torch.isfinite(v).all()), (at, bad)
    x = rows.clone()
    x[7, 1, 5] = float("nan")  # outside the view
    assert kernels.all_finite(x.transpose(0, 1)[:, 8:40].view(3, 2, 16, 64))
    assert kernels.all_finite(torch.full((2, 3, 64), 3.0e38, dtype=torch.float32))  # large is finite
    tail = torch.randn(2, 3, 40).to(dtype)  # rows the vector loop does not cover to the end
    assert kernels.all_finite(tail)
    tail[1, 2, 37] = float("inf")
    assert not kernels.all_finite(tail)
