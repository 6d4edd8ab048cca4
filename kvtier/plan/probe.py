"""``kvtier plan --probe``: measure this machine once, as a :class:`~kvtier.plan.hardware.Hardware`.

Each number is the median of several timed repetitions after a warm-up:

Every buffer streamed is the working set: twice the last-level cache (at least 256 MiB), so
a measurement reads memory, not a 480 MiB L3 some servers have.

- memory read bandwidth at 1..n threads (a read-only pass, as STREAM does);
- dense matmul FLOP/s per dtype (fp32, bf16, int8 where torch has it on this device);
- weight matrix-vector bytes/s and fixed cost per call, per kvtier weight format (``dense``,
  ``q8``, ``q4``), through the format's own ``Linear`` on small and large matrices;
- kvtier's decode attention, bytes/s of held KV and fixed seconds per call, for every
  registered codec (its default parameters), layer after layer at 2K and 16K tokens, the
  counted operations' launch cost taken out;
- the fixed cost of one dispatched operation: a tiny model's decode step over its operation
  count (:mod:`kvtier.plan.launches`);
- the disk tier folder's read bandwidth through memory-mapped page faults in 1 MiB runs, warm
  and cold, and of cold sequential reads;
- with CUDA: host-to-device and device-to-host copies (pinned and pageable), HBM read
  bandwidth, bf16 tensor-core FLOP/s and the launch cost.
"""

from __future__ import annotations

import mmap
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from kvtier.plan.hardware import Device, Disk, Hardware, Link
from kvtier.plan.shapes import Shape

MiB = 1 << 20


def working_set() -> int:
    """Bytes a measurement streams so that it reads memory, not the last-level cache: twice
    that cache (some servers' L3 holds hundreds of MiB), at least 256 MiB, at most 2 GiB."""
    size = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            size = max(size, int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[text[-1]])
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return min(max(2 * size, 256 * MiB), 2 << 30)


def _median(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth(threads: int, size: int | None = None) -> dict[int, float]:
    """:func:`kvtier.bench.bandwidth.read_bandwidth` over the working set at 1..threads threads."""
    from kvtier.bench.bandwidth import read_bandwidth

    size = size or working_set()
    saved = torch.get_num_threads()
    out = {}
    try:
        for t in range(1, threads + 1):
            torch.set_num_threads(t)
            out[t] = read_bandwidth(size)
    finally:
        torch.set_num_threads(saved)
    return out


def matmul_peak(device: str = "cpu", n: int = 1024) -> dict[str, float]:
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(n, n, device=device).to(dt) for _ in range(2))
        out[name] = 2 * n ** 3 / _median(lambda: _sync(a @ b), 5)
    try:
        a8, b8 = (torch.randint(-8, 8, (n, n), dtype=torch.int8, device=device) for _ in range(2))
        out["int8"] = 2 * n ** 3 / _median(lambda: _sync(torch._int_mm(a8, b8)), 5)
    except (RuntimeError, NotImplementedError, AttributeError):
        pass  # no int8 matmul on this device in this torch
    return out


def _sync(x):
    if x.is_cuda:
        torch.cuda.synchronize()
    return x


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed seconds, bytes/s) of ``seconds = fixed + bytes / rate`` through two (bytes, s)."""
    (b0, t0), (b1, t1) = points
    rate = (b1 - b0) / max(t1 - t0, 1e-9)
    return max(t0 - b0 / rate, 0.0), rate


def gemv(dtype: torch.dtype) -> tuple[dict[str, float], dict[str, float]]:
    """Weight matrix-vector products at M=1 through each weight format's own Linear: small
    matrices (576 x 1536, a small model's) and large ones (4096 x 4096), each set at least the
    working set in the compute dtype (copies of a few packed matrices: distinct memory, packed
    once), so it streams from memory. Returns ({format: bytes/s}, {format: fixed s per call})."""
    import copy

    from kvtier import weights

    g = torch.Generator().manual_seed(0)
    ws = working_set()
    rates, fixed = {}, {}
    shapes = [(1536, 576), (4096, 4096)]
    mats = [[torch.randn(n, k, generator=g) * 0.02 for _ in range(4)] for n, k in shapes]
    for fmt in weights.formats():
        points = []
        for (n, k), group in zip(shapes, mats):
            packed = [weights.get(fmt).pack(f"m{i}.weight", m, None, dtype) for i, m in enumerate(group)]
            count = max(8, -(-ws // (n * k * dtype.itemsize)))
            lins = [copy.deepcopy(packed[i % len(packed)]) for i in range(count)]
            x = torch.randn(1, k).to(dtype)

            def run(lins=lins, x=x):
                for li in lins:
                    li(x)
            points.append((lins[0].nbytes, _median(run, 5, 1) / count))
            del lins
        fixed[fmt], rates[fmt] = _fit(points)
    return rates, fixed


PROBE_SHAPE = Shape("probe", "llama", 1, 32, 64, 4, 2, 64, 128, (None,), False, 1 << 20)


def _filled(kv: str, context: int, dtype: torch.dtype, shape: Shape, layers: int = 1):
    from kvtier.engine import ModelRunner
    from kvtier.plan.launches import tiny

    runner = ModelRunner(tiny(shape, layers, dtype), kv)
    cache = runner.new_cache(reserve=context + 64)
    g = torch.Generator().manual_seed(1)
    for layer in cache.layers:
        for start in range(0, context, 4096):
            n = min(4096, context - start)
            k, v = (torch.randn(shape.n_kv, n, shape.head_dim, generator=g).to(dtype) for _ in "kv")
            layer.append(k, v)
    return runner, cache


def launch_cost(dtype: torch.dtype) -> float:
    """Seconds per dispatched operation: a tiny model's decode step (4 heads of 64, 32 wide,
    64 tokens: its matmuls and attention cost next to nothing) over the operations it dispatches."""
    from kvtier.engine import sample
    from kvtier.plan.launches import count

    layers = 4
    runner, cache = _filled("dense", 64, dtype, PROBE_SHAPE, layers)
    tok = [1]

    def step():
        tok[0] = int(sample(runner.feed([cache], [tok])))
    seconds = _median(step, 21, 3)
    cache.close()
    return seconds / count(PROBE_SHAPE, "dense", dtype).step(layers, 1, [1] * layers)


ATTEND_SHAPE = Shape("probe-attend", "llama", 1, 72, 64, 9, 3, 64, 128, (None,), False, 1 << 20)


def attention(dtype: torch.dtype, launch: float, progress=None) -> tuple[dict[str, float], dict[str, float]]:
    """kvtier's decode attention with the default model's head layout (9 query heads, 3 KV
    heads of 64), called as a decode step calls it, layer after layer over as many layers as
    make the dense cache at 16K tokens the working set (copies of one filled layer), for
    every registered codec with its default parameters, at 2K and 16K tokens: ({codec: bytes/s
    of held KV}, {codec: fixed s per call}), the counted operations' launch cost taken out of
    both. The native int kernel counts as ``int`` (``dense``: bf16 blocks read as they are)."""
    import copy

    from kvtier import registry
    from kvtier.attention import decode
    from kvtier.plan.launches import _Counter

    s = ATTEND_SHAPE
    rates, fixed = {}, {}
    dense_layer = 16384 * 2 * s.n_kv * s.head_dim * dtype.itemsize
    layers = max(1, -(-working_set() // dense_layer))
    codecs = [name for name, cls in registry.methods().items() if cls.kind == "codec"]
    # the native int kernel's work per byte grows as the bits shrink: each width its own rate
    codecs += [f"int(bits={b})" for b in (2, 3, 8)]
    q = torch.randn(1, s.n_heads, s.head_dim).to(dtype)
    scale = s.head_dim ** -0.5
    qs = q.unsqueeze(2)[0] * scale
    for name in codecs:
        if progress:
            progress(f"  attention on {name} blocks")
        points = []
        for context in (2048, 16384):
            _, cache = _filled(name, context, dtype, s)
            held = [cache.layers[0]] + [copy.deepcopy(cache.layers[0]) for _ in range(layers - 1)]

            def call(held=held):
                for layer in held:
                    decode(q, [layer.select(qs)], [context], scale, None)
            counter = _Counter()
            with counter:
                decode(q, [held[0].select(qs)], [context], scale, None)
            seconds = _median(call, 3, 1) / layers - counter.n * launch
            points.append((held[0].nbytes(), seconds))
            del held
            cache.close()
        from kvtier.plan.costs import rate_key
        from kvtier.spec import parse

        codec = parse(name).codec
        for key in {rate_key(codec), codec.name} if "(" not in name else {rate_key(codec)}:
            fixed[key], rates[key] = _fit(points)
    return rates, fixed


def disk(folder: Path, size: int | None = None) -> Disk:
    """Reads of a tier file as the disk tier does them: through a kept shared mapping, 1 MiB
    runs each released after its read (``MADV_DONTNEED``): ``warm`` with the bytes in the
    page cache, ``cold`` with the file evicted from it first; ``cold_read``: large sequential
    reads of the evicted file (a fetch's copy)."""
    from kvtier.kv.prefetch import DONTNEED, advise

    size = size or working_set()
    path = None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix="kvtier-probe-", delete=False) as f:
            path = Path(f.name)
            chunk = os.urandom(MiB)
            for _ in range(size // MiB):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a read-only buffer: torch warns it is not writable
                base = torch.frombuffer(m, dtype=torch.int32)

            def mapped_pass(view: torch.Tensor, evict: bool) -> float:
                """Read 1 MiB runs, each released after its read (a disk extent of a small
                model's blocks is about that size; one 256 MiB pass faults 3x slower here)."""
                if evict:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                run = MiB // 4
                t0 = time.perf_counter()
                for at in range(0, view.numel(), run):
                    view[at: at + run].sum()
                    advise(view.data_ptr() + 4 * at, MiB, DONTNEED)
                return time.perf_counter() - t0

            mapped_pass(base, False)
            warm = size / statistics.median(mapped_pass(base, False) for _ in range(5))
            cold = size / statistics.median(mapped_pass(base, True) for _ in range(3))
            reads = []
            buf = bytearray(16 * MiB)
            for _ in range(3):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t0 = time.perf_counter()
                with open(path, "rb", buffering=0) as r:
                    while r.readinto(buf):
                        pass
                reads.append(time.perf_counter() - t0)
            del base
            return Disk(warm=warm, cold=cold, cold_read=size / statistics.median(reads), path=str(folder))
        finally:
            m.close()
            os.close(fd)
    finally:
        if path is not None:
            path.unlink(missing_ok=True)


def cuda() -> tuple[Device, list[Link]] | None:
    if not torch.cuda.is_available():
        return None
    size = 1 << 30
    dev = torch.empty(size // 4, device="cuda")
    hbm = size / _median(lambda: _sync(dev.sum()), 10)
    links = []
    for pinned in (True, False):
        host = torch.empty(size // 4, pin_memory=pinned)
        h2d = size / _median(lambda: _sync(dev.copy_(host, non_blocking=pinned)), 5)
        d2h = size / _median(lambda: (host.copy_(dev, non_blocking=pinned), torch.cuda.synchronize()), 5)
        links.append((pinned, h2d, d2h))
    (_, h2d_p, d2h_p), (_, h2d_u, d2h_u) = links
    small = torch.ones(16, device="cuda")
    n = 2000

    def many():
        for _ in range(n):
            small.add_(1)
        torch.cuda.synchronize()
    launch = _median(many, 5) / n
    name = torch.cuda.get_device_name()
    gpu = Device("gpu", {0: hbm}, matmul_peak("cuda", 8192), launch,
                 memory=float(torch.cuda.get_device_properties(0).total_memory), note=name)
    return gpu, [Link("cpu", "gpu", h2d_p, h2d_u), Link("gpu", "cpu", d2h_p, d2h_u)]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe(folder: Path | None = None, threads: int | None = None, progress=print) -> Hardware:
    """Measure this machine (one to two minutes on 2 cores)."""
    from kvtier.dtypes import compute_dtype
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    dtype = compute_dtype("auto")
    progress("memory bandwidth at 1.." + str(threads) + " threads")
    bw = memory_bandwidth(threads)
    progress("matmul throughput (fp32, bf16, int8)")
    peak = matmul_peak()
    progress("weight matrix-vector products per format")
    gv, gv_fixed = gemv(dtype)
    progress("kvtier's per-operation cost and decode attention")
    launch = launch_cost(dtype)
    att, att_fixed = attention(dtype, launch, progress)
    try:
        import psutil
        memory = float(psutil.virtual_memory().total)
    except ImportError:
        memory = 0.0
    cpu = Device("cpu", bw, peak, launch, gemv=gv, gemv_fixed=gv_fixed, attend=att, attend_fixed=att_fixed,
                 memory=memory,
                 note=f"{_cpu_name()}, {os.cpu_count()} cores, "
                      f"compute dtype {str(dtype).removeprefix('torch.')}")
    devices, links = {"cpu": cpu}, []
    got = cuda()
    if got:
        progress("GPU copies, HBM and tensor cores")
        devices["gpu"], links = got[0], got[1]
    folder = Path(folder) if folder else Path(tempfile.gettempdir())
    progress(f"disk reads in {folder} (warm and cold)")
    dk = disk(folder)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return Hardware(name=f"this machine ({platform.node()})", devices=devices, links=links, disk=dk,
                    threads=threads, source=f"kvtier plan --probe, {stamp}")
