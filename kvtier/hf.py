"""Any kvtier cache spec as a transformers ``Cache``, for plain ``model.generate``.

::

    model = AutoModelForCausalLM.from_pretrained(folder)
    out = model.generate(ids, cache=kvtier.hf.cache("int(bits=4)", model), max_new_tokens=64)

Each transformers layer's cache wraps one :class:`~kvtier.kv.cache.LayerKV` per batch row, so
the bytes held are exactly those kvtier's own engine holds for the same spec. Transformers'
attention needs the keys and values as one tensor, so every forward decodes the layer's
encoded blocks (kvtier's engine decodes one block group at a time and never holds them all).

Tokens are stored as kvtier's engine stores them: a decode step's token joins the residual
block first and attention reads it back from the cache; a prefill chunk attends to itself in
full precision and is stored afterwards. So transformers' logits with this cache match
kvtier's engine on the same weights and spec (the same bytes are stored on both sides).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from kvtier import spec as specs
from kvtier.config import BLOCK_SIZE
from kvtier.errors import KvtierError
from kvtier.kv import calibration
from kvtier.kv.cache import LayerKV
from kvtier.kv.codecs.base import LayerContext
from kvtier.models.base import rope_for

SLIDING = ("sliding_attention", "chunked_attention")  # transformers' windowed layer types


def cache(spec: str | specs.CacheSpec | None, model, tokenizer=None,
          block_size: int = BLOCK_SIZE) -> KvtierCache:
    """A transformers ``Cache`` that stores keys and values with kvtier's codec ``spec``.

    Parameters
    ----------
    spec : a cache spec, e.g. ``"int(bits=4)"`` (see ``kvtier methods``); a bad one raises
        :class:`~kvtier.errors.KvtierError`.
    model : the transformers causal LM the cache is for (its config gives the layer types,
        sliding windows and RoPE; its weights calibrate codecs that need statistics).
    tokenizer : the model's tokenizer; calibrated codecs then measure on real text (the KJV),
        otherwise on fixed random token ids.
    block_size : tokens per encoded block, as in :class:`~kvtier.engine.ModelRunner`.
    """
    parsed = specs.parse(spec)
    if parsed.selectors:
        raise KvtierError(f"kvtier.hf.cache takes a codec only; {parsed} also selects tokens, "
                          "which transformers' attention cannot follow (use kvtier.LLM)")
    if block_size < 1:
        raise ValueError("block_size must be positive")
    codec = parsed.codec
    config = model.config.get_text_config(decoder=True)
    types, kwargs = get_layer_types_and_kwargs(config)
    unknown = sorted({t for t in types if t != "full_attention" and t not in SLIDING})
    if unknown:
        raise KvtierError(f"kvtier.hf.cache supports attention layers only; this model has {unknown}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    codec.fields(block_size, head_dim)  # a codec that cannot store this head size says so now
    stats = _stats(model, tokenizer) if codec.calibrated else [None] * len(types)
    ropes: dict[str, object] = {}  # one RoPE per layer type (Gemma 3: local and global bases)
    if codec.pre_rope:
        per_type = getattr(config, "rope_parameters", None) or {}
        for t in types:
            if t not in ropes:
                ropes[t] = rope_for(config, t if t in per_type else None, head_dim)
    layers = [KvtierLayer(codec, i, block_size, kw.get("sliding_window") if t in SLIDING else None,
                          stats[i], ropes.get(t))
              for i, (t, kw) in enumerate(zip(types, kwargs))]
    return KvtierCache(layers, parsed)


class KvtierCache(Cache):
    """A transformers ``Cache`` of :class:`KvtierLayer`; ``nbytes()`` is what it holds."""

    def __init__(self, layers: list[KvtierLayer], spec: specs.CacheSpec):
        super().__init__(layers=layers)
        self.spec = spec

    def nbytes(self) -> int:
        """Bytes held across layers and batch rows: encoded blocks, plain tokens, block tables."""
        return sum(row.nbytes() for layer in self.layers for row in layer.rows)

    def __repr__(self) -> str:
        return f"KvtierCache({self.spec}, {len(self.layers)} layers, {self.nbytes()} bytes)"


class KvtierLayer(CacheLayerMixin):
    """One layer: a :class:`LayerKV` per batch row, created on the first ``update``.

    ``update`` returns keys/values ``(batch, Hkv, N, D)`` for positions ``kv_offset ..
    kv_offset + N - 1`` as :meth:`get_mask_sizes` announced: everything for a full-attention
    layer; for a sliding one the last ``window - 1`` cached tokens plus the new ones
    (transformers' ``DynamicSlidingWindowLayer`` contract).
    """

    is_compileable = False
    is_croppable = False  # encoded blocks cannot be rolled back

    def __init__(self, codec, index: int, block_size: int, window: int | None,
                 stats: dict | None = None, rope=None):
        super().__init__()
        self.codec, self.index, self.block_size = codec, index, block_size
        self.window, self.stats, self.rope = window, stats, rope
        self.is_sliding = window is not None
        self.rows: list[LayerKV] = []
        self.cumulative_length = 0  # tokens seen = position of the next token

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape  # (batch, Hkv, T, D)
        stats = self.stats and {k: s.to(key_states.device) for k, s in self.stats.items()}
        ctx = LayerContext(self.index, h, d, stats, self.rope)
        self.rows = [LayerKV(self.codec, h, d, self.block_size, self.window, key_states.dtype,
                             key_states.device, ctx) for _ in range(b)]
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store new keys/values ``(batch, Hkv, T, D)``; return what attention reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[2]
        first = self.get_mask_sizes(t)[1]  # oldest position attention may read
        ks, vs = [], []
        for row, new_k, new_v in zip(self.rows, key_states, value_states):  # (Hkv, T, D)
            if t == 1:  # decode: the token joins the residual block and is read back from it
                row.append(new_k, new_v)
                k, v = _gather(row, first)
            else:  # prefill: the chunk is used as given, then stored (storing may free blocks
                k, v = _gather(row, first)  # that its first queries still see)
                k, v = torch.cat([k, new_k], 1), torch.cat([v, new_v], 1)
                row.append(new_k, new_v)
            ks.append(k)
            vs.append(v)
        self.cumulative_length += t
        assert ks[0].shape[1] == self.cumulative_length - first
        return torch.stack(ks).to(self.dtype), torch.stack(vs).to(self.dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of what the next ``update`` returns."""
        first = 0
        if self.window is not None:
            first = max(self.cumulative_length - self.window + 1, 0)
        return self.cumulative_length + query_length - first, first

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.window if self.window is not None else -1

    def reset(self) -> None:
        self.rows, self.cumulative_length, self.is_initialized = [], 0, False

    def crop(self, tokens_to_remove: int) -> None:
        raise KvtierError("a kvtier cache cannot be cropped (encoded blocks are final); "
                          "use a DynamicCache for assisted or speculative decoding")

    def offload(self):  # rows stay on the device they were created on
        pass

    def prefetch(self):
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx.tolist())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select([i for i in range(len(self.rows)) for _ in range(repeats)])

    def _select(self, indices: list[int]) -> None:
        """Keep rows ``indices`` (in that order); a row picked twice is copied, not shared."""
        taken, rows = set(), []
        for i in indices:
            row = self.rows[i]
            if i in taken:  # codec and RoPE stay shared: they hold no per-sequence state
                row = copy.deepcopy(row, {id(row.codec): row.codec, id(row.rope): row.rope})
            taken.add(i)
            rows.append(row)
        self.rows = rows


def _gather(row: LayerKV, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything ``row`` holds from position ``first`` on, decoded: k, v ``(Hkv, N, D)``."""
    ks, vs = [], []
    for part in row.parts():
        if part.start + part.n <= first:  # out of the window (sinks of a sliding layer)
            continue
        k, v = part.get()
        cut = max(first - part.start, 0)
        ks.append(k[:, cut:])
        vs.append(v[:, cut:])
    if not ks:
        h, d = row.n_kv, row.head_dim
        empty = torch.empty((h, 0, d), dtype=row.dtype, device=row.residual_k.device)
        return empty, empty
    return torch.cat(ks, 1), torch.cat(vs, 1)


def _stats(model, tokenizer) -> list[dict]:
    """Per-layer calibration statistics from kvtier's forward on the HF model's weights."""
    from kvtier.models.gemma3 import Gemma3
    from kvtier.models.llama import Llama
    from kvtier.models.loader import FAMILIES

    config = model.config.get_text_config(decoder=True)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise KvtierError(f"calibrating KV statistics needs kvtier's own forward, which runs the "
                          f"Llama family and Gemma 3, not {config.model_type!r}; pick an "
                          "uncalibrated codec")
    weights = {k.removeprefix("language_model."): v.cpu() for k, v in model.state_dict().items()}
    ours = {"llama": Llama, "gemma3": Gemma3}[family](config, weights)  # shares the tensors
    ours.tokenizer = tokenizer
    name = getattr(model, "name_or_path", "") or ""
    if name and (Path(name) / "config.json").exists():  # a local folder: the loader's key, so
        ours.key = Path(name).name                     # statistics are computed once, on disk
    return calibration.load(ours)
