"""Task-head inputs and post-processing, torch-free: what transformers' pipelines do after the model.

The head graph (exporter/heads.py) takes ``input_ids`` (batch, sequence) int64, right-padded, and
``attention_lengths`` (batch,) int32, and returns float32 logits named for the task (:func:`output_names`).
This module builds those inputs (:func:`pad_batch`) and turns the logits into results with the keys and
numbers of transformers' pipelines, which the tests check against the pipelines themselves:

* :func:`classify`: ``text-classification`` (softmax, sigmoid or none by ``problem_type``/num_labels).
* :func:`token_entities`: ``token-classification`` with ``aggregation_strategy="simple"``: per-token argmax
  of the softmax, adjacent tokens grouped while the tag stays the same and does not restart with ``B-``,
  group score the mean of its token scores, ``O`` dropped, character spans from the tokenizer's offsets.
* :func:`qa_encode` / :func:`qa_answers`: ``question-answering`` (transformers 4.x; 5.x dropped the
  pipeline): the question then the context, contexts longer than ``max_seq_len`` split into overlapping
  windows (``doc_stride`` tokens shared), per window a softmax over context positions for start and end,
  span score ``p_start * p_end`` with ``end - start < max_answer_len``, spans aligned to words, equal answers
  from different windows summed.

Alternatives rejected: importing the pipelines (torch and transformers on the serving path), and our own
scoring rules (the numbers would differ from what users compare against).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import tokenizers
import tokenizers.processors

from ..graph_io import HEAD_INPUTS, HeadIO
from ..spec import HeadSpec
from ..text.tokenizer import Tokenizer

__all__ = [
    "INPUTS",
    "classify",
    "encode_text",
    "output_names",
    "pad_batch",
    "qa_answers",
    "qa_encode",
    "token_entities",
]

INPUTS = HEAD_INPUTS


def output_names(task: str) -> tuple[str, ...]:
    """Graph outputs of a head: ``logits``, or ``start_logits`` and ``end_logits`` for QA."""
    if task == "causal-lm":
        raise ValueError("the causal LM has no head graph (graph_io.GraphIO names its step)")
    return ("start_logits", "end_logits") if task == "question-answering" else ("logits",)


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token rows with ``pad_id`` (0 if None) -> (input_ids int64 (B, S), attention_lengths int32 (B,))."""
    inputs = HeadIO.head_inputs(rows, pad_id)
    return inputs["input_ids"], inputs["attention_lengths"]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---- sequence classification ----------------------------------------------------------------------


def classify(logits: np.ndarray, head: HeadSpec, top_k: int | None = None, function: str | None = None) -> list[dict]:
    """(B, num_labels) logits -> per row ``{"label", "score", "probs"}``.

    ``probs`` maps label -> score, best first, the ``top_k`` best (all when None). ``function``: "softmax",
    "sigmoid" or "none"; by default as the pipeline: none for regression, sigmoid for multi-label or a single
    label, else softmax.
    """
    if function is None:
        if head.problem_type == "regression":
            function = "none"
        elif head.problem_type == "multi_label_classification" or head.num_labels == 1:
            function = "sigmoid"
        else:
            function = "softmax"
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != head.num_labels:
        raise ValueError(f"expected logits (batch, {head.num_labels}), got shape {x.shape}")
    scores = {"softmax": _softmax, "sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)), "none": lambda v: v}[function](x)
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:top_k]
        best = int(row.argmax())
        out.append(
            {
                "label": head.labels[best],
                "score": float(row[best]),
                "probs": {head.labels[i]: float(row[i]) for i in order},
            }
        )
    return out


# ---- token classification -------------------------------------------------------------------------


def encode_text(tokenizer: Tokenizer, text: str, max_length: int | None = None) -> tokenizers.Encoding:
    """The encoding the pipeline makes: special tokens added, truncated to ``max_length`` if given."""
    enc = tokenizer.backend.encode(text, add_special_tokens=True)
    if max_length is not None and len(enc.ids) > max_length:
        enc.truncate(max_length)
    return enc


def _tokens_to_string(tokenizer: Tokenizer, tokens: list[str]) -> str:
    decoder = tokenizer.backend.decoder
    return decoder.decode(tokens) if decoder is not None else " ".join(tokens)


def _tag(label: str) -> tuple[str, str]:
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def token_entities(
    text: str,
    encoding: tokenizers.Encoding,
    logits: np.ndarray,
    labels: Sequence[str],
    tokenizer: Tokenizer,
    ignore_labels: Sequence[str] = ("O",),
) -> list[dict]:
    """Entities ``{"entity_group", "score", "word", "start", "end"}`` of one text (``aggregation_strategy="simple"``).

    ``logits`` (S, num_labels) for the S tokens of ``encoding`` (padding sliced off).
    """
    x = np.asarray(logits, dtype=np.float32)
    if x.shape != (len(encoding.ids), len(labels)):
        raise ValueError(f"expected logits ({len(encoding.ids)}, {len(labels)}), got shape {x.shape}")
    scores = _softmax(x)
    tokens = []  # (label, score, token, start, end) of each non-special token
    for i, (tid, special) in enumerate(zip(encoding.ids, encoding.special_tokens_mask)):
        if special:
            continue
        start, end = encoding.offsets[i]
        word = text[start:end] if tid == tokenizer.unk_id else tokenizer.id_to_token(tid)
        best = int(scores[i].argmax())
        tokens.append((labels[best], scores[i][best], word, start, end))
    groups: list[list[tuple]] = []
    for tok in tokens:
        bi, tag = _tag(tok[0])
        if groups and bi != "B" and tag == _tag(groups[-1][-1][0])[1]:
            groups[-1].append(tok)
        else:
            groups.append([tok])
    entities = []
    for group in groups:
        name = group[0][0].split("-", 1)[-1]
        if name in ignore_labels:
            continue
        entities.append(
            {
                "entity_group": name,
                "score": float(np.mean(np.nanmean([t[1] for t in group]))),
                "word": _tokens_to_string(tokenizer, [t[2] for t in group]),
                "start": group[0][3],
                "end": group[-1][4],
            }
        )
    return entities


# ---- extractive question answering ----------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _truncating(tokenizer: Tokenizer, max_len: int, stride: int) -> tokenizers.Tokenizer:
    """A copy of the backend that truncates the second sequence into overlapping windows (the original is shared).

    Without a post-processor (EXAONE's tokenizer.json has none) the overflow windows of ``tokenizers`` lose
    their sequence ids, so, as transformers 5's tokenizer does, the copy gets a plain ``$A $B:1`` template.
    (transformers 4.x's pipeline did not: there only the first window of a long context could answer.)
    """
    copy = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    if copy.post_processor is None:
        copy.post_processor = tokenizers.processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    copy.no_padding()
    copy.enable_truncation(max_len, stride=stride, strategy="only_second", direction="right")
    return copy


def qa_encode(
    tokenizer: Tokenizer, question: str, context: str, max_seq_len: int = 384, doc_stride: int | None = None
) -> list[tokenizers.Encoding]:
    """The pipeline's features: ``question`` + ``context`` windows of at most ``max_seq_len`` tokens.

    Consecutive windows share ``doc_stride`` context tokens (default ``min(max_seq_len // 2, 128)``).
    """
    if doc_stride is None:
        doc_stride = min(max_seq_len // 2, 128)
    if doc_stride > max_seq_len:
        raise ValueError(f"doc_stride ({doc_stride}) is larger than max_seq_len ({max_seq_len})")
    try:
        enc = _truncating(tokenizer, max_seq_len, doc_stride).encode(question, context, add_special_tokens=True)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception when the question leaves no room
        raise ValueError(f"cannot fit the question and context windows in max_seq_len {max_seq_len}: {e}") from None
    return [enc, *enc.overflowing]


def _spans(
    start: np.ndarray,
    end: np.ndarray,
    allowed: np.ndarray,
    top_k: int,
    max_answer_len: int,
    min_null: float,
    handle_impossible: bool,
):
    """transformers' ``select_starts_ends`` + ``decode_spans`` for one window (arrays of shape (1, S))."""
    start = np.where(allowed, start, np.float32(-10000.0))
    end = np.where(allowed, end, np.float32(-10000.0))
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    if handle_impossible:
        min_null = min(min_null, float(start[0, 0] * end[0, 0]))
    start[0, 0] = end[0, 0] = 0.0
    candidates = np.tril(np.triu(start[:, :, None] * end[:, None, :]), max_answer_len - 1)
    flat = candidates.flatten()
    if top_k == 1:
        order = [np.argmax(flat)]
    elif len(flat) < top_k:
        order = np.argsort(-flat)
    else:
        idx = np.argpartition(-flat, top_k)[0:top_k]
        order = idx[np.argsort(-flat[idx])]
    starts, ends = np.unravel_index(order, candidates.shape)[1:]
    # np.nonzero of the (1, S) mask also yields row indices (all 0), so position 0 passes, as in transformers
    ok = np.isin(starts, np.nonzero(allowed)) & np.isin(ends, np.nonzero(allowed))
    starts, ends = starts[ok], ends[ok]
    return starts, ends, candidates[0, starts, ends], min_null


def _char_span(enc: tokenizers.Encoding, s: int, e: int, align_to_words: bool) -> tuple[int, int]:
    if align_to_words:
        ws, we = enc.token_to_word(s), enc.token_to_word(e)
        cs = enc.word_to_chars(ws, sequence_index=1) if ws is not None else None
        ce = enc.word_to_chars(we, sequence_index=1) if we is not None else None
        if cs is not None and ce is not None:
            return cs[0], ce[1]
    return enc.offsets[s][0], enc.offsets[e][1]


def qa_answers(
    context: str,
    encodings: Sequence[tokenizers.Encoding],
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    tokenizer: Tokenizer,
    top_k: int = 1,
    max_answer_len: int = 15,
    handle_impossible_answer: bool = False,
    align_to_words: bool = True,
) -> list[dict]:
    """The ``top_k`` best answers ``{"answer", "score", "start", "end"}`` (character offsets into ``context``).

    ``start_logits``/``end_logits``: one array per window of :func:`qa_encode`, its length (padding sliced off).
    """
    cls_id = tokenizer.token_to_id(tokenizer.special_tokens.get("cls_token"))
    pre_top_k = top_k * 2 + 10 if align_to_words else top_k  # some candidates vanish when aligned to words
    answers: list[dict] = []
    min_null = 1000000.0
    for enc, st, en in zip(encodings, start_logits, end_logits, strict=True):
        n = len(enc.ids)
        if len(st) != n or len(en) != n:
            raise ValueError(f"expected start/end logits of length {n}, got {len(st)} and {len(en)}")
        allowed = np.array([[sid == 1 or tid == cls_id for sid, tid in zip(enc.sequence_ids, enc.ids)]])
        starts, ends, scores, min_null = _spans(
            np.asarray(st, np.float32)[None],
            np.asarray(en, np.float32)[None],
            allowed,
            pre_top_k,
            max_answer_len,
            min_null,
            handle_impossible_answer,
        )
        for s, e, score in zip(starts, ends, scores):
            a, b = _char_span(enc, int(s), int(e), align_to_words)
            text = context[a:b]
            same = next((x for x in answers if x["answer"].lower() == text.lower()), None)
            if same is not None:
                same["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": a, "end": b, "answer": text})
    if handle_impossible_answer:
        answers.append({"score": min_null, "start": 0, "end": 0, "answer": ""})
    return sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
