"""The ``exaone-deploy`` command line: one click group, one module per verb family.

    model.py     make-tiny, inspect, export, verify
    run.py       generate, chat, demo            (no torch: an edge install runs these)
    quantize.py  quantize, eval-ppl, sensitivity
    tensorrt.py  build, compare
    heads.py     classify, qa                   (task-head bundles)
    serve.py     serve                            (the command lives with the server; imported when it runs)

Heavy imports (torch, onnx, FastAPI) happen inside the commands that need them. Errors: every command lets an
:class:`~exaone_deploy.errors.ExaoneDeployError` (or a missing/unreadable path) propagate, and the group turns it
into one ``Error: ...`` line with exit status 1, and so does a missing optional package (an edge install without
the extra that a verb needs: the line names the extra to install); anything else is a bug and keeps its
traceback. Rejected: a
``try/except`` per command (three copies of an error tuple each catching bare ``ValueError``, so bugs looked like
user errors). Verbs that load weights restart once under huge-page malloc (:func:`common.loads_weights`).
"""

from __future__ import annotations

import click

from .. import __version__
from ..errors import ExaoneDeployError
from . import heads, model, quantize, run, tensorrt
from .common import configure_logging, console_argv, enable_restart, loads_weights
from .serve import load_serve_command

__all__ = ["main", "entry"]

# OS errors a user causes by naming a path (a missing file, a directory without write permission).
_PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)

# Third-party packages that only an extra installs (pyproject.toml), by import name.
EXTRAS = {
    "torch": "export",
    "onnx": "export",
    "onnxscript": "export",
    "onnx_ir": "export",
    "safetensors": "export",
    "huggingface_hub": "export",
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "pydantic": "serve",
    "starlette": "serve",
    "llguidance": "grammar",
    "tensorrt": "tensorrt",
    "cuda": "tensorrt",
    "onnxruntime_genai": "genai",
}


def missing_extra(e: ImportError, verb: str | None) -> str | None:
    """The one-line fix for an import of a package that an extra provides, or None (then it is a bug)."""
    top = (e.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    who = f"`exaone-deploy {verb}`" if verb else "this command"
    return f"{who} needs the '{top}' package, which is not installed: pip install 'exaone-deploy[{extra}]'"


def error_message(e: BaseException) -> str:
    """The text after ``Error:``: one line. Line breaks inside a message (a wrapped ImportError's, say) are folded;
    only a list of findings keeps its lines: a first line ending in ':' followed by indented lines (TensorRT's
    parser errors, the graph checks)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = str(e).strip()
    first, *rest = text.split("\n")
    if rest and first.endswith(":") and all(line.startswith((" ", "\t")) for line in rest):
        return text
    return " ".join(text.split())


class _Group(click.Group):
    """The main group: the single error handler, and commands resolved lazily (``serve``)."""

    lazy = {"serve": lambda: loads_weights(load_serve_command())}

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (ExaoneDeployError, *_PATH_ERRORS) as e:
            raise click.ClickException(error_message(e)) from e
        except ImportError as e:
            fix = missing_extra(e, ctx.invoked_subcommand)
            if fix is None:
                raise
            raise click.ClickException(fix) from e

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy:
            self.add_command(self.lazy[name](), name)
        return super().get_command(ctx, name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="exaone-deploy")
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="More logging: -v this tool's stages, -vv its debug output, -vvv other libraries' too.",
)
def main(verbose: int) -> None:
    """Export EXAONE 4.0 checkpoints to ONNX Runtime and TensorRT, and run them."""
    configure_logging(verbose)


for _cmd in (model.make_tiny_command, model.inspect_command):
    main.add_command(_cmd)
for _cmd in (
    model.export_command,
    model.verify_command,
    run.generate_command,
    run.chat_command,
    run.demo_command,
    heads.classify_command,
    heads.qa_command,
    quantize.quantize_command,
    quantize.eval_ppl_command,
    quantize.sensitivity_command,
    tensorrt.compare_command,
):
    main.add_command(loads_weights(_cmd))
main.add_command(loads_weights(tensorrt.build_command, unless="check_only"))


def entry() -> None:
    """The ``exaone-deploy`` console script: verbs that load weights restart once with huge-page ``malloc`` where
    that helps (weights in 2 MiB pages: faster decode and load; see ``runtime/hugepages.py``)."""
    enable_restart(console_argv())
    main(prog_name="exaone-deploy")
