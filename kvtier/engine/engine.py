"""The engine: requests in, tokens out, one forward per :meth:`Engine.step`.

``step`` is schedule -> run -> sample -> postprocess. The engine owns the model, one
:class:`ModelRunner` per cache spec in use (a request may name its own spec), the prefix cache
and the scheduler; it is single-threaded (the server drives it from one thread).
"""

from __future__ import annotations

import contextlib
import itertools
import time

from kvtier import spec as specs
from kvtier.config import EngineConfig, SamplingParams
from kvtier.dtypes import compute_dtype
from kvtier.engine.block_manager import PrefixCache
from kvtier.engine.runner import ModelRunner
from kvtier.engine.sampler import Sampler
from kvtier.engine.scheduler import Scheduler, SchedulerOutput
from kvtier.engine.sequence import Sequence, Status
from kvtier.engine.slo import SloController
from kvtier.errors import KvtierError
from kvtier.kv import persist
from kvtier.kv.persist import Prefix
from kvtier.kv.store import TierStore
from kvtier.kv.tiers import UNLIMITED, parse_size
from kvtier.models import loader


class Engine:
    def __init__(self, config: EngineConfig | None = None, loaded: loader.Loaded | None = None):
        from kvtier import config as cfgmod

        self.config = config = config or EngineConfig()
        cfgmod.check(config)
        self.default_kv = str(specs.parse(config.kv))  # a bad spec fails before the model loads
        store = TierStore(config.tiers, config.attend, prefetch=config.prefetch) if config.tiers else None
        self.budget = parse_size(config.kv_budget) if config.kv_budget else UNLIMITED
        self.loaded = loaded or loader.load(config.model, compute_dtype(config.dtype),
                                                   weights=config.weights)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        if config.skip_layers:
            self.model.skip = skipped_layers(self.model.n_layers, config.skip_layers)
        self.runners = {self.default_kv: ModelRunner(self.model, self.default_kv, block_size=config.block_size,
                                                     prefill_chunk=config.max_batched_tokens, tiers=store)}
        self.runner.bytes_for(1)  # the spec fits the model (head size, group sizes)
        self.eos = eos_ids(self.tokenizer, self.model.hf_config)
        self.prefixes = PrefixCache(config.block_size) if config.prefix_cache else None
        self.scheduler = Scheduler(config, self)
        self.slo = SloController(config, self.scheduler)
        self.sampler = Sampler()
        self._ids = itertools.count()
        self._logprobs: dict = {}  # this step's sampled log-probabilities, by sequence
        self.steps = 0

    @property
    def runner(self) -> ModelRunner:
        return self.runners[self.default_kv]

    def runner_for(self, kv: str | None) -> ModelRunner:
        key = self.default_kv if kv is None else str(specs.parse(kv))
        if key not in self.runners:
            if self.runner.store is not None:
                raise KvtierError(f"this engine runs {self.default_kv} on tiers ({self.runner.store}); "
                                  f"a request cannot name another cache spec ({key})")
            runner = ModelRunner(self.model, key, block_size=self.config.block_size,
                                 prefill_chunk=self.config.max_batched_tokens)
            runner.bytes_for(1)  # a spec that does not fit this model fails here, not inside a step
            self.runners[key] = runner
        return self.runners[key]

    # requests
    def add(self, prompt_ids: list[int], params: SamplingParams | None = None, kv: str | None = None,
            priority: int = 0, prefix: Prefix | None = None) -> Sequence:
        """Queue a request; it runs from the next :meth:`step`. ``prefix``: a saved cache the
        prompt continues (``prompt_ids`` then follow the document)."""
        params = params or SamplingParams()
        runner = self.runner_for(kv)
        held = prefix.token_ids if prefix is not None else []
        ids = list(held) + list(prompt_ids)
        if not prompt_ids and prefix is None:
            raise KvtierError("the prompt is empty; give some text to continue")
        limit = self.model.max_context
        if len(ids) + params.max_tokens > limit:
            raise KvtierError(f"prompt is {len(ids)} tokens + {params.max_tokens} new tokens, but "
                              f"{self.loaded.name} allows {limit}; shorten the prompt or lower the "
                              "maximum of new tokens")
        seq = Sequence(next(self._ids), ids, params, str(runner.spec), priority, prefix=prefix)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """End ``seq`` now (a client that went away); its blocks are freed."""
        if seq.finished:
            return
        self.scheduler.abort(seq)
        self._finish(seq, reason)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """One forward over the scheduled tokens. Returns the sequences that got a token or
        finished in it."""
        out = self.scheduler.schedule()
        if not out:
            return []
        cost = self.slo.cost(out)
        t0 = time.perf_counter()
        try:
            logits = self.runner.run([i.seq.cache for i in out.items], [i.tokens for i in out.items])
        except KvtierError as e:
            return self._failed_step(out, e)
        samples = [i for i, item in enumerate(out.items) if item.samples]
        tokens: list[int | None] = [None] * len(out.items)
        lps: dict[int, tuple | None] = {}
        failed = {id(i.seq) for i in out.items if i.seq.cache.error is not None}
        if samples:
            rows = [i for i in samples if id(out.items[i].seq) not in failed]
            seqs = [out.items[i].seq for i in rows]
            if rows:
                picked, logprobs = self.sampler(logits[rows], [s.params for s in seqs],
                                                [s.output_ids for s in seqs], [s.generator for s in seqs])
                for i, tok, lp in zip(rows, picked, logprobs):
                    tokens[i], lps[id(out.items[i].seq)] = tok, lp
        self._logprobs = lps
        for item in out.items:  # a prompt fully fed: selectors choose now
            if item.samples and len(item.tokens) > 1:
                item.seq.cache.compress()
        for item in out.items:
            if id(item.seq) in failed:
                item.seq.error = str(item.seq.cache.error)
                item.seq.exception = item.seq.cache.error
                item.seq.status = Status.FINISHED
                item.seq.finish_reason = "error"
        dt = time.perf_counter() - t0
        for item in out.items:
            if item.seq.prefilling:
                item.seq.timing.prefill_s += dt
        self.scheduler.postprocess(out, tokens, self._accept)
        self.slo.observe(out, cost, dt)
        self.steps += 1
        return [i.seq for i in out.items]

    def _failed_step(self, out: SchedulerOutput, error: KvtierError) -> list[Sequence]:
        """A forward raised (e.g. non-finite activations). Alone, the sequence fails; in a batch
        every sequence is recomputed and one that fails twice ends with the error."""
        seqs = [i.seq for i in out.items]
        for seq in seqs:
            seq.suspect += 1
            if len(seqs) == 1 or seq.suspect > 1:
                self.scheduler.abort(seq)
                seq.error, seq.exception = str(error), error
                self._finish(seq, "error")
            else:
                self.scheduler.preempt(seq)
                if seq.status is Status.SWAPPED:  # its cache may hold half a step: recompute
                    self.free(seq)
                    seq.n_computed, seq.status = 0, Status.WAITING
        return seqs

    def _accept(self, seq: Sequence, tok: int) -> None:
        """Append a sampled token; finish on end-of-sequence, a stop string or the length."""
        now = time.perf_counter()
        if not seq.output_ids and self.prefixes is not None and self.runners[seq.kv].shares_prefixes:
            self.prefixes.insert(seq.kv, seq.prompt_ids, seq.cache)  # the prompt's blocks, for later requests
            seq.shared = seq.cache.shared_bytes()
        if seq.timing.first_token is None:
            seq.timing.first_token = now
        seq.timing.last_token = now
        if tok in self.eos and not seq.params.ignore_eos:
            self._finish(seq, "stop")
            return
        seq.output_ids.append(tok)
        lp = self._logprobs.get(id(seq))
        if lp is not None:
            seq.logprobs.append((tok, *lp))
        self._detokenize(seq)
        if seq.finished:
            return
        if len(seq.output_ids) >= seq.params.max_tokens:
            self._finish(seq, "length")

    def _detokenize(self, seq: Sequence) -> None:
        """Extend ``seq.text`` by the new token's characters (whole characters only, decoded
        over a short window: O(1) per token); cut it at a stop string."""
        ids = seq.output_ids
        a, b = seq.offsets
        prev = self.tokenizer.decode(ids[a:b], skip_special_tokens=True)
        text = self.tokenizer.decode(ids[a:], skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(prev):
            return  # a character split across tokens: wait for the rest
        old = len(seq.text)
        seq.text += text[len(prev):]
        seq.offsets = (b, len(ids))
        for stop in seq.params.stop:
            at = seq.text.find(stop, max(0, old - len(stop) + 1))
            if at >= 0:
                seq.text = seq.text[:at]
                self._finish(seq, "stop")
                return

    def visible_text(self, seq: Sequence) -> str:
        """New text safe to show: while a stop string could still be forming, its possible
        beginning is held back."""
        hold = 0 if seq.finished or not seq.params.stop else max(len(s) for s in seq.params.stop) - 1
        end = max(seq._shown, len(seq.text) - hold)
        piece, seq._shown = seq.text[seq._shown:end], end
        return piece

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        seq.timing.finished = time.perf_counter()
        if seq.cache is not None and seq not in self.scheduler.running:
            self.free(seq)

    # Memory: what the scheduler asks of the KV store
    def held(self, running: list[Sequence], extra: int = 0) -> int:
        total = self.prefixes.nbytes if self.prefixes is not None else 0
        for seq in running:  # a sequence in its prompt is charged for all of it (it was admitted so)
            n = max(seq.n_computed + extra, len(seq.ids) if seq.prefilling else 0)
            total += self.runners[seq.kv].bytes_for(n) - seq.offloaded - seq.shared  # shared: counted once, above
        return total

    def need(self, seq: Sequence) -> int:
        runner = self.runners[seq.kv]
        shared = 0
        if seq.status is Status.WAITING and seq.prefix is None and self.prefixes is not None and runner.shares_prefixes:
            hit = self.prefixes.match(seq.kv, seq.ids, runner.spec.codec.sinks, count=False)
            shared = len(hit) * self.prefixes.block_bytes(seq.kv)  # read from the cache, not held again
        return runner.bytes_for(len(seq.ids)) - seq.offloaded - shared  # swapped blocks stay down

    def allocate(self, seq: Sequence) -> None:
        runner = self.runners[seq.kv]
        prefix = seq.prefix
        if prefix is not None:  # a saved cache: restored whole (also after a preemption)
            seq.cache = persist.restore(prefix, runner)
            seq.n_computed = seq.n_cached = prefix.length
            return
        seq.cache = runner.new_cache(reserve=len(seq.ids) + seq.params.max_tokens - len(seq.output_ids))
        seq.n_computed = 0
        if self.prefixes is not None and runner.shares_prefixes:
            hit = self.prefixes.match(seq.kv, seq.ids, seq.cache.layers[0].n_sinks)
            seq.n_computed = seq.n_cached = self.prefixes.fill(seq.cache, seq.kv, hit)
            seq.shared = seq.cache.shared_bytes()
        if seq.cache.home is not None:
            seq.cache.home.ids = list(seq.ids[:seq.n_computed])

    def reclaim(self, nbytes: int) -> int:
        return self.prefixes.evict(nbytes) if self.prefixes is not None else 0

    def free(self, seq: Sequence) -> None:
        cache, seq.cache = seq.cache, None
        if cache is None:
            return
        seq.kv_bytes, seq.kv_tokens = cache.nbytes(), cache.length
        seq.kv_bytes_by_tier = cache.nbytes_by_tier() if cache.home is not None else None
        cache.close()
        seq.offloaded = seq.shared = 0

    def swap_out(self, seq: Sequence) -> bool:
        store = self.runners[seq.kv].store
        if store is None or len(store.tiers) < 2 or store.recomputes and len(store.tiers) == 2:
            return False
        moved = 0
        for layer in seq.cache.layers:
            blocks = [j for j, w in enumerate(layer.where) if w == 0]
            if blocks:
                layer.move(blocks, 1)
                moved += len(blocks) * layer.pools[1].slot_bytes()
        seq.offloaded += moved
        return True

    # what the server and the API read
    def kv_bytes(self) -> list[tuple[str, int]]:
        """Bytes held now, by tier (running caches, really counted, plus the prefix cache)."""
        store = self.runner.store
        if store is None:
            held = sum(s.cache.nbytes() - s.shared for s in self.scheduler.running if s.cache is not None)
            if self.prefixes is not None:
                held += self.prefixes.nbytes
            return [(self.runner.device if isinstance(self.runner.device, str) else "cpu", held)]
        return [(t.kind, used) for t, used in zip(store.tiers, store.used)]

    def load_prefix(self, prefix: Prefix) -> int:
        """Put a saved cache's blocks into the prefix cache (``kvtier serve --cache``); returns
        the tokens it covers."""
        if self.prefixes is None or not self.runner.shares_prefixes:
            raise KvtierError(f"--cache needs the prefix cache, which {self.default_kv} on this model "
                              "and tier layout cannot use (codec-only specs, no sliding windows, no --tiers)")
        cache = persist.restore(prefix, self.runner)
        try:
            self.prefixes.insert(self.default_kv, prefix.token_ids[:-1], cache)
        finally:
            cache.close()
        return prefix.length


@contextlib.contextmanager
def skipping(model, share: float):
    """Run ``model`` with :func:`skipped_layers` of ``share`` skipped (none at 0), then put its
    own set back (for benches that compare shares on one loaded model)."""
    old = model.skip
    model.skip = skipped_layers(model.n_layers, share)
    try:
        yield model.skip
    finally:
        model.skip = old


def skipped_layers(n_layers: int, share: float) -> frozenset[int]:
    """A balanced set of middle layers to skip: ``round(share * n)`` layers spread evenly over
    the middle, never the first two or the last two (they carry the embedding and the head)."""
    k = round(share * n_layers)
    lo, hi = 2, n_layers - 2
    if k <= 0 or hi <= lo:
        return frozenset()
    k = min(k, hi - lo)
    span = hi - lo
    return frozenset(lo + int((i + 0.5) * span / k) for i in range(k))


def eos_ids(tokenizer, config) -> set[int]:
    ids = {tokenizer.eos_token_id}
    eos = getattr(config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


