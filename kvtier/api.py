"""The offline Python entry point: ``LLM(model=..., kv=...).generate(prompts)``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kvtier.dtypes import compute_dtype
from kvtier.engine import ModelRunner, sample
from kvtier.errors import KvtierError
from kvtier.kv import persist
from kvtier.kv.persist import Prefix
from kvtier.kv.store import TierStore
from kvtier.models import loader


@dataclass
class Completion:
    """One prompt's result. ``kv_bytes`` is what the cache held at the end, metadata included."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    kv_bytes: int
    kv_tokens: int
    prefill_s: float
    decode_s: float
    finish_reason: str  # "stop" (end-of-sequence token), "length" or "error"
    error: str | None = None  # why the request failed (e.g. the disk tier filled up)
    kv_bytes_by_tier: list[int] | None = None  # encoded blocks on each tier at the end (with tiers)

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_bytes / max(self.kv_tokens, 1)


class LLM:
    """A model with a KV-cache configuration.

    Parameters
    ----------
    model : a named model (``smollm2-135m``, ``gemma3-270m``), an HF folder or a .gguf file.
    kv : the cache spec, e.g. ``"dense(dtype=fp16)"`` (see ``kvtier methods``).
    dtype : compute dtype, ``auto`` (bf16 where the hardware has native bf16 matmul), ``fp32``
        or ``bf16``.
    block_size : tokens per KV block.
    tiers : where blocks may live, fastest first, with byte budgets, e.g.
        ``"cpu:2GiB,disk:/mnt/nvme/kv:50GiB"``; None keeps every block in RAM.
    attend : with tiers, ``local`` computes attention where each block lives; ``fetch`` copies
        every block to the first tier first.
    prefetch : with a disk tier, hint the next layer's disk blocks to the kernel ahead of time
        from a background thread (off by default: it did not pay on the 2-core reference machine).
    """

    def __init__(self, model: str = loader.DEFAULT_MODEL, kv: str | None = None,
                 dtype: str = "auto", block_size: int = 64, prefill_chunk: int = 2048,
                 tiers: str | None = None, attend: str = "local", prefetch: bool = False):
        store = TierStore(tiers, attend, prefetch=prefetch) if tiers else None  # a bad spec fails before loading
        self.loaded = loader.load(model, compute_dtype(dtype))
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.runner = ModelRunner(self.model, kv, block_size=block_size, prefill_chunk=prefill_chunk,
                                  tiers=store)
        self.eos = _eos_ids(self.tokenizer, self.model.hf_config)

    @property
    def spec(self) -> str:
        return str(self.runner.spec)

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise KvtierError(f"{self.loaded.name} has no chat template; run without --chat")
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer(prompt).input_ids

    def check_length(self, n_prompt: int, max_new_tokens: int) -> None:
        if n_prompt == 0:
            raise KvtierError("the prompt is empty; give some text to continue")
        limit = self.model.max_context
        if n_prompt + max_new_tokens > limit:
            raise KvtierError(
                f"prompt is {n_prompt} tokens + {max_new_tokens} new tokens, but {self.loaded.name} "
                f"allows {limit}; shorten the prompt or lower --max-new-tokens")

    def save_cache(self, document: str, path: str, chat: bool = False) -> Prefix:
        """Prefill ``document`` once and save its cache (encoded, checksummed) to ``path``;
        later runs continue from it with ``generate(..., prefix=llm.load_cache(path))``."""
        if self.runner.spec.selectors:
            raise KvtierError(f"saved caches hold codecs only; {self.spec} also selects tokens "
                              "(save with a codec-only --kv, e.g. 'int(bits=4)')")
        ids = self.encode(document, chat)
        self.check_length(len(ids), 1)
        if len(ids) < 2:
            raise KvtierError("the document is a single token; there is nothing to save")
        cache = self.runner.new_cache(reserve=len(ids))
        try:
            self.runner.run([cache], [ids[:-1]])
            persist.save(path, self.runner, cache, ids, self.loaded.name)
        finally:
            cache.close()
        return self.load_cache(path)

    def load_cache(self, path: str) -> Prefix:
        """Open a cache saved by :meth:`save_cache`; refused when it was made by another model,
        cache spec, dtype or format version."""
        return persist.open_prefix(path, self.runner, self.loaded.name)

    def generate(self, prompts: str | list[str], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, chat: bool = False, seed: int = 0,
                 prefix: Prefix | None = None) -> list[Completion]:
        """Generate for a batch of prompts together (sequences of different lengths). With
        ``prefix`` (a saved cache), each prompt continues the saved document."""
        results: list[Completion] = []
        for _ in self.tokens(prompts, results, max_new_tokens, temperature, top_p, chat, seed, prefix):
            pass
        return results

    def stream(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, chat: bool = False, seed: int = 0,
               prefix: Prefix | None = None) -> Iterator[str | Completion]:
        """Yield text pieces of one prompt as they are generated, then its :class:`Completion`."""
        results: list[Completion] = []
        ids: list[int] = []
        shown = ""
        for _, tok in self.tokens([prompt], results, max_new_tokens, temperature, top_p, chat, seed, prefix):
            ids.append(tok)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):  # whole characters only
                yield text[len(shown):]
                shown = text
        yield results[0]

    def tokens(self, prompts: str | list[str], results: list[Completion], max_new_tokens: int = 128,
               temperature: float = 0.0, top_p: float = 1.0, chat: bool = False,
               seed: int = 0, prefix: Prefix | None = None) -> Iterator[tuple[int, int]]:
        """Yield ``(prompt index, token id)`` as tokens are generated; fills ``results`` at the end."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_new_tokens < 1:
            raise KvtierError("max_new_tokens must be at least 1")
        if prefix is None:
            ids = [self.encode(p, chat) for p in prompts]
        else:  # the document's last token, then the prompt as its continuation
            if chat:
                raise KvtierError("a saved cache continues its document as plain text; run without --chat")
            ids = [prefix.token_ids[-1:] + self.tokenizer(p, add_special_tokens=False).input_ids
                   for p in prompts]
        held = prefix.length if prefix else 0
        for p in ids:
            self.check_length(held + len(p), max_new_tokens)
        gen = torch.Generator().manual_seed(seed)
        caches = []
        try:
            for p in ids:
                if prefix is None:
                    caches.append(self.runner.new_cache(reserve=len(p) + max_new_tokens))
                else:
                    caches.append(persist.restore(prefix, self.runner))
            yield from self._decode(ids, caches, results, max_new_tokens, temperature, top_p, gen)
        finally:
            for c in caches:
                c.close()

    def _decode(self, ids, caches, results, max_new_tokens, temperature, top_p, gen):
        t0 = time.perf_counter()
        logits = self.runner.run(caches, ids)
        prefill_s, t0 = time.perf_counter() - t0, time.perf_counter()
        outs: list[list[int]] = [[] for _ in ids]
        reason, errors = ["length"] * len(ids), [None] * len(ids)
        live = self._drop_failed(list(range(len(ids))), caches, reason, errors)
        rows = dict(zip(range(len(ids)), logits))
        while live:
            step = []
            picked = sample(torch.stack([rows[i] for i in live]), temperature, top_p, gen).tolist()
            for i, tok in zip(live, picked):
                if tok in self.eos:
                    reason[i] = "stop"
                    continue
                outs[i].append(tok)
                yield i, tok
                if len(outs[i]) < max_new_tokens:
                    step.append((i, tok))
            live = [i for i, _ in step]
            if live:
                logits = self.runner.run([caches[i] for i in live], [[t] for _, t in step])
                rows = dict(zip(live, logits))
                live = self._drop_failed(live, caches, reason, errors)
        decode_s = time.perf_counter() - t0
        results.extend(Completion(self.tokenizer.decode(o, skip_special_tokens=True), o, len(p),
                                  c.nbytes(), c.length, prefill_s, decode_s, r, e,
                                  c.nbytes_by_tier() if c.home else None)
                       for o, p, c, r, e in zip(outs, ids, caches, reason, errors))

    @staticmethod
    def _drop_failed(live, caches, reason, errors) -> list[int]:
        """End the sequences whose cache could not be placed (e.g. the disk filled up); a
        request of one raises the error, a batch goes on without them."""
        failed = [i for i in live if caches[i].error is not None]
        if failed and len(caches) == 1:
            raise caches[0].error
        for i in failed:
            reason[i], errors[i] = "error", str(caches[i].error)
            caches[i].close()
        return [i for i in live if i not in failed]


def _eos_ids(tokenizer, config) -> set[int]:
    ids = {tokenizer.eos_token_id}
    eos = getattr(config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}
