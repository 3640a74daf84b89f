"""Quantization verbs: ``quantize``, ``eval-ppl``, ``sensitivity``.

exaone-deploy quantize MODEL_DIR -o BUNDLE_DIR --scheme int8-sq|fp8|int4-awq|int4-rtn --calib-data FILE
                       [--revision REV] [--kv-cache float|int8] ...
exaone-deploy eval-ppl (BUNDLE_DIR | MODEL_DIR) --data FILE [--revision REV] [--seq-len L] [--max-tokens N] [--json]

MODEL_DIR: a checkpoint directory, ``tiny``, or a Hugging Face Hub id ORG/NAME (``--revision``: commands/model.py).
exaone-deploy sensitivity MODEL_DIR --scheme S --calib-data FILE --data FILE [--json]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..text.corpus import FORMATS
from .common import quiet_export_tooling
from .model import resolve_model, revision_option

__all__ = ["quantize_command", "eval_ppl_command", "sensitivity_command"]


def _calibration_options(f):
    options = [
        click.option(
            "--scheme",
            required=True,
            type=click.Choice(["int8-sq", "fp8", "int4-awq", "int4-rtn"]),
            help="int8-sq: W8A8 SmoothQuant; fp8: E4M3 weights and activations; int4-awq / int4-rtn: "
            "4-bit weights (activation-aware or round-to-nearest).",
        ),
        click.option(
            "--calib-data",
            type=click.Path(path_type=Path, dir_okay=False),
            help='Calibration text: plain text, JSONL with a text field, or chat JSONL ({"messages": ...}).',
        ),
        click.option("--calib-samples", type=click.IntRange(min=1), default=64, show_default=True),
        click.option("--calib-seq-len", type=click.IntRange(min=2), default=256, show_default=True),
        click.option("--text-field", default="text", show_default=True, help="JSONL field holding the text."),
        click.option("--data-format", type=click.Choice(FORMATS), default="auto", show_default=True),
        click.option("--seed", type=int, default=0, show_default=True, help="Picks the calibration samples."),
        click.option("--target", type=click.Choice(["ort", "trt"]), default="ort", show_default=True),
        click.option(
            "--keep-float",
            "keep_float",
            multiple=True,
            help="Linears to leave in float: layer indices (3, 0-2), lm_head, or names (mlp.down_proj, "
            "layers.3.self_attn.o_proj); comma-separated or repeated.",
        ),
        click.option(
            "--block-size",
            type=click.Choice(["32", "64", "128"]),
            default="32",
            show_default=True,
            help="INT4 block size (input rows per scale).",
        ),
        click.option(
            "--alpha",
            type=click.FloatRange(0.0, 1.0),
            default=0.5,
            show_default=True,
            help="SmoothQuant migration strength.",
        ),
        click.option(
            "--method",
            type=click.Choice(["max", "percentile", "entropy"]),
            default="max",
            show_default=True,
            help="Activation range calibration (int8-sq, fp8).",
        ),
        click.option(
            "--percentile", type=click.FloatRange(0.0, 100.0, min_open=True), default=99.99, show_default=True
        ),
        click.option(
            "--max-seq-len",
            type=click.IntRange(min=1),
            default=None,
            help="Longest context of the bundle (default: the config's).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _options(kw: dict):
    from ..calibration.quantize import QuantOptions

    return QuantOptions(
        scheme=kw["scheme"],
        calib_data=kw["calib_data"],
        target=kw["target"],
        calib_samples=kw["calib_samples"],
        calib_seq_len=kw["calib_seq_len"],
        seed=kw["seed"],
        text_field=kw["text_field"],
        data_format=kw["data_format"],
        keep_float=tuple(kw["keep_float"]),
        block_size=int(kw["block_size"]),
        alpha=kw["alpha"],
        method=kw["method"],
        percentile=kw["percentile"],
        max_seq_len=kw["max_seq_len"],
        kv_cache=kw.get("kv_cache", "float"),
    )


@click.command("quantize")
@click.argument("model_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="Bundle directory.")
@revision_option
@_calibration_options
@click.option(
    "--kv-cache",
    type=click.Choice(["float", "int8"]),
    default="float",
    show_default=True,
    help="int8 (ort): INT8 KV cache with per-channel scales calibrated on the quantized graph.",
)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--no-progress", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the quantization record as JSON.")
def quantize_command(
    model_dir: str, out_dir: Path, revision: str | None, force: bool, no_progress: bool, as_json: bool, **kw
) -> None:
    """Quantize MODEL_DIR (a checkpoint, 'tiny', ORG/NAME, or a float32 bundle) into a bundle."""
    quiet_export_tooling()
    from ..calibration.quantize import quantize

    t = time.perf_counter()
    info = quantize(
        resolve_model(model_dir, revision), out_dir, _options(kw), force=force, progress=not no_progress and not as_json
    )
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    calib = info.get("calibration") or {}
    click.echo(
        f"{info['scheme']} bundle for {info['target']} written to {out_dir} ({time.perf_counter() - t:.1f} s): "
        f"{info['quantized']} linears quantized, {len(info['keep_float'])} kept float"
        + (f"; calibrated on {calib['samples']} x {calib['seq_len']} tokens of {calib['file']}" if calib else "")
    )


@click.command("eval-ppl")
@click.argument("path")
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Evaluation text (plain, JSONL or chat JSONL).",
)
@click.option(
    "--seq-len",
    type=click.IntRange(min=2),
    default=256,
    show_default=True,
    help="Window length: each window is scored from an empty cache.",
)
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Use only the first N tokens.")
@click.option("--text-field", default="text", show_default=True)
@click.option("--data-format", type=click.Choice(FORMATS), default="auto", show_default=True)
@revision_option
@click.option("--json", "as_json", is_flag=True, help='Print {"ppl": ..., ...}.')
def eval_ppl_command(
    path: str,
    data: Path,
    seq_len: int,
    max_tokens: int | None,
    text_field: str,
    data_format: str,
    revision: str | None,
    as_json: bool,
) -> None:
    """Perplexity of a bundle (ONNX Runtime) or a checkpoint (PyTorch reference; a directory or ORG/NAME) on a
    text file."""
    from ..validate.ppl import perplexity

    r = perplexity(
        resolve_model(path, revision),
        data,
        seq_len=seq_len,
        max_tokens=max_tokens,
        text_field=text_field,
        fmt=data_format,
        progress=not as_json,
    )
    if as_json:
        click.echo(json.dumps(r.to_json()))
    else:
        click.echo(
            f"ppl {r.ppl:.4f}  (nll {r.nll:.4f} over {r.tokens} tokens, {r.windows} windows of {r.seq_len}, "
            f"{r.kind} {r.path})"
        )


@click.command("sensitivity")
@click.argument("model_dir")
@_calibration_options
@click.option(
    "--data",
    "eval_data",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Evaluation text for the perplexity (keep it apart from the calibration text).",
)
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=2), default=16384, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def sensitivity_command(model_dir: str, eval_data: Path, seq_len: int, max_tokens: int, as_json: bool, **kw) -> None:
    """Perplexity added by quantizing each decoder layer (and the LM head) alone: what to --keep-float."""
    quiet_export_tooling()
    from ..calibration.sensitivity import format_table, sensitivity

    report = sensitivity(
        model_dir, eval_data, _options(kw), seq_len=seq_len, max_tokens=max_tokens, progress=not as_json
    )
    click.echo(json.dumps(report, indent=2) if as_json else format_table(report))
