"""The offline Python entry point: ``LLM(model=..., kv=...).generate(prompts)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from kvtier.config import BLOCK_SIZE, DEFAULT_MODEL, MAX_NEW_TOKENS, EngineConfig, SamplingParams
from kvtier.engine.engine import Engine
from kvtier.engine.sequence import Sequence
from kvtier.errors import KvtierError
from kvtier.kv import persist
from kvtier.kv.persist import Prefix
from kvtier.textio import check_text


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
    """A model with a KV-cache configuration; :meth:`generate` and :meth:`stream` are short
    loops over :meth:`kvtier.engine.Engine.step`.

    Parameters
    ----------
    model : a named model (``smollm2-135m``, ``gemma3-270m``), an HF folder or a .gguf file.
    kv : the cache spec, e.g. ``"dense(dtype=fp16)"`` (see ``kvtier methods``).
    dtype : compute dtype, ``auto`` (bf16 where the hardware has native bf16 matmul), ``fp32``
        or ``bf16``.
    block_size : tokens per KV block.
    prefill_chunk : tokens per forward step (the scheduler's ``max_batched_tokens``).
    tiers : where blocks may live, fastest first, with byte budgets, e.g.
        ``"cpu:2GiB,disk:/mnt/nvme/kv:50GiB"``; None keeps every block in RAM.
    attend : with tiers, ``local`` computes attention where each block lives; ``fetch`` copies
        every block to the first tier first.
    prefetch : with a disk tier, hint the next layer's disk blocks to the kernel ahead of time
        from a background thread (off by default: it did not pay on the 2-core reference machine).
    **engine : any other :class:`kvtier.config.EngineConfig` field (``max_seqs``, ``kv_budget``,
        ``prefix_cache``, ``skip_layers`` ...).
    """

    def __init__(self, model: str = DEFAULT_MODEL, kv: str | None = None, dtype: str = "auto",
                 block_size: int = BLOCK_SIZE, prefill_chunk: int | None = None, tiers: str | None = None,
                 attend: str = "local", prefetch: bool = False, **engine):
        fields = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = set(engine) - fields
        if unknown:
            raise KvtierError(f"LLM() has no option {', '.join(sorted(unknown))}; options: {', '.join(sorted(fields))}")
        if prefill_chunk is not None:
            engine["max_batched_tokens"] = prefill_chunk
        config = EngineConfig(model=model, kv=kv or "dense", dtype=dtype, block_size=block_size, tiers=tiers,
                              attend=attend, prefetch=prefetch, **engine)
        self.engine = Engine(config)
        self.loaded, self.model, self.tokenizer = self.engine.loaded, self.engine.model, self.engine.tokenizer
        self.runner, self.eos = self.engine.runner, self.engine.eos

    @property
    def spec(self) -> str:
        return str(self.runner.spec)

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        check_text(prompt, "the prompt")
        if chat:
            return self.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer(prompt).input_ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` in the model's chat template, ready for the reply."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise KvtierError(f"{self.loaded.name} has no chat template; run without --chat")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

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
            self.runner.feed([cache], [ids[:-1]])
            persist.save(path, self.runner, cache, ids, self.loaded.name)
        finally:
            cache.close()
        return self.load_cache(path)

    def load_cache(self, path: str) -> Prefix:
        """Open a cache saved by :meth:`save_cache`; refused when it was made by another model,
        cache spec, dtype or format version."""
        return persist.open_prefix(path, self.runner, self.loaded.name)

    def generate(self, prompts: str | list[str], max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 0.0,
                 top_p: float = 1.0, chat: bool = False, seed: int = 0,
                 prefix: Prefix | None = None, **sampling) -> list[Completion]:
        """Generate for several prompts together (continuous batching: each runs to its own
        end). With ``prefix`` (a saved cache), each prompt continues the saved document.
        ``sampling``: any other :class:`kvtier.config.SamplingParams` field (``top_k``, ``stop`` ...)."""
        seqs = self._add(prompts, max_new_tokens, temperature, top_p, chat, seed, prefix, sampling)
        try:
            while any(not s.finished for s in seqs):
                self.engine.step()
        finally:
            for s in seqs:
                self.engine.abort(s)
        if len(seqs) == 1 and seqs[0].exception is not None:
            raise seqs[0].exception  # one request: its failure is the caller's; a batch goes on without it
        return [self._completion(s, prefix) for s in seqs]

    def stream(self, prompt: str, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 0.0,
               top_p: float = 1.0, chat: bool = False, seed: int = 0,
               prefix: Prefix | None = None, **sampling) -> Iterator[str | Completion]:
        """Yield text pieces of one prompt as they are generated, then its :class:`Completion`."""
        (seq,) = self._add(prompt, max_new_tokens, temperature, top_p, chat, seed, prefix, sampling)
        try:
            while not seq.finished:
                self.engine.step()
                piece = self.engine.visible_text(seq)
                if piece:
                    yield piece
        finally:
            self.engine.abort(seq)
        if seq.exception is not None:
            raise seq.exception
        piece = self.engine.visible_text(seq)
        if piece:
            yield piece
        yield self._completion(seq, prefix)

    def _add(self, prompts, max_new_tokens, temperature, top_p, chat, seed, prefix, sampling) -> list[Sequence]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise KvtierError("give at least one prompt (a string or a non-empty list of strings)")
        if not all(isinstance(p, str) for p in prompts):
            raise KvtierError("every prompt must be a string")
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                **sampling)
        if prefix is None:
            ids = [self.encode(p, chat) for p in prompts]
        else:  # the prompt follows the saved document
            if chat:
                raise KvtierError("a saved cache continues its document as plain text; run without --chat")
            for p in prompts:
                check_text(p, "the prompt")
            ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        held = prefix.length if prefix else 0
        for p in ids:
            self.check_length(held + len(p) + (1 if prefix else 0), max_new_tokens)
        seqs = []
        try:
            for p in ids:
                seqs.append(self.engine.add(p, params, prefix=prefix))
        except BaseException:
            for s in seqs:
                self.engine.abort(s)
            raise
        return seqs

    def _completion(self, seq: Sequence, prefix: Prefix | None) -> Completion:
        text = seq.text if seq.params.stop else self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        t = seq.timing
        prefill = (t.first_token or t.finished or t.arrival) - (t.scheduled or t.arrival)
        decode = (t.finished or t.arrival) - (t.first_token or t.finished or t.arrival)
        n_prompt = len(seq.prompt_ids) - (prefix.length if prefix else 0)
        return Completion(text, list(seq.output_ids), n_prompt, seq.kv_bytes, seq.kv_tokens, prefill, decode,
                          seq.finish_reason, seq.error, seq.kv_bytes_by_tier)
