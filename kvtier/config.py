"""Configuration, defined once: the engine, the sampling of one request, the server.

Each field has a default, a one-line help and its bounds (``option(...)``, like a method's
``param``); :func:`check` validates an instance against them, and the CLI builds its flags from
the fields (:func:`kvtier.cli_options.flags`), so no default is written twice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from kvtier.errors import KvtierError

DEFAULT_MODEL = "smollm2-135m"
BLOCK_SIZE = 64  # tokens per KV block
MAX_NEW_TOKENS = 128


def option(default: Any, help: str, min: float | None = None, max: float | None = None,
           choices: tuple | None = None, flag: str | None = None, cli: bool = True) -> Any:
    """A config field: default, one-line help, bounds. ``flag``: the CLI name when it differs
    from ``--field-name``; ``cli=False``: not offered as a flag."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "flag": flag, "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def check(obj: Any, what: str = "") -> None:
    """Raise :class:`KvtierError` for a field outside its bounds, a non-finite number or a
    value of the wrong type (``2.5`` where an integer is expected)."""
    for f in dataclasses.fields(obj):
        if "help" not in f.metadata:
            continue
        value, meta = getattr(obj, f.name), f.metadata
        name = f"{what}{f.name}"
        if value is None:
            continue
        kind = {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type).split("|")[0].strip())
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
                object.__setattr__(obj, f.name, value)
            else:
                raise KvtierError(f"{name} must be an integer, got {value!r}")
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise KvtierError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise KvtierError(f"{name} must be a finite number, got {value!r}")
        if kind is bool and not isinstance(value, bool):
            raise KvtierError(f"{name} must be true or false, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise KvtierError(f"{name} must be a string, got {value!r}")
        if meta["choices"] and value not in meta["choices"]:
            raise KvtierError(f"{name}={value!r} is not one of {', '.join(map(str, meta['choices']))}")
        if meta["min"] is not None and value < meta["min"]:
            raise KvtierError(f"{name}={value!r} is below its minimum {meta['min']}")
        if meta["max"] is not None and value > meta["max"]:
            raise KvtierError(f"{name}={value!r} is above its maximum {meta['max']}")


@dataclass
class EngineConfig:
    """The model, its cache and how the scheduler fills each step."""

    model: str = option(DEFAULT_MODEL, "named model (smollm2-135m, gemma3-270m), HF folder or .gguf file",
                        flag="--model")
    kv: str = option("dense", "KV cache spec, see `kvtier methods`")
    dtype: str = option("auto", "compute dtype: auto (bf16 where the CPU/GPU has native bf16), fp32, bf16",
                        choices=("auto", "fp32", "bf16"))
    # the names are kvtier.weights' registry, checked there when the model loads
    weights: str = option("dense", "weight format: dense (the compute dtype), q8 (8-bit groups, GGUF Q8_0 "
                          "layout), q4 (4-bit groups, GGUF Q4_1; a GGUF's own Q4 tensors used as they "
                          "are), w8a8 (int8 weights x int8 activations, OutlierTune), w4a8 or w4a4 (q4's "
                          "weights x 8- or 4-bit activations, summed in int32), multiplied packed")
    tiers: str | None = option(None, "where KV blocks may live, fastest first, with byte budgets, e.g. "
                               "cpu:2GiB,disk:/path:50GiB (default: all in RAM)")
    attend: str = option("local", "with --tiers: local, fetch, split[:SHARE] or auto (the cost model picks)")
    prefetch: bool = option(False, "with a disk tier: read the next layer's blocks ahead")
    block_size: int = option(BLOCK_SIZE, "tokens per KV block", min=8, max=1024)
    max_batched_tokens: int = option(2048, "tokens per forward step: decode tokens first, then prefill chunks",
                                     min=1, max=1 << 20)
    max_seqs: int = option(64, "sequences running at once (decoding or in prefill)", min=1, max=4096)
    kv_budget: str | None = option(None, "bytes the running sequences' KV caches and the prefix cache may "
                                   "hold, e.g. 512MiB; a sequence is admitted when its prompt fits, "
                                   "the lowest-priority one is preempted when decoding outgrows it "
                                   "(default: no limit)")
    prefix_cache: bool = option(True, "reuse the encoded blocks of a prompt prefix seen before")
    prefill_share: float = option(1.0, "share of a step's token budget prefill chunks may take once decode "
                                  "tokens are scheduled (with SLO targets this is the starting point)",
                                  min=0.05, max=1.0)
    ttft_slo: float | None = option(None, "time-to-first-token target in seconds (p90): the prefill share "
                                    "adapts to meet it and --tpot-slo")
    tpot_slo: float | None = option(None, "time-per-output-token target in seconds (p90 over requests of each "
                                    "one's mean time between tokens): prefill chunks are cut to the time "
                                    "the decoding requests can spare")
    skip_layers: float = option(0.0, "share of the middle layers to skip (layer skipping: faster, "
                                "less accurate)", min=0.0, max=0.9)


@dataclass
class SamplingParams:
    """How one request's tokens are chosen, and when it stops."""

    max_tokens: int = option(MAX_NEW_TOKENS, "tokens to generate at most", min=1, max=1 << 20)
    temperature: float = option(0.0, "0 = greedy", min=0.0, max=100.0)
    top_p: float = option(1.0, "nucleus sampling mass, above 0 and at most 1", max=1.0)
    top_k: int = option(0, "sample among the k likeliest tokens (0 = all)", min=0, max=1 << 20)
    min_p: float = option(0.0, "drop tokens below this fraction of the likeliest one's probability",
                          min=0.0, max=1.0)
    presence_penalty: float = option(0.0, "subtracted from the logit of every token already generated",
                                     min=-2.0, max=2.0)
    frequency_penalty: float = option(0.0, "subtracted per occurrence of a token already generated",
                                      min=-2.0, max=2.0)
    seed: int | None = option(None, "sampling seed (default: 0 offline, random in the server)")
    stop: list = option([], "strings that end the text (not included in it)")
    logprobs: int | None = option(None, "return the sampled token's log-probability and this many "
                                  "alternatives", min=0, max=20)
    ignore_eos: bool = option(False, "keep generating past the end-of-sequence token")

    def __post_init__(self):
        check(self)
        if self.top_p <= 0:
            raise KvtierError(f"top_p={self.top_p!r} must be above 0 (and at most 1)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise KvtierError("stop must be a non-empty string or a list of them")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class ServerConfig:
    """The HTTP server in front of the engine."""

    host: str = option("127.0.0.1", "address to bind (anything but loopback needs --api-key)")
    port: int = option(8000, "port", min=0, max=65535)
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on every /v1 route")
    allowed_kv: str | None = option(None, "cache specs a request may name in its 'kv' field, separated by "
                                    "';' (default: only the server's --kv)")
    max_queued: int = option(256, "requests waiting beyond the running ones; more get 429", min=0,
                             max=1 << 20)
    max_request_tokens: int = option(4096, "largest max_tokens a request may ask for", min=1, max=1 << 20)
    max_body_bytes: int = option(4 << 20, "largest request body in bytes", min=1024, max=1 << 30)
    read_timeout: float = option(30.0, "seconds a client may take to send its request", min=0.1, max=3600)
    cache: str | None = option(None, "a file from `kvtier cache save` loaded into the prefix cache at start",
                               flag="--cache")


@dataclass
class ClusterConfig:
    """More than one engine: replicas on a Ray cluster behind one endpoint (``kvtier[ray]``)."""

    ray: bool = option(False, "serve with --replicas engine replicas on Ray Serve behind this endpoint")
    replicas: int = option(2, "with --ray: engine replicas", min=1, max=1024)
    replica_cpus: float = option(1.0, "with --ray: CPUs each replica reserves; its torch threads are this, "
                                 "rounded up", min=0.1, max=1024)
    routing: str = option("prefix", "with --ray: prefix (to the replica holding the longest cached prefix "
                          "of the prompt, the least loaded when loads are uneven) or round-robin",
                          choices=("prefix", "round-robin"))
    ray_address: str | None = option(None, "with --ray: the Ray cluster to join (default: RAY_ADDRESS, else "
                                     "a new one on this machine)")


@dataclass
class PlanConfig:
    """What `kvtier plan` predicts: one decode step (or prefill chunk) of a model with a cache
    spec, weight format and tier layout, on a machine's measured or described hardware."""

    model: str = option(DEFAULT_MODEL, "a model kvtier can load (its config only) or a named shape: "
                        "llama3-8b, llama3-70b", flag="--model")
    context: int = option(8192, "tokens in each sequence's cache", min=1, max=1 << 24)
    batch: int = option(1, "sequences decoding together", min=1, max=1 << 16)
    kv: str = option("dense", "KV cache spec (a codec; see `kvtier methods`)")
    weights: str = option("dense", "weight format: dense, q8 or q4", choices=("dense", "q8", "q4"))
    dtype: str = option("bf16", "compute dtype", choices=("fp32", "bf16"))
    tiers: str | None = option(None, "tier layout as --tiers takes it, e.g. cpu:64MiB,disk:/path:50GiB "
                               "(default: all in the compute device's memory)")
    attend: str = option("auto", "with --tiers: auto (choose per tier), local, fetch or split[:SHARE]")
    page_cache: str = option("warm", "a disk tier's pages: warm (in the page cache) or cold",
                             choices=("warm", "cold"))
    phase: str = option("decode", "plan a decode step or one prefill chunk", choices=("decode", "prefill"))
    chunk: int = option(2048, "prefill chunk tokens (with --phase prefill)", min=1, max=1 << 20)
    hardware: str = option("this", "this (the probe's cache, else the shipped file for this CPU class), "
                           "a shipped file (cpu-2core, h200, pim-gpt, duplex-logic-pim) or a TOML path")
    probe: bool = option(False, "measure this machine (about a minute) and cache it as --hardware this")
    tier_folder: str | None = option(None, "with --probe: the disk tier folder to measure (default: the "
                                     "temporary folder)")
    validate: bool = option(False, "predict every row of the bench JSON files given as arguments and "
                            "compare with what was measured")
    kv_budget: str | None = option(None, "choose the codec: the cheapest whose KV fits this many bytes "
                                   "(e.g. 64MiB) within --ppl-bound")
    ppl_bound: float = option(3.0, "with --kv-budget: the largest PPL increase allowed, in percent",
                              min=0.0, max=1000.0)
    ppl: str | None = option(None, "with --kv-budget: a `kvtier bench ppl --json` file (default: the "
                             "table shipped with kvtier, SmolLM2 at 8K)")
    slo_tpot: float | None = option(None, "find the largest batch whose decode step meets this time per "
                                    "output token, in milliseconds", min=0.001, max=1e6)
    machines: int | None = option(None, "simulate a sequence's KV split over this many machines "
                                  "(DistAttention; default: the hardware file's count)", min=1, max=4096)
    json: str | None = option(None, "write the plan (or the validation) as JSON here", flag="--json")
    plot: str | None = option(None, "write a roofline PNG here", flag="--plot")

    def __post_init__(self):
        check(self)
