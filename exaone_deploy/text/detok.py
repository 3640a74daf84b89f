"""Incremental detokenization: text deltas as tokens arrive, for streaming.

Byte-level BPE splits a multi-byte UTF-8 character (Korean, accents, emoji) over several tokens; decoding
a prefix then ends in U+FFFD. The decoder holds such an unfinished character back until the token that
completes it arrives, and decodes only a short window of recent ids each step, so a step costs the same
at token 10 and at token 10,000.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"

# If the window grows past this many ids without a clean character boundary (a stream of broken
# byte sequences), look for a split point so that the window stays short.
_MAX_WINDOW = 32


class _Decodes(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDecoder:
    """Turn a stream of token ids into text deltas.

    `push(token_id)` returns the text the new id completes ("" while a character is unfinished);
    `flush()` returns whatever is still held back at the end of the stream. The deltas plus `flush()`
    join to exactly `tokenizer.decode(all_ids, skip_special_tokens=...)`, U+FFFD included where the
    full decode has one.

    How: the decoder keeps a window `ids[start:]`, where `start` sits on a character boundary, and
    knows how many characters of the window's text it has emitted. Each push decodes the window and
    emits the newly stable text: all of it, except one trailing U+FFFD, which may be a character whose
    last bytes are still to come. Once the window's text ends cleanly, the window moves forward to the
    previous step's end, keeping a few ids of context (decoders such as Metaspace treat the first token
    of a sequence specially; a shared context token keeps the two decodes consistent).
    """

    def __init__(self, tokenizer: _Decodes, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._start = 0  # first id of the window, on a character boundary
        self._next_start = 0  # where the window moves to at the next clean boundary
        self._sent = 0  # characters of decode(ids[start:]) already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it makes printable (possibly "")."""
        self.ids.append(int(token_id))
        text = self._decode(self.ids[self._start :])
        pending = text.endswith(REPLACEMENT)
        stable = len(text) - 1 if pending else len(text)
        delta = text[self._sent : stable]
        self._sent = max(self._sent, stable)
        if not pending:
            # ids[:len(ids)] ends on a character boundary: slide the window, keeping context.
            self._start, self._next_start = self._next_start, len(self.ids)
            self._sent = len(self._decode(self.ids[self._start :]))
        elif len(self.ids) - self._start > _MAX_WINDOW:
            self._split_window(text)
        return delta

    def flush(self) -> str:
        """The text still held back (an unfinished character, decoded as U+FFFD); call at the end."""
        text = self._decode(self.ids[self._start :])
        delta = text[self._sent :]
        self._sent = len(text)
        return delta

    def _split_window(self, text: str) -> None:
        # Move the window start to the last id k where decoding splits cleanly: decode(a) + decode(b)
        # equals the window's text, with at least one id after k. A split inside a character (or inside
        # an invalid sequence) changes the number of U+FFFD, so it never passes this test; a clean split
        # stays clean whatever comes next, because the id after k already settled the boundary.
        window = self.ids[self._start :]
        for k in range(len(window) - 1, 0, -1):
            head = self._decode(window[:k])
            if len(head) <= self._sent and head + self._decode(window[k:]) == text:
                self._start += k
                self._next_start = max(self._next_start, self._start)
                self._sent -= len(head)
                return
