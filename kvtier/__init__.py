"""kvtier: run and serve long-context LLMs on the memory you have."""

import importlib

from kvtier.errors import KvtierError

__version__ = "0.1.0"
__all__ = ["LLM", "KvtierError", "__version__"]


def __getattr__(name):  # keep `import kvtier` light: torch and transformers load on first use
    if name == "hf":  # kvtier.hf.cache(spec, model): any spec as a transformers Cache
        return importlib.import_module("kvtier.hf")
    if name == "LLM":
        from kvtier.api import LLM
        return LLM
    raise AttributeError(name)
