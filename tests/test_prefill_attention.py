"""Prefill attention on bf16 (``kernels/prefill.c``): the native kernel equals the fp32 oracle as
closely as torch's own bf16 attention does, for causal chunks with and without a past, sliding
windows, grouped-query heads, head sizes 64 to 256 and lengths that are not multiples of its
tiles; and SmolLM2 prefilled in bf16 through it stays as close to its fp32 logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from kvtier import kernels
from kvtier.attention import blockwise
from kvtier.attention.blockwise import visible
from kvtier.kv.cache import Part

needs_kernel = pytest.mark.skipif(not kernels.prefill_available(),
                                  reason="needs the native kernels and a CPU with AVX512-BF16")


def oracle(q, k, v, q_start, k_start, scale, window):
    """fp32 softmax attention with the mask of blockwise.visible."""
    hq, t, _ = q.shape
    g = hq // k.shape[0]
    mask = visible(q_start, t, k_start, k.shape[1], window)
    s = q.float() @ k.float().repeat_interleave(g, 0).transpose(1, 2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    return s.softmax(-1) @ v.float().repeat_interleave(g, 0)


def torch_bf16(q, k, v, q_start, k_start, scale, window):
    g = q.shape[0] // k.shape[0]
    mask = visible(q_start, q.shape[1], k_start, k.shape[1], window)
    return F.scaled_dot_product_attention(q[None], k.repeat_interleave(g, 0)[None], v.repeat_interleave(g, 0)[None],
                                          attn_mask=mask, scale=scale)[0]


CASES = [  # hq, hkv, t, n, q_start, k_start, d, window
    (9, 3, 300, 300, 0, 0, 64, None),      # a first chunk: causal from the first key
    (9, 3, 100, 421, 321, 0, 64, None),    # a later chunk over its past
    (4, 4, 65, 65, 0, 0, 128, None),       # no grouping, one row past a tile
    (9, 3, 77, 500, 423, 0, 64, 128),      # a sliding window cutting the past
    (6, 2, 200, 200, 0, 0, 64, 50),        # a window inside the chunk
    (2, 1, 1, 40, 39, 0, 256, None),       # one query, gemma's head size
    (4, 1, 150, 700, 550, 0, 256, 512),    # gemma's shape in a sliding layer over a past
    (3, 1, 33, 97, 1064, 1000, 64, None),  # positions not starting at 0 (after evicted tokens)
]


@needs_kernel
@pytest.mark.parametrize("amx", ["1", "0"], ids=["amx-where-present", "vector"])
@pytest.mark.parametrize("hq,hkv,t,n,q_start,k_start,d,window", CASES)
def test_kernel_matches_the_oracle_as_torch_bf16_does(hq, hkv, t, n, q_start, k_start, d, window, amx, monkeypatch):
    """Both of the kernel's paths: AMX tiles (on a CPU that has them) and the AVX512-BF16 dot
    products (KVTIER_AMX=0, read at every call)."""
    monkeypatch.setenv("KVTIER_AMX", amx)
    torch.manual_seed(t + n)
    q = torch.randn(hq, t, d).bfloat16()
    k = (torch.randn(hkv, n, d) * torch.linspace(0.3, 3, d)).bfloat16()
    k[:, :, 5] += 4  # an outlier channel
    v = torch.randn(hkv, n, d).bfloat16()
    scale = d ** -0.5
    out = kernels.prefill_attend(q, k, v, q_start, k_start, scale, window)
    assert out is not None and out.dtype == torch.bfloat16 and out.shape == q.shape
    want = oracle(q, k, v, q_start, k_start, scale, window)
    ours = (out.float() - want).abs().max().item()
    theirs = (torch_bf16(q, k, v, q_start, k_start, scale, window).float() - want).abs().max().item()
    assert ours <= 1.5 * theirs + 2e-3, (ours, theirs)


@needs_kernel
def test_query_rows_may_be_a_strided_view():
    """The model hands over q as a transposed view (heads of a (T, Hq, D) projection)."""
    torch.manual_seed(1)
    proj = torch.randn(130, 9, 64).bfloat16()
    q = proj.transpose(0, 1)  # (Hq, T, D), head stride D, row stride Hq * D
    k, v = torch.randn(3, 130, 64).bfloat16(), torch.randn(3, 130, 64).bfloat16()
    out = kernels.prefill_attend(q, k, v, 0, 0, 0.125, None)
    want = kernels.prefill_attend(q.contiguous(), k, v, 0, 0, 0.125, None)
    assert torch.equal(out, want)


def test_unsupported_shapes_and_dtypes_decline():
    q = torch.randn(2, 4, 64)
    assert kernels.prefill_attend(q, q[:1], q[:1], 0, 0, 0.125, None) is None  # fp32: torch's path
    q = torch.randn(2, 4, 40).bfloat16()
    assert kernels.prefill_attend(q, q[:1], q[:1], 0, 0, 0.125, None) is None  # head size 40


@needs_kernel
def test_chunked_prefill_over_parts_takes_the_kernel_and_matches():
    """blockwise.attend on a chunk over a past part and the chunk's own part."""
    torch.manual_seed(2)
    past_k, past_v = torch.randn(3, 256, 64).bfloat16(), torch.randn(3, 256, 64).bfloat16()
    cur_k, cur_v = torch.randn(3, 90, 64).bfloat16(), torch.randn(3, 90, 64).bfloat16()
    q = torch.randn(9, 90, 64).bfloat16()
    parts = [Part(past_k, past_v, 0), Part(cur_k, cur_v, 256)]
    got = blockwise.attend(q, parts, 256, 0.125)
    want = oracle(q, torch.cat([past_k, cur_k], 1), torch.cat([past_v, cur_v], 1), 256, 0, 0.125, None)
    assert (got.float() - want).abs().max().item() < 2e-2


@needs_kernel
def test_smollm2_bf16_prefill_through_the_kernel_stays_as_close_to_fp32(monkeypatch):
    """SmolLM2 on real text, prefilled in bf16: logits through the kernel are as close to the
    fp32 model's as those of torch's bf16 attention."""
    from kvtier.api import LLM
    from kvtier.bench.data import kjv

    fp32, bf16 = LLM(dtype="fp32"), LLM(dtype="bf16")
    ids = fp32.encode(kjv()[:6000])[:700]

    def logits(llm):
        return llm.runner.feed([llm.runner.new_cache()], [ids], logits="all").float()

    want, ours = logits(fp32), logits(bf16)
    monkeypatch.setattr(kernels, "prefill_available", lambda: False)
    theirs = logits(bf16)
    err_ours, err_theirs = (ours - want).abs().mean().item(), (theirs - want).abs().mean().item()
    assert err_ours <= 1.2 * err_theirs, (err_ours, err_theirs)
    agree = (ours.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.95
