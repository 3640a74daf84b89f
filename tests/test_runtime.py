"""Runtime: generation on ONNX Runtime against transformers, sampling, stopping, streaming, CLI and bad input."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exaone_deploy.bundle import BundleError
from exaone_deploy.exporter.export import ExportOptions, export_bundle
from exaone_deploy.runtime.backend import Backend, ContextLengthError
from exaone_deploy.runtime.generate import Generator
from exaone_deploy.runtime.sampling import Sampler, SamplingError, SamplingParams
from exaone_deploy.tiny.make import make_tiny

MAX_SEQ = 1024


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    out = {}
    for preset in ("1.2b", "32b"):
        ckpt = make_tiny(root / f"ckpt-{preset}", preset, seed=11, dtype="float32")
        out[preset] = (
            ckpt,
            export_bundle(ckpt, root / f"bundle-{preset}", ExportOptions(max_seq_len=MAX_SEQ), progress=False),
        )
    out["root"] = root
    return out


def cli(*args, check=True, input=None):
    r = subprocess.run(
        [sys.executable, "-m", "exaone_deploy.cli", *map(str, args)], capture_output=True, text=True, input=input
    )
    if check and r.returncode:
        raise AssertionError(r.stdout + r.stderr)
    return r


@pytest.mark.parametrize("preset", ["1.2b", "32b"])
def test_generate_json_token_identical_to_transformers(work, preset):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ckpt, bundle = work[preset]
    prompt = np.random.default_rng(3).integers(9, 500, 30).tolist()  # longer than the 32b window (8)
    r = cli("generate", bundle, "--input-ids", ",".join(map(str, prompt)), "--max-new-tokens", "40", "--json")
    out = json.loads(r.stdout)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ref = hf.generate(
        torch.tensor([prompt]), max_new_tokens=40, do_sample=False, attention_mask=torch.ones(1, 30, dtype=torch.long)
    )[0, 30:].tolist()
    eos = set(json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] for _ in [0])
    # transformers stops at eos too; compare the common prefix and that both stopped at the same place.
    assert out["token_ids"] == [t for t in ref][: len(out["token_ids"])]
    assert len(out["token_ids"]) == len(ref) - (1 if ref and ref[-1] in eos else 0)
    assert out["usage"] == {
        "prompt_tokens": 30,
        "completion_tokens": len(out["token_ids"]),
        "total_tokens": 30 + len(out["token_ids"]),
    }
    assert {"text", "reasoning", "tool_calls", "timings"} <= set(out)


def test_batched_generation_equals_single(work):
    gen = Generator.from_bundle(work["32b"][1], max_batch=3)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(9, 500, n).tolist() for n in (25, 9, 17)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batch = gen.generate(prompts, params)
    single = Generator.from_bundle(work["32b"][1])
    for p, r in zip(prompts, batch):
        assert single.generate([p], params)[0].token_ids == r.token_ids
        assert len(r.token_ids) == 12 and r.finish_reason == "length"


@pytest.mark.parametrize("preset", ["1.2b", "32b"])
def test_long_prompts_are_prefilled_in_chunks(work, preset, monkeypatch):
    # Chunks of 7 against one step; the 32b preset's window is 8, so its sliding layers take chunks past it.
    one = Generator.from_bundle(work[preset][1], max_batch=3, verify=False)
    one.prefill_chunk = None
    chunked = Generator(one.backend, one.tokenizer, prefill_chunk=7)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(9, 500, n).tolist() for n in (30, 16, 5)]  # ragged: 5 chunks, 3, 1
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    calls = []
    extend = one.backend.extend
    monkeypatch.setattr(
        one.backend, "extend", lambda slot, toks, **kw: calls.append((slot, len(toks))) or extend(slot, toks, **kw)
    )
    ref = [r.token_ids for r in one.generate(prompts, params)]
    assert calls == []
    got = [r.token_ids for r in chunked.generate(prompts, params)]
    assert calls == [(0, 7), (0, 7), (0, 7), (0, 2), (1, 7), (1, 2)]  # after every row's first chunk in one step
    assert got == ref
    with pytest.raises(ValueError, match="prefill_chunk"):
        Generator(one.backend, one.tokenizer, prefill_chunk=0)


def test_seeded_sampling_is_reproducible(work):
    gen = Generator.from_bundle(work["1.2b"][1])
    prompt = list(range(20, 40))
    p = SamplingParams(max_new_tokens=16, temperature=1.5, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = gen.generate([prompt], p)[0].token_ids
    b = gen.generate([prompt], p)[0].token_ids
    c = gen.generate(
        [prompt], SamplingParams(max_new_tokens=16, temperature=1.5, top_p=0.9, top_k=50, seed=8, ignore_eos=True)
    )[0].token_ids
    assert a == b and a != c


def test_stream_deltas_concatenate_to_text(work):
    gen = Generator.from_bundle(work["32b"][1])
    deltas = list(
        gen.stream("To be, or not", SamplingParams(max_new_tokens=24, temperature=1.0, seed=1, ignore_eos=True))
    )
    result = gen.last_result
    assert "".join(deltas) == result.text == gen.tokenizer.decode(result.token_ids)


def test_stop_string_and_eos(work):
    gen = Generator.from_bundle(work["1.2b"][1])
    prompt = list(range(30, 50))
    free = gen.generate([prompt], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    assert len(free.text) > 4
    stop = free.text[3:5]
    cut = gen.generate([prompt], SamplingParams(max_new_tokens=20, stop=(stop,), ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and free.text.startswith(cut.text)
    assert len(cut.text) <= free.text.index(stop)
    # The first generated token as a stop token id ends generation at once, with no token reported.
    first = free.token_ids[0]
    gen.eos_ids = [first]
    r = gen.generate([prompt], SamplingParams(max_new_tokens=20))[0]
    assert r.token_ids == [] and r.finish_reason == "stop"


def test_context_limit(work):
    gen = Generator.from_bundle(work["1.2b"][1])
    with pytest.raises(ContextLengthError, match=f"context holds {MAX_SEQ}"):
        gen.generate([[20] * MAX_SEQ], SamplingParams(max_new_tokens=4))
    r = gen.generate([[20] * (MAX_SEQ - 3)], SamplingParams(max_new_tokens=50, ignore_eos=True))[0]
    assert len(r.token_ids) == 3 and r.finish_reason == "length"


# ---- sampler --------------------------------------------------------------------------------------


def test_sampler_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))

    def draws(**kw):
        return {Sampler(SamplingParams(temperature=1.0, seed=s, **kw))(logits) for s in range(200)}

    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.75) == {0, 1}  # smallest set with mass >= 0.75
    assert draws(min_p=0.25) == {0, 1, 2}  # p >= 0.25 * 0.5
    assert draws() == {0, 1, 2, 3}
    assert Sampler(SamplingParams())(logits) == 0


def test_sample_batch_argmax_rows_equal_the_sampler():
    """sample_batch's one-argmax path for plain greedy rows picks what each row's own sampler picks, in an
    all-greedy batch and in a batch mixed with penalised and sampled rows (which keep their own sampler)."""
    from types import SimpleNamespace

    from exaone_deploy.runtime.generate import sample_batch

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 300)).astype(np.float32)
    logits[1, 7] = logits[1].max() + 1.0  # row 1 with a penalty on token 7 must not pick it
    kinds = [
        SamplingParams(),
        SamplingParams(repetition_penalty=50.0),
        SamplingParams(temperature=1.0, seed=3),
        SamplingParams(logprobs=2),
        SamplingParams(),
    ]
    want = [Sampler(p)(logits[b], [7]) for b, p in enumerate(kinds)]
    assert want[1] != 7 and want[0] == int(np.argmax(logits[0]))

    def rows(params):
        return [SimpleNamespace(params=p, sampler=Sampler(p), constraint=None, seen=[7]) for p in params]

    mixed = sample_batch(rows(kinds), logits.copy())
    assert [t for t, _ in mixed] == want
    assert mixed[3][1] is not None and mixed[0][1] is None  # logprobs only where asked
    greedy = sample_batch(rows([SamplingParams()] * 5), logits.copy())
    assert [t for t, _ in greedy] == np.argmax(logits, axis=1).tolist()


def test_repetition_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32)
    seen = [3, 7, 7, 12]
    proc = RepetitionPenaltyLogitsProcessor(1.3)
    want = proc(torch.tensor([seen]), torch.tensor(logits)[None])[0].numpy()
    x = logits.copy()
    idx = np.unique(seen)
    x[idx] = np.where(x[idx] > 0, x[idx] / 1.3, x[idx] * 1.3)
    assert int(np.argmax(want)) == Sampler(SamplingParams(repetition_penalty=1.3))(logits, seen)
    np.testing.assert_allclose(x, want, rtol=1e-6)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_invalid_sampling_values(kw, msg):
    with pytest.raises(SamplingError, match=msg):
        SamplingParams(**kw).validate()


# ---- bad input through the CLI ---------------------------------------------------------------------


def test_cli_bad_inputs(work):
    bundle = work["1.2b"][1]
    root = work["root"]
    r = cli("generate", root / "nope", "--prompt", "hi", check=False)
    assert r.returncode != 0 and "bundle directory not found" in r.stderr and "Traceback" not in r.stderr
    r = cli("generate", bundle, "--prompt", "hi", "--top-p", "1.5", check=False)
    assert r.returncode != 0 and "top_p" in r.stderr and "Traceback" not in r.stderr
    r = cli("generate", bundle, "--input-ids", ",".join(["20"] * (MAX_SEQ + 5)), check=False)
    assert r.returncode != 0 and "context" in r.stderr and "Traceback" not in r.stderr
    bad = root / "bad.json"
    bad.write_text("{not json")
    r = cli("generate", bundle, "--messages", bad, check=False)
    assert r.returncode != 0 and "bad.json" in r.stderr and "invalid JSON" in r.stderr
    bad.write_text(json.dumps({"messages": [{"content": "no role"}]}))
    r = cli("generate", bundle, "--messages", bad, check=False)
    assert r.returncode != 0 and "role" in r.stderr
    r = cli("generate", bundle, "--prompt", "a", "--input-ids", "1", check=False)
    assert r.returncode == 2 and "exactly one" in r.stderr


def test_cli_refuses_tampered_bundle(work):
    copy = work["root"] / "tampered"
    shutil.copytree(work["1.2b"][1], copy)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"[BOS]"', '"[B0S]"', 1))
    r = cli("generate", copy, "--prompt", "hi", check=False)
    assert r.returncode != 0 and "sha256 mismatch" in r.stderr and "tokenizer.json" in r.stderr
    with pytest.raises(BundleError):
        Generator.from_bundle(copy)


def test_cli_messages_use_the_chat_template(work):
    from exaone_deploy.text.tokenizer import Tokenizer

    bundle = work["32b"][1]
    body = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Seoul?"}],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather by city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
    }
    f = work["root"] / "req.json"
    f.write_text(json.dumps(body))
    for thinking in (False, True):
        args = ["generate", bundle, "--messages", f, "--max-new-tokens", "5", "--json"]
        out = json.loads(cli(*args, *(["--thinking"] if thinking else [])).stdout)
        ids = Tokenizer.from_dir(bundle).apply_chat_template(
            body["messages"], tools=body["tools"], enable_thinking=thinking
        )
        assert out["usage"]["prompt_tokens"] == len(ids)
        assert isinstance(out["tool_calls"], list)


def test_cli_stream_prints_text(work):
    r = cli(
        "generate",
        work["32b"][1],
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "8",
        "--stream",
        "--seed",
        "1",
        "--temperature",
        "0.9",
    )
    assert r.stdout.strip()


def test_chat_repl_commands(work):
    script = "hello there\n/think\nsecond turn\n/reset\n/exit\n"
    r = cli("chat", work["32b"][1], "--max-new-tokens", "4", input=script)
    assert "reasoning on" in r.stdout and "conversation cleared" in r.stdout
    assert r.stdout.count("assistant> ") == 2


def test_runtime_does_not_import_torch(work):
    code = (
        "import sys; import exaone_deploy.text.tokenizer, exaone_deploy.text.chat, exaone_deploy.text.detok; "
        "assert not {'torch', 'onnx', 'onnx_ir'} & set(sys.modules), 'text/ imported torch or onnx'; "
        "from exaone_deploy.runtime.generate import Generator; "
        f"g = Generator.from_bundle({str(work['32b'][1])!r}); g.generate(['hi']); "
        "assert not {'torch', 'onnx', 'onnx_ir'} & set(sys.modules), 'torch or onnx imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules one source file imports (relative imports resolved against ``package``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("package", ["runtime", "text"])
def test_dependencies_run_one_way(package):
    """runtime and text/ import nothing of the exporter, calibration, tensorrt or validate, nor torch or onnx;
    text/ is a leaf below the runtime. (The runtime finds the TensorRT backend by an import string.)"""
    import exaone_deploy

    root = Path(exaone_deploy.__file__).parent
    banned = [
        "torch",
        "onnx",
        "onnx_ir",
        "onnxscript",
        *(f"exaone_deploy.{p}" for p in ("exporter", "calibration", "tensorrt", "validate")),
    ]
    if package == "text":
        banned.append("exaone_deploy.runtime")
    files = sorted((root / package).rglob("*.py"))
    assert files
    for f in files:
        pkg = ".".join(["exaone_deploy", *f.relative_to(root).parent.parts])
        bad = [n for n in _imports(f, pkg) if any(n == b or n.startswith(b + ".") for b in banned)]
        assert not bad, f"{f.relative_to(root)} imports {bad}"


def test_backend_registry(work):
    from exaone_deploy.bundle import load_manifest
    from exaone_deploy.runtime.backend import BACKENDS, backend_class
    from exaone_deploy.runtime.generate import open_backend
    from exaone_deploy.runtime.ort_backend import OrtBackend

    assert backend_class("ort") is OrtBackend
    trt = backend_class("tensorrt")  # importable without TensorRT: it is imported when a backend is made
    assert (
        trt.__module__ == "exaone_deploy.tensorrt.backend"
        and issubclass(trt, Backend)
        and set(BACKENDS) == {"ort", "tensorrt"}
    )
    manifest = load_manifest(work["1.2b"][1])
    backend = open_backend(manifest, max_batch=2, max_seq_len=64)
    assert isinstance(backend, OrtBackend) and (backend.max_batch, backend.max_seq_len) == (2, 64)
    manifest.data["target"] = "trt"
    with pytest.raises(BundleError, match=r"bundle-1.2b: a 'trt' bundle cannot run directly .*exaone-deploy build"):
        open_backend(manifest)
    with pytest.raises(
        BundleError,
        match=r"nowhere: a 'genai' bundle cannot run directly \(runnable targets: ort, "
        r"tensorrt",
    ):
        backend_class("genai", "nowhere")


def test_backend_contract(work):
    """The Backend API as declared: one context length name (capacity: deprecated alias), allocate checks in the
    base, ensure only grows, and the manifest and GraphIO are there."""
    from exaone_deploy.runtime.ort_backend import OrtBackend

    backend = OrtBackend(work["32b"][1], max_batch=1, capacity=32, verify=False)
    assert backend.max_seq_len == backend.capacity == 32 and backend.manifest.max_seq_len == MAX_SEQ
    assert backend.io.max_seq_len == MAX_SEQ and backend.windowed  # 32b preset: window-sized caches
    assert OrtBackend(work["1.2b"][1], verify=False).max_seq_len == min(MAX_SEQ, 4096)  # GraphIO.default_context
    with pytest.raises(ContextLengthError, match=f"exceeds the bundle's max_seq_len {MAX_SEQ}"):
        backend.allocate(1, MAX_SEQ + 1)
    with pytest.raises(ValueError, match="must be >= 1"):
        backend.allocate(0, 16)
    backend.ensure(3, 16)
    assert (backend.max_batch, backend.max_seq_len) == (3, 32)
    with pytest.raises(ValueError, match="slot 3 is out of range"):
        backend.prefill([3], [[1, 2]])
    with pytest.raises(ValueError, match="one token per slot"):
        backend.decode([0, 1], [5])
    with pytest.raises(AttributeError):
        backend.capacity = 8  # read-only
    backend.close()


def test_score_in_an_explicit_slot_leaves_other_slots_alone(work):
    from exaone_deploy.runtime.ort_backend import OrtBackend

    bundle = work["32b"][1]  # window-sized caches: a stray write to slot 0 would evict its keys
    rng = np.random.default_rng(5)
    prompt, other = rng.integers(9, 500, 20).tolist(), rng.integers(9, 500, 30).tolist()
    backend = OrtBackend(bundle, max_batch=2, max_seq_len=64, verify=False)
    alone = OrtBackend(bundle, max_batch=1, max_seq_len=64, verify=False)
    backend.prefill([0], [prompt])
    alone.prefill([0], [prompt])
    with pytest.raises(ValueError, match="slot 0 holds 20 tokens; score needs a free slot"):
        backend.score(other, slot=0)
    scored = backend.score(other, slot=1, chunk=8)
    assert backend.lengths.tolist() == [20, 0]
    fresh = OrtBackend(bundle, max_batch=1, max_seq_len=64, verify=False).score(other, slot=0)
    assert scored.shape == (30, backend.spec.vocab_size)
    np.testing.assert_allclose(scored, fresh, rtol=0, atol=1e-5)
    for token in (7, 8, 9):  # slot 0 continues exactly as in a backend that never scored
        np.testing.assert_array_equal(backend.decode([0], [token]), alone.decode([0], [token]))


def test_generate_takes_a_bare_string_as_one_prompt(work):
    gen = Generator.from_bundle(work["32b"][1])
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    one = gen.generate("To be, or not", params)
    assert len(one) == 1 and one[0].prompt_ids == gen.tokenizer.encode("To be, or not")
    assert one[0].token_ids == gen.generate(["To be, or not"], params)[0].token_ids
    batch = gen.generate(["To be", "or not"], params)  # a list of strings is a batch
    assert [r.prompt_ids for r in batch] == [gen.tokenizer.encode("To be"), gen.tokenizer.encode("or not")]


def test_every_command_has_help():
    import click

    from exaone_deploy.cli import main

    names = main.list_commands(click.Context(main))
    assert {"generate", "serve", "quantize", "build"} <= set(names)  # serve is resolved lazily
    for name in names:
        r = cli(name, "--help")
        assert "Usage:" in r.stdout
    assert "0.1.0" in cli("--version").stdout
