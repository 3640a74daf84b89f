"""NumPy reference implementation of the ``ai.exaone_deploy::EXAONEAttention`` op.

This file *is* the executable half of ``docs/onnx-ops.md``: every implementation of the op
(the torch custom op traced by the exporter, the ONNX Runtime lowering to GroupQueryAttention,
the Triton kernels behind the TensorRT plugin) is tested against :func:`attention_ref`.

It depends on NumPy only, so the runtime and the kernel tests can use it without torch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["attention_ref", "rope_cache", "llama3_inv_freq", "default_inv_freq", "apply_rope_ref"]


def default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """inv_freq[i] = 1 / theta ** (2i / head_dim), in float32 exactly as transformers computes it
    (the exponent in float32, the power evaluated in float64 and rounded)."""
    e = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return np.float32(1.0) / (float(theta) ** e.astype(np.float64)).astype(np.float32)


def llama3_inv_freq(
    head_dim: int,
    theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """Llama-3 frequency scaling, as transformers' ``_compute_llama3_parameters`` (in float32 like it:
    a 1-ulp difference in inv_freq grows to 1e-3 in cos/sin at position 100k)."""
    f32 = np.float32
    inv_freq = default_inv_freq(head_dim, theta)
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = f32(2 * np.pi) / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / f32(factor), inv_freq)
    smooth = (f32(original_max_position_embeddings) / wavelen - f32(low_freq_factor)) / f32(
        high_freq_factor - low_freq_factor
    )
    smoothed = (f32(1) - smooth) * inv_freq_llama / f32(factor) + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)


def rope_cache(inv_freq: np.ndarray, max_positions: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches of shape (max_positions, head_dim/2): cache[p, i] = cos/sin(p * inv_freq[i]).

    transformers computes ``position * inv_freq`` in float32; we do the same so that the caches are
    bit-identical to what the oracle uses.
    """
    pos = np.arange(max_positions, dtype=np.float32)[:, None]
    freqs = pos * inv_freq.astype(np.float32)[None, :]
    return np.cos(freqs).astype(dtype), np.sin(freqs).astype(dtype)


def apply_rope_ref(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Non-interleaved ("rotate half") RoPE. x: (..., H); cos/sin: (..., H/2) broadcastable."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_ref(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    past_key: np.ndarray,
    past_value: np.ndarray,
    seqlens_k: np.ndarray,
    total_sequence_length: int,
    cos_cache: np.ndarray | None = None,
    sin_cache: np.ndarray | None = None,
    *,
    num_heads: int,
    kv_num_heads: int,
    scale: float = 0.0,
    window: int = 0,
    rotary: int = 0,
    ring: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference semantics of EXAONEAttention (see docs/onnx-ops.md).

    query (B,S,N*H), key/value (B,S,Nkv*H), past_key/past_value (B,Nkv,C,H) cache buffers,
    seqlens_k int32 (B): tokens of row b after this step, minus one; total_sequence_length: int.

    Prompt step (total_sequence_length == S): every row starts empty; row b's n_b = seqlens_k[b]+1
    real tokens are the first n_b of the chunk (right padding); padded query rows give zeros.
    Continuation step (total_sequence_length > S): all S tokens of every row are real and row b
    already holds past_b = seqlens_k[b] + 1 - S tokens.

    Returns (output (B,S,N*H), present_key, present_value); the presents are updated copies of the
    past buffers (a target may alias them). Computation is float64 internally.
    """
    B, S, _ = query.shape
    C = past_key.shape[2]
    H = past_key.shape[3]
    N, Nkv = num_heads, kv_num_heads
    if N % Nkv:
        raise ValueError("num_heads must be a multiple of kv_num_heads")
    group = N // Nkv
    scale = scale if scale else 1.0 / np.sqrt(H)
    prompt = int(total_sequence_length) == S
    q = query.reshape(B, S, N, H).astype(np.float64)
    k = key.reshape(B, S, Nkv, H).astype(np.float64)
    v = value.reshape(B, S, Nkv, H).astype(np.float64)
    present_k = past_key.copy()
    present_v = past_value.copy()
    out = np.zeros((B, S, N, H), dtype=np.float64)
    for b in range(B):
        total = int(seqlens_k[b]) + 1
        n_new = total if prompt else S
        past = total - n_new
        if past < 0 or n_new > S:
            raise ValueError(f"row {b}: seqlens_k={int(seqlens_k[b])} inconsistent with S={S}")
        if not ring and total > C:
            raise ValueError(f"row {b}: {total} tokens exceed cache capacity {C}")
        pos = past + np.arange(n_new)
        qb, kb, vb = q[b, :n_new], k[b, :n_new], v[b, :n_new]
        if rotary:
            c = cos_cache[pos].astype(np.float64)[:, None, :]
            s = sin_cache[pos].astype(np.float64)[:, None, :]
            qb = apply_rope_ref(qb, c, s)
            kb = apply_rope_ref(kb, c, s)
        # Visible past keys are read before the update: positions [lo, past). A ring buffer of
        # capacity C still holds positions >= past - C; the window rule never needs older ones when
        # C >= window. The chunk's own keys come from the inputs (exact values, as a fused kernel).
        lo = max(0, past - C) if ring else 0
        ppos = np.arange(lo, past)
        pslots = ppos % C if ring else ppos
        K = np.concatenate([past_key[b][:, pslots, :].astype(np.float64), kb.transpose(1, 0, 2)], axis=1)
        V = np.concatenate([past_value[b][:, pslots, :].astype(np.float64), vb.transpose(1, 0, 2)], axis=1)
        kpos = np.concatenate([ppos, pos])
        # The cache stores rotated keys. Slot of position p: p (linear) or p % C (ring buffer); when a
        # chunk is longer than C only its last C tokens survive in a ring.
        keep = slice(max(0, n_new - C), n_new) if ring else slice(0, n_new)
        slots = (pos % C) if ring else pos
        present_k[b][:, slots[keep], :] = kb[keep].transpose(1, 0, 2).astype(present_k.dtype)
        present_v[b][:, slots[keep], :] = vb[keep].transpose(1, 0, 2).astype(present_v.dtype)
        for h in range(N):
            kh, vh = K[h // group], V[h // group]
            scores = (qb[:, h, :] @ kh.T) * scale  # (n_new, T)
            i = pos[:, None]
            j = kpos[None, :]
            allowed = j <= i
            if window > 0:
                allowed &= j > i - window
            scores = np.where(allowed, scores, -np.inf)
            scores -= scores.max(axis=-1, keepdims=True)
            p = np.exp(scores)
            p /= p.sum(axis=-1, keepdims=True)
            out[b, :n_new, h, :] = p @ vh
    return out.reshape(B, S, N * H).astype(query.dtype), present_k, present_v
