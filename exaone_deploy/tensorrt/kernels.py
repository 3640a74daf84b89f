"""Triton kernels for the ``EXAONEAttention`` op (GQA + sliding window + RoPE + in-place KV cache).

Semantics: :func:`exaone_deploy.opref.attention_ref` (same I/O contract as ONNX Runtime's
``com.microsoft.GroupQueryAttention``). Shapes: query (B,S,N*H), key/value (B,S,Nkv*H), past_key/past_value
(B,Nkv,C,H) updated in place, seqlens_k int32 (B,) = tokens of the row after this step minus one,
total_sequence_length (int or int32 tensor), cos/sin caches (maxpos, H/2) for rotate-half RoPE.

Kernels
-------
``_cache_update_kernel`` (a)
    Rotates the chunk's keys (RoPE, fp32 math) and writes keys and values into their cache slots: slot ``p``
    (linear) or ``p % C`` (ring buffer; of a chunk longer than C only the last C tokens are kept).
``_attention_kernel`` (b, c)
    Flash-attention forward with online softmax and fp32 accumulation. One program owns one KV head and a
    block of ``BLOCK_R`` *flattened* query rows ``f = token * group + head_in_group``: all query heads of a GQA
    group share every K/V tile (each KV byte is read once per program), and decode (S=1) becomes a
    ``group``-row tile instead of ``group`` separate programs. Keys come from two places, exactly as the
    reference: past positions from the cache (read *before* this step's update), the chunk's own keys
    from the key/value inputs (rotated on the fly). Causal and sliding-window rules are exact per row
    (``i - W < j <= i``), rows have their own lengths (right-padded prompts give zero rows).
    For decode and short chunks the past keys are split over ``NUM_SPLITS`` programs (split-KV, "flash
    decoding"); ``_combine_splits_kernel`` merges the partial softmax states.
``_fused_attention_kernel``
    Everything in a single launch (attention + cache write), for the TensorRT AOT plugin, which can launch
    exactly one kernel per plugin. Its signature follows the AOT convention: input pointers, int32 scalars,
    output pointers. The write of a chunk token must not clobber a ring-buffer slot that another program of
    the same row still has to read; in that (rare) case - ring buffer, continuation chunk longer than
    ``C - W + 1`` tokens spread over several programs - program 0 walks all query blocks of the row before
    writing. It is therefore exact in every case, at reduced parallelism only in that one. No split-KV here
    (that would need a second kernel), so its decode parallelism is B * Nkv programs.

Numerics: RoPE and softmax in fp32; q, k, v and the probabilities enter the dots in the cache dtype (fp16/bf16
tensor cores; fp32 inputs use IEEE fp32 dots). In the CPU interpreter bf16 dots are done in fp32 on the same
rounded operands (the interpreter cannot multiply bf16 tiles).

:func:`exaone_attention` is the torch entry point (in-place cache update, returns the output). It runs on CUDA
tensors and, with ``TRITON_INTERPRET=1``, on CPU tensors (that is how the tests run without a GPU).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "exaone_attention",
    "launch_attention",
    "launch_cache_update",
    "launch_fused_attention",
    "LaunchConfig",
    "choose_config",
    "fused_kernel_signature",
    "PROMPT_FROM_TENSOR",
    "LOG2E",
]

LOG2E = 1.4426950408889634
# Value of the PROMPT scalar telling the kernels to read total_sequence_length from device memory (the
# TensorRT plugin case); 0/1 mean "continuation"/"prompt" decided on the host.
PROMPT_FROM_TENSOR = 2
_PROMPT_FROM_TENSOR = tl.constexpr(PROMPT_FROM_TENSOR)
# Sequence lengths are clamped to this, so that garbage inputs (TensorRT feeds random data while timing
# tactics) never overflow int32 position arithmetic.
_MAX_TOKENS = tl.constexpr(1 << 30)


# ------------------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_geometry(seqlens_ptr, tsl_ptr, b, S, C, PROMPT, RING: tl.constexpr):
    """(n_new, past, lo) of batch row ``b``: real tokens in this chunk, tokens already cached, first cached
    position still present (ring buffers forget positions < past - C)."""
    total = tl.load(seqlens_ptr + b).to(tl.int32) + 1
    total = tl.minimum(tl.maximum(total, 0), _MAX_TOKENS)
    tsl = tl.load(tsl_ptr, mask=PROMPT == _PROMPT_FROM_TENSOR, other=0).to(tl.int32)
    is_prompt = tl.where(PROMPT == _PROMPT_FROM_TENSOR, tsl == S, PROMPT == 1)
    n_new = tl.where(is_prompt, tl.minimum(total, S), S)
    past = tl.maximum(total - n_new, 0)
    if RING:
        lo = tl.maximum(past - C, 0)
    else:
        past = tl.minimum(past, C)  # keeps loops bounded on invalid input (row would exceed the cache)
        lo = past * 0
    return n_new, past, lo


@triton.jit
def _softmax_step(
    q1,
    q2,
    k1t,
    k2t,
    v,
    allowed,
    m_i,
    l_i,
    acc,
    QK_SCALE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """One online-softmax update with a (BLOCK_R x BLOCK_N) score tile; scores in log2 units.

    q/k/v arrive in the cache dtype (tensor-core operands). UPCAST_DOT does the same dots in fp32 on the
    same (already rounded) values: the Triton CPU interpreter cannot multiply bfloat16 tiles.
    """
    if UPCAST_DOT:
        s = tl.dot(q1.to(tl.float32), k1t.to(tl.float32), input_precision="ieee")
        s += tl.dot(q2.to(tl.float32), k2t.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q1, k1t, input_precision=DOT_PREC) + tl.dot(q2, k2t, input_precision=DOT_PREC)
    s = tl.where(allowed, s * QK_SCALE, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows so far: avoid inf - inf
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST_DOT:
        pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _rope_pair(x1, x2, cos_ptr, sin_ptr, pos, d, mask, HALF: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Rotate-half RoPE of (x1, x2) = the two halves of each vector, fp32. ``pos`` indexes rows (or columns
    when TRANSPOSED, i.e. x is (BLOCK_HALF, n))."""
    if TRANSPOSED:
        off = pos[None, :].to(tl.int64) * HALF + d[:, None]
    else:
        off = pos[:, None].to(tl.int64) * HALF + d[None, :]
    c = tl.load(cos_ptr + off, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + off, mask=mask, other=0.0).to(tl.float32)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _attend_block(
    q_ptr,
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    cos_ptr,
    sin_ptr,
    b,
    g,
    mb,
    split,
    S,
    C,
    MAXPOS,
    n_new,
    past,
    lo,
    NUM_HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    QK_SCALE: tl.constexpr,
    WINDOW: tl.constexpr,
    ROTARY: tl.constexpr,
    RING: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Softmax state (m, l, acc) of query-row block ``mb`` of (batch b, KV head g) over split ``split``."""
    GROUP: tl.constexpr = NUM_HEADS // KV_HEADS
    HALF: tl.constexpr = HEAD_DIM // 2

    f0 = mb * BLOCK_R
    f = f0 + tl.arange(0, BLOCK_R)  # flattened (token, head-in-group) rows
    t = f // GROUP
    h = g * GROUP + f % GROUP
    row_in = f < S * GROUP
    row_valid = row_in & (t < n_new)
    pos_q = past + t
    t_lo = f0 // GROUP  # first token of the block
    t_hi = tl.minimum((f0 + BLOCK_R - 1) // GROUP, n_new - 1)  # last real token of the block

    dh = tl.arange(0, BLOCK_HALF)
    dh_ok = dh < HALF
    dd = tl.arange(0, BLOCK_D)
    dd_ok = dd < HEAD_DIM

    # Queries: two halves, rotated in fp32, then in the cache dtype for the tensor-core dot.
    q_off = ((b * S + t).to(tl.int64) * NUM_HEADS + h) * HEAD_DIM
    qm = row_valid[:, None] & dh_ok[None, :]
    q1 = tl.load(q_ptr + q_off[:, None] + dh[None, :], mask=qm, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + q_off[:, None] + HALF + dh[None, :], mask=qm, other=0.0).to(tl.float32)
    if ROTARY:
        q1, q2 = _rope_pair(q1, q2, cos_ptr, sin_ptr, pos_q, dh, qm & (pos_q < MAXPOS)[:, None], HALF, False)
    dot_t = kc_ptr.dtype.element_ty
    q1 = q1.to(dot_t)
    q2 = q2.to(dot_t)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)

    # ---- past keys, from the cache (positions [j_lo, j_hi)) ----
    j_lo = lo
    if WINDOW > 0:
        j_lo = tl.maximum(lo, past + t_lo - WINDOW + 1)
    j_hi = past
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tl.cdiv(tl.maximum(j_hi - j_lo, 0), BLOCK_N), NUM_SPLITS) * BLOCK_N
        j_lo = j_lo + split * per_split
        j_hi = tl.minimum(j_hi, j_lo + per_split)
    cache_off = (b * KV_HEADS + g).to(tl.int64) * C * HEAD_DIM
    for start in range(j_lo, j_hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < j_hi
        if RING:
            slot = j % C
        else:
            slot = j
            j_ok = j_ok & (j < C)
        kv_off = cache_off + slot.to(tl.int64) * HEAD_DIM
        km = dh_ok[:, None] & j_ok[None, :]
        k1t = tl.load(kc_ptr + kv_off[None, :] + dh[:, None], mask=km, other=0.0)
        k2t = tl.load(kc_ptr + kv_off[None, :] + HALF + dh[:, None], mask=km, other=0.0)
        v = tl.load(vc_ptr + kv_off[:, None] + dd[None, :], mask=j_ok[:, None] & dd_ok[None, :], other=0.0)
        allowed = row_valid[:, None] & j_ok[None, :]  # j < past <= i: causal always holds
        if WINDOW > 0:
            allowed = allowed & (j[None, :] > pos_q[:, None] - WINDOW)
        m_i, l_i, acc = _softmax_step(q1, q2, k1t, k2t, v, allowed, m_i, l_i, acc, QK_SCALE, DOT_PREC, UPCAST_DOT)

    # ---- the chunk's own keys, from the inputs (tokens [u_lo, u_hi)); one split does them ----
    u_lo = t_lo * 0
    if WINDOW > 0:
        u_lo = tl.maximum(t_lo - WINDOW + 1, 0)
    u_hi = t_hi + 1
    if NUM_SPLITS > 1:
        u_hi = tl.where(split == NUM_SPLITS - 1, u_hi, u_lo)
    for start in range(u_lo, u_hi, BLOCK_N):
        u = start + tl.arange(0, BLOCK_N)
        u_ok = u < u_hi
        kv_off = ((b * S + u).to(tl.int64) * KV_HEADS + g) * HEAD_DIM
        km = dh_ok[:, None] & u_ok[None, :]
        k1t = tl.load(k_ptr + kv_off[None, :] + dh[:, None], mask=km, other=0.0).to(tl.float32)
        k2t = tl.load(k_ptr + kv_off[None, :] + HALF + dh[:, None], mask=km, other=0.0).to(tl.float32)
        if ROTARY:
            pos_k = past + u
            k1t, k2t = _rope_pair(k1t, k2t, cos_ptr, sin_ptr, pos_k, dh, km & (pos_k < MAXPOS)[None, :], HALF, True)
        k1t = k1t.to(dot_t)  # the value the cache will hold
        k2t = k2t.to(dot_t)
        v = tl.load(v_ptr + kv_off[:, None] + dd[None, :], mask=u_ok[:, None] & dd_ok[None, :], other=0.0)
        v = v.to(dot_t)
        allowed = row_valid[:, None] & u_ok[None, :] & (u[None, :] <= t[:, None])
        if WINDOW > 0:
            allowed = allowed & (u[None, :] > t[:, None] - WINDOW)
        m_i, l_i, acc = _softmax_step(q1, q2, k1t, k2t, v, allowed, m_i, l_i, acc, QK_SCALE, DOT_PREC, UPCAST_DOT)

    return m_i, l_i, acc, t, h, row_in, row_valid


@triton.jit
def _store_output(
    out_ptr,
    l_i,
    acc,
    b,
    t,
    h,
    row_in,
    row_valid,
    S,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    dd = tl.arange(0, BLOCK_D)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o = tl.where(row_valid[:, None], o, 0.0)  # padded query rows give zeros
    off = ((b * S + t).to(tl.int64) * NUM_HEADS + h) * HEAD_DIM
    tl.store(
        out_ptr + off[:, None] + dd[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=row_in[:, None] & (dd < HEAD_DIM)[None, :],
    )


@triton.jit
def _store_kv_tokens(
    k_ptr,
    v_ptr,
    kc_out_ptr,
    vc_out_ptr,
    cos_ptr,
    sin_ptr,
    b,
    g,
    u_start,
    u_end,
    S,
    C,
    MAXPOS,
    n_new,
    past,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROTARY: tl.constexpr,
    RING: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Write rotated keys and values of chunk tokens [u_start, u_end) of (b, g) into their cache slots."""
    HALF: tl.constexpr = HEAD_DIM // 2
    if RING:
        u_start = tl.maximum(u_start, n_new - C)  # only the last C tokens of a long chunk survive
    u_start = tl.maximum(u_start, 0)
    u_end = tl.minimum(u_end, n_new)
    dh = tl.arange(0, BLOCK_HALF)
    dh_ok = dh < HALF
    dd = tl.arange(0, BLOCK_D)
    dd_ok = dd < HEAD_DIM
    for start in range(u_start, u_end, BLOCK_T):
        u = start + tl.arange(0, BLOCK_T)
        u_ok = u < u_end
        pos = past + u
        if RING:
            slot = pos % C
        else:
            slot = pos
            u_ok = u_ok & (pos < C)  # never write past the buffer (invalid input)
        src = ((b * S + u).to(tl.int64) * KV_HEADS + g) * HEAD_DIM
        dst = ((b * KV_HEADS + g).to(tl.int64) * C + slot) * HEAD_DIM
        m = u_ok[:, None] & dh_ok[None, :]
        k1 = tl.load(k_ptr + src[:, None] + dh[None, :], mask=m, other=0.0).to(tl.float32)
        k2 = tl.load(k_ptr + src[:, None] + HALF + dh[None, :], mask=m, other=0.0).to(tl.float32)
        if ROTARY:
            k1, k2 = _rope_pair(k1, k2, cos_ptr, sin_ptr, pos, dh, m & (pos < MAXPOS)[:, None], HALF, False)
        out_t = kc_out_ptr.dtype.element_ty
        tl.store(kc_out_ptr + dst[:, None] + dh[None, :], k1.to(out_t), mask=m)
        tl.store(kc_out_ptr + dst[:, None] + HALF + dh[None, :], k2.to(out_t), mask=m)
        mv = u_ok[:, None] & dd_ok[None, :]
        v = tl.load(v_ptr + src[:, None] + dd[None, :], mask=mv, other=0.0)
        tl.store(vc_out_ptr + dst[:, None] + dd[None, :], v.to(vc_out_ptr.dtype.element_ty), mask=mv)


# ------------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _cache_update_kernel(
    k_ptr,
    v_ptr,
    seqlens_ptr,
    tsl_ptr,
    cos_ptr,
    sin_ptr,
    S,
    C,
    MAXPOS,
    PROMPT,
    kc_ptr,
    vc_ptr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROTARY: tl.constexpr,
    RING: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(a) RoPE + cache write. Grid: (cdiv(S, BLOCK_T), B * KV_HEADS)."""
    pid_t = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // KV_HEADS
    g = pid_bg % KV_HEADS
    n_new, past, lo = _row_geometry(seqlens_ptr, tsl_ptr, b, S, C, PROMPT, RING)
    _store_kv_tokens(
        k_ptr,
        v_ptr,
        kc_ptr,
        vc_ptr,
        cos_ptr,
        sin_ptr,
        b,
        g,
        pid_t * BLOCK_T,
        pid_t * BLOCK_T + BLOCK_T,
        S,
        C,
        MAXPOS,
        n_new,
        past,
        KV_HEADS,
        HEAD_DIM,
        ROTARY,
        RING,
        BLOCK_T,
        BLOCK_HALF,
        BLOCK_D,
    )


@triton.jit
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    seqlens_ptr,
    tsl_ptr,
    cos_ptr,
    sin_ptr,
    S,
    C,
    MAXPOS,
    PROMPT,
    out_ptr,
    m_part_ptr,
    l_part_ptr,
    acc_part_ptr,
    NUM_HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    QK_SCALE: tl.constexpr,
    WINDOW: tl.constexpr,
    ROTARY: tl.constexpr,
    RING: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST_DOT: tl.constexpr = False,
):
    """(b)/(c) attention reading the cache before its update. Grid: (row blocks, B * KV_HEADS, NUM_SPLITS).

    NUM_SPLITS == 1 writes the output; otherwise each split writes its softmax state (m, l, acc) to the
    partial buffers, indexed ((b*S + t)*N + h)*NUM_SPLITS + split, for ``_combine_splits_kernel``.
    """
    mb = tl.program_id(0)
    pid_bg = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bg // KV_HEADS
    g = pid_bg % KV_HEADS
    n_new, past, lo = _row_geometry(seqlens_ptr, tsl_ptr, b, S, C, PROMPT, RING)
    m_i, l_i, acc, t, h, row_in, row_valid = _attend_block(
        q_ptr,
        k_ptr,
        v_ptr,
        kc_ptr,
        vc_ptr,
        cos_ptr,
        sin_ptr,
        b,
        g,
        mb,
        split,
        S,
        C,
        MAXPOS,
        n_new,
        past,
        lo,
        NUM_HEADS,
        KV_HEADS,
        HEAD_DIM,
        QK_SCALE,
        WINDOW,
        ROTARY,
        RING,
        NUM_SPLITS,
        BLOCK_R,
        BLOCK_N,
        BLOCK_HALF,
        BLOCK_D,
        DOT_PREC,
        UPCAST_DOT,
    )
    if NUM_SPLITS == 1:
        _store_output(out_ptr, l_i, acc, b, t, h, row_in, row_valid, S, NUM_HEADS, HEAD_DIM, BLOCK_D)
    else:
        r = ((b * S + t).to(tl.int64) * NUM_HEADS + h) * NUM_SPLITS + split
        tl.store(m_part_ptr + r, m_i, mask=row_in)
        tl.store(l_part_ptr + r, l_i, mask=row_in)
        dd = tl.arange(0, BLOCK_D)
        tl.store(
            acc_part_ptr + r[:, None] * HEAD_DIM + dd[None, :], acc, mask=row_in[:, None] & (dd < HEAD_DIM)[None, :]
        )


@triton.jit
def _combine_splits_kernel(
    m_part_ptr,
    l_part_ptr,
    acc_part_ptr,
    out_ptr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge the split-KV softmax states of one (b, t, h) row. Grid: (B * S * N,)."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_SPLITS)
    s_ok = s < NUM_SPLITS
    dd = tl.arange(0, BLOCK_D)
    m = tl.load(m_part_ptr + row * NUM_SPLITS + s, mask=s_ok, other=float("-inf"))
    l = tl.load(l_part_ptr + row * NUM_SPLITS + s, mask=s_ok, other=0.0)  # noqa: E741 - flash-attention's l
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    total = tl.sum(w * l, 0)
    acc = tl.load(
        acc_part_ptr + (row * NUM_SPLITS + s)[:, None] * HEAD_DIM + dd[None, :],
        mask=s_ok[:, None] & (dd < HEAD_DIM)[None, :],
        other=0.0,
    )
    o = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + dd, o.to(out_ptr.dtype.element_ty), mask=dd < HEAD_DIM)


@triton.jit
def _fused_attention_kernel(
    # inputs (TensorRT plugin input order)
    q_ptr,
    k_ptr,
    v_ptr,
    past_k_ptr,
    past_v_ptr,
    seqlens_ptr,
    tsl_ptr,
    cos_ptr,
    sin_ptr,
    # int32 scalars (the AOT plugin's "extra args", between inputs and outputs)
    S,
    C,
    MAXPOS,
    PROMPT,
    # outputs: present_k/present_v alias past_k/past_v (in-place update)
    out_ptr,
    present_k_ptr,
    present_v_ptr,
    NUM_HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    QK_SCALE: tl.constexpr,
    WINDOW: tl.constexpr,
    ROTARY: tl.constexpr,
    RING: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST_DOT: tl.constexpr = False,
):
    """Attention + cache update in one launch. Grid: (cdiv(S * group, BLOCK_R), B * KV_HEADS).

    Each program attends its row block, then writes the chunk tokens whose first head row it owns. Linear
    caches never conflict (reads [0, past), writes [past, past + n)). A ring buffer write of chunk token u
    clobbers position past + u - C; if any query of the row still needs one of those positions and the row is
    spread over several programs, program 0 does the whole row (all blocks, then all writes) instead.
    """
    GROUP: tl.constexpr = NUM_HEADS // KV_HEADS
    pid_m = tl.program_id(0)
    num_m = tl.num_programs(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // KV_HEADS
    g = pid_bg % KV_HEADS
    n_new, past, lo = _row_geometry(seqlens_ptr, tsl_ptr, b, S, C, PROMPT, RING)

    mb_lo = pid_m
    mb_hi = pid_m + 1
    if RING:
        read_lo = lo  # oldest cached position any query of the row reads
        if WINDOW > 0:
            read_lo = tl.maximum(lo, past - WINDOW + 1)
        newest_clobbered = past + tl.minimum(n_new, C) - 1 - C  # position of the last overwritten old slot
        conflict = (num_m > 1) & (newest_clobbered >= read_lo) & (read_lo < past)
        mb_lo = tl.where(conflict, 0, pid_m)
        mb_hi = tl.where(conflict, tl.where(pid_m == 0, num_m, 0), pid_m + 1)

    for mb in range(mb_lo, mb_hi):
        m_i, l_i, acc, t, h, row_in, row_valid = _attend_block(
            q_ptr,
            k_ptr,
            v_ptr,
            past_k_ptr,
            past_v_ptr,
            cos_ptr,
            sin_ptr,
            b,
            g,
            mb,
            0,
            S,
            C,
            MAXPOS,
            n_new,
            past,
            lo,
            NUM_HEADS,
            KV_HEADS,
            HEAD_DIM,
            QK_SCALE,
            WINDOW,
            ROTARY,
            RING,
            1,
            BLOCK_R,
            BLOCK_N,
            BLOCK_HALF,
            BLOCK_D,
            DOT_PREC,
            UPCAST_DOT,
        )
        _store_output(out_ptr, l_i, acc, b, t, h, row_in, row_valid, S, NUM_HEADS, HEAD_DIM, BLOCK_D)

    # Every warp of this program has finished reading the cache before any of them writes to it (matters in
    # the conflict case, where this program reads the slots it is about to overwrite).
    tl.debug_barrier()
    # token u belongs to the program holding its row f = u * GROUP
    u_start = tl.cdiv(mb_lo * BLOCK_R, GROUP)
    u_end = tl.minimum(tl.cdiv(mb_hi * BLOCK_R, GROUP), S)
    _store_kv_tokens(
        k_ptr,
        v_ptr,
        present_k_ptr,
        present_v_ptr,
        cos_ptr,
        sin_ptr,
        b,
        g,
        u_start,
        u_end,
        S,
        C,
        MAXPOS,
        n_new,
        past,
        KV_HEADS,
        HEAD_DIM,
        ROTARY,
        RING,
        BLOCK_T,
        BLOCK_HALF,
        BLOCK_D,
    )


# ------------------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    block_r: int = 64  # flattened query rows (token x head-in-group) per program
    block_n: int = 64  # keys per inner iteration
    block_t: int = 32  # tokens per cache-write iteration
    num_warps: int = 4
    num_stages: int = 2


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def choose_config(S: int, group: int, head_dim: int, itemsize: int = 2) -> LaunchConfig:
    """Block sizes for a chunk of S tokens: decode-shaped tiles for short chunks, bigger ones for prefill
    (smaller key tiles for fp32 / large heads, to stay within shared memory)."""
    rows = S * group
    block_r = 64 if rows > 32 else max(16, _next_pow2(rows))
    wide = head_dim * itemsize > 256
    return LaunchConfig(
        block_r=block_r, block_n=32 if wide else 64, block_t=32, num_warps=4, num_stages=1 if wide else 2
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


@dataclass
class _Problem:
    B: int
    S: int
    N: int
    Nkv: int
    H: int
    C: int
    maxpos: int
    qk_scale: float
    window: int
    rotary: int
    ring: int
    prompt: int  # 0, 1 or PROMPT_FROM_TENSOR
    tsl: torch.Tensor  # int32 tensor holding total_sequence_length (read only when prompt == 2)
    cos: torch.Tensor
    sin: torch.Tensor
    dot_prec: str
    upcast_dot: bool

    @property
    def group(self) -> int:
        return self.N // self.Nkv

    @property
    def block_half(self) -> int:
        return max(16, _next_pow2(self.H // 2))

    @property
    def block_d(self) -> int:
        return max(16, _next_pow2(self.H))


def _prepare(
    query,
    key,
    value,
    past_key,
    past_value,
    seqlens_k,
    total_sequence_length,
    cos_cache,
    sin_cache,
    num_heads,
    kv_num_heads,
    scale,
    window,
    rotary,
    ring,
) -> _Problem:
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise ValueError("query/key/value must be (B, S, heads*head_dim)")
    if past_key.dim() != 4 or past_key.shape != past_value.shape:
        raise ValueError("past_key/past_value must both be (B, kv_num_heads, C, head_dim)")
    B, S, _ = query.shape
    N, Nkv = int(num_heads), int(kv_num_heads)
    if N <= 0 or Nkv <= 0 or N % Nkv:
        raise ValueError("num_heads must be a positive multiple of kv_num_heads")
    C, H = int(past_key.shape[2]), int(past_key.shape[3])
    if H % 2:
        raise ValueError("head_dim must be even")
    if tuple(query.shape) != (B, S, N * H):
        raise ValueError(f"query shape {tuple(query.shape)} != (B, S, num_heads*head_dim) = {(B, S, N * H)}")
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != (B, S, Nkv * H):
            raise ValueError(f"{name} shape {tuple(t.shape)} != (B, S, kv_num_heads*head_dim) = {(B, S, Nkv * H)}")
    if tuple(past_key.shape[:2]) != (B, Nkv):
        raise ValueError(f"past_key shape {tuple(past_key.shape)} does not match (B, kv_num_heads) = {(B, Nkv)}")
    for name, t in (("past_key", past_key), ("past_value", past_value)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
    if past_key.dtype != past_value.dtype:
        raise ValueError("past_key and past_value must have the same dtype")
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {query.dtype}")
    if seqlens_k.dtype != torch.int32 or seqlens_k.numel() != B:
        raise ValueError("seqlens_k must be an int32 tensor of B elements")
    if window < 0 or ring not in (0, 1) or rotary not in (0, 1):
        raise ValueError("window must be >= 0, rotary and ring 0 or 1")
    if rotary:
        if cos_cache is None or sin_cache is None:
            raise ValueError("rotary=1 needs cos_cache and sin_cache")
        if cos_cache.dim() != 2 or cos_cache.shape[1] != H // 2 or sin_cache.shape != cos_cache.shape:
            raise ValueError(f"cos/sin caches must be (max_positions, head_dim/2 = {H // 2})")
        cos, sin = cos_cache.contiguous(), sin_cache.contiguous()
        maxpos = int(cos.shape[0])
    else:
        cos = sin = query  # never read
        maxpos = 0
    if isinstance(total_sequence_length, torch.Tensor):
        tsl = total_sequence_length.reshape(-1)[:1].to(device=query.device, dtype=torch.int32)
        prompt = PROMPT_FROM_TENSOR
    else:
        tsl = seqlens_k  # never read
        prompt = int(int(total_sequence_length) == S)
    sm_scale = float(scale) if scale else 1.0 / math.sqrt(H)
    return _Problem(
        B=B,
        S=S,
        N=N,
        Nkv=Nkv,
        H=H,
        C=C,
        maxpos=maxpos,
        qk_scale=sm_scale * LOG2E,
        window=int(window),
        rotary=int(rotary),
        ring=int(ring),
        prompt=prompt,
        tsl=tsl,
        cos=cos,
        sin=sin,
        dot_prec="ieee" if past_key.dtype == torch.float32 else "tf32",
        upcast_dot=_interpreting() and past_key.dtype == torch.bfloat16,
    )


def _check_device(*tensors: torch.Tensor) -> None:
    if _interpreting():
        return
    if not all(t.is_cuda for t in tensors):
        raise RuntimeError("exaone_attention needs CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors)")


def _default_splits(p: _Problem, cfg: LaunchConfig, device: torch.device) -> int:
    """Split-KV factor: enough programs to fill the GPU when the row blocks alone would not."""
    if device.type != "cuda":
        return 1
    programs = triton.cdiv(p.S * p.group, cfg.block_r) * p.B * p.Nkv
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    max_keys = min(p.C, p.window) if p.window else p.C  # upper bound of past keys any row reads
    by_work = triton.cdiv(max_keys, 4 * cfg.block_n)  # at least ~4 key blocks per split
    return max(1, min(triton.cdiv(2 * sms, programs), by_work, 64))


def launch_cache_update(key, value, past_key, past_value, seqlens_k, p: _Problem, cfg: LaunchConfig) -> None:
    """(a) Rotate and write this step's keys/values into the cache, in place."""
    grid = (triton.cdiv(p.S, cfg.block_t), p.B * p.Nkv)
    _cache_update_kernel[grid](
        key,
        value,
        seqlens_k,
        p.tsl,
        p.cos,
        p.sin,
        p.S,
        p.C,
        p.maxpos,
        p.prompt,
        past_key,
        past_value,
        KV_HEADS=p.Nkv,
        HEAD_DIM=p.H,
        ROTARY=p.rotary,
        RING=p.ring,
        BLOCK_T=cfg.block_t,
        BLOCK_HALF=p.block_half,
        BLOCK_D=p.block_d,
        num_warps=cfg.num_warps,
    )


def _attention_launch_args(query, key, value, past_key, past_value, seqlens_k, out, p: _Problem, cfg: LaunchConfig):
    """The leading arguments and the constexprs both attention kernels (split and fused) take, in their order."""
    args = (query, key, value, past_key, past_value, seqlens_k, p.tsl, p.cos, p.sin, p.S, p.C, p.maxpos, p.prompt, out)
    constexprs = dict(
        NUM_HEADS=p.N,
        KV_HEADS=p.Nkv,
        HEAD_DIM=p.H,
        QK_SCALE=p.qk_scale,
        WINDOW=p.window,
        ROTARY=p.rotary,
        RING=p.ring,
        BLOCK_R=cfg.block_r,
        BLOCK_N=cfg.block_n,
        BLOCK_HALF=p.block_half,
        BLOCK_D=p.block_d,
        DOT_PREC=p.dot_prec,
        UPCAST_DOT=p.upcast_dot,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return args, constexprs


def launch_attention(
    query,
    key,
    value,
    past_key,
    past_value,
    seqlens_k,
    p: _Problem,
    cfg: LaunchConfig,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(b)/(c) Attention against the cache as it is *before* this step's update; returns the output."""
    out = torch.empty_like(query) if out is None else out
    row_blocks = triton.cdiv(p.S * p.group, cfg.block_r)
    grid = (row_blocks, p.B * p.Nkv, num_splits)
    if num_splits > 1:
        rows = p.B * p.S * p.N
        m_part = torch.empty(rows * num_splits, device=query.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(rows * num_splits * p.H, device=query.device, dtype=torch.float32)
    else:
        m_part = l_part = acc_part = out  # unused
    args, constexprs = _attention_launch_args(query, key, value, past_key, past_value, seqlens_k, out, p, cfg)
    _attention_kernel[grid](*args, m_part, l_part, acc_part, NUM_SPLITS=num_splits, **constexprs)
    if num_splits > 1:
        _combine_splits_kernel[(p.B * p.S * p.N,)](
            m_part,
            l_part,
            acc_part,
            out,
            HEAD_DIM=p.H,
            NUM_SPLITS=num_splits,
            BLOCK_SPLITS=max(2, _next_pow2(num_splits)),
            BLOCK_D=p.block_d,
            num_warps=4,
        )
    return out


def launch_fused_attention(
    query, key, value, past_key, past_value, seqlens_k, p: _Problem, cfg: LaunchConfig, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The single-launch kernel of the TensorRT AOT plugin, launched from torch (for tests/benchmarks)."""
    out = torch.empty_like(query) if out is None else out
    grid = (triton.cdiv(p.S * p.group, cfg.block_r), p.B * p.Nkv)
    args, constexprs = _attention_launch_args(query, key, value, past_key, past_value, seqlens_k, out, p, cfg)
    _fused_attention_kernel[grid](*args, past_key, past_value, BLOCK_T=cfg.block_t, **constexprs)
    return out


def exaone_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_sequence_length: int | torch.Tensor,
    cos_cache: torch.Tensor | None = None,
    sin_cache: torch.Tensor | None = None,
    *,
    num_heads: int,
    kv_num_heads: int,
    scale: float = 0.0,
    window: int = 0,
    rotary: int = 0,
    ring: int = 0,
    fused: bool = False,
    num_splits: int | None = None,
    config: LaunchConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """EXAONEAttention: returns the output (B, S, N*H); updates past_key/past_value IN PLACE.

    ``fused=False`` (default): attention kernel (split-KV + combine for decode-shaped work), then the
    cache-update kernel. ``fused=True``: the single kernel of the TensorRT AOT plugin. ``num_splits`` forces
    the split-KV factor (default: chosen from the GPU size; 1 on CPU). ``config`` overrides block sizes.
    ``out`` (contiguous, shaped and typed like query) receives the output instead of a new tensor.
    The caller guarantees the op's preconditions (see opref); invalid lengths never make the kernels access
    memory outside the buffers, but give unspecified results.
    """
    p = _prepare(
        query,
        key,
        value,
        past_key,
        past_value,
        seqlens_k,
        total_sequence_length,
        cos_cache,
        sin_cache,
        num_heads,
        kv_num_heads,
        scale,
        window,
        rotary,
        ring,
    )
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    seqlens_k = seqlens_k.contiguous()
    _check_device(query, key, value, past_key, past_value, seqlens_k)
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype or not out.is_contiguous()):
        raise ValueError("out must be a contiguous tensor with the shape and dtype of query")
    cfg = config or choose_config(p.S, p.group, p.H, past_key.element_size())
    if fused:
        if num_splits not in (None, 1):
            raise ValueError("the fused kernel does not split the KV length")
        return launch_fused_attention(query, key, value, past_key, past_value, seqlens_k, p, cfg, out=out)
    splits = num_splits if num_splits is not None else _default_splits(p, cfg, query.device)
    out = launch_attention(
        query, key, value, past_key, past_value, seqlens_k, p, cfg, num_splits=max(1, splits), out=out
    )
    launch_cache_update(key, value, past_key, past_value, seqlens_k, p, cfg)
    return out


# ------------------------------------------------------------------------------------------------------------
# AOT compilation (used by the TensorRT plugin)
# ------------------------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def fused_kernel_signature(
    dtype: str,
    cache_dtype: str,
    rope_dtype: str,
    *,
    num_heads: int,
    kv_num_heads: int,
    head_dim: int,
    scale: float,
    window: int,
    rotary: int,
    ring: int,
    config: LaunchConfig,
) -> tuple[dict, dict]:
    """(signature, constexprs) for ``triton.compiler.ASTSource(_fused_attention_kernel, ...)``.

    dtype strings are Triton's ("fp32", "fp16", "bf16"). Parameter order = TensorRT AOT order: the 9 input
    pointers, the int32 scalars S, C, MAXPOS, PROMPT, then the 3 output pointers.
    """
    signature = {
        "q_ptr": f"*{dtype}",
        "k_ptr": f"*{dtype}",
        "v_ptr": f"*{dtype}",
        "past_k_ptr": f"*{cache_dtype}",
        "past_v_ptr": f"*{cache_dtype}",
        "seqlens_ptr": "*i32",
        "tsl_ptr": "*i32",
        "cos_ptr": f"*{rope_dtype}",
        "sin_ptr": f"*{rope_dtype}",
        "S": "i32",
        "C": "i32",
        "MAXPOS": "i32",
        "PROMPT": "i32",
        "out_ptr": f"*{dtype}",
        "present_k_ptr": f"*{cache_dtype}",
        "present_v_ptr": f"*{cache_dtype}",
    }
    sm_scale = float(scale) if scale else 1.0 / math.sqrt(head_dim)
    constexprs = {
        "NUM_HEADS": int(num_heads),
        "KV_HEADS": int(kv_num_heads),
        "HEAD_DIM": int(head_dim),
        "QK_SCALE": sm_scale * LOG2E,
        "WINDOW": int(window),
        "ROTARY": int(rotary),
        "RING": int(ring),
        "BLOCK_R": config.block_r,
        "BLOCK_N": config.block_n,
        "BLOCK_T": config.block_t,
        "BLOCK_HALF": max(16, _next_pow2(head_dim // 2)),
        "BLOCK_D": max(16, _next_pow2(head_dim)),
        "DOT_PREC": "ieee" if cache_dtype == "fp32" else "tf32",
        "UPCAST_DOT": False,
    }
    for name in constexprs:
        signature[name] = "constexpr"
    return signature, constexprs
