"""TensorRT backend: an engine bundle (``exaone-deploy build``) behind the runtime's slot API.

Same contract as :class:`~exaone_deploy.runtime.ort_backend.OrtBackend`, so ``generate``, ``chat`` and ``serve``
take an engine bundle unchanged:

* The KV cache is one device buffer per cache tensor of ``GraphIO.cache_shapes`` (max_batch rows of
  max_seq_len tokens). A step over rows [r0, r0+rows) binds each cache's past input *and* present output to
  the same address (buffer + r0 * row_bytes, ``GraphIO.cache_views``): the attention plugin updates the cache
  in place, nothing is copied per step. Step inputs are built by ``GraphIO``, as in every backend.
* Two execution contexts, one per optimisation profile of the engine: ``prefill`` (any batch and chunk length)
  and ``decode`` (one token per row). Each keeps its shapes and addresses between steps.
* Decode steps are captured into CUDA graphs, one per row count, on their second occurrence (the first one
  runs normally, which is also the warm-up TensorRT needs before capture): a step is then host->device copies
  of the small inputs, one graph launch and the logits copy back. Capture failures fall back to plain
  ``execute_async_v3`` with a log line.

Nothing here imports torch (the runtime's rule): device memory, streams and graphs go through cuda-python
(``cuda.bindings.runtime``). TensorRT and cuda-python are imported when a backend is created; without them
the error names the missing package. The few TensorRT calls are in :class:`TrtEngine`; the memory calls in
:class:`CudaMemory`. Both are small objects behind narrow interfaces, so the slot bookkeeping above them is
exercised in tests with an ONNX Runtime executor and host memory in their place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import BundleError, Manifest, load_manifest
from ..errors import ExaoneDeployError
from ..graph_io import GraphIO
from ..runtime.backend import Backend, ContextLengthError

log = logging.getLogger(__name__)

__all__ = [
    "TrtBackend",
    "TrtEngine",
    "CudaMemory",
    "TensorRTUnavailable",
    "EngineMismatchError",
    "require_tensorrt",
    "require_cudart",
    "gpu_info",
    "engine_compat_error",
    "ENGINE_TARGET",
    "PROFILE_PREFILL",
    "PROFILE_DECODE",
]

ENGINE_TARGET = "tensorrt"
PROFILE_PREFILL, PROFILE_DECODE = 0, 1
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


class TensorRTUnavailable(ExaoneDeployError, RuntimeError):
    """TensorRT (or cuda-python) is not installed or cannot load on this machine."""


class EngineMismatchError(BundleError):
    """An engine built by another TensorRT version or for another GPU."""


# ---- optional dependencies -------------------------------------------------------------------------------


def require_tensorrt(purpose: str = "running a TensorRT engine"):
    """``import tensorrt``, or a one-line TensorRTUnavailable naming the package."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            f"{purpose} needs TensorRT, but the Python package 'tensorrt' is not installed "
            f"({e}); install it on a machine with an NVIDIA GPU: pip install tensorrt"
        ) from None
    except OSError as e:  # the bindings are there but libnvinfer is not
        raise TensorRTUnavailable(
            f"{purpose} needs TensorRT, but the 'tensorrt' package cannot load its libraries "
            f"({e}); reinstall tensorrt (its tensorrt-libs wheels) for this CUDA version"
        ) from None
    if not hasattr(trt, "Builder") or not hasattr(trt, "Runtime"):
        raise TensorRTUnavailable(
            f"{purpose} needs TensorRT, but the installed 'tensorrt' package has no Builder/"
            f"Runtime (a stub or a broken install: {getattr(trt, '__file__', '?')})"
        )
    return trt


def require_cudart():
    """cuda-python's CUDA runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as e:
            raise TensorRTUnavailable(
                f"the TensorRT backend needs the Python package 'cuda-python' for device "
                f"memory and CUDA graphs ({e}); pip install cuda-python"
            ) from None
    return cudart


def _check(result, what: str):
    """cuda-python calls return (err, *values); raise on error, return the values."""
    cudart = require_cudart()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        _, msg = cudart.cudaGetErrorString(err)
        raise RuntimeError(f"CUDA error in {what}: {msg.decode() if isinstance(msg, bytes) else msg} ({int(err)})")
    return rest[0] if len(rest) == 1 else tuple(rest)


def gpu_info(device: int = 0) -> dict[str, str]:
    """Name and compute capability ("9.0") of a CUDA device, through cuda-python."""
    cudart = require_cudart()
    props = _check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name, "compute_capability": f"{props.major}.{props.minor}"}


def engine_compat_error(info: dict[str, Any], trt_version: str, compute_capability: str) -> str | None:
    """Why an engine built as recorded in ``info`` (the manifest's ``tensorrt`` section) cannot run here, or
    None. TensorRT engines are tied to the exact TensorRT version and to the GPU architecture they were built for."""
    built_v, built_cc = str(info.get("version", "?")), str(info.get("compute_capability", "?"))
    if built_v != trt_version:
        return (
            f"the engine was built with TensorRT {built_v} but this machine has TensorRT {trt_version}; "
            f"engines only load in the TensorRT version that built them: rebuild it here with "
            f"`exaone-deploy build` from its source bundle"
        )
    if built_cc != compute_capability and info.get("hardware_compatibility", "none") == "none":
        return (
            f"the engine was built for a GPU of compute capability {built_cc} "
            f"({info.get('device', 'unknown GPU')}) but this GPU is {compute_capability}; rebuild it on this "
            f"GPU with `exaone-deploy build`"
        )
    return None


# ---- device memory (cuda-python) -------------------------------------------------------------------------


class CudaMemory:
    """Device buffers, one stream, copies and CUDA graphs through cuda-python."""

    supports_graphs = True

    def __init__(self, device: int = 0):
        self.rt = require_cudart()
        _check(self.rt.cudaSetDevice(device), "cudaSetDevice")
        self.stream = _check(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking), "cudaStreamCreate")
        self._ptrs: list[int] = []

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def alloc(self, nbytes: int) -> int:
        ptr = int(_check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))
        self._ptrs.append(ptr)
        return ptr

    def free(self, ptr: int) -> None:
        if ptr in self._ptrs:
            self._ptrs.remove(ptr)
            _check(self.rt.cudaFree(ptr), "cudaFree")

    def zero(self, ptr: int, nbytes: int) -> None:
        _check(self.rt.cudaMemsetAsync(ptr, 0, nbytes, self.stream), "cudaMemsetAsync")

    def upload(self, ptr: int, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        _check(
            self.rt.cudaMemcpyAsync(
                ptr, arr.ctypes.data, arr.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream
            ),
            "cudaMemcpy H2D",
        )

    def download(self, arr: np.ndarray, ptr: int) -> None:
        _check(
            self.rt.cudaMemcpyAsync(
                arr.ctypes.data, ptr, arr.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream
            ),
            "cudaMemcpy D2H",
        )

    def sync(self) -> None:
        _check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def capture(self, fn) -> Any:
        """Record what ``fn()`` enqueues on the stream into an instantiated CUDA graph."""
        rt = self.rt
        _check(
            rt.cudaStreamBeginCapture(self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
            "cudaStreamBeginCapture",
        )
        try:
            fn()
        finally:
            graph = _check(rt.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        graph_exec = _check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        _check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
        return graph_exec

    def launch(self, graph_exec) -> None:
        _check(self.rt.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")

    def destroy_graph(self, graph_exec) -> None:
        _check(self.rt.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")

    def close(self) -> None:
        for ptr in list(self._ptrs):
            self.free(ptr)
        if self.stream is not None:
            _check(self.rt.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.stream = None


# ---- the engine (TensorRT) -------------------------------------------------------------------------------


class TrtEngine:
    """A deserialized engine with one execution context per optimisation profile."""

    def __init__(self, trt, engine_path: Path, stream_handle: int, verbose: bool = False):
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BundleError(
                f"{engine_path}: TensorRT could not deserialize the engine (see the TensorRT log "
                f"above; a plugin the engine uses may not be registered)"
            )
        e = self.engine
        self.names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        self.input_names = [n for n in self.names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in self.names if n not in self.input_names]
        if e.num_optimization_profiles < 2:
            raise BundleError(
                f"{engine_path}: the engine has {e.num_optimization_profiles} optimisation profile(s); "
                f"exaone-deploy engines have two (prefill, decode)"
            )
        self.contexts = []
        for profile in (PROFILE_PREFILL, PROFILE_DECODE):
            ctx = e.create_execution_context()
            if ctx is None:
                raise RuntimeError(f"{engine_path}: TensorRT could not create an execution context (out of memory?)")
            if not ctx.set_optimization_profile_async(profile, stream_handle):
                raise RuntimeError(f"{engine_path}: cannot select optimisation profile {profile}")
            self.contexts.append(ctx)

    def set_input_shape(self, profile: int, name: str, shape: tuple[int, ...]) -> None:
        if not self.contexts[profile].set_input_shape(name, tuple(int(d) for d in shape)):
            lo, _, hi = self.engine.get_tensor_profile_shape(name, profile)
            raise ContextLengthError(
                f"input {name} shape {tuple(shape)} is outside the engine's profile "
                f"{profile} range {tuple(lo)}..{tuple(hi)} (rebuild with larger --max-batch/"
                f"--max-seq-len)"
            )

    def set_tensor_address(self, profile: int, name: str, ptr: int) -> None:
        if not self.contexts[profile].set_tensor_address(name, int(ptr)):
            raise RuntimeError(f"TensorRT refused the address of {name}")

    def execute(self, profile: int, stream_handle: int) -> None:
        if not self.contexts[profile].execute_async_v3(stream_handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")


# ---- the backend ------------------------------------------------------------------------------------------


class _Buffers:
    """Named device buffers that grow on demand (growing drops the captured graphs that point at them)."""

    def __init__(self, mem):
        self.mem, self.ptr, self.size = mem, {}, {}
        self.generation = 0

    def get(self, name: str, nbytes: int) -> int:
        if self.size.get(name, -1) < nbytes:
            if name in self.ptr:
                self.mem.free(self.ptr[name])
            self.ptr[name], self.size[name] = self.mem.alloc(nbytes), nbytes
            self.generation += 1
        return self.ptr[name]

    def release(self) -> None:
        for ptr in self.ptr.values():
            self.mem.free(ptr)
        self.ptr.clear(), self.size.clear()
        self.generation += 1


class TrtBackend(Backend):
    name = "tensorrt"

    def __init__(
        self,
        bundle: str | Path | Manifest,
        *,
        max_batch: int = 1,
        max_seq_len: int | None = None,
        verify: bool = True,
        cuda_graphs: bool = True,
        device: int = 0,
        verbose: bool = False,
        capacity: int | None = None,
    ):
        """``capacity``: deprecated alias of ``max_seq_len``; ``device``: the CUDA device index."""
        manifest = bundle if isinstance(bundle, Manifest) else load_manifest(bundle, verify=verify)
        if manifest.target != ENGINE_TARGET:
            raise BundleError(
                f"{manifest.root}: bundle target is {manifest.target!r}; the TensorRT backend runs engine "
                f"bundles (build one with `exaone-deploy build {manifest.root} -o ENGINE_DIR`)"
            )
        info = manifest.get("tensorrt") or {}
        trt = require_tensorrt("running a TensorRT engine bundle")
        here = gpu_info(device)
        problem = engine_compat_error(info, trt.__version__, here["compute_capability"])
        if problem:
            raise EngineMismatchError(f"{manifest.model_path}: {problem}")
        _register_plugins()
        mem = CudaMemory(device)
        engine = TrtEngine(trt, manifest.model_path, mem.stream_handle, verbose=verbose)
        self._setup(manifest, engine, mem, max_batch, max_seq_len or capacity, cuda_graphs)

    @classmethod
    def open(
        cls, manifest: Manifest, *, device: str = "cpu", max_batch: int = 1, max_seq_len: int | None = None
    ) -> TrtBackend:
        """An engine runs on GPU 0 whatever ``device`` names (the CLI's default is 'cpu', meant for ONNX Runtime)."""
        return cls(manifest, max_batch=max_batch, max_seq_len=max_seq_len)

    @classmethod
    def from_parts(
        cls,
        manifest: Manifest,
        engine,
        mem,
        *,
        max_batch: int = 1,
        max_seq_len: int | None = None,
        cuda_graphs: bool = True,
        capacity: int | None = None,
    ) -> TrtBackend:
        """A backend over a given engine and memory (the constructor's checks are the caller's business)."""
        self = cls.__new__(cls)
        self._setup(manifest, engine, mem, max_batch, max_seq_len or capacity, cuda_graphs)
        return self

    def _setup(self, manifest: Manifest, engine, mem, max_batch: int, max_seq_len: int | None, cuda_graphs: bool):
        self.manifest, self.engine, self.mem = manifest, engine, mem
        self.spec, self.io = manifest.spec, manifest.io
        info = manifest.get("tensorrt") or {}
        self.batch_limit = int(info.get("max_batch", max_batch))
        if any(layer.get("ring") for layer in info.get("layers", [])):
            raise BundleError(
                f"{manifest.root}: the engine uses ring-buffer caches, which this backend does not allocate yet"
            )
        self.itemsize = _ITEMSIZE[manifest.dtype]
        self.use_graphs = bool(cuda_graphs and getattr(mem, "supports_graphs", False))
        self._graphs: dict[int, Any] = {}
        self._decode_seen: set[int] = set()
        self._bound: list[dict | None] = [None, None]  # per profile: last (shapes, addresses)
        self._decode_inputs: dict[int, dict[str, np.ndarray]] = {}  # per row count, filled in place
        self.buffers = _Buffers(mem)
        self._caches: list[int] = []
        self.allocate(max_batch, self.io.default_context(max_seq_len))

    # ---- buffers ------------------------------------------------------------------------------------------
    def _allocate(self, max_batch: int, max_seq_len: int) -> None:
        self._drop_graphs()
        for ptr in self._caches:
            self.mem.free(ptr)
        shapes = self.io.cache_shapes(max_batch, max_seq_len)
        self._row_bytes = [int(np.prod(shape[1:])) * self.itemsize for shape in shapes]
        self._caches = []
        for row_bytes in self._row_bytes:
            ptr = self.mem.alloc(max_batch * row_bytes)
            self.mem.zero(ptr, max_batch * row_bytes)
            self._caches.append(ptr)
        self._bound = [None, None]
        self.mem.sync()

    def close(self) -> None:
        self._drop_graphs()
        for ptr in self._caches:
            self.mem.free(ptr)
        self._caches = []
        self.buffers.release()
        close = getattr(self.mem, "close", None)
        if close:
            close()

    def _drop_graphs(self) -> None:
        for g in self._graphs.values():
            self.mem.destroy_graph(g)
        self._graphs.clear()
        self._decode_seen.clear()

    # ---- one step -----------------------------------------------------------------------------------------
    def _step(self, r0: int, inputs: dict[str, np.ndarray], decode: bool) -> np.ndarray:
        """Run the engine over rows [r0, r0+B) with the decode or the prefill profile: inputs are GraphIO host
        arrays; returns (B, K, vocab) float32 logits."""
        s = self.spec
        profile = PROFILE_DECODE if decode else PROFILE_PREFILL
        B, K = inputs["logits_index"].shape
        logits = np.empty((B, K, s.vocab_size), dtype=np.float32)
        generation = self.buffers.generation
        ptrs = {name: self.buffers.get(name, max(arr.nbytes, self._min_bytes(name))) for name, arr in inputs.items()}
        ptrs["logits"] = self.buffers.get("logits", max(logits.nbytes, self.max_batch * s.vocab_size * 4))
        if self.buffers.generation != generation:
            self._drop_graphs()
        for name, arr in inputs.items():
            self.mem.upload(ptrs[name], arr)
        shapes = {name: arr.shape for name, arr in inputs.items()}
        for k, past, present, shape in self.io.cache_views(B, self.max_seq_len):
            ptrs[past] = ptrs[present] = self._caches[k] + r0 * self._row_bytes[k]  # in place
            shapes[past] = shape
        key = profile == PROFILE_DECODE and r0 == 0 and self.use_graphs
        if key and B in self._graphs:
            self.mem.launch(self._graphs[B])
        else:
            # TensorRT wants one ordinary execution after shapes or addresses change before a capture.
            changed = self._bind(profile, shapes, ptrs)
            if key and B in self._decode_seen and not changed:
                try:
                    self._graphs[B] = self.mem.capture(lambda: self.engine.execute(profile, self.mem.stream_handle))
                    self.mem.launch(self._graphs[B])
                except RuntimeError as e:
                    log.warning("CUDA graph capture of the decode step failed (%s); running without graphs", e)
                    self.use_graphs = False
                    self._drop_graphs()
                    self._bound[profile] = None
                    self._bind(profile, shapes, ptrs)
                    self.engine.execute(profile, self.mem.stream_handle)
            else:
                self.engine.execute(profile, self.mem.stream_handle)
                if key:
                    self._decode_seen.add(B)
        self.mem.download(logits, ptrs["logits"])
        self.mem.sync()
        return logits

    def _min_bytes(self, name: str) -> int:
        # Decode-sized inputs never reallocate, so decode graphs stay valid.
        return {"input_ids": 8, "logits_index": 8, "seqlens_k": 4}.get(name, 4) * self.max_batch

    def _bind(self, profile: int, shapes: dict[str, tuple], ptrs: dict[str, int]) -> bool:
        """Set shapes and addresses on the profile's context (only what changed since its last step).
        Returns whether anything changed."""
        last = self._bound[profile] or {"shapes": {}, "ptrs": {}}
        changed = False
        for name, shape in shapes.items():
            if last["shapes"].get(name) != shape:
                self.engine.set_input_shape(profile, name, shape)
                changed = True
        for name, ptr in ptrs.items():
            if last["ptrs"].get(name) != ptr:
                self.engine.set_tensor_address(profile, name, ptr)
                changed = True
        self._bound[profile] = {"shapes": dict(shapes), "ptrs": dict(ptrs)}
        return changed

    # ---- Backend API --------------------------------------------------------------------------------------
    def _decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One token per slot, batched over rows [0, max(slots)]; rows not decoding get a dummy token written
        just past their end (where their next token goes anyway), as in the ONNX Runtime backend."""
        rows = max(slots) + 1
        slots_arr = np.asarray(slots)
        ids = np.zeros(rows, dtype=np.int64)
        ids[slots_arr] = tokens
        seqlens = np.minimum(self.lengths[:rows], self.max_seq_len - 1)
        seqlens[slots_arr] = self.lengths[slots_arr]
        inputs = self._decode_inputs.get(rows)
        if inputs is None:
            inputs = self._decode_inputs[rows] = GraphIO.decode_inputs(rows)
        GraphIO.fill_decode(inputs, ids, seqlens)
        logits = self._step(0, inputs, decode=True)
        self.lengths[slots_arr] += 1
        return logits[slots_arr, 0]


def _register_plugins() -> None:
    """Register our TensorRT plugins before deserializing (engines whose plugins run Python need them)."""
    try:
        from .plugin import register_plugins

        register_plugins()
    except (ImportError, RuntimeError) as e:
        # AOT plugin kernels are inside the engine: nothing to register for them.
        log.info("exaone_deploy TensorRT plugins not registered (%s); relying on the engine's AOT kernels", e)
