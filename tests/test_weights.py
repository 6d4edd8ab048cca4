"""Weight formats: packed layouts equal GGUF's, the native kernel equals the PyTorch reference,
models run in every format, and SmolLM2's Q4_1 GGUF gives exactly the weights it holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ours_from_hf, tiny_hf, tokens
from kvtier import kernels, weights
from kvtier.errors import KvtierError
from kvtier.models.base import Batch
from kvtier.weights.base import Dense
from kvtier.weights.gguf import _packed, _rope_order, hf_name
from kvtier.weights.quant import GroupQuant, dequantize, quantize


def _gguf_bytes(w: np.ndarray, kind: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gq

    return gq(w, GGMLQuantizationType[kind])


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_read_as_gguf_dequantizes_them(kind):
    """Our view of a GGUF tensor's bytes gives the values gguf-py's own dequantize gives."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gdq

    w = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)
    raw = _gguf_bytes(w, kind)
    packed = _packed(kind, raw)
    assert packed.shape == (6, 96) and packed.bits == (8 if kind == "Q8_0" else 4)
    expect = gdq(raw, GGMLQuantizationType[kind])
    assert torch.equal(packed.dense(), torch.from_numpy(expect))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_round_trip_within_half_a_step(bits):
    w = torch.randn(10, 128) * torch.linspace(0.01, 3, 128)  # groups of very different ranges
    q = quantize(w, bits)
    err = (q.dense() - w).abs().view(10, 4, 32)
    step = q.d.float()[..., None]
    # half a step, plus the scale's fp16 rounding (2^-11 relative) times the largest code
    assert (err <= step * (0.5 + (127 if bits == 8 else 15) * 2 ** -11 * 1.01) + 1e-6).all()
    assert q.nbytes == 10 * 128 * bits // 8 + 10 * 4 * 2 * (2 if bits == 4 else 1)


@pytest.mark.parametrize("kind,bits", [("Q8_0", 8), ("Q4_1", 4)])
def test_quantize_writes_the_bytes_gguf_writes(kind, bits):
    w = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    ours = quantize(torch.from_numpy(w), bits)
    theirs = _packed(kind, _gguf_bytes(w, kind))
    assert torch.equal(ours.codes, theirs.codes) and torch.equal(ours.d, theirs.d)
    assert ours.m is None if bits == 8 else torch.equal(ours.m, theirs.m)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 33, 80])
def test_packed_matmul_equals_reference(bits, rows):
    """The native kernel (small M) and the dequantize + matmul path (large M) both equal
    F.linear on the reference dequantization."""
    torch.manual_seed(rows)
    q = quantize(torch.randn(37, 96), bits)
    x = torch.randn(rows, 96)
    ref = x @ q.dense().T
    out = q(x)
    assert out.shape == (rows, 37)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    bias = torch.randn(37)
    assert torch.allclose(q(x, bias), ref + bias, atol=1e-4, rtol=1e-4)
    assert torch.allclose(q(x.bfloat16()).float(), ref, atol=0.1, rtol=0.05)  # bf16 compute


@pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the reference is the only path")
@pytest.mark.parametrize("k", [96, 576])  # an odd number of groups (its last dotted alone), and SmolLM2's width
def test_one_bf16_row_on_4_bit_codes_is_the_fp32_product_rounded_once(k):
    """A decode step's matmul (one bf16 row of x) on 4-bit codes: every product of a code and x is
    exact in fp32 whichever path the CPU takes, so the result is the fp32 reference's, rounded
    once to bf16 (up to the order of the sums)."""
    torch.manual_seed(k)
    q = quantize(torch.randn(300, k), 4)
    x = torch.randn(1, k).bfloat16()
    got = kernels.qmatmul(x, q.codes, q.d, q.m, 4)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), x.float() @ q.dense().T, atol=1e-4, rtol=2 ** -8)


@pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the reference is the only path")
def test_kernel_ran_and_matches_torch_dequantize():
    q = quantize(torch.randn(8, 64), 4)
    y = kernels.qmatmul(torch.randn(2, 64), q.codes, q.d, q.m, 4)
    assert y is not None
    assert torch.equal(kernels.qdequant(q.codes, q.d, q.m, 4, 64), dequantize(q.codes, q.d, q.m, 4))
    for bits in (4, 8):  # bf16: the reference's fp32 values rounded to nearest even, once
        q = quantize(torch.randn(8, 64), bits)
        wide = dequantize(q.codes, q.d, q.m, bits)
        assert torch.equal(kernels.qdequant(q.codes, q.d, q.m, bits, 64, torch.bfloat16), wide.bfloat16())


@pytest.mark.parametrize("bits", [4, 8])
def test_matrix_units_path_equals_the_dot_product_path(monkeypatch, bits):
    """On a CPU with AMX, 2-32 bf16 rows are multiplied on the tiles (qmatmul.c rows_amx): the
    same bf16 weights and products as the vdpbf16ps path, summed in another order, so the bf16
    outputs agree to a rounding step. (Elsewhere both runs take the same path.)"""
    torch.manual_seed(bits)
    q = quantize(torch.randn(50, 96), bits)  # 50 rows of W: a partial block of 16
    for rows in (2, 16, 20, 32):
        x = torch.randn(rows, 96).bfloat16()
        monkeypatch.setenv("KVTIER_AMX", "1")
        tiles = q(x).float()
        monkeypatch.setenv("KVTIER_AMX", "0")
        dots = q(x).float()
        assert ((tiles - dots).abs() <= dots.abs() * 2 ** -7 + 1e-3).all()
        torch.testing.assert_close(tiles, x.float() @ q.dense().bfloat16().float().T, atol=0.05, rtol=0.02)


def test_the_tiles_are_shared_with_torchs_own_amx_work():
    """torch runs its bf16 matmuls and flash attention on the same AMX tiles (oneDNN, brgemm)
    and remembers their configuration per thread; kvtier's tile kernel puts it back after
    itself, so interleaving the two changes neither one's results (nor faults)."""
    torch.manual_seed(0)
    q = quantize(torch.randn(64, 128), 4)
    x, xl, w = torch.randn(16, 128).bfloat16(), torch.randn(64, 128).bfloat16(), torch.randn(96, 128).bfloat16()
    qa = torch.randn(1, 4, 256, 64).bfloat16()

    def attention():
        return torch.nn.functional.scaled_dot_product_attention(qa, qa, qa, is_causal=True)

    want = (q(x), torch.nn.functional.linear(xl, w), attention())
    for _ in range(3):
        got = (torch.nn.functional.linear(xl, w), q(x), attention(), q(x[:5]))
        assert torch.equal(got[0], want[1]) and torch.equal(got[1], want[0]) and torch.equal(got[2], want[2])
        assert torch.equal(got[3], want[0][:5])


def test_rows_and_cat_and_permute():
    a, b = quantize(torch.randn(5, 64), 4), quantize(torch.randn(3, 64), 4)
    ab = weights.cat([a, b])
    assert torch.equal(ab.dense(), torch.cat([a.dense(), b.dense()]))
    ids = torch.tensor([7, 0, 7, 2])
    assert torch.equal(ab.rows(ids), ab.dense()[ids])
    mixed = weights.cat([a, quantize(torch.randn(3, 64), 8)])
    assert mixed.bits == 8 and mixed.shape == (8, 64)
    assert torch.allclose(mixed.dense()[:5], a.dense(), atol=float(a.dense().abs().max()) / 127)
    idx = _rope_order(8, 2)
    assert sorted(idx.tolist()) == list(range(8))
    assert torch.equal(ab.permute_rows(idx).dense(), ab.dense()[idx])


def test_names_map_to_hugging_face():
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.0.attn_norm.weight") is None


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_model_runs_in_each_format_close_to_dense(family, fmt):
    hf = tiny_hf(family)
    dense, packed = ours_from_hf(hf), _packed_model(hf, fmt)
    assert all(isinstance(w, GroupQuant) for k, w in packed.w.items() if k.endswith("proj.weight"))
    assert packed.weight_bytes() < dense.weight_bytes() * (0.35 if fmt == "q8" else 0.25)
    ids = tokens(40)
    lp = _logits(packed, ids)
    # the oracle: the dense forward on the packed weights' values (what the format rounded to)
    from kvtier.weights.base import is_matrix
    from kvtier.weights.q4 import EIGHT_BIT

    def rounded(name, t):
        if not is_matrix(name, t):
            return t
        return quantize(t, 8 if fmt == "q8" or any(e in name for e in EIGHT_BIT) else 4).dense()

    ref = _from_state(hf, {k: rounded(k, v) for k, v in hf.state_dict().items()}, "dense")
    assert torch.allclose(lp, _logits(ref, ids), atol=1e-4, rtol=1e-4)
    # and against the float model: close for 8 bits (4 bits on random weights is far coarser)
    ld = _logits(dense, ids)
    if fmt == "q8":
        assert (lp - ld).norm() / ld.norm() < 0.03


def _packed_model(hf, fmt):
    return _from_state(hf, hf.state_dict(), fmt)


def _from_state(hf, state, fmt):
    from kvtier.models.gemma3 import Gemma3
    from kvtier.models.llama import Llama

    w = {k: v.detach().clone() for k, v in state.items()}
    cls = Gemma3 if hf.config.model_type.startswith("gemma3") else Llama
    return cls(hf.config, w, weight_format=fmt)


def _logits(model, ids):
    from kvtier.engine import ModelRunner

    runner = ModelRunner(model, "dense(dtype=fp32)")
    cache = runner.new_cache()
    return runner.feed([cache], [ids], logits="all")


def test_dense_format_is_todays_tensors(llama):
    w = llama.w["model.layers.0.self_attn.qkv_proj.weight"]
    assert isinstance(w, Dense) and w.dtype == torch.float32


def test_unknown_format_is_a_clear_error():
    with pytest.raises(KvtierError, match="use one of dense, q4, q8"):
        weights.get("q3")


def test_smollm2_q4_is_exactly_its_gguf(smollm2):
    """SmolLM2's Q4_1 GGUF: --weights q4 keeps its own bytes, so every matrix equals the one the
    dense loader dequantized, and the weights hold about a fifth of the fp32 bytes."""
    from kvtier.models import load

    q4 = load("smollm2-135m", weights="q4").model
    assert q4.weight_format == "q4"
    for name, w in smollm2.model.w.items():
        if isinstance(w, Dense):
            got = q4.w[name]
            assert isinstance(got, GroupQuant), name
            assert got.bits == (8 if "embed" in name else 4), name
            assert torch.equal(got.dense(), w.dense()), name
    assert q4.weight_bytes() < 0.2 * smollm2.model.weight_bytes()
    batch = Batch.of([_cache(smollm2.model)], [[1, 2, 3]])
    a = smollm2.model.forward(batch)
    b = q4.forward(Batch.of([_cache(q4)], [[1, 2, 3]]))
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-4)


def _cache(model):
    from kvtier.engine import ModelRunner

    return ModelRunner(model, "dense(dtype=fp32)").new_cache()


W8A8_SHAPES = [(1, 96, 70), (16, 128, 576), (40, 33, 200), (3, 1536, 64), (70, 100, 300),
               (100, 260, 130)]  # rows of x, N, K


def _w8a8_case(m, n, k):
    """A matrix, its input's channel ranges measured on a calibration sample, and fresh input
    from the same distribution: a 30x outlier channel and a channel 25 off centre."""
    from kvtier.weights.w8a8 import W8A8Linear

    g = torch.Generator().manual_seed(m + n + k)
    w = torch.randn(n, k, generator=g) * 0.05

    def sample(rows):
        x = torch.randn(rows, k, generator=g)
        x[:, 5] *= 30
        x[:, 7] += 25
        return x

    calib = sample(256)
    return W8A8Linear.from_float(w, calib.amin(0), calib.amax(0), torch.bfloat16), w, sample(m)


@pytest.mark.parametrize("amx", ["1", "0"], ids=["amx-where-present", "vnni"])
@pytest.mark.parametrize("m,n,k", W8A8_SHAPES)
def test_w8a8_kernel_equals_its_reference(m, n, k, amx, monkeypatch):
    """AMX int8 tiles (several rows, where the CPU has them) and VNNI dot products give the
    reference's numbers exactly: the int8 sums are exact and the float steps are the same."""
    monkeypatch.setenv("KVTIER_AMX", amx)
    lin, _, x = _w8a8_case(m, n, k)
    for dtype in (torch.bfloat16, torch.float32):
        xd = x.to(dtype)
        y = kernels.w8a8_matmul(xd, lin.packed, lin.ws_tiles, lin.wsum, lin.z, lin.inv_s, lin.bias)
        if y is None:
            pytest.skip("no C compiler, or a CPU without AVX512-VNNI: the reference is the only path")
        assert y.dtype == dtype and y.shape == (m, n)
        assert torch.equal(y, lin.reference(xd))


def test_w8a8_keeps_outlier_and_off_centre_channels():
    """Activations with a 30x outlier channel and a channel 25 off centre: int8 weights times
    int8 activations stay within 2 % of the float product, where per-token int8 of the raw
    activations (no per-channel scales or centres) is several times worse."""
    lin, w, x = _w8a8_case(8, 96, 200)
    want = x @ w.T
    err = ((lin.reference(x).float() - want).norm() / want.norm()).item()
    t = x.abs().amax(1, keepdim=True) / 127
    naive = (torch.round(x / t) * t) @ (torch.round(w / (w.abs().amax(1, keepdim=True) / 127))
                                        * (w.abs().amax(1, keepdim=True) / 127)).T
    naive_err = ((naive - want).norm() / want.norm()).item()
    assert err < 0.02 and naive_err > 3 * err, (err, naive_err)
    ids = torch.tensor([0, 17, 95, 3])
    assert torch.equal(lin.rows(ids).float(), lin.dense()[ids].bfloat16().float())  # rows read from the tiles


def test_w8a8_long_chunk_runs_on_the_weights_held_with_unquantized_input():
    """From BLOCKED_ROWS rows of x (a prefill chunk) the weights held are dequantized to bf16
    (the numbers ``dense()`` gives, rounded once) and multiplied with x as it is, the centre's
    share in the bias: closer to the float product than int8 activations are."""
    from kvtier.weights import w8a8

    lin, w, _ = _w8a8_case(1, 130, 200)
    held = kernels.w8a8_dequant(lin.packed, lin.ws_tiles, lin.inv_s, 130, 200)
    if held is None:
        pytest.skip("no C compiler, or a CPU without AVX512-BF16: the int8 kernel or the reference runs")
    assert ((held.float() - lin.dense()).abs() <= lin.dense().abs() * 2 ** -8).all()
    x = _w8a8_case(w8a8.BLOCKED_ROWS, 130, 200)[2]
    y = lin(x.bfloat16())
    want = x @ w.T
    centre = (lin.bias - lin.dense() @ lin.z).bfloat16()  # the centre's share, W less its rounding
    torch.testing.assert_close(lin.centre_bias.float(), centre.float(), atol=1e-3, rtol=2 ** -7)
    torch.testing.assert_close(y, torch.nn.functional.linear(x.bfloat16(), held, lin.centre_bias))
    err = ((y.float() - want).norm() / want.norm()).item()
    int8_err = ((lin.reference(x.bfloat16()).float() - want).norm() / want.norm()).item()
    assert err < int8_err, (err, int8_err)
    short = x[: w8a8.BLOCKED_ROWS - 1].bfloat16()  # below it: the int8 kernel's numbers
    if kernels.w8a8_matmul(short, lin.packed, lin.ws_tiles, lin.wsum, lin.z, lin.inv_s, lin.bias) is not None:
        assert torch.equal(lin(short), lin.reference(short))


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_model_runs_in_w8a8_close_to_dense(family):
    """The format measures the model's activation ranges after it is built (finish), packs every
    projection for them, and the logits stay close to the float model's."""
    from kvtier.weights.w8a8 import W8A8Linear

    hf = tiny_hf(family)
    dense, packed = ours_from_hf(hf), _packed_model(hf, "w8a8")
    weights.get("w8a8").finish(packed)
    projections = [w for k, w in packed.w.items() if k.endswith("proj.weight")]
    assert projections and all(isinstance(w, W8A8Linear) and w.source is None for w in projections)
    assert packed.weight_bytes() < dense.weight_bytes() * 0.4
    ids = tokens(40)
    lp, ld = _logits(packed, ids), _logits(dense, ids)
    # random weights and 8-bit activations at every matrix, embedding included (on SmolLM2's
    # real weights: +0.8 % PPL, docs/weights.md); a broken fold or scale is off by ~100 %
    assert (lp - ld).norm() / ld.norm() < 0.08


@pytest.mark.parametrize("limit,kept", [(-1.0, True), (1e9, False)])
def test_w8a8_keeps_a_kind_weight_only_when_its_activations_cost_perplexity(monkeypatch, capsys, limit, kept):
    """finish() scores each kind of matrix in w8a8 alone on the calibration text; a kind over the
    limit stays in 8-bit groups (weight-only) and the log names it."""
    from kvtier.weights import w8a8

    monkeypatch.setattr(w8a8, "KEEP_WEIGHT_ONLY", limit)
    packed = _packed_model(tiny_hf("llama"), "w8a8")
    weights.get("w8a8").finish(packed)
    projections = [w for k, w in packed.w.items() if k.endswith("proj.weight")]
    assert all(isinstance(w, GroupQuant if kept else w8a8.W8A8Linear) for w in projections)
    assert ("kept weight-only" in capsys.readouterr().err) == kept


W4A_SHAPES = [(1, 960, 576), (1, 37, 96), (3, 576, 1536), (4, 16, 32), (5, 130, 64), (70, 100, 160)]  # rows, N, K


def _w4a_case(m, n, k, qmax, n_out):
    from kvtier.weights.w4a import W4ALinear

    g = torch.Generator().manual_seed(m + n + k)
    gq = quantize(torch.randn(n, k, generator=g) * 0.05, 4)
    outliers = torch.randperm(k, generator=g)[:n_out] if n_out else None
    x = torch.randn(m, k, generator=g) * torch.where(torch.rand(k, generator=g) < 0.03, 20.0, 1.0)
    x[0, :32] = 0  # an all-zero group: scale 1, every code 0
    return W4ALinear(gq, qmax, outliers), x, torch.randn(n, generator=g)


@pytest.mark.parametrize("qmax,n_out", [(127, 0), (7, 0), (7, 5)], ids=["a8", "a4", "a4-outliers"])
@pytest.mark.parametrize("m,n,k", W4A_SHAPES)
def test_w4a_kernel_equals_its_reference(m, n, k, qmax, n_out):
    """The VNNI kernel on the Q4_1 nibbles (one weight row per lane) gives the reference's numbers: the same
    activation codes (the int32 sums are exact), the float sums within fp32 rounding, and a
    bf16 output within one rounding of it; one row (a decode step) and several (prefill)."""
    lin, x, bias = _w4a_case(m, n, k, qmax, n_out)
    for dtype, rel in ((torch.float32, 0.0), (torch.bfloat16, 2 ** -7)):  # bf16: one ulp
        xd = x.to(dtype)
        y = kernels.w4a_matmul(xd, *lin.lanes, float(qmax), lin.keep, lin.outliers, lin.wout, bias, n=n)
        if y is None:
            pytest.skip("no C compiler, or a CPU without AVX512-VNNI: the reference is the only path")
        ref = lin.reference(xd, bias)
        assert y.dtype == dtype and y.shape == (m, n)
        scale = ref.float().abs().max()
        # fp32 sums in another order: within 1e-5 of the largest output; bf16: one rounding more
        assert ((y.float() - ref.float()).abs() <= rel * ref.float().abs() + 1e-5 * scale).all()


def test_w4a_activations_are_codes_of_their_group_and_outliers_stay_exact():
    """Each group of 32 activations takes at most 2 * qmax + 1 values, steps of its own max over
    qmax; outlier channels are left out of the groups and multiplied exactly, so with every
    large channel an outlier the 4-bit product is several times closer to the float one."""
    from kvtier.weights.w4a import W4ALinear

    lin, x, _ = _w4a_case(6, 64, 128, 7, 0)
    q = lin.quantized(x).view(6, 4, 32)
    step = x.view(6, 4, 32).abs().amax(2, keepdim=True) / 7
    codes = q / step.clamp_min(1e-30)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 7 + 1e-4
    assert (q[0, 0] == 0).all()
    big = (x.abs().amax(0) > 10).nonzero().flatten()
    assert len(big) > 0
    split = W4ALinear(lin.gq, 7, big)
    want = x @ lin.dense().T
    err = lambda l: ((l.reference(x).float() - want).norm() / want.norm()).item()  # noqa: E731
    assert err(split) * 2 < err(lin), (err(split), err(lin))
    torch.testing.assert_close(W4ALinear(lin.gq, 127).reference(x), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("n,k", [(37, 96), (16, 32), (960, 576)])
def test_w4a_lanes_hold_q4s_codes_and_scales(n, k):
    """The kernel's layout (one weight row per lane, rows padded to 16) is a reordering of q4's
    bytes: unpacked, it gives back the same codes, scales and minima, and bytes held are q4's
    plus the padding."""
    from kvtier.weights.w4a import W4ALinear

    gq = quantize(torch.randn(n, k) * 0.05, 4)
    lin = W4ALinear(gq, 127)
    back = lin.gq
    assert torch.equal(back.codes, gq.codes) and torch.equal(back.d, gq.d) and torch.equal(back.m, gq.m)
    assert torch.equal(lin.dense(), gq.dense())
    assert lin.nbytes - (lin.keep.nbytes + lin.wout.nbytes + lin.outliers.nbytes) == gq.nbytes * (-(-n // 16) * 16) // n


@pytest.mark.parametrize("fmt", ["w4a8", "w4a4"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_model_runs_in_w4a_on_q4s_bytes(family, fmt, monkeypatch):
    """Every projection holds q4's own 4-bit groups (the same bytes) and multiplies them with
    quantized activations (w4a4's finish() chooses outlier channels and each kind's activation
    bits on calibration text). The model's logits are the reference path's (within a flipped rounding), and with 8-bit
    activations close to the q4 model's (4-bit activations on random tiny weights are far from
    them by nature: on SmolLM2's real weights see docs/weights.md)."""
    from kvtier.weights.w4a import W4ALinear

    hf = tiny_hf(family)
    q4, packed = _packed_model(hf, "q4"), _packed_model(hf, fmt)
    weights.get(fmt).finish(packed)
    projections = {k: w for k, w in packed.w.items() if k.endswith("proj.weight")}
    assert projections and all(isinstance(w, W4ALinear) and w.qmax in (7, 127) for w in projections.values())
    for k, w in projections.items():
        assert torch.equal(w.gq.codes, q4.w[k].codes) and torch.equal(w.gq.d, q4.w[k].d)
    ids = tokens(40)
    lp, lq = _logits(packed, ids), _logits(q4, ids)
    monkeypatch.setattr(kernels, "w4a_matmul", lambda *a, **k: None)
    lr = _logits(packed, ids)
    # fp32 sums in another order may flip an activation's rounding a layer later: a step, not a bug
    assert (lp - lr).norm() / lr.norm() < 0.01
    if fmt == "w4a8":
        assert (lp - lq).norm() / lq.norm() < 0.08


@pytest.mark.parametrize("limit,eight", [(-1.0, True), (1e9, False)])
def test_w4a4_keeps_8_bit_activations_where_4_bit_ones_cost_perplexity(monkeypatch, capsys, limit, eight):
    """finish() scores each kind of matrix with 4-bit activations alone on the calibration text
    (the rest in 8 bits); a kind over the limit keeps 8-bit activations and the log names it."""
    from kvtier.weights import w4a

    monkeypatch.setattr(w4a, "KEEP_8BIT", limit)
    packed = _packed_model(tiny_hf("llama"), "w4a4")
    weights.get("w4a4").finish(packed)
    projections = [w for k, w in packed.w.items() if k.endswith("proj.weight")]
    assert all(w.qmax == (127 if eight else 7) for w in projections)
    assert all((len(w.outliers) == 0) == eight for w in projections)
    assert ("keep 8-bit activations" in capsys.readouterr().err) == eight


@pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the reference is the only path")
def test_native_layer_blocks_give_the_same_numbers_as_the_steps_one_by_one():
    """A bf16 Llama on q4 matrices decodes through two native calls per layer (kernels/block.c);
    the logits of a prefill and each decode step equal those of the same kernels called one by
    one, bit for bit. A family with biases (qwen2) keeps the steps."""
    from kvtier.engine import ModelRunner, sample

    hf = tiny_hf("llama")
    torch.manual_seed(1)  # random norms: the ones transformers starts them at would hide a swapped norm
    state = {k: (torch.randn_like(v) if "norm" in k else v).bfloat16() for k, v in hf.state_dict().items()}
    model = _from_state(hf, state, "q4")

    def run():
        runner = ModelRunner(model, "dense")
        cache = runner.new_cache()
        out = [runner.feed([cache], [tokens(20)])]
        for _ in range(6):
            out.append(runner.feed([cache], [[int(sample(out[-1]))]]))
        return out

    fused = run()
    assert all(b is not None for b in model._blocks)
    model._blocks = [None] * model.n_layers
    steps = run()
    assert all(torch.equal(a, b) for a, b in zip(fused, steps))
    assert not torch.equal(fused[1], fused[2])  # the steps differ: each decoded a new token
    qwen = _from_state(tiny_hf("qwen2"), {k: v.bfloat16() for k, v in tiny_hf("qwen2").state_dict().items()}, "q4")
    assert qwen._make_block(0) is None
