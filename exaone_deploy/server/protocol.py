"""The wire format of the OpenAI-compatible API: request models, typed response and stream-chunk models, errors.

Contract:

- Request models are strict (``"1"`` is not an int, ``1`` is not a bool, no NaN/inf) and accept unknown fields
  (clients send extras); :func:`parse_request` turns a body into one, or raises :class:`APIError` 400 naming the
  field (``param``) in OpenAI's error shape.
- Response models are what goes on the wire: ``model.model_dump()`` is the JSON body, ``model_dump_json()`` an
  SSE event's data. Fields that OpenAI sends as ``null`` are ``None``; fields that are absent unless asked for
  (vLLM's ``token_ids`` / ``prompt_token_ids``, a chunk's ``usage``, a message's ``tool_calls``, the fields of a
  stream delta) are declared with ``exclude_if=None`` and omitted when unset.
- Everything HTTP-specific about an error (status, headers) lives on :class:`APIError`; its body is an
  :class:`ErrorResponse`.

As vLLM's ``protocol.py``, this module has no behaviour beyond validation; the routes never build response
dicts by hand. Rejected: ``exclude_none`` at dump time (it would also drop the ``null`` fields OpenAI clients
expect, e.g. ``logprobs`` and ``content``) and per-endpoint dict literals (the two endpoints drifted apart).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ExaoneDeployError

MAX_CHOICES = 16  # n x prompts per HTTP request

__all__ = [
    "MAX_CHOICES",
    "APIError",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatCompletionStreamResponse",
    "ChatLogprobs",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionStreamResponse",
    "ErrorResponse",
    "HealthResponse",
    "ModelCard",
    "ModelList",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "TokenizeRequest",
    "TokenizeResponse",
    "TokenizerInfoResponse",
    "UsageInfo",
    "parse_request",
]

MAX_LOGPROBS = 20  # top_logprobs (chat) and logprobs (completions): OpenAI allows 20 and 5, vLLM 20


def _omitted(default=None):
    """A field that is absent from the JSON unless set (not ``null``)."""
    return Field(default, exclude_if=lambda v: v is None)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(ExaoneDeployError):
    """An error answered with an HTTP status and an :class:`ErrorResponse` body."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "server_error",
    }

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "none", "dict", "list") or "[" in part or part[:1].isupper()
    )


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    # drop the union-member tags pydantic puts in locations ("str", "list[TextPart]", "NamedToolChoice")
    loc = [str(x) for x in err.get("loc", ()) if not _is_type_tag(x)]
    param = ".".join(loc) or None
    return APIError(
        400,
        f"{param or 'body'}: {err['msg']}"
        + (f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], (dict, list)) else ""),
        param=param,
        code="invalid_value",
    )


def parse_request(body: bytes, model: type[BaseModel]) -> tuple[BaseModel, dict]:
    """(validated request, the raw JSON object): the raw object keeps what the model normalizes away (the key
    order of tool definitions, which the chat template renders as sent)."""
    try:
        raw = json.loads(body)
    except RecursionError:
        raise APIError(400, "The request body nests JSON too deeply.", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer literal over Python's digit limit
        raise APIError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    _check_text(raw)
    try:
        return model.model_validate(raw), raw
    except ValidationError as e:
        raise _validation_error(e) from None


MAX_JSON_DEPTH = 64  # deeper request bodies are refused (the chat template and pydantic recurse over them)


def _check_text(raw: Any) -> None:
    """Refuse what ``json.loads`` accepts but nothing downstream can use: a lone surrogate escape (``"\\ud800"``
    gives a str that cannot be encoded as UTF-8: the tokenizer and the response would fail on it), and nesting
    deeper than MAX_JSON_DEPTH. Iterative, so a hostile body cannot exhaust the stack here."""
    stack = [(raw, 1, "body")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise APIError(
                        400,
                        f"{where}: a string contains a lone surrogate (\\ud800-\\udfff escape), which is not text",
                        param=None if where == "body" else where,
                        code="invalid_value",
                    ) from None
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise APIError(
                400, f"The request body nests JSON deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json"
            )
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                stack.append((key, depth, where))
            name = key.split(".")[0] if depth == 1 and isinstance(key, str) else where
            stack.append((item, depth + 1, name))


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: "1" is not an int, 1 is not a bool; unknown fields are accepted and ignored (clients send extras)
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingRequest(_Strict):
    """The fields both endpoints share: model, sampling, stopping, streaming."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_token_ids: bool = False  # vLLM's extension: token ids in choices (and in every stream chunk)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt only (with echo)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None


class _TokenizerRequest(_Strict):
    model: str | None = None


class TokenizeRequest(_TokenizerRequest):
    """vLLM's ``/tokenize``: ``prompt`` (text) or ``messages`` (rendered by the chat template), not both."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (as vLLM)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_TokenizerRequest):
    tokens: list[int]


# --------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "exaone-deploy"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class _Response(BaseModel):
    """The head every completion response and chunk carries."""

    id: str
    created: int
    model: str


class _StreamResponse(_Response):
    """A stream chunk: one choice's delta, or (last, with ``stream_options.include_usage``) no choices and the
    usage."""

    usage: UsageInfo | None = _omitted()


class FunctionOut(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionOut


class DeltaToolCall(ToolCallOut):
    index: int  # which call of the message this delta belongs to


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """A chat choice's ``logprobs``: one entry per generated token (of this chunk, when streamed)."""

    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions ``logprobs`` (what lm-eval's ``local-completions`` reads); with ``echo`` the prompt's
    tokens come first, the first of them ``null``."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class _Choice(BaseModel):
    """What every choice carries, whole or streamed (``finish_reason`` is null until the choice's last chunk)."""

    index: int
    logprobs: None = None  # null unless the request asked for logprobs (the subclasses type it)
    finish_reason: str | None = None
    token_ids: list[int] | None = _omitted()  # vLLM's return_token_ids: the completion's (or the chunk's) ids


# ---- chat ----


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = _omitted()


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = _omitted()
    content: str | None = _omitted()
    reasoning_content: str | None = _omitted()
    tool_calls: list[DeltaToolCall] | None = _omitted()


class ChatCompletionChoice(_Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = _omitted()


class ChatCompletionStreamChoice(_Choice):
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionStreamResponse(_StreamResponse):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionStreamChoice]


# ---- text completions ----


class CompletionChoice(_Choice):
    """A choice of a whole response or of a stream chunk (the same shape, as in OpenAI's API)."""

    text: str
    logprobs: CompletionLogprobs | None = None
    prompt_token_ids: list[int] | None = _omitted()


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(_StreamResponse):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class HealthResponse(BaseModel):
    """``GET /health``: ``status`` ("ok" or "unavailable"), ``model``, and the engine's stats (slots, queue,
    counters, ``alive``) as further fields."""

    model_config = ConfigDict(extra="allow")
    status: Literal["ok", "unavailable"]
    model: str


# ---- tokenizer endpoints (vLLM's shapes) ----


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = _omitted()


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """``GET /tokenizer_info``: the tokenizer's class, named special tokens, chat template and limits (further
    fields may follow)."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
