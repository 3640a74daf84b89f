"""The attention custom op: torch implementation, fake implementation, ONNX schema and translation.

One op, ``ai.exaone_deploy::EXAONEAttention`` (torch: ``torch.ops.exaone_deploy.attention``), covers
global and sliding-window attention, RoPE on or off, GQA and the KV-cache update. Its contract is that
of ONNX Runtime's ``com.microsoft.GroupQueryAttention`` so that the ``ort`` lowering is a rename; the
semantics are specified in docs/onnx-ops.md and executable in :mod:`exaone_deploy.opref`.
"""

from __future__ import annotations

import math

import onnx
import torch
from onnx import defs

DOMAIN = "ai.exaone_deploy"
OP_TYPE = "EXAONEAttention"
OP_VERSION = 1

__all__ = ["DOMAIN", "OP_TYPE", "OP_VERSION", "attention", "register_onnx_schema", "custom_translation_table"]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (n, heads, H); cos/sin (n, H/2). Non-interleaved "rotate half", as transformers.
    half = x.shape[-1] // 2
    c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


@torch.library.custom_op("exaone_deploy::attention", mutates_args=())
def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_sequence_length: torch.Tensor,
    cos_cache: torch.Tensor | None,
    sin_cache: torch.Tensor | None,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
    window: int,
    rotary: int,
    ring: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reference (see opref.attention_ref for the commented NumPy version)."""
    B, S, _ = query.shape
    C, H = past_key.shape[2], past_key.shape[3]
    N, Nkv = num_heads, kv_num_heads
    group = N // Nkv
    scale = scale if scale else 1.0 / math.sqrt(H)
    total_len = int(total_sequence_length.reshape(-1)[0])
    prompt = total_len == S
    q = query.view(B, S, N, H)
    k = key.view(B, S, Nkv, H)
    v = value.view(B, S, Nkv, H)
    present_k, present_v = past_key.clone(), past_value.clone()
    out = torch.zeros(B, S, N, H, dtype=query.dtype, device=query.device)
    for b in range(B):
        total = int(seqlens_k[b]) + 1
        n_new = total if prompt else S
        past = total - n_new
        if past < 0 or n_new > S or (not ring and total > C):
            raise ValueError(f"EXAONEAttention: row {b} seqlens_k={total - 1} inconsistent with S={S}, C={C}")
        pos = torch.arange(past, total, device=query.device)
        qb, kb, vb = q[b, :n_new], k[b, :n_new], v[b, :n_new]
        if rotary:
            qb, kb = _rope(qb, cos_cache[pos], sin_cache[pos]), _rope(kb, cos_cache[pos], sin_cache[pos])
        lo = max(0, past - C) if ring else 0
        ppos = torch.arange(lo, past, device=query.device)
        pslots = ppos % C if ring else ppos
        K = torch.cat([past_key[b][:, pslots].to(qb.dtype), kb.transpose(0, 1)], dim=1)  # (Nkv, T, H)
        V = torch.cat([past_value[b][:, pslots].to(qb.dtype), vb.transpose(0, 1)], dim=1)
        kpos = torch.cat([ppos, pos])
        keep = slice(max(0, n_new - C), n_new) if ring else slice(0, n_new)
        slots = (pos % C) if ring else pos
        present_k[b][:, slots[keep]] = kb[keep].transpose(0, 1).to(present_k.dtype)
        present_v[b][:, slots[keep]] = vb[keep].transpose(0, 1).to(present_v.dtype)
        K = K.repeat_interleave(group, dim=0)  # (N, T, H)
        V = V.repeat_interleave(group, dim=0)
        scores = torch.einsum("snh,nth->nst", qb, K).float() * scale
        allowed = kpos[None, :] <= pos[:, None]
        if window > 0:
            allowed &= kpos[None, :] > pos[:, None] - window
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(V.dtype)
        out[b, :n_new] = torch.einsum("nst,nth->snh", probs, V)
    return out.view(B, S, N * H), present_k, present_v


@attention.register_fake
def _(
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
):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


# ---- ONNX ------------------------------------------------------------------------------------------


def onnx_schema() -> defs.OpSchema:
    T = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    F = defs.OpSchema.FormalParameterOption
    A = defs.OpSchema.AttrType
    return defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        OP_VERSION,
        doc="EXAONE 4 attention with in-place KV cache, GQA, optional sliding window and RoPE. See docs/onnx-ops.md.",
        inputs=[
            defs.OpSchema.FormalParameter("query", "T"),
            defs.OpSchema.FormalParameter("key", "T"),
            defs.OpSchema.FormalParameter("value", "T"),
            defs.OpSchema.FormalParameter("past_key", "T"),
            defs.OpSchema.FormalParameter("past_value", "T"),
            defs.OpSchema.FormalParameter("seqlens_k", "M"),
            defs.OpSchema.FormalParameter("total_sequence_length", "M"),
            defs.OpSchema.FormalParameter("cos_cache", "T", param_option=F.Optional),
            defs.OpSchema.FormalParameter("sin_cache", "T", param_option=F.Optional),
        ],
        outputs=[
            defs.OpSchema.FormalParameter("output", "T"),
            defs.OpSchema.FormalParameter("present_key", "T"),
            defs.OpSchema.FormalParameter("present_value", "T"),
        ],
        type_constraints=[("T", T, "float types"), ("M", ["tensor(int32)"], "lengths")],
        attributes=[
            defs.OpSchema.Attribute("num_heads", A.INT, "query heads", required=True),
            defs.OpSchema.Attribute("kv_num_heads", A.INT, "key/value heads", required=True),
            defs.OpSchema.Attribute("scale", A.FLOAT, "softmax scale; 0 means 1/sqrt(head_dim)", required=False),
            defs.OpSchema.Attribute("window", A.INT, "sliding window W (0: global)", required=False),
            defs.OpSchema.Attribute("rotary", A.INT, "1: apply RoPE from cos/sin caches", required=False),
            defs.OpSchema.Attribute("ring", A.INT, "1: cache is a ring buffer (slot = pos % C)", required=False),
        ],
    )


_registered = False


def register_onnx_schema() -> None:
    """Register the op's schema with onnx (needed by the dynamo exporter and onnx.checker)."""
    global _registered
    if _registered:
        return
    try:
        defs.get_schema(OP_TYPE, OP_VERSION, DOMAIN)
    except defs.SchemaError:
        defs.register_schema(onnx_schema())
    _registered = True


def custom_translation_table() -> dict:
    """torch op -> onnxscript function emitting our custom-domain node (for torch.onnx.export)."""
    import onnxscript

    register_onnx_schema()
    op = onnxscript.values.Opset(DOMAIN, OP_VERSION)

    def translate(
        query,
        key,
        value,
        past_key,
        past_value,
        seqlens_k,
        total_sequence_length,
        cos_cache,
        sin_cache,
        num_heads: int,
        kv_num_heads: int,
        scale: float,
        window: int,
        rotary: int,
        ring: int,
    ):
        attrs = dict(
            num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, window=window, rotary=rotary, ring=ring
        )
        if rotary:
            return op.EXAONEAttention(
                query,
                key,
                value,
                past_key,
                past_value,
                seqlens_k,
                total_sequence_length,
                cos_cache,
                sin_cache,
                _outputs=3,
                **attrs,
            )
        return op.EXAONEAttention(
            query, key, value, past_key, past_value, seqlens_k, total_sequence_length, _outputs=3, **attrs
        )

    return {torch.ops.exaone_deploy.attention.default: translate}


def opset_import() -> onnx.OperatorSetIdProto:
    return onnx.helper.make_opsetid(DOMAIN, OP_VERSION)
