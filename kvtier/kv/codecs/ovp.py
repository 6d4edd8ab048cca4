"""``ovp``: OliVe's outlier-victim pairs, memory-aligned 4-bit codes with local outliers.

Elements are paired with their neighbour, one pair per byte (first element in the low
nibble). A normal element is a sign-magnitude int4 in ``[-7, 7]`` times the row's scale; the
code ``1000`` (minus zero) is never a normal value and marks a *victim*: when one element of a
pair is an outlier, its neighbour is pruned to zero and stores ``1000``, and the outlier's
nibble switches to OliVe's 4-bit "abfloat" (E2M1 with an exponent bias, so the grid starts
above the normal range): sign plus an index into ``{12, 16, 24, 32, 48, 64, 96}`` scale steps.
No side lists, no sparse index: exactly 4 bits per element plus the row's scale. Each pair
takes whichever of its three forms (normal/normal, outlier/victim, victim/outlier) has the
smallest squared error; each row's scale is the one, of ``row max / {7, 12, 16, ..., 96}``,
with the smallest squared error: the row's largest element always lands on a grid point
(an int4 or abfloat maximum, exact to the fp16 scale's rounding), so a massive value keeps
its size.

Rows: values per token (pairs of adjacent channels, one fp16 scale per token and head). Keys
per channel over the block's tokens, like KIVI (pairs of adjacent tokens): key outlier
channels get their own scale, and OVP catches the outlier tokens. Key channels carry large
offsets (an outlier channel is often nearly constant), which a symmetric int4 would waste
half its codes on, so each key channel is first centred on its midrange, stored as fp16.

Bytes per token and KV head, D channels, blocks of B tokens: keys ``D/2 + 4 D / B``
(codes, fp16 scale and centre per channel), values ``D/2 + 2``; for D = B = 64: 36 + 34 = 70
bytes, 4.375 bits per element. The first ``sinks`` tokens (attention sinks) are kept
unencoded by the cache.

Measured on SmolLM2-135M (``kvtier bench ppl``, 2K context, 2 windows; KL of the next-token
distribution to the fp32 cache's): +1.26 % PPL, KL 0.0108; without sinks +3.1 %;
int(bits=4), at 4.5 bits: +1.38 %, KL 0.0144. Keys without the centre were 4x worse.
Real KV rows are not heavy-tailed enough for victims to pay off much: per row, OVP's
squared error is close to a plain symmetric int4's (keys 0.085 vs 0.085, values 0.107 vs
0.115 relative); the sinks and the centres matter more.

Attention runs on the pair bytes in a native kernel (``kernels/ovpattn.c``): a byte is looked
up as its two steps, the key scales and centres are moved to the query.

Paper: Guo et al., "OliVe: Accelerating Large Language Models via Hardware-friendly
Outlier-Victim Pair Quantization", ISCA 2023, https://arxiv.org/abs/2304.07493
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtier import kernels
from kvtier.errors import KvtierError
from kvtier.kv.codecs.base import Codec, plain_pieces
from kvtier.registry import param, register

NORMAL_MAX = 7
VICTIM = 8  # sign-magnitude "-0": the victim's code
OUTLIERS = (12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0)  # abfloat magnitudes, indices 1..7
RATIOS = (float(NORMAL_MAX), *OUTLIERS)  # row max / scale: the max is a grid point


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(256, 2)``: the two values (in scale steps) a pair byte stands for; and the outlier grid."""
    normal = [float(c) if c < 8 else float(8 - c) for c in range(16)]  # VICTIM -> 0
    outlier = [0.0, *OUTLIERS, 0.0, *(-o for o in OUTLIERS)]
    table = []
    for byte in range(256):
        lo, hi = byte & 15, byte >> 4
        if lo == VICTIM:
            table.append((0.0, outlier[hi]))
        elif hi == VICTIM:
            table.append((outlier[lo], 0.0))
        else:
            table.append((normal[lo], normal[hi]))
    return torch.tensor(table, device=device), torch.tensor(OUTLIERS, device=device)


def quantize_pairs(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y: ``(..., L)`` in scale steps, L even -> pair bytes ``(..., L/2)`` uint8 and squared error ``(...,)``."""
    _, grid = _tables(y.device)
    a, b = y[..., 0::2], y[..., 1::2]  # (..., L/2)
    # normal/normal
    qa, qb = a.round().clamp(-NORMAL_MAX, NORMAL_MAX), b.round().clamp(-NORMAL_MAX, NORMAL_MAX)
    err_n = (a - qa).square() + (b - qb).square()
    code_n = _sm(qa) | (_sm(qb) << 4)
    # outlier/victim, either way round: the nearest abfloat magnitude
    best = []
    for x, other in ((a, b), (b, a)):
        idx = torch.bucketize(x.abs().contiguous(), (grid[1:] + grid[:-1]) / 2)  # nearest magnitude, 0..6
        err = (x - torch.sign(x) * grid[idx]).square() + other.square()
        code = (idx + 1).to(torch.uint8) | ((x < 0).to(torch.uint8) << 3)
        best.append((err, code))
    (err_a, code_a), (err_b, code_b) = best
    code_a = code_a | (VICTIM << 4)
    code_b = VICTIM | (code_b << 4)
    use_a = err_a < err_n
    err, code = torch.where(use_a, err_a, err_n), torch.where(use_a, code_a, code_n)
    use_b = err_b < err
    err, code = torch.where(use_b, err_b, err), torch.where(use_b, code_b, code)
    return code, err.sum(-1)


def _sm(q: torch.Tensor) -> torch.Tensor:
    """Integers in [-7, 7] -> 4-bit sign-magnitude codes (never 1000)."""
    return (q.abs().to(torch.uint8)) | ((q < 0).to(torch.uint8) << 3)


def encode_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: ``(..., L)`` fp32, one scale per row -> pair bytes ``(..., L/2)`` and fp16 scales ``(...,)``."""
    amax = x.abs().amax(-1)
    best_code, best_scale, best_err = None, None, None
    for r in RATIOS:
        scale = (amax / r).clamp(max=65504.0).half()  # fp16: finite however large the row
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
        code, err = quantize_pairs(x / safe.unsqueeze(-1))
        err = err * safe.square()
        if best_err is None:
            best_code, best_scale, best_err = code, scale, err
        else:
            better = err < best_err
            best_code = torch.where(better.unsqueeze(-1), code, best_code)
            best_scale, best_err = torch.where(better, scale, best_scale), torch.where(better, err, best_err)
    return best_code, best_scale


def decode_rows(code: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Pair bytes ``(..., L/2)`` and scales ``(...,)`` -> values ``(..., L)`` fp32."""
    table, _ = _tables(code.device)
    return F.embedding(code.int(), table).flatten(-2) * scale.float().unsqueeze(-1)


@register
@dataclass(frozen=True)
class Ovp(Codec):
    """OliVe outlier-victim pairs: int4 pairs where an outlier takes its neighbour's slot; keys per channel, values per token."""

    name = "ovp"
    group_blocks = 64  # attention on the codes: fewer, larger steps
    bits: int = param(4, "bits per element (int4 normals, abfloat outliers)", choices=(4,))
    sinks: int = param(4, "first tokens kept in full precision (attention sinks)", min=0, max=64)

    def fields(self, block_size, head_dim):
        if block_size % 2 or head_dim % 2:
            raise KvtierError(f"ovp pairs elements: block size {block_size} and head dimension "
                              f"{head_dim} must be even")
        return {"k": ((head_dim, block_size // 2), torch.uint8), "k_scale": ((head_dim,), torch.float16),
                "k_centre": ((head_dim,), torch.float16),
                "v": ((block_size, head_dim // 2), torch.uint8), "v_scale": ((block_size,), torch.float16)}

    def encode(self, k, v):
        k, v = k.float(), v.float()
        kt = k.transpose(-1, -2)  # (Hkv, n, D, B): a row per key channel
        centre = ((kt.amax(-1) + kt.amin(-1)) / 2).half()
        kc, ks = encode_rows(kt - centre.float().unsqueeze(-1))
        vc, vs = encode_rows(v)   # (Hkv, n, B, D): a row per token
        return {"k": kc, "k_scale": ks, "k_centre": centre, "v": vc, "v_scale": vs}

    def decode(self, data, dtype):
        k = decode_rows(data["k"], data["k_scale"]) + data["k_centre"].float().unsqueeze(-1)
        k = k.transpose(-1, -2)  # (Hkv, n, D, B) -> (Hkv, n, B, D)
        v = decode_rows(data["v"], data["v_scale"])
        h, n, b, d = v.shape
        return k.reshape(h, n * b, d).to(dtype), v.reshape(h, n * b, d).to(dtype)

    def attend(self, q, data, rope=None):
        """Softmax pieces on the pair bytes in the native kernel (kernels/ovpattn.c: the key
        scales and centres moved to the query), or None (no kernel: decoded)."""
        return kernels.ovp_attend(q, data, _tables(q.device)[0])

    def native_job(self, data, rows, rope=None):
        """:meth:`attend` as a job of the batched decode kernel."""
        return kernels.ovp_job(data, _tables(torch.device("cpu"))[0], rows)

    def attend_torch(self, q, data):
        """The reference of the kernel: the blocks decoded, softmax pieces in fp32."""
        return plain_pieces(q, *self.decode(data, torch.float32))
