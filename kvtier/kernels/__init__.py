"""Native CPU kernels, compiled once on first use with the machine's C compiler.

Each kernel has a plain PyTorch path beside it (the reference it is tested against); when no
compiler is found or the build fails, kvtier warns once and runs the PyTorch path.
``KVTIER_KERNELS=0`` turns the kernels off.

The shared library is built from the C sources in this folder for the host CPU
(``-march=native``) and kept under ``<cache>/kernels/<hash>.so``, the hash covering the
sources, the flags and the CPU's feature flags, so a different CPU builds its own.
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
import weakref
from pathlib import Path

import torch

from kvtier.paths import cache_dir

SOURCES = ("intattn.c", "batched.c", "qmatmul.c", "nuqattn.c", "vqattn.c", "rkvattn.c", "bsattn.c", "lrattn.c",
           "ovpattn.c", "spattn.c", "prefill.c", "pointwise.c", "intenc.c",
           "rope.c", "w8a8.c", "w4a.c", "block.c")
HEADERS = ("intblock.h", "spans.h", "spanfn.h", "amx.h", "vexp.h", "bf16.h")  # included by the sources: part of the build's hash
# -ffast-math lets gcc vectorize the reductions and expf; it is given only when compiling,
# never when linking, so the process's floating-point mode (crtfastmath) is left alone.
COMPILE = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c"]
LINK = ["-shared", "-fopenmp", "-lm"]


def enabled() -> bool:
    return os.environ.get("KVTIER_KERNELS", "1") != "0"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no compiler, build failed, or turned off)."""
    if not enabled():
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        warnings.warn("kvtier: no C compiler found; using the slower PyTorch attention for packed codecs",
                      stacklevel=2)
        return None
    here = Path(__file__).parent
    src = b"".join((here / s).read_bytes() for s in SOURCES + HEADERS)
    key = hashlib.sha256(src + " ".join(COMPILE + LINK).encode() + _cpu_flags().encode()).hexdigest()[:16]
    out = cache_dir("kernels") / f"kvtier-{key}.so"
    if not out.exists():
        for old in out.parent.glob("kvtier-*.so"):  # builds of older sources or another CPU
            old.unlink(missing_ok=True)
        try:
            _build(cc, [here / s for s in SOURCES], out)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", b"") or str(e)
            detail = detail.decode(errors="replace") if isinstance(detail, bytes) else detail
            warnings.warn(f"kvtier: building the native kernels failed ({detail.strip()[:300]}); "
                          "using the slower PyTorch path", stacklevel=2)
            return None
    lib = ctypes.CDLL(str(out))
    _declare(lib)
    return lib


def _build(cc: str, sources: list[Path], out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs = []
        for s in sources:
            obj = Path(tmp, s.stem + ".o")
            subprocess.run([cc, *COMPILE, str(s), "-o", str(obj)], check=True, capture_output=True)
            objs.append(str(obj))
        so = Path(tmp, out.name)
        subprocess.run([cc, *objs, "-o", str(so), *LINK], check=True, capture_output=True)
        os.replace(so, out)  # atomic: a concurrent process sees the whole file or none


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _declare(lib: ctypes.CDLL) -> None:
    p, i, l = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.kvtier_int_attend.argtypes = [p, i, i, i, i, i, i, i, p, p, p, p, p, p, l, l, l, l, p, p, p, i]
    lib.kvtier_int_attend.restype = i
    # q, n_seq, n_kv, g, d, parts, seq_parts, q_pos, lo, out, threads, q_bf16, lse (kvtier.attention.batched)
    lib.kvtier_batched_decode.argtypes = [p, i, i, i, i, p, p, p, p, p, i, i, p]
    lib.kvtier_batched_decode.restype = i
    # q, n_kv, rows, d, bits, group, block, n_blocks, n_out, fields, strides, rope, rope_hs,
    # lut_k, lut_v, m, l, o, threads (kvtier.kv.codecs.nuq)
    lib.kvtier_nuq_attend.argtypes = [p, i, i, i, i, i, i, i, i, p, p, p, l, p, p, p, p, p, i]
    lib.kvtier_nuq_attend.restype = i
    # q, n_kv, rows, d, dim, stages, block, n_blocks, ptrs, strides, rope, rope_hs, book_k,
    # book_v, m, l, o, threads (kvtier.kv.codecs.vq)
    lib.kvtier_vq_attend.argtypes = [p, i, i, i, i, i, i, i, p, p, p, l, p, p, p, p, p, i]
    lib.kvtier_vq_attend.restype = i
    # q, n_kv, rows, d, bits, group, block, n_blocks, rotate, channel_keys, ptrs, strides, rope,
    # rope_hs, inv, mean, vinv, m, l, o, threads (kvtier.kv.codecs.rotatekv)
    lib.kvtier_rotatekv_attend.argtypes = [p, i, i, i, i, i, i, i, i, i, p, p, p, l, p, p, p, p, p, p, i]
    lib.kvtier_rotatekv_attend.restype = i
    # q, n_kv, rows, d, bits, eblock, block, n_blocks, ptrs, strides, elut, slut, m, l, o, threads
    # (kvtier.kv.codecs.blockscaled)
    lib.kvtier_blockscaled_attend.argtypes = [p, i, i, i, i, i, i, i, p, p, p, p, p, p, p, i]
    lib.kvtier_blockscaled_attend.restype = i
    # the same arguments but q, m, l, o and threads -> a job for batched.c's SPAN parts (or NULL),
    # and the span function of each
    jobs = {"blockscaled": [i, i, i, i, i, i, i, p, p, p, p], "lowrank": [i, i, i, i, i, i, i, p, p],
            "ovp": [i, i, i, i, i, p, p, p], "sparse": [i, i, i, i, i, i, i, p, p],
            "rotatekv": [i, i, i, i, i, i, i, i, i, p, p, p, l, p, p, p],
            "nuq": [i, i, i, i, i, i, i, i, p, p, p, l, p, p],
            "vq": [i, i, i, i, i, i, i, p, p, p, l, p, p]}
    for name, args in jobs.items():
        getattr(lib, f"kvtier_{name}_job").argtypes = args
        getattr(lib, f"kvtier_{name}_job").restype = p
        getattr(lib, f"kvtier_{name}_span").restype = p
    lib.kvtier_job_free.argtypes = [p]
    # q, n_kv, rows, d, bits, rank, block, n_blocks, ptrs, strides, m, l, o, threads (kvtier.kv.codecs.lowrank)
    lib.kvtier_lowrank_attend.argtypes = [p, i, i, i, i, i, i, i, p, p, p, p, p, i]
    lib.kvtier_lowrank_attend.restype = i
    # q, n_kv, rows, d, block, n_blocks, ptrs, strides, pairs, m, l, o, threads (kvtier.kv.codecs.ovp)
    lib.kvtier_ovp_attend.argtypes = [p, i, i, i, i, i, p, p, p, p, p, p, i]
    lib.kvtier_ovp_attend.restype = i
    # q, n_kv, rows, d, nnz, bf16, block, n_blocks, ptrs, strides, m, l, o, threads (kvtier.kv.codecs.sparse)
    lib.kvtier_sparse_attend.argtypes = [p, i, i, i, i, i, i, i, p, p, p, p, p, i]
    lib.kvtier_sparse_attend.restype = i
    # x, M, K, codes, d, m, N, bits, y, threads (kvtier.weights.quant)
    lib.kvtier_qmatmul.argtypes = [p, l, l, p, p, p, l, i, p, i]
    lib.kvtier_qmatmul.restype = i
    lib.kvtier_qmatmul_bf16.argtypes = [p, l, l, p, p, p, l, i, p, i]
    lib.kvtier_qmatmul_bf16.restype = i
    # q, q head stride, q row stride, k, v, Hq, Hkv, T, N, D, q_start, k_start, window, scale, out,
    # threads (kvtier.attention.blockwise)
    lib.kvtier_prefill_attend.argtypes = [p, l, l, p, p, i, i, l, l, i, l, l, l, ctypes.c_float, p, i]
    lib.kvtier_prefill_attend.restype = i
    # x, x is bf16, M, K, packed codes, ws, wsum, z, inv_s, bias, N, y, threads (kvtier.weights.w8a8)
    lib.kvtier_w8a8_matmul.argtypes = [p, i, l, l, p, p, p, p, p, p, l, p, i]
    lib.kvtier_w8a8_matmul.restype = i
    # x, x is bf16, M, K, codes, d, m, N, qmax, keep, n_out, out_idx, wout, bias, y, threads (kvtier.weights.w4a)
    lib.kvtier_w4a_matmul.argtypes = [p, i, l, l, p, p, p, l, ctypes.c_float, p, l, p, p, p, p, i]
    lib.kvtier_w4a_matmul.restype = i
    # packed codes, ws, inv_s, N, K, out, threads
    lib.kvtier_w8a8_dequant_bf16.argtypes = [p, p, p, l, l, p, i]
    lib.kvtier_w8a8_dequant_bf16.restype = i
    # codes, d, m, N, K, bits, out, threads
    lib.kvtier_qdequant.argtypes = [p, p, p, l, l, i, p, i]
    lib.kvtier_qdequant.restype = i
    lib.kvtier_qdequant_bf16.argtypes = [p, p, p, l, l, i, p, i]
    lib.kvtier_qdequant_bf16.restype = i
    # x, x row stride, delta, its row stride, sum, its row stride, N, C, w, eps, offset, bf16, y,
    # y row stride, threads
    lib.kvtier_rms_norm.argtypes = [p, l, p, l, p, l, l, l, p, ctypes.c_float, ctypes.c_float, i, p, l, i]
    lib.kvtier_rms_norm.restype = i
    # gate|up, N, F, bf16, out, threads
    lib.kvtier_silu_mul.argtypes = [p, l, l, i, p, i]
    lib.kvtier_silu_mul.restype = i
    # k, k head stride, k token stride, v and its strides, bf16, h, n, B, D, bits, group,
    # k codes, k scale, k zero, v codes, v scale, v zero, threads
    lib.kvtier_int_encode.argtypes = [p, l, l, p, l, l, i, l, l, l, l, i, i, p, p, p, p, p, p, i]
    lib.kvtier_int_encode.restype = i
    # k codes, k scale, k zero, v codes, v scale, v zero, their head strides (k, k scale/zero, v,
    # v scale/zero), h, n, B, D, bits, group, bf16, k out, v out, threads
    lib.kvtier_int_decode.argtypes = [p, p, p, p, p, p, l, l, l, l, l, l, l, l, i, i, i, p, p, i]
    lib.kvtier_int_decode.restype = i
    # k, v, k's head and row strides, v's, entries, source rows, k and v destinations,
    # destination head stride, H, D, bytes an element
    lib.kvtier_copy_rows.argtypes = [p, p, l, l, l, l, l, p, p, p, l, l, l, i]
    lib.kvtier_copy_rows.restype = i
    # x, A, R, C, strides of A and R, bf16, threads
    lib.kvtier_all_finite.argtypes = [p, l, l, l, l, l, i, i]
    lib.kvtier_all_finite.restype = i
    # x, x row stride, N, H, D, cos, sin, table row stride, bf16, out, threads
    lib.kvtier_rope.argtypes = [p, l, l, l, l, p, p, l, i, p, i]
    lib.kvtier_rope.restype = i
    # block, x, delta, M, cos, sin, table row stride, s, qkv, q, k, threads (kernels/block.c)
    lib.kvtier_block_in.argtypes = [p, p, p, l, p, p, l, p, p, p, p, i]
    lib.kvtier_block_in.restype = i
    # block, o, s, M, s2, delta, threads
    lib.kvtier_block_out.argtypes = [p, p, p, l, p, p, i]
    lib.kvtier_block_out.restype = i


def int_encode(k: torch.Tensor, v: torch.Tensor, bits: int, group: int) -> dict[str, torch.Tensor] | None:
    """The ``int`` codec's fields for blocks ``k, v (Hkv, n, B, D)`` (bf16 or fp32), the same
    bytes as :meth:`kvtier.kv.codecs.intq.Int.encode`'s PyTorch path; None when the kernel is
    unavailable or does not take these sizes or dtypes."""
    lib = library()
    if lib is None or k.device.type != "cpu" or k.dtype not in (torch.bfloat16, torch.float32) or v.dtype != k.dtype:
        return None
    h, n, b, d = k.shape
    if bits not in (2, 4, 8) or d % group or d > 4096:
        return None
    k, v = _token_rows(k), _token_rows(v)  # (h, n*B, D) views: no copy of the model's rows
    mb = d * bits // 8
    out = {"k": torch.empty((h, n, mb, b), dtype=torch.uint8),
           "k_scale": torch.empty((h, n, d), dtype=torch.float16), "k_zero": torch.empty((h, n, d), dtype=torch.float16),
           "v": torch.empty((h, n, b, mb), dtype=torch.uint8),
           "v_scale": torch.empty((h, n, b, d // group), dtype=torch.float16),
           "v_zero": torch.empty((h, n, b, d // group), dtype=torch.float16)}
    rc = lib.kvtier_int_encode(k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0), v.stride(1),
                               int(k.dtype == torch.bfloat16), h, n, b, d, bits, group,
                               *(out[f].data_ptr() for f in ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")),
                               torch.get_num_threads())
    return out if rc == 0 else None


def int_decode(data: dict[str, torch.Tensor], bits: int, group: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """k, v ``(Hkv, n * B, D)`` in ``dtype`` (bf16 or fp32) from a run of ``int`` blocks' fields
    ``{field: (Hkv, n, ...)}`` (rows contiguous within a head), the numbers of
    :meth:`kvtier.kv.codecs.intq.Int.decode`'s PyTorch path; None where the kernel does not take them."""
    lib = library()
    k, v = data["k"], data["v"]
    if lib is None or k.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return None
    h, n, b, _ = v.shape
    d = data["k_scale"].shape[-1]
    names = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")
    if (any(not _rows_contiguous(data[f]) for f in names) or data["k_scale"].stride(0) != data["k_zero"].stride(0)
            or data["v_scale"].stride(0) != data["v_zero"].stride(0)):
        return None
    ko, vo = torch.empty((h, n * b, d), dtype=dtype), torch.empty((h, n * b, d), dtype=dtype)
    rc = lib.kvtier_int_decode(*(data[f].data_ptr() for f in names), k.stride(0), data["k_scale"].stride(0),
                               v.stride(0), data["v_scale"].stride(0), h, n, b, d, bits, group,
                               int(dtype == torch.bfloat16), ko.data_ptr(), vo.data_ptr(), torch.get_num_threads())
    return (ko, vo) if rc == 0 else None


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """Blocks ``(h, n, B, D)`` as rows ``(h, n*B, D)`` with D contiguous: a view when the
    layout allows (a slice of the model's packed rows), else a copy."""
    if x.stride(-1) == 1 and x.stride(1) == x.stride(2) * x.shape[2]:
        return x.as_strided((x.shape[0], x.shape[1] * x.shape[2], x.shape[3]), (x.stride(0), x.stride(2), 1))
    return x.contiguous().flatten(1, 2)


def all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no NaN or Inf: one read of the rows in the native kernel (``x`` of 3
    or 4 dims, rows of the last dim contiguous, bf16 or fp32), else ``torch.isfinite``."""
    lib = library()
    if lib is not None and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and x.dim() in (3, 4):
        rows = _token_rows(x) if x.dim() == 4 else x
        if rows.stride(-1) == 1:
            return bool(lib.kvtier_all_finite(rows.data_ptr(), rows.shape[0], rows.shape[1], rows.shape[2],
                                              rows.stride(0), rows.stride(1), int(x.dtype == torch.bfloat16),
                                              torch.get_num_threads()))
    return bool(torch.isfinite(x).all())


def int_attend(q: torch.Tensor, data: dict[str, torch.Tensor], bits: int, group: int):
    """Softmax pieces of pre-scaled queries ``q (Hkv, R, D)`` over packed ``int`` blocks.

    ``data`` holds the codec's fields for a run of blocks, ``{field: (Hkv, n, ...)}`` (a view
    of the pool: rows contiguous within a head). Returns ``m, l (Hkv, R, 1)``, ``o (Hkv, R, D)``
    in fp32, or None when the kernel is unavailable or does not handle these sizes.
    """
    lib = library()
    if lib is None or q.device.type != "cpu":
        return None
    k, v = data["k"], data["v"]
    h, n, b, _ = v.shape  # values are token-major (Hkv, n, B, packed)
    names = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")
    if any(not _rows_contiguous(data[f]) for f in names):
        return None
    r, d = q.shape[1], q.shape[2]
    q = q.float().contiguous()
    m = torch.empty((h, r, 1))
    l = torch.empty((h, r, 1))
    o = torch.empty((h, r, d))
    rc = lib.kvtier_int_attend(
        q.data_ptr(), h, r, d, bits, group, b, n,
        *(data[f].data_ptr() for f in names),
        k.stride(0), data["k_scale"].stride(0), v.stride(0), data["v_scale"].stride(0),
        m.data_ptr(), l.data_ptr(), o.data_ptr(), torch.get_num_threads())
    return (m, l, o) if rc == 0 else None


NUQ_FIELDS = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero", "k_oi", "k_od", "v_oi", "v_od")


def nuq_attend(q: torch.Tensor, data: dict[str, torch.Tensor], rope: torch.Tensor, lut_k: torch.Tensor,
               lut_v: torch.Tensor, bits: int, group: int):
    """Softmax pieces of pre-scaled queries ``q (Hkv, R, D)`` over a run of ``nuq`` blocks whose
    keys are rotated by ``rope`` (unit cos/sin ``(N, 2, D)``, or ``(Hkv, N, 2, D)`` per head)
    inside the kernel (see nuqattn.c). Returns ``m, l (Hkv, R, 1)``, ``o (Hkv, R, D)`` fp32, or
    None when the kernel is unavailable or does not handle these sizes."""
    lib = library()
    if lib is None or q.device.type != "cpu":
        return None
    h, n, b, _ = data["v"].shape
    present = [f for f in NUQ_FIELDS if f in data]
    if any(not _rows_contiguous(data[f]) for f in present) or rope.dtype != torch.float32:
        return None
    rope, rope_hs = _rope_rows(rope)
    r, d = q.shape[1], q.shape[2]
    q = q.float().contiguous()
    lut_k, lut_v = lut_k.float().contiguous(), lut_v.float().contiguous()
    ptrs = (ctypes.c_void_p * 10)(*[data[f].data_ptr() if f in data else None for f in NUQ_FIELDS])
    strides = (ctypes.c_long * 10)(*[data[f].stride(0) if f in data else 0 for f in NUQ_FIELDS])
    n_out = data["k_oi"].shape[-1] if "k_oi" in data else 0
    m, l, o = torch.empty((h, r, 1)), torch.empty((h, r, 1)), torch.empty((h, r, d))
    rc = lib.kvtier_nuq_attend(q.data_ptr(), h, r, d, bits, group, b, n, n_out, ptrs, strides,
                               rope.data_ptr(), rope_hs, lut_k.data_ptr(), lut_v.data_ptr(),
                               m.data_ptr(), l.data_ptr(), o.data_ptr(), torch.get_num_threads())
    return (m, l, o) if rc == 0 else None


VQ_FIELDS = ("k", "k_scale", "v", "v_scale")


def nuq_job(data: dict[str, torch.Tensor], rope: torch.Tensor, lut_k: torch.Tensor, lut_v: torch.Tensor,
            bits: int, group: int, rows: int) -> SpanJob | None:
    """:func:`nuq_attend`'s run as a :class:`SpanJob` for ``rows`` query rows per KV head."""
    if rope.dtype != torch.float32 or rope.device.type != "cpu":
        return None
    rope, rope_hs = _rope_rows(rope)
    lut_k, lut_v = lut_k.float().contiguous(), lut_v.float().contiguous()
    h, n, b, packed = data["v"].shape
    n_out = data["k_oi"].shape[-1] if "k_oi" in data else 0
    return _span_job("nuq", [data.get(f) for f in NUQ_FIELDS], (h, rows, packed * 8 // bits, bits, group, b, n, n_out),
                     (rope.data_ptr(), rope_hs, lut_k.data_ptr(), lut_v.data_ptr()), (rope, lut_k, lut_v))


def vq_attend(q: torch.Tensor, data: dict[str, torch.Tensor], rope: torch.Tensor, k_book: torch.Tensor,
              v_book: torch.Tensor, dim: int, stages: int):
    """Softmax pieces of pre-scaled queries ``q (Hkv, R, D)`` over a run of ``vq`` blocks
    (codebooks ``(D / dim, stages, 256, dim)`` fp16) whose keys are rotated by ``rope`` inside
    the kernel (see vqattn.c). Returns ``m, l (Hkv, R, 1)``, ``o (Hkv, R, D)`` fp32, or None
    when the kernel is unavailable or does not handle these sizes."""
    lib = library()
    if lib is None or q.device.type != "cpu" or k_book.dtype != torch.float16 or v_book.dtype != torch.float16:
        return None
    h, n, b, _ = data["v"].shape
    if any(not _rows_contiguous(data[f]) for f in VQ_FIELDS) or rope.dtype != torch.float32:
        return None
    rope, rope_hs = _rope_rows(rope)
    r, d = q.shape[1], q.shape[2]
    q = q.float().contiguous()
    k_book, v_book = k_book.contiguous(), v_book.contiguous()
    ptrs = (ctypes.c_void_p * 4)(*[data[f].data_ptr() for f in VQ_FIELDS])
    strides = (ctypes.c_long * 4)(*[data[f].stride(0) for f in VQ_FIELDS])
    m, l, o = torch.empty((h, r, 1)), torch.empty((h, r, 1)), torch.empty((h, r, d))
    rc = lib.kvtier_vq_attend(q.data_ptr(), h, r, d, dim, stages, b, n, ptrs, strides, rope.data_ptr(), rope_hs,
                              k_book.data_ptr(), v_book.data_ptr(), m.data_ptr(), l.data_ptr(), o.data_ptr(),
                              torch.get_num_threads())
    return (m, l, o) if rc == 0 else None


def vq_job(data: dict[str, torch.Tensor], rope: torch.Tensor, k_book: torch.Tensor, v_book: torch.Tensor,
           dim: int, stages: int, rows: int) -> SpanJob | None:
    """:func:`vq_attend`'s run as a :class:`SpanJob` for ``rows`` query rows per KV head (None
    also for sizes whose codebooks the kernel would copy to fp32: see vqattn.c)."""
    if (rope.dtype != torch.float32 or rope.device.type != "cpu" or k_book.dtype != torch.float16
            or v_book.dtype != torch.float16):
        return None
    rope, rope_hs = _rope_rows(rope)
    k_book, v_book = k_book.contiguous(), v_book.contiguous()
    h, n, b, _ = data["v"].shape
    d = k_book.shape[0] * k_book.shape[-1]  # (D / dim, stages, 256, dim)
    return _span_job("vq", [data[f] for f in VQ_FIELDS], (h, rows, d, dim, stages, b, n),
                     (rope.data_ptr(), rope_hs, k_book.data_ptr(), v_book.data_ptr()), (rope, k_book, v_book))


class SpanJob:
    """A run of a codec's blocks as the batched decode kernel's SPAN part (batched.c): the
    codec's span function and its job, freed with this object, and what the job points into,
    kept alive as long. ``q_turn`` and ``o_turn``, when not None, are ``(Hkv, D, D)`` fp32: the
    codec attends in a turned head space (a rotation, a channel order), the query's rows
    times ``q_turn[h]`` going in and the output's times ``o_turn[h]`` coming back."""

    def __init__(self, span: int, job: int, keep: tuple):
        self.span, self.job, self.keep = span, job, keep
        self.q_turn: torch.Tensor | None = None
        self.o_turn: torch.Tensor | None = None
        weakref.finalize(self, library().kvtier_job_free, job)

    def turned(self, q_turn: torch.Tensor, o_turn: torch.Tensor) -> SpanJob:
        self.q_turn, self.o_turn = (t.float().contiguous() for t in (q_turn, o_turn))
        return self


def _field_arrays(fields: list[torch.Tensor | None]):
    """The fields' pointers and head strides as C arrays, or None when a field's rows are not
    contiguous within a head. ``fields`` (None: absent) ``(Hkv, n, ...)``."""
    if any(f is not None and not _rows_contiguous(f) for f in fields):
        return None
    ptrs = (ctypes.c_void_p * len(fields))(*[None if f is None else f.data_ptr() for f in fields])
    strides = (ctypes.c_long * len(fields))(*[0 if f is None else f.stride(0) for f in fields])
    return ptrs, strides


def _span_job(name: str, fields: list[torch.Tensor | None], before: tuple, after: tuple = (),
              keep: tuple = ()) -> SpanJob | None:
    """A :class:`SpanJob` from ``kvtier_<name>_job(*before, ptrs, strides, *after)``, or None when
    the kernels are unavailable, a field is not on the CPU or not contiguous within a head, or
    the kernel does not handle these sizes. ``keep``: what else the job points to."""
    lib = library()
    if lib is None or any(f is not None and f.device.type != "cpu" for f in fields):
        return None
    arrays = _field_arrays(fields)
    if arrays is None:
        return None
    job = getattr(lib, f"kvtier_{name}_job")(*before, *arrays, *after)
    if not job:
        return None
    return SpanJob(getattr(lib, f"kvtier_{name}_span")(), job, (fields, arrays, *keep))


def blockscaled_job(fields: list[torch.Tensor | None], elut: torch.Tensor, slut: torch.Tensor, bits: int,
                    eblock: int, rows: int) -> SpanJob | None:
    """:func:`blockscaled_attend`'s run as a :class:`SpanJob` for ``rows`` query rows per KV head."""
    h, n, b, packed = fields[3].shape
    return _span_job("blockscaled", fields, (h, rows, packed * 8 // bits, bits, eblock, b, n),
                     (elut.data_ptr(), slut.data_ptr()), (elut, slut))


def lowrank_job(data: dict[str, torch.Tensor], bits: int, rank: int, rows: int) -> SpanJob | None:
    """:func:`lowrank_attend`'s run as a :class:`SpanJob` for ``rows`` query rows per KV head."""
    h, n, b, packed = data["v_q"].shape
    return _span_job("lowrank", [data[f] for f in LOWRANK_FIELDS],
                     (h, rows, packed * 8 // bits, bits, rank, b, n))


def ovp_job(data: dict[str, torch.Tensor], pairs: torch.Tensor, rows: int) -> SpanJob | None:
    """:func:`ovp_attend`'s run as a :class:`SpanJob` for ``rows`` query rows per KV head."""
    h, n, b, half = data["v"].shape
    pairs = pairs.float().contiguous()
    return _span_job("ovp", [data[f] for f in OVP_FIELDS], (h, rows, 2 * half, b, n),
                     (pairs.data_ptr(),), (pairs,))


def sparse_job(data: dict[str, torch.Tensor], rows: int) -> SpanJob | None:
    """:func:`sparse_attend`'s run as a :class:`SpanJob` for ``rows`` query rows per KV head."""
    if data["k_val"].dtype not in (torch.float16, torch.bfloat16):
        return None
    h, n, b, nnz = data["v_val"].shape
    return _span_job("sparse", [data[f] for f in SPARSE_FIELDS],
                     (h, rows, data["k_map"].shape[-1] * 8, nnz, int(data["k_val"].dtype == torch.bfloat16), b, n))


def _fields_for(q: torch.Tensor, fields: list[torch.Tensor | None]):
    """What every kernel on codes is handed: ``(q fp32 contiguous, field pointers, head strides,
    (m, l, o) to fill)``, or None when the kernels are unavailable, the query is not on the CPU
    or a field's rows are not contiguous within a head. ``fields`` (None: absent) ``(Hkv, n, ...)``."""
    if library() is None or q.device.type != "cpu":
        return None
    arrays = _field_arrays(fields)
    if arrays is None:
        return None
    h, r, d = q.shape
    ptrs, strides = arrays
    pieces = torch.empty((h, r, 1)), torch.empty((h, r, 1)), torch.empty((h, r, d))
    return q.float().contiguous(), ptrs, strides, pieces


ROTATEKV_FIELDS = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")


def rotatekv_attend(q: torch.Tensor, data: dict[str, torch.Tensor], rope: torch.Tensor, inv: torch.Tensor | None,
                    mean: torch.Tensor | None, bits: int, group: int, rotate: int, channel_keys: bool,
                    vinv: torch.Tensor | None = None):
    """Softmax pieces of pre-scaled queries ``q (Hkv, R, D)`` over a run of ``rotatekv`` blocks
    (keys before RoPE, rotated across heads): ``inv`` ``(Hkv * D,)`` int32 is the rotated
    position of each channel (None: no reordering), ``mean`` ``(Hkv, D)`` fp32 the key means
    added back (None: not centred), ``vinv`` ``(Hkv * D,)`` int32 each value channel's position
    in its head's stored order (None: values not reordered); the keys are rotated by ``rope``
    inside the kernel (see rkvattn.c). Returns ``m, l (Hkv, R, 1)``, ``o (Hkv, R, D)`` fp32, or None when the kernel is
    unavailable or does not handle these sizes."""
    got = _fields_for(q, [data[f] for f in ROTATEKV_FIELDS]) if rope.dtype == torch.float32 else None
    if got is None:
        return None
    q, ptrs, strides, (m, l, o) = got
    (h, r, d), (_, n, b, _) = q.shape, data["v"].shape
    rope, rope_hs = _rope_rows(rope)
    rc = library().kvtier_rotatekv_attend(
        q.data_ptr(), h, r, d, bits, group, b, n, rotate, int(channel_keys), ptrs, strides, rope.data_ptr(), rope_hs,
        None if inv is None else inv.data_ptr(), None if mean is None else mean.data_ptr(),
        None if vinv is None else vinv.data_ptr(), m.data_ptr(), l.data_ptr(), o.data_ptr(), torch.get_num_threads())
    return (m, l, o) if rc == 0 else None


def rotatekv_job(data: dict[str, torch.Tensor], rope: torch.Tensor, inv: torch.Tensor | None,
                 mean: torch.Tensor | None, bits: int, group: int, rotate: int, channel_keys: bool,
                 vinv: torch.Tensor | None, rows: int) -> SpanJob | None:
    """:func:`rotatekv_attend`'s run as a :class:`SpanJob` for ``rows`` query rows per KV head;
    None also when its heads are not apart (a rotation or the key order spans heads: the kernel
    then decodes all heads of a token at once, which one head's task cannot)."""
    if rope.dtype != torch.float32 or any(t is not None and t.device.type != "cpu" for t in (rope, inv, mean, vinv)):
        return None
    rope, rope_hs = _rope_rows(rope)
    h, n, b, packed = data["v"].shape
    ptr = lambda t: None if t is None else t.data_ptr()
    return _span_job("rotatekv", [data[f] for f in ROTATEKV_FIELDS],
                     (h, rows, packed * 8 // bits, bits, group, b, n, rotate, int(channel_keys)),
                     (rope.data_ptr(), rope_hs, ptr(inv), ptr(mean), ptr(vinv)), (rope, inv, mean, vinv))


def blockscaled_attend(q: torch.Tensor, fields: list[torch.Tensor | None], elut: torch.Tensor, slut: torch.Tensor,
                       bits: int, eblock: int):
    """Softmax pieces of pre-scaled queries ``q (Hkv, R, D)`` over a run of blocks whose elements
    share a scale per token and ``eblock`` channels (the MX/NV formats, ``bfp``): ``fields``
    are the key codes, scale bytes and tensor scale (or None), then the same for values, each
    ``(Hkv, n, ...)``. An element is ``elut[code] * slut[scale byte]`` (times the tensor scale),
    see bsattn.c. Returns ``m, l (Hkv, R, 1)``, ``o (Hkv, R, D)`` fp32, or None when the kernel
    is unavailable or does not handle these sizes."""
    got = _fields_for(q, fields)
    if got is None:
        return None
    q, ptrs, strides, (m, l, o) = got
    (h, r, d), (_, n, b, _) = q.shape, fields[3].shape
    rc = library().kvtier_blockscaled_attend(q.data_ptr(), h, r, d, bits, eblock, b, n, ptrs, strides,
                                             elut.data_ptr(), slut.data_ptr(), m.data_ptr(), l.data_ptr(),
                                             o.data_ptr(), torch.get_num_threads())
    return (m, l, o) if rc == 0 else None


LOWRANK_FIELDS = tuple(f"{x}_{f}" for x in "kv" for f in ("q", "scale", "zero", "left", "right"))


def lowrank_attend(q: torch.Tensor, data: dict[str, torch.Tensor], bits: int, rank: int):
    """Softmax pieces of pre-scaled queries ``q (Hkv, R, D)`` over a run of ``lowrank`` blocks,
    the low-rank part applied to the query and the output instead of the blocks (see
    lrattn.c). Returns ``m, l (Hkv, R, 1)``, ``o (Hkv, R, D)`` fp32, or None when the kernel
    is unavailable or does not handle these sizes."""
    got = _fields_for(q, [data[f] for f in LOWRANK_FIELDS])
    if got is None:
        return None
    q, ptrs, strides, (m, l, o) = got
    (h, r, d), (_, n, b, _) = q.shape, data["v_q"].shape
    rc = library().kvtier_lowrank_attend(q.data_ptr(), h, r, d, bits, rank, b, n, ptrs, strides, m.data_ptr(),
                                         l.data_ptr(), o.data_ptr(), torch.get_num_threads())
    return (m, l, o) if rc == 0 else None


OVP_FIELDS = ("k", "k_scale", "k_centre", "v", "v_scale")


def ovp_attend(q: torch.Tensor, data: dict[str, torch.Tensor], pairs: torch.Tensor):
    """Softmax pieces of pre-scaled queries ``q (Hkv, R, D)`` over a run of ``ovp`` blocks;
    ``pairs`` ``(256, 2)`` fp32 is the two steps each pair byte stands for (see ovpattn.c).
    Returns ``m, l (Hkv, R, 1)``, ``o (Hkv, R, D)`` fp32, or None when the kernel is
    unavailable or does not handle these sizes."""
    got = _fields_for(q, [data[f] for f in OVP_FIELDS])
    if got is None:
        return None
    q, ptrs, strides, (m, l, o) = got
    (h, r, d), (_, n, b, _) = q.shape, data["v"].shape
    pairs = pairs.float().contiguous()
    rc = library().kvtier_ovp_attend(q.data_ptr(), h, r, d, b, n, ptrs, strides, pairs.data_ptr(), m.data_ptr(),
                                     l.data_ptr(), o.data_ptr(), torch.get_num_threads())
    return (m, l, o) if rc == 0 else None


SPARSE_FIELDS = ("k_map", "k_val", "v_map", "v_val")


def sparse_attend(q: torch.Tensor, data: dict[str, torch.Tensor]):
    """Softmax pieces of pre-scaled queries ``q (Hkv, R, D)`` over a run of ``sparse`` blocks,
    each row's bitmap walked into the kept channels (see spattn.c). Returns ``m, l (Hkv, R, 1)``,
    ``o (Hkv, R, D)`` fp32, or None when the kernel is unavailable or does not handle these sizes."""
    if data["k_val"].dtype not in (torch.float16, torch.bfloat16):
        return None
    got = _fields_for(q, [data[f] for f in SPARSE_FIELDS])
    if got is None:
        return None
    q, ptrs, strides, (m, l, o) = got
    (h, r, d), (_, n, b, nnz) = q.shape, data["v_val"].shape
    rc = library().kvtier_sparse_attend(q.data_ptr(), h, r, d, nnz, int(data["k_val"].dtype == torch.bfloat16), b,
                                        n, ptrs, strides, m.data_ptr(), l.data_ptr(), o.data_ptr(),
                                        torch.get_num_threads())
    return (m, l, o) if rc == 0 else None


def _rope_rows(rope: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Unit cos/sin rows as the kernels read them: contiguous, and their head stride (0: one
    set of rows shared by every head, ``(N, 2, D)``; else ``(Hkv, N, 2, D)``)."""
    rope = rope.contiguous()
    return rope, (rope.stride(0) if rope.dim() == 4 else 0)


def _rows_contiguous(t: torch.Tensor) -> bool:
    """Contiguous within each head (the head stride may be larger: a view of the pool)."""
    return t[0].is_contiguous()


def qmatmul(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None,
            bits: int) -> torch.Tensor | None:
    """``x (M, K) @ W^T`` (fp32, or bf16 in and out) for group-quantized ``W (N, K)`` kept packed (see qmatmul.c):
    codes ``(N, K/2)`` uint8 (4-bit) or ``(N, K)`` int8, d and m ``(N, K/32)`` fp16. Returns
    ``(M, N)``, or None when the kernel is unavailable or does not handle these sizes."""
    lib = library()
    if lib is None or x.device.type != "cpu":
        return None
    call = lib.kvtier_qmatmul_bf16 if x.dtype == torch.bfloat16 else lib.kvtier_qmatmul
    x = x.contiguous() if x.dtype == torch.bfloat16 else x.float().contiguous()
    n, k = d.shape[0], x.shape[1]
    y = torch.empty((x.shape[0], n), dtype=x.dtype)
    rc = call(x.data_ptr(), x.shape[0], k, codes.data_ptr(), d.data_ptr(),
              None if m is None else m.data_ptr(), n, bits, y.data_ptr(), torch.get_num_threads())
    return y if rc == 0 else None


class _QMat(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("bits", ctypes.c_int64)]


class _Block(ctypes.Structure):
    _fields_ = [("norm_in", ctypes.c_void_p), ("norm_post", ctypes.c_void_p), ("eps", ctypes.c_double),
                ("offset", ctypes.c_double), ("c", ctypes.c_int64), ("hq", ctypes.c_int64), ("hkv", ctypes.c_int64),
                ("d", ctypes.c_int64), ("f", ctypes.c_int64), ("qkv", _QMat), ("o", _QMat), ("gate_up", _QMat),
                ("down", _QMat)]


class Block:
    """A Llama-family layer's work around its attention in two native calls (see block.c), for
    bf16 rows whose matrices are all group-quantized (:class:`kvtier.weights.quant.GroupQuant`
    fields: ``codes, d, m, bits``, ``W (N, K)``): :meth:`enter` before attention, :meth:`leave`
    after. Each returns None, having kept nothing, where the tensors are not the ones it takes;
    the caller then runs the same steps one by one (the same numbers)."""

    def __init__(self, norm_in: torch.Tensor, norm_post: torch.Tensor, eps: float, offset: float,
                 heads: tuple[int, int, int], qkv, o, gate_up, down):
        hq, hkv, d = heads
        self.c, self.nq, self.hq, self.hkv, self.d = o.shape[0], qkv.shape[0], hq, hkv, d
        self.keep = (norm_in, norm_post, qkv, o, gate_up, down)  # what the struct points into
        mats = [_QMat(w.codes.data_ptr(), w.d.data_ptr(), None if w.m is None else w.m.data_ptr(), *w.shape, w.bits)
                for w in (qkv, o, gate_up, down)]
        self.fields = _Block(norm_in.data_ptr(), norm_post.data_ptr(), eps, offset, self.c, hq, hkv, d,
                             down.shape[1], *mats)
        self.ptr = ctypes.addressof(self.fields)

    def enter(self, x: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor):
        """``x, delta (M, C)`` (the residual stream and the previous layer's output, not yet
        added; None in the first layer), ``cos, sin (M, 1, D)``: ``(s, q, k, v)``, the stream
        ``x + delta`` and the new tokens' RoPE'd queries ``(M, Hq, D)``, keys and values
        ``(M, Hkv, D)``; or None."""
        lib = library()
        m = x.shape[0]
        if (lib is None or x.dtype != torch.bfloat16 or not x.is_contiguous() or x.shape[1] != self.c
                or (delta is not None and (delta.dtype != x.dtype or delta.shape != x.shape or not delta.is_contiguous()))
                or cos.dtype != x.dtype or sin.dtype != x.dtype or cos.shape[0] != m or cos.stride(2) != 1
                or sin.stride(2) != 1 or cos.stride(0) != sin.stride(0)):
            return None
        s = x if delta is None else torch.empty_like(x)
        qkv = torch.empty((m, self.nq), dtype=x.dtype)
        q = torch.empty((m, self.hq, self.d), dtype=x.dtype)
        k = torch.empty((m, self.hkv, self.d), dtype=x.dtype)
        rc = lib.kvtier_block_in(self.ptr, x.data_ptr(), None if delta is None else delta.data_ptr(), m, cos.data_ptr(),
                                 sin.data_ptr(), cos.stride(0), s.data_ptr(), qkv.data_ptr(), q.data_ptr(), k.data_ptr(),
                                 torch.get_num_threads())
        if rc != 0:
            return None
        return s, q, k, qkv[:, (self.hq + self.hkv) * self.d:].view(m, self.hkv, self.d)

    def leave(self, o: torch.Tensor, s: torch.Tensor):
        """``o (M, Hq * D)`` the attention's output, ``s`` the stream :meth:`enter` returned:
        ``(s', delta)``, the stream with the output projection added and the MLP's output on
        its norm (not yet added); or None."""
        lib = library()
        if lib is None or o.dtype != torch.bfloat16 or o.dim() != 2 or o.shape[1] != self.hq * self.d:
            return None
        o = o.contiguous()
        s2, delta = torch.empty_like(s), torch.empty_like(s)
        rc = lib.kvtier_block_out(self.ptr, o.data_ptr(), s.data_ptr(), o.shape[0], s2.data_ptr(), delta.data_ptr(),
                                  torch.get_num_threads())
        return (s2, delta) if rc == 0 else None


def w8a8_matmul(x: torch.Tensor, packed: torch.Tensor, ws: torch.Tensor, wsum: torch.Tensor, z: torch.Tensor,
                inv_s: torch.Tensor, bias: torch.Tensor) -> torch.Tensor | None:
    """``x (M, K)`` (bf16 or fp32) times int8 weights with int8 activations (see w8a8.c and
    :class:`kvtier.weights.w8a8.W8A8Linear`): ``(M, N)`` in x's dtype, N = ``bias``'s length;
    None: no kernel, or a CPU without AMX int8 or AVX512-VNNI."""
    lib = library()
    if lib is None or x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32):
        return None
    x = x.contiguous()
    m, n = x.shape[0], bias.shape[0]
    y = torch.empty((m, n), dtype=x.dtype)
    rc = lib.kvtier_w8a8_matmul(x.data_ptr(), int(x.dtype == torch.bfloat16), m, x.shape[1], packed.data_ptr(),
                                ws.data_ptr(), wsum.data_ptr(), z.data_ptr(), inv_s.data_ptr(), bias.data_ptr(),
                                n, y.data_ptr(), torch.get_num_threads())
    return y if rc == 0 else None


def w4a_matmul(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, qmax: float,
               keep: torch.Tensor, out_idx: torch.Tensor, wout: torch.Tensor,
               bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``x (M, K)`` (bf16 or fp32) times 4-bit Q4_1 weights with integer activations, quantized per
    group of 32 inputs to ``qmax`` (7 or 127) (see w4a.c and :class:`kvtier.weights.w4a.W4ALinear`):
    codes, d, m in the one-weight-row-per-lane layout (``kvtier.weights.w4a._lanes``), N = ``n``:
    ``(M, N)`` in x's dtype; None: no kernel, or a CPU without AVX512-VNNI."""
    lib = library()
    if lib is None or x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32):
        return None
    x = x.contiguous()
    rows = x.shape[0]
    y = torch.empty((rows, n), dtype=x.dtype)
    rc = lib.kvtier_w4a_matmul(x.data_ptr(), int(x.dtype == torch.bfloat16), rows, x.shape[1], codes.data_ptr(), d.data_ptr(),
              m.data_ptr(), n, qmax, keep.data_ptr(), out_idx.numel(), out_idx.data_ptr(), wout.data_ptr(),
              None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y if rc == 0 else None


def w8a8_dequant(packed: torch.Tensor, ws: torch.Tensor, inv_s: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """The ``(N, K)`` weights :func:`w8a8_matmul` multiplies (``W' / s``, its tile-packed codes
    times their scales) as bf16, rounded once; None: no kernel (a CPU without AVX512-BF16)."""
    lib = library()
    if lib is None or packed.device.type != "cpu":
        return None
    out = torch.empty((n, k), dtype=torch.bfloat16)
    rc = lib.kvtier_w8a8_dequant_bf16(packed.data_ptr(), ws.data_ptr(), inv_s.data_ptr(), n, k, out.data_ptr(),
                                      torch.get_num_threads())
    return out if rc == 0 else None


def qdequant(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, bits: int, k: int,
             dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The ``(N, K)`` weight of :func:`qmatmul`'s packed fields in fp32, or in bf16 (rounded
    once, from the fp32 values) where the CPU has AVX512-BF16; None: no kernel."""
    lib = library()
    if lib is None or codes.device.type != "cpu":
        return None
    bf16 = dtype == torch.bfloat16
    out = torch.empty((d.shape[0], k), dtype=torch.bfloat16 if bf16 else torch.float32)
    call = lib.kvtier_qdequant_bf16 if bf16 else lib.kvtier_qdequant
    rc = call(codes.data_ptr(), d.data_ptr(), None if m is None else m.data_ptr(),
              d.shape[0], k, bits, out.data_ptr(), torch.get_num_threads())
    if rc != 0 and bf16:
        wide = qdequant(codes, d, m, bits, k)
        return None if wide is None else wide.to(dtype)
    return out if rc == 0 else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor | None:
    """RMSNorm of the rows of ``x (N, C)`` (bf16 or fp32, last dim contiguous) in one pass,
    fp32 arithmetic, ``weight (C,)`` fp32 (see pointwise.c); None: no kernel for it."""
    out = _rms_norm(x, None, weight, eps, offset)
    return None if out is None else out[1]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x + delta, rms_norm(x + delta))`` in one pass over the rows, the sum rounded to the
    dtype first as torch's add rounds it; None: no kernel for these tensors."""
    if delta.dtype != x.dtype or delta.shape != x.shape or delta.device != x.device:
        return None
    return _rms_norm(x, delta, weight, eps, offset)


def _rms_norm(x, delta, weight, eps, offset):
    lib = library()
    if (lib is None or x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float32) or x.device.type != "cpu"
            or x.stride(-1) != 1 or weight.dtype != torch.float32 or not weight.is_contiguous()
            or (delta is not None and delta.stride(-1) != 1)):
        return None
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = None if delta is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    rc = lib.kvtier_rms_norm(x.data_ptr(), x.stride(0), None if delta is None else delta.data_ptr(),
                             0 if delta is None else delta.stride(0), None if s is None else s.data_ptr(),
                             0 if s is None else s.stride(0), x.shape[0], x.shape[1], weight.data_ptr(), eps, offset,
                             int(x.dtype == torch.bfloat16), y.data_ptr(), y.stride(0), torch.get_num_threads())
    return (s, y) if rc == 0 else None


def copy_rows(k: torch.Tensor, v: torch.Tensor, rows: list[int], dst_k: list[int], dst_v: list[int],
              dst_head_stride: int) -> bool:
    """Copy token ``rows[i]`` of ``k, v (H, N, D)`` (each with D contiguous) to the ``(H, D)`` slices
    at addresses ``dst_k[i], dst_v[i]`` (heads ``dst_head_stride`` elements apart, same dtype):
    one call for a decode step's new tokens of every sequence. False, having copied nothing,
    when the kernel is unavailable or the layouts differ from these."""
    lib = library()
    if (lib is None or k.device.type != "cpu" or k.dtype != v.dtype or k.shape != v.shape or k.stride(2) != 1
            or v.stride(2) != 1 or k.element_size() not in (2, 4)):
        return False
    n = len(rows)
    addr = array.array("q", rows + dst_k + dst_v)
    base = addr.buffer_info()[0]
    rc = lib.kvtier_copy_rows(k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), v.stride(0), v.stride(1), n,
                              base, base + 8 * n, base + 16 * n,  # rows, dst_k, dst_v in one int64 buffer
                              dst_head_stride, k.shape[0], k.shape[2], k.element_size())
    return rc == 0


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """RoPE (rotate-half) of ``x (N, H, D)`` with ``cos, sin (N, 1, D)``: the numbers
    :class:`kvtier.models.base.Rope`'s PyTorch ops give, in one pass; None when the kernel is
    unavailable or the layout is not one it reads (heads contiguous in a row, rows strided)."""
    lib = library()
    if (lib is None or x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32)
            or cos.dtype != x.dtype or sin.dtype != x.dtype or x.dim() != 3):
        return None
    n, h, d = x.shape
    if (x.stride(2) != 1 or x.stride(1) != d or cos.stride(2) != 1 or sin.stride(2) != 1
            or cos.stride(0) != sin.stride(0) or cos.shape[0] != n or sin.shape[0] != n):
        return None
    out = torch.empty((n, h, d), dtype=x.dtype)
    rc = lib.kvtier_rope(x.data_ptr(), x.stride(0), n, h, d, cos.data_ptr(), sin.data_ptr(), cos.stride(0),
                         int(x.dtype == torch.bfloat16), out.data_ptr(), torch.get_num_threads())
    return out if rc == 0 else None


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` for ``gate_up (N, 2F)`` (the fused projection's output, bf16 or fp32,
    contiguous) in one pass; None: no kernel for it."""
    lib = library()
    if (lib is None or gate_up.dim() != 2 or gate_up.dtype not in (torch.bfloat16, torch.float32)
            or gate_up.device.type != "cpu" or not gate_up.is_contiguous() or gate_up.shape[1] % 2):
        return None
    n, f = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((n, f), dtype=gate_up.dtype)
    rc = lib.kvtier_silu_mul(gate_up.data_ptr(), n, f, int(gate_up.dtype == torch.bfloat16), out.data_ptr(),
                             torch.get_num_threads())
    return out if rc == 0 else None


def prefill_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int,
                   scale: float, window: int | None) -> torch.Tensor | None:
    """Causal (optionally windowed) attention of a chunk of bf16 queries ``q (Hq, T, D)`` at
    positions ``q_start ...`` over keys and values ``(Hkv, N, D)`` at ``k_start ...`` (see
    prefill.c). Returns ``(Hq, T, D)`` bf16, or None: no kernel, no AVX512-BF16 on this CPU, or a
    head size that is not a multiple of 64."""
    lib = library()
    hq, t, d = q.shape
    if (not prefill_available() or q.dtype != torch.bfloat16 or q.device.type != "cpu" or d % 64
            or q.stride(-1) != 1 or q.stride(0) % 2 or q.stride(1) % 2 or q.data_ptr() % 4):
        return None
    k, v = k.to(torch.bfloat16).contiguous(), v.to(torch.bfloat16).contiguous()
    out = torch.empty((hq, t, d), dtype=torch.bfloat16)
    rc = lib.kvtier_prefill_attend(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), hq,
                                   k.shape[0], t, k.shape[1], d, q_start, k_start, window or 0, scale,
                                   out.data_ptr(), torch.get_num_threads())
    return out if rc == 0 else None


@functools.cache
def prefill_available() -> bool:
    """Whether :func:`prefill_attend` runs here (the kernels built, and the CPU has AVX512-BF16)."""
    lib = library()
    if lib is None:
        return False
    q, kv = torch.zeros(1, 1, 64, dtype=torch.bfloat16), torch.zeros(1, 1, 64, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    return lib.kvtier_prefill_attend(q.data_ptr(), 64, 64, kv.data_ptr(), kv.data_ptr(), 1, 1, 1, 1, 64, 0, 0, 0,
                                     1.0, out.data_ptr(), 1) == 0
