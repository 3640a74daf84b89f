"""Static checks of a ``trt`` graph: will TensorRT's ONNX parser take it, as a strongly typed network?

These run anywhere (onnx only, no TensorRT, no torch), so the parts of an engine build that can fail on a
graph are caught before a GPU machine is involved:

* **Ops.** Every node is an op TensorRT's ONNX parser imports natively (``trt_onnx_ops.json``: the operator
  matrix of onnx-tensorrt, with the TensorRT version it describes, plus the parser's ``TRT_*`` custom
  importers) or one of our plugins with all its fields: ``plugin_version``, ``plugin_namespace`` and the
  attributes the plugin creator reads, each with the right ONNX type. The parser dispatches by op_type only
  (the domain is ignored), so an unknown op would become a plugin lookup that fails at build time.
* **Plugin wiring.** Input/output counts, input types, RoPE tables present when ``rotary=1``, and the cache
  inputs/outputs being the graph's past/present pairs (``GraphIO.present_of``) that the runtime binds to
  the same memory.
* **Q/DQ.** What a strongly typed network accepts (precision comes from the graph): Q->DQ pairs with constant,
  positive scales of a float type; quantized types INT8, FP8 (E4M3) and INT4 (FP4) with zero zero-points of
  the quantized type; per-channel axes in range with one scale per channel; blocked (INT4) scales on
  constant weights only; weight DQs feeding MatMul/Gemm. These rules are generic: they hold for any Q/DQ
  placement, whoever wrote it.

``check_model(path_or_proto)`` returns a :class:`CheckReport`; ``check_bundle(dir)`` checks a bundle's
``model.onnx``. ``report.raise_for_errors()`` raises :class:`TrtGraphError` listing every error.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ExaoneDeployError
from ..graph_io import GraphIO

__all__ = [
    "Issue",
    "CheckReport",
    "TrtGraphError",
    "PluginContract",
    "supported_ops",
    "plugin_contract",
    "check_model",
    "check_bundle",
]

OPS_FILE = Path(__file__).with_name("trt_onnx_ops.json")
STANDARD_DOMAINS = ("", "ai.onnx")

A = onnx.AttributeProto
T = onnx.TensorProto


@dataclass(frozen=True)
class PluginContract:
    """What the registered TensorRT plugin expects of its ONNX nodes (from :mod:`.trt_plugin`)."""

    op_type: str
    namespace: str
    version: str
    fields: dict  # plugin field -> ONNX attribute type
    inputs: tuple  # input names, all required (a tensorrt.plugin plugin has a fixed input list)
    outputs: tuple


# Attributes the parser itself understands on a plugin node (not passed as plugin fields).
PLUGIN_OPTIONAL = {"aot": A.INT, "tensorrt_plugin_shape_input_indices": A.INTS}

FLOAT_TYPES = {T.FLOAT: "FP32", T.FLOAT16: "FP16", T.BFLOAT16: "BF16"}
QUANT_TYPES = {T.INT8: "INT8", T.FLOAT8E4M3FN: "FP8", T.INT4: "INT4"}
if hasattr(T, "FLOAT4E2M1"):
    QUANT_TYPES[T.FLOAT4E2M1] = "FP4"
FOUR_BIT = {"INT4", "FP4"}
# onnx-tensorrt's type names in operators.md.
TYPE_NAMES = {
    T.FLOAT: "FP32",
    T.FLOAT16: "FP16",
    T.BFLOAT16: "BF16",
    T.INT32: "INT32",
    T.INT64: "INT64",
    T.INT8: "INT8",
    T.UINT8: "UINT8",
    T.BOOL: "BOOL",
    T.FLOAT8E4M3FN: "FP8",
    T.INT4: "INT4",
    T.DOUBLE: "DOUBLE",
}
QUANTIZED_CONSUMERS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
SHAPE_PASSTHROUGH = {"Transpose", "Reshape", "Identity", "Unsqueeze", "Squeeze", "Flatten"}


@dataclass(frozen=True)
class Issue:
    severity: str  # "error" | "warning"
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        where = f"node {self.node!r} ({self.op})" if self.node or self.op else "graph"
        return f"{self.severity}: {where}: {self.message}"


class TrtGraphError(ExaoneDeployError, ValueError):
    def __init__(self, path: str, issues: list[Issue]):
        self.path, self.issues = path, issues
        errors = [i for i in issues if i.severity == "error"]
        lines = "\n  ".join(str(i) for i in errors[:50])
        more = f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else ""
        super().__init__(f"{path}: {len(errors)} problem(s) TensorRT's ONNX parser would reject:\n  {lines}{more}")


@dataclass
class CheckReport:
    path: str
    tensorrt_version: str  # the TensorRT version the supported-op list describes
    nodes: int = 0
    plugin_nodes: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)
    quantization: dict[str, int] = field(default_factory=dict)  # quantized type -> DQ nodes
    plugins: list[dict] = field(default_factory=list)  # the plugin nodes' fields, in graph order
    issues: list[Issue] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> CheckReport:
        if self.errors:
            raise TrtGraphError(self.path, self.issues)
        return self

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "tensorrt_version": self.tensorrt_version,
            "ok": self.ok,
            "nodes": self.nodes,
            "plugin_nodes": self.plugin_nodes,
            "op_counts": self.op_counts,
            "quantization": self.quantization,
            "errors": [str(i) for i in self.errors],
            "warnings": [str(i) for i in self.warnings],
        }


@functools.cache
def supported_ops() -> dict:
    """The parser's op list (``trt_onnx_ops.json``)."""
    try:
        return json.loads(OPS_FILE.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RuntimeError(f"{OPS_FILE}: cannot read TensorRT's supported-op list ({e})") from None


def plugin_contract() -> PluginContract:
    """The contract of our TensorRT plugin, read from exaone_deploy.tensorrt.plugin (no TensorRT needed)."""
    from . import plugin as p

    onnx_type = {int: A.INT, float: A.FLOAT, str: A.STRING}
    return PluginContract(
        p.PLUGIN_OP_TYPE,
        p.PLUGIN_NAMESPACE,
        str(p.PLUGIN_VERSION),
        {k: onnx_type[v] for k, v in p.ATTRIBUTE_TYPES.items()},
        tuple(p.INPUT_NAMES),
        tuple(p.OUTPUT_NAMES),
    )


# ---- graph index ---------------------------------------------------------------------------------------


class _Graph:
    """Types, shapes, constants, producers and consumers of one (top-level) graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.types: dict[str, int] = {}
        self.shapes: dict[str, tuple | None] = {}
        self.inits: dict[str, onnx.TensorProto] = {i.name: i for i in graph.initializer}
        self.inputs = {v.name for v in graph.input}
        self.outputs = {v.name for v in graph.output}
        for v in [*graph.input, *graph.output, *graph.value_info]:
            t = v.type.tensor_type
            if t.elem_type:
                self.types[v.name] = t.elem_type
            if t.HasField("shape"):
                self.shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        for name, init in self.inits.items():
            self.types[name] = init.data_type
            self.shapes[name] = tuple(init.dims)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
            if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.types[node.output[0]] = value.data_type
                    self.shapes[node.output[0]] = tuple(value.dims)

    def constant(self, name: str) -> onnx.TensorProto | None:
        """The tensor behind ``name`` if it is a build-time constant (initializer, Constant, or Identity/Cast
        of one, as the parser resolves them); None otherwise."""
        seen = 0
        while seen < 16:
            if name in self.inits and name not in self.inputs:
                return self.inits[name]
            node = self.producer.get(name)
            if node is None or node.domain not in STANDARD_DOMAINS:
                return None
            if node.op_type == "Constant":
                return next((a.t for a in node.attribute if a.name == "value"), None)
            if node.op_type not in ("Identity", "Cast"):
                return None
            name, seen = node.input[0], seen + 1
        return None

    def is_constant(self, name: str) -> bool:
        return self.constant(name) is not None

    def values(self, name: str) -> np.ndarray | None:
        t = self.constant(name)
        if t is None:
            return None
        if t.data_location == T.EXTERNAL:
            return None  # the bytes live in the weights file; skip value checks (types/shapes still checked)
        try:
            return numpy_helper.to_array(t)
        except Exception:  # noqa: BLE001 - exotic types numpy cannot hold
            return None


def _attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return a
    return None


def _attr_value(node: onnx.NodeProto, name: str, default=None):
    a = _attr(node, name)
    return onnx.helper.get_attribute_value(a) if a is not None else default


def _tname(elem_type: int | None) -> str:
    if elem_type is None:
        return "unknown"
    return onnx.TensorProto.DataType.Name(elem_type)


# ---- checks --------------------------------------------------------------------------------------------


class _Checker:
    def __init__(self, model: onnx.ModelProto, path: str, contract: PluginContract):
        self.model, self.path = model, path
        self.g = _Graph(model.graph)
        self.ops = supported_ops()
        self.contract = contract
        self.report = CheckReport(path=path, tensorrt_version=self.ops["tensorrt_version"])

    def issue(self, severity: str, node: onnx.NodeProto | None, message: str) -> None:
        self.report.issues.append(
            Issue(severity, node.name if node is not None else "", node.op_type if node is not None else "", message)
        )

    def error(self, node, message):
        self.issue("error", node, message)

    def warn(self, node, message):
        self.issue("warning", node, message)

    def run(self) -> CheckReport:
        self.check_opset()
        counts: Counter = Counter()
        self.check_nodes(self.model.graph, counts, top=True)
        self.report.op_counts = dict(sorted(counts.items()))
        self.report.nodes = sum(counts.values())
        return self.report

    def check_opset(self) -> None:
        lo, hi = self.ops["opset_range"]
        for imp in self.model.opset_import:
            if imp.domain in STANDARD_DOMAINS and not lo <= imp.version <= hi:
                self.error(
                    None,
                    f"default-domain opset {imp.version} is outside the range TensorRT "
                    f"{self.ops['tensorrt_version']} imports ({lo}..{hi})",
                )

    def check_nodes(self, graph: onnx.GraphProto, counts: Counter, top: bool) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for a in node.attribute:  # If/Loop/Scan bodies
                for sub in [a.g] if a.type == A.GRAPH else list(a.graphs) if a.type == A.GRAPHS else []:
                    self.check_nodes(sub, counts, top=False)
            self.check_node(node, top)

    def check_node(self, node: onnx.NodeProto, top: bool) -> None:
        op = node.op_type
        builtin = self.ops["ops"].get(op)
        custom = self.ops["trt_custom_ops"]["ops"].get(op)
        if op == self.contract.op_type:
            self.report.plugin_nodes += 1
            self.check_plugin(node, top)
            return
        if builtin is not None:
            # Dispatch is by op_type: a builtin name in a custom domain is imported as the builtin op.
            if node.domain not in STANDARD_DOMAINS:
                self.warn(
                    node,
                    f"domain {node.domain!r} is ignored by TensorRT: this node is imported as the standard ONNX {op}",
                )
            if top:
                self.check_types(node, builtin)
            if op in ("QuantizeLinear", "DequantizeLinear") and top:
                self.check_qdq(node, dq=op == "DequantizeLinear", custom=None)
            return
        if custom is not None:
            if custom["kind"] in ("quantize", "dequantize") and top:
                self.check_qdq(node, dq=custom["kind"] == "dequantize", custom=custom)
            return
        if op in self.ops["unsupported"]:
            self.error(
                node,
                f"TensorRT {self.ops['tensorrt_version']}'s ONNX parser does not support {op} "
                f"({self.ops['unsupported'][op]})",
            )
        elif node.domain == "com.microsoft":
            self.error(
                node,
                f"com.microsoft::{op} is an ONNX Runtime contrib op, not a TensorRT one "
                f"(an 'ort' lowering? export with --target trt)",
            )
        elif node.domain in STANDARD_DOMAINS:
            self.error(node, f"{op} is not in TensorRT {self.ops['tensorrt_version']}'s supported ONNX operators")
        else:
            self.error(
                node,
                f"{node.domain}::{op} is neither an op TensorRT's ONNX parser imports nor one of "
                f"our plugins: the parser would look for a registered plugin named {op!r} and fail "
                f"(our plugin is {self.contract.op_type!r})",
            )

    # -- types --------------------------------------------------------------------------------------------
    def check_types(self, node: onnx.NodeProto, entry: dict) -> None:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or not node.input or not node.input[0]:
            return
        t = self.g.types.get(node.input[0])
        name = TYPE_NAMES.get(t) if t is not None else None
        if t is None:
            return
        if name == "DOUBLE":
            self.warn(node, "DOUBLE input: TensorRT casts it down to FLOAT")
        elif name is None or name not in entry["types"]:
            self.error(
                node,
                f"input {node.input[0]!r} is {_tname(t)}; TensorRT's {node.op_type} takes {', '.join(entry['types'])}",
            )

    # -- plugin -------------------------------------------------------------------------------------------
    def check_plugin(self, node: onnx.NodeProto, top: bool) -> None:
        c = self.contract
        op_type, namespace, version = c.op_type, c.namespace, c.version
        attrs = {a.name: a for a in node.attribute}
        for name, want in (("plugin_version", version), ("plugin_namespace", namespace)):
            a = attrs.get(name)
            if a is None:
                self.error(
                    node,
                    f"plugin attribute {name!r} is missing (the parser would look up "
                    f"{op_type!r} with the default and not find our plugin; expected {want!r})",
                )
            elif a.type != A.STRING:
                self.error(node, f"plugin attribute {name!r} must be a STRING, got {A.AttributeType.Name(a.type)}")
            elif a.s.decode() != want:
                self.error(node, f"{name} is {a.s.decode()!r}; the registered plugin has {want!r}")
        for name, want in c.fields.items():
            a = attrs.get(name)
            if a is None:
                self.error(node, f"plugin field {name!r} ({A.AttributeType.Name(want)}) is missing")
            elif a.type != want:
                self.error(
                    node,
                    f"plugin field {name!r} must be {A.AttributeType.Name(want)}, got {A.AttributeType.Name(a.type)}",
                )
        for name, a in attrs.items():
            if name in c.fields or name in ("plugin_version", "plugin_namespace"):
                continue
            if name not in PLUGIN_OPTIONAL:
                self.error(
                    node,
                    f"unknown attribute {name!r}: the parser passes it to the plugin creator as a "
                    f"field it does not declare",
                )
            elif a.type != PLUGIN_OPTIONAL[name]:
                self.error(node, f"attribute {name!r} must be {A.AttributeType.Name(PLUGIN_OPTIONAL[name])}")
        if any(e.node == node.name and e.severity == "error" for e in self.report.issues):
            return
        v = {name: onnx.helper.get_attribute_value(attrs[name]) for name in c.fields}
        self.report.plugins.append({"node": node.name, **v, "inputs": list(node.input[3:5])})
        if v["num_heads"] <= 0 or v["kv_num_heads"] <= 0 or v["num_heads"] % v["kv_num_heads"]:
            self.error(
                node, f"num_heads={v['num_heads']} must be a positive multiple of kv_num_heads={v['kv_num_heads']}"
            )
        if v["window"] < 0 or v["scale"] < 0:
            self.error(node, f"window ({v['window']}) and scale ({v['scale']}) must be >= 0")
        for flag in ("rotary", "ring"):
            if v[flag] not in (0, 1):
                self.error(node, f"{flag} must be 0 or 1, got {v[flag]}")
        if v["ring"] and not v["window"]:
            self.error(node, "ring=1 (ring-buffer cache) needs a sliding window (window > 0)")
        if top:
            self.check_plugin_io(node, bool(v["rotary"]))

    def check_plugin_io(self, node: onnx.NodeProto, rotary: bool) -> None:
        c = self.contract
        ins = list(node.input)
        given = [bool(x) for x in ins]
        if len(ins) != len(c.inputs) or not all(given):
            missing = [n for i, n in enumerate(c.inputs) if i >= len(ins) or not ins[i]]
            self.error(
                node,
                f"the plugin takes all {len(c.inputs)} inputs ({', '.join(c.inputs)}); this node has "
                f"{sum(given)}, missing {', '.join(missing) or '-'}"
                + (
                    " (a tensorrt.plugin plugin has a fixed input list: NoPE layers must be given the "
                    "RoPE tables too, which the trt lowering has to connect)"
                    if not rotary
                    else ""
                ),
            )
            return
        if len(node.output) != 3 or not all(node.output):
            self.error(node, f"expects 3 outputs (output, present_key, present_value), got {list(node.output)}")
            return
        types = self.g.types
        t = types.get(ins[0])
        if t is not None and t not in FLOAT_TYPES:
            self.error(node, f"query is {_tname(t)}; the plugin takes FLOAT, FLOAT16 or BFLOAT16")
        for i in (1, 2, 3, 4, 7, 8):
            ti = types.get(ins[i])
            if t is None or ti is None or ti == t or (i >= 7 and ti == T.FLOAT):
                continue
            self.error(
                node,
                f"input {i} ({ins[i]!r}) is {_tname(ti)} but query is {_tname(t)}: the plugin's float "
                f"inputs share one type (the RoPE tables may also be FLOAT)",
            )
        for i in (5, 6):
            ti = types.get(ins[i])
            if ti is not None and ti != T.INT32:
                self.error(node, f"input {i} ({ins[i]!r}) must be INT32, got {_tname(ti)}")
        # In-place cache: past_* are graph inputs, present_* graph outputs of the same layer and kind. A
        # prompt-only graph (task heads, graph_io.HeadIO) has no cache I/O: its caches are zeros made in the graph.
        prompt_only = not any(GraphIO.is_cache(name) for name in self.g.inputs)
        for k, kind in ((3, "key"), (4, "value")):
            past, pres = ins[k], node.output[k - 2]
            if prompt_only and past in self.g.producer and pres not in self.g.outputs:
                continue
            if past not in self.g.inputs or pres not in self.g.outputs:
                self.error(
                    node,
                    f"cache {kind}: {past!r} must be a graph input and {pres!r} a graph output "
                    f"(the runtime binds them to the same memory)",
                )
            elif GraphIO.present_of(past) not in (None, pres):
                self.error(node, f"cache {kind}: {past!r} pairs with {pres!r}, expected {GraphIO.present_of(past)!r}")
            ps, qs = self.g.shapes.get(past), self.g.shapes.get(pres)
            if ps is not None and qs is not None and len(ps) != 4:
                self.error(node, f"cache {kind} {past!r} must be 4-D (B, Nkv, C, H), got rank {len(ps)}")

    # -- Q/DQ ---------------------------------------------------------------------------------------------
    def quant_type(self, node: onnx.NodeProto, dq: bool, custom: dict | None) -> int | None:
        """The quantized ONNX type of a Q (output) / DQ (input), as the parser determines it."""
        if custom is not None:
            return {"FP8": T.FLOAT8E4M3FN, "INT4": T.INT4}.get(custom.get("quantized_type"))
        if len(node.input) > 2 and node.input[2]:
            return self.g.types.get(node.input[2])
        if dq:
            return self.g.types.get(node.input[0])
        out = _attr_value(node, "output_dtype")
        return out if out else None

    def check_qdq(self, node: onnx.NodeProto, dq: bool, custom: dict | None) -> None:
        g, name = self.g, ("DQ" if dq else "Q")
        if len(node.input) < 2 or not node.input[1]:
            self.error(node, f"{name} needs a scale input")
            return
        x, scale = node.input[0], node.input[1]
        qtype = self.quant_type(node, dq, custom)
        qname = QUANT_TYPES.get(qtype) if qtype is not None else None
        # Quantized type.
        if qtype is None:
            if not dq:
                self.warn(
                    node,
                    "Q without zero point or output_dtype: ONNX means UINT8 but TensorRT imports INT8; "
                    "give an INT8 zero point to say what is meant",
                )
                qname = "INT8"
        elif qtype == T.UINT8:
            self.error(node, "UINT8 quantization is DLA-only in TensorRT: use INT8 (zero point of type INT8)")
        elif qtype == getattr(T, "FLOAT8E5M2", -1):
            self.error(node, "FLOAT8E5M2 is not a TensorRT type: TensorRT's FP8 is FLOAT8E4M3FN")
        elif qname is None:
            self.error(node, f"{_tname(qtype)} is not a quantized type TensorRT supports (INT8, FP8 E4M3, INT4, FP4)")
        if dq and qname:
            self.report.quantization[qname] = self.report.quantization.get(qname, 0) + 1
        # Scale: constant, positive, float type.
        st = g.types.get(scale)
        if not g.is_constant(scale):
            self.error(node, f"scale {scale!r} must be a build-time constant (initializer or Constant)")
        sv = g.values(scale)
        if sv is not None and not np.all(sv.astype(np.float32) > 0):
            self.error(node, f"scale {scale!r} has non-positive values (TensorRT requires all scales > 0)")
        if st is not None and st not in FLOAT_TYPES and custom is None:
            self.error(node, f"scale {scale!r} is {_tname(st)}; TensorRT takes FLOAT, FLOAT16 or BFLOAT16 scales")
        # Types around the node (strongly typed: no implicit casts).
        xt = g.types.get(x)
        if not dq and custom is None and xt is not None and st is not None and xt != st:
            self.error(
                node,
                f"input {x!r} is {_tname(xt)} but its scale is {_tname(st)}: a strongly typed Q needs "
                f"them equal (cast the scale)",
            )
        if dq and custom is None:
            out_dtype = _attr_value(node, "output_dtype") or st
            yt = g.types.get(node.output[0])
            if out_dtype is not None and out_dtype not in FLOAT_TYPES:
                self.error(node, f"DQ output type {_tname(out_dtype)} must be FLOAT, FLOAT16 or BFLOAT16")
            elif yt is not None and out_dtype is not None and yt != out_dtype:
                self.error(node, f"DQ output {node.output[0]!r} is {_tname(yt)} but the scale says {_tname(out_dtype)}")
        # Zero point: constant, zero, same type as the quantized type, one per scale.
        if len(node.input) > 2 and node.input[2]:
            zp = node.input[2]
            zv = g.values(zp)
            if not g.is_constant(zp):
                self.error(node, f"zero point {zp!r} must be a build-time constant")
            elif zv is not None and np.any(zv.astype(np.float32) != 0):
                self.error(node, f"zero point {zp!r} is not all zeros (TensorRT quantization is symmetric)")
            zs, ss = g.shapes.get(zp), g.shapes.get(scale)
            if zs is not None and ss is not None and int(np.prod(zs)) != int(np.prod(ss)):
                self.error(node, f"zero point {zp!r} has {int(np.prod(zs))} values but the scale {int(np.prod(ss))}")
            if dq and xt is not None and g.types.get(zp) is not None and g.types[zp] != xt:
                self.error(node, f"zero point {zp!r} is {_tname(g.types[zp])} but the quantized input is {_tname(xt)}")
        self.check_axis_and_blocks(node, x, scale, qname)
        if dq:
            self.check_dq_placement(node, x, scale, qname, custom)
        else:
            self.check_q_placement(node, x, qname)

    def check_axis_and_blocks(self, node: onnx.NodeProto, x: str, scale: str, qname: str | None) -> None:
        g = self.g
        xs, ss = g.shapes.get(x), g.shapes.get(scale)
        if ss is None:
            return
        size = int(np.prod(ss)) if ss and all(d is not None for d in ss) else None
        rank = len(xs) if xs is not None else None
        axis = _attr_value(node, "axis", 1)
        if xs is not None and qname in FOUR_BIT and all(d is not None for d in xs) and int(np.prod(xs)) % 2:
            self.error(node, "4-bit quantization needs an even number of elements")
        if size == 1 or size is None:
            return
        if rank is not None and not -rank <= axis < rank:
            self.error(node, f"axis {axis} is out of range for input {x!r} of rank {rank}")
            return
        if len(ss) == 1:  # per-channel
            if xs is not None and xs[axis] is not None and xs[axis] != size:
                self.error(node, f"{size} per-channel scales but input {x!r} has {xs[axis]} channels on axis {axis}")
            if not self._weights(x):
                self.error(
                    node,
                    f"per-channel scales on {x!r}, which is an activation: TensorRT quantizes "
                    f"activations per tensor (per-channel is for weights)",
                )
            return
        if rank is not None and len(ss) != rank:
            self.error(
                node,
                f"scale {scale!r} of rank {len(ss)} is neither per-tensor, per-channel (1-D) nor "
                f"blocked (rank {rank} like the input)",
            )
            return
        # Blocked quantization: one dimension blocked, the others equal; weights only.
        if not self._weights(x):
            self.error(
                node,
                f"blocked scales on {x!r}, which is not a constant: TensorRT takes blocked "
                f"quantization on weights only",
            )
        if xs is not None and all(d is not None for d in xs):
            ratios = [a // b if b else 0 for a, b in zip(xs, ss)]
            blocked = [d for d, (a, b) in enumerate(zip(xs, ss)) if a != b]
            if len(blocked) != 1 or any(a % b for a, b in zip(xs, ss) if b):
                self.error(
                    node,
                    f"blocked scale shape {list(ss)} for input shape {list(xs)}: exactly one "
                    f"dimension may be blocked, evenly",
                )
            else:
                bs = _attr_value(node, "block_size")
                if bs and bs != ratios[blocked[0]]:
                    self.error(node, f"block_size={bs} but the shapes give blocks of {ratios[blocked[0]]}")

    def check_q_placement(self, node: onnx.NodeProto, x: str, qname: str | None) -> None:
        consumers = self.g.consumers.get(node.output[0], [])
        if node.output[0] in self.g.outputs:
            self.error(
                node,
                f"Q output {node.output[0]!r} is a graph output: a strongly typed network needs each Q "
                f"followed by a DQ",
            )
        bad = [
            c
            for c in consumers
            if not (
                c.op_type == "DequantizeLinear"
                or self.ops["trt_custom_ops"]["ops"].get(c.op_type, {}).get("kind") == "dequantize"
            )
        ]
        if bad:
            self.error(
                node,
                f"Q output feeds {', '.join(sorted({c.op_type for c in bad}))}: every Q must feed "
                f"DequantizeLinear nodes (Q->DQ pairs)",
            )
        if qname in FOUR_BIT and not self._weights(x):
            self.error(
                node, f"{qname} quantization of an activation ({x!r}): TensorRT's 4-bit types are for weights only"
            )

    def check_dq_placement(
        self, node: onnx.NodeProto, x: str, scale: str, qname: str | None, custom: dict | None
    ) -> None:
        g = self.g
        src = g.producer.get(x)
        weights = self._weights(x)
        is_q = src is not None and (
            src.op_type == "QuantizeLinear"
            or self.ops["trt_custom_ops"]["ops"].get(src.op_type, {}).get("kind") == "quantize"
        )
        if not weights and not is_q:
            self.error(
                node,
                f"DQ input {x!r} comes from {src.op_type if src is not None else 'a graph input'}: "
                f"it must be a QuantizeLinear output (Q->DQ pair) or quantized constant weights",
            )
        if is_q:
            q_scale = src.input[1] if len(src.input) > 1 else None
            if q_scale and q_scale != scale:
                a, b = g.values(q_scale), g.values(scale)
                if a is None or b is None or a.shape != b.shape or not np.array_equal(a, b):
                    self.error(
                        node, f"Q/DQ pair scales differ ({q_scale!r} vs {scale!r}): the pair must share one scale"
                    )
            if _attr_value(src, "axis", 1) != _attr_value(node, "axis", 1) and g.shapes.get(scale) not in (
                None,
                (),
                (1,),
            ):
                self.error(node, "Q/DQ pair uses different axes")
        if qname in FOUR_BIT and not weights:
            self.error(node, f"{qname} DQ of {x!r}, which is not constant: TensorRT's 4-bit types are weight-only")
        # Where the dequantized values go.
        targets = self._consumer_ops(node.output[0])
        if not targets:
            return
        off = sorted(t for t in targets if t not in QUANTIZED_CONSUMERS)
        if weights and qname in FOUR_BIT and off:
            self.error(
                node,
                f"{qname} weight DQ feeds {', '.join(off)}: TensorRT fuses 4-bit weight dequantization "
                f"only into MatMul/Gemm",
            )
        elif off:
            self.warn(
                node,
                f"DQ feeds {', '.join(off)}, not MatMul/Gemm: it runs as a separate dequantization "
                f"(no quantized kernel)",
            )

    def _weights(self, x: str) -> bool:
        """Is ``x`` weights: a constant, or a Q (pair) of a constant?"""
        if self.g.is_constant(x):
            return True
        src = self.g.producer.get(x)
        return (
            src is not None
            and src.input
            and (
                src.op_type == "QuantizeLinear"
                or self.ops["trt_custom_ops"]["ops"].get(src.op_type, {}).get("kind") == "quantize"
            )
            and self.g.is_constant(src.input[0])
        )

    def _consumer_ops(self, name: str, depth: int = 0) -> set[str]:
        out: set[str] = set()
        for c in self.g.consumers.get(name, []):
            if c.op_type in SHAPE_PASSTHROUGH and depth < 4 and c.output:
                out |= self._consumer_ops(c.output[0], depth + 1)
            else:
                out.add(c.op_type)
        return out


def check_model(
    model: str | Path | onnx.ModelProto, *, contract: PluginContract | None = None, name: str | None = None
) -> CheckReport:
    """Check an ONNX model (path or proto). External data is not loaded: weights are checked by type and shape
    (and by value where they are stored in the model file)."""
    if isinstance(model, (str, Path)):
        path = str(model)
        try:
            proto = onnx.load(path, load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf errors have many types
            raise TrtGraphError(f"{path}: not a readable ONNX model ({e})") from None
    else:
        proto, path = model, name or (model.graph.name or "<model>")
    if contract is None:
        contract = plugin_contract()
    return _Checker(proto, path, contract).run()


def check_bundle(bundle_dir: str | Path, verify: bool = False) -> CheckReport:
    """Check a ``trt`` bundle's model.onnx."""
    from ..bundle import BundleError, load_manifest

    m = load_manifest(bundle_dir, verify=verify)
    if m.target != "trt":
        raise BundleError(
            f"{m.root}: bundle target is {m.target!r}; TensorRT engines are built from 'trt' bundles "
            f"(exaone-deploy export --target trt)"
        )
    return check_model(m.model_path)
