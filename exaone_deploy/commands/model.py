"""Checkpoint and bundle verbs: ``make-tiny``, ``inspect``, ``export``, ``verify``.

exaone-deploy make-tiny OUT_DIR [--preset 1.2b|32b|1.2b-full|32b-full] [--seed N] [--num-layers N] [--dtype D]
exaone-deploy inspect MODEL_DIR [--json]
exaone-deploy export MODEL_DIR -o BUNDLE_DIR [--target ort|trt] [--dtype D] [--max-seq-len N] [--kv-cache float|int8]
                     [--force]
exaone-deploy verify BUNDLE_DIR --reference MODEL_DIR [--steps N] [--prompt-len N] [--json]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .common import quiet_export_tooling

__all__ = ["make_tiny_command", "inspect_command", "export_command", "verify_command"]

_DTYPES = click.Choice(["float32", "float16", "bfloat16"])


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
def make_tiny_command(out_dir: Path, preset: str, seed: int, num_layers: int | None, dtype: str | None) -> None:
    """Write a small random-weight EXAONE 4 checkpoint laid out like the real ones."""
    from ..tiny.make import make_tiny

    click.echo(str(make_tiny(out_dir, preset, seed, num_layers=num_layers, dtype=dtype)))


@click.command("inspect")
@click.argument("model_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the spec as JSON.")
def inspect_command(model_dir: str, as_json: bool) -> None:
    """Show the model spec (per-layer attention plan) parsed from MODEL_DIR/config.json ('tiny' allowed)."""
    from ..checkpoint import resolve_model_dir
    from ..spec import load_spec

    spec = load_spec(resolve_model_dir(model_dir))
    if as_json:
        click.echo(json.dumps(spec.to_json(), indent=2))
        return
    click.echo(
        f"layers {spec.num_layers}, hidden {spec.hidden_size}, heads {spec.num_heads}/{spec.num_kv_heads} "
        f"x {spec.head_dim}, vocab {spec.vocab_size}, tied {spec.tie_word_embeddings}, rope {spec.rope.rope_type}"
    )
    for layer in spec.layers:
        click.echo(f"  {layer.index:3d} {layer.kind:7s} window={layer.window:<6d} rope={'on' if layer.rope else 'off'}")


@click.command("export")
@click.argument("model_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="Bundle directory.")
@click.option("--target", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--dtype", type=_DTYPES, default="float32", show_default=True)
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=1),
    default=None,
    help="Longest context the bundle supports (default: the config's max_position_embeddings).",
)
@click.option("--kv-cache", type=click.Choice(["float", "int8"]), default="float", show_default=True,
              help="float: the bundle dtype; int8 (ort): quantized cache, a quarter of float32's bytes, with static "
              "scales from the weights (quantize --kv-cache int8 calibrates them).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--no-progress", is_flag=True)
def export_command(
    model_dir: str, out_dir: Path, target: str, dtype: str, max_seq_len: int | None, force: bool, no_progress: bool,
    kv_cache: str = "float",
) -> None:
    """Export MODEL_DIR ('tiny' for the bundled model) into a self-contained bundle."""
    quiet_export_tooling()
    from ..exporter.export import ExportOptions, export_bundle

    t = time.perf_counter()
    path = export_bundle(
        model_dir,
        out_dir,
        ExportOptions(target=target, dtype=dtype, max_seq_len=max_seq_len, kv_cache=kv_cache),
        force=force,
        progress=not no_progress,
    )
    click.echo(f"bundle written to {path} ({time.perf_counter() - t:.1f} s)")


@click.command("verify")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--reference", "model_dir", required=True, help="The checkpoint the bundle was exported from.")
@click.option("--steps", type=click.IntRange(min=0), default=32, show_default=True)
@click.option("--prompt-len", type=click.IntRange(min=1), default=None)
@click.option("--json", "as_json", is_flag=True)
def verify_command(bundle_dir: Path, model_dir: str, steps: int, prompt_len: int | None, as_json: bool) -> None:
    """Run BUNDLE_DIR in ONNX Runtime beside the PyTorch reference; non-zero exit past tolerance."""
    quiet_export_tooling()
    from ..validate.verify import verify_bundle

    report = verify_bundle(bundle_dir, model_dir, steps=steps, prompt_len=prompt_len)
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
