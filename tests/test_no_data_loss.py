"""Never destroy what we did not create: outputs are replaced only when they are ours (a bundle, or empty).

`demo --bundle PATH` and `export --force` once replaced any existing PATH (a directory of documents, a regular
file) silently; a killed export left a hidden staging directory as large as the model that nothing removed; and
bundles were created 0700, unreadable by a service account.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from exaone_deploy.bundle import MANIFEST
from exaone_deploy.commands import main

ENV = {**os.environ, "EXAONE_DEPLOY_HUGEPAGES": "0"}


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exaone_deploy", *map(str, args)], capture_output=True, text=True, timeout=300, env=ENV
    )


def _one_error_line(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error:") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[-1], lines[-1]


@pytest.fixture
def documents(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "thesis.txt").write_text("years of work")
    return d


def test_demo_refuses_a_directory_that_is_not_a_bundle(documents):
    r = _cli("demo", "--bundle", documents, "--max-new-tokens", "2")
    _one_error_line(r, str(documents), "refusing")
    assert (documents / "thesis.txt").read_text() == "years of work"


def test_demo_refuses_a_regular_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    r = _cli("demo", "--bundle", f, "--max-new-tokens", "2")
    _one_error_line(r, str(f))
    assert f.read_text() == "keep me"


def test_export_force_refuses_a_directory_that_is_not_a_bundle(documents):
    r = CliRunner().invoke(main, ["export", "tiny", "-o", str(documents), "--force", "--no-progress"])
    assert r.exit_code == 1 and "refusing" in r.output and str(documents) in r.output, r.output
    assert (documents / "thesis.txt").read_text() == "years of work"
    assert [p.name for p in documents.parent.iterdir()] == ["docs"]  # no staging leftovers either


def test_export_force_replaces_a_bundle_and_an_empty_directory(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    for _ in range(2):  # empty directory first, then the bundle just written
        r = CliRunner().invoke(main, ["export", "tiny", "-o", str(out), "--force", "--no-progress"])
        assert r.exit_code == 0, r.output
        assert (out / MANIFEST).exists()
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    assert all(oct(p.stat().st_mode & 0o044) == "0o44" for p in out.iterdir())  # group/other can read


def test_killed_export_leaves_a_staging_dir_that_the_next_run_removes(tmp_path):
    out = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, "-m", "exaone_deploy", "export", "tiny", "-o", str(out), "--no-progress"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    staged = []
    while time.time() < deadline and not staged:
        staged = [p for p in tmp_path.iterdir() if p.name.startswith(".b.tmp-")]
        time.sleep(0.05)
    assert staged, "the export never started staging"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert staged[0].exists() and not out.exists()  # SIGKILL: no cleanup could run
    r = CliRunner().invoke(main, ["export", "tiny", "-o", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_live_writer_staging_dir_is_left_alone(tmp_path):
    from exaone_deploy.bundle import atomic_dir

    live = tmp_path / f".b.tmp-{os.getpid()}-abc"  # our own process: alive
    live.mkdir()
    with atomic_dir(tmp_path / "b") as tmp:
        (tmp / "x").write_text("1")
    assert live.exists()
