"""The sparse codec (Mustafar): a bitmap and the packed kept values, exact bytes, attention on that form."""

import torch

from kvtier.attention.blockwise import partial
from kvtier.kv.cache import LayerKV
from kvtier.kv.codecs.packing import unpack
from kvtier.kv.codecs.sparse import Sparse


def test_keeps_each_tokens_largest_channels_bit_exactly():
    codec = Sparse(ratio=0.75, dtype="fp16")
    k, v = torch.randn(2, 3, 16, 64), torch.randn(2, 3, 16, 64)
    enc = codec.encode(k, v)
    for x, name in ((k, "k"), (v, "v")):
        mask = unpack(enc[name + "_map"], 1).bool()  # (2, 3, 16, 64)
        assert torch.all(mask.sum(-1) == 16)  # exactly 25 % of the channels kept
        top = x.abs().topk(16, -1).indices
        assert torch.equal(mask, torch.zeros_like(mask).scatter_(-1, top, True))
        assert torch.equal(enc[name + "_val"], x[mask].reshape(2, 3, 16, 16).half())
    dk, _ = codec.decode(enc, torch.float32)
    assert torch.equal(dk.reshape(k.shape), torch.where(unpack(enc["k_map"], 1).bool(), k.half().float(), 0))


def test_bytes_per_token_are_the_bitmap_plus_the_kept_values():
    codec = Sparse(ratio=0.5, dtype="fp16", sinks=0)
    layer = LayerKV(codec, n_kv=2, head_dim=64, block_size=64)
    layer.append(torch.randn(2, 128, 64), torch.randn(2, 128, 64))
    per_token_head = 2 * (64 // 8 + 32 * 2)  # K and V: 8 bitmap bytes + 32 fp16 values
    assert layer.pool.slot_bytes() == 64 * 2 * per_token_head


def test_attention_on_the_compressed_form_equals_attention_on_the_decoded_blocks():
    codec = Sparse(ratio=0.6)
    k, v = torch.randn(3, 4, 64, 128), torch.randn(3, 4, 64, 128)
    enc = codec.encode(k, v)
    q = torch.randn(3, 6, 128) / 128 ** 0.5
    _, l, o = codec.attend(q, enc)
    _, l2, o2 = partial(q, *codec.decode(enc, torch.float32), None)
    torch.testing.assert_close(o / l, o2 / l2, atol=1e-5, rtol=1e-4)
