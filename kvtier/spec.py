"""Parse and print the one spec string that names a cache configuration.

Grammar::

    spec   := term ("+" term)*
    term   := name ["(" [arg ("," arg)*] ")"]
    arg    := ident "=" value

``parse("dense(dtype=fp16)")`` gives a :class:`CacheSpec`; ``str(spec)`` prints it in canonical
form (every parameter, in declared order), so ``parse(str(s)) == s`` and the canonical string
labels every benchmark row.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from kvtier import registry
from kvtier.errors import KvtierError

_TERM = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)


class SpecError(KvtierError):
    """A spec string that does not parse or names something unknown."""


@dataclass(frozen=True)
class CacheSpec:
    """A parsed cache configuration: zero or more selectors, then exactly one codec."""

    methods: tuple

    @property
    def codec(self):
        return self.methods[-1]

    @property
    def selectors(self) -> tuple:
        return self.methods[:-1]

    def __str__(self) -> str:
        return "+".join(format_method(m) for m in self.methods)


def format_method(m) -> str:
    args = ",".join(f"{f.name}={_format_value(getattr(m, f.name))}" for f in registry.params(type(m))
                    if not (f.metadata["quiet"] and getattr(m, f.name) == f.default))
    return f"{m.name}({args})"


def _format_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def parse(text: str | CacheSpec | None) -> CacheSpec:
    """Parse a spec string; ``None`` or an empty string means the default ``dense()``."""
    if isinstance(text, CacheSpec):
        return text
    known = registry.methods()
    if text is None or not text.strip():
        text = "dense"
    terms = _split_top(text, "+")
    methods = tuple(_parse_term(t, text, known) for t in terms)
    codecs = [m for m in methods if m.kind == "codec"]
    if not codecs:
        methods = methods + (known["dense"](),)
    elif len(codecs) > 1 or methods[-1].kind != "codec":
        raise SpecError(f"bad spec {text!r}: give at most one codec, last "
                        f"(e.g. 'snapkv(ratio=0.5)+int(bits=4)'); codecs here: "
                        + ", ".join(m.name for m in codecs))
    return CacheSpec(methods)


def _parse_term(term: str, whole: str, known: dict) -> object:
    m = _TERM.match(term)
    if not m:
        raise SpecError(f"cannot parse {term.strip()!r} in spec {whole!r}: "
                        "write name(param=value,...), e.g. dense(dtype=fp16)")
    name, body = m.group(1), m.group(2)
    if name not in known:
        raise SpecError(f"unknown method {name!r} in spec {whole!r}; valid methods: "
                        + ", ".join(known))
    cls = known[name]
    fields = {f.name: f for f in registry.params(cls)}
    kwargs = {}
    for arg in _split_top(body or "", ","):
        if not arg.strip():
            continue
        key, eq, raw = arg.partition("=")
        key = key.strip()
        if not eq or not raw.strip():
            raise SpecError(f"bad argument {arg.strip()!r} in {term.strip()!r}: write param=value")
        if key not in fields:
            raise SpecError(f"{name} has no parameter {key!r}; its parameters: "
                            + (", ".join(fields) or "none"))
        if key in kwargs:
            raise SpecError(f"{name}: parameter {key!r} is given twice in {term.strip()!r}; give it once")
        kwargs[key] = _coerce(raw.strip(), fields[key], name)
    obj = cls(**kwargs)
    registry.check(obj, SpecError)
    return obj


def _coerce(raw: str, f: dataclasses.Field, method: str):
    kind = type(f.default)
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise SpecError(f"{method}: {f.name}={raw!r} is not a valid {kind.__name__}") from None
    return raw


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            raise SpecError(f"unbalanced ')' in spec {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise SpecError(f"unbalanced '(' in spec {text!r}")
    parts.append("".join(cur))
    return parts
