"""The one bundle writer: canonical model -> a complete, checked bundle directory, written atomically.

Used as ``with bundle.atomic_dir(out, force=...) as tmp: ...; write_into(tmp, canonical, io, target, ...)``
(the caller stages first, so that a refused or unwritable output fails before any tracing or calibration):

1. saves the canonical model with every initializer in ``weights.data`` (64 KiB-aligned, memory-mappable);
2. reloads it and lowers it with the target's pass list (:mod:`.passes`);
3. saves the lowered model next to it: its weights stay references into ``weights.data``; tensors the passes
   made (the lazily concatenated q/k/v and gate/up weights) are written to ``fused.data``;
4. runs the ONNX checker on both graphs;
5. copies the tokenizer files; for the ``ort`` target writes the onnxruntime-genai variant (``genai.onnx``, a
   second graph over the same weight files, and ``genai_config.json`` with the search defaults of the copied
   ``generation_config.json``: :mod:`exaone_deploy.genai`), so that every ort bundle, exported or quantized,
   is one that ``onnxruntime_genai.Model(bundle_dir)`` loads as written;
6. writes the manifest (``io`` section from ``GraphIO.manifest_io``; ``files.genai``; sha256 of every file);
7. renames the directory into place (an interrupted write leaves nothing).

Export, quantize and sensitivity all write through ``write_into`` (steps 1-6; ``atomic_dir`` does 7);
``tensorrt/builder.py`` has no ONNX to write and uses the shared tail (``bundle.finish_bundle``) inside the same
``atomic_dir``.
Rejected: lowering the in-memory canonical model directly (the reloaded graph references ``weights.data``, so
the lowered model shares the canonical's weights instead of writing a second copy). Two graphs rather than
one for both runtimes: ``model.onnx`` keeps ``logits_index`` (logits at chosen positions: chunked prefill of
ragged rows, ``score``/perplexity/verify over every position), which genai's decoder contract has no input for,
and genai refuses a graph input it does not know; the second graph costs a protobuf, not weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir

from .. import bundle as bundle_mod
from .. import genai
from ..graph_io import GraphIO
from . import lower

log = logging.getLogger(__name__)

__all__ = ["write_into", "save_lowered", "WEIGHTS_FILE", "CANONICAL_FILE", "MODEL_FILE", "FUSED_FILE", "ALIGNMENT"]

WEIGHTS_FILE = "weights.data"
CANONICAL_FILE = "canonical.onnx"
MODEL_FILE = "model.onnx"
FUSED_FILE = "fused.data"
ALIGNMENT = 65536  # aligned external data lets ONNX Runtime memory-map the weights


def save_lowered(model: ir.Model, path: Path) -> None:
    """Save a lowered model: initializers the passes created as lazy tensors go to ``FUSED_FILE`` beside it
    (in graph order, aligned); every other initializer keeps its place (references into the canonical's
    weights file, small tensors inline)."""
    made = [v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.LazyTensor)]
    if made:
        external = ir.external_data.convert_tensors_to_external(
            [v.const_value for v in made], base_dir=path.parent, relative_path=FUSED_FILE, alignment=ALIGNMENT
        )
        for v, t in zip(made, external):
            v.const_value = t
    ir.save(model, path)


def write_into(
    root: Path,
    canonical: ir.Model,
    io: GraphIO,
    target: str,
    *,
    source_dir: Path,
    tokenizer_dirs: tuple[Path, ...] = (),
    extra: dict[str, Any] | None = None,
    check: bool = True,
    on_stage: Callable[[str], None] | None = None,
    on_tensor: Callable | None = None,
) -> dict[str, Any]:
    """Write a complete bundle into the (staging) directory ``root``. Returns the manifest's data.

    ``on_stage(name)`` is called as each step starts (``write weights``, ``lower``, ``check``, ``manifest``);
    ``on_tensor`` once per initializer saved (progress bars).
    """
    stage = on_stage or (lambda name: None)
    stage("write weights")
    ir.save(canonical, root / CANONICAL_FILE, external_data=WEIGHTS_FILE, alignment=ALIGNMENT, callback=on_tensor)
    stage(f"lower ({target})")
    lowered = lower.lower(ir.load(root / CANONICAL_FILE), io.spec, target, io=io, fuse_linears=True)
    save_lowered(lowered, root / MODEL_FILE)
    del lowered
    stage("check")
    if check:
        lower.check_model(root / CANONICAL_FILE)
        lower.check_model(root / MODEL_FILE)
    stage("manifest")

    def genai_variant(root: Path) -> dict[str, str]:
        try:
            genai.write_genai_variant(
                root, io.spec, max_seq_len=io.max_seq_len, window_cache=io.window_cache, model_file=MODEL_FILE
            )
        except genai.GenaiError as e:
            log.warning("%s: written without the onnxruntime-genai variant (%s)", root, e)
            return {}
        if check:
            lower.check_model(root / genai.GENAI_FILE)
        return {"genai": genai.GENAI_FILE}

    return bundle_mod.finish_bundle(
        root,
        io,
        target=target,
        model_file=MODEL_FILE,
        canonical_file=CANONICAL_FILE,
        weights_file=WEIGHTS_FILE,
        source_dir=source_dir,
        tokenizer_dirs=tokenizer_dirs,
        extra=extra,
        before_manifest=genai_variant if target == "ort" and io.spec.head.is_lm else None,
    )
