"""A bundle run from another runtime (docs/runtimes.md): the polygraphy data-loader script shipped in docs/ feeds
plain ONNX Runtime the documented graph contract (window-sized caches on sliding layers), and polygraphy itself
runs the bundle with it. onnxruntime-genai: tests/test_genai.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import load_script

from exaone_deploy.bundle import load_manifest

LOADER = Path(__file__).resolve().parents[1] / "docs" / "polygraphy_loader.py"


def _loader():
    return load_script("docs/polygraphy_loader.py", "polygraphy_loader")


@pytest.fixture(scope="module")
def hybrid_bundle(tiny_dirs, tmp_path_factory):
    """The 32b preset (sliding layers with window-sized caches, NoPE global layers) exported for ort."""
    from exaone_deploy.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("runtimes") / "b32"
    return export_bundle(tiny_dirs["32b"], out, ExportOptions(max_seq_len=128), progress=False), tiny_dirs["32b"]


def test_loader_feeds_run_in_plain_onnxruntime(hybrid_bundle, oracle):
    """The loader's prompt step through a plain InferenceSession (no I/O binding) gives transformers' logits."""
    import torch

    b, ckpt = hybrid_bundle
    spec = load_manifest(b).spec
    prompt, decode = _loader().bundle_feeds(b, prompt_len=12, cache_len=32)
    windows = {f"past_key_values.{i}.key": layer.window for i, layer in enumerate(spec.layers) if layer.sliding}
    assert windows and all(prompt[name].shape[2] == w for name, w in windows.items())
    sess = ort.InferenceSession(str(b / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, prompt)))
    with torch.no_grad():
        ref = oracle(ckpt)(torch.from_numpy(prompt["input_ids"])).logits[0, -1].numpy()
    assert out["logits"].shape == (1, 1, spec.vocab_size)
    np.testing.assert_allclose(out["logits"][0, 0], ref, atol=1e-4, rtol=0)
    logits = dict(zip(names, sess.run(None, decode)))["logits"]
    assert logits.shape == (1, 1, spec.vocab_size) and np.isfinite(logits).all()


def test_loader_refuses_what_it_cannot_feed(hybrid_bundle):
    with pytest.raises(SystemExit, match="must be positive and below"):
        _loader().bundle_feeds(hybrid_bundle[0], prompt_len=40, cache_len=32)


@pytest.mark.skipif(shutil.which("polygraphy") is None, reason="polygraphy is not installed")
def test_polygraphy_runs_the_bundle(hybrid_bundle, tmp_path):
    from polygraphy.comparator import RunResults

    b, _ = hybrid_bundle
    saved = tmp_path / "outputs.json"
    env = {**os.environ, "EXAONE_BUNDLE": str(b), "EXAONE_PROMPT_LEN": "12", "EXAONE_CACHE_LEN": "32"}
    r = subprocess.run(
        [
            "polygraphy",
            "run",
            str(b / "model.onnx"),
            "--onnxrt",
            "--data-loader-script",
            str(LOADER),
            "--save-outputs",
            str(saved),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert r.returncode == 0 and "PASSED" in r.stdout + r.stderr, r.stdout + r.stderr
    ((_, iterations),) = RunResults.load(str(saved)).items()
    assert len(iterations) == 2
    sess = ort.InferenceSession(str(b / "model.onnx"), providers=["CPUExecutionProvider"])
    for it, feed in zip(iterations, _loader().bundle_feeds(b, prompt_len=12, cache_len=32)):
        np.testing.assert_array_equal(np.asarray(it["logits"]), sess.run(["logits"], feed)[0])


def test_plain_onnxruntime_snippet_in_the_docs(hybrid_bundle, monkeypatch):
    """docs/runtimes.md's I/O-binding loop, run as written on the hybrid bundle with a prompt longer than the
    window: its greedy tokens are ours."""
    import re

    from exaone_deploy.runtime.generate import Generator
    from exaone_deploy.runtime.sampling import SamplingParams

    b, _ = hybrid_bundle
    doc = (LOADER.parent / "runtimes.md").read_text()
    code = re.search(r"```python\n(import json.*?)```", doc, re.S).group(1)
    prompt = list(range(20, 40))
    assert len(prompt) > load_manifest(b).spec.sliding_window
    monkeypatch.chdir(b.parent)
    ns: dict = {}
    exec(code.replace('B = "B"', f'B = "{b.name}"').replace("prompt = [1, 2, 3]", f"prompt = {prompt}"), ns)
    ours = Generator.from_bundle(b).generate([prompt], SamplingParams(max_new_tokens=16, temperature=0.0))[0]
    assert ns["tokens"][len(prompt) :] == ours.token_ids
