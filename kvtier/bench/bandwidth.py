"""This machine's memory read bandwidth, measured the way STREAM does: passes over a buffer far
larger than the caches, the median of several, with the threads kvtier decodes with.

A decode step reads every weight byte and every KV byte once; ``bytes read / step time`` as a
share of this number says how close a row is to what the memory allows."""

from __future__ import annotations

import statistics
import time

import torch

SIZE = 1 << 30  # 1 GiB: well past any last-level cache


def read_bandwidth(size: int = SIZE, repeats: int = 5) -> float:
    """Bytes per second of a read-only pass (a sum) over ``size`` bytes of fp32."""
    buf = torch.ones(size // 4)
    buf.sum()  # fault the pages in before timing
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return size / statistics.median(times)
