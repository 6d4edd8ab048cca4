import pytest
import torch
import torch.nn.functional as F

from kvtier.attention import attend, reference
from kvtier.kv.cache import Part


def sdpa(q, k, v, q_start, window=None):
    """Plain SDPA over the concatenated cache with an explicit mask: the ground truth."""
    hq, t, _ = q.shape
    hkv, n, _ = k.shape
    qp = torch.arange(q_start, q_start + t)[:, None]
    kp = torch.arange(n)[None]
    mask = kp <= qp
    if window:
        mask &= qp - kp < window
    rep = hq // hkv
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0),
                                          attn_mask=mask, scale=0.125)


def split(k, v, cuts):
    parts, start = [], 0
    for end in cuts + [k.shape[1]]:
        parts.append(Part(k[:, start:end], v[:, start:end], start))
        start = end
    return parts


@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (9, 3)])
@pytest.mark.parametrize("t", [1, 7])
@pytest.mark.parametrize("window", [None, 20])
def test_blockwise_reference_and_fast_path_equal_sdpa(hq, hkv, t, window):
    torch.manual_seed(0)
    n, d = 150, 64
    q = torch.randn(hq, t, d)
    k, v = torch.randn(hkv, n, d) * 3, torch.randn(hkv, n, d)
    q_start = n - t  # the queries are the last t tokens
    want = sdpa(q, k, v, q_start, window)
    parts = split(k, v, [64, 128])
    torch.testing.assert_close(reference(q, parts, q_start, 0.125, window, group=16), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend(q, parts, q_start, 0.125, window), want, atol=1e-5, rtol=1e-5)


def test_merge_handles_groups_fully_outside_the_window():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 1, 16), torch.randn(2, 100, 16), torch.randn(2, 100, 16)
    want = sdpa(q, k, v, 99, window=10)
    got = reference(q, split(k, v, [50]), 99, 0.125, window=10, group=8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_chunk_after_past_uses_lse_merge_and_equals_sdpa(dtype, tol):
    """Chunked prefill: the past fully visible, the chunk causal, merged by log-sum-exp."""
    torch.manual_seed(2)
    n, t = 200, 40
    q = torch.randn(9, t, 64)
    k, v = torch.randn(3, n, 64), torch.randn(3, n, 64)
    want = sdpa(q, k, v, n - t)
    parts = split(k.to(dtype), v.to(dtype), [64, n - t])  # two past parts, then the chunk itself
    got = attend(q.to(dtype), parts, n - t, 0.125)
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(reference(q.to(dtype), parts, n - t, 0.125).float(), want, atol=tol, rtol=tol)
