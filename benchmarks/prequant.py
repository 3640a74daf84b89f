"""Decode-step speed of imported GPTQ/AWQ 4-bit linears against our own int4 linears (ONNX Runtime CPU).

What differs between an imported 4-bit bundle and one we quantize ourselves is only the linears' MatMulNBits
nodes (zero points or not, ``accuracy_level``, an act-order Gather); attention, norms, embeddings and the LM head
are the same graph. So this measures exactly that part at the EXAONE 4.0 1.2B shape (hidden 2048, q 2048,
kv 512, intermediate 4096): one decoder layer's seven linears (q/k/v/o, gate/up/down) at batch 1, one token
(a decode step), with random weights packed by the real lowering code (``exporter.prequant_lower`` for the
imports, ``calibration.numerics.pack_matmulnbits`` for ours), each variant timed in the same process,
interleaved over rounds (median of per-round best).

Variants: ``ours`` (symmetric int4, no zero points, accuracy_level 4, as ``quantize int4-*`` writes),
``gptq-sym`` / ``awq`` (zero points) / ``gptq-actorder`` (zero points + Gather) at accuracy_level 0 (the import's
default: activations stay float, the bundle computes the checkpoint's dequantized model) and 4.

    python benchmarks/prequant.py [--block 128] [--rounds 20] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import add_json_flag, emit, print_table  # noqa: E402

HIDDEN, Q, KV, FFN = 2048, 2048, 512, 4096
LINEARS = {
    "q_proj": (Q, HIDDEN),
    "k_proj": (KV, HIDDEN),
    "v_proj": (KV, HIDDEN),
    "o_proj": (HIDDEN, Q),
    "gate_proj": (FFN, HIDDEN),
    "up_proj": (FFN, HIDDEN),
    "down_proj": (HIDDEN, FFN),
}


def _layer_model(variant: str, block: int, level: int, tmp: Path) -> str:
    """An ONNX model: x [1, 1, 2048] -> the seven linears of one layer (outputs summed per input width)."""
    import onnx_ir as ir

    from exaone_deploy.calibration.numerics import pack_matmulnbits, quantize_int4
    from exaone_deploy.exporter import prequant_lower as pl
    from exaone_deploy.prequant import IntWeight, PrequantScheme
    from exaone_deploy.prequant.pack import act_order_g_idx, quantize_int

    rng = np.random.default_rng(0)
    x = ir.Value(name="x", shape=ir.Shape([1, 1, HIDDEN]), type=ir.TensorType(ir.DataType.FLOAT))
    xf = ir.Value(name="xf", shape=ir.Shape([1, 1, FFN]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x, xf], [], nodes=[], opset_imports={"": 21, "com.microsoft": 1}, name="layer")
    rw = pl._Rewriter(graph, "float32", level)
    outputs = []
    groups = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
    shared = {g: rng.random(LINEARS[g[0]][1]) for g in groups}
    for name, (out, inp) in LINEARS.items():
        w = rng.standard_normal((out, inp)).astype(np.float32) * 0.02
        src = xf if inp == FFN else x
        mm = ir.node("MatMul", [src, src], name=name)  # placeholder the lowering replaces
        graph.append(mm)
        if variant == "ours":
            q, scale = quantize_int4(w.T, block)
            packed, flat = pack_matmulnbits(q, scale, block)
            b = rw.init(f"{name}.nbits", lambda p=packed: p, ir.DataType.UINT8, packed.shape)
            s = rw.init(f"{name}.scale", lambda f=flat: f, ir.DataType.FLOAT, flat.shape)
            attrs = {"K": inp, "N": out, "bits": 4, "block_size": block, "accuracy_level": 4}
            new = ir.node("MatMulNBits", [src, b, s], attributes=attrs, domain="com.microsoft", name=name)
            ir.convenience.replace_nodes_and_values(graph, mm, [mm], [new], list(mm.outputs), list(new.outputs))
            outputs.append(new.outputs[0])
            continue
        sym = variant == "gptq-sym"
        # GPTQ's order is its input's (Hessian): q/k/v share one, gate/up another, so the lowering shares Gathers
        # (down_proj's fold into gate/up needs the silu the full graph has: here it keeps its Gather, 4 a layer)
        importance = shared[next(g for g in shared if name in g)] if variant == "gptq-actorder" else None
        g_idx = act_order_g_idx(w, block, importance) if importance is not None else None
        iw: IntWeight = quantize_int(w, 4, block, sym=sym, g_idx=g_idx)
        scheme = PrequantScheme(
            "awq" if variant == "awq" else "gptq",
            4,
            block,
            sym=sym,
            zero_point=True,
            desc_act=g_idx is not None,
            checkpoint_format="gptq_v2",
        )
        plan = pl.LinearPlan(f"m.{name}", out, inp, 4, block, block, "matmulnbits")
        lin = pl._Linear.__new__(pl._Linear)
        lin.scheme, lin.plan, lin.perm, lin.input_permuted, lin.out_perm = scheme, plan, None, False, None
        if g_idx is not None:
            lin.perm = np.argsort(g_idx, kind="stable")
        lin.__dict__["weight"] = (
            IntWeight(iw.codes[:, lin.perm], iw.scales, iw.zeros, iw.g_idx[lin.perm], 4, block)
            if lin.perm is not None
            else iw
        )
        pl._lower_one(rw, mm, lin, "ort")
        outputs.append(next(n for n in graph if n.name == name and n.op_type == "MatMulNBits").outputs[0])
    for i, v in enumerate(outputs):
        v.name = f"y{i}"
        graph.outputs.append(v)
    path = tmp / f"{variant}-{level}.onnx"
    model = ir.Model(graph, ir_version=10)
    for v in graph.initializers.values():
        if isinstance(v.const_value, ir.LazyTensor):
            v.const_value = ir.tensor(v.const_value.numpy(), name=v.name)
    ir.save(model, path)
    return str(path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=128, help="group / block size (GPTQ and AWQ publish 128)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--iters", type=int, default=50, help="decode steps per round and variant")
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    add_json_flag(ap)
    args = ap.parse_args(argv)
    import onnxruntime as ort

    configs = [
        ("ours", 4),
        ("gptq-sym", 0),
        ("gptq-sym", 4),
        ("awq", 0),
        ("awq", 4),
        ("gptq-actorder", 0),
        ("gptq-actorder", 4),
    ]
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    feeds = {
        "x": np.random.default_rng(1).standard_normal((1, 1, HIDDEN)).astype(np.float32),
        "xf": np.random.default_rng(2).standard_normal((1, 1, FFN)).astype(np.float32),
    }
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {
            c: ort.InferenceSession(
                _layer_model(c[0], args.block, c[1], Path(tmp)), so, providers=["CPUExecutionProvider"]
            )
            for c in configs
        }
    best: dict = {c: [] for c in configs}
    for _ in range(args.rounds):
        for c, s in sessions.items():
            s.run(None, feeds)
            t = time.perf_counter()
            for _ in range(args.iters):
                s.run(None, feeds)
            best[c].append((time.perf_counter() - t) / args.iters)
    base = statistics.median(best[("ours", 4)])
    rows = [
        {
            "variant": v,
            "accuracy_level": lvl,
            "us_per_layer_step": statistics.median(best[v, lvl]) * 1e6,
            "vs_ours": statistics.median(best[v, lvl]) / base,
        }
        for v, lvl in configs
    ]
    result = {
        "shape": "EXAONE-4.0-1.2B layer, batch 1, 1 token",
        "block": args.block,
        "rounds": args.rounds,
        "rows": rows,
    }
    emit(
        result,
        args.json,
        lambda: print_table(
            rows, ["variant", "accuracy_level", "us_per_layer_step", "vs_ours"], title=f"block {args.block}"
        ),
    )
    return result


if __name__ == "__main__":
    main()
