"""Perplexity of a bundle (ONNX Runtime) or a checkpoint (the PyTorch reference) on a text file.

The text is tokenised (data.py formats), cut into consecutive windows of ``seq_len`` tokens, and each window
is scored from an empty cache: ppl = exp(mean over windows and positions 1..L-1 of -log p(token | prefix)).
Both paths use the same windows, so their numbers compare directly.

``trt`` bundles hold TensorRT plugin nodes that ONNX Runtime cannot run; their canonical graph (same
quantized linears, standard attention op) is lowered for ONNX Runtime instead, into a temporary twin that
shares the bundle's weights file, so the TensorRT graph's numerics are measured on the CPU too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import bundle as bundle_mod
from ..checkpoint import resolve_model_dir
from ..text.corpus import CalibrationDataError, token_stream
from ..text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["PplResult", "perplexity", "windows", "log_likelihood", "ort_twin"]


@dataclass
class PplResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    kind: str  # "bundle" or "checkpoint"
    path: str

    def to_json(self) -> dict:
        return asdict(self)


def windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> list[np.ndarray]:
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n = tokens.size // seq_len
    if n == 0:
        raise CalibrationDataError(f"{tokens.size} tokens do not fill one window of {seq_len}; use a shorter --seq-len")
    return [tokens[i * seq_len : (i + 1) * seq_len] for i in range(n)]


def log_likelihood(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of log p(target) over positions: logits (T, V) predict targets (T,)."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))
    return float((x[np.arange(len(targets)), targets] - lse).sum())


def ort_twin(manifest: bundle_mod.Manifest, work: Path) -> bundle_mod.Manifest:
    """An ONNX Runtime-runnable view of a ``trt`` bundle: its canonical graph lowered for ``ort`` in ``work``,
    next to a hard link (or copy) of the weights file."""
    import onnx_ir as ir

    from ..exporter import lower

    files = manifest.data["files"]
    if not files.get("canonical"):
        raise bundle_mod.BundleError(
            f"{manifest.root}: a {manifest.target} bundle without a canonical graph cannot run in ONNX Runtime"
        )
    weights = files.get("weights")
    if weights:
        try:
            os.link(manifest.root / weights, work / weights)
        except OSError:
            shutil.copyfile(manifest.root / weights, work / weights)
    model = ir.load(manifest.root / files["canonical"])
    model = lower.lower(model, manifest.spec, "ort", fuse_linears=False)
    ir.save(model, work / "model.onnx")
    data = json.loads(json.dumps(manifest.data))
    data["target"] = "ort"
    data["files"]["model"] = "model.onnx"
    data.setdefault("io", {}).setdefault("cache", {})["window_cache"] = False  # full-length caches in the twin
    return bundle_mod.Manifest(work, data)


def _bundle_scorer(path: Path, seq_len: int, stack):
    from ..runtime.ort_backend import OrtBackend

    manifest = bundle_mod.load_manifest(path)
    if manifest.target != "ort":
        work = Path(tempfile.mkdtemp(prefix="exaone-ppl-"))
        stack.callback(shutil.rmtree, work, True)
        manifest = ort_twin(manifest, work)
    backend = OrtBackend(manifest, max_batch=1, max_seq_len=seq_len, verify=False)
    return lambda ids: backend.score(ids.tolist(), slot=0, chunk=seq_len)


def _checkpoint_scorer(path: Path, seq_len: int):
    from .reference import ReferenceBackend

    backend = ReferenceBackend(path, max_seq_len=max(seq_len, 1))
    return lambda ids: backend.score(ids.tolist(), slot=0, chunk=seq_len)


def perplexity(
    path: str | Path,
    data: str | Path,
    *,
    seq_len: int = 256,
    max_tokens: int | None = None,
    text_field: str = "text",
    fmt: str = "auto",
    tokens: np.ndarray | None = None,
    progress: bool = False,
) -> PplResult:
    """Perplexity of a bundle directory (ONNX Runtime) or a checkpoint directory (PyTorch reference)."""
    import contextlib

    from tqdm.auto import tqdm

    root = resolve_model_dir(path)
    is_bundle = (root / bundle_mod.MANIFEST).exists()
    if not is_bundle and not (root / "config.json").exists():
        raise bundle_mod.BundleError(f"{root}: neither a bundle (manifest.json) nor a checkpoint (config.json)")
    if tokens is None:
        tok = Tokenizer.from_dir(root)
        tokens, _ = token_stream(data, tok, text_field=text_field, fmt=fmt)
    wins = windows(tokens, seq_len, max_tokens)
    total, count = 0.0, 0
    with contextlib.ExitStack() as stack:
        score = _bundle_scorer(root, seq_len, stack) if is_bundle else _checkpoint_scorer(root, seq_len)
        for w in tqdm(wins, desc="perplexity", unit="window", disable=not progress, leave=False):
            logits = score(w)
            total += log_likelihood(logits[:-1], w[1:])
            count += len(w) - 1
    nll = -total / count
    return PplResult(
        float(np.exp(nll)), nll, count, len(wins), seq_len, "bundle" if is_bundle else "checkpoint", str(root)
    )
