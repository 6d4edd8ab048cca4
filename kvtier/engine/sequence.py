"""One request's state as the engine moves it: waiting, running, finished."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from kvtier.config import SamplingParams
from kvtier.kv.cache import SeqKV
from kvtier.kv.persist import Prefix


class Status(enum.Enum):
    WAITING = "waiting"    # not admitted yet, or preempted (its cache freed: it is recomputed)
    SWAPPED = "swapped"    # preempted with its blocks moved down a tier; resumes where it was
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Timing:
    """Wall-clock times (``time.perf_counter``) of a request's phases."""

    arrival: float = field(default_factory=time.perf_counter)
    scheduled: float | None = None     # first admitted
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    prefill_s: float = 0.0             # time spent in steps that fed its prompt

    @property
    def queue_s(self) -> float:
        return (self.scheduled or self.arrival) - self.arrival


@dataclass(eq=False)
class Sequence:
    """Token ids (prompt then output), sampling parameters, status, its cache and timings.

    ``n_computed`` tokens of ``ids`` are in the cache; the rest are fed at the next steps (the
    prompt in chunks, then one sampled token per step)."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    kv: str                            # canonical cache spec (chooses the runner)
    priority: int = 0                  # lower is more important (vLLM's convention)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    cache: SeqKV | None = None
    n_computed: int = 0
    n_cached: int = 0                  # prompt tokens taken from the prefix cache
    finish_reason: str | None = None   # "stop", "length", "abort" or "error"
    error: str | None = None
    text: str = ""                     # the output decoded so far (stop strings cut off)
    logprobs: list = field(default_factory=list)
    timing: Timing = field(default_factory=Timing)
    generator: torch.Generator = field(default_factory=torch.Generator)
    kv_bytes: int = 0                  # what the cache held when the sequence last ran
    kv_tokens: int = 0
    kv_bytes_by_tier: list[int] | None = None
    n_preempted: int = 0
    prefix: Prefix | None = None       # a saved cache the prompt continues
    exception: Exception | None = None  # why it failed (``error`` is its message)
    offloaded: int = 0                 # bytes swapped down a tier at a preemption
    shared: int = 0                    # bytes of its blocks read from the prefix cache's shared pools
    suspect: int = 0                   # forwards that raised with this sequence in them
    offsets: tuple[int, int] = (0, 0)  # detokenizer window over output_ids
    request_id: str | None = None      # the HTTP request it answers (a request of n>1 has n sequences)
    emitted: int = 0                   # output tokens already handed to the server
    _shown: int = 0                    # characters of ``text`` already handed out

    def __post_init__(self):
        self.generator.manual_seed(0 if self.params.seed is None else self.params.seed)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def n_pending(self) -> int:
        """Tokens to feed before the next token can be sampled."""
        return len(self.prompt_ids) + len(self.output_ids) - self.n_computed

    @property
    def prefilling(self) -> bool:
        return self.n_pending > 1 or self.n_computed < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

