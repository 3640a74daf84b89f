"""Lowering of the canonical graph per target, as onnx-ir passes (one pass per rewrite).

Each target is a pass list (``target_passes``) run by ``onnx_ir.passes.PassManager``:

* ``ort``: ``RsqrtAsDiv`` (RMSNorm in the form ONNX Runtime fuses), ``FuseParallelMatMuls`` (q/k/v and gate/up
  as one GEMM + Split), ``AttentionToGroupQueryAttention`` (``com.microsoft::GroupQueryAttention``, window-sized
  caches on sliding layers when the ``GraphIO`` says so).
* ``trt``: ``AttentionToTrtPlugin`` (a TensorRT plugin node carrying the op's attributes as plugin fields, the
  RoPE tables on every layer); everything else stays standard ONNX.

The passes do no file I/O: fused weights stay lazy tensors in memory and the bundle writer
(:mod:`.writer`) writes them as external data when it saves the lowered model. Which layer an attention node
belongs to, and the cache length of that layer, come from :class:`~exaone_deploy.graph_io.GraphIO` (the only
place that knows the cache tensor names).

Alternatives rejected: onnxscript's rewriter patterns (the rewrites are few, structural and target-specific; a
pattern language buys nothing here), and free functions composed by flags (the composition was hidden: fusion
ran only when a ``data_dir`` was passed, so quantized bundles silently skipped it).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassBase, PassManager, PassResult

from ..graph_io import KV, KV_QUANT_TYPE, GraphIO
from . import ops

__all__ = [
    "RsqrtAsDiv",
    "FuseParallelMatMuls",
    "AttentionToGroupQueryAttention",
    "AttentionToTrtPlugin",
    "target_passes",
    "run_passes",
    "TRT_OP_TYPE",
    "TRT_PLUGIN_NAMESPACE",
    "TRT_PLUGIN_VERSION",
    "TRT_DOMAIN",
    "ORT_DOMAIN",
]

TRT_OP_TYPE = "EXAONEAttention_TRT"
TRT_PLUGIN_NAMESPACE = "exaone_deploy"
TRT_PLUGIN_VERSION = "1"
TRT_DOMAIN = "trt.plugins"
ORT_DOMAIN = "com.microsoft"


def _attrs(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}


def _replace(graph: ir.Graph, node: ir.Node, new: ir.Node) -> None:
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new], list(node.outputs), list(new.outputs))


def _attention_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.domain == ops.DOMAIN and n.op_type == ops.OP_TYPE]


def _set_dim(value: ir.Value, axis: int, length: int) -> None:
    if value.shape is not None:
        dims = list(value.shape)
        dims[axis] = length
        value.shape = ir.Shape(dims)


class RsqrtAsDiv(InPlacePass):
    """``Mul(x, Reciprocal(Sqrt(v)))`` -> ``Div(x, Sqrt(v))``: torch exports rsqrt as Sqrt+Reciprocal, and ONNX
    Runtime's SimplifiedLayerNormalization fusion only recognises RMSNorm written with Div."""

    def call(self, model: ir.Model) -> PassResult:
        graph, count = model.graph, 0
        for node in list(graph):
            if node.op_type != "Reciprocal" or node.domain != "":
                continue
            src = node.inputs[0].producer() if node.inputs[0] is not None else None
            users = [u for u, _ in node.outputs[0].uses()]
            if src is None or src.op_type != "Sqrt" or not users or any(u.op_type != "Mul" for u in users):
                continue
            for mul in users:
                other = mul.inputs[1] if mul.inputs[0] is node.outputs[0] else mul.inputs[0]
                _replace(graph, mul, ir.node("Div", [other, node.inputs[0]], name=f"{mul.name}_div"))
                count += 1
            graph.remove(node, safe=True)
        return PassResult(model, modified=count > 0)


class FuseParallelMatMuls(InPlacePass):
    """MatMuls that read the same input with constant float [in, out] weights of one dtype (q/k/v; gate/up)
    become one MatMul over the concatenated weights and a Split: one pass over the activations, one kernel launch
    instead of three. The fused weight is a lazy tensor named ``a+b+c`` (concatenated when saved).

    Quantized linears (``MatMulNBits``, ``MatMulIntegerToFloat``) are not fused, though they would concatenate
    exactly along N: measured at batch 1 on the 1.2B shape (int4, 8 layers, interleaved decode-step A/B,
    ``benchmarks/decode_step.py``) the fused graph ran at 0.99x (0.89-1.15) the unfused one, and the fused copy
    would double the quantized weights on disk (the canonical graph keeps its own). In quantized bundles, the
    linears kept in float are fused as in exported ones."""

    FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        groups: dict[int, list[ir.Node]] = {}
        for node in graph:
            if node.op_type == "MatMul" and node.domain == "" and len(node.inputs) == 2 and self._weight(node):
                groups.setdefault(id(node.inputs[0]), []).append(node)
        count = 0
        for nodes in groups.values():
            weights = [n.inputs[1] for n in nodes]
            if len(nodes) < 2 or len({(w.shape[0], w.type.dtype) for w in weights}) != 1:
                continue
            self._fuse(graph, nodes, weights)
            count += 1
        return PassResult(model, modified=count > 0)

    def _weight(self, node: ir.Node) -> bool:
        w = node.inputs[1]
        return (
            w is not None
            and w.is_initializer()
            and w.const_value is not None
            and w.shape is not None
            and len(w.shape) == 2
            and w.type.dtype in self.FLOATS
        )

    @staticmethod
    def _fuse(graph: ir.Graph, nodes: list[ir.Node], weights: list[ir.Value]) -> None:
        sizes = [int(w.shape[1]) for w in weights]
        dtype, name = weights[0].type.dtype, "+".join(w.name for w in weights)
        shape = ir.Shape([int(weights[0].shape[0]), sum(sizes)])

        def concat(ws=tuple(w.const_value for w in weights)):
            return ir.tensor(np.concatenate([t.numpy() for t in ws], axis=1))

        fused = ir.Value(
            name=name,
            shape=shape,
            type=ir.TensorType(dtype),
            const_value=ir.LazyTensor(concat, dtype=dtype, shape=shape, name=name),
        )
        graph.register_initializer(fused)
        split = ir.Value(
            name=f"{name}.split",
            shape=ir.Shape([len(sizes)]),
            type=ir.TensorType(ir.DataType.INT64),
            const_value=ir.tensor(np.array(sizes, dtype=np.int64), name=f"{name}.split"),
        )
        graph.register_initializer(split)
        first = nodes[0]
        mm = ir.node("MatMul", [first.inputs[0], fused], name=f"{first.name}_fused")
        sp = ir.node(
            "Split", [mm.outputs[0], split], attributes={"axis": -1}, num_outputs=len(nodes), name=f"{first.name}_split"
        )
        graph.insert_before(first, [mm, sp])
        for node, out in zip(nodes, sp.outputs):
            out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
            node.outputs[0].replace_all_uses_with(out)
            graph.remove(node, safe=True)
        for w in weights:
            if not w.uses():
                del graph.initializers[w.name]


class _AttentionPass(InPlacePass):
    """Base of the two attention lowerings: replace every ``EXAONEAttention`` node, then swap the opset."""

    domain = ""

    def __init__(self, io: GraphIO):
        super().__init__()
        self.io = io

    def call(self, model: ir.Model) -> PassResult:
        nodes = _attention_nodes(model.graph)
        for node in nodes:
            layer = self.io.cache_layer(node.inputs[3].name)
            if layer is None:
                raise ValueError(f"attention node {node.name!r} reads {node.inputs[3].name!r}, not a past-key input")
            self.lower(model.graph, node, layer, _attrs(node))
        model.opset_imports.pop(ops.DOMAIN, None)
        model.opset_imports[self.domain] = 1
        return PassResult(model, modified=bool(nodes))

    def lower(self, graph: ir.Graph, node: ir.Node, layer: int, a: dict) -> None:
        raise NotImplementedError


class AttentionToGroupQueryAttention(_AttentionPass):
    """``EXAONEAttention`` -> ``com.microsoft::GroupQueryAttention``: same inputs (cos/sin only on RoPE layers),
    ``local_window_size`` on sliding layers, ``do_rotary``. Where ``io.cache_lengths`` gives a layer a fixed
    length W, the op keeps a window-sized cache (``sliding_window_cache=1``) and the layer's past/present
    tensors get W as their length.

    With ``io.kv_cache == "int8"`` the op keeps an INT8 cache: ``k_quant_type``/``v_quant_type`` per channel,
    ``kv_cache_bit_width`` 8, the layer's scales (the initializers ``io.kv_scale_name(layer, "key"|"value")``,
    which the exporter or the quantizer put into the canonical graph) as its ``k_scale``/``v_scale`` inputs, and
    the layer's past/present tensors become int8. K is quantized after the op's RoPE. A float cache drops any
    such scale initializers (a canonical graph from an int8-cache bundle lowered for a float twin)."""

    domain = ORT_DOMAIN
    K_SCALE_SLOT = 12  # GroupQueryAttention input index of k_scale (v_scale follows)

    def call(self, model: ir.Model) -> PassResult:
        result = super().call(model)
        if self.io.kv_cache != "int8":
            graph = model.graph
            for i, kv, _, _ in self.io.cache_pairs():
                v = graph.initializers.get(self.io.kv_scale_name(i, kv))
                if v is not None and not v.uses():
                    del graph.initializers[v.name]
        return result

    def lower(self, graph: ir.Graph, node: ir.Node, layer: int, a: dict) -> None:
        if a.get("ring", 0):
            raise ValueError("ring-buffer caches are TensorRT-only; the ort target uses sliding_window_cache")
        inputs = list(node.inputs[:7]) + (list(node.inputs[7:9]) if a.get("rotary", 0) else [])
        attributes = {
            "num_heads": a["num_heads"],
            "kv_num_heads": a["kv_num_heads"],
            "local_window_size": a.get("window", 0) or -1,
            "do_rotary": int(a.get("rotary", 0)),
        }
        if a.get("scale", 0.0):
            attributes["scale"] = float(a["scale"])
        window = self.io.cache_lengths[layer]
        windowed = isinstance(window, int) and bool(a.get("window", 0))
        if windowed:
            attributes["sliding_window_cache"] = 1
        int8 = self.io.kv_cache == "int8"
        if int8:
            inputs += [None] * (self.K_SCALE_SLOT - len(inputs)) + self._scales(graph, layer)
            attributes.update(k_quant_type=KV_QUANT_TYPE, v_quant_type=KV_QUANT_TYPE, kv_cache_bit_width=8)
        new = ir.node(
            "GroupQueryAttention", inputs, attributes=attributes, domain=ORT_DOMAIN, num_outputs=3, name=node.name
        )
        _replace(graph, node, new)
        names = {n for i, _, p, q in self.io.cache_pairs() if i == layer for n in (p, q)}
        for v in [*(v for v in [*graph.inputs, *graph.outputs] if v.name in names), *new.outputs[1:]]:
            if windowed and v.shape is not None and len(v.shape):
                _set_dim(v, 2, window)
            if int8:
                v.type = ir.TensorType(ir.DataType.INT8)

    def _scales(self, graph: ir.Graph, layer: int) -> list[ir.Value]:
        scales = [graph.initializers.get(self.io.kv_scale_name(layer, kv)) for kv in KV]
        for v, kv in zip(scales, KV):
            if v is None or v.shape is None or tuple(v.shape) != self.io.kv_scale_shape:
                raise ValueError(
                    f"int8 KV cache: initializer {self.io.kv_scale_name(layer, kv)!r} "
                    f"{'is missing' if v is None else f'has shape {v.shape}'}; expected "
                    f"{self.io.kv_scale_shape} float32 scales (export or quantize adds them)"
                )
        return scales


class AttentionToTrtPlugin(_AttentionPass):
    """``EXAONEAttention`` -> the TensorRT plugin node with all nine inputs: plugins have a fixed signature, so
    NoPE layers get the RoPE tables too (the kernel does not read them when rotary=0); a model with no RoPE layer
    gets (1, head_dim/2) zero tables."""

    domain = TRT_DOMAIN

    def call(self, model: ir.Model) -> PassResult:
        self.tables = None
        return super().call(model)

    def lower(self, graph: ir.Graph, node: ir.Node, layer: int, a: dict) -> None:
        if self.tables is None:
            self.tables = _rope_tables(graph, node)
        attributes = {
            "num_heads": a["num_heads"],
            "kv_num_heads": a["kv_num_heads"],
            "scale": float(a.get("scale", 0.0)),
            "window": int(a.get("window", 0)),
            "rotary": int(a.get("rotary", 0)),
            "ring": int(a.get("ring", 0)),
            "plugin_version": TRT_PLUGIN_VERSION,
            "plugin_namespace": TRT_PLUGIN_NAMESPACE,
        }
        new = ir.node(
            TRT_OP_TYPE,
            list(node.inputs[:7]) + list(self.tables),
            attributes=attributes,
            domain=TRT_DOMAIN,
            num_outputs=3,
            name=node.name,
        )
        _replace(graph, node, new)


def _rope_tables(graph: ir.Graph, like: ir.Node) -> tuple[ir.Value, ir.Value]:
    cos, sin = graph.initializers.get("cos_cache"), graph.initializers.get("sin_cache")
    if cos is not None and sin is not None:
        return cos, sin
    past = like.inputs[3]
    half, dtype = int(past.shape[3]) // 2, past.type.dtype
    tables = []
    for name in ("cos_cache", "sin_cache"):
        v = ir.Value(
            name=name,
            shape=ir.Shape([1, half]),
            type=ir.TensorType(dtype),
            const_value=ir.tensor(np.zeros((1, half), dtype=dtype.numpy())),
        )
        graph.register_initializer(v)
        tables.append(v)
    return tables[0], tables[1]


def target_passes(target: str, io: GraphIO, fuse_linears: bool = True) -> list[PassBase]:
    """The pass list that lowers a canonical graph for ``target``. Bundles are always written with the full
    list; ``fuse_linears=False`` gives the analysis view that keeps one MatMul per linear layer (calibration
    statistics tap each linear's input)."""
    if target == "ort":
        fuse = [FuseParallelMatMuls()] if fuse_linears else []
        return [RsqrtAsDiv(), *fuse, AttentionToGroupQueryAttention(io)]
    if target == "trt":
        return [AttentionToTrtPlugin(io)]
    raise ValueError(f"unknown target {target!r}")


def run_passes(model: ir.Model, target: str, io: GraphIO, fuse_linears: bool = True) -> ir.Model:
    """Lower ``model`` in place for ``target``; returns it."""
    PassManager(target_passes(target, io, fuse_linears))(model)
    return model
