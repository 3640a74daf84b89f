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

Adding an endpoint that generates means a new :class:`Format` (and, for new per-token data, new fields on the
engine's ``Delta``), not a new loop.

Logprobs ride on the events: each ``Delta`` carries the :class:`~exaone_deploy.runtime.logprobs.TokenLogprob` of
its tokens (the float32 log-softmax of the raw logits the token was sampled from), the first ``Delta`` of a
request that scores its prompt carries the prompt's, and ``Done``'s result holds both lists; the formats turn
them into OpenAI's chat ``logprobs.content`` or the legacy completions object. Structured output
(``response_format``, a forcing ``tool_choice``) becomes llguidance grammar text in ``SamplingParams.grammar``,
compiled once here to answer a bad schema with 400, then once per choice by the scheduler's row state.
:class:`ServingTokenization` answers vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..runtime.grammar import GrammarConstraint, GrammarError, opens_reasoning
from ..runtime.logprobs import chat_logprobs, completion_logprobs, token_bytes
from ..runtime.sampling import SamplingError, SamplingParams
from ..text.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, StreamSplitter
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
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    DeltaToolCall,
    DetokenizeRequest,
    DetokenizeResponse,
    FunctionOut,
    NamedToolChoice,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    ToolCallOut,
    UsageInfo,
)

__all__ = [
    "CLIENT_GONE",
    "ChatChoice",
    "Format",
    "OpenAIServing",
    "ServingChat",
    "ServingCompletion",
    "ServingTokenization",
]

# nginx's code for "client closed the request": nobody reads it, it shows in logs and metrics
CLIENT_GONE = 499
_RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "documents", "add_generation_prompt", "tokenize", "chat_template"}
# reasoning_effort -> the chat template's enable_thinking (EXAONE 4 reasons or not; it has no budget levels)
_REASONING_EFFORT = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}


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
                out.append(
                    DeltaMessage(tool_calls=[DeltaToolCall(index=self.n_tool_calls, id=call.id, function=function)])
                )
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
        return AssistantMessage(
            content=content or (None if calls else ""), reasoning_content=reasoning or None, tool_calls=calls or None
        )


class ChatFormat(Format):
    chunk_type = ChatCompletionStreamResponse

    def __init__(
        self,
        engine: AsyncEngine,
        prompt: list[int],
        n: int,
        *,
        reasoning_opened: bool,
        parse_tools: bool,
        return_token_ids: bool,
        logprobs: bool = False,
    ):
        super().__init__(engine, "chatcmpl", len(prompt), return_token_ids)
        self.tokenizer = engine.tokenizer
        self.logprobs = logprobs
        self.prompt = prompt
        self.choices = [ChatChoice(reasoning_opened, parse_tools) for _ in range(n)]
        self.deltas: list[list[DeltaMessage]] = [[] for _ in range(n)]
        self.finished: list[ChatCompletionChoice | None] = [None] * n

    def opening(self):
        return [
            ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
            for i in range(len(self.choices))
        ]

    def _logprobs(self, entries) -> ChatLogprobs | None:
        return ChatLogprobs(content=chat_logprobs(self.tokenizer, entries)) if self.logprobs else None

    def delta(self, event):
        deltas = self.choices[event.index].feed(event.text)
        self.deltas[event.index] += deltas
        ids = self.token_ids(event.token_ids)
        lps = self._logprobs(event.logprobs) if event.logprobs else None
        out = []
        # token ids and logprobs of held-back text still go out (with an empty delta)
        for d in deltas or ([DeltaMessage()] if ids or lps else []):
            out.append(ChatCompletionStreamChoice(index=event.index, delta=d, token_ids=ids, logprobs=lps))
            ids = lps = None
        return out

    def done(self, event):
        i, choice = event.index, self.choices[event.index]
        deltas = choice.finish()
        self.deltas[i] += deltas
        reason = choice.finish_reason(event.result.finish_reason)
        self.finished[i] = ChatCompletionChoice(
            index=i,
            message=ChatChoice.message(self.deltas[i]),
            finish_reason=reason,
            logprobs=self._logprobs(event.result.logprobs),
            token_ids=event.result.token_ids if self.return_token_ids else None,
        )
        return [ChatCompletionStreamChoice(index=i, delta=d) for d in deltas] + [
            ChatCompletionStreamChoice(index=i, delta=DeltaMessage(), finish_reason=reason)
        ]

    def response(self):
        return ChatCompletionResponse(
            **self.head,
            choices=self.finished,
            usage=self.usage(),
            prompt_token_ids=self.prompt if self.return_token_ids else None,
        )


class CompletionFormat(Format):
    """Text completions. With ``logprobs``, each choice gets the legacy object; ``text_offset`` counts characters
    from the start of the prompt (OpenAI's convention), and an echoed prompt leads with its own scored tokens
    (the first one ``null``). Streamed, the echo waits for the prompt's logprobs (the first event)."""

    chunk_type = CompletionStreamResponse

    def __init__(
        self,
        engine: AsyncEngine,
        prompts: list[list[int]],
        echo: list[str],
        *,
        prompt_tokens: int,
        return_token_ids: bool,
        logprobs: bool = False,
        prompt_chars: list[int] | None = None,
    ):
        super().__init__(engine, "cmpl", prompt_tokens, return_token_ids)
        self.tokenizer = engine.tokenizer
        self.prompts, self.echo = prompts, echo  # one per choice
        self.finished: list[CompletionChoice | None] = [None] * len(prompts)
        self.logprobs = logprobs
        self.prompt_chars = list(prompt_chars or [0] * len(prompts))
        self.offset = list(self.prompt_chars)  # streaming: the text_offset of each choice's next token
        self.utf8 = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in prompts]
        self.echo_pending = [bool(e) and logprobs for e in echo]

    def _scored(self, entries, start: int) -> CompletionLogprobs:
        return CompletionLogprobs(**completion_logprobs(self.tokenizer, entries, start))

    def _echo(self, i: int, prompt_logprobs) -> list[CompletionChoice]:
        """Streaming: the echoed prompt with its logprobs, once, before the choice's first token."""
        if not self.echo_pending[i]:
            return []
        self.echo_pending[i] = False
        return [CompletionChoice(index=i, text=self.echo[i], logprobs=self._scored(prompt_logprobs or [], 0))]

    def opening(self):
        return [CompletionChoice(index=i, text=e) for i, e in enumerate(self.echo) if e and not self.logprobs]

    def delta(self, event):
        i = event.index
        head = self._echo(i, event.prompt_logprobs)
        ids = self.token_ids(event.token_ids)
        lps = None
        if self.logprobs and event.logprobs:
            lps = self._scored(event.logprobs, self.offset[i])
            self.offset[i] += sum(
                len(self.utf8[i].decode(token_bytes(self.tokenizer, e.token_id))) for e in event.logprobs
            )
        if not (event.text or ids or lps):
            return head
        return head + [CompletionChoice(index=i, text=event.text, token_ids=ids, logprobs=lps)]

    def done(self, event):
        i, result = event.index, event.result
        ids = self.return_token_ids
        head = self._echo(i, result.prompt_logprobs)
        lps = None
        if self.logprobs:
            echoed = bool(self.echo[i])
            entries = ((result.prompt_logprobs or []) if echoed else []) + (result.logprobs or [])
            lps = self._scored(entries, 0 if echoed else self.prompt_chars[i])
        self.finished[i] = CompletionChoice(
            index=i,
            text=self.echo[i] + result.text,
            logprobs=lps,
            finish_reason=result.finish_reason,
            prompt_token_ids=self.prompts[i] if ids else None,
            token_ids=result.token_ids if ids else None,
        )
        return head + [CompletionChoice(index=i, text="", finish_reason=result.finish_reason)]

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
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
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
            raise APIError(
                404,
                f"The model `{model}` does not exist (this server serves `{name}`).",
                param="model",
                code="model_not_found",
            )

    def sampling_params(
        self, body: SamplingRequest, max_tokens: int | None, prompt_len: int, param: str, n: int, **extra
    ) -> list[SamplingParams]:
        """``n`` parameter sets for one prompt (seeds ``seed + i``), ``max_tokens`` bounded by the context;
        ``extra``: further ``SamplingParams`` fields (logprobs, prompt_logprobs, grammar)."""
        context = self.engine.max_seq_len
        room = context - prompt_len
        if room < (0 if max_tokens == 0 else 1):
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, your "
                f"prompt has {prompt_len} tokens, which leaves no room for a completion.",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                f"for the completion). Reduce the prompt or max_tokens (at most {room} here).",
                param="max_tokens",
                code="context_length_exceeded",
            )
        unsupported = [
            (body.presence_penalty != 0, "presence_penalty"),
            (body.frequency_penalty != 0, "frequency_penalty"),
            (bool(body.logit_bias), "logit_bias"),
        ]
        for bad, name in unsupported:
            if bad:
                raise APIError(
                    400,
                    f"{name} is not supported by this server (use repetition_penalty)",
                    param=name,
                    code="unsupported_parameter",
                )
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 16 or any(not s for s in stop):
            raise APIError(400, "stop: at most 16 non-empty strings", param="stop", code="invalid_value")
        vocab = self.engine.vocab_size
        bad_ids = [t for t in body.stop_token_ids or () if not 0 <= t < vocab]
        if bad_ids:
            raise APIError(
                400,
                f"stop_token_ids out of range [0, {vocab}): {bad_ids[:5]}",
                param="stop_token_ids",
                code="invalid_value",
            )
        d = self.engine.defaults

        def pick(name, fallback):
            value = getattr(body, name)
            return value if value is not None else d.get(name, fallback)

        temperature = float(pick("temperature", 1.0))
        if temperature < 1e-5:  # as vLLM: below this, sampling is greedy (and 1/T would overflow)
            temperature = 0.0
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=float(pick("top_p", 1.0)),
            top_k=max(0, int(pick("top_k", 0))),
            min_p=float(pick("min_p", 0.0)),
            repetition_penalty=float(pick("repetition_penalty", 1.0)),
            seed=body.seed,
            stop=stop,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            **extra,
        )
        try:
            params.validate()
        except SamplingError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        return [dataclasses.replace(params, seed=None if params.seed is None else params.seed + i) for i in range(n)]

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
        _reject_combinations(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        if body.parallel_tool_calls is not None and not body.tools:
            raise APIError(
                400,
                "parallel_tool_calls is only allowed when tools are given",
                param="parallel_tool_calls",
                code="invalid_value",
            )
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
                raise APIError(
                    400,
                    f"tool_choice names a function that is not in tools: {choice.function.name!r}",
                    param="tool_choice",
                    code="invalid_value",
                )
        if choice is not None:
            kwargs["tool_choice"] = raw["tool_choice"]
        prompt, text = await self._render(self._messages(raw), tools, kwargs)
        reasoning = opens_reasoning(text)
        grammar = await asyncio.to_thread(
            self._grammar,
            raw.get("response_format"),
            tools,
            raw.get("tool_choice"),
            reasoning,
            body.parallel_tool_calls is not False,
        )
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling_params(
            body, max_tokens, len(prompt), "messages", body.n, logprobs=logprobs, grammar=grammar
        )
        gen = self.submit([prompt] * body.n, params)
        fmt = ChatFormat(
            self.engine,
            prompt,
            body.n,
            reasoning_opened=reasoning,
            parse_tools=bool(tools),
            return_token_ids=body.return_token_ids,
            logprobs=bool(body.logprobs),
        )
        return await self.respond(request, body, fmt, gen)

    def _grammar(
        self, response_format: dict | None, tools: list[dict] | None, tool_choice, reasoning: bool, parallel: bool
    ) -> str | None:
        """The llguidance grammar a request asks for (None: free text); a bad schema is a 400 here."""
        if tool_choice in ("auto", "none"):
            tool_choice = None
        if response_format is None and tool_choice is None:
            return None
        try:
            constraint = GrammarConstraint.from_request(
                self.engine.tokenizer,
                response_format,
                tools,
                tool_choice,
                vocab_size=self.engine.vocab_size,
                reasoning=reasoning,
                parallel_tool_calls=parallel,
            )
        except GrammarError as e:
            raise APIError(
                400, str(e), param="tool_choice" if tool_choice is not None else "response_format", code="invalid_value"
            ) from None
        except ImportError as e:
            raise APIError(400, str(e), param="response_format", code="unsupported_parameter") from None
        return constraint.grammar if constraint is not None else None

    @staticmethod
    def _messages(raw: dict[str, Any]) -> list[dict]:
        """The raw messages as the template takes them: unset fields dropped, ``developer`` as ``system``."""
        messages = []
        for m in raw["messages"]:
            m = {k: v for k, v in m.items() if v is not None}
            if m["role"] == "developer":
                m["role"] = "system"
            messages.append(m)
        return messages

    @staticmethod
    def _template_kwargs(body: ChatCompletionRequest | TokenizeRequest) -> dict[str, Any]:
        kwargs = dict(body.chat_template_kwargs or {})
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
        if reserved:
            raise APIError(
                400, f"chat_template_kwargs cannot set {reserved}", param="chat_template_kwargs", code="invalid_value"
            )
        if not isinstance(kwargs.get("enable_thinking", False), bool):
            raise APIError(
                400,
                "chat_template_kwargs.enable_thinking must be a boolean",
                param="chat_template_kwargs.enable_thinking",
                code="invalid_value",
            )
        effort = getattr(body, "reasoning_effort", None)
        if effort is not None:
            thinking = _REASONING_EFFORT[effort]
            if kwargs.get("enable_thinking", thinking) != thinking:
                raise APIError(
                    400,
                    f"reasoning_effort {effort!r} contradicts "
                    f"chat_template_kwargs.enable_thinking={kwargs['enable_thinking']}",
                    param="reasoning_effort",
                    code="invalid_value",
                )
            kwargs["enable_thinking"] = thinking
        kwargs.setdefault("enable_thinking", False)
        return kwargs

    async def _render(
        self, messages: list[dict], tools: list[dict] | None, kwargs: dict[str, Any]
    ) -> tuple[list[int], str]:
        try:  # ids from the template itself: control tokens spelled in client text stay text (tokenizer.py)
            return await self.engine.encode_chat(messages, tools, **kwargs)
        except PromptTooLarge as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        except Exception as e:  # noqa: BLE001 - jinja TemplateError / TypeError from the template
            raise APIError(
                400, f"cannot render the chat template: {e}", param="messages", code="invalid_value"
            ) from None


def _reject_combinations(body: SamplingRequest) -> None:
    """Fields that OpenAI refuses in combination: refused here too (400), not silently ignored."""
    if body.stream_options is not None and not body.stream:
        raise APIError(
            400, "stream_options is only allowed when stream is true", param="stream_options", code="invalid_value"
        )


class ServingCompletion(OpenAIServing):
    """``POST /v1/completions``: one or more prompts (text or token ids), ``n`` choices each."""

    async def create(self, body: CompletionRequest, raw: dict[str, Any], request: HTTPRequest) -> Response:
        self.check_model(body.model)
        _reject_combinations(body)
        for name, ok in (("suffix", body.suffix is None), ("best_of", body.best_of in (None, 1, body.n))):
            if not ok:
                raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(
                400,
                "max_tokens 0 needs echo: true (it scores the prompt only)",
                param="max_tokens",
                code="invalid_value",
            )
        p = body.prompt
        batch = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not batch:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        if len(batch) * body.n > MAX_CHOICES:
            raise APIError(
                400, f"at most {MAX_CHOICES} choices (prompts x n) per request", param="n", code="invalid_value"
            )
        prompts = [await self._encode(x) for x in batch]
        flat, params, echo, chars = [], [], [], []
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        # echo with logprobs scores the prompt (max_tokens 0: only that; without logprobs, nothing to score)
        scores = body.echo and (body.logprobs is not None or max_tokens == 0)
        extra = {"logprobs": body.logprobs, "prompt_logprobs": (body.logprobs or 0) if scores else None}
        for ids, source in zip(prompts, batch):
            params += self.sampling_params(body, max_tokens, len(ids), "prompt", body.n, **extra)
            flat += [ids] * body.n
            text = source if isinstance(source, str) else self.engine.tokenizer.decode(ids)
            echo += [text if body.echo else ""] * body.n
            chars += [len(text)] * body.n
        gen = self.submit(flat, params)
        fmt = CompletionFormat(
            self.engine,
            flat,
            echo,
            prompt_tokens=sum(len(x) for x in prompts),
            return_token_ids=body.return_token_ids,
            logprobs=body.logprobs is not None,
            prompt_chars=chars,
        )
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
                raise APIError(
                    400, f"prompt token ids out of range [0, {vocab}): {bad[:5]}", param="prompt", code="invalid_value"
                )
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        return ids


class ServingTokenization(ServingChat):
    """vLLM's tokenizer endpoints (what lm-eval's ``tokenizer_backend=remote`` calls): ``POST /tokenize`` (text,
    or chat messages rendered exactly as the chat endpoint renders them), ``POST /detokenize`` and
    ``GET /tokenizer_info``."""

    async def tokenize(self, body: TokenizeRequest, raw: dict[str, Any]) -> TokenizeResponse:
        self.check_model(body.model)
        tokenizer = self.engine.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt", code="invalid_value")
        if body.prompt is not None:
            add = True if body.add_special_tokens is None else body.add_special_tokens
            self.engine.check_prompt_bytes(body.prompt)
            ids = await asyncio.to_thread(tokenizer.encode, body.prompt, add)
        else:
            kwargs = self._template_kwargs(body)
            kwargs["add_generation_prompt"] = body.add_generation_prompt
            tools = raw.get("tools") or None
            ids, _ = await self._render(self._messages(raw), tools, kwargs)
            if body.add_special_tokens and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
                ids = [tokenizer.bos_id] + ids
        strs = [tokenizer.id_to_token(t) or "" for t in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.max_seq_len, tokens=ids, token_strs=strs)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        vocab = self.engine.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens out of range [0, {vocab}): {bad[:5]}", param="tokens", code="invalid_value")
        return DetokenizeResponse(prompt=await asyncio.to_thread(self.engine.tokenizer.decode, body.tokens))

    def info(self) -> TokenizerInfoResponse:
        tokenizer = self.engine.tokenizer
        template = tokenizer.chat_template
        return TokenizerInfoResponse(
            tokenizer_class="PreTrainedTokenizerFast",
            **tokenizer.special_tokens,
            chat_template=template if isinstance(template, str) else (template or {}).get("default"),
            model_max_length=self.engine.max_seq_len,
            vocab_size=tokenizer.vocab_size,
            add_bos_token=False,
            add_eos_token=False,
        )
