"""``--weights w8a8``: int8 weights times int8 activations (the seed paper OutlierTune).

Activations carry outlier channels that a per-token int8 scale cannot hold. OutlierTune
quantizes them per channel and folds the work into the weights ahead of time ("pre-execution
of dequantization"), after centring each channel ("symmetrization"). Here, per matrix ``W (N, K)``
and its input's channel range ``[lo, hi]`` measured on calibration text (2,048 KJV tokens,
the span the KV calibration uses, away from the benchmark windows):

- centre ``z = (hi + lo) / 2`` and half-range ``r = (hi - lo) / 2``: ``W x = W (x - z) + W z``,
  and ``W z`` joins the bias;
- per-channel scale ``s = r^ALPHA / max|W[:, k]|^(1 - ALPHA)``: ``W (x - z) = (W diag(s)) ((x - z) / s)``,
  so most of each outlier channel's range moves from the activations into the weights' column;
- ``W' = W diag(s)`` in int8 with one fp32 scale per row and chunk of ``CHUNK`` inputs (a chunk
  holding an outlier column does not coarsen the rest of the row), packed as AMX tiles;
- at run time each row of ``(x - z) / s`` is rounded to int8 with its own scale (``127 / max``;
  OutlierTune's static per-channel scales alone clip a token beyond the calibration range: the
  row scale keeps every token in range), the int8 products are summed exactly in int32 per
  chunk, and ``y = sum over chunks (sum * chunk scale) * row scale + bias``.

The kernel is ``kernels/w8a8.c`` (AMX int8 tiles, or AVX512-VNNI for one row); :meth:`W8A8Linear.reference`
is the PyTorch oracle it is tested equal to. A long chunk (``BLOCKED_ROWS`` rows and more: a
prefill) does not quantize x: the weights held are dequantized to bf16 for the call and
multiplied by a blocked bf16 matmul, which beats the int8 tiles there (each 64-input chunk's
sums must leave the tiles to be scaled); decode steps keep the int8 kernel. The embedding (and
the tied output head) stays in 8-bit groups (``q8``), as ``q4`` keeps it: packed as w8a8, its
rows come back through the per-channel scales of the head's input, and SmolLM2's 2K PPL went
from +0.83 % to +1.67 %.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtier import kernels
from kvtier.progress import note, status
from kvtier.weights import register
from kvtier.weights.base import Format, Linear
from kvtier.weights.q4 import EIGHT_BIT, Q4
from kvtier.weights.quant import quantize
from kvtier.weights.sensitivity import costly_kinds, kind

CHUNK = 64  # inputs per weight scale (an AMX int8 tile's depth)
VERSION = "1"  # of the calibration file
KEEP_WEIGHT_ONLY = 0.03  # a kind of matrix whose int8 activations cost more perplexity stays weight-only
# Rows of x from which a call dequantizes the weights to bf16 and runs a blocked bf16 matmul on
# unquantized x instead of the int8 kernel (on a 2-core AMX Xeon, SmolLM2's gate/up matrix:
# 512 rows 0.89 against 0.96 ms, 1,024 rows 1.64 against 1.45, 2,060 rows 3.26 against 2.38):
# prefill chunks, not decode steps.
BLOCKED_ROWS = 768
ALPHA = 0.9  # the share of each channel's range moved into the weights (chosen on SmolLM2: docs/weights.md)


class W8A8Linear(Linear):
    """``W (N, K)`` as OutlierTune's int8 weights for int8 activations (see the module docstring)."""

    def __init__(self, codes: torch.Tensor, ws: torch.Tensor, z: torch.Tensor, s: torch.Tensor,
                 bias: torch.Tensor, dtype: torch.dtype):
        # codes int8 (N, K) and ws fp32 (N, chunks of CHUNK inputs), held only in the tiles'
        # layouts; z, s (K) and bias (N) fp32
        self.z, self.s, self.bias = z, s, bias
        self.source: torch.Tensor | None = None  # the float matrix, until the ranges are measured
        self.inv_s = 1.0 / s
        self.shape, self.dtype = tuple(codes.shape), dtype
        n, k = self.shape
        np_, kp = -(-n // 16) * 16, -(-k // CHUNK) * CHUNK
        padded = torch.zeros((np_, kp), dtype=torch.int8)
        padded[:n, :k] = codes
        # AMX B tiles: [block of 16 rows][chunk][quad][row][4]
        self.packed = padded.view(np_ // 16, 16, kp // CHUNK, 16, 4).permute(0, 2, 3, 1, 4).contiguous()
        wsum = padded.view(np_, kp // CHUNK, CHUNK).sum(2, dtype=torch.int32)
        wsp = torch.zeros((np_, kp // CHUNK))
        wsp[:n] = ws
        self.wsum = wsum.view(np_ // 16, 16, -1).transpose(1, 2).contiguous()  # (blocks, chunks, 16)
        self.ws_tiles = wsp.view(np_ // 16, 16, -1).transpose(1, 2).contiguous()
        # the centre's share for _blocked: bias - W_held z, W less its int8 rounding, times z
        self.centre_bias = (bias - self.dense() @ z).to(torch.bfloat16)

    @property
    def ws(self) -> torch.Tensor:
        """Each row's scale per chunk of inputs ``(N, chunks)``, from the tiles' layout."""
        return self.ws_tiles.transpose(1, 2).reshape(-1, self.ws_tiles.shape[1])[: self.shape[0]]

    @property
    def codes(self) -> torch.Tensor:
        """The int8 codes ``(N, K)``, unpacked from the tiles."""
        n, k = self.shape
        b, c = self.packed.shape[:2]
        return self.packed.permute(0, 3, 1, 2, 4).reshape(b * 16, c * CHUNK)[:n, :k]

    @classmethod
    def from_float(cls, w: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None,
                   dtype: torch.dtype) -> W8A8Linear:
        """``w (N, K)`` for inputs whose channels ranged over ``[lo, hi]`` on calibration text
        (None: not measured yet, each channel taken as [-1, 1]; the float ``w`` is then kept as
        ``source`` until :meth:`W8A8.finish` measures the model's ranges)."""
        wf = w.float()
        n, k = wf.shape
        lo = -torch.ones(k) if lo is None else lo.float()
        hi = torch.ones(k) if hi is None else hi.float()
        z, r = (hi + lo) / 2, (hi - lo) / 2
        wmax = wf.abs().amax(0)
        s = torch.where((r > 0) & (wmax > 0), r.pow(ALPHA) / wmax.clamp_min(1e-12).pow(1 - ALPHA), torch.ones_like(r))
        folded = torch.zeros((n, -(-k // CHUNK) * CHUNK))
        folded[:, :k] = wf * s
        chunks = folded.view(n, -1, CHUNK)
        ws = chunks.abs().amax(2).clamp_min(1e-12) / 127  # (N, chunks)
        codes = torch.round(chunks / ws[:, :, None]).clamp(-127, 127).to(torch.int8).view(n, -1)[:, :k]
        return cls(codes.contiguous(), ws, z.contiguous(), s.contiguous(), (wf @ z).contiguous(), dtype)

    def __call__(self, x, bias=None):
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = self._blocked(x2) if x2.shape[0] >= BLOCKED_ROWS and x2.dtype == torch.bfloat16 else None
        if y is None:
            y = kernels.w8a8_matmul(x2, self.packed, self.ws_tiles, self.wsum, self.z, self.inv_s, self.bias)
        if y is None:
            y = self.reference(x2)
        if bias is not None:
            y = y + bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.shape[0])

    def _blocked(self, x: torch.Tensor) -> torch.Tensor | None:
        """A long chunk: the weights held, dequantized to bf16 for this call, times x in bf16 (not
        quantized) by a blocked matmul, plus ``bias - W_held z`` (the centre's share, small: W
        less its int8 rounding). None where the CPU has no kernel for the dequantization."""
        n, k = self.shape
        w = kernels.w8a8_dequant(self.packed, self.ws_tiles, self.inv_s, n, k)
        if w is None:
            return None
        return F.linear(x, w, self.centre_bias)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel's arithmetic in PyTorch (its oracle): ``x (M, K) -> (M, N)`` in x's dtype."""
        xs = (x.float() - self.z) * self.inv_s
        amax = xs.abs().amax(1)
        # 127 / amax as a division (a scalar over a tensor would be its reciprocal times 127)
        r = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.ones_like(amax))
        q = torch.round(xs * r[:, None]).clamp(-127, 127).double()
        codes = self.codes.double()
        total = torch.zeros((x.shape[0], self.shape[0]))
        for c in range(self.ws.shape[1]):  # chunk by chunk, as the kernel adds them
            part = slice(c * CHUNK, (c + 1) * CHUNK)
            acc = (q[:, part] @ codes[:, part].T).float()  # int8 products summed exactly
            total = total + acc * self.ws[:, c]
        return (total * (1 / r)[:, None] + self.bias).to(x.dtype)

    def rows(self, ids):
        """Rows ``ids`` of the weights held (an embedding table tied to the output head)."""
        n, k = self.shape
        codes = self.packed[ids // 16, :, :, ids % 16].reshape(len(ids), -1)[:, :k]
        scale = self.ws[ids].repeat_interleave(CHUNK, 1)[:, :k]
        return (codes.float() * scale / self.s).to(self.dtype)

    def dense(self):
        """The weights held: ``W' / s`` column by column (without the centre, which is in the bias)."""
        scale = self.ws.repeat_interleave(CHUNK, 1)[:, :self.shape[1]]
        return self.codes.float() * scale / self.s

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.packed, self.ws_tiles, self.wsum, self.z, self.s,
                                                           self.inv_s, self.bias, self.centre_bias))

    @classmethod
    def cat(cls, parts):
        if all(p.source is not None for p in parts):  # before calibration: stack the floats
            return _pending(torch.cat([p.source for p in parts]), parts[0].dtype)
        assert all(torch.equal(p.z, parts[0].z) and torch.equal(p.s, parts[0].s) for p in parts), \
            "w8a8 matrices stack only over the same input"
        return cls(torch.cat([p.codes for p in parts]), torch.cat([p.ws for p in parts]), parts[0].z, parts[0].s,
                   torch.cat([p.bias for p in parts]), parts[0].dtype)


def _pending(w: torch.Tensor, dtype: torch.dtype) -> W8A8Linear:
    """``w`` packed with unit input ranges, its float kept for the model's calibration."""
    lin = W8A8Linear.from_float(w, None, None, dtype)
    lin.source = w
    return lin


class _Ranges:
    """A float matrix that records the channel range of its inputs (while calibrating)."""

    def __init__(self, w: torch.Tensor):
        self.w, self.lo, self.hi = w, None, None

    def __call__(self, x, bias=None):
        x2 = x.reshape(-1, x.shape[-1]).float()
        lo, hi = x2.amin(0), x2.amax(0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        return F.linear(x, self.w.to(x.dtype), bias)

    def rows(self, ids):
        return F.embedding(ids, self.w)


@register
class W8A8(Format):
    name = "w8a8"
    help = ("int8 weights x int8 activations (OutlierTune: per-channel activation scales and centres folded "
            "into the weights, calibrated on real text), on AMX int8 tiles or VNNI: 8 bits a weight")

    def pack(self, name, w, raw, dtype):
        if any(e in name for e in EIGHT_BIT):  # a table of rows as well as the output head: as q4 keeps it
            return Q4().pack(name, w, raw, dtype)
        return _pending(w, dtype)  # unit ranges until finish() measures the model's

    def finish(self, model) -> None:
        """Pack the matrices for their inputs' channel ranges, measured on calibration text with
        the float weights. A kind of matrix (``down_proj``, ``o_proj``, ...) whose 8-bit
        activations alone raise the calibration text's perplexity by more than
        ``KEEP_WEIGHT_ONLY`` stays weight-only (8-bit groups, ``q8``), and the log says so. Both
        are measured once per model and kept in ``<cache_dir>/calibration/`` (a few seconds to
        a minute on 2 cores), like the KV statistics."""
        from kvtier.kv import calibration

        pending = {n: w for n, w in model.w.items() if isinstance(w, W8A8Linear) and w.source is not None}
        if not pending:
            return

        def compute(ids):
            with status(f"calibrating w8a8 on {len(ids)} tokens: activation ranges, then each kind of matrix "
                        "(once per model)"):
                ranges, weight_only = _measure(model, pending, ids)
            return ({f"{n}.{side}": t for n, (lo, hi) in ranges.items() for side, t in (("lo", lo), ("hi", hi))},
                    {"weight_only": ",".join(sorted(weight_only))})

        tensors, meta = calibration.stored(model, "w8a8", VERSION, compute)
        ranges = {n: (tensors[f"{n}.lo"], tensors[f"{n}.hi"]) for n in pending}
        weight_only = set(filter(None, meta.get("weight_only", "").split(",")))
        for n, w in pending.items():
            model.w[n] = (quantize(w.source, 8, w.dtype) if kind(n) in weight_only
                          else W8A8Linear.from_float(w.source, *ranges[n], w.dtype))
        if weight_only:
            note(f"w8a8: {', '.join(sorted(weight_only))} kept weight-only (8-bit groups): int8 activations "
                 f"there raised the calibration text's perplexity by more than {KEEP_WEIGHT_ONLY:.0%}")


def _measure(model, pending: dict[str, W8A8Linear], ids: list[int]) -> tuple[dict, set[str]]:
    """Each matrix's input range ``(lo, hi)`` per channel, and the kinds to keep weight-only."""
    from kvtier.engine import ModelRunner

    floats = {n: _Ranges(w.source) for n, w in pending.items()}
    model.w.update(floats)
    runner = ModelRunner(model, "dense")
    runner.feed([runner.new_cache(len(ids))], [ids])  # the ranges: one prefill of the text
    ranges = {n: (f.lo, f.hi) for n, f in floats.items()}
    weight_only = costly_kinds(model, ids, list(pending), floats.__getitem__,  # that kind in w8a8, the rest float
                               lambda n: W8A8Linear.from_float(pending[n].source, *ranges[n], pending[n].dtype),
                               KEEP_WEIGHT_ONLY)
    return ranges, weight_only
