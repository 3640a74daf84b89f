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

__all__ = ["RsqrtAsDiv", "FuseParallelMatMuls", "AttentionToGroupQueryAttention", "AttentionToTrtPlugin",
           "target_passes", "run_passes", "TRT_OP_TYPE", "TRT_PLUGIN_NAMESPACE", "TRT_PLUGIN_VERSION", "TRT_DOMAIN",
           "ORT_DOMAIN"]

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


def _concat(values: list[ir.Value], axis: int, name: str) -> ir.Value:
    """A lazy initializer: ``values`` (constant initializers) concatenated along ``axis`` when saved."""
    dtype = values[0].type.dtype
    dims = [list(v.shape) for v in values]
    shape = ir.Shape([*dims[0][:axis], sum(int(d[axis]) for d in dims), *dims[0][axis + 1:]])

    def concat(ts=tuple(v.const_value for v in values)):
        return ir.tensor(np.concatenate([t.numpy() for t in ts], axis=axis))

    return ir.Value(name=name, shape=shape, type=ir.TensorType(dtype),
                    const_value=ir.LazyTensor(concat, dtype=dtype, shape=shape, name=name))


def _fuse_group(graph: ir.Graph, nodes: list[ir.Node], inputs: list[ir.Value | None], sizes: list[int],
                attributes: dict, name: str) -> None:
    """Replace ``nodes`` (same op, same activation input) by one node over ``inputs`` whose output is split back
    into each node's output along the last axis (``sizes``). New initializers among ``inputs`` are registered;
    the old nodes' now unused initializers are dropped."""
    first = nodes[0]
    for v in inputs:
        if v is not None and v.const_value is not None and v.name not in graph.initializers:
            graph.register_initializer(v)
    split = ir.Value(name=f"{name}.split", shape=ir.Shape([len(sizes)]), type=ir.TensorType(ir.DataType.INT64),
                     const_value=ir.tensor(np.array(sizes, dtype=np.int64), name=f"{name}.split"))
    graph.register_initializer(split)
    fused = ir.node(first.op_type, inputs, attributes=attributes, domain=first.domain, name=f"{first.name}_fused")
    sp = ir.node("Split", [fused.outputs[0], split], attributes={"axis": -1}, num_outputs=len(nodes),
                 name=f"{first.name}_split")
    graph.insert_before(first, [fused, sp])
    old = {v.name: v for n in nodes for v in n.inputs[1:] if v is not None and v.is_initializer()}
    for node, out in zip(nodes, sp.outputs):
        out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
        node.outputs[0].replace_all_uses_with(out)
        graph.remove(node, safe=True)
    for v in old.values():
        if not v.uses() and v.name in graph.initializers:
            del graph.initializers[v.name]


def _constant(v: ir.Value | None) -> bool:
    return v is not None and v.is_initializer() and v.const_value is not None and v.shape is not None


class FuseParallelMatMuls(InPlacePass):
    """Linear layers that read the same input (q/k/v; gate/up) become one op over the concatenated weights and a
    Split: one pass over the activations, one kernel launch instead of three. The fused weights are lazy
    tensors named ``a+b+c`` (concatenated when saved).

    Covered: float ``MatMul`` with constant [in, out] weights of one dtype, and the quantized linears our
    quantization writes, which concatenate exactly along the output dimension: ``com.microsoft::MatMulNBits``
    (packed B [N, blocks, blob], scales and zero points per output column, bias; equal K, bits, block size,
    accuracy level and g_idx) and ``com.microsoft::MatMulIntegerToFloat`` (int8 B [K, N], per-column scale and
    zero point, bias; one shared quantized activation with its scale and zero point). Rejected: fusing at export
    before quantization (calibration statistics and per-layer quantization decisions are per linear layer).
    """

    FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    # op -> per input: "same" (must be the one shared value, or absent) or the axis to concatenate along.
    LAYOUTS = {
        ("", "MatMul"): ("same", 1),
        (ORT_DOMAIN, "MatMulNBits"): ("same", 0, 0, 0, "same", 0),
        (ORT_DOMAIN, "MatMulIntegerToFloat"): ("same", 1, "same", 0, "same", 0, 0),
    }

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        groups: dict[tuple, list[ir.Node]] = {}
        for node in graph:
            if self._candidate(node):
                groups.setdefault((node.domain, node.op_type, id(node.inputs[0])), []).append(node)
        count = 0
        for nodes in groups.values():
            if len(nodes) > 1 and len({self._signature(n) for n in nodes}) == 1:  # else: left as it is
                self._fuse(graph, nodes)
                count += 1
        return PassResult(model, modified=count > 0)

    def _candidate(self, node: ir.Node) -> bool:
        layout = self.LAYOUTS.get((node.domain, node.op_type))
        if layout is None or not node.inputs or node.inputs[0] is None or len(node.inputs) > len(layout):
            return False
        if not all(_constant(v) for v, how in zip(node.inputs, layout) if how != "same" and v is not None):
            return False
        w = node.inputs[1]
        return node.op_type != "MatMul" or (len(w.shape) == 2 and w.type.dtype in self.FLOATS)

    def _signature(self, node: ir.Node) -> tuple:
        """What must agree within a group: attributes but N, the shared inputs, dtypes and the other dims."""
        layout = self.LAYOUTS[(node.domain, node.op_type)]
        attrs = sorted((k, repr(v)) for k, v in _attrs(node).items() if k != "N")
        shared = tuple(id(v) for v, how in zip(node.inputs, layout) if how == "same")
        concat = tuple((v is None) or (v.type.dtype, tuple(v.shape)[:a] + tuple(v.shape)[a + 1:])
                       for v, a in zip(node.inputs, layout) if a != "same")
        return tuple(attrs), len(node.inputs), shared, concat

    def _fuse(self, graph: ir.Graph, nodes: list[ir.Node]) -> None:
        first = nodes[0]
        layout = self.LAYOUTS[(first.domain, first.op_type)]
        out_axis = 1 if first.op_type == "MatMul" else (0 if first.op_type == "MatMulNBits" else 1)
        sizes = [int(n.inputs[1].shape[out_axis]) for n in nodes]
        name = "+".join(n.inputs[1].name for n in nodes)
        inputs = []
        for i, how in enumerate(layout[:len(first.inputs)]):
            group = [n.inputs[i] for n in nodes]
            if how == "same" or group[0] is None:
                inputs.append(group[0])
            else:
                inputs.append(_concat(group, how, name if i == 1 else f"{name}.{i}"))
        attributes = _attrs(first)
        if "N" in attributes:
            attributes["N"] = sum(sizes)
        _fuse_group(graph, nodes, inputs, sizes, attributes, name)


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
        attributes = {"num_heads": a["num_heads"], "kv_num_heads": a["kv_num_heads"],
                      "local_window_size": a.get("window", 0) or -1, "do_rotary": int(a.get("rotary", 0))}
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
        new = ir.node("GroupQueryAttention", inputs, attributes=attributes, domain=ORT_DOMAIN, num_outputs=3,
                      name=node.name)
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
                raise ValueError(f"int8 KV cache: initializer {self.io.kv_scale_name(layer, kv)!r} "
                                 f"{'is missing' if v is None else f'has shape {v.shape}'}; expected "
                                 f"{self.io.kv_scale_shape} float32 scales (export or quantize adds them)")
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
            "num_heads": a["num_heads"], "kv_num_heads": a["kv_num_heads"], "scale": float(a.get("scale", 0.0)),
            "window": int(a.get("window", 0)), "rotary": int(a.get("rotary", 0)), "ring": int(a.get("ring", 0)),
            "plugin_version": TRT_PLUGIN_VERSION, "plugin_namespace": TRT_PLUGIN_NAMESPACE,
        }
        new = ir.node(TRT_OP_TYPE, list(node.inputs[:7]) + list(self.tables), attributes=attributes,
                      domain=TRT_DOMAIN, num_outputs=3, name=node.name)
        _replace(graph, node, new)


def _rope_tables(graph: ir.Graph, like: ir.Node) -> tuple[ir.Value, ir.Value]:
    cos, sin = graph.initializers.get("cos_cache"), graph.initializers.get("sin_cache")
    if cos is not None and sin is not None:
        return cos, sin
    past = like.inputs[3]
    half, dtype = int(past.shape[3]) // 2, past.type.dtype
    tables = []
    for name in ("cos_cache", "sin_cache"):
        v = ir.Value(name=name, shape=ir.Shape([1, half]), type=ir.TensorType(dtype),
                     const_value=ir.tensor(np.zeros((1, half), dtype=dtype.numpy())))
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
