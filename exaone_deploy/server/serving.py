"""Serving: an HTTP request's body -> prompts and sampling parameters -> engine events -> a response.

:class:`OpenAIServing` holds what both endpoints share: the model-name check, request -> ``SamplingParams``
(the bundle's generation-config defaults under the request's values, the context-length check), submitting to
:meth:`AsyncEngine.generate <exaone_deploy.server.engine.AsyncEngine.generate>` (engine errors -> 429 / 503 / 400),
and the one event pump (:meth:`OpenAIServing.respond`): it turns the events of a generation into stream choices
through a per-endpoint :class:`Format`; streamed, each choice becomes a server-sent chunk; collected, the
format builds the whole response from what it was fed. One branch tells the two apart, so a streamed answer
joins up to the non-streamed one by construction.

Per-endpoint formatting: chat splits each choice's text into ``reasoning_content``, ``content`` and
``tool_calls`` with :class:`~exaone_deploy.text.chat.StreamSplitter` (:class:`ChatChoice`); text completions
pass text through (with ``echo``). However a response ends (done, client gone, error), its generation is closed,
which frees its cache slots.

Adding an endpoint that generates (e.g. logprobs fields, a scoring route) means a new :class:`Format` (and, for
new per-token data, new fields on the engine's ``Delta``), not a new loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..runtime.sampling import SamplingError, SamplingParams
from ..text.chat import THINK_OPEN, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, StreamSplitter
from .engine import AsyncEngine, Delta, Done, Generation, PromptTooLarge, QueueFull, SchedulerClosed
from .protocol import (
    MAX_CHOICES,
    APIError,
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    DeltaToolCall,
    FunctionOut,
    NamedToolChoice,
    SamplingRequest,
    ToolCallOut,
    UsageInfo,
)

__all__ = ["CLIENT_GONE", "ChatChoice", "Format", "OpenAIServing", "ServingChat", "ServingCompletion"]

# nginx's code for "client closed the request": nobody reads it, it shows in logs and metrics
CLIENT_GONE = 499
_RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "documents", "add_generation_prompt", "tokenize", "chat_template"}


# --------------------------------------------------------------------------------------------------
# Formatting: events -> stream choices -> chunks, or the whole response
# --------------------------------------------------------------------------------------------------


class Format(ABC):
    """How one endpoint formats the choices of one HTTP request. ``opening``/``delta``/``done`` return stream
    choices and record what the whole response needs; ``chunk`` wraps stream choices (or the usage) in a
    stream response; ``response`` is the whole answer once every choice is done."""

    chunk_type: type[BaseModel]

    def __init__(self, engine: AsyncEngine, prefix: str, prompt_tokens: int, return_token_ids: bool):
        self.head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_name}
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.return_token_ids = return_token_ids

    def token_ids(self, ids) -> list[int] | None:
        return (list(ids) or None) if self.return_token_ids else None

    def usage(self) -> UsageInfo:
        return UsageInfo.of(self.prompt_tokens, self.completion_tokens)

    def chunk(self, choices: list[BaseModel], usage: UsageInfo | None = None) -> BaseModel:
        return self.chunk_type(**self.head, choices=choices, usage=usage)

    @abstractmethod
    def opening(self) -> list[BaseModel]: ...

    @abstractmethod
    def delta(self, event: Delta) -> list[BaseModel]: ...

    @abstractmethod
    def done(self, event: Done) -> list[BaseModel]: ...

    @abstractmethod
    def response(self) -> BaseModel: ...


class ChatChoice:
    """Turns one choice's text deltas into OpenAI message deltas (reasoning, content, tool calls)."""

    def __init__(self, reasoning_opened: bool, parse_tools: bool):
        self.splitter = StreamSplitter(reasoning_opened=reasoning_opened)
        self.parse_tools = parse_tools
        self.n_tool_pieces = 0
        self.n_tool_calls = 0

    def _deltas(self, pieces) -> list[DeltaMessage]:
        out = []
        for kind, text in pieces:
            if kind == "content":
                out.append(DeltaMessage(content=text))
            elif kind == "reasoning":
                out.append(DeltaMessage(reasoning_content=text))
            else:
                call = self.splitter.tool_calls[self.n_tool_pieces]
                self.n_tool_pieces += 1
                if not self.parse_tools:  # tools were not offered: the text stays content
                    out.append(DeltaMessage(content=TOOL_CALL_OPEN + text + TOOL_CALL_CLOSE))
                    continue
                function = FunctionOut(name=call.name, arguments=call.arguments)
                out.append(DeltaMessage(tool_calls=[DeltaToolCall(index=self.n_tool_calls, id=call.id,
                                                                  function=function)]))
                self.n_tool_calls += 1
        return out

    def feed(self, text: str) -> list[DeltaMessage]:
        return self._deltas(self.splitter.feed(text))

    def finish(self) -> list[DeltaMessage]:
        return self._deltas(self.splitter.finish())

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if reason == "stop" and self.n_tool_calls else reason

    @staticmethod
    def message(deltas: list[DeltaMessage]) -> AssistantMessage:
        content = "".join(d.content or "" for d in deltas)
        reasoning = "".join(d.reasoning_content or "" for d in deltas)
        calls = [ToolCallOut(id=c.id, function=c.function) for d in deltas for c in d.tool_calls or ()]
        return AssistantMessage(content=content or (None if calls else ""), reasoning_content=reasoning or None,
                                tool_calls=calls or None)


class ChatFormat(Format):
    chunk_type = ChatCompletionStreamResponse

    def __init__(self, engine: AsyncEngine, prompt: list[int], n: int, *, reasoning_opened: bool,
                 parse_tools: bool, return_token_ids: bool):
        super().__init__(engine, "chatcmpl", len(prompt), return_token_ids)
        self.prompt = prompt
        self.choices = [ChatChoice(reasoning_opened, parse_tools) for _ in range(n)]
        self.deltas: list[list[DeltaMessage]] = [[] for _ in range(n)]
        self.finished: list[ChatCompletionChoice | None] = [None] * n

    def opening(self):
        return [ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(len(self.choices))]

    def delta(self, event):
        deltas = self.choices[event.index].feed(event.text)
        self.deltas[event.index] += deltas
        ids = self.token_ids(event.token_ids)
        out = []
        for d in deltas or ([DeltaMessage()] if ids else []):  # token ids of held-back text still go out
            out.append(ChatCompletionStreamChoice(index=event.index, delta=d, token_ids=ids))
            ids = None
        return out

    def done(self, event):
        i, choice = event.index, self.choices[event.index]
        deltas = choice.finish()
        self.deltas[i] += deltas
        reason = choice.finish_reason(event.result.finish_reason)
        self.finished[i] = ChatCompletionChoice(index=i, message=ChatChoice.message(self.deltas[i]),
                                                finish_reason=reason,
                                                token_ids=event.result.token_ids if self.return_token_ids else None)
        return [ChatCompletionStreamChoice(index=i, delta=d) for d in deltas] + [
            ChatCompletionStreamChoice(index=i, delta=DeltaMessage(), finish_reason=reason)]

    def response(self):
        return ChatCompletionResponse(**self.head, choices=self.finished, usage=self.usage(),
                                      prompt_token_ids=self.prompt if self.return_token_ids else None)


class CompletionFormat(Format):
    chunk_type = CompletionStreamResponse

    def __init__(self, engine: AsyncEngine, prompts: list[list[int]], echo: list[str], *, prompt_tokens: int,
                 return_token_ids: bool):
        super().__init__(engine, "cmpl", prompt_tokens, return_token_ids)
        self.prompts, self.echo = prompts, echo  # one per choice
        self.finished: list[CompletionChoice | None] = [None] * len(prompts)

    def opening(self):
        return [CompletionChoice(index=i, text=e) for i, e in enumerate(self.echo) if e]

    def delta(self, event):
        ids = self.token_ids(event.token_ids)
        return [CompletionChoice(index=event.index, text=event.text, token_ids=ids)] if event.text or ids else []

    def done(self, event):
        i, result = event.index, event.result
        ids = self.return_token_ids
        self.finished[i] = CompletionChoice(index=i, text=self.echo[i] + result.text,
                                            finish_reason=result.finish_reason,
                                            prompt_token_ids=self.prompts[i] if ids else None,
                                            token_ids=result.token_ids if ids else None)
        return [CompletionChoice(index=i, text="", finish_reason=result.finish_reason)]

    def response(self):
        return CompletionResponse(**self.head, choices=self.finished, usage=self.usage())


# --------------------------------------------------------------------------------------------------
# The event pump
# --------------------------------------------------------------------------------------------------


async def _pump(fmt: Format, gen: Generation) -> AsyncIterator[BaseModel]:
    """The stream choices of a generation, in event order; a failed sequence raises APIError 500."""
    for choice in fmt.opening():
        yield choice
    async for event in gen:
        if isinstance(event, Delta):
            choices = fmt.delta(event)
        elif isinstance(event, Done):
            fmt.completion_tokens += len(event.result.token_ids)
            choices = fmt.done(event)
        else:
            raise APIError(500, event.message, code="generation_failed")
        for choice in choices:
            yield choice


def _sse(data: BaseModel | str) -> str:
    return f"data: {data if isinstance(data, str) else data.model_dump_json()}\n\n"


async def _stream(fmt: Format, gen: Generation, include_usage: bool) -> AsyncIterator[str]:
    try:
        async for choice in _pump(fmt, gen):
            yield _sse(fmt.chunk([choice]))
    except APIError as e:  # the status line is gone: the error goes out as an event, then [DONE] (as vLLM)
        yield _sse(e.body())
        yield _sse("[DONE]")
        return
    if include_usage:
        yield _sse(fmt.chunk([], usage=fmt.usage()))
    yield _sse("[DONE]")


async def _wait_disconnect(request: HTTPRequest) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(work: Awaitable, request: HTTPRequest) -> bool:
    """Run ``work`` to its end (True; its exception propagates) unless the client goes away first (False)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        return False
    task.result()
    return True


class EventStream(StreamingResponse):
    """Server-sent events of a generation; however the response ends, the generation is closed."""

    def __init__(self, content: AsyncIterator[str], gen: Generation):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.gen.aclose()


# --------------------------------------------------------------------------------------------------
# The endpoints
# --------------------------------------------------------------------------------------------------


class OpenAIServing:
    """What the endpoints share: validation against the served model, submission, the event pump."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def check_model(self, model: str | None) -> None:
        name = self.engine.model_name
        if model is not None and model != name:
            raise APIError(404, f"The model `{model}` does not exist (this server serves `{name}`).",
                           param="model", code="model_not_found")

    def sampling_params(self, body: SamplingRequest, max_tokens: int | None, prompt_len: int, param: str,
                        n: int) -> list[SamplingParams]:
        """``n`` parameter sets for one prompt (seeds ``seed + i``), ``max_tokens`` bounded by the context."""
        context = self.engine.max_seq_len
        room = context - prompt_len
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, your "
                           f"prompt has {prompt_len} tokens, which leaves no room for a completion.",
                           param=param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you "
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
        vocab = self.engine.vocab_size
        bad_ids = [t for t in body.stop_token_ids or () if not 0 <= t < vocab]
        if bad_ids:
            raise APIError(400, f"stop_token_ids out of range [0, {vocab}): {bad_ids[:5]}",
                           param="stop_token_ids", code="invalid_value")
        d = self.engine.defaults

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
            params.validate()
        except SamplingError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        return [dataclasses.replace(params, seed=None if params.seed is None else params.seed + i)
                for i in range(n)]

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> Generation:
        try:
            return self.engine.generate(prompts, params)
        except QueueFull as e:
            raise APIError(429, f"{e}; retry later", code="queue_full", headers={"Retry-After": "1"}) from None
        except SchedulerClosed as e:
            raise APIError(503, f"the server is not accepting requests: {e}", code="unavailable") from None
        except ValueError as e:  # ContextLengthError, SamplingError: already checked, but never crash on them
            raise APIError(400, str(e), code="invalid_value") from None

    async def respond(self, request: HTTPRequest, body: SamplingRequest, fmt: Format, gen: Generation) -> Response:
        """Stream the generation's chunks, or collect them into the whole response (499 if the client left)."""
        if body.stream:
            return EventStream(_stream(fmt, gen, body.include_usage), gen)

        async def collect():
            async for _ in _pump(fmt, gen):
                pass

        try:
            finished = await _unless_disconnected(collect(), request)
        finally:
            await gen.aclose()
        return JSONResponse(fmt.response().model_dump()) if finished else Response(status_code=CLIENT_GONE)


class ServingChat(OpenAIServing):
    """``POST /v1/chat/completions``: messages (and tools) through the chat template."""

    async def create(self, body: ChatCompletionRequest, raw: dict[str, Any], request: HTTPRequest) -> Response:
        self.check_model(body.model)
        if body.logprobs or body.top_logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs",
                           code="unsupported_parameter")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                           code="unsupported_parameter")
        kwargs = self._template_kwargs(body)
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

        prompt, text = await self._render(messages, tools, kwargs)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = self.sampling_params(body, max_tokens, len(prompt), "messages", body.n)
        gen = self.submit([prompt] * body.n, params)
        fmt = ChatFormat(self.engine, prompt, body.n, reasoning_opened=text.rstrip().endswith(THINK_OPEN),
                         parse_tools=bool(tools), return_token_ids=body.return_token_ids)
        return await self.respond(request, body, fmt, gen)

    @staticmethod
    def _template_kwargs(body: ChatCompletionRequest) -> dict[str, Any]:
        kwargs = dict(body.chat_template_kwargs or {})
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
        if reserved:
            raise APIError(400, f"chat_template_kwargs cannot set {reserved}", param="chat_template_kwargs",
                           code="invalid_value")
        if not isinstance(kwargs.get("enable_thinking", False), bool):
            raise APIError(400, "chat_template_kwargs.enable_thinking must be a boolean",
                           param="chat_template_kwargs.enable_thinking", code="invalid_value")
        kwargs.setdefault("enable_thinking", False)
        return kwargs

    async def _render(self, messages: list[dict], tools: list[dict] | None, kwargs: dict[str, Any]
                      ) -> tuple[list[int], str]:
        try:  # ids from the template itself: control tokens spelled in client text stay text (tokenizer.py)
            return await self.engine.encode_chat(messages, tools, **kwargs)
        except PromptTooLarge as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        except Exception as e:  # noqa: BLE001 - jinja TemplateError / TypeError from the template
            raise APIError(400, f"cannot render the chat template: {e}", param="messages",
                           code="invalid_value") from None


class ServingCompletion(OpenAIServing):
    """``POST /v1/completions``: one or more prompts (text or token ids), ``n`` choices each."""

    async def create(self, body: CompletionRequest, raw: dict[str, Any], request: HTTPRequest) -> Response:
        self.check_model(body.model)
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
        prompts = [await self._encode(x) for x in batch]
        flat, params, echo = [], [], []
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        for ids, source in zip(prompts, batch):
            params += self.sampling_params(body, max_tokens, len(ids), "prompt", body.n)
            flat += [ids] * body.n
            shown = (source if isinstance(source, str) else self.engine.tokenizer.decode(ids)) if body.echo else ""
            echo += [shown] * body.n
        gen = self.submit(flat, params)
        fmt = CompletionFormat(self.engine, flat, echo, prompt_tokens=sum(len(x) for x in prompts),
                               return_token_ids=body.return_token_ids)
        return await self.respond(request, body, fmt, gen)

    async def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            try:
                ids = await self.engine.encode(prompt)
            except PromptTooLarge as e:
                raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None
        else:
            ids = list(prompt)
            vocab = self.engine.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token ids out of range [0, {vocab}): {bad[:5]}",
                               param="prompt", code="invalid_value")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        return ids
