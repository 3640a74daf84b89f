"""Huge-page malloc for the weights: when it applies, and that a re-executed process really gets 2 MiB pages."""

import subprocess
import sys

import pytest

from exaone_deploy.runtime import hugepages as hp


def test_env_applies_only_where_it_helps():
    base = {"PATH": "/bin"}
    env = hp.hugepage_env(base, mode="madvise", glibc=(2, 36), platform="linux")
    assert env["GLIBC_TUNABLES"] == hp.TUNABLE and env["PATH"] == "/bin"
    # Other tunables are kept.
    env = hp.hugepage_env(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, mode="madvise", glibc=(2, 35), platform="linux"
    )
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{hp.TUNABLE}"
    # THP already on for all memory, off, or absent; an old glibc; not Linux.
    for kw in (dict(mode="always"), dict(mode="never"), dict(mode=""), dict(glibc=(2, 34)), dict(platform="darwin")):
        args = dict(mode="madvise", glibc=(2, 36), platform="linux") | kw
        assert hp.hugepage_env(base, **args) is None, kw
    assert (
        hp.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, mode="madvise", glibc=(2, 36), platform="linux")
        is None
    )  # the user's own choice wins
    assert hp.hugepage_env({hp.SWITCH: "0"}, mode="madvise", glibc=(2, 36), platform="linux") is None


def test_thp_mode_parses_the_kernel_file(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hp.thp_mode(str(f)) == "madvise"
    assert hp.thp_mode(str(tmp_path / "missing")) is None


_CHILD = r"""
import ctypes, os
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20
p = libc.malloc(n)
ctypes.memset(p, 1, n)
huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")][0].split()[1]
print(os.environ.get("GLIBC_TUNABLES", ""), huge)
"""


@pytest.mark.skipif(
    hp.hugepage_env() is None,
    reason="huge-page malloc does not apply here (needs Linux, glibc >= 2.35, THP in madvise mode)",
)
def test_reexec_gives_malloc_huge_pages():
    plain = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True, env={"PATH": "/bin"}
    )
    assert plain.stdout.split()[-1] == "0"  # without the tunable, malloc'd memory stays in 4 KiB pages
    launcher = (
        "import sys; from exaone_deploy.runtime.hugepages import reexec; "
        f"reexec([sys.executable, '-c', {_CHILD!r}]); print('not re-executed')"
    )
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, check=True).stdout.split()
    assert out[0].endswith(hp.TUNABLE)
    assert int(out[1]) >= 2048  # kB: at least one 2 MiB page backs the malloc'd buffer


def test_console_entry_survives_its_reexecution(tmp_path):
    # The console script restarts as `python -P -m exaone_deploy ...` where huge pages apply (and runs directly
    # where they do not): either way the command runs, from any directory.
    code = "import sys; from exaone_deploy.cli import entry; sys.argv = ['exaone-deploy', 'inspect', 'tiny']; entry()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("layers 6, hidden 128")
