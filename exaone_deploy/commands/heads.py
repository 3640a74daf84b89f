"""Verbs that run task-head bundles: ``classify`` and ``qa``. They need no torch, unless given a checkpoint.

exaone-deploy classify MODEL (--text T ... | --input FILE.jsonl) [--top-k K] [--json] [--device cpu|cuda]
exaone-deploy qa MODEL --question Q --context C [--top-k K] [--max-seq-len N] [--doc-stride N] [--json]

MODEL is a head bundle, or a head checkpoint (a directory, a Hub id, or ``tiny-cls``, the bundled Tiny
Shakespeare play classifier), which is exported once into the user cache (as ``demo`` does with ``tiny``).
``--json`` prints one object ``{"results": [...]}``, one entry per input, with transformers' pipeline keys.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click

from .. import __version__
from ..errors import InputError
from .common import device_option

__all__ = ["classify_command", "qa_command", "open_head_model"]


def open_head_model(model: str, device: str = "cpu"):
    """A :class:`~exaone_deploy.runtime.head_backend.HeadModel` over a bundle, or over a checkpoint exported
    into the user cache on first use (keyed by its path and config.json digest, so an edit re-exports)."""
    from ..bundle import MANIFEST, BundleError, load_manifest
    from ..runtime.head_backend import HeadModel

    path = Path(model)
    if (path / MANIFEST).exists():
        return HeadModel(path, device=device)
    from ..checkpoint import resolve_model_dir
    from ..spec import load_spec

    src = resolve_model_dir(model)
    if not (src / "config.json").is_file():
        raise InputError(f"{model}: neither a bundle (manifest.json) nor a checkpoint (config.json)")
    spec = load_spec(src)
    if spec.head.is_lm:
        raise InputError(
            f"{src}: a causal LM checkpoint (no task head); classify and qa run sequence/token "
            "classification and question-answering models"
        )
    from .run import _cache_dir

    key = hashlib.sha256(f"{src.resolve()}\0{spec.config_sha256}".encode()).hexdigest()[:12]
    out = _cache_dir() / f"{src.name}-ort-float32-{__version__}-{key}"
    try:
        load_manifest(out)
    except BundleError:  # absent, partial or stale: export it again
        from ..exporter.export import ExportOptions, export_bundle
        from .common import quiet_export_tooling

        quiet_export_tooling()
        click.echo(f"exporting {model} to {out} ...", err=True)
        export_bundle(src, out, ExportOptions(), force=True, progress=False)
    return HeadModel(out, device=device, verify=False)


def _read_texts(path: Path) -> list[str]:
    """``--input FILE.jsonl``: one JSON object with a string ``text`` per line (or a JSON string)."""
    texts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise InputError(f"{path}:{i}: expected a JSON string or an object with a string 'text'")
        texts.append(text)
    if not texts:
        raise InputError(f"{path}: no inputs")
    return texts


def _emit(results: list, as_json: bool, human) -> None:
    if as_json:
        click.echo(json.dumps({"results": results}, ensure_ascii=False))
        return
    for r in results:
        human(r)


@click.command("classify")
@click.argument("model")
@click.option("--text", "texts", multiple=True, help="A text to classify (repeatable).")
@click.option(
    "--input",
    "input_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help='JSON lines: {"text": ...} (or a JSON string) per line.',
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=None,
    help="Sequence classification: keep the K most probable labels in 'probs' (default: all; the "
    "plain output shows the best, or K).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@device_option
@click.option("--json", "as_json", is_flag=True, help='Print one JSON object {"results": [...]}.')
def classify_command(
    model: str,
    texts: tuple[str, ...],
    input_file: Path | None,
    top_k: int | None,
    batch_size: int,
    device: str,
    as_json: bool,
) -> None:
    """Classify texts with a sequence- or token-classification MODEL (a bundle or a head checkpoint).

    Sequence classification prints each text's label and score (JSON: label, score, probs = label ->
    probability); token classification prints its entities with character spans (JSON: entities, each
    entity_group, score, word, start, end; grouped as transformers' aggregation_strategy="simple").
    MODEL may be 'tiny-cls', the bundled Tiny Shakespeare play classifier:

    \b
        exaone-deploy classify tiny-cls --text "O Romeo, Romeo! wherefore art thou Romeo?"
    """
    if bool(texts) == (input_file is not None):
        raise click.UsageError("give --text (repeatable) or --input FILE.jsonl")
    inputs = list(texts) if texts else _read_texts(input_file)
    head = open_head_model(model, device)
    head.batch_size = batch_size
    results = head.classify(inputs, top_k=top_k)

    def human(r: dict) -> None:
        if "entities" in r:
            click.echo(
                "  ".join(
                    f"{e['entity_group']}:{e['word'].strip()!r}[{e['start']}:{e['end']}] {e['score']:.3f}"
                    for e in r["entities"]
                )
                or "(no entities)"
            )
        else:
            click.echo("  ".join(f"{label} {p:.3f}" for label, p in list(r["probs"].items())[: top_k or 1]))

    _emit(results, as_json, human)


@click.command("qa")
@click.argument("model")
@click.option("--question", required=True, help="The question.")
@click.option("--context", required=True, help="The text to find the answer in.")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True, help="Answers to return.")
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=2),
    default=None,
    help="Tokens per window, question included (default: min(384, the bundle's max_seq_len)).",
)
@click.option(
    "--doc-stride",
    type=click.IntRange(min=0),
    default=None,
    help="Context tokens consecutive windows share (default: min(max_seq_len // 2, 128)).",
)
@click.option(
    "--max-answer-len", type=click.IntRange(min=1), default=15, show_default=True, help="Longest answer, in tokens."
)
@device_option
@click.option("--json", "as_json", is_flag=True, help='Print one JSON object {"results": [...]}.')
def qa_command(
    model: str,
    question: str,
    context: str,
    top_k: int,
    max_seq_len: int | None,
    doc_stride: int | None,
    max_answer_len: int,
    device: str,
    as_json: bool,
) -> None:
    """Answer QUESTION with a span of CONTEXT, using an extractive question-answering MODEL.

    Prints the answer, its score and its character offsets in the context (JSON: answer, score, start, end,
    the best first). Contexts longer than a window are split into overlapping windows, as transformers'
    question-answering pipeline does.
    """
    head = open_head_model(model, device)
    results = head.answer(
        question, context, top_k=top_k, max_seq_len=max_seq_len, doc_stride=doc_stride, max_answer_len=max_answer_len
    )
    if as_json:  # one entry per input; as the pipeline: the answer, or the list of top_k answers
        _emit([results[0] if top_k == 1 else results], True, None)
        return
    for r in results:
        click.echo(f"{r['answer']!r} score {r['score']:.4f} [{r['start']}:{r['end']}]")
