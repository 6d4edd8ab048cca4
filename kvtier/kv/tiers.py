"""Tier specs: where KV blocks may live and how many bytes each place may hold.

``"cpu:2GiB,disk:/mnt/nvme/kv:50GiB"`` (plus ``gpu:...`` first when CUDA is there): fastest
tier first. ``ray:SIZE`` holds blocks on another node of a Ray cluster (:mod:`kvtier.kv.remote`). A last ``recompute`` tier holds nothing: blocks pushed down to it are dropped and
their keys/values recomputed from the sequence's token ids when attention needs them (ALISA's
cache-vs-recompute trade). The first tier is the memory of the device the model computes on; a block is
sealed there and moves down, in its encoded form, when that tier is over its budget.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kvtier.errors import KvtierError

UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3,
         "gb": 1000 ** 3, "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1 << 10, "mib": 1 << 20,
         "gib": 1 << 30, "tib": 1 << 40}
ORDER = ("gpu", "cpu", "disk", "ray", "recompute")  # fastest first; recompute: dropped, rebuilt from token ids
UNLIMITED = 1 << 62
ATTEND = ("local", "fetch", "split", "auto")  # auto: the cost model picks per tier (kvtier.plan)
SHARE = 0.6  # split: the share of each lower tier's blocks fetched (the rest attended in place)


def parse_attend(text: str) -> tuple[str, float]:
    """``local``, ``fetch``, ``split``, ``split:0.6`` or ``auto`` -> (mode, share of lower-tier
    blocks fetched; for ``auto`` 0 until the cost model has chosen)."""
    mode, _, share = text.partition(":")
    if mode not in ATTEND or (share and mode != "split"):
        raise KvtierError(f"attend={text!r}: use local, fetch, split[:SHARE] (e.g. split:0.6) or auto")
    if not share:
        return mode, SHARE if mode == "split" else float(mode == "fetch")
    try:
        value = float(share)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise KvtierError(f"attend={text!r}: the split share is a number from 0 to 1, e.g. split:0.6")
    return mode, value


def parse_size(text: str) -> int:
    """``"16MiB"``, ``"2GiB"``, ``"500MB"``, ``"1.5GiB"`` or a plain byte count -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise KvtierError(f"cannot read the size {text!r}: write e.g. 16MiB, 2GiB, 500MB or a byte count")
    size = int(float(m.group(1)) * UNITS[m.group(2).lower()])
    if size <= 0:
        raise KvtierError(f"the size {text!r} must be positive")
    return size


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass(frozen=True)
class Tier:
    """One place blocks live: ``kind`` gpu / cpu / disk / ray, a byte ``budget``, a ``path`` for disk."""

    kind: str
    budget: int
    path: str | None = None

    @property
    def device(self) -> torch.device:
        """Where this tier's attention runs (disk blocks are memory-mapped and read by the CPU;
        the query of a ray: block's attention leaves from the CPU)."""
        return torch.device("cuda") if self.kind == "gpu" else torch.device("cpu")

    def __str__(self) -> str:
        if self.kind == "recompute":
            return "recompute"
        size = _short_size(self.budget)
        return f"disk:{self.path}:{size}" if self.kind == "disk" else f"{self.kind}:{size}"


def _short_size(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n % k == 0:
            return f"{n // k}{unit}"
    return str(n)


def parse(text: str, compute: torch.device | str = "cpu", need_device: bool = True) -> list[Tier]:
    """Parse a tier spec; the first tier must be the compute device's memory. ``need_device``:
    a gpu tier needs CUDA here (False when only planning for another machine: ``kvtier plan``)."""
    compute = torch.device(compute)
    tiers = []
    for item in (s.strip() for s in text.split(",")):
        kind, _, rest = item.partition(":")
        kind = kind.strip().lower()
        if kind not in ORDER:
            raise KvtierError(f"unknown tier {item!r} in --tiers {text!r}: use gpu:SIZE, cpu:SIZE, "
                              "disk:PATH:SIZE, ray:SIZE or recompute (last)")
        if kind == "recompute":
            if rest:
                raise KvtierError(f"the recompute tier takes no size (it holds no bytes): write recompute, not {item!r}")
            tiers.append(Tier(kind, UNLIMITED))
        elif kind == "disk":
            path, _, size = rest.rpartition(":")
            if not path or not size:
                raise KvtierError(f"the disk tier {item!r} needs a folder and a size: disk:/path/to/dir:50GiB")
            tiers.append(Tier(kind, parse_size(size), str(Path(path).expanduser())))
        else:
            if not rest:
                raise KvtierError(f"the tier {item!r} needs a size, e.g. {kind}:2GiB")
            tiers.append(Tier(kind, parse_size(rest)))
    kinds = [t.kind for t in tiers]
    if len(set(kinds)) != len(kinds) or kinds != sorted(kinds, key=ORDER.index):
        raise KvtierError(f"--tiers {text!r}: name each tier once, fastest first (gpu, cpu, disk, ray, recompute)")
    first = "gpu" if compute.type == "cuda" else "cpu"
    if kinds[0] != first:
        raise KvtierError(f"--tiers {text!r}: the model computes on {compute.type}, so the first tier must be "
                          f"{first}:SIZE (where new blocks are written)")
    if need_device and "gpu" in kinds and not torch.cuda.is_available():
        raise KvtierError("--tiers names a gpu tier but CUDA is not available here; drop gpu:...")
    return tiers


def check_path(tier: Tier) -> Path:
    """The disk tier's folder, which must exist and be writable (checked before any work)."""
    path = Path(tier.path)
    if not path.is_dir():
        raise KvtierError(f"disk tier folder {path} does not exist; create it or pick another folder")
    try:  # a real write: permissions, read-only mounts and root all answer truthfully
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise KvtierError(f"disk tier folder {path} is not writable ({e.strerror}); pick a folder you can "
                          "write to") from e
    return path
