"""Safe, lazy loading of EXAONE 4 safetensors checkpoints.

* safetensors only: pickled ``.bin``/``.pt`` files are refused (unpickling runs code from the file).
* One file or shards listed in ``model.safetensors.index.json``.
* Lazy: opening a checkpoint reads only the JSON headers. Each tensor is read on demand straight into
  its destination buffer (``readinto``), so loading costs the weights once and nothing more, and a stage
  that streams tensors (the exporter) holds one tensor at a time.
* Validation against the :class:`~exaone_deploy.spec.ModelSpec`: missing, unexpected and mis-shaped
  tensors are reported together in one error.
* Pre-quantized checkpoints (a ``quantization_config``, see :mod:`exaone_deploy.prequant`): the scheme is read
  when the checkpoint is opened (an unsupported one is refused naming the field), the integer/fp8 dtypes their
  packed tensors use are admitted in the headers, and validation expects each quantized linear's packed
  tensors (``prequant.formats.tensor_shapes``) instead of its float ``weight``. Reading those tensors is
  :mod:`exaone_deploy.prequant`'s business (``read_numpy``/``read_torch`` stay float-only).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ExaoneDeployError
from .spec import ModelSpec

__all__ = ["Checkpoint", "CheckpointError", "TensorInfo", "expected_tensors", "quantized_tensors", "resolve_model_dir"]

_SCRATCH_BYTES = 1 << 24  # dtype conversion chunk
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors dtype -> (numpy storage dtype, torch dtype name, bytes)
_DTYPES = {
    "F32": (np.float32, "float32", 4),
    "F16": (np.float16, "float16", 2),
    "BF16": (np.uint16, "bfloat16", 2),
}
# Extra dtypes a pre-quantized checkpoint's packed tensors use (codes, shapes, fp8 weights): bytes per element.
_QUANT_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1}


class CheckpointError(ExaoneDeployError, ValueError):
    """A checkpoint we refuse to load; the message names the file(s) and the problem(s)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def resolve_model_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    """``tiny`` names the bundled trained model and ``tiny-cls`` its play classifier (``tiny/train_cls.py``); a
    string ``ORG/NAME`` that is not an existing path is a Hugging Face Hub id, resolved to its cached snapshot at
    ``revision`` (see ``hub.py``); anything else is a directory path."""
    if str(name_or_path) in ("tiny", "tiny-cls"):
        from . import assets

        return assets.tiny_model_dir() if str(name_or_path) == "tiny" else assets.assets_dir() / "tiny-cls"
    from . import hub

    if hub.is_repo_id(name_or_path):
        return hub.snapshot(str(name_or_path), revision)
    return Path(name_or_path)


def _read_header(path: Path, quantized: bool = False) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw_len)
        if n > min(size - 8, 100 * 2**20):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} is impossible)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    out = {}
    base = 8 + n
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            ints = [*shape, start, end]
            if (
                not isinstance(meta["shape"], list)
                or any(isinstance(x, bool) or not isinstance(x, int) for x in ints)
                or min(shape, default=0) < 0
                or not 0 <= start <= end
            ):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        itemsize = _DTYPES[dtype][2] if dtype in _DTYPES else _QUANT_DTYPES.get(dtype) if quantized else None
        if itemsize is None:
            raise CheckpointError(
                f"{path}: tensor '{name}' has dtype {dtype}; supported checkpoint dtypes are F32, F16 and BF16"
                + (" (and the packed dtypes of a quantization_config)" if quantized else "")
            )
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        if end - start != nbytes or base + end > size:
            raise CheckpointError(f"{path}: tensor '{name}' data lies outside the file or has the wrong length")
        out[name] = TensorInfo(name, path, dtype, shape, base + start, nbytes)
        spans.append((start, end, name))
    # As the safetensors library does: tensors tile the data area, in order, without overlap or gaps (two
    # entries over the same bytes would let one tensor silently alias another).
    position = 0
    for start, end, name in sorted(spans):
        if start != position:
            what = "overlaps the previous tensor" if start < position else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor '{name}' {what} (data_offsets [{start}, {end}])")
        position = end
    return out


class Checkpoint:
    """Index of the tensors of a safetensors checkpoint directory; reads tensors lazily."""

    def __init__(self, model_dir: str | Path):
        self.dir = resolve_model_dir(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: model directory not found")
        index = self.dir / "model.safetensors.index.json"
        files: list[Path]
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted({self.dir / f for f in weight_map.values()})
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index}: lists shard file(s) that do not exist: {', '.join(missing)}")
        else:
            files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{self.dir}: only pickled weights found ({', '.join(pickles)}). exaone-deploy loads "
                    "safetensors only: unpickling a model file can execute arbitrary code. Convert the weights "
                    "to safetensors in a trusted environment first."
                )
            raise CheckpointError(f"{self.dir}: no *.safetensors weights found")
        from .prequant.config import read_scheme

        self.scheme = read_scheme(self.dir)  # None for a float checkpoint
        self.tensors: dict[str, TensorInfo] = {}
        self._scratch: dict = {}
        for f in files:
            for name, info in _read_header(f, self.scheme is not None).items():
                if name in self.tensors:
                    raise CheckpointError(f"{f}: tensor '{name}' also appears in {self.tensors[name].file}")
                self.tensors[name] = info
        if index.exists():
            wrong = [n for n, f in weight_map.items() if n in self.tensors and self.tensors[n].file.name != f]
            absent = [n for n in weight_map if n not in self.tensors]
            if wrong or absent:
                raise CheckpointError(
                    f"{index}: weight_map disagrees with the shards (missing from shards: {absent[:5]}, "
                    f"in another shard: {wrong[:5]})"
                )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def is_quantized(self, name: str) -> bool:
        """Whether ``name`` ("<module>.weight") is a linear weight this pre-quantized checkpoint stores packed
        (read it with :mod:`exaone_deploy.prequant`, not ``read_torch``)."""
        from .prequant.formats import LINEAR_SUFFIXES

        module, _, leaf = name.rpartition(".")
        return (
            self.scheme is not None
            and leaf == "weight"
            and module.endswith(LINEAR_SUFFIXES)
            and not self.scheme.is_ignored(module)
        )

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def source_dtype(self) -> str:
        """The dominant storage dtype ('float32' | 'float16' | 'bfloat16')."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in _DTYPES:  # a pre-quantized checkpoint's packed tensors say nothing of its float dtype
                counts[t.dtype] = counts.get(t.dtype, 0) + t.nbytes
        return _DTYPES[max(counts, key=counts.get)][1]

    # ---- reading -------------------------------------------------------------------------------
    # Every read checks that the values are finite: a NaN or inf weight makes every logit NaN, and greedy decoding
    # then silently emits token 0. The check is one pass over data that was just read (cheap next to the read).
    def read_numpy(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (bfloat16 comes back as its raw uint16 bits)."""
        info = self.tensors[name]
        arr = np.empty(info.shape, dtype=_DTYPES[info.dtype][0])
        self._readinto(info, arr)
        finite = (arr & 0x7F80) != 0x7F80 if info.dtype == "BF16" else np.isfinite(arr)
        self._check_finite(info, bool(finite.all()))
        return arr

    @staticmethod
    def _check_finite(info: TensorInfo, ok: bool) -> None:
        if not ok:
            raise CheckpointError(f"{info.file}: tensor '{info.name}' contains NaN or infinite values")

    @staticmethod
    def _readinto(info: TensorInfo, arr: np.ndarray) -> None:
        view = memoryview(arr.reshape(-1).view(np.uint8))
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.offset)
            got = 0
            while got < info.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{info.file}: truncated while reading '{info.name}'")
                got += n

    def read_torch(self, name: str, dtype=None):
        """The tensor as a torch tensor, converted to ``dtype`` (a torch dtype) if given.

        A conversion goes through one reused scratch buffer in chunks: no full-size temporary per tensor,
        so loading leaves no holes in the heap (peak memory stays at the converted weights).
        """
        import torch

        info = self.tensors[name]
        src = getattr(torch, _DTYPES[info.dtype][1])
        if dtype is None or dtype == src:
            t = torch.empty(info.shape, dtype=src)
            self._readinto(info, (t.view(torch.int16) if src == torch.bfloat16 else t).numpy())
            self._check_finite(info, bool(torch.isfinite(t).all()))
            return t
        out = torch.empty(info.shape, dtype=dtype)
        flat = out.view(-1)
        itemsize = _DTYPES[info.dtype][2]
        per = max(1, _SCRATCH_BYTES // itemsize)
        scratch = self._scratch.get(src)
        if scratch is None:
            self._scratch = {src: torch.empty(per, dtype=src)}
            scratch = self._scratch[src]
        raw = (scratch.view(torch.int16) if src == torch.bfloat16 else scratch).numpy()
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.offset)
            for start in range(0, flat.numel(), per):
                n = min(per, flat.numel() - start)
                view = memoryview(raw[:n].view(np.uint8))
                got = 0
                while got < n * itemsize:
                    k = f.readinto(view[got:])
                    if not k:
                        raise CheckpointError(f"{info.file}: truncated while reading '{info.name}'")
                    got += k
                flat[start : start + n].copy_(scratch[:n])
                self._check_finite(info, bool(torch.isfinite(scratch[:n]).all()))
        return out

    # ---- validation ----------------------------------------------------------------------------
    def validate(self, spec: ModelSpec) -> None:
        """Raise one CheckpointError listing every missing, unexpected or mis-shaped tensor (the packed tensors of
        the quantized linears in place of their weights, for a pre-quantized checkpoint)."""
        expected, optional_shapes = expected_tensors(spec), {}
        if self.scheme is not None:
            expected, optional_shapes = quantized_tensors(expected, self.scheme)
        problems = []
        missing = [n for n in expected if n not in self.tensors]
        optional = {"lm_head.weight"} if spec.tie_word_embeddings and spec.head.is_lm else set()
        optional |= set(optional_shapes)
        expected_shapes = {**optional_shapes, **expected}
        unexpected = [n for n in self.tensors if n not in expected and n not in optional]
        shapes = [
            f"{n}: expected {list(expected_shapes[n])}, found {list(self.tensors[n].shape)} in "
            f"{self.tensors[n].file.name}"
            for n in expected_shapes
            if n in self.tensors and tuple(self.tensors[n].shape) != tuple(expected_shapes[n])
        ]
        if missing:
            problems.append(f"missing tensors ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            problems.append(f"unexpected tensors ({len(unexpected)}): " + ", ".join(unexpected))
        if shapes:
            problems.append(f"mis-shaped tensors ({len(shapes)}): " + "; ".join(shapes))
        if problems:
            raise CheckpointError(f"{self.dir}: checkpoint does not match config.json:\n  " + "\n  ".join(problems))

    def iter_expected(self, spec: ModelSpec) -> Iterator[tuple[str, tuple[int, ...]]]:
        yield from expected_tensors(spec).items()


def quantized_tensors(
    expected: dict[str, tuple[int, ...]], scheme
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """``expected`` (a float checkpoint's tensors) with each linear ``scheme`` quantizes replaced by its packed
    tensors; returns (required, optional). Linears the scheme leaves unquantized keep their float weight."""
    from .prequant.formats import LINEAR_SUFFIXES, tensor_shapes

    required: dict[str, tuple[int, ...]] = {}
    optional: dict[str, tuple[int, ...]] = {}
    for name, shape in expected.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.endswith(LINEAR_SUFFIXES) and not scheme.is_ignored(module):
            req, opt = tensor_shapes(scheme, module, *shape)
            required.update(req)
            optional.update(opt)
        else:
            required[name] = shape
    return required, optional


def expected_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors of a transformers-format EXAONE 4 checkpoint.

    The backbone sits under the head class's prefix (``model.``, or ``transformer.`` for QA); a task head
    replaces ``lm_head`` by its own layer (see :class:`~exaone_deploy.spec.HeadSpec`).
    """
    d, f, v, hd = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.head_dim
    head, m = spec.head, spec.head.prefix
    out: dict[str, tuple[int, ...]] = {f"{m}.embed_tokens.weight": (v, d)}
    for i in range(spec.num_layers):
        p = f"{m}.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (spec.q_size, d)
        out[p + "self_attn.k_proj.weight"] = (spec.kv_size, d)
        out[p + "self_attn.v_proj.weight"] = (spec.kv_size, d)
        out[p + "self_attn.o_proj.weight"] = (d, spec.q_size)
        out[p + "self_attn.q_norm.weight"] = (hd,)
        out[p + "self_attn.k_norm.weight"] = (hd,)
        out[p + "mlp.gate_proj.weight"] = (f, d)
        out[p + "mlp.up_proj.weight"] = (f, d)
        out[p + "mlp.down_proj.weight"] = (d, f)
        out[p + "post_attention_layernorm.weight"] = (d,)
        out[p + "post_feedforward_layernorm.weight"] = (d,)
    out[f"{m}.norm.weight"] = (d,)
    if not head.is_lm:
        layer, rows = ("qa_outputs", 2) if head.task == "question-answering" else ("score", head.num_labels)
        out[f"{layer}.weight"] = (rows, d)
        if head.bias:
            out[f"{layer}.bias"] = (rows,)
    elif not spec.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    return out
