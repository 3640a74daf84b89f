"""Our GroupQueryAttention (runtime/kernels/attention_core.h) against onnxruntime's own, one node at a time.

The rewritten node must give what com.microsoft::GroupQueryAttention gives: on decode steps (our code: the output and
the key/value written into the shared cache buffer), and on everything it hands back to onnxruntime's kernel (prompts,
separate present buffers), bit for bit there."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from exaone_deploy.runtime import kernels

RNG = np.random.default_rng(1)


def _model(
    heads,
    kv_heads,
    head,
    *,
    rotary=1,
    interleaved=0,
    window=-1,
    scale=None,
    softcap=None,
    extra=None,
    caches=True,
    total_shape=(),
    int8=False,
):
    """One GroupQueryAttention node; ``caches=False``: no cos/sin inputs (seven, as EXAONE 4's NoPE layers);
    ``int8``: an INT8 cache as ``--kv-cache int8`` lowers it (per-channel scales ``ks``/``vs`` at inputs 12, 13)."""
    attrs = dict(num_heads=heads, kv_num_heads=kv_heads, local_window_size=window, do_rotary=rotary)
    if interleaved:
        attrs["rotary_interleaved"] = 1
    if scale is not None:
        attrs["scale"] = scale
    if softcap is not None:
        attrs["softcap"] = softcap
    if extra:
        attrs.update(extra)
    names = ["q", "k", "v", "pk", "pv", "seqlens_k", "total", "cos", "sin"][: 9 if caches else 7]
    if int8:
        attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        names = names + [""] * (12 - len(names)) + ["ks", "vs"]
    cache_type = TensorProto.INT8 if int8 else TensorProto.FLOAT
    node = helper.make_node(
        "GroupQueryAttention", names, ["out", "present_k", "present_v"], domain="com.microsoft", name="attn", **attrs
    )
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("q", f, ["b", "s", heads * head]),
        helper.make_tensor_value_info("k", f, ["b", "s", kv_heads * head]),
        helper.make_tensor_value_info("v", f, ["b", "s", kv_heads * head]),
        helper.make_tensor_value_info("pk", cache_type, ["b", kv_heads, "cap", head]),
        helper.make_tensor_value_info("pv", cache_type, ["b", kv_heads, "cap", head]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
        helper.make_tensor_value_info("total", TensorProto.INT32, list(total_shape)),
        helper.make_tensor_value_info("cos", f, ["maxpos", "half"]),
        helper.make_tensor_value_info("sin", f, ["maxpos", "half"]),
    ][: 9 if caches else 7]
    if int8:
        inputs += [helper.make_tensor_value_info(x, f, [1, kv_heads, 1, head]) for x in ("ks", "vs")]
    outputs = [
        helper.make_tensor_value_info("out", f, ["b", "s", heads * head]),
        helper.make_tensor_value_info("present_k", cache_type, ["b", kv_heads, "cap2", head]),
        helper.make_tensor_value_info("present_v", cache_type, ["b", kv_heads, "cap2", head]),
    ]
    graph = helper.make_graph([node], "g", inputs, outputs)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _sessions(model):
    """(onnxruntime's GroupQueryAttention, ours) for ``model``."""
    if kernels.library("auto") is None:
        pytest.skip("our kernel library is not available here (see the log)")
    data = model.SerializeToString()
    plain = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    rewritten = kernels.prepare_bytes(data, so)
    assert rewritten is not None, "the node was not renamed"
    assert [n.domain for n in onnx.load_from_string(rewritten).graph.node] == [kernels.DOMAIN]
    return plain, ort.InferenceSession(rewritten, sess_options=so, providers=["CPUExecutionProvider"])


def _rope(maxpos, half):
    inv = 1.0 / (10000 ** (np.arange(half) / half))
    ang = np.arange(maxpos)[:, None] * inv[None]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _shared_step(sess, q, k, v, cache_k, cache_v, seqlens, cos, sin, scales=None):
    """One step with past and present bound to the same buffers (how the runtime runs it); returns the output and
    updates ``cache_k``/``cache_v`` in place. ``scales``: (k_scale, v_scale) of an int8 cache."""
    b, s, _ = q.shape
    out = np.empty_like(q)
    total = np.array(int(seqlens.max()) + 1 if s == 1 else s, np.int32)
    io = sess.io_binding()
    feeds = dict(q=q, k=k, v=v, seqlens_k=seqlens, total=total, cos=cos, sin=sin)
    if scales is not None:
        feeds.update(ks=scales[0], vs=scales[1])
    for name, arr in feeds.items():
        if name not in {i.name for i in sess.get_inputs()}:
            continue
        io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
    for past, present, arr in (("pk", "present_k", cache_k), ("pv", "present_v", cache_v)):
        io.bind_input(past, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        io.bind_output(present, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
    io.bind_output("out", "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
    sess.run_with_iobinding(io)
    return out


CASES = {
    "1.2B heads (32/8 x 64)": dict(heads=32, kv_heads=8, head=64),
    "32B heads (40/8 x 128)": dict(heads=40, kv_heads=8, head=128),
    "interleaved rotary, scale": dict(heads=4, kv_heads=4, head=16, interleaved=1, scale=0.3),
    "no rotary": dict(heads=6, kv_heads=2, head=48, rotary=0),
    "NoPE layer (no rotary caches)": dict(heads=40, kv_heads=8, head=128, rotary=0, caches=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decode_steps_match_onnxruntime(case):
    kw = CASES[case]
    heads, kv_heads, head = kw["heads"], kw["kv_heads"], kw["head"]
    theirs, ours = _sessions(_model(**kw))
    batch, cap = 5, 300  # positions past one 128-key block: the running-softmax rescale
    cos, sin = _rope(cap, head // 2)
    caches = {}
    for name in ("theirs", "ours"):
        init = RNG.standard_normal((2, batch, kv_heads, cap, head)).astype(np.float32) if not caches else None
        caches[name] = [c.copy() for c in (init if init is not None else caches["theirs"])]
    seqlens = np.array([0, 1, 127, 128, 299 - 3], np.int32)  # the token's position; cap - 1 reached below
    for step in range(3):
        q = RNG.standard_normal((batch, 1, heads * head)).astype(np.float32)
        k = RNG.standard_normal((batch, 1, kv_heads * head)).astype(np.float32)
        v = RNG.standard_normal((batch, 1, kv_heads * head)).astype(np.float32)
        ref = _shared_step(theirs, q, k, v, *caches["theirs"], seqlens, cos, sin)
        got = _shared_step(ours, q, k, v, *caches["ours"], seqlens, cos, sin)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=f"step {step} output")
        for a, b in zip(caches["ours"], caches["theirs"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"step {step} cache")
        seqlens = seqlens + 1


Q8_CASES = {
    "1.2B heads (32/8 x 64)": dict(heads=32, kv_heads=8, head=64),
    "32B heads (40/8 x 128)": dict(heads=40, kv_heads=8, head=128),
    "NoPE layer (no rotary caches)": dict(heads=40, kv_heads=8, head=128, rotary=0, caches=False),
    "generic layout": dict(heads=6, kv_heads=2, head=48),
}


@pytest.mark.parametrize("case", list(Q8_CASES))
def test_int8_cache_decode_steps_match_onnxruntime(case):
    """GroupQueryAttentionQ8 against onnxruntime's op over the same INT8 cache: the codes written for the new key
    (after rotary) and value bit for bit (its rounding: nearest-even of x * (1 / scale), saturated), the output up
    to float summation order; values placed on half-way points and past the int8 range check the rounding and the
    saturation."""
    kw = Q8_CASES[case]
    heads, kv_heads, head = kw["heads"], kw["kv_heads"], kw["head"]
    model = _model(**kw, int8=True)
    theirs, ours = _sessions(model)
    assert [n.op_type for n in onnx.load_from_string(kernels.rewrite(model.SerializeToString())[0]).graph.node] == [
        "GroupQueryAttentionQ8"
    ]
    batch, cap = 5, 300
    cos, sin = _rope(cap, head // 2)
    ks = RNG.uniform(0.01, 0.05, (1, kv_heads, 1, head)).astype(np.float32)
    vs = RNG.uniform(0.01, 0.05, (1, kv_heads, 1, head)).astype(np.float32)
    init = RNG.integers(-128, 128, (2, batch, kv_heads, cap, head)).astype(np.int8)
    caches = {name: [c.copy() for c in init] for name in ("theirs", "ours")}
    seqlens = np.array([0, 1, 127, 128, 299 - 3], np.int32)
    for step in range(3):
        q = RNG.standard_normal((batch, 1, heads * head)).astype(np.float32)
        v = (np.round(RNG.standard_normal((batch, 1, kv_heads, head)) * 40) + 0.5) * vs.reshape(1, 1, kv_heads, head)
        v[..., :2] = np.array([200.0, -200.0]) * vs.reshape(1, 1, kv_heads, head)[..., :2]  # saturated codes
        v = v.reshape(batch, 1, kv_heads * head).astype(np.float32)
        k = (RNG.standard_normal((batch, 1, kv_heads * head)) * 2).astype(np.float32)
        ref = _shared_step(theirs, q, k, v, *caches["theirs"], seqlens, cos, sin, (ks, vs))
        got = _shared_step(ours, q, k, v, *caches["ours"], seqlens, cos, sin, (ks, vs))
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=f"step {step} output")
        for a, b in zip(caches["ours"], caches["theirs"]):
            np.testing.assert_array_equal(a, b, err_msg=f"step {step} cache codes")
        seqlens = seqlens + 1
    assert (caches["ours"][1] == 127).any() and (caches["ours"][1] == -128).any()


def test_int8_cache_prompts_are_onnxruntimes_own():
    """A prompt over an INT8 cache (not a decode step) runs onnxruntime's kernel, absent inputs included: identical."""
    heads, kv_heads, head = 8, 2, 32
    theirs, ours = _sessions(_model(heads, kv_heads, head, int8=True))
    cos, sin = _rope(64, head // 2)
    batch, s, cap = 2, 7, 64
    q = RNG.standard_normal((batch, s, heads * head)).astype(np.float32)
    k = RNG.standard_normal((batch, s, kv_heads * head)).astype(np.float32)
    v = RNG.standard_normal((batch, s, kv_heads * head)).astype(np.float32)
    scales = tuple(np.full((1, kv_heads, 1, head), 0.02, np.float32) for _ in range(2))
    cache = [np.zeros((batch, kv_heads, cap, head), np.int8) for _ in range(2)]
    mine = [c.copy() for c in cache]
    seqlens = np.full(batch, s - 1, np.int32)
    ref = _shared_step(theirs, q, k, v, *cache, seqlens, cos, sin, scales)
    got = _shared_step(ours, q, k, v, *mine, seqlens, cos, sin, scales)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(mine[0], cache[0])


def test_int8_cache_scales_of_another_shape_go_to_onnxruntime():
    """Scales that are not [1, kv_heads, 1, head] never reach our kernel (it would read past them): the step is
    onnxruntime's, whatever that op makes of them, the same for both sessions."""
    heads, kv_heads, head = 4, 2, 16
    model = _model(heads, kv_heads, head, int8=True)
    for vi in model.graph.input:
        if vi.name in ("ks", "vs"):
            dims = vi.type.tensor_type.shape.dim
            dims[3].dim_value = head // 2
    theirs, ours = _sessions(model)
    cos, sin = _rope(32, head // 2)
    scales = tuple(np.full((1, kv_heads, 1, head // 2), 0.05, np.float32) for _ in range(2))
    q = RNG.standard_normal((1, 1, heads * head)).astype(np.float32)
    k = RNG.standard_normal((1, 1, kv_heads * head)).astype(np.float32)
    results = []
    for sess in (theirs, ours):
        cache = [np.zeros((1, kv_heads, 32, head), np.int8) for _ in range(2)]
        try:
            results.append((_shared_step(sess, q, k, k, *cache, np.array([3], np.int32), cos, sin, scales), cache))
        except Exception as e:  # noqa: BLE001 - onnxruntime refuses them (1.32: "k_scale shape mismatch")
            results.append(str(e).split("Status Message:")[-1].strip())
    if isinstance(results[0], str):
        assert results[1] == results[0] and "k_scale" in results[0]
    else:
        np.testing.assert_array_equal(results[1][0], results[0][0])
        np.testing.assert_array_equal(results[1][1][0], results[0][1][0])


def test_int8_cache_with_position_ids_keeps_onnxruntimes_node():
    model = _model(4, 2, 16, int8=True)
    model.graph.node[0].input[9] = "position_ids"
    _, count = kernels.rewrite(model.SerializeToString())
    assert count == 0


def test_prompts_and_separate_buffers_are_onnxruntimes_own():
    """Calls outside the decode fast path run onnxruntime's kernel through the standalone-op invoker: identical."""
    heads, kv_heads, head = 8, 2, 32
    theirs, ours = _sessions(_model(heads, kv_heads, head))
    cos, sin = _rope(64, head // 2)
    batch, s, cap = 2, 7, 64
    q = RNG.standard_normal((batch, s, heads * head)).astype(np.float32)
    k = RNG.standard_normal((batch, s, kv_heads * head)).astype(np.float32)
    v = RNG.standard_normal((batch, s, kv_heads * head)).astype(np.float32)
    cache = [np.zeros((batch, kv_heads, cap, head), np.float32) for _ in range(2)]
    mine = [c.copy() for c in cache]
    seqlens = np.full(batch, s - 1, np.int32)
    ref = _shared_step(theirs, q, k, v, *cache, seqlens, cos, sin)
    got = _shared_step(ours, q, k, v, *mine, seqlens, cos, sin)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(mine[0], cache[0])
    # separate past and present (plain run, present = past length + 1): a decode step, still onnxruntime's op
    feeds = dict(
        q=q[:, :1].copy(),
        k=k[:, :1].copy(),
        v=v[:, :1].copy(),
        pk=cache[0][:, :, :s].copy(),
        pv=cache[1][:, :, :s].copy(),
        seqlens_k=np.full(batch, s, np.int32),
        total=np.array(s + 1, np.int32),
        cos=cos,
        sin=sin,
    )
    for a, b in zip(ours.run(None, feeds), theirs.run(None, feeds)):
        np.testing.assert_array_equal(a, b)


def test_softcap_steps_go_to_onnxruntime():
    theirs, ours = _sessions(_model(4, 2, 16, softcap=5.0))
    cos, sin = _rope(32, 8)
    cache = [RNG.standard_normal((1, 2, 32, 16)).astype(np.float32) for _ in range(2)]
    mine = [c.copy() for c in cache]
    q = RNG.standard_normal((1, 1, 64)).astype(np.float32)
    k = RNG.standard_normal((1, 1, 32)).astype(np.float32)
    seqlens = np.array([9], np.int32)
    ref = _shared_step(theirs, q, k, k, *cache, seqlens, cos, sin)
    got = _shared_step(ours, q, k, k, *mine, seqlens, cos, sin)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(
    "why, extra",
    [
        ("quantization attributes on a float cache's nine inputs", dict(k_quant_type="PER_CHANNEL")),
        ("window-sized caches", dict(sliding_window_cache=1)),
        ("a local window (releases disagree on its keys)", dict(local_window_size=8)),
    ],
)
def test_unknown_attributes_keep_onnxruntimes_node(why, extra):
    data = _model(4, 2, 16, extra=extra).SerializeToString()
    _, count = kernels.rewrite(data)
    assert count == 0, why


def test_malformed_inputs_are_errors_not_reads():
    """Inputs the op's layout does not allow fail with a message (never a read or write past a buffer): a
    total_sequence_length without exactly one element; a position past the bound cache (onnxruntime's op refuses
    it too)."""
    _, ours = _sessions(_model(4, 2, 16, total_shape=("t",)))
    cos, sin = _rope(64, 8)
    feeds = dict(
        q=np.zeros((1, 1, 64), np.float32),
        k=np.zeros((1, 1, 32), np.float32),
        v=np.zeros((1, 1, 32), np.float32),
        pk=np.zeros((1, 2, 32, 16), np.float32),
        pv=np.zeros((1, 2, 32, 16), np.float32),
        seqlens_k=np.array([3], np.int32),
        total=np.zeros((0,), np.int32),
        cos=cos,
        sin=sin,
    )
    with pytest.raises(Exception, match="total_sequence_length has 0 elements"):
        ours.run(None, feeds)
    theirs, ours = _sessions(_model(4, 2, 16))
    q, k = feeds["q"], feeds["k"]
    for sess in (theirs, ours):
        cache = [np.zeros((1, 2, 32, 16), np.float32) for _ in range(2)]
        with pytest.raises(Exception, match="GroupQueryAttention"):
            _shared_step(sess, q, k, k, *cache, np.array([40], np.int32), cos, sin)
