"""Where the linear layers are in an exported graph, and how they share inputs.

The exporter writes every linear layer as ``MatMul(x, W^T)`` with ``W^T`` an initializer named
``<checkpoint name>.T`` (shape [in, out]); the tied LM head reads ``model.embed_tokens.weight.T``. Those
MatMuls are what we quantize. Linears that read the same activation (q/k/v read the residual stream, gate/up
read it too) form one *input group*: they share one smoothing vector and one activation quantizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx_ir as ir

from ..errors import InputError
from ..exporter.export import untransposed_name

__all__ = ["Linear", "InputGroup", "find_linears", "input_groups", "resolve_keep_float", "linear_name"]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight$")
_LM_HEAD = ("lm_head.weight", "model.embed_tokens.weight")  # untied head; tied: the embedding


def linear_name(weight_name: str) -> tuple[str, int | None, str] | None:
    """``model.layers.3.mlp.down_proj.weight.T`` -> ("layers.3.mlp.down_proj", 3, "down_proj")."""
    source = untransposed_name(weight_name)
    m = _LAYER.match(source) if source is not None else None
    if m:
        return f"layers.{m.group(1)}.{m.group(2)}.{m.group(3)}", int(m.group(1)), m.group(3)
    if source in _LM_HEAD:
        return "lm_head", None, "lm_head"
    return None


@dataclass
class Linear:
    name: str  # "layers.3.mlp.down_proj" or "lm_head"
    layer: int | None
    kind: str  # q_proj k_proj v_proj o_proj gate_proj up_proj down_proj lm_head
    node: ir.Node  # the MatMul
    weight: ir.Value  # the [in, out] initializer

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(d) for d in self.weight.shape)


@dataclass
class InputGroup:
    name: str  # "layers.3.qkv", "layers.3.o", "layers.3.gate_up", "layers.3.down", "lm_head"
    input: ir.Value
    members: list[Linear] = field(default_factory=list)

    @property
    def in_features(self) -> int:
        return self.members[0].shape[0]

    @property
    def layer(self) -> int | None:
        return self.members[0].layer


_GROUP_NAMES = {
    ("q_proj", "k_proj", "v_proj"): "qkv",
    ("o_proj",): "o",
    ("gate_proj", "up_proj"): "gate_up",
    ("down_proj",): "down",
}


def find_linears(graph: ir.Graph) -> list[Linear]:
    """The weight MatMuls of an exported (canonical or lowered) graph, in graph order."""
    out = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) != 2:
            continue
        w = node.inputs[1]
        if w is None or not w.is_initializer() or w.name is None:
            continue
        parsed = linear_name(w.name)
        if parsed is None:
            continue
        name, layer, kind = parsed
        out.append(Linear(name, layer, kind, node, w))
    return out


def input_groups(linears: list[Linear]) -> list[InputGroup]:
    """Linears grouped by the activation they read, in graph order."""
    groups: dict[int, InputGroup] = {}
    for lin in linears:
        g = groups.get(id(lin.input))
        if g is None:
            g = groups[id(lin.input)] = InputGroup("", lin.input)
        g.members.append(lin)
    for g in groups.values():
        kinds = tuple(m.kind for m in g.members)
        if kinds == ("lm_head",):
            g.name = "lm_head"
        else:
            short = _GROUP_NAMES.get(kinds, "+".join(kinds))
            g.name = f"layers.{g.layer}.{short}"
    return list(groups.values())


def resolve_keep_float(spec: str | list[str] | tuple[str, ...] | None, linears: list[Linear]) -> set[str]:
    """Names of the linears to leave in float from a --keep-float list.

    Items (comma-separated): a layer index (``3``), a range (``0-2``), ``lm_head``, or a linear's name or a
    dotted suffix of it (``layers.3.mlp.down_proj``, ``mlp.down_proj``, ``down_proj``: every layer's).
    """
    if spec is None:
        return set()
    items = spec.split(",") if isinstance(spec, str) else [i for s in spec for i in str(s).split(",")]
    keep: set[str] = set()
    layers = sorted({lin.layer for lin in linears if lin.layer is not None})
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        if re.fullmatch(r"\d+", item):
            idx = {int(item)}
        elif m := re.fullmatch(r"(\d+)-(\d+)", item):
            idx = set(range(int(m.group(1)), int(m.group(2)) + 1))
        else:
            hit = {lin.name for lin in linears if lin.name == item or lin.name.endswith("." + item)}
            if not hit:
                raise InputError(
                    f"--keep-float {item!r} matches no linear layer (names look like "
                    f"'layers.0.mlp.down_proj', 'mlp.down_proj', 'lm_head' or layer indices 0-{layers[-1]})"
                )
            keep |= hit
            continue
        bad = sorted(i for i in idx if i not in layers)
        if bad:
            raise InputError(f"--keep-float {item!r}: the model has layers 0-{layers[-1]}, not {bad}")
        keep |= {lin.name for lin in linears if lin.layer in idx}
    return keep
