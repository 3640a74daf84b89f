"""ONNX Runtime backend: one session, KV-cache buffers allocated once, updated in place via IO binding.

The cache of layer i is one buffer of shape (max_batch, kv_heads, L_i, head_dim) per K and V, where L_i is
``capacity`` or, for sliding layers of a bundle exported with window caches, the window W (the op keeps
the last W keys). A step over rows [r0, r1) binds ``past_key_values.i.*`` *and* ``present.i.*`` to the
same memory (GQA's shared past/present buffer), so ONNX Runtime writes the new keys and values in place
and no cache bytes are copied per step. Rows of a C-contiguous buffer are contiguous, so a slot range is a
pointer offset.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from ..bundle import BundleError, Manifest, load_manifest
from .backend import Backend, ContextLengthError
from .hugepages import TUNABLE, hugepage_env

log = logging.getLogger(__name__)

__all__ = ["OrtBackend"]

_NP = {"float32": np.float32, "float16": np.float16}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle: str | Path | Manifest, *, max_batch: int = 1, capacity: int | None = None,
                 device: str = "cpu", threads: int | None = None, verify: bool = True):
        self.manifest = bundle if isinstance(bundle, Manifest) else load_manifest(bundle, verify=verify)
        m = self.manifest
        if m.target != "ort":
            raise BundleError(f"{m.root}: bundle target is {m.target!r}; ONNX Runtime runs 'ort' bundles "
                              f"(use `exaone-deploy build` for TensorRT)")
        if m.dtype not in _NP:
            if m.dtype == "bfloat16" and device == "cpu":
                raise BundleError(f"{m.root}: bfloat16 bundles need the CUDA execution provider "
                                  "(ONNX Runtime's CPU kernels are float32/float16)")
        self.spec = m.spec
        self.device = device
        provider = PROVIDERS.get(device)
        if provider is None:
            raise ValueError(f"unknown device {device!r} (choose from {', '.join(PROVIDERS)})")
        if provider not in ort.get_available_providers():
            raise RuntimeError(f"{provider} is not available in this onnxruntime build "
                               f"(available: {', '.join(ort.get_available_providers())})")
        threads = threads or int(os.environ.get("EXAONE_DEPLOY_THREADS", "0")) or None
        if device == "cpu" and hugepage_env() is not None:
            log.info("weights will sit in 4 KiB pages: start Python with GLIBC_TUNABLES=%s for 2 MiB pages "
                     "(faster decode; the exaone-deploy command does it itself)", TUNABLE)
        self.session = ort.InferenceSession(str(m.model_path), sess_options=session_options(threads),
                                            providers=[provider])
        self.np_dtype = _NP.get(m.dtype, np.float16)
        self.ort_dtype = self.np_dtype if m.dtype != "bfloat16" else None
        self.max_batch = 0
        self.capacity = 0
        self._caches: list[ort.OrtValue] = []
        self._decode_cache: dict[int, tuple] = {}
        self.allocate(max_batch, capacity or min(m.max_seq_len, 4096))

    # ---- buffers ------------------------------------------------------------------------------
    def allocate(self, max_batch: int, capacity: int) -> None:
        """(Re)allocate the KV cache for max_batch slots of capacity tokens (drops slot contents)."""
        if capacity > self.manifest.max_seq_len:
            raise ContextLengthError(f"a context of {capacity} tokens exceeds the bundle's max_seq_len "
                                     f"{self.manifest.max_seq_len}")
        if max_batch == self.max_batch and capacity == self.capacity:
            return
        s = self.spec
        dev = "cuda" if self.device == "cuda" else "cpu"
        self._cache_len = [capacity if n == "cache_len" else int(n) for n in self.manifest.cache_lengths]
        self._caches = []
        for length in self._cache_len:
            shape = (max_batch, s.num_kv_heads, length, s.head_dim)
            self._caches += [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.np_dtype), dev, 0)
                             for _ in range(2)]
        self.max_batch, self.capacity = max_batch, capacity
        self.lengths = np.zeros(max_batch, dtype=np.int64)
        item = np.dtype(self.np_dtype).itemsize
        self._row_bytes = [s.num_kv_heads * length * s.head_dim * item for length in self._cache_len]
        self._decode_cache.clear()

    @property
    def windowed(self) -> bool:
        """Window-sized caches evict on every write, so rows must never see dummy writes."""
        return any(length != self.capacity for length in self._cache_len)

    def cache_bytes(self) -> int:
        return sum(v.numpy().nbytes for v in self._caches) if self.device == "cpu" else \
            sum(2 * self.max_batch * r for r in self._row_bytes)

    def ensure(self, max_batch: int, capacity: int) -> None:
        """Grow the buffers if needed (slot contents are dropped when they are reallocated)."""
        if max_batch > self.max_batch or capacity > self.capacity:
            self.allocate(max(max_batch, self.max_batch), max(capacity, self.capacity))

    # ---- binding ------------------------------------------------------------------------------
    def _bind(self, r0: int, rows: int, inputs: dict[str, np.ndarray], logits: np.ndarray) -> ort.IOBinding:
        s = self.spec
        io = self.session.io_binding()
        for name, arr in inputs.items():
            io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        dev = "cuda" if self.device == "cuda" else "cpu"
        for i in range(s.num_layers):
            shape = [rows, s.num_kv_heads, self._cache_len[i], s.head_dim]
            for j, kv in enumerate(("key", "value")):
                ptr = self._caches[2 * i + j].data_ptr() + r0 * self._row_bytes[i]
                io.bind_input(f"past_key_values.{i}.{kv}", dev, 0, self.np_dtype, shape, ptr)
                io.bind_output(f"present.{i}.{kv}", dev, 0, self.np_dtype, shape, ptr)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        return io

    def _run(self, io: ort.IOBinding) -> None:
        self.session.run_with_iobinding(io)

    # ---- Backend API --------------------------------------------------------------------------
    def _prefill_rows(self, r0: int, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """A prompt step over rows [r0, r0+B): right-padded, caches start empty."""
        ids, lens = self.right_pad(prompts)
        B, S = ids.shape
        inputs = {
            "input_ids": ids,
            "seqlens_k": (lens - 1).astype(np.int32),
            "total_sequence_length": np.array(S, dtype=np.int32),
            "logits_index": (lens - 1)[:, None],
        }
        logits = np.empty((B, 1, self.spec.vocab_size), dtype=np.float32)
        self._run(self._bind(r0, B, inputs, logits))
        self.lengths[r0:r0 + B] = lens
        return logits[:, 0]

    def extend(self, slot: int, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        past = int(self.lengths[slot])
        S = len(tokens)
        self.check_fits(past + S)
        inputs = {
            "input_ids": np.asarray(tokens, dtype=np.int64)[None],
            "seqlens_k": np.array([past + S - 1], dtype=np.int32),
            "total_sequence_length": np.array(past + S, dtype=np.int32),
            "logits_index": (np.arange(S) if all_logits else np.array([S - 1]))[None].astype(np.int64),
        }
        logits = np.empty((1, inputs["logits_index"].shape[1], self.spec.vocab_size), dtype=np.float32)
        self._run(self._bind(slot, 1, inputs, logits))
        self.lengths[slot] = past + S
        return logits[0]

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One token per slot, batched over rows [0, max(slots)].

        Rows in that range that are not decoding get a dummy token written just past their end, where
        their next token goes anyway: harmless for full-length caches and for free rows. Window-sized
        caches evict on each write, so with those, live rows that are not decoding split the batch into
        runs of contiguous rows instead.
        """
        slots_arr = np.asarray(slots)
        new_len = self.lengths[slots_arr] + 1
        if new_len.max() > self.capacity:
            raise ContextLengthError(f"slot context is full ({self.capacity} tokens)")
        want = dict(zip(slots, tokens))
        rows = max(slots) + 1
        if self.windowed:
            blocked = [r for r in range(rows) if r not in want and self.lengths[r] > 0]
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
        return self._decode_rows(0, rows, want, list(slots))

    def _decode_rows(self, r0: int, rows: int, want: dict[int, int], slots: list[int]) -> np.ndarray:
        key = (r0, rows)
        cached = self._decode_cache.get(key)
        if cached is None:
            inputs = {
                "input_ids": np.zeros((rows, 1), dtype=np.int64),
                "seqlens_k": np.zeros(rows, dtype=np.int32),
                "total_sequence_length": np.array(1, dtype=np.int32),
                "logits_index": np.zeros((rows, 1), dtype=np.int64),
            }
            logits = np.empty((rows, 1, self.spec.vocab_size), dtype=np.float32)
            cached = (inputs, logits, self._bind(r0, rows, inputs, logits))
            self._decode_cache[key] = cached
        inputs, logits, io = cached
        idx = np.asarray(slots) - r0
        ids = inputs["input_ids"]
        ids[:, 0] = 0
        ids[idx, 0] = [want[s] for s in slots]
        seqlens = np.minimum(self.lengths[r0:r0 + rows], self.capacity - 1)  # idle rows: write past their end
        seqlens[idx] = self.lengths[slots]
        inputs["seqlens_k"][:] = seqlens
        inputs["total_sequence_length"][...] = seqlens.max() + 1
        self._run(io)
        self.lengths[slots] += 1
        return logits[idx, 0]
