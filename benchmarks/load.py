"""Load benchmark: a full-size EXAONE-4.0-1.2B-shaped bf16 checkpoint (random weights) into the reference model.

    python benchmarks/load.py [--workdir DIR] [--dtypes bfloat16 float32] [--peers] [--json] [--check]

The checkpoint (``make_tiny(dir, "1.2b-full", dtype="bfloat16")``: the real 1.2B config.json, 1.28e9
parameters, 2.56 GB of bf16) is written once, tensor by tensor, and cached under ``--workdir``. Each measurement then
runs in a fresh interpreter: import time and the baseline RSS (interpreter + torch + exaone_deploy, before
any weight is read), Checkpoint header open, validation, ``load_reference(dir, dtype)`` time and peak RSS.
The target is peak RSS <= 1.25 x the weights' size in the chosen dtype; the table also gives
(peak - baseline) / weights, the load's own cost. ``--peers`` adds transformers' from_pretrained.
The page cache is warm (the files were just written or read): load times are not cold-disk times.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import add_json_flag, current_rss_bytes, emit, fmt_bytes, peak_rss_bytes, print_table, run_isolated  # noqa: E402

log = logging.getLogger("bench.load")

TARGET = 1.25

# ---- the checkpoint ---------------------------------------------------------------------------------------------


def write_checkpoint(
    workdir: Path, preset: str = "1.2b-full", num_layers: int | None = None, seed: int = 0
) -> tuple[Path, float | None]:
    """Write (or reuse) a random-weight bf16 checkpoint with make-tiny's preset (the real 1.2B config for
    "1.2b-full", written tensor by tensor); returns (dir, seconds spent writing or None when cached)."""
    from exaone_deploy.tiny.make import make_tiny

    out = workdir / f"{preset}{f'-{num_layers}-layers' if num_layers else ''}-random-bf16-seed{seed}"
    if (out / "config.json").exists():  # only complete checkpoints are renamed into place
        log.info("reusing %s", out)
        return out, None
    t0 = time.perf_counter()
    make_tiny(out, preset, seed, num_layers=num_layers, dtype="bfloat16")
    return out, time.perf_counter() - t0


# ---- measurements (each in a fresh interpreter) ---------------------------------------------------------------


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_ours(model_dir: str, dtype: str, warmup_dir: str) -> dict:
    t0 = time.perf_counter()
    import torch  # noqa: F401

    from exaone_deploy.checkpoint import Checkpoint
    from exaone_deploy.exporter.reference import load_reference
    from exaone_deploy.spec import load_spec

    r = {
        "run": "exaone_deploy load_reference",
        "dtype": dtype,
        "import_s": time.perf_counter() - t0,
        "baseline_rss": current_rss_bytes(),
        "baseline_peak": peak_rss_bytes(),
    }
    load_reference(warmup_dir, dtype)  # result dropped at once
    r["warm_rss"] = current_rss_bytes()
    t0 = time.perf_counter()
    ckpt = Checkpoint(model_dir)
    r["header_ms"] = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    ckpt.validate(load_spec(model_dir))
    r["validate_ms"] = 1e3 * (time.perf_counter() - t0)
    r["file_bytes"] = ckpt.nbytes
    del ckpt
    t0, c0 = time.perf_counter(), _cpu_s()
    model = load_reference(model_dir, dtype)
    r["load_s"], r["load_cpu_s"] = time.perf_counter() - t0, _cpu_s() - c0
    r["peak_rss"], r["rss_after"] = peak_rss_bytes(), current_rss_bytes()
    r["weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
    r["buffers"] = sum(b.numel() * b.element_size() for b in model.buffers())
    r["params"] = sum(p.numel() for p in model.parameters())
    return r


def measure_transformers(model_dir: str, dtype: str) -> dict:
    t0 = time.perf_counter()
    import torch
    import transformers

    r = {
        "run": "transformers from_pretrained",
        "dtype": dtype,
        "import_s": time.perf_counter() - t0,
        "baseline_rss": current_rss_bytes(),
        "baseline_peak": peak_rss_bytes(),
    }
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t0, c0 = time.perf_counter(), _cpu_s()
    model = transformers.Exaone4ForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    r["load_s"], r["load_cpu_s"] = time.perf_counter() - t0, _cpu_s() - c0
    r["peak_rss"], r["rss_after"] = peak_rss_bytes(), current_rss_bytes()
    r["weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
    r["params"] = sum(p.numel() for p in model.parameters())
    return r


def _derive(r: dict) -> dict:
    r["ratio"] = r["peak_rss"] / r["weights"]
    r["ratio_minus_baseline"] = (r["peak_rss"] - r["baseline_rss"]) / r["weights"]
    if "warm_rss" in r:
        r["ratio_minus_warm"] = (r["peak_rss"] - r["warm_rss"]) / r["weights"]
    r["meets_target"] = r["ratio"] <= TARGET
    return r


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/exaone-deploy-bench"),
        help="where the checkpoint is written and cached (default: %(default)s)",
    )
    parser.add_argument(
        "--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float16", "float32"]
    )
    parser.add_argument("--repeat", type=int, default=1, help="measure each dtype this many times (fresh processes)")
    parser.add_argument("--peers", action="store_true", help="also measure transformers' from_pretrained")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if a peak RSS / weights ratio > {TARGET}")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    model_dir, write_s = write_checkpoint(args.workdir)
    # A miniature of the same family, loaded first in each measuring process to warm torch up (the first model
    # load faults in ~150 MB of code and allocator state, once per process, whatever the model's size).
    warmup_dir, _ = write_checkpoint(args.workdir, "1.2b", num_layers=2)
    files = sorted(model_dir.glob("*.safetensors"))
    rows = []
    for dtype in args.dtypes:
        for rep in range(args.repeat):
            rows.append(_derive(run_isolated(measure_ours, str(model_dir), dtype, str(warmup_dir))) | {"rep": rep})
        if args.peers:
            rows.append(_derive(run_isolated(measure_transformers, str(model_dir), dtype)))
    result = {
        "checkpoint": str(model_dir),
        "checkpoint_files": [f.name for f in files],
        "checkpoint_bytes": sum(f.stat().st_size for f in files),
        "write_s": write_s,
        "target_ratio": TARGET,
        "rows": rows,
    }

    def table():
        print(
            f"checkpoint: {model_dir} ({len(files)} file(s), {fmt_bytes(result['checkpoint_bytes'])} bf16"
            + (f", written in {write_s:.1f} s)" if write_s else ", cached)")
        )
        shown = [
            dict(
                r,
                weights_h=fmt_bytes(r["weights"]),
                base_h=fmt_bytes(r["baseline_rss"]),
                warm_h=fmt_bytes(r["warm_rss"]) if "warm_rss" in r else "-",
                peak_h=fmt_bytes(r["peak_rss"]),
                ok="yes" if r["meets_target"] else "NO",
            )
            for r in rows
        ]
        print_table(
            shown,
            [
                ("run", "run"),
                ("dtype", "dtype"),
                ("weights_h", "weights"),
                ("load_s", "load s"),
                ("load_cpu_s", "cpu s"),
                ("header_ms", "header ms"),
                ("validate_ms", "validate ms"),
                ("base_h", "baseline RSS"),
                ("warm_h", "warm RSS"),
                ("peak_h", "peak RSS"),
                ("ratio", "peak/weights"),
                ("ratio_minus_baseline", "(peak-base)/w"),
                ("ratio_minus_warm", "(peak-warm)/w"),
                ("ok", f"peak/weights <= {TARGET}"),
            ],
        )
        print(
            "baseline RSS: interpreter + torch + exaone_deploy imported, before any load. warm RSS: after "
            "loading a 2-layer miniature first (torch's one-time warm-up). peak/weights includes both; "
            "the (peak-...)/w columns subtract them. cpu s: user+sys of the load (wall time depends on load)."
        )

    emit(result, args.json, table)
    return 1 if args.check and not all(r["meets_target"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
