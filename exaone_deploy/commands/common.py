"""What several verbs share: sampling options that arrive as one ``SamplingParams``, the huge-page restart of
verbs that load weights, and quieting the export tooling.

Nothing here imports more than click at import time: ``exaone-deploy --help`` stays fast and torch-free.
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
from collections.abc import Sequence

import click

__all__ = [
    "sampling_options",
    "device_option",
    "loads_weights",
    "enable_restart",
    "console_argv",
    "quiet_export_tooling",
    "configure_logging",
    "require_bundle",
]

log = logging.getLogger("exaone_deploy")

# (click option, SamplingParams field); the option's own name is the field's with dashes.
_SAMPLING = (
    (click.option("--max-new-tokens", type=int, default=128, show_default=True), "max_new_tokens"),
    (click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."), "temperature"),
    (click.option("--top-p", type=float, default=1.0, show_default=True), "top_p"),
    (click.option("--top-k", type=int, default=0, show_default=True), "top_k"),
    (click.option("--min-p", type=float, default=0.0, show_default=True), "min_p"),
    (click.option("--repetition-penalty", type=float, default=1.0, show_default=True), "repetition_penalty"),
    (click.option("--seed", type=int, default=None), "seed"),
    (click.option("--stop", multiple=True, help="Stop string (repeatable)."), "stop"),
)

device_option = click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)


def sampling_options(f):
    """Add the sampling options to a command and hand its callback one validated ``params: SamplingParams``
    instead of eight keyword arguments (an invalid value is a ``SamplingError``: one ``Error:`` line).

    Rejected: a ``click.ParamType`` per field (the checks across fields live in ``SamplingParams.validate``,
    which the server and the Python API use too)."""

    @functools.wraps(f)
    def with_params(*args, **kwargs):
        from ..runtime.sampling import SamplingParams

        fields = {name: kwargs.pop(name) for _, name in _SAMPLING}
        fields["stop"] = tuple(fields["stop"])
        return f(*args, params=SamplingParams(**fields).validate(), **kwargs)

    for option, _ in reversed(_SAMPLING):
        with_params = option(with_params)
    return with_params


# ---- huge pages -------------------------------------------------------------------------------------------

_restart_argv: list[str] | None = None  # set by the console entry point; None: never re-execute


def enable_restart(argv: Sequence[str]) -> None:
    """Let verbs that load weights restart the process as ``argv`` under huge-page malloc
    (``runtime/hugepages.py``). Only the console entry calls this: a command run in-process (tests, CliRunner,
    a program calling ``main``) must never replace its host process."""
    global _restart_argv
    _restart_argv = list(argv)


def loads_weights(cmd: click.Command, unless: str | None = None) -> click.Command:
    """A copy of ``cmd`` that first restarts the process with huge-page malloc (where that applies and the console
    entry enabled it), unless its parameter ``unless`` is set (``build --check-only`` reads no weights).

    The restart happens after click parsed the arguments, so ``--help`` and usage errors never pay for it, and
    before the command does anything. Rejected: restarting in the console entry for every verb (``inspect`` and
    ``--help`` paid a second interpreter start), and guessing the verb from ``sys.argv`` (options may precede it)."""
    callback = cmd.callback

    @functools.wraps(callback)
    def run(*args, **kwargs):
        if _restart_argv is not None and not (unless and kwargs.get(unless)):
            from ..runtime import hugepages

            hugepages.reexec(_restart_argv)
        return callback(*args, **kwargs)

    heavy = copy.copy(cmd)
    heavy.callback = run
    return heavy


def console_argv() -> list[str]:
    """How the console script restarts itself: the installed package (``-P``: no cwd on ``sys.path``)."""
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe_path, "-m", "exaone_deploy", *sys.argv[1:]]


def require_bundle(path) -> None:
    """Refuse (InputError) a checkpoint where a bundle is expected (``generate``, ``chat``, ``serve``), with the
    ``export`` command that makes one: a directory with a config.json and no manifest.json, or the name ``tiny``
    (the bundled checkpoint). Anything else is left to the bundle loader's own errors."""
    from pathlib import Path

    from ..errors import InputError

    path = Path(path)
    if (path / "manifest.json").is_file():
        return
    if (str(path) == "tiny" and not path.exists()) or (path / "config.json").is_file():
        out = f"{path.name or 'model'}-bundle"
        raise InputError(
            f"{path} is a checkpoint, not a bundle: export it first with `exaone-deploy export {path} "
            f"-o {out}`, then pass {out}"
        )


def configure_logging(verbose: int) -> None:
    """``-v`` shows this project's INFO logs (its stages: export, bundle load, session, cache allocation, server
    start), ``-vv`` its DEBUG logs; other libraries' loggers (torch, onnxscript, uvicorn's internals) stay at
    WARNING until ``-vvv``. Rejected: one root level for everything (``-vv export`` printed thousands of torch and
    onnxscript lines and none of ours)."""
    ours = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=logging.DEBUG if verbose >= 3 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        force=True,
    )
    log.setLevel(ours)


def quiet_export_tooling() -> None:
    """torch.onnx prints progress and warnings through loggers and handlers of its own; keep them quiet unless
    third-party logs were asked for (``-vvv``)."""
    import warnings

    import torch  # noqa: F401  (torch sets up its loggers on import; quiet them afterwards)

    if not logging.getLogger().isEnabledFor(logging.INFO):
        warnings.filterwarnings("ignore")
        for name in ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
