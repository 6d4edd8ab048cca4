"""``compresskv``: CompressKV — score tokens with the semantic retrieval heads only, and give
each layer a budget from its measured eviction error.

A calibration pass (once per model, cached on disk like the codecs' statistics) runs retrieval
prompts built from the KJV — a fact planted in the text, a question, the answer written out —
through the model in full precision and measures, per layer:

- each query head's attention from the answer tokens onto the planted fact: the heads with the
  most are the layer's semantic retrieval heads (``heads`` of them per layer);
- the eviction error: how far the attention output of the last ``window`` queries moves when
  half the tokens are evicted with those heads' scores. Layers that suffer more get more of
  the total budget (``spread`` bounds how far a layer's share moves from the mean).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace

import torch

from kvtier.kv.selectors.base import Selector, View, group_attention, pin
from kvtier.kv.selectors.snapkv import vote
from kvtier.paths import cache_dir
from kvtier.progress import status
from kvtier.registry import param, register

VERSION = "1"
CASES, LENGTH = 4, 1024  # calibration prompts and their length in tokens


@register
@dataclass(frozen=True)
class CompressKV(Selector):
    """CompressKV: retrieval heads (calibrated) vote over an observation window; per-layer budgets from eviction error."""

    name = "compresskv"
    ratio: float = param(0.5, "fraction of the tokens removed (mean over layers)", min=0.0, max=0.99)
    budget: int = param(0, "tokens kept per layer on average (overrides ratio when > 0)", min=0)
    window: int = param(32, "recent queries that vote", min=1)
    kernel: int = param(7, "average pooling width", min=1)
    heads: int = param(2, "semantic retrieval heads per layer (calibrated)", min=1)
    spread: float = param(2.0, "a layer's budget stays within [mean/spread, mean*spread]", min=1.0)
    # bound to one layer by bind(): query-head weights (Hq,) and this layer's budget factor
    weights: torch.Tensor | None = None
    factor: float = 1.0

    @property
    def queries(self) -> int:  # type: ignore[override]
        return self.window

    def bind(self, model, index: int) -> CompressKV:
        cal = calibration(model)
        top = cal["retrieval"][index].topk(min(self.heads, model.n_heads)).indices
        w = torch.zeros(model.n_heads)
        w[top] = 1.0
        if model.windows[index] is not None:  # a sliding layer retrieves nothing: every head votes
            w = None
        err = cal["error"]
        share = (err / err.mean()).clamp(1 / self.spread, self.spread)
        return replace(self, weights=w, factor=float(share[index] / share.mean()))

    def target(self, n: int) -> int:
        return min(n, max(1, round(super().target(n) * self.factor)))

    def score(self, view: View) -> torch.Tensor:
        scores, w = vote(view, self.window, self.kernel)  # (Hkv, G, n)
        hw = self.weights.reshape(scores.shape[0], -1) if self.weights is not None else torch.ones(scores.shape[:2])
        hw = torch.where(hw.sum(1, keepdim=True) > 0, hw, torch.ones_like(hw))  # a group without one: all heads
        scores = (scores * hw[..., None]).sum(1) / hw.sum(1)[:, None]
        return pin(scores, view.pos >= view.length - w)


def calibration(model) -> dict[str, torch.Tensor]:
    """``retrieval``: ``(layers, Hq)`` attention mass on the planted fact; ``error``: ``(layers,)``."""
    from safetensors.torch import load_file, save_file

    key = getattr(model, "key", None)
    cases = _cases(model)
    digest = hashlib.sha256(str(cases).encode()).hexdigest()[:16]
    path = cache_dir("calibration") / f"{key}-compresskv-{digest}-v{VERSION}.safetensors" if key else None
    if path is not None and path.exists():
        try:
            return load_file(path)
        except Exception:  # noqa: BLE001  (a damaged file is recomputed, never trusted)
            path.unlink(missing_ok=True)
    with status(f"calibrating compresskv's retrieval heads on {len(cases)} prompts (once per model)"):
        cal = _measure(model, cases)
    if path is not None:
        tmp = path.with_suffix(".tmp")
        save_file(cal, tmp, metadata={"version": VERSION})
        tmp.replace(path)
    return cal


def _cases(model) -> list[tuple[list[int], int, int]]:
    """(token ids, fact start, fact end) with the answer written at the end of the ids."""
    rng = random.Random(0)
    tok = getattr(model, "tokenizer", None)
    out = []
    for _ in range(CASES):
        if tok is None:  # a model without a tokenizer (tests): random ids, the fact repeated at the end
            g = torch.Generator().manual_seed(rng.randrange(1 << 30))
            ids = torch.randint(0, model.hf_config.vocab_size, (LENGTH,), generator=g).tolist()
            at = rng.randrange(LENGTH // 8, LENGTH // 2)
            ids[-8:] = ids[at: at + 8]
            out.append((ids, at, at + 8))
            continue
        from kvtier.bench.data import kjv

        text = kjv()
        key = str(rng.randint(10000, 99999))
        fact = tok(f" The pass key is {key}. Remember it. ", add_special_tokens=False).input_ids
        tail = tok(f"\nWhat is the pass key? The pass key is {key}", add_special_tokens=False).input_ids
        start = rng.randrange(len(text) // 3, len(text) // 2)
        hay = tok(text[start: start + 8 * LENGTH], add_special_tokens=False).input_ids
        room = LENGTH - len(fact) - len(tail)
        at = rng.randrange(room // 8, room // 2)
        ids = hay[:at] + fact + hay[at:room] + tail
        out.append((ids, at, at + len(fact)))
    return out


def _measure(model, cases) -> dict[str, torch.Tensor]:
    from kvtier import spec as specs
    from kvtier.engine import ModelRunner
    from kvtier.kv.codecs.dense import Dense

    retrieval = torch.zeros(model.n_layers, model.n_heads)
    error = torch.zeros(model.n_layers)
    recorder = ModelRunner(model, specs.CacheSpec((_Everything(), Dense(dtype="fp32"))))
    window, answer = 32, 5  # the observation window; the answer's last tokens
    for ids, a, b in cases:
        cache = recorder.new_cache()
        recorder.feed([cache], [ids])
        for i, layer in enumerate(cache.layers):
            if model.windows[i] is not None:
                continue  # a sliding layer: its window's error is filled with the mean below
            k, v = layer._held()
            q, n = layer.q * layer.scale, len(ids)
            att = group_attention(q[:, -answer:], k, torch.arange(n - answer, n), layer.pos)  # (Hkv, G, T, n)
            retrieval[i] += att[..., a:b].sum(-1).mean(-1).reshape(-1)
            qw = q[:, -window:]
            pos = torch.arange(n - window, n)
            full = group_attention(qw, k, pos, layer.pos)
            keep = full.mean(2).mean(1).topk(n // 2).indices  # snapkv's vote, all heads
            pick = keep[..., None].expand(-1, -1, k.shape[-1])
            kept = group_attention(qw, k.gather(1, pick), pos, layer.pos.gather(1, keep))
            o_full = torch.einsum("hgtn,hnd->hgtd", full, v.float())
            o_kept = torch.einsum("hgtn,hnd->hgtd", kept, v.float().gather(1, pick))
            error[i] += float((o_full - o_kept).norm() / o_full.norm())
        cache.close()
    error = torch.where(error > 0, error, error[error > 0].mean() if (error > 0).any() else torch.ones(()))
    return {"retrieval": retrieval / len(cases), "error": error / len(cases)}


@dataclass(frozen=True)
class _Everything(Selector):
    """Keeps every token and every query (calibration only; not registered)."""

    name = "_everything"
    queries = 1 << 30
    ratio: float = 0.0
    budget: int = 0

    def target(self, n: int) -> int:
        return n

    def score(self, view: View) -> torch.Tensor:
        return view.pos.float()
