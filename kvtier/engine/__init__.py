"""Running a model over the KV store: the runner and the sampler."""

from kvtier.engine.runner import ModelRunner
from kvtier.engine.sampler import sample

__all__ = ["ModelRunner", "sample"]
