"""What a machine can do, as the cost model needs it: one :class:`Hardware` per machine (or
cluster of identical machines), read from TOML or measured by :mod:`kvtier.plan.probe`.

Every rate is in bytes or FLOPs per second and every overhead in seconds. A device is a place
an operation can run: the host CPU, a GPU, or a memory-side processor (PIM) as the seed papers
describe one. A link is a copy between two devices' memories; the disk is read by the CPU.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvtier.errors import KvtierError

SHIPPED = Path(__file__).parent / "devices"  # hardware files shipped with kvtier
GB = 1e9


@dataclass
class Device:
    """One compute device and the memory it reads.

    mem_bw: read bandwidth of its memory (B/s) by thread count (``{1: .., 2: ..}``; a GPU or
    PIM has one entry, ``{0: ..}``). peak: dense FLOP/s by dtype (``fp32``, ``bf16``,
    ``int8``). gemv: achieved bytes/s of a weight matrix-vector product by weight format
    (``dense`` in the compute dtype, ``q8``, ``q4``), where measured; else mem_bw. attend:
    achieved bytes/s of kvtier's attention over held KV by kernel (``torch``: blocks decoded
    by PyTorch ops then attended; ``native``: the packed-code kernel), where measured.
    gemv_fixed / attend_fixed: the fixed seconds of one such call beyond its bytes (thread
    start-up, small-matrix inefficiency). launch: the fixed cost of one operation dispatched
    from Python (s).
    """

    kind: str  # cpu, gpu or pim
    mem_bw: dict[int, float]
    peak: dict[str, float]
    launch: float
    gemv: dict[str, float] = field(default_factory=dict)
    gemv_fixed: dict[str, float] = field(default_factory=dict)
    attend: dict[str, float] = field(default_factory=dict)
    attend_fixed: dict[str, float] = field(default_factory=dict)
    memory: float = 0.0  # bytes of memory it holds (0: not stated)
    note: str = ""

    def bandwidth(self, threads: int = 0) -> float:
        """Memory read bandwidth with ``threads`` threads (the nearest measured count at or
        below it; the largest when ``threads`` is 0)."""
        if not threads:
            return max(self.mem_bw.values())
        below = [t for t in self.mem_bw if t <= threads] or [min(self.mem_bw)]
        return self.mem_bw[max(below)]

    def flops(self, dtype: str) -> float:
        return self.peak.get(dtype) or self.peak.get("fp32") or max(self.peak.values())


@dataclass
class Link:
    """Copies from ``src``'s memory to ``dst``'s: bandwidth (B/s) pinned and pageable, and a
    fixed cost per copy (s)."""

    src: str
    dst: str
    pinned: float
    pageable: float
    latency: float = 10e-6


@dataclass
class Disk:
    """A tier folder read by the CPU: ``warm`` (in the page cache) and ``cold`` (from the
    device), B/s through memory-mapped page faults, as the disk tier reads a block (attention
    in place and a fetch's copy alike); ``cold_read``: B/s of large sequential ``read()`` calls
    of the evicted file, what a read-based fetch could reach (reported, not used by the model)."""

    warm: float
    cold: float
    cold_read: float = 0.0
    path: str = ""


@dataclass
class Hardware:
    """A machine: its devices by name (``cpu`` always), links, disk, and ``machines`` of them
    joined by ``network`` B/s (for the distributed simulation; 1 machine by default)."""

    name: str
    devices: dict[str, Device]
    links: list[Link] = field(default_factory=list)
    disk: Disk | None = None
    threads: int = 1  # CPU threads kvtier's runs use on this machine
    machines: int = 1
    network: float = 0.0  # B/s between machines
    network_latency: float = 20e-6
    source: str = ""  # how these numbers were obtained (probe, datasheet, paper)

    @property
    def cpu(self) -> Device:
        return self.devices["cpu"]

    @property
    def gpu(self) -> Device | None:
        return self.devices.get("gpu")

    def link(self, src: str, dst: str) -> Link:
        for li in self.links:
            if (li.src, li.dst) == (src, dst):
                return li
        raise KvtierError(f"hardware {self.name!r} has no link from {src} to {dst}")

    def compute(self) -> str:
        """The device the model computes on: the GPU when there is one."""
        return "gpu" if "gpu" in self.devices else "cpu"

    # --- TOML ---------------------------------------------------------------------------
    def to_toml(self) -> dict:
        def dev(d: Device) -> dict:
            out = asdict(d)
            out["mem_bw"] = {str(k): v for k, v in d.mem_bw.items()}
            return out

        out = {"name": self.name, "source": self.source, "threads": self.threads, "machines": self.machines,
               "network": self.network, "network_latency": self.network_latency,
               "devices": {k: dev(d) for k, d in self.devices.items()},
               "links": [asdict(li) for li in self.links]}
        if self.disk is not None:
            out["disk"] = asdict(self.disk)
        return out

    def save(self, path: Path) -> None:
        import tomli_w

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(self.to_toml()))

    @classmethod
    def from_toml(cls, data: dict, where: str = "hardware") -> Hardware:
        try:
            devices = {}
            for name, d in data["devices"].items():
                d = dict(d)
                d["mem_bw"] = {int(k): float(_rate(v)) for k, v in d["mem_bw"].items()}
                for key in ("peak", "gemv", "attend", "gemv_fixed", "attend_fixed"):
                    d[key] = {k: float(_rate(v)) for k, v in d.get(key, {}).items()}
                d["launch"] = float(d["launch"])
                devices[name] = Device(**d)
            if "cpu" not in devices:
                raise KvtierError(f"{where}: [devices.cpu] is missing (every machine has a host CPU)")
            links = [Link(**{k: _rate(v) if k in ("pinned", "pageable") else v for k, v in li.items()})
                     for li in data.get("links", [])]
            disk = data.get("disk")
            disk = Disk(**{k: _rate(v) if k != "path" else v for k, v in disk.items()}) if disk else None
            return cls(name=data.get("name", where), devices=devices, links=links, disk=disk,
                       threads=int(data.get("threads", 1)), machines=int(data.get("machines", 1)),
                       network=float(_rate(data.get("network", 0.0))),
                       network_latency=float(data.get("network_latency", 20e-6)), source=data.get("source", ""))
        except KvtierError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise KvtierError(f"{where}: not a kvtier hardware file ({type(e).__name__}: {e}); see "
                              f"{SHIPPED / 'h200.toml'} for the layout") from None


def _rate(v):
    """A number, or a string with a unit: ``"4.8 TB/s"``, ``"900 GFLOP/s"``, ``"12 GB/s"``."""
    if isinstance(v, (int, float)):
        return float(v)
    text = str(v).replace("/s", "").replace("FLOP", "").replace("B", "").strip()
    scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
    if text and text[-1] in scale:
        return float(text[:-1]) * scale[text[-1]]
    return float(text)


def probed_path() -> Path:
    """Where ``kvtier plan --probe`` caches this machine's measurement."""
    from kvtier.paths import cache_dir

    return cache_dir("plan") / "this.toml"


def shipped() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.toml"))


def load(name: str = "this") -> Hardware:
    """``this`` (the probe's cache; the shipped file for this CPU class until a probe ran),
    a shipped name (``h200``, ``pim-gpt``, ...) or a TOML file path."""
    if name == "this":
        path = probed_path()
        if not path.exists():
            path = SHIPPED / "cpu-2core.toml"
    elif (SHIPPED / f"{name}.toml").exists():
        path = SHIPPED / f"{name}.toml"
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise KvtierError(f"--hardware {name!r}: no such file, and not one of this, "
                              + ", ".join(shipped()))
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise KvtierError(f"--hardware {path}: cannot read it as TOML ({e})") from None
    return Hardware.from_toml(data, str(path))
