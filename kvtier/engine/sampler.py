"""Next-token choice for a batch of sequences, each with its own :class:`SamplingParams`.

Greedy rows are one ``argmax``; the others apply, in this order, presence/frequency penalties,
temperature, top-k, min-p and top-p (nucleus), then draw from each sequence's own generator,
so a seeded request gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from kvtier.config import SamplingParams


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits ``(n, V)`` -> token ids ``(n,)``, every row with the same settings."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = _probs(logits.float() / temperature, 0, 0.0, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _probs(scaled: torch.Tensor, top_k: int, min_p: float, top_p: float) -> torch.Tensor:
    """Probabilities ``(n, V)`` after top-k, min-p and top-p of tempered logits ``(n, V)``."""
    if top_k and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, -1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, -1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p * sorted_p.sum(-1, keepdim=True)
        sorted_p = sorted_p.masked_fill(outside, 0.0)  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return probs


def penalize(logits: torch.Tensor, params: SamplingParams, generated: list[int]) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over the tokens generated so far, ``(V,)``."""
    if not generated or (params.presence_penalty == 0 and params.frequency_penalty == 0):
        return logits
    ids, counts = torch.tensor(generated).unique(return_counts=True)
    out = logits.float().clone()
    out[ids] -= params.presence_penalty + params.frequency_penalty * counts.float()
    return out


class Sampler:
    """Chooses each row's token; returns them with their log-probabilities when asked."""

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], generated: list[list[int]],
                 generators: list[torch.Generator]) -> tuple[list[int], list[tuple | None]]:
        """logits ``(n, V)``. Returns token ids and, per row, None or ``(logprob, [(id,
        logprob), ...] top alternatives)`` from the penalised distribution before temperature."""
        logits = logits.float()
        if all(p.greedy and p.logprobs is None and p.presence_penalty == 0 and p.frequency_penalty == 0
               for p in params):
            return logits.argmax(-1).tolist(), [None] * len(params)
        tokens, logprobs = [], []
        for row, p, gen_ids, gen in zip(logits, params, generated, generators):
            row = penalize(row, p, gen_ids)
            if p.greedy:
                tok = int(row.argmax())
            else:
                probs = _probs(row[None] / p.temperature, p.top_k, p.min_p, p.top_p)
                tok = int(torch.multinomial(probs, 1, generator=gen))
            tokens.append(tok)
            if p.logprobs is None:
                logprobs.append(None)
                continue
            lp = torch.log_softmax(row, -1)
            top = lp.topk(p.logprobs) if p.logprobs else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            logprobs.append((float(lp[tok]), alts))
        return tokens, logprobs
