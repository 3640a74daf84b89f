"""The ``serve`` verb: the OpenAI-compatible server's click command, imported only when ``serve`` runs.

The command lives with the server (``exaone_deploy.server.command``; before the server package existed,
``exaone_deploy.runtime.server``): this module only finds it, so the other verbs never import FastAPI. An edge
install without the 'serve' extra gets a ``serve`` that says which package to install.
"""

from __future__ import annotations

import importlib

import click

__all__ = ["load_serve_command"]

# Where the command lives, newest layout first.
_MODULES = ("exaone_deploy.server.command", "exaone_deploy.runtime.server")


def load_serve_command() -> click.Command:
    """The ``serve`` click command, or a stand-in that fails with the missing package's name."""
    missing = None
    for name in _MODULES:
        try:
            return importlib.import_module(name).serve_command
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                continue  # this layout is not installed: try the next one
            missing = e.name or str(e)
            break
        except ImportError as e:
            missing = e.name or str(e)
            break
    if missing is None:
        raise ImportError(f"none of {', '.join(_MODULES)} defines the serve command")

    @click.command("serve", context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def serve_unavailable(args):
        """OpenAI-compatible server (needs: pip install 'exaone-deploy[serve]')."""
        raise click.ClickException(
            f"`exaone-deploy serve` needs the '{missing}' package: pip install 'exaone-deploy[serve]'"
        )

    return serve_unavailable
