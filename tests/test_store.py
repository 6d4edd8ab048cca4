import torch

from kvtier import spec
from kvtier.kv.cache import TABLE_ENTRY_BYTES, LayerKV


def layer(dtype="fp16", window=None, block=64):
    return LayerKV(spec.parse(f"dense(dtype={dtype})").codec, n_kv=3, head_dim=64,
                   block_size=block, window=window)


def test_blocks_fill_then_residual_stays_full_precision():
    kv = layer()
    k, v = torch.randn(3, 130, 64), torch.randn(3, 130, 64)
    kv.append(k[:, :10], v[:, :10])
    kv.append(k[:, 10:129], v[:, 10:129])
    kv.append(k[:, 129:], v[:, 129:])
    assert (len(kv.slots), kv.n_residual, kv.length) == (2, 2, 130)
    blocks, residual = kv.parts()
    torch.testing.assert_close(blocks.get()[0], k[:, :128].half().float())   # fp16 storage
    assert torch.equal(residual.k, k[:, 128:]) and residual.start == 128  # exact
    assert torch.equal(blocks.get()[1], v[:, :128].half().float())


def test_bytes_are_exactly_what_is_held():
    for dtype, size in (("fp32", 4), ("fp16", 2), ("bf16", 2)):
        kv = layer(dtype)
        kv.append(torch.randn(3, 130, 64), torch.randn(3, 130, 64))
        block = 2 * 3 * 64 * 64 * size  # k and v, 3 heads, 64 tokens, 64 dims
        residual = 2 * 3 * 2 * 64 * 4    # 2 fp32 tokens
        assert kv.nbytes() == 2 * (block + TABLE_ENTRY_BYTES) + residual
        assert kv.pool.reserved_bytes() >= 2 * block


def test_sliding_window_frees_blocks_and_reuses_slots():
    kv = layer(window=20, block=8)
    k = torch.randn(3, 200, 64)
    for i in range(200):
        kv.append(k[:, i:i + 1], k[:, i:i + 1])
    # a query at position 200 sees keys 181..200: blocks starting at 176 and 184, 192 held
    assert kv.first_block * 8 == 176 and len(kv.slots) == 3 and kv.n_residual == 0
    assert kv.pool.top <= 5  # freed slots were reused, the pool did not grow with the sequence
    (part,) = kv.parts()
    torch.testing.assert_close(part.get()[0], k[:, 176:200].half().float())
    assert part.start == 176
