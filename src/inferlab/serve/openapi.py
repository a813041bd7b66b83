"""The OpenAPI document: request and error models as components, and this server's own limits."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from inferlab.serve.protocol import (
    MAX_STOP_SEQUENCES,
    ChatRequest,
    CompletionRequest,
    ErrorResponse,
)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what} for status, what in (
        (400,
         "invalid request: a value out of range, malformed JSON or text, an unsupported field, "
         "a prompt too long for the context, a Host not allowed"),
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
    what = (f"JSON; with \"stream\": true, server-sent events: one `data: {{...}}` line per "
            f"token ({obj} objects), an error event if generation fails, then `data: [DONE]`")
    return {200: {"description": what,
                  "content": {"application/json": {"schema": {"type": "object"}},
                              "text/event-stream": {"schema": SSE_EVENT}}}}


# one server-sent event as clients parse it: its data, a JSON object (a chunk, or an error) or
# the final [DONE]
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
    {"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json",
                          "contentSchema": {"type": "object"}}]}}}



def body_doc(model: type) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}



def openapi_doc(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with the request and error models (and what they refer to) as
    components, so that every $ref resolves."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description,
                      routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (CompletionRequest, ChatRequest, ErrorResponse):
        s = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(s.pop("$defs", {}))
        schemas[model.__name__] = s
    with_limits(schemas, app.state.service)
    app.openapi_schema = doc
    return doc


def with_limits(schemas: dict[str, Any], service: Any) -> None:
    """This server's own limits in the request schemas: the one model name it answers to,
    serve.max_tokens_limit, serve.max_prompt_chars (a prompt that tokenizes to more than the
    context window leaves is refused all the same: 400 context_length_exceeded)."""
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
