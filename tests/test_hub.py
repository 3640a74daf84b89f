"""Hugging Face Hub ids resolved through huggingface_hub's real code path, offline, from a cache built here exactly
as the Hub client lays it out (``models--ORG--NAME/{blobs,refs,snapshots/<commit>}``, snapshot files symlinked
to blobs named by their etag). Never the network: ``HF_HUB_OFFLINE=1`` everywhere."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exaone_deploy import assets, hub
from exaone_deploy.checkpoint import CheckpointError, resolve_model_dir
from exaone_deploy.spec import load_spec

pytest.importorskip("huggingface_hub")
from huggingface_hub import constants as hf_constants

REPO = "TinyOrg/tiny-exaone"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_cache(cache: Path, repo_id: str, src: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """Lay ``src``'s files out in ``cache`` as ``snapshot_download`` leaves them; returns the snapshot dir."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blobs, snap = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        # LFS files are named by their sha256, regular git files by their git blob sha1.
        etag = (
            hashlib.sha256(data).hexdigest()
            if f.suffix == ".safetensors"
            else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        )
        (blobs / etag).write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blobs / etag, snap))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_patterns_keep_only_what_export_needs():
    from huggingface_hub.utils import filter_repo_objects

    files = [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "vocab.json",
        "merges.txt",
        "pytorch_model.bin",
        "model.pt",
        "consolidated.pth",
        "model-Q4_K_M.gguf",
        "model.onnx",
        "README.md",
        "original/model.safetensors",
        "onnx/model.onnx_data",
        "onnx/config.json",
    ]
    kept = set(filter_repo_objects(files, allow_patterns=hub.ALLOW_PATTERNS, ignore_patterns=hub.IGNORE_PATTERNS))
    assert kept == {
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "vocab.json",
    }


def test_is_repo_id(tmp_path, monkeypatch):
    assert hub.is_repo_id("LGAI-EXAONE/EXAONE-4.0-1.2B")
    assert not hub.is_repo_id("tiny")
    assert not hub.is_repo_id("/abs/ORG/NAME")
    assert not hub.is_repo_id("a/b/c")
    assert not hub.is_repo_id("../NAME")
    assert not hub.is_repo_id(Path("ORG/NAME"))  # a Path is always a path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ORG" / "NAME").mkdir(parents=True)
    assert not hub.is_repo_id("ORG/NAME")  # an existing local directory wins
    assert resolve_model_dir("ORG/NAME") == Path("ORG/NAME")


def test_offline_resolves_from_cache(offline_cache):
    snap = populate_cache(offline_cache, REPO, assets.tiny_model_dir())
    path = resolve_model_dir(REPO)
    assert path.resolve() == snap.resolve()
    assert load_spec(path) == load_spec(assets.tiny_model_dir())
    assert resolve_model_dir(REPO, revision=COMMIT).resolve() == snap.resolve()
    with pytest.raises(CheckpointError, match=f"{REPO}@v9: not in the Hugging Face cache and HF_HUB_OFFLINE=1"):
        resolve_model_dir(REPO, revision="v9")
    with pytest.raises(CheckpointError, match="Other/absent: not in the Hugging Face cache") as e:
        resolve_model_dir("Other/absent")
    assert "\n" not in str(e.value)


def _cli(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exaone_deploy.cli", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )


@pytest.mark.slow
def test_cli_inspect_and_export_offline(tmp_path):
    cache = tmp_path / "hub"
    populate_cache(cache, REPO, assets.tiny_model_dir())
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    r = _cli(env, "inspect", REPO, "--json")
    assert r.returncode == 0, r.stderr
    expected = json.loads(json.dumps(load_spec(assets.tiny_model_dir()).to_json()))
    assert json.loads(r.stdout) == expected
    out = tmp_path / "B"
    r = _cli(env, "export", REPO, "-o", out, "--max-seq-len", "128", "--no-progress")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"] == expected
    assert (manifest["source"]["name"], manifest["source"]["revision"]) == (REPO, COMMIT)
    assert manifest["files"]["genai"] == "genai.onnx"  # a Hub id exports to a bundle genai runs too
    assert (out / "tokenizer.json").read_bytes() == (assets.tiny_model_dir() / "tokenizer.json").read_bytes()
    for verb, message in (
        (("inspect", "Other/absent"), "Other/absent: not in the Hugging Face cache"),
        (("export", "Other/absent", "-o", tmp_path / "C"), "Other/absent: not in the Hugging Face"),
        (
            ("export", REPO, "--revision", "v9", "-o", tmp_path / "C"),
            f"{REPO}@v9: not in the Hugging Face cache and HF_HUB_OFFLINE=1",
        ),
    ):
        r = _cli(env, *verb)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "C").exists()


def test_snapshot_origin(tmp_path):
    snap = populate_cache(tmp_path, REPO, assets.tiny_model_dir())
    assert hub.snapshot_origin(snap) == {"repo_id": REPO, "revision": COMMIT}
    assert hub.snapshot_origin(assets.tiny_model_dir()) is None
    assert hub.snapshot_origin(tmp_path / "snapshots" / COMMIT) is None


@pytest.mark.slow
def test_verbs_take_hub_ids_with_revision(offline_cache, tmp_path):
    """export, quantize, inspect, verify --reference and eval-ppl on a Hub id at --revision, in process, offline
    from the cache: the same results as on the local directory."""
    from click.testing import CliRunner

    from exaone_deploy.bundle import load_manifest
    from exaone_deploy.commands import main

    populate_cache(offline_cache, REPO, assets.tiny_model_dir())

    def run(*args):
        r = CliRunner().invoke(main, list(map(str, args)))
        return r.exit_code, r.output

    code, out = run("inspect", REPO, "--revision", COMMIT, "--json")
    assert code == 0 and json.loads(out) == json.loads(json.dumps(load_spec(assets.tiny_model_dir()).to_json()))
    b, q = tmp_path / "B", tmp_path / "Q"
    assert run("export", REPO, "--revision", "main", "-o", b, "--max-seq-len", 64, "--no-progress")[0] == 0
    code, out = run(
        "quantize", REPO, "--revision", COMMIT, "-o", q, "--scheme", "int4-rtn", "--max-seq-len", 64, "--no-progress"
    )
    assert code == 0, out
    for bundle in (b, q):
        source = load_manifest(bundle).data["source"]
        assert (source["name"], source["revision"]) == (REPO, COMMIT)
    code, out = run("verify", b, "--reference", REPO, "--revision", COMMIT, "--steps", 4, "--prompt-len", 16, "--json")
    assert code == 0 and json.loads(out)["ok"], out
    ppl = [
        run("eval-ppl", *where, "--data", assets.corpus_path(), "--seq-len", 32, "--max-tokens", 96, "--json")
        for where in ((REPO, "--revision", "main"), (assets.tiny_model_dir(),))
    ]
    assert ppl[0][0] == 0 and json.loads(ppl[0][1])["ppl"] == json.loads(ppl[1][1])["ppl"], ppl
    code, out = run("inspect", "tiny", "--revision", "main")
    assert (
        code == 1
        and out
        == "Error: --revision main: 'tiny' is not a Hugging Face Hub id (ORG/NAME); a local "
        "directory has no revisions\n"
    )
    code, out = run("quantize", "Other/absent", "-o", tmp_path / "C", "--scheme", "int4-rtn")
    assert code == 1 and out.startswith("Error: Other/absent: not in the Hugging Face cache") and out.count("\n") == 1
    assert not (tmp_path / "C").exists()
