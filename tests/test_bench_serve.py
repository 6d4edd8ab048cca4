"""``kvtier bench serve`` against a fake OpenAI-compatible streaming server with known delays.

The fake (below; the bench tests run its source in a fresh interpreter) streams
``max_tokens`` content chunks after a first-token delay, with usage in a last chunk, and
misbehaves on request: a prompt containing FAIL500 gets HTTP 500, BREAK a stream cut mid-way,
NODONE a stream with neither a finish_reason nor ``[DONE]``, FINISHONLY one with a
finish_reason and no ``[DONE]`` (as transformers serve ends), NOUSAGE no usage chunk, SLOW a stream slower than any
timeout. Its ``/metrics`` has ``kvtier:kv_bytes`` for two tiers: 1000 B per request in flight
on "cpu" and 7 B on "disk".
"""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from kvtier.bench import report, serve
from kvtier.bench.peers import servers
from kvtier.errors import KvtierError

FIRST = 0.15   # the fake's first-token delay, seconds
STEP = 0.005   # its delay between later tokens


class Fake:
    """A minimal HTTP/1.1 server: one request per connection, chunked SSE responses."""

    def __init__(self, first: float = FIRST, step: float = STEP, startup: float = 0.0):
        self.first, self.step, self.ready_at = first, step, time.monotonic() + startup
        self.active = self.max_active = self.received = 0
        self.arrivals: list[float] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            method, path, _ = head.split("\r\n")[0].split(" ")
            headers = dict(line.lower().split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            await self.route(method, path, body, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def route(self, method: str, path: str, body: bytes, writer) -> None:
        if path == "/health":
            ok = time.monotonic() >= self.ready_at
            return self.reply(writer, 200 if ok else 503, {"status": "ok" if ok else "loading"})
        if path == "/v1/models":
            return self.reply(writer, 200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        if path == "/metrics":
            text = ('# HELP kvtier:kv_bytes KV bytes held\n# TYPE kvtier:kv_bytes gauge\n'
                    f'kvtier:kv_bytes{{tier="cpu"}} {1000.0 * self.active}\nkvtier:kv_bytes{{tier="disk"}} 7.0\n')
            return self.reply(writer, 200, text)
        if path == "/v1/chat/completions" and method == "POST":
            return await self.chat(json.loads(body), writer)
        return self.reply(writer, 404, {"error": "not found"})

    def reply(self, writer, status: int, payload) -> None:
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)

    async def chat(self, req: dict, writer) -> None:
        prompt = " ".join(m["content"] for m in req["messages"])
        self.received += 1
        self.arrivals.append(time.monotonic())
        if "FAIL500" in prompt:
            return self.reply(writer, 500, {"error": {"message": "boom"}})
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")

            async def event(obj) -> None:
                data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                await writer.drain()

            await event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            await asyncio.sleep(self.first * (100 if "SLOW" in prompt else 1))
            n, per = req["max_tokens"], 2 if "PAIRS" in prompt else 1  # PAIRS: two tokens a chunk
            for i in range(0, n, per):
                if i:
                    await asyncio.sleep(self.step)
                if "BREAK" in prompt and i == 3:
                    writer.transport.abort()  # mid-stream: no terminating chunk
                    return
                text = "".join(f"t{j} " for j in range(i, min(i + per, n)))
                await event({"choices": [{"index": 0, "delta": {"content": text}}], "usage": None})
            if "NODONE" not in prompt:
                await event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            if "NOUSAGE" not in prompt:
                await event({"choices": [], "usage": {"prompt_tokens": len(prompt.split()),
                                                      "completion_tokens": n, "total_tokens": n}})
            if "NODONE" not in prompt and "FINISHONLY" not in prompt:
                await event("[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            self.active -= 1


async def _with_fake(coro_fn, **kw):
    fake = Fake(**kw)
    srv = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with srv:
        result = await coro_fn(f"http://127.0.0.1:{port}")
    return fake, result


def _bodies(prompts: list[str], max_tokens: int = 8) -> list[dict]:
    return [serve.chat_body("fake-model", [{"role": "user", "content": p}], max_tokens) for p in prompts]


def _load(bodies, load, **cfg):
    cfg = serve.LoadConfig(**{"request_timeout": 10.0, "run_timeout": 60.0, **cfg})
    return asyncio.run(_with_fake(lambda url: serve.run_load(url, bodies, load, cfg)))


def test_closed_loop_completes_exactly_k_at_n_in_flight():
    fake, (samples, wall) = _load(_bodies([f"p{i}" for i in range(7)]), serve.Load(concurrency=3))
    assert fake.received == 7 and fake.max_active == 3
    assert len(samples) == 7 and all(s.ok for s in samples)
    assert all(s.ttft >= FIRST for s in samples)  # send -> first content, not the empty role chunk
    assert all(s.tokens == 8 and len(s.itl) == 7 for s in samples)  # 8 chunks, 7 gaps
    assert all(s.e2e >= s.ttft + 7 * STEP * 0.9 for s in samples)
    assert all(s.tpot == pytest.approx((s.e2e - s.ttft) / 7) for s in samples)
    assert all(s.prompt_tokens == 1 for s in samples)  # from the usage chunk
    assert wall >= 3 * FIRST  # 7 requests, 3 at a time: at least three waves


def test_tokens_from_usage_else_counted_chunks():
    # PAIRS streams two tokens per chunk: the usage chunk says 6, a count of chunks says 3
    _, (samples, _) = _load(_bodies(["PAIRS", "PAIRS NOUSAGE"], max_tokens=6), serve.Load(concurrency=2))
    assert [s.ok for s in samples] == [True, True]
    assert [s.tokens for s in samples] == [6, 3]
    assert samples[0].prompt_tokens == 1 and samples[1].prompt_tokens is None


def test_failures_are_counted_never_dropped():
    prompts = ["ok", "FAIL500", "BREAK", "NODONE", "SLOW", "FINISHONLY"]
    _, (samples, wall) = _load(_bodies(prompts), serve.Load(concurrency=6), request_timeout=1.0)
    assert [s.ok for s in samples] == [True, False, False, False, False, True]
    assert "HTTP 500" in samples[1].error
    assert "RemoteProtocolError" in samples[2].error or "Read" in samples[2].error
    assert samples[3].error == "stream ended without [DONE] or a finish_reason"
    assert "timed out" in samples[4].error
    row = serve.summarize(samples, wall, serve.LoadConfig(max_tokens=8))
    assert (row["completed"], row["failed"], row["short"]) == (2, 4, 0)
    assert row["output_tokens"] == 16  # only completed requests count
    assert len(row["errors"]) == 4


def test_run_timeout_counts_unfinished_requests_as_failed():
    _, (samples, _) = _load(_bodies(["SLOW"] + ["x"] * 3), serve.Load(concurrency=1),
                            request_timeout=30.0, run_timeout=0.5)
    assert not any(s.ok for s in samples)
    assert "run timeout" in samples[-1].error


def test_open_loop_sends_k_requests_at_seeded_poisson_times():
    fake, (samples, _) = _load(_bodies([f"p{i}" for i in range(6)]), serve.Load(rate=50.0), seed=3)
    assert fake.received == 6 and all(s.ok for s in samples)
    assert serve.arrivals(6, 50.0, 3) == serve.arrivals(6, 50.0, 3)  # seeded
    assert serve.arrivals(6, 50.0, 3) != serve.arrivals(6, 50.0, 4)
    gaps = serve.arrivals(2000, 10.0, 0)
    assert gaps[0] == 0.0 and all(b > a for a, b in zip(gaps, gaps[1:]))


def test_summary_percentiles_and_goodput():
    ok = [serve.Sample(True, ttft=t, e2e=t + 0.9, itl=[0.1] * 9, tokens=10) for t in (0.5, 1.0, 3.0)]
    row = serve.summarize(ok + [serve.Sample(False, error="x")], 2.0, serve.LoadConfig(ttft_slo=2.0, tpot_slo=0.2))
    assert row["ttft_p50_s"] == 1.0 and row["tpot_p50_s"] == pytest.approx(0.1)
    assert row["goodput_req_s"] == 1.0  # two of three met TTFT <= 2 s, over 2 s
    assert row["output_tok_s"] == 15.0 and row["req_s"] == 1.5 and row["failed"] == 1


# ---- the whole bench: a fake server started as a subprocess --------------------------------

@dataclass(frozen=True)
class FakeServer(servers.Server):
    """The fake above as a server the bench starts, with kvtier's metric."""

    name: ClassVar[str] = "fake"
    metrics: ClassVar[str | None] = "/metrics"
    kv_source: ClassVar[str | None] = "sum over tiers of kvtier:kv_bytes (/metrics)"
    start_timeout: ClassVar[float] = 30.0
    startup: float = 0.5
    crash: bool = False

    def require(self) -> None:
        pass

    def command(self, port, launch):
        if self.crash:
            return [sys.executable, "-c", "print('crashing on purpose'); raise SystemExit(3)"]
        # the fake's own source alone: the server process imports nothing of kvtier (nor torch)
        main = (f"async def main():\n    srv = await asyncio.start_server(Fake(startup={self.startup}).handle, "
                f"'127.0.0.1', {port})\n    await srv.serve_forever()\nasyncio.run(main())\n")
        return [sys.executable, "-c", f"import asyncio, json, time\nFIRST, STEP = {FIRST}, {STEP}\n"
                + inspect.getsource(Fake) + main]

    def label(self, launch):
        return launch.kv

    def kv_held(self, metrics, log):
        return servers.Kvtier().kv_held(metrics, log)


FIELDS = ("server", "kv", "concurrency", "rate", "prompt_tokens", "max_tokens", "requests", "completed",
          "failed", "output_tok_s", "req_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s",
          "tpot_p90_s", "itl_p90_s", "goodput_req_s", "peak_rss_bytes", "kv_bytes_peak")


def test_bench_starts_measures_and_stops_the_server(tmp_path):
    cfg = serve.LoadConfig(requests=4, max_tokens=6, request_timeout=10, run_timeout=60)
    loads = [serve.Load(concurrency=1), serve.Load(concurrency=2), serve.Load(rate=20.0)]
    messages = [[[{"role": "user", "content": f"row {r} req {i}"}] for i in range(4)] for r in range(3)]
    seen = []
    rows, errors = serve.bench([(FakeServer(), servers.Launch("fake-model", kv="dense"))], loads, messages,
                               cfg, prompt_tokens=4, log_dir=tmp_path, on_row=seen.append)
    assert errors == [] and len(rows) == 3 and seen == rows
    for row in rows:
        assert set(FIELDS) <= set(row)
        assert (row["completed"], row["failed"], row["requests"]) == (4, 0, 4)
        assert row["ttft_p50_s"] >= FIRST and row["peak_rss_bytes"] > 0
        assert 7 <= row["kv_bytes_peak"] <= 7 + 1000 * 4  # summed over both tiers
        assert row["kv_bytes_source"] and row["start_s"] >= 0.4  # it waited for /health
    assert [r["concurrency"] for r in rows] == [1, 2, None] and rows[2]["rate"] == 20.0
    report.write_json(tmp_path / "out.json", rows)
    got = json.loads((tmp_path / "out.json").read_text())["results"]
    assert all(set(FIELDS) <= set(r) for r in got)
    report.serve_plot(tmp_path / "out.png", rows)
    assert (tmp_path / "out.png").stat().st_size > 1000
    report.show(report.serve_table(rows))
    log = Path(rows[0]["log"])
    assert log.exists()


def test_a_server_that_dies_while_starting_is_reported(tmp_path):
    cfg = serve.LoadConfig(requests=2, max_tokens=4)
    rows, errors = serve.bench([(FakeServer(crash=True), servers.Launch("m"))], [serve.Load(concurrency=1)],
                               [[[{"role": "user", "content": "x"}]] * 2], cfg, None, tmp_path)
    assert rows == [] and len(errors) == 1 and "exited with code 3" in errors[0] and "crashing" in errors[0]


def test_stop_terminates_the_process_group(tmp_path):
    # a parent that ignores nothing and a child in its group: both go
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"],
                            start_new_session=True)
    time.sleep(0.5)
    import psutil

    kids = psutil.Process(proc.pid).children(recursive=True)
    serve.stop(proc, timeout=5)
    assert proc.returncode is not None
    assert all(not k.is_running() or k.status() == psutil.STATUS_ZOMBIE for k in kids)


# ---- prompts and peers ---------------------------------------------------------------------

class WordTokenizer:
    """One token per word: enough to check where passages start and how long they are."""

    def encode(self, text, add_special_tokens=False):
        return text.split()

    def decode(self, ids):
        return " ".join(ids)


def test_passages_start_at_different_offsets():
    text = " ".join(f"w{i}" for i in range(5000))
    got = serve.passages(WordTokenizer(), text, [0, 1000, 20000], [5, 5, 5])
    assert got[0] == "w0 w1 w2 w3 w4" and all(len(p.split()) == 5 for p in got)
    assert len({p.split()[0] for p in got}) == 3


def test_read_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n\n{"messages": [{"role": "user", "content": "yo"}]}\n')
    got = serve.read_prompts(str(path), 3)
    assert got == [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}],
                   [{"role": "user", "content": "hi"}]]
    path.write_text('{"prompt": "hi"}\n[1, 2]\n')
    with pytest.raises(KvtierError, match=":2:"):
        serve.read_prompts(str(path), 1)
    with pytest.raises(KvtierError, match="no such file|No such file"):
        serve.read_prompts(str(tmp_path / "missing.jsonl"), 1)


def test_peer_servers_parse_and_bind_loopback(tmp_path):
    got = servers.parse_list("vllm(kv_space_gib=2),llamacpp(kv=q8_0),transformers")
    assert [s.name for s in got] == ["vllm", "llamacpp", "transformers"]
    assert got[0].env(servers.Launch("m"))["VLLM_CPU_KVCACHE_SPACE"] == "2"
    with pytest.raises(KvtierError, match="unknown server"):
        servers.parse("sglang")
    with pytest.raises(KvtierError, match="q8_0"):
        servers.parse("llamacpp(kv=q2)")
    cmd = servers.Kvtier().command(8123, servers.Launch("smollm2-135m", kv="rotatekv"))
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and "rotatekv" in cmd
    tuned = servers.Launch("smollm2-135m", kv="dense", extra=("--ttft-slo", "5"))
    assert servers.Kvtier().command(8123, tuned)[-2:] == ["--ttft-slo", "5"]
    assert servers.Kvtier().label(tuned) == "dense --ttft-slo 5"  # rows of compared settings stay apart
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    llama = servers.LlamaServer(kv="q8_0")
    if llama.binary():
        cmd = llama.command(8124, servers.Launch(str(gguf), slots=4, context=1100))
        assert cmd[cmd.index("-np") + 1] == "4" and cmd[cmd.index("-c") + 1] == str(4 * 1280)
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("-ctk") + 1] == "q8_0"
        assert "--no-repack" not in cmd
        plain = servers.parse("llamacpp(repack=off)")
        assert "--no-repack" in plain.command(8124, servers.Launch(str(gguf)))
    assert str(servers.parse("llamacpp")) == "llamacpp(kv=f16)"  # the default stays out of row names
    assert servers.parse("llamacpp(repack=off)").label(servers.Launch("m")) == "f16, no repack"


def test_kv_bytes_from_metrics_and_logs():
    text = ('# TYPE kvtier:kv_bytes gauge\nkvtier:kv_bytes{tier="cpu"} 1.5e3\n'
            'kvtier:kv_bytes{tier="disk"} 500\nkvtier:kv_bytes_per_token{spec="x"} 9\n')
    assert servers.Kvtier().kv_held(text, "") == 2000
    assert servers.Kvtier().kv_held("other 1\n", "") is None
    vllm = servers.Vllm(kv_space_gib=2)
    assert vllm.kv_held('vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n', "") == 2**29
    log = ("0.01.369.765 I llama_kv_cache: size =   90.00 MiB (  4096 cells,  30 layers,  4/4 seqs), "
           "K (f16):   45.00 MiB, V (f16):   45.00 MiB")
    assert servers.LlamaServer().kv_held(None, log) == 90 * 2**20


def test_missing_peers_name_their_set_up(monkeypatch, tmp_path):
    monkeypatch.setattr(servers, "ROOT", tmp_path)
    monkeypatch.setattr(servers.Vllm, "python", tmp_path / "none")
    with pytest.raises(KvtierError, match="bench-serve-setup.sh vllm"):
        servers.Vllm().require()
    monkeypatch.setattr(servers.LlamaServer, "binary", lambda self: None)
    with pytest.raises(KvtierError, match="bench-serve-setup.sh llamacpp"):
        servers.LlamaServer().require()


@pytest.mark.parametrize("args, message", [
    (["--rate", "0,2"], "positive numbers"),
    (["--rate", "fast"], "comma-separated numbers"),
    (["--concurrency", "0"], "positive integers"),
    (["--prefix-tokens", "50", "--prompt-tokens", "10"], "more than --prompt-tokens"),
    (["--no-kvtier"], "needs --peers"),
    (["--peers", "sglang"], "unknown server"),
    (["--kv", "nosuch"], "unknown method"),
])
def test_cli_rejects_bad_input_before_starting_anything(args, message):
    from typer.testing import CliRunner

    from kvtier.cli import app

    result = CliRunner().invoke(app, ["bench", "serve", *args])
    assert result.exit_code != 0 and isinstance(result.exception, ValueError)
    assert message in str(result.exception)


@pytest.mark.e2e
def test_kjv_prompts_have_the_asked_tokens_and_share_only_the_asked_prefix():
    from transformers import AutoTokenizer

    from kvtier.models.loader import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
    rows = serve.kjv_prompts("smollm2-135m", 2, serve.LoadConfig(requests=3, prompt_tokens=200))
    texts = [conv[0]["content"] for row in rows for conv in row]
    assert all(abs(len(tok.encode(t, add_special_tokens=False)) - 200) <= 1 for t in texts)
    assert len({t[:40] for t in texts}) == 6  # no two share a start
    rows = serve.kjv_prompts("smollm2-135m", 2, serve.LoadConfig(requests=3, prompt_tokens=200, prefix_tokens=100))
    for row in rows:
        heads = {tok.encode(c[0]["content"], add_special_tokens=False)[:95].__str__() for c in row}
        assert len(heads) == 1  # one shared passage per row
    assert rows[0][0][0]["content"][:40] != rows[1][0][0]["content"][:40]  # rows do not share it
