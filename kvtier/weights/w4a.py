"""``--weights w4a8`` and ``w4a4``: 4-bit weights times integer activations.

The weights are ``q4``'s, byte for byte: a GGUF's own Q4_0/Q4_1 groups of 32 (SmolLM2 ships as
Q4_1, so these are exactly the weights the file holds). Re-quantizing them onto any other
4-bit grid (a rotation, SVDQuant's smoothing) moves every weight off the grid it was rounded
to: on SmolLM2 symmetric 4-bit groups of 32 of the same matrices cost +38 % perplexity on
their own, where the file's grid costs nothing.

Each row of x is quantized per group of 32 inputs, the weights' groups, as llama.cpp's Q8_1
does: ``q = round(x * qmax / max|x|)``. A group's dot product is then summed exactly in int32
on the packed nibbles (AVX512-VNNI ``vpdpbusd``, ``kernels/w4a.c``) and
``y = sum_g sx_g (d_g * (u . q) + m_g * sum q)``; nothing is widened to float.

- ``w4a8``: every activation in 8 bits (``qmax = 127``). No calibration.
- ``w4a4``: activations in 4 bits (``qmax = 7``) where the model allows it, with the two
  outlier treatments of the seed papers measured on calibration text (2,048 KJV tokens, the
  span the KV calibration uses, away from the benchmark windows):

  - the matrix's outlier input channels (the ``OUTLIERS`` share with the largest calibrated
    range: the RMSNorm weights make a few channels of every norm's output tens of times
    larger) are left out of the 4-bit groups and multiplied in fp32 against their own
    dequantized weight columns (LLM.int8()'s decomposition; COMET keeps such channels'
    blocks in 8 bits);
  - COMET's mixed precision, per kind of matrix: a kind (``qkv_proj``, ``down_proj``, ...)
    whose 4-bit activations alone raise the calibration text's perplexity by more than
    ``KEEP_8BIT`` keeps 8-bit activations, and the log says which.

  On SmolLM2 (a held-out KJV span, each kind alone in 4 bits with 2 % outlier channels):
  ``qkv_proj`` +1.7 %, ``o_proj`` +0.2 %, ``gate_up_proj`` +5.2 %, ``down_proj`` +7.7 %; all four in
  4 bits without outlier channels +69 %, with them +21 %. Small models are the hard case for
  4-bit activations.

:meth:`W4ALinear.reference` is the PyTorch oracle the kernel is tested against. The embedding
(tied to the output head) stays in 8-bit groups, as ``q4`` keeps it.
"""

from __future__ import annotations

import torch

from kvtier import kernels
from kvtier.progress import note, status
from kvtier.weights import register
from kvtier.weights.base import Format, Linear
from kvtier.weights.q4 import Q4
from kvtier.weights.quant import GROUP, GroupQuant
from kvtier.weights.sensitivity import costly_kinds, kind

VERSION = "1"  # of the calibration file
OUTLIERS = 0.02  # share of a w4a4 matrix's input channels kept out of the 4-bit groups
KEEP_8BIT = 0.03  # a kind of matrix whose 4-bit activations cost more perplexity keeps 8-bit ones


class W4ALinear(Linear):
    """``W (N, K)`` in 4-bit Q4_1 groups (``q4``'s :class:`GroupQuant`), times activations
    quantized per group of 32 to ``qmax`` (127: 8 bits, 7: 4 bits), the input channels in
    ``outliers`` multiplied in fp32 instead. ``qmax=None``: activations not quantized yet (a
    ``w4a4`` matrix before its calibration), multiplied as ``q4`` does.

    The codes are held once, one weight row per 32-bit lane of the kernel's dot products (see
    :func:`_lanes`): the same nibbles and scales as the GroupQuant, in another order."""

    def __init__(self, gq: GroupQuant, qmax: int | None, outliers: torch.Tensor | None = None):
        assert gq.bits == 4
        self.qmax, self.shape, self.dtype = qmax, gq.shape, gq.dtype
        self._pending = gq if qmax is None else None  # multiplied as q4 until calibrated
        self.lanes = None if qmax is None else _lanes(gq)
        n, k = self.shape
        self.outliers = (torch.zeros(0, dtype=torch.int32) if outliers is None
                         else outliers.to(torch.int32).sort().values.contiguous())
        self.keep = torch.ones(k)
        self.keep[self.outliers.long()] = 0.0
        # the outlier channels' own columns, dequantized: (n_out, N) fp32
        self.wout = (gq.dense()[:, self.outliers.long()].T.contiguous() if len(self.outliers)
                     else torch.zeros((0, n)))

    @property
    def gq(self) -> GroupQuant:
        """The matrix as q4 holds it (unpacked from the lanes when calibrated)."""
        return self._pending if self._pending is not None else _unlanes(*self.lanes, *self.shape, self.dtype)

    def __call__(self, x, bias=None):
        if self.qmax is None:
            return self._pending(x, bias)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        b = None if bias is None else bias.float().contiguous()
        y = kernels.w4a_matmul(x2, *self.lanes, float(self.qmax), self.keep, self.outliers, self.wout, b,
                               n=self.shape[0])
        if y is None:
            y = self.reference(x2, b)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.shape[0])

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        """The activations the kernel multiplies, in fp32: each group of 32 inputs (outlier
        channels zeroed) rounded to ``qmax`` steps of its own scale."""
        m, k = x.shape
        g = (x.float() * self.keep).view(m, k // GROUP, GROUP)
        amax = g.abs().amax(2, keepdim=True)
        r = torch.where(amax > 0, torch.full_like(amax, float(self.qmax)) / amax, torch.ones_like(amax))
        q = torch.round(g * r).clamp(-self.qmax, self.qmax)
        return (q * (1 / r)).view(m, k)

    def reference(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel's arithmetic in PyTorch (its oracle): ``x (M, K) -> (M, N)`` in x's dtype."""
        y = self.quantized(x) @ self.gq.dense().T
        if len(self.outliers):
            y = y + x.float()[:, self.outliers.long()] @ self.wout
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)

    def rows(self, ids):
        return self.gq.rows(ids)

    def dense(self):
        return self.gq.dense()

    @property
    def nbytes(self):
        held = self.lanes if self._pending is None else (self._pending,)
        return sum(t.nbytes if isinstance(t, GroupQuant) else t.numel() * t.element_size()
                   for t in (*held, self.outliers, self.keep, self.wout))

    @classmethod
    def cat(cls, parts):
        assert len({p.qmax for p in parts}) == 1 and all(len(p.outliers) == 0 for p in parts), \
            "w4a matrices stack before their outlier channels are chosen"
        return cls(GroupQuant.cat([p.gq for p in parts]), parts[0].qmax)


def _lanes(gq: GroupQuant) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q4's codes one weight row per 32-bit lane, for ``vpdpbusd`` (``kernels/w4a.c``): per block of
    16 rows and group g, 4 x 64 bytes, byte ``4 n + j`` of vector v holding input ``8 v + j`` of
    row n in its low nibble and ``8 v + 4 + j`` in its high one; d and m as (blocks, G, 16) fp16,
    rows past N zero."""
    n, k = gq.shape
    g, nb = k // GROUP, -(-n // 16)
    c = gq.codes.view(n, g, GROUP // 2)
    u = torch.zeros((nb * 16, g, GROUP), dtype=torch.uint8)
    u[:n] = torch.cat([c & 15, c >> 4], -1)
    u = u.view(nb, 16, g, 4, 2, 4)
    packed = (u[..., 0, :] | (u[..., 1, :] << 4)).permute(0, 2, 3, 1, 4).contiguous()

    def by_block(t):
        p = torch.zeros((nb * 16, g), dtype=torch.float16)
        p[:n] = t
        return p.view(nb, 16, g).transpose(1, 2).contiguous()

    return packed, by_block(gq.d), by_block(gq.m if gq.m is not None else torch.zeros_like(gq.d))


def _unlanes(packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor, n: int, k: int, dtype) -> GroupQuant:
    """The inverse of :func:`_lanes`."""
    nb, g = packed.shape[:2]
    b = packed.permute(0, 3, 1, 2, 4)  # (blocks, row, group, v, j)
    u = torch.stack([b & 15, b >> 4], -2).reshape(nb * 16, g, GROUP)[:n]
    codes = (u[..., :16] | (u[..., 16:] << 4)).reshape(n, k // 2).contiguous()
    rows = lambda t: t.transpose(1, 2).reshape(nb * 16, g)[:n].contiguous()  # noqa: E731
    return GroupQuant(codes, rows(d), rows(m), 4, dtype)


class _W4A(Format):
    """q4's 4-bit matrices as :class:`W4ALinear` with ``qmax`` (None: chosen by :meth:`finish`)."""

    qmax: int | None

    def pack(self, name, w, raw, dtype):
        lin = Q4().pack(name, w, raw, dtype)  # the GGUF's own bytes where it has them
        return W4ALinear(lin, self.qmax) if lin.bits == 4 else lin  # q4 keeps the embedding in 8 bits


@register
class W4A8(_W4A):
    name = "w4a8"
    help = ("q4's 4-bit weights (a GGUF's own Q4_0/Q4_1 groups) x 8-bit activations per group of 32, "
            "summed in int32 on the packed nibbles (AVX512-VNNI): 5 bits a weight")
    qmax = 127


@register
class W4A4(_W4A):
    name = "w4a4"
    help = ("q4's 4-bit weights x 4-bit activations per group of 32, calibrated outlier channels in fp32 "
            "and 8-bit activations kept for the kinds of matrix that need them (COMET): 5 bits a weight")
    qmax = None  # until finish() has calibrated the model

    def finish(self, model) -> None:
        """Choose each matrix's outlier channels from its inputs' ranges on calibration text and
        each kind's activation bits (see the module docstring); measured once per model and kept
        in ``<cache_dir>/calibration/``, like the KV statistics."""
        from kvtier.kv import calibration

        pending = {n: w for n, w in model.w.items() if isinstance(w, W4ALinear) and w.qmax is None}
        if not pending:
            return

        def compute(ids):
            with status(f"calibrating w4a4 on {len(ids)} tokens: activation ranges, then each kind of matrix "
                        "(once per model)"):
                outliers, eight = _measure(model, pending, ids)
            return ({f"{n}.outliers": t for n, t in outliers.items()},
                    {"eight_bit": ",".join(sorted(eight))})

        tensors, meta = calibration.stored(model, "w4a4", VERSION, compute)
        eight = set(filter(None, meta.get("eight_bit", "").split(",")))
        for n, w in pending.items():
            model.w[n] = _final(w, tensors[f"{n}.outliers"], kind(n) in eight)
        if eight:
            note(f"w4a4: {', '.join(sorted(eight))} keep 8-bit activations: 4-bit ones there raised the "
                 f"calibration text's perplexity by more than {KEEP_8BIT:.0%}")


def _final(w: W4ALinear, outliers: torch.Tensor, eight_bit: bool) -> W4ALinear:
    return W4ALinear(w.gq, 127) if eight_bit else W4ALinear(w.gq, 7, outliers)


class _Ranges:
    """A pending matrix that records the absolute range of each input channel (calibrating)."""

    def __init__(self, w: W4ALinear):
        self.w, self.amax = w, None

    def __call__(self, x, bias=None):
        a = x.reshape(-1, x.shape[-1]).float().abs().amax(0)
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        return self.w(x, bias)


def _measure(model, pending: dict[str, W4ALinear], ids: list[int]) -> tuple[dict, set[str]]:
    """Each matrix's outlier input channels, and the kinds that keep 8-bit activations."""
    from kvtier.engine import ModelRunner

    recorders = {n: _Ranges(w) for n, w in pending.items()}
    model.w.update(recorders)
    runner = ModelRunner(model, "dense")
    runner.feed([runner.new_cache(len(ids))], [ids])  # the ranges: one prefill of the text
    outliers = {n: r.amax.topk(max(1, round(OUTLIERS * r.amax.numel()))).indices.to(torch.int32)
                for n, r in recorders.items()}
    eight_bit = {n: W4ALinear(w.gq, 127) for n, w in pending.items()}
    kinds = costly_kinds(model, ids, list(pending), eight_bit.__getitem__,  # that kind in 4 bits, the rest in 8
                         lambda n: _final(pending[n], outliers[n], False), KEEP_8BIT)
    model.w.update(pending)
    return outliers, kinds
