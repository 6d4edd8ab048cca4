"""Perplexity with a compressed cache (the measurement protocol in shared/design.md).

For each window of C tokens: prefill the first C - T tokens, then score the last T tokens in
decode mode, teacher-forced, each step reading only the cache. All windows run together as
one batch. The dense fp32 cache is scored on the same tokens in the same run. Peers
(``kvtier.bench.peers``: transformers' QuantizedCache, llama.cpp) are scored through the same
protocol on the same windows and give rows with the same fields plus ``"peer": true``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from kvtier.config import BLOCK_SIZE
from kvtier.engine import ModelRunner
from kvtier.errors import KvtierError
from kvtier.progress import bar

BASELINE = "dense(dtype=fp32)"


@dataclass
class Score:
    nll: list[float]        # summed NLL per window
    count: int              # scored tokens per window
    kv_bytes: int           # bytes held by all windows' caches after scoring
    kv_tokens: int          # tokens held (processed) by them
    kv_elements: int        # key/value elements held (a sliding window holds fewer)
    decode_s: float         # time of the teacher-forced decode steps
    decode_tokens: int      # tokens fed in those steps (all windows)

    @property
    def ppl(self) -> float:
        return math.exp(sum(self.nll) / (self.count * len(self.nll)))

    @property
    def ppl_per_window(self) -> list[float]:
        return [math.exp(n / self.count) for n in self.nll]


def score(runner: ModelRunner, wins: list[list[int]], eval_tokens: int, progress=None) -> Score:
    """Score the last ``eval_tokens`` of each window reading only the cache."""
    context = len(wins[0])
    prefix = context - eval_tokens
    caches = [runner.new_cache(reserve=context) for _ in wins]
    logits = runner.feed(caches, [w[:prefix] for w in wins])
    if progress:
        progress(prefix * len(wins))
    nll = torch.zeros(len(wins), dtype=torch.float64)
    t0 = time.perf_counter()
    for j in range(prefix, context):
        target = torch.tensor([w[j] for w in wins])
        nll += torch.nn.functional.cross_entropy(logits.float(), target, reduction="none").double()
        if j + 1 < context:
            logits = runner.feed(caches, [[w[j]] for w in wins])
        if progress:
            progress(len(wins))
    decode_s = time.perf_counter() - t0
    return Score(nll.tolist(), eval_tokens, sum(c.nbytes() for c in caches),
                 sum(c.length for c in caches), sum(c.n_elements() for c in caches),
                 decode_s, (eval_tokens - 1) * len(wins))


def run(model, model_name: str, methods: list[str], contexts: list[int], eval_tokens: int,
        ids: list[int], n_windows: int = 4, block_size: int = BLOCK_SIZE,
        skips: list[float] = (0.0,), reference=None, baselines: dict | None = None) -> list[dict]:
    """Every method (a cache spec or a peer) at every context, each against the fp32 dense
    cache on the same windows; each kvtier method also with every share of ``skips`` of the
    model's layers skipped (layer skipping; the baseline keeps every layer). ``reference``: the
    model that scores the baseline (default ``model``): the same model in dense weights when
    ``model``'s are packed, so a row's ΔPPL is the weights' cost plus the cache's."""
    from kvtier.bench import peers
    from kvtier.bench.data import windows
    from kvtier.engine.engine import skipping

    chosen = {str(m): m for m in map(peers.method, methods)}  # canonical label -> spec or peer
    canon = list(chosen)
    for c in contexts:
        if not 0 < eval_tokens < c:
            raise KvtierError(f"--eval-tokens {eval_tokens} must be between 1 and --context {c}")
        if c > model.max_context:
            raise KvtierError(f"--context {c} is longer than {model_name} allows ({model.max_context})")
    loaded = {m: p.load(model_name) for m, p in chosen.items() if isinstance(p, peers.Peer)}
    rows = []
    for c in contexts:
        wins = windows(ids, c, n_windows)
        runs = [(m, 0.0) for m in canon] + [(m, share) for share in skips if share for m in canon if m not in loaded]
        ref = reference or model
        known = baselines if baselines is not None else {}
        total = (len([r for r in runs if r != (BASELINE, 0.0) or model is not ref])
                 + ((id(ref), c) not in known)) * c * n_windows
        with bar(total, f"ppl {model_name} @ {c}") as step:
            if (id(ref), c) not in known:
                with skipping(ref, 0.0):
                    known[id(ref), c] = score(ModelRunner(ref, BASELINE, block_size), wins, eval_tokens, step)
            base = known[id(ref), c]
            for m, share in runs:
                if m in loaded:
                    s = chosen[m].score(loaded[m], wins, eval_tokens, step)
                elif m == BASELINE and not share and ref is model:
                    s = base
                else:
                    with skipping(model, share):
                        s = score(ModelRunner(model, m, block_size), wins, eval_tokens, step)
                rows.append({
                    "method": m, "model": model_name, "context": c, "eval_tokens": eval_tokens,
                    "skip_layers": share, "weights": "peer" if m in loaded else model.weight_format,
                    "weight_bytes": None if m in loaded else model.weight_bytes(),
                    "windows": n_windows, "ppl": s.ppl, "dense_ppl": base.ppl,
                    "ppl_per_window": s.ppl_per_window, "dense_ppl_per_window": base.ppl_per_window,
                    "kv_bytes_per_token": s.kv_bytes / s.kv_tokens,
                    "bits_per_element": 8 * s.kv_bytes / s.kv_elements,
                    "decode_tok_s": s.decode_tokens / s.decode_s,
                    "dense_decode_tok_s": base.decode_tokens / base.decode_s,
                } | ({"peer": True} if m in loaded else {}))
    return rows
