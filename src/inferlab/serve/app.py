"""The OpenAI-compatible REST API (FastAPI): completions and chat completions, streamed as
server-sent events ending in [DONE], model list, health and Prometheus metrics.

Every request first passes the Guard (guard.py). Work stops when its client is gone, streaming
or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferlab.serve.engine import Engine, GenRequest, QueueFull
from inferlab.serve.guard import LOOPBACK, Guard, error_response
from inferlab.serve.metrics import Metrics
from inferlab.serve.openapi import ERROR_RESPONSES, body_doc, openapi_doc, stream_response_doc
from inferlab.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    _Common,
    parse_body,
    prepare,
)
from inferlab.serve.retry import RetrySlots, retry_headers

log = logging.getLogger(__name__)


async def until_disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read: the next message is the disconnect)."""
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


@dataclass
class Service:
    """What the API's functions work with (one per app, in app.state.service).

    settings: the ServeConfig (limits, queue, retry_after_s, allowed_hosts)."""

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
    path = request.url.path[:200]
    message = {404: f"no such endpoint: {request.method} {path}",
               405: f"{request.method} is not allowed on {path}"}.get(e.status_code, e.detail)
    service_of(request).metrics.error(code)
    return error_response(APIError(e.status_code, message, code=code,
                                   headers=dict(e.headers or {})))


async def parse(service: Service, request: Request, model: type[_Common]) -> Any:
    """The body as `model`, within the schema (400); the Guard holds it to the size limit (413)."""
    return parse_body(await request.body(), model, service.served_name,
                      service.settings.max_body_bytes)


def submit(service: Service, req: GenRequest, emit) -> None:
    """Queue a request on the engine, or answer 429 with Retry-After when its queue is full."""
    req.emit = emit
    try:
        service.engine.submit(req)
    except QueueFull:
        headers = retry_headers(service.retry.take(service.engine, service.settings.retry_after_s))
        raise APIError(429, f"the server is busy ({service.engine.depth} requests waiting); "
                            f"retry after {headers['Retry-After']} s", type_="rate_limit_error",
                       code="queue_full", headers=headers) from None


async def run(service: Service, req: GenRequest, path: str) -> AsyncIterator[tuple[str, Any]]:
    """Submit to the engine and yield its events; cancelled if the consumer goes away."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    metrics = service.metrics

    def emit(kind: str, value: Any) -> None:  # on the engine thread
        # counted here: a request whose client left still generated these tokens
        if kind == "done":
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
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": served_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": None}]}
    return {"id": rid, "object": "text_completion", "created": created, "model": served_name,
            "choices": [{"index": 0, "text": text or "", "finish_reason": finish,
                         "logprobs": None}]}


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
                     "choices": [{"index": 0, "delta": {"role": "assistant"},
                                  "finish_reason": None}]})
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


async def stream(service: Service, kind: str, body: _Common, request: Request,
                 events: AsyncIterator, rid: str, created: int) -> Response:
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
            raise APIError(500, f"generation failed: {v}", type_="server_error",
                           code="generation_failed")
        else:
            done = v
            text.append(v.get("tail", ""))
    return "".join(text), done


def completion_body(service: Service, kind: str, rid: str, created: int, out: str,
                    done: dict[str, Any] | None, req: GenRequest) -> dict[str, Any]:
    """The JSON answer of a request that was not streamed."""
    finish = "length" if done and done["finish_reason"] == "length" else "stop"
    choice = ({"index": 0, "message": {"role": "assistant", "content": out},
               "finish_reason": finish, "logprobs": None} if kind == "chat" else
              {"index": 0, "text": out, "finish_reason": finish, "logprobs": None})
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created, "model": service.served_name, "choices": [choice],
            "usage": usage(done or {"prompt_tokens": len(req.prompt_ids), "completion_tokens": 0})}


async def respond(service: Service, kind: str, body: _Common, req: GenRequest,
                  request: Request) -> Response:
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
            raise APIError(400, "prompt: give one prompt (a string, or a list of one string)",
                           param="prompt", code="invalid_value")
        return prompt[0]
    return prompt


router = APIRouter()


@router.post("/v1/completions", openapi_extra=body_doc(CompletionRequest),
             responses={**stream_response_doc("completion"), **ERROR_RESPONSES})
async def completions(request: Request) -> Response:
    service = service_of(request)
    body = await parse(service, request, CompletionRequest)
    req = await asyncio.to_thread(prepare, service.engine, service.settings,
                                  single_prompt(body.prompt),
                                  body.max_tokens, stop=stops(body.stop),
                                  temperature=body.temperature,
                                  top_p=body.top_p, seed=body.seed, ignore_eos=body.ignore_eos)
    return await respond(service, "completion", body, req, request)


@router.post("/v1/chat/completions", openapi_extra=body_doc(ChatRequest),
             responses={**stream_response_doc("chat"), **ERROR_RESPONSES})
async def chat(request: Request) -> Response:
    service = service_of(request)
    body = await parse(service, request, ChatRequest)
    chat = service.engine.chat_prompt([m.model_dump() for m in body.messages])
    texts = [(m.content, f"messages.{i}.content") for i, m in enumerate(body.messages)]
    req = await asyncio.to_thread(prepare, service.engine, service.settings, chat.text,
                                  body.max_completion_tokens or body.max_tokens,
                                  stop=stops(body.stop), extra_stop=chat.stop,
                                  temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                  prompt_param="messages",
                                  ignore_eos=body.ignore_eos, texts=texts)
    return await respond(service, "chat", body, req, request)


def models_body(service: Service) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": service.served_name, "object": "model", "created": 0,
                                        "owned_by": "inferlab",
                                        "inferlab": service.engine.description}]}


def health_body(service: Service) -> dict[str, Any]:
    e = service.engine
    return {"status": "ok", "model": service.served_name, "runtime": e.runtime,
            "queue_depth": e.depth, "in_flight": e.in_flight}


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def models(request: Request) -> dict[str, Any]:
    return models_body(service_of(request))


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return health_body(service_of(request))


@router.get("/metrics", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
async def prometheus(request: Request) -> PlainTextResponse:
    return PlainTextResponse(service_of(request).metrics.render(),
                             media_type="text/plain; version=0.0.4")


@asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    app.state.service.engine.close()  # the worker thread stops with the server


def create_app(engine: Engine, served_name: str, settings: Any,
               api_key: str | None = None) -> FastAPI:
    """The API for one engine. settings: the ServeConfig (limits, queue, retry, allowed_hosts)."""
    app = FastAPI(title="inferlab", version="1",
                  description=f"OpenAI-compatible API serving {served_name}", lifespan=lifespan)
    metrics = Metrics(lambda: engine.depth, lambda: engine.in_flight,
                      lambda: dict(engine.batch_sizes))
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
