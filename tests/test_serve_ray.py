"""`kvtier serve --ray` as a user runs it: two engine replicas on Ray Serve behind one endpoint,
the official openai client, prefix-affine routing, /metrics over the replicas, and a replica
killed mid-request. The server starts its own Ray cluster and stops it on SIGTERM."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve import start_server

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'kvtier[ray]')")
pytestmark = pytest.mark.e2e

HEADER = "x-kvtier-replica"


@pytest.fixture(scope="module")
def server():
    url, proc, lines = start_server(["--ray", "--replicas", "2", "--max-request-tokens", "128"], timeout=400,
                                    unset=("RAY_ADDRESS",), start_new_session=True)  # a cluster of its own
    yield url, proc, lines
    if proc.poll() is None:
        proc.terminate()
        proc.wait(90)


def passage(i: int, words: int = 220) -> str:
    """Distinct prompts of several 64-token blocks."""
    from kvtier.bench.data import load_text

    text = load_text("kjv")
    start = 50_000 + i * 40_000
    return " ".join(text[start:].split()[:words])


def complete(url, prompt, max_tokens=4, stream=False):
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                   timeout=300)
    assert r.status_code == 200, r.text
    return r.headers[HEADER], r.json()


def test_two_replicas_answer_and_a_repeated_prefix_goes_back_to_its_replica(server):
    url, *_ = server
    first = [complete(url, passage(i))[0] for i in range(4)]
    assert len(set(first)) == 2  # distinct prompts spread over both replicas
    for i, replica in enumerate(first):  # the same passage with another ending: its replica again
        again, body = complete(url, passage(i) + " And it came to pass")
        assert again == replica
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 128  # and its blocks hit there


def test_openai_client_through_the_cluster(server):
    import openai

    url, *_ = server
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Name a colour."}],
                                  max_tokens=8, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens == 8
    chunks = list(c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError):  # bad input is refused at the endpoint, as without Ray
        c.completions.create(model="smollm2-135m", prompt="x", max_tokens=100_000)


def test_metrics_sum_over_the_replicas(server):
    url, *_ = server
    time.sleep(1.5)  # the replicas report every half second
    got = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            got[s.name] = got.get(s.name, 0.0) + s.value
    assert got["kvtier:replicas"] == 2
    assert got["kvtier:generation_tokens_total"] >= 8 * 4 + 8 + 6  # every request above, both replicas
    assert got["kvtier:prefix_cache_hits_total"] >= 4 * 128


def test_a_killed_replica_fails_only_its_own_requests(server):
    import ray

    url, *_ = server
    out: dict[str, list] = {}

    def stream(name, prompt):
        with httpx.stream("POST", url + "/v1/completions", timeout=300, json={
                "prompt": prompt, "max_tokens": 100, "temperature": 0, "stream": True}) as r:
            out[name] = [r.headers[HEADER]]
            for line in r.iter_lines():
                out[name].append(line)

    threads = [threading.Thread(target=stream, args=(n, passage(10 + i, 60))) for i, n in enumerate("ab")]
    for t in threads:
        t.start()
        time.sleep(1.0)
    while len(out) < 2 or min(len(v) for v in out.values()) < 3:
        time.sleep(0.2)
    assert out["a"][0] != out["b"][0], "the two streams should be on different replicas"
    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    try:
        victim = out["a"][0]
        name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].endswith("#" + victim))
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
    finally:
        ray.shutdown()
    for t in threads:
        t.join(300)
    a, b = "\n".join(out["a"]), "\n".join(out["b"])
    assert f"replica {victim} failed mid-request" in a and '"finish_reason": "error"' in a
    assert '"finish_reason": "length"' in b and "error" not in b
    _, body = complete(url, "And God said", max_tokens=3)  # the endpoint goes on serving
    assert body["choices"][0]["finish_reason"] == "length"


def test_sigterm_stops_the_replicas_and_the_cluster(server):
    url, proc, lines = server
    proc.terminate()
    assert proc.wait(90) == 0, "".join(lines[-20:])
