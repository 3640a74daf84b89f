"""The command group: one error handler (project errors are one line, bugs keep their traceback), the exception
hierarchy under ExaoneDeployError, and the huge-page restart only for verbs that load weights."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import click
import pytest
from click.testing import CliRunner

import exaone_deploy
from exaone_deploy.commands import common, error_message, main
from exaone_deploy.errors import ExaoneDeployError


def _invoke_raising(monkeypatch, exc: BaseException):
    @click.command("boom")
    def boom():
        raise exc

    monkeypatch.setitem(main.commands, "boom", boom)
    return CliRunner().invoke(main, ["boom"])


def test_project_errors_are_one_line_and_bugs_are_not_caught(monkeypatch, tmp_path):
    from exaone_deploy.bundle import BundleError

    r = _invoke_raising(monkeypatch, BundleError(f"{tmp_path}/b: manifest.json is not valid JSON"))
    assert r.exit_code == 1 and r.output == f"Error: {tmp_path}/b: manifest.json is not valid JSON\n"
    r = _invoke_raising(monkeypatch, PermissionError(13, "Permission denied", str(tmp_path / "out")))
    assert r.exit_code == 1 and r.output == f"Error: {tmp_path / 'out'}: Permission denied\n"
    r = _invoke_raising(monkeypatch, ValueError("a bug"))  # not a user error: it propagates (a traceback)
    assert r.exit_code == 1 and isinstance(r.exception, ValueError) and "Error:" not in r.output


def test_error_message_folds_wrapped_text_and_keeps_lists():
    from exaone_deploy.tensorrt.backend import TensorRTUnavailable

    wrapped = TensorRTUnavailable(
        "build needs TensorRT (libnvinfer.so.10: cannot open\n shared object file); pip install"
    )
    assert (
        error_message(wrapped) == "build needs TensorRT (libnvinfer.so.10: cannot open shared object file); pip install"
    )
    findings = ValueError("g.onnx: 2 problem(s):\n  error: node 'a'\n  error: node 'b'")
    assert error_message(findings) == str(findings)


def test_every_project_exception_derives_from_the_root():
    found = {}
    for info in pkgutil.walk_packages(exaone_deploy.__path__, "exaone_deploy."):
        if info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # TensorRT / Triton modules where those are missing
            continue
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    assert {
        "exaone_deploy.bundle.BundleError",
        "exaone_deploy.spec.ConfigError",
        "exaone_deploy.runtime.sampling.SamplingError",
    } <= set(found)
    assert [n for n, cls in found.items() if not issubclass(cls, ExaoneDeployError)] == []
    # The builtin bases stay: code that catches ValueError / RuntimeError behaves as before.
    from exaone_deploy.bundle import BundleError
    from exaone_deploy.exporter.export import ExportError

    assert issubclass(BundleError, ValueError) and issubclass(ExportError, RuntimeError)


@pytest.fixture
def restarts(monkeypatch):
    """The argv of each huge-page restart a command asks for (recorded, not executed)."""
    from exaone_deploy.runtime import hugepages

    calls = []
    monkeypatch.setattr(hugepages, "reexec", calls.append)
    monkeypatch.setattr(common, "_restart_argv", ["python", "-m", "exaone_deploy", "..."])
    return calls


@pytest.mark.parametrize(
    "args, restarted",
    [
        (["inspect", "tiny"], False),
        (["generate", "--help"], False),
        (["generate", "{missing}", "--prompt", "hi", "--top-p", "7"], True),
        (["build", "{missing}", "--check-only"], False),
        (["build", "{missing}", "-o", "{missing}-engine"], True),
        (["eval-ppl", "{missing}", "--data", "{missing}.txt"], True),
        (["serve", "--help"], False),
    ],
)
def test_only_verbs_that_load_weights_restart(restarts, tmp_path, args, restarted):
    args = [a.format(missing=tmp_path / "missing") for a in args]
    r = CliRunner().invoke(main, args)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert restarts == ([["python", "-m", "exaone_deploy", "..."]] if restarted else [])


def test_in_process_commands_never_restart(monkeypatch, tmp_path):
    from exaone_deploy.runtime import hugepages

    calls = []
    monkeypatch.setattr(hugepages, "reexec", calls.append)
    r = CliRunner().invoke(main, ["generate", str(tmp_path), "--prompt", "hi"])
    assert r.exit_code == 1 and calls == []  # only the console entry enables the restart


def test_sampling_options_arrive_as_one_validated_params(monkeypatch):
    seen = {}

    @click.command("probe")
    @common.sampling_options
    def probe(params):
        seen["params"] = params

    monkeypatch.setitem(main.commands, "probe", probe)
    r = CliRunner().invoke(main, ["probe", "--temperature", "0.7", "--top-k", "5", "--stop", "a", "--stop", "b"])
    assert r.exit_code == 0, r.output
    p = seen["params"]
    assert (p.temperature, p.top_k, p.stop, p.max_new_tokens, p.seed) == (0.7, 5, ("a", "b"), 128, None)
    r = CliRunner().invoke(main, ["probe", "--top-p", "0"])
    assert r.exit_code == 1 and r.output == "Error: top_p must be in (0, 1], got 0.0\n"
