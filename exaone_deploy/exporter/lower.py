"""Lowering entry points: ``lower`` runs a target's pass list (:mod:`.passes`), ``check_model`` runs the ONNX
checker with the custom-op schemas registered.

* ``ort``: each ``ai.exaone_deploy::EXAONEAttention`` becomes ``com.microsoft::GroupQueryAttention``, RMSNorm is
  rewritten into the form ONNX Runtime fuses, parallel MatMuls (q/k/v, gate/up) are fused; with ``window_cache``
  the sliding layers keep window-sized caches (batch, kv_heads, W, head_dim).
* ``trt``: each becomes a TensorRT plugin node (op_type ``EXAONEAttention_TRT``, ``plugin_version``,
  ``plugin_namespace``), the op's attributes carried as plugin fields; everything else stays standard.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import defs

from ..graph_io import GraphIO
from ..spec import ModelSpec
from . import ops
from .passes import TRT_DOMAIN, TRT_OP_TYPE, TRT_PLUGIN_NAMESPACE, TRT_PLUGIN_VERSION, run_passes

__all__ = [
    "lower",
    "check_model",
    "register_trt_schema",
    "TRT_OP_TYPE",
    "TRT_PLUGIN_NAMESPACE",
    "TRT_PLUGIN_VERSION",
    "TRT_DOMAIN",
]


def lower(
    model: ir.Model,
    spec: ModelSpec,
    target: str,
    window_cache: bool = False,
    *,
    io: GraphIO | None = None,
    fuse_linears: bool = False,
) -> ir.Model:
    """Lower a canonical model in place for ``target`` (its pass list, :func:`.passes.target_passes`).

    ``io`` is the bundle's graph I/O contract; without one it is derived from ``spec`` and ``window_cache``.
    The bundle writer lowers with ``fuse_linears=True`` (what every written bundle gets); the default is the
    analysis view of the in-process callers (calibration statistics tap each linear's input; perplexity of a
    ``trt`` bundle in ONNX Runtime), which keep one MatMul per linear. Fused weights stay in memory (lazy):
    save with ``writer.save_lowered``, which writes them as external data.
    """
    if target == "trt":
        register_trt_schema()
    return run_passes(model, target, io or GraphIO(spec, window_cache=window_cache), fuse_linears)


def register_trt_schema() -> None:
    try:
        defs.get_schema(TRT_OP_TYPE, 1, TRT_DOMAIN)
        return
    except defs.SchemaError:
        pass
    base = ops.onnx_schema()
    A = defs.OpSchema.AttrType
    attrs = [
        defs.OpSchema.Attribute(a.name, a.type, a.description, required=a.required) for a in base.attributes.values()
    ]
    attrs += [
        defs.OpSchema.Attribute("plugin_version", A.STRING, "TensorRT plugin version", required=True),
        defs.OpSchema.Attribute("plugin_namespace", A.STRING, "TensorRT plugin namespace", required=True),
    ]
    schema = defs.OpSchema(
        TRT_OP_TYPE,
        TRT_DOMAIN,
        1,
        doc="TensorRT plugin node for EXAONEAttention (see docs/onnx-ops.md).",
        inputs=[defs.OpSchema.FormalParameter(p.name, p.type_str, param_option=p.option) for p in base.inputs],
        outputs=[defs.OpSchema.FormalParameter(p.name, p.type_str) for p in base.outputs],
        type_constraints=[(c.type_param_str, list(c.allowed_type_strs), c.description) for c in base.type_constraints],
        attributes=attrs,
    )
    defs.register_schema(schema)


def check_model(path: str | Path) -> None:
    """onnx.checker (full check, which includes strict shape inference) on a saved model."""
    ops.register_onnx_schema()
    register_trt_schema()
    onnx.checker.check_model(str(path), full_check=True)
