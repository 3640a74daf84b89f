"""Our QMatMul kernel (runtime/kernels): the graph rename, and the kernel against onnxruntime's MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exaone_deploy.runtime import kernels
from exaone_deploy.runtime.kernels import _wire

RNG = np.random.default_rng(0)


def _lib():
    path, why = kernels._build()
    if path is None:
        pytest.skip(why)
    return path


def _weights(k: int, n: int, bits: int, block: int = 32):
    """MatMulNBits' B and scales for a random [K, N] weight, and the weight; a partial last block is padded with
    the zero point (what the quantizer writes)."""
    nb = -(-k // block)
    q = RNG.integers(0, 2**bits, (n, nb, block), dtype=np.uint8)
    q.reshape(n, -1)[:, k:] = 2 ** (bits - 1)
    s = (RNG.random((n, nb), dtype=np.float32) * 0.01 + 1e-3).astype(np.float32)
    b = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else q
    w = ((q.astype(np.float32) - 2 ** (bits - 1)) * s[..., None]).reshape(n, -1)[:, :k].T  # [K, N]
    return b, s.reshape(-1), w


def _model(k, n, bits, *, op="MatMulNBits", domain="com.microsoft", acc=4, block=32, extra_inputs=(), b=None, s=None):
    if b is None:
        b, s, _ = _weights(k, n, bits)
    attrs = dict(K=k, N=n, bits=bits, block_size=block, accuracy_level=acc)
    node = helper.make_node(op, ["a", "B", "s", *extra_inputs], ["y"], domain=domain, name="lin", **attrs)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "s")]
    if "zp" in extra_inputs:
        inits.append(numpy_helper.from_array(np.full((n * (k // 32) + 1) // 2, 0x88, np.uint8), "zp"))
    graph = helper.make_graph(
        [node, helper.make_node("Relu", ["y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["b", "m", k])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", "m", n])],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_rename_touches_only_eligible_nodes_and_keeps_the_rest():
    model = _model(64, 32, 4)
    data, count = kernels.rewrite(model.SerializeToString())
    assert count == 1
    back = onnx.load_from_string(data)
    lin, relu = back.graph.node
    assert (lin.op_type, lin.domain) == ("QMatMul", kernels.DOMAIN)
    assert (relu.op_type, relu.domain) == ("Relu", "")
    assert list(lin.input) == ["a", "B", "s"] and lin.name == "lin"
    attrs = {a.name: a.i for a in lin.attribute}
    assert attrs == {"K": 64, "N": 32, "bits": 4, "block_size": 32, "accuracy_level": 4, "release_inputs": 1}
    assert back.graph.initializer[0].raw_data == model.graph.initializer[0].raw_data
    assert {(o.domain, o.version) for o in back.opset_import} == {("", 21), ("com.microsoft", 1), (kernels.DOMAIN, 1)}
    # idempotent: nothing left to rename, and the opset is not added twice
    again, count2 = kernels.rewrite(data)
    assert count2 == 0 and again == data


@pytest.mark.parametrize(
    "why, kw",
    [
        ("float activations (accuracy_level 0) round differently", dict(acc=0)),
        ("block 16", dict(block=16)),
        ("zero points", dict(extra_inputs=("zp",))),
        ("N not a multiple of 16", dict(n=40)),
    ],
)
def test_ineligible_nodes_stay_matmulnbits(why, kw):
    k, n = kw.pop("k", 64), kw.pop("n", 32)
    b, s, _ = _weights(64, 32, 4)
    if k != 64 or n != 32:  # shapes that do not fit the kernel: weights of the right byte count
        b = np.zeros((n, (k + 31) // 32, 16), np.uint8)
        s = np.ones(n * ((k + 31) // 32), np.float32)
    model = _model(k, n, 4, b=b, s=s, **kw)
    assert kernels.rewrite(model.SerializeToString())[1] == 0, why


def test_b_computed_at_run_time_is_not_renamed():
    model = _model(64, 32, 4)
    model.graph.node[0].input[1] = "B_runtime"
    model.graph.node.insert(0, helper.make_node("Identity", ["B"], ["B_runtime"]))
    assert kernels.rewrite(model.SerializeToString())[1] == 0


def test_weights_read_elsewhere_are_not_released():
    """release_inputs (the kernel drops the source pages after repacking) only when this node alone reads them."""
    model = _model(64, 32, 4)
    model.graph.node.append(helper.make_node("Identity", ["s"], ["s_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("s_copy", TensorProto.FLOAT, None))
    data, count = kernels.rewrite(model.SerializeToString())
    assert count == 1
    lin = onnx.load_from_string(data).graph.node[0]
    assert {a.name: a.i for a in lin.attribute}["release_inputs"] == 0


def test_wire_rejects_truncated_models():
    data = _model(64, 32, 4).SerializeToString()
    with pytest.raises(ValueError):
        kernels.rewrite(data[: len(data) // 2])


def test_wire_varints_round_trip():
    for v in (0, 1, 127, 128, 300, 2**32, 2**63 - 1):
        assert _wire._varint(_wire._enc_varint(v), 0) == (v, len(_wire._enc_varint(v)))


def _session(model: onnx.ModelProto, lib=None, threads: int = 2) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    data = model.SerializeToString()
    if lib is not None:
        data, count = kernels.rewrite(data)
        assert count == 1
        so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "k, n, block",
    [(64, 32, 32), (2048, 48, 32), (96, 4096, 32), (256, 80, 64), (512, 64, 128), (48, 32, 32), (64, 512, 128)],
)
def test_kernel_matches_matmulnbits(bits, k, n, block):
    """Including a partial last block (K=48 at block 32, K=64 at 128: the tiny model's 8-bit head), zero-padded.
    Rows: decode (1, 2), batched decode (5, 16 and 30: 32-panel tasks whose later row tiles prefetch the next panel
    pair, 30 with a 2-row tile last), a prompt (67: 8-panel tasks)."""
    lib = _lib()
    b, s, w = _weights(k, n, bits, block)
    model = _model(k, n, bits, b=b, s=s, block=block)
    ours, mlas = _session(model, lib), _session(model)
    for rows in (1, 2, 5, 16, 30, 67):
        a = RNG.standard_normal((1, rows, k), dtype=np.float32)
        y, ref = ours.run(None, {"a": a})[0], mlas.run(None, {"a": a})[0]
        exact = np.maximum(a @ w, 0)
        scale = np.abs(exact).max()
        # the same int8-activation arithmetic as MatMulNBits' accuracy_level 4: equal up to float summation order
        assert np.abs(y - ref).max() <= 2e-5 * scale, (rows, np.abs(y - ref).max() / scale)
        assert np.abs(y - exact).max() <= 3e-2 * scale  # and close to the float product


def test_kernel_rows_do_not_depend_on_their_batch():
    lib = _lib()
    model = _model(256, 64, 4)
    sess = _session(model, lib)
    a = RNG.standard_normal((3, 37, 256), dtype=np.float32)
    batched = sess.run(None, {"a": a})[0]
    for i, j in ((0, 0), (1, 5), (2, 36)):
        alone = sess.run(None, {"a": a[i : i + 1, j : j + 1]})[0]
        assert np.array_equal(alone[0, 0], batched[i, j])
    empty = sess.run(None, {"a": np.zeros((1, 0, 256), np.float32)})[0]
    assert empty.shape == (1, 0, 64)


def test_kernel_rejects_a_wrong_inner_dimension():
    lib = _lib()
    model = _model(64, 32, 4)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "k"  # let it reach the kernel
    sess = _session(model, lib)
    with pytest.raises(Exception, match="QMatMul: A's last dimension is 96, K is 64"):
        sess.run(None, {"a": np.zeros((1, 2, 96), np.float32)})


def test_mode_off_and_env(monkeypatch):
    monkeypatch.setenv("EXAONE_DEPLOY_KERNELS", "off")
    assert kernels.library() is None
    monkeypatch.setenv("EXAONE_DEPLOY_KERNELS", "sometimes")
    with pytest.raises(kernels.KernelError, match="EXAONE_DEPLOY_KERNELS"):
        kernels.mode_from_env()


def test_on_fails_loudly_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("EXAONE_DEPLOY_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    kernels._build.cache_clear()
    try:
        with pytest.raises(kernels.KernelError, match="QMatMul"):
            kernels.library("on")
        assert kernels.library("auto") is None  # auto: MatMulNBits keeps running
        assert not list(tmp_path.rglob("*.tmp"))  # no half-written library left behind
    finally:
        kernels._build.cache_clear()


@pytest.fixture(scope="module", params=["1.2b", "32b"])
def int4_bundle(request, tiny_dirs, tmp_path_factory):
    import warnings

    from exaone_deploy import api
    from exaone_deploy.exporter.export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp(f"qmm-{request.param}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_bundle(tiny_dirs[request.param], root / "bundle", ExportOptions(max_seq_len=64), progress=False)
        return api.quantize(out, root / "int4", "int4-rtn", lm_head="int8")


def test_bundle_runs_on_the_kernel_with_matmulnbits_tokens(int4_bundle):
    """Every quantized linear of an int4 bundle (INT4 block 32, the 8-bit head at block 128) moves to QMatMul;
    logits match MatMulNBits' to float summation order and greedy tokens are the same."""
    _lib()
    from exaone_deploy.runtime.generate import Generator
    from exaone_deploy.runtime.ort_backend import OrtBackend
    from exaone_deploy.runtime.sampling import SamplingParams
    from exaone_deploy.text.tokenizer import Tokenizer

    data = (int4_bundle / "model.onnx").read_bytes()
    graph = onnx.load_from_string(data).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    _, renamed = kernels.rewrite(data, frozenset({"linear"}))
    assert renamed == len(nodes) > 0, [(n.name, [(a.name, a.i) for a in n.attribute]) for n in nodes]

    tok = Tokenizer.from_dir(int4_bundle)
    prompts = [[5, 17, 42, 9, 33, 2, 71, 8, 15, 16, 23, 42], [7, 7, 100, 3]]
    out, logits = {}, {}
    for mode in ("on", "off"):
        backend = OrtBackend(int4_bundle, max_batch=2, max_seq_len=64, kernels=mode)
        assert backend.kernels == (mode == "on")
        res = Generator(backend, tok).generate(prompts, SamplingParams(max_new_tokens=32, ignore_eos=True))
        out[mode] = [r.token_ids for r in res]
        logits[mode] = backend.prefill([0], [prompts[0]], all_logits=True)
    assert out["on"] == out["off"]
    # the global attention layers moved too (decode steps on attention_core.h); sliding ones stay
    attention = sum(
        n.op_type == "GroupQueryAttention" and {a.name: a.i for a in n.attribute}.get("local_window_size", -1) <= 0
        for n in graph.node
    )
    assert kernels.rewrite(data)[1] == renamed + attention > renamed
    scale = np.abs(logits["off"]).max()
    assert np.abs(logits["on"] - logits["off"]).max() <= 1e-3 * scale


def _siblings(k: int, ns: list[int], bits: int = 4, shared_b: bool = False) -> onnx.ModelProto:
    """Linears reading one activation (q/k/v): each output through its own Relu, plus one on another input."""
    nodes, inits, outs = [], [], []
    for i, n in enumerate(ns):
        b, s, _ = _weights(k, n, bits)
        bname = "B0" if shared_b and i else f"B{i}"
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                ["a", bname, f"s{i}"],
                [f"y{i}"],
                domain="com.microsoft",
                name=f"lin{i}",
                K=k,
                N=n,
                bits=bits,
                block_size=32,
                accuracy_level=4,
            )
        )
        nodes.append(helper.make_node("Relu", [f"y{i}"], [f"z{i}"]))
        if not (shared_b and i):
            inits.append(numpy_helper.from_array(b, bname))
        inits.append(numpy_helper.from_array(s, f"s{i}"))
        outs.append(helper.make_tensor_value_info(f"z{i}", TensorProto.FLOAT, ["b", "m", n]))
    b, s, _ = _weights(k, 32, bits)
    nodes.append(
        helper.make_node(
            "MatMulNBits",
            ["a2", "Bo", "so"],
            ["yo"],
            domain="com.microsoft",
            K=k,
            N=32,
            bits=bits,
            block_size=32,
            accuracy_level=4,
        )
    )
    inits += [numpy_helper.from_array(b, "Bo"), numpy_helper.from_array(s, "so")]
    outs.append(helper.make_tensor_value_info("yo", TensorProto.FLOAT, ["b", "m", 32]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", "m", k]) for x in ("a", "a2")],
        outs,
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )


@pytest.mark.parametrize("count, fused", [(2, ["QMatMul2"]), (3, ["QMatMul3"]), (5, ["QMatMul3", "QMatMul2"])])
def test_siblings_fuse_and_match_matmulnbits(count, fused):
    """Linears that read the same activation become one QMatMul2/3 (A quantized once, one parallel loop), at the
    first one's place; every output equals the separate MatMulNBits' up to summation order."""
    lib = _lib()
    model = _siblings(128, [32, 64, 16, 48, 32][:count])
    data, moved = kernels.rewrite(model.SerializeToString())
    assert moved == count + 1
    back = onnx.load_from_string(data)
    onnx.checker.check_model(back)  # still topologically sorted
    ops = [n.op_type for n in back.graph.node if n.domain == kernels.DOMAIN]
    assert ops == [*fused, "QMatMul"]
    assert all(a.i == 1 for n in back.graph.node for a in n.attribute if a.name == "release_inputs")
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    ours = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    mlas = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for rows in (1, 3, 16, 70):  # decode, a 3-row tail, batched decode (32-panel tasks per part), a prompt
        feed = {x: RNG.standard_normal((1, rows, 128), dtype=np.float32) for x in ("a", "a2")}
        for y, ref in zip(ours.run(None, feed), mlas.run(None, feed)):
            assert y.shape == ref.shape
            assert np.abs(y - ref).max() <= 2e-5 * np.abs(ref).max()


def test_shared_weights_are_not_released():
    model = _siblings(64, [32, 32], shared_b=True)
    data, _ = kernels.rewrite(model.SerializeToString())
    node = next(n for n in onnx.load_from_string(data).graph.node if n.op_type == "QMatMul2")
    assert {a.name: a.i for a in node.attribute}["release_inputs"] == 0


def test_a_refused_rewrite_falls_back_to_matmulnbits(tmp_path, monkeypatch, caplog):
    """The kernel is an optimization: when onnxruntime refuses the rewritten graph, auto runs the file as written
    (with a warning) and on fails loudly."""
    _lib()
    path = tmp_path / "model.onnx"
    onnx.save(_model(64, 32, 4), path)
    ok, used = kernels.session(path, ort.SessionOptions, ["CPUExecutionProvider"], dtype="float32", mode="on")
    assert used
    monkeypatch.setattr(kernels, "OP", "NoSuchOp")  # a graph onnxruntime cannot resolve
    with caplog.at_level("WARNING"):
        sess, used = kernels.session(path, ort.SessionOptions, ["CPUExecutionProvider"], dtype="float32", mode="auto")
    assert not used and "running MatMulNBits" in caplog.text
    a = RNG.standard_normal((1, 3, 64), dtype=np.float32)
    np.testing.assert_allclose(sess.run(None, {"a": a})[0], ok.run(None, {"a": a})[0], rtol=0, atol=1e-4)
    with pytest.raises(kernels.KernelError, match="refused"):
        kernels.session(path, ort.SessionOptions, ["CPUExecutionProvider"], dtype="float32", mode="on")


def test_unparseable_model_is_left_to_onnxruntime(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x0a\xff\xff\xff\xff\x0f garbage")
    so = ort.SessionOptions()
    assert kernels.prepare(path, so, dtype="float32", mode="auto") == str(path)
    assert kernels.prepare(path, so, dtype="float16", mode="on") == str(path)  # float16 bundles: never rewritten


def _float_model(k: int, n: int, w: np.ndarray | None = None) -> onnx.ModelProto:
    w = RNG.standard_normal((k, n), dtype=np.float32) if w is None else w
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "W"], ["y"], name="mm"), helper.make_node("Relu", ["y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["b", "m", k])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", "m", n])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("k, n", [(64, 48), (300, 16), (512, 32), (128, 80), (1000, 4096), (2048, 208)])
def test_float_kernel_matches_matmul(k, n):
    """FMatMul (float32 MatMul by a constant [K, N], sgemm_core.h): 48-column panels and a 16/32 tail, K not a
    multiple of the K block; equal to the float64 product within float32 rounding, rows independent of the batch."""
    lib = _lib()
    w = RNG.standard_normal((k, n), dtype=np.float32)
    model = _float_model(k, n, w)
    data, moved = kernels.rewrite(model.SerializeToString())
    assert moved == 1
    node = onnx.load_from_string(data).graph.node[0]
    assert (node.op_type, node.domain) == ("FMatMul", kernels.DOMAIN)
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    a = RNG.standard_normal((2, 19, k), dtype=np.float32)
    y = sess.run(None, {"a": a})[0]
    exact = np.maximum(a.astype(np.float64) @ w.astype(np.float64), 0)
    assert np.abs(y - exact).max() <= 1e-5 * np.sqrt(k) * np.abs(exact).max()
    alone = sess.run(None, {"a": a[1:2, 7:8]})[0]
    assert np.array_equal(alone[0, 0], y[1, 7])


def test_float_matmul_not_by_a_constant_stays():
    model = _float_model(64, 48)
    model.graph.node[0].input[1] = "W2"
    model.graph.node.insert(0, helper.make_node("Identity", ["W"], ["W2"]))
    assert kernels.rewrite(model.SerializeToString())[1] == 0
    model = _float_model(64, 40)  # N % 16 != 0
    assert kernels.rewrite(model.SerializeToString())[1] == 0


def test_a_node_whose_weights_do_not_match_its_attributes_is_refused(tmp_path):
    """A hostile or broken bundle: N claims more columns than B holds. The kernel checks sizes before reading."""
    _lib()
    b, s, _ = _weights(64, 32, 4)
    model = _model(64, 32, 4, b=b, s=s)
    for a in model.graph.node[0].attribute:
        if a.name == "N":
            a.i = 48
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    with pytest.raises(kernels.KernelError, match="not MatMulNBits' layout"):
        kernels.session(path, ort.SessionOptions, ["CPUExecutionProvider"], dtype="float32", mode="on")
