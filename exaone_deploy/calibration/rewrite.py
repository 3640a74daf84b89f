"""Rewrite a float canonical graph into a quantized one, with onnx-ir.

Per input group (linears reading one activation) the plan says how to smooth (SmoothQuant/AWQ scale ``s``:
the activation is divided by s, the weight rows multiplied) and the activation range. Smoothing moves into the
previous linear's output columns where the graph allows it exactly:

* ``down_proj``: its input is ``silu(gate) * up``, linear in up's output channels: up's columns absorb 1/s.
* ``o_proj``: its input is the attention output, per channel a weighted sum of v's rows (head h reads KV head
  h // (heads/kv_heads)): v_proj's columns absorb 1/s when s is equal across the query heads of a KV head,
  which the planner ensures.

The residual stream feeding q/k/v, gate/up is not the output of a norm here (EXAONE 4 is post-norm), so those
groups get an explicit ``Mul(x, 1/s)``. Per-output-channel weight scales make the folds free: scaling a column
of a per-channel (INT8) or per-(block, column) (INT4) quantized weight scales its quantization exactly.

Output per scheme and target:

=========  ==================================================  ===========================================
scheme     trt (standard ONNX, TensorRT strongly typed)         ort (ONNX Runtime CPU kernels)
=========  ==================================================  ===========================================
int8-sq    Q/DQ INT8 on the activation (per tensor); INT8       QuantizeLinear (UINT8, zero point 128) ->
           weight + DQ per output channel (axis 1) -> MatMul    com.microsoft.MatMulIntegerToFloat
fp8        Q/DQ FLOAT8E4M3FN on activation and weight (per tensor) for both targets (ORT runs it in float)
int4-*     INT4 weight + DQ (axis 0, block_size) -> MatMul      com.microsoft.MatMulNBits (bits 4, level 4)
=========  ==================================================  ===========================================

The LM head of an int4 plan (``Plan.lm_head``, ``QuantOptions.lm_head``): ``"same"`` (the default) gives it
the scheme's INT4 quantizer; ``"int8"`` quantizes it to 8 bits like llama.cpp, whose Q4_0 files keep the output
matrix at 6 bits (Q6_K): on ort an 8-bit ``MatMulNBits`` (block ``HEAD_BLOCK``, accuracy level 4), on trt an
INT8 weight + DQ per output channel (axis 1) -> MatMul, weight-only. On the bundled model the 8-bit head takes
RTN's perplexity increase from 2.9% to 2.2% and leaves AWQ's at 0.42%; on the 1.2B shape it adds ~0.1 GB per
token (0.80 -> 0.90 GB), hence not the default (docs/perf.md). Rejected: ``DynamicQuantizeMatMul`` (and
``DynamicQuantizeLinear`` + ``MatMulIntegerToFloat``): it quantizes the whole activation tensor with ONE scale,
so a row's logits would depend on the other rows of the batch or prompt (batch-variant greedy tokens); 8-bit
``MatMulNBits`` quantizes each row's blocks alone. For the int8-sq decoder layers ``MatMulIntegerToFloat`` stays:
8-bit ``MatMulNBits`` decodes at 0.6-0.8x its speed at block 32 and ~0.9x at block 128 on this CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx_ir as ir

from . import numerics as nq
from .graph import InputGroup, Linear, find_linears, input_groups

__all__ = ["SCHEMES", "GroupPlan", "Plan", "apply_plan", "fold_target", "QUANT_OPS"]

SCHEMES = ("int8-sq", "fp8", "int4-awq", "int4-rtn")
HEAD_BLOCK = 128  # the 8-bit LM head's MatMulNBits block (faster than 32 or 64 at 8 bits on this CPU)
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "MatMulIntegerToFloat", "MatMulNBits"}


@dataclass
class GroupPlan:
    smooth: np.ndarray | None = None  # s [in]: x -> x / s, W rows -> W * s
    act_amax: float | None = None  # range of the (smoothed) activation, for INT8/FP8 activations
    clip: dict[str, np.ndarray] = field(default_factory=dict)  # linear -> [in/block, out] INT4 clip ratios
    info: dict = field(default_factory=dict)  # for the manifest (AWQ ratio, errors, ...)


@dataclass
class Plan:
    scheme: str
    block_size: int = 32
    groups: dict[str, GroupPlan] = field(default_factory=dict)
    heads: tuple[int, int, int] = (1, 1, 1)  # num_heads, num_kv_heads, head_dim (for the o_proj -> v_proj fold)
    lm_head: str = "same"  # int4 schemes: "int8" = 8-bit head (MatMulNBits on ort), "same" = INT4 like the rest

    def head_int8(self, lin: Linear) -> bool:
        """Whether ``lin`` is an LM head that this plan quantizes to 8 bits instead of INT4."""
        return lin.kind == "lm_head" and self.lm_head == "int8" and self.scheme.startswith("int4")


def fold_target(group: InputGroup, by_name: dict[str, Linear]) -> Linear | None:
    """The linear whose output columns can absorb this group's 1/s exactly, if any."""
    if group.layer is None or len(group.members) != 1:
        return None
    kind = group.members[0].kind
    producer = {"o_proj": "self_attn.v_proj", "down_proj": "mlp.up_proj"}.get(kind)
    return by_name.get(f"layers.{group.layer}.{producer}") if producer else None


class _Writer:
    def __init__(self, graph: ir.Graph):
        self.graph = graph

    def init(self, name: str, array: np.ndarray) -> ir.Value:
        array = np.asarray(array)
        t = ir.Tensor(array if array.flags.c_contiguous else array.copy(order="C"), name=name)
        v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(t.dtype), const_value=t)
        self.graph.register_initializer(v)
        return v

    def node(self, before: ir.Node, op: str, inputs, attributes=None, domain: str = "", *, name: str) -> ir.Value:
        n = ir.node(op, list(inputs), attributes=attributes or {}, domain=domain, name=name)
        n.outputs[0].name = name  # explicit: onnx-ir's automatic names could collide with the traced ones
        self.graph.insert_before(before, [n])
        return n.outputs[0]

    def replace(self, old: ir.Node, op: str, inputs, attributes, domain: str) -> ir.Node:
        new = ir.node(op, list(inputs), attributes=attributes, domain=domain, name=old.name)
        ir.convenience.replace_nodes_and_values(self.graph, old, [old], [new], list(old.outputs), list(new.outputs))
        return new

    def drop_if_unused(self, value: ir.Value) -> None:
        if not value.uses() and value.name in self.graph.initializers:
            del self.graph.initializers[value.name]


def apply_plan(
    model: ir.Model, plan: Plan, target: str, include: set[str], *, quantize: bool = True
) -> dict[str, dict]:
    """Quantize the linears named in ``include`` in place. Returns a per-linear summary for the manifest.

    ``quantize=False`` applies only the smoothing (folds and Muls) and leaves every weight in float: the graph
    then computes the same function as before, which is how the tests check the folds are exact.
    """
    g = model.graph
    w = _Writer(g)
    linears = find_linears(g)
    by_name = {lin.name: lin for lin in linears}
    groups = input_groups(linears)
    summary: dict[str, dict] = {}
    if target == "ort" and plan.scheme != "fp8":
        model.opset_imports["com.microsoft"] = 1
    # Work one decoder layer at a time so only one layer's float weights are in memory.
    order: dict[object, list[InputGroup]] = {}
    for grp in groups:
        order.setdefault(grp.layer, []).append(grp)
    for _, layer_groups in order.items():
        weights: dict[str, np.ndarray] = {}

        def W(lin: Linear, weights: dict[str, np.ndarray] = weights) -> np.ndarray:
            if lin.name not in weights:
                weights[lin.name] = np.array(lin.weight.const_value.numpy(), dtype=np.float32)
            return weights[lin.name]

        inputs: dict[str, ir.Value] = {}  # group -> activation value the quantized members read (after Mul)
        for grp in layer_groups:
            gp = plan.groups.get(grp.name, GroupPlan())
            quantized = [m for m in grp.members if m.name in include]
            inputs[grp.name] = grp.input
            if gp.smooth is None or not quantized:
                continue
            s = gp.smooth.astype(np.float32)
            producer = fold_target(grp, by_name)
            if producer is not None:
                cols = s
                if producer.kind == "v_proj":
                    nh, nkv, hd = plan.heads
                    cols = s.reshape(nkv, nh // nkv, hd)[:, 0, :].reshape(-1)
                W(producer)[:] /= cols[None, :]
                for m in grp.members:
                    W(m)[:] *= s[:, None]
            else:
                for m in quantized:
                    W(m)[:] *= s[:, None]
                inv = w.init(f"{grp.name}.smooth_inv", (1.0 / s).astype(np.float32))
                inputs[grp.name] = w.node(quantized[0].node, "Mul", [grp.input, inv], name=f"{grp.name}/smooth")
        for grp in layer_groups:
            gp = plan.groups.get(grp.name, GroupPlan())
            quantized = [m for m in grp.members if m.name in include]
            if not quantized:
                continue
            if not quantize:
                for lin in quantized:
                    lin.node.replace_input_with(0, inputs[grp.name])
                continue
            if any(plan.head_int8(lin) for lin in quantized):
                x = {"x": inputs[grp.name]}  # weight-only on trt; MatMulNBits quantizes each row's blocks
            else:
                x = _quantize_activation(w, plan, target, grp, gp, inputs[grp.name], quantized[0].node)
            for lin in quantized:
                summary[lin.name] = _quantize_linear(w, plan, target, lin, W(lin), x, gp)
        # Float linears whose weights a fold changed keep float, with the new values.
        for name, arr in weights.items():
            lin = by_name[name]
            if name not in include or not quantize:
                lin.weight.const_value = ir.Tensor(arr, name=lin.weight.name)
    return summary


def _quantize_activation(
    w: _Writer, plan: Plan, target: str, grp: InputGroup, gp: GroupPlan, x: ir.Value, before: ir.Node
) -> dict:
    """Activation quantizer shared by a group's quantized members. Returns what the members need."""
    if plan.scheme.startswith("int4"):
        extra = -grp.in_features % plan.block_size
        if target == "trt" and extra:
            # TensorRT wants the blocked axis to divide evenly: pad the activation with zero columns to match the
            # zero rows padded onto the weight (MatMulNBits pads internally, so the ort graph needs no Pad).
            rank = len(grp.input.shape) if grp.input.shape is not None else 3  # (the Mul output has no shape)
            pads = w.init(f"{grp.name}.input_pads", np.array([0] * (2 * rank - 1) + [extra], np.int64))
            x = w.node(before, "Pad", [x, pads], name=f"{grp.name}/input_pad")
        return {"x": x}
    if gp.act_amax is None:
        raise ValueError(f"{grp.name}: no activation range in the plan (calibration missing)")
    if plan.scheme == "fp8":
        scale = np.float32(max(gp.act_amax, nq.TINY) / nq.FP8_MAX)
        zp = np.zeros((), ml_dtypes.float8_e4m3fn)
    else:
        scale = np.float32(max(gp.act_amax, nq.TINY) / nq.INT8_MAX)
        zp = np.array(128, np.uint8) if target == "ort" else np.zeros((), np.int8)
    s = w.init(f"{grp.name}.input_scale", np.array(scale, np.float32))
    z = w.init(f"{grp.name}.input_zero_point", zp)
    q = w.node(before, "QuantizeLinear", [x, s, z], name=f"{grp.name}/input_quantize")
    if plan.scheme == "int8-sq" and target == "ort":
        return {"xq": q, "scale": s, "zero_point": z, "amax": gp.act_amax}
    dq = w.node(before, "DequantizeLinear", [q, s, z], name=f"{grp.name}/input_dequantize")
    return {"x": dq, "amax": gp.act_amax}


def _quantize_linear(
    w: _Writer, plan: Plan, target: str, lin: Linear, weight: np.ndarray, x: dict, gp: GroupPlan
) -> dict:
    node, base = lin.node, lin.weight.name
    k, n = weight.shape
    info: dict = {"shape": [k, n]}
    if "amax" in x:
        info["input_amax"] = float(x["amax"])
    if gp.smooth is not None:
        info["smooth"] = [float(gp.smooth.min()), float(gp.smooth.max())]
    info.update(gp.info)
    old_weight = lin.weight
    if plan.head_int8(lin):
        if target == "ort":
            q, scale = nq.quantize_int8_blocks(weight, HEAD_BLOCK)
            packed, flat = nq.pack_matmulnbits(q, scale, HEAD_BLOCK, bits=8)
            w.replace(
                node,
                "MatMulNBits",
                [x["x"], w.init(f"{base}.nbits8", packed), w.init(f"{base}.scale", flat)],
                {"K": k, "N": n, "bits": 8, "block_size": HEAD_BLOCK, "accuracy_level": 4},
                "com.microsoft",
            )
        else:
            q, scale = nq.quantize_int8(weight)
            wz = w.init(f"{base}.zero_point", np.zeros(n, np.int8))
            wd = w.node(
                node,
                "DequantizeLinear",
                [w.init(f"{base}.int8", q), w.init(f"{base}.scale", scale), wz],
                {"axis": 1},
                name=f"{lin.name}/weight_dequantize",
            )
            node.replace_input_with(1, wd)
        info.update(weight_scale=[float(scale.min()), float(scale.max())], head="int8")
    elif plan.scheme == "int8-sq":
        q, scale = nq.quantize_int8(weight)
        info["weight_scale"] = [float(scale.min()), float(scale.max())]
        wq = w.init(f"{base}.int8", q)
        ws = w.init(f"{base}.scale", scale)
        if target == "ort":
            w.replace(node, "MatMulIntegerToFloat", [x["xq"], wq, x["scale"], ws, x["zero_point"]], {}, "com.microsoft")
        else:
            wz = w.init(f"{base}.zero_point", np.zeros(n, np.int8))
            wd = w.node(node, "DequantizeLinear", [wq, ws, wz], {"axis": 1}, name=f"{lin.name}/weight_dequantize")
            node.replace_input_with(0, x["x"])
            node.replace_input_with(1, wd)
    elif plan.scheme == "fp8":
        q, scale = nq.quantize_fp8(weight)
        info["weight_scale"] = float(scale)
        wq = w.init(f"{base}.fp8", q)
        ws = w.init(f"{base}.scale", np.array(scale, np.float32))
        wz = w.init(f"{base}.zero_point", np.zeros((), ml_dtypes.float8_e4m3fn))
        wd = w.node(node, "DequantizeLinear", [wq, ws, wz], name=f"{lin.name}/weight_dequantize")
        node.replace_input_with(0, x["x"])
        node.replace_input_with(1, wd)
    else:  # int4
        block = plan.block_size
        q, scale = nq.quantize_int4(weight, block, gp.clip.get(lin.name))
        info["weight_scale"] = [float(scale.min()), float(scale.max())]
        info["block_size"] = block
        if target == "ort":
            packed, flat = nq.pack_matmulnbits(q, scale, block)
            wq = w.init(f"{base}.nbits", packed)
            ws = w.init(f"{base}.scale", flat)
            w.replace(
                node,
                "MatMulNBits",
                [x["x"], wq, ws],
                {"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": 4},
                "com.microsoft",
            )
        else:
            wq = w.init(f"{base}.int4", nq.pad_rows(q, block).astype(ml_dtypes.int4))
            ws = w.init(f"{base}.scale", scale)
            wd = w.node(
                node,
                "DequantizeLinear",
                [wq, ws],
                {"axis": 0, "block_size": block},
                name=f"{lin.name}/weight_dequantize",
            )
            node.replace_input_with(0, x["x"])
            node.replace_input_with(1, wd)
    w.drop_if_unused(old_weight)
    return info
