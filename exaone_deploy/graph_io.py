"""The graph I/O contract of a decoder bundle, derived once from the ``ModelSpec`` and the export options.

Every module that names a graph input or output, sizes a KV cache, or builds the inputs of a step goes through
``GraphIO``: the exporter (input/output names, dynamic dims), the lowering passes (which cache belongs to which
layer, window-sized cache lengths), the manifest (``io`` section), both backends and the calibration statistics
(step inputs, cache shapes), and the TensorRT engine builder (profile shapes). This is the only module of the
package that spells a KV-cache tensor name.

The step contract (docs/bundle.md) is four inputs besides the caches:

* ``input_ids`` (batch, sequence) int64, right-padded on a prompt step;
* ``seqlens_k`` (batch,) int32: tokens in the row after this step, minus one;
* ``total_sequence_length`` () int32: max over rows of ``seqlens_k + 1``;
* ``logits_index`` (batch, logits_len) int64: positions of the chunk whose logits are returned.

The KV cache holds ``dtype`` elements, or int8 with ``kv_cache="int8"`` (ONNX Runtime's GroupQueryAttention
quantizes K and V per channel on write and dequantizes on read; the per-layer scales are the initializers named
by ``kv_scale_name``, shape ``kv_scale_shape``). ``cache_bytes`` / ``manifest_io`` report what a cache costs per
token and at 4k, 16k and the longest context.

Alternatives rejected: optimum's ``OnnxConfig`` subclass hierarchy (one model family, one contract: a frozen
dataclass is enough), and keeping the names in the manifest only (the exporter and the lowering need them before
a manifest exists).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError
from .spec import ModelSpec

__all__ = [
    "GraphIO",
    "HeadIO",
    "graph_io_of",
    "DEFAULT_CONTEXT",
    "STEP_INPUTS",
    "HEAD_INPUTS",
    "KV",
    "KV_CACHE_TYPES",
    "KV_QUANT_TYPE",
    "REPORT_CONTEXTS",
]

DEFAULT_CONTEXT = 4096  # runtime cache capacity when none is asked for (capped by the bundle's max_seq_len)
STEP_INPUTS = ("input_ids", "seqlens_k", "total_sequence_length", "logits_index")
LOGITS = "logits"
KV = ("key", "value")
_PAST, _PRESENT = "past_key_values", "present"
RUNTIME_CACHE_LEN = "cache_len"  # symbolic cache length of full-length (runtime-sized) caches
_KV_SCALE = "kv_scale"
KV_CACHE_TYPES = ("float", "int8")  # float: the bundle dtype; int8: quantized per channel by the attention op
KV_QUANT_TYPE = "PER_CHANNEL"  # GroupQueryAttention k_quant_type / v_quant_type of an int8 cache
REPORT_CONTEXTS = (4096, 16384)  # context lengths whose cache bytes the manifest lists (besides max_seq_len)


@dataclass(frozen=True)
class GraphIO:
    spec: ModelSpec
    dtype: str = "float32"
    max_seq_len: int = 0
    window_cache: bool = False  # sliding layers hold window-sized caches (ort target)
    kv_cache: str = "float"  # KV_CACHE_TYPES
    kv_scales: str = ""  # int8 cache: where the scales came from (recorded in the manifest)

    def __post_init__(self):
        if self.kv_cache not in KV_CACHE_TYPES:
            raise InputError(f"unknown KV cache type {self.kv_cache!r} (choose from {', '.join(KV_CACHE_TYPES)})")

    # ---- names ----------------------------------------------------------------------------------
    @staticmethod
    def past_name(layer: int | str, kv: str) -> str:
        return f"{_PAST}.{layer}.{kv}"  # layer "%d": the template genai_config.json takes

    @staticmethod
    def present_name(layer: int | str, kv: str) -> str:
        return f"{_PRESENT}.{layer}.{kv}"

    def cache_pairs(self) -> Iterator[tuple[int, str, str, str]]:
        """(layer, kv, past name, present name) for every cache tensor, in graph order."""
        for i in range(self.spec.num_layers):
            for kv in KV:
                yield i, kv, self.past_name(i, kv), self.present_name(i, kv)

    @property
    def input_names(self) -> list[str]:
        return [*STEP_INPUTS, *(p for _, _, p, _ in self.cache_pairs())]

    @property
    def output_names(self) -> list[str]:
        return [LOGITS, *(q for _, _, _, q in self.cache_pairs())]

    @staticmethod
    def kv_scale_name(layer: int, kv: str) -> str:
        """The initializer holding the int8 cache scale of layer ``layer``'s K or V (``kv`` in ``KV``)."""
        return f"{_KV_SCALE}.{layer}.{kv}"

    @staticmethod
    def cache_layer(name: str) -> int | None:
        """The layer of a past/present cache tensor name, or None for any other name."""
        parts = name.split(".")
        if len(parts) == 3 and parts[0] in (_PAST, _PRESENT) and parts[2] in KV and parts[1].isdigit():
            return int(parts[1])
        return None

    @staticmethod
    def present_of(past: str) -> str | None:
        """The present output that aliases a past input (None when ``past`` is no cache input)."""
        return _PRESENT + past[len(_PAST) :] if past.startswith(_PAST + ".") else None

    @staticmethod
    def is_cache(name: str) -> bool:
        return GraphIO.cache_layer(name) is not None

    # ---- dims -----------------------------------------------------------------------------------
    def dim_names(self, name: str) -> tuple[str | None, ...] | None:
        """Names of the dynamic axes of an input/output (None for a static axis)."""
        fixed = {
            "input_ids": ("batch", "sequence"),
            "seqlens_k": ("batch",),
            "logits_index": ("batch", "logits_len"),
            LOGITS: ("batch", "logits_len", None),
        }
        if name in fixed:
            return fixed[name]
        if self.is_cache(name):
            return ("batch", None, RUNTIME_CACHE_LEN, None)
        return None

    @property
    def cache_lengths(self) -> list[int | str]:
        """Per layer: the fixed window W (window-sized cache) or ``"cache_len"`` (chosen by the runtime)."""
        return [
            layer.window if (self.window_cache and layer.sliding) else RUNTIME_CACHE_LEN for layer in self.spec.layers
        ]

    def cache_lengths_at(self, capacity: int) -> list[int]:
        """Per layer, the cache length when the runtime-sized caches hold ``capacity`` tokens."""
        return [capacity if n == RUNTIME_CACHE_LEN else int(n) for n in self.cache_lengths]

    def cache_len(self, layer: int, capacity: int) -> int:
        return self.cache_lengths_at(capacity)[layer]

    def cache_shape(self, layer: int, batch: int, capacity: int) -> tuple[int, int, int, int]:
        s = self.spec
        return (batch, s.num_kv_heads, self.cache_len(layer, capacity), s.head_dim)

    @property
    def cache_dtype(self) -> str:
        """The element type of the cache buffers: ``int8`` for a quantized cache, else the bundle dtype."""
        return "int8" if self.kv_cache == "int8" else self.dtype

    @property
    def kv_scale_shape(self) -> tuple[int, int, int, int]:
        """Per-channel scales broadcast over (batch, kv_heads, cache_len, head_dim): one per KV channel."""
        return (1, self.spec.num_kv_heads, 1, self.spec.head_dim)

    @property
    def cache_bytes_per_token(self) -> int:
        """Cache bytes one token adds (K and V of every layer; sliding layers stop growing at their window)."""
        return self.spec.kv_cache_bytes(1, bytes_per_elem=self.cache_dtype)

    def cache_bytes(self, context: int, batch: int = 1) -> int:
        """Bytes of all cache buffers holding ``context`` tokens per row (window-sized where this bundle is)."""
        return self.spec.kv_cache_bytes(context, batch, self.cache_dtype, windowed=self.window_cache)

    def cache_shapes(self, batch: int, capacity: int) -> list[tuple[int, int, int, int]]:
        """The shape of every cache tensor over ``batch`` rows, in ``cache_pairs`` order (K then V per layer)."""
        return [self.cache_shape(i, batch, capacity) for i, _, _, _ in self.cache_pairs()]

    def cache_views(self, rows: int, capacity: int) -> Iterator[tuple[int, str, str, tuple[int, int, int, int]]]:
        """(k, past name, present name, shape over ``rows`` rows) per cache tensor; k indexes ``cache_shapes``.

        A backend binds past and present of tensor k to the same memory (the rows of its buffer k from the
        step's first row on): the op updates the cache in place."""
        for k, (i, _, past, present) in enumerate(self.cache_pairs()):
            yield k, past, present, self.cache_shape(i, rows, capacity)

    def profile_shapes(
        self, max_batch: int, max_seq_len: int, prefill_opt_len: int | None = None
    ) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
        """(min, opt, max) shapes of every dynamic input for a TensorRT engine's prefill and decode profiles.

        ``total_sequence_length`` is a scalar (no dynamic dimension) and needs no profile entry. A cache of
        fixed (window) length has that length at min, opt and max."""
        B, C = max_batch, max_seq_len
        opt_s = min(C, prefill_opt_len or 256)
        prefill = {
            "input_ids": ((1, 1), (1, opt_s), (B, C)),
            "seqlens_k": ((1,), (1,), (B,)),
            "logits_index": ((1, 1), (1, 1), (B, C)),
        }
        decode = {
            "input_ids": ((1, 1), (B, 1), (B, 1)),
            "seqlens_k": ((1,), (B,), (B,)),
            "logits_index": ((1, 1), (B, 1), (B, 1)),
        }
        for i, _, past, _ in self.cache_pairs():
            _, heads, n, h = self.cache_shape(i, B, C)
            lo = 1 if self.cache_lengths[i] == RUNTIME_CACHE_LEN else n
            for prof, opt_b in ((prefill, 1), (decode, B)):
                prof[past] = ((1, heads, lo, h), (opt_b, heads, n, h), (B, heads, n, h))
        return [prefill, decode]

    def default_context(self, requested: int | None = None) -> int:
        """The runtime cache capacity: ``requested``, else min(max_seq_len, DEFAULT_CONTEXT)."""
        return int(requested) if requested else min(self.max_seq_len, DEFAULT_CONTEXT)

    # ---- step inputs ------------------------------------------------------------------------------
    @staticmethod
    def prefill_inputs(
        prompts: Sequence[Sequence[int]], all_logits: bool = False
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """A prompt step over fresh rows, right-padded with 0: (inputs, per-row lengths). Logits of each row's
        last token, or (``all_logits``) of every position of the padded chunk."""
        lens = np.array([len(p) for p in prompts], dtype=np.int64)
        ids = np.zeros((len(prompts), int(lens.max())), dtype=np.int64)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p
        inputs = {
            "input_ids": ids,
            "seqlens_k": (lens - 1).astype(np.int32),
            "total_sequence_length": np.array(ids.shape[1], dtype=np.int32),
            "logits_index": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
            if all_logits
            else (lens - 1)[:, None],
        }
        return inputs, lens

    @staticmethod
    def extend_inputs(past: int, tokens: Sequence[int], all_logits: bool = False) -> dict[str, np.ndarray]:
        """One row holding ``past`` tokens gets ``tokens`` appended (logits of every position or the last)."""
        S = len(tokens)
        return {
            "input_ids": np.asarray(tokens, dtype=np.int64)[None],
            "seqlens_k": np.array([past + S - 1], dtype=np.int32),
            "total_sequence_length": np.array(past + S, dtype=np.int32),
            "logits_index": (np.arange(S) if all_logits else np.array([S - 1]))[None].astype(np.int64),
        }

    @staticmethod
    def decode_inputs(rows: int) -> dict[str, np.ndarray]:
        """Buffers of a decode step over ``rows`` rows (filled per step by ``fill_decode``)."""
        return {
            "input_ids": np.zeros((rows, 1), dtype=np.int64),
            "seqlens_k": np.zeros(rows, dtype=np.int32),
            "total_sequence_length": np.array(1, dtype=np.int32),
            "logits_index": np.zeros((rows, 1), dtype=np.int64),
        }

    @staticmethod
    def fill_decode(inputs: dict[str, np.ndarray], tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Fill decode buffers in place: row r appends ``tokens[r]`` after ``lengths[r]`` held tokens."""
        inputs["input_ids"][:, 0] = tokens
        inputs["seqlens_k"][:] = lengths
        inputs["total_sequence_length"][...] = int(lengths.max()) + 1

    # ---- manifest -------------------------------------------------------------------------------
    def manifest_io(self) -> dict[str, Any]:
        """The manifest's ``io`` section (docs/bundle.md)."""
        s, dtype = self.spec, self.cache_dtype
        kv = ["batch", s.num_kv_heads, RUNTIME_CACHE_LEN, s.head_dim]
        return {
            "inputs": [
                {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
                {
                    "name": "seqlens_k",
                    "dtype": "int32",
                    "shape": ["batch"],
                    "doc": "tokens in the row after this step, minus one",
                },
                {
                    "name": "total_sequence_length",
                    "dtype": "int32",
                    "shape": [],
                    "doc": "max over rows of seqlens_k + 1; equal to sequence on a prompt step",
                },
                {
                    "name": "logits_index",
                    "dtype": "int64",
                    "shape": ["batch", "logits_len"],
                    "doc": "positions in the chunk whose logits are returned",
                },
                {"name": f"{_PAST}.{{i}}.key|value", "dtype": dtype, "shape": kv},
            ],
            "outputs": [
                {"name": LOGITS, "dtype": "float32", "shape": ["batch", "logits_len", s.vocab_size]},
                {
                    "name": f"{_PRESENT}.{{i}}.key|value",
                    "dtype": dtype,
                    "shape": kv,
                    "doc": "the past buffers updated in place (bind the same memory)",
                },
            ],
            "cache": self._manifest_cache(),
        }

    def _manifest_cache(self) -> dict[str, Any]:
        s = self.spec
        contexts = sorted({c for c in REPORT_CONTEXTS if c < self.max_seq_len} | {self.max_seq_len})
        cache = {
            "layout": "BNSH",
            "dtype": self.cache_dtype,
            "num_kv_heads": s.num_kv_heads,
            "head_dim": s.head_dim,
            "max_len": self.max_seq_len,
            "in_place": True,
            "window_cache": self.window_cache,
            "per_layer_len": self.cache_lengths,
            "bytes_per_token": self.cache_bytes_per_token,
            "bytes": {str(c): self.cache_bytes(c) for c in contexts},
        }
        if self.kv_cache == "int8":
            cache["quant"] = {
                "type": KV_QUANT_TYPE,
                "bit_width": 8,
                "scales": self.kv_scales,
                "scale_inputs": f"{_KV_SCALE}.{{i}}.key|value",
                "scale_shape": list(self.kv_scale_shape),
            }
        return cache

    @classmethod
    def from_manifest_data(cls, spec: ModelSpec, data: dict[str, Any]) -> GraphIO:
        cache = data.get("io", {}).get("cache", {})
        cache_dtype = cache.get("dtype", data["dtype"])  # manifests before int8 caches: the bundle dtype
        if cache_dtype not in (data["dtype"], "int8"):
            raise InputError(
                f"manifest field 'io.cache.dtype': expected {data['dtype']!r} or 'int8', got {cache_dtype!r}"
            )
        quant = cache.get("quant") if isinstance(cache.get("quant"), dict) else {}
        return cls(
            spec,
            dtype=data["dtype"],
            max_seq_len=int(data["max_seq_len"]),
            window_cache=bool(cache.get("window_cache")),
            kv_cache="int8" if cache_dtype == "int8" else "float",
            kv_scales=str(quant.get("scales", "")),
        )

    def profile_summary(self, profile: dict[str, Any]) -> dict[str, Any]:
        """A profile as recorded in an engine manifest: the step inputs, and the caches once as
        ``past_key_values.*``."""
        summary = {k: v for k, v in profile.items() if not self.is_cache(k)}
        summary[f"{_PAST}.*"] = profile[self.past_name(0, KV[0])]
        return summary


# ---- task heads (prompt-only graphs) -------------------------------------------------------------------

HEAD_INPUTS = ("input_ids", "attention_lengths")


@dataclass(frozen=True)
class HeadIO(GraphIO):
    """The graph I/O of a task-head bundle (sequence/token classification, extractive QA): one prompt step,
    no KV cache in or out (exporter/heads.py has the model side of the contract).

    * ``input_ids`` (batch, sequence) int64, rows right-padded; ``attention_lengths`` (batch,) int32, the real
      tokens of each row (1..sequence);
    * float32 ``logits`` (batch, num_labels) for sequence classification, ``logits`` (batch, sequence,
      num_labels) for token classification, ``start_logits`` and ``end_logits`` (batch, sequence) for QA.

    A subclass of :class:`GraphIO` only so that the lowering passes, which find an attention node's layer by
    the name of its past-key input (``cache_layer``), lower a head graph unchanged: the head exporter names the
    zero caches it makes inside the graph with the decoder's past names. Window-sized caches never apply
    (each prompt step has caches of its own length). Rejected: cache inputs the runtime fills with zeros (a
    contract to keep for nothing: a prompt step never reads a past) and a second set of passes.
    """

    window_cache: bool = False

    @property
    def task(self) -> str:
        return self.spec.head.task

    @property
    def input_names(self) -> list[str]:
        return list(HEAD_INPUTS)

    @property
    def output_names(self) -> list[str]:
        return ["start_logits", "end_logits"] if self.task == "question-answering" else [LOGITS]

    def dim_names(self, name: str) -> tuple[str | None, ...] | None:
        if name == "input_ids":
            return ("batch", "sequence")
        if name == "attention_lengths":
            return ("batch",)
        if name in self.output_names:
            return tuple(d if isinstance(d, str) else None for d in self.output_shape(name))
        return None

    def output_shape(self, name: str) -> list[Any]:
        if self.task == "sequence-classification":
            return ["batch", self.spec.head.num_labels]
        if self.task == "token-classification":
            return ["batch", "sequence", self.spec.head.num_labels]
        return ["batch", "sequence"]

    @staticmethod
    def head_inputs(rows: Sequence[Sequence[int]], pad_id: int | None) -> dict[str, np.ndarray]:
        """Right-pad token rows with ``pad_id`` (0 if None) into the graph's two inputs."""
        if len(rows) == 0 or any(len(r) == 0 for r in rows):
            raise ValueError("every input needs at least one token")
        lengths = np.array([len(r) for r in rows], dtype=np.int32)
        ids = np.full((len(rows), int(lengths.max())), 0 if pad_id is None else pad_id, dtype=np.int64)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
        return {"input_ids": ids, "attention_lengths": lengths}

    def manifest_io(self) -> dict[str, Any]:
        head = self.spec.head
        return {
            "inputs": [
                {
                    "name": "input_ids",
                    "dtype": "int64",
                    "shape": ["batch", "sequence"],
                    "doc": "rows right-padded (with the pad token id)",
                },
                {
                    "name": "attention_lengths",
                    "dtype": "int32",
                    "shape": ["batch"],
                    "doc": "real tokens of each row (1..sequence)",
                },
            ],
            "outputs": [{"name": n, "dtype": "float32", "shape": self.output_shape(n)} for n in self.output_names],
            "head": {
                "task": head.task,
                "labels": list(head.labels),
                "problem_type": head.problem_type,
                "pad_token_id": head.pad_token_id,
            },
        }

    @classmethod
    def from_manifest_data(cls, spec: ModelSpec, data: dict[str, Any]) -> HeadIO:
        return cls(spec, dtype=data["dtype"], max_seq_len=int(data["max_seq_len"]))


def graph_io_of(
    spec: ModelSpec,
    dtype: str,
    max_seq_len: int,
    window_cache: bool = False,
    kv_cache: str = "float",
    kv_scales: str = "",
) -> GraphIO:
    """The I/O contract of a graph of ``spec``: a :class:`HeadIO` for a task head (no KV cache), else the
    decoder's."""
    if not spec.head.is_lm:
        return HeadIO(spec, dtype, max_seq_len)
    return GraphIO(spec, dtype, max_seq_len, window_cache, kv_cache=kv_cache, kv_scales=kv_scales)
