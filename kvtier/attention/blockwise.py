"""Attention over groups of keys, combined exactly with the log-sum-exp merge.

Each group returns ``(m, l, o)``: the row max of the scores, the sum of ``exp(s - m)`` and the
unnormalised ``exp(s - m) @ V``. Groups merge exactly (split-softmax, as in flash-decoding),
so attention never needs the whole cache in one tensor: a group can be a decoded block run,
the residual block, the current tokens — or, later, blocks on another tier.

Shapes: q ``(Hq, T, D)`` for T query tokens at positions ``q_start .. q_start + T - 1``;
a :class:`~kvtier.kv.cache.Part` holds k, v ``(Hkv, N, D)`` at positions ``start .. start+N-1``.
Query head h reads KV head ``h // (Hq // Hkv)`` (GQA). A key is visible when its position is
``<=`` the query's and, with a sliding ``window``, when ``q_pos - k_pos < window``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtier import kernels
from kvtier.kv.cache import Part

SMALL = 256  # keys; below this, reduced-precision matmul costs more in overhead than it saves
LONG = 4096  # keys; from here, torch's CPU flash kernel beats the matmuls (bf16/fp16 only)


def visible(q_start: int, t: int, k_start: int, n: int, window: int | None,
            device=None) -> torch.Tensor | None:
    """Boolean mask ``(T, N)`` of the keys each query sees, or None when it sees them all."""
    q_last, k_last = q_start + t - 1, k_start + n - 1
    all_causal = k_last <= q_start
    all_in_window = window is None or q_last - k_start < window
    if all_causal and all_in_window:
        return None
    qp = torch.arange(q_start, q_start + t, device=device)[:, None]
    kp = torch.arange(k_start, k_start + n, device=device)[None, :]
    mask = kp <= qp
    if window is not None:
        mask &= qp - kp < window
    return mask


def partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            bias: torch.Tensor | None = None):
    """Softmax pieces of one group. q ``(Hkv, G*T, D)`` pre-scaled, rows ordered (g, t);
    ``bias`` ``(Hkv, N)`` is added to every row's scores (a merged key counts for several), or
    ``(Hkv, T, N)`` to each query's (a sliding window over keys held out of order).

    Returns m, l ``(Hkv, G*T, 1)`` and o ``(Hkv, G*T, D)``.
    """
    if k.shape[1] <= SMALL and q.dtype != torch.float32:  # tiny groups: fp32 kernels are faster
        q, k, v = q.float(), k.float(), v.float()
    if (mask is None and bias is None and k.shape[1] >= LONG and q.dtype != torch.float32 and q.device.type == "cpu"
            and _FLASH is not None and k.dtype == q.dtype):
        # long reduced-precision runs on the CPU: torch's flash kernel, 2x faster than the matmuls;
        # its normalised output with l = 1 and m = its log-sum-exp is the same piece
        o, lse = _FLASH(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, False, scale=1.0)
        lse = lse[0].unsqueeze(-1)
        return lse, torch.ones_like(lse), o[0].float()
    s = _scores(q, k).float()  # (Hkv, G*T, N); softmax statistics in fp32
    if bias is not None:  # per key (Hkv, N), or per query (Hkv, T, N): rows are ordered (g, t)
        b = bias[:, None, :] if bias.dim() == 2 else bias.repeat(1, s.shape[1] // bias.shape[1], 1)
        s = s + b.to(s.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    if mask is not None or bias is not None:  # a fully masked row has m = -inf; keep exp() finite there
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    return m, p.sum(-1, keepdim=True), torch.bmm(p.to(v.dtype), v).float()


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q @ k^T`` per head. A pool view's heads are not adjacent in memory; the reduced-precision
    batched kernel copies such a K first, so those go head by head (no copy)."""
    if q.dtype == torch.float32 or k.is_contiguous():
        return torch.bmm(q, k.transpose(1, 2))
    return torch.stack([torch.mm(qh, kh.t()) for qh, kh in zip(q, k)])


def combine(pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Combine ``(m, l, o)`` pieces over disjoint keys into the one piece over all of them."""
    if len(pieces) == 1:
        return pieces[0]
    top = torch.stack([m for m, _, _ in pieces]).amax(0)
    out = l_sum = None
    for m, l, o in pieces:
        w = torch.exp(m - top)
        out = o * w if out is None else out + o * w
        l_sum = l * w if l_sum is None else l_sum + l * w
    return top, l_sum, out


def merge(pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine ``(m, l, o)`` pieces into normalised attention output ``(Hkv, G*T, D)``."""
    _, l, o = combine(pieces)
    return o / l


def _group_queries(q: torch.Tensor, n_kv: int, scale: float) -> torch.Tensor:
    hq, t, d = q.shape  # (Hq, T, D) -> (Hkv, G*T, D), rows ordered (g, t)
    return (q * scale).reshape(n_kv, (hq // n_kv) * t, d)


def _ungroup(o: torch.Tensor, hq: int, t: int) -> torch.Tensor:
    return o.reshape(hq, t, o.shape[-1])


def reference(q: torch.Tensor, parts: list[Part], q_start: int, scale: float,
              window: int | None = None, group: int = 64) -> torch.Tensor:
    """The oracle: every part cut into groups of ``group`` keys, each attended, then merged."""
    hq, t, _ = q.shape
    n_kv = parts[0].n_kv
    g = hq // n_kv
    qg = _group_queries(q, n_kv, scale)
    pieces = []
    for part in parts:
        pk, pv = part.get()
        for i in range(0, part.n, group):
            k, v = pk[:, i:i + group], pv[:, i:i + group]
            mask = visible(q_start, t, part.start + i, k.shape[1], window, q.device)
            bias = None if part.bias is None else part.bias[..., i:i + group]
            pieces.append(partial(qg, k, v, None if mask is None else mask.repeat(g, 1), bias))
    return _ungroup(merge(pieces), hq, t).to(q.dtype)


def attend(q: torch.Tensor, parts: list[Part], q_start: int, scale: float,
           window: int | None = None) -> torch.Tensor:
    """Fast path. Decode (T=1): one piece per part, each encoded part decoded just before its
    piece (one group of blocks at a time), LSE-merged, nothing concatenated.
    Prefill: SDPA over the parts (decoded and concatenated once per chunk, not per token)."""
    hq, t, d = q.shape
    n_kv = parts[0].n_kv
    if t == 1:
        qg = _group_queries(q, n_kv, scale)
        queries = {q.device: qg}  # the query where each part lives (attention where the data is),
        for p in parts:  # copied before any GPU work is queued, so CPU parts overlap with it
            if p.device is not None and p.device not in queries:
                queries[p.device] = qg.to(p.device)
        pieces = []
        for p in sorted(parts, key=lambda p: p.device != q.device):  # the compute device's first: async on a GPU
            if window is not None and q_start - (p.start + p.n - 1) >= window:
                continue  # wholly outside the sliding window
            dev = p.device or q.device
            qd = queries.setdefault(dev, qg.to(dev))
            mask = visible(q_start, 1, p.start, p.n, window, dev)
            piece = None
            if mask is None:
                piece = _per_head(qd, p.heads) if p.heads is not None else p.score(qd) if p.score else None
            if piece is None:  # decode this group, attend, let it go
                k, v = p.get()
                piece = partial(qd, k, v, mask, p.bias)
            pieces.append(piece)
            if p.done is not None:
                p.done()
        # brought to the query's device only now: a copy from host memory would wait for the GPU
        # work queued so far, serialising the CPU parts with the GPU's copies and attention
        pieces = [tuple(x.to(q.device) for x in piece) for piece in pieces]
        return _ungroup(merge(pieces), hq, t).to(q.dtype)
    try:
        if any(p.bias is not None for p in parts):  # merged keys: pieces with their bias
            return reference(q, parts, q_start, scale, window, group=1 << 30)
        return _prefill(q, parts, q_start, scale, window)
    finally:
        for p in parts:
            if p.done is not None:
                p.done()


def _per_head(q: torch.Tensor, heads: list[list[Part]]):
    """One decode query over KV heads that hold different tokens: head h's rows of ``q``
    ``(Hkv, G, D)`` attend its own parts (on their codes where a codec can), their pieces
    combined; the heads' pieces stacked."""
    out = []
    for h, parts in enumerate(heads):
        qh, pieces = q[h: h + 1], []
        for part in parts:
            piece = part.score(qh) if part.score is not None else None
            if piece is None:
                k, v = part.get()
                piece = partial(qh, k, v, None, part.bias)
            pieces.append(tuple(x.float() for x in piece))
            if part.done is not None:
                part.done()
        out.append(combine(pieces))
    return tuple(torch.cat(x, 0) for x in zip(*out))


def _prefill(q: torch.Tensor, parts: list[Part], q_start: int, scale: float, window: int | None) -> torch.Tensor:
    hq, t, _ = q.shape
    n_kv = parts[0].n_kv
    kvs = [tuple(x.to(q.device) for x in p.get()) for p in parts]
    assert all(a.start + a.n == b.start for a, b in zip(parts, parts[1:])), "parts must cover consecutive positions"
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and kernels.prefill_available():
        # the native bf16 kernel: the whole chunk in one call, no mask built (on AMX tiles where
        # the CPU has them: 1.4 against torch's 2.3 ms for a 1,030-token chunk of SmolLM2's
        # heads on a 2-core Xeon, 17 against 31 ms for 1,024 tokens over an 8K past)
        k = kvs[0][0] if len(kvs) == 1 else torch.cat([k for k, _ in kvs], 1)
        v = kvs[0][1] if len(kvs) == 1 else torch.cat([v for _, v in kvs], 1)
        out = kernels.prefill_attend(q, k, v, q_start, parts[0].start, scale, window)
        if out is not None:
            return out
    cur = parts[-1]
    if (len(parts) > 1 and window is None and cur.start == q_start and cur.n == t
            and _FLASH is not None and q.device.type == "cpu"):
        # chunked prefill: the past is fully visible, the chunk is causal; two flash calls
        # merged by their log-sum-exp, so no (T, N) mask is ever built
        past = kvs[:-1]
        k = past[0][0] if len(past) == 1 else torch.cat([k for k, _ in past], 1)
        v = past[0][1] if len(past) == 1 else torch.cat([v for _, v in past], 1)
        o1, lse1 = _flash(q, k, v, False, scale)
        o2, lse2 = _flash(q, *kvs[-1], True, scale)
        top = torch.maximum(lse1, lse2)
        w1, w2 = torch.exp(lse1 - top), torch.exp(lse2 - top)  # (Hq, T, 1)
        return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(q.dtype)
    if len(parts) == 1:
        (k, v), k_start = kvs[0], parts[0].start
    else:
        k = torch.cat([k for k, _ in kvs], 1)
        v = torch.cat([v for _, v in kvs], 1)
        k_start = parts[0].start
    n = k.shape[1]
    causal_only = window is None and k_start + n - t == q_start
    if causal_only and n == t:
        mask, is_causal = None, True
    else:
        mask, is_causal = visible(q_start, t, k_start, n, window, q.device), False
    return F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                          attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=n_kv != hq).squeeze(0)


# torch's CPU flash attention also returns the log-sum-exp, which makes pieces mergeable
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _flash(q, k, v, causal: bool, scale: float):
    """q ``(Hq, T, D)``, k, v ``(Hkv, N, D)`` -> output ``(Hq, T, D)``, lse ``(Hq, T, 1)``."""
    g = q.shape[0] // k.shape[0]
    if g > 1:
        k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    o, lse = _FLASH(q.unsqueeze(0), k.unsqueeze(0).to(q.dtype), v.unsqueeze(0).to(q.dtype),
                    0.0, causal, scale=scale)
    return o[0], lse[0].unsqueeze(-1)
