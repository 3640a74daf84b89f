"""Test and benchmark support: a server in a subprocess. Not imported by the server itself, and needs none of the
'serve' extra in the calling process (only in the child's interpreter, which is this one's).

:class:`ServerProcess` runs ``python -m exaone_deploy.server BUNDLE --host 127.0.0.1 --port 0 ARGS`` and returns
once the line that :mod:`.command` prints after binding appears, so callers never guess a port or poll.
"""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["ServerProcess"]


class ServerProcess:
    """A server in a subprocess, listening on 127.0.0.1. ``url`` is its root (``url + "/v1"`` is the API),
    ``output`` its merged stdout/stderr so far. Raises RuntimeError (with that output) if it exits or does not
    listen within ``timeout`` seconds."""

    def __init__(self, bundle: str | Path, *args: str, timeout: float = 600.0):
        cmd = [sys.executable, "-m", "exaone_deploy.server", str(bundle), "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        lines: queue.Queue = queue.Queue()

        def pump():
            for line in self.proc.stdout:
                self.output.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.close()
                raise RuntimeError("the server did not start:\n" + "".join(self.output))
            m = re.search(r"on (http://\S+)/v1", line)  # the line serve_command prints once it listens
            if m:
                self.url = m.group(1)
                return

    def close(self, timeout: float = 30.0) -> None:
        """Terminate (SIGTERM, then SIGKILL after ``timeout`` s) and wait."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
