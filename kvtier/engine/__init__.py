"""The engine: sequences, the scheduler, the prefix cache, the model runner and the sampler."""

from kvtier.engine.engine import Engine
from kvtier.engine.runner import ModelRunner
from kvtier.engine.sampler import Sampler, sample
from kvtier.engine.scheduler import Scheduler
from kvtier.engine.sequence import Sequence, Status

__all__ = ["Engine", "ModelRunner", "Sampler", "Scheduler", "Sequence", "Status", "sample"]
