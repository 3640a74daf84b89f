"""Logprobs (runtime.logprobs): float32 log-softmax against a float64 reference, top-k order, OpenAI shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exaone_deploy.runtime.logprobs import (
    TokenLogprob,
    chat_logprobs,
    completion_logprobs,
    log_softmax,
    prompt_logprobs,
    token_bytes,
    token_logprobs,
    token_text,
    top_logprobs,
)
from exaone_deploy.text.tokenizer import Tokenizer

TINY = Path(__file__).resolve().parent.parent / "exaone_deploy" / "assets" / "tiny"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(TINY)


def _reference(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_log_softmax_matches_float64(dtype):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 102400)) * 4 + 10).astype(dtype)
    ours = log_softmax(logits)
    assert ours.dtype == np.float32
    # 1e-6 plus float32's own resolution at the value (a float32 result cannot be nearer than half an ulp).
    np.testing.assert_allclose(ours, _reference(logits), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.exp(ours.astype(np.float64)).sum(axis=-1), 1.0, atol=1e-5)


def test_token_and_prompt_logprobs(tok):
    rng = np.random.default_rng(1)
    ids = tok.encode("To be, or not to be: 서울")
    logits = rng.standard_normal((len(ids), tok.vocab_size)).astype(np.float32) * 3
    ref = _reference(logits)
    entries = token_logprobs(logits, ids, k=5)
    for n, e in enumerate(entries):
        assert e.token_id == ids[n] and abs(e.logprob - ref[n, ids[n]]) <= 1e-6 * (1 + abs(ref[n, ids[n]]))
        values = [lp for _, lp in e.top]
        assert values == sorted(values, reverse=True) and len(values) == 5
        assert [i for i, _ in e.top] == list(np.argsort(-ref[n], kind="stable")[:5])
    scored = prompt_logprobs(logits, ids, k=2)
    assert scored[0] == TokenLogprob(ids[0], None, None)
    for n in range(1, len(ids)):  # token n is scored by the logits of position n - 1
        assert abs(scored[n].logprob - ref[n - 1, ids[n]]) <= 1e-6 * (1 + abs(ref[n - 1, ids[n]]))
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(logits[:2], ids)


def test_top_logprobs_ties_keep_lower_id_first():
    row = np.full(1000, -10.0, np.float32)
    row[[700, 5, 300, 999]] = -1.0  # four-way tie at the top
    row[42] = -0.5
    assert top_logprobs(row, 3) == [(42, -0.5), (5, -1.0), (300, -1.0)]
    assert top_logprobs(row, 0) == []
    assert [i for i, _ in top_logprobs(row, 20)][:5] == [42, 5, 300, 700, 999]
    assert [i for i, _ in top_logprobs(row, 20)][5:] == [i for i in range(16) if i != 5]  # -10 ties: lowest ids
    with pytest.raises(ValueError, match="between 0 and 20"):
        top_logprobs(row, 21)


def test_bytes_of_multibyte_characters(tok):
    text = "서울 café ☃"
    ids = tok.encode(text)
    pieces = [token_bytes(tok, i) for i in ids]
    assert b"".join(pieces) == text.encode("utf-8")
    assert any(len(p) < 3 and p[0] >= 0x80 for p in pieces), "expected a token holding part of a character"
    for p, i in zip(pieces, ids):
        try:
            assert token_text(tok, i) == p.decode("utf-8")
        except UnicodeDecodeError:
            assert token_text(tok, i) == "bytes:" + "".join(f"\\x{b:02x}" for b in p)
    assert token_bytes(tok, tok.token_to_id("<think>")) == b"<think>"
    assert token_bytes(tok, tok.eos_ids[0]) == b"[|endofturn|]"


def test_chat_shape(tok):
    ids = tok.encode(" the café")
    logits = np.random.default_rng(2).standard_normal((len(ids), tok.vocab_size)).astype(np.float32)
    content = chat_logprobs(tok, token_logprobs(logits, ids, k=3))
    assert [set(c) for c in content] == [{"token", "logprob", "bytes", "top_logprobs"}] * len(ids)
    assert bytes(b for c in content for b in c["bytes"]) == " the café".encode()
    for c in content:
        assert [set(t) for t in c["top_logprobs"]] == [{"token", "logprob", "bytes"}] * 3
        assert all(isinstance(b, int) for t in c["top_logprobs"] for b in t["bytes"])
    assert chat_logprobs(tok, token_logprobs(logits, ids))[0]["top_logprobs"] == []


def test_legacy_completions_shape(tok):
    text = "서울 café is"
    ids = tok.encode(text)
    logits = np.random.default_rng(3).standard_normal((len(ids), tok.vocab_size)).astype(np.float32)
    out = completion_logprobs(tok, prompt_logprobs(logits, ids, k=2))
    assert out["token_logprobs"][0] is None and out["top_logprobs"][0] is None
    assert all(isinstance(v, float) for v in out["token_logprobs"][1:])
    assert all(isinstance(d, dict) and len(d) <= 2 for d in out["top_logprobs"][1:])
    assert len(out["tokens"]) == len(ids) == len(out["text_offset"])
    # Each token starts at the character offset where its text (or its character, for a partial one) begins.
    for n, offset in enumerate(out["text_offset"]):
        prefix = b"".join(token_bytes(tok, i) for i in ids[:n])
        assert offset == len(prefix.decode("utf-8", errors="ignore"))
    assert out["text_offset"][:3] == [0, 0, 0]  # the three bytes of "서"
    shifted = completion_logprobs(tok, token_logprobs(logits, ids), text_offset=10)
    assert shifted["text_offset"][0] == 10 and shifted["top_logprobs"] == [None] * len(ids)
