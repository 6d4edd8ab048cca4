import pytest

from kvtier import registry, spec
from kvtier.errors import KvtierError


def test_round_trip_is_canonical():
    s = spec.parse("dense(dtype=fp16)")
    assert str(s) == "dense(dtype=fp16)"
    assert spec.parse(str(s)) == s


@pytest.mark.parametrize("text", ["dense", "dense()", " dense ( dtype = bf16 ) ", "", None])
def test_defaults_fill_in(text):
    assert str(spec.parse(text)) == "dense(dtype=bf16)"


@pytest.mark.parametrize("name", list(registry.methods()))
def test_every_registered_method_round_trips(name):
    s = spec.parse(name)
    assert spec.parse(str(s)) == s
    assert registry.describe(type(s.codec))


@pytest.mark.parametrize("text, words", [
    ("dens(dtype=fp16)", ["unknown method 'dens'", "dense"]),
    ("dense(bits=2)", ["no parameter 'bits'", "dtype"]),
    ("dense(dtype=fp8)", ["dtype=fp8", "fp32, fp16, bf16"]),
    ("dense(dtype=fp16", ["unbalanced '('"]),
    ("dense(dtype)", ["param=value"]),
    ("dense+dense", ["at most one codec"]),
    ("dense(dtype=fp16)x", ["cannot parse"]),
])
def test_bad_specs_name_the_bad_part(text, words):
    with pytest.raises(KvtierError) as e:
        spec.parse(text)
    for w in words:
        assert w in str(e.value)
