"""Calibration and evaluation text: files -> documents -> token samples.

Three file formats, detected from the content (or forced with ``fmt``):

* ``text``: a plain UTF-8 text file, one document (any language mix: Korean and English in one file is fine).
* ``jsonl``: one JSON object per line with the text in a field (``text`` unless ``text_field`` says otherwise).
* ``chat``: one JSON object per line with ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with
  the model's chat template (the bundle's or checkpoint's tokenizer files) exactly as the runtime renders
  prompts, so calibration sees the special tokens and layout the model sees in service.

Documents are tokenised one by one and concatenated into one token stream; ``calibration_samples`` cuts it into
``n`` non-overlapping windows of ``seq_len`` tokens chosen by a seeded generator (same file, tokenizer and seed
-> the same samples). Every problem is a :class:`CalibrationDataError` that names the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ExaoneDeployError
from .tokenizer import Tokenizer

__all__ = [
    "CalibrationDataError",
    "CalibrationSet",
    "FORMATS",
    "read_documents",
    "token_stream",
    "calibration_samples",
    "split_text",
]

FORMATS = ("auto", "text", "jsonl", "chat")


class CalibrationDataError(ExaoneDeployError, ValueError):
    """A calibration or evaluation file we cannot use; the message names the file and the problem."""


@dataclass(frozen=True)
class CalibrationSet:
    tokens: np.ndarray  # int64 (samples, seq_len)
    path: Path
    sha256: str
    format: str
    stream_tokens: int  # tokens in the whole file
    seed: int

    @property
    def samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def describe(self) -> dict:
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "format": self.format,
            "samples": self.samples,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "file_tokens": self.stream_tokens,
        }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise CalibrationDataError(f"{path}: file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CalibrationDataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise CalibrationDataError(f"{path}: the file is empty")
    return text


def _json_lines(path: Path, text: str) -> list[tuple[int, dict]]:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise CalibrationDataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append((lineno, record))
    return records


def _detect(text: str) -> str:
    first = text.lstrip()
    if not first.startswith("{"):
        return "text"
    try:
        record = json.loads(first.splitlines()[0])
    except json.JSONDecodeError:
        return "text"
    if isinstance(record, dict) and "messages" in record:
        return "chat"
    return "jsonl" if isinstance(record, dict) else "text"


def read_documents(
    path: str | Path, tokenizer: Tokenizer | None = None, *, text_field: str = "text", fmt: str = "auto"
) -> tuple[list[str], str]:
    """The documents of a calibration file and the format used. ``tokenizer`` is needed for chat files."""
    path = Path(path)
    if fmt not in FORMATS:
        raise CalibrationDataError(f"{path}: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    text = _read_text(path)
    if fmt == "auto":
        fmt = _detect(text)
    if fmt == "text":
        return [text], fmt
    records = _json_lines(path, text)
    if not records:
        raise CalibrationDataError(f"{path}: the file has no JSON records")
    docs = []
    for lineno, record in records:
        if fmt == "chat":
            messages = record.get("messages")
            if not isinstance(messages, list) or not messages:
                raise CalibrationDataError(f"{path}:{lineno}: a chat record needs a non-empty 'messages' list")
            for m in messages:
                if not isinstance(m, dict) or "role" not in m:
                    raise CalibrationDataError(f"{path}:{lineno}: each message needs a 'role' (and 'content')")
            if tokenizer is None:
                raise CalibrationDataError(f"{path}: chat records need the model's tokenizer to render them")
            try:
                doc = tokenizer.apply_chat_template(
                    messages, tools=record.get("tools"), add_generation_prompt=False, tokenize=False
                )
            except Exception as e:  # jinja errors, missing template
                raise CalibrationDataError(f"{path}:{lineno}: cannot render the chat template ({e})") from None
        else:
            if text_field not in record:
                fields = ", ".join(sorted(record)) or "none"
                raise CalibrationDataError(
                    f"{path}:{lineno}: no {text_field!r} field (fields: {fields}); pass --text-field NAME"
                )
            doc = record[text_field]
            if not isinstance(doc, str):
                raise CalibrationDataError(
                    f"{path}:{lineno}: field {text_field!r} is {type(doc).__name__}, not a string"
                )
        if doc.strip():
            docs.append(doc)
    if not docs:
        raise CalibrationDataError(f"{path}: every record's text is empty")
    return docs, fmt


def token_stream(
    path: str | Path, tokenizer: Tokenizer, *, text_field: str = "text", fmt: str = "auto"
) -> tuple[np.ndarray, str]:
    """All documents of a file tokenised (no special tokens added) and concatenated: int64 (tokens,)."""
    docs, fmt = read_documents(path, tokenizer, text_field=text_field, fmt=fmt)
    ids = [np.asarray(tokenizer.encode(d), dtype=np.int64) for d in docs]
    stream = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if stream.size == 0:
        raise CalibrationDataError(f"{path}: the text gives no tokens")
    return stream, fmt


def calibration_samples(
    path: str | Path,
    tokenizer: Tokenizer,
    samples: int,
    seq_len: int,
    *,
    seed: int = 0,
    text_field: str = "text",
    fmt: str = "auto",
) -> CalibrationSet:
    """``samples`` non-overlapping windows of ``seq_len`` tokens, picked deterministically for ``seed``."""
    path = Path(path)
    if samples <= 0 or seq_len <= 1:
        raise CalibrationDataError(f"{path}: need at least 1 sample of at least 2 tokens (asked {samples} x {seq_len})")
    stream, fmt = token_stream(path, tokenizer, text_field=text_field, fmt=fmt)
    windows = stream.size // seq_len
    if windows < samples:
        raise CalibrationDataError(
            f"{path}: {stream.size} tokens give only {windows} samples of {seq_len} tokens but {samples} were asked "
            f"({samples * seq_len} tokens); use a longer file, fewer --calib-samples or a shorter --calib-seq-len"
        )
    rng = np.random.default_rng(seed)
    offset = int(rng.integers(0, stream.size - windows * seq_len + 1))
    starts = offset + seq_len * np.sort(rng.choice(windows, size=samples, replace=False))
    tokens = np.stack([stream[s : s + seq_len] for s in starts])
    return CalibrationSet(tokens, path, _sha256(path), fmt, int(stream.size), seed)


def split_text(text: str, fraction: float) -> tuple[str, str]:
    """Split a corpus at a line boundary near ``fraction`` of its characters: (head, tail).

    The benchmark calibrates on the head (first 90%) and measures perplexity on the tail, never seen in
    calibration.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    cut = text.find("\n", int(len(text) * fraction))
    cut = len(text) if cut < 0 else cut + 1
    return text[:cut], text[cut:]
