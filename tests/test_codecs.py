"""Every codec: round trip within its error bound, bytes held exactly what its fields store."""

import pytest
import torch

from kvtier import registry, spec
from kvtier.kv.cache import TABLE_ENTRY_BYTES, LayerKV
from kvtier.kv.codecs.packing import pack, unpack


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip_and_size(bits):
    q = torch.randint(0, 2 ** bits, (3, 5, 64), dtype=torch.uint8)
    p = pack(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack(p, bits), q)


@pytest.mark.parametrize("name", list(registry.methods()))
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


BOUNDS = {"dense(dtype=bf16)": 4e-3, "int(bits=4,group=64)": 0.15}


@pytest.mark.parametrize("bits, rel", [(2, 0.6), (4, 0.15), (8, 8e-3)])
def test_int_error_shrinks_with_bits_and_bytes_are_exact(bits, rel):
    codec = spec.parse(f"int(bits={bits},group=32)").codec
    layer = LayerKV(codec, n_kv=3, head_dim=64, block_size=64)
    torch.manual_seed(1)
    k, v = torch.randn(3, 150, 64), torch.randn(3, 150, 64)
    layer.append(k, v)
    blocks, residual = layer.parts()
    assert torch.equal(residual.k, k[:, 128:])  # the residual block stays full precision
    for x, y in ((k[:, :128], blocks.k), (v[:, :128], blocks.v)):
        assert (x - y).norm() / x.norm() <= rel
    # per head and block: packed codes + fp16 scale/zero per key channel and per value group
    per_block = 3 * (2 * 64 * 64 * bits // 8 + 2 * 64 * 2 + 2 * 64 * (64 // 32) * 2)
    assert layer.nbytes() == 2 * (per_block + TABLE_ENTRY_BYTES) + 2 * 3 * 22 * 64 * 4
