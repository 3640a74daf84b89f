"""First contact (issue 12, classes 5 and 6): the first mistakes a new user makes each print one ``Error:`` line
that says what to do, never a traceback; ``-v`` shows this project's stage logs and nothing from other libraries.

Every case runs the real CLI in a subprocess. An edge install (``pip install exaone-deploy``, no extras) is
simulated by a wrapper that makes the extras' packages unimportable (``sys.modules[name] = None``); an old
onnxruntime by one that sets ``onnxruntime.__version__``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import onnxruntime
import pytest

WRAPPER = textwrap.dedent("""
    import sys, json
    blocked, ort_version, argv = json.loads(sys.argv[1])
    for name in blocked:
        sys.modules[name] = None
    if ort_version:
        import onnxruntime
        onnxruntime.__version__ = ort_version
    from exaone_deploy.commands import main
    main(argv, prog_name="exaone-deploy")
""")

EXTRAS_MODULES = [
    "torch",
    "onnx",
    "onnxscript",
    "onnx_ir",
    "safetensors",
    "fastapi",
    "uvicorn",
    "prometheus_client",
    "tensorrt",
]


def cli(*argv: str, blocked=(), ort_version: str | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, json.dumps([list(blocked), ort_version, list(argv)])],
        capture_output=True,
        text=True,
        timeout=300,
        input=stdin,
    )


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The single ``Error:`` line a failed command printed (and nothing else on stderr but click's usage hint for
    an option error, no traceback)."""
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith(("Usage: ", "Try '"))]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from exaone_deploy.tiny.make import make_tiny

    return make_tiny(tmp_path_factory.mktemp("fc") / "ckpt", "32b")


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    import warnings

    from exaone_deploy.exporter.export import ExportOptions, export_bundle

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_bundle(
            checkpoint, tmp_path_factory.mktemp("fc") / "bundle", ExportOptions(max_seq_len=256), progress=False
        )


@pytest.mark.parametrize(
    "verb, extra",
    [
        (["export", "{ckpt}", "-o", "{tmp}/out"], "export"),
        (["demo", "--bundle", "{tmp}/demo"], "export"),
        (["quantize", "{bundle}", "-o", "{tmp}/q", "--scheme", "int8-sq"], "export"),
        (["build", "{bundle}", "--check-only"], "export"),
        (["serve", "{bundle}"], "serve"),
    ],
)
def test_edge_install_names_the_extra(verb, extra, checkpoint, bundle, tmp_path):
    argv = [a.format(ckpt=checkpoint, bundle=bundle, tmp=tmp_path) for a in verb]
    line = one_error_line(cli(*argv, blocked=EXTRAS_MODULES))
    assert f"pip install 'exaone-deploy[{extra}]'" in line and f"exaone-deploy {verb[0]}" in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "demo").exists()


def test_edge_install_still_generates(bundle):
    r = cli("generate", str(bundle), "--prompt", "hi", "--max-new-tokens", "2", blocked=EXTRAS_MODULES)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="CUDA onnxruntime")
def test_device_cuda_without_a_cuda_onnxruntime(bundle):
    line = one_error_line(cli("generate", str(bundle), "--prompt", "hi", "--device", "cuda"))
    assert "onnxruntime-gpu" in line, line


@pytest.mark.parametrize("verb", [["generate", "--prompt", "hi"], ["chat"], ["serve"]])
@pytest.mark.parametrize("which", ["dir", "tiny"])
def test_checkpoint_where_a_bundle_is_expected(verb, which, checkpoint):
    path = str(checkpoint) if which == "dir" else "tiny"
    line = one_error_line(cli(verb[0], path, *verb[1:]))
    assert "is a checkpoint, not a bundle" in line and f"exaone-deploy export {path} -o " in line, line


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
        42,
        {"text": "hi"},
        [{"type": "text", "text": 3}],
    ],
)
def test_messages_content_that_is_not_text(content, bundle, tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"role": "user", "content": content}]))
    line = one_error_line(cli("generate", str(bundle), "--messages", str(f)))
    assert "content must be text" in line and "message 0" in line, line


def test_text_parts_are_accepted(bundle, tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]))
    r = cli("generate", str(bundle), "--messages", str(f), "--max-new-tokens", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["usage"]["prompt_tokens"] > 0


def test_onnxruntime_older_than_the_bundle_needs(bundle):
    line = one_error_line(cli("generate", str(bundle), "--prompt", "hi", ort_version="1.28.2"))
    assert "onnxruntime >= 1.29" in line and "1.28.2" in line, line
    # the version this bundle needs is enough
    r = cli("generate", str(bundle), "--prompt", "hi", "--max-new-tokens", "1", ort_version="1.29.0")
    assert r.returncode == 0, r.stderr


# ---- -v --------------------------------------------------------------------------------------------


def _log_lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.split(" ", 1)[0] in ("DEBUG", "INFO", "WARNING", "ERROR")]


def test_verbose_shows_our_stages_and_only_ours(bundle):
    quiet = cli("generate", str(bundle), "--prompt", "hi", "--max-new-tokens", "2")
    assert quiet.returncode == 0 and not _log_lines(quiet.stderr), quiet.stderr
    for flag in ("-v", "-vv"):
        r = cli(flag, "generate", str(bundle), "--prompt", "hi", "--max-new-tokens", "2")
        assert r.returncode == 0, r.stderr
        logs = _log_lines(r.stderr)
        assert logs and all(x.split(" ")[1].startswith("exaone_deploy.") for x in logs), r.stderr
        text = "\n".join(logs)
        assert "session" in text and "KV cache" in text, text
