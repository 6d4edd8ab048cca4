"""Name registry for KV-cache methods: codecs and selectors.

A method is a dataclass whose fields are its parameters. Each field carries its help text
and its bounds in ``metadata``; the spec parser, ``kvtier methods`` and the test matrix all
read them from here, so a default is written once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_METHODS: dict[str, type] = {}


def param(default: Any, help: str, choices: tuple | None = None,
          min: float | None = None, max: float | None = None, quiet: bool = False) -> Any:
    """A method parameter: its default, a one-line help, and its allowed values. ``quiet``: left
    out of the spec's printed form while at its default (an option added later, so the names
    of earlier results stay the same)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "min": min, "max": max, "quiet": quiet})


def register(cls: type[T]) -> type[T]:
    """Class decorator: make a method available by its ``name`` in specs and the CLI."""
    name = cls.name  # type: ignore[attr-defined]
    assert name not in _METHODS, f"method {name!r} registered twice"
    _METHODS[name] = cls
    return cls


def methods() -> dict[str, type]:
    """All registered methods, by name (importing kvtier.kv registers the built-in ones)."""
    import kvtier.kv.codecs  # noqa: F401  (registers on import)
    import kvtier.kv.selectors  # noqa: F401
    return dict(sorted(_METHODS.items()))


def params(cls: type) -> list[dataclasses.Field]:
    """The fields declared with :func:`param` (other fields are a method's bound state)."""
    return [f for f in dataclasses.fields(cls) if f.init and "help" in f.metadata]


def describe(cls: type) -> str:
    """The first line of a method's docstring."""
    return (cls.__doc__ or "").strip().splitlines()[0]


def check(obj: Any, fail: Callable[[str], Exception]) -> None:
    """Validate a method instance's parameters against their declared bounds."""
    for f in params(type(obj)):
        value, meta = getattr(obj, f.name), f.metadata
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every < and >
            raise fail(f"{obj.name}: {f.name}={value} is not a finite number; give one "
                       + _range(meta, f.default))
        if meta.get("choices") and value not in meta["choices"]:
            raise fail(f"{obj.name}: {f.name}={value} is not one of "
                       + ", ".join(map(str, meta["choices"])))
        if meta.get("min") is not None and value < meta["min"]:
            raise fail(f"{obj.name}: {f.name}={value} is below its minimum {meta['min']}")
        if meta.get("max") is not None and value > meta["max"]:
            raise fail(f"{obj.name}: {f.name}={value} is above its maximum {meta['max']}")


def _range(meta: dict, default: Any) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"from {lo} to {hi}"
    if lo is not None or hi is not None:
        return f"of at least {lo}" if lo is not None else f"of at most {hi}"
    return f"such as {default}"
