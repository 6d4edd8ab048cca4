"""Per-layer KV statistics from a short real text, for codecs that adapt to a model's outliers.

A calibration pass prefills ``TOKENS`` tokens of the KJV (taken from a fixed place between the
benchmark windows) through the model with a recording cache and keeps, per layer and KV head,
the absolute maximum, the RMS and the mean of every channel of the post-RoPE keys (``k``), the pre-RoPE
keys (``kpre``) and the values (``v``), and a sample of the pre-RoPE keys and values themselves
(``kpre_sample``, ``v_sample``: ``SAMPLE_BLOCKS`` blocks of 64 consecutive tokens spread over
the span, fp16) for codecs that fit a codebook to the data. Computed once per model, stored as safetensors in
``<cache_dir>/calibration/`` with the text's hash and the format version, then reused:
the same model always gets the same statistics.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from kvtier.errors import KvtierError
from kvtier.kv.codecs.base import Codec, LayerContext
from kvtier.paths import cache_dir
from kvtier.progress import status

VERSION = "4"  # 2: adds each channel's mean; 3: adds the samples; 4: 1,024 sample tokens (was 512)
TOKENS = 2048
WHERE = 1 / 6  # fraction into the text where the calibration span starts
KINDS = ("k", "kpre", "v")
SAMPLE_BLOCKS = 16  # blocks of 64 tokens kept as samples, every SAMPLE_EVERY-th from block 1
SAMPLE_EVERY = 2
SAMPLE_BLOCK = 64


def load(model) -> list[dict[str, torch.Tensor]]:
    """The model's statistics, ``[{f"{kind}_{absmax|rms|mean}": (Hkv, D) fp32}]`` per layer,
    with ``kpre_sample`` and ``v_sample`` ``(Hkv, S, D)`` fp16 (S = 1,024 tokens).

    Read from disk when this model was calibrated before; otherwise computed and stored.
    Models without a ``key`` (built in memory, e.g. in tests) are calibrated each time.
    """
    def compute(ids):
        with status(f"calibrating KV statistics on {len(ids)} tokens (once per model)"):
            stats = measure(model, ids)
        return {f"{i}.{k}": t for i, s in enumerate(stats) for k, t in s.items()}, {"tokens": str(len(ids))}

    flat, _ = stored(model, "", VERSION, compute)
    return [{k.split(".", 1)[1]: t for k, t in flat.items() if k.split(".")[0] == str(i)}
            for i in range(model.n_layers)]


def stored(model, name: str, version: str, compute) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata that ``compute(ids)`` derives from this model on the calibration
    text, computed once per model and kept as safetensors in ``<cache_dir>/calibration/``
    (named by the model's key, the text's hash, ``name`` and ``version``), then read back: the
    same model always gets the same numbers. A damaged file is computed again, never trusted;
    models without a ``key`` (built in memory, e.g. in tests) compute each time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    key = getattr(model, "key", None)
    ids = _calibration_ids(model)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()[:16]
    suffix = f"-{name}" if name else ""
    path = cache_dir("calibration") / f"{key}-{digest}{suffix}-v{version}.safetensors" if key else None
    if path is not None and path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception:
            path.unlink(missing_ok=True)
    tensors, meta = compute(ids)
    if path is not None:
        tmp = path.with_suffix(".tmp")
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp, metadata={"version": version, **meta})
        tmp.replace(path)
    return tensors, meta


def measure(model, ids: list[int]) -> list[dict[str, torch.Tensor]]:
    """Prefill ``ids`` with a recording cache and return the per-layer statistics."""
    from kvtier.engine import ModelRunner

    runner = ModelRunner(model, "dense(dtype=fp32)")
    recorders = [_Recorder() for _ in range(model.n_layers)]
    cache = runner.new_cache(len(ids))
    for layer, rec in zip(cache.layers, recorders):
        layer.codec = layer.pool.codec = rec.for_layer(LayerContext(0, model.n_kv, model.head_dim,
                                                                     rope=layer.rope))
    runner.feed([cache], [ids])
    return [rec.stats() for rec in recorders]


def _calibration_ids(model) -> list[int]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:  # a model without a tokenizer (tests): deterministic token ids
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, model.hf_config.vocab_size, (TOKENS,), generator=g).tolist()
    from kvtier.bench.data import kjv

    try:
        text = kjv()
    except KvtierError as e:
        raise KvtierError(f"calibration needs real text: {e}") from None
    start = int(len(text) * WHERE)
    ids = tokenizer(text[start:start + 40 * TOKENS])["input_ids"]
    if len(ids) < TOKENS:
        raise KvtierError("calibration text too short")
    return ids[:TOKENS]


@dataclass
class _Recorder(Codec):
    """A dense fp32 codec that also accumulates channel statistics of what it stores."""

    name = "_recorder"
    rope: object = None
    acc: dict = field(default_factory=dict)

    def for_layer(self, ctx):
        self.rope = ctx.rope
        return self

    def fields(self, block_size, head_dim):
        return {"k": ((block_size, head_dim), torch.float32), "v": ((block_size, head_dim), torch.float32)}

    def encode(self, k, v):
        h, n, b, d = k.shape
        kf, vf = k.float().reshape(h, n * b, d), v.float().reshape(h, n * b, d)
        seen = self.acc.get("n", 0)
        kpre = self.rope.rotate(kf, seen, inverse=True) if self.rope is not None else kf
        for kind, x in (("k", kf), ("kpre", kpre), ("v", vf)):
            top, sq, total = x.abs().amax(1), x.pow(2).sum(1), x.sum(1)  # (Hkv, D)
            if kind in self.acc:
                top = torch.maximum(top, self.acc[kind][0])
                sq, total = sq + self.acc[kind][1], total + self.acc[kind][2]
            self.acc[kind] = (top, sq, total)
        self.acc["n"] = seen + n * b
        for pos in range(seen, seen + n * b, SAMPLE_BLOCK):  # the sampled blocks, whole
            j = pos // SAMPLE_BLOCK
            if pos % SAMPLE_BLOCK == 0 and j % SAMPLE_EVERY == 1 and j // SAMPLE_EVERY < SAMPLE_BLOCKS:
                t = slice(pos - seen, pos - seen + SAMPLE_BLOCK)
                if t.stop <= n * b:
                    self.acc.setdefault("samples", []).append((kpre[:, t].half(), vf[:, t].half()))
        return {"k": k.float(), "v": v.float()}

    def decode(self, data, dtype):
        h, n, b, d = data["k"].shape
        return data["k"].reshape(h, n * b, d).to(dtype), data["v"].reshape(h, n * b, d).to(dtype)

    def stats(self) -> dict[str, torch.Tensor]:
        n = max(self.acc.get("n", 0), 1)
        out = {}
        for kind in KINDS:
            top, sq, total = self.acc[kind]
            out[f"{kind}_absmax"], out[f"{kind}_rms"], out[f"{kind}_mean"] = top, (sq / n).sqrt(), total / n
        samples = self.acc.get("samples")
        if samples:
            out["kpre_sample"] = torch.cat([k for k, _ in samples], 1)
            out["v_sample"] = torch.cat([v for _, v in samples], 1)
        return out
