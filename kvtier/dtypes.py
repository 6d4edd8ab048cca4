"""Names of the floating-point types users pick, and the compute type kvtier runs in."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from kvtier.errors import KvtierError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPUTE = ("auto", "fp32", "bf16")


@functools.cache
def _cpu_has_bf16() -> bool:
    """Native bf16 matmul (AVX512-BF16 or AMX); without it bf16 is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """``auto`` is bf16 on a CUDA device or a CPU with native bf16 matmul, else fp32."""
    if name not in COMPUTE:
        raise KvtierError(f"--dtype {name}: use one of {', '.join(COMPUTE)}")
    if name == "auto":
        native = torch.cuda.is_bf16_supported() if str(device).startswith("cuda") else _cpu_has_bf16()
        return torch.bfloat16 if native else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]
