"""INT8 KV cache (``--kv-cache int8``, issue 18): the lowering, the scales, the runtime buffers, what the manifest
reports, greedy decoding against the float cache on both make-tiny presets, and the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import onnx
import pytest

from exaone_deploy.calibration import kvcache
from exaone_deploy.calibration.quantize import (
    QuantizeError,
    QuantOptions,
    calibrate,
    open_source,
    write_quantized_bundle,
)
from exaone_deploy.errors import InputError
from exaone_deploy.exporter.export import ExportError, ExportOptions, export_bundle
from exaone_deploy.graph_io import GraphIO
from exaone_deploy.runtime.ort_backend import OrtBackend
from exaone_deploy.spec import ModelSpec, load_spec

MAX_SEQ = 256
N_PROMPT = 30  # longer than the 32b preset's window (8)


@pytest.fixture(scope="module")
def bundles(tiny_dirs, tmp_path_factory):
    """Per preset: the float32 bundle, the int8-cache bundle with static scales, and one with calibrated scales
    (float weights: an int4-rtn plan written smooth-only, i.e. no weight quantized), calibrated on the first
    90% of tinyshakespeare; the prompt is the start of the held-out 10%."""
    from exaone_deploy import assets
    from exaone_deploy.text.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("kv8")
    calib = root / "calib.txt"
    calib.write_text(assets.train_text()[:200_000])
    out = {}
    for preset, ckpt in tiny_dirs.items():
        fp32 = export_bundle(ckpt, root / f"{preset}-fp32", ExportOptions(max_seq_len=MAX_SEQ), progress=False)
        static = export_bundle(
            ckpt, root / f"{preset}-kv8", ExportOptions(max_seq_len=MAX_SEQ, kv_cache="int8"), progress=False
        )
        opts = QuantOptions("int4-rtn", calib, calib_samples=32, calib_seq_len=64, kv_cache="int8")
        source = open_source(fp32, root)
        plan, cal, _ = calibrate(source, opts)
        (root / f"{preset}-kv8-cal").mkdir()
        write_quantized_bundle(source, plan, opts, root / f"{preset}-kv8-cal", calib=cal, smooth_only=True)
        prompt = Tokenizer.from_dir(fp32).encode(assets.heldout_text()[:400])[:N_PROMPT]
        out[preset] = {
            "ckpt": ckpt,
            "fp32": fp32,
            "static": static,
            "calibrated": root / f"{preset}-kv8-cal",
            "prompt": prompt,
        }
    return out


def greedy(bundle, prompt: list[int], n: int = 32, forced: list[int] | None = None) -> tuple[list[int], np.ndarray]:
    """n greedy tokens after ``prompt`` (or the tokens ``forced`` fed instead), and the logits of each step."""
    be = OrtBackend(bundle, max_seq_len=MAX_SEQ)
    steps = [be.prefill([0], [prompt])[0]]
    out = []
    for i in range(n):
        out.append(int(np.argmax(steps[-1])))
        if i + 1 < n:
            steps.append(be.decode([0], [forced[i] if forced else out[-1]])[0])
    return out, np.array(steps)


@pytest.mark.parametrize("preset", ["1.2b", "32b"])
def test_greedy_tokens_unchanged_for_32_tokens(bundles, preset):
    """Calibrated scales, 32 greedy tokens against the float cache. A token may only change at a step where it
    can: where the float top-1/top-2 gap is below twice the int8 cache's logit error there (measured on the float
    path's tokens). On these random-weight presets the logits are near-flat (gaps down to 1e-3, INT8 errors
    1-5e-2), so this names the one near-tie the 32b preset meets; the 1.2b preset must match exactly.

    The static scales are not held to this on random weights: their V estimate assumes RMS-normalised sublayer
    outputs of norm ~sqrt(d), but a random model's attention outputs are so small that rms_norm_eps dominates
    the post-norm, so its V ranges are 15-100x below the estimate (kvcache.py)."""
    b = bundles[preset]
    ref, ref_logits = greedy(b["fp32"], b["prompt"])
    got, _ = greedy(b["calibrated"], b["prompt"])
    _, forced_logits = greedy(b["calibrated"], b["prompt"], forced=ref)
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    gap, err = top2[:, 1] - top2[:, 0], np.abs(forced_logits - ref_logits).max(axis=1)
    first = next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), len(ref))
    assert first == len(ref) or gap[first] < 2 * err[first], (preset, first, gap[first], err[first])
    if preset == "1.2b":
        assert got == ref
    assert first >= 24  # most of the 32 tokens match on either preset


@pytest.mark.parametrize("preset", ["1.2b", "32b"])
def test_int8_cache_is_used_and_calibrated_scales_beat_static(bundles, preset):
    ids = bundles[preset]["prompt"] * 2
    ref = OrtBackend(bundles[preset]["fp32"], max_seq_len=MAX_SEQ).score(ids, slot=0, chunk=7)
    err = {
        scales: np.abs(
            OrtBackend(bundles[preset][scales], max_seq_len=MAX_SEQ).score(ids, slot=0, chunk=7) - ref
        ).mean()
        for scales in ("static", "calibrated")
    }
    assert 0 < err["calibrated"] < err["static"], err  # quantized (not bypassed); finer steps, smaller error


@pytest.mark.parametrize("preset", ["1.2b", "32b"])
def test_lowered_graph_and_manifest(bundles, preset):
    b = bundles[preset]["static"]
    manifest = json.loads((b / "manifest.json").read_text())
    spec = ModelSpec.from_json(manifest["spec"])
    model = onnx.load(str(b / "model.onnx"), load_external_data=False)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == spec.num_layers
    for node in gqa:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k_quant_type"] == attrs["v_quant_type"] == b"PER_CHANNEL" and attrs["kv_cache_bit_width"] == 8
        layer = GraphIO.cache_layer(node.input[3])
        assert list(node.input[12:14]) == [GraphIO.kv_scale_name(layer, kv) for kv in ("key", "value")]
    inits = {t.name: t for t in model.graph.initializer}
    scale = inits[GraphIO.kv_scale_name(0, "key")]
    assert scale.data_type == onnx.TensorProto.FLOAT and list(scale.dims) == [1, spec.num_kv_heads, 1, spec.head_dim]
    caches = [v for v in [*model.graph.input, *model.graph.output] if GraphIO.is_cache(v.name)]
    assert len(caches) == 4 * spec.num_layers and all(
        v.type.tensor_type.elem_type == onnx.TensorProto.INT8 for v in caches
    )
    cache = manifest["io"]["cache"]
    assert cache["dtype"] == "int8" and cache["quant"]["type"] == "PER_CHANNEL"
    assert cache["quant"]["scales"].startswith("static")
    assert json.loads((bundles[preset]["calibrated"] / "manifest.json").read_text())["io"]["cache"]["quant"][
        "scales"
    ].startswith("calibrated")
    windowed = spec.is_hybrid
    assert cache["bytes"] == {str(MAX_SEQ): spec.kv_cache_bytes(MAX_SEQ, bytes_per_elem=1, windowed=windowed)}
    assert cache["bytes_per_token"] == 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim
    float_cache = json.loads((bundles[preset]["fp32"] / "manifest.json").read_text())["io"]["cache"]
    assert float_cache["dtype"] == "float32" and "quant" not in float_cache
    assert float_cache["bytes"][str(MAX_SEQ)] == 4 * cache["bytes"][str(MAX_SEQ)]


@pytest.mark.parametrize("preset", ["1.2b", "32b"])
def test_runtime_allocates_int8_buffers_of_the_reported_size(bundles, preset):
    be = OrtBackend(bundles[preset]["static"], max_batch=2, max_seq_len=MAX_SEQ)
    ref = OrtBackend(bundles[preset]["fp32"], max_batch=2, max_seq_len=MAX_SEQ)
    assert all(c.data_type() == "tensor(int8)" for c in be._caches)
    assert be.cache_bytes() == be.io.cache_bytes(MAX_SEQ, batch=2) and ref.cache_bytes() == 4 * be.cache_bytes()


@pytest.mark.parametrize("preset", ["1.2b", "32b"])
def test_decode_attention_runs_on_our_int8_kernel(bundles, preset):
    """Every global layer's attention over the int8 cache moves to our GroupQueryAttentionQ8 (sliding layers keep
    onnxruntime's op, as over a float cache); the greedy tests above then decode through it."""
    from exaone_deploy.runtime import kernels

    if kernels.library("auto") is None:
        pytest.skip("our kernel library is not available here (see the log)")
    b = bundles[preset]["calibrated"]
    spec = ModelSpec.from_json(json.loads((b / "manifest.json").read_text())["spec"])
    data, _ = kernels.rewrite((b / "model.onnx").read_bytes())
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node if "GroupQueryAttention" in n.op_type]
    sliding = sum(layer.sliding for layer in spec.layers)
    assert ops.count(kernels.AOP8) == spec.num_layers - sliding and ops.count("GroupQueryAttention") == sliding


@pytest.mark.parametrize("name", ["1.2b", "32b"])
def test_cache_bytes_halved_at_16k_against_a_16_bit_cache(real_config, tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps(real_config(name)))
    spec = load_spec(tmp_path)
    bf16 = GraphIO(spec, "bfloat16", spec.max_position_embeddings, window_cache=spec.is_hybrid)
    int8 = GraphIO(spec, "bfloat16", spec.max_position_embeddings, window_cache=spec.is_hybrid, kv_cache="int8")
    assert int8.cache_bytes(16384) * 2 == bf16.cache_bytes(16384)
    assert int8.cache_bytes(16384) == spec.kv_cache_bytes(16384, bytes_per_elem="int8", windowed=spec.is_hybrid)
    table = int8.manifest_io()["cache"]["bytes"]
    assert set(table) == {"4096", "16384", str(spec.max_position_embeddings)}
    if name == "1.2b":  # 30 global layers x 8 KV heads x 64 x (K, V) x 16384 tokens x 1 byte = 480 MiB
        assert table["16384"] == 30 * 8 * 64 * 2 * 16384
    else:  # 16 global layers at 16k + 48 sliding layers at their 4096 window, 8 x 128 x 2 bytes... at 1 byte
        assert table["16384"] == (16 * 16384 + 48 * 4096) * 8 * 128 * 2


def test_static_key_scales_bound_the_calibrated_ranges(bundles):
    """The static K range is a bound (k_norm then RoPE): it covers every calibrated channel."""
    for preset in ("1.2b", "32b"):
        static = onnx.load(str(bundles[preset]["static"] / "model.onnx"), load_external_data=False)
        cal = onnx.load(str(bundles[preset]["calibrated"] / "model.onnx"), load_external_data=False)
        s = {t.name: onnx.numpy_helper.to_array(t) for t in static.graph.initializer if t.name.startswith("kv_scale")}
        c = {t.name: onnx.numpy_helper.to_array(t) for t in cal.graph.initializer if t.name.startswith("kv_scale")}
        assert set(s) == set(c) and s
        for name in s:
            if name.endswith(".key"):
                assert np.all(s[name] >= c[name] * (1 - 1e-5)), name
        assert any(not np.allclose(s[n], c[n]) for n in s)  # the two sources differ


def test_rope_pair_absmax_bounds_every_rotation():
    rng = np.random.default_rng(0)
    kvh, d = 2, 8
    x = rng.standard_normal((50, kvh * d)).astype(np.float32)
    bound = kvcache.rope_pair_absmax(x, kvh, d)
    k = x.reshape(50, kvh, 2, d // 2)
    seen = np.zeros(kvh * d, np.float32)
    for theta in np.linspace(0, 2 * np.pi, 64):
        rot = np.concatenate(
            [
                k[:, :, 0] * np.cos(theta) - k[:, :, 1] * np.sin(theta),
                k[:, :, 1] * np.cos(theta) + k[:, :, 0] * np.sin(theta),
            ],
            axis=-1,
        )
        seen = np.maximum(seen, np.abs(rot).max(axis=0).reshape(-1))
    assert np.all(seen <= bound + 1e-6) and np.all(seen >= 0.99 * bound)  # tight: some angle reaches it


def test_missing_scales_are_refused_by_the_lowering(bundles):
    import onnx_ir as ir

    from exaone_deploy.exporter import lower

    b = bundles["1.2b"]["fp32"]  # a float canonical graph has no scale initializers
    spec = ModelSpec.from_json(json.loads((b / "manifest.json").read_text())["spec"])
    io = GraphIO(spec, kv_cache="int8")
    with pytest.raises(Exception) as e:
        lower.lower(ir.load(b / "canonical.onnx"), spec, "ort", io=io)
    causes = []
    err: BaseException | None = e.value
    while err is not None:
        causes.append(str(err))
        err = err.__cause__
    assert any("initializer 'kv_scale.0.key' is missing" in c for c in causes), causes


def test_hostile_manifest_cache_dtype(bundles):
    data = json.loads((bundles["1.2b"]["static"] / "manifest.json").read_text())
    spec = ModelSpec.from_json(data["spec"])
    assert GraphIO.from_manifest_data(spec, data).kv_cache == "int8"
    data["io"]["cache"]["dtype"] = "int4"
    with pytest.raises(InputError, match="io.cache.dtype"):
        GraphIO.from_manifest_data(spec, data)


def test_trt_target_refused(tiny_dirs, tmp_path):
    with pytest.raises(ExportError, match="ort target only"):
        export_bundle(tiny_dirs["1.2b"], tmp_path / "b", ExportOptions(target="trt", kv_cache="int8"))
    with pytest.raises(QuantizeError, match="ort target only"):
        QuantOptions("int4-rtn", target="trt", kv_cache="int8").validate()
    with pytest.raises(QuantizeError, match="needs --calib-data"):
        QuantOptions("int4-rtn", kv_cache="int8").validate()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "exaone_deploy.cli",
            "export",
            str(tiny_dirs["1.2b"]),
            "-o",
            str(tmp_path / "c"),
            "--target",
            "trt",
            "--kv-cache",
            "int8",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "ort target only" in r.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_onnxruntime_without_int8_cache_refused(tiny_dirs, tmp_path, monkeypatch):
    """An onnxruntime whose GroupQueryAttention schema predates the quantized cache (no kv_cache_bit_width)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    old = types.SimpleNamespace(
        name="GroupQueryAttention",
        domain="com.microsoft",
        attributes={"num_heads": None, "kv_num_heads": None},
        inputs=[types.SimpleNamespace(name=n) for n in ("query", "key", "value")],
    )
    monkeypatch.setattr(C, "get_all_operator_schema", lambda: [old])
    with pytest.raises(ExportError, match="has no INT8 KV cache") as e:
        export_bundle(tiny_dirs["1.2b"], tmp_path / "b", ExportOptions(kv_cache="int8"))
    assert "\n" not in str(e.value)
    export_bundle(tiny_dirs["1.2b"], tmp_path / "f", ExportOptions(max_seq_len=64), progress=False)  # float: fine
