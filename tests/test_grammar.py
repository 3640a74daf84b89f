"""Grammar-constrained decoding (runtime.grammar) on the bundled tiny tokenizer, driven by random logits.

Random logits are a model that knows no JSON: whatever the constraint lets through is sampled at
temperature 1, so every output below is the grammar's doing. Strings carry maxLength because a random
model closes a string only when it happens to draw a quote (about 1 in 1,500 tokens here).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from exaone_deploy.text.chat import parse_assistant_output
from exaone_deploy.text.tokenizer import Tokenizer

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from exaone_deploy.runtime.grammar import (
    GrammarConstraint,
    GrammarError,
    apply_batch,
    opens_reasoning,
    require_llguidance,
)

TINY = Path(__file__).resolve().parent.parent / "exaone_deploy" / "assets" / "tiny"

NAME = {"type": "string", "maxLength": 8}
SCHEMA = {
    "type": "object",
    "properties": {
        "name": NAME,
        "role": {"enum": ["admin", "user", "guest"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {
            "type": "object",
            "properties": {
                "city": NAME,
                "geo": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"],
                    "additionalProperties": False,
                },
            },
            "required": ["city", "geo"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "role", "address", "tags"],
    "additionalProperties": False,
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(TINY)


def _sample(tok, constraint, rng, max_tokens=600, force=None):
    """Sample at temperature 1 from random logits through `constraint` until EOS; returns (ids, ended).

    `force(step, ids, logits)` may return a token id to take instead of sampling. Checks on the way that EOS
    is allowed exactly when the constraint says the output is complete.
    """
    eos = tok.eos_ids[0]
    ids = []
    for step in range(max_tokens):
        logits = rng.standard_normal(constraint.vocab_size).astype(np.float32)
        constraint.apply(logits)
        assert np.isfinite(logits[eos]) == constraint.is_complete(), tok.decode(ids)
        forced = force(step, ids, logits) if force else None
        if forced is not None:
            token = forced
        else:
            p = np.exp(logits - logits.max())
            token = int(rng.choice(len(p), p=p / p.sum()))
        constraint.accept(token)
        if token == eos:
            assert constraint.is_finished()
            return ids, True
        ids.append(token)
    return ids, False


def test_json_schema_50_random_samples_validate(tok):
    rng = np.random.default_rng(0)
    constraint = GrammarConstraint.json_schema(tok, SCHEMA)
    for _ in range(50):
        constraint.reset()
        ids, ended = _sample(tok, constraint, rng)
        assert ended, tok.decode(ids)
        jsonschema.validate(json.loads(tok.decode(ids)), SCHEMA)


def test_json_object(tok):
    constraint = GrammarConstraint.from_request(tok, response_format={"type": "json_object"})
    first = np.flatnonzero(constraint.allowed_mask())
    assert first.size and all(tok.decode([i]).startswith("{") for i in first)  # an object, not any JSON value
    for token in tok.encode('{"a": [1, {"b": null}], "c": "d"}'):
        constraint.accept(token)
    assert constraint.is_finished()


def test_eos_only_when_complete(tok):
    constraint = GrammarConstraint.json_schema(
        tok,
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False},
    )
    eos = tok.eos_ids[0]
    text = '{"n": 42}'
    for i, token in enumerate(tok.encode(text)):
        assert not constraint.allowed_mask()[eos], text[: i + 1]
        assert not constraint.is_finished()
        constraint.accept(token)
    mask = constraint.allowed_mask()
    assert mask[eos] and mask.sum() == 1 and constraint.is_finished()
    with pytest.raises(ValueError, match="not allowed"):
        GrammarConstraint.json_object(tok).accept(tok.encode("x")[0])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_calls_parse_and_validate(tok, tool_choice):
    rng = np.random.default_rng(2)
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    constraint = GrammarConstraint.from_request(tok, tools=TOOLS, tool_choice=tool_choice)
    names = set()
    for _ in range(20):
        constraint.reset()
        ids, ended = _sample(tok, constraint, rng)
        assert ended
        out = parse_assistant_output(tok.decode(ids))
        assert out.errors == [] and out.content == "" and out.tool_calls, tok.decode(ids)
        for call in out.tool_calls:
            jsonschema.validate(json.loads(call.arguments), parameters[call.name])
            names.add(call.name)
    assert names == ({"get_weather", "add"} if tool_choice == "required" else {"get_weather"})
    # The tags are the tokenizer's single tokens, as the chat template's text encodes.
    assert tok.token_to_id("<tool_call>") in ids


def test_reasoning_is_free_then_json(tok):
    rng = np.random.default_rng(3)
    close = tok.token_to_id("</think>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=True, tokenize=False)
    assert opens_reasoning(prompt)
    assert not opens_reasoning(tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False))
    constraint = GrammarConstraint.from_request(
        tok, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}, reasoning=True
    )
    for n in range(10):
        constraint.reset()
        mask = constraint.allowed_mask()
        # Inside the thought: every plain-text token (no special ones, no EOS) and no JSON forcing.
        assert not mask[tok.eos_ids[0]] and mask[close]
        assert mask[tok.encode(" the")[0]] and mask[tok.encode("{")[0]]
        assert mask.sum() > 0.9 * tok.vocab_size

        # </think> is allowed from step 5 + n on, once any multi-byte character in the thought is complete.
        def end_thought(step, ids, logits, n=n):
            return close if step >= 5 + n and logits[close] > -np.inf else None

        ids, ended = _sample(tok, constraint, rng, force=end_thought)
        assert ended and close in ids
        out = parse_assistant_output(tok.decode(ids), reasoning_opened=True)
        assert out.errors == [] and out.reasoning is not None
        assert "</think>" not in out.reasoning
        jsonschema.validate(json.loads(out.content), SCHEMA)


def test_apply_batch_mixes_free_and_constrained_rows(tok):
    rng = np.random.default_rng(4)
    a = GrammarConstraint.json_schema(tok, SCHEMA)
    b = GrammarConstraint.from_request(tok, tools=TOOLS, tool_choice="required")
    for token in tok.encode('{"name": "x'):
        a.accept(token)
    logits = rng.standard_normal((3, tok.vocab_size)).astype(np.float32)
    expected = logits.copy()
    a.apply(expected[0])
    b.apply(expected[2])
    apply_batch(logits, [a, None, b])
    np.testing.assert_array_equal(logits, expected)
    assert np.isfinite(logits[1]).all()
    assert np.isfinite(expected[2]).sum() == 1  # only <tool_call> can open a forced tool call
    with pytest.raises(ValueError, match="constraints"):
        apply_batch(logits, [a, None])


def test_wider_logits_than_tokenizer(tok):
    constraint = GrammarConstraint.json_object(tok, vocab_size=tok.vocab_size + 64)
    logits = np.zeros((1, tok.vocab_size + 64), np.float32)
    apply_batch(logits, [constraint])
    assert np.isneginf(logits[0, tok.vocab_size :]).all()
    with pytest.raises(ValueError, match="smaller"):
        GrammarConstraint.json_object(tok, vocab_size=tok.vocab_size - 1)


def test_request_errors(tok):
    assert GrammarConstraint.from_request(tok) is None
    free = GrammarConstraint.from_request(tok, response_format={"type": "text"}, tools=TOOLS, tool_choice="auto")
    assert free is None
    with pytest.raises(GrammarError, match="not one of"):
        GrammarConstraint.from_request(tok, response_format={"type": "yaml"})
    with pytest.raises(GrammarError, match="json_schema"):
        GrammarConstraint.from_request(tok, response_format={"type": "json_schema", "schema": {}})
    with pytest.raises(GrammarError, match="not among the tools"):
        GrammarConstraint.from_request(tok, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}})
    with pytest.raises(GrammarError, match="at least one tool"):
        GrammarConstraint.from_request(tok, tool_choice="required")
    with pytest.raises(GrammarError, match="invalid grammar"):
        GrammarConstraint.json_schema(tok, {"type": "object", "properties": {"a": {"type": "no-such-type"}}})


def test_missing_engine_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(ImportError, match=r"exaone-deploy\[grammar\]"):
        require_llguidance()


def test_tags_as_text_when_the_tokenizer_has_no_such_tokens(tok):
    import tokenizers

    spec = json.loads(tok.backend.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["special"]]  # drop <think>, <tool_call>, ...
    plain = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), dict(tok.special_tokens), eos_ids=tok.eos_ids)
    assert plain.token_to_id("</think>") is None and plain.token_to_id("<tool_call>") is None
    text = 'hmm {"x"} </thin</think>\n\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    constraint = GrammarConstraint.tool_calls(plain, TOOLS, vocab_size=tok.vocab_size, reasoning=True)
    for token in plain.encode(text):
        assert not constraint.is_complete()
        constraint.accept(token)
    assert constraint.is_complete() and not constraint.is_finished()  # another call may follow, or EOS
    out = parse_assistant_output(text, reasoning_opened=True)
    assert out.reasoning == 'hmm {"x"} </thin' and out.tool_calls[0].name == "add"
