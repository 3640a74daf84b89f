"""Linear-layer kernels of ONNX Runtime CPU, interleaved: which quantized MatMul to emit (docs/perf.md).

    python benchmarks/linear_kernels.py                                   # decode: 4 layers of the 1.2B shape
    python benchmarks/linear_kernels.py --rows 128 --configs fp32,mmitf8,nb4_acc4_b32      # prefill rows
    python benchmarks/linear_kernels.py --shapes 2048x102400 --layers 1 --configs nb4_acc4_b32,nb8_acc4_b128
    python benchmarks/linear_kernels.py --rows 128 --session-config session.disable_prepacking=1
    python benchmarks/linear_kernels.py --rows 128 --configs fp32,fp32@session.intra_op.allow_spinning=0
    python benchmarks/linear_kernels.py --rows 16 --configs nb4_acc4_b32,nb4_acc4_b32@exaone.kernels=on

Random weights in each kernel's layout: ``fp32`` MatMul, ``mmitf8`` (QuantizeLinear + MatMulIntegerToFloat,
static per-tensor activation: our int8-sq), ``dqmm`` (DynamicQuantizeMatMul), ``nb{bits}_acc{level}_b{block}``
(MatMulNBits), each optionally followed by ``@KEY=VALUE`` session config entries of its own (an A/B of session
options within one run; ``--session-config`` entries apply to all); ``@exaone.kernels=on`` runs a MatMulNBits
config on our QMatMul kernel (runtime/kernels) as the runtime does. One session per config, ``--threads``;
rounds take turns so a drift of the machine hits all alike; the table gives each config's median time and its
speed against the first config (median of per-round ratios).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import emit, print_table  # noqa: E402

SHAPES_1_2B = "2048x3072,2048x2048,2048x8192,4096x2048"  # qkv, o, gate_up, down of one 1.2B layer


def _linear(kind: str, x: str, name: str, k: int, n: int, rng) -> tuple[list, list]:
    """(nodes, initializers) of one linear ``x @ W`` in the layout ``kind``."""
    if kind == "fp32":
        w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, name)
        return [helper.make_node("MatMul", [x, name], [name + "_y"])], [w]
    if kind in ("mmitf8", "dqmm"):
        inits = [
            numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), name),
            numpy_helper.from_array(np.full(n, 0.01, np.float32), name + "_s"),
        ]
        if kind == "mmitf8":
            node = helper.make_node(
                "MatMulIntegerToFloat",
                [x + "_q", name, x + "_sc", name + "_s", x + "_zp"],
                [name + "_y"],
                domain="com.microsoft",
            )
        else:
            inits.append(numpy_helper.from_array(np.zeros(n, np.int8), name + "_z"))
            node = helper.make_node(
                "DynamicQuantizeMatMul", [x, name, name + "_s", name + "_z"], [name + "_y"], domain="com.microsoft"
            )
        return [node], inits
    m = re.fullmatch(r"nb(\d)_acc(\d)_b(\d+)", kind)
    if m is None:
        raise SystemExit(f"unknown config {kind!r}")
    bits, acc, block = map(int, m.groups())
    nb = -(-k // block)
    inits = [
        numpy_helper.from_array(rng.integers(0, 255, (n, nb, block * bits // 8), dtype=np.uint8), name),
        numpy_helper.from_array(np.full(n * nb, 0.01, np.float32), name + "_s"),
    ]
    node = helper.make_node(
        "MatMulNBits",
        [x, name, name + "_s"],
        [name + "_y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=acc,
    )
    return [node], inits


def build(kind: str, shapes: list[tuple[int, int]], layers: int, rows: int):
    rng = np.random.default_rng(0)
    widths = sorted({k for k, _ in shapes})
    nodes, inits, outs = [], [], []
    if kind == "mmitf8":
        for k in widths:
            inits += [
                numpy_helper.from_array(np.array(0.05, np.float32), f"x{k}_sc"),
                numpy_helper.from_array(np.array(128, np.uint8), f"x{k}_zp"),
            ]
            nodes.append(helper.make_node("QuantizeLinear", [f"x{k}", f"x{k}_sc", f"x{k}_zp"], [f"x{k}_q"]))
    for layer in range(layers):
        for i, (k, n) in enumerate(shapes):
            ns, ins = _linear(kind, f"x{k}", f"w{layer}_{i}", k, n, rng)
            nodes += ns
            inits += ins
            outs.append(ns[-1].output[0])
    nodes.append(helper.make_node("Concat", outs, ["y"], axis=-1))
    graph = helper.make_graph(
        nodes,
        kind,
        [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [rows, k]) for k in widths],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def main(argv=None) -> dict:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--configs",
        default="fp32,mmitf8,nb8_acc4_b32,nb8_acc4_b128,nb4_acc4_b32,nb4_acc0_b32,nb4_acc4_b64,nb4_acc4_b128",
    )
    ap.add_argument("--shapes", default=SHAPES_1_2B, help="comma-separated INxOUT of one layer's linears")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=1, help="activation rows (1: decode; the prompt length: prefill)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--session-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an ONNX Runtime session config entry for every session (session.intra_op.allow_spinning=0, ...)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    configs = args.configs.split(",")
    sessions = {}
    for c in configs:  # KIND[@KEY=VALUE...]: that config's own session entries on top of --session-config
        kind, *entries = c.split("@")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = args.threads, 3
        kernels = "off"
        for entry in args.session_config + entries:
            key, sep, value = entry.partition("=")
            if not sep:
                ap.error(f"session config entry {entry!r}: expected KEY=VALUE")
            if key == "exaone.kernels":
                kernels = value
                continue
            opts.add_session_config_entry(key, value)
        model = build(kind, shapes, args.layers, args.rows).SerializeToString()
        if kernels != "off":  # our QMatMul kernel in place of eligible MatMulNBits, as the runtime does
            from exaone_deploy.runtime.kernels import library, rewrite

            model, _ = rewrite(model)
            opts.register_custom_ops_library(str(library(kernels)))
        sessions[c] = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {f"x{k}": rng.standard_normal((args.rows, k), dtype=np.float32) for k in {k for k, _ in shapes}}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feeds)
    times: dict[str, list[float]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for c, s in sessions.items():
            s.run(None, feeds)  # untimed: wakes this session's thread pool (the previous one's may still spin)
            t = time.perf_counter()
            s.run(None, feeds)
            s.run(None, feeds)
            times[c].append((time.perf_counter() - t) / 2)
    base = np.array(times[configs[0]])
    rows = [
        {"config": c, "ms": 1e3 * float(np.median(ts)), "speed": float(np.median(base / np.array(ts)))}
        for c, ts in times.items()
    ]
    result = {
        "shapes": args.shapes,
        "layers": args.layers,
        "rows": args.rows,
        "threads": args.threads,
        "session_config": args.session_config,
        "results": rows,
    }
    emit(
        result,
        args.json,
        lambda: print_table(rows, [("config", "config"), ("ms", "median ms"), ("speed", f"speed vs {configs[0]}")]),
    )
    return result


if __name__ == "__main__":
    main()
