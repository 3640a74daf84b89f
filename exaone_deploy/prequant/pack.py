"""Quantize a float weight and pack it as each publisher's tool writes it (the inverse of :mod:`.formats`).

Used to make test checkpoints, so the quantizer is plain round-to-nearest with min/max ranges (GPTQ's
``Quantizer.find_params`` formulas: symmetric ``scale = 2*amax/maxq``, zero ``(maxq+1)/2``; asymmetric
``scale = (max(x,0) - min(x,0))/maxq``, zero ``round(-min/scale)``), codes computed with the scale already
rounded to its storage dtype, as GPTQModel's ``pack_block`` and AutoAWQ's ``from_linear`` recompute
``round((w + z*s)/s)``. The error-compensating GPTQ/AWQ searches change which codes are chosen, not the
layout; the layout is what the tests pin. FP8 block: ``scale = amax(block)/448``, codes
``e4m3(w/scale)`` saturated, as transformers' FineGrainedFP8 quantizer does.

Packing writes clean fields: a GPTQ v1 zero of 0 is stored as 15 (its low 4 bits), not as AutoGPTQ's
uint32 ``-1`` that spilled ones into the neighbouring zeros (the known v1 asymmetric overflow).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .formats import AWQ_ORDER, Fp8Weight, IntWeight

__all__ = [
    "FP8_MAX",
    "act_order_g_idx",
    "pack_awq",
    "pack_cols",
    "pack_compressed_tensors",
    "pack_fp8",
    "pack_gptq",
    "pack_rows",
    "quantize_fp8",
    "quantize_int",
]

FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


def act_order_g_idx(w: np.ndarray, group_size: int, importance: np.ndarray | None = None) -> np.ndarray:
    """GPTQ act-order groups: columns ranked by decreasing importance, ``g_idx[perm[i]] = i // group``.

    GPTQ ranks by the Hessian diagonal (input activations' second moment), so linears that read the same input
    (q/k/v, gate/up) get the same order; without activations ``importance`` (per input column) stands in, by
    default the column's squared norm. Only the layout matters here: g_idx is not monotone.
    """
    if importance is None:
        importance = (w.astype(np.float64) ** 2).sum(0)
    perm = np.argsort(-importance, kind="stable")
    g_idx = np.empty(w.shape[1], np.int32)
    g_idx[perm] = np.arange(w.shape[1], dtype=np.int32) // group_size
    return g_idx


def quantize_int(
    w: np.ndarray, bits: int, group_size: int, *, sym: bool, scale_dtype=np.float16, g_idx: np.ndarray | None = None
) -> IntWeight:
    """Round-to-nearest integer quantization of ``w`` [out, in] per (row, group) -> :class:`IntWeight`."""
    _out, inp = w.shape
    group = inp if group_size == -1 else group_size
    g_idx = np.arange(inp, dtype=np.int32) // group if g_idx is None else g_idx.astype(np.int32)
    groups, maxq = int(g_idx.max()) + 1, (1 << bits) - 1
    onehot = g_idx[None, :] == np.arange(groups)[:, None]  # [groups, in]
    lo = np.where(onehot[None], w[:, None, :], np.inf).min(-1)  # [out, groups]
    hi = np.where(onehot[None], w[:, None, :], -np.inf).max(-1)
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    if sym:
        amax = np.maximum(-lo, hi)
        lo, hi = -amax, amax
    scale = (hi - lo) / maxq
    scale = np.where(scale == 0, 1.0, scale).astype(scale_dtype).astype(np.float32)
    zero = np.full_like(scale, (maxq + 1) // 2) if sym else np.clip(np.round(-lo / scale), 0, maxq)
    s, z = scale[:, g_idx], zero[:, g_idx]
    codes = np.clip(np.round(w / s) + z, 0, maxq).astype(np.uint8)
    return IntWeight(codes, scale, zero.astype(np.uint8), g_idx, bits, group)


def quantize_fp8(w: np.ndarray, block: tuple[int, int]) -> Fp8Weight:
    """FP8 e4m3 with one float32 scale (``amax / 448``) per (bo, bi) block; edge blocks may be partial."""
    (out, inp), (bo, bi) = w.shape, block
    nb_o, nb_i = -(-out // bo), -(-inp // bi)
    padded = np.zeros((nb_o * bo, nb_i * bi), np.float32)
    padded[:out, :inp] = np.abs(w)
    amax = padded.reshape(nb_o, bo, nb_i, bi).max((1, 3))
    scale = np.where(amax == 0, 1.0, amax / FP8_MAX).astype(np.float32)
    full = np.repeat(np.repeat(scale, bo, 0), bi, 1)[:out, :inp]
    q = np.clip(w / full, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return Fp8Weight(q, scale, (bo, bi))


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint [R*32/bits, C] -> int32 [R, C], code k of each word at bit k*bits (inverse of unpack_rows)."""
    pf = 32 // bits
    shifts = (np.arange(pf, dtype=np.uint32) * bits)[None, :, None]
    grouped = codes.astype(np.uint32).reshape(-1, pf, codes.shape[1])
    return np.bitwise_or.reduce(grouped << shifts, axis=1).view(np.int32)


def pack_cols(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint [R, C*32/bits] -> int32 [R, C] (inverse of unpack_cols)."""
    return np.ascontiguousarray(pack_rows(np.ascontiguousarray(codes.T), bits).T)


def pack_gptq(q: IntWeight, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """GPTQ tensors (suffix -> array): qweight, qzeros (v1: zero - 1, masked), scales fp16, g_idx."""
    zeros = q.zeros.T  # [groups, out]
    if checkpoint_format == "gptq":
        zeros = (zeros.astype(np.int32) - 1) & ((1 << q.bits) - 1)
    return {
        "qweight": pack_rows(np.ascontiguousarray(q.codes.T), q.bits),
        "qzeros": pack_cols(zeros, q.bits),
        "scales": q.scales.T.astype(np.float16),
        "g_idx": q.g_idx.astype(np.int32),
    }


def pack_awq(q: IntWeight) -> dict[str, np.ndarray]:
    """AutoAWQ GEMM tensors: qweight [in, out/8] and qzeros in AWQ nibble order, scales fp16 [groups, out]."""

    def awq(a: np.ndarray) -> np.ndarray:  # a: [rows, out]; nibble j of each word <- column AWQ_ORDER[j]
        return pack_cols(a.reshape(a.shape[0], -1, 8)[:, :, list(AWQ_ORDER)].reshape(a.shape[0], -1), 4)

    return {"qweight": awq(q.codes.T), "qzeros": awq(q.zeros.T), "scales": q.scales.T.astype(np.float16)}


def pack_compressed_tensors(q: IntWeight, sym: bool, scale_dtype=ml_dtypes.bfloat16) -> dict[str, np.ndarray]:
    """compressed-tensors pack-quantized: weight_packed, weight_scale, weight_shape (+ weight_zero_point)."""
    out, inp = q.codes.shape
    pf = 32 // q.bits
    codes = np.zeros((out, -(-inp // pf) * pf), np.uint8)
    codes[:, :inp] = q.codes  # padding codes stay 0, as pack_to_int32 pads before adding nothing
    t = {
        "weight_packed": pack_cols(codes, q.bits),
        "weight_scale": q.scales.astype(scale_dtype),
        "weight_shape": np.array([out, inp], np.int64),
    }
    if not sym:
        zeros = np.zeros((-(-out // pf) * pf, q.zeros.shape[1]), np.uint8)
        zeros[:out] = q.zeros
        t["weight_zero_point"] = pack_rows(zeros, q.bits)
    return t


def pack_fp8(q: Fp8Weight, scale_name: str = "weight_scale_inv") -> dict[str, np.ndarray]:
    """FP8 tensors: weight e4m3 and its float32 block scales (``weight_scale`` for compressed-tensors)."""
    return {"weight": q.weight, scale_name: q.scale.astype(np.float32)}
