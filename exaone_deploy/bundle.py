"""The bundle: a directory with the ONNX model(s), weights, tokenizer files and a JSON manifest.

The format is specified in docs/bundle.md. This module is pure Python (no torch, no onnx): the runtime uses it
to open and verify bundles; every writer of a directory (export, quantize, build, ``tiny/``, the benchmarks)
stages it with ``atomic_dir`` and finishes a bundle with ``finish_bundle`` (tokenizer files, then the manifest,
whose ``io`` section comes from :class:`~exaone_deploy.graph_io.GraphIO`). The ONNX part of writing a bundle
(save canonical, lower, check) is :mod:`exaone_deploy.exporter.writer`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import hub
from .errors import ExaoneDeployError
from .graph_io import GraphIO
from .spec import LIMITS, ModelSpec

__all__ = [
    "BundleError",
    "Manifest",
    "load_manifest",
    "write_manifest",
    "copy_tokenizer_files",
    "finish_bundle",
    "atomic_dir",
    "is_checkpoint_dir",
    "FORMAT",
    "FORMAT_VERSION",
]

FORMAT = "exaone-deploy-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "config.json",
)


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
    def __init__(self, root: Path, data: dict[str, Any], spec: ModelSpec | None = None):
        self.root, self.data = root, data
        self.spec = spec if spec is not None else ModelSpec.from_json(data["spec"])

    @property
    def target(self) -> str:
        return self.data["target"]

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def max_seq_len(self) -> int:
        return int(self.data["max_seq_len"])

    @functools.cached_property
    def io(self) -> GraphIO:
        """The graph I/O contract of this bundle (names, cache shapes, step inputs), derived once."""
        return GraphIO.from_manifest_data(self.spec, self.data)

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


def write_manifest(
    root: Path,
    *,
    io: GraphIO,
    target: str,
    model_file: str,
    canonical_file: str | None,
    weights_file: str | None,
    source_dir: Path,
    extra: dict[str, Any] | None = None,
    more_files: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``root/manifest.json`` (atomically) listing the sha256 of every other file in ``root``.
    ``more_files``: further ``files`` entries (role -> name), e.g. ``genai`` (exaone_deploy/genai.py)."""
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
        "layers": [{"index": la.index, "kind": la.kind, "window": la.window, "rope": la.rope} for la in spec.layers],
        "io": io.manifest_io(),
        "files": {"model": model_file, "canonical": canonical_file, "weights": weights_file, **(more_files or {})},
        "tools": _tool_versions(),
        "sha256": {name: sha256_file(root / name) for name in files},
    }
    origin = hub.snapshot_origin(source_dir)
    if origin is not None:  # a Hugging Face Hub id: its name and commit, not the snapshot directory's name
        data["source"].update(name=origin["repo_id"], revision=origin["revision"])
    if extra:
        data.update(extra)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / MANIFEST)
    return data


TARGETS = ("ort", "trt", "tensorrt")  # "tensorrt": an engine bundle (tensorrt/backend.py)
_HEX = frozenset("0123456789abcdef")
MAX_FILES = 10_000  # a bundle holds a handful of files; a directory of millions is not one


def bundle_file(root: Path, name: object, what: str) -> Path:
    """``root / name`` for a file name taken from a manifest, confined to the bundle directory.

    A bundle is data, not instructions: a name must be a plain relative path inside ``root`` (no ``..``, no
    absolute path, no symbolic link anywhere on the way), naming a regular file (never a device or a FIFO,
    which would make hashing or loading block forever).
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise BundleError(f"{root / MANIFEST}: {what}: expected a file name, got {name!r}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or name.startswith("~"):
        raise BundleError(f"{root / MANIFEST}: {what}: {name!r} points outside the bundle directory")
    path = root
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            raise BundleError(f"{path}: {what} is a symbolic link; bundle files must be regular files")
    if not path.exists():
        raise BundleError(f"{path}: listed in {MANIFEST} but missing")
    if not path.is_file():
        raise BundleError(f"{path}: {what} is not a regular file")
    return path


def _check_manifest(root: Path, data: object) -> dict[str, Any]:
    """Types and ranges of every manifest field the runtime reads; one BundleError naming the field."""
    path = root / MANIFEST

    def bad(field_name: str, problem: str) -> BundleError:
        return BundleError(f"{path}: field '{field_name}': {problem}")

    if not isinstance(data, dict):
        raise BundleError(f"{path}: not an exaone-deploy bundle manifest (expected a JSON object)")
    if data.get("format") != FORMAT:
        raise BundleError(f"{path}: not an exaone-deploy bundle manifest")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise bad("format_version", f"expected a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format {version} is newer than this exaone-deploy supports "
            f"({FORMAT_VERSION}); upgrade exaone-deploy"
        )
    if data.get("target") not in TARGETS:
        raise bad("target", f"expected one of {', '.join(TARGETS)}, got {data.get('target')!r}")
    if not isinstance(data.get("dtype"), str):
        raise bad("dtype", f"expected a string, got {data.get('dtype')!r}")
    n = data.get("max_seq_len")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= LIMITS["max_position_embeddings"]:
        raise bad("max_seq_len", f"expected a positive integer, got {n!r}")
    files = data.get("files")
    if not isinstance(files, dict) or not isinstance(files.get("model"), str):
        raise bad("files", "expected an object with the model file name under 'model'")
    for key, value in files.items():
        if value is not None:
            bundle_file(root, value, f"files.{key}")
    digests = data.get("sha256", {})
    if not isinstance(digests, dict):
        raise bad("sha256", "expected an object of file name -> digest")
    if len(digests) > MAX_FILES:
        raise bad("sha256", f"lists {len(digests)} files (more than {MAX_FILES})")
    unhashed = [v for v in files.values() if v is not None and v not in digests]
    if unhashed:  # the file that is loaded must be a file that was hashed
        raise bad("sha256", f"has no digest for {', '.join(map(str, unhashed))}")
    for name, digest in digests.items():
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
            raise bad(f"sha256.{name}", f"expected a 64-digit hex sha256, got {digest!r}")
        bundle_file(root, name, f"sha256 entry {name!r}")
    if not isinstance(data.get("io", {}), dict):
        raise bad("io", "expected an object")
    if not isinstance(data.get("spec"), dict):
        raise bad("spec", "expected an object")
    return data


def _spec_of(root: Path, data: dict[str, Any]) -> ModelSpec:
    """The manifest's spec, with the same bounds config.json gets (a hostile one must not size caches)."""
    field_name = f"{root / MANIFEST}: field 'spec'"
    try:
        spec = ModelSpec.from_json(data["spec"])
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise BundleError(f"{field_name}: malformed ({type(e).__name__}: {e})") from None
    sizes = {
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "vocab_size": spec.vocab_size,
        "head_dim": spec.head_dim,
    }
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= LIMITS[key]:
            raise BundleError(f"{field_name}: {key} {value!r} is not a supported size")
    if len(spec.layers) != spec.num_layers or spec.num_heads % spec.num_kv_heads:
        raise BundleError(f"{field_name}: inconsistent layer or head counts")
    for layer in spec.layers:
        if (
            isinstance(layer.window, bool)
            or not isinstance(layer.window, int)
            or not 0 <= layer.window <= LIMITS["sliding_window"]
        ):
            raise BundleError(f"{field_name}: layer {layer.index} window {layer.window!r} is not a supported size")
    return spec


def load_manifest(bundle_dir: str | Path, verify: bool = True) -> Manifest:
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    path = root / MANIFEST
    if not path.exists():
        raise BundleError(f"{root}: not a bundle ({MANIFEST} missing; an interrupted export leaves none)")
    if path.is_symlink() or not path.is_file():
        raise BundleError(f"{path}: not a regular file")
    if path.stat().st_size > 64 * 2**20:
        raise BundleError(f"{path}: {path.stat().st_size} bytes is too large for a manifest")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BundleError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    data = _check_manifest(root, data)
    if verify:
        for name, digest in data.get("sha256", {}).items():
            if sha256_file(root / name) != digest:
                raise BundleError(
                    f"{root / name}: sha256 mismatch with {MANIFEST} (the file is corrupt or was modified)"
                )
    return Manifest(root, data, _spec_of(root, data))


def finish_bundle(
    root: Path,
    io: GraphIO,
    *,
    target: str,
    model_file: str,
    source_dir: Path,
    tokenizer_dirs: tuple[Path, ...] = (),
    canonical_file: str | None = None,
    weights_file: str | None = None,
    extra: dict[str, Any] | None = None,
    before_manifest: Callable[[Path], dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The last steps of writing any bundle into its staging directory ``root``: the tokenizer files of the first
    of ``tokenizer_dirs`` (default: ``source_dir``) that has any, then ``before_manifest(root)`` (files that read
    the tokenizer files; it returns their ``files`` entries, role -> name), then the manifest (written last: a
    directory without one is no bundle), which hashes them all."""
    for d in tokenizer_dirs or (source_dir,):
        if copy_tokenizer_files(Path(d), root):
            break
    more = before_manifest(root) if before_manifest is not None else None
    return write_manifest(
        root,
        io=io,
        target=target,
        model_file=model_file,
        canonical_file=canonical_file,
        weights_file=weights_file,
        source_dir=source_dir,
        extra=extra,
        more_files=more,
    )


@contextlib.contextmanager
def atomic_dir(
    out: str | Path,
    *,
    force: bool = False,
    replaceable: Callable[[Path], bool] | None = None,
    error: type[Exception] = BundleError,
) -> Iterator[Path]:
    """Yield a fresh sibling directory of ``out`` (mode 0755) to write into; when the block succeeds it
    replaces ``out`` atomically (a rename), when it fails (any exception, KeyboardInterrupt included) it is
    removed and ``out`` is left as it was.

    Never destroy what we did not create: an existing ``out`` is replaced only when it is ours. By default that
    is an empty directory or a bundle (a directory with our manifest), and only with ``force``; a caller that
    writes something else passes ``replaceable`` (``tiny/`` replaces an empty or checkpoint directory without
    ``force``). Anything else, a directory of documents or a regular file, is refused even with ``force``, and
    ``error`` is raised before anything is written (as it is when the parent cannot be written).

    Staging directories are named ``.NAME.tmp-PID-*``: ones left by a killed run (its process is gone) are removed
    on the next run to the same output. The one place that stages and commits a directory (export, quantize,
    build, ``tiny/``, the benchmarks). Rejected: writing in place (an interrupted export would leave a half-bundle
    that looks like one) and a lock file (a rename is atomic on one file system, which a sibling is).
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if replaceable is not None:
            if out.is_symlink() or not replaceable(out):
                raise error(f"{out}: output already exists (refusing to replace it)")
        elif out.is_symlink() or not is_bundle_dir(out):
            raise error(
                f"{out}: exists and is not an exaone-deploy bundle or an empty directory; refusing to replace "
                "it (choose another output path)"
            )
        elif not force:
            raise error(f"{out}: output already exists (use --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes it 0700: a service account could not read a bundle root exported
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


def is_bundle_dir(path: Path) -> bool:
    """An empty directory, or one whose manifest says it is an exaone-deploy bundle: what ``--force`` replaces."""
    if not path.is_dir() or path.is_symlink():
        return False
    if not any(path.iterdir()):
        return True
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _remove_stale(out: Path) -> None:
    """Remove staging directories of ``out`` whose writing process no longer exists (a killed export)."""
    for prefix in (f".{out.name}.tmp-", f".{out.name}.old-"):
        for p in out.parent.iterdir():
            if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
                continue
            pid = p.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is another user's
        return True
    return True


def _commit(tmp: Path, out: Path) -> None:
    """Move a finished directory into place; an existing ``out`` is first renamed aside, then deleted."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def is_checkpoint_dir(path: Path) -> bool:
    """An empty directory or one holding a checkpoint (config.json): what ``tiny/`` may overwrite."""
    return path.is_dir() and (not any(path.iterdir()) or (path / "config.json").exists())
