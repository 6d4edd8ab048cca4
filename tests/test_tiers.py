"""The tiered store: budgets, placement, attention where blocks live, the disk tier's faults."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tokens

from kvtier import spec
from kvtier.engine import ModelRunner
from kvtier.errors import KvtierError
from kvtier.kv import tiers
from kvtier.kv.cache import LayerKV, SeqKV
from kvtier.kv.codecs.base import LayerContext
from kvtier.kv.store import TierStore


def generate(runner, toks, prompt=300, steps=24):
    """Logits of a prefill (two chunks) and ``steps`` greedy-free decode steps on fixed tokens."""
    cache = runner.new_cache()
    out = [runner.feed([cache], [toks[:prompt]])]
    for t in toks[prompt: prompt + steps]:
        out.append(runner.feed([cache], [[t]]))
    return torch.cat(out), cache


def test_sizes_and_specs_parse(tmp_path):
    assert tiers.parse_size("16MiB") == 16 << 20 and tiers.parse_size("1.5GiB") == 3 << 29
    assert tiers.parse_size("500MB") == 500_000_000 and tiers.parse_size("4096") == 4096
    got = tiers.parse(f"cpu:2GiB,disk:{tmp_path}:50GiB")
    assert [(t.kind, t.budget, t.path) for t in got] == [("cpu", 2 << 30, None), ("disk", 50 << 30, str(tmp_path))]
    assert str(TierStore(got)) == f"cpu:2GiB,disk:{tmp_path}:50GiB"
    for bad, says in [("cpu:2XB", "cannot read the size"), ("ram:1GiB", "unknown tier"),
                      ("cpu", "needs a size"), ("disk:5GiB", "needs a folder"),
                      (f"disk:{tmp_path}:1GiB,cpu:1GiB", "fastest first"), (f"disk:{tmp_path}:1GiB", "first tier must be cpu"),
                      ("cpu:0", "must be positive"), ("gpu:1GiB,cpu:1GiB", "gpu")]:
        with pytest.raises(KvtierError, match=says):
            tiers.parse(bad)


def test_tier_folder_must_exist_and_be_writable(tmp_path):
    with pytest.raises(KvtierError, match="does not exist"):
        TierStore(f"cpu:1MiB,disk:{tmp_path / 'nope'}:1GiB")
    with pytest.raises(KvtierError, match="not writable"):
        TierStore("cpu:1MiB,disk:/proc:1GiB")  # not writable even for root
    with pytest.raises(KvtierError, match="attend="):
        TierStore(f"cpu:1MiB,disk:{tmp_path}:1GiB", attend="nearby")


@pytest.mark.parametrize("attend", ["local", "fetch", "split:0.5"])
@pytest.mark.parametrize("family,kv,budget", [
    ("llama", "dense(dtype=fp32)", "20KiB"), ("llama", "int(bits=4,group=16)", "20KiB"),
    ("gemma", "dense(dtype=fp32)", "40KiB"), ("gemma", "int(bits=4,group=16)", "28KiB")])
def test_every_tier_layout_gives_the_all_in_ram_logits(family, kv, budget, attend, tmp_path, request):
    model = request.getfixturevalue(family)
    toks = tokens(340)
    ref, _ = generate(ModelRunner(model, kv, block_size=16, prefill_chunk=128), toks)
    runner = ModelRunner(model, kv, block_size=16, prefill_chunk=128,
                         tiers=f"cpu:{budget},disk:{tmp_path}:100MiB", attend=attend)
    got, cache = generate(runner, toks)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    store = runner.store
    assert store.used[0] <= store.tiers[0].budget and store.used[1] > 0  # most of it went down
    assert cache.nbytes_by_tier()[1] == store.used[1]
    assert store.traffic.disk_read > 0
    assert (store.traffic.by_kind.get("fetch", 0) > 0) == (attend != "local")  # split: some fetched
    cache.close()
    assert store.used == [0, 0] and list(tmp_path.iterdir()) == []  # the sequence's file is gone


def test_the_oldest_blocks_go_down_first_and_bytes_are_unchanged(llama, tmp_path):
    toks = tokens(330)
    plain, ref_cache = generate(ModelRunner(llama, "int(bits=4,group=16)", block_size=16), toks)
    runner = ModelRunner(llama, "int(bits=4,group=16)", block_size=16, tiers=f"cpu:24KiB,disk:{tmp_path}:1GiB")
    _, cache = generate(runner, toks)
    for layer in cache.layers:
        down = layer.where.count(1)
        assert 0 < down < len(layer.where) and layer.where == [1] * down + [0] * (len(layer.where) - down)
    assert cache.nbytes() == ref_cache.nbytes()  # the same bytes, wherever they are
    assert sum(cache.nbytes_by_tier()) + sum(la.plain_bytes() for la in cache.layers) == sum(runner.store.used)
    cache.close()


def test_a_budget_too_small_for_the_residual_blocks_is_refused(llama, tmp_path):
    runner = ModelRunner(llama, "int(bits=4,group=16)", block_size=16, tiers=f"cpu:1KiB,disk:{tmp_path}:1GiB")
    with pytest.raises(KvtierError, match="cannot hold even the newest"):
        runner.new_cache()
    assert runner.store.used == [0, 0]


def test_a_cache_larger_than_every_tier_fails_that_sequence(llama, tmp_path):
    runner = ModelRunner(llama, "dense(dtype=fp32)", block_size=16, tiers=f"cpu:20KiB,disk:{tmp_path}:40KiB")
    with pytest.raises(KvtierError, match="does not fit in --tiers"):
        generate(runner, tokens(340))


def disk_layer(tmp_path, codec="int(bits=4,group=16)"):
    store = TierStore(f"cpu:4KiB,disk:{tmp_path}:1GiB")
    home = store.sequence()
    layer = LayerKV(spec.parse(codec).codec, n_kv=2, head_dim=16, block_size=16,
                    ctx=LayerContext(3, 2, 16), home=home)
    return store, SeqKV([layer], home), layer


def test_a_corrupted_block_on_disk_is_named_not_read(tmp_path):
    store, seq, layer = disk_layer(tmp_path)
    k = torch.randn(2, 80, 16)
    layer.append(k, k)
    pool = layer.pools[1]
    assert layer.where.count(1) >= 2
    for done in pool.pending.values():
        done.wait()
    slot = layer.slots[1]
    offset = pool._at(slot, "v", 1)
    os.pwrite(seq.home.file.fd, bytes([os.pread(seq.home.file.fd, 1, offset)[0] ^ 0x40]), offset)
    parts = layer.parts()
    with pytest.raises(KvtierError, match="block 1 of layer 3 .* is corrupted"):
        for p in parts:
            p.get()
    seq.close()


def test_leftover_files_of_a_crashed_run_are_removed_live_ones_kept(tmp_path):
    crash = textwrap.dedent(f"""
        import os, torch
        from kvtier.kv.cache import LayerKV, SeqKV
        from kvtier.kv.codecs.base import LayerContext
        from kvtier.kv.store import TierStore
        from kvtier import spec
        store = TierStore("cpu:4KiB,disk:{tmp_path}:1GiB")
        home = store.sequence()
        layer = LayerKV(spec.parse("dense(dtype=fp32)").codec, 2, 16, 16, ctx=LayerContext(0, 2, 16), home=home)
        SeqKV([layer], home)
        layer.append(torch.randn(2, 64, 16), torch.randn(2, 64, 16))
        os._exit(0)  # a crash: no cleanup runs
    """)
    subprocess.run([sys.executable, "-c", crash], check=True)
    left = list(tmp_path.glob("kvtier-*"))
    assert len(left) == 1 and left[0].stat().st_size > 0
    _, live, _ = disk_layer(tmp_path)
    live.layers[0].append(torch.randn(2, 64, 16), torch.randn(2, 64, 16))
    mine = live.home.file.path
    TierStore(f"cpu:4KiB,disk:{tmp_path}:1GiB")  # a second store on the same folder
    assert list(tmp_path.glob("kvtier-*")) == [mine]  # the crashed run's file is gone, ours is kept
    live.close()
    assert not mine.exists()


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys, torch
    sys.path.insert(0, "tests")
    from conftest import ours_from_hf, tiny_hf
    from kvtier.engine import ModelRunner
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))  # files past 64 KiB fail: disk full
    model = ours_from_hf(tiny_hf("llama"))
    runner = ModelRunner(model, "dense(dtype=fp32)", block_size=16, tiers="cpu:40KiB,disk:{folder}:1GiB")
    toks = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    big, small = runner.new_cache(), runner.new_cache()
    runner.feed([big, small], [toks[:400], toks[:10]])
    print("ERROR:", big.error)
    big.close()  # what the engine does with a failed request: its blocks are freed
    for t in toks[10:20]:
        out = runner.feed([small], [[t]])
    ref = ModelRunner(model, "dense(dtype=fp32)", block_size=16)
    c = ref.new_cache()
    ref.feed([c], [toks[:10]])
    for t in toks[10:20]:
        want = ref.feed([c], [[t]])
    assert small.error is None and torch.allclose(out, want, atol=1e-5), "the other sequence goes on"
    small.close()
""")


def test_disk_full_fails_that_request_and_others_go_on(tmp_path):
    """A real write failure from the OS: a file-size limit (EFBIG), as a full disk (ENOSPC) would."""
    out = subprocess.run([sys.executable, "-c", FULL_DISK.replace("{folder}", str(tmp_path))],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERROR: disk tier is full" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_disk_full_on_a_small_tmpfs(tmp_path, llama):
    """The same on a real full filesystem: a 256 KiB tmpfs (needs permission to mount)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN); the RLIMIT_FSIZE test covers it")
    try:
        runner = ModelRunner(llama, "dense(dtype=fp32)", block_size=16, tiers=f"cpu:40KiB,disk:{mnt}:1GiB")
        cache = runner.new_cache()
        try:
            with pytest.raises(KvtierError, match="disk tier is full"):
                runner.feed([cache], [tokens(500)])
        finally:
            cache.close()
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("family,kv,layout", [
    ("llama", "dense(dtype=fp32)", "cpu:20KiB,recompute"),
    ("llama", "int(bits=4,group=16)", "cpu:12KiB,disk:{tmp}:24KiB,recompute"),
    ("gemma", "dense(dtype=fp32)", "cpu:40KiB,recompute")])
def test_dropped_blocks_are_recomputed_from_the_token_ids(family, kv, layout, tmp_path, request):
    model = request.getfixturevalue(family)
    toks = tokens(340)
    ref, _ = generate(ModelRunner(model, kv, block_size=16, prefill_chunk=128), toks)
    runner = ModelRunner(model, kv, block_size=16, prefill_chunk=128, tiers=layout.format(tmp=tmp_path))
    got, cache = generate(runner, toks)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # recomputed in other chunk shapes
    store = runner.store
    assert store.traffic.recomputed > 0 and store.traffic.by_kind["dropped"] > 0
    for t, tier in enumerate(store.tiers[:-1]):
        assert store.used[t] <= tier.budget, (tier, store.used)
    assert cache.nbytes_by_tier()[-1] == 0  # a dropped block holds no bytes
    with pytest.raises(KvtierError, match="takes no size"):
        tiers.parse("cpu:1MiB,recompute:1GiB")
    with pytest.raises(KvtierError, match="fastest first"):
        tiers.parse(f"cpu:1MiB,recompute,disk:{tmp_path}:1GiB")


def test_a_corrupted_block_is_recomputed_when_the_policy_allows(llama, tmp_path):
    toks = tokens(340)
    kv = "int(bits=4,group=16)"
    ref, _ = generate(ModelRunner(llama, kv, block_size=16, prefill_chunk=512), toks, steps=8)
    runner = ModelRunner(llama, kv, block_size=16, prefill_chunk=512,  # one chunk: no block read yet
                         tiers=f"cpu:12KiB,disk:{tmp_path}:10MiB,recompute")
    cache = runner.new_cache()
    got = [runner.feed([cache], [toks[:300]])]
    layer = cache.layers[1]
    pool, j = layer.pools[1], layer.where.index(1)
    for done in pool.pending.values():
        done.wait()
    offset = pool._at(layer.slots[j], "k", 0)
    fd = cache.home.file.fd
    os.pwrite(fd, bytes([os.pread(fd, 1, offset)[0] ^ 0x40]), offset)
    for t in toks[300:308]:
        got.append(runner.feed([cache], [[t]]))
    torch.testing.assert_close(torch.cat(got), ref, rtol=1e-4, atol=1e-4)
    assert runner.store.traffic.recomputed > 0 and cache.error is None
    cache.close()


def mapped_rss(path) -> int:
    """Resident bytes of this process's mapping of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.parametrize("prefetch", [True, False])
def test_disk_pages_are_let_go_after_attention_reads_them(llama, tmp_path, prefetch):
    kv = "dense(dtype=fp32)"
    toks = tokens(480)
    ref, _ = generate(ModelRunner(llama, kv, block_size=16, prefill_chunk=128), toks, prompt=460, steps=12)
    store = TierStore(f"cpu:20KiB,disk:{tmp_path}:100MiB", prefetch=prefetch)
    runner = ModelRunner(llama, kv, block_size=16, prefill_chunk=128, tiers=store)
    got, cache = generate(runner, toks, prompt=460, steps=12)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    on_disk = cache.nbytes_by_tier()[1]
    per_layer = on_disk // len(cache.layers)
    assert on_disk > 200_000
    # resident: at most the layer read ahead plus an extent of slack, not the whole disk tier
    assert mapped_rss(cache.home.file.path) <= per_layer + 64 * 1024, (mapped_rss(cache.home.file.path), on_disk)
    assert (store.prefetcher is not None and store.prefetcher.nbytes > 0) == prefetch
    cache.close()
