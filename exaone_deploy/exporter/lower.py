"""Lowering of the canonical graph per target, with onnx-ir (no protobuf surgery).

* ``ort``: each ``ai.exaone_deploy::EXAONEAttention`` becomes ``com.microsoft::GroupQueryAttention``:
  same inputs (cos/sin only on RoPE layers), ``local_window_size`` on sliding layers, ``do_rotary``.
  The past/present buffers can be bound to the same memory (ONNX Runtime's ``MayInplace``). With
  ``window_cache`` the sliding layers keep window-sized caches (``sliding_window_cache=1``: the op keeps
  the last W keys and evicts the oldest), so their cache inputs/outputs are (batch, kv_heads, W, head_dim).
* ``trt``: each becomes a TensorRT plugin node (op_type ``EXAONEAttention_TRT``, ``plugin_version``,
  ``plugin_namespace``), the op's attributes carried as plugin fields; everything else stays standard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import defs

from ..spec import ModelSpec
from . import ops

__all__ = ["lower", "check_model", "TRT_OP_TYPE", "TRT_PLUGIN_NAMESPACE", "TRT_PLUGIN_VERSION", "TRT_DOMAIN"]

TRT_OP_TYPE = "EXAONEAttention_TRT"
TRT_PLUGIN_NAMESPACE = "exaone_deploy"
TRT_PLUGIN_VERSION = "1"
TRT_DOMAIN = "trt.plugins"


def _attrs(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}


def _replace(graph: ir.Graph, node: ir.Node, new: ir.Node) -> None:
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new], list(node.outputs), list(new.outputs))


def _attention_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.domain == ops.DOMAIN and n.op_type == ops.OP_TYPE]


def _layer_of(node: ir.Node) -> int:
    # The cache inputs are graph inputs named past_key_values.{i}.key/value (see exporter/export.py).
    return int(node.inputs[3].name.split(".")[1])


def _set_cache_len(graph: ir.Graph, layer: int, length: int) -> None:
    names = {f"past_key_values.{layer}.key", f"past_key_values.{layer}.value", f"present.{layer}.key",
             f"present.{layer}.value"}
    for v in [*graph.inputs, *graph.outputs]:
        if v.name in names and v.shape is not None:
            dims = list(v.shape)
            dims[2] = length
            v.shape = ir.Shape(dims)


def rsqrt_as_div(graph: ir.Graph) -> int:
    """``Mul(x, Reciprocal(Sqrt(v)))`` -> ``Div(x, Sqrt(v))``: torch exports rsqrt as Sqrt+Reciprocal, and ONNX
    Runtime's SimplifiedLayerNormalization fusion only recognises RMSNorm written with Div. Returns the count."""
    count = 0
    for node in list(graph):
        if node.op_type != "Reciprocal" or node.domain != "":
            continue
        src = node.inputs[0].producer() if node.inputs[0] is not None else None
        users = [u for u, _ in node.outputs[0].uses()]
        if src is None or src.op_type != "Sqrt" or not users or any(u.op_type != "Mul" for u in users):
            continue
        for mul in users:
            other = mul.inputs[1] if mul.inputs[0] is node.outputs[0] else mul.inputs[0]
            div = ir.node("Div", [other, node.inputs[0]], name=f"{mul.name}_div")
            _replace(graph, mul, div)
            count += 1
        graph.remove(node, safe=True)
    return count


def fuse_parallel_matmuls(graph: ir.Graph, data_dir: Path, file_name: str = "fused.data") -> int:
    """MatMuls that read the same input with constant float weights (q/k/v; gate/up) become one MatMul over
    the concatenated weights and a Split: fewer, larger GEMMs (one pass over the activations, one kernel
    launch instead of three). The fused weights are written to ``data_dir/file_name``. Returns the count."""
    groups: dict[int, list[ir.Node]] = {}
    for node in graph:
        w = node.inputs[1] if node.op_type == "MatMul" and node.domain == "" and len(node.inputs) == 2 else None
        if w is None or not w.is_initializer() or w.const_value is None or w.shape is None or len(w.shape) != 2:
            continue
        if w.type.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            continue
        groups.setdefault(id(node.inputs[0]), []).append(node)
    fused_values, count = [], 0
    for nodes in groups.values():
        if len(nodes) < 2 or len({n.inputs[1].shape[0] for n in nodes}) != 1 or len({n.inputs[1].type.dtype for n in nodes}) != 1:
            continue
        weights = [n.inputs[1] for n in nodes]
        sizes = [int(w.shape[1]) for w in weights]
        dtype = weights[0].type.dtype

        def concat(ws=tuple(w.const_value for w in weights)):
            return ir.tensor(np.concatenate([t.numpy() for t in ws], axis=1))

        name = "+".join(w.name for w in weights)
        fused = ir.Value(name=name, shape=ir.Shape([int(weights[0].shape[0]), sum(sizes)]), type=ir.TensorType(dtype),
                         const_value=ir.LazyTensor(concat, dtype=dtype, shape=ir.Shape([int(weights[0].shape[0]),
                                                                                         sum(sizes)]), name=name))
        graph.register_initializer(fused)
        split = ir.Value(name=f"{name}.split", shape=ir.Shape([len(sizes)]), type=ir.TensorType(ir.DataType.INT64),
                         const_value=ir.tensor(np.array(sizes, dtype=np.int64), name=f"{name}.split"))
        graph.register_initializer(split)
        first = nodes[0]
        mm = ir.node("MatMul", [first.inputs[0], fused], name=f"{first.name}_fused")
        sp = ir.node("Split", [mm.outputs[0], split], attributes={"axis": -1}, num_outputs=len(nodes),
                     name=f"{first.name}_split")
        graph.insert_before(first, [mm, sp])
        for node, out in zip(nodes, sp.outputs):
            out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
            node.outputs[0].replace_all_uses_with(out)
            graph.remove(node, safe=True)
        for w in weights:
            if not w.uses():
                del graph.initializers[w.name]
        fused_values.append(fused)
        count += 1
    if fused_values:
        external = ir.external_data.convert_tensors_to_external(
            [v.const_value for v in fused_values], base_dir=data_dir, relative_path=file_name, alignment=65536)
        for v, t in zip(fused_values, external):
            v.const_value = t
    return count


def lower_ort(model: ir.Model, spec: ModelSpec | None = None, window_cache: bool = False,
              data_dir: Path | None = None) -> ir.Model:
    g = model.graph
    rsqrt_as_div(g)
    if data_dir is not None:
        fuse_parallel_matmuls(g, data_dir)
    for node in _attention_nodes(g):
        a = _attrs(node)
        layer = _layer_of(node)
        inputs = list(node.inputs[:7]) + (list(node.inputs[7:9]) if a.get("rotary", 0) else [])
        attributes = {
            "num_heads": a["num_heads"],
            "kv_num_heads": a["kv_num_heads"],
            "local_window_size": a.get("window", 0) or -1,
            "do_rotary": int(a.get("rotary", 0)),
        }
        if a.get("scale", 0.0):
            attributes["scale"] = float(a["scale"])
        if a.get("ring", 0):
            raise ValueError("ring-buffer caches are TensorRT-only; the ort target uses sliding_window_cache")
        if window_cache and a.get("window", 0):
            attributes["sliding_window_cache"] = 1
        new = ir.node("GroupQueryAttention", inputs, attributes=attributes, domain="com.microsoft",
                      num_outputs=3, name=node.name)
        _replace(g, node, new)
        if window_cache and a.get("window", 0):
            _set_cache_len(g, layer, int(a["window"]))
            for out in new.outputs[1:]:
                dims = list(out.shape) if out.shape is not None else None
                if dims:
                    dims[2] = int(a["window"])
                    out.shape = ir.Shape(dims)
    model.opset_imports.pop(ops.DOMAIN, None)
    model.opset_imports["com.microsoft"] = 1
    return model


def register_trt_schema() -> None:
    try:
        defs.get_schema(TRT_OP_TYPE, 1, TRT_DOMAIN)
        return
    except defs.SchemaError:
        pass
    base = ops.onnx_schema()
    A = defs.OpSchema.AttrType
    attrs = [defs.OpSchema.Attribute(a.name, a.type, a.description, required=a.required)
             for a in base.attributes.values()]
    attrs += [defs.OpSchema.Attribute("plugin_version", A.STRING, "TensorRT plugin version", required=True),
              defs.OpSchema.Attribute("plugin_namespace", A.STRING, "TensorRT plugin namespace", required=True)]
    schema = defs.OpSchema(
        TRT_OP_TYPE, TRT_DOMAIN, 1, doc="TensorRT plugin node for EXAONEAttention (see docs/onnx-ops.md).",
        inputs=[defs.OpSchema.FormalParameter(p.name, p.type_str, param_option=p.option) for p in base.inputs],
        outputs=[defs.OpSchema.FormalParameter(p.name, p.type_str) for p in base.outputs],
        type_constraints=[(c.type_param_str, list(c.allowed_type_strs), c.description)
                          for c in base.type_constraints],
        attributes=attrs,
    )
    defs.register_schema(schema)


def _rope_tables(graph: ir.Graph, like: ir.Node) -> tuple[ir.Value, ir.Value]:
    """The graph's cos/sin caches; a model with no RoPE layer gets (1, H/2) zero tables."""
    cos, sin = graph.initializers.get("cos_cache"), graph.initializers.get("sin_cache")
    if cos is not None and sin is not None:
        return cos, sin
    past = like.inputs[3]
    half = int(past.shape[3]) // 2
    dtype = past.type.dtype
    tables = []
    for name in ("cos_cache", "sin_cache"):
        arr = np.zeros((1, half), dtype=dtype.numpy())
        v = ir.Value(name=name, shape=ir.Shape([1, half]), type=ir.TensorType(dtype), const_value=ir.tensor(arr))
        graph.register_initializer(v)
        tables.append(v)
    return tables[0], tables[1]


def lower_trt(model: ir.Model) -> ir.Model:
    """Plugin nodes with all nine inputs: TensorRT plugins have a fixed signature, so NoPE layers get the
    RoPE tables too (the kernel does not read them when rotary=0)."""
    register_trt_schema()
    g = model.graph
    nodes = _attention_nodes(g)
    tables = _rope_tables(g, nodes[0]) if nodes else None
    for node in nodes:
        a = _attrs(node)
        inputs = list(node.inputs[:7]) + list(tables)
        attributes = {
            "num_heads": a["num_heads"], "kv_num_heads": a["kv_num_heads"], "scale": float(a.get("scale", 0.0)),
            "window": int(a.get("window", 0)), "rotary": int(a.get("rotary", 0)), "ring": int(a.get("ring", 0)),
            "plugin_version": TRT_PLUGIN_VERSION, "plugin_namespace": TRT_PLUGIN_NAMESPACE,
        }
        new = ir.node(TRT_OP_TYPE, inputs, attributes=attributes, domain=TRT_DOMAIN, num_outputs=3,
                      name=node.name)
        _replace(g, node, new)
    model.opset_imports.pop(ops.DOMAIN, None)
    model.opset_imports[TRT_DOMAIN] = 1
    return model


def lower(model: ir.Model, spec: ModelSpec, target: str, window_cache: bool = False,
          data_dir: Path | None = None) -> ir.Model:
    """``data_dir``: where the ort lowering may write fused weights (no weight fusion without it)."""
    if target == "ort":
        return lower_ort(model, spec, window_cache, data_dir)
    if target == "trt":
        return lower_trt(model)
    raise ValueError(f"unknown target {target!r}")


def check_model(path: str | Path) -> None:
    """onnx.checker (full check, which includes strict shape inference) on a saved model."""
    ops.register_onnx_schema()
    register_trt_schema()
    onnx.checker.check_model(str(path), full_check=True)
