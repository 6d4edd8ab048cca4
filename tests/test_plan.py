"""kvtier plan: the cost model's arithmetic on hand-computed cases, hardware files, decisions,
validation and the CLI. Nothing here checks how fast this machine is."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from kvtier.errors import KvtierError
from kvtier.plan import costs, decide, distributed, hardware
from kvtier.plan.costs import Step, block_bytes, cost, kv_bytes
from kvtier.plan.hardware import Device, Disk, Hardware, Link
from kvtier.plan.shapes import NAMED, Shape, row_bytes

SHAPE = Shape("t", "llama", 2, 128, 256, 4, 2, 64, 1000, (None, None), True, 1 << 20)
GB = 1e9


def machine(gpu: bool = False, link: float = 10 * GB) -> Hardware:
    """A made-up machine with round numbers (bytes/s, FLOP/s, seconds)."""
    cpu = Device("cpu", {1: 10 * GB}, {"fp32": 100 * GB, "bf16": 200 * GB}, 1e-6,
                 gemv={"dense": 10 * GB}, attend={"dense": 5 * GB}, memory=64 * GB)
    devices = {"cpu": cpu}
    links = []
    if gpu:
        devices["gpu"] = Device("gpu", {0: 1000 * GB}, {"bf16": 1e15}, 1e-6, gemv={"dense": 1000 * GB},
                                attend={"dense": 1000 * GB, "torch": 100 * GB}, memory=80 * GB)
        links = [Link("cpu", "gpu", link, link / 2, 0.0), Link("gpu", "cpu", link, link / 2, 0.0)]
    return Hardware("test", devices, links, Disk(1 * GB, 0.5 * GB, 1 * GB), threads=1)


def test_gemv_bytes_are_the_weight_bytes():
    c = cost(Step(SHAPE, 100), machine())
    ops = {o.name: o for o in c.ops}
    # q, k, v fused: (4 + 2 + 2) heads x 64 rows of 128 bf16 weights, in each of 2 layers
    assert ops["qkv_proj"].bytes == 2 * (8 * 64) * 128 * 2
    assert ops["gate_up_proj"].bytes == 2 * (2 * 256) * 128 * 2
    assert ops["lm_head"].bytes == 1000 * 128 * 2
    # a GEMV at M = 1 does 2 FLOPs per weight: Op/B = 1 for bf16
    assert ops["qkv_proj"].flops == 2 * 2 * (8 * 64) * 128
    assert ops["qkv_proj"].op_b == pytest.approx(1.0)
    # memory-bound: bytes / bandwidth (no fixed cost given)
    assert ops["qkv_proj"].seconds == pytest.approx(ops["qkv_proj"].bytes / (10 * GB))
    assert ops["qkv_proj"].bound == "memory"


def test_q4_and_q8_rows_count_their_scales():
    # GGUF Q4_1: 32 weights in 16 bytes of codes + an fp16 scale and minimum = 20 bytes
    assert row_bytes("q4", 128, torch.bfloat16) == 128 // 32 * 20
    # GGUF Q8_0: 32 int8 codes + an fp16 scale = 34 bytes
    assert row_bytes("q8", 128, torch.bfloat16) == 128 // 32 * 34
    assert row_bytes("dense", 128, torch.float32) == 128 * 4


def test_int2_block_counts_codes_scales_and_zero_points():
    # one 64-token block, head_dim 64, one KV head, int(bits=2, group=32):
    # keys: 64 channels x 64 tokens x 2 bits = 1,024 B, a fp16 scale and zero per channel (128 + 128);
    # values: 64 tokens x 64 channels x 2 bits = 1,024 B, a fp16 scale and zero per token and
    # 32-channel group: 64 x 2 x 2 B each = 256 + 256
    assert block_bytes("int(bits=2,group=32)", 64, 1) == 1024 + 128 + 128 + 1024 + 256 + 256
    assert block_bytes("int(bits=2,group=32)", 64, 3) == 3 * 2816
    assert block_bytes("dense(dtype=bf16)", 64, 1) == 2 * 64 * 64 * 2


def test_kv_bytes_split_sealed_blocks_from_unencoded_tokens():
    kv = "int(bits=4,group=64,residual=0)"
    sealed, plain = kv_bytes(SHAPE, kv, 64 * 10 + 5)
    per_block = block_bytes(kv, 64, 2)
    assert sealed == 2 * 10 * per_block  # 10 whole blocks in each of 2 layers
    assert plain == 2 * 5 * 2 * 2 * 64 * 2  # 5 tokens x (k, v) x 2 heads x 64 x bf16, 2 layers


def test_sliding_layers_hold_their_window():
    s = replace(SHAPE, windows=(128, None))
    sealed, _ = kv_bytes(s, "dense(dtype=bf16)", 64 * 100)
    per_block = block_bytes("dense(dtype=bf16)", 64, 2)
    assert sealed == (100 + 3) * per_block  # the window (2 blocks) and one more, beside 100 blocks


def test_attention_flops_and_tiers():
    hw = machine()
    step = Step(SHAPE, 64 * 100, kv="dense(dtype=bf16)")
    c = cost(step, hw)
    attn = [o for o in c.ops if o.kind == "attention"]
    assert len(attn) == 1
    # QK^T and PV: 2 FLOPs each per query head, channel and key, per layer
    assert attn[0].flops == pytest.approx(4 * 4 * 64 * 64 * 100 * 2)
    # tiers: the first holds its budget's worth of the newest blocks, the rest go below
    per_block = block_bytes("dense(dtype=bf16)", 64, 2) * 2  # both layers
    tiered = cost(replace(step, tiers="cpu:1MiB,disk:/tmp:1GiB", attend=(0.0,)), hw)
    assert tiered.kv_bytes == pytest.approx(c.kv_bytes)
    assert tiered.kv_by_tier[0] <= (1 << 20) + 1
    assert sum(tiered.kv_by_tier) == pytest.approx(c.kv_bytes)
    disk_op = next(o for o in tiered.ops if o.name == "attention (disk, in place)")
    # in place on the disk tier: the CPU's attention plus the page faults at the warm rate
    held = tiered.kv_by_tier[1]
    assert disk_op.seconds == pytest.approx(held / (5 * GB) + held / (1 * GB))
    assert held % per_block == 0


def test_fetch_costs_the_copy_and_the_decision_follows_the_link():
    step = Step(SHAPE, 64 * 2000, tiers="gpu:1MiB,cpu:64GiB")
    fast, slow = machine(gpu=True, link=500 * GB), machine(gpu=True, link=0.1 * GB)
    c = cost(replace(step, attend=(1.0,)), fast)
    copy = next(o for o in c.ops if o.kind == "transfer" and o.name.startswith("fetch"))
    assert copy.bytes == pytest.approx(c.kv_by_tier[1])
    assert copy.seconds == pytest.approx(copy.bytes / (500 * GB))
    shares, d = decide.attend(step, fast)
    assert shares == (1.0,) and d.choice == "cpu=fetch"
    shares, d = decide.attend(step, slow)
    assert shares == (0.0,) and d.choice == "cpu=local"
    assert "local" in d.because and "fetch" in d.because


def test_launch_counts_decompose_linearly():
    """The five counting runs' decomposition predicts a sixth configuration it never ran."""
    from kvtier.plan import launches

    kv = "int(bits=4)"
    got = launches.count(SHAPE, kv, torch.float32)
    direct = launches._one(SHAPE, kv, 3, 2, 2, torch.float32, True)
    assert got.step(3, 2, [2] * 3) == direct


def test_hardware_files_load_and_round_trip(tmp_path):
    for name in hardware.shipped():
        hw = hardware.load(name)
        assert hw.cpu.launch > 0 and hw.cpu.bandwidth() > 0
    assert {"cpu-2core", "h200", "pim-gpt", "duplex-logic-pim"} <= set(hardware.shipped())
    hw = machine(gpu=True)
    path = tmp_path / "m.toml"
    hw.save(path)
    again = hardware.load(str(path))
    assert again.devices["gpu"].attend == hw.devices["gpu"].attend
    assert again.link("cpu", "gpu").pinned == 10 * GB
    assert again.cpu.mem_bw == {1: 10 * GB}


def test_bad_hardware_files_fail_clearly(tmp_path):
    with pytest.raises(KvtierError, match="no such file"):
        hardware.load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(KvtierError, match="TOML"):
        hardware.load(str(bad))
    bad.write_text('name = "x"\n[devices.gpu]\nkind = "gpu"\nmem_bw = {"0" = 1}\npeak = {}\nlaunch = 1e-6\n')
    with pytest.raises(KvtierError, match="devices.cpu"):
        hardware.load(str(bad))


def test_codec_and_batch_decisions(tmp_path):
    hw = machine()
    table = tmp_path / "ppl.json"
    table.write_text(json.dumps({"results": [
        {"method": "dense(dtype=bf16)", "model": "t", "context": 8192, "ppl": 10.0},
        {"method": "int(bits=4)", "model": "t", "context": 8192, "ppl": 10.1},
        {"method": "int(bits=2,group=32)", "model": "t", "context": 8192, "ppl": 12.0}]}))
    step = Step(SHAPE, 8192)
    dense = cost(step, hw).kv_bytes
    d = decide.codec(step, hw, dense / 2, 0.03, table)
    assert d.choice == "int(bits=4)"  # dense does not fit half its own bytes; 2-bit misses the bound
    d = decide.codec(step, hw, dense * 2, 0.5, table)
    assert d.choice in {"dense(dtype=bf16)", "int(bits=4)", "int(bits=2,group=32)"}
    assert decide.codec(step, hw, 1.0, 0.03, table).choice == "none"
    one = cost(step, hw).seconds
    d = decide.batch(step, hw, slo_s=one * 1.5)
    n = int(d.choice)
    assert cost(replace(step, batch=n), hw).seconds <= one * 1.5 < cost(replace(step, batch=n + 1), hw).seconds


def test_distributed_split_arithmetic():
    hw = replace(machine(), machines=4, network=10 * GB, network_latency=0.0)
    step = Step(NAMED["llama3-8b"], 1 << 17)
    one, four = distributed.split(step, hw, 1), distributed.split(step, hw, 4)
    assert four.attention_s == pytest.approx(one.attention_s / 4)
    s = NAMED["llama3-8b"]
    per_layer = (2 * 32 * 128 + 4 * 32 * 130 * 3) / (10 * GB)  # query out, 3 partials back
    assert four.network_s == pytest.approx(per_layer * s.n_layers)
    assert four.kv_bytes_per_machine == pytest.approx(one.kv_bytes_per_machine / 4)


def test_validate_reads_bench_rows(tmp_path):
    hw_file = tmp_path / "hw.toml"
    machine().save(hw_file)
    rows = [{"model": "llama3-8b", "kv": "dense", "dtype": "bf16", "context": 1024, "kvtier_decode_tok_s": 1.0},
            {"model": "llama3-8b", "kv": "dense", "dtype": "bf16", "context": 1024, "kvtier_decode_tok_s": 1.0,
             "peer": True}]
    for attend, measured in (("local", 2.0), ("fetch", 1.0)):
        rows.append({"model": "llama3-8b", "context": 4096, "method": "dense(dtype=bf16)", "dtype": "bf16",
                     "tiers": "cpu:10MiB,disk:/tmp:1GiB", "attend": attend, "prefetch": False,
                     "page_cache": "warm", "decode_tok_s": measured})
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"results": rows}))
    from kvtier.plan.validate import validate

    v = validate([path], str(hw_file))
    assert v["summary"]["rows"] == 3 and v["skipped"] == {"peer row": 1}
    r = v["rows"][0]
    predicted = cost(Step(NAMED["llama3-8b"], 1024), hardware.load(str(hw_file))).tok_s
    assert r["predicted_tok_s"] == pytest.approx(predicted)
    assert r["error"] == pytest.approx(predicted - 1)
    assert v["summary"]["attend_configurations"] == 1
    c = v["attend_choices"][0]
    assert c["measured_fastest"] == "local" and c["right"] == (c["predicted_fastest"] == "local")
    assert math.isfinite(v["summary"]["median_abs_error"])


def test_attend_auto_gives_the_same_logits_as_local(tmp_path):
    from conftest import ours_from_hf, tiny_hf

    from kvtier.engine import ModelRunner
    from kvtier.kv.store import TierStore

    model = ours_from_hf(tiny_hf("llama"))
    ids = list(range(3, 203))
    out = {}
    for attend in ("local", "auto"):
        store = TierStore(f"cpu:{8 << 10},disk:{tmp_path}:64MiB", attend)
        runner = ModelRunner(model, "int(bits=4,group=16)", block_size=16, tiers=store)
        cache = runner.new_cache(reserve=len(ids) + 4)
        runner.feed([cache], [ids])
        out[attend] = runner.feed([cache], [[5]])
        assert all(0.0 <= s <= 1.0 for s in store.shares)
        if attend == "auto":
            assert store.decision is not None and "local" in store.decision.because
        cache.close()
    assert torch.allclose(out["local"], out["auto"], atol=1e-5)


def test_cli_plans_and_fails_in_one_line(tmp_path):
    run = [sys.executable, "-m", "kvtier", "plan"]
    ok = subprocess.run(run + ["--model", "llama3-8b", "--context", "65536", "--hardware", "h200",
                               "--tiers", "gpu:2GiB,cpu:200GiB", "--json", str(tmp_path / "p.json"),
                               "--plot", str(tmp_path / "p.png")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["decisions"][0]["decision"] == "attend" and data["tok_s"] > 0
    assert (tmp_path / "p.png").stat().st_size > 0
    bad = subprocess.run(run + ["--hardware", str(tmp_path / "nope.toml")], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "no such file" in bad.stderr
    bad = subprocess.run(run + ["--validate"], capture_output=True, text=True)
    assert bad.returncode != 0 and "needs bench JSON" in bad.stderr
    bad = subprocess.run(run + ["--model", "llama3-8b", "--kv", "snapkv(ratio=0.5)+int(bits=4)", "--hardware",
                                "h200"], capture_output=True, text=True)
    assert bad.returncode != 0 and "selector" in bad.stderr


def test_probe_disk_and_bandwidth_give_positive_rates(tmp_path):
    from kvtier.plan import probe

    d = probe.disk(tmp_path, size=8 << 20)
    assert d.warm > 0 and d.cold > 0 and d.cold_read > 0
    assert not list(tmp_path.iterdir())  # the probe file is removed
    bw = probe.memory_bandwidth(1, size=16 << 20)
    assert set(bw) == {1} and bw[1] > 0
    assert costs.BLOCK == 64
