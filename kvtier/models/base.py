"""What every model family shares: the batch, RMSNorm, RoPE and attention over the KV store.

A forward takes a batch of sequences of different lengths, packed token by token: the linear
layers run once over all tokens, attention runs per sequence over that sequence's cache.
Prefill (many new tokens) and decode (one new token) go through the same call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvtier import kernels
from kvtier import weights as weights_
from kvtier.attention import attend, decode, decode_held
from kvtier.kv.cache import Part, SeqKV


@dataclass
class Batch:
    """New tokens of several sequences, packed.

    tokens, positions: ``(N,)`` for all sequences' new tokens, sequence after sequence.
    caches[i] receives ``lengths[i]`` tokens starting at position ``caches[i].length``.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    caches: list[SeqKV]
    lengths: list[int]
    rope_tables: dict = field(default_factory=dict)  # cos/sin at these positions, per Rope

    @classmethod
    def of(cls, caches: list[SeqKV], chunks: list[list[int]], device="cpu") -> Batch:
        tokens = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(kv.length, kv.length + len(c)) for kv, c in zip(caches, chunks)])
        return cls(tokens, positions.to(device), caches, [len(c) for c in chunks])

    def last_index(self) -> torch.Tensor:
        """Index of each sequence's last new token in the packed batch."""
        return torch.tensor(self.lengths, device=self.tokens.device).cumsum(0) - 1


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm in fp32 (``weight`` is kept in fp32); Gemma scales by ``1 + weight`` (offset=1).
    Rows ``(N, C)`` go through the native kernel, one pass instead of seven tensor ops
    (:func:`kvtier.kernels.rms_norm`); :func:`rms_norm_reference` is its oracle."""
    y = kernels.rms_norm(x, weight, eps, offset) if x.dim() == 2 else None
    return rms_norm_reference(x, weight, eps, offset) if y is None else y


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm in PyTorch, over the last dimension of ``x`` (any shape)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (weight + offset if offset else weight)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after a layer's output is added, and its RMSNorm:
    ``(x + delta, rms_norm(x + delta))``, the sum rounded to the dtype as torch's add rounds
    it. Rows ``(N, C)`` take one native pass (:func:`kvtier.kernels.add_rms_norm`) instead of
    an add and a norm; ``delta=None`` is a plain norm of ``x``."""
    if delta is None:
        return x, rms_norm(x, weight, eps, offset)
    out = kernels.add_rms_norm(x, delta, weight, eps, offset) if x.dim() == 2 else None
    if out is None:
        x = x + delta
        return x, rms_norm(x, weight, eps, offset)
    return out


class Rope:
    """Rotary embedding (rotate-half layout, as in transformers' checkpoints).

    ``inv_freq``: ``(D/2,)``; the cos/sin table grows on demand and is looked up once per
    forward (all layers sharing this Rope reuse the lookup through ``batch.rope_tables``).
    """

    def __init__(self, inv_freq: torch.Tensor, scaling: float = 1.0):
        self.inv_freq, self.scaling = inv_freq.float(), scaling
        self.table = torch.empty(0, 2, inv_freq.shape[0] * 2)  # (positions, cos|sin, D)

    def _grow(self, n: int, device) -> None:
        n = max(n, 2 * self.table.shape[0], 256)
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq)
        emb = torch.cat([freqs, freqs], -1)
        self.table = torch.stack([emb.cos(), emb.sin()], 1).mul(self.scaling).to(device)

    def at(self, batch: Batch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``(N, 1, D)`` at the batch's positions."""
        key = (id(self), dtype)
        if key not in batch.rope_tables:
            top = int(batch.positions.max()) + 1
            if top > self.table.shape[0]:
                self._grow(top, batch.positions.device)
            cs = self.table[batch.positions].to(dtype)  # (N, 2, D)
            batch.rope_tables[key] = (cs[:, :1], cs[:, 1:])
        return batch.rope_tables[key]

    def rotate(self, x: torch.Tensor, start: int, inverse: bool = False) -> torch.Tensor:
        """RoPE on ``x: (H, N, D)`` at positions ``start .. start + N - 1`` (``inverse`` undoes it).

        Used by codecs that store keys before RoPE; fp32 in, fp32 out."""
        return self.rotate_at(x, torch.arange(start, start + x.shape[1], device=x.device), inverse)

    def rotate_at(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """RoPE on ``x: (H, N, D)`` at ``positions``: ``(N,)``, or ``(H, N)`` when each head's
        tokens sit at their own positions (a cache whose selector kept different tokens per head)."""
        cs = self.rows(positions, x.device)
        cos, sin = cs[..., 0, :], cs[..., 1, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos - rotated * sin if inverse else x * cos + rotated * sin

    def rows(self, positions: torch.Tensor, device=None) -> torch.Tensor:
        """Unit cos and sin at ``positions`` (``(N,)`` or ``(H, N)``): ``(..., N, 2, D)`` fp32,
        what a codec that stores keys before RoPE needs to rotate them inside attention."""
        top = int(positions.max()) + 1 if positions.numel() else 0
        if top > self.table.shape[0]:
            self._grow(top, device if device is not None else positions.device)
        cs = self.table[positions.long()]
        return cs / self.scaling if self.scaling != 1.0 else cs  # the table holds scaled cos/sin

    def span(self, start: int, n: int) -> torch.Tensor:
        """:meth:`rows` at ``start .. start + n - 1``: a view of the table when unscaled."""
        if start + n > self.table.shape[0] or self.scaling != 1.0:
            return self.rows(torch.arange(start, start + n, device=self.table.device))
        return self.table[start: start + n]

    def __call__(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """x: ``(N, H, D)``: in one pass in the native kernel (the same numbers), else
        :meth:`reference`."""
        cos, sin = self.at(batch, x.dtype)
        out = kernels.rope(x, cos, sin)
        return out if out is not None else self.reference(x, cos, sin)

    @staticmethod
    def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE of ``x (N, H, D)`` with ``cos, sin (N, 1, D)`` in PyTorch (the oracle)."""
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin


def rope_for(hf_config, layer_type: str | None, head_dim: int) -> Rope:
    """Build a layer's RoPE from the config (default computed here; others via transformers)."""
    params = hf_config.rope_parameters
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    kind = params.get("rope_type", "default")
    if kind == "default":
        theta = params["rope_theta"]
        return Rope(1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](hf_config, "cpu", layer_type=layer_type)
    return Rope(inv_freq, scaling)


class DecoderModel:
    """Base of the model families: holds the weights, runs the shared forward loop.

    Subclasses set ``n_layers, n_heads, n_kv, head_dim, max_context`` and ``windows``
    (per-layer sliding window or None), and implement ``embed``, ``layer`` and ``head``.
    """

    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    max_context: int
    windows: list[int | None]

    def __init__(self, hf_config, weights: dict[str, torch.Tensor], weight_format: str = "dense",
                 raw: dict | None = None):
        """``weights``: float tensors by Hugging Face name; every matrix becomes a
        :class:`~kvtier.weights.Linear` in ``weight_format`` (``raw``: a GGUF's own packed
        tensors, see :func:`kvtier.weights.pack`)."""
        self.dtype = weights["model.embed_tokens.weight"].dtype  # the compute dtype
        self.hf_config = hf_config
        self.key: str | None = None  # identifies the weights (set by the loader; None in memory)
        self.tokenizer = None
        self.skip: frozenset[int] = frozenset()  # layers skipped (EngineConfig.skip_layers)
        self.weight_format = weight_format
        self.profile = None  # a kvtier.profile.Profile while one is attached (bench speed --profile)
        # norms run in fp32 whatever the compute dtype (as transformers does)
        self.w = weights_.pack({k: v.float() if "norm" in k else v for k, v in weights.items()},
                               weight_format, raw, self.dtype)

    @torch.inference_mode()
    def forward(self, batch: Batch, logits: str = "last") -> torch.Tensor:
        """Run the new tokens through the model, appending their keys/values to the caches.

        Returns logits ``(n_seqs, V)`` for each sequence's last token, or ``(N, V)`` for all
        tokens when ``logits="all"``.
        """
        # The residual stream and the last layer's output, not yet added: each layer adds it in
        # the same pass as its first norm (add_rms_norm).
        x, delta = self.embed(batch.tokens), None  # (N, C)
        for i in range(self.n_layers):
            if i not in self.skip:  # layer skipping: the residual stream passes through
                x, delta = self.layer(i, x, delta, batch)
        if logits == "last":
            last = batch.last_index()
            x, delta = x[last], None if delta is None else delta[last]
        return self.head(x if delta is None else x + delta)

    def attention(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  batch: Batch, scale: float) -> torch.Tensor:
        return self._timed("attention", self._attention, i, q, k, v, batch, scale)

    def _attention(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   batch: Batch, scale: float) -> torch.Tensor:
        """Attend each sequence's new tokens over its cache, and store their keys/values.

        A prefill chunk (n > 1) attends to its cache and to itself in full precision, then is
        stored. Decode tokens (n = 1) are stored first, then every decoding sequence's parts are
        gathered and attended together, one call for all (:func:`kvtier.attention.decode`).

        q: ``(N, Hq, D)``, k, v: ``(N, Hkv, D)``. Returns ``(N, Hq * D)``.
        """
        window = self.windows[i]
        outs: list[torch.Tensor | None] = []  # per sequence, in batch order
        decoding = []  # (index in outs, layer, position, row in q) of each decoding sequence
        off = 0
        kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # (Hkv, N, D): a sequence's rows are one slice
        for cache, n in zip(batch.caches, batch.lengths):
            layer = cache.layers[i]
            start = layer.length
            if n == 1:  # decode: the new token joins the residual block (below); attention below
                decoding.append((len(outs), layer, start, off))
                outs.append(None)
            else:
                ks, vs = kt[:, off:off + n], vt[:, off:off + n]  # (Hkv, n, D)
                qs = q[off:off + n].transpose(0, 1)  # (Hq, n, D)
                parts = layer.parts(n) + [Part(ks, vs, start)]
                outs.append(attend(qs, parts, start, scale, window).transpose(0, 1))
                self._store(layer, ks, vs)
                layer.observe(qs, scale)  # a selector's cache sees the queries
            off += n
        if decoding:
            self._store_tokens([(layer, off) for _, layer, _, off in decoding], kt, vt)
            everyone = len(decoding) == len(outs)
            qd = q if everyone else q[[row for *_, row in decoding]]  # (S, Hq, D)
            starts = [start for _, _, start, _ in decoding]
            # every layer attends all it holds: read straight from the layers
            o = decode_held(qd, [layer for _, layer, _, _ in decoding], starts, scale, window)
            if o is None:  # a selector picks blocks, or parts must be read or converted first
                qs = qd.unsqueeze(2)  # (S, Hq, 1, D)
                parts = [layer.select(qsc) for (_, layer, _, _), qsc in zip(decoding, (qs * scale).unbind(0))]
                o = decode(qd, parts, starts, scale, window)  # (S, Hq, D)
                for (_, layer, _, _), qsc in zip(decoding, qs.unbind(0)):
                    layer.observe(qsc, scale)
            if everyone:
                return o.reshape(o.shape[0], -1)
            for (at, _, _, _), oj in zip(decoding, o.split(1)):
                outs[at] = oj
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        return o.reshape(o.shape[0], -1)

    def _store_tokens(self, at: list[tuple], kt: torch.Tensor, vt: torch.Tensor) -> None:
        """Store one new token per decoding sequence: ``at`` holds (layer, row in kt/vt
        ``(Hkv, N, D)``). Tokens that only join a residual block go there in one copy for all;
        the others (a block to seal, a sink, a selector's layer) through ``layer.append``."""
        self._timed("kv store (codec encode)", self._tokens_in, at, kt, vt)

    @staticmethod
    def _tokens_in(at: list[tuple], kt: torch.Tensor, vt: torch.Tensor) -> None:
        rows, dst_k, dst_v, placed, slots, rest = [], [], [], [], [], []
        size, head = kt.element_size(), None
        for layer, row in at:
            slot = layer.slot()
            rk, rv = (None, None) if slot is None else (layer.residual_k, layer.residual_v)
            if slot is None or rk.dtype != kt.dtype or (head is not None and rk.stride(0) != head):
                rest.append((layer, row))  # appended on its own (a sink, a block to seal, a selector, another layout)
                continue
            head, step = rk.stride(0), rk.stride(1) * size
            rows.append(row)
            dst_k.append(rk.data_ptr() + slot * step)
            dst_v.append(rv.data_ptr() + slot * step)
            placed.append(layer)
            slots.append(slot)
        if placed and not kernels.copy_rows(kt, vt, rows, dst_k, dst_v, head):
            torch._foreach_copy_([x for layer, r in zip(placed, slots)
                                  for x in (layer.residual_k[:, r], layer.residual_v[:, r])],
                                 [x for row in rows for x in (kt[:, row], vt[:, row])])
        for layer in placed:
            layer.took()
        for layer, row in rest:
            layer.append(kt[:, row].unsqueeze(1), vt[:, row].unsqueeze(1))

    def _store(self, layer, k: torch.Tensor, v: torch.Tensor) -> None:
        self._timed("kv store (codec encode)", layer.append, k, v)

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self._timed("weight matmuls", self.w[name + ".weight"], x, self.w.get(name + ".bias"))

    def _timed(self, part: str, fn, *args):
        """``fn(*args)``, its time added to ``part`` of the attached profile (if any)."""
        if self.profile is None:
            return fn(*args)
        with self.profile.time(part):
            return fn(*args)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the final hidden states: the output matrix, or the tied embedding."""
        return self.linear(x, "lm_head" if "lm_head.weight" in self.w else "model.embed_tokens")

    def weight_bytes(self) -> int:
        """Bytes the weights hold, packed matrices at their packed size."""
        return sum(w.nbytes if isinstance(w, weights_.Linear) else w.numel() * w.element_size()
                   for w in self.w.values())
