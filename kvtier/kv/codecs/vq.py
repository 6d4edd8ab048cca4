"""``vq``: additive vector quantization of keys and values per token (CommVQ).

Each token's key (stored *before* RoPE) and value, per KV head, is scaled by its own RMS (one
byte, the log scale ``rotatekv`` uses; code 0 is a vector of zeros) and cut into sub-vectors of
``dim`` channels. Each sub-vector is the **sum of ``stages`` codewords**, one per codebook, each
picked by a one-byte code: the first codebook's nearest codeword, then the next codebook's
nearest to what is left, and so on (residual, additive quantization). A sub-vector thus costs
``stages`` bytes: ``8 * stages / dim`` bits per element, 2 at the default ``dim=8, stages=2``,
1 at ``dim=16, stages=2`` or ``dim=8, stages=1``.

The codebooks (256 codewords per sub-vector position and stage, one set for keys and one for
values per layer, shared by the layer's KV heads) are fitted once per model by k-means on the
calibration pass's own pre-RoPE keys and values (1,024 tokens per layer,
:mod:`kvtier.kv.calibration`), stage after stage on the residuals, normalised exactly as
encoding normalises them. They are held in fp16 and their bytes are counted in every cache, once per layer:
2 x ``head_dim x stages x 256`` values, 128 KiB a layer on SmolLM2 at the default. That is
model state; at 8K context it adds about 0.3 bits per element to one sequence, less on longer
ones. An uncalibrated ``vq`` (a codec built on its own) uses codebooks fitted to Gaussian
vectors instead (:func:`gaussian_books`).

**RoPE.** CommVQ constrains its key codebook to commute with RoPE (its codewords are complex
numbers over RoPE's channel pairs), which its paper says enables "efficient integration of
decoding into the self-attention mechanism" on the GPU. RoPE is linear, so the rotation of a
sum of codewords is the sum of the rotated codewords for *any* codebook. kvtier's CPU kernel
(``kvtier/kernels/vqattn.c``) decodes each key from its codes (``stages`` lookups per
sub-vector, the codebooks stay in the L2 cache), rotates it by RoPE at its position from the
keys' cos/sin rows inside the kernel, as the ``nuq`` kernel does, and scores it; values are
decoded the same way under the weights. So the codebook needs no constraint here and keeps the
full freedom of k-means; the price is the rotation of every key inside the kernel.

**Where it fails.** K-means places its codewords where the calibration keys were; a key unlike
them is far from every sum of codewords, where a scalar grid with a per-token scale fits
whatever comes. On SmolLM2 that makes a few layers' keys (18 and 25) worse than ``rotatekv``'s
even with 4 stages, though most layers are 5-8x better (docs/ppl.md, scripts/attn_error.py).

Paper: Li et al., "CommVQ: Commutative Vector Quantization for KV Cache Compression", ICML
2025, https://arxiv.org/abs/2506.18879
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch

from kvtier import kernels
from kvtier.errors import KvtierError
from kvtier.kv.codecs.base import Codec, SlidingResidual, rope_pieces
from kvtier.kv.codecs.rotatekv import scale_code, scale_value
from kvtier.registry import param, register

CODES = 256  # codewords per codebook: one byte per code
CHUNK = 4096  # vectors per distance computation
ITERATIONS = 12  # Lloyd iterations per stage of the fit (25 gave the same held-out error)


def kmeans(x: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Batched k-means: ``x (P, N, d)`` fp32, P independent problems -> ``(P, k, d)`` centres.

    Starts from ``k`` distinct samples (a fixed generator: the same data gives the same
    codebook); an empty cell is moved onto the sample its centre serves worst."""
    p, n, d = x.shape
    if n < k:
        raise KvtierError(f"vq: {n} calibration vectors cannot fit {k} codewords")
    g = torch.Generator().manual_seed(seed)
    c = x[:, torch.randperm(n, generator=g)[:k]].clone()
    base = (torch.arange(p) * k)[:, None]
    for _ in range(ITERATIONS):
        a, err = nearest(x, c)
        flat = (a + base).reshape(-1)
        sums = torch.zeros(p * k, d).index_add_(0, flat, x.reshape(-1, d))
        count = torch.bincount(flat, minlength=p * k).float()
        new = (sums / count.clamp_min(1)[:, None]).reshape(p, k, d)
        empty = (count == 0).reshape(p, k)
        if empty.any():
            worst = err.argsort(1, descending=True)  # (P, N): the worst-served samples first
            for i in empty.any(1).nonzero().flatten().tolist():
                idx = empty[i].nonzero().flatten()
                new[i, idx] = x[i, worst[i, :len(idx)]]
        c = new
    return c


def nearest(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each vector's nearest centre: ``x (P, N, d)``, ``c (P, K, d)`` -> indices and squared
    distances ``(P, N)``, in slices of ``CHUNK`` vectors (the distances are ``P x N x K``)."""
    cc = (c * c).sum(-1)[:, None, :]
    ct = c.transpose(1, 2)
    idx, err = [], []
    for i in range(0, x.shape[1], CHUNK):
        xs = x[:, i:i + CHUNK]
        best, a = (cc - 2 * torch.bmm(xs, ct)).min(-1)  # (P, n, K) -> (P, n)
        idx.append(a)
        err.append((best + (xs * xs).sum(-1)).clamp_min(0))
    return torch.cat(idx, 1), torch.cat(err, 1)


def fit_books(u: torch.Tensor, dim: int, stages: int, seed: int = 0) -> torch.Tensor:
    """Residual codebooks for vectors ``u (N, D)`` already normalised: ``(D / dim, stages,
    256, dim)`` fp16, each stage fitted to what the previous ones leave."""
    n, d = u.shape
    x = u.float().reshape(n, d // dim, dim).transpose(0, 1).contiguous()  # (P, N, dim)
    books = []
    for s in range(stages):
        c = kmeans(x, CODES, seed + s).half()
        a, _ = nearest(x, c.float())
        x = x - c.float().gather(1, a[..., None].expand(-1, -1, dim))
        books.append(c)
    return torch.stack(books, 1)


@functools.cache
def gaussian_books(head_dim: int, dim: int, stages: int) -> torch.Tensor:
    """The codebooks before calibration: fitted to Gaussian vectors (unit RMS, as encoding
    normalises each token)."""
    u = torch.randn(4096, head_dim, generator=torch.Generator().manual_seed(0))
    return fit_books(u, dim, stages)


def _normalise(x: torch.Tensor):
    """Per-vector RMS over the last dim of ``x``: one-byte scale codes (0 for a vector of zeros),
    their values, and ``x`` divided by them."""
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    sc = torch.where(rms > 0, scale_code(rms).clamp_(min=1), 0).to(torch.uint8)
    scale = _scale(sc)
    return sc.squeeze(-1), scale, x / torch.where(scale > 0, scale, 1.0)


def _scale(sc: torch.Tensor) -> torch.Tensor:
    return torch.where(sc > 0, scale_value(sc), 0.0)


@register
@dataclass(frozen=True)
class Vq(SlidingResidual, Codec):
    """CommVQ: per-token additive vector quantization of pre-RoPE keys and of values, calibrated codebooks."""

    name = "vq"
    width = "stages"  # bits per element (mixed)
    calibrated = True
    pre_rope = True
    group_blocks = 64  # attention on the codes: fewer, larger steps
    dim: int = param(8, "channels per sub-vector (bits per element = 8 x stages / dim)", choices=(4, 8, 16))
    stages: int = param(2, "codebooks summed per sub-vector, one byte of code each", min=1, max=4)
    sinks: int = param(4, "first tokens kept in 16 bits (attention sinks)", min=0, max=64)
    residual: int = param(64, "newest tokens kept in 16 bits beyond the residual block", min=0, max=4096)
    k_book: torch.Tensor | None = field(default=None, init=False, compare=False, repr=False)
    v_book: torch.Tensor | None = field(default=None, init=False, compare=False, repr=False)
    _fits: dict = field(default_factory=dict, init=False, compare=False, repr=False)  # per layer

    def books(self, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value codebooks ``(head_dim / dim, stages, 256, dim)`` fp16."""
        if self.k_book is None:
            book = gaussian_books(head_dim, self.dim, self.stages)
            return book, book
        return self.k_book, self.v_book

    def for_layer(self, ctx):
        if ctx.head_dim % self.dim:
            raise KvtierError(f"vq: dim={self.dim} must divide the head dimension {ctx.head_dim}")
        stats = ctx.stats
        if stats is None or "kpre_sample" not in stats:
            return self
        key = (ctx.index, stats["kpre_sample"].data_ptr(), stats["v_sample"].data_ptr())
        if key not in self._fits:  # once per layer for every cache of this codec
            d = ctx.head_dim
            self._fits[key] = tuple(
                fit_books(_normalise(x.float().reshape(-1, d))[2], self.dim, self.stages, seed=ctx.index)
                for x in (stats["kpre_sample"], stats["v_sample"]))
        bound = replace(self)
        object.__setattr__(bound, "_fits", self._fits)
        object.__setattr__(bound, "k_book", self._fits[key][0])
        object.__setattr__(bound, "v_book", self._fits[key][1])
        return bound

    def state_bytes(self) -> int:
        if self.k_book is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.k_book, self.v_book))

    def fields(self, block_size, head_dim):
        if head_dim % self.dim:
            raise KvtierError(f"vq: dim={self.dim} must divide the head dimension {head_dim}")
        codes = head_dim // self.dim * self.stages
        return {"k": ((block_size, codes), torch.uint8), "k_scale": ((block_size,), torch.uint8),
                "v": ((block_size, codes), torch.uint8), "v_scale": ((block_size,), torch.uint8)}

    def _encode_one(self, x: torch.Tensor, book: torch.Tensor):
        """``x (h, n, B, D)`` -> codes ``(h, n, B, D / dim * stages)`` (sub-vector-major) and scale codes."""
        h, n, b, d = x.shape
        sc, _, u = _normalise(x.float())
        r = u.reshape(-1, d // self.dim, self.dim).transpose(0, 1).contiguous()  # (P, M, dim)
        codes = []
        for s in range(self.stages):
            c = book[:, s].float().to(r.device)
            a, _ = nearest(r, c)
            r = r - c.gather(1, a[..., None].expand(-1, -1, self.dim))
            codes.append(a)
        q = torch.stack(codes, -1).transpose(0, 1)  # (M, P, stages)
        return q.to(torch.uint8).reshape(h, n, b, -1).contiguous(), sc

    def encode(self, k, v):
        kb, vb = self.books(k.shape[-1])
        kq, ks = self._encode_one(k, kb)
        vq, vs = self._encode_one(v, vb)
        return {"k": kq, "k_scale": ks, "v": vq, "v_scale": vs}

    def _decode_one(self, codes: torch.Tensor, sc: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
        h, n, b, _ = codes.shape
        p = book.shape[0]
        c = codes.long().reshape(h, n, b, p, self.stages)
        sub = torch.arange(p, device=codes.device)[:, None]
        stage = torch.arange(self.stages, device=codes.device)
        u = book.to(codes.device).float()[sub, stage, c].sum(-2)  # (h, n, B, P, dim)
        return (u.reshape(h, n * b, -1) * _scale(sc).reshape(h, n * b, 1))

    def decode(self, data, dtype):
        d = data["k"].shape[-1] // self.stages * self.dim
        kb, vb = self.books(d)
        k = self._decode_one(data["k"], data["k_scale"], kb)
        v = self._decode_one(data["v"], data["v_scale"], vb)
        return k.to(dtype), v.to(dtype)

    def attend(self, q, data, rope=None):
        """Softmax pieces on the codes: the native kernel where it runs, else :meth:`attend_torch`."""
        if rope is None:  # keys before RoPE need their positions
            return None
        kb, vb = self.books(q.shape[-1])
        fast = kernels.vq_attend(q, data, rope, kb, vb, self.dim, self.stages)
        return fast if fast is not None else self.attend_torch(q, data, rope)

    def native_job(self, data, rows, rope=None):
        """:meth:`attend` as a job of the batched decode kernel (RoPE turned in its kernel)."""
        if rope is None:
            return None
        d = data["k"].shape[-1] * self.dim // self.stages  # one code byte per stage and sub-vector
        kb, vb = self.books(d)
        return kernels.vq_job(data, rope, kb, vb, self.dim, self.stages, rows)

    def attend_torch(self, q, data, rope):
        """The reference of the kernel: each token's codewords summed and scaled, keys rotated by
        RoPE at their positions, then softmax pieces in fp32."""
        return rope_pieces(q, *self.decode(data, torch.float32), rope)
