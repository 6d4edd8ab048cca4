"""mixed: a codec at two widths by layer; the wider on the layers where the narrower errs most."""

import pytest
import torch
from conftest import tokens

from kvtier import spec
from kvtier.engine import ModelRunner
from kvtier.errors import KvtierError


@pytest.mark.parametrize("bad, match", [("mixed(avg=5)", "lo <= avg <= hi"), ("mixed(lo=4,hi=4,avg=4)", "lo < hi"),
                                        ("mixed(codec=int,lo=1,avg=2)", "int does not take bits=1"),
                                        ("mixed(codec=vq,hi=8,avg=3)", "vq does not take stages=8"),
                                        ("mixed(codec=mxfp4)", "no width parameter"),
                                        ("mixed(codec=int(bogus=1))", "no parameter 'bogus'")])
def test_bad_widths_are_refused_when_parsed(bad, match):
    with pytest.raises(KvtierError, match=match):
        spec.parse(bad)


def _stats(spiky: set[int], n_layers=4, h=2, s=256, d=64):
    """Calibration-like samples; the layers in ``spiky`` have a few huge values per token."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n_layers):
        k, v = torch.randn(h, s, d, generator=g), torch.randn(h, s, d, generator=g)
        if i in spiky:  # one element in eight 30x: a per-token 2-bit grid loses most of the rest
            v = torch.where(torch.rand(h, s, d, generator=g) < 0.125, 30 * v, v)
        out.append({"kpre_sample": k.half(), "v_sample": v.half()})
    return out


def test_the_wide_layers_are_where_the_narrow_codes_err_most():
    codec = spec.parse("mixed(codec=int(group=16),avg=3,hi=4,lo=2)").codec
    stats = _stats({1, 3})
    assert codec.plan(stats, 2, 64) == [2, 4, 2, 4]  # half the layers at 4 bits: an average of 3
    assert codec.plan(stats, 2, 64) is codec.plan(stats, 2, 64)  # decided once per model
    assert spec.parse("mixed(codec=int,avg=2.5,hi=4,lo=2)").codec.plan(stats, 2, 64).count(4) == 1


def test_a_cache_holds_the_inner_codec_per_layer_and_bytes_fall_between(llama):
    ids = tokens(300)
    nbytes, kinds = {}, {}
    for kv in ("int(bits=2,group=16)", "int(bits=4,group=16)", "mixed(codec=int(group=16),avg=3,hi=4,lo=2)"):
        runner = ModelRunner(llama, kv)
        cache = runner.new_cache()
        runner.feed([cache], [ids])
        nbytes[kv] = cache.nbytes()
        kinds[kv] = [(type(layer.codec).__name__, layer.codec.bits) for layer in cache.layers]
        cache.close()
    mixed = kinds["mixed(codec=int(group=16),avg=3,hi=4,lo=2)"]
    assert {name for name, _ in mixed} == {"Int"} and sorted(b for _, b in mixed) == [2, 4, 4]  # 1.5 layers, half up
    assert (nbytes["int(bits=2,group=16)"] < nbytes["mixed(codec=int(group=16),avg=3,hi=4,lo=2)"]
            < nbytes["int(bits=4,group=16)"])
