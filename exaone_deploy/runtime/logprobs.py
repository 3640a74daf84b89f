"""Token log-probabilities and their OpenAI shapes (chat `logprobs.content`, legacy completions `logprobs`).

Logprobs are the float32 `log_softmax` of the raw logits the sampler saw, before temperature, penalties,
top-k/top-p or a grammar mask, as OpenAI reports them: they describe the model, not the sampling settings.

- `log_softmax`, `top_logprobs`, `token_logprobs` (one sampled token per logits row) and `prompt_logprobs`
  (every prompt token scored by the logits of the position before it; the first has none, as lm-eval expects);
- `chat_logprobs(tokenizer, entries)`: the `choices[i].logprobs.content` list of chat completions, entries
  `{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}`;
- `completion_logprobs(tokenizer, entries)`: the legacy completions object `{"tokens", "token_logprobs",
  "top_logprobs", "text_offset"}` that lm-eval's `local-completions` reads.

A token's bytes are its own bytes (byte-level BPE: the pieces mapped back through GPT-2's byte alphabet;
added tokens: their UTF-8), so a token holding part of a multi-byte character has only that part. Its
`token` string is those bytes decoded, or OpenAI's `bytes:\\xe2\\x80` form when they are not valid UTF-8.
Ties in `top_logprobs` keep the lower id first (a deterministic order; argsort of a full 102k row per token
rejected as 10x slower than argpartition plus a sort of the candidates).
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
from collections.abc import Sequence

import numpy as np

from ..text.tokenizer import Tokenizer

__all__ = [
    "MAX_TOP_LOGPROBS",
    "TokenLogprob",
    "chat_logprobs",
    "completion_logprobs",
    "log_softmax",
    "prompt_logprobs",
    "token_bytes",
    "token_logprobs",
    "token_text",
    "top_logprobs",
]

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclasses.dataclass
class TokenLogprob:
    """One token with its logprob and the `top` alternatives ((id, logprob), best first); None when unscored."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None = None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax over the last axis (any float input dtype)."""
    x = np.asarray(logits, dtype=np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_logprobs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The `k` best (id, logprob) of one row, sorted descending; equal values keep the lower id first."""
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}")
    if k == 0:
        return []
    k = min(k, logprobs.shape[-1])
    threshold = logprobs[np.argpartition(-logprobs, k - 1)[:k]].min()
    candidates = np.flatnonzero(logprobs >= threshold)  # every id tied at the threshold, in id order
    order = candidates[np.lexsort((candidates, -logprobs[candidates]))][:k]
    return [(int(i), float(logprobs[i])) for i in order]


def token_logprobs(logits: np.ndarray, token_ids: Sequence[int], k: int = 0) -> list[TokenLogprob]:
    """For each (V,) row of (N, V) `logits`, the logprob of `token_ids[n]` and the top `k`."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != len(token_ids):
        raise ValueError(f"need (N, V) logits for {len(token_ids)} tokens, got shape {logits.shape}")
    logprobs = log_softmax(logits)
    return [
        TokenLogprob(int(t), float(row[t]), top_logprobs(row, k) if k else None) for row, t in zip(logprobs, token_ids)
    ]


def prompt_logprobs(logits: np.ndarray, prompt_ids: Sequence[int], k: int = 0) -> list[TokenLogprob]:
    """Score a prompt: token i by `logits[i - 1]` (the (T, V) logits of the prompt's own forward pass).

    The first token has no context, so its logprob and top are None (the legacy completions `null`).
    """
    if len(prompt_ids) == 0:
        return []
    first = TokenLogprob(int(prompt_ids[0]), None, None)
    return [first] + token_logprobs(np.asarray(logits)[: len(prompt_ids) - 1], prompt_ids[1:], k)


# ---- token strings and bytes -------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character -> byte (the ByteLevel pre-tokenizer's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + n for n in range(len(others))]
    return {chr(c): b for c, b in zip(chars, printable + others)}


@functools.lru_cache(maxsize=8)
def _layout(tokenizer: Tokenizer) -> tuple[bool, dict[int, bytes]]:
    """(byte-level BPE?, {added token id: its UTF-8}) of a tokenizer, read once."""
    decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}
    added = {i: t.content.encode("utf-8") for i, t in tokenizer.backend.get_added_tokens_decoder().items()}
    return decoder.get("type") == "ByteLevel", added


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes token `token_id` stands for (part of a character for a piece of a multi-byte one)."""
    token_id = int(token_id)
    byte_level, added = _layout(tokenizer)
    if token_id in added:
        return added[token_id]
    piece = tokenizer.id_to_token(token_id)
    if piece is None:
        raise ValueError(f"token id {token_id} is outside the tokenizer's {tokenizer.vocab_size} ids")
    if byte_level:
        table = _byte_decoder()
        return bytes(table[c] for c in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """The token as text; `bytes:\\xNN...` when its bytes are not valid UTF-8 on their own (OpenAI's form)."""
    raw = token_bytes(tokenizer, token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


# ---- OpenAI shapes -----------------------------------------------------------------------------------


def _alternative(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict:
    raw = token_bytes(tokenizer, token_id)
    return {"token": token_text(tokenizer, token_id), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob]) -> list[dict]:
    """The chat completions `logprobs.content` list for sampled tokens (`top_logprobs` [] when not asked)."""
    out = []
    for e in entries:
        if e.logprob is None:
            raise ValueError(f"token {e.token_id} has no logprob: chat logprobs are for sampled tokens")
        item = _alternative(tokenizer, e.token_id, e.logprob)
        item["top_logprobs"] = [_alternative(tokenizer, i, lp) for i, lp in e.top or []]
        out.append(item)
    return out


def completion_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob], text_offset: int = 0) -> dict:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset.

    `text_offset[i]` is the character offset of token i in the returned text, counted from `text_offset`
    (the length of text before these tokens: 0 for an echoed prompt, len(prompt) for a completion without
    echo); a token that continues a partial character starts where that character does.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tokens, values, tops, offsets = [], [], [], []
    chars = text_offset
    for e in entries:
        tokens.append(token_text(tokenizer, e.token_id))
        values.append(e.logprob)
        tops.append(None if e.top is None else {token_text(tokenizer, i): lp for i, lp in e.top})
        offsets.append(chars)  # inside a character: where it begins (its bytes are still pending)
        chars += len(decoder.decode(token_bytes(tokenizer, e.token_id)))
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
