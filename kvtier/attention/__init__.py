"""Attention over a sequence's KV parts: a reference and the fast path tested against it."""

from kvtier.attention.batched import decode, decode_held
from kvtier.attention.blockwise import attend, merge, partial, reference

__all__ = ["attend", "decode", "decode_held", "merge", "partial", "reference"]
