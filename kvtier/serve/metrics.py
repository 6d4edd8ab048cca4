"""``/metrics``: prometheus-client metrics under the names vLLM users already chart
(``vllm:`` becomes ``kvtier:``), plus kvtier's own bytes per tier and per spec. Each server
has its own registry (two servers in one process do not share counters)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
           20.0, 40.0, 80.0, 160.0)


class Metrics:
    def __init__(self, model: str):
        self.registry = r = CollectorRegistry()
        label = ["model_name"]
        self.model = model
        self.ttft = Histogram("kvtier:time_to_first_token_seconds", "Time to first token", label,
                              buckets=LATENCY, registry=r)
        self.itl = Histogram("kvtier:inter_token_latency_seconds", "Time between output tokens", label,
                             buckets=LATENCY, registry=r)
        self.e2e = Histogram("kvtier:e2e_request_latency_seconds", "Request latency, arrival to end", label,
                             buckets=LATENCY, registry=r)
        self.queue = Histogram("kvtier:request_queue_time_seconds", "Time waiting before admission", label,
                               buckets=LATENCY, registry=r)
        self.running = Gauge("kvtier:num_requests_running", "Sequences running", label, registry=r)
        self.waiting = Gauge("kvtier:num_requests_waiting", "Sequences waiting", label, registry=r)
        self.usage = Gauge("kvtier:kv_cache_usage_perc", "KV bytes held / --kv-budget (0 without a budget)",
                           label, registry=r)
        self.queries = Counter("kvtier:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                               label, registry=r)
        self.hits = Counter("kvtier:prefix_cache_hits", "Prompt tokens found in the prefix cache", label,
                            registry=r)
        self.prompt = Counter("kvtier:prompt_tokens", "Prompt tokens processed", label, registry=r)
        self.generated = Counter("kvtier:generation_tokens", "Tokens generated", label, registry=r)
        self.success = Counter("kvtier:request_success", "Finished requests", label + ["finished_reason"],
                               registry=r)
        self.kv_bytes = Gauge("kvtier:kv_bytes", "KV bytes held (blocks, buffers, block table, prefix cache)",
                              label + ["tier"], registry=r)
        self.prefix_bytes = Gauge("kvtier:prefix_cache_bytes", "Bytes of the prefix cache (part of kv_bytes)",
                                  label, registry=r)
        self.per_token = Gauge("kvtier:kv_bytes_per_token", "KV bytes held per token, by cache spec",
                               label + ["kv"], registry=r)
        for metric in (self.ttft, self.itl, self.e2e, self.queue, self.running, self.waiting, self.usage,
                       self.queries, self.hits, self.prompt, self.generated, self.prefix_bytes):
            metric.labels(model)  # exported at zero from the start
        self._seen = (0, 0)
        self._last_token: dict[int, float] = {}

    def tokens(self, seq, n: int) -> None:
        """``seq`` got ``n`` tokens in this step."""
        now = time.perf_counter()
        m = self.model
        if seq.id not in self._last_token:
            self.ttft.labels(m).observe(now - seq.timing.arrival)
        else:
            self.itl.labels(m).observe((now - self._last_token[seq.id]) / n)
        self._last_token[seq.id] = now
        self.generated.labels(m).inc(n)

    def finished(self, seq) -> None:
        m, t = self.model, seq.timing
        self._last_token.pop(seq.id, None)
        self.e2e.labels(m).observe((t.finished or time.perf_counter()) - t.arrival)
        self.queue.labels(m).observe(t.queue_s)
        self.prompt.labels(m).inc(len(seq.prompt_ids))
        self.success.labels(m, seq.finish_reason or "abort").inc()

    def update(self, snap) -> None:
        m = self.model
        self.running.labels(m).set(snap.running)
        self.waiting.labels(m).set(snap.waiting)
        self.usage.labels(m).set(snap.kv_usage)
        for tier, nbytes in snap.kv_bytes:
            self.kv_bytes.labels(m, tier).set(nbytes)
        self.prefix_bytes.labels(m).set(snap.prefix_bytes)
        for kv, bpt in snap.bytes_per_token.items():
            self.per_token.labels(m, kv).set(bpt)
        q, h = self._seen
        if snap.prefix_queries > q:
            self.queries.labels(m).inc(snap.prefix_queries - q)
        if snap.prefix_hits > h:
            self.hits.labels(m).inc(snap.prefix_hits - h)
        self._seen = (snap.prefix_queries, snap.prefix_hits)
