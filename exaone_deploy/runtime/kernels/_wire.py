"""Rename nodes of a serialized ONNX ModelProto in protobuf wire format, without the ``onnx`` package.

Contract: ``rename_nodes(model, predicate, op_type, domain)`` returns the model with every top-level graph node
for which ``predicate(node, initializer_names)`` holds given ``op_type`` and ``domain`` (all its other fields
byte-for-byte as they were), ``domain`` added to the opset imports (version 1) when it renamed any, and the count.
Everything it does not touch is copied as raw bytes, so unknown or future fields survive.

Field numbers (onnx.proto, stable since ONNX 1.0): ModelProto.opset_import 8, .graph 7; GraphProto.node 1,
.initializer 5; NodeProto.input 1, .op_type 4, .attribute 5, .domain 7; AttributeProto.name 1, .i 3;
TensorProto.name 8; OperatorSetIdProto.domain 1, .version 2. Malformed input raises ``ValueError``.
"""

from __future__ import annotations

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
    inputs: list[str] = field(default_factory=list)
    int_attributes: dict[str, int] = field(default_factory=dict)


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def parse_node(buf: bytes) -> Node:
    node = Node()
    for num, wt, val, _ in fields(buf):
        if wt != _LEN:
            continue
        if num == 1:
            node.inputs.append(val.decode())
        elif num == 4:
            node.op_type = val.decode()
        elif num == 7:
            node.domain = val.decode()
        elif num == 5:
            name, ival = None, None
            for anum, awt, aval, _ in fields(val):
                if anum == 1 and awt == _LEN:
                    name = aval.decode()
                elif anum == 3 and awt == _VARINT:
                    ival = _signed(aval)
            if name is not None and ival is not None:
                node.int_attributes[name] = ival
    return node


def _initializer_names(graph: bytes) -> set[str]:
    names = set()
    for num, wt, val, _ in fields(graph):
        if num == 5 and wt == _LEN:
            for tnum, twt, tval, _ in fields(val):
                if tnum == 8 and twt == _LEN:
                    names.add(tval.decode())
    return names


def rename_nodes(
    model: bytes, predicate: Callable[[Node, set[str]], bool], op_type: str, domain: str
) -> tuple[bytes, int]:
    out, count, has_domain = [], 0, False
    for num, wt, val, raw in fields(model):
        if num == 8 and wt == _LEN:
            has_domain |= any(n == 1 and v == domain.encode() for n, _, v, _ in fields(val))
        if num != 7 or wt != _LEN:
            out.append(raw)
            continue
        inits = _initializer_names(val)
        graph = []
        for gnum, gwt, gval, graw in fields(val):
            if gnum == 1 and gwt == _LEN and predicate(parse_node(gval), inits):
                kept = [r for n, _, _, r in fields(gval) if n not in (4, 7)]
                graph.append(
                    _len_field(1, b"".join(kept) + _len_field(4, op_type.encode()) + _len_field(7, domain.encode()))
                )
                count += 1
            else:
                graph.append(graw)
        out.append(_len_field(7, b"".join(graph)))
    if count and not has_domain:
        out.append(_len_field(8, _len_field(1, domain.encode()) + _enc_varint(2 << 3 | _VARINT) + _enc_varint(1)))
    return b"".join(out), count
