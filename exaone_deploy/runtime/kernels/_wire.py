"""Rename nodes of a serialized ONNX ModelProto in protobuf wire format, without the ``onnx`` package.

Contract: ``rewrite_nodes(model, plan, domain)`` returns the model with its top-level graph nodes replaced as
``plan(nodes, graph_info)`` says (per node: itself, kept byte for byte; a new ``Node``, encoded; or None,
dropped), ``domain`` added to the opset imports (version 1) when anything changed, and the count of changed
nodes. Everything it does not touch is copied as raw bytes, so unknown or future fields survive.

Field numbers (onnx.proto, stable since ONNX 1.0): ModelProto.opset_import 8, .graph 7; GraphProto.node 1,
.initializer 5, .output 12; NodeProto.input 1, .output 2, .name 3, .op_type 4, .attribute 5, .domain 7;
AttributeProto.name 1, .f 2, .i 3, .g 6, .graphs 11, .type 20 (FLOAT = 1, INT = 2); TensorProto.dims 1,
.data_type 2 (FLOAT = 1), .name 8; ValueInfoProto.name 1; OperatorSetIdProto.domain 1, .version 2. Malformed input
raises ``ValueError``.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated or malformed protobuf varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _enc_varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int, bytes]]:
    """(field number, wire type, value: bytes for length-delimited else int, the field's raw encoding)."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == _VARINT:
            val, i = _varint(buf, i)
        elif wt == _LEN:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated protobuf field")
            val, i = buf[i : i + n], i + n
        elif wt == _I64:
            val, i = int.from_bytes(buf[i : i + 8], "little"), i + 8
        elif wt == _I32:
            val, i = int.from_bytes(buf[i : i + 4], "little"), i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        if i > len(buf):
            raise ValueError("truncated protobuf field")
        yield num, wt, val, buf[start:i]


def _len_field(num: int, payload: bytes) -> bytes:
    return _enc_varint(num << 3 | _LEN) + _enc_varint(len(payload)) + payload


@dataclass
class Node:
    op_type: str = ""
    domain: str = ""
    name: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    int_attributes: dict[str, int] = field(default_factory=dict)
    float_attributes: dict[str, float] = field(default_factory=dict)
    str_attributes: dict[str, bytes] = field(default_factory=dict)  # parsed nodes only (never encoded)
    attribute_names: list[str] = field(default_factory=list)  # every attribute, whatever its type (parsed nodes)
    has_subgraph: bool = False  # a graph attribute (If/Loop/Scan): its body may read any outer value

    def encode(self) -> bytes:
        """A NodeProto of this node's fields (int and float attributes: the nodes this module builds)."""
        out = [_len_field(1, x.encode()) for x in self.inputs] + [_len_field(2, x.encode()) for x in self.outputs]
        if self.name:
            out.append(_len_field(3, self.name.encode()))
        out.append(_len_field(4, self.op_type.encode()))
        out += [int_attribute(k, v) for k, v in self.int_attributes.items()]
        out += [float_attribute(k, v) for k, v in self.float_attributes.items()]
        out.append(_len_field(7, self.domain.encode()))
        return b"".join(out)


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def parse_node(buf: bytes) -> Node:
    node = Node()
    for num, wt, val, _ in fields(buf):
        if wt != _LEN:
            continue
        if num == 1:
            node.inputs.append(val.decode())
        elif num == 2:
            node.outputs.append(val.decode())
        elif num == 3:
            node.name = val.decode()
        elif num == 4:
            node.op_type = val.decode()
        elif num == 7:
            node.domain = val.decode()
        elif num == 5:
            name, ival, fval, sval = None, None, None, None
            for anum, awt, aval, _ in fields(val):
                if anum == 1 and awt == _LEN:
                    name = aval.decode()
                elif anum == 4 and awt == _LEN:
                    sval = bytes(aval)
                elif anum == 3 and awt == _VARINT:
                    ival = _signed(aval)
                elif anum == 2 and awt == _I32:
                    fval = struct.unpack("<f", aval.to_bytes(4, "little"))[0]
                elif anum in (6, 11):
                    node.has_subgraph = True
            if name is not None:
                node.attribute_names.append(name)
                if ival is not None:
                    node.int_attributes[name] = ival
                if fval is not None:
                    node.float_attributes[name] = fval
                if sval is not None:
                    node.str_attributes[name] = sval
    return node


@dataclass
class GraphInfo:
    """What a rename decision needs to know of the whole graph."""

    tensors: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)  # initializer -> (dims, data_type)
    uses: Counter = field(default_factory=Counter)  # value name -> how many node inputs / graph outputs read it
    has_subgraphs: bool = False  # some node's body may read any outer value


def graph_info(graph: bytes, nodes: list[Node]) -> GraphInfo:
    """The GraphProto's initializers and graph outputs; uses and subgraphs from its already parsed ``nodes``."""
    info = GraphInfo(has_subgraphs=any(n.has_subgraph for n in nodes))
    for node in nodes:
        info.uses.update(node.inputs)
    for num, wt, val, _ in fields(graph):
        if wt != _LEN:
            continue
        if num == 5:  # TensorProto: dims 1 (packed or not), data_type 2, name 8
            name, dims, dtype = None, [], 0
            for tnum, twt, tval, _ in fields(val):
                if tnum == 8 and twt == _LEN:
                    name = tval.decode()
                elif tnum == 1 and twt == _VARINT:
                    dims.append(_signed(tval))
                elif tnum == 1 and twt == _LEN:
                    i = 0
                    while i < len(tval):
                        d, i = _varint(tval, i)
                        dims.append(_signed(d))
                elif tnum == 2 and twt == _VARINT:
                    dtype = tval
            if name is not None:
                info.tensors[name] = (tuple(dims), dtype)
        elif num == 12:  # graph output (ValueInfoProto.name = 1)
            for vnum, vwt, vval, _ in fields(val):
                if vnum == 1 and vwt == _LEN:
                    info.uses[vval.decode()] += 1
    return info


def int_attribute(name: str, value: int) -> bytes:
    """A NodeProto.attribute field: AttributeProto{name, i, type = INT (2)}."""
    attr = _len_field(1, name.encode()) + _enc_varint(3 << 3 | _VARINT) + _enc_varint(value)
    attr += _enc_varint(20 << 3 | _VARINT) + _enc_varint(2)
    return _len_field(5, attr)


def float_attribute(name: str, value: float) -> bytes:
    """A NodeProto.attribute field: AttributeProto{name, f, type = FLOAT (1)}."""
    attr = _len_field(1, name.encode()) + _enc_varint(2 << 3 | _I32) + struct.pack("<f", value)
    attr += _enc_varint(20 << 3 | _VARINT) + _enc_varint(1)
    return _len_field(5, attr)


def rewrite_nodes(
    model: bytes, plan: Callable[[list[Node], GraphInfo], list[Node | None]], domain: str
) -> tuple[bytes, int]:
    """``plan(nodes, info)`` returns, per top-level node, the node to write in its place (the same object: kept
    byte for byte; a new one: encoded) or None (dropped). Returns the model and how many nodes were replaced;
    ``domain`` joins the opset imports (version 1) when any was."""
    out, count, has_domain = [], 0, False
    for num, wt, val, raw in fields(model):
        if num == 8 and wt == _LEN:
            has_domain |= any(n == 1 and v == domain.encode() for n, _, v, _ in fields(val))
        if num != 7 or wt != _LEN:
            out.append(raw)
            continue
        items = list(fields(val))
        nodes = [parse_node(gval) for gnum, gwt, gval, _ in items if gnum == 1 and gwt == _LEN]
        replacements = plan(nodes, graph_info(val, nodes))
        if len(replacements) != len(nodes):
            raise ValueError("plan returned a different number of nodes")
        pairs, graph = iter(zip(nodes, replacements)), []
        for gnum, gwt, _, graw in items:
            if gnum != 1 or gwt != _LEN:
                graph.append(graw)
                continue
            old, new = next(pairs)
            if new is old:
                graph.append(graw)
            else:
                count += 1
                if new is not None:
                    graph.append(_len_field(1, new.encode()))
        out.append(_len_field(7, b"".join(graph)))
    if count and not has_domain:
        out.append(_len_field(8, _len_field(1, domain.encode()) + _enc_varint(2 << 3 | _VARINT) + _enc_varint(1)))
    return b"".join(out), count
