"""The public Python API: the README's example runs as written, and export / quantize / load behave as documented."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

import exaone_deploy
from exaone_deploy import ExaoneDeployError, load, quantize
from exaone_deploy.bundle import load_manifest
from exaone_deploy.runtime.sampling import SamplingError, SamplingParams

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The first ```python block of the README's "## Python API" section."""
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The README example run verbatim in an empty directory: its namespace and what it printed."""
    cwd = tmp_path_factory.mktemp("readme")
    namespace: dict = {}
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(cwd)
        exec(compile(readme_example(), str(README), "exec"), namespace)
    return namespace, out.getvalue(), cwd


def test_readme_example_runs(example):
    ns, printed, cwd = example
    model, gen = ns["model"], ns["model"].generator
    assert ns["bundle"] == cwd / "tiny-bundle" and load_manifest(ns["bundle"]).target == "ort"
    # What it printed is what the runtime underneath generates for the same prompts and settings.
    one = gen.generate([gen.encode("ROMEO:")], SamplingParams(max_new_tokens=32))[0].text
    batch = [r.text for r in gen.generate(["ROMEO:", "JULIET:"], SamplingParams(max_new_tokens=16))]
    streamed = "".join(gen.stream("JULIET:", SamplingParams(max_new_tokens=32, temperature=0.8, seed=0)))
    ids = gen.chat_prompt([{"role": "user", "content": "Who are you?"}])
    reply = gen.generate([ids], SamplingParams(max_new_tokens=32))[0].parsed().content
    assert printed == f"{one}\n{batch!r}\n{streamed}{reply}\n"
    assert len(one) > 5 and len(set(batch)) == 2
    assert ns["reply"] == {"role": "assistant", "content": reply}
    assert isinstance(model, exaone_deploy.Model)


def test_a_string_is_one_prompt_and_a_list_a_batch(example):
    model = example[0]["model"]
    text = model.generate("ROMEO:", max_new_tokens=12)
    assert isinstance(text, str) and text == model.generate(["ROMEO:"], max_new_tokens=12)[0]
    # Greedy rows decoded together match each row decoded alone.
    both = model.generate(["ROMEO:", "JULIET:"], max_new_tokens=12)
    assert both == [text, model.generate("JULIET:", max_new_tokens=12)]
    assert "".join(model.stream("ROMEO:", max_new_tokens=12)) == text
    with pytest.raises(TypeError, match="one prompt string"):
        next(model.stream(["ROMEO:"]))


def test_stop_strings_and_chat_forms(example):
    model = example[0]["model"]
    full = model.generate("ROMEO:", max_new_tokens=32)
    word = full.split()[1]
    assert model.generate("ROMEO:", max_new_tokens=32, stop=word) == full[: full.index(word)]
    messages = [{"role": "user", "content": "Who are you?"}]
    reply = model.chat(messages, max_new_tokens=8)
    assert model.chat("Who are you?", max_new_tokens=8) == reply  # a string is one user message
    assert model.chat([*messages, reply, {"role": "user", "content": "And?"}], max_new_tokens=8)["role"] == "assistant"


def test_errors_are_exaone_deploy_errors(example, tmp_path):
    model = example[0]["model"]
    with pytest.raises(SamplingError, match="top_p") as e:
        model.generate("x", top_p=1.5)
    assert isinstance(e.value, ExaoneDeployError)
    with pytest.raises(TypeError):  # a misspelt setting is a bug in the caller, not bad input
        model.generate("x", max_tokens=3)
    with pytest.raises(ExaoneDeployError, match="not found"):
        load(tmp_path / "nope")


def test_quantize_writes_a_bundle_that_loads(example, tmp_path):
    bundle = example[0]["bundle"]
    out = quantize(bundle, tmp_path / "q4", "int4-rtn", keep_float="lm_head", block_size=32)
    record = load_manifest(out).get("quantization")
    assert out == tmp_path / "q4" and record["scheme"] == "int4-rtn" and record["keep_float"] == ["lm_head"]
    assert isinstance(load(out).generate("ROMEO:", max_new_tokens=4), str)


def test_import_stays_light():
    code = (
        "import sys, exaone_deploy; from exaone_deploy import export, quantize, load, ExaoneDeployError; "
        "heavy = {'torch', 'onnx', 'onnxruntime', 'numpy', 'click'} & {m.split('.')[0] for m in sys.modules}; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
