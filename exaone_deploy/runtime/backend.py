"""The backend interface: a model session plus the KV-cache buffers it owns.

The cache has ``max_batch`` *slots* (rows) of ``capacity`` tokens each. Generation and the serving
scheduler talk to a backend only through this interface, so ONNX Runtime and TensorRT are
interchangeable:

* ``prefill(slots, prompts)``: start slots from their prompts; returns the last-position logits.
* ``extend(slot, tokens)``: append a chunk of tokens to one slot (chunked prefill, multi-turn reuse).
* ``decode(slots, tokens)``: one token for each of several slots; returns their logits.
* ``release(slot)``: forget a slot's tokens.
* ``score(tokens)``: logits at every position of one sequence (perplexity).

The backend tracks how many tokens each slot holds (``lengths``). Rows of the cache are updated in
place; nothing is copied per decode step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from ..errors import ExaoneDeployError
from ..spec import ModelSpec

__all__ = ["Backend", "ContextLengthError"]


class ContextLengthError(ExaoneDeployError, ValueError):
    """A prompt (plus requested tokens) that does not fit the model's context."""


class Backend(ABC):
    spec: ModelSpec
    max_batch: int
    capacity: int
    name: str = "backend"

    lengths: np.ndarray  # tokens held by each slot

    windowed: bool = False  # caches that evict on write accept batched prompt steps of equal lengths only

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Run prompts into slots (their old contents are dropped). Returns float32 (len(slots), vocab)
        logits of each prompt's last token. Contiguous slots share one right-padded prompt step."""
        slots = list(slots)
        for p in prompts:
            if not len(p):
                raise ValueError("empty prompt")
            self.check_fits(len(p))
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        ragged = len({len(p) for p in prompts}) > 1
        if not contiguous or len(slots) == 1 or (ragged and self.windowed):
            return np.concatenate([self._prefill_rows(s, [p]) for s, p in zip(slots, prompts)])
        return self._prefill_rows(slots[0], prompts)

    @abstractmethod
    def _prefill_rows(self, r0: int, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """One prompt step over rows [r0, r0 + len(prompts)), caches starting empty; (B, vocab) logits."""

    @staticmethod
    def right_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(ids (B, S) right-padded with 0, lengths (B,)) for a prompt step."""
        lens = np.array([len(p) for p in prompts], dtype=np.int64)
        ids = np.zeros((len(prompts), int(lens.max())), dtype=np.int64)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p
        return ids, lens

    @abstractmethod
    def extend(self, slot: int, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append tokens to a slot. Returns (1 or len(tokens), vocab) logits."""

    @abstractmethod
    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One new token for each slot. Returns (len(slots), vocab) logits."""

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def score(self, tokens: Sequence[int], chunk: int = 512) -> np.ndarray:
        """Logits at every position of ``tokens`` (one sequence, in slot 0), chunked to bound memory."""
        self.release(0)
        out = [self.extend(0, tokens[start:start + chunk], all_logits=True) for start in range(0, len(tokens), chunk)]
        self.release(0)
        return np.concatenate(out, axis=0)

    def check_fits(self, n_tokens: int) -> None:
        if n_tokens > self.capacity:
            raise ContextLengthError(
                f"{n_tokens} tokens do not fit the context of {self.capacity} tokens "
                f"(the bundle's max_seq_len; re-export with a larger --max-seq-len)"
            )

    def close(self) -> None:  # pragma: no cover - optional
        pass
