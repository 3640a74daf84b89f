"""Pre-quantized checkpoints (exaone_deploy.prequant): config recognition and refusals, and every format's
reading checked against an independent reading of the format:

* GPTQ and AWQ: torch re-implementations of the reference dequantization written from the libraries'
  sources (GPTQModel / AutoGPTQ and AutoAWQ need CUDA kernels to install, so they are not imported):
  GPTQModel ``nn_modules/qlinear/__init__.py`` ``dequantize_weight`` + AutoGPTQ's v1 ``zeros + 1``;
  AutoAWQ ``awq/utils/packing_utils.py`` ``unpack_awq`` / ``reverse_awq_order`` / ``dequantize_gemm``.
* compressed-tensors: the library itself (``unpack_from_int32``) and transformers' loader with
  ``CompressedTensorsConfig(dequantize=True)``.
* FP8 block: transformers' ``_dequantize_fp8_weight`` and its loader with ``FineGrainedFP8Config(dequantize=True)``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from exaone_deploy.prequant import (
    PrequantConfigError,
    dequantized_linears,
    iter_quantized_linears,
    make_prequantized,
    read_scheme,
    scheme_from_dict,
)
from exaone_deploy.prequant.formats import LINEAR_SUFFIXES
from exaone_deploy.prequant.make import quantization_config
from exaone_deploy.prequant.st import SafetensorsDir

torch = pytest.importorskip("torch")

# (format, make_prequantized options): every layout variant we write and read.
VARIANTS = {
    "gptq-v1-sym": ("gptq", {}),
    "gptq-v1-asym-actorder": ("gptq", {"sym": False, "desc_act": True}),
    "gptq-v2-asym": ("gptq", {"sym": False, "checkpoint_format": "gptq_v2"}),
    "gptq-int8-whole-row": ("gptq", {"bits": 8, "group_size": -1}),
    "awq": ("awq", {}),
    "fp8-128": ("fp8", {}),  # real block size: blocks wider than the tiny linears (partial edge blocks)
    "fp8-32-skip": ("fp8", {"block_size": (32, 32), "skip": ("model.layers.0.mlp.down_proj",)}),
    "fp8-32x48": ("fp8", {"block_size": (32, 48)}),  # partial edge blocks along the input dim
    "ct-int4-asym": ("compressed-tensors", {"sym": False}),
    "ct-int8-sym": ("compressed-tensors", {"bits": 8}),
    "ct-fp8-block": ("compressed-tensors", {"weight_type": "float", "block_size": (32, 32)}),
}


@pytest.fixture(scope="module")
def prequant_dir(tiny_dirs, tmp_path_factory):
    """``prequant_dir(variant)`` -> the 32b (hybrid) tiny checkpoint rewritten in that variant (cached)."""
    root, made = tmp_path_factory.mktemp("prequant"), {}

    def get(variant: str):
        if variant not in made:
            fmt, opts = VARIANTS[variant]
            made[variant] = make_prequantized(tiny_dirs["32b"], root / variant, fmt, **opts)
        return made[variant]

    return get


def _t(a: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(a))


def _gptq_oracle(st, module: str, bits: int, v1: bool, scale_dtype):
    """GPTQModel ``dequantize_weight`` (wf shifts, masks, ``scales[g_idx] * (weight - zeros[g_idx])``) with
    AutoGPTQ's v1 zero convention (``zeros + 1`` masked to ``bits``). Returns (codes [in, out], w [in, out])."""
    qweight, qzeros = _t(st[module + ".qweight"]), _t(st[module + ".qzeros"])
    scales, g_idx = _t(st[module + ".scales"]).to(scale_dtype), _t(st[module + ".g_idx"]).long()
    wf, pf, maxq = torch.arange(0, 32, bits, dtype=torch.int32), 32 // bits, 2**bits - 1
    zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, pf), wf.unsqueeze(0)).to(torch.int16)
    zeros = torch.bitwise_and(zeros + 1 if v1 else zeros, maxq).reshape(qzeros.shape[0], -1)
    weight = torch.bitwise_and(
        torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, pf, -1), wf.unsqueeze(-1)).to(torch.int16), maxq
    )
    weight = weight.reshape(-1, weight.shape[2])
    return weight, scales[g_idx] * (weight - zeros[g_idx])


def _awq_oracle(st, module: str, group: int, scale_dtype):
    """AutoAWQ ``unpack_awq`` + ``reverse_awq_order`` + ``dequantize_gemm``. Returns (codes, w), [in, out]."""

    def unpack(packed):
        shifts = torch.arange(0, 32, 4)
        ints = torch.bitwise_right_shift(packed[:, :, None], shifts[None, None, :]).to(torch.int8)
        ints = ints.view(ints.shape[0], -1)
        order = torch.arange(ints.shape[-1]).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)
        return torch.bitwise_and(ints[:, order], 15)

    iweight, izeros = unpack(_t(st[module + ".qweight"])), unpack(_t(st[module + ".qzeros"]))
    scales = _t(st[module + ".scales"]).to(scale_dtype)
    w = (iweight - izeros.repeat_interleave(group, dim=0)) * scales.repeat_interleave(group, dim=0)
    return iweight, w


def _modules(st) -> list[str]:
    return sorted({n.rpartition(".")[0] for n in st.names() if n.rpartition(".")[0].endswith(LINEAR_SUFFIXES)})


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.startswith(("gptq", "awq"))])
def test_gptq_awq_match_reference_dequantization(prequant_dir, variant):
    out = prequant_dir(variant)
    scheme, st = read_scheme(out), SafetensorsDir(out)
    ours = dict(iter_quantized_linears(out))
    assert len(ours) == 7 * 8  # every linear of the 8 layers
    for module, q in ours.items():
        for scale_dtype in (torch.float32, torch.float16):
            if scheme.method == "gptq":
                codes, ref = _gptq_oracle(st, module, scheme.bits, scheme.checkpoint_format == "gptq", scale_dtype)
            else:
                codes, ref = _awq_oracle(st, module, scheme.group_of(q.codes.shape[1]), scale_dtype)
            np.testing.assert_array_equal(q.codes, codes.T.numpy())
            want = q.dequantize() if scale_dtype == torch.float32 else q.dequantize().astype(np.float16)
            np.testing.assert_array_equal(want, ref.T.numpy())
    if scheme.desc_act:  # act-order really produced a non-monotone g_idx (the path under test)
        assert any(np.any(np.diff(q.g_idx) < 0) for q in ours.values())


@pytest.mark.parametrize("variant", ["ct-int4-asym", "ct-int8-sym"])
def test_compressed_tensors_codes_match_library_unpack(prequant_dir, variant):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    out = prequant_dir(variant)
    scheme, st = read_scheme(out), SafetensorsDir(out)
    offset = 1 << (scheme.bits - 1)
    for module, q in iter_quantized_linears(out):
        shape = torch.Size(st[module + ".weight_shape"].tolist())
        codes = helpers.unpack_from_int32(_t(st[module + ".weight_packed"]), scheme.bits, shape)
        np.testing.assert_array_equal(q.codes.astype(np.int16) - offset, codes.numpy())
        if not scheme.sym:
            zp_shape = (shape[0], q.scales.shape[1])
            zp = helpers.unpack_from_int32(_t(st[module + ".weight_zero_point"]), scheme.bits, zp_shape, packed_dim=0)
            np.testing.assert_array_equal(q.zeros.astype(np.int16) - offset, zp.numpy())


def _transformers_loaded(out, quantization_config) -> dict:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.Exaone4ForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, quantization_config=quantization_config
    )
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", ["fp8-128", "fp8-32-skip", "ct-int4-asym", "ct-int8-sym", "ct-fp8-block"])
def test_transformers_loader_dequantizes_like_us(prequant_dir, variant):
    """transformers' own dequantizing loaders (FineGrainedFP8 / compressed-tensors) give our weights.

    (Its load-time fp8 dequantizer wants the block grid to divide the weight; partial edge blocks, which
    ``FP8Linear`` and ``_dequantize_fp8_weight`` handle, are checked against the latter below.)"""
    transformers = pytest.importorskip("transformers")
    out = prequant_dir(variant)
    scheme = read_scheme(out)
    config = (
        transformers.FineGrainedFP8Config(dequantize=True)
        if scheme.method == "fp8"
        else transformers.CompressedTensorsConfig(dequantize=True)
    )
    theirs, ours = _transformers_loaded(out, config), dequantized_linears(out)
    assert len(ours) == 7 * 8 - (1 if "skip" in variant else 0)
    for name, w in ours.items():
        # compressed-tensors dequantizes in the scales' dtype (bf16): ours rounded once to bf16
        want = w if scheme.weight_type == "float" else torch.from_numpy(w).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(theirs[name], want, err_msg=name)


@pytest.mark.parametrize("variant", ["fp8-128", "fp8-32-skip", "fp8-32x48"])
def test_fp8_matches_transformers_dequantize(prequant_dir, variant):
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    out = prequant_dir(variant)
    scheme, st = read_scheme(out), SafetensorsDir(out)
    for module, q in iter_quantized_linears(out):
        weight = _t(st[module + ".weight"].view(np.uint8)).view(torch.float8_e4m3fn)
        ref = fp8._dequantize_fp8_weight(
            weight, _t(st[module + ".weight_scale_inv"]), list(scheme.weight_block_size), torch.float32
        )
        np.testing.assert_array_equal(q.dequantize(), ref.numpy())
    skipped = "model.layers.0.mlp.down_proj"
    assert (skipped + ".weight_scale_inv" in st) == ("skip" not in variant)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_make_prequantized_32b(tiny_dirs, prequant_dir, variant):
    """The rewritten hybrid checkpoint: linears packed exactly as re-quantizing them gives, everything else
    byte-identical, config.json spelled as written, and transformers builds from the dequantized state."""
    from exaone_deploy.prequant import pack

    fmt, opts = VARIANTS[variant]
    out, src = prequant_dir(variant), SafetensorsDir(tiny_dirs["32b"])
    st = SafetensorsDir(out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == quantization_config(fmt, **opts)
    assert config["layer_types"] == json.loads((tiny_dirs["32b"] / "config.json").read_text())["layer_types"]
    assert "sliding_attention" in config["layer_types"] and "full_attention" in config["layer_types"]
    ours = dict(iter_quantized_linears(out))
    for name in src.names():  # non-linears (embeddings, norms, lm_head) untouched
        if name.rpartition(".")[0] not in ours:
            assert st[name].dtype == src[name].dtype and st[name].tobytes() == src[name].tobytes(), name
    module = "model.layers.5.self_attn.o_proj"  # [64, 128]: not square
    w = src[module + ".weight"].astype(np.float32)
    if ours[module].__class__.__name__ == "Fp8Weight":
        again = pack.quantize_fp8(w, read_scheme(out).weight_block_size)
        assert again.weight.tobytes() == ours[module].weight.tobytes()
        np.testing.assert_array_equal(again.scale, ours[module].scale)
    else:
        got = ours[module]
        assert got.codes.shape == w.shape and got.codes.dtype == np.uint8 and got.codes.max() < 2**got.bits
        assert np.abs(got.dequantize() - w).max() <= 0.5 * got.scales.max() * (1 + 1e-6)
    dq = dequantized_linears(out)
    for name, array in dq.items():  # the dequantized weights are the re-read of the stored tensors
        np.testing.assert_array_equal(array, ours[name.rpartition(".")[0]].dequantize())

    transformers = pytest.importorskip("transformers")
    model = transformers.Exaone4ForCausalLM(transformers.AutoConfig.from_pretrained(str(tiny_dirs["32b"])))
    state = {name: torch.from_numpy(dq.get(name, src[name].astype(np.float32)).copy()) for name in src.names()}
    model.float().load_state_dict(state, strict=True)
    loaded = model.state_dict()
    for name, array in dq.items():
        np.testing.assert_array_equal(loaded[name].numpy(), array)
    with torch.no_grad():
        logits = model(torch.arange(1, 21)[None]).logits
    assert torch.isfinite(logits).all()


# ---- config recognition ----------------------------------------------------------------------------------
RECOGNISED = [
    (
        quantization_config("gptq", group_size=128, desc_act=True),
        {"method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True, "checkpoint_format": "gptq"},
    ),
    (
        {
            "bits": 8,
            "group_size": -1,
            "desc_act": False,
            "sym": False,
            "quant_method": "gptq",
            "checkpoint_format": "gptq_v2",
        },
        {"bits": 8, "group_size": -1, "sym": False, "checkpoint_format": "gptq_v2"},
    ),
    (
        {
            "bits": 4,
            "group_size": 128,
            "damp_percent": 0.01,
            "desc_act": False,
            "static_groups": False,
            "sym": True,
            "true_sequential": True,
            "model_name_or_path": None,
            "model_file_base_name": "model",
            "quant_method": "gptq",
        },
        {"method": "gptq", "checkpoint_format": "gptq"},
    ),  # AutoGPTQ's spelling: no checkpoint_format means v1
    (quantization_config("awq", group_size=64), {"method": "awq", "bits": 4, "group_size": 64, "zero_point": True}),
    (
        {
            "quant_method": "awq",
            "zero_point": True,
            "group_size": 128,
            "bits": 4,
            "version": "GEMM",
            "modules_to_not_convert": ["lm_head"],
        },
        {"method": "awq", "ignore": ("lm_head",)},
    ),
    (quantization_config("fp8"), {"method": "fp8", "weight_block_size": (128, 128), "activation_scheme": "dynamic"}),
    (
        {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "ignored_layers": ["model.layers.0.mlp.down_proj"],
        },
        {"ignore": ("model.layers.0.mlp.down_proj",)},
    ),
    (
        quantization_config("compressed-tensors", group_size=128),
        {"method": "compressed-tensors", "bits": 4, "group_size": 128, "strategy": "group", "ignore": ("lm_head",)},
    ),
    (
        quantization_config("compressed-tensors", weight_type="float"),
        {
            "weight_type": "float",
            "bits": 8,
            "strategy": "block",
            "weight_block_size": (128, 128),
            "activation_scheme": "dynamic",
        },
    ),
]


@pytest.mark.parametrize("q, fields", RECOGNISED)
def test_config_recognised(q, fields):
    scheme = scheme_from_dict(q, "config.json")
    assert {k: getattr(scheme, k) for k in fields} == fields


def test_compressed_tensors_library_accepts_our_config():
    qc = pytest.importorskip("compressed_tensors.quantization")
    for weight_type in ("int", "float"):
        cfg = qc.QuantizationConfig.model_validate(quantization_config("compressed-tensors", weight_type=weight_type))
        assert cfg.config_groups["group_0"].weights.num_bits in (4, 8)


def test_quantize_config_json_and_whole_row_group(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "exaone4"}))
    assert read_scheme(tmp_path) is None
    (tmp_path / "quantize_config.json").write_text(
        json.dumps({"bits": 4, "group_size": -1, "sym": True, "desc_act": False, "quant_method": "gptq"})
    )
    scheme = read_scheme(tmp_path)
    assert scheme.method == "gptq" and scheme.group_of(5120) == 5120 and scheme.source.endswith("quantize_config.json")
    assert scheme.is_ignored("lm_head") and not scheme.is_ignored("model.layers.0.mlp.down_proj")


_GPTQ = {"bits": 4, "group_size": 128, "sym": True, "desc_act": False, "quant_method": "gptq"}
_CT = quantization_config("compressed-tensors")
_CT_W = _CT["config_groups"]["group_0"]["weights"]
REFUSED = [
    ({**_GPTQ, "bits": 3}, "quantization_config.bits = 3"),
    ({**_GPTQ, "bits": 2}, "quantization_config.bits = 2"),
    ({**_GPTQ, "checkpoint_format": "marlin"}, "quantization_config.checkpoint_format = 'marlin'"),
    ({**_GPTQ, "format": "bitblas"}, "quantization_config.format = 'bitblas'"),
    ({**_GPTQ, "is_marlin_format": True}, "quantization_config.is_marlin_format = True"),
    ({**_GPTQ, "dynamic": {r"-:.*down_proj": {"bits": 8}}}, "quantization_config.dynamic = "),
    ({**_GPTQ, "pack_dtype": "int16"}, "quantization_config.pack_dtype = 'int16'"),
    ({**_GPTQ, "group_size": 0}, "quantization_config.group_size = 0"),
    (
        {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4, "version": "gemv"},
        "quantization_config.version = 'gemv'",
    ),
    (
        {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4, "version": "exllama"},
        "quantization_config.version = 'exllama'",
    ),
    (
        {"quant_method": "awq", "zero_point": False, "group_size": 128, "bits": 4, "version": "gemm"},
        "quantization_config.zero_point = False",
    ),
    (
        {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
        "quantization_config.activation_scheme = 'static'",
    ),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "quantization_config.weight_block_size = None"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "quantization_config.weight_block_size = [128]"),
    (
        {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
        "quantization_config.scale_fmt = 'ue8m0'",
    ),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quantization_config.quant_method = 'bitsandbytes'"),
    ({**_CT, "format": "marlin-24"}, "quantization_config.format = 'marlin-24'"),
    (
        {**_CT, "config_groups": {"a": _CT["config_groups"]["group_0"], "b": _CT["config_groups"]["group_0"]}},
        "quantization_config.config_groups = ['a', 'b']",
    ),
    (
        {**_CT, "config_groups": {"group_0": {**_CT["config_groups"]["group_0"], "weights": {**_CT_W, "num_bits": 3}}}},
        "quantization_config.config_groups.group_0.weights.num_bits = 3",
    ),
    (
        {
            **_CT,
            "config_groups": {
                "group_0": {**_CT["config_groups"]["group_0"], "weights": {**_CT_W, "actorder": "group"}}
            },
        },
        "quantization_config.config_groups.group_0.weights.actorder = 'group'",
    ),
    (
        {
            **_CT,
            "config_groups": {
                "group_0": {
                    **_CT["config_groups"]["group_0"],
                    "input_activations": {"num_bits": 8, "type": "int", "dynamic": False},
                }
            },
        },
        "quantization_config.config_groups.group_0.input_activations.dynamic = False",
    ),
]


@pytest.mark.parametrize("q, message", REFUSED)
def test_config_refused_naming_field_and_value(q, message):
    with pytest.raises(PrequantConfigError) as e:
        scheme_from_dict(q, "/ckpt/config.json")
    text = str(e.value)
    assert text.startswith("/ckpt/config.json: unsupported " + message) and "\n" not in text
    assert isinstance(e.value, ValueError)


def test_unlisted_float_linear_is_an_error(prequant_dir, tmp_path):
    """A float linear the config does not list as unquantized is refused by name, not silently kept."""
    import shutil

    src = prequant_dir("fp8-32-skip")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]["modules_to_not_convert"]
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(PrequantConfigError, match="model.layers.0.mlp.down_proj is neither quantized"):
        dequantized_linears(dst)
