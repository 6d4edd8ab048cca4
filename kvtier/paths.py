"""Where kvtier keeps what it computes once: converted weights, prepared text."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$KVTIER_CACHE`` or ``$XDG_CACHE_HOME/kvtier`` or ``~/.cache/kvtier``, plus ``parts``."""
    root = os.environ.get("KVTIER_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvtier"
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
