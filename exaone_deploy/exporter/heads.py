"""Reference models of EXAONE 4's task heads: the causal LM's decoder with a classifier or span head on top.

transformers defines three head classes on the EXAONE 4 backbone (``modeling_exaone4`` +
``modeling_layers.Generic*``); this module mirrors them, parameter names included, so their checkpoints load
as is (names and shapes: ``checkpoint.expected_tensors``, rules: ``spec.HeadSpec``):

* sequence classification: ``score`` (no bias) on the final hidden state of the last non-pad token of each
  row. transformers finds it as the rightmost position whose id is not ``pad_token_id`` (``argmax`` of
  ``position * (id != pad)``, so 0 for a row of pads); we do the same within the row's length, which is the
  same thing when rows are padded with the pad id and stays right when they are padded with anything else.
  Without a pad id the last real token (transformers refuses batches then; a single row agrees).
* token classification: ``score`` (with bias) on every position; dropout is the identity at inference.
* question answering: ``qa_outputs`` (2 outputs, with bias) on every position, split into start and end
  logits; the backbone is ``transformer.`` (not ``model.``).

Graph contract (prompt-only, no KV cache in or out; names in ``graph_io.HeadIO``; traced by
:func:`trace_head_canonical`):

* inputs: ``input_ids`` int64 (batch, sequence), rows right-padded; ``attention_lengths`` int32 (batch,),
  the real tokens of each row (1..sequence).
* outputs, float32: ``logits`` (batch, num_labels) for sequence classification, ``logits`` (batch, sequence,
  num_labels) for token classification, ``start_logits`` and ``end_logits`` (batch, sequence) for QA. Values at
  positions at or past a row's length are unspecified.

Lengths rather than an attention mask: the attention op expresses right padding by per-row lengths
(``seqlens_k``) and nothing else, so a mask would promise holes and left padding the graph cannot honour. The
decoder runs as the causal LM's prompt step with caches of the chunk's own length, made inside the graph.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..spec import ModelSpec, load_spec
from .reference import Backbone, load_weights

__all__ = ["Exaone4HeadReference", "load_head_reference", "trace_head_canonical"]


class Exaone4HeadReference(nn.Module):
    """``forward(input_ids, attention_lengths)`` -> the task's logits (a tuple of two for QA)."""

    def __init__(self, spec: ModelSpec, max_positions: int | None = None):
        super().__init__()
        head = spec.head
        if head.is_lm:
            raise ValueError("Exaone4HeadReference needs a task head; the causal LM is exporter.reference's")
        self.spec = spec
        setattr(self, head.prefix, Backbone(spec))
        if head.task == "question-answering":
            self.qa_outputs = nn.Linear(spec.hidden_size, 2)
        else:
            self.score = nn.Linear(spec.hidden_size, head.num_labels, bias=head.bias)
        self.max_positions = max_positions or spec.max_position_embeddings
        cos, sin = spec.rope.cos_sin(spec.head_dim, self.max_positions)
        self.register_buffer("cos_cache", torch.from_numpy(cos), persistent=False)
        self.register_buffer("sin_cache", torch.from_numpy(sin), persistent=False)

    @property
    def backbone(self) -> Backbone:
        return getattr(self, self.spec.head.prefix)

    def hidden_states(self, input_ids: torch.Tensor, attention_lengths: torch.Tensor) -> torch.Tensor:
        """Normalised final hidden states (B, S, d) of a right-padded prompt."""
        spec, backbone = self.spec, self.backbone
        B, S = input_ids.shape
        dtype = backbone.embed_tokens.weight.dtype
        seqlens_k = (attention_lengths - 1).to(torch.int32)
        total = torch.full((), S, dtype=torch.int32)
        shape = (B, spec.num_kv_heads, S, spec.head_dim)
        pasts = [torch.zeros(shape, dtype=dtype, device=input_ids.device) for _ in range(2 * spec.num_layers)]
        cos, sin = self.cos_cache.to(dtype), self.sin_cache.to(dtype)
        h, _ = backbone(input_ids, seqlens_k, total, pasts, cos, sin)
        return backbone.norm(h)

    def pool_index(self, input_ids: torch.Tensor, attention_lengths: torch.Tensor) -> torch.Tensor:
        """(B,) the position a sequence classifier reads: the last non-pad token within each row's length."""
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        real = pos[None, :] < attention_lengths[:, None].to(pos.dtype)
        pad = self.spec.head.pad_token_id
        if pad is not None:
            real = real & (input_ids != pad)
        return (pos[None, :] * real).argmax(-1)

    def forward(self, input_ids: torch.Tensor, attention_lengths: torch.Tensor):
        task = self.spec.head.task
        h = self.hidden_states(input_ids, attention_lengths)
        if task == "sequence-classification":
            idx = self.pool_index(input_ids, attention_lengths)
            h = h[torch.arange(h.shape[0], device=h.device), idx]
            return self.score(h).float()
        if task == "token-classification":
            return self.score(h).float()
        start, end = self.qa_outputs(h).float().unbind(-1)
        return start, end


def load_head_reference(
    model_dir: str | Path, dtype: str = "float32", max_positions: int | None = None, device: str = "cpu"
) -> Exaone4HeadReference:
    """Build a head reference model and load (validated) its checkpoint, one tensor at a time."""
    ckpt = Checkpoint(model_dir)
    spec = load_spec(ckpt.dir)
    if spec.head.is_lm:
        raise ValueError(f"{ckpt.dir}: a causal LM checkpoint (architectures); load it with load_reference")
    with torch.device("meta"):
        model = Exaone4HeadReference(spec, max_positions)
    return load_weights(model, ckpt, dtype, device)


def trace_head_canonical(spec: ModelSpec, dtype: str, max_positions: int, opset: int = 21):
    """Trace the head reference on the meta device into the canonical ONNX graph (no weights; ``HeadIO`` names).

    The zero caches each attention node reads are made inside the graph; they are renamed with the decoder's
    past-key names (``GraphIO.past_name``, layer by layer in graph order) so that the lowering passes find each
    node's layer as they do in the causal LM's graph.
    """
    from ..graph_io import GraphIO, HeadIO
    from . import ops
    from .export import _name_dims, export_traced, meta_model

    model = meta_model(Exaone4HeadReference, spec, dtype, max_positions)
    args = (torch.empty(2, 7, dtype=torch.long, device="meta"), torch.empty(2, dtype=torch.int32, device="meta"))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    io = HeadIO(spec, dtype, max_positions)
    m = export_traced(model, args, ({0: batch, 1: seq}, {0: batch}), io, opset)
    attention = [n for n in m.graph if n.domain == ops.DOMAIN and n.op_type == ops.OP_TYPE]
    if len(attention) != spec.num_layers:
        raise RuntimeError(f"traced {len(attention)} attention nodes for {spec.num_layers} layers")
    for i, node in enumerate(attention):
        for k, kv in ((3, "key"), (4, "value")):
            node.inputs[k].name = GraphIO.past_name(i, kv)
            node.outputs[k - 2].name = GraphIO.present_name(i, kv)
    _name_dims(m, io)
    return m
