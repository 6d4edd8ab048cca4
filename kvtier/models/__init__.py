"""Model families in plain PyTorch and their loading."""

from kvtier.models.loader import DEFAULT_MODEL, NAMED, load

__all__ = ["DEFAULT_MODEL", "NAMED", "load"]
