"""The OpenAI-compatible REST API (FastAPI): completions and chat completions, streamed as server-sent events
ending in [DONE], model list, health and Prometheus metrics. Errors have OpenAI's body:
{"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inferlab.serve.engine import Engine, GenRequest, QueueFull
from inferlab.serve.metrics import Metrics

log = logging.getLogger(__name__)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields this server does not use (user, logprobs, ...)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(..., description="one prompt (a list of one string is accepted)")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def create_app(engine: Engine, served_name: str, settings: Any, api_key: str | None = None) -> FastAPI:
    """settings: the ServeConfig (limits, queue, retry_after_s)."""
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.close()  # the worker thread stops with the server

    app = FastAPI(title="inferlab", version="1", description=f"OpenAI-compatible API serving {served_name}",
                  lifespan=lifespan)
    metrics = Metrics(lambda: engine.depth, lambda: engine.in_flight, lambda: dict(engine.batch_sizes))
    app.state.engine, app.state.metrics, app.state.served_name = engine, metrics, served_name

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.error(e.code or e.type)
        metrics.request(request.url.path, e.status)
        return e.response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                metrics.error("invalid_api_key")
                metrics.request(request.url.path, 401)
                return APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                code="invalid_api_key").response()
        return await call_next(request)

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_body_bytes:
            raise APIError(413, f"request body of {length} bytes exceeds the limit of {settings.max_body_bytes}",
                           code="body_too_large")
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise APIError(413, f"request body exceeds the limit of {settings.max_body_bytes} bytes",
                           code="body_too_large")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise APIError(400, f"request body is not valid UTF-8 ({e.reason} at byte {e.start})",
                           code="invalid_encoding") from None
        except json.JSONDecodeError as e:
            raise APIError(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            body = model.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err["loc"]) or None
            raise APIError(400, f"{param}: {err['msg']}", param=param, code="invalid_value") from None
        if body.model != served_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {served_name!r}",
                           param="model", code="model_not_found")
        return body

    async def prepare(body: _Common, prompt: str, extra_stop: list[str], max_tokens: int | None) -> GenRequest:
        max_tokens = max_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens: {max_tokens} is above this server's limit of "
                                f"{settings.max_tokens_limit}", param="max_tokens", code="invalid_value")
        if len(prompt) > settings.max_prompt_chars:
            raise APIError(400, f"the prompt has {len(prompt)} characters; the limit is {settings.max_prompt_chars}",
                           param="prompt", code="prompt_too_long")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop: at most 4 stop sequences", param="stop", code="invalid_value")
        ids = await asyncio.to_thread(engine.tokenize, prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        if len(ids) + max_tokens > engine.context_window:
            raise APIError(400, f"this model's context window is {engine.context_window} tokens; the prompt has "
                                f"{len(ids)} and max_tokens asks for {max_tokens} more",
                           param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        return GenRequest(prompt_ids=ids, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          stop=stop + extra_stop, seed=body.seed)

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
                elif kind == "error":
                    done = True
                    metrics.error("generation_failed")
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

    async def respond(kind: str, body: _Common, req: GenRequest, path: str) -> Response:
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        events = run(req, path)
        if body.stream:
            first_event = await events.__anext__()  # a full queue fails here, before the 200 is sent

            async def sse() -> AsyncIterator[str]:
                include_usage = bool((body.stream_options or {}).get("include_usage"))
                if kind == "chat":
                    yield "data: " + json.dumps({**chunk_body(kind, rid, created, None, None),
                                                 "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                              "finish_reason": None}]}) + "\n\n"
                ev: tuple[str, Any] | None = first_event
                complete = False
                try:
                    while ev is not None:
                        k, v = ev
                        if k == "text":
                            yield "data: " + json.dumps(chunk_body(kind, rid, created, v, None)) + "\n\n"
                        elif k == "error":
                            yield "data: " + json.dumps({"error": {"message": v, "type": "server_error",
                                                                   "param": None, "code": None}}) + "\n\n"
                            break
                        else:
                            finish = "length" if v["finish_reason"] == "length" else "stop"
                            yield "data: " + json.dumps(chunk_body(kind, rid, created, v.get("tail") or None,
                                                                   finish)) + "\n\n"
                            if include_usage:
                                yield "data: " + json.dumps({**chunk_body(kind, rid, created, None, None),
                                                             "choices": [], "usage": usage(v)}) + "\n\n"
                            break
                        ev = await events.__anext__()
                    yield "data: [DONE]\n\n"
                    complete = True
                    metrics.request(path, 200)
                finally:
                    if not complete:
                        metrics.request(path, 499)  # the client closed the stream
                    await events.aclose()

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, done = [], None
        try:
            async for k, v in events:
                if k == "text":
                    text.append(v)
                elif k == "error":
                    raise APIError(500, f"generation failed: {v}", type_="server_error", code="generation_failed")
                else:
                    done = v
                    text.append(v.get("tail", ""))
        finally:
            await events.aclose()
        finish = "length" if done and done["finish_reason"] == "length" else "stop"
        out = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": finish,
                   "logprobs": None} if kind == "chat" else
                  {"index": 0, "text": out, "finish_reason": finish, "logprobs": None})
        metrics.request(path, 200)
        return JSONResponse({"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                             "created": created, "model": served_name, "choices": [choice],
                             "usage": usage(done or {"prompt_tokens": len(req.prompt_ids), "completion_tokens": 0})})

    schema = {"completion": CompletionRequest.model_json_schema(), "chat": ChatRequest.model_json_schema()}

    @app.post("/v1/completions", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": schema["completion"]}}}})
    async def completions(request: Request) -> Response:
        body = await parse(request, CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt: give one prompt (a string, or a list of one string)", param="prompt",
                               code="invalid_value")
            prompt = prompt[0]
        req = await prepare(body, prompt, [], body.max_tokens)
        return await respond("completion", body, req, "/v1/completions")

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": schema["chat"]}}}})
    async def chat(request: Request) -> Response:
        body = await parse(request, ChatRequest)
        prompt, stops = engine.chat_prompt([m.model_dump() for m in body.messages])
        req = await prepare(body, prompt, stops, body.max_completion_tokens or body.max_tokens)
        return await respond("chat", body, req, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        metrics.request("/v1/models", 200)
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": 0,
                                            "owned_by": "inferlab", "inferlab": engine.description}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served_name, "runtime": engine.runtime, "queue_depth": engine.depth,
                "in_flight": engine.in_flight}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
