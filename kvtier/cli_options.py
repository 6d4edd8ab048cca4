"""CLI flags built from config dataclasses, so a flag's default, help and bounds are the
field's (:mod:`kvtier.config`) and are written once."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def flags(*classes: type, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """typer parameters for every CLI field of ``classes`` (``str | None`` stays optional)."""
    out = []
    for cls in classes:
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if "help" not in meta or not meta["cli"] or f.name in skip:
                continue
            base = str(f.type).split("|")[0].strip()
            if base not in _TYPES:
                continue
            kind = _TYPES[base]
            optional = "None" in str(f.type)
            help_text = meta["help"]
            if meta["choices"]:
                help_text += f" ({'|'.join(map(str, meta['choices']))})"
            names = [meta["flag"]] if meta["flag"] else []
            opt = typer.Option(*names, help=help_text, min=meta["min"] if kind is not bool else None,
                               max=meta["max"] if kind is not bool else None)
            annotation = Annotated[kind | None if optional else kind, opt]
            out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                         default=f.default, annotation=annotation))
    return out


def command(params: list[inspect.Parameter], body: Callable[..., Any]) -> Callable[..., Any]:
    """A function typer can register whose signature is ``params``; it calls ``body(**kwargs)``."""
    def run(**kwargs):
        return body(**kwargs)

    run.__signature__ = inspect.Signature(params)
    run.__doc__ = body.__doc__
    return run


def split(kwargs: dict, *classes: type) -> list:
    """Instances of ``classes`` from the flat CLI keyword arguments (each takes its fields)."""
    out = []
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}
        out.append(cls(**{k: v for k, v in kwargs.items() if k in names}))
    return out
