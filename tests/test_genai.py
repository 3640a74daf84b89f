"""onnxruntime-genai on our bundles: the graph passes on hand-built graphs, genai_config.json, and greedy parity of
genai's own generator loop with ours (and transformers') on hybrid models, prompts longer than the window."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from exaone_deploy import genai
from exaone_deploy.bundle import load_manifest
from exaone_deploy.graph_io import GraphIO
from exaone_deploy.spec import load_spec

STEPS = 32
MAX_SEQ = 256


# ---- passes on a hand-built graph ------------------------------------------------------------------


def _contract_graph() -> ir.Model:
    """The four step inputs of docs/bundle.md passed straight through, plus one window-sized cache."""
    B, S, K = ir.SymbolicDim("batch"), ir.SymbolicDim("sequence"), ir.SymbolicDim("logits_len")
    ids = ir.val("input_ids", ir.DataType.INT64, ir.Shape([B, S]))
    seqlens = ir.val("seqlens_k", ir.DataType.INT32, ir.Shape([B]))
    total = ir.val("total_sequence_length", ir.DataType.INT32, ir.Shape([]))
    index = ir.val("logits_index", ir.DataType.INT64, ir.Shape([B, K]))
    past = ir.val("past_key_values.0.key", ir.DataType.FLOAT, ir.Shape([B, 1, 4, 2]))
    nodes = [
        ir.node("Identity", [seqlens], outputs=[ir.val("s", ir.DataType.INT32, ir.Shape([B]))]),
        ir.node("Identity", [total], outputs=[ir.val("t", ir.DataType.INT32, ir.Shape([]))]),
        ir.node(
            "Cast", [index], {"to": ir.DataType.FLOAT}, outputs=[ir.val("logits", ir.DataType.FLOAT, ir.Shape([B, K]))]
        ),
        ir.node("Identity", [past], outputs=[ir.val("present.0.key", ir.DataType.FLOAT, ir.Shape([B, 1, 4, 2]))]),
    ]
    graph = ir.Graph(
        [ids, seqlens, total, index, past],
        [n.outputs[0] for n in nodes],
        nodes=nodes,
        opset_imports={"": 21},
        name="contract",
    )
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, ids: np.ndarray, mask: np.ndarray, cache_len: int = 4) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {
        "input_ids": ids,
        "attention_mask": mask,
        "past_key_values.0.key": np.zeros((ids.shape[0], 1, cache_len, 2), np.float32),
    }
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_attention_mask_inputs_pass():
    model = _contract_graph()
    assert genai.AttentionMaskInputs()(model).modified
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    assert model.graph.inputs[1].dtype == ir.DataType.INT64
    assert model.graph.outputs[2].shape[1] == 1  # static: genai reads last-token logits
    # A right-padded prompt step: rows of 5 and 3 tokens.
    out = _run(model, np.zeros((2, 5), np.int64), np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int64))
    assert out["s"].tolist() == [4, 2] and out["s"].dtype == np.int32
    assert out["t"].tolist() == 5 and out["t"].dtype == np.int32
    assert out["logits"].tolist() == [[4.0], [2.0]]
    # The decode step after it: one column appended to the mask.
    out = _run(model, np.zeros((2, 1), np.int64), np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 1]], np.int64))
    assert out["s"].tolist() == [5, 3] and out["t"].tolist() == 6 and out["logits"].tolist() == [[0.0], [0.0]]
    # A 3-token continuation of a 4-token row.
    out = _run(model, np.zeros((1, 3), np.int64), np.ones((1, 7), np.int64))
    assert out["s"].tolist() == [6] and out["t"].tolist() == 7 and out["logits"].tolist() == [[2.0]]
    assert not genai.AttentionMaskInputs()(model).modified  # already rewritten


def test_symbolic_window_caches_pass():
    model = _contract_graph()
    assert genai.SymbolicWindowCaches()(model).modified
    cache_dims = [v.shape[2] for v in [*model.graph.inputs, *model.graph.outputs] if "key" in v.name]
    assert [str(d) for d in cache_dims] == [genai.SLIDING_CACHE_LEN] * 2
    genai.AttentionMaskInputs()(model)
    out = _run(model, np.zeros((1, 1), np.int64), np.ones((1, 3), np.int64), cache_len=4 + 16)  # W + genai's slack
    assert out["present.0.key"].shape == (1, 1, 20, 2)
    assert not genai.SymbolicWindowCaches()(model).modified


# ---- genai_config.json ---------------------------------------------------------------------------------


def test_genai_config_schema():
    from exaone_deploy import assets

    spec = load_spec(assets.tiny_model_dir())
    gen = {
        "eos_token_id": [8, 361],
        "pad_token_id": 0,
        "bos_token_id": 1,
        "temperature": 0.6,
        "top_p": 0.95,
        "do_sample": True,
    }
    cfg = genai.genai_config(spec, max_seq_len=512, window_cache=True, generation_config=gen)
    m, d = cfg["model"], cfg["model"]["decoder"]
    assert m["type"] == genai.MODEL_TYPE and m["context_length"] == 512 and m["vocab_size"] == spec.vocab_size
    assert (m["eos_token_id"], m["pad_token_id"], m["bos_token_id"]) == ([8, 361], 0, 1)
    assert (
        d["head_size"],
        d["hidden_size"],
        d["num_attention_heads"],
        d["num_key_value_heads"],
        d["num_hidden_layers"],
    ) == (spec.head_dim, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.num_layers)
    assert d["inputs"] == {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    assert d["outputs"]["present_value_names"] == "present.%d.value"
    assert d["sliding_window"]["layers"] == [layer.index for layer in spec.layers if layer.sliding]
    assert d["sliding_window"]["window_size"] == spec.sliding_window
    assert cfg["search"]["past_present_share_buffer"] and cfg["search"]["max_length"] == 512
    assert (cfg["search"]["temperature"], cfg["search"]["top_p"], cfg["search"]["do_sample"]) == (0.6, 0.95, True)
    # Full-length caches: no sliding_window section (genai then sizes every layer max_length).
    assert "sliding_window" not in genai.genai_config(spec, max_seq_len=512, window_cache=False)["model"]["decoder"]
    assert genai.genai_config(spec, max_seq_len=512, window_cache=True, max_length=64)["search"]["max_length"] == 64
    # eos falls back to config.json.
    assert genai.genai_config(spec, max_seq_len=512, window_cache=True)["model"]["eos_token_id"] == 8


def test_cache_bytes_windowed_and_full():
    from exaone_deploy import assets

    spec = load_spec(assets.tiny_model_dir())
    assert genai.cache_bytes(spec, max_length=1024, slack=0) == spec.kv_cache_bytes(1024, bytes_per_elem=4)
    assert genai.cache_bytes(spec, max_length=1024, window_cache=False) == spec.kv_cache_bytes(
        1024, bytes_per_elem=4, windowed=False
    )
    sliding = sum(layer.sliding for layer in spec.layers)
    per_pos = 2 * spec.num_kv_heads * spec.head_dim * 4
    assert (
        genai.cache_bytes(spec, max_length=1024) - genai.cache_bytes(spec, max_length=1024, slack=0)
        == sliding * 16 * per_pos
    )


# ---- genai on real bundles ------------------------------------------------------------------------------

try:
    import onnxruntime_genai as og
except ImportError:  # an install without the 'genai' extra: the passes and the config are still tested above
    og = None
needs_og = pytest.mark.skipif(
    og is None, reason="onnxruntime-genai is not installed (pip install 'exaone-deploy[genai]')"
)
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_dirs):
    """{name: (bundle dir, checkpoint dir)}, each bundle as ``export`` writes it (nothing added afterwards): the
    bundled trained tiny model and both make-tiny presets, 1.2b (all global, tied) and 32b (LLLG hybrid: sliding
    RoPE layers, global NoPE layers, llama3 RoPE scaling; its generation_config.json holds sampling defaults)."""
    import shutil

    from exaone_deploy import assets
    from exaone_deploy.exporter.export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("genai")
    ckpt32 = Path(shutil.copytree(tiny_dirs["32b"], root / "ckpt-32b"))
    gen = json.loads((ckpt32 / "generation_config.json").read_text())
    (ckpt32 / "generation_config.json").write_text(json.dumps({**gen, **SAMPLING_DEFAULTS}))
    ckpts = {"tiny": assets.tiny_model_dir(), "1.2b": tiny_dirs["1.2b"], "32b": ckpt32}
    return {
        name: (export_bundle(ckpt, root / f"bundle-{name}", ExportOptions(max_seq_len=MAX_SEQ), progress=False), ckpt)
        for name, ckpt in ckpts.items()
    }


@pytest.fixture(scope="module")
def quantized(bundles, tmp_path_factory):
    """{(preset, scheme): bundle} as ``quantize`` writes them from the fp32 bundles: int4 (RTN, MatMulNBits) of
    both presets, int8 (SmoothQuant, calibrated on the bundled corpus) of the hybrid one."""
    from exaone_deploy import assets
    from exaone_deploy.calibration.quantize import QuantOptions, quantize

    root = tmp_path_factory.mktemp("genai-q")
    options = {
        "int4": QuantOptions("int4-rtn"),
        "int8": QuantOptions("int8-sq", calib_data=assets.corpus_path(), calib_samples=8, calib_seq_len=64),
    }
    out = {}
    for preset, scheme in (("1.2b", "int4"), ("32b", "int4"), ("32b", "int8")):
        out[preset, scheme] = root / f"{preset}-{scheme}"
        quantize(bundles[preset][0], out[preset, scheme], options[scheme])
    return out


def _prompt(name: str, bundle) -> list[int]:
    """A prompt longer than the window (40 tokens without one): text for the trained tiny model, random ids for the
    random-weight presets."""
    spec = load_manifest(bundle).spec
    n = 3 * spec.sliding_window // 2 + 1 if spec.sliding_window else 40
    if name == "tiny":
        from exaone_deploy import assets
        from exaone_deploy.text.tokenizer import Tokenizer

        text = assets.corpus_path().read_text()
        return Tokenizer.from_dir(bundle).encode(text[:2000])[:n]
    return [int(t) for t in np.random.default_rng(0).integers(10, spec.vocab_size, n)]


def _ours_greedy(bundle, prompt) -> list[int]:
    """Our greedy tokens on onnxruntime's own kernels, the ones genai runs: the claim here is the same graph gives
    the same tokens. Our kernels (runtime/kernels) change float summation order, which flips near-ties of these
    random-weight models (a 5e-4 logit gap at step 29 of the int8 hybrid); they are checked against onnxruntime's
    ops in test_qmatmul.py and test_attention_kernel.py."""
    from exaone_deploy.runtime.generate import Generator
    from exaone_deploy.runtime.ort_backend import OrtBackend
    from exaone_deploy.runtime.sampling import SamplingParams
    from exaone_deploy.text.tokenizer import Tokenizer

    gen = Generator(OrtBackend(bundle, kernels="off"), Tokenizer.from_dir(bundle))
    return gen.generate([prompt], SamplingParams(max_new_tokens=STEPS, temperature=0.0))[0].token_ids


def _genai_greedy(bundle, prompts: list[list[int]]) -> list[list[int]]:
    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompts[0]) + STEPS, batch_size=len(prompts))
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(prompts, dtype=np.int32))
    out: list[list[int]] = [[] for _ in prompts]
    while not gen.is_done():
        gen.generate_next_token()
        for row, tok in zip(out, gen.get_next_tokens()):
            row.append(int(tok))
    return out


def _assert_variant_shares_the_weights(b) -> None:
    m = load_manifest(b)  # sha256 of every file, genai's included, checks out
    assert m.data["files"]["genai"] == genai.GENAI_FILE and genai.GENAI_CONFIG in m.data["sha256"]
    model = ir.load(b / genai.GENAI_FILE)
    external = {
        v.const_value.location
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    inline = [
        v.name
        for v in model.graph.initializers.values()
        if not isinstance(v.const_value, ir.ExternalTensor) and v.const_value.nbytes > 4096
    ]
    assert external <= {"weights.data", "fused.data"} and "weights.data" in external and not inline
    assert {p.name for p in b.glob("*.data")} == external  # no second weights file
    assert (b / genai.GENAI_FILE).stat().st_size < 1.1 * (b / "model.onnx").stat().st_size
    sliding = {i for i, layer in enumerate(m.spec.layers) if layer.sliding}
    for v in model.graph.inputs:
        layer = GraphIO.cache_layer(v.name)
        if layer is not None:
            assert str(v.shape[2]) == (genai.SLIDING_CACHE_LEN if layer in sliding else "cache_len")


def test_exported_bundle_carries_the_variant(bundles):
    """Written by ``export`` itself: hashed in the manifest, sharing the weight files, search defaults from the
    checkpoint's generation_config.json."""
    for b, _ in bundles.values():
        _assert_variant_shares_the_weights(b)
    cfg = json.loads((bundles["32b"][0] / genai.GENAI_CONFIG).read_text())
    assert {k: cfg["search"][k] for k in SAMPLING_DEFAULTS} == SAMPLING_DEFAULTS
    assert cfg["model"]["context_length"] == MAX_SEQ and cfg["search"]["max_length"] == MAX_SEQ
    assert json.loads((bundles["1.2b"][0] / genai.GENAI_CONFIG).read_text())["search"]["do_sample"] is False


def test_quantized_bundles_carry_the_variant(quantized):
    for (_, scheme), q in quantized.items():
        _assert_variant_shares_the_weights(q)
        ops = {n.op_type for n in ir.load(q / genai.GENAI_FILE).graph}
        assert ("MatMulNBits" if scheme == "int4" else "MatMulIntegerToFloat") in ops


def test_add_genai_variant_to_an_older_bundle(bundles, tmp_path):
    """A bundle written before the writer wrote the variant gets it, and its manifest still verifies."""
    import shutil

    b = Path(shutil.copytree(bundles["32b"][0], tmp_path / "old"))
    data = json.loads((b / "manifest.json").read_text())
    for name in (genai.GENAI_FILE, genai.GENAI_CONFIG):
        (b / name).unlink()
        del data["sha256"][name]
    del data["files"]["genai"]
    (b / "manifest.json").write_text(json.dumps(data))
    assert "genai" not in load_manifest(b).data["files"]
    assert genai.add_genai_variant(b) == [genai.GENAI_FILE, genai.GENAI_CONFIG]
    _assert_variant_shares_the_weights(b)
    assert (b / genai.GENAI_FILE).read_bytes() == (bundles["32b"][0] / genai.GENAI_FILE).read_bytes()


def test_genai_config_refuses_what_it_cannot_describe():
    import dataclasses

    from exaone_deploy import assets
    from exaone_deploy.errors import ExaoneDeployError

    spec = dataclasses.replace(load_spec(assets.tiny_model_dir()), eos_token_id=())
    with pytest.raises(ExaoneDeployError, match="no eos_token_id"):
        genai.genai_config(spec, max_seq_len=64, window_cache=True)


@needs_og
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "1.2b", "32b"])
def test_genai_greedy_equals_ours_and_transformers(bundles, name):
    """fp32: genai's generator, ours and transformers' greedy tokens agree, all 32 of them past the window."""
    b, ckpt = bundles[name]
    prompt = _prompt(name, b)
    window = load_manifest(b).spec.sliding_window
    assert not window or len(prompt) > window
    ours = _ours_greedy(b, prompt)
    theirs = _genai_greedy(b, [prompt])[0]
    assert len(ours) == STEPS and theirs == ours
    transformers = pytest.importorskip("transformers")
    import torch

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    assert ref[0, len(prompt) :].tolist() == ours


@needs_og
@pytest.mark.slow
@pytest.mark.parametrize("key", [("1.2b", "int4"), ("32b", "int4"), ("32b", "int8")])
def test_genai_greedy_equals_ours_quantized(quantized, key):
    """Quantized bundles as ``quantize`` writes them: genai's greedy tokens equal ours (the same graph)."""
    q = quantized[key]
    prompt = _prompt(key[0], q)
    ours = _ours_greedy(q, prompt)
    assert len(ours) == STEPS and _genai_greedy(q, [prompt])[0] == ours


@needs_og
@pytest.mark.slow
def test_genai_batch_of_equal_length_rows(bundles):
    """Two rows in one genai batch, each equal to ours alone (rows of different lengths: see docs/runtimes.md)."""
    b, _ = bundles["32b"]
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(10, 500, 20)] for _ in range(2)]
    assert _genai_greedy(b, prompts) == [_ours_greedy(b, p) for p in prompts]


@needs_og
def test_genai_tokenizer_reads_the_bundle(bundles):
    from exaone_deploy.text.tokenizer import Tokenizer

    b, _ = bundles["tiny"]
    text = "First Citizen:\nBefore we proceed any further, hear me speak. [|user|]\n한국어 ünïcode[|endofturn|]"
    tok = og.Tokenizer(og.Model(str(b)))
    assert list(tok.encode(text)) == Tokenizer.from_dir(b).encode(text)
    plain = "Before we proceed any further, hear me speak."
    assert tok.decode(tok.encode(plain)) == plain
    assert json.loads((b / genai.GENAI_CONFIG).read_text())["model"]["eos_token_id"] == 8
