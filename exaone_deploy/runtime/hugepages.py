"""Transparent huge pages for the weights (Linux with glibc >= 2.35).

A batch-1 decode step streams every weight once; on this kind of machine it is bound by memory reads, and
with 4 KiB pages those reads also walk the page tables: one TLB miss per 4 KiB. ONNX Runtime copies each
MatMul weight into a pre-packed buffer it allocates with ``malloc``. Most Linux distributions ship
transparent huge pages in ``madvise`` mode, where only memory that asks for them gets 2 MiB pages, and
glibc's allocator asks only when started with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: the weights then
sit in 2 MiB pages, a decode step is a few percent faster and loading is faster too (fewer page faults).

glibc reads its tunables once, at process start, so the ``exaone-deploy`` verbs that load weights re-execute
the command with the tunable set (:func:`reexec`, via ``commands.common.loads_weights``) before they do anything.
Programs that use the runtime as a library can start their Python with the environment :func:`hugepage_env`
returns. ``EXAONE_DEPLOY_HUGEPAGES=0`` turns it off. Nothing here changes any result: only the page size of the
same memory.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

__all__ = ["TUNABLE", "thp_mode", "glibc_version", "hugepage_env", "reexec"]

TUNABLE = "glibc.malloc.hugetlb=1"
SWITCH = "EXAONE_DEPLOY_HUGEPAGES"
_MARK = "EXAONE_DEPLOY_REEXECUTED"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = _THP_ENABLED) -> str | None:
    """The kernel's THP mode (``always``, ``madvise`` or ``never``); None where there is no such file."""
    try:
        text = open(path).read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None (musl, macOS, Windows)."""
    try:
        _, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError, OSError):
        return None


def hugepage_env(
    environ: Mapping[str, str] | None = None,
    *,
    mode: str | None = None,
    glibc: tuple[int, int] | None = None,
    platform: str | None = None,
) -> dict[str, str] | None:
    """The environment under which a new process's ``malloc`` asks for huge pages, or None when it would not
    help: not Linux/glibc >= 2.35, THP off (``never``) or already on for everything (``always``), the tunable
    already set, or turned off with ``EXAONE_DEPLOY_HUGEPAGES=0``."""
    env = dict(os.environ if environ is None else environ)
    if env.get(SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if (platform or sys.platform) != "linux":
        return None
    if (mode if mode is not None else thp_mode()) != "madvise":
        return None
    version = glibc if glibc is not None else glibc_version()
    if version is None or version < (2, 35):
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    return env


def reexec(argv: Sequence[str]) -> None:
    """Replace this process by ``argv`` started under :func:`hugepage_env`; returns (doing nothing) when that
    does not apply or this process is already such a re-execution."""
    if os.environ.get(_MARK):
        return
    env = hugepage_env()
    if env is None:
        return
    env[_MARK] = "1"
    log.debug("re-executing with GLIBC_TUNABLES=%s", env["GLIBC_TUNABLES"])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(argv[0], list(argv), env)
    except OSError as e:  # keep going with small pages rather than fail
        log.debug("re-execution failed (%s); continuing without huge pages", e)
