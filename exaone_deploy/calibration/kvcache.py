"""Scales of the INT8 KV cache (``--kv-cache int8``): per KV channel, ``scale = amax / 127``.

ONNX Runtime's GroupQueryAttention quantizes each new key and value on write (symmetric, one scale per channel of
the (kv_heads, head_dim) cache, ``GraphIO.kv_scale_shape``) and dequantizes on read. The scales are float32
initializers named ``GraphIO.kv_scale_name(layer, "key"|"value")`` in the canonical graph; the ort lowering wires
them into the op. K is quantized *after* the op's RoPE, so a K range is the range of the rotated key: for the
rotate-half pairs (i, i + head_dim/2), ``|k'_i| <= sqrt(k_i^2 + k_{i+h}^2)`` at every position, which is what
``rope_pair_absmax`` takes (valid at positions the calibration never saw).

Two sources of ranges:

* **calibrated** (``quantize --kv-cache int8``, the better one): per-channel max |k'| and |v| over the
  calibration samples, measured on the quantized graph that ships (``stats.collect_kv``), so SmoothQuant/AWQ's
  fold of o_proj's smoothing into v_proj's columns and the weight quantization error are included.
* **static** (``export --kv-cache int8``, no data): K from a bound that cannot clip: EXAONE 4 RMS-normalises
  each key head (k_norm) before RoPE, so ``|k'_i| <= sqrt(head_dim) * max(|w_i|, |w_{i+h}|)`` for the k_norm
  weight w. V has no such bound (EXAONE 4 is post-norm: v_proj reads the un-normalised residual stream), so its
  range is an estimate from the weights: the residual stream of layer l has squared norm about
  ``E|embedding|^2 + sum_{j<l} d * (mean w_attn_j^2 + mean w_ffn_j^2)`` (each sublayer output is RMS-normalised
  with those weights), a value channel c is then about Gaussian with std ``|W_v[c]| * r_l / sqrt(d)``, and the
  range is ``STATIC_V_SIGMAS`` such standard deviations. On the bundled tiny model this lands at 1-2x the
  calibrated ranges (never below in any layer's maximum): coarser steps than calibrated, hence the larger
  perplexity cost docs/perf.md reports. Rejected for plain export: scale 1.0 (vLLM's FP8 default; an INT8
  step of 1.0 is far coarser than the unit-RMS keys) and calibrating inside export (it would run the float
  model there, which is what ``quantize`` is for).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from ..graph_io import GraphIO
from ..spec import ModelSpec

__all__ = ["STATIC_V_SIGMAS", "rope_pair_absmax", "static_amax", "scales_from_amax", "add_scale_initializers"]

STATIC_V_SIGMAS = 8.0  # static V range in estimated standard deviations (calibrated ranges were 4-6 sigma)
QMAX = 127
_MIN_AMAX = 1e-6  # a channel that never fired still gets a positive scale


def rope_pair_absmax(x: np.ndarray, num_kv_heads: int, head_dim: int) -> np.ndarray:
    """Per channel over tokens, ``sqrt(x_i^2 + x_{i+h}^2)`` of rotate-half pairs: a bound on the rotated value.

    ``x`` [tokens, kv_heads * head_dim] (pre-RoPE keys); returns [kv_heads * head_dim]."""
    h = head_dim // 2
    k = x.reshape(-1, num_kv_heads, 2, h)
    r = (
        np.sqrt(np.square(k[:, :, 0]) + np.square(k[:, :, 1])).max(axis=0)
        if k.shape[0]
        else np.zeros((num_kv_heads, h), np.float32)
    )
    return np.concatenate([r, r], axis=-1).reshape(-1).astype(np.float32)


def static_amax(spec: ModelSpec, read: Callable[[str], np.ndarray]) -> dict[tuple[int, str], np.ndarray]:
    """Data-free ranges per (layer, "key"|"value") from the checkpoint's weights (module docstring).

    ``read(name)`` returns a checkpoint tensor as float32 (Hugging Face names)."""
    D, h, d = spec.head_dim, spec.head_dim // 2, spec.hidden_size
    emb = read("model.embed_tokens.weight")
    r2 = float(np.mean(np.sum(np.square(emb, dtype=np.float64), axis=1)))
    del emb
    out = {}
    for layer in spec.layers:
        p = f"model.layers.{layer.index}."
        w = np.abs(read(p + "self_attn.k_norm.weight")).astype(np.float32)
        if layer.rope:
            w = np.tile(np.maximum(w[:h], w[h:]), 2)
        out[(layer.index, "key")] = np.tile(np.sqrt(D) * w, spec.num_kv_heads)
        wv = read(p + "self_attn.v_proj.weight")  # [kv_heads * head_dim, d]
        out[(layer.index, "value")] = (STATIC_V_SIGMAS * np.linalg.norm(wv, axis=1) * np.sqrt(r2 / d)).astype(
            np.float32
        )
        for norm in ("post_attention_layernorm", "post_feedforward_layernorm"):
            r2 += d * float(np.mean(np.square(read(p + norm + ".weight"), dtype=np.float64)))
    return out


def scales_from_amax(amax: np.ndarray) -> np.ndarray:
    return (np.maximum(np.asarray(amax, np.float32), _MIN_AMAX) / QMAX).astype(np.float32)


def add_scale_initializers(model: ir.Model, io: GraphIO, amax: dict[tuple[int, str], np.ndarray]) -> None:
    """Put (or replace) the scale initializers of every layer's K and V cache into ``model`` (canonical)."""
    graph = model.graph
    for i, kv, _, _ in io.cache_pairs():
        name = io.kv_scale_name(i, kv)
        arr = scales_from_amax(amax[(i, kv)]).reshape(io.kv_scale_shape)
        if name in graph.initializers:
            graph.initializers[name].const_value = ir.tensor(arr, name=name)
            continue
        graph.register_initializer(
            ir.Value(
                name=name,
                shape=ir.Shape(arr.shape),
                type=ir.TensorType(ir.DataType.FLOAT),
                const_value=ir.tensor(arr, name=name),
            )
        )
