"""``kvtier serve --ray``: N engine replicas as a Ray Serve deployment behind one OpenAI endpoint.

The endpoint is the same FastAPI app as ``kvtier serve``'s (:mod:`kvtier.serve.app`), run in
this process; where it would hand a request to its engine thread, it hands it to a
:class:`RayWorker`, which calls a :class:`Replica` through a Ray Serve deployment handle. Each
replica runs its own engine on its own :class:`~kvtier.serve.worker.Worker` thread.

Routing (:class:`PrefixRouter`, on Ray Serve's ``RequestRouter`` API): a request goes to the
replica that holds the longest prefix of its prompt in its prefix cache, by the same chained
block keys the engine's prefix cache uses, unless the replicas' loads differ by more than
``imbalance`` requests; then, and when no replica holds a useful prefix (under ``min_match`` of
the prompt's blocks), to the least loaded. ``--routing round-robin`` is the baseline.

``/metrics`` sums the replicas' metrics (averages their ratios), which each replica reports to
a :class:`MetricsHub` actor every half second. A replica that dies fails its own in-flight
requests with an error that names it; Ray Serve starts a new one and the others go on serving.
Each response names the replica that served it in ``x-kvtier-replica``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict

from kvtier.config import ClusterConfig, EngineConfig, ServerConfig
from kvtier.errors import KvtierError
from kvtier.serve.worker import Delta, Served

log = logging.getLogger("kvtier.serve")

APP, DEPLOYMENT, HUB = "kvtier", "Replica", "kvtier-metrics"
HEADER = "x-kvtier-replica"
REPORT_EVERY = 0.5  # seconds between a replica's reports to the hub
STALE = 15.0  # seconds after which a silent replica's report is dropped from /metrics


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise KvtierError("kvtier serve --ray needs Ray Serve: pip install 'kvtier[ray]'") from None
    return ray, serve


# --- the replicas ------------------------------------------------------------------------

class Replica:
    """One engine replica (the Ray Serve deployment's class)."""

    def __init__(self, engine_cfg: EngineConfig, server_cfg: ServerConfig, model_id: str, threads: int):
        import ray
        import torch
        from ray import serve

        from kvtier.serve import make_worker

        torch.set_num_threads(threads)
        context = serve.get_replica_context()
        self.id = context.replica_id.unique_id
        _pin(context, threads)
        self.worker = make_worker(engine_cfg, server_cfg, model_id)
        self.hub = ray.get_actor(HUB, namespace=ray.get_runtime_context().namespace)
        self._stop = threading.Event()
        threading.Thread(target=self._report, name="kvtier-report", daemon=True).start()

    def served(self, extra_kv: list[str]) -> Served:
        return self.worker.served(extra_kv)

    async def generate(self, rid: str, ids: list[int], params: list, kv: str | None, priority: int):
        """This replica's id, then the request's :class:`Delta` events until every choice ends
        (a :class:`KvtierError` the engine refused it with, instead). Cancelled (the client went
        away): its sequences are aborted and their blocks freed."""
        yield self.id
        out, seqs = self.worker.submit(rid, ids, params, kv, priority)
        left = len(params)
        try:
            while left:
                item = await out.get()
                if isinstance(item, Exception):
                    yield KvtierError(str(item))
                    return
                if item.finish_reason is not None:
                    left -= 1
                yield item
        finally:
            if left:
                self.worker.abort(seqs)

    def check_health(self) -> None:  # Ray Serve's health check: a failed engine restarts the replica
        if self.worker.error is not None:
            raise RuntimeError(f"the engine failed: {self.worker.error}")

    def _report(self) -> None:
        from prometheus_client import generate_latest

        while not self._stop.wait(REPORT_EVERY):
            try:
                text = generate_latest(self.worker.metrics.registry).decode()
                self.hub.report.remote(self.id, text, self.worker.queued)
            except Exception:  # the hub is restarting: report next time
                pass

    def __del__(self):
        self._stop.set()
        self.worker.stop()


def _pin(context, threads: int) -> None:
    """A replica with whole CPUs runs on its own cores of its node (by its rank there), so that
    replicas on one machine do not share a core."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    rank = getattr(getattr(context, "rank", None), "local_rank", None)
    if rank is None or len(cores) < threads:
        return
    first = (rank * threads) % len(cores)
    mine = {cores[(first + i) % len(cores)] for i in range(threads)}
    try:
        os.sched_setaffinity(0, mine)
    except OSError:
        pass


class MetricsHub:
    """The replicas' latest metrics, for ``/metrics`` (an actor: replicas report, the endpoint reads)."""

    def __init__(self):
        self.reports: dict[str, tuple[float, str, int]] = {}

    def report(self, replica: str, text: str, waiting: int) -> None:
        self.reports[replica] = (time.monotonic(), text, waiting)

    def collect(self) -> dict[str, tuple[str, int]]:
        now = time.monotonic()
        return {r: (text, waiting) for r, (at, text, waiting) in self.reports.items() if now - at < STALE}


# --- routing -----------------------------------------------------------------------------

def _router_base():
    from ray.serve.request_router import RequestRouter

    return RequestRouter


class PrefixRouter(_router_base()):
    """Prefix-cache affinity on the prompt's block keys; the least loaded when loads are uneven."""

    def initialize_state(self, block_size: int = 64, imbalance: int = 4, min_match: float = 0.1,
                         capacity: int = 200_000):
        self.block_size, self.imbalance, self.min_match, self.capacity = block_size, imbalance, min_match, capacity
        self.owners: OrderedDict[bytes, set] = OrderedDict()  # block key -> replica ids that hold it
        self.owned: dict = {}  # replica id -> block keys routed to it (ties between equal loads)

    def _keys(self, pending) -> list[bytes]:
        from kvtier.engine.block_manager import PrefixCache

        args = pending.args if pending is not None else None
        if not args or len(args) < 4:
            return []
        return PrefixCache.keys(args[3] or "", args[1], 0, self.block_size)

    def _load(self, replica) -> int:
        n = self.replica_queue_len_cache.get(replica.replica_id)
        return 0 if n is None else n

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        by_load = sorted(candidate_replicas, key=lambda r: (self._load(r), self.owned.get(r.replica_id, 0)))
        loads = [self._load(r) for r in by_load]
        keys = self._keys(pending_request)
        if not keys or loads[-1] - loads[0] > self.imbalance:
            return [by_load]
        matched = {}
        for r in candidate_replicas:
            n = 0
            for k in keys:
                if r.replica_id not in self.owners.get(k, ()):
                    break
                n += 1
            matched[r.replica_id] = n
        best = max(matched.values())
        if best < self.min_match * len(keys):
            return [by_load]
        first = [r for r in by_load if matched[r.replica_id] == best]
        return [first, [r for r in by_load if matched[r.replica_id] != best]]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        for k in self._keys(pending_request):
            holders = self.owners.setdefault(k, set())
            if replica_id not in holders:
                holders.add(replica_id)
                self.owned[replica_id] = self.owned.get(replica_id, 0) + 1
            self.owners.move_to_end(k)
        while len(self.owners) > self.capacity:
            _, holders = self.owners.popitem(last=False)
            for r in holders:
                self.owned[r] -= 1

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        for holders in self.owners.values():
            holders.discard(replica_id)
        self.owned.pop(replica_id, None)


class RoundRobinRouter(_router_base()):
    """Each request to the next replica in turn (the baseline for prefix affinity)."""

    def initialize_state(self, **_):
        self.turn = itertools.count()

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        i = next(self.turn) % len(ordered)
        return [[ordered[i]], ordered[i + 1:] + ordered[:i]]


# --- the endpoint's side -----------------------------------------------------------------

class Ticket:
    """One request sent to a replica: which replica took it, and its stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.replica: asyncio.Future = loop.create_future()
        self.stream = None
        self.task: asyncio.Task | None = None
        self.cancelled = False  # the client went away: the stream's end is not the replica's failure


class RayWorker:
    """What :func:`kvtier.serve.app.build` needs from a worker, over Ray Serve replicas."""

    def __init__(self, handle, hub, model_id: str):
        self.handle, self.hub, self.model_id = handle, hub, model_id
        self.metrics = ClusterMetrics(self, model_id)
        self.error = None
        self._reports: dict[str, tuple[str, int]] = {}
        self._polled = 0.0

    def served(self, extra_kv: list[str]) -> Served:
        return self.handle.served.remote(extra_kv).result(timeout_s=600)

    def reports(self) -> dict[str, tuple[str, int]]:
        """The replicas' latest reports (asked of the hub at most every half second)."""
        import ray

        if time.monotonic() - self._polled > REPORT_EVERY:
            self._reports = ray.get(self.hub.collect.remote(), timeout=10)
            self._polled = time.monotonic()
        return self._reports

    @property
    def queued(self) -> int:
        try:
            return sum(waiting for _, waiting in self.reports().values())
        except Exception:
            return 0

    def submit(self, request_id: str, prompt_ids: list[int], params: list, kv: str | None, priority: int):
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        ticket = Ticket(loop)
        ticket.stream = self.handle.options(stream=True).generate.remote(request_id, prompt_ids, params, kv, priority)
        ticket.task = loop.create_task(self._pump(ticket, out, len(params), request_id, len(prompt_ids)))
        return out, [ticket]

    async def headers(self, seqs: list) -> dict[str, str]:
        return {HEADER: await seqs[0].replica}

    def abort(self, seqs: list) -> None:
        for ticket in seqs:
            if ticket.stream is not None:
                ticket.cancelled = True
                ticket.stream.cancel()

    async def _pump(self, ticket: Ticket, out: asyncio.Queue, n: int, rid: str = "-", n_prompt: int = 0) -> None:
        left = set(range(n))
        replica, t0, first, made, reasons = "?", time.perf_counter(), None, 0, []
        try:
            async for item in ticket.stream:
                if isinstance(item, str):
                    replica = item
                    ticket.replica.set_result(item)
                elif isinstance(item, Exception):
                    out.put_nowait(item)
                    return
                else:
                    if first is None and item.tokens:
                        first = time.perf_counter() - t0
                    made += len(item.tokens)
                    if item.finish_reason is not None:
                        left.discard(item.index)
                        reasons.append(item.finish_reason)
                    out.put_nowait(item)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the replica died, or Ray could not reach it
            if ticket.cancelled:
                return
            why = f"replica {replica} failed mid-request ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            log.warning("request: %s", why)
            if not ticket.replica.done():
                ticket.replica.set_result(replica)
            for i in sorted(left):
                out.put_nowait(Delta(i, finish_reason="error", error=why))
            reasons += ["error"] * len(left)
        finally:
            if not ticket.replica.done():
                ticket.replica.set_result(replica)
            log.info("request %s on replica %s: prompt %d tokens, %d generated, TTFT %s, total %.3f s, finish %s",
                     rid, replica, n_prompt, made, f"{first:.3f} s" if first is not None else "-",
                     time.perf_counter() - t0, ",".join(reasons) or "abort")


class ClusterMetrics:
    """``/metrics`` over the replicas: their samples summed by name and labels (ratios averaged),
    plus ``kvtier:replicas``, the replicas that reported in the last 15 s."""

    AVERAGED = ("kvtier:kv_cache_usage_perc", "kvtier:kv_bytes_per_token")

    def __init__(self, worker: RayWorker, model_id: str):
        from prometheus_client import CollectorRegistry

        self.worker, self.model_id = worker, model_id
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily, Metric
        from prometheus_client.parser import text_string_to_metric_families

        try:
            reports = self.worker.reports()
        except Exception:
            reports = {}
        families: dict[str, Metric] = {}
        sums: dict[tuple, list] = {}
        for text, _ in reports.values():
            for fam in text_string_to_metric_families(text):
                families.setdefault(fam.name, fam)
                for s in fam.samples:
                    key = (fam.name, s.name, tuple(sorted(s.labels.items())))
                    sums.setdefault(key, []).append(s.value)
        count = GaugeMetricFamily("kvtier:replicas", "Engine replicas reporting", labels=["model_name"])
        count.add_metric([self.model_id], len(reports))
        yield count
        for name, fam in families.items():
            out = Metric(name, fam.documentation, fam.type)
            for (fname, sname, labels), values in sums.items():
                if fname != name:
                    continue
                if sname.endswith("_created"):  # when the series began: the earliest replica's
                    value = min(values)
                elif name in self.AVERAGED:
                    value = sum(values) / len(values)
                else:
                    value = sum(values)
                out.add_sample(sname, dict(labels), value)
            yield out


def serve_cluster(engine_cfg: EngineConfig, server_cfg: ServerConfig, cluster: ClusterConfig) -> None:
    """Start (or join) a Ray cluster, deploy the replicas, serve the endpoint here until SIGTERM
    (open responses finish first), then remove the replicas."""
    import uvicorn

    from kvtier.serve import _server_class

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    app, stop = deploy(engine_cfg, server_cfg, cluster)
    try:
        uv = uvicorn.Config(app, host=server_cfg.host, port=server_cfg.port, log_level="info", access_log=False,
                            timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024)
        _server_class()(uv).run()
    finally:
        stop()


def deploy(engine_cfg: EngineConfig, server_cfg: ServerConfig, cluster: ClusterConfig):
    """The endpoint's ASGI app over ``cluster.replicas`` replicas, and how to stop them all."""
    import math

    from kvtier.serve import check, tokenizer_functions
    from kvtier.serve.app import build

    ray, serve = _ray()
    check(server_cfg)
    started = not ray.is_initialized()
    if started:
        address = cluster.ray_address or os.environ.get("RAY_ADDRESS")
        kwargs = {"address": address} if address else {"num_cpus": max(os.cpu_count() or 1, 1),
                                                         "include_dashboard": False}
        try:
            ray.init(namespace="kvtier", logging_level="ERROR", log_to_driver=False, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise KvtierError(f"could not join the Ray cluster at {address!r}: {e}") from None
    serve.start(proxy_location="Disabled")
    hub_cls = ray.remote(num_cpus=0)(MetricsHub)
    hub = hub_cls.options(name=HUB, get_if_exists=True, lifetime="detached", max_restarts=-1).remote()
    router = PrefixRouter if cluster.routing == "prefix" else RoundRobinRouter
    threads = max(1, math.ceil(cluster.replica_cpus))
    model_id = engine_cfg.model
    dep = serve.deployment(
        Replica, name=DEPLOYMENT, num_replicas=cluster.replicas,
        ray_actor_options={"num_cpus": cluster.replica_cpus},
        max_ongoing_requests=engine_cfg.max_seqs + server_cfg.max_queued,
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=60,
        request_router_config={"request_router_class": f"{router.__module__}:{router.__name__}",
                               "request_router_kwargs": {"block_size": engine_cfg.block_size}
                               if router is PrefixRouter else {}})
    log.info("kvtier: starting %d replica(s) on Ray (%s routing)", cluster.replicas, cluster.routing)
    try:
        handle = serve.run(dep.bind(engine_cfg, server_cfg, model_id, threads), name=APP, route_prefix=None)
    except Exception as e:
        serve.shutdown()
        raise KvtierError(f"the replicas did not start: {str(e).splitlines()[0]}") from None
    worker = RayWorker(handle, hub, model_id)
    from transformers import AutoTokenizer

    from kvtier.models.loader import resolve

    encode, encode_chat, decode = tokenizer_functions(AutoTokenizer.from_pretrained(resolve(model_id)), model_id)

    def stop() -> None:
        """After the endpoint has drained. A cluster started here goes with everything on it (its
        processes may already have had the terminal's Ctrl-C); on a cluster joined, the replicas
        and the hub are removed, waiting at most a minute."""
        if started:
            ray.shutdown()
            return
        done = threading.Thread(target=lambda: (serve.delete(APP), ray.kill(hub)), daemon=True)
        done.start()
        done.join(60)

    try:
        return build(worker, server_cfg, model_id, encode, encode_chat, decode), stop
    except BaseException:
        stop()
        raise


__all__ = ["Replica", "PrefixRouter", "RoundRobinRouter", "RayWorker", "deploy", "serve_cluster"]
