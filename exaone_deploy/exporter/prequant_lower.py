"""Lower a pre-quantized checkpoint's linears into the traced graph, keeping the publisher's exact values.

Runs on the traced canonical graph before :func:`~exaone_deploy.exporter.export.bind_weights`: every
``MatMul(x, Transpose(W))`` whose ``W`` the checkpoint stores packed (``Checkpoint.scheme``, read by
:mod:`exaone_deploy.prequant`) is replaced here, so both targets and the saved canonical graph see it; the rest
(embeddings, norms, ``lm_head``, linears the scheme leaves unquantized) is bound as usual, in the bundle dtype.

=====================  =====================================================  ==================================
checkpoint linear      ort                                                    trt
=====================  =====================================================  ==================================
INT4 / INT8 codes      ``com.microsoft::MatMulNBits`` (bits 4/8) with the     INT4 ``DequantizeLinear`` (axis 0,
(GPTQ, AWQ,            checkpoint's codes, scales and zero points; no          block_size) of ``codes - 8`` ->
compressed-tensors)    ``zero_points`` input when every zero is 2**(bits-1)   MatMul; INT8 one group per row:
                                                                              per-channel INT8 DQ of
                                                                              ``codes - 128``
FP8 block-scaled       float MatMul over ``weight * scale`` in the bundle     FP8 ``DequantizeLinear`` (axis 0,
                       dtype (exact in float32, rounded once in float16):     block_size) with the block scales,
                       ONNX Runtime's CPU has no FP8 GEMM                      Cast to the bundle dtype -> MatMul
=====================  =====================================================  ==================================

Blocks. A MatMulNBits ``block_size`` is a power of two >= 16: the block is the largest power of two dividing the
group (at most 128), each group's scale and zero repeated over its blocks, which is exact (every element keeps
its own scale and zero); a group spanning the whole row (``group_size`` -1, channel strategy) takes a block of
min(128, K rounded up to a power of two) and a partial last block, which MatMulNBits pads. A group with no
power-of-two divisor >= 16 is refused. TensorRT's blocked DQ needs blocks that divide K evenly: ``gcd(group,
K)`` (FP8: ``gcd(block_in, K)``), scales repeated likewise; FP8's 2-D [out, in] blocks become 1-D blocks along K
with each scale repeated over its output block's columns (ONNX's blocked DQ has one blocked axis).

Act-order (GPTQ ``desc_act`` with a ``g_idx`` that is not ``arange // group``): K is reordered so each group's
columns are contiguous (a stable sort of ``g_idx``), the weight's input rows permuted by the checkpoint's order
and the activation by a ``Gather`` on its last axis. ``sum_k x_k W_k`` is the same sum in another order: exact
up to float summation order, on both targets. One ``Gather`` serves every linear reading the same input in the
same order (GPTQ's order comes from the input's Hessian, so q/k/v share one and gate/up another), and
``down_proj``'s is folded away: gate's and up's output rows are stored in its order, so
``silu(gate) * up`` arrives reordered (:func:`_fold_act_orders`): 3 Gathers a layer instead of 7. Rejected:
MatMulNBits' ``g_idx`` input (deprecated in the op's spec and not implemented by every execution provider; the
reordering needs nothing target-specific).

Refused (one line naming the field and value): asymmetric integer codes on ``trt`` (TensorRT's DQ takes zero
zero-points only; ``codes - zero`` spans [-15, 15], which INT4 cannot hold), grouped INT8 on ``trt`` (TensorRT
blocks INT4/FP4 only), integer schemes in ``bfloat16`` on ``ort`` (MatMulNBits on CPU takes float32/float16
activations), scales a float16 bundle cannot hold exactly.

``accuracy_level`` (MatMulNBits; ``export --accuracy-level``): 0 by default, activations stay in the bundle dtype,
so the bundle computes exactly the checkpoint's dequantized model; 4 quantizes activations to int8 per block (the
integer dot products llama.cpp and our own int4 bundles use: faster on CPU, activations rounded; the weights are
the publisher's either way). Measured on the full 1.2B shape, group 128 (``docs/perf.md``, ``benchmarks/generate.py
--bundle``): at level 4 GPTQ, AWQ and act-order GPTQ decode at 0.97-0.99x our own int4 bundle of the same block;
level 0 at 0.66x (one layer's linears alone, ``benchmarks/prequant.py``: 3-6x slower).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ..calibration.numerics import pack_matmulnbits, pad_rows
from ..checkpoint import Checkpoint
from ..errors import ExaoneDeployError
from ..prequant import Fp8Weight, IntWeight, PrequantScheme, read_linear
from ..prequant.formats import LINEAR_SUFFIXES
from ..prequant.st import SafetensorsDir

__all__ = ["LinearPlan", "PrequantLowerError", "estimate", "lower_prequantized", "plan_linears", "scheme_summary"]

EXACT_ACCURACY_LEVEL = 0  # float activations: the checkpoint's dequantized model, exactly
ORT_DOMAIN = "com.microsoft"
_FLOAT = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


class PrequantLowerError(ExaoneDeployError, ValueError):
    """A pre-quantized linear this target cannot take exactly; the message names the field and the value."""


def _pow2_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


@dataclass(frozen=True)
class LinearPlan:
    """How one quantized linear [out, in] is lowered: the block along K and what is stored."""

    module: str
    out: int
    inp: int
    bits: int
    group: int  # group size along K (inp for one group per row)
    block: int  # block along K in the bundle
    form: str  # "matmulnbits" | "int4-dq" | "int8-dq" | "fp8-dq" | "float"

    @property
    def blocks(self) -> int:
        return -(-self.inp // self.block)

    def nbytes(self, dtype: str, zero_points: bool) -> int:
        """Bytes the lowered linear stores (codes, scales, zero points)."""
        item = np.dtype(_FLOAT[dtype]).itemsize
        if self.form == "float":
            return self.out * self.inp * item
        if self.form == "matmulnbits":
            zp = self.out * -(-self.blocks * self.bits // 8) if zero_points else 0
            return self.out * self.blocks * self.block * self.bits // 8 + self.out * self.blocks * item + zp
        padded = self.blocks * self.block
        scales = self.out * (1 if self.form == "int8-dq" else self.blocks) * 4
        return self.out * padded * self.bits // 8 + scales


def _plan(scheme: PrequantScheme, module: str, out: int, inp: int, target: str) -> LinearPlan:
    where = scheme.source or "quantization_config"
    if scheme.weight_type == "float":
        if target == "ort":
            return LinearPlan(module, out, inp, 8, inp, inp, "float")
        bi = {"block": (scheme.weight_block_size or (0, inp))[1], "channel": inp, "tensor": inp}[scheme.strategy]
        return LinearPlan(module, out, inp, 8, bi, math.gcd(bi, inp), "fp8-dq")
    group = scheme.group_of(inp)
    whole = group >= inp
    if target == "ort":
        block = min(128, max(16, 1 << (inp - 1).bit_length())) if whole else min(128, group & -group)
        if block < 16:
            raise PrequantLowerError(
                f"{where}: unsupported quantization_config.group_size = {group} for ort "
                "(MatMulNBits blocks are powers of two >= 16 that must divide the group)"
            )
        return LinearPlan(module, out, inp, scheme.bits, group, block, "matmulnbits")
    if not scheme.sym:
        field = "zero_point" if scheme.method == "awq" else "sym"
        value = True if scheme.method == "awq" else scheme.sym
        raise PrequantLowerError(
            f"{where}: unsupported quantization_config.{field} = {value!r} for trt "
            "(TensorRT's DequantizeLinear takes zero zero-points; asymmetric codes do not "
            "fit INT4)"
        )
    if scheme.bits == 8:
        if not whole:
            raise PrequantLowerError(
                f"{where}: unsupported quantization_config.group_size = {group} with "
                "bits = 8 for trt (TensorRT blocks INT4 only; INT8 must be per channel)"
            )
        return LinearPlan(module, out, inp, 8, inp, inp, "int8-dq")
    return LinearPlan(module, out, inp, 4, group, inp if whole else math.gcd(group, inp), "int4-dq")


def plan_linears(ckpt: Checkpoint, shapes: dict[str, tuple[int, int]], target: str) -> dict[str, LinearPlan]:
    """The plan of every quantized linear of ``ckpt``: ``shapes`` maps "<module>.weight" -> (out, in) (the
    float checkpoint's expected shapes); linears the scheme leaves unquantized are not in it."""
    return {
        name.rpartition(".")[0]: _plan(ckpt.scheme, name.rpartition(".")[0], out, inp, target)
        for name, (out, inp) in shapes.items()
        if ckpt.is_quantized(name)
    }


def scheme_summary(
    scheme: PrequantScheme,
    plans: dict[str, LinearPlan],
    unquantized: list[str],
    accuracy_level: int = EXACT_ACCURACY_LEVEL,
) -> dict:
    """The manifest's / inspect's record of the source scheme and how it was lowered; ``unquantized``: the
    decoder linears the checkpoint leaves in float (embeddings, norms and the LM head always are)."""
    forms = sorted({(p.form, p.block) for p in plans.values()})
    return {
        "method": scheme.method,
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "sym": scheme.sym,
        "format": scheme.checkpoint_format or scheme.strategy or ("gemm" if scheme.method == "awq" else None),
        "weight_type": scheme.weight_type,
        "desc_act": scheme.desc_act,
        "weight_block_size": list(scheme.weight_block_size) if scheme.weight_block_size else None,
        "activation_scheme": scheme.activation_scheme,
        "quantized_linears": len(plans),
        "unquantized": unquantized,
        "kept_in_float": ["embed_tokens", "norms", "lm_head"],
        "lowering": [{"form": f, "block_size": b} for f, b in forms],
        "accuracy_level": accuracy_level if any(p.form == "matmulnbits" for p in plans.values()) else None,
    }


def estimate(ckpt: Checkpoint, spec, target: str = "ort", dtype: str = "float32") -> dict:
    """What ``inspect`` shows before export: the scheme record and the bundle's weight bytes (the quantized
    linears as lowered, every other tensor in ``dtype``) next to the checkpoint's."""
    from ..checkpoint import expected_tensors

    shapes = expected_tensors(spec)
    plans = plan_linears(ckpt, {n: s for n, s in shapes.items() if len(s) == 2}, target)
    item = np.dtype(_FLOAT[dtype]).itemsize
    total = sum(p.nbytes(dtype, not ckpt.scheme.sym) for p in plans.values())
    total += sum(int(np.prod(s)) * item for n, s in shapes.items() if n.rpartition(".")[0] not in plans)
    unquantized = sorted(
        n.rpartition(".")[0]
        for n in shapes
        if n.rpartition(".")[0].endswith(LINEAR_SUFFIXES) and not ckpt.is_quantized(n)
    )
    return {
        **scheme_summary(ckpt.scheme, plans, unquantized),
        "target": target,
        "dtype": dtype,
        "bundle_weight_bytes": int(total),
        "checkpoint_bytes": ckpt.nbytes,
    }


# ---- the rewrite -------------------------------------------------------------------------------------------


class _Linear:
    """One quantized linear's exact values, reordered for act-order, read once and shared by its initializers."""

    def __init__(self, st: SafetensorsDir, scheme: PrequantScheme, plan: LinearPlan):
        self.st, self.scheme, self.plan = st, scheme, plan
        self.perm = None  # act-order: the input order the weight's columns are stored in
        self.input_permuted = False  # the graph already feeds the input in ``perm`` order (folded act-order)
        self.out_perm = None  # output rows stored in this order (a consumer's folded act-order)
        if scheme.method == "gptq" and f"{plan.module}.g_idx" in st:
            g_idx = st[f"{plan.module}.g_idx"].astype(np.int64)
            natural = np.arange(plan.inp) // plan.group
            if not np.array_equal(g_idx, natural):
                perm = np.argsort(g_idx, kind="stable")
                if not np.array_equal(g_idx[perm], natural):
                    raise PrequantLowerError(
                        f"{st.dir}: {plan.module}.g_idx groups are not of size group_size "
                        f"{plan.group}; cannot reorder them into blocks"
                    )
                self.perm = perm

    @functools.cached_property
    def weight(self) -> IntWeight | Fp8Weight:
        w = read_linear(self.st.__getitem__, self.plan.module, self.scheme)
        if isinstance(w, IntWeight) and self.perm is not None:
            w = IntWeight(w.codes[:, self.perm], w.scales, w.zeros, w.g_idx[self.perm], w.bits, w.group_size)
        if isinstance(w, IntWeight) and self.out_perm is not None:
            o = self.out_perm
            w = IntWeight(w.codes[o], w.scales[o], w.zeros[o], w.g_idx, w.bits, w.group_size)
        return w

    def per_block(self, a: np.ndarray) -> np.ndarray:
        """[out, groups] -> [out, blocks]: each block's group (blocks never straddle groups)."""
        p = self.plan
        return a[:, np.minimum(np.arange(p.blocks) * p.block // p.group, a.shape[1] - 1)]

    def check_symmetric(self) -> None:
        w, p = self.weight, self.plan
        if not np.all(w.zeros == 1 << (p.bits - 1)):
            raise PrequantLowerError(
                f"{self.st.dir}: {p.module} has zero points other than {1 << (p.bits - 1)} "
                f"though quantization_config says sym = {self.scheme.sym}"
            )


def _cast_exact(a: np.ndarray, dtype: str, what: str) -> np.ndarray:
    out = a.astype(_FLOAT[dtype])
    if not np.array_equal(out.astype(np.float32), a):
        raise PrequantLowerError(f"{what}: the scales are not exactly representable in {dtype}; export float32")
    return out


class _Rewriter:
    def __init__(self, graph: ir.Graph, dtype: str, accuracy_level: int = EXACT_ACCURACY_LEVEL):
        self.graph, self.dtype, self.accuracy_level = graph, dtype, accuracy_level
        self.gathers: dict[tuple[int, bytes], ir.Value] = {}  # (input, order) -> its act-order Gather

    def act_order(self, before: ir.Node, x: ir.Value, perm: np.ndarray, module: str) -> ir.Value:
        """``x[..., perm]``: one Gather per input and order, shared by the linears that read the same input in
        the same order (GPTQ gives q/k/v one order and gate/up another: their Hessian is their input's)."""
        key = (id(x), perm.tobytes())
        if key not in self.gathers:
            idx = self.init(f"{module}.act_order", lambda: perm.astype(np.int64), ir.DataType.INT64, perm.shape)
            self.gathers[key] = self.node(before, "Gather", [x, idx], {"axis": -1}, name=f"{module}/act_order")
        return self.gathers[key]

    def init(self, name: str, make, dtype: ir.DataType, shape: tuple[int, ...]) -> ir.Value:
        """A lazy initializer: ``make()`` (a NumPy array) runs when the bundle writer saves it."""
        tensor = ir.LazyTensor(
            lambda: ir.Tensor(np.ascontiguousarray(make()), name=name), dtype=dtype, shape=ir.Shape(shape), name=name
        )
        v = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor)
        self.graph.register_initializer(v)
        return v

    def node(self, before: ir.Node, op: str, inputs, attributes=None, domain: str = "", *, name: str) -> ir.Value:
        n = ir.node(op, list(inputs), attributes=attributes or {}, domain=domain, name=name)
        n.outputs[0].name = name
        self.graph.insert_before(before, [n])
        return n.outputs[0]


def lower_prequantized(
    m: ir.Model, ckpt: Checkpoint, target: str, dtype: str, accuracy_level: int = EXACT_ACCURACY_LEVEL
) -> dict:
    """Rewrite the quantized linears of the traced graph ``m`` in place (see the module docstring).

    Returns the manifest record (:func:`scheme_summary`). The new initializers are lazy: each linear's packed
    tensors are read and converted when the bundle writer saves them, one linear at a time.
    """
    scheme, graph = ckpt.scheme, m.graph
    if target == "ort" and dtype == "bfloat16" and scheme.weight_type == "int":
        raise PrequantLowerError(
            f"{scheme.source}: {scheme.method} int{scheme.bits} needs --dtype float32 or "
            "float16 on ort (MatMulNBits on CPU takes no bfloat16 activations)"
        )
    shapes = {}
    for node in graph:
        w = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if w is not None and w.is_initializer() and w.name.endswith(".weight") and w.shape is not None:
            shapes[w.name] = tuple(int(d) for d in w.shape)
    plans = plan_linears(ckpt, shapes, target)
    st, rw = SafetensorsDir(ckpt.dir), _Rewriter(graph, dtype, accuracy_level)
    if any(p.form == "matmulnbits" for p in plans.values()):
        m.opset_imports[ORT_DOMAIN] = 1
    transposes = {
        n.inputs[0].name.rpartition(".")[0]: n
        for n in graph
        if n.op_type == "Transpose" and n.inputs[0] is not None and n.inputs[0].name.rpartition(".")[0] in plans
    }
    lins = {module: _Linear(st, scheme, plans[module]) for module in transposes}
    _fold_act_orders(lins, transposes)
    for module, node in transposes.items():
        w, lin = node.inputs[0], lins[module]
        for use, index in list(node.outputs[0].uses()):
            if use.op_type != "MatMul" or index != 1:
                raise PrequantLowerError(f"{module}: the traced weight feeds {use.op_type}, not a MatMul")
            _lower_one(rw, use, lin, target)
        graph.remove(node, safe=True)
        if not w.uses():
            del graph.initializers[w.name]
    unquantized = sorted(
        m for m in (n.rpartition(".")[0] for n in shapes) if m.endswith(LINEAR_SUFFIXES) and m not in plans
    )
    return scheme_summary(scheme, plans, unquantized, accuracy_level)


# Elementwise ops through which a permutation of the last axis commutes (same-shape operands, or a scalar).
_ELEMENTWISE = {"Mul", "Add", "Sub", "Div", "Sigmoid", "Tanh", "Erf", "Relu", "Cast", "Neg", "Exp"}


def _fold_act_orders(lins: dict[str, _Linear], transposes: dict[str, ir.Node]) -> None:
    """Fold an act-order linear's input reordering into the linears that produce its input, where exact.

    EXAONE's MLP feeds ``down_proj`` with ``silu(gate_proj(x)) * up_proj(x)``: elementwise over the features, so
    storing gate's and up's output rows in ``down_proj``'s act-order yields its input already in that order, and
    its ``Gather`` goes away (a row permutation of the codes, scales and zero points: exact, free at run time).
    Done only when every path back from the linear's input is elementwise ops (``_ELEMENTWISE``, scalar
    constants) ending at integer linears lowered here whose outputs feed nothing else and carry no other
    reordering. Other inputs (q/k/v: the residual stream every layer reads; o_proj: attention's heads) keep the
    Gather.
    """

    def matmul_of(module):
        uses = list(transposes[module].outputs[0].uses())
        return uses[0][0] if len(uses) == 1 and uses[0][0].op_type == "MatMul" and uses[0][1] == 1 else None

    by_output = {id(mm.outputs[0]): module for module in lins if (mm := matmul_of(module)) is not None}
    for module, lin in lins.items():
        mm = matmul_of(module)
        if lin.perm is None or mm is None or lin.scheme.weight_type != "int":
            continue
        inside, leaves, stack, ok = {mm}, set(), [mm.inputs[0]], True
        while stack and ok:
            v = stack.pop()
            src = by_output.get(id(v))
            node = v.producer()
            if src is not None:
                leaves.add(src)
            elif node is not None and node.op_type in _ELEMENTWISE:
                inside.add(node)
                for i in node.inputs:
                    scalar = i is not None and i.const_value is not None and i.const_value.size == 1
                    if not scalar:
                        stack.append(i)
            else:
                ok = False
        reordered = [o for n in inside - {mm} for o in n.outputs] + [matmul_of(s).outputs[0] for s in leaves]
        ok = ok and bool(leaves) and not any(v.is_graph_output() for v in reordered)
        ok = ok and all(u in inside for v in reordered for u, _ in v.uses())
        if not ok or any(lins[s].out_perm is not None or lins[s].plan.out != lin.plan.inp for s in leaves):
            continue
        for s in leaves:
            lins[s].out_perm = lin.perm
        lin.input_permuted = True


def _lower_one(rw: _Rewriter, matmul: ir.Node, lin: _Linear, target: str) -> None:
    p, base = lin.plan, lin.plan.module
    x = matmul.inputs[0]
    if lin.perm is not None and not lin.input_permuted:
        x = rw.act_order(matmul, x, lin.perm, base)
    fdtype = (
        ir.DataType.FLOAT
        if rw.dtype == "float32"
        else ir.DataType.FLOAT16
        if rw.dtype == "float16"
        else ir.DataType.BFLOAT16
    )
    if p.form == "float":
        weight = rw.init(
            f"{base}.weight.T", lambda: lin.weight.dequantize().T.astype(_FLOAT[rw.dtype]), fdtype, (p.inp, p.out)
        )
        matmul.replace_input_with(1, weight)
        matmul.replace_input_with(0, x)
        return
    if p.form == "matmulnbits":
        _matmulnbits(rw, matmul, lin, x, fdtype)
        return
    # trt: a DequantizeLinear of constant weights [K(padded), N] feeding the MatMul.
    if p.form == "fp8-dq":

        def values():
            return lin.weight.weight.T

        def scales():
            w = lin.weight
            bo, bi = w.block
            col = np.minimum(np.arange(p.blocks) * p.block // bi, w.scale.shape[1] - 1)
            return w.scale[np.arange(p.out) // bo][:, col].T.astype(np.float32)  # [blocks, out]

        qtype = ir.DataType.FLOAT8E4M3FN
    else:
        offset = 1 << (p.bits - 1)

        def values():
            lin.check_symmetric()
            q = (lin.weight.codes.astype(np.int16) - offset).T
            return pad_rows(q, p.block).astype(ml_dtypes.int4) if p.bits == 4 else q.astype(np.int8)

        def scales():
            s = lin.per_block(lin.weight.scales) if p.bits == 4 else lin.weight.scales[:, 0]
            return s.T.astype(np.float32)

        qtype = ir.DataType.INT4 if p.bits == 4 else ir.DataType.INT8
    rows = p.blocks * p.block if p.form == "int4-dq" else p.inp
    wq = rw.init(f"{base}.{qtype.name.lower()}", values, qtype, (rows, p.out))
    scale_shape = (p.out,) if p.form == "int8-dq" else (p.blocks, p.out)
    ws = rw.init(f"{base}.scale", scales, ir.DataType.FLOAT, scale_shape)
    attrs = {"axis": 1} if p.form == "int8-dq" else {"axis": 0, "block_size": p.block}
    w = rw.node(matmul, "DequantizeLinear", [wq, ws], attrs, name=f"{base}/weight_dequantize")
    if fdtype != ir.DataType.FLOAT:
        w = rw.node(matmul, "Cast", [w], {"to": fdtype}, name=f"{base}/weight_cast")
    if rows != p.inp:  # TensorRT blocks must divide K: zero activation columns match the zero weight rows
        pads = rw.init(
            f"{base}.input_pads", lambda: np.array([0, 0, 0, 0, 0, rows - p.inp], np.int64), ir.DataType.INT64, (6,)
        )
        x = rw.node(matmul, "Pad", [x, pads], name=f"{base}/input_pad")
    matmul.replace_input_with(0, x)
    matmul.replace_input_with(1, w)


def _matmulnbits(rw: _Rewriter, matmul: ir.Node, lin: _Linear, x: ir.Value, fdtype: ir.DataType) -> None:
    p, base, scheme = lin.plan, lin.plan.module, lin.scheme
    blob = p.block * p.bits // 8
    what = f"{scheme.source}: {base}"

    def packed():
        codes = lin.weight.codes
        if p.bits == 4:  # numerics.pack_matmulnbits takes signed values and stores them + 8: the codes again
            return pack_matmulnbits((codes.astype(np.int16) - 8).T, np.zeros((p.blocks, p.out), np.float32), p.block)[0]
        return pad_rows(codes.T, p.block).T.reshape(p.out, p.blocks, p.block)

    def scales():
        if scheme.sym:  # no zero_points input: every zero must be MatMulNBits' default
            lin.check_symmetric()
        return _cast_exact(lin.per_block(lin.weight.scales), rw.dtype, what).reshape(-1)

    wq = rw.init(f"{base}.nbits", packed, ir.DataType.UINT8, (p.out, p.blocks, blob))
    ws = rw.init(f"{base}.scale", scales, fdtype, (p.out * p.blocks,))
    inputs = [x, wq, ws]
    if not scheme.sym:
        per_byte = 8 // p.bits

        def zeros():
            z = lin.per_block(lin.weight.zeros)
            z = np.pad(z, ((0, 0), (0, -p.blocks % per_byte)))
            if p.bits == 4:
                z = z[:, 0::2] | (z[:, 1::2] << 4)  # two blocks a byte, the even block in the low nibble
            return z.astype(np.uint8).reshape(-1)

        inputs.append(rw.init(f"{base}.zero_points", zeros, ir.DataType.UINT8, (p.out * -(-p.blocks // per_byte),)))
    attrs = {"K": p.inp, "N": p.out, "bits": p.bits, "block_size": p.block, "accuracy_level": rw.accuracy_level}
    new = ir.node("MatMulNBits", inputs, attributes=attrs, domain=ORT_DOMAIN, name=matmul.name)
    ir.convenience.replace_nodes_and_values(rw.graph, matmul, [matmul], [new], list(matmul.outputs), list(new.outputs))
