"""Quantization numerics in NumPy: weight quantizers, activation range calibrators, SmoothQuant and AWQ.

Conventions: a linear weight is ``W`` of shape [in, out] (the exported ``W^T``), used as ``y = x @ W``.

* INT8 weights: symmetric per output channel, ``scale[n] = max_k |W[k, n]| / 127``, values in [-127, 127].
* INT8 activations: symmetric per tensor, ``scale = amax / 127``, values in [-128, 127] (ONNX saturation).
* FP8 (E4M3FN): per tensor, ``scale = amax / 448``; rounding to nearest even, saturating, as QuantizeLinear.
* INT4 weights: symmetric per block of ``block`` input rows and one output column,
  ``scale[b, n] = clip[b, n] * max_{k in b} |W[k, n]| / 7``, values in [-8, 7] (TensorRT wants zero points of
  zero; ONNX Runtime's MatMulNBits reads the same values as unsigned with its default zero point 8).

Activation range methods (``amax``): ``max``; ``percentile`` of |x|; ``entropy``: the threshold that minimises
KL(P || Q) between the |x| histogram and its 128-level quantization, as TensorRT's entropy calibrator.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

__all__ = [
    "INT8_MAX",
    "FP8_MAX",
    "INT4_MAX",
    "quantize_int8",
    "quantize_fp8",
    "quantize_int4",
    "quantize_int8_blocks",
    "dequantize_int4",
    "fake_quant_int4",
    "pack_matmulnbits",
    "quantize_activation_int8",
    "fp8_round",
    "amax_from_histogram",
    "entropy_threshold",
    "smoothquant_scales",
    "tie_heads",
    "awq_search_scale",
    "awq_search_clip",
    "HIST_BINS",
]

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8 E4M3FN
INT4_MAX = 7.0
HIST_BINS = 2048  # as TensorRT's and ModelOpt's histogram calibrators
TINY = 1e-12


# ---- weights -------------------------------------------------------------------------------------------------


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric INT8: (q int8 [in, out], scale float32 [out])."""
    amax = np.abs(w).max(axis=0)
    scale = (np.maximum(amax, TINY) / INT8_MAX).astype(np.float32)
    q = np.clip(np.rint(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def fp8_round(x: np.ndarray) -> np.ndarray:
    """Round to float8 E4M3FN (nearest even, saturating at +-448) and back to float32."""
    return np.clip(x, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Per-tensor FP8 E4M3FN: (q float8_e4m3fn, scale float32 scalar)."""
    scale = np.float32(max(float(np.abs(w).max()), TINY) / FP8_MAX)
    q = np.clip(w / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def pad_rows(w: np.ndarray, block: int) -> np.ndarray:
    """``w`` with zero rows appended up to a multiple of ``block`` (the last block of a K that does not divide)."""
    extra = -w.shape[0] % block
    return np.pad(w, ((0, extra), (0, 0))) if extra else w


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    """[in, out] -> [ceil(in/block), block, out]; a partial last block is padded with zeros (which never set a
    block's max and quantize to 0)."""
    w = pad_rows(w, block)
    return w.reshape(w.shape[0] // block, block, w.shape[1])


def quantize_int4(w: np.ndarray, block: int, clip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise symmetric INT4 along the input axis: (q int8 in [-8, 7] [in, out], scale float32
    [ceil(in/block), out])."""
    return _quantize_blocks(w, block, INT4_MAX, -8, clip)


def quantize_int8_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise symmetric INT8 along the input axis (the 8-bit ``MatMulNBits`` layout, llama.cpp's Q8_0 has
    the same shape of scales): (q int8 in [-127, 127] [in, out], scale float32 [ceil(in/block), out])."""
    return _quantize_blocks(w, block, INT8_MAX, -INT8_MAX, None)


def _quantize_blocks(w, block, qmax, qmin, clip):
    wb = _blocks(w, block)
    amax = np.abs(wb).max(axis=1)  # [nb, out]
    if clip is not None:
        amax = amax * clip
    scale = (np.maximum(amax, TINY) / qmax).astype(np.float32)
    q = np.clip(np.rint(wb / scale[:, None, :]), qmin, qmax).astype(np.int8)
    return q.reshape(-1, w.shape[1])[: w.shape[0]], scale


def dequantize_int4(q: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    return (_blocks(q.astype(np.float32), block) * scale[:, None, :]).reshape(-1, q.shape[1])[: q.shape[0]]


def fake_quant_int4(w: np.ndarray, block: int, clip: np.ndarray | None = None) -> np.ndarray:
    """dequantize_int4(*quantize_int4(w, block, clip)), computed in place in float32 (the AWQ search's inner loop)."""
    wb = _blocks(np.asarray(w, np.float32), block)
    amax = np.abs(wb).max(axis=1, keepdims=True)
    if clip is not None:
        amax *= clip[:, None, :]
    scale = (np.maximum(amax, TINY) / INT4_MAX).astype(np.float32)
    out = wb / scale
    np.rint(out, out=out)
    np.clip(out, -8, 7, out=out)
    out *= scale
    return out.reshape(-1, w.shape[1])[: w.shape[0]]


def pack_matmulnbits(q: np.ndarray, scale: np.ndarray, block: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """INT4 (or INT8, ``bits=8``) values [in, out] and scales [ceil(in/block), out] -> ``com.microsoft.MatMulNBits``
    inputs.

    B is uint8 [out, in/block, block * bits / 8]: column n's blocks; at 4 bits two values a byte, the even row in
    the low nibble. Values are stored unsigned with the zero point 2^(bits-1) (8, 128) that MatMulNBits assumes
    without a zero_points input. Scales are float32 [out * in/block], column-major over blocks.
    """
    q = pad_rows(q, block)  # MatMulNBits pads a partial last block too (K stays the real size)
    k, n = q.shape
    u = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8).T.reshape(n, k // block, block)  # [out, nb, block]
    packed = u if bits == 8 else (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed), np.ascontiguousarray(scale.T.reshape(-1).astype(np.float32))


def quantize_activation_int8(x: np.ndarray, scale: float) -> np.ndarray:
    """Fake-quantize an activation as QuantizeLinear/DequantizeLinear (INT8, zero point 0) do."""
    return np.clip(np.rint(x / scale), -128, 127) * np.float32(scale)


# ---- activation ranges ---------------------------------------------------------------------------------------


def amax_from_histogram(
    hist: np.ndarray, hist_max: float, method: str, percentile: float = 99.99, levels: int = 128
) -> float:
    """Clipping threshold for |x| from a histogram of |x| over [0, hist_max] (HIST_BINS equal bins)."""
    if hist_max <= 0 or hist.sum() == 0:
        return max(hist_max, TINY)
    width = hist_max / hist.size
    if method == "percentile":
        cdf = np.cumsum(hist, dtype=np.float64) / hist.sum()
        i = int(np.searchsorted(cdf, percentile / 100.0))
        return float(min(i + 1, hist.size) * width)
    if method == "entropy":
        return float(min(entropy_threshold(hist, levels) * width, hist_max))
    raise ValueError(f"unknown calibration method {method!r}")


def entropy_threshold(hist: np.ndarray, levels: int = 128) -> float:
    """TensorRT's entropy calibration on a histogram of |x|: the threshold (in bins) minimising KL(P || Q).

    For each candidate i >= levels: P = hist[:i] with the clipped tail added to its last bin; Q = hist[:i]
    merged into ``levels`` bins and spread back evenly over the nonzero bins of each; both normalised, with
    empty Q bins where P is not made tiny rather than infinite (TensorRT's smoothing). Returns i + 0.5.
    """
    hist = np.asarray(hist, dtype=np.float64)
    n = hist.size
    if n <= levels:
        return float(n)
    nz = np.nonzero(hist)[0]
    last = int(nz[-1]) + 1 if nz.size else n
    if last <= levels:  # everything fits in the first `levels` bins: no clipping helps
        return float(last)
    best_i, best_kl = n, math.inf
    for i in range(levels, last + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        # merge hist[:i] into `levels` bins: edges as TensorRT/ModelOpt, the remainder in the last bin
        per = i // levels
        src = hist[:i]
        chunks = np.add.reduceat(src, np.arange(0, per * levels, per))
        chunks[-1] += src[per * levels :].sum()
        counts = np.add.reduceat((src != 0).astype(np.float64), np.arange(0, per * levels, per))
        counts[-1] += (src[per * levels :] != 0).sum()
        owner = np.minimum(np.arange(i) // per, levels - 1)
        q = np.where(src != 0, chunks[owner] / np.maximum(counts[owner], 1), 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i + 0.5


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p, q = _smooth(p / p.sum()), _smooth(q / max(q.sum(), TINY))
    if p is None or q is None:
        return math.inf
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Give empty bins eps of mass, taken evenly from the others (TensorRT/MXNet's smoothing), so KL is finite."""
    zero = p == 0
    zeros = int(zero.sum())
    nonzeros = p.size - zeros
    if nonzeros == 0:
        return None
    take = eps * zeros / nonzeros
    if take >= 1.0:
        return None
    return np.where(zero, eps, np.maximum(p - take, eps))


# ---- SmoothQuant ---------------------------------------------------------------------------------------------


def tie_heads(x: np.ndarray, num_heads: int, num_kv_heads: int, head_dim: int, reduce: str) -> np.ndarray:
    """Make a per-channel vector over the attention output (head-major) equal across the query heads that share
    a KV head, so a scale on it can move into v_proj's columns. Returns the tied vector (same shape)."""
    rep = num_heads // num_kv_heads
    v = x.reshape(num_kv_heads, rep, head_dim)
    r = v.max(axis=1, keepdims=True) if reduce == "max" else v.mean(axis=1, keepdims=True)
    return np.broadcast_to(r, v.shape).reshape(-1).copy()


def smoothquant_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); the activation is divided by s, the weight rows multiplied.

    Channels that never fire (or whose weights are all zero) keep s = 1.
    """
    x = np.asarray(x_absmax, np.float64)
    w = np.asarray(w_absmax, np.float64)
    ok = (x > 0) & (w > 0)
    s = np.ones_like(x)
    s[ok] = x[ok] ** alpha / w[ok] ** (1.0 - alpha)
    s = np.clip(s, 1e-5, 1e5)
    return s.astype(np.float32)


# ---- AWQ -----------------------------------------------------------------------------------------------------


def awq_search_scale(
    x: np.ndarray, x_meanabs: np.ndarray, weights: list[np.ndarray], block: int, grid: int = 20, tie=None
) -> tuple[np.ndarray, float, float, float]:
    """AWQ's activation-aware scale search for linears sharing the input ``x`` [tokens, in].

    For ratio r in {0, 1/grid, ...}: s = mean|x|^r (normalised by sqrt(max*min)); error = ||x @ W - (x/s) @
    Q(s*W)||^2 summed over the linears. Returns (s, best ratio, error at best, error at r=0 = plain RTN).
    ``tie`` optionally maps a vector to one tied across heads (o_proj, so s can fold into v_proj).
    """
    x = np.asarray(x, np.float32)
    base = np.maximum(np.asarray(x_meanabs, np.float64), 1e-8)
    if tie is not None:
        base = tie(base)
    refs = [x @ w for w in weights]
    best = (None, 0.0, math.inf)
    err0 = math.inf
    for i in range(grid):
        r = i / grid
        s = np.maximum(base**r, 1e-4)
        s = (s / math.sqrt(s.max() * s.min())).astype(np.float32)
        err = 0.0
        xs = x / s
        for w, ref in zip(weights, refs):
            chunk = max(64, (1 << 22) // w.shape[0])  # output columns per step: temporaries stay cache-sized
            for c in range(0, w.shape[1], chunk):
                d = xs @ fake_quant_int4(w[:, c : c + chunk] * s[:, None], block)
                d -= ref[:, c : c + chunk]
                err += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
        if i == 0:
            err0 = err
        if err < best[2]:
            best = (s, r, err)
    return best[0], best[1], best[2], err0


def awq_search_clip(w: np.ndarray, gram: np.ndarray, block: int, grid: int = 20, max_shrink: float = 0.5) -> np.ndarray:
    """AWQ's weight clipping search: per (block, output column), the ratio c in {1, 1-1/grid, ..., 1-max_shrink}
    of the block's max |W| that minimises the block's output error ``d^T G_b d`` (d = Q_c(W) - W, G_b the
    Gram matrix x_b^T x_b of the block's inputs over all calibration tokens). Returns clip [in/block, out]."""
    wb = _blocks(w, block)  # [nb, bs, n]
    nb, _, n = wb.shape
    amax = np.maximum(np.abs(wb).max(axis=1), TINY)  # [nb, n]
    best_err = np.full((nb, n), np.inf)
    best = np.ones((nb, n), np.float32)
    g = gram.astype(np.float32)
    for i in range(int(max_shrink * grid)):
        c = 1.0 - i / grid
        scale = (amax * c / INT4_MAX)[:, None, :]
        d = np.clip(np.rint(wb / scale), -8, 7) * scale - wb  # [nb, bs, n]
        err = np.einsum("bin,bin->bn", np.matmul(g, d), d)
        better = err < best_err
        best_err[better] = err[better]
        best[better] = c
    return best
