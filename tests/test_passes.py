"""The lowering passes (exporter/passes.py), each on a small hand-built graph, as onnx-ir's own pass tests do:
build a model, run the pass, assert the rewritten structure and (where the ops are standard) the same numbers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator

from exaone_deploy.exporter import ops, passes
from exaone_deploy.exporter.writer import FUSED_FILE, save_lowered
from exaone_deploy.graph_io import GraphIO
from exaone_deploy.spec import spec_from_config

F32 = ir.DataType.FLOAT
RNG = np.random.default_rng(0)


def _model(inputs, outputs, nodes, initializers=(), opsets=None) -> ir.Model:
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers, opset_imports=opsets or {"": 21})
    return ir.Model(graph, ir_version=10)


def _input(name, shape, dtype=F32) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))


def _init(name, array) -> ir.Value:
    t = ir.tensor(array, name=name)
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(t.dtype), const_value=t)


def _run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    return ReferenceEvaluator(ir.serde.serialize_model(model)).run(None, feeds)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


# ---- RsqrtAsDiv -------------------------------------------------------------------------------------------


def _rms_like() -> ir.Model:
    x, v = _input("x", [2, 3]), _input("v", [2, 1])
    sqrt = ir.node("Sqrt", [v], name="sqrt")
    rec = ir.node("Reciprocal", [sqrt.outputs[0]], name="rec")
    mul = ir.node("Mul", [x, rec.outputs[0]], name="mul")
    mul.outputs[0].name = "y"
    return _model([x, v], [mul.outputs[0]], [sqrt, rec, mul])


def test_rsqrt_as_div_rewrites_mul_by_reciprocal_sqrt():
    model = _rms_like()
    feeds = {"x": RNG.standard_normal((2, 3)).astype(np.float32), "v": RNG.uniform(0.5, 2, (2, 1)).astype(np.float32)}
    before = _run(model, feeds)[0]
    result = passes.RsqrtAsDiv()(model)
    assert result.modified and _ops(model) == ["Sqrt", "Div"]
    div = list(model.graph)[1]
    assert div.inputs[0].name == "x" and div.inputs[1].producer().op_type == "Sqrt"
    np.testing.assert_allclose(_run(model, feeds)[0], before, rtol=1e-6)


def test_rsqrt_as_div_leaves_a_reciprocal_of_something_else():
    x, v = _input("x", [2, 3]), _input("v", [2, 1])
    rec = ir.node("Reciprocal", [v], name="rec")
    mul = ir.node("Mul", [x, rec.outputs[0]], name="mul")
    model = _model([x, v], [mul.outputs[0]], [rec, mul])
    assert not passes.RsqrtAsDiv()(model).modified
    assert _ops(model) == ["Reciprocal", "Mul"]


# ---- FuseParallelMatMuls ----------------------------------------------------------------------------------


def _parallel(dtypes=(np.float32, np.float32, np.float32)) -> ir.Model:
    x, other = _input("x", [2, 8]), _input("other", [2, 8])
    ws = [_init(f"w{i}", RNG.standard_normal((8, n)).astype(dt)) for i, (n, dt) in enumerate(zip((8, 4, 4), dtypes))]
    mms = [ir.node("MatMul", [x, w], name=f"mm{i}") for i, w in enumerate(ws)]
    lone = ir.node("MatMul", [other, _init("w_lone", RNG.standard_normal((8, 3)).astype(np.float32))], name="lone")
    ws.append(lone.inputs[1])
    # as in an exported graph, the projections feed other nodes (here Identity), not the graph outputs
    ids = [ir.node("Identity", [m.outputs[0]], name=f"id{i}") for i, m in enumerate([*mms, lone])]
    outs = [n.outputs[0] for n in ids]
    for i, o in enumerate(outs):
        o.name, o.shape, o.type = f"y{i}", ir.Shape([2, int(ws[i].shape[1])]), ws[i].type
    return _model([x, other], outs, [*mms, lone, *ids], ws)


def test_fuse_parallel_matmuls_makes_one_gemm_and_a_split():
    model = _parallel()
    feeds = {
        "x": RNG.standard_normal((2, 8)).astype(np.float32),
        "other": RNG.standard_normal((2, 8)).astype(np.float32),
    }
    before = _run(model, feeds)
    assert passes.FuseParallelMatMuls()(model).modified
    # the lone MatMul (its own input) is left alone
    assert _ops(model) == ["MatMul", "Split", "MatMul"] + ["Identity"] * 4
    fused = model.graph.initializers["w0+w1+w2"]
    assert isinstance(fused.const_value, ir.LazyTensor)  # no I/O in the pass: concatenated when saved
    assert list(fused.shape) == [8, 16]
    assert model.graph.initializers["w0+w1+w2.split"].const_value.numpy().tolist() == [8, 4, 4]
    assert not {"w0", "w1", "w2"} & set(model.graph.initializers)
    for a, b in zip(_run(model, feeds), before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fuse_parallel_matmuls_needs_one_dtype():
    model = _parallel(dtypes=(np.float32, np.float16, np.float32))
    assert not passes.FuseParallelMatMuls()(model).modified  # a mixed group is left as it is
    assert _ops(model) == ["MatMul"] * 4 + ["Identity"] * 4


def test_fused_weights_are_written_at_save_time(tmp_path):
    model = _parallel()
    expected = np.concatenate([model.graph.initializers[n].const_value.numpy() for n in ("w0", "w1", "w2")], axis=1)
    passes.FuseParallelMatMuls()(model)
    assert not list(tmp_path.iterdir())
    save_lowered(model, tmp_path / "model.onnx")
    fused = ir.load(tmp_path / "model.onnx").graph.initializers["w0+w1+w2"].const_value
    assert isinstance(fused, ir.ExternalTensor) and fused.location == FUSED_FILE and fused.offset % 65536 == 0
    np.testing.assert_array_equal(fused.numpy(), expected)


# ---- attention lowerings ----------------------------------------------------------------------------------

SPEC = spec_from_config(
    {
        "model_type": "exaone4",
        "vocab_size": 16,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 64,
        "rope_theta": 10000.0,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"],
    }
)


def _attention_model(io: GraphIO, with_rope_tables: bool = True) -> ir.Model:
    """One EXAONEAttention node per layer reading that layer's cache inputs, as the exporter traces them."""
    s = SPEC
    seqlens, total = (
        _input("seqlens_k", ["batch"], ir.DataType.INT32),
        _input("total_sequence_length", [], ir.DataType.INT32),
    )
    inputs, outputs, nodes, inits = [seqlens, total], [], [], []
    cos = sin = None
    if with_rope_tables:
        cos = _init("cos_cache", np.ones((64, 8), np.float32))
        sin = _init("sin_cache", np.zeros((64, 8), np.float32))
        inits = [cos, sin]
    for layer in s.layers:
        q = _input(f"q{layer.index}", ["batch", "sequence", s.q_size])
        k = _input(f"k{layer.index}", ["batch", "sequence", s.kv_size])
        v = _input(f"v{layer.index}", ["batch", "sequence", s.kv_size])
        pk, pv = (
            _input(io.past_name(layer.index, kv), ["batch", s.num_kv_heads, "cache_len", s.head_dim])
            for kv in ("key", "value")
        )
        inputs += [q, k, v, pk, pv]
        rope = [cos, sin] if layer.rope and with_rope_tables else []
        node = ir.node(
            ops.OP_TYPE,
            [q, k, v, pk, pv, seqlens, total, *rope],
            domain=ops.DOMAIN,
            num_outputs=3,
            attributes={
                "num_heads": s.num_heads,
                "kv_num_heads": s.num_kv_heads,
                "scale": 0.25,
                "window": layer.window,
                "rotary": int(layer.rope and with_rope_tables),
            },
            name=f"attn{layer.index}",
        )
        out, nk, nv = node.outputs
        out.name = f"attn{layer.index}_out"
        nk.name, nv.name = io.present_name(layer.index, "key"), io.present_name(layer.index, "value")
        for o in (nk, nv):
            o.shape, o.type = ir.Shape(["batch", s.num_kv_heads, "cache_len", s.head_dim]), ir.TensorType(F32)
        nodes.append(node)
        outputs += [out, nk, nv]
    return _model(inputs, outputs, nodes, inits, {"": 21, ops.DOMAIN: 1})


@pytest.mark.parametrize("window_cache", [True, False])
def test_attention_to_group_query_attention(window_cache):
    io = GraphIO(SPEC, window_cache=window_cache)
    model = _attention_model(io)
    assert passes.AttentionToGroupQueryAttention(io)(model).modified
    sliding, full = list(model.graph)
    assert {n.op_type for n in (sliding, full)} == {"GroupQueryAttention"}
    assert {n.domain for n in (sliding, full)} == {"com.microsoft"}
    assert ops.DOMAIN not in model.opset_imports and model.opset_imports["com.microsoft"] == 1
    a = {k: v.value for k, v in sliding.attributes.items()}
    # EXAONE 4 hybrid: RoPE on the sliding layers, none on the global ones
    assert a["local_window_size"] == 4 and a["do_rotary"] == 1 and a["scale"] == 0.25
    assert full.attributes["local_window_size"].value == -1 and full.attributes["do_rotary"].value == 0
    assert ("sliding_window_cache" in a) == window_cache and "sliding_window_cache" not in full.attributes
    assert len(sliding.inputs) == 9 and len(full.inputs) == 7  # no cos/sin on a layer without rotary
    caches = {v.name: v.shape[2] for v in [*model.graph.inputs, *model.graph.outputs] if io.is_cache(v.name)}
    for name, length in caches.items():  # window-sized only on the sliding layer, and only when asked
        assert length == (4 if window_cache and io.cache_layer(name) == 0 else "cache_len"), name


def test_attention_layer_comes_from_the_cache_input_name():
    io = GraphIO(SPEC)
    model = _attention_model(io)
    node = list(model.graph)[0]
    node.inputs[3].name = "not_a_cache"
    with pytest.raises(ValueError, match="not_a_cache"):
        passes.AttentionToGroupQueryAttention(io)(model)


def test_ring_caches_are_refused_for_ort():
    io = GraphIO(SPEC)
    model = _attention_model(io)
    list(model.graph)[0].attributes["ring"] = ir.AttrInt64("ring", 1)
    with pytest.raises(ValueError, match="ring-buffer"):
        passes.AttentionToGroupQueryAttention(io)(model)


@pytest.mark.parametrize("with_tables", [True, False])
def test_attention_to_trt_plugin(with_tables):
    io = GraphIO(SPEC)
    model = _attention_model(io, with_rope_tables=with_tables)
    assert passes.AttentionToTrtPlugin(io)(model).modified
    nodes = list(model.graph)
    assert {(n.op_type, n.domain) for n in nodes} == {(passes.TRT_OP_TYPE, passes.TRT_DOMAIN)}
    assert model.opset_imports[passes.TRT_DOMAIN] == 1 and ops.DOMAIN not in model.opset_imports
    for n in nodes:  # fixed plugin signature: nine inputs on every layer, the same tables
        assert len(n.inputs) == 9 and [v.name for v in n.inputs[7:]] == ["cos_cache", "sin_cache"]
        assert n.attributes["plugin_version"].value == passes.TRT_PLUGIN_VERSION
        assert n.attributes["plugin_namespace"].value == passes.TRT_PLUGIN_NAMESPACE
    assert [n.attributes["window"].value for n in nodes] == [4, 0]
    assert [n.attributes["rotary"].value for n in nodes] == [int(with_tables), 0]
    cos = model.graph.initializers["cos_cache"].const_value.numpy()
    assert cos.shape == ((64, 8) if with_tables else (1, 8))  # a NoPE-only model gets (1, head_dim/2) zeros
    assert with_tables or not cos.any()


def test_target_pass_lists():
    io = GraphIO(SPEC, window_cache=True)
    assert [type(p) for p in passes.target_passes("ort", io)] == [
        passes.RsqrtAsDiv,
        passes.FuseParallelMatMuls,
        passes.AttentionToGroupQueryAttention,
    ]
    assert [type(p) for p in passes.target_passes("ort", io, fuse_linears=False)] == [
        passes.RsqrtAsDiv,
        passes.AttentionToGroupQueryAttention,
    ]  # the calibration view
    assert [type(p) for p in passes.target_passes("trt", io)] == [passes.AttentionToTrtPlugin]
    with pytest.raises(ValueError, match="unknown target"):
        passes.target_passes("tflite", io)
