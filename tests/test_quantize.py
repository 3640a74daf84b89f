"""End to end: tiny checkpoints -> fp32 bundle -> quantized bundles; graph structure, numerics, CLI, perplexity."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from exaone_deploy.bundle import load_manifest, sha256_file
from exaone_deploy.calibration.quantize import (
    QuantizeError,
    QuantOptions,
    calibrate,
    open_source,
    quantize,
    write_quantized_bundle,
)
from exaone_deploy.commands import main
from exaone_deploy.exporter import lower, ops
from exaone_deploy.exporter.export import ExportOptions, export_bundle
from exaone_deploy.runtime.ort_backend import OrtBackend
from exaone_deploy.tensorrt.checks import check_bundle
from exaone_deploy.tiny.make import make_tiny

SCHEMES = ["int8-sq", "fp8", "int4-awq", "int4-rtn"]
TARGETS = ["ort", "trt"]
TEXT = """안녕하세요, 만나서 반갑습니다. 저는 LG AI 연구원에서 만든 언어 모델입니다.
First Citizen: Before we proceed any further, hear me speak. You are all resolved rather to die than to famish?
오늘 서울의 날씨는 맑고 따뜻합니다. 내일은 비가 올 수도 있습니다.
All: Resolved. resolved. We know't, we know't. Let us kill him, and we'll have corn at our own price.
"""
ELEM = onnx.TensorProto


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    calib = root / "ko_en.txt"
    calib.write_text(TEXT * 40, encoding="utf-8")
    ckpt = make_tiny(root / "tiny", "1.2b", num_layers=2)
    fp32 = export_bundle(ckpt, root / "fp32", ExportOptions("ort", "float32", 256), progress=False)
    return {"root": root, "calib": calib, "ckpt": ckpt, "fp32": fp32}


@pytest.fixture(scope="module")
def hybrid(work):
    """The 32B layout: LLLG sliding-window/NoPE-global layers, 4 query heads per KV head, untied LM head, bf16
    weights; its ort bundles keep window-sized caches on sliding layers."""
    ckpt = make_tiny(work["root"] / "tiny32", "32b", num_layers=4)
    fp32 = export_bundle(ckpt, work["root"] / "fp32-hybrid", ExportOptions("ort", "float32", 256), progress=False)
    return {"root": work["root"], "calib": work["calib"], "ckpt": ckpt, "fp32": fp32}


def _opts(scheme, target, calib, **kw):
    return QuantOptions(scheme, calib, target=target, calib_samples=8, calib_seq_len=64, **kw)


@pytest.fixture(scope="module")
def bundles(work):
    out = {}
    for scheme in SCHEMES:
        for target in TARGETS:
            path = work["root"] / f"{scheme}-{target}"
            quantize(work["fp32"], path, _opts(scheme, target, work["calib"]))
            out[scheme, target] = path
    return out


def _prompt_logits(bundle, prompt):
    """Logits at every prompt position in ONNX Runtime (trt bundles through their ORT twin)."""
    import contextlib

    from exaone_deploy.validate.ppl import _bundle_scorer

    with contextlib.ExitStack() as stack:
        score = _bundle_scorer(Path(bundle), 64, stack)
        return score(np.asarray(prompt))


# ------------------------------------------------------------------------------------------------ structure


def _producer(graph, name):
    return next((n for n in graph.node if name in n.output), None)


def _inits(model):
    return {t.name: t for t in model.graph.initializer}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_linear_is_quantized_with_no_float_path(bundles, scheme, target):
    path = bundles[scheme, target]
    manifest = load_manifest(path)
    assert manifest.target == target and manifest.get("quantization")["scheme"] == scheme
    for file in ("canonical.onnx", "model.onnx"):
        m = onnx.load(path / file, load_external_data=False)
        g, inits = m.graph, _inits(m)
        # No float linear weight survives anywhere in the graph.
        assert not [n for n in inits if n.endswith(".weight.T")], file
        assert not [n for n in g.node if n.op_type == "MatMul" and any(i.endswith(".weight.T") for i in n.input)]
        weights = [n for n in inits if n.endswith((".int8", ".fp8", ".int4", ".nbits"))]
        assert len(weights) == 2 * 7 + 1  # q k v o gate up down per layer, plus the (tied) LM head
        for w in weights:
            consumers = [n for n in g.node if w in n.input]
            assert len(consumers) == 1
            node = consumers[0]
            if scheme == "int8-sq" and target == "ort":
                assert node.op_type == "MatMulIntegerToFloat" and node.domain == "com.microsoft"
                assert inits[w].data_type == ELEM.INT8
                q = _producer(g, node.input[0])
                assert q.op_type == "QuantizeLinear" and inits[q.input[2]].data_type == ELEM.UINT8
                assert inits[node.input[3]].data_type == ELEM.FLOAT and inits[node.input[3]].dims == [inits[w].dims[1]]
            elif scheme.startswith("int4") and target == "ort":
                assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
                attrs = {a.name: a.i for a in node.attribute}
                assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
                assert inits[w].data_type == ELEM.UINT8 and inits[w].dims[2] == 16
            else:
                assert node.op_type == "DequantizeLinear"
                mm = [n for n in g.node if node.output[0] in n.input]
                assert len(mm) == 1 and mm[0].op_type == "MatMul" and mm[0].input[1] == node.output[0]
                a = _producer(g, mm[0].input[0])
                scale = inits[node.input[1]]
                assert scale.data_type == ELEM.FLOAT
                if scheme.startswith("int4"):
                    assert inits[w].data_type == ELEM.INT4
                    attrs = {x.name: x.i for x in node.attribute}
                    assert attrs["block_size"] == 32 and attrs["axis"] == 0
                    assert list(scale.dims) == [inits[w].dims[0] // 32, inits[w].dims[1]]
                    assert a.op_type != "DequantizeLinear"  # weight-only: the activation stays float
                else:
                    # Activation: float -> Q -> DQ -> MatMul, per tensor, nothing else reads the DQ'd value.
                    assert a.op_type == "DequantizeLinear" and _producer(g, a.input[0]).op_type == "QuantizeLinear"
                    assert inits[a.input[1]].dims == [] and inits[a.input[1]].data_type == ELEM.FLOAT
                    zp_type = ELEM.FLOAT8E4M3FN if scheme == "fp8" else ELEM.INT8
                    assert inits[a.input[2]].data_type == zp_type and inits[node.input[2]].data_type == zp_type
                    assert inits[w].data_type == zp_type
                    if scheme == "fp8":
                        assert scale.dims == []  # per tensor
                    else:
                        assert list(scale.dims) == [inits[w].dims[1]]  # per output channel
                        assert {x.name: x.i for x in node.attribute}["axis"] == 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_trt_graphs_pass_the_onnx_checker(bundles, scheme):
    ops.register_onnx_schema()
    lower.register_trt_schema()
    for file in ("canonical.onnx", "model.onnx"):
        onnx.checker.check_model(str(bundles[scheme, "trt"] / file), full_check=True)
    m = onnx.load(bundles[scheme, "trt"] / "model.onnx", load_external_data=False)
    assert {n.domain for n in m.graph.node} <= {"", lower.TRT_DOMAIN}  # only standard ops and the plugin
    # TensorRT's strongly typed Q/DQ rules and parser op list (static checks, no TensorRT needed).
    report = check_bundle(bundles[scheme, "trt"])
    report.raise_for_errors()
    assert report.quantization == {"int8-sq": {"INT8": 24}, "fp8": {"FP8": 24}}.get(scheme, {"INT4": 15})


def test_manifest_records_the_quantization(bundles, work):
    q = load_manifest(bundles["int8-sq", "ort"]).get("quantization")
    assert q["calibration"]["sha256"] == sha256_file(work["calib"])
    assert (q["calibration"]["samples"], q["calibration"]["seq_len"]) == (8, 64)
    assert q["method"] == "max" and q["alpha"] == 0.5 and q["keep_float"] == [] and q["quantized"] == 15
    layer = q["layers"]["layers.1.mlp.down_proj"]
    assert layer["input_amax"] > 0 and len(layer["weight_scale"]) == 2 and layer["smooth"][0] > 0
    awq = load_manifest(bundles["int4-awq", "trt"]).get("quantization")
    assert awq["block_size"] == 32 and "awq_ratio" in awq["layers"]["layers.0.self_attn.q_proj"]
    assert load_manifest(bundles["int4-rtn", "ort"]).get("quantization")["calibration"] is None


# ------------------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("model", ["work", "hybrid"])
@pytest.mark.parametrize("scheme", ["int8-sq", "int4-awq"])
def test_smoothing_folds_are_exact(request, tmp_path, scheme, model):
    """The smoothing alone (Muls, up->down and GQA-tied v->o folds) leaves the model's function unchanged."""
    work = request.getfixturevalue(model)
    opts = _opts(scheme, "ort", work["calib"], alpha=0.8)
    source = open_source(work["fp32"], tmp_path)
    plan, calib, _ = calibrate(source, opts)
    assert (
        all(plan.groups[g].smooth is not None for g in ("layers.0.o", "layers.1.down", "layers.0.qkv"))
        or scheme == "int4-awq"
    )
    out = tmp_path / "smoothed"
    out.mkdir()
    write_quantized_bundle(source, plan, opts, out, calib=calib, smooth_only=True)
    m = onnx.load(out / "canonical.onnx", load_external_data=False)
    assert sum(n.op_type == "Mul" and n.name.endswith("/smooth") for n in m.graph.node) >= 1
    prompt = np.arange(3, 40) % 500
    want = _prompt_logits(work["fp32"], prompt)
    np.testing.assert_allclose(_prompt_logits(out, prompt), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("scheme, tol", [("int8-sq", 0.08), ("fp8", 0.12), ("int4-awq", 0.25), ("int4-rtn", 0.25)])
def test_quantized_logits_stay_close_to_fp32(work, bundles, scheme, target, tol):
    tok_ids = np.asarray([int(t) for t in np.random.default_rng(0).integers(0, 500, 48)])
    ref = _prompt_logits(work["fp32"], tok_ids)
    got = _prompt_logits(bundles[scheme, target], tok_ids)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref - ref.mean(-1, keepdims=True))
    assert rel < tol, rel
    if target == "trt":  # the TensorRT graph's numerics equal the ort graph's (up to INT8 kernel rounding)
        other = _prompt_logits(bundles[scheme, "ort"], tok_ids)
        assert np.abs(got - other).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("scheme, target, tol", [("int8-sq", "ort", 0.15), ("int4-awq", "trt", 0.4)])
def test_hybrid_model_quantizes_and_scores(hybrid, tmp_path, scheme, target, tol):
    out = tmp_path / "q"
    info = quantize(hybrid["fp32"], out, _opts(scheme, target, hybrid["calib"]))
    assert info["quantized"] == 4 * 7 + 1 and "lm_head" in info["layers"]
    m = load_manifest(out)
    assert m.get("io")["cache"]["window_cache"] == (target == "ort")
    prompt = np.random.default_rng(1).integers(0, 500, 40)  # longer than the window (8)
    ref = _prompt_logits(hybrid["fp32"], prompt)
    got = _prompt_logits(out, prompt)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref - ref.mean(-1, keepdims=True)) < tol
    if target == "ort":  # decode through the window-sized caches too
        backend = OrtBackend(out, max_batch=1, capacity=64)
        ref_backend = OrtBackend(hybrid["fp32"], max_batch=1, capacity=64)
        a, b = backend.prefill([0], [prompt.tolist()]), ref_backend.prefill([0], [prompt.tolist()])
        for _ in range(4):
            tok = int(np.argmax(b[0]))
            a, b = backend.decode([0], [tok]), ref_backend.decode([0], [tok])
            assert np.linalg.norm(a - b) / np.linalg.norm(b - b.mean()) < tol


def test_keep_float_leaves_those_linears_in_float(work, tmp_path):
    out = tmp_path / "kf"
    info = quantize(work["fp32"], out, _opts("int8-sq", "trt", work["calib"], keep_float=("0", "lm_head")))
    layer0 = (
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    )
    assert info["keep_float"] == sorted([f"layers.0.{n}" for n in layer0] + ["lm_head"])
    m = onnx.load(out / "model.onnx", load_external_data=False)
    floats = [n for n in _inits(m) if n.endswith(".weight.T")]
    assert len(floats) == 8
    assert all(n.startswith("model.layers.0.") or n == "model.embed_tokens.weight.T" for n in floats)
    assert sum(n.endswith(".int8") for n in _inits(m)) == 7
    with pytest.raises(ValueError, match="'mlp.gate' matches no linear layer"):
        quantize(work["fp32"], tmp_path / "bad", _opts("int8-sq", "trt", work["calib"], keep_float=("mlp.gate",)))
    with pytest.raises(ValueError, match="the model has layers 0-1, not \\[5\\]"):
        quantize(work["fp32"], tmp_path / "bad", _opts("int8-sq", "trt", work["calib"], keep_float=("5",)))
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


@pytest.mark.parametrize("target", TARGETS)
def test_blocks_that_do_not_divide_the_input_size(work, tmp_path, target):
    """Block 128 on hidden size 64: one partial block per column; trt pads the activation to match."""
    out = tmp_path / "b128"
    quantize(work["fp32"], out, _opts("int4-awq", target, work["calib"], block_size=128))
    m = onnx.load(out / "model.onnx", load_external_data=False)
    pads = [n for n in m.graph.node if n.op_type == "Pad"]
    assert len(pads) == (2 * 3 + 1 if target == "trt" else 0)  # qkv, gate_up per layer and lm_head read 64 wide
    if target == "trt":
        check_bundle(out).raise_for_errors()
    prompt = np.random.default_rng(2).integers(0, 500, 32)
    ref = _prompt_logits(work["fp32"], prompt)
    got = _prompt_logits(out, prompt)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref - ref.mean(-1, keepdims=True)) < 0.35


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_methods_clip_inside_the_max(work, bundles, tmp_path, method):
    out = tmp_path / method
    quantize(work["fp32"], out, _opts("int8-sq", "ort", work["calib"], method=method))
    got = load_manifest(out).get("quantization")["layers"]
    ref = load_manifest(bundles["int8-sq", "ort"]).get("quantization")["layers"]
    ratios = [got[k]["input_amax"] / ref[k]["input_amax"] for k in ref]
    assert all(0.05 < r <= 1.0 + 1e-6 for r in ratios) and min(ratios) < 1.0, ratios


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_quantize_checkpoint_and_eval_ppl(work, tmp_path):
    """From a checkpoint (exported inside quantize), Korean+English calibration text, then eval-ppl on both."""
    runner = CliRunner()
    out = tmp_path / "cli-int4"
    r = runner.invoke(
        main,
        [
            "quantize",
            str(work["ckpt"]),
            "-o",
            str(out),
            "--scheme",
            "int4-awq",
            "--calib-data",
            str(work["calib"]),
            "--calib-samples",
            "4",
            "--calib-seq-len",
            "64",
            "--block-size",
            "64",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "int4-awq bundle for ort written to" in r.output and "15 linears quantized" in r.output
    assert load_manifest(out).get("quantization")["block_size"] == 64
    r = runner.invoke(
        main, ["quantize", str(work["ckpt"]), "-o", str(out), "--scheme", "fp8", "--calib-data", str(work["calib"])]
    )
    assert r.exit_code != 0 and "already exists (use --force" in r.output
    ppl = {}
    for name, path in {"q": out, "fp32": work["fp32"], "ckpt": work["ckpt"]}.items():
        r = runner.invoke(
            main,
            ["eval-ppl", str(path), "--data", str(work["calib"]), "--seq-len", "32", "--max-tokens", "96", "--json"],
        )
        assert r.exit_code == 0, r.output
        ppl[name] = json.loads(r.output)
    assert ppl["fp32"]["tokens"] == ppl["ckpt"]["tokens"] == 93 and ppl["fp32"]["windows"] == 3
    assert ppl["fp32"]["kind"] == "bundle" and ppl["ckpt"]["kind"] == "checkpoint"
    assert abs(ppl["fp32"]["ppl"] / ppl["ckpt"]["ppl"] - 1) < 1e-4  # ONNX Runtime bundle == PyTorch reference
    assert abs(ppl["q"]["ppl"] / ppl["fp32"]["ppl"] - 1) < 0.05


def test_cli_bad_calibration_file_names_it(work, tmp_path):
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"content": "hello"}\n')
    r = CliRunner().invoke(
        main,
        [
            "quantize",
            str(work["fp32"]),
            "-o",
            str(tmp_path / "x"),
            "--scheme",
            "int8-sq",
            "--calib-data",
            str(bad),
            "--no-progress",
        ],
    )
    assert r.exit_code != 0 and "calib.jsonl:1: no 'text' field (fields: content); pass --text-field" in r.output
    r = CliRunner().invoke(
        main,
        [
            "quantize",
            str(work["fp32"]),
            "-o",
            str(tmp_path / "x"),
            "--scheme",
            "fp8",
            "--calib-data",
            str(work["calib"]),
            "--calib-samples",
            "1000",
        ],
    )
    assert r.exit_code != 0 and "ko_en.txt:" in r.output and "1000 were asked" in r.output
    r = CliRunner().invoke(main, ["quantize", str(work["fp32"]), "-o", str(tmp_path / "x"), "--scheme", "int8-sq"])
    assert r.exit_code != 0 and "needs --calib-data" in r.output
    assert not (tmp_path / "x").exists()


def test_quantize_refuses_a_quantized_bundle(work, bundles, tmp_path):
    with pytest.raises(QuantizeError, match="not a float32 quantized bundle"):
        quantize(bundles["fp8", "ort"], tmp_path / "x", _opts("fp8", "ort", work["calib"]))


def test_sensitivity_report(work):
    r = CliRunner().invoke(
        main,
        [
            "sensitivity",
            str(work["fp32"]),
            "--scheme",
            "int4-rtn",
            "--data",
            str(work["calib"]),
            "--seq-len",
            "32",
            "--max-tokens",
            "128",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert sorted(row["unit"] for row in report["layers"]) == ["0", "1", "lm_head"]
    assert [row["linears"] for row in report["layers"] if row["unit"] == "0"] == [7]
    incs = [row["increase_pct"] for row in report["layers"]]
    assert incs == sorted(incs, reverse=True) and report["float_ppl"] > 1
    # The suggestion names the units whose quantization raises perplexity, worst first (on these random tiny
    # weights int4 can also lower it a little, by a hair that varies with thread timing: then none is named).
    worst = report["layers"][0]
    assert report["suggested_keep_float"] == (worst["unit"] if worst["increase_pct"] > 0 else "")


def test_quantized_ort_bundle_gets_the_export_fusions(work, tmp_path):
    """The writer lowers quantized bundles with the export's pass list: linears kept in float are fused
    (q/k/v and gate/up as one MatMul + Split, weights in fused.data), and the manifest covers that file."""
    out = tmp_path / "kf-ort"
    quantize(work["fp32"], out, _opts("int4-rtn", "ort", None, keep_float=("0",)))
    m = onnx.load(out / "model.onnx", load_external_data=False)
    fused = [n for n in _inits(m) if "+" in n and not n.endswith(".split")]
    assert sorted(fused) == [
        "model.layers.0.mlp.gate_proj.weight.T+model.layers.0.mlp.up_proj.weight.T",
        "model.layers.0.self_attn.q_proj.weight.T+model.layers.0.self_attn.k_proj.weight.T+"
        "model.layers.0.self_attn.v_proj.weight.T",
    ]
    assert sum(n.op_type == "Split" for n in m.graph.node) == 2
    assert "fused.data" in load_manifest(out).get("sha256")
    assert oct(out.stat().st_mode & 0o777) == "0o755"


@pytest.mark.parametrize("target", TARGETS)
def test_int8_lm_head(work, bundles, tmp_path, target):
    """``lm_head="int8"`` on an int4 scheme: the head at 8 bits (8-bit MatMulNBits, block 128, accuracy level 4 on
    ort; INT8 weight-only DQ per channel on trt), closer to fp32 than the default INT4 head; every row's logits
    independent of the other rows (prefill logits of a prompt = the same prompt's rows scored one by one)."""
    out = tmp_path / "head8"
    info = quantize(work["fp32"], out, _opts("int4-rtn", target, work["calib"], lm_head="int8"))
    assert info["lm_head"] == "int8" and info["layers"]["lm_head"]["head"] == "int8"
    assert "head" not in load_manifest(bundles["int4-rtn", target]).get("quantization")["layers"]["lm_head"]
    m = onnx.load(out / "model.onnx", load_external_data=False)
    inits = _inits(m)
    head = next(n for n in m.graph.node if any(i.startswith("model.embed_tokens.weight.T") for i in n.input))
    if target == "ort":
        attrs = {a.name: a.i for a in head.attribute}
        assert head.op_type == "MatMulNBits" and attrs["bits"] == 8 and attrs["block_size"] == 128
        assert attrs["accuracy_level"] == 4 and inits[head.input[1]].dims[2] == 128
    else:
        assert head.op_type == "DequantizeLinear" and inits[head.input[0]].data_type == ELEM.INT8
        assert {a.name: a.i for a in head.attribute}["axis"] == 1
    tok_ids = np.random.default_rng(3).integers(0, 500, 48)
    ref = _prompt_logits(work["fp32"], tok_ids)

    def err(path):
        got = _prompt_logits(path, tok_ids)
        return np.linalg.norm(got - ref) / np.linalg.norm(ref - ref.mean(-1, keepdims=True))

    assert err(out) < err(bundles["int4-rtn", target])
    if target == "ort":  # batch-invariant: two rows decoded together equal each alone
        backend = OrtBackend(out, max_batch=2, capacity=64)
        a, b = [int(t) for t in tok_ids[:20]], [int(t) for t in tok_ids[20:40]]
        both = backend.prefill([0, 1], [a, b])
        backend.release(0)
        backend.release(1)
        alone = backend.prefill([1], [b])[0]
        # float summation order differs between the batched and single-row kernels (~1e-7); a quantizer shared
        # across rows (one scale for the whole tensor) moves logits by a quantization step (~1e-2)
        np.testing.assert_allclose(both[1], alone, rtol=0, atol=1e-5 * np.abs(alone).max())
    with pytest.raises(QuantizeError, match="unknown LM head quantization 'int6'"):
        _opts("int4-rtn", target, work["calib"], lm_head="int6").validate()
