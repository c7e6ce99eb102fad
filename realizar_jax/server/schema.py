"""OpenAI request and response bodies for /v1/completions and /v1/chat/completions (pydantic v2).

Requests are checked strictly (no "1" for 1, no 1.0 for an int, no NaN): a bad body is a RequestError
naming the field, which the app answers with 400 in OpenAI's error shape. Fields OpenAI has and we do not
(tools, response_format, logit_bias, ...) are refused by name rather than silently ignored, since a client
that sends them expects behaviour we would not give. Responses are built with only the fields OpenAI
sends: `finish_reason: null` stays; a streamed chat delta carries only the fields it sets.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from ..serving.requests import MAX_N, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS


class RequestError(ValueError):
    """A request the server refuses before it reaches the engine (HTTP `status`, OpenAI error JSON)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type


# OpenAI fields we know and do not implement; their message says so instead of "unrecognized".
UNSUPPORTED = frozenset({
    "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "response_format", "logit_bias",
    "suffix", "best_of", "modalities", "audio", "prediction", "reasoning_effort", "store", "metadata",
    "service_tier", "web_search_options", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "prompt_logprobs", "verbosity", "prompt_cache_key", "safety_identifier"})


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; accepted, we send usage once at the end


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default and range
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)
    stop: tuple[str, ...] = ()
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # informational in OpenAI; accepted and ignored
    # extensions (vLLM's names)
    top_k: int = Field(0, ge=-1, le=2**31 - 1)  # -1 (vLLM) or 0: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = Field((), max_length=MAX_STOP_TOKEN_IDS)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return ()
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        if len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(v)}")
        return tuple(v)

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_ids(cls, v):
        return () if v is None else tuple(v) if isinstance(v, list) else v

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream: true", "stream_options")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    """POST /v1/completions. prompt: a string, a list of strings, a list of token ids or a list of
    those; each prompt is one engine request, choices are indexed prompt-major."""
    prompt: list[str | list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        def ids(x):
            return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v:
            if ids(v):
                return [v]
            if all(isinstance(p, str) or ids(p) for p in v):
                return v
        raise ValueError("must be a string, a list of strings, a non-empty list of token ids, "
                         "or a non-empty list of those")

    @model_validator(mode="after")
    def _checks(self):
        if self.echo and self.logprobs is not None:
            raise RequestError("echo with logprobs is not supported (prompt logprobs are not computed)", "echo")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v):
        if isinstance(v, list):
            for i, p in enumerate(v):
                if isinstance(p, dict) and p.get("type") != "text":
                    raise RequestError(f"content part type {p.get('type')!r:.40} is not supported (text only)",
                                       f"[{i}].type")
        elif not isinstance(v, str):
            raise ValueError("must be a string or a list of text parts")
        return v

    def text(self) -> str:
        # Text parts are joined with newlines, as vLLM does, so the template sees one string.
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions; messages are rendered with the model's chat template."""
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        return self


def parse_json(body: bytes) -> Any:
    """The body as JSON; NaN/Infinity (which Python's json accepts) and non-objects are refused."""
    def no_constant(name):
        raise ValueError(f"{name} is not valid JSON")
    try:
        data = json.loads(body, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise RequestError(f"the body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise RequestError(f"the body must be a JSON object, got {type(data).__name__}")
    return data


def parse_request(cls: type[_Request], data: dict) -> _Request:
    """Validate a decoded body against `cls`; every failure is a RequestError naming the field."""
    for key, value in data.items():
        if key in UNSUPPORTED and value is not None and not (key == "best_of" and value in (1, data.get("n", 1))):
            raise RequestError(f"{key} is not supported by this server", key)
        if key not in cls.model_fields and key not in UNSUPPORTED:
            raise RequestError(f"unrecognized request argument: {key}", key)
    data = {k: v for k, v in data.items() if k not in UNSUPPORTED}
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        inner = err.get("ctx", {}).get("error")
        if isinstance(inner, RequestError):
            if inner.param and err["loc"]:  # raised inside a nested model: prefix its path
                inner.param = _path(err["loc"]) + ("." if not inner.param.startswith("[") else "") + inner.param
            raise inner from None
        param = _path(err["loc"])
        msg = str(inner) if isinstance(inner, ValueError) else err["msg"]
        raise RequestError(f"{param}: {msg}" if param else msg, param or None) from None


def _path(loc) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'; pydantic's union tags ('str', 'list[...]') are
    left out since they name no field of the request."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not any(c in part for c in "[]-") and part not in ("str", "int", "bool", "float"):
            out += ("." if out else "") + part
    return out


# ---- responses ----------------------------------------------------------------------------------------
class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Out):
    """The body of a non-streaming completion, and (object 'text_completion' too) of each streamed chunk."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[ChatTokenLogprob] | None


class ChatMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(_Out):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler):  # OpenAI's deltas: {"role": ..., "content": ""}, {"content": ...}, {}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "realizar-jax"
    max_model_len: int | None = None


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": _quotable(message), "type": type, "param": _quotable(param), "code": code}}


MAX_ERROR_CHARS = 1000


def _quotable(text: str | None) -> str | None:
    """Messages quote the request (a key, a path), so: clipped (a 100 kB path is not echoed whole), and encodable
    as UTF-8 -- JSON's \\ud800 escapes give lone surrogates, which would make the error response itself fail
    (a 500); they are written as \\ud800."""
    if not isinstance(text, str):
        return text
    if len(text) > MAX_ERROR_CHARS:
        text = f"{text[:MAX_ERROR_CHARS]}... ({len(text) - MAX_ERROR_CHARS} more characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
