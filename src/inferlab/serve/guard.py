"""The Guard: an ASGI middleware every request passes first.

It checks the Host allow-list, the Origin, the API key, JSON-only bodies and no uploads to the
demo, and reads each body whole within serve.max_body_bytes (a client gone before its body is
complete is a 499). It answers every error with OpenAI's body, never lets an exception reach the
HTTP server (which would answer plain text and drop the connection), and counts each request
once in /metrics.
"""

from __future__ import annotations

import hmac
import logging
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from inferlab.serve.metrics import Metrics
from inferlab.serve.protocol import APIError

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
             "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def endpoint_label(path: str) -> str:
    """A bounded set of /metrics labels: the API's own paths, "/ui" for the demo, else "other"."""
    if path in API_PATHS:
        return path
    if path == "/ui" or path.startswith("/ui/"):
        return "/ui"
    return "other"


def host_name(value: str) -> str:
    """The host of a Host header ("127.0.0.1:8000", "[::1]:8000") or of an Origin URL's netloc."""
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
    return APIError(413, f"{what}: the limit is {limit} bytes (serve.max_body_bytes)",
                    code="body_too_large")


def replay(body: bytes, receive):
    """receive for the app: the body read already, then the connection's messages (disconnect)."""
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
            return APIError(400,
                            f"Host {headers.get('host', '')!r} is not one this server answers "
                            "to (serve.allowed_hosts); this guards against DNS rebinding",
                            code="invalid_host")
        origin = headers.get("origin")
        if (origin is not None and not self.any_host
                and host_name(urlsplit(origin).netloc) not in self.allowed):
            return APIError(403,
                            f"Origin {origin!r} is not allowed: only pages served from "
                            "serve.allowed_hosts may call this server",
                            type_="permission_error", code="invalid_origin")
        if self.api_key and path != "/health":
            given = headers.get("authorization", "")
            bearer = given.lower().startswith("bearer ")
            token = given[7:] if bearer else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return APIError(401,
                                "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                type_="authentication_error", code="invalid_api_key")
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if endpoint_label(path) == "/ui" and ("/upload" in path or ctype == "multipart/form-data"):
            return APIError(403, "the demo takes no uploads", type_="permission_error",
                            code="uploads_disabled")
        if path in JSON_BODY_PATHS and method == "POST" and ctype != "application/json":
            return APIError(415,
                            f"Content-Type {ctype or '(none)'!r}: send the body as "
                            "application/json",
                            code="unsupported_media_type")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return too_large(int(length), self.max_body)
        return None

    async def read_body(self, receive) -> bytes:
        """The whole body, however it is sent (chunked: no Content-Length), or BodyTooLarge past
        the limit, or ClientDisconnect when the client hangs up first."""
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
                # here: the API and the demo alike within the limit
                body = await self.read_body(receive)
                await self.app(scope, replay(body, receive), send_counted)
        except BodyTooLarge as e:
            self.metrics.error("body_too_large")
            if not started:
                refusal = error_response(too_large(e.seen, self.max_body, sent=True))
                await refusal(scope, receive, send_counted)
        except ClientDisconnect:  # the client closed the connection before sending its whole body
            log.info("%s %s: the client closed the connection before its body was complete",
                     scope["method"], scope["path"][:200])
            self.metrics.error("client_disconnected")
            scope["state"]["outcome"] = 499
        except Exception as e:  # answered here, as JSON, on a connection that stays open
            log.exception("%s %s failed", scope["method"], scope["path"][:200])
            self.metrics.error("internal_error")
            if not started:
                err = APIError(500, f"internal error: {type(e).__name__}", type_="server_error",
                               code="internal_error")
                await error_response(err)(scope, receive, send_counted)
        finally:
            # a stream that failed or lost its client after its 200 says so in its scope's state
            status = scope["state"].get("outcome") or (started[0] if started else 499)
            self.metrics.request(endpoint_label(scope["path"]), status)
