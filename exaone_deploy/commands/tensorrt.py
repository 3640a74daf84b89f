"""TensorRT verbs: ``build`` (an engine bundle from a 'trt' bundle) and ``compare`` (any two bundles).

exaone-deploy build BUNDLE_DIR -o ENGINE_DIR [--max-batch N] [--max-seq-len N] [--opt-level N]
                    [--timing-cache FILE] [--workspace-gib G] [--check-only] [--json] [--force]
exaone-deploy compare BUNDLE_A BUNDLE_B [--steps N] [--prompt-len N] [--seed N] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

__all__ = ["build_command", "compare_command"]


@click.command("build")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Engine bundle directory (required unless --check-only).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Most sequences decoded together (KV-cache slots).",
)
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=1),
    default=None,
    help="Longest context (default: the bundle's max_seq_len).",
)
@click.option(
    "--opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="TensorRT builder optimisation level."
)
@click.option(
    "--timing-cache",
    type=click.Path(path_type=Path),
    default=None,
    help="Timing cache file: read if it exists, written back after the build.",
)
@click.option(
    "--workspace-gib",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Limit TensorRT's workspace memory pool.",
)
@click.option("--check-only", is_flag=True, help="Only run the static checks of the trt graph (no TensorRT needed).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--no-progress", is_flag=True)
def build_command(
    bundle_dir: Path,
    out_dir: Path | None,
    max_batch: int,
    max_seq_len: int | None,
    opt_level: int,
    timing_cache: Path | None,
    workspace_gib: float | None,
    check_only: bool,
    as_json: bool,
    force: bool,
    no_progress: bool,
) -> None:
    """Build a TensorRT engine bundle from a 'trt' bundle (checks the graph first)."""
    if check_only:
        from ..tensorrt.checks import check_bundle

        report = check_bundle(bundle_dir)
        if as_json:
            click.echo(json.dumps(report.to_json(), indent=2))
        else:
            for issue in report.issues:
                click.echo(str(issue))
            click.echo(
                f"{report.path}: {report.nodes} nodes, {report.plugin_nodes} plugin nodes, quantized DQ "
                f"{report.quantization or 'none'}: {'OK' if report.ok else 'FAILED'} "
                f"(op list of TensorRT {report.tensorrt_version})"
            )
        sys.exit(0 if report.ok else 1)
    if out_dir is None:
        raise click.UsageError("missing option '-o' / '--output' (the engine bundle directory)")
    from ..tensorrt.builder import BuildOptions, build_engine

    t = time.perf_counter()
    opts = BuildOptions(
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        opt_level=opt_level,
        timing_cache=timing_cache,
        workspace_gib=workspace_gib,
    )
    path = build_engine(bundle_dir, out_dir, opts, force=force, progress=not no_progress and not as_json)
    if as_json:
        from ..bundle import load_manifest

        click.echo(json.dumps({"engine_bundle": str(path), "tensorrt": load_manifest(path).get("tensorrt")}, indent=2))
    else:
        click.echo(f"engine bundle written to {path} ({time.perf_counter() - t:.1f} s)")


@click.command("compare")
@click.argument("bundle_a", type=click.Path(path_type=Path))
@click.argument("bundle_b", type=click.Path(path_type=Path))
@click.option(
    "--steps", type=click.IntRange(min=0), default=16, show_default=True, help="Decode steps after the prompt."
)
@click.option("--prompt-len", type=click.IntRange(min=1), default=None, help="Random prompt length.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Device for ONNX Runtime bundles (engines always run on the GPU).",
)
@click.option("--json", "as_json", is_flag=True)
def compare_command(
    bundle_a: Path, bundle_b: Path, steps: int, prompt_len: int | None, seed: int, device: str, as_json: bool
) -> None:
    """Run the same inputs through BUNDLE_A and BUNDLE_B; print error statistics of B against A."""
    from ..validate.compare import compare_bundles

    report = compare_bundles(bundle_a, bundle_b, steps=steps, prompt_len=prompt_len, seed=seed, device=device)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    a, b = report["a"], report["b"]
    click.echo(f"A: {a['path']} ({a['target']}, {a['dtype']})")
    click.echo(f"B: {b['path']} ({b['target']}, {b['dtype']})")
    click.echo(
        f"{'output':>8} {'max_abs':>10} {'mean_abs':>10} {'max_rel':>9} {'rel_l2':>9} {'cosine':>10} {'greedy':>7}"
    )
    for r in [*report["outputs"], *report["per_step"]]:
        name = r.get("output") or f"step {r['step']}"
        click.echo(
            f"{name:>8} {r['max_abs']:>10.3g} {r['mean_abs']:>10.3g} {r['max_rel']:>9.3g} {r['rel_l2']:>9.3g} "
            f"{r['cosine']:>10.6f} {r['greedy_agreement']:>7.0%}"
        )
    s = report["summary"]
    click.echo(
        f"prompt {report['prompt_len']} tokens + {report['steps']} steps: max abs {s['max_abs']:.3g}, "
        f"min cosine {s['min_cosine']:.6f}, greedy agreement {s['greedy_agreement']:.0%} "
        f"(prompt positions {s['prompt_greedy_agreement']:.0%})"
    )
