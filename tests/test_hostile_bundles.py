"""A bundle is data, not instructions: a corpus of hostile bundles, each refused with one clear line.

The corpus is generated from one real exported bundle: each case copies it and breaks one thing (a file name
that leaves the bundle, a symbolic link, a device file, a malformed manifest field). Every case must end in a
BundleError naming the bundle, quickly, before anything outside the bundle is read and before a model session
or a KV cache is created; the CLI prints it as one `Error:` line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exaone_deploy.bundle import MANIFEST, BundleError, load_manifest


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory) -> Path:
    from exaone_deploy.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("hostile") / "good"
    export_bundle("tiny", out, ExportOptions(max_seq_len=256), progress=False)
    return out


def _variant(good: Path, tmp_path: Path, edit) -> Path:
    """A copy of the good bundle with its manifest edited by ``edit(data, root)`` (which may also touch files)."""
    root = tmp_path / "bundle"
    shutil.copytree(good, root)
    data = json.loads((root / MANIFEST).read_text())
    result = edit(data, root)
    (root / MANIFEST).write_text(result if isinstance(result, str) else json.dumps(data))
    return root


def _set(path: str, value):
    def edit(data, root):
        keys = path.split(".")
        target = data
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    return edit


def _add_sha(name: str, make=None):
    def edit(data, root):
        if make is not None:
            make(root)
        data["sha256"][name] = "0" * 64

    return edit


def _outside_file(root: Path) -> Path:
    secret = root.parent / "secret.txt"
    secret.write_text("outside the bundle")
    return secret


def _symlink_model(data, root):
    secret = _outside_file(root)
    (root / data["files"]["model"]).unlink()
    os.symlink(secret, root / data["files"]["model"])


def _symlink_extra(data, root):
    os.symlink(_outside_file(root), root / "link.bin")
    data["sha256"]["link.bin"] = "0" * 64


def _fifo(data, root):
    os.mkfifo(root / "pipe")
    data["sha256"]["pipe"] = "0" * 64


def _device(data, root):
    data["sha256"]["dev"] = "0" * 64
    os.symlink("/dev/zero", root / "dev")


def _char_device(data, root):
    if os.geteuid() != 0:
        pytest.skip("creating a device node needs root")
    import stat

    os.mknod(root / "zero", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # what /dev/zero is
    data["sha256"]["zero"] = "0" * 64


CASES = {
    "character device listed": (_char_device, "not a regular file"),
    "model file not hashed": (lambda d, r: d["sha256"].pop(d["files"]["model"]) and None, "no digest"),
    "dotdot in sha256": (_add_sha("../secret.txt", _outside_file), "outside the bundle"),
    "absolute in sha256": (_add_sha("/etc/passwd"), "outside the bundle"),
    "dotdot model file": (_set("files.model", "../good/model.onnx"), "outside the bundle"),
    "absolute model file": (_set("files.model", "/etc/passwd"), "outside the bundle"),
    "model file not a string": (_set("files.model", ["model.onnx"]), "files"),
    "symlink model leaving the bundle": (_symlink_model, "symbolic link"),
    "symlink listed file": (_symlink_extra, "symbolic link"),
    "fifo listed": (_fifo, "not a regular file"),
    "device listed": (_device, "symbolic link"),
    "directory as model": (_set("files.model", "."), "not a regular file"),
    "sha not hex": (lambda d, r: d["sha256"].update({"model.onnx": "xyz"}), "sha256"),
    "sha256 a list": (_set("sha256", ["model.onnx"]), "sha256"),
    "format_version string": (_set("format_version", "1"), "format_version"),
    "format_version future": (_set("format_version", 99), "newer"),
    "unknown target": (_set("target", "cuda"), "target"),
    "max_seq_len negative": (_set("max_seq_len", -1), "max_seq_len"),
    "max_seq_len huge": (_set("max_seq_len", 10**12), "max_seq_len"),
    "max_seq_len bool": (_set("max_seq_len", True), "max_seq_len"),
    "spec missing": (lambda d, r: d.pop("spec") and None, "spec"),
    "spec malformed": (_set("spec.rope", "llama3"), "spec"),
    "spec huge layers": (_set("spec.num_layers", 10**9), "spec"),
    "spec huge vocab": (_set("spec.vocab_size", 10**12), "spec"),
    "manifest a list": (lambda d, r: "[1, 2]", "manifest"),
    "manifest deeply nested": (lambda d, r: "[" * 100000 + "]" * 100000, "JSON"),
    "manifest not utf-8": (lambda d, r: "\udcff", "JSON"),
    "not our format": (_set("format", "onnx"), "manifest"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_bundle_refused(good_bundle, tmp_path, case):
    edit, words = CASES[case]
    if case == "manifest not utf-8":
        root = tmp_path / "bundle"
        shutil.copytree(good_bundle, root)
        (root / MANIFEST).write_bytes(b'{"format": "\xff"}')
    else:
        root = _variant(good_bundle, tmp_path, edit)
    start = time.perf_counter()
    with pytest.raises(BundleError) as info:
        load_manifest(root)
    message = str(info.value)
    assert words.lower() in message.lower(), message
    assert str(root) in message or str(tmp_path) in message, message
    assert "\n" not in message
    assert time.perf_counter() - start < 5


def test_good_bundle_loads(good_bundle):
    m = load_manifest(good_bundle)
    assert m.spec.num_layers > 0 and m.model_path.is_file()


@pytest.mark.parametrize("case", ["dotdot model file", "fifo listed", "spec huge layers"])
def test_cli_prints_one_line(good_bundle, tmp_path, case):
    root = _variant(good_bundle, tmp_path, CASES[case][0])
    r = subprocess.run(
        [sys.executable, "-m", "exaone_deploy", "generate", str(root), "--prompt", "x", "--max-new-tokens", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "EXAONE_DEPLOY_HUGEPAGES": "0"},
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.stderr
