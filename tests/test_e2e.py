"""End to end on the real default model (SmolLM2-135M, shipped on PyPI) and the real CLI."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvtier.bench import data
from kvtier.engine import ModelRunner

pytestmark = pytest.mark.e2e
KVTIER = [sys.executable, "-m", "kvtier.cli"]


@pytest.fixture(scope="module")
def hf(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2.folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def kjv_ids(smollm2):
    return smollm2.tokenizer(data.kjv()[:200_000], add_special_tokens=False).input_ids


def test_logits_match_transformers_on_real_text(smollm2, hf, kjv_ids):
    ids = kjv_ids[1000:1400]
    runner = ModelRunner(smollm2.model, "dense(dtype=fp32)", prefill_chunk=150)
    ours = runner.feed([runner.new_cache()], [ids[:300]], logits="all")
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    assert (ours - want[:300]).abs().max() <= 1e-3
    cache = runner.new_cache()  # chunked prefill then token-by-token decode
    runner.feed([cache], [ids[:300]])
    rows = torch.stack([runner.feed([cache], [[t]])[0] for t in ids[300:340]])
    assert (rows - want[300:340]).abs().max() <= 1e-3


def test_dense_fp16_holds_23040_bytes_per_token_plus_block_table(smollm2, kjv_ids):
    runner = ModelRunner(smollm2.model, "dense(dtype=fp16)")
    cache = runner.new_cache()
    runner.feed([cache], [kjv_ids[:640]])
    blocks = 30 * 10  # 30 layers x 10 blocks of 64 tokens
    assert cache.nbytes() == 640 * 23040 + blocks * 8


def test_batch_generation_equals_one_at_a_time():
    from kvtier.api import LLM

    llm = LLM(dtype="fp32")
    prompts = ["The capital of France is", "In the beginning God created the heaven and the earth. And"]
    together = llm.generate(prompts, max_new_tokens=12)
    for p, t in zip(prompts, together):
        (alone,) = llm.generate(p, max_new_tokens=12)
        assert alone.token_ids == t.token_ids
    assert "Paris" in together[0].text


def test_ppl_harness_agrees_with_transformers(smollm2, hf, kjv_ids):
    from kvtier.bench import ppl

    rows = ppl.run(smollm2.model, "smollm2-135m", ["dense(dtype=fp32)", "dense(dtype=bf16)"],
                   [320], 64, kjv_ids, n_windows=2)
    fp32, bf16 = rows
    assert fp32["ppl"] == fp32["dense_ppl"] and bf16["dense_ppl"] == fp32["dense_ppl"]
    nll = []
    for w in data.windows(kjv_ids, 320, 2):
        with torch.no_grad():
            logits = hf(torch.tensor([w[:-1]])).logits[0, -64:]
        nll.append(torch.nn.functional.cross_entropy(logits, torch.tensor(w[-64:]), reduction="sum"))
    want = math.exp(sum(nll).item() / 128)
    assert f"{fp32['ppl']:.3g}" == f"{want:.3g}"
    assert abs(bf16["ppl"] / want - 1) < 0.02  # bf16 storage costs a little, not a lot
    assert bf16["kv_bytes_per_token"] < fp32["kv_bytes_per_token"]


def test_ppl_with_layers_skipped_costs_perplexity_against_the_full_model(smollm2, kjv_ids):
    from kvtier.bench import ppl

    full, skipped = ppl.run(smollm2.model, "smollm2-135m", ["dense(dtype=fp32)"], [256], 32, kjv_ids,
                            n_windows=1, skips=[0.0, 0.2])
    assert (full["skip_layers"], skipped["skip_layers"]) == (0.0, 0.2)
    assert full["ppl"] == full["dense_ppl"] == skipped["dense_ppl"]  # the baseline keeps every layer
    assert skipped["ppl"] > 1.05 * full["ppl"]  # six of 30 layers gone: the model gets worse
    assert smollm2.model.skip == frozenset()  # the model is put back


def run_cli(*args, input=None, env=None):
    return subprocess.run(KVTIER + list(args), capture_output=True, text=True, input=input,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_cli_generate_streams_and_reports_bytes():
    r = run_cli("generate", "--max-new-tokens", "8", "--kv", "dense(dtype=bf16)", "-",
                input="The capital of France is")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "kv dense(dtype=bf16):" in r.stderr and "bytes held" in r.stderr


def test_cli_generate_with_tiers_gives_the_same_text(tmp_path):
    prompt = data.kjv()[:6000]  # about 1,500 tokens: most blocks go to disk under a 4 MiB budget
    plain = run_cli("generate", "--max-new-tokens", "12", "--dtype", "fp32", "-", input=prompt)
    tiered = run_cli("generate", "--max-new-tokens", "12", "--dtype", "fp32", "--tiers",
                     f"cpu:4MiB,disk:{tmp_path}:1GiB", "-", input=prompt)
    assert plain.returncode == 0 and tiered.returncode == 0, tiered.stderr
    assert tiered.stdout == plain.stdout
    line = tiered.stderr.splitlines()[-1]
    assert line.startswith(f"[kvtier] tiers cpu:4MiB,disk:{tmp_path}:1GiB (attend=local)") and "read from disk" in line
    assert list(tmp_path.iterdir()) == []  # the block file is gone when the request ends
    bad = run_cli("generate", "--tiers", f"cpu:2MiB,disk:{tmp_path / 'missing'}:1GiB", "hi")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr


@pytest.mark.parametrize("args, words", [
    (["generate", "--kv", "dense(bits=2)", "hi"], "no parameter 'bits'"),
    (["generate", "--model", "nosuchmodel", "hi"], "unknown model"),
    (["generate", "--model", "/nonexistent/model.gguf", "hi"], "unknown model"),
    (["generate", "--max-new-tokens", "9000", "hi"], "allows 8192"),
    (["bench", "ppl", "--methods", "dense", "--context", "20x"], "--context"),
    (["bench", "ppl", "--methods", "dense", "--text", "/nonexistent.txt"], "no such file"),
    (["bench", "merge", "/nonexistent.json"], "cannot read"),
    (["bench", "ppl", "--methods", "dense", "--skip-layers", "0.2,1"], "--skip-layers"),
    (["bench", "speed", "--skip-layers", "nan"], "--skip-layers"),
    (["cache", "save", str(Path(__file__)), "/tmp/x.kvcache", "--kv", "tova(ratio=0.5)"], "codecs only"),
    (["generate", "--kv", "tova(ratio=0.5)+window(ratio=0.5)", "hi"], "one selector"),
    (["bench", "retrieval", "--methods", "dense", "--cases", "/nonexistent.jsonl"], "no such file"),
    (["bench", "merge", str(Path(__file__).parents[1] / "README.md")], "not a kvtier results file"),
])
def test_cli_errors_are_one_line_and_exit_2(args, words):
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kvtier: error:") and words in last


def test_cli_bench_ppl_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "ppl.json", tmp_path / "ppl.png"
    r = run_cli("bench", "ppl", "--methods", "dense(dtype=fp16)", "--context", "256",
                "--eval-tokens", "16", "--windows", "2", "--json", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())["results"]
    for key in ("method", "model", "context", "eval_tokens", "windows", "ppl", "dense_ppl",
                "ppl_per_window", "dense_ppl_per_window", "kv_bytes_per_token", "decode_tok_s",
                "dense_decode_tok_s"):
        assert key in row
    assert row["method"] == "dense(dtype=fp16)" and len(row["ppl_per_window"]) == 2
    assert 1 < row["ppl"] < 100 and abs(row["ppl"] / row["dense_ppl"] - 1) < 0.01
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "dense(dtype=fp16)" in r.stdout
    merged, png2 = tmp_path / "merged.json", tmp_path / "merged.png"  # runs combine into one table
    r = run_cli("bench", "merge", str(out), str(out), "--json", str(merged), "--plot", str(png2))
    assert r.returncode == 0, r.stderr
    assert json.loads(merged.read_text())["results"] == [row, row]
    assert png2.read_bytes()[:4] == b"\x89PNG"


def test_cli_bench_ppl_weights_against_the_dense_weights_baseline(tmp_path):
    """--weights: each format's rows against one baseline, the dense weights' fp32 cache; SmolLM2's
    q4 weights are its GGUF's own, so they score what the dense weights score."""
    out = tmp_path / "ppl.json"
    r = run_cli("bench", "ppl", "--methods", "dense(dtype=fp32)", "--weights", "dense", "--weights", "q4",
                "--context", "160", "--eval-tokens", "16", "--windows", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    dense, q4 = json.loads(out.read_text())["results"]
    assert (dense["weights"], q4["weights"]) == ("dense", "q4") and "q4 weights" in r.stdout
    assert dense["dense_ppl"] == q4["dense_ppl"] == dense["ppl"]  # one baseline, scored once
    assert q4["ppl"] == pytest.approx(dense["ppl"], rel=1e-4)
    assert q4["weight_bytes"] < 0.2 * dense["weight_bytes"]
    r = run_cli("bench", "ppl", "--methods", "dense", "--weights", "q3")
    assert r.returncode == 2 and "use one of dense, q4, q8" in r.stderr and "Traceback" not in r.stderr


def test_cli_bench_speed(tmp_path):
    out = tmp_path / "speed.json"
    r = run_cli("bench", "speed", "--context", "140", "--new-tokens", "4", "--repeats", "1",
                "--kv", "dense", "--kv", "int(bits=4)", "--skip-layers", "0.3", "--json", str(out))
    assert r.returncode == 0, r.stderr
    dense, int4, dense_skip, int4_skip = json.loads(out.read_text())["results"]
    assert [row["skip_layers"] for row in (dense, int4, dense_skip, int4_skip)] == [0, 0, 0.3, 0.3]
    assert dense_skip["kv"] == dense["kv"] and "30% of layers skipped" in r.stdout
    assert (dense["kv"], int4["kv"]) == ("dense(dtype=bf16)", "int(bits=4,group=64,residual=0)")
    for row in (dense, int4):
        assert row["kvtier_decode_tok_s"] > 0 and row["transformers_decode_tok_s"] > 0
        assert row["decode_ratio"] == pytest.approx(row["kvtier_decode_tok_s"] / row["transformers_decode_tok_s"])
    assert int4["vs_first"] == pytest.approx(int4["kvtier_decode_tok_s"] / dense["kvtier_decode_tok_s"])


def test_damaged_weight_cache_is_rebuilt(tmp_path, monkeypatch):
    from kvtier.models import loader

    gguf = loader.NAMED["smollm2-135m"]()
    built = loader.convert_gguf(gguf)  # the shared cache's copy (converted once per machine)
    monkeypatch.setenv("KVTIER_CACHE", str(tmp_path))
    folder = tmp_path / "models" / built.name
    shutil.copytree(built, folder)
    assert loader.convert_gguf(gguf) == folder and loader._valid(folder)
    weights = folder / "model.safetensors"
    good = weights.stat().st_size
    with open(weights, "r+b") as f:  # flip bytes in the middle: same size, wrong content
        f.seek(good // 2)
        f.write(b"\xff" * 64)
    assert not loader._valid(folder)
    with open(weights, "r+b") as f:
        f.truncate(good // 3)
    assert loader.convert_gguf(gguf) == folder
    assert loader._valid(folder) and weights.stat().st_size == good
    loader.read_weights(folder)  # loads cleanly


def test_gemma3_logits_match_transformers_on_real_text():
    """The real Gemma-3-270M: past its 512-token sliding window, chunked prefill then decode."""
    from transformers import AutoModelForCausalLM

    from kvtier.models import load

    gemma = load("gemma3-270m")
    hf = AutoModelForCausalLM.from_pretrained(gemma.folder, dtype=torch.float32).eval()
    ids = gemma.tokenizer(data.kjv()[50_000:60_000]).input_ids[:700]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    runner = ModelRunner(gemma.model, "dense(dtype=fp32)", prefill_chunk=256)
    cache = runner.new_cache()
    ours = torch.cat([runner.feed([cache], [ids[i:min(i + 256, 640)]], logits="all") for i in range(0, 640, 256)])
    assert (ours - want[:640]).abs().max() <= 1e-3
    rows = torch.stack([runner.feed([cache], [[t]])[0] for t in ids[640:]])
    assert (rows - want[640:]).abs().max() <= 1e-3
    sliding = [layer for layer, w in zip(cache.layers, gemma.model.windows) if w]
    assert sliding and all(layer.n_held <= 512 + 64 for layer in sliding)


def test_cli_usage_errors_exit_2_without_traceback():
    r = run_cli("bench", "ppl")  # --methods is required
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--methods" in r.stderr


def test_cli_saved_cache_answers_like_the_whole_prompt(tmp_path):
    doc, question = data.kjv()[:4000], " And God said"  # tokenizes the same apart and together
    (tmp_path / "doc.txt").write_text(doc)
    out = tmp_path / "doc.kvcache"
    kv = ["--kv", "int(bits=4)", "--dtype", "fp32"]
    save = run_cli("cache", "save", str(tmp_path / "doc.txt"), str(out), *kv)
    assert save.returncode == 0, save.stderr
    assert "saved 922 tokens" in save.stderr and out.stat().st_size > 0
    whole = run_cli("generate", "--max-new-tokens", "12", *kv, "-", input=doc + question)
    cached = run_cli("generate", "--max-new-tokens", "12", *kv, "--cache", str(out),
                     "--tiers", f"cpu:2MiB,disk:{tmp_path}:1GiB", question)
    assert whole.returncode == 0 and cached.returncode == 0, cached.stderr
    assert cached.stdout == whole.stdout
    info = run_cli("cache", "info", str(out))
    assert "922 tokens" in info.stdout and "int(bits=4" in info.stdout
    refused = run_cli("generate", "--kv", "int(bits=2)", "--dtype", "fp32", "--cache", str(out), "hi")
    assert refused.returncode == 2 and "run with --kv int(bits=4" in refused.stderr.strip().splitlines()[-1]


def test_cli_bench_speed_weights_bandwidth_profile(tmp_path):
    """--weights rows beside dense ones, each with its bytes per step against the measured read
    bandwidth, and --profile's split of a decode step that adds up to the step."""
    out = tmp_path / "speed.json"
    r = run_cli("bench", "speed", "--context", "140", "--new-tokens", "4", "--repeats", "1",
                "--weights", "dense", "--weights", "q4", "--profile", "--json", str(out))
    assert r.returncode == 0, r.stderr
    dense, q4 = json.loads(out.read_text())["results"]
    assert (dense["weights"], q4["weights"]) == ("dense", "q4") and "q4 weights" in r.stdout
    assert q4["weight_bytes"] < 0.4 * dense["weight_bytes"]  # 5 bits a weight against bf16/fp32
    for row in (dense, q4):
        assert row["bytes_per_step"] == row["weight_bytes"] + row["kv_bytes"] and row["kv_bytes"] > 0
        assert row["stream_gb_s"] > 0 and row["bandwidth_share"] == pytest.approx(
            row["bytes_per_step"] * row["kvtier_decode_tok_s"] / (row["stream_gb_s"] * 1e9))
        p = row["profile_ms"]
        assert p["weight matmuls"] > 0 and p["attention"] > 0
        assert sum(v for k, v in p.items() if k != "step") == pytest.approx(p["step"], rel=1e-6)
    assert "where a decode step goes" in r.stdout
