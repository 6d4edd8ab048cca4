"""Every codec inside attention: the fast path (on packed codes where a codec has one, else
decoded group by group) equals the reference over the decoded cache, and stays within the
codec's error of attention over the original keys and values."""

import pytest
import torch

from kvtier import registry, spec
from kvtier.attention import attend, reference
from kvtier.kv.cache import LayerKV, Part
from kvtier.kv.codecs.base import LayerContext
from kvtier.models.base import Rope


def filled(name: str, n: int = 1100, dtype=torch.float32, window=None):
    codec = spec.parse(name).codec
    rope = Rope(1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64))
    torch.manual_seed(0)
    k = torch.randn(2, n, 64) * torch.linspace(0.2, 3, 64)
    k[:, :, 5] += 4.0  # an outlier channel, as real keys have
    v = torch.randn(2, n, 64)
    layer = LayerKV(codec, n_kv=2, head_dim=64, dtype=dtype, window=window,
                    ctx=LayerContext(0, 2, 64, _stats(k, v, rope), rope))
    layer.append(k[:, :n - 1].to(dtype), v[:, :n - 1].to(dtype))
    layer.append(k[:, n - 1:].to(dtype), v[:, n - 1:].to(dtype))
    return layer, k, v


def _stats(k, v, rope):
    kpre = rope.rotate(k, 0, inverse=True)
    return {f"{kind}_{f}": fn(x) for kind, x in (("k", k), ("kpre", kpre), ("v", v))
            for f, fn in (("absmax", lambda x: x.abs().amax(1)), ("rms", lambda x: x.pow(2).mean(1).sqrt()))}


@pytest.mark.parametrize("name", [n for n, c in registry.methods().items() if c.kind == "codec"]
                         + ["rotatekv(bits=4,rope=post,rotate=32)"])
def test_fast_attention_equals_reference_on_the_stored_cache(name):
    layer, k, v = filled(name)
    q = torch.randn(6, 1, 64)
    fast = attend(q, layer.parts(), layer.length - 1, 0.125)
    decoded = [Part(*p.get(), p.start) for p in layer.parts()]
    ref = reference(q, decoded, layer.length - 1, 0.125)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)
    exact = reference(q, [Part(k, v, 0)], layer.length - 1, 0.125)
    rel = (fast - exact).norm() / exact.norm()
    name = spec.format_method(layer.codec)
    # Gaussian data; sparse drops half of each token's channels, which Gaussian data (no heavy
    # channels, unlike real keys) feels most
    two_bit = "bits=2" in name or name.startswith("vq(dim=8,stages=2")  # vq: 8 x stages / dim bits
    bound = 0.7 if two_bit else 0.45 if name.startswith("sparse") else 0.35
    assert rel < bound, rel  # lossy, yet attention still reads the same history


@pytest.mark.parametrize("name", ["int(bits=2)", "int(bits=4,group=32)", "int(bits=8)"])
def test_packed_int_attention_in_bf16(name):
    layer, _, _ = filled(name, dtype=torch.bfloat16)
    q = torch.randn(6, 1, 64).bfloat16()
    groups = [p for p in layer.parts() if p.score is not None]
    assert groups and groups[0].score(torch.randn(2, 3, 64).bfloat16()) is not None
    fast = attend(q, layer.parts(), layer.length - 1, 0.125).float()
    decoded = [Part(*(t.float() for t in p.get()), p.start) for p in layer.parts()]
    ref = reference(q.float(), decoded, layer.length - 1, 0.125)
    assert (fast - ref).norm() / ref.norm() < 0.02  # dense bf16 storage: 0.007


def test_sinks_leave_a_sliding_layer_once_outside_its_window():
    # a sliding layer with sinks: once the window has moved past them, the sinks are no longer
    # a part (they would leave a gap before the oldest block still held)
    layer, k, v = filled("rotatekv", n=600, window=128)
    parts = layer.parts()
    assert parts[0].start > 0
    assert all(a.start + a.n == b.start for a, b in zip(parts, parts[1:]))
    q = torch.randn(4, 3, 64)
    out = attend(q, parts, layer.length - 3, 0.125, window=128)  # a prefill-shaped query
    decoded = [Part(*p.get(), p.start) for p in parts]
    torch.testing.assert_close(out, reference(q, decoded, layer.length - 3, 0.125, window=128),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["rotatekv(rope=post)", "rotatekv(bits=4,rope=post,rotate=32)"])
def test_rotatekv_post_rope_attends_on_its_packed_codes(name):
    """rope=post rotates the query, not the keys: its blocks are attended without decoding."""
    layer, _, _ = filled(name)
    assert not layer.codec.pre_rope and layer.codec.perm is not None
    blocks = [p for p in layer.parts() if p.blocks is not None]
    assert blocks
    q = torch.randn(2, 3, 64)
    pieces = layer.codec.attend(q, blocks[0].blocks.fields())
    assert pieces is not None
    m, l, o = pieces
    k, v = layer.codec.decode(blocks[0].blocks.fields(), torch.float32)
    s = q @ k.transpose(1, 2)
    top = s.amax(-1, keepdim=True)
    p = torch.exp(s - top)
    torch.testing.assert_close(m, top, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(l, p.sum(-1, keepdim=True), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o, p @ v, atol=1e-3, rtol=1e-4)
    # and in attention: the packed path equals attention over the decoded cache
    qa = torch.randn(6, 1, 64)
    decoded = [Part(*part.get(), part.start) for part in layer.parts()]
    torch.testing.assert_close(attend(qa, layer.parts(), layer.length - 1, 0.125),
                               reference(qa, decoded, layer.length - 1, 0.125), atol=2e-5, rtol=1e-4)
