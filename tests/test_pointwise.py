"""The element-wise kernels (pointwise.c) against their PyTorch references: RMSNorm (Llama's and
Gemma's 1 + weight) and SwiGLU's silu(gate) * up, in fp32 and bf16, with strided rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvtier import kernels
from kvtier.models.base import add_rms_norm, rms_norm, rms_norm_reference

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the reference is the only path")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("rows", [1, 16, 700])
def test_rms_norm_kernel_equals_the_reference(dtype, offset, rows):
    torch.manual_seed(rows)
    x = (torch.randn(rows, 576) * 3).to(dtype)
    w = torch.randn(576)
    got = kernels.rms_norm(x, w, 1e-5, offset)
    assert got is not None and got.dtype == dtype
    want = rms_norm_reference(x, w, 1e-5, offset)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # one rounding to bf16 at the end; the reference's sum order differs in fp32's last bits
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all()
        assert (got != want).float().mean() < 0.02
    strided = torch.randn(rows, 1000).to(dtype)[:, 100:676]  # a view: rows 1,000 apart
    torch.testing.assert_close(kernels.rms_norm(strided, w, 1e-5, offset).float(),
                               rms_norm_reference(strided, w, 1e-5, offset).float(), atol=0.05, rtol=2 ** -7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [576, 200])  # 200: a tail past the last 16 lanes
def test_add_rms_norm_kernel_equals_the_add_then_the_norm(dtype, channels):
    """The residual add fused into the next norm: the sum is the same numbers torch's add
    gives (rounded once to bf16), the norm as the plain kernel's."""
    torch.manual_seed(channels)
    x, delta = (torch.randn(300, channels) * 3).to(dtype), (torch.randn(300, channels) * 2).to(dtype)
    w = torch.randn(channels)
    for offset in (0.0, 1.0):
        s, y = kernels.add_rms_norm(x, delta, w, 1e-5, offset)
        assert torch.equal(s, x + delta)
        assert torch.equal(y, kernels.rms_norm(x + delta, w, 1e-5, offset))
        want = rms_norm_reference(x + delta, w, 1e-5, offset)
        torch.testing.assert_close(y.float(), want.float(), atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 2 ** -7)
    strided = (torch.randn(300, 2 * channels) * 2).to(dtype)[:, channels:]  # a view: rows apart
    s, y = add_rms_norm(x, strided, w, 1e-6)
    assert torch.equal(s, x + strided) and torch.equal(y, rms_norm(x + strided, w, 1e-6))
    s, y = add_rms_norm(x, None, w, 1e-6)  # no output to add yet (the first layer)
    assert s is x and torch.equal(y, rms_norm(x, w, 1e-6))
    bad = delta.clone()
    bad[7, 3] = float("nan")
    s, y = kernels.add_rms_norm(x, bad, w, 1e-5, 0.0)
    assert torch.isnan(s[7, 3]) and torch.isnan(y[7]).all() and not torch.isnan(y[8]).any()


def test_rms_norm_takes_the_kernel_for_rows_and_the_reference_otherwise():
    x, w = torch.randn(4, 2, 64), torch.randn(64)  # per-head norms (Gemma's q/k norm): 3-D
    torch.testing.assert_close(rms_norm(x, w, 1e-6, 1.0), rms_norm_reference(x, w, 1e-6, 1.0))
    assert torch.isnan(rms_norm(torch.full((2, 64), float("nan")), w, 1e-6)).all()  # NaN is not hidden


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_kernel_equals_the_reference(dtype):
    torch.manual_seed(0)
    gu = (torch.randn(33, 2 * 1536) * 4).to(dtype)
    got = kernels.silu_mul(gu)
    gate, up = gu.chunk(2, -1)
    want = F.silu(gate) * up
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=2 ** -6)  # 2 bf16 steps
        assert (got != want).float().mean() < 0.02


@pytest.mark.parametrize("d", [64, 40, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_gives_the_references_numbers(dtype, d):
    """RoPE in one pass against the PyTorch ops it replaces, equal to the last bit, on the
    query slice of a fused q|k|v row (strided rows, some all zero) at scattered positions; head
    sizes whose half is not a multiple of the kernel's 16 lanes too."""
    from kvtier.models.base import Batch, Rope

    torch.manual_seed(1)
    n, hq, hkv = 37, 9, 3
    qkv = (torch.randn(n, (hq + 2 * hkv) * d) * 3).to(dtype)
    qkv[::3] = 0.0
    q = qkv[:, : hq * d].view(n, hq, d)
    rope = Rope(1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    batch = Batch(torch.zeros(n, dtype=torch.long), torch.randint(0, 5000, (n,)), [], [n])
    cos, sin = rope.at(batch, dtype)
    got = kernels.rope(q, cos, sin)
    assert got is not None and torch.equal(got, Rope.reference(q, cos, sin))
    assert torch.equal(rope(q, batch), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_rows_places_each_token_in_its_residual_row(dtype):
    """A decode step's new keys/values (the model's (H, N, D) views) into each sequence's
    residual row, against a copy per slice; the rows around them are left alone."""
    qkv = torch.randn(5, 3 * 2 * 64).to(dtype)  # 5 sequences' new tokens, k|v|other side by side
    kt = qkv[:, :128].view(5, 2, 64).contiguous().transpose(0, 1)  # the keys after RoPE: their own rows
    vt = qkv[:, 128:256].view(5, 2, 64).transpose(0, 1)
    residuals = [(torch.zeros(2, 9, 64, dtype=dtype), torch.zeros(2, 9, 64, dtype=dtype)) for _ in range(3)]
    rows, at = [4, 0, 2], [3, 8, 0]  # token row in kt, residual row
    step = residuals[0][0].stride(1) * residuals[0][0].element_size()
    assert kernels.copy_rows(kt, vt, rows, [rk.data_ptr() + r * step for (rk, _), r in zip(residuals, at)],
                             [rv.data_ptr() + r * step for (_, rv), r in zip(residuals, at)], residuals[0][0].stride(0))
    for (rk, rv), row, r in zip(residuals, rows, at):
        want_k, want_v = torch.zeros_like(rk), torch.zeros_like(rv)
        want_k[:, r], want_v[:, r] = kt[:, row], vt[:, row]
        assert torch.equal(rk, want_k) and torch.equal(rv, want_v)
