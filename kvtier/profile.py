"""Where a forward's time goes: a few named timers a model fills while one is attached
(``model.profile = Profile()``); with none attached the model pays one ``is None`` test."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager


class Profile:
    """Seconds spent per part, summed over every call while attached. Parts may nest (the
    KV store's time is inside attention's); :meth:`split` reports each exclusive of its parts."""

    PARTS = ("weight matmuls", "attention", "kv store (codec encode)")
    INSIDE = {"kv store (codec encode)": "attention"}

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def time(self, part: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - t0

    def split(self, total: float) -> dict[str, float]:
        """Exclusive seconds per part, plus the rest of ``total`` (Python and framework)."""
        out = dict(self.seconds)
        for inner, outer in self.INSIDE.items():
            if inner in out and outer in out:
                out[outer] -= out[inner]
        out["python, framework, sampling"] = total - sum(self.seconds[p] for p in self.seconds
                                                         if p not in self.INSIDE)
        return out
