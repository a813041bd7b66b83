"""The OpenAI-compatible REST API (FastAPI): completions and chat completions, streamed as
server-sent events ending in [DONE], model list, health and Prometheus metrics.

Every request first passes the Guard (an ASGI middleware): the Host allow-list, the Origin check,
the API key, JSON-only bodies, no uploads to the demo, and reads each body whole within
serve.max_body_bytes (the API and the demo alike; a client gone before its body is complete is a 499);
it answers every error with OpenAI's body,
never lets an exception reach the HTTP server (which would answer plain text and drop the
connection), and counts each request once in /metrics under a bounded set of endpoint labels. Work
stops when its client is gone, streaming or not.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from inferlab.serve.engine import Engine, GenRequest, QueueFull
from inferlab.serve.metrics import Metrics
from inferlab.serve.protocol import (
    MAX_STOP_SEQUENCES,
    APIError,
    ChatRequest,
    CompletionRequest,
    ErrorResponse,
    _Common,
    parse_body,
    prepare,
)

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/docs",
             "/docs/oauth2-redirect", "/openapi.json", "/redoc")


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def endpoint_label(path: str) -> str:
    """A bounded set of /metrics labels: the API's own paths, "/ui" for the demo, "other" for
    anything else."""
    if path in API_PATHS:
        return path
    if path == "/ui" or path.startswith("/ui/"):
        return "/ui"
    return "other"


def host_name(value: str) -> str:
    """The host of a Host header value ("127.0.0.1:8000", "[::1]:8000") or of an Origin URL's
    netloc."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


JSON_BODY_PATHS = ("/v1/completions", "/v1/chat/completions")


class BodyTooLarge(Exception):
    def __init__(self, seen: int):
        super().__init__(f"{seen} bytes")
        self.seen = seen


def too_large(size: int, limit: int, sent: bool = False) -> APIError:
    what = f"more than {limit} bytes were sent" if sent else f"request body of {size} bytes"
    return APIError(413, f"{what}: the limit is {limit} bytes (serve.max_body_bytes)", code="body_too_large")


def replay(body: bytes, receive):
    """receive for the app: the body read already, then the connection's own messages (its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again():
        return pending.pop() if pending else await receive()

    return receive_again


class Guard:
    """Pure ASGI middleware around the whole app (see the module's docstring)."""

    def __init__(self, app, metrics: Metrics, allowed_hosts: list[str], api_key: str | None,
                 max_body_bytes: int = 1_000_000):
        self.app, self.metrics, self.api_key, self.max_body = app, metrics, api_key, max_body_bytes
        self.any_host = "*" in allowed_hosts
        self.allowed = {h.lower().strip("[]") for h in allowed_hosts}

    def check(self, scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        if not self.any_host and host_name(headers.get("host", "")) not in self.allowed:
            return APIError(400, f"Host {headers.get('host', '')!r} is not one this server answers to (serve."
                                 "allowed_hosts); this guards against DNS rebinding", code="invalid_host")
        origin = headers.get("origin")
        if origin is not None and not self.any_host and host_name(urlsplit(origin).netloc) not in self.allowed:
            return APIError(403, f"Origin {origin!r} is not allowed: only pages served from serve.allowed_hosts "
                                 "may call this server", type_="permission_error", code="invalid_origin")
        if self.api_key and path != "/health":
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                type_="authentication_error", code="invalid_api_key")
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if endpoint_label(path) == "/ui" and ("/upload" in path or ctype == "multipart/form-data"):
            return APIError(403, "the demo takes no uploads", type_="permission_error", code="uploads_disabled")
        if path in JSON_BODY_PATHS and method == "POST" and ctype != "application/json":
            return APIError(415, f"Content-Type {ctype or '(none)'!r}: send the body as application/json",
                            code="unsupported_media_type")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return too_large(int(length), self.max_body)
        return None

    async def read_body(self, receive) -> bytes:
        """The whole body, however it is sent (chunked: no Content-Length), or BodyTooLarge past the limit, or
        ClientDisconnect when the client hangs up first."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_body:
                raise BodyTooLarge(seen)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})
        started: list[int] = []

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                started.append(message["status"])
            await send(message)

        try:
            refused = self.check(scope)
            if refused is not None:
                self.metrics.error(refused.code or refused.type)
                await error_response(refused)(scope, receive, send_counted)
            else:
                body = await self.read_body(receive)  # here: the API and the demo alike within the limit
                await self.app(scope, replay(body, receive), send_counted)
        except BodyTooLarge as e:
            self.metrics.error("body_too_large")
            if not started:
                await error_response(too_large(e.seen, self.max_body, sent=True))(scope, receive, send_counted)
        except ClientDisconnect:  # the client closed the connection before sending its whole body
            log.info("%s %s: the client closed the connection before its body was complete", scope["method"],
                     scope["path"][:200])
            self.metrics.error("client_disconnected")
            scope["state"]["outcome"] = 499
        except Exception as e:  # answered here, as JSON, on a connection that stays open
            log.exception("%s %s failed", scope["method"], scope["path"][:200])
            self.metrics.error("internal_error")
            if not started:
                err = APIError(500, f"internal error: {type(e).__name__}", type_="server_error",
                               code="internal_error")
                await error_response(err)(scope, receive, send_counted)
        finally:  # a stream that failed or lost its client after its 200 says so in its scope's state
            status = scope["state"].get("outcome") or (started[0] if started else 499)
            self.metrics.request(endpoint_label(scope["path"]), status)


async def until_disconnected(request: Request) -> None:
    """Returns when the client has gone (its body was read already: the next ASGI message is the
    disconnect)."""
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what} for status, what in (
        (400, "invalid request: a value out of range, malformed JSON or text, an unsupported field, a prompt too "
              "long for the context, a Host not allowed"),
        (401, "missing or wrong API key"),
        (403, "an Origin not allowed"),
        (404, "unknown model"),
        (413, "body larger than serve.max_body_bytes"),
        (415, "body not sent as application/json"),
        (429, "queue full: retry after the Retry-After header's seconds"),
        (500, "generation failed"),
    )
}


def stream_response_doc(kind: str) -> dict[int | str, dict[str, Any]]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {200: {"description": f"JSON; with \"stream\": true, server-sent events: one `data: {{...}}` line per "
                                 f"token ({obj} objects), an error event if generation fails, then `data: [DONE]`",
                  "content": {"application/json": {"schema": {"type": "object"}},
                              "text/event-stream": {"schema": SSE_EVENT}}}}


# one server-sent event as clients parse it: its data, a JSON object (a chunk, or an error) or the final [DONE]
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
    {"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json",
                          "contentSchema": {"type": "object"}}]}}}


class RetrySlots:
    """When a refused request should come back: when a place in the queue frees that no request refused before
    it was already sent to (the requests queued and in flight, each done at the engine's measured pace). Refused
    requests come back one after another, not all at once into a queue that has room for one."""

    def __init__(self) -> None:
        self.promised: list[float] = []  # when the refused requests still to come back were told to
        self.lock = threading.Lock()

    def take(self, engine: Engine, floor_s: float) -> float:
        """Seconds to wait (serve.retry_after_s while no pace is measured yet, and never less)."""
        now = time.monotonic()
        with self.lock:
            self.promised = [t for t in self.promised if t > now]
            done, k = engine.finish_times(), len(self.promised)
            if not done:
                wait = 0.0
            else:  # half a request after its place frees: between it and the next one's, early or late by a little
                each = done[-1] / len(done)
                wait = (done[k] if k < len(done) else done[-1] + (k - len(done) + 1) * each) + each / 2
            wait = max(wait, floor_s)
            self.promised.append(now + wait)
        return wait


def retry_headers(wait_s: float) -> dict[str, str]:
    """Retry-After in whole seconds, and in milliseconds for clients that read `retry-after-ms` (openai's)."""
    return {"Retry-After": str(math.ceil(wait_s)), "retry-after-ms": str(math.ceil(wait_s * 1000))}


@dataclass
class Service:
    """What the API's functions work with: the engine, the name it is served under, the ServeConfig
    (limits, queue, retry_after_s, allowed_hosts) and the metrics. One per app, in
    app.state.service."""

    engine: Engine
    served_name: str
    settings: Any
    metrics: Metrics
    retry: RetrySlots = field(default_factory=RetrySlots)


def service_of(request: Request) -> Service:
    return request.app.state.service


async def api_error(request: Request, e: APIError) -> JSONResponse:
    service_of(request).metrics.error(e.code or e.type)
    return error_response(e)


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    message = {404: f"no such endpoint: {request.method} {request.url.path[:200]}",
               405: f"{request.method} is not allowed on {request.url.path[:200]}"}.get(e.status_code, e.detail)
    service_of(request).metrics.error(code)
    return error_response(APIError(e.status_code, message, code=code, headers=dict(e.headers or {})))


async def parse(service: Service, request: Request, model: type[_Common]) -> Any:
    """The request's body as `model`, within the schema (400); the Guard holds it to the size limit (413)."""
    return parse_body(await request.body(), model, service.served_name, service.settings.max_body_bytes)


def submit(service: Service, req: GenRequest, emit) -> None:
    """Queue a request on the engine, or answer 429 with Retry-After when its queue is full."""
    req.emit = emit
    try:
        service.engine.submit(req)
    except QueueFull:
        headers = retry_headers(service.retry.take(service.engine, service.settings.retry_after_s))
        raise APIError(429, f"the server is busy ({service.engine.depth} requests waiting); retry after "
                            f"{headers['Retry-After']} s", type_="rate_limit_error", code="queue_full",
                       headers=headers) from None


async def run(service: Service, req: GenRequest, path: str) -> AsyncIterator[tuple[str, Any]]:
    """Submit to the engine and yield its events; the request is cancelled if the consumer goes
    away."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    metrics = service.metrics

    def emit(kind: str, value: Any) -> None:  # on the engine thread
        if kind == "done":  # counted here: a request whose client left still generated these tokens
            metrics.count_tokens(value["completion_tokens"])
        loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    t0 = time.perf_counter()
    submit(service, req, emit)
    first, last, gaps, done = None, None, [], False
    try:
        while True:
            kind, value = await events.get()
            now = time.perf_counter()
            if kind == "text":
                if first is None:
                    first = now - t0
                elif last is not None:
                    gaps.append(now - last)
                last = now
            elif kind == "done":
                done = True
                metrics.generated(first, gaps, now - t0)
            elif kind == "error":  # counted once, where it is answered
                done = True
            yield kind, value
            if done:
                return
    finally:
        if not done:  # the client went away: stop generating for it
            req.cancelled.set()
            metrics.error("client_disconnected")
            log.info("%s: client disconnected; generation cancelled", path)


def chunk_body(served_name: str, kind: str, rid: str, created: int, text: str | None,
               finish: str | None) -> dict[str, Any]:
    """One streamed chunk: a chat.completion.chunk (kind "chat") or a text_completion."""
    if kind == "chat":
        delta = {"content": text} if text is not None else {}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    return {"id": rid, "object": "text_completion", "created": created, "model": served_name,
            "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}


def usage(done: dict[str, Any]) -> dict[str, int]:
    p, c = done["prompt_tokens"], done["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def event(data: dict[str, Any]) -> str:
    return "data: " + json.dumps(data) + "\n\n"


async def sse(service: Service, kind: str, body: _Common, request: Request, events: AsyncIterator,
              first_event: tuple[str, Any], rid: str, created: int) -> AsyncIterator[str]:
    """The server-sent events of a streamed response: a chunk per piece of text, then [DONE]."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    name = service.served_name
    if kind == "chat":
        yield event({**chunk_body(name, kind, rid, created, None, None),
                     "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
    ev: tuple[str, Any] | None = first_event
    complete = False
    try:
        while ev is not None:
            k, v = ev
            if k == "text":
                yield event(chunk_body(name, kind, rid, created, v, None))
            elif k == "error":
                service.metrics.error("generation_failed")
                request.state.outcome = 500  # the 200 went out already; /metrics counts the truth
                yield event(APIError(500, f"generation failed: {v}", type_="server_error",
                                     code="generation_failed").body())
                break
            else:
                finish = "length" if v["finish_reason"] == "length" else "stop"
                yield event(chunk_body(name, kind, rid, created, v.get("tail") or None, finish))
                if include_usage:
                    yield event({**chunk_body(name, kind, rid, created, None, None), "choices": [],
                                 "usage": usage(v)})
                break
            ev = await events.__anext__()
        yield "data: [DONE]\n\n"
        complete = True
    finally:
        if not complete:
            request.state.outcome = 499  # the client closed the stream
        await events.aclose()


async def stream(service: Service, kind: str, body: _Common, request: Request, events: AsyncIterator, rid: str,
                 created: int) -> Response:
    first_event = await events.__anext__()  # a full queue fails here, before the 200 is sent
    return StreamingResponse(sse(service, kind, body, request, events, first_event, rid, created),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def collect(events: AsyncIterator) -> tuple[str, dict[str, Any] | None]:
    """The whole text of a generation and its final event."""
    text, done = [], None
    async for k, v in events:
        if k == "text":
            text.append(v)
        elif k == "error":
            raise APIError(500, f"generation failed: {v}", type_="server_error", code="generation_failed")
        else:
            done = v
            text.append(v.get("tail", ""))
    return "".join(text), done


def completion_body(service: Service, kind: str, rid: str, created: int, out: str, done: dict[str, Any] | None,
                    req: GenRequest) -> dict[str, Any]:
    """The JSON answer of a request that was not streamed."""
    finish = "length" if done and done["finish_reason"] == "length" else "stop"
    choice = ({"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": finish,
               "logprobs": None} if kind == "chat" else
              {"index": 0, "text": out, "finish_reason": finish, "logprobs": None})
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created, "model": service.served_name, "choices": [choice],
            "usage": usage(done or {"prompt_tokens": len(req.prompt_ids), "completion_tokens": 0})}


async def respond(service: Service, kind: str, body: _Common, req: GenRequest, request: Request) -> Response:
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    events = run(service, req, request.url.path)
    if body.stream:
        return await stream(service, kind, body, request, events, rid, created)
    # not streamed: watch the connection meanwhile, and stop generating when the client gives up
    gather = asyncio.ensure_future(collect(events))
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({gather, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not gather.done():
        gather.cancel()  # run()'s cleanup cancels the generation and counts the disconnect
        with suppress(asyncio.CancelledError):
            await gather
        await events.aclose()
        request.state.outcome = 499
        return Response(status_code=499)  # nobody reads it
    await events.aclose()
    out, done = gather.result()
    return JSONResponse(completion_body(service, kind, rid, created, out, done, req))


def stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def single_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "prompt: give one prompt (a string, or a list of one string)", param="prompt",
                           code="invalid_value")
        return prompt[0]
    return prompt


def body_doc(model: type) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


router = APIRouter()


@router.post("/v1/completions", openapi_extra=body_doc(CompletionRequest),
             responses={**stream_response_doc("completion"), **ERROR_RESPONSES})
async def completions(request: Request) -> Response:
    service = service_of(request)
    body = await parse(service, request, CompletionRequest)
    req = await asyncio.to_thread(prepare, service.engine, service.settings, single_prompt(body.prompt),
                                  body.max_tokens, stop=stops(body.stop), temperature=body.temperature,
                                  top_p=body.top_p, seed=body.seed, ignore_eos=body.ignore_eos)
    return await respond(service, "completion", body, req, request)


@router.post("/v1/chat/completions", openapi_extra=body_doc(ChatRequest),
             responses={**stream_response_doc("chat"), **ERROR_RESPONSES})
async def chat(request: Request) -> Response:
    service = service_of(request)
    body = await parse(service, request, ChatRequest)
    chat = service.engine.chat_prompt([m.model_dump() for m in body.messages])
    req = await asyncio.to_thread(prepare, service.engine, service.settings, chat.text,
                                  body.max_completion_tokens or body.max_tokens, stop=stops(body.stop),
                                  extra_stop=chat.stop, temperature=body.temperature, top_p=body.top_p,
                                  seed=body.seed, prompt_param="messages", special=chat.special,
                                  ignore_eos=body.ignore_eos,
                                  texts=[(m.content, f"messages.{i}.content") for i, m in enumerate(body.messages)])
    return await respond(service, "chat", body, req, request)


def models_body(service: Service) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": service.served_name, "object": "model", "created": 0,
                                        "owned_by": "inferlab", "inferlab": service.engine.description}]}


def health_body(service: Service) -> dict[str, Any]:
    e = service.engine
    return {"status": "ok", "model": service.served_name, "runtime": e.runtime, "queue_depth": e.depth,
            "in_flight": e.in_flight}


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def models(request: Request) -> dict[str, Any]:
    return models_body(service_of(request))


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return health_body(service_of(request))


@router.get("/metrics", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
async def prometheus(request: Request) -> PlainTextResponse:
    return PlainTextResponse(service_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


def openapi_doc(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with the request and error models (and what they refer to) as
    components, so that every $ref resolves."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (CompletionRequest, ChatRequest, ErrorResponse):
        s = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(s.pop("$defs", {}))
        schemas[model.__name__] = s
    with_limits(schemas, app.state.service)
    app.openapi_schema = doc
    return doc


def with_limits(schemas: dict[str, Any], service: Service) -> None:
    """This server's own limits in the request schemas: the one model name it answers to, serve.max_tokens_limit,
    serve.max_prompt_chars (a prompt that tokenizes to more than the context window leaves is refused all the
    same: 400 context_length_exceeded)."""
    s = service.settings
    text = {"type": "string", "minLength": 1, "maxLength": s.max_prompt_chars}
    for name in ("CompletionRequest", "ChatRequest"):
        props = schemas[name]["properties"]
        props["model"] = {**props["model"], "type": "string", "enum": [service.served_name]}
        for key in ("max_tokens", "max_completion_tokens"):
            if key in props:
                props[key]["anyOf"][0]["maximum"] = s.max_tokens_limit
        stop = props["stop"]["anyOf"]
        stop[1]["maxItems"] = MAX_STOP_SEQUENCES
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]
    prompt["anyOf"] = [text, {**prompt["anyOf"][1], "items": text, "minItems": 1, "maxItems": 1}]
    schemas["ChatMessage"]["properties"]["content"].update({"maxLength": s.max_prompt_chars})


@asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    app.state.service.engine.close()  # the worker thread stops with the server


def create_app(engine: Engine, served_name: str, settings: Any, api_key: str | None = None) -> FastAPI:
    """The API for one engine. settings: the ServeConfig (limits, queue, retry_after_s,
    allowed_hosts)."""
    app = FastAPI(title="inferlab", version="1", description=f"OpenAI-compatible API serving {served_name}",
                  lifespan=lifespan)
    metrics = Metrics(lambda: engine.depth, lambda: engine.in_flight, lambda: dict(engine.batch_sizes))
    app.state.service = Service(engine, served_name, settings, metrics)
    app.state.engine, app.state.metrics, app.state.served_name = engine, metrics, served_name
    hosts = list(getattr(settings, "allowed_hosts", LOOPBACK))
    app.add_middleware(Guard, metrics=metrics, allowed_hosts=hosts, api_key=api_key,
                       max_body_bytes=settings.max_body_bytes)
    app.add_exception_handler(APIError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.include_router(router)
    app.openapi = lambda: openapi_doc(app)  # type: ignore[method-assign]
    return app
