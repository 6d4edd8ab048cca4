"""``kvtier serve``: the engine behind an OpenAI-compatible HTTP API (kept out of engine/)."""

from __future__ import annotations

import ipaddress
import logging
import sys

from kvtier import config as cfgmod
from kvtier.config import EngineConfig, ServerConfig
from kvtier.errors import KvtierError


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(server: ServerConfig) -> None:
    """Refuse a server config that would be unsafe or cannot work, before the model loads."""
    cfgmod.check(server)
    if not loopback(server.host) and not server.api_key:
        raise KvtierError(f"--host {server.host} exposes the server beyond this machine: give --api-key KEY "
                          "(or bind 127.0.0.1)")


def make_worker(engine_cfg: EngineConfig, server: ServerConfig, model_id: str, engine=None):
    """The engine on its own thread (started), with the prefix cache of ``server.cache`` loaded."""
    from kvtier.engine.engine import Engine
    from kvtier.kv import persist
    from kvtier.serve.metrics import Metrics
    from kvtier.serve.worker import Worker

    def make() -> Engine:  # on the engine's own thread (see Worker)
        e = engine or Engine(engine_cfg)
        if server.cache:
            prefix = persist.open_prefix(server.cache, e.runner, e.loaded.name)
            n = e.load_prefix(prefix)
            logging.getLogger("kvtier.serve").info("prefix cache: %d tokens from %s", n, server.cache)
        return e

    worker = Worker(make, Metrics(model_id))
    worker.start()
    return worker


def tokenizer_functions(tok, model_id: str):
    """``encode(text)``, ``encode_chat(messages)`` and ``decode(ids)`` on a tokenizer."""

    def encode(text: str) -> list[int]:
        return tok(text).input_ids

    def encode_chat(messages: list[dict]) -> list[int]:
        if not getattr(tok, "chat_template", None):
            raise KvtierError(f"{model_id} has no chat template; use /v1/completions")
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False).input_ids

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    return encode, encode_chat, decode


def make_app(engine_cfg: EngineConfig, server: ServerConfig, engine=None):
    """The ASGI app and its worker (started), for ``kvtier serve`` and tests."""
    from kvtier.serve.app import build

    check(server)
    model_id = engine_cfg.model
    worker = make_worker(engine_cfg, server, model_id, engine)
    try:
        return build(worker, server, model_id, *tokenizer_functions(worker.engine.tokenizer, model_id)), worker
    except BaseException:
        worker.stop()
        raise


def serve(engine_cfg: EngineConfig, server: ServerConfig) -> None:
    """Load the model, listen, serve until SIGTERM or Ctrl-C (running requests finish first)."""
    import uvicorn

    _Server = _server_class()
    check(server)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    app, worker = make_app(engine_cfg, server)
    uv = uvicorn.Config(app, host=server.host, port=server.port, log_level="info", access_log=False,
                        timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024)
    try:
        _Server(uv).run()  # on SIGTERM: stops accepting, waits for open responses to finish
    finally:
        worker.stop()  # drains what is still running, then the engine thread ends


def _server_class():
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM/SIGINT ends it with exit status 0 once it has drained
        (uvicorn re-raises the signal after its graceful shutdown, which kills the process
        before the engine thread is stopped)."""

        @contextlib.contextmanager
        def capture_signals(self):
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    return Server
