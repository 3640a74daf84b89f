"""Checkpoint and bundle verbs: ``make-tiny``, ``inspect``, ``export``, ``verify``.

exaone-deploy make-tiny OUT_DIR [--preset 1.2b|32b|1.2b-full|32b-full] [--seed N] [--num-layers N] [--dtype D]
                        [--quantized gptq|awq|fp8|compressed-tensors [--group-size N]]
exaone-deploy inspect MODEL_DIR [--revision REV] [--json] [--target ort|trt] [--dtype D]
exaone-deploy export MODEL_DIR -o BUNDLE_DIR [--revision REV] [--target ort|trt] [--dtype D] [--max-seq-len N]
                     [--kv-cache float|int8] [--accuracy-level 0-4] [--force]
exaone-deploy verify BUNDLE_DIR --reference MODEL_DIR [--revision REV] [--steps N] [--prompt-len N] [--json]

MODEL_DIR is a checkpoint directory, ``tiny`` (the bundled model), or a Hugging Face Hub id ``ORG/NAME``
(exaone_deploy/hub.py: the standard cache, ``HF_TOKEN``, ``HF_HUB_OFFLINE=1``), at ``--revision`` (a branch, tag
or commit; Hub ids only).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .common import quiet_export_tooling

__all__ = [
    "make_tiny_command",
    "inspect_command",
    "export_command",
    "verify_command",
    "revision_option",
    "resolve_model",
]

_DTYPES = click.Choice(["float32", "float16", "bfloat16"])

revision_option = click.option(
    "--revision",
    default=None,
    metavar="REV",
    help="Branch, tag or commit of a Hugging Face Hub id (default: main).",
)


def resolve_model(name: str, revision: str | None) -> Path:
    """A MODEL_DIR argument as a local directory: ``tiny``, a path, or a Hub id at ``revision`` (downloaded or
    served from the cache). ``--revision`` with anything but a Hub id is an error, not silently ignored."""
    from .. import hub
    from ..checkpoint import resolve_model_dir
    from ..errors import InputError

    if revision is not None and not hub.is_repo_id(name):
        raise InputError(
            f"--revision {revision}: {name!r} is not a Hugging Face Hub id (ORG/NAME); a local "
            "directory has no revisions"
        )
    return resolve_model_dir(name, revision)


@click.command("make-tiny")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--preset",
    type=click.Choice(["1.2b", "32b", "1.2b-full", "32b-full"]),
    default="1.2b",
    show_default=True,
    help="1.2b: all global, RoPE everywhere, tied; 32b: LLLG hybrid, NoPE global layers, untied; "
    "*-full: the real models' sizes (random weights, for benchmarks).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--num-layers", type=click.IntRange(min=1), default=None, help="Override the preset's layer count.")
@click.option("--dtype", type=_DTYPES, default=None, help="Storage dtype (default: the preset's).")
@click.option(
    "--quantized",
    type=click.Choice(["gptq", "awq", "fp8", "compressed-tensors"]),
    default=None,
    help="Write the linears pre-quantized in this publisher format (4-bit GPTQ/AWQ/compressed-tensors "
    "codes, FP8 with [128, 128] blocks), as those tools lay them out.",
)
@click.option(
    "--group-size",
    type=int,
    default=32,
    show_default=True,
    help="Quantization group along the input dim for --quantized int formats (-1: whole row).",
)
def make_tiny_command(
    out_dir: Path,
    preset: str,
    seed: int,
    num_layers: int | None,
    dtype: str | None,
    quantized: str | None,
    group_size: int,
) -> None:
    """Write a small random-weight EXAONE 4 checkpoint laid out like the real ones."""
    from ..tiny.make import make_tiny

    if quantized is None:
        click.echo(str(make_tiny(out_dir, preset, seed, num_layers=num_layers, dtype=dtype)))
        return
    import tempfile

    from ..prequant import make_prequantized

    with tempfile.TemporaryDirectory(prefix="make-tiny-") as tmp:
        src = make_tiny(Path(tmp) / "float", preset, seed, num_layers=num_layers, dtype=dtype)
        opts = {} if quantized == "fp8" else {"group_size": group_size}
        click.echo(str(make_prequantized(src, out_dir, quantized, **opts)))


@click.command("inspect")
@click.argument("model_dir")
@revision_option
@click.option("--json", "as_json", is_flag=True, help="Print the spec as JSON.")
@click.option(
    "--target",
    type=click.Choice(["ort", "trt"]),
    default="ort",
    show_default=True,
    help="Target the bundle size estimate of a pre-quantized checkpoint is for.",
)
@click.option(
    "--dtype",
    type=_DTYPES,
    default="float32",
    show_default=True,
    help="Bundle dtype the size estimate of a pre-quantized checkpoint is for.",
)
def inspect_command(model_dir: str, revision: str | None, as_json: bool, target: str, dtype: str) -> None:
    """Show the model spec (per-layer attention plan) parsed from MODEL_DIR/config.json ('tiny' or ORG/NAME
    allowed), and a pre-quantized checkpoint's scheme with the size of the bundle it exports to."""
    from ..spec import load_spec

    model_dir = resolve_model(model_dir, revision)
    spec = load_spec(model_dir)
    quant = _quantization(model_dir, spec, target, dtype)
    if as_json:
        click.echo(json.dumps({**spec.to_json(), **({"quantization": quant} if quant else {})}, indent=2))
        return
    click.echo(
        f"layers {spec.num_layers}, hidden {spec.hidden_size}, heads {spec.num_heads}/{spec.num_kv_heads} "
        f"x {spec.head_dim}, vocab {spec.vocab_size}, tied {spec.tie_word_embeddings}, rope {spec.rope.rope_type}"
    )
    for layer in spec.layers:
        click.echo(f"  {layer.index:3d} {layer.kind:7s} window={layer.window:<6d} rope={'on' if layer.rope else 'off'}")
    if quant:
        group = "whole row" if quant["group_size"] == -1 else quant["group_size"]
        blocks = quant["weight_block_size"] or group
        click.echo(
            f"quantization: {quant['method']} ({quant['format']}), {quant['weight_type']}{quant['bits']}, "
            f"group/block {blocks}, sym {quant['sym']}, act-order {quant['desc_act']}; "
            f"{quant['quantized_linears']} linears quantized"
        )
        click.echo(f"  left unquantized: {', '.join(quant['unquantized'] + quant['kept_in_float'])}")
        lowering = ", ".join(f"{x['form']} block {x['block_size']}" for x in quant["lowering"])
        click.echo(
            f"  {target} {dtype} bundle: {lowering}; weights ~{quant['bundle_weight_bytes'] / 2**20:.1f} MiB "
            f"(checkpoint {quant['checkpoint_bytes'] / 2**20:.1f} MiB)"
        )


def _quantization(model_dir: Path, spec, target: str, dtype: str) -> dict | None:
    """A pre-quantized checkpoint's scheme and bundle estimate (None for a float checkpoint or no weights)."""
    from ..prequant import read_scheme

    if read_scheme(model_dir) is None:
        return None
    from ..checkpoint import Checkpoint
    from ..exporter.prequant_lower import estimate

    return estimate(Checkpoint(model_dir), spec, target, dtype)


@click.command("export")
@click.argument("model_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="Bundle directory.")
@revision_option
@click.option("--target", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--dtype", type=_DTYPES, default="float32", show_default=True)
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=1),
    default=None,
    help="Longest context the bundle supports (default: the config's max_position_embeddings).",
)
@click.option(
    "--kv-cache",
    type=click.Choice(["float", "int8"]),
    default="float",
    show_default=True,
    help="float: the bundle dtype; int8 (ort): quantized cache, a quarter of float32's bytes, with static "
    "scales from the weights (quantize --kv-cache int8 calibrates them).",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=0,
    show_default=True,
    help="Pre-quantized int4/int8 checkpoints on ort: MatMulNBits accuracy level (0: float activations, "
    "exactly the checkpoint's model; 4: int8 activations, as our own int4 bundles: their decode speed, "
    "~1.5x level 0 on the 1.2B shape).",
)
@click.option("--force", is_flag=True, help="Replace an existing bundle (only a bundle or an empty directory).")
@click.option("--no-progress", is_flag=True)
def export_command(
    model_dir: str,
    out_dir: Path,
    revision: str | None,
    target: str,
    dtype: str,
    max_seq_len: int | None,
    kv_cache: str,
    accuracy_level: int,
    force: bool,
    no_progress: bool,
) -> None:
    """Export MODEL_DIR ('tiny' for the bundled model, ORG/NAME for a Hugging Face Hub id) into a self-contained
    bundle (an ort bundle also runs in onnxruntime-genai: docs/runtimes.md)."""
    quiet_export_tooling()
    from ..exporter.export import ExportOptions, export_bundle

    t = time.perf_counter()
    path = export_bundle(
        resolve_model(model_dir, revision),
        out_dir,
        ExportOptions(
            target=target, dtype=dtype, max_seq_len=max_seq_len, kv_cache=kv_cache, accuracy_level=accuracy_level
        ),
        force=force,
        progress=not no_progress,
    )
    click.echo(f"bundle written to {path} ({time.perf_counter() - t:.1f} s)")


@click.command("verify")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option(
    "--reference",
    "model_dir",
    required=True,
    help="The checkpoint the bundle was exported from (a directory or ORG/NAME).",
)
@revision_option
@click.option("--steps", type=click.IntRange(min=0), default=32, show_default=True)
@click.option("--prompt-len", type=click.IntRange(min=1), default=None)
@click.option("--json", "as_json", is_flag=True)
def verify_command(
    bundle_dir: Path, model_dir: str, revision: str | None, steps: int, prompt_len: int | None, as_json: bool
) -> None:
    """Run BUNDLE_DIR in ONNX Runtime beside the PyTorch reference; non-zero exit past tolerance."""
    quiet_export_tooling()
    from ..validate.verify import verify_bundle

    report = verify_bundle(bundle_dir, resolve_model(model_dir, revision), steps=steps, prompt_len=prompt_len)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"{'step':>5} {'max_abs':>10} {'max_rel':>10} {'greedy':>7} {'ok':>3}")
        for r in report["per_step"]:
            click.echo(
                f"{r['step']:>5} {r['max_abs']:>10.3g} {r['max_rel']:>10.3g} "
                f"{'same' if r['greedy_match'] else 'DIFF':>7} {'yes' if r['within_tolerance'] else 'NO':>3}"
            )
        click.echo(
            f"{report['dtype']}: max abs {report['max_abs']:.3g} (tolerance {report['tolerance']}), "
            f"greedy agreement {report['greedy_agreement']:.0%}: {'PASS' if report['ok'] else 'FAIL'}"
        )
    sys.exit(0 if report["ok"] else 1)
