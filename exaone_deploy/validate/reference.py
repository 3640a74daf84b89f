"""The PyTorch reference model of a checkpoint behind the runtime's :class:`~exaone_deploy.runtime.backend.Backend`
API, so validation compares backends: ``verify`` is ``compare(reference, bundle)``, and the perplexity of a
checkpoint is ``ReferenceBackend.score``.

The reference (``exporter.reference``) runs the same step contract as the graph (GraphIO's step inputs, full-length
float32 caches; sliding layers mask to their window), one step per call; caches are torch tensors updated by
copying each step's present rows back. Decode runs slot by slot (``extend``): validation decodes one slot, and the
reference is the slow, obviously-right side. Rejected: a second teacher-forced loop over ``ref.step`` (what
verify had), which duplicated compare's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import resolve_model_dir
from ..exporter.reference import load_reference
from ..graph_io import GraphIO
from ..runtime.backend import Backend

__all__ = ["ReferenceBackend"]


class ReferenceBackend(Backend):
    name = "reference"

    def __init__(
        self, model_dir: str | Path, *, max_seq_len: int, max_batch: int = 1, max_positions: int | None = None
    ):
        """``max_positions``: the longest context ``allocate`` accepts (the RoPE tables' length); default
        ``max_seq_len``."""
        self.model_dir = resolve_model_dir(model_dir)
        self.model = load_reference(self.model_dir, "float32", max_positions=max_positions or max_seq_len)
        self.spec = self.model.spec
        self.io = GraphIO(self.spec, "float32", max_seq_len=max_positions or max_seq_len)
        self._caches: list[torch.Tensor] = []
        self.allocate(max_batch, max_seq_len)

    def _allocate(self, max_batch: int, max_seq_len: int) -> None:
        self._caches = self.model.empty_cache(max_batch, max_seq_len)

    def close(self) -> None:
        self._caches = []

    @torch.no_grad()
    def _step(self, r0: int, inputs: dict[str, np.ndarray], decode: bool) -> np.ndarray:
        B = inputs["input_ids"].shape[0]
        feed = [
            torch.from_numpy(np.ascontiguousarray(inputs[name]))
            for name in ("input_ids", "seqlens_k", "total_sequence_length", "logits_index")
        ]
        logits, *presents = self.model(*feed, *(c[r0 : r0 + B] for c in self._caches))
        for cache, present in zip(self._caches, presents):
            cache[r0 : r0 + B].copy_(present)
        return logits.float().numpy()

    def _decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        return np.stack([self.extend(s, [t])[0] for s, t in zip(slots, tokens)])
