"""The bundle: a directory with the ONNX model(s), weights, tokenizer files and a JSON manifest.

The format is specified in docs/bundle.md. This module is pure Python (no torch): the runtime uses it
to open and verify bundles, the exporter to write them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import ExaoneDeployError
from .graph_io import GraphIO
from .spec import ModelSpec

__all__ = ["BundleError", "Manifest", "load_manifest", "write_manifest", "copy_tokenizer_files", "commit_dir", "staged_dir",
           "FORMAT", "FORMAT_VERSION"]

FORMAT = "exaone-deploy-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "config.json")


class BundleError(ExaoneDeployError, ValueError):
    pass


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tool_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("exaone-deploy", "torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


class Manifest:
    def __init__(self, root: Path, data: dict[str, Any]):
        self.root, self.data = root, data
        self.spec = ModelSpec.from_json(data["spec"])

    @property
    def target(self) -> str:
        return self.data["target"]

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def max_seq_len(self) -> int:
        return int(self.data["max_seq_len"])

    @property
    def io(self) -> GraphIO:
        """The graph I/O contract of this bundle (names, cache shapes, step inputs)."""
        return GraphIO.from_manifest_data(self.spec, self.data)

    @property
    def cache_lengths(self) -> list[int | str]:
        """Per layer: a fixed window-sized cache length, or "cache_len" (runtime-chosen)."""
        return self.io.cache_lengths

    @property
    def model_path(self) -> Path:
        return self.root / self.data["files"]["model"]

    def get(self, key: str, default=None):
        return self.data.get(key, default)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def io_spec(spec: ModelSpec, dtype: str, max_seq_len: int, window_cache: bool = False) -> dict[str, Any]:
    return GraphIO(spec, dtype, max_seq_len, window_cache).manifest_io()


def write_manifest(root: Path, *, spec: ModelSpec, target: str, dtype: str, max_seq_len: int, model_file: str,
                   canonical_file: str | None, weights_file: str | None, source_dir: Path,
                   window_cache: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    files = sorted(p.name for p in root.iterdir() if p.is_file() and p.name != MANIFEST)
    data: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "target": target,
        "dtype": dtype,
        "max_seq_len": max_seq_len,
        "source": {"config_sha256": spec.config_sha256, "name": source_dir.name},
        "spec": spec.to_json(),
        "layers": [{"index": l.index, "kind": l.kind, "window": l.window, "rope": l.rope} for l in spec.layers],
        "io": io_spec(spec, dtype, max_seq_len, window_cache),
        "files": {"model": model_file, "canonical": canonical_file, "weights": weights_file},
        "tools": _tool_versions(),
        "sha256": {name: sha256_file(root / name) for name in files},
    }
    if extra:
        data.update(extra)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / MANIFEST)
    return data


def load_manifest(bundle_dir: str | Path, verify: bool = True) -> Manifest:
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    path = root / MANIFEST
    if not path.exists():
        raise BundleError(f"{root}: not a bundle ({MANIFEST} missing; an interrupted export leaves none)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if data.get("format") != FORMAT:
        raise BundleError(f"{path}: not an exaone-deploy bundle manifest")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {data.get('format_version')} is newer than this exaone-deploy "
                          f"supports ({FORMAT_VERSION}); upgrade exaone-deploy")
    if verify:
        for name, digest in data.get("sha256", {}).items():
            f = root / name
            if not f.exists():
                raise BundleError(f"{f}: listed in {MANIFEST} but missing")
            if sha256_file(f) != digest:
                raise BundleError(f"{f}: sha256 mismatch with {MANIFEST} (the file is corrupt or was modified)")
    return Manifest(root, data)


@contextlib.contextmanager
def staged_dir(out: Path, *, replace_checkpoint: bool = False):
    """Yield a temporary sibling of ``out`` to write into; on success it becomes ``out`` atomically.

    With ``replace_checkpoint`` an existing ``out`` that is empty or holds a checkpoint (config.json) is
    replaced; any other existing directory is refused. On failure nothing is left behind.
    """
    out = Path(out).absolute()
    replaceable = out.is_dir() and (not any(out.iterdir()) or (out / "config.json").exists())
    if out.exists() and not (replace_checkpoint and replaceable):
        raise FileExistsError(f"{out} exists and is not a checkpoint directory; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        commit_dir(tmp, out, force=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_dir(tmp: Path, out: Path, force: bool = False) -> None:
    """Atomically move a finished temporary directory into place (replacing ``out`` when forced)."""
    if out.exists():
        if not force:
            raise BundleError(f"{out}: output already exists (use --force to replace it)")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
