"""Which codec errors reach attention: per layer, the relative error of the attention output
of a window's last 256 queries when only the keys, only the values, or both are stored by a
codec (the sinks and the newest 320 tokens kept exact, as the cache keeps its 16-bit tokens),
on SmolLM2 over one 8K KJV window far from the calibration span.

    .venv/bin/python scripts/attn_error.py --at 0.5 --methods rotatekv --methods vq --json results/x.json
"""

from __future__ import annotations

import argparse
import json

import torch

from kvtier import spec
from kvtier.bench.data import kjv
from kvtier.engine import ModelRunner
from kvtier.kv import calibration
from kvtier.kv.cache import LayerKV
from kvtier.kv.codecs.base import LayerContext
from kvtier.models import load

QUERIES, EXACT_RECENT, SINKS = 256, 320, 4


class _Recorder(calibration._Recorder):
    """Keeps every pre-RoPE key and value it is given (fp32)."""

    def encode(self, k, v):
        h, n, b, d = k.shape
        kf, vf = k.float().reshape(h, n * b, d), v.float().reshape(h, n * b, d)
        seen = self.acc.get("n", 0)
        self.acc.setdefault("all", []).append((self.rope.rotate(kf, seen, inverse=True), vf))
        self.acc["n"] = seen + n * b
        return {"k": k.float(), "v": v.float()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--at", type=float, default=0.5, help="where in the KJV the window starts (fraction)")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--layers", default="3,10,18,25")
    ap.add_argument("--methods", action="append", required=True)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load(a.model)
    m, layers = loaded.model, [int(x) for x in a.layers.split(",")]
    text = kjv()
    start = int(len(text) * a.at)
    ids = loaded.tokenizer(text[start:start + 8 * a.context])["input_ids"][:a.context]
    queries: dict[int, list] = {}

    def observe(layer, q, scale):  # the prefill's queries, pre-scaled
        if layer.index in layers:
            queries.setdefault(layer.index, []).append(q.float() * scale)

    LayerKV.observe = observe
    runner = ModelRunner(m, "dense(dtype=fp32)")
    recs = [_Recorder() for _ in range(m.n_layers)]
    cache = runner.new_cache(len(ids))
    for layer, rec in zip(cache.layers, recs):
        layer.codec = layer.pool.codec = rec.for_layer(LayerContext(0, m.n_kv, m.head_dim, rope=layer.rope))
    runner.feed([cache], [ids])
    stats = calibration.load(m)
    rows = []
    for i in layers:
        q = torch.cat(queries[i], 1)[:, -QUERIES:]
        rope = cache.layers[i].rope
        kpre = torch.cat([k for k, _ in recs[i].acc["all"]], 1)
        v = torch.cat([x for _, x in recs[i].acc["all"]], 1)
        t = kpre.shape[1] // 64 * 64
        kpre, v = kpre[:, :t], v[:, :t]
        k = rope.rotate(kpre, 0)

        def attend(kk, vv, q=q, t=t):
            g = q.shape[0] // kk.shape[0]
            s = q @ kk.repeat_interleave(g, 0).transpose(1, 2)
            s = s.masked_fill(torch.arange(t)[None] > torch.arange(t - QUERIES, t)[:, None], float("-inf"))
            return torch.softmax(s, -1) @ vv.repeat_interleave(g, 0)

        exact = attend(k, v)
        for name in a.methods:
            codec = spec.parse(name).codec.for_layer(LayerContext(i, m.n_kv, m.head_dim, stats[i], rope))
            n = t // 64
            kd, vd = codec.decode(codec.encode(kpre.reshape(-1, n, 64, m.head_dim), v.reshape(-1, n, 64, m.head_dim)),
                                  torch.float32)
            kd = rope.rotate(kd, 0)
            for x, y in ((kd, k), (vd, v)):
                x[:, :SINKS], x[:, -EXACT_RECENT:] = y[:, :SINKS], y[:, -EXACT_RECENT:]

            def err(o, exact=exact):
                return round(((o - exact).norm() / exact.norm()).item(), 4)

            row = {"layer": i, "method": spec.format_method(spec.parse(name).codec),
                   "keys": err(attend(kd, v)), "values": err(attend(k, vd)), "both": err(attend(kd, vd))}
            rows.append(row)
            print(row, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            meta = {"model": a.model, "context": a.context, "at": a.at, "queries": QUERIES}
            json.dump({**meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
