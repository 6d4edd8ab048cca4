"""`kvtier serve` as a user runs it: a real server subprocess on 127.0.0.1, the official openai
client, streams that disconnect, bad requests; and the app in-process for limits and keys."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

CHAT = [{"role": "user", "content": "Name three colours."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], timeout: float = 300, unset: tuple[str, ...] = (), **popen):
    """``kvtier serve ARGS`` on a free loopback port, once /health answers: (url, process, the
    lines it printed so far). ``unset``: environment variables the server must not see."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in unset} | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, **popen)
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url, proc, lines
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"kvtier serve {' '.join(args)} exited:\n" + "".join(lines))
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"kvtier serve {' '.join(args)} did not start:\n" + "".join(lines))


@pytest.fixture(scope="module")
def server():
    url, proc, lines = start_server(["--dtype", "fp32", "--max-queued", "64", "--allowed-kv", "int(bits=4)",
                                     "--max-request-tokens", "256", "--read-timeout", "3"])
    yield url, proc, lines
    if proc.poll() is None:
        proc.terminate()
        proc.wait(60)


def client(url):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def metrics(url) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            key = s.name + ("" if "tier" not in s.labels else f"[{s.labels['tier']}]")
            out[key] = out.get(key, 0.0) + s.value
    return out


def test_openai_client_chat_and_completions_streamed_and_not(server):
    url, *_ = server
    c = client(url)
    r = c.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=12, temperature=0)
    whole = r.choices[0].message.content
    assert whole and r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens > 5
    chunks = list(c.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole  # greedy: the stream says what the whole answer said
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices  # usage in the last chunk
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    done = c.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=8,
                                temperature=0)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="smollm2-135m", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert done.choices[0].text == streamed and len(streamed) > 0


def test_n_stop_and_logprobs(server):
    url, *_ = server
    c = client(url)
    r = c.completions.create(model="smollm2-135m", prompt="One, two, three,", max_tokens=20, n=2,
                             temperature=0.9, seed=3, logprobs=2)
    assert [ch.index for ch in r.choices] == [0, 1]
    for ch in r.choices:
        lp = ch.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 20
        assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    g = c.completions.create(model="smollm2-135m", prompt="One, two, three,", max_tokens=20, temperature=0)
    cut = g.choices[0].text[4:7]
    s = c.completions.create(model="smollm2-135m", prompt="One, two, three,", max_tokens=20, temperature=0,
                             stop=[cut])
    assert s.choices[0].finish_reason == "stop" and cut not in s.choices[0].text
    assert g.choices[0].text.startswith(s.choices[0].text)
    chat = c.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=4, temperature=0,
                                     logprobs=True, top_logprobs=3)
    items = chat.choices[0].logprobs.content
    assert len(items) == 4 and all(len(i.top_logprobs) == 3 for i in items)
    assert items[0].logprob == pytest.approx(items[0].top_logprobs[0].logprob, abs=1e-4)  # greedy: the top one


def test_request_names_its_cache_spec_within_allowed(server):
    url, *_ = server
    c = client(url)
    r = c.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=4, temperature=0,
                                  extra_body={"kv": "int(bits=4)"})
    assert r.usage.completion_tokens == 4
    bad = httpx.post(url + "/v1/chat/completions", json={"messages": CHAT, "kv": "rotatekv"})
    assert bad.status_code == 400 and "not allowed" in bad.json()["error"]["message"]


def _stream(url, body, out, key, stop_after=None):
    text = ""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                text += chunk["choices"][0]["delta"].get("content", "")
            if stop_after is not None and len(text) >= stop_after:
                break  # the client goes away mid-stream
    out[key] = text


def test_sixteen_streams_three_disconnect_the_rest_match_alone(server):
    url, proc, lines = server
    prompts = [f"Write a line about the number {i}." for i in range(16)]
    bodies = [{"messages": [{"role": "user", "content": p}], "max_tokens": 24, "temperature": 0, "stream": True}
              for p in prompts]
    alone = {}
    for i in (0, 5, 9):  # a few, one at a time
        _stream(url, bodies[i], alone, i)
    together: dict = {}
    threads = [threading.Thread(target=_stream, args=(url, b, together, i, 3 if i in (1, 2, 3) else None))
               for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i in (0, 5, 9):
        assert together[i] == alone[i]
    assert len(together) == 16
    deadline = time.time() + 30  # the disconnected streams' sequences are aborted and their blocks freed
    while time.time() < deadline:
        m = metrics(url)
        if m['kvtier:num_requests_running'] == 0 and m["kvtier:kv_bytes[cpu]"] == m["kvtier:prefix_cache_bytes"]:
            break
        time.sleep(0.5)
    assert m["kvtier:num_requests_running"] == 0 and m["kvtier:num_requests_waiting"] == 0
    assert m["kvtier:kv_bytes[cpu]"] == m["kvtier:prefix_cache_bytes"]  # no running cache holds a byte
    assert m["kvtier:request_success_total"] >= 16
    assert any("finish abort" in line for line in lines)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    url, *_ = server
    post = lambda body, **kw: httpx.post(url + "/v1/chat/completions", timeout=60, **kw, **body)  # noqa: E731
    cases = [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "JSON"),
        ({"json": {"messages": "hi"}}, 400, "messages"),
        ({"json": {"messages": []}}, 400, "messages"),
        ({"json": {"messages": CHAT, "model": "gpt-9"}}, 404, "gpt-9"),
        ({"json": {"messages": CHAT, "kv": "int(bits=5)"}}, 400, "bits"),
        ({"json": {"messages": CHAT, "max_tokens": 100000}}, 400, "max_tokens"),
        ({"json": {"messages": CHAT, "temperature": -1}}, 400, "temperature"),
        ({"content": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
          "headers": {"content-type": "application/json"}}, 400, "NaN"),
        ({"content": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
          "headers": {"content-type": "application/json"}}, 400, "surrogate"),
        ({"content": b'{"messages": [{"role": "user", "content": "\xff"}]}',
          "headers": {"content-type": "application/json"}}, 400, "UTF-8"),
        ({"json": {"messages": [{"role": "user", "content": "word " * 9000}]}}, 400, "context"),
        ({"json": {"messages": CHAT, "top_p": 0}}, 400, "top_p"),
        ({"json": {"messages": CHAT, "max_tokens": 2.5}}, 400, "max_tokens"),
    ]
    for kw, status, words in cases:
        r = post(kw)
        assert r.status_code == status, (kw, r.text)
        assert words.lower() in r.json()["error"]["message"].lower(), (kw, r.text)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:  # a 100 MB body: refused unread
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 104857600\r\n\r\n" + b"x" * 65536)
        assert b" 413 " in s.recv(4096).split(b"\r\n")[0]
    ok = post({"json": {"messages": CHAT, "max_tokens": 2}})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_slow_client_times_out(server):
    url, *_ = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{")
        s.settimeout(120)
        reply = s.recv(4096)
    assert b" 408 " in reply.split(b"\r\n")[0]


def test_metrics_parse_with_vllm_style_names(server):
    url, *_ = server
    client(url).completions.create(model="smollm2-135m", prompt="Hello", max_tokens=3)
    m = metrics(url)
    for name in ("kvtier:time_to_first_token_seconds_count", "kvtier:inter_token_latency_seconds_count",
                 "kvtier:e2e_request_latency_seconds_count", "kvtier:request_queue_time_seconds_count",
                 "kvtier:num_requests_running", "kvtier:num_requests_waiting", "kvtier:kv_cache_usage_perc",
                 "kvtier:prefix_cache_queries_total", "kvtier:prefix_cache_hits_total", "kvtier:kv_bytes[cpu]",
                 "kvtier:generation_tokens_total"):
        assert name in m, name
    assert m["kvtier:time_to_first_token_seconds_count"] >= 1
    models = httpx.get(url + "/v1/models").json()["data"][0]
    assert models["id"] == "smollm2-135m" and models["max_model_len"] == 8192


def test_sigterm_drains_running_requests(server):
    url, proc, lines = server
    out: dict = {}
    t = threading.Thread(target=_stream, args=(url, {"messages": CHAT, "max_tokens": 30, "temperature": 0,
                                                     "stream": True, "ignore_eos": True}, out, "a"))
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline and metrics(url)["kvtier:num_requests_running"] == 0:
        time.sleep(0.1)
    proc.terminate()
    t.join(120)
    assert proc.wait(60) == 0
    assert len(out["a"]) > 0
    assert any("30 generated" in line for line in lines)  # it ran to its end


# in-process: limits and keys (no socket, no sleeping on the engine)
def _app(smollm2, **server):
    from kvtier.config import EngineConfig, ServerConfig
    from kvtier.engine import Engine
    from kvtier.serve.app import build
    from kvtier.serve.metrics import Metrics
    from kvtier.serve.worker import Worker

    engine = Engine(EngineConfig(dtype="fp32"), loaded=smollm2)
    worker = Worker(engine, Metrics("smollm2-135m"))
    tok = engine.tokenizer
    app = build(worker, ServerConfig(**server), "smollm2-135m", lambda t: tok(t).input_ids,
                lambda m: tok.apply_chat_template(m, add_generation_prompt=True), tok.decode)
    return app, worker


def test_queue_limit_gives_429_with_retry_after(smollm2):
    app, worker = _app(smollm2, max_queued=2)  # the worker is not started: nothing leaves the queue

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = {"prompt": "hi", "max_tokens": 2}
            held = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(2)]
            await asyncio.sleep(0.5)
            r = await c.post("/v1/completions", json=body)
            for t in held:
                t.cancel()
            return r

    r = asyncio.run(go())
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert "waiting" in r.json()["error"]["message"]


def test_api_key_is_enforced_on_v1_routes(smollm2):
    from kvtier.config import ServerConfig
    from kvtier.errors import KvtierError
    from kvtier.serve import check

    app, worker = _app(smollm2, api_key="sesame")

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return (await c.get("/v1/models"), await c.get("/v1/models", headers={"Authorization": "Bearer no"}),
                    await c.get("/v1/models", headers={"Authorization": "Bearer sesame"}), await c.get("/health"))

    none, wrong, right, health = asyncio.run(go())
    assert none.status_code == wrong.status_code == 401 and right.status_code == 200 and health.status_code == 200
    with pytest.raises(KvtierError, match="api-key"):
        check(ServerConfig(host="0.0.0.0"))
    check(ServerConfig(host="0.0.0.0", api_key="k"))
