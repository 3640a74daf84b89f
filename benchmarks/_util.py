"""Small helpers shared by the benchmarks: memory peaks, isolated measurements, tables, --json.

    from _util import peak_rss_bytes, run_isolated, print_table, emit, add_json_flag

``run_isolated(fn, *args)`` runs ``fn`` in a fresh interpreter (multiprocessing "spawn"), so that each
measurement starts from a clean process and peak-RSS figures do not mix: ``fn`` must be a module-level
function and the calling script must guard its entry point with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["current_rss_bytes", "peak_rss_bytes", "run_isolated", "print_table", "emit", "add_json_flag", "fmt_bytes"]


def _status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux VmHWM; else getrusage's ru_maxrss)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, kB on Linux


def current_rss_bytes() -> int:
    """Resident set size now (Linux VmRSS; else the peak)."""
    rss = _status_bytes("VmRSS")
    return rss if rss is not None else peak_rss_bytes()


def _child(conn, fn, args, kwargs):
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except BaseException as e:  # noqa: BLE001  (reported to the parent)
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_isolated(fn: Callable, *args, timeout: float | None = None, **kwargs) -> Any:
    """Run ``fn(*args, **kwargs)`` in a fresh spawned interpreter and return its (picklable) result."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, kwargs))
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"{fn.__name__} did not finish within {timeout} s")
        status, value = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"{fn.__name__} died in its subprocess (exit code {proc.exitcode})") from None
    finally:
        if proc.is_alive() and not parent.poll():
            proc.terminate()
        proc.join()
    if status == "error":
        raise RuntimeError(f"{fn.__name__} failed in its subprocess: {value}")
    return value


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def print_table(
    rows: Sequence[dict], cols: Sequence[str | tuple[str, str]], title: str | None = None, file=None
) -> None:
    """Print ``rows`` (dicts) as an aligned text table. ``cols``: keys, or (key, header) pairs."""
    file = file or sys.stdout
    cols = [(c, c) if isinstance(c, str) else c for c in cols]
    cells = [[header for _, header in cols]] + [[_cell(row.get(key)) for key, _ in cols] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    if title:
        print(title, file=file)
    for n, r in enumerate(cells):
        print("  ".join(c.rjust(w) if n and _numeric(c) else c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=file)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=file)


def _numeric(text: str) -> bool:
    try:
        float(text.split()[0])
        return True
    except (ValueError, IndexError):
        return False


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")


def emit(result: dict, as_json: bool, table: Callable[[], None]) -> None:
    """Print ``result`` as JSON (``--json``) or call ``table()`` to print it for people."""
    if as_json:
        json.dump(result, sys.stdout, indent=2, default=str)
        print()
    else:
        table()
