"""The bundle: a directory with the ONNX model(s), weights, tokenizer files and a JSON manifest.

The format is specified in docs/bundle.md. This module is pure Python (no torch, no onnx): the runtime uses it
to open and verify bundles; every writer of a directory (export, quantize, build, ``tiny/``, the benchmarks)
stages it with ``atomic_dir`` and finishes a bundle with ``finish_bundle`` (tokenizer files, then the manifest,
whose ``io`` section comes from :class:`~exaone_deploy.graph_io.GraphIO`). The ONNX part of writing a bundle
(save canonical, lower, check) is :mod:`exaone_deploy.exporter.writer`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .graph_io import GraphIO
from .spec import ModelSpec

__all__ = ["BundleError", "Manifest", "load_manifest", "write_manifest", "copy_tokenizer_files", "finish_bundle",
           "atomic_dir", "is_checkpoint_dir", "FORMAT", "FORMAT_VERSION"]

FORMAT = "exaone-deploy-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "config.json")


class BundleError(ValueError):
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
    """Copy the tokenizer/config files present in ``src``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def write_manifest(root: Path, *, io: GraphIO, target: str, model_file: str, canonical_file: str | None,
                   weights_file: str | None, source_dir: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``root/manifest.json`` (atomically) listing the sha256 of every other file in ``root``."""
    spec = io.spec
    files = sorted(p.name for p in root.iterdir() if p.is_file() and p.name != MANIFEST)
    data: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "target": target,
        "dtype": io.dtype,
        "max_seq_len": io.max_seq_len,
        "source": {"config_sha256": spec.config_sha256, "name": source_dir.name},
        "spec": spec.to_json(),
        "layers": [{"index": l.index, "kind": l.kind, "window": l.window, "rope": l.rope} for l in spec.layers],
        "io": io.manifest_io(),
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


def finish_bundle(root: Path, io: GraphIO, *, target: str, model_file: str, source_dir: Path,
                  tokenizer_dirs: tuple[Path, ...] = (), canonical_file: str | None = None,
                  weights_file: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The last steps of writing any bundle into its staging directory ``root``: the tokenizer files of the first
    of ``tokenizer_dirs`` (default: ``source_dir``) that has any, then the manifest (written last: a directory
    without one is no bundle)."""
    for d in tokenizer_dirs or (source_dir,):
        if copy_tokenizer_files(Path(d), root):
            break
    return write_manifest(root, io=io, target=target, model_file=model_file, canonical_file=canonical_file,
                          weights_file=weights_file, source_dir=source_dir, extra=extra)


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, force: bool = False, replaceable: Callable[[Path], bool] | None = None,
               error: type[Exception] = BundleError) -> Iterator[Path]:
    """Yield a fresh sibling directory of ``out`` (mode 0755) to write into; when the block succeeds it
    replaces ``out`` atomically (a rename), when it fails (any exception, KeyboardInterrupt included) it is
    removed and ``out`` is left as it was.

    An existing ``out`` is replaced only with ``force``, or when ``replaceable(out)`` says so (``tiny/``
    replaces an empty or checkpoint directory); otherwise ``error`` is raised before anything is written, as it
    is when the parent cannot be written. The one place that stages and commits a directory (export, quantize,
    build, ``tiny/``, the benchmarks). Rejected: writing in place (an interrupted export would leave a
    half-bundle that looks like one) and a lock file (a rename is atomic on one file system, which a sibling is).
    """
    out = Path(out)
    if out.exists() and not (force or (replaceable is not None and replaceable(out))):
        hint = "use --force to replace it" if replaceable is None else "refusing to replace it"
        raise error(f"{out}: output already exists ({hint})")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes it 0700
    except OSError as e:
        if issubclass(error, OSError):
            raise
        raise error(f"{out}: cannot write the output directory ({e.strerror or e})") from None
    try:
        yield tmp
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, out: Path) -> None:
    """Move a finished directory into place; an existing ``out`` is first renamed aside, then deleted."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def is_checkpoint_dir(path: Path) -> bool:
    """An empty directory or one holding a checkpoint (config.json): what ``tiny/`` may overwrite."""
    return path.is_dir() and (not any(path.iterdir()) or (path / "config.json").exists())
