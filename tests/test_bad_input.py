"""Hostile input gets one clear error and loses nothing: invalid UTF-8, nan, repeated
parameters, truncated weights. Bad text and bad specs are refused before a model loads."""

import io
import os
import re
import subprocess
import sys

import pytest

from conftest import tiny_hf
from kvtier import registry, spec, textio
from kvtier.errors import KvtierError

KVTIER = [sys.executable, "-m", "kvtier.cli"]


def run_cli(*args, input: bytes = b"", cwd=None):
    """The real CLI, raw bytes on stdin; an argv ``str`` with lone surrogates goes out as raw bytes.
    UTF-8 mode reads stdin with surrogateescape, the setting where the bad bytes got furthest."""
    return subprocess.run(KVTIER + list(args), capture_output=True, input=input, cwd=cwd,
                          env={**os.environ, "PYTHONUTF8": "1"}, timeout=300)


def one_line_error(r) -> str:
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("kvtier: error:")]
    assert err.strip().splitlines()[-1] == line
    return line


@pytest.mark.parametrize("args, stdin, words", [
    (["generate", "-"], b"Hello \xff", ["stdin is not UTF-8", "0xff", "byte offset 6"]),
    (["generate", "ab\udcffc"], b"", ["the prompt", "0xff", "character 2"]),
    (["cache", "save", "-", "out.kvcache"], b"Hi \xc3", ["stdin is not UTF-8", "0xc3", "byte offset 3"]),
    (["generate", "--kv", "snapkv(ratio=nan)", "hi"], b"", ["ratio=nan", "not a finite number"]),
    (["generate", "--kv", "int(bits=4,bits=2)", "hi"], b"", ["'bits' is given twice"]),
])
def test_cli_refuses_bad_input_in_one_line(tmp_path, args, stdin, words):
    r = run_cli(*args, input=stdin, cwd=tmp_path)
    line = one_line_error(r)
    for w in words:
        assert w in line
    assert not r.stdout and "loading" not in r.stderr.decode()  # refused before the model loads
    assert not list(tmp_path.iterdir())  # nothing written


def test_cache_save_refuses_a_file_that_is_not_utf8(tmp_path):
    doc = tmp_path / "latin1.txt"
    doc.write_bytes("café\n".encode("latin-1"))
    out = tmp_path / "doc.kvcache"
    r = run_cli("cache", "save", str(doc), str(out))
    line = one_line_error(r)
    assert str(doc) in line and "0xe9" in line and "byte offset 3" in line
    assert not out.exists()


def test_read_text_decodes_stdin_strictly(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("naïve ✓".encode())))
    assert textio.read_text("-") == "naïve ✓"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok\n\x80")))
    with pytest.raises(KvtierError, match="stdin is not UTF-8 text: byte 0x80 at byte offset 3"):
        textio.read_text("-")


@pytest.mark.parametrize("text, says", [
    ("ab\udcffc", "character 2 is the byte 0xff"),
    ("\ud83d alone", "character 0 is a lone surrogate U+D83D"),
])
def test_check_text_names_the_lone_surrogate(text, says):
    with pytest.raises(KvtierError, match=re.escape(says)):
        textio.check_text(text)
    assert textio.check_text("naïve ✓ 😀") == "naïve ✓ 😀"


@pytest.mark.parametrize("text, says", [
    ("snapkv(ratio=nan)", "snapkv: ratio=nan"), ("quest(share=nan)", "quest: share=nan"),
    ("snapkv(ratio=-inf)", "snapkv: ratio=-inf"), ("compresskv(spread=inf)", "compresskv: spread=inf"),
    ("h2o(ada=NaN)", "h2o: ada=nan"), ("sparse(ratio=1e999)", "sparse: ratio=inf"),
    ("tova(ratio=0.5)+sparse(ratio=nan)", "sparse: ratio=nan"),
])
def test_non_finite_floats_are_refused_by_name(text, says):
    with pytest.raises(spec.SpecError, match="not a finite number") as e:
        spec.parse(text)
    assert str(e.value).startswith(says)


def test_every_float_parameter_refuses_nan():
    for name, cls in registry.methods().items():
        for f in registry.params(cls):
            if isinstance(f.default, float):
                with pytest.raises(spec.SpecError, match=f"{f.name}=nan is not a finite number"):
                    spec.parse(f"{name}({f.name}=nan)")


def test_a_repeated_parameter_is_refused():
    with pytest.raises(spec.SpecError, match="'bits' is given twice"):
        spec.parse("int(bits=4,bits=2)")
    with pytest.raises(spec.SpecError, match="'ratio' is given twice"):
        spec.parse("snapkv(ratio=0.5, ratio=0.5)+int(bits=4)")


def test_truncated_safetensors_names_the_file(tmp_path):
    from kvtier.models import loader

    tiny_hf("llama").save_pretrained(tmp_path)  # config + weights; the tokenizer is read after them
    weights = tmp_path / "model.safetensors"
    size = weights.stat().st_size
    for cut in (size // 2, 4):
        with open(weights, "r+b") as f:
            f.truncate(cut)
        with pytest.raises(KvtierError, match="damaged or truncated") as e:
            loader.load(str(tmp_path))
        assert str(weights) in str(e.value)
    r = run_cli("generate", "--model", str(tmp_path), "hi")
    line = one_line_error(r)
    assert str(weights) in line and "damaged or truncated" in line
    assert weights.stat().st_size == 4  # reported, not deleted or rewritten
