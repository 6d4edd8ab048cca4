"""Can a CPU attention and a pinned-memory->GPU copy run at the same time on this host?

Times, per decode-like step over bf16 K/V in pinned CPU memory: (a) the CPU attending S bytes
(torch's CPU flash kernel, 8 KV heads x 4 grouped queries, like Llama-3-8B), (b) copying C
bytes to the GPU asynchronously, (c) both issued together (copy first, then the CPU work, then
a synchronize). If (c) is close to max(a, b) the two overlap; close to a + b, they do not
(e.g. they share the host's memory bandwidth). Usage: python scripts/gpu_overlap.py
"""

import json
import statistics
import sys
import time

import torch

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def main():
    gib = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    n = int(gib * 2**30 / (2 * 8 * 128 * 2))  # tokens whose K+V (8 heads x 128, bf16) make `gib`
    k = torch.randn(8, n, 128, dtype=torch.bfloat16).pin_memory()
    v = torch.randn(8, n, 128, dtype=torch.bfloat16).pin_memory()
    q = torch.randn(1, 8, 4, 128, dtype=torch.bfloat16)
    dst = [torch.empty_like(k, device="cuda"), torch.empty_like(v, device="cuda")]

    def cpu():
        FLASH(q, k.unsqueeze(0), v.unsqueeze(0), 0.0, False, scale=1.0)

    def copy():
        dst[0].copy_(k, non_blocking=True)
        dst[1].copy_(v, non_blocking=True)

    def timed(fn, reps=5):
        out = []
        for _ in range(reps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            out.append(1000 * (time.perf_counter() - t0))
        return statistics.median(out[1:])

    a = timed(cpu)
    b = timed(copy)
    c = timed(lambda: (copy(), cpu()))
    row = {"gib_each": gib, "threads": torch.get_num_threads(), "cpu_attend_ms": a, "copy_ms": b,
           "both_ms": c, "sum_ms": a + b, "max_ms": max(a, b),
           "cpu_GBps": gib * 2**30 / a / 1e6, "copy_GBps": gib * 2**30 / b / 1e6}  # K+V = gib
    print(json.dumps(row))


if __name__ == "__main__":
    main()
