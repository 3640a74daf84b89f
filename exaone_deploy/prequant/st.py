"""Raw safetensors I/O for pre-quantized checkpoints: every dtype they use, NumPy + ml_dtypes only.

:class:`exaone_deploy.checkpoint.Checkpoint` deliberately admits only F32/F16/BF16 (what a float EXAONE
checkpoint holds); pre-quantized ones add I32 (packed codes), I64 (shapes), I8/U8, F8_E4M3 and BF16 scales,
so this reader maps each safetensors dtype to a NumPy one (ml_dtypes for bfloat16 and float8_e4m3fn) and
hands back arrays by name. Rejected: the ``safetensors`` package (an export-extra dependency the torch-free
runtime side should not need, and its NumPy API has no bfloat16).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = ["ST_DTYPES", "SafetensorsDir", "write_safetensors"]

ST_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dt: code for code, dt in ST_DTYPES.items()}


class SafetensorsDir:
    """Tensors of a safetensors checkpoint directory (one file or shards), read by name on demand."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        files = (
            sorted({self.dir / f for f in json.loads(index.read_text())["weight_map"].values()})
            if index.is_file()
            else sorted(self.dir.glob("*.safetensors"))
        )
        if not files:
            raise FileNotFoundError(f"{self.dir}: no *.safetensors weights found")
        self.where: dict[str, tuple[Path, str, tuple[int, ...], int]] = {}
        for path in files:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in ST_DTYPES:
                    raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {meta['dtype']}")
                self.where[name] = (path, meta["dtype"], tuple(meta["shape"]), 8 + n + meta["data_offsets"][0])

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def file_of(self, name: str) -> str:
        return self.where[name][0].name

    def __getitem__(self, name: str) -> np.ndarray:
        path, code, shape, offset = self.where[name]
        count = int(np.prod(shape, dtype=np.int64))
        return np.fromfile(path, dtype=ST_DTYPES[code], count=count, offset=offset).reshape(shape)


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray]) -> int:
    """Write ``tensors`` (sorted by name, data 8-byte aligned) to one file; returns the data bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    arrays = {name: np.ascontiguousarray(tensors[name]) for name in sorted(tensors)}
    for name, a in arrays.items():
        if a.dtype not in _CODES:
            raise ValueError(f"{path}: tensor '{name}' has dtype {a.dtype}, which safetensors cannot store here")
        header[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for a in arrays.values():
            f.write(a.tobytes())
    return offset
