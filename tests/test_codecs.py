"""Every codec: round trip within its error bound, bytes held exactly what its fields store."""

import pytest
import torch

from kvtier import registry, spec
from kvtier.errors import KvtierError
from kvtier.kv.cache import TABLE_ENTRY_BYTES, LayerKV
from kvtier.kv.codecs.packing import pack, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_and_size(bits):
    q = torch.randint(0, 2 ** bits, (3, 5, 64), dtype=torch.uint8)
    p = pack(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack(p, bits), q)


@pytest.mark.parametrize("name", [n for n, c in registry.methods().items() if c.kind == "codec"])
def test_every_codec_round_trips_within_its_bound(name):
    codec = spec.parse(name).codec
    torch.manual_seed(0)
    k = torch.randn(2, 3, 64, 64) * torch.linspace(0.1, 4, 64)  # channel-wise spread, like real keys
    v = torch.randn(2, 3, 64, 64)
    enc = codec.encode(k, v)
    fields = codec.fields(64, 64)
    for f, (shape, dtype) in fields.items():
        assert enc[f].shape == (2, 3, *shape) and enc[f].dtype == dtype
    k2, v2 = codec.decode(enc, torch.float32)
    assert k2.shape == v2.shape == (2, 3 * 64, 64)
    for x, y in ((k, k2), (v, v2)):
        x = x.reshape(y.shape)
        rel = (x - y).norm() / x.norm()
        assert rel <= BOUNDS[spec.format_method(codec)], (name, rel.item())


BOUNDS = {  # relative L2 error on Gaussian data (measured x ~1.3; the formats' resolution sets them)
    "dense(dtype=bf16)": 4e-3, "int(bits=4,group=64,residual=0)": 0.12,
    "mxint8(hadamard=false)": 0.012, "mxfp8(hadamard=false)": 0.04, "mxfp4(hadamard=false)": 0.155,
    "nvfp4(hadamard=false)": 0.125, "nvint4(hadamard=false)": 0.115,
    "rotatekv(bits=2,sinks=4,residual=192,keys=token,rotate=64,group=64,center=false)": 0.45,
    "bfp(mantissa=4,block=16,sort=true,sinks=4)": 0.145, "ovp(bits=4,sinks=4)": 0.135,
    "lowrank(rank=1,bits=4,sinks=4)": 0.135,
    "sparse(ratio=0.5,dtype=fp16,sinks=4)": 0.36,  # half of each token's channels pruned
    "nuq(bits=2,outliers=0.005,group=64,sinks=4,residual=64)": 0.34,  # measured 0.32
    # uncalibrated: codebooks of iid Gaussian vectors, on keys whose channels spread 40x (0.36)
    "vq(dim=8,stages=2,sinks=4,residual=64)": 0.45,
    "mixed(codec=rotatekv,avg=2.5,hi=4,lo=2)": 0.45,  # unbound: the narrow codec, rotatekv(bits=2)
}


@pytest.mark.parametrize("bits, rel", [(2, 0.6), (3, 0.3), (4, 0.15), (8, 8e-3)])
def test_int_error_shrinks_with_bits_and_bytes_are_exact(bits, rel):
    codec = spec.parse(f"int(bits={bits},group=32)").codec
    layer = LayerKV(codec, n_kv=3, head_dim=64, block_size=64)
    torch.manual_seed(1)
    k, v = torch.randn(3, 150, 64), torch.randn(3, 150, 64)
    layer.append(k, v)
    blocks, residual = layer.parts()
    assert torch.equal(residual.k, k[:, 128:].half().float())  # the residual block: unencoded, fp16
    for x, y in ((k[:, :128], blocks.get()[0]), (v[:, :128], blocks.get()[1])):
        assert (x - y).norm() / x.norm() <= rel
    # per head and block: packed codes + fp16 scale/zero per key channel and per value group
    per_block = 3 * (2 * 64 * 64 * bits // 8 + 2 * 64 * 2 + 2 * 64 * (64 // 32) * 2)
    assert layer.nbytes() == 2 * (per_block + TABLE_ENTRY_BYTES) + 2 * 3 * 22 * 64 * 2


def test_residual_tokens_are_16_bit_for_codecs_and_compute_dtype_for_dense():
    for name, dtype, held in [("int(bits=4)", torch.float32, torch.float16),
                              ("int(bits=4)", torch.bfloat16, torch.bfloat16),
                              ("dense(dtype=fp16)", torch.float32, torch.float32)]:
        layer = LayerKV(spec.parse(name).codec, n_kv=1, head_dim=64, dtype=dtype)
        layer.append(torch.randn(1, 10, 64, dtype=dtype), torch.randn(1, 10, 64, dtype=dtype))
        assert layer.residual_k.dtype == held, name
        assert layer.parts()[-1].k.dtype == dtype  # attention reads the compute dtype
        assert layer.nbytes() == 2 * 10 * 64 * held.itemsize


@pytest.mark.parametrize("name, grid", [
    ("mxfp4", [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]),
    ("nvfp4", [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]),
    ("mxint8", [i / 64 for i in range(0, 128, 9)]),
    ("nvint4", [0.0, 1.0, 2.0, 3.0, 5.0, 7.0]),
])
def test_block_formats_store_real_bit_patterns(name, grid):
    """Values on the element grid (with a block max that fixes the scale) come back exactly."""
    codec = spec.parse(name).codec
    g = torch.tensor(grid)
    top = 6.0 if "fp4" in name else (127 / 64 if name == "mxint8" else 7.0)
    row = torch.cat([g, -g])
    row = torch.cat([row, torch.zeros(64 - row.numel())]) if row.numel() < 64 else row[:64]
    row[0] = top  # the block max sets the scale to exactly 1 (MX: 2^0; NV: 1 x 1)
    row[16] = row[32] = row[48] = top
    x = row.expand(1, 1, 64, 64).clone() * (2.0 ** 3 if name.startswith("mx") else 1.0)
    k2, v2 = codec.decode(codec.encode(x, x), torch.float32)
    assert torch.equal(k2.reshape(x.shape), x) and torch.equal(v2.reshape(x.shape), x)


def test_mxfp4_packs_two_codes_per_byte_and_hadamard_is_orthogonal():
    from kvtier.kv.codecs.blockscaled import hadamard

    h = hadamard(64)
    torch.testing.assert_close(h @ h, torch.eye(64), atol=1e-6, rtol=0)
    fields = spec.parse("mxfp4(hadamard=true)").codec.fields(64, 64)
    assert fields["k_codes"] == ((64, 32), torch.uint8) and fields["k_scales"] == ((64, 2), torch.uint8)
    with pytest.raises(KvtierError, match="power-of-two"):
        spec.parse("mxfp4(hadamard=true)").codec.fields(64, 96)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_table_unpack_equals_shift_unpack(bits):
    from kvtier.kv.codecs.packing import unpack_float

    p = torch.randint(0, 256, (2, 7, 16), dtype=torch.uint8)
    assert torch.equal(unpack_float(p, bits), unpack(p, bits).float())


@pytest.mark.parametrize("name", [n for n, c in registry.methods().items() if c.kind == "codec"])
def test_every_codec_is_deterministic_and_keeps_an_all_zero_block_zero(name):
    codec = spec.parse(name).codec
    torch.manual_seed(3)
    k, v = torch.randn(2, 2, 64, 64), torch.randn(2, 2, 64, 64)
    k[:, 1] = 0.0
    v[:, 1] = 0.0
    a, b = codec.encode(k, v), codec.encode(k.clone(), v.clone())
    assert all(torch.equal(a[f], b[f]) for f in a)  # same input, same bytes
    k2, v2 = codec.decode(a, torch.float32)
    assert torch.isfinite(k2).all() and torch.isfinite(v2).all()
    assert k2[:, 64:].abs().max() < 1e-6 and v2[:, 64:].abs().max() < 1e-6


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_keys_are_a_clear_error_and_nothing_is_stored(bad):
    layer = LayerKV(spec.parse("int(bits=4)").codec, n_kv=2, head_dim=64, block_size=64)
    k, v = torch.randn(2, 70, 64), torch.randn(2, 70, 64)
    k[1, 5, 3] = bad
    with pytest.raises(KvtierError, match="NaN or Inf"):
        layer.append(k, v)
    assert layer.slots == []


def test_a_one_token_cache_is_held_unencoded():
    layer = LayerKV(spec.parse("int(bits=2)").codec, n_kv=2, head_dim=64, block_size=64)
    k, v = torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    layer.append(k, v)
    (part,) = layer.parts()
    assert torch.equal(part.get()[0], k.half().float()) and layer.nbytes() == 2 * 2 * 64 * 2
