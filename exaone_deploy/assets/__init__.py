"""Files bundled with the package: the default "tiny" model and the corpus it was trained on.

* ``tiny/``: a small EXAONE 4.0-architecture checkpoint (hybrid LLLG attention, global NoPE last layer) trained on
  tinyshakespeare by ``python -m exaone_deploy.tiny.train``; the model ``exaone-deploy demo`` exports and runs.
* ``tinyshakespeare.txt``: Karpathy's tinyshakespeare (public domain Shakespeare, 1,115,394 characters).

The corpus is split by characters at 90%: the first ``len(text) * 9 // 10`` characters are the training split
(``train_text``, also the tokenizer's training text), the rest is the held-out split (``heldout_text``) on which
the model's perplexity is measured. The split falls wherever that index lands, possibly inside a word.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

__all__ = ["assets_dir", "corpus_path", "heldout_text", "split_index", "tiny_model_dir", "train_text"]


def assets_dir() -> Path:
    """The package's assets directory."""
    return Path(__file__).resolve().parent


def tiny_model_dir() -> Path:
    """The bundled tiny EXAONE 4.0 checkpoint directory (config.json, model.safetensors, tokenizer files)."""
    return assets_dir() / "tiny"


def corpus_path() -> Path:
    """The bundled tinyshakespeare corpus."""
    return assets_dir() / "tinyshakespeare.txt"


@lru_cache(maxsize=1)
def _corpus() -> str:
    return corpus_path().read_text(encoding="utf-8")


def split_index(text: str | None = None) -> int:
    """Character index where the held-out split starts: ``len(text) * 9 // 10`` (the bundled corpus by default)."""
    n = len(_corpus() if text is None else text)
    return n * 9 // 10


def train_text() -> str:
    """The first 90% of the corpus, by characters: the model's and the tokenizer's training text."""
    text = _corpus()
    return text[: split_index(text)]


def heldout_text() -> str:
    """The last 10% of the corpus, by characters: never trained on; used to measure perplexity."""
    text = _corpus()
    return text[split_index(text) :]
