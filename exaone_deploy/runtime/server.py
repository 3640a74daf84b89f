"""An OpenAI-compatible HTTP server over a bundle, with continuous batching.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent events or
whole), ``GET /v1/models``, ``GET /health`` (slot, queue and scheduler state) and ``GET /metrics``
(Prometheus). The model runs in a :class:`~exaone_deploy.runtime.scheduler.Scheduler` thread; each HTTP
request becomes one scheduler request per choice, whose events come back through an asyncio queue.

Chat answers are split into ``reasoning_content``, ``content`` and ``tool_calls`` by the same state machine
streamed and whole (:class:`~exaone_deploy.text.chat.StreamSplitter`), so a streamed answer joins up to
the non-streamed one. Bad requests get an OpenAI-style error body ``{"error": {"message", "type", "param",
"code"}}``: 400 for malformed JSON, wrong types, out-of-range values and prompts that do not fit the context,
401 without the API key, 404 for an unknown model, 413 for an oversized body, 429 when the queue is full.

Sampling defaults follow the OpenAI API (temperature 1, top_p 1), overridden by the sampling fields of the
bundle's ``generation_config.json`` when it has them (as vLLM does); pass ``temperature: 0`` for greedy.

Run it with ``exaone-deploy serve BUNDLE_DIR`` (or ``python -m exaone_deploy.runtime.server BUNDLE_DIR``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import click
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from ..bundle import load_manifest
from ..text.chat import THINK_OPEN, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, StreamSplitter
from .generate import open_backend
from .sampling import SamplingError, SamplingParams
from .scheduler import Delta, Done, Failed, QueueFull, Request, Scheduler, SchedulerClosed, SchedulerObserver
from ..text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["Engine", "create_app", "serve_command", "APIError", "ServerProcess"]

MAX_CHOICES = 16  # n x prompts per HTTP request
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none", "dict", "list") or "[" in part
                                      or part[:1].isupper())


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    # drop the union-member tags pydantic puts in locations ("str", "list[TextPart]", "NamedToolChoice")
    loc = [str(x) for x in err.get("loc", ()) if not _is_type_tag(x)]
    param = ".".join(loc) or None
    return APIError(400, f"{param or 'body'}: {err['msg']}" + (f" (got {err['input']!r})" if "input" in err
                    and not isinstance(err["input"], (dict, list)) else ""), param=param, code="invalid_value")


# --------------------------------------------------------------------------------------------------
# Request bodies
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


class _Sampling(_Strict):
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


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


class Metrics(SchedulerObserver):
    """Prometheus metrics, in a registry of their own (several servers can live in one process)."""

    ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.http_requests = Counter("exaone_http_requests", "HTTP requests by endpoint and status code",
                                     ["endpoint", "code"], registry=r)
        self.finished = Counter("exaone_requests_finished", "Generations finished, by reason", ["reason"],
                                registry=r)
        self.prompt_tokens = Counter("exaone_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("exaone_generation_tokens", "Tokens generated", registry=r)
        self.queue_time = Histogram("exaone_queue_time_seconds", "Time from submission to a cache slot",
                                    buckets=lat, registry=r)
        self.ttft = Histogram("exaone_time_to_first_token_seconds", "Time from submission to the first token",
                              buckets=lat, registry=r)
        self.latency = Histogram("exaone_request_latency_seconds", "Time from submission to the last token",
                                 buckets=lat, registry=r)
        self.tpot = Histogram("exaone_time_per_output_token_seconds", "Decode time per token after the first",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                              registry=r)
        self.decode_step = Histogram("exaone_decode_step_seconds", "Duration of one batched decode step",
                                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                     registry=r)
        self.batch_size = Histogram("exaone_decode_batch_size", "Requests in one decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.prefill_time = Histogram("exaone_prefill_chunk_seconds", "Duration of one prefill chunk",
                                      buckets=lat, registry=r)
        self.queue_depth = Gauge("exaone_queue_depth", "Requests waiting for a cache slot", registry=r)
        self.running = Gauge("exaone_running_requests", "Requests holding a cache slot", registry=r)
        self.slots_used = Gauge("exaone_cache_slots_used", "KV-cache slots in use", registry=r)
        self.slots_total = Gauge("exaone_cache_slots_total", "KV-cache slots", registry=r)

    def bind(self, scheduler: Scheduler) -> None:
        self.queue_depth.set_function(lambda: scheduler.stats()["queue_depth"])
        self.running.set_function(lambda: scheduler.stats()["running"])
        self.slots_used.set_function(lambda: scheduler.stats()["slots_used"])
        self.slots_total.set(scheduler.max_batch)

    def endpoint(self, path: str) -> str:
        return path if path in self.ENDPOINTS else "other"

    # scheduler hooks (scheduler thread)
    def on_admit(self, req: Request) -> None:
        self.queue_time.observe(req.t_admit - req.t_submit)
        self.prompt_tokens.inc(len(req.prompt_ids))

    def on_first_token(self, req: Request) -> None:
        self.ttft.observe(req.t_first - req.t_submit)

    def on_finish(self, req: Request) -> None:
        self.finished.labels(req.finish_reason or "unknown").inc()
        n = req.completion_tokens
        self.generation_tokens.inc(n)
        if req.finish_reason in ("stop", "length"):
            self.latency.observe(req.t_done - req.t_submit)
            if n > 1:
                self.tpot.observe((req.t_done - req.t_first) / (n - 1))

    def on_prefill(self, tokens: int, seconds: float) -> None:
        self.prefill_time.observe(seconds)

    def on_decode(self, batch: int, seconds: float) -> None:
        self.decode_step.observe(seconds)
        self.batch_size.observe(batch)


# --------------------------------------------------------------------------------------------------
# Engine: tokenizer + scheduler + request building
# --------------------------------------------------------------------------------------------------

_SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "documents", "add_generation_prompt", "tokenize", "chat_template"}


class Engine:
    """What the HTTP layer needs: the tokenizer, the scheduler, the served model name and sampling defaults."""

    def __init__(self, backend, tokenizer: Tokenizer, *, model_name: str, max_queue: int = 256,
                 prefill_chunk: int = 512, defaults: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = Metrics()
        self.scheduler = Scheduler(backend, tokenizer, max_queue=max_queue, prefill_chunk=prefill_chunk,
                                   observer=self.metrics)
        self.metrics.bind(self.scheduler)
        self.context = self.scheduler.context
        self.vocab_size = int(backend.spec.vocab_size)
        self.defaults = dict(defaults or {})
        self.created = int(time.time())

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, *, max_batch: int = 8, context: int | None = None,
                    max_queue: int = 256, prefill_chunk: int = 512, model_name: str | None = None,
                    device: str = "cpu", verify: bool = True) -> "Engine":
        manifest = load_manifest(bundle_dir, verify=verify)
        capacity = context or min(manifest.max_seq_len, 4096)
        backend = open_backend(manifest, device=device, max_batch=max_batch, capacity=capacity)
        defaults = {}
        gen_config = Path(manifest.root) / "generation_config.json"
        if gen_config.is_file():
            try:
                cfg = json.loads(gen_config.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{gen_config}: cannot read ({e})") from None
            defaults = {k: cfg[k] for k in _SAMPLING_DEFAULTS if isinstance(cfg.get(k), (int, float))}
        return cls(backend, Tokenizer.from_dir(manifest.root), model_name=model_name or Path(manifest.root).name,
                   max_queue=max_queue, prefill_chunk=prefill_chunk, defaults=defaults)

    # ---- validation ---------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server serves `{self.model_name}`).",
                           param="model", code="model_not_found")

    def sampling(self, body: _Sampling, max_tokens: int | None, prompt_len: int, param: str) -> SamplingParams:
        room = self.context - prompt_len
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, your "
                           f"prompt has {prompt_len} tokens, which leaves no room for a completion.",
                           param=param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                           f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                           f"for the completion). Reduce the prompt or max_tokens (at most {room} here).",
                           param="max_tokens", code="context_length_exceeded")
        unsupported = [(body.presence_penalty != 0, "presence_penalty"), (body.frequency_penalty != 0,
                       "frequency_penalty"), (bool(body.logit_bias), "logit_bias")]
        for bad, name in unsupported:
            if bad:
                raise APIError(400, f"{name} is not supported by this server (use repetition_penalty)",
                               param=name, code="unsupported_parameter")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 16 or any(not s for s in stop):
            raise APIError(400, "stop: at most 16 non-empty strings", param="stop", code="invalid_value")
        bad_ids = [t for t in body.stop_token_ids or () if not 0 <= t < self.vocab_size]
        if bad_ids:
            raise APIError(400, f"stop_token_ids out of range [0, {self.vocab_size}): {bad_ids[:5]}",
                           param="stop_token_ids", code="invalid_value")
        d = self.defaults

        def pick(name, fallback):
            value = getattr(body, name)
            return value if value is not None else d.get(name, fallback)

        temperature = float(pick("temperature", 1.0))
        if temperature < 1e-5:  # as vLLM: below this, sampling is greedy (and 1/T would overflow)
            temperature = 0.0
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=temperature, top_p=float(pick("top_p", 1.0)),
            top_k=max(0, int(pick("top_k", 0))), min_p=float(pick("min_p", 0.0)),
            repetition_penalty=float(pick("repetition_penalty", 1.0)), seed=body.seed, stop=stop,
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos)
        try:
            return params.validate()
        except SamplingError as e:
            raise APIError(400, str(e), code="invalid_value") from None

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None,
                    kwargs: dict[str, Any]) -> tuple[list[int], str]:
        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)
        except Exception as e:  # noqa: BLE001 - jinja TemplateError / TypeError from the template
            raise APIError(400, f"cannot render the chat template: {e}", param="messages",
                           code="invalid_value") from None
        return self.tokenizer.encode(text), text

    def token_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(400, f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}",
                               param="prompt", code="invalid_value")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        return ids


class _Job:
    """The scheduler requests of one HTTP request; their events arrive on an asyncio queue."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: list[SamplingParams]):
        loop = asyncio.get_running_loop()
        self.engine = engine
        self.queue: asyncio.Queue = asyncio.Queue()
        put = self.queue.put_nowait

        def emit(event) -> None:  # scheduler thread
            loop.call_soon_threadsafe(put, event)

        self.requests = [Request(p, sp, emit, index=i) for i, (p, sp) in enumerate(zip(prompts, params))]
        self._open = len(self.requests)

    def submit(self) -> None:
        try:
            self.engine.scheduler.submit(*self.requests)
        except QueueFull as e:
            raise APIError(429, f"{e}; retry later", code="queue_full", headers={"Retry-After": "1"}) from None
        except SchedulerClosed as e:
            raise APIError(503, f"the server is not accepting requests: {e}", code="unavailable") from None
        except ValueError as e:  # ContextLengthError, SamplingError: already checked, but never crash on them
            raise APIError(400, str(e), code="invalid_value") from None

    async def events(self) -> AsyncIterator[Delta | Done | Failed]:
        while self._open:
            event = await self.queue.get()
            if isinstance(event, (Done, Failed)):
                self._open -= 1
            yield event

    def cancel(self) -> None:
        for req in self.requests:
            self.engine.scheduler.cancel(req)


async def _wait_disconnect(request: HTTPRequest) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(job: _Job, request: HTTPRequest) -> list[Delta | Done | Failed] | None:
    """All events of a non-streamed job; None (and the job cancelled) if the client goes away first."""

    async def consume():
        return [event async for event in job.events()]

    work = asyncio.ensure_future(consume())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            job.cancel()
    if not work.done() or work.cancelled():
        return None
    return work.result()


# nginx's code for "client closed the request": nobody reads it, it shows in logs and metrics
CLIENT_GONE = 499


# --------------------------------------------------------------------------------------------------
# Response formatting
# --------------------------------------------------------------------------------------------------


class _ChatChoice:
    """Turns one choice's text deltas into OpenAI message deltas (reasoning, content, tool calls)."""

    def __init__(self, reasoning_opened: bool, parse_tools: bool):
        self.splitter = StreamSplitter(reasoning_opened=reasoning_opened)
        self.parse_tools = parse_tools
        self.n_tool_pieces = 0
        self.n_tool_calls = 0

    def _deltas(self, pieces) -> list[dict]:
        out = []
        for kind, text in pieces:
            if kind == "content":
                out.append({"content": text})
            elif kind == "reasoning":
                out.append({"reasoning_content": text})
            else:
                call = self.splitter.tool_calls[self.n_tool_pieces]
                self.n_tool_pieces += 1
                if not self.parse_tools:  # tools were not offered: the text stays content
                    out.append({"content": TOOL_CALL_OPEN + text + TOOL_CALL_CLOSE})
                    continue
                out.append({"tool_calls": [{"index": self.n_tool_calls, "id": call.id, "type": "function",
                                            "function": {"name": call.name, "arguments": call.arguments}}]})
                self.n_tool_calls += 1
        return out

    def feed(self, text: str) -> list[dict]:
        return self._deltas(self.splitter.feed(text))

    def finish(self) -> list[dict]:
        return self._deltas(self.splitter.finish())

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if reason == "stop" and self.n_tool_calls else reason

    @staticmethod
    def message(deltas: list[dict]) -> dict:
        content = "".join(d.get("content", "") for d in deltas)
        reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
        calls = [c for d in deltas for c in d.get("tool_calls", ())]
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else ""),
                                   "reasoning_content": reasoning or None}
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        return message


def _sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _EventStream(StreamingResponse):
    """Server-sent events of a job; however the response ends (done, client gone, error), the job is cancelled,
    which frees its slots at once if it is still running (and is a no-op otherwise)."""

    def __init__(self, content: AsyncIterator[str], job: _Job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


# --------------------------------------------------------------------------------------------------
# The ASGI gate: API key, body size limit, request counting
# --------------------------------------------------------------------------------------------------


class _Gate:
    """Pure ASGI middleware: checks the API key on /v1/*, bounds request bodies, counts requests."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                          self.api_key.encode())
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 0}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"].startswith("/v1/") and not self._authorized(scope):
                err = APIError(401, "Missing or invalid API key: send `Authorization: Bearer <key>`.",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await err.response()(scope, receive, send_counted)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._buffer_body(scope, receive, send_counted)
                if receive is None:
                    return
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.http_requests.labels(self.metrics.endpoint(scope["path"]), str(status["code"])).inc()

    async def _buffer_body(self, scope, receive, send):
        """Read the body (at most max_body_bytes) and return a receive that replays it, or None after a 413."""
        too_large = APIError(413, f"The request body exceeds {self.max_body_bytes} bytes.",
                             code="request_too_large")
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_body_bytes:
                    await too_large.response()(scope, receive, send)
                    return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await too_large.response()(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


async def _parse(request: HTTPRequest, model: type[BaseModel]):
    body = await request.body()
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(raw), raw
    except ValidationError as e:
        raise _validation_error(e) from None


def create_app(engine: Engine, *, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app; the scheduler thread starts and stops with the app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.scheduler.stop)

    app = FastAPI(title="exaone-deploy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None,
                        type="invalid_request_error").response()

    @app.exception_handler(Exception)
    async def _internal_error(_request, e: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal server error: {type(e).__name__}: {e}").response()

    # ---- info -----------------------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": engine.model_name, "object": "model", "created": engine.created, "owned_by": "exaone-deploy",
                "max_model_len": engine.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        engine.check_model(model)
        return model_card()

    @app.get("/health")
    async def health():
        stats = engine.scheduler.stats()
        ok = stats["alive"]
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": engine.model_name, **stats},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- chat -----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body, raw = await _parse(request, ChatCompletionRequest)
        engine.check_model(body.model)
        if body.logprobs or body.top_logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs",
                           code="unsupported_parameter")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                           code="unsupported_parameter")
        kwargs = dict(body.chat_template_kwargs or {})
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
        if reserved:
            raise APIError(400, f"chat_template_kwargs cannot set {reserved}", param="chat_template_kwargs",
                           code="invalid_value")
        if not isinstance(kwargs.get("enable_thinking", False), bool):
            raise APIError(400, "chat_template_kwargs.enable_thinking must be a boolean",
                           param="chat_template_kwargs.enable_thinking", code="invalid_value")
        kwargs.setdefault("enable_thinking", False)

        # tools: the raw dicts go to the template (key order as sent); tool_choice selects which
        tools = raw.get("tools") or None
        choice = body.tool_choice
        if choice is not None and choice != "none" and not tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
        if choice == "none":
            tools = None
        elif isinstance(choice, NamedToolChoice):
            tools = [t for t in tools if t["function"]["name"] == choice.function.name]
            if not tools:
                raise APIError(400, f"tool_choice names a function that is not in tools: {choice.function.name!r}",
                               param="tool_choice", code="invalid_value")
        if choice is not None:
            kwargs["tool_choice"] = raw["tool_choice"]
        messages = []
        for m in raw["messages"]:
            m = {k: v for k, v in m.items() if v is not None}
            if m["role"] == "developer":
                m["role"] = "system"
            messages.append(m)

        prompt, text = await asyncio.to_thread(engine.chat_prompt, messages, tools, kwargs)
        reasoning_opened = text.rstrip().endswith(THINK_OPEN)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = [engine.sampling(body, max_tokens, len(prompt), "messages")]
        if body.n > 1:
            base = params[0]
            params = [dataclasses.replace(base, seed=None if base.seed is None else base.seed + i)
                      for i in range(body.n)]
        job = _Job(engine, [prompt] * body.n, params)
        job.submit()

        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        choices = [_ChatChoice(reasoning_opened, parse_tools=bool(tools)) for _ in range(body.n)]
        head = {"id": cid, "created": created, "model": engine.model_name}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(index: int, delta: dict, finish_reason: str | None = None, token_ids=None) -> str:
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                if token_ids:
                    choice["token_ids"] = list(token_ids)
                return _sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

            async def stream():
                for i in range(body.n):
                    yield chunk(i, {"role": "assistant", "content": ""})
                completion_tokens = 0
                async for event in job.events():
                    c = choices[event.index]
                    if isinstance(event, Delta):
                        ids = event.token_ids if body.return_token_ids else None
                        for delta in c.feed(event.text) or ([{}] if ids else []):
                            yield chunk(event.index, delta, token_ids=ids)
                            ids = None
                    elif isinstance(event, Done):
                        for delta in c.finish():
                            yield chunk(event.index, delta)
                        completion_tokens += len(event.result.token_ids)
                        yield chunk(event.index, {}, c.finish_reason(event.result.finish_reason))
                    else:
                        yield _sse(APIError(500, event.message, code="generation_failed").body())
                        return
                if include_usage:
                    yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                                "usage": _usage(len(prompt), completion_tokens)})
                yield _sse("[DONE]")

            return _EventStream(stream(), job)

        try:
            events = await _collect(job, request)
        finally:
            job.cancel()
        if events is None:
            return Response(status_code=CLIENT_GONE)
        deltas: list[list[dict]] = [[] for _ in range(body.n)]
        out = [{"index": i, "message": None, "logprobs": None, "finish_reason": "length"} for i in range(body.n)]
        completion_tokens = 0
        for event in events:
            if isinstance(event, Failed):
                raise APIError(500, event.message, code="generation_failed")
            if isinstance(event, Delta):
                deltas[event.index] += choices[event.index].feed(event.text)
            else:
                deltas[event.index] += choices[event.index].finish()
                out[event.index]["finish_reason"] = choices[event.index].finish_reason(event.result.finish_reason)
                completion_tokens += len(event.result.token_ids)
                if body.return_token_ids:
                    out[event.index]["token_ids"] = event.result.token_ids
        for i, choice in enumerate(out):
            choice["message"] = _ChatChoice.message(deltas[i])
        extra = {"prompt_token_ids": prompt} if body.return_token_ids else {}
        return {**head, "object": "chat.completion", "choices": out, "usage": _usage(len(prompt), completion_tokens),
                **extra}

    # ---- text completions -----------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body, _ = await _parse(request, CompletionRequest)
        engine.check_model(body.model)
        for name, ok in (("logprobs", body.logprobs is None), ("suffix", body.suffix is None),
                         ("best_of", body.best_of in (None, 1, body.n))):
            if not ok:
                raise APIError(400, f"{name} is not supported by this server", param=name,
                               code="unsupported_parameter")
        p = body.prompt
        batch = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not batch:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        if len(batch) * body.n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} choices (prompts x n) per request", param="n",
                           code="invalid_value")
        prompts = await asyncio.to_thread(lambda: [engine.token_prompt(x) for x in batch])
        flat_prompts, params, echo = [], [], []
        for ids, source in zip(prompts, batch):
            sp = engine.sampling(body, body.max_tokens if body.max_tokens is not None else 16, len(ids), "prompt")
            for i in range(body.n):
                flat_prompts.append(ids)
                params.append(dataclasses.replace(sp, seed=None if sp.seed is None else sp.seed + i))
                echo.append((source if isinstance(source, str) else engine.tokenizer.decode(ids))
                            if body.echo else "")
        job = _Job(engine, flat_prompts, params)
        job.submit()
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": engine.model_name}
        prompt_tokens = sum(len(x) for x in prompts)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(index: int, text: str, finish_reason: str | None = None, token_ids=None) -> str:
                choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
                if token_ids:
                    choice["token_ids"] = list(token_ids)
                return _sse({**head, "choices": [choice]})

            async def stream():
                for i, e in enumerate(echo):
                    if e:
                        yield chunk(i, e)
                completion_tokens = 0
                async for event in job.events():
                    if isinstance(event, Delta):
                        ids = event.token_ids if body.return_token_ids else None
                        if event.text or ids:
                            yield chunk(event.index, event.text, token_ids=ids)
                    elif isinstance(event, Done):
                        completion_tokens += len(event.result.token_ids)
                        yield chunk(event.index, "", event.result.finish_reason)
                    else:
                        yield _sse(APIError(500, event.message, code="generation_failed").body())
                        return
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
                yield _sse("[DONE]")

            return _EventStream(stream(), job)

        try:
            events = await _collect(job, request)
        finally:
            job.cancel()
        if events is None:
            return Response(status_code=CLIENT_GONE)
        out = [{"index": i, "text": echo[i], "logprobs": None, "finish_reason": "length"}
               for i in range(len(flat_prompts))]
        completion_tokens = 0
        for event in events:
            if isinstance(event, Failed):
                raise APIError(500, event.message, code="generation_failed")
            if isinstance(event, Done):
                out[event.index]["text"] = echo[event.index] + event.result.text
                out[event.index]["finish_reason"] = event.result.finish_reason
                if body.return_token_ids:
                    out[event.index]["prompt_token_ids"] = flat_prompts[event.index]
                    out[event.index]["token_ids"] = event.result.token_ids
                completion_tokens += len(event.result.token_ids)
        return {**head, "choices": out, "usage": _usage(prompt_tokens, completion_tokens)}

    return _Gate(app, api_key=api_key, max_body_bytes=max_body_bytes, metrics=engine.metrics)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port (0: any free port; the chosen one is printed).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="KV-cache slots: requests decoded together.")
@click.option("--max-queue", type=click.IntRange(min=0), default=256, show_default=True,
              help="Requests that may wait for a slot; more get HTTP 429.")
@click.option("--context", type=click.IntRange(min=2), default=None,
              help="Tokens per slot, prompt plus completion (default: the bundle's max_seq_len, at most 4096).")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=512, show_default=True,
              help="Prompt tokens per prefill call; long prompts are split so running streams keep going.")
@click.option("--api-key", default=None, envvar="EXAONE_DEPLOY_API_KEY",
              help="Require `Authorization: Bearer KEY` on /v1/* (env EXAONE_DEPLOY_API_KEY).")
@click.option("--served-model-name", default=None, help="Model name in the API (default: the bundle dir name).")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=DEFAULT_MAX_BODY_BYTES, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--access-log", is_flag=True, help="Log every HTTP request.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files at startup.")
def serve_command(bundle_dir: Path, host: str, port: int, max_batch: int, max_queue: int, context: int | None,
                  prefill_chunk: int, api_key: str | None, served_model_name: str | None, max_body_bytes: int,
                  device: str, access_log: bool, no_verify: bool) -> None:
    """Serve BUNDLE_DIR over an OpenAI-compatible HTTP API with continuous batching."""
    import uvicorn

    from ..bundle import BundleError
    from .backend import ContextLengthError

    try:
        engine = Engine.from_bundle(bundle_dir, max_batch=max_batch, context=context, max_queue=max_queue,
                                    prefill_chunk=prefill_chunk, model_name=served_model_name, device=device,
                                    verify=not no_verify)
    except (BundleError, ContextLengthError, FileNotFoundError, ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e
    app = create_app(engine, api_key=api_key, max_body_bytes=max_body_bytes)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    bound = sock.getsockname()[1]
    if not api_key and host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("listening on %s without --api-key: anyone who can reach it can use the model", host)
    verbose = logging.getLogger("exaone_deploy").getEffectiveLevel() <= logging.INFO
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=access_log,
                            timeout_graceful_shutdown=5)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving {engine.model_name} on http://{shown}:{bound}/v1 (max batch {engine.scheduler.max_batch}, "
               f"context {engine.context}, queue {max_queue})", nl=True)
    sys.stdout.flush()
    uvicorn.Server(config).run(sockets=[sock])


class ServerProcess:
    """``python -m exaone_deploy.runtime.server BUNDLE --host 127.0.0.1 --port 0 ARGS`` in a subprocess, for tests,
    benchmarks and scripts. Returns once the server listens: ``url`` is its root (``url + "/v1"`` is the API),
    ``output`` its merged stdout/stderr so far. Raises RuntimeError (with that output) if it exits or does not
    listen within ``timeout`` seconds."""

    def __init__(self, bundle: str | Path, *args: str, timeout: float = 600.0):
        import queue
        import re
        import subprocess
        import threading

        cmd = [sys.executable, "-m", "exaone_deploy.runtime.server", str(bundle), "--host", "127.0.0.1",
               "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        lines: queue.Queue = queue.Queue()

        def pump():
            for line in self.proc.stdout:
                self.output.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.close()
                raise RuntimeError("the server did not start:\n" + "".join(self.output))
            m = re.search(r"on (http://\S+)/v1", line)  # the line serve_command prints once it listens
            if m:
                self.url = m.group(1)
                return

    def close(self, timeout: float = 30.0) -> None:
        """Terminate (SIGTERM, then SIGKILL after ``timeout`` s) and wait."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    serve_command()
