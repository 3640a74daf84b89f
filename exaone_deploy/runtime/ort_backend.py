"""ONNX Runtime backend: one session, KV-cache buffers allocated once, updated in place via IO binding.

The cache of layer i is one buffer of shape (max_batch, kv_heads, L_i, head_dim) per K and V, where L_i is
``max_seq_len`` or, for sliding layers of a bundle exported with window caches, the window W (the op keeps
the last W keys): ``GraphIO.cache_shapes``. A step over rows [r0, r1) binds each cache's past input *and*
present output to the same memory (GQA's shared past/present buffer, ``GraphIO.cache_views``), so ONNX
Runtime writes the new keys and values in place and no cache bytes are copied per step. Rows of a
C-contiguous buffer are contiguous, so a slot range is a pointer offset. Decode steps reuse one binding and
one set of input buffers per (first row, rows), filled in place (``GraphIO.fill_decode``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..bundle import BundleError, Manifest, load_manifest
from ..errors import ExaoneDeployError
from ..graph_io import GraphIO
from .backend import Backend
from .hugepages import TUNABLE, hugepage_env
from .kernels import session as kernel_session

log = logging.getLogger(__name__)

__all__ = ["DeviceError", "OrtBackend", "bind_step"]


class DeviceError(ExaoneDeployError, RuntimeError):
    """The device asked for is not available in this onnxruntime (e.g. CUDA with the CPU-only package)."""


# GroupQueryAttention's ``sliding_window_cache`` attribute (window-sized caches of sliding layers, the 'ort'
# export's default) is accepted from onnxruntime 1.29 on; 1.22-1.28 refuse the graph with INVALID_GRAPH.
WINDOW_CACHE_ORT = (1, 29)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits[:6]))
    return tuple(parts)


def required_ort(manifest: Manifest) -> tuple[int, ...] | None:
    """The oldest onnxruntime that loads this bundle, where it needs more than the package's floor: window-sized
    caches need ``sliding_window_cache`` (WINDOW_CACHE_ORT)."""
    return WINDOW_CACHE_ORT if manifest.io.window_cache else None


def check_ort_version(manifest: Manifest, version: str | None = None) -> None:
    """Refuse (BundleError, naming the version to install) a bundle that this onnxruntime is too old to load,
    before creating the session: rejected, letting onnxruntime fail with an INVALID_GRAPH message that names an
    attribute and no version."""
    version = version or ort.__version__
    need = required_ort(manifest)
    if need is not None and _version(version) < need:
        want = ".".join(map(str, need))
        raise BundleError(
            f"{manifest.root}: this bundle has window-sized KV caches, which need onnxruntime >= {want}"
            f" (installed: {version}): pip install -U 'onnxruntime>={want}'"
        )


_NP = {"float32": np.float32, "float16": np.float16}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so


def bind_step(
    session: ort.InferenceSession,
    io: GraphIO,
    inputs: dict[str, np.ndarray],
    logits: np.ndarray,
    cache_ptrs: Sequence[int],
    max_seq_len: int,
    dtype,
    device: str = "cpu",
) -> ort.IOBinding:
    """An IO binding of one step: host inputs and logits, and each cache's past *and* present at
    ``cache_ptrs[k]`` (the step's first row of cache tensor k, ``GraphIO.cache_views`` order), in place."""
    binding = session.io_binding()
    for name, arr in inputs.items():
        binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
    for k, past, present, shape in io.cache_views(inputs["input_ids"].shape[0], max_seq_len):
        binding.bind_input(past, device, 0, dtype, list(shape), cache_ptrs[k])
        binding.bind_output(present, device, 0, dtype, list(shape), cache_ptrs[k])
    binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
    return binding


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        bundle: str | Path | Manifest,
        *,
        max_batch: int = 1,
        max_seq_len: int | None = None,
        device: str = "cpu",
        threads: int | None = None,
        verify: bool = True,
        capacity: int | None = None,
        kernels: str | None = None,
    ):
        """``capacity``: deprecated alias of ``max_seq_len`` (default: ``GraphIO.default_context()``).
        ``kernels``: ``auto``/``on``/``off``, our CPU kernels for the linear layers (runtime/kernels; default
        ``$EXAONE_DEPLOY_KERNELS`` or auto)."""
        self.manifest = bundle if isinstance(bundle, Manifest) else load_manifest(bundle, verify=verify)
        m = self.manifest
        if m.target != "ort":
            raise BundleError(
                f"{m.root}: bundle target is {m.target!r}; ONNX Runtime runs 'ort' bundles "
                f"(use `exaone-deploy build` for TensorRT)"
            )
        if m.dtype not in _NP:
            if m.dtype == "bfloat16" and device == "cpu":
                raise BundleError(
                    f"{m.root}: bfloat16 bundles need the CUDA execution provider "
                    "(ONNX Runtime's CPU kernels are float32/float16)"
                )
        self.spec, self.io = m.spec, m.io
        self.device = device
        provider = PROVIDERS.get(device)
        if provider is None:
            raise ValueError(f"unknown device {device!r} (choose from {', '.join(PROVIDERS)})")
        if provider not in ort.get_available_providers():
            fix = (
                ": pip uninstall onnxruntime && pip install onnxruntime-gpu (with a CUDA driver)"
                if device == "cuda"
                else ""
            )
            raise DeviceError(
                f"--device {device} needs {provider}, which this onnxruntime {ort.__version__} build "
                f"lacks (it has {', '.join(ort.get_available_providers())}){fix}"
            )
        threads = threads or int(os.environ.get("EXAONE_DEPLOY_THREADS", "0")) or None
        if device == "cpu" and hugepage_env() is not None:
            log.info(
                "weights will sit in 4 KiB pages: start Python with GLIBC_TUNABLES=%s for 2 MiB pages "
                "(faster decode; the exaone-deploy command does it itself)",
                TUNABLE,
            )
        check_ort_version(m)
        log.info(
            "bundle %s: target %s, %s, %d layers; creating the onnxruntime %s session on %s",
            m.root,
            m.target,
            m.dtype,
            m.spec.num_layers,
            ort.__version__,
            provider,
        )
        try:
            self.session, self.kernels = kernel_session(
                m.model_path, lambda: session_options(threads), [provider], dtype=m.dtype, mode=kernels
            )
        except (
            ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.InvalidProtobuf,
        ) as e:
            raise BundleError(
                f"{m.model_path}: onnxruntime {ort.__version__} cannot load this graph "
                f"({' '.join(str(e).split())[:300]}); a bundle exported by this version of "
                f"exaone-deploy may need a newer onnxruntime: pip install -U onnxruntime"
            ) from e
        log.info("session ready")
        self.np_dtype = _NP.get(m.dtype, np.float16)
        self.cache_np_dtype = np.int8 if self.io.cache_dtype == "int8" else self.np_dtype  # --kv-cache int8
        self.ort_dtype = self.np_dtype if m.dtype != "bfloat16" else None
        self._caches: list[ort.OrtValue] = []
        self._decode_cache: dict[tuple[int, int], tuple] = {}
        self.allocate(max_batch, self.io.default_context(max_seq_len or capacity))

    # ---- buffers ------------------------------------------------------------------------------
    def _allocate(self, max_batch: int, max_seq_len: int) -> None:
        dev = "cuda" if self.device == "cuda" else "cpu"
        shapes = self.io.cache_shapes(max_batch, max_seq_len)
        self._caches = [
            ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.cache_np_dtype), dev, 0) for shape in shapes
        ]
        item = np.dtype(self.cache_np_dtype).itemsize
        self._row_bytes = [int(np.prod(shape[1:])) * item for shape in shapes]
        self._decode_cache.clear()
        log.info(
            "KV cache: %d slots x %d tokens, %.1f MiB on %s",
            max_batch,
            max_seq_len,
            sum(int(np.prod(s)) for s in shapes) * item / 2**20,
            dev,
        )

    def cache_bytes(self) -> int:
        return sum(self.max_batch * r for r in self._row_bytes)

    def close(self) -> None:
        self._caches, self._decode_cache = [], {}

    # ---- binding ------------------------------------------------------------------------------
    def _bind(self, r0: int, rows: int, inputs: dict[str, np.ndarray], logits: np.ndarray) -> ort.IOBinding:
        ptrs = [c.data_ptr() + r0 * n for c, n in zip(self._caches, self._row_bytes)]
        return bind_step(
            self.session,
            self.io,
            inputs,
            logits,
            ptrs,
            self.max_seq_len,
            self.cache_np_dtype,
            "cuda" if self.device == "cuda" else "cpu",
        )

    def _run(self, io: ort.IOBinding) -> None:
        self.session.run_with_iobinding(io)

    # ---- Backend API --------------------------------------------------------------------------
    def _step(self, r0: int, inputs: dict[str, np.ndarray], decode: bool) -> np.ndarray:
        B, K = inputs["logits_index"].shape
        logits = np.empty((B, K, self.spec.vocab_size), dtype=np.float32)
        self._run(self._bind(r0, B, inputs, logits))
        return logits

    def _decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One token per slot, batched over rows [min(slots), max(slots)] (not from row 0: a lone sequence in a
        high slot, e.g. behind prefix-cached slots, decodes one row, not all the rows below it).

        Rows in that range that are not decoding get a dummy token written just past their end, where
        their next token goes anyway: harmless for full-length caches and for free rows. Window-sized
        caches evict on each write, so with those, live rows that are not decoding split the batch into
        runs of contiguous rows instead.
        """
        want = dict(zip(slots, tokens))
        lo, rows = min(slots), max(slots) + 1
        if self.windowed:
            blocked = [r for r in range(lo, rows) if r not in want and self.lengths[r] > 0]
            if blocked:
                out = np.empty((len(slots), self.spec.vocab_size), dtype=np.float32)
                order = {slot: i for i, slot in enumerate(slots)}
                run: list[int] = []
                for r in [*sorted(want), None]:
                    if run and (r is None or r != run[-1] + 1):
                        logits = self._decode_rows(run[0], len(run), {x: want[x] for x in run}, run)
                        for x, row in zip(run, logits):
                            out[order[x]] = row
                        run = []
                    if r is not None:
                        run.append(r)
                return out
        return self._decode_rows(lo, rows - lo, want, list(slots))

    def _decode_rows(self, r0: int, rows: int, want: dict[int, int], slots: list[int]) -> np.ndarray:
        key = (r0, rows)
        cached = self._decode_cache.get(key)
        if cached is None:
            inputs = self.io.decode_inputs(rows)
            logits = np.empty((rows, 1, self.spec.vocab_size), dtype=np.float32)
            cached = (inputs, logits, self._bind(r0, rows, inputs, logits))
            self._decode_cache[key] = cached
        inputs, logits, io = cached
        idx = np.asarray(slots) - r0
        ids = np.zeros(rows, dtype=np.int64)
        ids[idx] = [want[s] for s in slots]
        seqlens = np.minimum(self.lengths[r0 : r0 + rows], self.max_seq_len - 1)  # idle rows: write past their end
        seqlens[idx] = self.lengths[slots]
        self.io.fill_decode(inputs, ids, seqlens)
        self._run(io)
        self.lengths[slots] += 1
        return logits[idx, 0]
