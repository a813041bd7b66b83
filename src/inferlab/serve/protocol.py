"""What the OpenAI-compatible API accepts and how it refuses.

The request bodies, the error body, and the checks every request passes before it reaches an
engine (plain functions, shared by the REST API and the Gradio demo).

Errors have OpenAI's body: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from inferlab.serve.engine import MAX_SEED, Engine, GenRequest
from inferlab.serve.text import StopMatcher

MAX_STOP_SEQUENCES = 4


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_
        self.param, self.code = param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer has this body."""

    error: ErrorDetail


def _boolean(value: Any) -> Any:
    if not isinstance(value, bool):  # Literal[False] alone takes 0, which equals False
        raise ValueError("Input should be a valid boolean")
    return value


FalseOnly = Annotated[Literal[False], BeforeValidator(_boolean)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    # extra: clients send fields this server does not use (user, ...); strict: the types the
    # schema says (no 0 for false, no "1" for 1)
    model_config = ConfigDict(extra="ignore", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _integral(cls, value: Any) -> Any:
        """JSON's 1.0 is the integer 1 (JSON Schema says so); 1.5, true and "1" are refused."""
        return int(value) if isinstance(value, float) and value.is_integer() else value

    model: str = Field(..., description="the served model's name (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="at most serve.max_tokens_limit; "
                                                           "unset: serve.default_max_tokens")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 (or below 1e-5): greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description=f"at most {MAX_STOP_SEQUENCES} "
                                                           "stop sequences")
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="the same seed gives the same sample; unset: a "
                                         "fresh random seed per request")
    ignore_eos: bool = Field(False, description="generate past the end-of-sequence token, to "
                                                "exactly max_tokens (vLLM's ignore_eos: load "
                                                "tests of a fixed length)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    # OpenAI's fields this server does not implement: accepted only when they ask for nothing
    logit_bias: dict[str, float] | None = Field(None, max_length=0,
                                                description="not supported: null or {}")
    presence_penalty: float | None = Field(None, ge=0, le=0,
                                           description="not supported: null or 0")
    frequency_penalty: float | None = Field(None, ge=0, le=0,
                                            description="not supported: null or 0")
    tools: list[Any] | None = Field(None, max_length=0, description="not supported: null or []")
    tool_choice: Literal["none"] | None = Field(None,
                                                description="not supported: null or \"none\"")
    functions: list[Any] | None = Field(None, max_length=0,
                                        description="not supported: null or []")


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(...,
                                    description="one prompt (a list of one string is accepted)")
    logprobs: int | None = Field(None, ge=0, le=0, description="not supported: null or 0")
    echo: FalseOnly = Field(False, description="not supported: false")
    best_of: int | None = Field(None, ge=1, le=1, description="not supported: null or 1")
    suffix: Literal[""] | None = Field(None, description="not supported: null or \"\"")


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1,
                                              description="as max_tokens (which it overrides)")
    logprobs: FalseOnly | None = Field(None, description="not supported: null or false")
    top_logprobs: int | None = Field(None, ge=0, le=0, description="not supported: null or 0")


# fields of OpenAI's API this server does not implement, and the values that ask for nothing
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, 0, False), "top_logprobs": (None, 0), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
}


def parse_body(raw: bytes, model: type[BaseModel], served_name: str, max_body_bytes: int) -> Any:
    """The request body, validated, or an APIError that says what is wrong."""
    if len(raw) > max_body_bytes:
        raise APIError(413, f"request body exceeds the limit of {max_body_bytes} bytes",
                       code="body_too_large")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 ({e.reason} at byte {e.start})",
                       code="invalid_encoding") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "JSON nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:  # "\ud800" is valid JSON but no text: a lone surrogate cannot be tokenized or sent back
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        lone = e.object[e.start:e.end]
        raise APIError(400, f"the request contains a lone surrogate ({lone!a}), which is not "
                            "text; send UTF-8 text", code="invalid_encoding") from None
    except RecursionError:
        raise APIError(400, "JSON nested too deeply", code="invalid_json") from None
    for key, allowed in UNSUPPORTED.items():
        if key in data and data[key] not in allowed:
            raise APIError(400, f"{key}: {data[key]!r} is not supported by this server "
                                "(leave it out)", param=key, code="unsupported_parameter")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']}", param=param, code="invalid_value") from None
    except RecursionError:
        raise APIError(400, "JSON nested too deeply", code="invalid_json") from None
    if body.model != served_name:
        raise APIError(404, f"model {body.model!r} does not exist; this server serves "
                            f"{served_name!r}", param="model", code="model_not_found")
    return body


def prepare(engine: Engine, settings: Any, prompt: str, max_tokens: int | None, *,
            stop: list[str] | None = None, extra_stop: list[str] | None = None,
            temperature: float = 1.0, top_p: float = 1.0,
            seed: int | None = None, prompt_param: str = "prompt",
            ignore_eos: bool = False, texts: list[tuple[str, str]] | None = None) -> GenRequest:
    """A request the engine can serve, or an APIError: the server's limits (settings: the
    ServeConfig) and the model's context window checked, the prompt tokenized, the stop strings'
    matcher built (here, not on the engine's thread). extra_stop: the chat format's own stop
    strings (not counted against the client's four); texts: what serve.max_prompt_chars limits,
    with its param (a chat: each message; default: the prompt). Blocking (tokenizes): call it from a worker thread."""
    max_tokens = max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens: {max_tokens} is above this server's limit of "
                            f"{settings.max_tokens_limit}", param="max_tokens",
                       code="invalid_value")
    for text, param in texts or [(prompt, prompt_param)]:
        if len(text) > settings.max_prompt_chars:
            raise APIError(400, f"{param} has {len(text)} characters; the limit is "
                                f"{settings.max_prompt_chars}", param=param,
                           code="prompt_too_long")
    stop = list(stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"stop: at most {MAX_STOP_SEQUENCES} stop sequences", param="stop",
                       code="invalid_value")
    ids = engine.tokenize(prompt)
    if not ids:
        raise APIError(400, "the prompt is empty", param=prompt_param, code="invalid_value")
    if len(ids) + max_tokens > engine.context_window:
        raise APIError(400, f"this model's context window is {engine.context_window} tokens; "
                            f"the prompt has {len(ids)} and max_tokens asks for {max_tokens} more",
                       param=prompt_param, code="context_length_exceeded")
    return GenRequest(prompt_ids=ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                      stop=StopMatcher(stop + list(extra_stop or [])), seed=seed,
                      ignore_eos=ignore_eos)
