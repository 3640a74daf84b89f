"""``exaone_deploy.cli``: the command line's former home, kept as a stable import path (``main``, ``entry``) and
``python -m exaone_deploy.cli``. The verbs live in :mod:`exaone_deploy.commands`."""

from __future__ import annotations

from .commands import entry, main

__all__ = ["main", "entry"]

if __name__ == "__main__":  # pragma: no cover
    entry()
