"""Saved caches: a document prefilled once continues exactly in a later run; files made by
another model, spec, dtype or format version, or damaged, are refused with a clear message."""

import json
import struct

import pytest
import torch
from conftest import ours_from_hf, tiny_hf, tokens
from safetensors.torch import load_file

from kvtier.engine import ModelRunner
from kvtier.errors import KvtierError
from kvtier.kv import persist


def continue_from(runner, cache, toks):
    """Logits of running ``toks`` one at a time on ``cache``."""
    return torch.cat([runner.feed([cache], [[t]]) for t in toks])


def saved(runner, toks, path, n_doc=300):
    """Prefill ``toks[:n_doc - 1]`` and save it (the document is ``toks[:n_doc]``)."""
    cache = runner.new_cache()
    runner.feed([cache], [toks[: n_doc - 1]])
    persist.save(path, runner, cache, toks[:n_doc], "tiny")
    cache.close()
    return persist.open_prefix(path, runner, "tiny")


@pytest.mark.parametrize("family,kv", [("llama", "dense(dtype=fp32)"), ("llama", "int(bits=4,group=16)"),
                                       ("gemma", "dense(dtype=fp32)"), ("gemma", "int(bits=2,group=16,residual=16)")])
def test_a_saved_cache_continues_exactly(family, kv, tmp_path, request):
    model = request.getfixturevalue(family)
    toks = tokens(330)
    runner = ModelRunner(model, kv, block_size=16, prefill_chunk=128)
    ref_cache = runner.new_cache()
    runner.feed([ref_cache], [toks[:299]])
    want = continue_from(runner, ref_cache, toks[299:])

    prefix = saved(runner, toks, tmp_path / "doc.kvcache")
    assert prefix.token_ids == toks[:300] and prefix.length == 299
    got = continue_from(runner, persist.restore(prefix, runner), toks[299:])
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same bytes, the same logits
    # into a runner whose blocks live on tiers: same logits, most blocks on disk
    tiered = ModelRunner(model, kv, block_size=16, prefill_chunk=128, tiers=f"cpu:24KiB,disk:{tmp_path}:10MiB")
    cache = persist.restore(prefix, tiered)
    assert tiered.store.used[0] <= 24 << 10 and cache.nbytes_by_tier()[1] > cache.nbytes_by_tier()[0]
    torch.testing.assert_close(continue_from(tiered, cache, toks[299:]), want, rtol=1e-5, atol=1e-5)
    cache.close()
    # a cache saved from tiers (blocks gathered from disk) is the same file
    again = persist.restore(prefix, tiered)
    persist.save(tmp_path / "again.kvcache", tiered, again, toks[:300], "tiny")
    a, b = (load_file(tmp_path / n) for n in ("again.kvcache", "doc.kvcache"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert persist.read_meta(tmp_path / "again.kvcache") == persist.read_meta(tmp_path / "doc.kvcache")
    again.close()
    # from a recompute tier: the dropped blocks are rebuilt from the token ids, then saved
    dropping = ModelRunner(model, kv, block_size=16, prefill_chunk=128, tiers="cpu:24KiB,recompute")
    cache = persist.restore(prefix, dropping)
    assert dropping.store.traffic.by_kind.get("dropped", 0) > 0
    persist.save(tmp_path / "rebuilt.kvcache", dropping, cache, toks[:300], "tiny")
    c = load_file(tmp_path / "rebuilt.kvcache")
    assert c.keys() == b.keys() and all(torch.equal(c[k], b[k]) for k in c)
    # blocks rebuilt later include decoded tokens, now run as a chunk: a quantized codec may
    # round them differently (dense: the same numbers)
    tol = 1e-5 if kv.startswith("dense") else 2e-2
    torch.testing.assert_close(continue_from(dropping, cache, toks[299:]), want, rtol=tol, atol=tol)


def test_a_cache_from_another_model_spec_or_dtype_is_refused(llama, gemma, tmp_path):
    toks = tokens(200)
    runner = ModelRunner(llama, "int(bits=4,group=16)", block_size=16)
    path = tmp_path / "doc.kvcache"
    saved(runner, toks, path, n_doc=100)
    with pytest.raises(KvtierError, match="made with model 'tiny'.*weights differ"):
        persist.open_prefix(path, ModelRunner(gemma, "int(bits=4,group=16)", block_size=16), "other")
    other = ours_from_hf(tiny_hf("llama"))
    with torch.no_grad():
        other.w["model.embed_tokens.weight"].w[3] += 1  # one changed row: another model
    with pytest.raises(KvtierError, match="weights differ"):
        persist.open_prefix(path, ModelRunner(other, "int(bits=4,group=16)", block_size=16), "other")
    with pytest.raises(KvtierError, match=r"spec int\(bits=4.*run with --kv"):
        persist.open_prefix(path, ModelRunner(llama, "int(bits=2,group=16)", block_size=16), "tiny")
    with pytest.raises(KvtierError, match="block_size 16, this run uses 64"):
        persist.open_prefix(path, ModelRunner(llama, "int(bits=4,group=16)", block_size=64), "tiny")
    bf16 = ours_from_hf(tiny_hf("llama").to(torch.bfloat16))
    with pytest.raises(KvtierError, match="dtype fp32, this run uses bf16; run with --dtype fp32"):
        persist.open_prefix(path, ModelRunner(bf16, "int(bits=4,group=16)", block_size=16), "tiny")


def _rewrite_meta(path, **changes):
    """Change header fields of a safetensors file in place (same length padding)."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8: 8 + n])
    head["__metadata__"].update(changes)
    new = json.dumps(head, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(raw[:8] + new.ljust(n) + raw[8 + n:])


def test_damaged_or_foreign_files_are_refused(llama, tmp_path):
    runner = ModelRunner(llama, "int(bits=4,group=16)", block_size=16)
    path = tmp_path / "doc.kvcache"
    prefix = saved(runner, tokens(200), path, n_doc=120)
    size = path.stat().st_size
    raw = bytearray(path.read_bytes())
    raw[size - 100] ^= 0x40  # one flipped bit in the last tensor
    path.write_bytes(raw)
    with pytest.raises(KvtierError, match=r"is damaged: tensor 2\..* does not match its checksum"):
        persist.restore(prefix, runner)
    path.write_bytes(raw[: size // 2])  # truncated
    with pytest.raises(KvtierError, match="damaged"):
        persist.open_prefix(path, runner, "tiny")
    saved(runner, tokens(200), path, n_doc=120)
    meta = persist.read_meta(path)
    toks = json.loads(meta["tokens"])
    toks[5] = (toks[5] + 1) % 10 if toks[5] < 10 else toks[5] - 1  # one token id changed
    _rewrite_meta(path, tokens=json.dumps(toks))
    with pytest.raises(KvtierError, match="its header .* does not match its checksum"):
        persist.open_prefix(path, runner, "tiny")
    _rewrite_meta(path, version="0")
    with pytest.raises(KvtierError, match=f"format version 0; this kvtier reads version {persist.VERSION}"):
        persist.open_prefix(path, runner, "tiny")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(KvtierError, match="not a kvtier cache file"):
        persist.open_prefix(tmp_path / "notes.txt", runner, "tiny")
    with pytest.raises(KvtierError, match="no saved cache at"):
        persist.open_prefix(tmp_path / "missing.kvcache", runner, "tiny")
    cache = runner.new_cache()
    runner.feed([cache], [tokens(50)[:49]])
    with pytest.raises(KvtierError, match="folder .* does not exist"):
        persist.save(tmp_path / "no" / "x.kvcache", runner, cache, tokens(50), "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.kvcache", "notes.txt"]  # no temporary left
