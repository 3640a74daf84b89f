"""Decode-step A/B: several ONNX decoder graphs in ONE process, one decode step each, interleaved.

    python benchmarks/decode_step.py ours=/tmp/exaone-deploy-bench/exaone4-1.2b-shape-fp32-ort/model.onnx \\
        genai=/tmp/exaone-deploy-bench/genai-qwen3-twin-1.2b-shape-fp32/model.onnx
    python benchmarks/decode_step.py ours=BUNDLE/model.onnx "nopack=BUNDLE/model.onnx@session.disable_prepacking=1"

Each ``LABEL=MODEL[@KEY=VALUE...]`` is an ONNX Runtime session (CPU, ``--threads``) with the given session config
entries; the entry ``exaone.kernels=auto|on|off`` is ours: quantized linears on our QMatMul kernel as the runtime
runs them (auto, the default) or on onnxruntime's MatMulNBits (off). Graphs with our bundle's inputs
(``seqlens_k``, ``total_sequence_length``, ``logits_index``) and graphs built by onnxruntime-genai's model
builder (``attention_mask``) are both understood: batch 1, one new token
after ``--past`` cached positions, past and present bound to the same buffers. Rounds of ``--steps`` steps per
session take turns, so a drift of the machine's bandwidth hits every session alike; the table gives each
session's median step time and its speed relative to the first, as the median (min-max) of per-round ratios.
This isolates the graph and session settings from everything else (generation loop, process start, load).

``--profile`` instead runs each session with ONNX Runtime's profiler (``enable_profiling``) for ``--steps`` steps
after the warm-up and tabulates where a step's time goes: kernel time per operator type (ms per step, share of
the step), against the step's wall time (which includes the profiler's own overhead; kernel times do not).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import emit, print_table  # noqa: E402

from exaone_deploy.graph_io import GraphIO  # noqa: E402
from exaone_deploy.runtime.kernels import prepare as prepare_kernels  # noqa: E402


def _session(
    path: str, threads: int, config: dict[str, str], past: int, capacity: int, head_dim: int, profile: str = ""
):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if profile:  # a directory: the trace file is written there
        so.enable_profiling, so.profile_file_prefix = True, str(Path(profile) / "trace")
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    config = dict(config)
    kernels = config.pop("exaone.kernels", None)  # ours: auto (as the runtime), on or off (MatMulNBits)
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    model = prepare_kernels(path, so, dtype="float32", mode=kernels)
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    names = {i.name: i for i in sess.get_inputs()}
    if "attention_mask" in names:
        feeds = {"input_ids": np.full((1, 1), 7, dtype=np.int64), "attention_mask": np.ones((1, past + 1), np.int64)}
    else:
        feeds = GraphIO.extend_inputs(past, [7])
    io = sess.io_binding()
    for name, info in names.items():
        present = GraphIO.present_of(name)
        if present is not None:
            _, heads, length, dim = info.shape
            length = length if isinstance(length, int) else capacity
            dim = dim if isinstance(dim, int) else head_dim
            dtype = np.int8 if info.type == "tensor(int8)" else np.float32  # --kv-cache int8 bundles
            feeds[name] = buf = np.zeros((1, heads, length, dim), dtype)
            io.bind_output(present, "cpu", 0, dtype, list(buf.shape), buf.ctypes.data)
    for name, arr in feeds.items():
        io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
    out = sess.get_outputs()[0]
    logits = np.empty([1, 1, out.shape[-1]], np.float32)
    io.bind_output(out.name, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
    return sess, io, (feeds, logits)


def _spec(text: str) -> tuple[str, str, dict[str, str]]:
    label, sep, rest = text.partition("=")
    if not sep or not rest:
        raise argparse.ArgumentTypeError(f"expected LABEL=MODEL[@KEY=VALUE...], got {text!r}")
    path, *entries = rest.split("@")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{path}: no such model file")
    config = {}
    for e in entries:
        k, sep, v = e.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"session config entry {e!r} is not KEY=VALUE")
        config[k] = v
    return label, path, config


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("models", nargs="+", type=_spec, metavar="LABEL=MODEL[@KEY=VALUE...]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=4, help="decode steps per session per round")
    ap.add_argument("--past", type=int, default=128, help="cached positions before the step")
    ap.add_argument("--head-dim", type=int, default=64, help="cache head size where a graph leaves it symbolic")
    ap.add_argument("--profile", action="store_true", help="ORT profiler: kernel time per operator type")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.profile:
        return profile(args)
    sessions = {}
    for label, path, config in args.models:
        t0 = time.perf_counter()
        sessions[label] = _session(path, args.threads, config, args.past, args.past + 64, args.head_dim)
        print(f"{label}: loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for sess, io, _ in sessions.values():
        for _ in range(3):
            sess.run_with_iobinding(io)
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(args.rounds):
        for label, (sess, io, _) in sessions.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                sess.run_with_iobinding(io)
            times[label].append((time.perf_counter() - t0) / args.steps)
    first = next(iter(times))
    rows = []
    for label, ts in times.items():
        ratios = np.array(times[first]) / np.array(ts)
        rows.append(
            {
                "session": label,
                "step_ms": 1e3 * float(np.median(ts)),
                "min_ms": 1e3 * float(np.min(ts)),
                "speed_vs_first": float(np.median(ratios)),
                "ratio_min": float(ratios.min()),
                "ratio_max": float(ratios.max()),
            }
        )
    result = {"threads": args.threads, "rounds": args.rounds, "steps": args.steps, "past": args.past, "rows": rows}

    def table():
        shown = [dict(r, speed=f"{r['speed_vs_first']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})") for r in rows]
        print_table(
            shown,
            [
                ("session", "session"),
                ("step_ms", "median step ms"),
                ("min_ms", "min ms"),
                ("speed", f"speed vs {first}"),
            ],
        )

    emit(result, args.json, table)
    return result


WARMUP = 3  # unprofiled-equivalent steps before the measured ones (first runs allocate and pre-pack)


def _op_times(trace: list[dict], last_runs: int) -> dict[str, float]:
    """Kernel microseconds per operator type over the last ``last_runs`` runs (``model_run`` events) of a trace."""
    runs = sorted((ev["ts"], ev["ts"] + ev["dur"]) for ev in trace if ev.get("name") == "model_run")[-last_runs:]
    out: dict[str, float] = {}
    for ev in trace:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        if any(a <= ev["ts"] <= b for a, b in runs):
            op = ev.get("args", {}).get("op_name", "?")
            out[op] = out.get(op, 0.0) + float(ev["dur"])
    return out


def profile(args) -> dict:
    """Each session profiled over ``WARMUP`` + ``--steps`` decode steps; kernel time per operator type of the
    last ``--steps`` (the profiler is on from the session's creation; warm-up runs are left out by time)."""
    result = {"threads": args.threads, "steps": args.steps, "past": args.past, "sessions": {}}
    with tempfile.TemporaryDirectory(prefix="decode-profile-") as tmp:
        for label, path, config in args.models:
            sess, io, buffers = _session(  # buffers: bound by address, kept alive while the session runs
                path, args.threads, config, args.past, args.past + 64, args.head_dim, profile=tmp
            )
            for _ in range(WARMUP):
                sess.run_with_iobinding(io)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                sess.run_with_iobinding(io)
            wall = (time.perf_counter() - t0) / args.steps
            with open(sess.end_profiling()) as f:
                ops = _op_times(json.load(f), args.steps)
            kernel_ms = {op: us / args.steps / 1e3 for op, us in ops.items()}
            del sess, io, buffers
            result["sessions"][label] = {"wall_ms": 1e3 * wall, "kernel_ms": kernel_ms}

    def table():
        for label, r in result["sessions"].items():
            total = sum(r["kernel_ms"].values())
            print(f"{label}: {r['wall_ms']:.1f} ms per step (wall, profiled), kernels {total:.1f} ms")
            rows = [
                {"op": op, "ms": ms, "share": f"{100 * ms / total:.1f}%"}
                for op, ms in sorted(r["kernel_ms"].items(), key=lambda kv: -kv[1])
            ]
            print_table(rows, [("op", "operator"), ("ms", "ms per step"), ("share", "of kernel time")])
            print()

    emit(result, args.json, table)
    return result


if __name__ == "__main__":
    main()
