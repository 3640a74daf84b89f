"""Read one pre-quantized linear's checkpoint tensors into exact codes, scales and zero points (NumPy only).

Every reader takes ``get`` (name -> array, e.g. a :class:`~exaone_deploy.prequant.st.SafetensorsDir`), the
linear's ``prefix`` ("model.layers.0.mlp.down_proj") and the :class:`PrequantScheme`, and returns

* :class:`IntWeight` for GPTQ / AWQ / compressed-tensors pack-quantized: ``codes`` uint8 [out, in] (one
  unsigned code per element, 0..2**bits-1), ``scales`` float32 [out, groups] and ``zeros`` uint8
  [out, groups] exactly as the publisher stored them (fp16/bf16 -> fp32 is exact; zeros are the
  publisher's integers, never re-derived), and ``g_idx`` int32 [in] (input column -> group);
* :class:`Fp8Weight` for FP8 block-scaled / compressed-tensors float-quantized: ``weight`` float8_e4m3fn
  [out, in] and ``scale`` float32 [ceil(out/bo), ceil(in/bi)] with ``block`` (bo, bi).

``dequantize()`` gives float32 [out, in]: ``(codes - zeros[:, g_idx]) * scales[:, g_idx]`` and
``weight * scale[block]``. Both products are exact in fp32 (a <=9-bit integer or an e4m3 value times a
<=24-bit-mantissa scale fits fp32's mantissa), so these equal the reference implementations' results
computed in fp32 bit for bit, and their fp16 results are these values rounded once. Rejected: computing in
the scales' dtype like the CUDA kernels: that rounds, and the bundle's MatMulNBits dequantizes in fp32.

Layouts, from the reference implementations (read in their sources, cited per reader):

* GPTQ: ``qweight`` int32 [in*bits/32, out], input ``i`` in word row ``i // (32/bits)`` at bit
  ``(i % (32/bits)) * bits``; ``qzeros`` int32 [groups, out*bits/32] packed the same way along the
  output dim; ``scales`` fp16 [groups, out]; ``g_idx`` int32 [in]. ``checkpoint_format`` "gptq" (v1) stores
  each zero minus one (AutoGPTQ's pack does ``zeros -= 1``; its dequant adds 1 back and masks to ``bits``);
  "gptq_v2" stores the zero itself. GPTQModel ``nn_modules/qlinear/__init__.py`` (``pack_block``,
  ``dequantize_weight``, ``_dequantize_from_codes``: ``scales[g_idx] * (weight - zeros[g_idx])``) and
  ``utils/model.py`` (``convert_gptq_v1_to_v2_format_module``).
* AWQ GEMM: ``qweight`` int32 [in, out/8] packed along the OUTPUT dim, the 8 nibbles of a word holding
  output columns ``[0, 2, 4, 6, 1, 3, 5, 7]`` of its group of 8 (nibble j at bit 4j); ``qzeros`` int32
  [groups, out/8] the same; ``scales`` fp16 [groups, out]; no zero offset. AutoAWQ
  ``awq/modules/linear/gemm.py`` (``WQLinear_GEMM.from_linear``: ``order_map``) and
  ``awq/utils/packing_utils.py`` (``unpack_awq``, ``reverse_awq_order``, ``dequantize_gemm``).
* FP8 block: ``weight`` float8_e4m3fn [out, in], ``weight_scale_inv`` float32 [ceil(out/bo), ceil(in/bi)],
  multiplied (despite the name) onto its block; partial edge blocks use the edge scale. transformers
  ``integrations/finegrained_fp8.py`` (``FP8Linear``, ``_dequantize_fp8_weight``).
* compressed-tensors pack-quantized: ``weight_packed`` int32 [out, ceil(in*bits/32)], signed codes plus
  ``2**(bits-1)`` packed LSB-first along the input dim; ``weight_zero_point`` (asymmetric only) the same
  packing along the OUTPUT dim (dim 0) of the [out, groups] zero points; ``weight_scale`` [out, groups];
  ``weight_shape`` int [2]. float-quantized: ``weight`` fp8 with
  ``weight_scale`` per channel [out, 1], tensor [1] or block. compressed-tensors
  ``compressors/pack_quantized/helpers.py`` (``pack_to_int32``, ``unpack_from_int32``) and
  ``compressors/pack_quantized/base.py``. Codes and zeros are returned offset to unsigned (``+2**(bits-1)``),
  which leaves ``codes - zeros`` unchanged and symmetric zeros at ``2**(bits-1)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .config import PrequantScheme

__all__ = [
    "AWQ_ORDER",
    "LINEAR_SUFFIXES",
    "Fp8Weight",
    "IntWeight",
    "read_awq",
    "read_compressed_tensors",
    "read_fp8",
    "read_gptq",
    "read_linear",
    "tensor_shapes",
    "unpack_cols",
    "unpack_rows",
]

Getter = Callable[[str], np.ndarray]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds output column AWQ_ORDER[j] of its 8
AWQ_REVERSE_ORDER = tuple(int(i) for i in np.argsort(AWQ_ORDER))  # (0, 4, 1, 5, 2, 6, 3, 7)
LINEAR_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class IntWeight:
    """Integer codes of one linear; see the module docstring for the contract."""

    codes: np.ndarray  # uint8 [out, in]
    scales: np.ndarray  # float32 [out, groups]
    zeros: np.ndarray  # uint8 [out, groups]
    g_idx: np.ndarray  # int32 [in]
    bits: int
    group_size: int

    def dequantize(self) -> np.ndarray:
        g = self.g_idx
        return (self.codes.astype(np.float32) - self.zeros[:, g].astype(np.float32)) * self.scales[:, g]


@dataclass
class Fp8Weight:
    """float8_e4m3fn weight with one float32 scale per (bo, bi) block."""

    weight: np.ndarray  # float8_e4m3fn [out, in]
    scale: np.ndarray  # float32 [ceil(out/bo), ceil(in/bi)]
    block: tuple[int, int]

    def dequantize(self) -> np.ndarray:
        (out, inp), (bo, bi) = self.weight.shape, self.block
        scale = np.repeat(np.repeat(self.scale, bo, axis=0), bi, axis=1)[:out, :inp]
        return self.weight.astype(np.float32) * scale


def unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """int32 [R, C] with 32/bits codes per word along dim 0 (code k at bit k*bits) -> uint8 [R*32/bits, C]."""
    pf, words = 32 // bits, packed.view(np.uint32)
    shifts = (np.arange(pf, dtype=np.uint32) * bits)[None, :, None]
    return ((words[:, None, :] >> shifts) & ((1 << bits) - 1)).astype(np.uint8).reshape(-1, packed.shape[1])


def unpack_cols(packed: np.ndarray, bits: int) -> np.ndarray:
    """int32 [R, C] with 32/bits codes per word along dim 1 -> uint8 [R, C*32/bits]."""
    pf, words = 32 // bits, packed.view(np.uint32)
    shifts = (np.arange(pf, dtype=np.uint32) * bits)[None, None, :]
    return ((words[:, :, None] >> shifts) & ((1 << bits) - 1)).astype(np.uint8).reshape(packed.shape[0], -1)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float32)


def _check(prefix: str, name: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{prefix}.{name}: shape {list(got)} does not match the expected {list(want)}")


def read_gptq(get: Getter, prefix: str, scheme: PrequantScheme) -> IntWeight:
    """GPTQ v1/v2 (AutoGPTQ / GPTQModel ``qweight``, ``qzeros``, ``scales``, ``g_idx``)."""
    bits = scheme.bits
    codes = unpack_rows(get(prefix + ".qweight"), bits).T  # [out, in]
    out, inp = codes.shape
    scales = _f32(get(prefix + ".scales")).T  # [out, groups]
    zeros = unpack_cols(get(prefix + ".qzeros"), bits)[:, :out].T  # [out, groups]
    if scheme.checkpoint_format == "gptq":  # v1 stored zero - 1 (AutoGPTQ: zeros + 1, masked to bits)
        zeros = ((zeros.astype(np.int32) + 1) & ((1 << bits) - 1)).astype(np.uint8)
    group = scheme.group_of(inp)
    try:
        g_idx = get(prefix + ".g_idx").astype(np.int32)
    except KeyError:
        g_idx = np.arange(inp, dtype=np.int32) // group
    _check(prefix, "scales", scales.shape, (out, -(-inp // group)))
    _check(prefix, "g_idx", g_idx.shape, (inp,))
    return IntWeight(
        np.ascontiguousarray(codes), np.ascontiguousarray(scales), np.ascontiguousarray(zeros), g_idx, bits, group
    )


def read_awq(get: Getter, prefix: str, scheme: PrequantScheme) -> IntWeight:
    """AutoAWQ GEMM (``qweight`` [in, out/8] in AWQ order, ``qzeros``, ``scales``)."""

    def unawq(packed: np.ndarray) -> np.ndarray:
        cols = unpack_cols(packed, 4)
        return cols.reshape(cols.shape[0], -1, 8)[:, :, list(AWQ_REVERSE_ORDER)].reshape(cols.shape[0], -1)

    codes = unawq(get(prefix + ".qweight")).T  # [out, in]
    out, inp = codes.shape
    group = scheme.group_of(inp)
    scales = _f32(get(prefix + ".scales")).T
    zeros = unawq(get(prefix + ".qzeros")).T
    _check(prefix, "scales", scales.shape, (out, inp // group))
    _check(prefix, "qzeros", zeros.shape, (out, inp // group))
    return IntWeight(
        np.ascontiguousarray(codes),
        np.ascontiguousarray(scales),
        np.ascontiguousarray(zeros),
        np.arange(inp, dtype=np.int32) // group,
        4,
        group,
    )


def _fp8_weight(w: np.ndarray, scale: np.ndarray, block: tuple[int, int], prefix: str) -> Fp8Weight:
    if w.dtype != np.dtype(ml_dtypes.float8_e4m3fn):
        raise ValueError(f"{prefix}.weight: dtype {w.dtype}, expected float8_e4m3fn")
    out, inp = w.shape
    _check(prefix, "weight scale", scale.shape, (-(-out // block[0]), -(-inp // block[1])))
    return Fp8Weight(w, scale, block)


def read_fp8(get: Getter, prefix: str, scheme: PrequantScheme) -> Fp8Weight:
    """FP8 block-scaled (transformers finegrained fp8 / DeepSeek-V3: ``weight`` + ``weight_scale_inv``)."""
    return _fp8_weight(
        get(prefix + ".weight"), _f32(get(prefix + ".weight_scale_inv")), scheme.weight_block_size, prefix
    )


def read_compressed_tensors(get: Getter, prefix: str, scheme: PrequantScheme) -> IntWeight | Fp8Weight:
    """compressed-tensors pack-quantized (int4/int8) or float-quantized (fp8) weights."""
    scale = _f32(get(prefix + ".weight_scale"))
    if scheme.weight_type == "float":
        w = get(prefix + ".weight")
        out, inp = w.shape
        block = {"block": scheme.weight_block_size, "channel": (1, inp), "tensor": (out, inp)}[scheme.strategy]
        return _fp8_weight(w, scale.reshape(-(-out // block[0]), -(-inp // block[1])), block, prefix)
    bits, offset = scheme.bits, 1 << (scheme.bits - 1)
    out, inp = (int(v) for v in get(prefix + ".weight_shape"))
    codes = unpack_cols(get(prefix + ".weight_packed"), bits)[:, :inp]  # already unsigned: signed + offset
    group = scheme.group_of(inp)
    groups = -(-inp // group)
    _check(prefix, "weight_scale", scale.shape, (out, groups))
    if scheme.sym:
        zeros = np.full((out, groups), offset, np.uint8)
    else:
        zeros = unpack_rows(get(prefix + ".weight_zero_point"), bits)[:out]
        _check(prefix, "weight_zero_point", zeros.shape, (out, groups))
    g_idx = np.arange(inp, dtype=np.int32) // group
    return IntWeight(np.ascontiguousarray(codes), scale, np.ascontiguousarray(zeros), g_idx, bits, group)


_READERS = {"gptq": read_gptq, "awq": read_awq, "fp8": read_fp8, "compressed-tensors": read_compressed_tensors}


def read_linear(get: Getter, prefix: str, scheme: PrequantScheme) -> IntWeight | Fp8Weight:
    """Read the linear at ``prefix`` in ``scheme``'s format."""
    return _READERS[scheme.method](get, prefix, scheme)


def tensor_shapes(
    scheme: PrequantScheme, prefix: str, out: int, inp: int
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, optional) checkpoint tensor names and shapes of the quantized linear ``prefix`` [out, in].

    What checkpoint validation expects in place of ``<prefix>.weight``: the same layouts the readers above take
    (GPTQ's ``g_idx`` is optional, as :func:`read_gptq` derives it when absent).
    """
    bits, p = scheme.bits, prefix + "."
    if scheme.weight_type == "float":
        if scheme.strategy == "channel":
            scale = (out, 1)
        elif scheme.strategy == "tensor":
            scale = (1,)
        else:
            bo, bi = scheme.weight_block_size
            scale = (-(-out // bo), -(-inp // bi))
        scale_name = "weight_scale" if scheme.method == "compressed-tensors" else "weight_scale_inv"
        return {p + "weight": (out, inp), p + scale_name: scale}, {}
    pf, groups = 32 // bits, -(-inp // scheme.group_of(inp))
    if scheme.method == "gptq":
        packed = {p + "qweight": (-(-inp // pf), out), p + "qzeros": (groups, -(-out // pf))}
        return {**packed, p + "scales": (groups, out)}, {p + "g_idx": (inp,)}
    if scheme.method == "awq":
        return {p + "qweight": (inp, out // 8), p + "qzeros": (groups, out // 8), p + "scales": (groups, out)}, {}
    shapes = {p + "weight_packed": (out, -(-inp // pf)), p + "weight_scale": (out, groups), p + "weight_shape": (2,)}
    if not scheme.sym:
        shapes[p + "weight_zero_point"] = (-(-out // pf), groups)
    return shapes, {}
