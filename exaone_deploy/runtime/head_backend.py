"""Running a task-head bundle: texts in, transformers' pipeline results out (no torch).

:class:`HeadModel` holds one ONNX Runtime session over a head bundle's ``model.onnx`` (graph contract:
:class:`~exaone_deploy.graph_io.HeadIO`), the bundle's tokenizer and its :class:`~exaone_deploy.spec.HeadSpec`:

* :meth:`HeadModel.logits`: token rows -> per-row logits, run in batches of ``batch_size`` right-padded rows
  (rows sorted by length first, so a batch pads little), each row's padding sliced off;
* :meth:`HeadModel.classify`: sequence classification (``label``, ``score``, ``probs``) or token classification
  (``entities``), the keys and numbers of transformers' ``text-classification`` / ``token-classification``
  (``aggregation_strategy="simple"``) pipelines (:mod:`.heads`);
* :meth:`HeadModel.answer`: extractive QA (``answer``, ``score``, ``start``, ``end``) over question + context
  windows with a stride, as transformers' ``question-answering`` pipeline.

Targets: ``ort`` bundles run here. A ``trt`` head bundle passes ``tensorrt.checks`` but has no engine path yet
(the engine builder's optimisation profiles are the decoder's), so it is refused with that reason rather than
run through a backend that expects KV caches. Rejected: the decoder :class:`~.backend.Backend` (slots, caches
and a step contract a single prompt-only call does not have).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..bundle import BundleError, Manifest, load_manifest
from ..errors import InputError
from ..graph_io import HeadIO
from ..text.tokenizer import Tokenizer
from . import heads as rh
from .backend import ContextLengthError

log = logging.getLogger(__name__)

__all__ = ["HeadModel", "is_head_bundle", "QA_MAX_SEQ_LEN"]

QA_MAX_SEQ_LEN = 384  # transformers' question-answering default window


def is_head_bundle(manifest: Manifest) -> bool:
    return not manifest.spec.head.is_lm


class HeadModel:
    """A task-head bundle ready to run (see the module docstring)."""

    def __init__(
        self,
        bundle: str | Path | Manifest,
        *,
        device: str = "cpu",
        threads: int | None = None,
        verify: bool = True,
        batch_size: int = 16,
    ):
        import onnxruntime as ort

        from .ort_backend import PROVIDERS, session_options

        m = bundle if isinstance(bundle, Manifest) else load_manifest(bundle, verify=verify)
        if not is_head_bundle(m):
            raise BundleError(
                f"{m.root}: a causal LM bundle (no task head); classify and qa run sequence/token "
                "classification and question-answering bundles (use `exaone-deploy generate`)"
            )
        if m.target != "ort":
            raise BundleError(
                f"{m.root}: a {m.target!r} task-head bundle; task heads run on ONNX Runtime only "
                "(export with --target ort)"
            )
        if device not in PROVIDERS:
            raise InputError(f"unknown device {device!r} (choose from {', '.join(PROVIDERS)})")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.manifest, self.spec, self.head = m, m.spec, m.spec.head
        self.io = HeadIO.from_manifest_data(m.spec, m.data)
        self.task = self.head.task
        self.max_seq_len = self.io.max_seq_len
        self.batch_size = batch_size
        self.tokenizer = Tokenizer.from_dir(m.root)
        threads = threads or int(os.environ.get("EXAONE_DEPLOY_THREADS", "0")) or None
        self.session = ort.InferenceSession(
            str(m.model_path), sess_options=session_options(threads), providers=[PROVIDERS[device]]
        )

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, **kwargs) -> HeadModel:
        return cls(bundle_dir, **kwargs)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.head.labels

    # ---- the graph ----------------------------------------------------------------------------------
    def logits(self, rows: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, ...]]:
        """Per row, the graph's outputs (``io.output_names`` order), padding sliced off: (num_labels,) for
        sequence classification, (length, num_labels) for token classification, two (length,) for QA."""
        for r in rows:
            if len(r) > self.max_seq_len:
                raise ContextLengthError(
                    f"an input of {len(r)} tokens exceeds the bundle's max_seq_len "
                    f"{self.max_seq_len} (re-export with a larger --max-seq-len)"
                )
        out: list[tuple[np.ndarray, ...] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            inputs = self.io.head_inputs([rows[i] for i in idx], self.head.pad_token_id)
            results = self.session.run(self.io.output_names, inputs)
            for b, i in enumerate(idx):
                n = int(inputs["attention_lengths"][b])
                out[i] = tuple(r[b] if self.task == "sequence-classification" else r[b, :n] for r in results)
        return out  # type: ignore[return-value]

    # ---- tasks ----------------------------------------------------------------------------------------
    def classify(self, texts: Sequence[str], top_k: int | None = None) -> list[dict]:
        """One result per text: ``{"label", "score", "probs"}`` (sequence) or ``{"entities": [...]}`` (token)."""
        if self.task not in ("sequence-classification", "token-classification"):
            raise InputError(
                f"{self.manifest.root}: a {self.task} bundle; classify needs a sequence or token "
                "classification bundle (use `exaone-deploy qa`)"
            )
        if not texts:
            raise InputError("no input text")
        if top_k is not None and top_k < 1:
            raise InputError(f"top_k must be >= 1, got {top_k}")
        encodings = [rh.encode_text(self.tokenizer, t) for t in texts]
        empty = [i for i, e in enumerate(encodings) if not e.ids]
        if empty:
            raise InputError(f"input {empty[0]} has no tokens (empty text)")
        logits = self.logits([e.ids for e in encodings])
        if self.task == "sequence-classification":
            return rh.classify(np.stack([x[0] for x in logits]), self.head, top_k=top_k)
        return [
            {"entities": rh.token_entities(t, e, x[0], self.labels, self.tokenizer)}
            for t, e, x in zip(texts, encodings, logits)
        ]

    def score(self, first: Sequence[str], second: Sequence[str]) -> list[float]:
        """Per pair, the sigmoid of a one-label classifier's logit on ``first[i]`` then ``second[i]`` (a
        cross-encoder's relevance or a reward model's score; vLLM's ``/score``). The pair is encoded as
        transformers' tokenizer encodes ``(text, text_pair)``: each text's tokens (with the tokenizer's pair
        template, if it has one)."""
        if self.task != "sequence-classification" or self.head.num_labels != 1:
            raise InputError(
                f"{self.manifest.root}: scoring pairs needs a one-label sequence classifier; this is a "
                f"{self.task} model with {self.head.num_labels} labels"
            )
        rows = [self.tokenizer.backend.encode(a, b, add_special_tokens=True).ids for a, b in zip(first, second)]
        if not rows or any(not r for r in rows):
            raise InputError("every pair needs at least one token")
        logits = np.stack([x[0] for x in self.logits(rows)])
        return [float(x) for x in 1.0 / (1.0 + np.exp(-logits[:, 0].astype(np.float64)))]

    def answer(
        self,
        question: str,
        context: str,
        *,
        top_k: int = 1,
        max_seq_len: int | None = None,
        doc_stride: int | None = None,
        max_answer_len: int = 15,
        handle_impossible_answer: bool = False,
    ) -> list[dict]:
        """The ``top_k`` best answers ``{"answer", "score", "start", "end"}`` to ``question`` in ``context``.

        ``max_seq_len``: tokens per window (default min(384, the bundle's max_seq_len)); ``doc_stride``: context
        tokens consecutive windows share (default min(max_seq_len // 2, 128))."""
        if self.task != "question-answering":
            raise InputError(
                f"{self.manifest.root}: a {self.task} bundle; qa needs a question-answering bundle "
                "(use `exaone-deploy classify`)"
            )
        if not question.strip() or not context.strip():
            raise InputError("question and context must be non-empty")
        if top_k < 1 or max_answer_len < 1:
            raise InputError(f"top_k and max_answer_len must be >= 1, got {top_k} and {max_answer_len}")
        window = max_seq_len or min(QA_MAX_SEQ_LEN, self.max_seq_len)
        if not 1 < window <= self.max_seq_len:
            raise InputError(f"max_seq_len {window} must be in 2..{self.max_seq_len} (the bundle's max_seq_len)")
        try:
            windows = rh.qa_encode(self.tokenizer, question, context, window, doc_stride)
        except ValueError as e:
            raise InputError(str(e)) from None
        logits = self.logits([w.ids for w in windows])
        return rh.qa_answers(
            context,
            windows,
            [x[0] for x in logits],
            [x[1] for x in logits],
            self.tokenizer,
            top_k=top_k,
            max_answer_len=max_answer_len,
            handle_impossible_answer=handle_impossible_answer,
        )
