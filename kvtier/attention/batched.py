"""Decode attention for all decoding sequences of a batch in one call per layer.

:func:`decode` hands every sequence's parts to the native kernel (``kvtier/kernels/batched.c``)
as rows of plain numbers (address, strides, length, start position, kind), so one call
computes each sequence's attention and merges its parts by log-sum-exp inside the kernel,
in parallel over (sequence, KV head). A sequence whose parts the kernel cannot take is
attended as before, one sequence at a time by :func:`kvtier.attention.blockwise.attend`;
:func:`native_parts` is the one place that decides. :func:`reference` is the oracle.

The kernel takes parts on the CPU without a ``bias``: held keys/values in fp32, bf16 or fp16
(sinks, the residual block, a selector's held tokens), the ``dense`` codec's blocks (read in
their storage dtype), the ``int`` codec's packed blocks (2, 4 or 8 bits; the shapes
``kvtier.kernels.int_attend`` takes), and runs of any codec with a native job
(:meth:`Codec.native_job`: the MX/NV formats, ``bfp``, ``lowrank``, ``ovp``, ``sparse``, and
``rotatekv`` when its heads are apart, ``nuq``, ``vq`` with fp16 codebooks: these three turn
their keys by RoPE in their kernels), which that codec's own kernel attends inside the same
call (when a sliding window cuts a run, the kernel skips the tokens it cut). A run whose job
the codec declines is scored by the codec's own call and merged. Everything else falls back:
codecs that store keys before RoPE without a job, parts with a bias (merged or
masked tokens), parts on another device, parts a selector gathered itself (Quest's per-head
blocks), head sizes that are not a multiple of 16.

Shapes: queries ``(S, Hq, D)``, one decode token per sequence, sequence s at position
``q_starts[s]``; parts as in :mod:`kvtier.attention.blockwise`.
"""

from __future__ import annotations

import array
import os

import torch

from kvtier import kernels
from kvtier.attention import blockwise
from kvtier.dtypes import DTYPES
from kvtier.kv.cache import LayerKV, Part
from kvtier.kv.codecs.base import Codec
from kvtier.kv.codecs.dense import Dense
from kvtier.kv.codecs.intq import Int

# a part as the kernel reads it (batched.c's PartDesc, in this order)
FIELDS = ("kind", "n", "start", "k", "v", "k_hs", "k_ts", "v_hs", "v_ts",
          "ks", "kz", "vs", "vz", "ks_hs", "vs_hs", "bits", "group", "block")
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INT = 3
SPAN = 4  # a run of another codec's blocks, attended by that codec's kernel (Codec.native_job)
MAX_HEAD_DIM, MAX_GROUP = 256, 32  # the kernel's MAXD and MAXR (query heads per KV head); head sizes a multiple of 16


def enabled() -> bool:
    """``KVTIER_BATCHED=0`` attends each sequence on its own (the path this one replaces)."""
    return os.environ.get("KVTIER_BATCHED", "1") != "0"


def decode(queries: torch.Tensor, parts: list[list[Part]], q_starts: list[int], scale: float,
           window: int | None = None) -> torch.Tensor:
    """Attention of one decode query per sequence over that sequence's parts.

    queries: ``(S, Hq, D)``; parts[s]: what sequence s attends (its new token included);
    q_starts[s]: its query's position; window: the layer's sliding window or None.
    Returns ``(S, Hq, D)`` in the queries' dtype. Every part's ``done()`` has run on return.
    """
    s_count, hq, d = queries.shape
    n_kv = next((p[0].n_kv for p in parts if p), hq)
    lib = kernels.library() if enabled() and queries.device.type == "cpu" else None
    if lib is None or hq % n_kv or hq // n_kv > MAX_GROUP or d > MAX_HEAD_DIM or d % 16:
        return per_sequence(queries, parts, q_starts, scale, window)
    g = hq // n_kv
    plans = [native_parts(p, q, window, g) for p, q in zip(parts, q_starts)]
    scored: dict[int, list[Part]] = {}  # sequences whose other parts a codec's kernel scores
    for s, plan in enumerate(plans):
        if plan is None:
            plans[s], rest = _split(parts[s], q_starts[s], window, g)
            if plans[s] is not None:
                scored[s] = rest
    native = [s for s, plan in enumerate(plans) if plan is not None]
    if not native:
        return per_sequence(queries, parts, q_starts, scale, window)
    lse = torch.empty(len(native), hq) if scored else None
    if len(native) == s_count:  # the usual case: no gather, no scatter
        out = _kernel(lib, queries, plans, q_starts, n_kv, scale, window, lse)
    else:
        out = torch.empty(queries.shape)
        out[native] = _kernel(lib, queries[native], [plans[s] for s in native], [q_starts[s] for s in native],
                              n_kv, scale, window, lse)
    for i, s in enumerate(native):  # merged with the pieces of the parts the kernel did not take
        if s in scored:
            g = hq // n_kv
            qg = (queries[s] * scale).reshape(n_kv, g, d)  # as blockwise.attend asks a codec
            pieces = [(lse[i].reshape(n_kv, g, 1), torch.ones(n_kv, g, 1), out[s].reshape(n_kv, g, d))]
            for p in scored[s]:
                piece = p.score(qg)
                pieces.append(piece if piece is not None else blockwise.partial(qg, *p.get(), None))
            out[s] = blockwise.merge([tuple(x.float() for x in piece) for piece in pieces]).reshape(hq, d)
    out = out.to(queries.dtype)
    for s in native:
        for p in parts[s]:
            if p.done is not None:
                p.done()
    for s, plan in enumerate(plans):
        if plan is None:
            out[s] = _one(queries[s], parts[s], q_starts[s], scale, window)
    return out


def decode_held(queries: torch.Tensor, layers: list, q_starts: list[int], scale: float,
                window: int | None = None) -> torch.Tensor | None:
    """:func:`decode` over everything each layer holds, when every layer attends all it holds
    (:meth:`LayerKV.held`) and the kernel takes it all: the kernel's rows are made from the
    layers' state without building their parts (a decode step does this for every sequence and
    layer). Returns None, having done nothing, where the parts are needed: ask
    ``layer.select`` and call :func:`decode` then."""
    s_count, hq, d = queries.shape
    lib = kernels.library() if enabled() and queries.device.type == "cpu" else None
    if lib is None or hq % layers[0].n_kv or hq // layers[0].n_kv > MAX_GROUP or d > MAX_HEAD_DIM or d % 16:
        return None
    plans, g = [], hq // layers[0].n_kv
    for layer, q_start in zip(layers, q_starts):
        plan = _held_plan(layer, g, q_start, window)
        if plan is None:
            return None
        plans.append(plan)
    return _kernel(lib, queries, plans, q_starts, layers[0].n_kv, scale, window).to(queries.dtype)


def _split(parts: list[Part], q_start: int, window: int | None, g: int):
    """A sequence whose parts the kernel does not all take: the kernel's rows for the ones it
    takes, and the others, when each of those is a run a codec scores on its codes whole
    (no mask, no bias, its heads together, on the CPU); else (None, None)."""
    taken = [takes(p, q_start, window, g) for p in parts]
    mine = [p for p, t in zip(parts, taken) if t]
    rest = [p for p, t in zip(parts, taken) if not t
            and not (window is not None and q_start - (p.start + p.n - 1) >= window)]  # outside: no keys
    if not mine or not rest or not all(
            p.score is not None and p.bias is None and p.heads is None
            and (p.device is None or p.device.type == "cpu")
            and blockwise.visible(q_start, 1, p.start, p.n, window, "cpu") is None for p in rest):
        return None, None
    return native_parts(mine, q_start, window, g), rest


def _held_plan(layer, g: int, q_start: int, window: int | None) -> tuple[list[list[int]], list] | None:
    """:func:`native_parts` of ``layer.select(q)`` for a layer that attends all it holds, ``g``
    query rows per KV head. The block runs' rows are kept with the runs; the residual's is
    remade from a kept template, its length changing every step."""
    held = layer.held()
    if held is None:
        return None
    runs, rk, rv, r, sinks = held
    rows, keep = [], []
    if sinks is not None:  # as stored (the kernel reads fp16 and bf16 itself)
        if sinks[0].device.type != "cpu" or sinks[0].dtype not in KINDS:
            return None
        rows.append(_plain_row(*sinks))
        keep.append(sinks)
    for run in runs:
        if run.native is None and (run.fetch or not _takes_blocks(run.layer) or run.layer.pool.device.type != "cpu"):
            return None
        got = _run_row(run, run.start, g)
        if got is None:
            return None
        rows.append(got[0])
        keep.append(got[1])
    if r:
        if layer.native is None or layer.native[0] is not rk:
            if rk.device.type != "cpu" or rk.dtype not in KINDS:
                return None
            layer.native = (rk, _plain_row(rk, rv))
        row = list(layer.native[1])
        row[1], row[2] = r, layer.length - r
        rows.append(row)
        keep.append((rk, rv))
    return rows, keep


def _kernel(lib, queries: torch.Tensor, plans: list, q_starts: list[int], n_kv: int, scale: float,
            window: int | None, lse: torch.Tensor | None = None) -> torch.Tensor:
    """One kernel call for the sequences of ``plans`` (:func:`native_parts`): ``(S, Hq, D)`` fp32;
    ``lse`` ``(S, Hq)`` fp32, when given, receives each row's log-sum-exp."""
    rows, seq_parts = array.array("q"), array.array("q", [0])
    for plan, _ in plans:  # the tensors the rows point into stay alive in ``plans`` meanwhile
        for row in plan:
            rows.extend(row)
        seq_parts.append(len(rows) // len(FIELDS))
    s_count, hq, d = queries.shape
    q = (queries.float() * scale).contiguous()
    pos = array.array("q", q_starts)
    lo = array.array("q", (p - window + 1 if window else 0 for p in q_starts))  # first visible position
    out = torch.empty_like(q)
    rc = lib.kvtier_batched_decode(q.data_ptr(), s_count, n_kv, hq // n_kv, d, _addr(rows), _addr(seq_parts),
                                   _addr(pos), _addr(lo), out.data_ptr(), torch.get_num_threads(),
                                   int(queries.dtype == torch.bfloat16), None if lse is None else lse.data_ptr())
    assert rc == 0, "the batched decode kernel refused parts that native_parts took"
    return out


def per_sequence(queries: torch.Tensor, parts: list[list[Part]], q_starts: list[int], scale: float,
                 window: int | None = None) -> torch.Tensor:
    """:func:`decode` one sequence at a time with :func:`blockwise.attend` (the fallback)."""
    return torch.stack([_one(q, p, s, scale, window) for q, p, s in zip(queries, parts, q_starts)])


def reference(queries: torch.Tensor, parts: list[list[Part]], q_starts: list[int], scale: float,
              window: int | None = None) -> torch.Tensor:
    """The oracle for :func:`decode`: each sequence by :func:`blockwise.reference`."""
    return torch.stack([blockwise.reference(q[:, None], p, s, scale, window)[:, 0]
                        for q, p, s in zip(queries, parts, q_starts)])


def _one(q: torch.Tensor, parts: list[Part], q_start: int, scale: float, window: int | None) -> torch.Tensor:
    return blockwise.attend(q[:, None], parts, q_start, scale, window)[:, 0]  # (Hq, D)


def native_parts(parts: list[Part], q_start: int | None = None, window: int | None = None,
                 g: int | None = None) -> tuple[list[list[int]], list] | None:
    """The kernel's rows for a sequence's parts (and the tensors they point into), or None
    when any part is one the kernel does not take: the sequence is then attended on its own.
    Nothing is read (no tier traffic counted) for a sequence that falls back. ``q_start``,
    ``window``, ``g``: the query's position, the layer's sliding window and the query rows per
    KV head, which a codec's kernel needs (it takes a run only when the query sees all of it)."""
    if not parts or not all(takes(p, q_start, window, g) for p in parts):
        return None
    rows, keep = [], []
    for p in parts:
        if p.load is None:
            k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (p.k, p.v))
            row, tensors = _plain_row(k, v), (k, v)
            row[2] = p.start
        else:  # a selector's cache may place the run elsewhere: the part's start
            got = _run_row(p.blocks, p.start, g)
            if got is None:
                return None
            row, tensors = got
        rows.append(row)
        keep.append(tensors)
    return rows, keep


def _run_row(run, start: int, g: int) -> tuple[list[int], object] | None:
    """The kernel's row for a run of blocks at ``start`` (``g`` query rows per KV head), and
    the tensors it points into, or None when the run's codec kernel declines its sizes: the
    row is made once and kept with the run while it lasts."""
    if run.native is None or run.native[2:] != (g, start):
        run.native = (*(_block_row(run, g, start) or (None, None)), g, start)
    row, tensors = run.native[:2]
    if row is None:
        return None
    row = list(row)
    row[2] = start
    return row, tensors


def _plain_row(k: torch.Tensor, v: torch.Tensor) -> list[int]:
    return [KINDS[k.dtype], k.shape[1], 0, k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), 0, 0, 0, 0, 0, 0, 0, 0, 0]


def _block_row(run, g: int, start: int) -> tuple[list[int], object] | None:
    """The kernel's row for a run of blocks at ``start``, and the tensors it points into:
    ``dense`` or ``int`` blocks read by the kernel itself, any other codec's by its own kernel
    (a SPAN row, with the RoPE rows of the run's positions for keys stored before RoPE; None
    when that kernel declines the sizes)."""
    layer = run.layer
    fields = run.fields()  # as the layer's own decode would read them
    if _spans(layer.codec):
        _, n, b = next(iter(fields.values())).shape[:3]
        rope = layer.rope.span(start, n * b) if layer.codec.pre_rope else None
        job = layer.codec.native_job(fields, g, rope)
        if job is None:
            return None
        turns = [0 if t is None else t.data_ptr() for t in (job.q_turn, job.o_turn)]
        return [SPAN, n * b, 0, job.span, job.job, 0, 0, 0, 0, *turns, 0, 0, 0, 0, 0, 0, b], job
    if type(layer.codec) is Int:
        fields = {name: t if _rows_contiguous(t) else t.contiguous() for name, t in fields.items()}
        for a, b in (("k_scale", "k_zero"), ("v_scale", "v_zero")):  # a head stride shared in the kernel
            if fields[a].stride(0) != fields[b].stride(0):
                fields[a], fields[b] = fields[a].contiguous(), fields[b].contiguous()
        return _int_row(layer.codec, fields, 0), fields
    k, v = fields["k"].flatten(1, 2), fields["v"].flatten(1, 2)  # dense (Hkv, n*B, D): a view of the pool
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    return _plain_row(k, v), (k, v)


def takes(part: Part, q_start: int | None = None, window: int | None = None, g: int | None = None) -> bool:
    """Whether the kernel takes this part: held keys/values in fp32, bf16 or fp16, or a run of
    ``dense`` or ``int`` blocks (the kernel's shapes) or of a codec whose native job takes the
    run, on the CPU, without a bias."""
    if part.bias is not None or (part.device is not None and part.device.type != "cpu"):
        return False
    if part.load is None:
        return part.k.dtype in KINDS and part.v.dtype == part.k.dtype and part.k.shape == part.v.shape
    layer = _block_run(part)
    if layer is None or not _takes_blocks(layer):
        return False
    if not _spans(layer.codec):
        return True
    return g is not None and _run_row(part.blocks, part.start, g) is not None  # made once, kept with the run


def _spans(codec) -> bool:
    """Whether runs of ``codec``'s blocks go to the kernel as SPAN rows (its native job)."""
    return type(codec).native_job is not Codec.native_job


def _takes_blocks(layer) -> bool:
    """Whether the kernel takes runs of ``layer``'s blocks: those of a codec with a native job
    (which may still decline a run), or ``dense`` or ``int`` in the kernel's shapes, keys
    stored after RoPE."""
    codec = layer.codec
    if _spans(codec):
        return True
    if codec.pre_rope:
        return False
    if type(codec) is Dense:
        return DTYPES[codec.dtype] in KINDS
    if type(codec) is Int:
        b, d = layer.block_size, layer.head_dim
        return (codec.bits in (2, 4, 8) and b % 16 == 0 and b <= 256 and (d * codec.bits // 8) % 16 == 0
                and codec.group % 16 == 0 and d % codec.group == 0)
    return False


def _int_row(codec: Int, f: dict[str, torch.Tensor], start: int) -> list[int]:
    k, ks, kz, v, vs, vz = (f[name] for name in ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero"))
    _, n, b, _ = v.shape  # values token-major (Hkv, n, B, packed)
    return [INT, n * b, start, k.data_ptr(), v.data_ptr(), k.stride(0), 0, v.stride(0), 0,
            ks.data_ptr(), kz.data_ptr(), vs.data_ptr(), vz.data_ptr(), ks.stride(0), vs.stride(0),
            codec.bits, codec.group, b]


def _block_run(part: Part) -> LayerKV | None:
    """The :class:`LayerKV` whose run of blocks ``part`` is, or None for any other part (and for
    keys stored before RoPE without a native job: decoding rotates them)."""
    run = part.blocks
    if run is None or (run.layer.codec.pre_rope and not _spans(run.layer.codec)):
        return None
    return run.layer


def _rows_contiguous(t: torch.Tensor) -> bool:
    """Contiguous within each head (the head stride may be larger: a view of the pool)."""
    want = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != want:
            return False
        want *= size
    return True


def _addr(a: array.array) -> int:
    return a.buffer_info()[0]
