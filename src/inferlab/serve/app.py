"""The OpenAI-compatible REST API (FastAPI): completions and chat completions, streamed as server-sent events
ending in [DONE], model list, health and Prometheus metrics.

Every request first passes the Guard (an ASGI middleware): the Host allow-list, the Origin check, the API key,
JSON-only bodies, no uploads to the demo; it answers every error with OpenAI's body, never lets an exception reach
the HTTP server (which would answer plain text and drop the connection), and counts each request once in /metrics
under a bounded set of endpoint labels. Work stops when its client is gone, streaming or not.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferlab.serve.engine import Engine, GenRequest, QueueFull
from inferlab.serve.metrics import Metrics
from inferlab.serve.protocol import (
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
    """A bounded set of /metrics labels: the API's own paths, "/ui" for the demo, "other" for anything else."""
    if path in API_PATHS:
        return path
    if path == "/ui" or path.startswith("/ui/"):
        return "/ui"
    return "other"


def host_name(value: str) -> str:
    """The host of a Host header value ("127.0.0.1:8000", "[::1]:8000") or of an Origin URL's netloc."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """Pure ASGI middleware around the whole app (see the module's docstring)."""

    def __init__(self, app, metrics: Metrics, allowed_hosts: list[str], api_key: str | None):
        self.app, self.metrics, self.api_key = app, metrics, api_key
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
        if path.startswith("/v1/") and method in ("POST", "PUT", "PATCH") and ctype != "application/json":
            return APIError(415, f"Content-Type {ctype or '(none)'!r}: send the body as application/json",
                            code="unsupported_media_type")
        return None

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
                await self.app(scope, receive, send_counted)
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
    """Returns when the client has gone (its body was read already: the next ASGI message is the disconnect)."""
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
                              "text/event-stream": {"schema": {"type": "string"}}}}}


def create_app(engine: Engine, served_name: str, settings: Any, api_key: str | None = None) -> FastAPI:
    """settings: the ServeConfig (limits, queue, retry_after_s, allowed_hosts)."""
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.close()  # the worker thread stops with the server

    app = FastAPI(title="inferlab", version="1", description=f"OpenAI-compatible API serving {served_name}",
                  lifespan=lifespan)
    metrics = Metrics(lambda: engine.depth, lambda: engine.in_flight, lambda: dict(engine.batch_sizes))
    app.state.engine, app.state.metrics, app.state.served_name = engine, metrics, served_name
    hosts = list(getattr(settings, "allowed_hosts", LOOPBACK))
    app.add_middleware(Guard, metrics=metrics, allowed_hosts=hosts, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.error(e.code or e.type)
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        message = {404: f"no such endpoint: {request.method} {request.url.path[:200]}",
                   405: f"{request.method} is not allowed on {request.url.path[:200]}"}.get(e.status_code, e.detail)
        metrics.error(code)
        return error_response(APIError(e.status_code, message, code=code, headers=dict(e.headers or {})))

    async def parse(request: Request, model: type[_Common]) -> Any:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_body_bytes:
            raise APIError(413, f"request body of {length} bytes exceeds the limit of {settings.max_body_bytes}",
                           code="body_too_large")
        return parse_body(await request.body(), model, served_name, settings.max_body_bytes)

    async def run(req: GenRequest, path: str) -> AsyncIterator[tuple[str, Any]]:
        """Submit to the engine and yield its events; the request is cancelled if the consumer goes away."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:  # on the engine thread
            if kind == "done":  # counted here: a request whose client left still generated these tokens
                metrics.count_tokens(value["completion_tokens"])
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        req.emit = emit
        t0 = time.perf_counter()
        submitted = False
        try:
            engine.submit(req)
            submitted = True
        except QueueFull:
            raise APIError(429, f"the server is busy ({engine.depth} requests waiting); retry later",
                           type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(settings.retry_after_s)}) from None
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
            if submitted and not done:  # the client went away: stop generating for it
                req.cancelled.set()
                metrics.error("client_disconnected")
                log.info("%s: client disconnected; generation cancelled", path)

    def chunk_body(kind: str, rid: str, created: int, text: str | None, finish: str | None) -> dict[str, Any]:
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

    async def stream(kind: str, body: _Common, request: Request, events: AsyncIterator, rid: str,
                     created: int) -> Response:
        first_event = await events.__anext__()  # a full queue fails here, before the 200 is sent

        async def sse() -> AsyncIterator[str]:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            if kind == "chat":
                yield event({**chunk_body(kind, rid, created, None, None),
                             "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
            ev: tuple[str, Any] | None = first_event
            complete = False
            try:
                while ev is not None:
                    k, v = ev
                    if k == "text":
                        yield event(chunk_body(kind, rid, created, v, None))
                    elif k == "error":
                        metrics.error("generation_failed")
                        request.state.outcome = 500  # the 200 went out already; /metrics counts the truth
                        yield event(APIError(500, f"generation failed: {v}", type_="server_error",
                                             code="generation_failed").body())
                        break
                    else:
                        finish = "length" if v["finish_reason"] == "length" else "stop"
                        yield event(chunk_body(kind, rid, created, v.get("tail") or None, finish))
                        if include_usage:
                            yield event({**chunk_body(kind, rid, created, None, None), "choices": [],
                                         "usage": usage(v)})
                        break
                    ev = await events.__anext__()
                yield "data: [DONE]\n\n"
                complete = True
            finally:
                if not complete:
                    request.state.outcome = 499  # the client closed the stream
                await events.aclose()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def collect(events: AsyncIterator) -> tuple[str, dict[str, Any] | None]:
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

    async def respond(kind: str, body: _Common, req: GenRequest, request: Request) -> Response:
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        events = run(req, request.url.path)
        if body.stream:
            return await stream(kind, body, request, events, rid, created)
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
        finish = "length" if done and done["finish_reason"] == "length" else "stop"
        choice = ({"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": finish,
                   "logprobs": None} if kind == "chat" else
                  {"index": 0, "text": out, "finish_reason": finish, "logprobs": None})
        return JSONResponse({"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                             "created": created, "model": served_name, "choices": [choice],
                             "usage": usage(done or {"prompt_tokens": len(req.prompt_ids), "completion_tokens": 0})})

    def body_doc(model: type) -> dict[str, Any]:
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}

    @app.post("/v1/completions", openapi_extra=body_doc(CompletionRequest),
              responses={**stream_response_doc("completion"), **ERROR_RESPONSES})
    async def completions(request: Request) -> Response:
        body = await parse(request, CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt: give one prompt (a string, or a list of one string)", param="prompt",
                               code="invalid_value")
            prompt = prompt[0]
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        req = await asyncio.to_thread(prepare, engine, settings, prompt, body.max_tokens, stop=stop,
                                      temperature=body.temperature, top_p=body.top_p, seed=body.seed)
        return await respond("completion", body, req, request)

    @app.post("/v1/chat/completions", openapi_extra=body_doc(ChatRequest),
              responses={**stream_response_doc("chat"), **ERROR_RESPONSES})
    async def chat(request: Request) -> Response:
        body = await parse(request, ChatRequest)
        prompt, stops = engine.chat_prompt([m.model_dump() for m in body.messages])
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        req = await asyncio.to_thread(prepare, engine, settings, prompt,
                                      body.max_completion_tokens or body.max_tokens, stop=stop, extra_stop=stops,
                                      temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                      prompt_param="messages")
        return await respond("chat", body, req, request)

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": 0,
                                            "owned_by": "inferlab", "inferlab": engine.description}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served_name, "runtime": engine.runtime, "queue_depth": engine.depth,
                "in_flight": engine.in_flight}

    @app.get("/metrics", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with the request and error models (and what they refer to) as components, so that
        every $ref resolves."""
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in (CompletionRequest, ChatRequest, ErrorResponse):
            s = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(s.pop("$defs", {}))
            schemas[model.__name__] = s
        app.openapi_schema = doc
        return doc

    app.openapi = openapi
    return app
