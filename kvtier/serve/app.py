"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health,
metrics. Every bad request gets a 4xx with OpenAI's error body and costs no other request
anything; a client that goes away has its sequences aborted and their blocks freed."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from kvtier import spec as specs
from kvtier.config import ServerConfig
from kvtier.errors import KvtierError
from kvtier.serve.metrics import Metrics
from kvtier.serve.protocol import ChatCompletionRequest, CompletionRequest
from kvtier.serve.worker import Delta, Worker
from kvtier.textio import check_text


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class LimitBody:
    """ASGI middleware: refuse a body over ``limit`` bytes (413) and a client that sends its
    body slower than one chunk per ``timeout`` seconds (408)."""

    def __init__(self, app, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_error(send, 413, f"the request body is {int(length):,} bytes; the limit is "
                                                f"{self.limit:,} (--max-body-bytes)")
        seen, started, complete = 0, False, False

        async def limited():
            nonlocal seen, complete
            if complete:  # the body is in: later reads wait for a disconnect, however long
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                return _refuse(scope, 408, f"the request body did not arrive within {self.timeout:g} s "
                                           "(--read-timeout)")
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.limit:
                    return _refuse(scope, 413, f"the request body is over the limit of {self.limit:,} bytes "
                                               "(--max-body-bytes)")
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited, tracked_send)
        if not started and BODY_ERROR in scope:  # the app never answered (e.g. it was not reading)
            await _send_error(send, *scope[BODY_ERROR])


BODY_ERROR = "kvtier.body_error"


def _refuse(scope, status: int, message: str) -> dict:
    """Mark the request refused and tell the app its client has gone (it stops reading)."""
    scope[BODY_ERROR] = (status, message)
    return {"type": "http.disconnect"}


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps(error_body(message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def build(worker: Worker, config: ServerConfig, model_id: str, llm_encode, encode_chat, decode) -> FastAPI:
    """The app. ``llm_encode(text) -> ids``, ``encode_chat(messages) -> ids`` and
    ``decode(ids) -> text`` come from the engine's tokenizer."""
    metrics = worker.metrics or Metrics(model_id)
    served = worker.served([str(specs.parse(s)) for s in (config.allowed_kv or "").split(";") if s.strip()])
    allowed = set(served.prefix_cache)
    app = FastAPI(title="kvtier", version="0.1.0")
    app.state.worker = worker

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(error_body(e.message, e.kind, e.param), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("the request body is not valid JSON: " + str(first.get("msg"))), 400)
        return JSONResponse(error_body(f"{where}: {first.get('msg', 'invalid')}" if where else
                                       str(first.get("msg", "invalid request")), param=where or None), 400)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           "authentication_error", headers={"WWW-Authenticate": "Bearer"})

    async def parse(request: Request, cls):
        try:
            raw = await request.body()
        except ClientDisconnect:
            status, message = request.scope.get(BODY_ERROR, (400, "the client went away mid-request"))
            raise ApiError(status, message) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the request body is not UTF-8: byte offset {e.start}") from None
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where or None) from None

    def admit(body) -> tuple[str | None, list]:
        if body.model is not None and body.model != model_id:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server runs {model_id!r}",
                           param="model", kind="not_found_error")
        kv = None
        if body.kv is not None:
            try:
                kv = str(specs.parse(body.kv))
            except KvtierError as e:
                raise ApiError(400, str(e), param="kv") from None
            if kv not in allowed:
                raise ApiError(400, f"kv {kv} is not allowed here; allowed: {'; '.join(sorted(allowed))} "
                                    "(the server's --allowed-kv)", param="kv")
        if worker.queued >= config.max_queued:
            raise ApiError(429, f"{worker.queued} requests are already waiting (--max-queued "
                                f"{config.max_queued}); retry later", "rate_limit_error",
                           headers={"Retry-After": "1"})
        if worker.error is not None:
            raise ApiError(503, f"the engine has failed: {worker.error}", "server_error")
        return kv, []

    def sampling(body, logprobs):
        try:
            base = body.sampling(min(128, config.max_request_tokens), logprobs)
        except KvtierError as e:
            raise ApiError(400, str(e)) from None
        if base.max_tokens > config.max_request_tokens:
            raise ApiError(400, f"max_tokens={base.max_tokens} is over this server's limit of "
                                f"{config.max_request_tokens} (--max-request-tokens)", param="max_tokens")
        seed = base.seed if base.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
        import dataclasses

        return [dataclasses.replace(base, seed=seed + i) for i in range(body.n)]

    async def run(request: Request, rid: str, ids: list[int], params, kv, priority) -> tuple[asyncio.Queue, list, dict]:
        limit = served.max_context
        if len(ids) + params[0].max_tokens > limit:
            raise ApiError(400, f"the prompt is {len(ids)} tokens and max_tokens {params[0].max_tokens}: over "
                                f"the model's context of {limit} tokens; shorten the prompt or lower max_tokens",
                           param="messages" if "chat" in rid else "prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        out, seqs = worker.submit(rid, ids, params, kv, priority)
        try:
            headers = await worker.headers(seqs)
        except BaseException:
            worker.abort(seqs)
            raise
        return out, seqs, headers

    async def events(request: Request, out: asyncio.Queue, seqs: list, n: int) -> AsyncIterator[Delta]:
        """The request's deltas until all its choices finish; aborts them if the client leaves."""
        left = n
        try:
            while left:
                try:
                    item = await asyncio.wait_for(out.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if isinstance(item, Exception):
                    raise ApiError(400, str(item))
                if item.finish_reason is not None:
                    left -= 1
                yield item
        finally:
            if left:
                worker.abort(seqs)

    @app.get("/health")
    async def health():
        if worker.error is not None:
            return JSONResponse({"status": "error", "error": str(worker.error)}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "created": int(time.time()), "owned_by": "kvtier",
            "max_model_len": served.max_context, "kv": served.default_kv, "allowed_kv": sorted(allowed),
            "prefix_cache": served.prefix_cache,
            "note": "specs with a token selector do not share prefix blocks (each sequence keeps its own tokens)"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = await parse(request, CompletionRequest)
        kv, _ = admit(body)
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            if len(body.prompt) != 1:
                raise ApiError(400, "give one prompt per request (a list of several prompts is not supported)",
                               param="prompt")
            prompt = body.prompt[0]
        else:
            prompt = body.prompt
        if isinstance(prompt, str):
            try:
                check_text(prompt, "prompt")
            except KvtierError as e:
                raise ApiError(400, str(e), param="prompt") from None
            ids = llm_encode(prompt)
        else:
            vocab = served.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            ids = list(prompt)
        params = sampling(body, body.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        out, seqs, headers = await run(request, rid, ids, params, kv, body.priority)
        created = int(time.time())
        if body.stream:
            return StreamingResponse(_sse(_completion_chunks(rid, created, model_id, events(request, out, seqs, body.n),
                                                             body.include_usage, len(ids), decode)),
                                     media_type="text/event-stream", headers=headers)
        return JSONResponse(await _collect(request, rid, created, model_id, events(request, out, seqs, body.n), body.n,
                                           len(ids), decode, chat=False), headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        body = await parse(request, ChatCompletionRequest)
        kv, _ = admit(body)
        messages = []
        for i, m in enumerate(body.messages):
            try:
                messages.append({"role": m.role, "content": check_text(m.text(), f"messages[{i}].content")})
            except KvtierError as e:
                raise ApiError(400, str(e), param=f"messages.{i}.content") from None
        try:
            ids = encode_chat(messages)
        except KvtierError as e:
            raise ApiError(400, str(e), param="messages") from None
        except Exception as e:  # the chat template refused the conversation
            raise ApiError(400, f"the model's chat template refused these messages: {e}", param="messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling(body, logprobs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        out, seqs, headers = await run(request, rid, ids, params, kv, body.priority)
        created = int(time.time())
        if body.stream:
            return StreamingResponse(_sse(_chat_chunks(rid, created, model_id, events(request, out, seqs, body.n),
                                                       body.include_usage, len(ids), body.n, decode)),
                                     media_type="text/event-stream", headers=headers)
        return JSONResponse(await _collect(request, rid, created, model_id, events(request, out, seqs, body.n), body.n,
                                           len(ids), decode, chat=True), headers=headers)

    return LimitBody(app, config.max_body_bytes, config.read_timeout)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _usage(prompt: int, completion: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _finish(reason: str | None) -> str | None:
    return {"abort": "abort", "error": "error"}.get(reason, reason)


def _chat_logprobs(items, decode) -> list:
    return [{"token": decode([tok]), "logprob": _num(lp), "bytes": list(decode([tok]).encode()),
             "top_logprobs": [{"token": decode([a]), "logprob": _num(alp), "bytes": list(decode([a]).encode())}
                              for a, alp in alts]} for tok, lp, alts in items]


def _num(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


def _completion_logprobs(items, decode, offset: int) -> dict:
    tokens = [decode([t]) for t, _, _ in items]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [_num(lp) for _, lp, _ in items],
            "top_logprobs": [{decode([a]): _num(alp) for a, alp in alts} for _, _, alts in items],
            "text_offset": offsets}


async def _collect(request, rid, created, model_id, stream, n, n_prompt, decode, chat: bool):
    texts, reasons, lps = [""] * n, [None] * n, [[] for _ in range(n)]
    completion, cached, error = 0, 0, None
    async for d in stream:
        texts[d.index] += d.text
        lps[d.index] += d.logprobs
        if d.finish_reason is not None:
            reasons[d.index] = _finish(d.finish_reason)
            completion += d.completion_tokens
            cached = max(cached, d.cached_tokens)
            error = error or d.error
    if error is not None and all(r == "error" for r in reasons):
        raise ApiError(500 if "does not fit" not in error else 507, f"the request failed: {error}", "server_error")
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": reasons[i],
                    "logprobs": {"content": _chat_logprobs(lps[i], decode)} if lps[i] else None} for i in range(n)]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": texts[i], "finish_reason": reasons[i],
                    "logprobs": _completion_logprobs(lps[i], decode, 0) if lps[i] else None} for i in range(n)]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model_id, "choices": choices,
            "usage": _usage(n_prompt, completion, cached)}


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
    except ApiError as e:
        yield b"data: " + json.dumps(error_body(e.message, e.kind)).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


async def _chat_chunks(rid, created, model_id, stream, include_usage, n_prompt, n, decode):
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id}
    for i in range(n):
        yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}
    completion, cached = 0, 0
    async for d in stream:
        choice = {"index": d.index, "delta": {"content": d.text} if d.text else {},
                  "logprobs": {"content": _chat_logprobs(d.logprobs, decode)} if d.logprobs else None,
                  "finish_reason": _finish(d.finish_reason)}
        if d.finish_reason is not None:
            completion += d.completion_tokens
            cached = max(cached, d.cached_tokens)
        if d.error:
            choice["error"] = d.error
        yield {**base, "choices": [choice]}
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(n_prompt, completion, cached)}


async def _completion_chunks(rid, created, model_id, stream, include_usage, n_prompt, decode):
    base = {"id": rid, "object": "text_completion", "created": created, "model": model_id}
    completion, cached, offsets = 0, 0, {}
    async for d in stream:
        at = offsets.get(d.index, 0)
        lp = _completion_logprobs(d.logprobs, decode, at) if d.logprobs else None
        offsets[d.index] = at + len(d.text)
        if d.finish_reason is not None:
            completion += d.completion_tokens
            cached = max(cached, d.cached_tokens)
        choice = {"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": _finish(d.finish_reason)}
        if d.error:
            choice["error"] = d.error
        yield {**base, "choices": [choice]}
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(n_prompt, completion, cached)}


__all__ = ["build", "ApiError", "PlainTextResponse"]
