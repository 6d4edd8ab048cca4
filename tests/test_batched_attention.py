"""Batched decode attention: the native kernel over many sequences' parts equals the per-sequence
oracle (:func:`kvtier.attention.blockwise.reference`) for every kind of part it takes, the
sequences it does not take fall back to the per-sequence path, and a model decoding many
sequences together gives the logits each gives alone."""

import pytest
import torch
from conftest import ours_from_hf, tiny_hf, tokens

from kvtier import kernels, spec
from kvtier.attention import batched
from kvtier.engine import ModelRunner
from kvtier.kv.cache import LayerKV, Part
from kvtier.kv.codecs.base import Codec, LayerContext
from kvtier.models.base import Rope

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: PyTorch path only")


def decoding(codec: str, lengths: list[int], dtype=torch.float32, hq=9, n_kv=3, d=64, block=64,
             window=None, seed=0, stats=None):
    """Sequences of ``lengths`` tokens, the last one just appended: queries ``(S, Hq, D)``,
    each sequence's parts (as ``DecoderModel.attention`` gathers them) and positions."""
    torch.manual_seed(seed)
    queries, parts, starts = [], [], []
    for n in lengths:
        c = spec.parse(codec).codec
        c = c.for_layer(LayerContext(0, n_kv, d, stats)) if stats is not None else c
        rope = Rope(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)) if c.pre_rope else None
        layer = LayerKV(c, n_kv, d, block, window, dtype, ctx=LayerContext(0, n_kv, d, rope=rope))
        k = torch.randn(n_kv, n, d) * torch.linspace(0.2, 3, d)
        k[:, :, 3] += 6.0  # an outlier channel
        layer.append(k.to(dtype), torch.randn(n_kv, n, d).to(dtype))
        q = torch.randn(hq, 1, d).to(dtype)
        queries.append(q[:, 0])
        parts.append(layer.select(q * d ** -0.5))
        starts.append(n - 1)
    return torch.stack(queries), parts, starts


def as_float(parts: list[Part]) -> list[Part]:
    return [Part(*(t.float() for t in p.get()), p.start) for p in parts]


def check(codec, lengths, dtype=torch.float32, window=None, **shape):
    q, parts, starts = decoding(codec, lengths, dtype, window=window, **shape)
    assert all(batched.native_parts(p) is not None for p in parts)  # no fallback here
    scale = q.shape[-1] ** -0.5
    got = batched.decode(q, parts, starts, scale, window)
    assert got.dtype == dtype and got.shape == q.shape
    if dtype == torch.float32:
        want = batched.reference(q, parts, starts, scale, window)
        tol = 1e-5 if codec.startswith("dense") else 5e-5  # int: scales folded in another order
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    else:  # as tests/test_kernels.py: fp32 inside, the output rounded to bf16
        want = batched.reference(q.float(), [as_float(p) for p in parts], starts, scale, window)
        for g, w in zip(got.float(), want):
            assert (g - w).norm() / w.norm() < 0.01


LENGTHS = [1, 128, 64 * 7 + 5, 64 * 20 + 33, 63, 2]  # one token, ends on a block, a long one


@needs_kernels
@pytest.mark.parametrize("codec", ["dense(dtype=fp32)", "dense(dtype=bf16)", "dense(dtype=fp16)",
                                   "int(bits=2)", "int(bits=4)", "int(bits=8)", "int(bits=4,group=16,residual=40)"])
def test_kernel_equals_reference_fp32(codec):
    check(codec, LENGTHS)


@needs_kernels
@pytest.mark.parametrize("codec", ["dense(dtype=bf16)", "dense(dtype=fp16)", "int(bits=4)", "int(bits=2)"])
def test_kernel_equals_reference_bf16(codec):
    check(codec, LENGTHS, torch.bfloat16)


@needs_kernels
@pytest.mark.parametrize("hq, n_kv, d", [(2, 2, 64), (8, 2, 128), (12, 2, 96), (4, 1, 32), (6, 2, 40)])
def test_gqa_and_head_sizes(hq, n_kv, d):
    """Query heads per KV head 1, 4, 6, 4 and 3; head sizes 64 and 128, two the kernel does
    not specialise (96, 32), nor 6 query heads per KV head, and one that is not a multiple of
    16 (40: attended one sequence at a time, the fallback); bf16 queries where the head size is
    a multiple of 32."""
    check("dense(dtype=fp32)", LENGTHS, hq=hq, n_kv=n_kv, d=d)
    check("dense(dtype=bf16)", LENGTHS, hq=hq, n_kv=n_kv, d=d)
    if d % 32 == 0:  # bf16 queries: bf16 products where the CPU has them; the int codec's groups of 32
        check("dense(dtype=bf16)", LENGTHS, torch.bfloat16, hq=hq, n_kv=n_kv, d=d)
        check("int(bits=4,group=32)", LENGTHS, hq=hq, n_kv=n_kv, d=d)


@needs_kernels
@pytest.mark.parametrize("codec", ["dense(dtype=fp32)", "int(bits=4)", "int(bits=8)"])
@pytest.mark.parametrize("window", [16, 40])
def test_sliding_window_masks_inside_blocks(codec, window):
    """Blocks of 16 and a window of 40: the oldest held block is partly out of the window."""
    check(codec, [1, 15, 16, 17, 40, 41, 100, 16 * 9], window=window, block=16)


@needs_kernels
@pytest.mark.parametrize("window", [None, 40])
def test_bf16_products_on_odd_spans(window):
    """bf16 queries over bf16 parts take the bf16 dot products: spans of every parity and
    shorter than a chunk, one cut by a window inside a block."""
    check("dense(dtype=bf16)", [1, 2, 3, 17, 31, 33, 65, 129, 200], torch.bfloat16, window=window, block=16)


@needs_kernels
def test_sinks_and_shifted_parts():
    """A held part at position 0 (attention sinks) before blocks that start later."""
    q, parts, starts = decoding("int(bits=4)", [64 * 3 + 9, 64 * 2], seed=1)
    torch.manual_seed(3)
    with_sinks = []
    for ps in parts:
        sink = Part(torch.randn(3, 4, 64), torch.randn(3, 4, 64), 0)
        for p in ps:
            p.start += 4
        with_sinks.append([sink] + ps)
    starts = [s + 4 for s in starts]
    assert all(batched.native_parts(p) is not None for p in with_sinks)
    got = batched.decode(q, with_sinks, starts, 0.125)
    torch.testing.assert_close(got, batched.reference(q, with_sinks, starts, 0.125), atol=5e-5, rtol=5e-5)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 4])
def test_one_long_sequence_split_over_threads(threads):
    """One sequence and one KV head: its tokens are cut over the threads, merged by LSE."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check("int(bits=4)", [64 * 40 + 3], hq=4, n_kv=1)
        check("dense(dtype=bf16)", [64 * 40 + 3], hq=4, n_kv=1)
    finally:
        torch.set_num_threads(before)


@needs_kernels
def test_a_batch_mixing_kernel_and_fallback_sequences():
    """Other codecs and parts with a bias go one sequence at a time; the rest stay batched."""
    q_int, p_int, s_int = decoding("int(bits=4)", [64 * 5 + 3, 9])
    q_fp4, p_fp4, s_fp4 = decoding("mxfp4", [64 * 3 + 1], seed=1)
    q_b, p_b, s_b = decoding("dense(dtype=fp32)", [64 * 2 + 7], seed=2)
    p_b[0][-1].bias = torch.zeros(3, p_b[0][-1].n)
    p_b[0][-1].bias[:, 0] = float("-inf")  # one masked key, as a selector masks a gone token
    q = torch.cat([q_int[:1], q_fp4, q_b, q_int[1:]])
    parts, starts = [p_int[0], p_fp4[0], p_b[0], p_int[1]], [s_int[0], s_fp4[0], s_b[0], s_int[1]]
    assert [batched.native_parts(p) is not None for p in parts] == [True, False, False, True]
    got = batched.decode(q, parts, starts, 0.125)
    torch.testing.assert_close(got, batched.reference(q, parts, starts, 0.125), atol=5e-5, rtol=5e-5)


def test_kernels_off_runs_the_per_sequence_path(monkeypatch):
    q, parts, starts = decoding("int(bits=4)", [64 * 3 + 2, 5])
    monkeypatch.setenv("KVTIER_KERNELS", "0")
    kernels.library.cache_clear()
    try:
        got = batched.decode(q, parts, starts, 0.125)
    finally:
        monkeypatch.delenv("KVTIER_KERNELS")
        kernels.library.cache_clear()
    torch.testing.assert_close(got, batched.reference(q, parts, starts, 0.125), atol=5e-5, rtol=5e-5)


def test_done_runs_for_every_part_on_both_paths():
    q, parts, starts = decoding("int(bits=4)", [64 * 3 + 2, 5])
    q_fp4, p_fp4, s_fp4 = decoding("mxfp4", [64 * 2 + 1])
    parts, starts, q = parts + p_fp4, starts + s_fp4, torch.cat([q, q_fp4])
    called = []
    for s, ps in enumerate(parts):
        for j, p in enumerate(ps):
            p.done = lambda s=s, j=j: called.append((s, j))
    batched.decode(q, parts, starts, 0.125)
    assert sorted(called) == [(s, j) for s, ps in enumerate(parts) for j in range(len(ps))]


# the model: decoding together gives each sequence's logits alone

PROMPTS = [1, 7, 64, 65, 130]  # prompt lengths: a lone token, a block, one past it, two blocks


def generate(runner, prompts, steps, together):
    """Prefill each prompt, then decode ``steps`` tokens (greedy) for all of them, together
    (one forward per step) or one sequence at a time. Returns each step's logits ``(S, V)``."""
    caches = [runner.new_cache() for _ in prompts]
    for c, p in zip(caches, prompts):
        runner.run([c], [p])
    out, feed = [], [[(sum(p) * 7) % 256] for p in prompts]  # any first token
    for _ in range(steps):
        if together:
            logits = runner.run(caches, feed)
        else:
            logits = torch.cat([runner.run([c], [f]) for c, f in zip(caches, feed)])
        out.append(logits)
        feed = [[int(t)] for t in logits.argmax(-1)]
    return torch.stack(out)


def counting_native(monkeypatch):
    """Sequences the kernel took (from their parts, or read straight from the layer: "held")
    and sequences attended on their own."""
    seen = {"native": 0, "fallback": 0, "held": 0, "split": 0}
    inner, inner_held, inner_split = batched.native_parts, batched._held_plan, batched._split

    def spy(*args):
        plan = inner(*args)
        seen["native" if plan is not None else "fallback"] += 1
        return plan

    def spy_held(*args):
        plan = inner_held(*args)
        if plan is not None:
            seen["native"] += 1
            seen["held"] += 1
        return plan
    def spy_split(*args):
        plan, rest = inner_split(*args)
        seen["split"] += plan is not None
        return plan, rest
    monkeypatch.setattr(batched, "native_parts", spy)
    monkeypatch.setattr(batched, "_held_plan", spy_held)
    monkeypatch.setattr(batched, "_split", spy_split)
    return seen


@pytest.mark.parametrize("family, kv, block", [
    ("llama", "dense(dtype=fp32)", 64), ("llama", "int(bits=4)", 64), ("llama", "int(bits=2)", 16),
    ("gemma3", "dense(dtype=bf16)", 16), ("gemma3", "int(bits=4,group=32)", 16),
    ("llama", "snapkv(ratio=0.5)+int(bits=4)", 16), ("llama", "quest(top_blocks=2)+int(bits=4)", 16),
    ("llama", "rotatekv(residual=0)", 16), ("llama", "rotatekv(residual=0,rotate=128)", 16),
    ("gemma3", "rotatekv(residual=0,rotate=32,group=32)", 16), ("gemma3", "mxfp4(hadamard=true)", 16), ("llama", "bfp", 16),
])
def test_model_decoding_together_equals_one_at_a_time(family, kv, block, monkeypatch):
    """Tiny Llama (GQA 4/2, head size 64) and tiny Gemma 3 (4/1, window 16 on its sliding
    layers); 5 sequences decode 6 steps together, and one at a time on the per-sequence path.
    A codec the kernel does not take (rotatekv with rotations spanning heads), and Quest's
    gathered blocks, have their runs scored by the codec's own kernel and merged with the
    batched kernel's piece over the rest ("split"); mxfp4's and rotatekv's (heads apart, RoPE in
    its kernel) runs are their kernels' jobs inside the batched kernel, also where the sliding
    window cuts them."""
    model = ours_from_hf(tiny_hf("llama", head_dim=64) if family == "llama" else tiny_hf("gemma3"))
    prompts = [tokens(n, seed=n) for n in PROMPTS]
    seen = counting_native(monkeypatch)
    together = generate(ModelRunner(model, kv, block_size=block), prompts, 6, True)
    if kernels.library() is not None:
        split = kv.startswith(("rotatekv(residual=0,rotate=128)", "quest"))
        assert seen["native"] > 0
        assert (seen["split"] > 0) == split
        if not split:  # runs the window cuts too: the codec's kernel skips the tokens it cut
            assert seen["fallback"] == 0
        if not split:  # read straight from the layers, unless a selector picks
            assert (seen["held"] > 0) == ("+" not in kv)
    monkeypatch.setenv("KVTIER_BATCHED", "0")
    alone = generate(ModelRunner(model, kv, block_size=block), prompts, 6, False)
    torch.testing.assert_close(together, alone, atol=2e-4, rtol=2e-4)


@needs_kernels
@pytest.mark.parametrize("codec", ["dense(dtype=bf16)", "int(bits=4)", "sparse", "mxfp4"])
def test_kept_block_runs_follow_the_block_table(codec):
    """Decode steps reuse a layer's block runs (and the kernel rows made from them) while the
    block table and the pool are unchanged; a sealed block, a pool that grew (its tensors
    reallocated) and freed blocks each give new runs, and every step equals the oracle."""
    torch.manual_seed(5)
    d, block = 64, 16
    layer = LayerKV(spec.parse(codec).codec, 3, d, block, window=100, dtype=torch.float32)
    layer.append(torch.randn(3, 3 * block, d), torch.randn(3, 3 * block, d))
    seen, changed = None, 0
    for step in range(6 * block):  # seals every 16 steps; the pool grows; the window frees blocks
        layer.append(torch.randn(3, 1, d), torch.randn(3, 1, d))
        q = torch.randn(9, d)
        parts = layer.select(q[:, None] * d ** -0.5)
        runs = [p.blocks for p in parts if p.blocks is not None]
        if seen is not None and [id(r) for r in runs] != seen:
            changed += 1
        seen = [id(r) for r in runs]
        want = batched.reference(q[None], [parts], [layer.length - 1], d ** -0.5, 100)
        got = batched.decode(q[None], [parts], [layer.length - 1], d ** -0.5, 100)
        torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-5)
    assert 6 <= changed <= 12  # new runs once per sealed block (and when the window frees one), not every step


def test_a_kept_run_keeps_its_fields_only_as_views():
    """A run of consecutive slots keeps the views of its fields across steps; a run of scattered
    slots (a gathered copy) does not keep them, so no second copy of its bytes is held."""
    d, block = 64, 16
    layer = LayerKV(spec.parse("mxfp4").codec, 2, d, block, dtype=torch.float32)
    layer.append(torch.randn(2, 4 * block, d), torch.randn(2, 4 * block, d))
    run = layer._block_runs()[0]
    assert run.fields() is run.fields()
    assert all(t.data_ptr() == layer.pool.data[name][:, run.slots[0]].data_ptr() for name, t in run.fields().items())
    layer.slots = layer.slots[::-1]  # the same blocks, scattered order: fields_of gathers a copy
    run = layer._block_runs()[0]
    assert run.fields() is not run.fields() and run.views is None


@needs_kernels
@pytest.mark.parametrize("hq, n_kv, d, window", [(9, 3, 64, None), (8, 2, 128, None), (9, 3, 64, 40)])
def test_scores_on_amx_tiles_equal_the_dot_product_path(monkeypatch, hq, n_kv, d, window):
    """On a CPU with AMX, bf16 keys are scored on the tiles (the same bf16 products, summed in
    fp32 in another order): the outputs agree with the vdpbf16ps path far inside the bf16 bound
    above, over spans of every parity and a window. (Elsewhere both runs take the same path.)"""
    q, parts, starts = decoding("dense(dtype=bf16)", [1, 2, 17, 33, 64, 65, 200, 64 * 20 + 33], torch.bfloat16,
                                window=window, hq=hq, n_kv=n_kv, d=d, block=16)
    scale = d ** -0.5
    monkeypatch.setenv("KVTIER_AMX", "1")
    tiles = batched.decode(q, parts, starts, scale, window).float()
    monkeypatch.setenv("KVTIER_AMX", "0")
    dots = batched.decode(q, parts, starts, scale, window).float()
    for a, b in zip(tiles, dots):
        assert (a - b).norm() / b.norm() < 2e-3


@needs_kernels
@pytest.mark.parametrize("codec, hq, n_kv, d, block, window", [
    ("int(bits=4)", 9, 3, 64, 64, None),
    ("int(bits=2)", 9, 3, 64, 64, 40),
    ("int(bits=4,group=16)", 8, 2, 128, 48, None),   # a token pair in two loads; 3 K steps a block
    ("int(bits=2,group=32)", 16, 2, 128, 16, 70),    # G = 8: top and rest fill the A tile
    ("int(bits=4)", 12, 1, 64, 64, None),            # G = 12: the vector path on both runs
])
def test_int_blocks_on_amx_tiles_equal_the_vector_path(monkeypatch, codec, hq, n_kv, d, block, window):
    """On a CPU with AMX, 2- and 4-bit `int` blocks are attended on the tiles when the queries
    are bf16 (codes read as the bf16 numbers 1 + c / 2^b, the fp32 factors split into two bf16):
    before the output is rounded to bf16, it agrees with the fp32 vector path to fp32 rounding,
    over blocks the window or the query's position cut. The residual is fp32 here, so both runs
    attend it alike. (Elsewhere both runs take the same path.)"""
    q, parts, starts = decoding(codec, [1, 17, block * 3, block * 5 + 7, 700], torch.float32,
                                window=window, hq=hq, n_kv=n_kv, d=d, block=block)
    q = q.bfloat16()
    plans = [batched.native_parts(p) for p in parts]
    lib = kernels.library()
    monkeypatch.setenv("KVTIER_AMX", "1")
    tiles = batched._kernel(lib, q, plans, starts, n_kv, d ** -0.5, window)
    monkeypatch.setenv("KVTIER_AMX", "0")
    vector = batched._kernel(lib, q, plans, starts, n_kv, d ** -0.5, window)
    torch.testing.assert_close(tiles, vector, atol=3e-5, rtol=3e-5)


@needs_kernels
@pytest.mark.parametrize("codec", ["mxfp4", "mxfp4(hadamard=true)", "nvfp4", "mxfp8", "mxint8", "bfp",
                                   "bfp(mantissa=8,block=32)", "bfp(sort=false)", "lowrank", "lowrank(bits=2)",
                                   "ovp", "sparse", "sparse(ratio=0.7,dtype=bf16)", "rotatekv",
                                   "rotatekv(bits=4,keys=channel,center=true)", "nuq", "nuq(bits=4,outliers=0.01)", "vq",
                                   "vq(dim=4,stages=1)"])
@pytest.mark.parametrize("window", [None, 300])
def test_codec_runs_are_their_kernels_jobs_in_the_batched_kernel(codec, window, monkeypatch):
    """A codec with a native job (its own kernel on its blocks, its head space turned by a
    rotation or a channel order): its runs are parts of the batched kernel's one call, split
    over threads with the others, and equal the per-sequence oracle. A run the sliding window
    cuts (here mid-block, in the longest sequence) is a job too, its kernel
    skipping the tokens the window cut."""
    seen = counting_native(monkeypatch)
    stats = {"k_rms": torch.rand(3, 64) * 3 + 0.1, "v_rms": torch.rand(3, 64) + 0.1,
             "kpre_rms": torch.rand(3, 64) * 3 + 0.1, "kpre_mean": torch.randn(3, 64),
             "kpre_sample": torch.randn(3, 256, 64).half(), "v_sample": torch.randn(3, 256, 64).half()}
    q, parts, starts = decoding(codec, [1, 70, 64 * 5 + 9, 64 * 12], block=64, window=window, stats=stats)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = batched.decode(q, parts, starts, 0.125, window)
            torch.testing.assert_close(got, batched.reference(q, parts, starts, 0.125, window), atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(threads)
    assert seen["fallback"] == 0 and seen["split"] == 0
    if window is None:
        rows, _ = batched.native_parts(parts[-1], starts[-1], None, 3)
        assert sum(row[0] == batched.SPAN for row in rows) == 1  # 12 blocks: one run


@needs_kernels
@pytest.mark.parametrize("codec", ["vq(dim=16)"])  # rotatekv spanning heads: in the model test above
def test_runs_whose_job_is_declined_are_scored_by_their_codec_and_merged(codec, monkeypatch):
    """A codec with a job that declines a run (vq's books, which its kernel would copy to fp32
    for each run): the run is scored by the codec's own call and merged with the batched
    kernel's piece over the rest, not the whole sequence taken off the batched kernel."""
    seen = counting_native(monkeypatch)
    stats = {"kpre_rms": torch.rand(3, 64) + 0.1, "kpre_sample": torch.randn(3, 256, 64).half(),
             "v_sample": torch.randn(3, 256, 64).half()}
    q, parts, starts = decoding(codec, [1, 70, 64 * 5 + 9, 64 * 12], block=64, stats=stats)
    got = batched.decode(q, parts, starts, 0.125)
    torch.testing.assert_close(got, batched.reference(q, parts, starts, 0.125), atol=1e-4, rtol=1e-4)
    assert seen["split"] >= 2 and seen["fallback"] == 2  # the two sequences holding blocks; planned, then split


@needs_kernels
@pytest.mark.parametrize("codec", ["mxfp4", "bfp"])  # rotatekv: in the model test above
def test_runs_the_kernel_does_not_take_are_scored_by_their_codec_and_merged(codec, monkeypatch):
    """A codec outside the batched kernel (here: its native job taken away): each sequence's
    runs are scored by the codec's own kernel, the rest (residual, sinks) by the batched kernel
    with its log-sum-exp, merged: equal to the per-sequence oracle."""
    monkeypatch.setattr(type(spec.parse(codec).codec), "native_job", Codec.native_job)
    seen = counting_native(monkeypatch)
    q, parts, starts = decoding(codec, [1, 70, 64 * 5 + 9, 64 * 12], block=64)
    got = batched.decode(q, parts, starts, 0.125)
    torch.testing.assert_close(got, batched.reference(q, parts, starts, 0.125), atol=1e-4, rtol=1e-4)
    assert seen["split"] >= 2  # the sequences holding blocks
