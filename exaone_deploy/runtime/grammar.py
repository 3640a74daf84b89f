"""Grammar-constrained decoding: per-request next-token masks from llguidance.

A `GrammarConstraint` follows one request's output and says which tokens may come next, so that the
sampled text always matches a grammar: a JSON schema (`response_format` `json_schema`), any JSON object
(`json_object`), or EXAONE 4 tool calls, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (one or
more, a newline apart, as the chat template writes them) whose arguments satisfy the called tool's JSON
schema (`tool_choice: "required"`: any of the tools; a named function: that one). Build one per request
with `GrammarConstraint.from_request(...)` (None when the request asks for no constraint), then per step::

    apply_batch(logits, constraints)      # (B, V) logits; rows whose constraint is None stay free
    ...sample token_b for each row...
    constraint.accept(token_b)            # for each constrained row
    constraint.is_finished()              # only EOS can follow: end the request

Masks are computed per request, so constrained and free requests share a batch. The rows' masks of one
step are computed one after another (each without the GIL): a JSON mask over 102,400 tokens takes
~5-30 us, and llguidance's thread-pool executor measured slower than that at batch 8 on a loaded 2-core
CPU (p50 1.9 ms against 0.1 ms: benchmarks/grammar.py, llguidance vs llguidance-seq).

Reasoning composes: with `reasoning=True` (the prompt opened `<think>`: see `opens_reasoning`) any text is
allowed until `</think>`, then optional whitespace, then the grammar. The switch is part of the grammar
(llguidance Lark: a free-text terminal that cannot contain `</think>`, then the `</think>` token), so the
wrapper keeps no state machine of its own; the thought may hold any text but special tokens (EOS included).
EOS is allowed only when the grammar is complete. JSON is spaced as json.dumps and the chat template
write it (", " and ": ", no other whitespace): free whitespace lets an unsure model write newlines forever.

Costs: llguidance's token index is built once per tokenizer (~0.4 s at 102,400 tokens, cached); a grammar
is compiled per request (~1-5 ms for a nested schema).

Tags the tokenizer has as single tokens (`<tool_call>`, `</think>`) are required as those tokens, the way
the chat template's text encodes; a tokenizer without them gets the tags as text.

The engine: llguidance (MIT; one 3 MB abi3 wheel with no dependencies, for Linux x86-64/aarch64, macOS and
Windows), in the `grammar` extra (also pulled in by `serve`). Rejected: xgrammar (Apache-2.0; its wheel
depends on torch, transformers and triton, which the runtime must not need; on this CPU its masks are a few
microseconds faster per step, its JSON-schema compile is ~15x slower: see benchmarks/grammar.py); a
hand-written JSON state machine (the issue rules it out: JSON Schema is too large to get right by hand).
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ExaoneDeployError
from ..text.chat import THINK_CLOSE, THINK_OPEN, TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from ..text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = [
    "GrammarConstraint",
    "GrammarError",
    "apply_batch",
    "apply_bitmask",
    "opens_reasoning",
    "require_llguidance",
]

EXTRA = "grammar"
_ENGINE_HINT = f"pip install 'exaone-deploy[{EXTRA}]'"


class GrammarError(ExaoneDeployError, ValueError):
    """A request's schema, response_format or tool_choice cannot be turned into a grammar (a client error)."""


def require_llguidance() -> Any:
    """The llguidance module, or an ImportError naming the extra that installs it."""
    try:
        import llguidance
        import llguidance.numpy  # the bitmask helpers
    except ImportError as e:
        raise ImportError(
            f"structured output (response_format, tool_choice) needs the llguidance package: {_ENGINE_HINT}"
        ) from e
    return llguidance


# ---- per-tokenizer engine state ------------------------------------------------------------------

_ENGINE_LOCK = threading.Lock()
_LL_TOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, dict[int, Any]] = weakref.WeakKeyDictionary()


def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> Any:
    """llguidance's token index of `tokenizer` with masks `vocab_size` wide (built once: ~0.4 s at 102k tokens)."""
    llguidance = require_llguidance()
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens")
    if not tokenizer.eos_ids:
        raise ValueError("the tokenizer has no EOS id (generation_config.json eos_token_id or eos_token)")
    with _ENGINE_LOCK:
        per_size = _LL_TOKENIZERS.setdefault(tokenizer, {})
        if vocab_size not in per_size:
            # tokenizer.json as the backend holds it (with the added tokens from tokenizer_config.json).
            per_size[vocab_size] = llguidance.LLTokenizer(
                tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=list(tokenizer.eos_ids)
            )
            log.debug("llguidance token index built: %d ids, eos %s", vocab_size, tokenizer.eos_ids)
        return per_size[vocab_size]


# ---- grammars (llguidance Lark) ------------------------------------------------------------------


def _tag(tokenizer: Tokenizer, text: str) -> str:
    """A Lark item for a tag: its token when the tokenizer has one (llguidance counts added tokens as special)."""
    token_id = tokenizer.token_to_id(text)
    return f"<[{token_id}]>" if token_id is not None else json.dumps(text)


JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _json_item(schema: dict[str, Any]) -> str:
    """`%json {...}` with our formatting options (a schema's own "x-guidance" options win)."""
    return "%json " + json.dumps({"x-guidance": JSON_OPTIONS, **schema}, ensure_ascii=False)


def _with_reasoning(tokenizer: Tokenizer, body: str) -> str:
    """`start: <free text without </think>> </think> whitespace body`, or `start: body`."""
    close_id = tokenizer.token_to_id(THINK_CLOSE)
    if close_id is None:  # the tag is plain text: a lazy terminal ends at its first occurrence
        thought = "thought[lazy]: /(?s:.*)<\\/think>/"
    else:
        thought = f"thought: THOUGHT <[{close_id}]>\nTHOUGHT: /(?s:.*)/ & ~/(?s:.*)<\\/think>(?s:.*)/"
    return f"start: thought WS body\n{thought}\nWS: /[ \\t\\r\\n]*/\n{body}"


def _tool_schema(tool: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, schema of `{"name": name, "arguments": {...}}`) for an OpenAI tool or a bare function."""
    function = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise GrammarError(f"a tool must be {{'type': 'function', 'function': {{'name': ...}}}}, got {tool!r}"[:300])
    parameters = function.get("parameters") or {"type": "object"}
    if not isinstance(parameters, dict):
        raise GrammarError(f"tool {function['name']!r}: parameters must be a JSON schema object")
    schema = {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    return function["name"], schema


# ---- the constraint ------------------------------------------------------------------------------


class GrammarConstraint:
    """One request's grammar state over token ids: masks, accepted tokens, completion.

    `vocab_size` is the width of the model's logits (may exceed the tokenizer's; the extra ids are never
    allowed); it defaults to the tokenizer's. Raises GrammarError when the grammar is invalid.
    """

    def __init__(self, tokenizer: Tokenizer, grammar: str, vocab_size: int | None = None) -> None:
        llguidance = require_llguidance()
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.eos_ids = list(tokenizer.eos_ids)
        self.grammar = grammar
        self._matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, self.vocab_size), grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"invalid grammar: {self._matcher.get_error().splitlines()[0]}")
        self._bitmask = np.zeros((1, (self.vocab_size + 31) // 32), dtype=np.int32)

    # -- constructors --

    @classmethod
    def json_schema(
        cls, tokenizer: Tokenizer, schema: dict[str, Any], vocab_size: int | None = None, reasoning: bool = False
    ) -> GrammarConstraint:
        """Output is one JSON value valid under `schema`, properties in the schema's order, spaced like json.dumps."""
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        body = f"body: {_json_item(schema)}"
        return cls(tokenizer, _with_reasoning(tokenizer, body) if reasoning else f"start: body\n{body}", vocab_size)

    @classmethod
    def json_object(
        cls, tokenizer: Tokenizer, vocab_size: int | None = None, reasoning: bool = False
    ) -> GrammarConstraint:
        """Output is one JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return cls.json_schema(tokenizer, {"type": "object"}, vocab_size, reasoning)

    @classmethod
    def tool_calls(
        cls,
        tokenizer: Tokenizer,
        tools: Sequence[dict[str, Any]],
        tool_choice: str | dict[str, Any] = "required",
        vocab_size: int | None = None,
        reasoning: bool = False,
        parallel: bool = True,
    ) -> GrammarConstraint:
        """Output is one or more `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, newline-separated
        (exactly one when not `parallel`: OpenAI's `parallel_tool_calls: false`).

        `tool_choice` "required": each call is to any of `tools`; `{"type": "function", "function": {"name":
        n}}`: to tool `n` only. Arguments satisfy the tool's `parameters` schema.
        """
        schemas = dict(_tool_schema(tool) for tool in tools)
        if not schemas:
            raise GrammarError("tool_choice needs at least one tool in 'tools'")
        if isinstance(tool_choice, dict):
            name = (tool_choice.get("function") or {}).get("name")
            if name not in schemas:
                raise GrammarError(f"tool_choice names function {name!r}, which is not among the tools")
            schemas = {name: schemas[name]}
        elif tool_choice != "required":
            raise GrammarError(f"tool_choice {tool_choice!r} constrains nothing: 'required' or a named function")
        calls = list(schemas.values())
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        open_tag, close_tag = _tag(tokenizer, TOOL_CALL_OPEN), _tag(tokenizer, TOOL_CALL_CLOSE)
        calls = 'call ("\\n" call)*' if parallel else "call"
        body = f"body: {calls}\ncall: {open_tag} {_json_item(schema)} {close_tag}"
        return cls(tokenizer, _with_reasoning(tokenizer, body) if reasoning else f"start: body\n{body}", vocab_size)

    @classmethod
    def from_request(
        cls,
        tokenizer: Tokenizer,
        response_format: dict[str, Any] | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        vocab_size: int | None = None,
        reasoning: bool = False,
        parallel_tool_calls: bool = True,
    ) -> GrammarConstraint | None:
        """The constraint an OpenAI chat request asks for, or None (free text).

        A forcing `tool_choice` ("required" or a named function) wins over `response_format`, as the tool
        call is then the whole answer; "auto"/"none"/absent leave `response_format` in charge.
        """
        if tool_choice is not None and tool_choice not in ("auto", "none"):
            return cls.tool_calls(tokenizer, tools or [], tool_choice, vocab_size, reasoning, parallel_tool_calls)
        if response_format is None:
            return None
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object(tokenizer, vocab_size, reasoning)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise GrammarError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
            return cls.json_schema(tokenizer, spec["schema"], vocab_size, reasoning)
        raise GrammarError(f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'")

    # -- decoding --

    def fill_bitmask(self, out: np.ndarray) -> None:
        """Write the next-token mask into `out`, int32 (ceil(V/32),): bit i of word i//32 set = id i allowed."""
        import llguidance.numpy as llnp

        llnp.fill_next_token_bitmask(self._matcher, out.reshape(1, -1), 0)
        self._raise_if_error()

    def allowed_mask(self) -> np.ndarray:
        """The next-token mask as bool (V,)."""
        self.fill_bitmask(self._bitmask[0])
        return np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: self.vocab_size].view(bool)

    def apply(self, logits_row: np.ndarray) -> None:
        """Set the logits of the disallowed next tokens to -inf, in place."""
        self.fill_bitmask(self._bitmask[0])
        apply_bitmask(logits_row.reshape(1, -1), self._bitmask)

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token; ValueError if the grammar does not allow it."""
        if not self._matcher.consume_token(int(token_id)):
            raise ValueError(f"token {token_id} is not allowed here: {self._matcher.get_error().splitlines()[0]}")

    def is_complete(self) -> bool:
        """The output so far matches the whole grammar: EOS is allowed now (more may still be allowed)."""
        return self._matcher.is_accepting()

    def is_finished(self) -> bool:
        """Nothing but EOS can follow (or EOS was accepted): the request should end."""
        return self._matcher.is_stopped()

    def reset(self) -> None:
        """Back to the start, as if no token had been accepted."""
        self._matcher.reset()

    def _raise_if_error(self) -> None:
        if self._matcher.is_error():
            raise RuntimeError(f"grammar matcher failed: {self._matcher.get_error().splitlines()[0]}")


def apply_bitmask(logits: np.ndarray, bitmask: np.ndarray) -> None:
    """Set `logits[b, i]` to -inf where bit i of `bitmask[b]` is clear; (B, V) logits, (B, ceil(V/32)) int32."""
    vocab = logits.shape[-1]
    disallowed = np.unpackbits(~bitmask.view(np.uint8), axis=-1, bitorder="little")[:, :vocab].view(bool)
    np.copyto(logits, -np.inf, where=disallowed)


def apply_batch(logits: np.ndarray, constraints: Sequence[GrammarConstraint | None]) -> None:
    """Mask the rows of (B, V) `logits` in place, each by its constraint; None rows stay untouched."""
    rows = [b for b, c in enumerate(constraints) if c is not None]
    if len(constraints) != logits.shape[0]:
        raise ValueError(f"{len(constraints)} constraints for {logits.shape[0]} logits rows")
    if not rows:
        return
    bitmask = np.zeros((len(rows), (logits.shape[-1] + 31) // 32), dtype=np.int32)
    for k, b in enumerate(rows):
        if constraints[b].vocab_size != logits.shape[-1]:
            width = constraints[b].vocab_size
            raise ValueError(f"row {b}: the constraint masks {width} ids, the logits have {logits.shape[-1]}")
        constraints[b].fill_bitmask(bitmask[k])
    if len(rows) == logits.shape[0]:
        apply_bitmask(logits, bitmask)
    else:
        view = logits[rows]
        apply_bitmask(view, bitmask)
        logits[rows] = view


def opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt leaves a `<think>` block open (reasoning mode: the grammar starts after it)."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)
