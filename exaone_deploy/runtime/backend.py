"""The backend interface: a model session plus the KV-cache buffers it owns, and the registry of backends.

The cache has ``max_batch`` *slots* (rows) of ``max_seq_len`` tokens each. Generation, the serving scheduler
and validation talk to a backend only through this interface, so ONNX Runtime, TensorRT and the PyTorch
reference are interchangeable:

* ``prefill(slots, prompts)``: start slots from their prompts; returns the last-position logits.
* ``extend(slot, tokens)``: append a chunk of tokens to one slot (chunked prefill, multi-turn reuse).
* ``decode(slots, tokens)``: one token for each of several slots; returns their logits.
* ``release(slot)``: forget a slot's tokens.
* ``score(tokens, slot=s)``: logits at every position of one sequence (perplexity), run in the free slot ``s``.
* ``allocate(max_batch, max_seq_len)`` / ``ensure(...)``: size the cache (``ensure`` only grows it);
  ``close()``: free it.

Attributes: ``spec``, ``io`` (the :class:`~exaone_deploy.graph_io.GraphIO` of the graph), ``manifest`` (the
bundle, or None for a backend over a checkpoint), ``max_batch``, ``max_seq_len`` (tokens one slot holds now;
``io.max_seq_len`` is the most ``allocate`` accepts) and ``lengths`` (tokens each slot holds). ``capacity``
is a deprecated read-only alias of ``max_seq_len`` (the name this used to have, next to ``context`` and
``max_context`` elsewhere). Rows of the cache are updated in place; nothing is copied per decode step.

Backends are found by the manifest's ``target`` through :data:`BACKENDS`, import strings resolved on use, so
the runtime never imports ``tensorrt`` (which imports this module) by name. Rejected: registration by import
side effect (the registering module would have to be imported first, which is the cycle again) and entry
points (one package, two backends: a dict is enough).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..bundle import BundleError
from ..errors import ExaoneDeployError
from ..graph_io import GraphIO
from ..spec import ModelSpec

if TYPE_CHECKING:
    from ..bundle import Manifest

__all__ = ["Backend", "ContextLengthError", "BACKENDS", "backend_class"]

# manifest target -> "module:Class" of the backend that runs it
BACKENDS = {
    "ort": "exaone_deploy.runtime.ort_backend:OrtBackend",
    "tensorrt": "exaone_deploy.tensorrt.backend:TrtBackend",
}


class ContextLengthError(ExaoneDeployError, ValueError):
    """A prompt (plus requested tokens) that does not fit the model's context."""


def backend_class(target: str, where: object = "bundle") -> type[Backend]:
    """The backend class for a manifest target (imported now), or a BundleError naming ``where``."""
    ref = BACKENDS.get(target)
    if ref is None:
        raise BundleError(
            f"{where}: a {target!r} bundle cannot run directly (runnable targets: "
            f"{', '.join(BACKENDS)}; build a TensorRT engine from a 'trt' bundle with "
            f"`exaone-deploy build`)"
        )
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


class Backend(ABC):
    name: str = "backend"
    spec: ModelSpec
    io: GraphIO
    manifest: Manifest | None = None
    max_batch: int = 0
    max_seq_len: int = 0
    lengths: np.ndarray  # tokens held by each slot
    batch_limit: int | None = None  # most slots the model takes (an engine's profile), None: any
    # Window-sized caches evict on every write: rows must never see dummy writes, and batched prompt steps
    # need equal lengths (set by ``allocate``).
    windowed: bool = False

    # ---- construction and buffers -------------------------------------------------------------------
    @classmethod
    def open(
        cls, manifest: Manifest, *, device: str = "cpu", max_batch: int = 1, max_seq_len: int | None = None
    ) -> Backend:
        """The backend over a loaded bundle (what :func:`~exaone_deploy.runtime.generate.open_backend` calls)."""
        return cls(manifest, max_batch=max_batch, max_seq_len=max_seq_len, device=device)

    @property
    def capacity(self) -> int:
        """Deprecated alias of ``max_seq_len``."""
        return self.max_seq_len

    def allocate(self, max_batch: int, max_seq_len: int) -> None:
        """(Re)allocate the KV cache for max_batch slots of max_seq_len tokens (drops slot contents)."""
        if int(max_batch) < 1 or int(max_seq_len) < 1:
            raise ValueError(f"a cache of {max_batch} slots of {max_seq_len} tokens: both must be >= 1")
        if max_seq_len > self.io.max_seq_len:
            raise ContextLengthError(
                f"a context of {max_seq_len} tokens exceeds the bundle's max_seq_len {self.io.max_seq_len}"
            )
        if self.batch_limit is not None and max_batch > self.batch_limit:
            raise ContextLengthError(
                f"{max_batch} slots exceed the engine's max_batch {self.batch_limit} "
                f"(rebuild with --max-batch {max_batch})"
            )
        if max_batch == self.max_batch and max_seq_len == self.max_seq_len:
            return
        self._allocate(int(max_batch), int(max_seq_len))
        self.max_batch, self.max_seq_len = int(max_batch), int(max_seq_len)
        self.lengths = np.zeros(self.max_batch, dtype=np.int64)
        self.windowed = any(n != self.max_seq_len for n in self.io.cache_lengths_at(self.max_seq_len))

    @abstractmethod
    def _allocate(self, max_batch: int, max_seq_len: int) -> None:
        """Replace the cache buffers (arguments already checked)."""

    def ensure(self, max_batch: int, max_seq_len: int) -> None:
        """Grow the buffers if needed (slot contents are dropped when they are reallocated)."""
        if max_batch > self.max_batch or max_seq_len > self.max_seq_len:
            self.allocate(max(max_batch, self.max_batch), max(max_seq_len, self.max_seq_len))

    def close(self) -> None:  # noqa: B027 - optional for subclasses: most hold nothing to free explicitly
        """Free the buffers and the session; the backend is unusable afterwards."""

    # ---- steps ----------------------------------------------------------------------------------------
    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], all_logits: bool = False) -> np.ndarray:
        """Run prompts into slots (their old contents are dropped). Returns float32 (len(slots), vocab)
        logits of each prompt's last token, or with ``all_logits`` (len(slots), longest prompt, vocab) logits
        of every position (a shorter prompt's rows past its end are padding). Contiguous slots share one
        right-padded prompt step."""
        slots = list(slots)
        for s, p in zip(slots, prompts):
            self._check_slot(s)
            if not len(p):
                raise ValueError("empty prompt")
            self.check_fits(len(p))
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        ragged = len({len(p) for p in prompts}) > 1
        if not contiguous or len(slots) == 1 or (ragged and self.windowed):
            rows = [self._prefill_rows(s, [p], all_logits) for s, p in zip(slots, prompts)]
            if not all_logits:
                return np.concatenate(rows)
            out = np.zeros((len(rows), max(r.shape[1] for r in rows), rows[0].shape[-1]), dtype=np.float32)
            for b, r in enumerate(rows):
                out[b, : r.shape[1]] = r[0]
            return out
        return self._prefill_rows(slots[0], prompts, all_logits)

    def _prefill_rows(self, r0: int, prompts: Sequence[Sequence[int]], all_logits: bool = False) -> np.ndarray:
        """One prompt step over rows [r0, r0 + len(prompts)), caches starting empty; (B, vocab) logits, or
        (B, longest, vocab) with ``all_logits``."""
        inputs, lens = GraphIO.prefill_inputs(prompts, all_logits)
        logits = self._step(r0, inputs, decode=False)
        self.lengths[r0 : r0 + len(prompts)] = lens
        return logits if all_logits else logits[:, 0]

    def extend(self, slot: int, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append tokens to a slot. Returns (1 or len(tokens), vocab) logits."""
        self._check_slot(slot)
        past, S = int(self.lengths[slot]), len(tokens)
        if not S:
            raise ValueError("extend needs at least one token")
        self.check_fits(past + S)
        logits = self._step(slot, GraphIO.extend_inputs(past, tokens, all_logits), decode=S == 1 and past > 0)
        self.lengths[slot] = past + S
        return logits[0]

    @abstractmethod
    def _step(self, r0: int, inputs: dict[str, np.ndarray], decode: bool) -> np.ndarray:
        """Run one step (GraphIO step inputs) over rows [r0, r0 + batch); (batch, logits_len, vocab) float32.
        ``decode``: one token on a started row (backends with per-phase settings pick them by it)."""

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One new token for each slot. Returns (len(slots), vocab) logits."""
        if len(slots) != len(tokens) or not len(slots):
            raise ValueError(f"decode needs one token per slot, got {len(tokens)} tokens for {len(slots)} slots")
        if min(slots) < 0 or max(slots) >= self.max_batch:
            raise ValueError(f"slots {list(slots)} are out of range (this backend has {self.max_batch} slots)")
        if self.lengths[np.asarray(slots)].max() + 1 > self.max_seq_len:
            raise ContextLengthError(f"slot context is full ({self.max_seq_len} tokens)")
        return self._decode(slots, tokens)

    @abstractmethod
    def _decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """``decode`` after its checks."""

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def score(self, tokens: Sequence[int], *, slot: int, chunk: int = 512) -> np.ndarray:
        """Logits at every position of ``tokens`` (one sequence), chunked to bound memory, run in ``slot``,
        which must be free and is free again afterwards; other slots are not touched."""
        self._check_slot(slot)
        if self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {int(self.lengths[slot])} tokens; score needs a free slot")
        try:
            out = [
                self.extend(slot, tokens[start : start + chunk], all_logits=True)
                for start in range(0, len(tokens), chunk)
            ]
        finally:
            self.release(slot)
        return np.concatenate(out, axis=0)

    def check_fits(self, n_tokens: int) -> None:
        if n_tokens > self.max_seq_len:
            raise ContextLengthError(
                f"{n_tokens} tokens do not fit the context of {self.max_seq_len} tokens "
                f"(the bundle's max_seq_len; re-export with a larger --max-seq-len)"
            )

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is out of range (this backend has {self.max_batch} slots)")
