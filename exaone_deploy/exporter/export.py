"""Checkpoint -> canonical ONNX -> target ONNX, written as a self-contained bundle.

The reference model is traced on the *meta* device (no weights in memory), with the attention custom
op exported as an ``ai.exaone_deploy::EXAONEAttention`` node. The traced graph's initializers are then
bound to lazy tensors that read (and convert, and transpose) one checkpoint tensor at a time while the
external-data file is written, so exporting a 32B checkpoint needs about one layer's weights of memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor

from .. import bundle as bundle_mod
from ..checkpoint import Checkpoint, CheckpointError, resolve_model_dir
from ..errors import ExaoneDeployError
from ..graph_io import GraphIO, graph_io_of
from ..spec import ModelSpec, load_spec
from . import heads, lower, ops, writer  # noqa: F401 (lower: tests patch export.lower.check_model)
from .reference import DTYPES, Exaone4Reference
from .writer import ALIGNMENT, CANONICAL_FILE, MODEL_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

__all__ = [
    "ExportError",
    "ExportOptions",
    "export_bundle",
    "check_kv_cache",
    "ort_int8_kv_cache_support",
    "trace_canonical",
    "graph_io",
    "transposed_name",
    "untransposed_name",
    "WEIGHTS_FILE",
    "CANONICAL_FILE",
    "MODEL_FILE",
    "ALIGNMENT",
]

TARGETS = ("ort", "trt")
TRANSPOSED = ".T"  # suffix of a pre-transposed weight: W^T of checkpoint tensor W, shape [in, out]


def transposed_name(name: str) -> str:
    """The initializer name of checkpoint tensor ``name`` written transposed (``x @ W.t()`` -> ``x @ W^T``)."""
    return name + TRANSPOSED


def untransposed_name(name: str) -> str | None:
    """The checkpoint tensor a pre-transposed initializer holds (None for any other name)."""
    return name[: -len(TRANSPOSED)] if name.endswith(TRANSPOSED) else None


class ExportError(ExaoneDeployError, RuntimeError):
    pass


@dataclass(frozen=True)
class ExportOptions:
    target: str = "ort"
    dtype: str = "float32"
    max_seq_len: int | None = None  # positions covered by the RoPE caches (default: max_position_embeddings)
    window_cache: bool = True  # ort: window-sized KV caches on sliding layers
    opset: int = 21
    # Pre-quantized int4/int8 checkpoints on ort: MatMulNBits' accuracy_level (0: float activations, exactly the
    # checkpoint's dequantized model; 4: int8 activations with integer dot products, faster on CPU).
    accuracy_level: int = 0
    kv_cache: str = "float"  # "float" (the bundle dtype) or "int8" (ort: GroupQueryAttention's quantized cache)

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise ExportError(f"unknown target {self.target!r} (choose from {', '.join(TARGETS)})")
        if self.dtype not in DTYPES:
            raise ExportError(f"unsupported dtype {self.dtype!r} (choose from {', '.join(DTYPES)})")
        if self.max_seq_len is not None and self.max_seq_len <= 0:
            raise ExportError(f"max_seq_len must be positive, got {self.max_seq_len}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ExportError(f"accuracy_level must be 0-4 (MatMulNBits), got {self.accuracy_level}")
        check_kv_cache(self.kv_cache, self.target, ExportError)


STATIC_KV_SCALES = "static: K bounded by the k_norm weights, V estimated from the weights (no data)"


def ort_int8_kv_cache_support() -> str | None:
    """None when the installed onnxruntime's GroupQueryAttention keeps an INT8 cache, else why not (feature
    detection on the op schema: the attribute ``kv_cache_bit_width`` and the ``k_scale``/``v_scale`` inputs)."""
    try:
        import onnxruntime
        from onnxruntime.capi import onnxruntime_pybind11_state as C
    except ImportError:
        return "onnxruntime is not installed"
    for schema in C.get_all_operator_schema():
        if schema.name == "GroupQueryAttention" and schema.domain == "com.microsoft":
            if "kv_cache_bit_width" in schema.attributes and any(i.name == "k_scale" for i in schema.inputs):
                return None
            break
    return f"onnxruntime {onnxruntime.__version__}'s GroupQueryAttention has no INT8 KV cache (1.32 has)"


def check_kv_cache(kv_cache: str, target: str, error: type[ExaoneDeployError]) -> None:
    """Refuse a KV cache type the target cannot run, with one line (export and quantize options)."""
    from ..graph_io import KV_CACHE_TYPES

    if kv_cache not in KV_CACHE_TYPES:
        raise error(f"unknown --kv-cache {kv_cache!r} (choose from {', '.join(KV_CACHE_TYPES)})")
    if kv_cache == "float":
        return
    if target != "ort":
        raise error(
            f"--kv-cache {kv_cache} is for the ort target only (the TensorRT attention plugin keeps a float cache)"
        )
    why = ort_int8_kv_cache_support()
    if why is not None:
        raise error(f"--kv-cache {kv_cache} needs ONNX Runtime's INT8 GroupQueryAttention cache: {why}")


def graph_io(spec: ModelSpec, options: ExportOptions, max_seq_len: int | None = None) -> GraphIO:
    """The graph I/O contract a bundle exported with ``options`` has: window-sized caches only for ``ort`` on a
    hybrid model, and only when asked (the one place that decides it; quantize writes through it too)."""
    window_cache = options.window_cache and options.target == "ort" and spec.is_hybrid
    max_positions = max_seq_len or options.max_seq_len or spec.max_position_embeddings
    scales = STATIC_KV_SCALES if options.kv_cache == "int8" else ""
    return graph_io_of(
        spec, options.dtype, max_positions, window_cache, kv_cache=options.kv_cache, kv_scales=scales
    )  # a HeadIO (no KV cache) for a task head


def meta_model(cls, spec: ModelSpec, dtype: str, max_positions: int) -> torch.nn.Module:
    """``cls(spec, max_positions)`` on the meta device (no weights in memory), RoPE tables included."""
    torch_dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = cls(spec, max_positions).to(torch_dtype)
    model.cos_cache = torch.empty(max_positions, spec.head_dim // 2, dtype=torch_dtype, device="meta")
    model.sin_cache = torch.empty(max_positions, spec.head_dim // 2, dtype=torch_dtype, device="meta")
    return model


def export_traced(model: torch.nn.Module, args: tuple, dynamic: tuple, io: GraphIO, opset: int) -> ir.Model:
    """``torch.onnx.export`` (dynamo) of a meta model with the custom attention op, I/O named by ``io``."""
    program = torch.onnx.export(
        model,
        args,
        dynamo=True,
        input_names=io.input_names,
        output_names=io.output_names,
        dynamic_shapes=dynamic,
        custom_translation_table=ops.custom_translation_table(),
        optimize=False,
        opset_version=opset,
        verbose=False,
        report=False,
    )
    return program.model


def trace_canonical(spec: ModelSpec, dtype: str, max_positions: int, opset: int = 21) -> ir.Model:
    """Trace the reference model on the meta device into the canonical ONNX graph (no weights)."""
    torch_dtype = DTYPES[dtype]
    model = meta_model(Exaone4Reference, spec, dtype, max_positions)
    # Distinct example sizes keep torch.export from specialising one dim to another's value.
    B, S, K, C = 2, 7, 3, 17
    meta = dict(device="meta")
    pasts = [
        torch.empty(B, spec.num_kv_heads, C, spec.head_dim, dtype=torch_dtype, **meta)
        for _ in range(2 * spec.num_layers)
    ]
    args = (
        torch.empty(B, S, dtype=torch.long, **meta),
        torch.empty(B, dtype=torch.int32, **meta),
        torch.empty((), dtype=torch.int32, **meta),
        torch.empty(B, K, dtype=torch.long, **meta),
        *pasts,
    )
    batch, seq, keep, cache = (torch.export.Dim(n) for n in ("batch", "sequence", "logits_len", "cache_len"))
    dynamic = ({0: batch, 1: seq}, {0: batch}, None, {0: batch, 1: keep}, tuple({0: batch, 2: cache} for _ in pasts))
    io = GraphIO(spec, dtype, max_positions)
    m = export_traced(model, args, dynamic, io, opset)
    _name_dims(m, io)
    return m


def _name_dims(m: ir.Model, io: GraphIO) -> None:
    """Give the dynamic axes stable, meaningful names (``GraphIO.dim_names``)."""
    for v in [*m.graph.inputs, *m.graph.outputs]:
        dims = io.dim_names(v.name)
        if dims is None or v.shape is None:
            continue
        v.shape = ir.Shape([d if n is None or not isinstance(d, ir.SymbolicDim) else n for d, n in zip(v.shape, dims)])


def bind_weights(m: ir.Model, spec: ModelSpec, ckpt: Checkpoint, dtype: str, max_positions: int) -> None:
    """Replace traced (meta) initializers by lazy tensors over the checkpoint.

    ``MatMul(x, Transpose(W))`` from ``x @ W.t()`` becomes ``MatMul(x, W^T)`` with W^T written already
    transposed, so ONNX Runtime needs no constant folding (and no second copy) at session start.
    """
    torch_dtype = DTYPES[dtype]
    g = m.graph

    def lazy(name: str, transpose: bool = False) -> ir.LazyTensor:
        info = ckpt.tensors[name]
        shape = tuple(reversed(info.shape)) if transpose else info.shape

        def load():
            t = ckpt.read_torch(name, torch_dtype)
            return TorchTensor(t.t().contiguous() if transpose else t, name=name)

        return ir.LazyTensor(
            load, dtype=ir.tensor_adapters.from_torch_dtype(torch_dtype), shape=ir.Shape(shape), name=name
        )

    # Transposes of weights -> pre-transposed initializers.
    for node in list(g):
        if node.op_type != "Transpose" or node.domain != "":
            continue
        src = node.inputs[0]
        if src is None or not src.is_initializer() or src.name not in ckpt.tensors:
            continue
        new = ir.Value(
            name=transposed_name(src.name),
            shape=ir.Shape(tuple(reversed(ckpt.tensors[src.name].shape))),
            type=ir.TensorType(ir.tensor_adapters.from_torch_dtype(torch_dtype)),
            const_value=lazy(src.name, transpose=True),
        )
        g.register_initializer(new)
        node.outputs[0].replace_all_uses_with(new)
        g.remove(node, safe=True)
    for name, value in list(g.initializers.items()):
        if untransposed_name(name) is not None or isinstance(value.const_value, ir.LazyTensor):
            continue  # bound already (pre-transposed above, or by a rewrite before binding: prequant_lower)
        if not value.uses() and name not in [o.name for o in g.outputs]:
            del g.initializers[name]
            continue
        if name in ("cos_cache", "sin_cache"):
            cos, sin = spec.rope.cos_sin(spec.head_dim, max_positions)
            arr = torch.from_numpy(cos if name == "cos_cache" else sin).to(torch_dtype)
            value.const_value = TorchTensor(arr, name=name)
        elif name in ckpt.tensors:
            value.const_value = lazy(name)
        else:
            raise ExportError(f"traced initializer {name!r} has no source tensor in the checkpoint")


def _progress(enabled: bool, desc: str, total=None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="tensor", leave=False)


def export_bundle(
    model_dir: str | Path,
    out_dir: str | Path,
    options: ExportOptions = ExportOptions(),
    *,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Export a checkpoint directory into a bundle directory (atomically). Returns the bundle path."""
    options.validate()
    src = resolve_model_dir(model_dir)
    with bundle_mod.atomic_dir(out_dir, force=force, error=ExportError) as tmp:
        _export_into(src, tmp, options, progress)
    return Path(out_dir)


def _export_into(src: Path, tmp: Path, options: ExportOptions, progress: bool) -> None:
    spec = load_spec(src)
    if options.target == "ort" and spec.head_dim % 16:
        raise ExportError(
            f"{src / 'config.json'}: head_dim {spec.head_dim} is not a multiple of 16, which ONNX "
            "Runtime's GroupQueryAttention requires (EXAONE 4.0 uses 64 and 128)"
        )
    ckpt = Checkpoint(src)
    ckpt.validate(spec)
    io = graph_io(spec, options)
    log.info(
        "export %s: %d layers (%s), target %s, dtype %s, max_seq_len %d, window caches %s, kv cache %s",
        src,
        spec.num_layers,
        spec.head.task,
        options.target,
        options.dtype,
        io.max_seq_len,
        io.window_cache,
        options.kv_cache,
    )
    from tqdm.auto import tqdm

    with tqdm(total=6, desc="export", disable=not progress, unit="stage") as bar:
        started = []

        t0 = time.perf_counter()

        def stage(name: str) -> None:
            if started:  # the previous stage is done
                bar.update()
                log.info("export %s: %s done (%.1f s)", src.name, started[-1], time.perf_counter() - t0)
            started.append(name)
            bar.set_postfix_str(name)

        stage("trace")
        trace = trace_canonical if spec.head.is_lm else heads.trace_head_canonical  # heads: prompt-only graph
        m = trace(spec, options.dtype, io.max_seq_len, options.opset)
        prequantized = None
        if ckpt.scheme is not None:  # the publisher's quantized linears, lowered exactly (exporter/prequant_lower)
            from .prequant_lower import lower_prequantized

            prequantized = lower_prequantized(m, ckpt, options.target, options.dtype, options.accuracy_level)
        stage("bind weights")
        bind_weights(m, spec, ckpt, options.dtype, io.max_seq_len)
        if io.kv_cache == "int8":
            from ..calibration import kvcache

            amax = kvcache.static_amax(spec, lambda name: ckpt.read_torch(name, torch.float32).numpy())
            kvcache.add_scale_initializers(m, io, amax)
        m.producer_name, m.producer_version = "exaone-deploy", _version()
        m.doc_string = f"EXAONE 4 canonical graph ({options.dtype}) exported by exaone-deploy"
        with _progress(progress, "weights", len(m.graph.initializers)) as wbar:
            writer.write_into(
                tmp,
                m,
                io,
                options.target,
                source_dir=src,
                on_stage=stage,
                on_tensor=lambda *_: wbar.update(),
                extra={"prequantized": prequantized} if prequantized else None,
            )
        bar.update()
        log.info("export %s: %s done (%.1f s)", src.name, started[-1], time.perf_counter() - t0)


def _version() -> str:
    from .. import __version__

    return __version__


__all__ += ["CheckpointError"]
