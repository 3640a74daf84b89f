"""Chat prompts in and assistant turns out, without torch or transformers.

`render_chat_template` renders a Hugging Face chat template the way transformers'
`apply_chat_template` does (same Jinja sandbox, options, filters and globals, same message
normalisation), so prompts built here match the reference token for token.

`parse_assistant_output` and `StreamSplitter` take the text a model generated and split it into
reasoning (`<think>...</think>`), content and tool calls (`<tool_call>{json}</tool_call>`), the
EXAONE 4 output format. Both use the same state machine, so a streamed reply splits exactly like
the whole reply would.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

# Older names for a message's reasoning; transformers copies them to `reasoning_content` (and `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant spans with it; we just render the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers replaces Jinja's tojson (which HTML-escapes) with plain json.dumps and these defaults.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` inside templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes, as in transformers."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in transformers' sandboxed environment (cached per template string)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """Rebuild `value` from plain JSON-like types, as transformers does before the sandbox sees it."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models, e.g. OpenAI SDK messages
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages as plain dicts, keys whose value is None dropped, reasoning aliases filled in."""
    out = []
    for message in _plain(list(getattr(messages, "messages", messages))):
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages must be dicts, dataclasses or pydantic models, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat_template(
    template: str,
    messages: Any,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    documents: list[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
    """Render `messages` with a chat template exactly as transformers' `apply_chat_template(tokenize=False)`.

    `tools` are JSON-schema dicts (OpenAI `{"type": "function", "function": {...}}` or bare); `kwargs`
    become template variables, e.g. `enable_thinking=True` or the special tokens (`bos_token=...`),
    which `Tokenizer.apply_chat_template` passes for you. Note the default `add_generation_prompt=True`
    (transformers defaults to False).
    """
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, Mapping):
                raise TypeError(f"Tools must be JSON-schema dicts, got {type(tool).__name__}")
    if documents is not None:
        for document in documents:
            if not isinstance(document, Mapping):
                raise TypeError("Documents must be a list of dicts with 'title' and 'text' keys")
    compiled = compile_chat_template(template)
    return compiled.render(
        messages=_normalize_messages(messages),
        tools=_plain(tools),
        documents=_plain(documents),
        add_generation_prompt=add_generation_prompt,
        **_plain(kwargs),
    )


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ToolCall:
    """One function call, shaped like OpenAI's: `arguments` is a JSON string."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass
class AssistantOutput:
    """A generated assistant turn split into its parts.

    `reasoning` is None when the turn had no (or an empty) `<think>` block. `content` is the text
    outside reasoning and well-formed tool calls, stripped; a malformed tool-call block stays in
    `content` verbatim and is described in `errors`.
    """

    reasoning: str | None
    content: str
    tool_calls: list[ToolCall]
    errors: list[str]


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_call(body: str) -> ToolCall:
    """Parse the JSON between `<tool_call>` and `</tool_call>`; raise ValueError saying what is wrong."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"tool call is not valid JSON ({e}): {body.strip()[:200]!r}") from None
    if not isinstance(call, dict):
        raise ValueError(f"tool call is not a JSON object: {body.strip()[:200]!r}")
    name = call.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool call has no function name: {body.strip()[:200]!r}")
    arguments = call.get("arguments", call.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=new_tool_call_id(), name=name, arguments=arguments)


Kind = Literal["reasoning", "content", "tool_call"]


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (it may become the tag)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class StreamSplitter:
    """Split streamed model text into reasoning, content and tool calls, one delta at a time.

    `feed(delta)` returns `(kind, text)` pieces, kind in {"reasoning", "content", "tool_call"}; call
    `finish()` at the end of generation for the rest. Tag text is never emitted, not even partially:
    text that may be the start of a tag is held back until it is decided. A "tool_call" piece is the
    complete JSON body of a well-formed `<tool_call>` block (parsed into `tool_calls` as well); a
    malformed block is emitted as content, verbatim, and described in `errors`. Reasoning and content
    come out stripped of leading and trailing whitespace, as `parse_assistant_output` returns them.

    `reasoning_opened=True` means the prompt already opened `<think>` (EXAONE's reasoning-mode
    generation prompt), so the text starts inside the reasoning. Otherwise reasoning is recognised
    only when the text itself starts with `<think>`.
    """

    def __init__(self, reasoning_opened: bool = False) -> None:
        self._state: Literal["start", "reasoning", "content", "tool_call"] = (
            "reasoning" if reasoning_opened else "start"
        )
        self._buf = ""  # undecided text
        self._section_started = False  # has the current reasoning/content section emitted anything?
        self._held_ws = ""  # trailing whitespace of the section, emitted only if more text follows
        self.tool_calls: list[ToolCall] = []
        self.errors: list[str] = []

    def feed(self, delta: str) -> list[tuple[Kind, str]]:
        self._buf += delta
        out: list[tuple[Kind, str]] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[tuple[Kind, str]]:
        out: list[tuple[Kind, str]] = []
        while self._step(out):
            pass
        buf, self._buf = self._buf, ""
        if self._state == "reasoning":
            self.errors.append("reasoning was not closed by </think>")
            self._emit(out, "reasoning", buf)
        elif self._state == "tool_call":
            self.errors.append("tool call was not closed by </tool_call>")
            self._emit(out, "content", TOOL_CALL_OPEN + buf)
        else:
            self._emit(out, "content", buf)
        self._held_ws = ""
        return out

    def _step(self, out: list[tuple[Kind, str]]) -> bool:
        """Consume what can be decided from the buffer; True if the state changed (step again)."""
        buf = self._buf
        if self._state == "start":
            stripped = buf.lstrip()
            if stripped.startswith(THINK_OPEN):
                self._buf = stripped[len(THINK_OPEN) :]
                self._state = "reasoning"
                return True
            if not stripped or THINK_OPEN.startswith(stripped):
                return False  # could still become <think>
            self._state = "content"
            return True
        if self._state == "tool_call":
            end = buf.find(TOOL_CALL_CLOSE)
            if end < 0:
                return False
            body, self._buf = buf[:end], buf[end + len(TOOL_CALL_CLOSE) :]
            self._state = "content"
            try:
                self.tool_calls.append(parse_tool_call(body))
            except ValueError as e:
                self.errors.append(str(e))
                self._emit(out, "content", TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE)
            else:
                out.append(("tool_call", body))
            return True
        kind: Kind = self._state
        tag = THINK_CLOSE if kind == "reasoning" else TOOL_CALL_OPEN
        at = buf.find(tag)
        if at >= 0:
            self._emit(out, kind, buf[:at])
            self._buf = buf[at + len(tag) :]
            if kind == "reasoning":
                self._state = "content"
                self._section_started, self._held_ws = False, ""
            else:
                self._state = "tool_call"
            return True
        keep = _partial_tag_len(buf, tag)
        self._emit(out, kind, buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]
        return False

    def _emit(self, out: list[tuple[Kind, str]], kind: Kind, text: str) -> None:
        if not self._section_started:
            text = text.lstrip()
        text = self._held_ws + text
        core = text.rstrip()
        self._held_ws = text[len(core) :]
        if core:
            out.append((kind, core))
            self._section_started = True


def parse_assistant_output(text: str, reasoning_opened: bool = False) -> AssistantOutput:
    """Split one complete generated assistant turn into reasoning, content and tool calls.

    Reasoning is the text before `</think>` (a leading `<think>` is dropped): this covers both the
    text opening its own `<think>` and a prompt that already opened it (the text then has only
    `</think>`). Pass `reasoning_opened=True` when the prompt opened `<think>`, so that a reply cut
    off before `</think>` counts as reasoning. Problems (malformed tool-call JSON, a call without a
    name, unclosed tags) are reported in `errors`, never raised.
    """
    if not reasoning_opened and THINK_CLOSE in text and not text.lstrip().startswith(THINK_OPEN):
        reasoning_opened = True
    splitter = StreamSplitter(reasoning_opened=reasoning_opened)
    pieces = splitter.feed(text) + splitter.finish()
    reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
    content = "".join(t for kind, t in pieces if kind == "content")
    return AssistantOutput(
        reasoning=reasoning or None,
        content=content,
        tool_calls=splitter.tool_calls,
        errors=splitter.errors,
    )
