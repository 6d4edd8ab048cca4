"""Peers: the tools people compare kvtier with, run through kvtier's own benchmark protocol.

A peer is a small dataclass registered by name whose fields are its parameters, written and
printed like a cache method: ``hf-quanto(bits=4)`` is transformers' ``QuantizedCache`` with
the optimum-quanto backend, ``llamacpp(kv=q8_0)`` is llama.cpp with a q8_0 KV cache. A peer
file implements three verbs on the same windows and tokens as kvtier's rows:

- ``load(model)``: the peer's own model for a kvtier model name or path (once per run);
- ``score(handle, wins, eval_tokens)``: the perplexity protocol of ``kvtier.bench.ppl.score``;
- ``timing(handle, prompt, new_tokens)``: (prefill seconds, seconds per decode step), as
  ``kvtier.bench.speed``.

Peers are optional installs (``bash scripts/bench-setup.sh``); parsing a peer never imports it.
"""

from __future__ import annotations

import importlib.util
import re
from abc import ABC, abstractmethod
from typing import ClassVar

from kvtier import spec as specs
from kvtier.errors import KvtierError

_PEERS: dict[str, type] = {}
_NAME = re.compile(r"^\s*([A-Za-z_][\w-]*)")


class Peer(ABC):
    """Base of every peer: its name, what it needs installed, and the three verbs."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, str]]  # (module to import, package that pip installs)
    compute: ClassVar[str]             # what its speed rows run: a dtype, or the GGUF's weights

    def require(self) -> None:
        """Raise a KvtierError that says how to install the peer when it is missing."""
        module, package = self.needs
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package of a dotted name is missing
            found = False
        if not found:
            raise KvtierError(f"{self.name} needs {package}: run bash scripts/bench-setup.sh")

    @abstractmethod
    def load(self, model: str):
        """Load the peer for a named model; returns a handle."""

    @abstractmethod
    def score(self, handle, wins: list[list[int]], eval_tokens: int, progress=None):
        """Score each window's last ``eval_tokens`` (kvtier.bench.ppl protocol)."""

    @abstractmethod
    def timing(self, handle, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        """(prefill seconds, seconds per decoded token) for one prompt."""

    def __str__(self) -> str:
        return specs.format_method(self)


def register(cls: type) -> type:
    assert cls.name not in _PEERS, f"peer {cls.name!r} registered twice"
    _PEERS[cls.name] = cls
    return cls


def peers() -> dict[str, type]:
    """All registered peers, by name."""
    return dict(sorted(_PEERS.items()))


def parse(text: str) -> Peer | None:
    """The peer that ``text`` names, e.g. ``"llamacpp(kv=q4_0)"``; None if it names no peer.

    Same grammar, bounds and error messages as a kvtier cache spec; a peer does not compose
    with ``+`` (it is a whole other system, not a kvtier method).
    """
    terms = specs._split_top(text, "+")
    named = [m.group(1) for m in map(_NAME.match, terms) if m and m.group(1) in _PEERS]
    if not named:
        return None
    if len(terms) > 1:
        raise specs.SpecError(f"bad method {text!r}: the peer {named[0]} does not compose with "
                              "'+'; give it alone, e.g. --methods \"llamacpp(kv=q8_0)\"")
    return specs._parse_term(text, text, _PEERS)


def method(text: str) -> Peer | specs.CacheSpec:
    """A benchmark row's method: a peer, or else a kvtier cache spec."""
    peer = parse(text)
    if peer is not None:
        return peer
    try:
        return specs.parse(text)
    except specs.SpecError as e:
        if "unknown method" in str(e):
            raise specs.SpecError(f"{e}; peers: {', '.join(peers())}") from None
        raise


from kvtier.bench.peers import hfquanto, llamacpp  # noqa: F401  (register on import)
