"""A bundle that onnxruntime-genai loads as it is: a second decoder graph over the same weights, and its config.

The bundle writer (``exporter/writer.py``) calls :func:`write_genai_variant` for every ``ort`` bundle, exported or
quantized, before the manifest is written (``files.genai``, hashed); :func:`add_genai_variant` adds it to a bundle
written before that. Users: docs/runtimes.md.

onnxruntime-genai (``og.Model(bundle_dir)``, its C/C++/C#/Java APIs) runs a decoder whose contract is fixed by
its model builder (``src/python/py/models/builders/base.py``) and its runtime (``src/models/*.cpp``):

* inputs ``input_ids`` (batch, sequence) and ``attention_mask`` (batch, total_length), both int64 here (genai
  feeds the dtype the graph declares), prompt rows right-padded with ``pad_token_id`` (``generators.cpp``);
  a GroupQueryAttention graph derives ``seqlens_k = ReduceSum(mask) - 1`` (int32) and
  ``total_sequence_length = Shape(mask)[1]`` (int32) inside the graph
  (``make_attention_mask_reformatting_for_gqa``);
* caches: our past/present names as ``%d`` templates (``GraphIO.past_name("%d", kv)``; names are templates in
  ``genai_config.json``), bound to one buffer when ``search.past_present_share_buffer`` is true
  (``kv_cache.cpp``: full layers get ``max_length`` positions, the layers listed in
  ``decoder.sliding_window.layers`` get ``window_size + cache_slack`` positions, the slack being 16 on CPU and 0
  on CUDA by default: ``windowed_kv_cache.cpp``) and GroupQueryAttention evicting with ``sliding_window_cache=1``,
  exactly what our ort lowering emits;
* ``logits`` (batch, sequence, vocab), or (batch, 1, vocab) with a *static* 1, which genai takes as "pruned"
  logits of the last position of each row (``Model::IsPruned``, ``logits.cpp``).

So the variant differs from our ``model.onnx`` (docs/bundle.md) in three places only, each an onnx-ir pass:
:class:`AttentionMaskInputs` (``attention_mask`` replaces ``seqlens_k``, ``total_sequence_length`` and
``logits_index``; logits of each row's last real token), and :class:`SymbolicWindowCaches` (the window-sized
sliding caches get a symbolic length, because genai allocates ``W + slack``; GroupQueryAttention keeps the last
W keys of a longer buffer). Nothing else changes: the same nodes read the same initializers, which stay in
``weights.data`` (and ``fused.data``): saving an onnx-ir model without ``external_data`` keeps every external
tensor's location, so the second graph costs its own protobuf only (kilobytes).

Alternatives rejected: one graph for both runtimes (ours needs ``logits_index`` for chunked prefill and verify;
genai refuses inputs it does not know); full-length caches on sliding layers (genai >= 0.18 allocates windowed
caches per layer, so the variant keeps our memory footprint: the full-length cost is reported by
:func:`cache_bytes` for runtimes that cannot); genai's own model builder (it has no EXAONE 4 support and would
write a second copy of the weights).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from .errors import ExaoneDeployError
from .graph_io import GraphIO
from .spec import ModelSpec

log = logging.getLogger(__name__)

__all__ = [
    "GENAI_CONFIG",
    "GENAI_FILE",
    "MODEL_TYPE",
    "GenaiError",
    "AttentionMaskInputs",
    "SymbolicWindowCaches",
    "add_genai_variant",
    "cache_bytes",
    "genai_config",
    "lower_for_genai",
    "write_genai_variant",
]

GENAI_FILE = "genai.onnx"
GENAI_CONFIG = "genai_config.json"
MODEL_TYPE = "decoder"  # genai's generic decoder-only LLM type (ModelType::IsLLM); it has no "exaone4"
ATTENTION_MASK = "attention_mask"
SLIDING_CACHE_LEN = "sliding_cache_len"
_SEARCH_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


class GenaiError(ExaoneDeployError, ValueError):
    """A model that genai's config cannot describe (no eos id; several sliding window sizes). The bundle writer
    then writes the bundle without the variant and says why in a warning: our runtime does not need it."""


def _const(tape: ir.tape.Tape, name: str, values: list[int]) -> ir.Value:
    return tape.initializer(ir.tensor(np.array(values, dtype=np.int64), name=f"genai/{name}"))


class AttentionMaskInputs(ir.passes.InPlacePass):
    """``seqlens_k``, ``total_sequence_length`` and ``logits_index`` computed from an ``attention_mask`` input.

    * ``seqlens_k = int32(ReduceSum(mask, 1) - 1)``, ``total_sequence_length = int32(Shape(mask)[1])``: genai's
      own GroupQueryAttention graphs (right-padded prompts, a mask column per cached position);
    * ``logits_index = ReduceSum(mask[:, -sequence:], 1) - 1``: the last real token of the chunk in every row
      (a right-padded prompt row's last token; the one token of a decode step), and ``logits`` gets a static 1
      in its second dim so genai reads it as last-token ("pruned") logits.

    A graph that already has ``attention_mask``, or lacks any of the three inputs, is left unchanged.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        inputs = {v.name: v for v in g.inputs}
        old = [inputs.get(n) for n in ("seqlens_k", "total_sequence_length", "logits_index")]
        if ATTENTION_MASK in inputs or "input_ids" not in inputs or any(v is None for v in old):
            return ir.passes.PassResult(model, modified=False)
        batch = inputs["input_ids"].shape[0] if inputs["input_ids"].shape is not None else "batch"
        mask = ir.Value(
            name=ATTENTION_MASK, shape=ir.Shape([batch, "total_sequence_length"]), type=ir.TensorType(ir.DataType.INT64)
        )
        tape = ir.tape.Tape()
        one, axis1 = _const(tape, "one", [1]), _const(tape, "axis1", [1])
        seqlens = tape.op(
            "Cast",
            [tape.op("Sub", [tape.op("ReduceSum", [mask, axis1], {"keepdims": 0}), one])],
            {"to": ir.DataType.INT32},
        )
        total = tape.op(
            "Cast", [tape.op("Squeeze", [tape.op("Shape", [mask], {"start": 1, "end": 2})])], {"to": ir.DataType.INT32}
        )
        seq = tape.op("Shape", [inputs["input_ids"]], {"start": 1, "end": 2})
        chunk = tape.op("Slice", [mask, tape.op("Neg", [seq]), _const(tape, "end", [np.iinfo(np.int64).max]), axis1])
        index = tape.op("Sub", [tape.op("ReduceSum", [chunk, axis1], {"keepdims": 1}), one])
        for value, new, shape in zip(old, (seqlens, total, index), ([batch], [], [batch, 1])):
            new.name, new.shape, new.type = f"genai/{value.name}", ir.Shape(shape), value.type
            value.replace_all_uses_with(new)
        for v in old:
            g.inputs.remove(v)
        g.inputs.insert(1, mask)
        for init in tape.initializers:
            g.register_initializer(init)
        first = next(iter(g), None)
        if first is None:
            g.extend(tape.nodes)
        else:
            g.insert_before(first, tape.nodes)
        for out in g.outputs:
            if out.name == "logits" and out.shape is not None:
                out.shape = ir.Shape([out.shape[0], 1, *list(out.shape)[2:]])
        return ir.passes.PassResult(model, modified=True)


class SymbolicWindowCaches(ir.passes.InPlacePass):
    """Cache inputs/outputs with a fixed length (window-sized sliding caches) get the symbolic length
    ``sliding_cache_len``: genai sizes them ``window + cache_slack`` (16 on CPU), and the GroupQueryAttention
    of a sliding layer (``sliding_window_cache=1``) keeps the last W keys of any longer buffer."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for v in [*model.graph.inputs, *model.graph.outputs]:
            if GraphIO.is_cache(v.name) and v.shape is not None and isinstance(v.shape[2], int):
                dims = list(v.shape)
                dims[2] = SLIDING_CACHE_LEN
                v.shape = ir.Shape(dims)
                modified = True
        return ir.passes.PassResult(model, modified=modified)


def lower_for_genai(model: ir.Model) -> ir.Model:
    """Our lowered ort decoder graph (exporter/lower.py) rewritten in place into genai's input contract."""
    ir.passes.PassManager([AttentionMaskInputs(), SymbolicWindowCaches()])(model)
    return model


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def genai_config(
    spec: ModelSpec,
    *,
    max_seq_len: int,
    window_cache: bool,
    filename: str = GENAI_FILE,
    generation_config: dict[str, Any] | None = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """``genai_config.json`` for the variant graph (schema: genai's ``src/config.h``, as its builder writes it).

    ``context_length`` is the bundle's ``max_seq_len`` (its RoPE tables end there); ``search.max_length``, the
    positions genai allocates up front for every global layer's cache, defaults to it as genai's builder does
    (applications lower it with ``set_search_options(max_length=...)``); eos/bos/pad and the search defaults come
    from ``generation_config.json`` over ``config.json``.
    """
    gen = generation_config or {}
    eos = _ids(gen.get("eos_token_id")) or list(spec.eos_token_id)
    if not eos:
        raise GenaiError("genai_config: no eos_token_id in generation_config.json or config.json")
    pad = gen.get("pad_token_id", spec.pad_token_id)
    bos = gen.get("bos_token_id", spec.bos_token_id)
    decoder: dict[str, Any] = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename,
        "head_size": spec.head_dim,
        "hidden_size": spec.hidden_size,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "num_hidden_layers": spec.num_layers,
        "inputs": {
            "input_ids": "input_ids",
            ATTENTION_MASK: ATTENTION_MASK,
            "past_key_names": GraphIO.past_name("%d", "key"),
            "past_value_names": GraphIO.past_name("%d", "value"),
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": GraphIO.present_name("%d", "key"),
            "present_value_names": GraphIO.present_name("%d", "value"),
        },
    }
    sliding = [layer for layer in spec.layers if layer.sliding]
    if window_cache and sliding:
        windows = {layer.window for layer in sliding}
        if len(windows) != 1:
            raise GenaiError(f"genai_config: genai has one sliding window size, the model has {sorted(windows)}")
        decoder["sliding_window"] = {
            "window_size": windows.pop(),
            "slide_key_value_cache": False,
            "slide_inputs": False,
            "layers": [layer.index for layer in sliding],
            "cache_slack": 0,
        }
    search = {
        "do_sample": False,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        **{k: gen[k] for k in _SEARCH_KEYS if gen.get(k) is not None},
    }
    search.update(
        {
            "max_length": min(max_length or max_seq_len, max_seq_len),
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "early_stopping": True,
            "length_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
        }
    )
    return {
        "model": {
            "type": MODEL_TYPE,
            "context_length": max_seq_len,
            "vocab_size": spec.vocab_size,
            "bos_token_id": int(bos) if bos is not None else eos[0],
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": int(pad) if pad is not None else eos[0],
            "decoder": decoder,
        },
        "search": search,
    }


def write_genai_variant(
    bundle_dir: str | Path, spec: ModelSpec, *, max_seq_len: int, window_cache: bool, model_file: str = "model.onnx"
) -> list[str]:
    """Write ``genai.onnx`` (from ``model_file``, sharing its external weight files) and ``genai_config.json``
    into ``bundle_dir``. Returns the names written. Call it before the manifest is written (the manifest then
    hashes them), or use :func:`add_genai_variant` on a finished bundle.

    genai's tokenizer reads ``tokenizer.json`` and ``tokenizer_config.json`` next to ``genai_config.json``; the
    bundle already holds both (copied from the checkpoint).
    """
    root = Path(bundle_dir)
    model = lower_for_genai(ir.load(root / model_file))
    shared = sorted(
        {
            t.const_value.location
            for t in model.graph.initializers.values()
            if isinstance(t.const_value, ir.ExternalTensor)
        }
    )
    ir.save(model, root / GENAI_FILE)
    log.info("%s: %s written over %s", root, GENAI_FILE, ", ".join(shared) or "inline weights")
    gen_path = root / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else None
    cfg = genai_config(spec, max_seq_len=max_seq_len, window_cache=window_cache, generation_config=gen)
    (root / GENAI_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (root / name).exists():
            log.warning("%s: no %s; onnxruntime-genai's tokenizer will not load (token ids still work)", root, name)
    return [GENAI_FILE, GENAI_CONFIG]


def add_genai_variant(bundle_dir: str | Path) -> list[str]:
    """Add the genai variant to a finished ort bundle (one written before the bundle writer wrote it), and record
    its files (sha256) in ``manifest.json``."""
    from .bundle import MANIFEST, BundleError, load_manifest, sha256_file

    manifest = load_manifest(bundle_dir)
    if manifest.target != "ort":
        raise BundleError(f"{manifest.root}: a {manifest.target} bundle; onnxruntime-genai runs ort bundles only")
    io = manifest.io
    names = write_genai_variant(
        manifest.root,
        manifest.spec,
        max_seq_len=manifest.max_seq_len,
        window_cache=io.window_cache,
        model_file=manifest.model_path.name,
    )
    data = manifest.data
    data["files"]["genai"] = GENAI_FILE
    data["sha256"].update({n: sha256_file(manifest.root / n) for n in names})
    tmp = manifest.root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, manifest.root / MANIFEST)
    return names


def cache_bytes(
    spec: ModelSpec,
    *,
    max_length: int,
    batch: int = 1,
    bytes_per_elem: int = 4,
    window_cache: bool = True,
    slack: int = 16,
) -> int:
    """KV-cache bytes genai allocates for the variant: ``max_length`` positions on global layers, and on
    sliding layers ``min(window + slack, max_length)`` with windowed caches or ``max_length`` without."""
    total = 0
    for layer in spec.layers:
        n = min(layer.window + slack, max_length) if (window_cache and layer.sliding) else max_length
        total += 2 * batch * spec.num_kv_heads * n * spec.head_dim * bytes_per_elem
    return total
