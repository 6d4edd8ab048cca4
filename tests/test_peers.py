"""Peers (kvtier.bench.peers): spec parsing and errors (fast), and each peer's benchmark row on
the real default model when the peer is installed (scripts/bench-setup.sh)."""

import importlib.util
import math
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
from rich.console import Console

from kvtier import spec as specs
from kvtier.bench import peers, report
from kvtier.errors import KvtierError

HAS_QUANTO = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None
HAS_LLAMACPP = importlib.util.find_spec("llama_cpp") is not None
DENSE_FP32_BYTES = 30 * 2 * 3 * 64 * 4  # SmolLM2: layers x (K, V) x kv heads x head_dim x fp32


# --- parsing and errors (no model, nothing imported from the peers' packages) ---------------

def test_peers_are_registered_by_name():
    assert list(peers.peers()) == ["hf-quanto", "llamacpp"]


@pytest.mark.parametrize("text, canonical", [
    ("llamacpp(kv=q8_0)", "llamacpp(kv=q8_0)"),
    (" llamacpp ( kv = q4_0 ) ", "llamacpp(kv=q4_0)"),
    ("llamacpp", "llamacpp(kv=f16)"),
    ("llamacpp(fa=off)", "llamacpp(kv=f16,fa=off)"),
    ("hf-quanto(bits=2)", "hf-quanto(bits=2,group=64,residual=128)"),
    ("hf-quanto", "hf-quanto(bits=4,group=64,residual=128)"),
    ("hf-quanto(bits=4,residual=64)", "hf-quanto(bits=4,group=64,residual=64)"),
])
def test_peer_specs_parse_to_canonical_labels(text, canonical):
    p = peers.parse(text)
    assert isinstance(p, peers.Peer) and str(p) == canonical
    assert peers.parse(str(p)) == p


def test_a_kvtier_spec_is_not_a_peer():
    assert peers.parse("int(bits=4)") is None
    assert isinstance(peers.method("int(bits=4)"), specs.CacheSpec)
    assert isinstance(peers.method("llamacpp(kv=f16)"), peers.Peer)


@pytest.mark.parametrize("text, message", [
    ("hf-quanto(bits=3)", "hf-quanto: bits=3 is not one of 2, 4"),
    ("hf-quanto(bits=four)", "hf-quanto: bits='four' is not a valid int"),
    ("hf-quanto(residual=0)", "residual=0 is below its minimum 1"),
    ("llamacpp(kv=q5_1)", "llamacpp: kv=q5_1 is not one of f16, q8_0, q4_0"),
    ("llamacpp(type_k=f16)", "llamacpp has no parameter 'type_k'; its parameters: kv, fa"),
    ("llamacpp(kv=)", "bad argument 'kv=' in 'llamacpp(kv=)': write param=value"),
    ("llamacpp(kv=f16", "unbalanced '('"),
    ("llamacpp(kv=q4_0,fa=off)", "a q4_0 cache needs flash attention"),
    ("snapkv(ratio=0.5)+llamacpp(kv=q8_0)", "the peer llamacpp does not compose with '+'"),
])
def test_bad_peer_specs_say_what_is_wrong(text, message):
    with pytest.raises(KvtierError) as e:
        peers.parse(text)
    assert message in str(e.value)


def test_an_unknown_name_lists_methods_and_peers():
    with pytest.raises(KvtierError, match=r"unknown method 'llama-cpp'.*valid methods: .*dense.*; peers: hf-quanto, llamacpp"):
        peers.method("llama-cpp(kv=f16)")


def test_a_peer_that_is_not_installed_says_how_to_install_it():
    @dataclass(frozen=True)
    class Missing(peers.Peer):
        name: ClassVar[str] = "missing"
        needs: ClassVar[tuple[str, str]] = ("kvtier_no_such_pkg.sub", "no-such-pkg")
        load = score = timing = lambda *args, **kwargs: None  # never reached: require() fails first

    with pytest.raises(KvtierError, match=r"^missing needs no-such-pkg: run bash scripts/bench-setup.sh$"):
        Missing().require()


def test_cli_rejects_a_bad_peer_in_one_line_before_loading_anything():
    r = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "ppl", "--methods", "llamacpp(kv=q5_1)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "kvtier: error: llamacpp: kv=q5_1 is not one of f16, q8_0, q4_0"


def test_cli_speed_rejects_a_name_that_is_no_peer():
    r = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "speed", "--peers", "int(bits=4)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "kvtier: error: --peers 'int(bits=4)' names no peer; peers: hf-quanto, llamacpp"


def test_tables_label_peer_rows():
    row = {"method": "llamacpp(kv=q8_0)", "model": "m", "context": 512, "ppl": 10.1, "dense_ppl": 10.0,
           "kv_bytes_per_token": 12240.0, "bits_per_element": 8.5, "decode_tok_s": 30.0,
           "dense_decode_tok_s": 40.0, "peer": True}
    console = Console(width=250, record=True)
    console.print(report.ppl_table([row, {**row, "method": "int(bits=8,group=64)", "peer": False}]))
    text = console.export_text()
    assert "llamacpp(kv=q8_0) (peer)" in text and "int(bits=8,group=64) (peer)" not in text


# --- rows on the real default model (only where the peer is installed) ---------------------

@pytest.fixture(scope="module")
def kjv_ids(smollm2):
    from kvtier.bench import data

    return smollm2.tokenizer(data.kjv()[:200_000], add_special_tokens=False).input_ids


@pytest.fixture
def one_thread():
    """llama.cpp follows torch's thread count; its threads spin at a barrier after every op, so
    on a busy shared machine two threads can run 100x slower than one. These tests check bytes
    and perplexity, not speed."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rows(smollm2, kjv_ids, methods, context=512, eval_tokens=160):
    from kvtier.bench import ppl

    rows = ppl.run(smollm2.model, "smollm2-135m", ["dense(dtype=fp32)", *methods], [context],
                   eval_tokens, kjv_ids, n_windows=2)
    dense, *others = rows
    assert "peer" not in dense and all(r["peer"] is True for r in others)
    assert all(r.keys() - {"peer"} == dense.keys() for r in others)  # same fields as kvtier rows
    return dense, others


@pytest.mark.e2e
@pytest.mark.skipif(not HAS_QUANTO, reason="optimum-quanto is not installed (bash scripts/bench-setup.sh)")
def test_hf_quanto_rows_hold_fewer_bytes_than_dense_and_stay_close_at_4_bits(smollm2, kjv_ids):
    # 512-token windows, 160 scored: the 128-token residual is flushed into int codes once
    dense, (q4, q2) = _rows(smollm2, kjv_ids, ["hf-quanto(bits=4)", "hf-quanto(bits=2)"])
    assert q4["method"] == "hf-quanto(bits=4,group=64,residual=128)"
    assert dense["kv_bytes_per_token"] == pytest.approx(DENSE_FP32_BYTES, rel=0.01)
    assert q2["kv_bytes_per_token"] < q4["kv_bytes_per_token"] < dense["kv_bytes_per_token"] / 2
    assert math.isfinite(q4["ppl"]) and abs(q4["ppl"] / dense["ppl"] - 1) < 0.05
    assert math.isfinite(q2["ppl"]) and q2["ppl"] > q4["ppl"]


@pytest.mark.e2e
@pytest.mark.skipif(not HAS_QUANTO, reason="optimum-quanto is not installed (bash scripts/bench-setup.sh)")
def test_hf_quanto_bytes_are_quantos_tensors_codes_scales_zero_points_and_residual(smollm2):
    import torch
    from transformers import AutoModelForCausalLM

    from kvtier.bench.peers import hfquanto

    hf = AutoModelForCausalLM.from_pretrained(smollm2.folder, dtype=torch.float32).eval()
    peer = peers.parse("hf-quanto(bits=4)")
    cache = peer.new_cache(hf)
    with torch.inference_mode():
        hf(torch.arange(100, 300)[None], cache=cache, use_cache=True)    # 200 tokens quantized
        hf(torch.arange(300, 310)[None], cache=cache, use_cache=True)    # 10 in the fp32 residual
    nbytes, elements = hfquanto.held(cache)
    # per token and layer, K and V each: 3 heads x 64 int4 codes (96 B) + 3 groups x fp32 scale
    # and fp32 zero point (24 B); the residual is fp32
    assert (nbytes, elements) == (200 * 30 * 2 * (96 + 24) + 10 * DENSE_FP32_BYTES, 210 * 30 * 2 * 192)


@pytest.mark.e2e
@pytest.mark.skipif(not HAS_LLAMACPP, reason="llama-cpp-python is not installed (bash scripts/bench-setup.sh)")
def test_llamacpp_rows_on_the_same_gguf_hold_ggml_type_sizes(smollm2, kjv_ids, one_thread):
    dense, (f16, q8, q4) = _rows(smollm2, kjv_ids, ["llamacpp(kv=f16)", "llamacpp(kv=q8_0)", "llamacpp(kv=q4_0)"])
    # 30 layers x (K, V) x 3 kv heads x 64: f16 2 B per element, q8_0 34 B and q4_0 18 B per 32
    assert [r["kv_bytes_per_token"] for r in (f16, q8, q4)] == [23040, 12240, 6480]
    assert [r["bits_per_element"] for r in (f16, q8, q4)] == [16.0, 8.5, 4.5]
    # llama.cpp runs the GGUF's Q4_1 weights itself (activations in q8): close to, not equal to, ours
    assert abs(f16["ppl"] / dense["ppl"] - 1) < 0.03
    assert abs(q8["ppl"] / f16["ppl"] - 1) < 0.02
    assert math.isfinite(q4["ppl"]) and abs(q4["ppl"] / f16["ppl"] - 1) < 0.10


@pytest.mark.e2e
@pytest.mark.skipif(not HAS_LLAMACPP, reason="llama-cpp-python is not installed (bash scripts/bench-setup.sh)")
def test_llamacpp_speed_row_is_timed_beside_kvtier(smollm2, kjv_ids, one_thread):
    from kvtier.bench import speed

    rows = speed.run(smollm2, [256], kjv_ids, new_tokens=4, repeats=1, peers=[peers.parse("llamacpp(kv=q4_0)")])
    ours, theirs = rows
    assert "peer" not in ours and theirs["peer"] is True and theirs["kv"] == "llamacpp(kv=q4_0)"
    assert theirs["context"] == ours["context"] == 256
    assert theirs["kvtier_decode_tok_s"] == ours["kvtier_decode_tok_s"]
    assert theirs["prefill_tok_s"] > 0 and theirs["decode_ratio"] == pytest.approx(
        ours["kvtier_decode_tok_s"] / theirs["decode_tok_s"])
