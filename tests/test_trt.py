"""TensorRT path without TensorRT: static graph checks, the engine builder's pure parts and its failure without
TensorRT, the engine bundle format and its compatibility check, the TensorRT backend's slot bookkeeping (over an
ONNX Runtime executor and host memory), and bundle comparison. Tests that need TensorRT (and a GPU) are at the
end; they skip with the reason where it is missing.
"""

from __future__ import annotations

import copy
import ctypes
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper

from exaone_deploy.bundle import BundleError, load_manifest
from exaone_deploy.commands import main
from exaone_deploy.runtime.ort_backend import OrtBackend
from exaone_deploy.tensorrt import checks
from exaone_deploy.tensorrt.backend import (
    PROFILE_DECODE,
    PROFILE_PREFILL,
    TensorRTUnavailable,
    TrtBackend,
    engine_compat_error,
)
from exaone_deploy.tensorrt.builder import (
    BuildError,
    BuildOptions,
    BuildProgress,
    build_engine,
    profile_shapes,
    write_engine_bundle,
)
from exaone_deploy.tensorrt.checks import check_bundle, check_model
from exaone_deploy.validate.compare import compare_bundles, error_stats

MAX_SEQ = 64


def _tensorrt_installed() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or OSError from a stub without libraries
        return False
    return True


@pytest.fixture(scope="module")
def bundles(tiny_dirs, tmp_path_factory):
    """trt bundles of both presets (float32) and ort bundles of the 1.2b preset in float32 and float16."""
    from exaone_deploy.exporter.export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("trt-bundles")
    out = {}
    for preset in ("1.2b", "32b"):
        out[f"trt-{preset}"] = export_bundle(
            tiny_dirs[preset], root / f"trt-{preset}", ExportOptions(target="trt", max_seq_len=MAX_SEQ), progress=False
        )
    for dtype in ("float32", "float16"):
        out[f"ort-{dtype}"] = export_bundle(
            tiny_dirs["1.2b"],
            root / f"ort-{dtype}",
            ExportOptions(target="ort", dtype=dtype, max_seq_len=MAX_SEQ),
            progress=False,
        )
    return out


@pytest.fixture(scope="module")
def trt_model(bundles):
    """The 1.2b trt graph without weights (a fresh copy per use: tests break it)."""
    proto = onnx.load(str(load_manifest(bundles["trt-1.2b"]).model_path), load_external_data=False)
    return lambda: copy.deepcopy(proto)


def _errors(report) -> str:
    return "\n".join(str(i) for i in report.errors)


# ---- the supported-op list and the plugin contract ----------------------------------------------------------


def test_op_list_is_data_with_its_tensorrt_version():
    data = checks.supported_ops()
    assert data["tensorrt_version"] == "10.15" and "operators.md" in data["source"]
    assert data["opset_range"] == [9, 24]
    assert set(data["ops"]["MatMul"]["types"]) == {"FP32", "FP16", "BF16"}
    assert "past_key" in data["ops"]["Attention"]["restrictions"]  # why our attention is a plugin
    assert set(data["ops"]["DequantizeLinear"]["types"]) == {"INT8", "FP8", "FP4", "INT4"}
    assert "Unique" in data["unsupported"] and "Unique" not in data["ops"]
    assert "TRT_INT4DequantizeLinear" in data["trt_custom_ops"]["ops"]


def test_plugin_contract_matches_the_op_schema_and_the_lowering():
    from exaone_deploy.exporter import lower, ops

    c = checks.plugin_contract()
    assert (c.op_type, c.namespace, c.version) == (
        lower.TRT_OP_TYPE,
        lower.TRT_PLUGIN_NAMESPACE,
        lower.TRT_PLUGIN_VERSION,
    )
    schema = ops.onnx_schema()
    assert c.fields == {name: a.type for name, a in schema.attributes.items()}
    assert c.inputs == tuple(p.name for p in schema.inputs)
    assert c.outputs == tuple(p.name for p in schema.outputs)


# ---- static checks on the real trt graphs --------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["1.2b", "32b"])
def test_static_checks_on_tiny_trt_graphs(bundles, tiny_dirs, preset):
    from exaone_deploy.spec import load_spec

    spec = load_spec(tiny_dirs[preset])
    report = check_bundle(bundles[f"trt-{preset}"])
    assert report.plugin_nodes == spec.num_layers
    assert report.op_counts["MatMul"] > 0 and report.quantization == {}
    assert [p["window"] for p in report.plugins] == [layer.window for layer in spec.layers]
    assert [p["rotary"] for p in report.plugins] == [int(layer.rope) for layer in spec.layers]
    assert report.ok, _errors(report)


def test_check_rejects_an_ort_bundle(bundles):
    with pytest.raises(BundleError, match="'trt' bundles"):
        check_bundle(bundles["ort-float32"])
    report = check_model(load_manifest(bundles["ort-float32"]).model_path)
    assert report.errors and all(
        "GroupQueryAttention" in str(e) and "ONNX Runtime contrib" in str(e) for e in report.errors
    )


# ---- deliberately broken graphs ------------------------------------------------------------------------------


def _plugin_node(model):
    return next(n for n in model.graph.node if n.op_type == "EXAONEAttention_TRT")


def test_unsupported_ops_are_named(trt_model):
    m = trt_model()
    sig = next(n for n in m.graph.node if n.op_type == "Sigmoid")
    sig.op_type = "Unique"
    mul = next(n for n in m.graph.node if n.op_type == "Mul")
    mul.op_type, mul.domain = "FancyMul", "my.ops"
    m.opset_import.append(oh.make_opsetid("my.ops", 1))
    report = check_model(m)
    text = _errors(report)
    assert len(report.errors) == 2
    assert f"node {sig.name!r} (Unique)" in text and "does not support Unique" in text
    assert "my.ops::FancyMul is neither an op TensorRT's ONNX parser imports nor one of our plugins" in text
    with pytest.raises(checks.TrtGraphError, match="2 problem"):
        report.raise_for_errors()


def test_plugin_node_missing_or_mistyped_fields(trt_model):
    m = trt_model()
    node = _plugin_node(m)
    keep = [a for a in node.attribute if a.name not in ("plugin_namespace", "num_heads", "window")]
    keep.append(oh.make_attribute("num_heads", 4.0))  # FLOAT instead of INT
    keep.append(oh.make_attribute("frobnicate", 1))
    del node.attribute[:]
    node.attribute.extend(keep)
    text = _errors(check_model(m))
    assert "plugin attribute 'plugin_namespace' is missing" in text and "'exaone_deploy'" in text
    assert "plugin field 'num_heads' must be INT, got FLOAT" in text
    assert "plugin field 'window' (INT) is missing" in text
    assert "unknown attribute 'frobnicate'" in text

    m = trt_model()
    next(a for a in _plugin_node(m).attribute if a.name == "plugin_version").s = b"2"
    assert "plugin_version is '2'; the registered plugin has '1'" in _errors(check_model(m))

    m = trt_model()
    node = _plugin_node(m)
    next(a for a in node.attribute if a.name == "kv_num_heads").i = 3  # 4 query heads
    assert "must be a positive multiple of kv_num_heads=3" in _errors(check_model(m))


def test_plugin_cache_must_be_the_in_place_graph_io(trt_model):
    m = trt_model()
    node = _plugin_node(m)
    node.output[1], node.output[2] = node.output[2], node.output[1]  # present key <-> value
    text = _errors(check_model(m))
    assert "cache key: 'past_key_values.0.key' pairs with 'present.0.value', expected 'present.0.key'" in text
    m = trt_model()
    node = _plugin_node(m)
    node.output[1] = "not_a_graph_output"
    text = _errors(check_model(m))
    assert "'past_key_values.0.key' must be a graph input and 'not_a_graph_output' a graph output" in text
    m = trt_model()
    node = _plugin_node(m)
    node.input[5], node.input[3] = node.input[3], node.input[5]  # seqlens_k <-> past_key
    text = _errors(check_model(m))
    assert "input 5 ('past_key_values.0.key') must be INT32, got FLOAT" in text
    assert "input 3 ('seqlens_k') is INT32 but query is FLOAT" in text


def _qdq_model(
    *,
    x_type=TP.FLOAT,
    q_scale_type=TP.FLOAT,
    dq_scale=None,
    zp_type=TP.INT8,
    zp_value=0,
    w=None,
    w_scale=None,
    w_axis=1,
    w_block=None,
    q_then=None,
    scale_input=False,
    extra=(),
):
    """x (2, 4) -> Q -> DQ -> MatMul(., DQ(W int8 (4, 3), per-channel scales)) -> y (2, 3)."""
    inits = [
        numpy_helper.from_array(np.array(0.05, dtype=onnx.helper.tensor_dtype_to_np_dtype(q_scale_type)), "s_x"),
        oh.make_tensor("zp_x", zp_type, [], [zp_value]),
    ]
    if dq_scale is not None:
        inits.append(numpy_helper.from_array(dq_scale, "s_x_dq"))
    w = np.arange(12, dtype=np.int8).reshape(4, 3) - 6 if w is None else w
    if isinstance(w, np.ndarray):
        inits.append(numpy_helper.from_array(w, "W"))
    else:
        inits.append(w)  # a TensorProto (INT4)
    w_scale = np.array([0.1, 0.2, 0.3], dtype=np.float32) if w_scale is None else w_scale
    inits.append(numpy_helper.from_array(w_scale, "s_w"))
    scale = "s_in" if scale_input else "s_x"
    nodes = [oh.make_node("QuantizeLinear", ["x", scale, "zp_x"], ["xq"], name="q_x")]
    after_q = q_then or "DequantizeLinear"
    if after_q == "DequantizeLinear":
        nodes.append(
            oh.make_node(
                "DequantizeLinear", ["xq", "s_x_dq" if dq_scale is not None else scale, "zp_x"], ["xd"], name="dq_x"
            )
        )
    else:
        nodes.append(oh.make_node(after_q, ["xq"], ["xd"], name="after_q", to=TP.FLOAT))
    w_attrs = {"axis": w_axis} if w_block is None else {"axis": 0, "block_size": w_block}
    nodes.append(oh.make_node("DequantizeLinear", ["W", "s_w"], ["wd"], name="dq_w", **w_attrs))
    nodes.append(oh.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"))
    nodes.extend(extra)
    inputs = [oh.make_tensor_value_info("x", x_type, [2, 4])]
    if scale_input:
        inputs.append(oh.make_tensor_value_info("s_in", TP.FLOAT, []))
    graph = oh.make_graph(nodes, "qdq", inputs, [oh.make_tensor_value_info("y", TP.FLOAT, [2, 3])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])
    return onnx.shape_inference.infer_shapes(model)


def test_valid_qdq_graph_passes():
    m = _qdq_model()
    onnx.checker.check_model(m, full_check=True)
    report = check_model(m)
    assert report.ok, _errors(report)
    assert report.quantization == {"INT8": 2} and not report.warnings


def test_int4_blocked_weights_pass_and_fp8_pairs_pass():
    w4 = oh.make_tensor("W", TP.INT4, [4, 3], np.tile([1, -2, 3], 4).tolist())
    s4 = np.full((2, 3), 0.1, dtype=np.float32)  # blocks of 2 rows
    m = _qdq_model(w=w4, w_scale=s4, w_block=2)
    onnx.checker.check_model(m, full_check=True)
    report = check_model(m)
    assert report.ok, _errors(report)
    assert report.quantization == {"INT8": 1, "INT4": 1}
    m = _qdq_model(zp_type=TP.FLOAT8E4M3FN)
    onnx.checker.check_model(m, full_check=True)
    assert check_model(m).ok and check_model(m).quantization["FP8"] == 1


@pytest.mark.parametrize(
    "case, expected",
    [
        (dict(zp_type=TP.UINT8), "UINT8 quantization is DLA-only"),
        (dict(zp_type=TP.FLOAT8E5M2), "TensorRT's FP8 is FLOAT8E4M3FN"),
        (dict(q_scale_type=TP.FLOAT16), "'x' is FLOAT but its scale is FLOAT16"),
        (dict(dq_scale=np.array(0.05, dtype=np.float16)), "Q/DQ pair scales differ"),
        (dict(zp_value=3), "zero point 'zp_x' is not all zeros"),
        (dict(w_scale=np.array([0.1, -0.2, 0.3], dtype=np.float32)), "non-positive values"),
        (dict(w_scale=np.array([0.1, 0.2], dtype=np.float32)), "2 per-channel scales but input 'W' has 3 channels"),
        (dict(w_axis=2), "axis 2 is out of range for input 'W' of rank 2"),
        (dict(scale_input=True), "scale 's_in' must be a build-time constant"),
        (dict(q_then="Cast"), "every Q must feed DequantizeLinear nodes"),
    ],
)
def test_broken_qdq_is_named(case, expected):
    report = check_model(_qdq_model(**case))
    assert not report.ok
    assert expected in _errors(report), _errors(report)


def test_qdq_on_activations_only_per_tensor_and_int4_weights_only():
    m = _qdq_model()
    s_x = next(i for i in m.graph.initializer if i.name == "s_x")
    s_x.CopyFrom(numpy_helper.from_array(np.full(4, 0.05, np.float32), "s_x"))  # per-channel on an activation
    z = next(i for i in m.graph.initializer if i.name == "zp_x")
    z.CopyFrom(oh.make_tensor("zp_x", TP.INT8, [4], [0] * 4))
    text = _errors(check_model(m))
    assert "per-channel scales on 'x', which is an activation" in text
    # DQ of an activation int8 tensor that comes from a Cast (not a Q): no pair
    m = _qdq_model(
        extra=[
            oh.make_node("Cast", ["y"], ["y8"], to=TP.INT8, name="c8"),
            oh.make_node("DequantizeLinear", ["y8", "s_x"], ["yd"], name="dq_bad"),
        ]
    )
    text = _errors(check_model(m))
    assert "DQ input 'y8' comes from Cast: it must be a QuantizeLinear output (Q->DQ pair)" in text
    # blocked (INT4) DQ of a non-constant: weights only
    w4 = oh.make_tensor("W4", TP.INT4, [4, 2], [1] * 8)
    g = oh.make_graph(
        [
            oh.make_node("DequantizeLinear", ["a", "s4"], ["ad"], axis=0, block_size=2, name="dq_act"),
            oh.make_node("DequantizeLinear", ["W4", "s4"], ["wd"], axis=0, block_size=2, name="dq_w4"),
            oh.make_node("Add", ["ad", "wd"], ["y"], name="add"),
        ],
        "int4",
        [oh.make_tensor_value_info("a", TP.INT4, [4, 2])],
        [oh.make_tensor_value_info("y", TP.FLOAT, [4, 2])],
        [w4, numpy_helper.from_array(np.full((2, 2), 0.5, np.float32), "s4")],
    )
    m = onnx.shape_inference.infer_shapes(oh.make_model(g, opset_imports=[oh.make_opsetid("", 21)]))
    text = _errors(check_model(m))
    assert "blocked scales on 'a', which is not a constant" in text
    assert "INT4 DQ of 'a', which is not constant" in text
    assert "INT4 weight DQ feeds Add: TensorRT fuses 4-bit weight dequantization only into MatMul/Gemm" in text


# ---- build: pure parts and the failure without TensorRT ------------------------------------------------------


def test_profile_shapes_cover_every_dynamic_input(bundles):
    m = load_manifest(bundles["trt-1.2b"])
    prefill, decode = profile_shapes(m.spec, max_batch=4, max_seq_len=48)
    graph = onnx.load(str(m.model_path), load_external_data=False).graph
    dynamic = {v.name for v in graph.input if any(d.dim_param for d in v.type.tensor_type.shape.dim)}
    assert set(prefill) == set(decode) == dynamic  # total_sequence_length (a scalar) needs no profile
    for prof in (prefill, decode):
        for name, (lo, opt, hi) in prof.items():
            assert len(lo) == len(opt) == len(hi)
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), name
    assert prefill["input_ids"] == ((1, 1), (1, 48), (4, 48))  # opt chunk min(256, max)
    assert decode["input_ids"] == ((1, 1), (4, 1), (4, 1)) and decode["logits_index"][2] == (4, 1)
    assert prefill["past_key_values.3.value"][2] == (4, m.spec.num_kv_heads, 48, m.spec.head_dim)


def test_build_options_are_validated(bundles, tmp_path):
    with pytest.raises(BuildError, match=r"--max-seq-len 65 must be in 1..64"):
        build_engine(bundles["trt-1.2b"], tmp_path / "e", BuildOptions(max_seq_len=65))
    with pytest.raises(BundleError, match="TensorRT engines are built from 'trt' bundles"):
        build_engine(bundles["ort-float32"], tmp_path / "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.skipif(
    _tensorrt_installed(), reason="TensorRT is installed here: the missing-TensorRT path does not apply"
)
def test_build_without_tensorrt_fails_cleanly(bundles, tmp_path):
    with pytest.raises(TensorRTUnavailable, match="Python package 'tensorrt' is not installed"):
        build_engine(bundles["trt-1.2b"], tmp_path / "engine")
    assert not (tmp_path / "engine").exists()
    result = CliRunner().invoke(
        main,
        ["build", str(bundles["trt-1.2b"]), "-o", str(tmp_path / "engine"), "--max-batch", "2", "--opt-level", "2"],
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: `exaone-deploy build` needs TensorRT"), result.output
    assert "'tensorrt'" in lines[0] and "pip install tensorrt" in lines[0]


def test_build_check_only_cli(bundles):
    ok = CliRunner().invoke(main, ["build", str(bundles["trt-1.2b"]), "--check-only", "--json"])
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.output)
    assert data["ok"] and data["plugin_nodes"] == 4 and data["tensorrt_version"] == "10.15"
    bad = CliRunner().invoke(main, ["build", str(bundles["ort-float32"]), "--check-only"])
    assert bad.exit_code == 1 and "'trt' bundles" in bad.output


def test_build_progress_nests_phases():
    events = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.n = kw, 0
            events.append(("open", kw["desc"], kw["total"], kw["position"]))

        def refresh(self):
            events.append(("step", self.kw["desc"].strip(), self.n))

        def close(self):
            events.append(("close", self.kw["desc"].strip()))

    p = BuildProgress(bar_factory=Bar)
    p.phase_start("Building engine", None, 3)
    p.phase_start("Tactic timing", "Building engine", 2)
    assert p.step_complete("Tactic timing", 0) and p.step_complete("Tactic timing", 1)
    p.phase_finish("Tactic timing")
    p.step_complete("Building engine", 0)
    p.phase_finish("Building engine")
    assert events[0] == ("open", "Building engine", 3, 0)
    assert events[1] == ("open", "  Tactic timing", 2, 1)
    assert ("step", "Tactic timing", 2) in events and ("close", "Tactic timing") in events
    assert p.finished == ["Tactic timing", "Building engine"]


# ---- engine bundles: format and compatibility ------------------------------------------------------------------


def _tensorrt_info(version="10.15.1.29", cc="9.0"):
    return {
        "version": version,
        "device": "NVIDIA H200",
        "compute_capability": cc,
        "hardware_compatibility": "none",
        "max_batch": 2,
        "max_seq_len": 48,
        "profiles": [],
        "plugins": [],
        "layers": [],
    }


def test_engine_bundle_manifest_and_compatibility(bundles, tmp_path):
    source = load_manifest(bundles["trt-1.2b"])
    engine_bytes = b"serialized engine bytes stand in here: the bundle format does not look inside"
    path = write_engine_bundle(source, tmp_path / "engine", engine_bytes, _tensorrt_info(), max_seq_len=48)
    m = load_manifest(path)  # verifies sha256 of model.engine and the tokenizer files
    assert m.target == "tensorrt" and m.model_path.read_bytes() == engine_bytes
    assert m.max_seq_len == 48 and m.dtype == source.dtype
    assert m.spec.config_sha256 == source.spec.config_sha256
    assert (path / "tokenizer.json").exists() and m.data["files"]["weights"] is None
    from exaone_deploy.bundle import sha256_file

    assert m.get("source_bundle")["manifest_sha256"] == sha256_file(source.root / "manifest.json")
    assert m.get("source_bundle")["model_sha256"] == source.get("sha256")["model.onnx"]
    info = m.get("tensorrt")
    assert engine_compat_error(info, "10.15.1.29", "9.0") is None
    msg = engine_compat_error(info, "11.4.0.106", "9.0")
    assert "built with TensorRT 10.15.1.29 but this machine has TensorRT 11.4.0.106" in msg and "rebuild" in msg
    msg = engine_compat_error(info, "10.15.1.29", "8.9")
    assert "compute capability 9.0 (NVIDIA H200) but this GPU is 8.9" in msg
    with pytest.raises(BuildError, match="already exists"):
        write_engine_bundle(source, path, engine_bytes, _tensorrt_info(), max_seq_len=48)


@pytest.mark.skipif(_tensorrt_installed(), reason="TensorRT is installed here")
def test_engine_bundle_without_tensorrt_fails_cleanly(bundles, tmp_path):
    from exaone_deploy.runtime.generate import Generator, open_backend

    path = write_engine_bundle(
        load_manifest(bundles["trt-1.2b"]), tmp_path / "engine", b"x", _tensorrt_info(), max_seq_len=48
    )
    with pytest.raises(TensorRTUnavailable, match="Python package 'tensorrt' is not installed"):
        open_backend(load_manifest(path))
    with pytest.raises(TensorRTUnavailable, match="'tensorrt'"):
        Generator.from_bundle(path)
    with pytest.raises(BundleError, match="the TensorRT backend runs engine bundles"):
        TrtBackend(bundles["trt-1.2b"])


# ---- the TensorRT backend's bookkeeping, over ONNX Runtime and host memory -------------------------------------


class HostMemory:
    """The memory interface of TrtBackend (alloc/upload/download...) on host buffers, bounds-checked."""

    supports_graphs = False
    stream_handle = 0

    def __init__(self):
        self.blocks: dict[int, np.ndarray] = {}

    def alloc(self, nbytes):
        block = np.zeros(max(int(nbytes), 1), dtype=np.uint8)
        self.blocks[block.ctypes.data] = block
        return block.ctypes.data

    def _check(self, ptr, nbytes):
        for start, block in self.blocks.items():
            if start <= ptr and ptr + nbytes <= start + block.nbytes:
                return
        raise AssertionError(f"access of {nbytes} bytes at {ptr:#x} is outside every allocation")

    def free(self, ptr):
        del self.blocks[ptr]

    def zero(self, ptr, nbytes):
        self._check(ptr, nbytes)
        ctypes.memset(ptr, 0, nbytes)

    def upload(self, ptr, arr):
        arr = np.ascontiguousarray(arr)
        self._check(ptr, arr.nbytes)
        ctypes.memmove(ptr, arr.ctypes.data, arr.nbytes)

    def download(self, arr, ptr):
        self._check(ptr, arr.nbytes)
        ctypes.memmove(arr.ctypes.data, ptr, arr.nbytes)

    def sync(self):
        pass


class OrtEngine:
    """TrtEngine's interface (per-profile shapes and addresses, execute) over an 'ort' bundle's ONNX Runtime
    session bound to those addresses: the same graph I/O as an engine built from the 'trt' bundle."""

    _NP = {
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
    }

    def __init__(self, model_path, memory: HostMemory):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        self.memory = memory
        self.types = {v.name: self._NP[v.type] for v in [*self.session.get_inputs(), *self.session.get_outputs()]}
        self.state = [{"shapes": {}, "ptrs": {}}, {"shapes": {}, "ptrs": {}}]
        self.calls, self.sets = [], 0

    def set_input_shape(self, profile, name, shape):
        self.state[profile]["shapes"][name] = tuple(shape)
        self.sets += 1

    def set_tensor_address(self, profile, name, ptr):
        self.state[profile]["ptrs"][name] = ptr
        self.sets += 1

    def execute(self, profile, stream):
        st = self.state[profile]
        shapes, ptrs = st["shapes"], st["ptrs"]
        B, K = shapes["logits_index"]
        io = self.session.io_binding()
        for v in self.session.get_inputs():
            shape = shapes[v.name]
            self.memory._check(ptrs[v.name], int(np.prod(shape)) * np.dtype(self.types[v.name]).itemsize)
            io.bind_input(v.name, "cpu", 0, self.types[v.name], list(shape), ptrs[v.name])
        for v in self.session.get_outputs():
            if v.name == "logits":
                shape = (B, K, v.shape[-1])
            else:
                shape = shapes["past_key_values." + v.name[len("present.") :]]
                assert ptrs[v.name] == ptrs["past_key_values." + v.name[len("present.") :]], "not in place"
            io.bind_output(v.name, "cpu", 0, self.types[v.name], list(shape), ptrs[v.name])
        self.session.run_with_iobinding(io)
        self.calls.append((profile, shapes["input_ids"], ptrs["past_key_values.0.key"]))


def test_trt_backend_slots_match_the_ort_backend(bundles):
    manifest = load_manifest(bundles["ort-float32"])
    mem = HostMemory()
    engine = OrtEngine(manifest.model_path, mem)
    manifest.data["tensorrt"] = {"max_batch": 3}
    trt = TrtBackend.from_parts(manifest, engine, mem, max_batch=3, capacity=40)
    ref = OrtBackend(manifest, max_batch=3, capacity=40, verify=False)
    rng = np.random.default_rng(0)
    vocab = manifest.spec.vocab_size
    prompts = [rng.integers(0, vocab, n).tolist() for n in (7, 19, 12)]

    def same(a, b):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)

    same(trt.prefill([0, 1, 2], prompts), ref.prefill([0, 1, 2], prompts))
    assert engine.calls[-1][0] == PROFILE_PREFILL and engine.calls[-1][1] == (3, 19)
    for step in range(5):
        slots = [0, 2] if step % 2 else [0, 1, 2]
        toks = rng.integers(0, vocab, len(slots)).tolist()
        same(trt.decode(slots, toks), ref.decode(slots, toks))
        assert engine.calls[-1][0] == PROFILE_DECODE
    chunk = rng.integers(0, vocab, 6).tolist()
    same(trt.extend(1, chunk, all_logits=True), ref.extend(1, chunk, all_logits=True))
    profile, shape, past0 = engine.calls[-1]
    assert profile == PROFILE_PREFILL and shape == (1, 6)
    assert past0 == trt._caches[0] + 1 * trt._row_bytes[0]  # slot 1 = one row into the layer-0 key buffer
    same(trt.extend(2, chunk[:1]), ref.extend(2, chunk[:1]))  # one token on a started slot: decode profile
    assert engine.calls[-1][0] == PROFILE_DECODE
    np.testing.assert_array_equal(trt.lengths, ref.lengths)
    trt.release(0), ref.release(0)
    same(trt.prefill([2, 0], prompts[:2]), ref.prefill([2, 0], prompts[:2]))  # non-contiguous slots
    trt.release(1), ref.release(1)
    same(trt.score(prompts[1], slot=1, chunk=8), ref.score(prompts[1], slot=1, chunk=8))
    # Shapes and addresses are only re-set when they change: repeating a decode step sets nothing.
    trt.decode([0, 1], [5, 6])
    before = engine.sets
    trt.decode([0, 1], [7, 8])
    assert engine.sets == before


class GraphMemory(HostMemory):
    """HostMemory with CUDA-graph semantics: capture records the work without running it, and a launch replays
    it as it was enqueued (with the context's shapes and addresses of capture time)."""

    supports_graphs = True

    def __init__(self):
        super().__init__()
        self.engine, self.captures, self.launches = None, 0, 0

    def capture(self, fn):
        frozen = copy.deepcopy(self.engine.state)
        self.captures += 1

        def replay():
            live, self.engine.state = self.engine.state, frozen
            try:
                fn()
            finally:
                self.engine.state = live

        return replay

    def launch(self, graph):
        self.launches += 1
        graph()

    def destroy_graph(self, graph):
        pass


def test_trt_backend_decode_graphs_replay_the_right_step(bundles):
    manifest = load_manifest(bundles["ort-float32"])
    manifest.data["tensorrt"] = {"max_batch": 3}
    mem = GraphMemory()
    mem.engine = engine = OrtEngine(manifest.model_path, mem)
    trt = TrtBackend.from_parts(manifest, engine, mem, max_batch=3, capacity=40)
    ref = OrtBackend(manifest, max_batch=3, capacity=40, verify=False)
    rng = np.random.default_rng(3)
    vocab = manifest.spec.vocab_size
    prompts = [rng.integers(0, vocab, n).tolist() for n in (5, 9, 3)]
    np.testing.assert_allclose(trt.prefill([0, 1, 2], prompts), ref.prefill([0, 1, 2], prompts), atol=1e-5)
    for slots in ([0], [0], [0], [0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1], [0, 1], [0, 1], [0], [0, 1, 2]):
        toks = rng.integers(0, vocab, len(slots)).tolist()
        np.testing.assert_allclose(trt.decode(slots, toks), ref.decode(slots, toks), atol=1e-5)
    assert mem.captures == 3 and mem.launches >= 5  # one graph per row count, replayed afterwards
    np.testing.assert_allclose(trt.extend(0, [7]), ref.extend(0, [7]), atol=1e-5)  # slot 0, one token: a graph


def test_cuda_errors_and_missing_cuda_python_are_named(monkeypatch):
    import sys

    from exaone_deploy.tensorrt import backend as trt_backend

    try:
        import cuda.bindings.runtime  # noqa: F401

        have_bindings = True
    except ImportError:
        have_bindings = False
    if have_bindings:  # installed, but this machine has no GPU driver: the CUDA error text comes through
        with pytest.raises((RuntimeError, TensorRTUnavailable), match="CUDA error in cudaGetDeviceProperties"):
            trt_backend.gpu_info()
    for mod in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(TensorRTUnavailable, match="Python package 'cuda-python'"):
        trt_backend.require_cudart()


# ---- compare ----------------------------------------------------------------------------------------------------


def test_error_stats_on_known_arrays():
    a = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    b = a + np.array([[0.0, 0.5, 0.0], [0.0, 0.0, -1.0]])
    s = error_stats(a, b)
    assert s["max_abs"] == 1.0 and s["mean_abs"] == pytest.approx(1.5 / 6)
    assert s["max_rel"] == pytest.approx(1.0 / 4.0)
    assert s["greedy_agreement"] == 1.0
    cos1 = (1 + 5 + 9) / (np.sqrt(14) * np.sqrt(1 + 6.25 + 9))
    assert s["cosine"] == pytest.approx(min(cos1, (1 + 12) / (np.sqrt(17) * np.sqrt(1 + 9))))
    assert error_stats(a, a)["max_abs"] == 0.0 and error_stats(a, a)["cosine"] == pytest.approx(1.0)


def test_compare_fp32_vs_fp16_ort_bundles(bundles):
    from exaone_deploy.validate.verify import TOLERANCES

    a, b = bundles["ort-float32"], bundles["ort-float16"]
    same = compare_bundles(a, a, steps=3, seed=1)
    assert same["summary"]["max_abs"] == 0.0 and same["summary"]["greedy_agreement"] == 1.0
    report = compare_bundles(a, b, steps=6, seed=1)
    assert report["prompt_len"] == 16 and len(report["per_step"]) == 7
    assert report["outputs"][0]["output"] == "prompt"
    tol = TOLERANCES["float16"]
    for r in [*report["outputs"], *report["per_step"]]:
        assert 0 < r["max_abs"] <= tol["abs"] + tol["rel"] * r["scale"], r
        assert r["cosine"] > 0.999 and r["mean_abs"] < r["max_abs"]
    assert report["summary"]["greedy_agreement"] >= 0.8
    # The numbers are those of the two backends run by hand.
    prompt = np.random.default_rng(1).integers(0, load_manifest(a).spec.vocab_size, size=16).tolist()
    la = OrtBackend(a, capacity=MAX_SEQ).prefill([0], [prompt])
    lb = OrtBackend(b, capacity=MAX_SEQ).prefill([0], [prompt])
    assert report["per_step"][0]["max_abs"] == pytest.approx(float(np.abs(la - lb).max()), rel=1e-12)


def test_compare_cli_and_mismatched_bundles(bundles):
    result = CliRunner().invoke(
        main, ["compare", str(bundles["ort-float32"]), str(bundles["ort-float16"]), "--steps", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["summary"]["min_cosine"] > 0.999
    table = CliRunner().invoke(
        main, ["compare", str(bundles["ort-float32"]), str(bundles["ort-float16"]), "--steps", "2"]
    )
    assert table.exit_code == 0 and "step 2" in table.output and "greedy agreement" in table.output
    bad = CliRunner().invoke(main, ["compare", str(bundles["ort-float32"]), str(bundles["trt-32b"])])
    assert bad.exit_code == 1 and "different config.json" in bad.output


# ---- with TensorRT (skip where it is missing) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(bundles, tmp_path_factory):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: engine build and TensorRT backend tests skip")
    pytest.importorskip("tensorrt.plugin", reason="this TensorRT has no tensorrt.plugin (needs TensorRT >= 10.9)")
    try:
        import cuda.bindings  # noqa: F401
    except ImportError:
        pytest.importorskip("cuda.cudart", reason="cuda-python is not installed (the TensorRT backend needs it)")
    root = tmp_path_factory.mktemp("engines")
    cache = root / "timing.cache"
    path = build_engine(
        bundles["trt-1.2b"],
        root / "engine",
        BuildOptions(max_batch=2, max_seq_len=MAX_SEQ, timing_cache=cache),
        progress=False,
    )
    return {"path": path, "timing_cache": cache, "root": root}


def test_engine_build_records_tensorrt_and_gpu(engine):
    import tensorrt as trt

    m = load_manifest(engine["path"])
    info = m.get("tensorrt")
    assert m.target == "tensorrt" and info["version"] == trt.__version__
    assert info["max_batch"] == 2 and [p["name"] for p in info["profiles"]] == ["prefill", "decode"]
    assert info["plugins"][0]["op_type"] == "EXAONEAttention_TRT" and info["plugins"][0]["nodes"] == 4
    assert engine["timing_cache"].stat().st_size > 0


def test_engine_matches_ort(engine, bundles):
    report = compare_bundles(bundles["ort-float32"], engine["path"], steps=8, seed=2)
    assert report["summary"]["greedy_agreement"] == 1.0
    assert report["summary"]["min_cosine"] > 0.99999 and report["summary"]["max_rel"] < 1e-3


def test_engine_generates_like_ort(engine, bundles):
    from exaone_deploy.runtime.generate import Generator
    from exaone_deploy.runtime.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    prompts = ["To be, or not", "안녕하세요"]
    ort_out = Generator.from_bundle(bundles["ort-float32"], max_batch=2).generate(prompts, params)
    trt_out = Generator.from_bundle(engine["path"], max_batch=2).generate(prompts, params)
    assert [r.token_ids for r in trt_out] == [r.token_ids for r in ort_out]


def test_engine_from_another_tensorrt_is_refused(engine, tmp_path):
    import shutil

    from exaone_deploy.tensorrt.backend import EngineMismatchError

    copy_dir = tmp_path / "engine"
    shutil.copytree(engine["path"], copy_dir)
    manifest = json.loads((copy_dir / "manifest.json").read_text())
    manifest["tensorrt"]["version"] = "9.9.9.9"
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match="built with TensorRT 9.9.9.9"):
        TrtBackend(copy_dir)
