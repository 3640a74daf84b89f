"""``exaone-deploy build``: a ``trt`` bundle -> a TensorRT engine bundle.

Steps (``build_engine``):

1. Load and verify the source bundle (target ``trt``) and run the static checks of :mod:`.checks` on its
   model.onnx: unsupported ops, incomplete plugin nodes or Q/DQ that a strongly typed network rejects fail
   here, on any machine, before TensorRT is involved.
2. Import TensorRT (a one-line :class:`TensorRTUnavailable` naming the package when it is missing), register
   our plugins, parse the ONNX file into a **strongly typed** network (precision comes from the graph: its
   float type and its Q/DQ nodes; TensorRT 11 only has strongly typed networks, TensorRT 10 gets the
   ``STRONGLY_TYPED`` flag).
3. Two optimisation profiles: ``prefill`` (batch 1..max_batch, chunk 1..max_seq_len) and ``decode`` (batch
   1..max_batch, one token per row); the KV-cache inputs range over 1..max_seq_len positions.
4. Builder optimisation level, an optional workspace limit, the timing cache loaded from and saved back to
   ``--timing-cache`` (atomically), a progress display driven by TensorRT's ``IProgressMonitor``.
5. The engine bundle: ``model.engine``, the tokenizer files and a manifest (target ``tensorrt``) recording the
   TensorRT version, the GPU and its compute capability, the plugins, the profiles, the precision and the
   source bundle's hash. :class:`~exaone_deploy.tensorrt.backend.TrtBackend` refuses an engine built by
   another TensorRT version or for another GPU with a message saying so.

All TensorRT calls are in ``_build_serialized`` and its helpers and follow the TensorRT 10.x/11.x Python API; the
parser, logger and progress monitor are kept alive until the engine is built (TensorRT holds raw pointers to them).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import bundle as bundle_mod
from ..bundle import BundleError, Manifest, load_manifest
from ..errors import ExaoneDeployError
from ..graph_io import GraphIO
from ..spec import ModelSpec
from .backend import ENGINE_TARGET, TensorRTUnavailable, gpu_info, require_tensorrt
from .checks import CheckReport, check_model, plugin_contract

log = logging.getLogger(__name__)

__all__ = [
    "BuildError",
    "BuildOptions",
    "BuildProgress",
    "TensorRTUnavailable",
    "build_engine",
    "profile_shapes",
    "write_engine_bundle",
    "build_gpu_info",
    "ENGINE_FILE",
]

ENGINE_FILE = "model.engine"
PROFILE_NAMES = ("prefill", "decode")


class BuildError(ExaoneDeployError, RuntimeError):
    pass


@dataclass(frozen=True)
class BuildOptions:
    max_batch: int = 1
    max_seq_len: int | None = None  # default: the bundle's max_seq_len
    opt_level: int = 3  # TensorRT builder optimisation level, 0..5
    timing_cache: Path | None = None
    workspace_gib: float | None = None
    prefill_opt_len: int | None = None  # the chunk length prefill kernels are tuned for (default min(256, max))

    def validate(self, bundle_max_seq_len: int) -> int:
        if self.max_batch < 1:
            raise BuildError(f"--max-batch must be >= 1, got {self.max_batch}")
        if not 0 <= self.opt_level <= 5:
            raise BuildError(f"--opt-level must be in 0..5, got {self.opt_level}")
        max_seq = self.max_seq_len or bundle_max_seq_len
        if not 1 <= max_seq <= bundle_max_seq_len:
            raise BuildError(
                f"--max-seq-len {max_seq} must be in 1..{bundle_max_seq_len} (the bundle's RoPE tables "
                f"cover {bundle_max_seq_len} positions; re-export with a larger --max-seq-len)"
            )
        return max_seq


# ---- pure parts (tested without TensorRT) -----------------------------------------------------------------


def profile_shapes(
    spec: ModelSpec, max_batch: int, max_seq_len: int, prefill_opt_len: int | None = None
) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """(min, opt, max) shapes of every dynamic input, for the prefill and decode profiles.

    ``total_sequence_length`` is a scalar (no dynamic dimension) and needs no profile entry.
    """
    return GraphIO(spec).profile_shapes(max_batch, max_seq_len, prefill_opt_len)


class BuildProgress:
    """Nested progress bars for TensorRT's build phases (called by the IProgressMonitor adapter, possibly
    from TensorRT's threads)."""

    def __init__(self, enabled: bool = True, bar_factory: Callable[..., Any] | None = None):
        self.enabled = enabled
        self._lock = threading.Lock()
        self._bars: dict[str, Any] = {}
        self._depth: dict[str, int] = {}
        self.finished: list[str] = []
        if bar_factory is None:
            from tqdm.auto import tqdm

            bar_factory = tqdm
        self._factory = bar_factory

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self._depth[phase_name] = depth
            self._bars[phase_name] = self._factory(
                total=num_steps,
                desc="  " * depth + phase_name,
                position=depth,
                leave=depth == 0,
                disable=not self.enabled,
                unit="step",
            )

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.n = step + 1
                bar.refresh()
        return True  # False would ask TensorRT to cancel the build

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            bar = self._bars.pop(phase_name, None)
            self._depth.pop(phase_name, None)
            if bar is not None:
                bar.close()
            self.finished.append(phase_name)


def build_gpu_info() -> dict[str, str]:
    """The build GPU's name and compute capability: torch.cuda if present, else cuda-python."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    try:
        return gpu_info(0)
    except TensorRTUnavailable as e:
        raise BuildError(f"cannot tell the GPU's compute capability for the manifest: {e}") from None


def _sha256(path: Path) -> str:
    return bundle_mod.sha256_file(path)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_engine_bundle(
    source: Manifest,
    out_dir: str | Path,
    engine: bytes,
    tensorrt_info: dict[str, Any],
    *,
    max_seq_len: int,
    force: bool = False,
) -> Path:
    """Write an engine bundle atomically: model.engine, the source's tokenizer files, manifest.json."""
    io = GraphIO(source.spec, source.dtype, max_seq_len)
    with bundle_mod.atomic_dir(out_dir, force=force, error=BuildError) as tmp:
        (tmp / ENGINE_FILE).write_bytes(engine)
        bundle_mod.finish_bundle(
            tmp,
            io,
            target=ENGINE_TARGET,
            model_file=ENGINE_FILE,
            source_dir=source.root,
            extra={
                "tensorrt": tensorrt_info,
                "source_bundle": {
                    "path": str(source.root.resolve()),
                    "target": source.target,
                    "dtype": source.dtype,
                    "max_seq_len": source.max_seq_len,
                    "manifest_sha256": _sha256(source.root / bundle_mod.MANIFEST),
                    "model_sha256": source.get("sha256", {}).get(source.data["files"]["model"]),
                },
            },
        )
    return Path(out_dir)


# ---- TensorRT --------------------------------------------------------------------------------------------


def _progress_monitor(trt, progress: BuildProgress):
    """A ``trt.IProgressMonitor`` forwarding to ``progress`` (pybind11 needs the base __init__ called)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            return progress.step_complete(phase_name, step)

        def phase_finish(self, phase_name):
            progress.phase_finish(phase_name)

    return Monitor()


def _network_flags(trt) -> int:
    flags = 0
    # TensorRT 10: strongly typed on request; 11: always strongly typed (the flag is kept and ignored).
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is not None:
        flags |= 1 << int(flag)
    # Plugins with both AOT and JIT implementations: take the AOT one (no Python in the engine at run time).
    aot = getattr(trt.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS", None)
    if aot is not None:
        flags |= 1 << int(aot)
    return flags


def _parse(trt, network, logger, model_path: Path):
    """Parse the ONNX file into ``network``. Returns the parser, which owns the weights the network points to:
    keep it alive until the engine is built."""
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(model_path)):
        return parser
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = getattr(err, "node_name", lambda: "")() or f"#{err.node()}"
        op = getattr(err, "node_operator", lambda: "")()
        lines.append(f"node {node} ({op}): {err.desc()}" if op else f"node {node}: {err.desc()}")
    raise BuildError(f"{model_path}: TensorRT's ONNX parser failed:\n  " + "\n  ".join(lines or ["(no details)"]))


def _load_timing_cache(trt, config, path: Path | None):
    data = path.read_bytes() if path is not None and path.exists() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("%s: timing cache was made by another TensorRT version or GPU; starting a fresh one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    if data:
        log.info("timing cache: %d bytes from %s", len(data), path)
    return cache


def _build_serialized(
    trt, model_path: Path, spec: ModelSpec, opts: BuildOptions, max_seq_len: int, progress: BuildProgress
) -> tuple[bytes, list[dict]]:
    logger = trt.Logger(trt.Logger.INFO if log.isEnabledFor(logging.DEBUG) else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = _parse(trt, network, logger, model_path)  # owns the weights: must outlive the build

    config = builder.create_builder_config()
    config.builder_optimization_level = opts.opt_level
    if opts.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gib * (1 << 30)))
    _load_timing_cache(trt, config, opts.timing_cache)
    monitor = None  # TensorRT keeps a raw pointer: the Python object must outlive the build
    if hasattr(trt, "IProgressMonitor"):
        monitor = _progress_monitor(trt, progress)
        config.progress_monitor = monitor

    shapes = profile_shapes(spec, opts.max_batch, max_seq_len, opts.prefill_opt_len)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for inp in inputs:
        if inp.is_shape_tensor:
            raise BuildError(
                f"{model_path}: input {inp.name!r} is used as a shape tensor; exaone-deploy graphs feed "
                f"it to the attention plugin only (re-export the bundle)"
            )
        if -1 in tuple(inp.shape) and inp.name not in shapes[0]:
            raise BuildError(
                f"{model_path}: dynamic input {inp.name!r} {tuple(inp.shape)} has no optimisation profile "
                f"(not an exaone-deploy graph?)"
            )
    recorded = []
    for name, prof in zip(PROFILE_NAMES, shapes):
        profile = builder.create_optimization_profile()
        for inp in inputs:
            if inp.name in prof:
                profile.set_shape(inp.name, *prof[inp.name])
        index = config.add_optimization_profile(profile)
        if index < 0:
            raise BuildError(f"TensorRT rejected the {name} optimisation profile")
        summary = GraphIO(spec).profile_summary(prof)
        recorded.append(
            {"name": name, "index": index, "shapes": {k: [list(dims) for dims in v] for k, v in summary.items()}}
        )

    serialized = builder.build_serialized_network(network, config)
    del parser  # only now may it go
    if serialized is None:
        raise BuildError(f"{model_path}: TensorRT could not build an engine (run with -vv for the builder log)")
    if opts.timing_cache is not None:
        _atomic_write(opts.timing_cache, bytes(config.get_timing_cache().serialize()))
        log.info("timing cache saved to %s", opts.timing_cache)
    return bytes(serialized), recorded


def build_engine(
    bundle_dir: str | Path,
    out_dir: str | Path,
    options: BuildOptions = BuildOptions(),
    *,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Build a TensorRT engine bundle from a ``trt`` bundle. Returns the engine bundle's path."""
    source = load_manifest(bundle_dir, verify=True)
    if source.target != "trt":
        raise BundleError(
            f"{source.root}: bundle target is {source.target!r}; TensorRT engines are built from 'trt' "
            f"bundles (exaone-deploy export MODEL --target trt)"
        )
    if not source.spec.head.is_lm:  # the profiles and the engine runner are the decoder's (runtime/head_backend.py)
        raise BuildError(
            f"{source.root}: a {source.spec.head.task} bundle; TensorRT engines of task heads are not "
            "supported yet (export with --target ort and run it with classify/qa)"
        )
    max_seq_len = options.validate(source.max_seq_len)
    out = Path(out_dir)
    if out.exists() and not force:
        raise BuildError(f"{out}: output already exists (use --force to replace it)")
    report: CheckReport = check_model(source.model_path).raise_for_errors()
    for w in report.warnings:
        log.warning("%s: %s", source.model_path, w)
    trt = require_tensorrt("`exaone-deploy build`")
    gpu = build_gpu_info()
    from .plugin import register_plugins

    register_plugins()
    t0 = time.perf_counter()
    engine, profiles = _build_serialized(
        trt, source.model_path, source.spec, options, max_seq_len, BuildProgress(enabled=progress)
    )
    contract = plugin_contract()
    info = {
        "version": trt.__version__,
        "device": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "hardware_compatibility": "none",
        "max_batch": options.max_batch,
        "max_seq_len": max_seq_len,
        "opt_level": options.opt_level,
        "strongly_typed": True,
        "profiles": profiles,
        "precision": {"dtype": source.dtype, "quantized_dq_nodes": report.quantization},
        "plugins": [
            {
                "op_type": contract.op_type,
                "namespace": contract.namespace,
                "version": contract.version,
                "fields": sorted(contract.fields),
                "nodes": report.plugin_nodes,
                "implementation": "aot",
            }
        ],
        "layers": [
            {"index": i, "window": p["window"], "rotary": p["rotary"], "ring": p["ring"]}
            for i, p in enumerate(report.plugins)
        ],
        "checks": {"op_list_tensorrt_version": report.tensorrt_version, "warnings": len(report.warnings)},
        "build_seconds": round(time.perf_counter() - t0, 1),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "engine_sha256": hashlib.sha256(engine).hexdigest(),
    }
    return write_engine_bundle(source, out, engine, info, max_seq_len=max_seq_len, force=force)
