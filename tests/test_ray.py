"""Beyond one machine on Ray: the ``ray:`` tier on a two-node Ray cluster on localhost.

The cluster (two raylets with one CPU and a small object store each) is started once for the
module and stopped after it. Ray is an optional extra (``kvtier[ray]``); the test set-up
installs it, and these tests are skipped only where it is not installed.
"""

import pytest
import torch
from conftest import tokens
from test_tiers import generate

from kvtier.engine import ModelRunner
from kvtier.errors import KvtierError

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'kvtier[ray]')")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 80 << 20, "include_dashboard": False})
    c.add_node(num_cpus=1, object_store_memory=80 << 20)
    ray.init(address=c.address, namespace="kvtier", logging_level="ERROR", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.mark.parametrize("kv,budget", [("dense(dtype=fp32)", "20KiB"), ("int(bits=4,group=16)", "20KiB"),
                                       ("rotatekv(rotate=32,group=16,residual=16)", "16KiB")])
@pytest.mark.parametrize("attend", ["local", "fetch"])
def test_ray_tier_gives_the_all_in_ram_logits(cluster, llama, kv, budget, attend):
    toks = tokens(316)
    ref, _ = generate(ModelRunner(llama, kv, block_size=16, prefill_chunk=128), toks, steps=16)
    runner = ModelRunner(llama, kv, block_size=16, prefill_chunk=128, tiers=f"cpu:{budget},ray:64MiB", attend=attend)
    store = runner.store
    assert store.remote.remote, "the holder should be on the other node"
    got, cache = generate(runner, toks, steps=16)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert store.used[1] > 0 and cache.nbytes_by_tier()[1] == store.used[1]  # most blocks went down
    assert store.remote.nbytes() >= store.used[1]  # the holder really holds them
    moved = store.traffic.by_kind
    assert moved["cpu->ray"] >= store.used[1]
    if attend == "local":  # decode steps sent queries and pieces, prefill chunks fetched blocks
        assert moved["ray attend"] > 0
    else:
        assert "ray attend" not in moved and moved["fetch"] > 0
    cache.close()
    assert store.used == [0, 0]


def test_a_lost_holder_ends_the_sequence_with_a_named_error(cluster, llama):
    toks = tokens(316)
    runner = ModelRunner(llama, "int(bits=4,group=16)", block_size=16, tiers="cpu:20KiB,ray:64MiB")
    cache = runner.new_cache()
    runner.feed([cache], [toks[:300]])
    ray.kill(runner.store.remote.holder)
    with pytest.raises(KvtierError, match="ray: tier's blocks are lost"):
        runner.feed([cache], [[toks[300]]])
    with pytest.raises(KvtierError, match="ray: tier's blocks are lost"):  # and stays failed
        runner.feed([cache], [[toks[301]]])


def test_ray_tier_specs_parse(cluster):
    from kvtier.kv import tiers
    from kvtier.kv.store import TierStore

    assert [(t.kind, t.budget) for t in tiers.parse("cpu:1MiB,ray:8GiB")] == [("cpu", 1 << 20), ("ray", 8 << 30)]
    assert str(TierStore("cpu:1MiB,ray:8GiB")) == "cpu:1MiB,ray:8GiB"
    with pytest.raises(KvtierError, match="fastest first"):
        tiers.parse("cpu:1MiB,ray:1GiB,disk:/tmp:1GiB")
    with pytest.raises(KvtierError, match="attend=auto has no cost model"):
        TierStore("cpu:1MiB,ray:8GiB", attend="auto")
