"""What the installed onnxruntime's CPU GroupQueryAttention does with the inputs the 1.32 schema added.

Executable evidence for issue 18's attention items (docs/perf.md): the schema lists ``q_norm_weight`` /
``k_norm_weight`` (EXAONE's per-head QK RMSNorm fused into the op) and an INT8 KV cache (``k_quant_type``,
``v_quant_type``, ``kv_cache_bit_width``, ``k_scale``/``v_scale``), but the CPU kernel refuses the QK-norm inputs,
so the ort target keeps QK-norm as graph ops and q/k/v unpacked (a packed QKV input needs the norm inside the op).
When a newer onnxruntime accepts them on CPU, ``test_cpu_refuses_qk_norm_inputs`` fails: time to add the fusion
pass. The INT8 cache runs on CPU (per tensor; per channel wants one scale per KV channel) and is checked here
against the float cache.
"""

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper

ort = pytest.importorskip("onnxruntime")

B, S, H, KV, D, CAP = 1, 6, 4, 2, 16, 32
# GroupQueryAttention input slots (com.microsoft, onnxruntime 1.32)
K_SCALE, Q_NORM = 12, 14


def _gqa(attrs: dict, extra: dict[int, np.ndarray], cache=TP.FLOAT):
    names = ["q", "k", "v", "pk", "pv", "sl", "tl"]
    inits = []
    for slot, arr in sorted(extra.items()):
        names += [""] * (slot - len(names)) + [f"in{slot}"]
        inits.append(helper.make_tensor(f"in{slot}", TP.FLOAT, arr.shape, arr.ravel()))
    node = helper.make_node(
        "GroupQueryAttention", names, ["o", "ok", "ov"], domain="com.microsoft", num_heads=H, kv_num_heads=KV, **attrs
    )
    vi = [
        helper.make_tensor_value_info("q", TP.FLOAT, [B, S, H * D]),
        helper.make_tensor_value_info("k", TP.FLOAT, [B, S, KV * D]),
        helper.make_tensor_value_info("v", TP.FLOAT, [B, S, KV * D]),
        helper.make_tensor_value_info("pk", cache, [B, KV, CAP, D]),
        helper.make_tensor_value_info("pv", cache, [B, KV, CAP, D]),
        helper.make_tensor_value_info("sl", TP.INT32, [B]),
        helper.make_tensor_value_info("tl", TP.INT32, []),
    ]
    outs = [
        helper.make_tensor_value_info("o", TP.FLOAT, None),
        helper.make_tensor_value_info("ok", cache, None),
        helper.make_tensor_value_info("ov", cache, None),
    ]
    model = helper.make_model(
        helper.make_graph([node], "gqa", vi, outs, inits),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    dtype = np.int8 if cache == TP.INT8 else np.float32
    feeds = {
        "q": rng.standard_normal((B, S, H * D), dtype=np.float32),
        "k": rng.standard_normal((B, S, KV * D), dtype=np.float32),
        "v": rng.standard_normal((B, S, KV * D), dtype=np.float32),
        "pk": np.zeros((B, KV, CAP, D), dtype),
        "pv": np.zeros((B, KV, CAP, D), dtype),
        "sl": np.array([S - 1], np.int32),
        "tl": np.array(S, np.int32),
    }
    return sess.run(None, feeds)


def test_cpu_refuses_qk_norm_inputs():
    w = np.linspace(0.5, 1.5, D, dtype=np.float32)
    with pytest.raises(Exception, match="q_norm_weight / k_norm_weight inputs are not supported"):
        _gqa({"qk_norm_epsilon": 1e-5}, {Q_NORM: w, Q_NORM + 1: w})


def test_cpu_int8_kv_cache_per_tensor_matches_float():
    ref, ref_k, _ = _gqa({}, {})
    amax = 4.5  # standard normal k and v: |x| < 4.5 here
    scale = np.array([amax / 127], np.float32)
    out, qk, _ = _gqa(
        {"k_quant_type": "PER_TENSOR", "v_quant_type": "PER_TENSOR", "kv_cache_bit_width": 8},
        {K_SCALE: scale, K_SCALE + 1: scale},
        cache=TP.INT8,
    )
    assert qk.dtype == np.int8 and qk.nbytes * 4 == ref_k.nbytes  # a quarter of the float32 cache
    np.testing.assert_allclose(qk[:, :, :S].astype(np.float32) * scale[0], ref_k[:, :, :S], atol=scale[0] / 2 + 1e-6)
    err = np.abs(out - ref).max()
    assert 0 < err < 4 * scale[0]  # quantized (not bypassed), within a few steps


def test_cpu_int8_kv_cache_per_channel_wants_a_scale_per_channel():
    with pytest.raises(Exception, match="k_scale shape mismatch: expected 32 elements"):
        _gqa(
            {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8},
            {K_SCALE: np.ones(1, np.float32), K_SCALE + 1: np.ones(1, np.float32)},
            cache=TP.INT8,
        )
    scale = np.full(KV * D, 4.5 / 127, np.float32)
    ref, _, _ = _gqa({}, {})
    out, _, _ = _gqa(
        {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8},
        {K_SCALE: scale, K_SCALE + 1: scale},
        cache=TP.INT8,
    )
    assert np.abs(out - ref).max() < 4 * scale[0]
