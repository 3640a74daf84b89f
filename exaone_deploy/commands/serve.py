"""The ``serve`` verb: the OpenAI-compatible server's click command, imported only when ``serve`` runs.

The command lives with the server (``exaone_deploy.server.command``): this module only finds it, so the other
verbs never import FastAPI. An edge install without the 'serve' extra gets a ``serve`` that says which package to
install.
"""

from __future__ import annotations

import importlib

import click

__all__ = ["load_serve_command"]

_MODULE = "exaone_deploy.server.command"


def load_serve_command() -> click.Command:
    """The ``serve`` click command, or a stand-in that fails with the missing package's name."""
    try:
        return importlib.import_module(_MODULE).serve_command
    except ImportError as e:  # fastapi, uvicorn, ... absent: an edge install
        missing = e.name or str(e)

    @click.command("serve", context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def serve_unavailable(args):
        """OpenAI-compatible server (needs: pip install 'exaone-deploy[serve]')."""
        raise click.ClickException(
            f"`exaone-deploy serve` needs the '{missing}' package: pip install 'exaone-deploy[serve]'"
        )

    return serve_unavailable
