"""Codecs: one file per compression method, registered by name on import."""

from kvtier.kv.codecs.base import Codec
from kvtier.kv.codecs.dense import Dense
from kvtier.kv.codecs.intq import Int

__all__ = ["Codec", "Dense", "Int"]
