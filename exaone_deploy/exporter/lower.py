"""Lowering of the canonical graph per target, with onnx-ir (no protobuf surgery).

* ``ort``: each ``ai.exaone_deploy::EXAONEAttention`` becomes ``com.microsoft::GroupQueryAttention``:
  same inputs (cos/sin only on RoPE layers), ``local_window_size`` on sliding layers, ``do_rotary``.
  The past/present buffers can be bound to the same memory (ONNX Runtime's ``MayInplace``).
* ``trt``: each becomes a TensorRT plugin node (op_type ``EXAONEAttention_TRT``, ``plugin_version``,
  ``plugin_namespace``), the op's attributes carried as plugin fields; everything else stays standard.
"""

from __future__ import annotations

from pathlib import Path

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


def lower_ort(model: ir.Model) -> ir.Model:
    g = model.graph
    for node in _attention_nodes(g):
        a = _attrs(node)
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
            raise ValueError("the ort target uses full-length caches; ring-buffer attention is TensorRT-only")
        new = ir.node("GroupQueryAttention", inputs, attributes=attributes, domain="com.microsoft",
                      num_outputs=3, name=node.name)
        _replace(g, node, new)
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


def lower_trt(model: ir.Model) -> ir.Model:
    register_trt_schema()
    g = model.graph
    for node in _attention_nodes(g):
        a = _attrs(node)
        attributes = {
            "num_heads": a["num_heads"], "kv_num_heads": a["kv_num_heads"], "scale": float(a.get("scale", 0.0)),
            "window": int(a.get("window", 0)), "rotary": int(a.get("rotary", 0)), "ring": int(a.get("ring", 0)),
            "plugin_version": TRT_PLUGIN_VERSION, "plugin_namespace": TRT_PLUGIN_NAMESPACE,
        }
        new = ir.node(TRT_OP_TYPE, list(node.inputs), attributes=attributes, domain=TRT_DOMAIN, num_outputs=3,
                      name=node.name)
        _replace(g, node, new)
    model.opset_imports.pop(ops.DOMAIN, None)
    model.opset_imports[TRT_DOMAIN] = 1
    return model


def lower(model: ir.Model, spec: ModelSpec, target: str) -> ir.Model:
    if target == "ort":
        return lower_ort(model)
    if target == "trt":
        return lower_trt(model)
    raise ValueError(f"unknown target {target!r}")


def check_model(path: str | Path) -> None:
    """onnx.checker (full check, which includes strict shape inference) on a saved model."""
    ops.register_onnx_schema()
    register_trt_schema()
    onnx.checker.check_model(str(path), full_check=True)
