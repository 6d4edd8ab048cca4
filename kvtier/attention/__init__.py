"""Attention over a sequence's KV parts: a reference and the fast path tested against it."""

from kvtier.attention.blockwise import attend, merge, partial, reference

__all__ = ["attend", "merge", "partial", "reference"]
