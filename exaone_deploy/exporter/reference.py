"""The PyTorch reference model of EXAONE 4: everything about the model in one place.

Export-friendly: explicit KV-cache tensors in and out (no cache objects), per-row lengths, and all
attention through one seam, ``torch.ops.exaone_deploy.attention`` (exporter/ops.py), which the exporter
traces into a custom ONNX node. Parameter names match transformers' checkpoints, so a state dict loads
as is.

Forward contract (also the canonical ONNX graph's; see docs/bundle.md):

    logits, *presents = model(input_ids, seqlens_k, total_sequence_length, logits_index, *pasts)

* ``input_ids`` int64 (B, S). In a prompt step (``total_sequence_length == S``) rows are right-padded
  and start with empty caches; otherwise all S tokens of every row are real.
* ``seqlens_k`` int32 (B): tokens in the row after this step, minus one.
* ``total_sequence_length`` int32 scalar: max over rows of ``seqlens_k + 1``.
* ``logits_index`` int64 (B, K): positions in the chunk whose logits to return (K=1: the last token).
* ``pasts``: per layer key then value cache buffers (B, Nkv, C, H); ``presents`` likewise, updated.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..spec import ModelSpec, load_spec
from . import ops  # noqa: F401  (registers torch.ops.exaone_deploy.attention)

__all__ = ["DTYPES", "Exaone4Reference", "load_reference", "load_weights"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Linear(nn.Module):
    """y = x @ W^T with W stored (out, in), as in the checkpoint (no bias in EXAONE 4)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.t())


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        d, hd = spec.hidden_size, spec.head_dim
        self.spec, self.layer = spec, spec.layers[layer]
        self.q_proj = Linear(d, spec.q_size)
        self.k_proj = Linear(d, spec.kv_size)
        self.v_proj = Linear(d, spec.kv_size)
        self.o_proj = Linear(spec.q_size, d)
        self.q_norm = RMSNorm(hd, spec.rms_norm_eps)
        self.k_norm = RMSNorm(hd, spec.rms_norm_eps)

    def forward(self, x, seqlens_k, total_len, past_k, past_v, cos, sin):
        spec, B, S = self.spec, x.shape[0], x.shape[1]
        # q/k RMS-normalised per head right after projection; RoPE (if any) happens inside the op.
        q = self.q_norm(self.q_proj(x).view(B, S, spec.num_heads, spec.head_dim)).view(B, S, spec.q_size)
        k = self.k_norm(self.k_proj(x).view(B, S, spec.num_kv_heads, spec.head_dim)).view(B, S, spec.kv_size)
        v = self.v_proj(x)
        rope = self.layer.rope
        out, pk, pv = torch.ops.exaone_deploy.attention(
            q,
            k,
            v,
            past_k,
            past_v,
            seqlens_k,
            total_len,
            cos if rope else None,
            sin if rope else None,
            spec.num_heads,
            spec.num_kv_heads,
            0.0,
            self.layer.window,
            int(rope),
            0,
        )
        return self.o_proj(out), pk, pv


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_proj = Linear(spec.hidden_size, spec.intermediate_size)
        self.up_proj = Linear(spec.hidden_size, spec.intermediate_size)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.self_attn = Attention(spec, layer)
        self.mlp = MLP(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, h, seqlens_k, total_len, past_k, past_v, cos, sin):
        # Post-norm ("QK-Reorder-Norm"): no pre-norm; the sublayer outputs are normalised.
        a, pk, pv = self.self_attn(h, seqlens_k, total_len, past_k, past_v, cos, sin)
        h = h + self.post_attention_layernorm(a)
        h = h + self.post_feedforward_layernorm(self.mlp(h))
        return h, pk, pv


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, input_ids, seqlens_k, total_sequence_length, pasts, cos, sin):
        """Hidden states before the final norm (B, S, d), and the updated caches."""
        h = self.embed_tokens(input_ids)
        presents = []
        for i, layer in enumerate(self.layers):
            h, pk, pv = layer(h, seqlens_k, total_sequence_length, pasts[2 * i], pasts[2 * i + 1], cos, sin)
            presents += [pk, pv]
        return h, presents


class Exaone4Reference(nn.Module):
    def __init__(self, spec: ModelSpec, max_positions: int | None = None):
        super().__init__()
        self.spec = spec
        self.model = Backbone(spec)
        if not spec.tie_word_embeddings:
            self.lm_head = Linear(spec.hidden_size, spec.vocab_size)
        self.max_positions = max_positions or spec.max_position_embeddings
        cos, sin = spec.rope.cos_sin(spec.head_dim, self.max_positions)
        self.register_buffer("cos_cache", torch.from_numpy(cos), persistent=False)
        self.register_buffer("sin_cache", torch.from_numpy(sin), persistent=False)

    @property
    def lm_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.spec.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids, seqlens_k, total_sequence_length, logits_index, *pasts):
        spec = self.spec
        dtype = self.model.embed_tokens.weight.dtype
        cos, sin = self.cos_cache.to(dtype), self.sin_cache.to(dtype)  # transformers casts cos/sin to x.dtype
        h, presents = self.model(input_ids, seqlens_k, total_sequence_length, pasts, cos, sin)
        idx = logits_index.unsqueeze(-1).expand(-1, -1, spec.hidden_size)
        h = torch.gather(h, 1, idx)
        h = self.model.norm(h)
        logits = torch.matmul(h, self.lm_weight.t()).float()
        return (logits, *presents)

    # ---- conveniences for tests and tools ------------------------------------------------------
    def empty_cache(self, batch: int, capacity: int) -> list[torch.Tensor]:
        spec, p = self.spec, self.model.embed_tokens.weight
        shape = (batch, spec.num_kv_heads, capacity, spec.head_dim)
        return [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(2 * spec.num_layers)]

    @torch.no_grad()
    def step(self, input_ids, past_lens, caches, all_logits=True):
        """Run a chunk whose rows all hold ``past_lens[b]`` tokens already (all tokens real).

        Returns (logits (B, S or 1, V), new caches). With all past_lens 0 this is a prompt step.
        """
        B, S = input_ids.shape
        past_lens = torch.as_tensor(past_lens, dtype=torch.int32)
        seqlens = past_lens + S - 1
        total = torch.tensor(int(seqlens.max()) + 1, dtype=torch.int32)
        idx = torch.arange(S).expand(B, S) if all_logits else torch.full((B, 1), S - 1)
        logits, *caches = self(input_ids, seqlens, total, idx, *caches)
        return logits, caches

    @torch.no_grad()
    def forward_padded(self, input_ids, attention_mask, capacity: int | None = None):
        """transformers-style prompt forward: left-padded ``input_ids`` with an ``attention_mask``.

        Rows are re-packed to the right-padded prompt layout of the op and results mapped back, so the
        logits at padded positions are zero. Returns (logits (B, S, V), caches, lengths).
        """
        B, S = input_ids.shape
        mask = attention_mask.bool()
        lengths = mask.sum(1)
        packed = torch.zeros_like(input_ids)
        for b in range(B):
            packed[b, : lengths[b]] = input_ids[b][mask[b]]
        seqlens = (lengths - 1).to(torch.int32)
        caches = self.empty_cache(B, capacity or S)
        idx = torch.arange(S).expand(B, S)
        logits, *caches = self(packed, seqlens, torch.tensor(S, dtype=torch.int32), idx, *caches)
        out = torch.zeros_like(logits)
        for b in range(B):
            out[b][mask[b]] = logits[b, : lengths[b]]
        return out, caches, lengths


def load_reference(
    model_dir: str | Path, dtype: str = "float32", max_positions: int | None = None, device: str = "cpu"
) -> Exaone4Reference:
    """Build the reference model and load a checkpoint into it (validated; one tensor at a time).

    The module is built on the meta device and each parameter is replaced by the tensor read from the
    checkpoint, so peak memory is the weights in ``dtype`` plus one tensor in flight.
    """
    ckpt = Checkpoint(model_dir)
    spec = load_spec(ckpt.dir)
    if not spec.head.is_lm:
        raise ValueError(f"{ckpt.dir}: a {spec.head.task} checkpoint; load it with exporter.heads.load_head_reference")
    with torch.device("meta"):
        model = Exaone4Reference(spec, max_positions)
    return load_weights(model, ckpt, dtype, device)


def load_weights(model: nn.Module, ckpt: Checkpoint, dtype: str = "float32", device: str = "cpu") -> nn.Module:
    """Validate ``ckpt`` against ``model.spec`` and fill the meta-device ``model``'s parameters by name.

    A pre-quantized checkpoint's quantized linears are dequantized (``prequant``: exact in float32, rounded once
    to ``dtype``), one at a time: the reference of such a checkpoint is the float model its publisher's values
    define, which is what ``verify`` compares a bundle against.
    """
    spec = model.spec
    ckpt.validate(spec)
    torch_dtype = DTYPES[dtype]
    read = _reader(ckpt, torch_dtype)
    for name, _ in list(model.named_parameters()):
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._parameters[attr] = nn.Parameter(read(name).to(device), requires_grad=False)
    cos, sin = spec.rope.cos_sin(spec.head_dim, model.max_positions)
    model.cos_cache = torch.from_numpy(cos).to(device)
    model.sin_cache = torch.from_numpy(sin).to(device)
    return model.eval()


def _reader(ckpt: Checkpoint, torch_dtype):
    """name -> tensor in ``torch_dtype``: read from the checkpoint, or dequantized when it is a quantized linear's
    ``weight`` the checkpoint stores packed."""
    if ckpt.scheme is None:
        return lambda name: ckpt.read_torch(name, torch_dtype)
    from ..prequant import read_linear
    from ..prequant.st import SafetensorsDir

    st = SafetensorsDir(ckpt.dir)

    def read(name: str) -> torch.Tensor:
        if not ckpt.is_quantized(name):
            return ckpt.read_torch(name, torch_dtype)
        weight = read_linear(st.__getitem__, name.rpartition(".")[0], ckpt.scheme).dequantize()
        return torch.from_numpy(weight).to(torch_dtype)

    return read
