"""The cost model: every operation of a decode step (or a prefill chunk) with its bytes moved,
FLOPs, Op/B and predicted time on the device it runs on.

Each operation's time is a roofline with a fixed part: ``max(bytes / bandwidth, FLOPs / peak)``
plus the fixed cost per call the probe measured for that kind of call. The bandwidths are the
ones the probe measured for that kind of work (a weight format's matrix-vector product,
kvtier's attention kernel for the codec's format, a tier's reads), not the memory's datasheet
rate. Every operation kvtier dispatches from Python also pays the per-launch cost, times the
operations :mod:`kvtier.plan.launches` counted on kvtier's own forward.

KV bytes come from the codec's own field layout (:meth:`Codec.fields`: codes, scales and zero
points of one block, exactly what a block pool allocates), plus the sinks and residual tokens
the cache keeps unencoded. Tiers are filled as the store fills them: the newest blocks on the
first tier up to its budget (after the unencoded buffers), the older ones below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvtier.dtypes import DTYPES
from kvtier.errors import KvtierError
from kvtier.kv import tiers as tierspec
from kvtier.plan.hardware import Hardware
from kvtier.plan.shapes import Shape, row_bytes
from kvtier.spec import parse

BLOCK = 64  # kvtier's block size (kvtier.config)


@dataclass(frozen=True)
class Step:
    """What to plan: one decode step (``phase="decode"``) of ``batch`` sequences of ``context``
    tokens, or one prefill chunk of ``chunk`` tokens at that context. ``attend``: per lower
    tier, the share of its blocks fetched to the first tier (0 = local, 1 = fetch)."""

    model: Shape
    context: int
    batch: int = 1
    kv: str = "dense"
    weights: str = "dense"
    dtype: str = "bf16"
    tiers: str | None = None
    attend: tuple = ()  # one share per lower tier; empty: local everywhere
    phase: str = "decode"
    chunk: int = 2048
    page_cache: str = "warm"


@dataclass
class Op:
    """One operation of the step, summed over its layers and calls."""

    name: str
    kind: str  # gemv, gemm, attention, codec, transfer, sampler, launch
    device: str
    bytes: float
    flops: float
    seconds: float
    bound: str  # memory, compute, fixed, link, disk
    calls: int = 1
    detail: str = ""

    @property
    def op_b(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf

    def row(self) -> dict:
        return {"op": self.name, "kind": self.kind, "device": self.device, "bytes": self.bytes,
                "flops": self.flops, "op_per_byte": None if math.isinf(self.op_b) else self.op_b,
                "seconds": self.seconds, "bound": self.bound, "calls": self.calls, "detail": self.detail}


@dataclass
class Cost:
    """The operations of one planned step, their total and the layout they assumed."""

    step: Step
    hardware: Hardware
    ops: list[Op]
    kv_bytes: float
    kv_by_tier: list[float]
    tier_kinds: list[str]
    passes: list[dict] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(op.seconds for op in self.ops)

    @property
    def tok_s(self) -> float:
        n = self.step.batch if self.step.phase == "decode" else self.step.chunk
        return n / self.seconds


# --- KV layout ------------------------------------------------------------------------------
def block_bytes(kv: str, head_dim: int, n_kv: int) -> int:
    """Bytes of one sealed block of ``BLOCK`` tokens for all KV heads of a layer: the codec's
    fields (codes, scales, zero points, outlier parts) as a block pool holds them."""
    codec = parse(kv).codec
    fields = codec.fields(BLOCK, head_dim)
    return n_kv * sum(math.prod(shape) * dtype.itemsize for shape, dtype in fields.values())


def layer_tokens(shape: Shape, context: int) -> list[int]:
    """Tokens each layer holds at ``context`` (a sliding layer holds its window and a block)."""
    return [context if w is None else min(context, w + BLOCK) for w in shape.windows]


def kv_bytes(shape: Shape, kv: str, context: int, dtype: str = "bf16") -> tuple[float, float]:
    """(bytes of sealed blocks, bytes of unencoded sinks and residual tokens) over all layers."""
    spec = parse(kv)
    if spec.selectors:
        raise KvtierError(f"kvtier plan models codecs, not token selectors yet: drop "
                          f"{'+'.join(m.name for m in spec.selectors)} from {kv!r}")
    codec = spec.codec
    per_block = block_bytes(kv, shape.head_dim, shape.n_kv)
    compute = DTYPES[dtype].itemsize
    plain_el = codec.plain_dtype.itemsize if codec.plain_dtype is not None and compute > 2 else compute
    sealed = plain = 0.0
    for n in layer_tokens(shape, context):
        blocks = max(0, n - codec.sinks - codec.residual) // BLOCK
        sealed += blocks * per_block
        plain += (n - blocks * BLOCK) * 2 * shape.n_kv * shape.head_dim * plain_el
    return sealed, plain


def placement(step: Step) -> tuple[list[str], list[float], float]:
    """(tier kinds, sealed bytes per tier, unencoded bytes on the first tier) for one sequence
    times the batch: the newest blocks fill the first tier's budget, the rest go down."""
    sealed, plain = kv_bytes(step.model, step.kv, step.context, step.dtype)
    sealed, plain = sealed * step.batch, plain * step.batch
    if not step.tiers:
        return ["memory"], [sealed], plain
    parsed = parse_tiers(step.tiers)
    left, out = sealed, []
    for i, t in enumerate(parsed):
        room = max(0.0, t.budget - (plain if i == 0 else 0.0))
        here = min(left, room) if i < len(parsed) - 1 else left
        out.append(here)
        left -= here
    return [t.kind for t in parsed], out, plain


def parse_tiers(text: str) -> list:
    """A tier spec as ``--tiers`` takes it, for whichever device computes first (a gpu-first
    spec plans a GPU machine; no GPU is needed here)."""
    return tierspec.parse(text, "cuda" if text.strip().startswith("gpu") else "cpu", need_device=False)


# --- the kernel each codec's attention takes ------------------------------------------------
def attention_kernel(kv: str, device: str) -> str:
    """``dense`` (held blocks read as they are), ``native`` (a CPU kernel on the codec's codes)
    or ``torch`` (a group of blocks decoded by PyTorch ops, then attended)."""
    from kvtier.kv.codecs.base import attends_on_codes
    from kvtier.kv.codecs.dense import Dense

    codec = parse(kv).codec
    if isinstance(codec, Dense):
        return "dense"
    if device == "cpu" and attends_on_codes(codec):
        return "native"
    return "torch"


def rate_key(codec) -> str:
    """The name a codec's measured attention rate is kept under: ``int(bits=2)`` for codecs
    whose kernel work per byte depends on the bit width, else the codec's name."""
    bits = getattr(codec, "bits", None)
    return f"{codec.name}(bits={bits})" if bits is not None else codec.name


def group_tokens(kv: str) -> int:
    return min(parse(kv).codec.group_blocks, 1 << 24) * BLOCK


# --- the step -------------------------------------------------------------------------------
def _roofline(bytes_: float, flops: float, bw: float, peak: float, fixed: float = 0.0) -> tuple[float, str]:
    mem, comp = bytes_ / bw, flops / peak
    return max(mem, comp) + fixed, ("compute" if comp > mem else "memory")


def cost(step: Step, hw: Hardware) -> Cost:
    """Every operation of ``step`` on ``hw`` (see the module docstring)."""
    from kvtier.plan.launches import count

    s, b = step.model, step.batch
    compute = hw.compute()
    dev = hw.devices[compute]
    dt = torch.bfloat16 if step.dtype == "bf16" else torch.float32
    rows = 1 if step.phase == "decode" else step.chunk
    m = rows * b if step.phase == "decode" else rows  # rows multiplied by each weight matrix
    ops: list[Op] = []
    threads = hw.threads

    # weights: one matrix-vector product (decode, M = batch) or a GEMM (prefill chunk)
    for name, (n, k) in s.matrices().items():
        nbytes = n * row_bytes(step.weights, k, dt) * s.n_layers
        flops = 2.0 * m * n * k * s.n_layers
        kind = "gemv" if m <= 8 else "gemm"
        bw = dev.gemv.get(step.weights) or dev.bandwidth(threads)
        fixed = dev.gemv_fixed.get(step.weights, 0.0) * s.n_layers
        secs, bound = _roofline(nbytes, flops, bw, dev.flops(step.dtype), fixed)
        ops.append(Op(name, kind, compute, nbytes, flops, secs, bound, s.n_layers, f"{n}x{k} {step.weights}"))
    head_rows = b if step.phase == "decode" else 1  # logits of the last token only
    n, k = s.vocab, s.hidden
    nbytes = n * row_bytes(step.weights, k, dt)
    flops = 2.0 * head_rows * n * k
    bw = dev.gemv.get(step.weights) or dev.bandwidth(threads)
    secs, bound = _roofline(nbytes, flops, bw, dev.flops(step.dtype), dev.gemv_fixed.get(step.weights, 0.0))
    ops.append(Op("lm_head", "gemv", compute, nbytes, flops, secs, bound, 1,
                  f"{n}x{k} {step.weights}" + (", tied to the embedding" if s.tied else "")))

    # attention, per tier and where it runs
    kinds, by_tier, plain = placement(step)
    tokens = sum(layer_tokens(s, step.context)) * b
    q_rows = rows * b if step.phase == "decode" else rows
    ctx_flops = 4.0 * s.n_heads * s.head_dim * q_rows * (tokens / b if step.phase == "decode" else tokens)
    total_held = sum(by_tier) + plain
    kernel = attention_kernel(step.kv, compute)
    passes = []
    shares = list(step.attend) + [0.0] * max(0, len(kinds) - 1 - len(step.attend))
    for t, (tier, held) in enumerate(zip(kinds, by_tier)):
        share_bytes = held + (plain if t == 0 else 0.0)
        if share_bytes <= 0:
            continue
        frac = share_bytes / total_held if total_held else 0.0
        flops = ctx_flops * frac
        if t == 0 or tier == "memory":
            op = _attend(f"attention ({tier})", compute, dev, kernel, held, flops, s.n_layers, step)
            if plain:  # sinks and residual tokens, unencoded: read as dense blocks are
                dense_bw = dev.attend.get("dense") or dev.bandwidth()
                op.bytes += plain
                op.seconds += plain / dense_bw
                op.detail += f"; {plain / 1e6:.1f} MB unencoded at {dense_bw / 1e9:.2f} GB/s"
            ops.append(op)
            continue
        fetched = shares[t - 1]
        local = 1.0 - fetched
        if tier == "recompute":
            raise KvtierError("kvtier plan does not model the recompute tier (see docs/offload.md for its "
                              "measured break-even): drop it from --tiers")
        if fetched > 0:  # copied to the compute device's memory, then attended there
            moved = held * fetched
            ops.append(_copy(tier, compute, moved, hw, step))
            ops.append(_attend(f"attention (fetched from {tier})", compute, dev, kernel, moved, flops * fetched,
                               s.n_layers, step))
        if local > 0:  # attended where it lives (disk: by the CPU through the mapping)
            cpu = hw.cpu
            own = attention_kernel(step.kv, "cpu")
            op = _attend(f"attention ({tier}, in place)", "cpu", cpu, own, held * local, flops * local,
                         s.n_layers, step)
            if tier == "disk":
                read = _disk_rate(hw, step.page_cache)
                op.seconds += held * local / read
                op.bound, op.detail = "disk", op.detail + f"; page faults at {read / 1e9:.2f} GB/s ({step.page_cache})"
            ops.append(op)
            if compute != "cpu":  # partial results (max, sum, weighted values) go to the GPU
                part = 4.0 * q_rows * s.n_heads * (s.head_dim + 2) * s.n_layers
                li = hw.link("cpu", compute)
                ops.append(Op(f"partials ({tier} to {compute})", "transfer", "link", part, 0.0,
                              part / li.pinned + li.latency * s.n_layers, "link", s.n_layers))
    passes.append(_passes(step, kernel, total_held))

    # codec: the new tokens join the residual block; a block is sealed every BLOCK tokens
    new = q_rows
    dense_bytes = 2.0 * s.n_kv * s.head_dim * DTYPES[step.dtype].itemsize * new * s.n_layers
    secs, bound = _roofline(dense_bytes * 2, 0.0, dev.bandwidth(threads), dev.flops(step.dtype))
    ops.append(Op("kv store (codec encode)", "codec", compute, dense_bytes * 2, 0.0, secs, bound, s.n_layers,
                  "residual append; a block sealed every 64 tokens"))

    # sampler: the logits (fp32) read once
    lbytes = 4.0 * s.vocab * head_rows
    secs, bound = _roofline(lbytes, 0.0, dev.bandwidth(threads), dev.flops("fp32"))
    ops.append(Op("sampler", "sampler", compute, lbytes, float(s.vocab * head_rows), secs, bound))

    # every operation dispatched from Python, counted on kvtier's own forward
    native = compute == "cpu"
    launches = count(s, step.kv, dt, native)
    span = group_tokens(step.kv)
    groups = [max(1, math.ceil(n / span)) for n in layer_tokens(s, step.context)]
    if step.phase == "decode":
        n_ops = launches.step(s.n_layers, b, groups)
    else:  # a chunk runs the layer's operations once, attention per group and its own part
        n_ops = launches.step(s.n_layers, 1, groups) + launches.per_seq_layer * s.n_layers
    n_ops += _tier_launches(step, kinds, by_tier, shares, span)
    ops.append(Op("launches (Python dispatch)", "launch", compute, 0.0, 0.0, n_ops * dev.launch, "fixed",
                  int(n_ops), f"{n_ops:.0f} operations x {dev.launch * 1e6:.1f} us"))
    return Cost(step, hw, ops, total_held, [by_tier[0] + plain] + by_tier[1:], kinds, passes)


def _attend(name: str, device: str, dev, kernel: str, nbytes: float, flops: float, layers: int,
            step: Step) -> Op:
    """Attention over ``nbytes`` of held KV at the rate the probe measured for this codec on
    this device (else for its kernel family, else the memory's bandwidth)."""
    codec = parse(step.kv).codec
    key = next((k for k in (rate_key(codec), codec.name, kernel) if k in dev.attend), kernel)
    bw = dev.attend.get(key) or dev.bandwidth()
    fixed = dev.attend_fixed.get(key, 0.0) * layers
    peak = dev.flops(step.dtype) if kernel != "torch" else dev.flops("fp32")
    if step.phase != "decode":  # a chunk's queries share one read of the held blocks: matmul work
        bw = dev.bandwidth()
    secs, bound = _roofline(nbytes, flops, bw, peak, fixed)
    return Op(name, "attention", device, nbytes, flops, secs, bound, layers,
              f"{kernel} kernel ({key}) at {bw / 1e9:.2f} GB/s")


def _copy(tier: str, compute: str, nbytes: float, hw: Hardware, step: Step) -> Op:
    """A fetch: blocks copied to the compute device's memory. From the disk tier the copy reads
    the file's mapping (page faults at the disk's warm or cold rate, as attention in place
    does) and writes RAM (a read and a write at the memory's bandwidth); to a GPU, then over
    the link."""
    if tier == "disk":
        rate = _disk_rate(hw, step.page_cache)
        secs = nbytes / rate + 2 * nbytes / hw.cpu.bandwidth(hw.threads)
        detail = f"mapped reads at {rate / 1e9:.2f} GB/s ({step.page_cache}), then a copy in RAM"
        if compute != "cpu":
            li = hw.link("cpu", compute)
            secs += nbytes / li.pinned
            detail += f", then {li.pinned / 1e9:.1f} GB/s to {compute}"
        return Op(f"fetch {tier} to {compute}", "transfer", "link", nbytes, 0.0, secs, "disk", detail=detail)
    li = hw.link(tier if tier != "memory" else "cpu", compute)
    return Op(f"fetch {tier} to {compute}", "transfer", "link", nbytes, 0.0, nbytes / li.pinned, "link",
              detail=f"{li.pinned / 1e9:.1f} GB/s pinned")


def _disk_rate(hw: Hardware, page_cache: str) -> float:
    if hw.disk is None:
        raise KvtierError(f"hardware {hw.name!r} has no [disk] section; probe this machine with "
                          "kvtier plan --probe --tier-folder DIR")
    return hw.disk.cold if page_cache == "cold" else hw.disk.warm


def _tier_launches(step: Step, kinds: list[str], by_tier: list[float], shares: list[float], span: int) -> float:
    """Operations the tiers add: each lower tier's runs are parts of their own (at most a
    group or a 16-block disk extent each), and a fetched run is one copy per field and KV head."""
    if len(kinds) < 2:
        return 0.0
    from kvtier.kv.store import EXTENT

    per_block = block_bytes(step.kv, step.model.head_dim, step.model.n_kv) * step.model.n_layers * step.batch
    n_fields = len(parse(step.kv).codec.fields(BLOCK, step.model.head_dim))
    extra = 0.0
    for t in range(1, len(kinds)):
        blocks = by_tier[t] / per_block if per_block else 0.0
        run = min(span // BLOCK, EXTENT) if kinds[t] == "disk" else span // BLOCK
        runs = blocks / max(run, 1) * step.model.n_layers
        extra += runs * (2 + n_fields * step.model.n_kv * 2 * (shares[t - 1] > 0))  # empty + copy_
    return extra


def _passes(step: Step, kernel: str, held: float) -> dict:
    """FuseMax's view of attention: how many passes over the held KV each decode query's
    attention takes and the buffer between them, against the one-pass lower bound."""
    s = step.model
    if kernel in ("dense", "native"):
        passes, buffer, note = 1, 4 * s.n_heads * (s.head_dim + 2), "one pass, online softmax (lower bound)"
    else:
        group = group_tokens(step.kv)
        passes = 3  # codes read, a decoded group written, then read by attention
        buffer = 2 * group * s.n_kv * s.head_dim * DTYPES[step.dtype].itemsize
        note = "decode a group to a dense buffer, then attend it: 1 pass over codes + 2 over the buffer"
    return {"kernel": kernel, "passes": passes, "lower_bound_passes": 1, "buffer_bytes": buffer,
            "bytes_read": held, "note": note}

