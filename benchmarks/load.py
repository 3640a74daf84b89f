"""Load benchmark: a full-size EXAONE-4.0-1.2B-shaped bf16 checkpoint (random weights) into the reference model.

    python benchmarks/load.py [--workdir DIR] [--dtypes bfloat16 float32] [--peers] [--json] [--check]

The checkpoint (the real 1.2B config.json, 1.28e9 parameters, 2.56 GB of bf16) is written once, tensor by
tensor in chunks straight to the safetensors file(s), and cached under ``--workdir``. Each measurement then
runs in a fresh interpreter: import time and the baseline RSS (interpreter + torch + exaone_deploy, before
any weight is read), Checkpoint header open, validation, ``load_reference(dir, dtype)`` time and peak RSS.
The target is peak RSS <= 1.25 x the weights' size in the chosen dtype; the table also gives
(peak - baseline) / weights, the load's own cost. ``--peers`` adds transformers' from_pretrained.
The page cache is warm (the files were just written or read): load times are not cold-disk times.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import add_json_flag, current_rss_bytes, emit, fmt_bytes, peak_rss_bytes, print_table, run_isolated  # noqa: E402

log = logging.getLogger("bench.load")

TARGET = 1.25

# config.json of LGAI-EXAONE/EXAONE-4.0-1.2B (as written by transformers 4.54; see tests/conftest.py).
CONFIG_1_2B = {
    "architectures": ["Exaone4ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 361,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_types": ["full_attention"] * 30,
    "max_position_embeddings": 65536,
    "model_type": "exaone4",
    "num_attention_heads": 32,
    "num_hidden_layers": 30,
    "num_key_value_heads": 8,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 16.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 1000000,
    "sliding_window": None,
    "sliding_window_pattern": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0",
    "use_cache": True,
    "vocab_size": 102400,
}

# Same family, miniature: loaded first in each measuring process to warm torch up (the first model load
# faults in ~150 MB of code and allocator state, once per process, whatever the model's size).
CONFIG_WARMUP = dict(CONFIG_1_2B, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=512,
                     layer_types=["full_attention"] * 2)

CHUNK_ELEMS = 1 << 23  # values drawn per chunk: 32 MB of float32 scratch


# ---- writing the checkpoint ---------------------------------------------------------------------------------


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (in place on x's bits)."""
    bits = x.view(np.uint32)
    rounding = (bits >> 16) & 1
    rounding += 0x7FFF
    rounding += bits
    rounding >>= 16
    return rounding.astype("<u2")


def _write_random_bf16(f, shape: tuple[int, ...], is_norm: bool, rng: np.random.Generator) -> None:
    """Random weights, generated and written in chunks (never the whole tensor in memory)."""
    total = math.prod(shape)
    for start in range(0, total, CHUNK_ELEMS):
        x = rng.standard_normal(min(CHUNK_ELEMS, total - start), dtype=np.float32)
        if is_norm:
            x *= 0.1
            x += 1.0
        else:
            x *= 0.02
        f.write(_bf16_bits(x).tobytes())


def write_checkpoint(workdir: Path, shard_bytes: int = 5 * 10**9, seed: int = 0, config: dict = CONFIG_1_2B,
                     name: str = "exaone-4.0-1.2b") -> tuple[Path, float | None]:
    """Write (or reuse) a random-weight bf16 checkpoint; returns (dir, seconds spent writing or None)."""
    from exaone_deploy.checkpoint import expected_tensors
    from exaone_deploy.spec import spec_from_config

    out = workdir / f"{name}-random-bf16-shard{shard_bytes}-seed{seed}"
    if (out / "config.json").exists():  # only complete checkpoints are renamed into place
        log.info("reusing %s", out)
        return out, None
    spec = spec_from_config(config)
    tensors = sorted(expected_tensors(spec).items())
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes

    workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".load-bench-", dir=workdir))
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    try:
        weight_map, total = {}, 0
        for k, shard in enumerate(shards):
            file = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape in shard:
                nbytes = 2 * math.prod(shape)
                header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
                weight_map[name] = file
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with open(tmp / file, "wb") as f:
                f.write(len(raw).to_bytes(8, "little") + raw)
                for name, shape in shard:
                    _write_random_bf16(f, shape, name.endswith("norm.weight"), rng)
            total += offset
            log.info("wrote %s (%s)", file, fmt_bytes(offset))
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tmp.chmod(0o755)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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

    r = {"run": "exaone_deploy load_reference", "dtype": dtype, "import_s": time.perf_counter() - t0,
         "baseline_rss": current_rss_bytes(), "baseline_peak": peak_rss_bytes()}
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

    r = {"run": "transformers from_pretrained", "dtype": dtype, "import_s": time.perf_counter() - t0,
         "baseline_rss": current_rss_bytes(), "baseline_peak": peak_rss_bytes()}
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
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/exaone-deploy-bench"),
                        help="where the checkpoint is written and cached (default: %(default)s)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shard-gb", type=float, default=5.0,
                        help="max shard size in GB, as transformers' max_shard_size (default 5: one file)")
    parser.add_argument("--repeat", type=int, default=1, help="measure each dtype this many times (fresh processes)")
    parser.add_argument("--peers", action="store_true", help="also measure transformers' from_pretrained")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if a peak RSS / weights ratio > {TARGET}")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    model_dir, write_s = write_checkpoint(args.workdir, int(args.shard_gb * 1e9))
    warmup_dir, _ = write_checkpoint(args.workdir, config=CONFIG_WARMUP, name="warmup-2-layers")
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
        print(f"checkpoint: {model_dir} ({len(files)} file(s), {fmt_bytes(result['checkpoint_bytes'])} bf16"
              + (f", written in {write_s:.1f} s)" if write_s else ", cached)"))
        shown = [dict(r, weights_h=fmt_bytes(r["weights"]), base_h=fmt_bytes(r["baseline_rss"]),
                      warm_h=fmt_bytes(r["warm_rss"]) if "warm_rss" in r else "-",
                      peak_h=fmt_bytes(r["peak_rss"]), ok="yes" if r["meets_target"] else "NO") for r in rows]
        print_table(shown, [("run", "run"), ("dtype", "dtype"), ("weights_h", "weights"),
                            ("load_s", "load s"), ("load_cpu_s", "cpu s"), ("header_ms", "header ms"),
                            ("validate_ms", "validate ms"), ("base_h", "baseline RSS"), ("warm_h", "warm RSS"),
                            ("peak_h", "peak RSS"), ("ratio", "peak/weights"),
                            ("ratio_minus_baseline", "(peak-base)/w"), ("ratio_minus_warm", "(peak-warm)/w"),
                            ("ok", f"peak/weights <= {TARGET}")])
        print("baseline RSS: interpreter + torch + exaone_deploy imported, before any load. warm RSS: after "
              "loading a 2-layer miniature first (torch's one-time warm-up). peak/weights includes both; "
              "the (peak-...)/w columns subtract them. cpu s: user+sys of the load (wall time depends on load).")

    emit(result, args.json, table)
    return 1 if args.check and not all(r["meets_target"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
