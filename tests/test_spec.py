"""config.json -> ModelSpec: every spelling real EXAONE 4.0 files use, the per-layer plan, RoPE, bad input.

The per-layer plan and the RoPE tables are checked against transformers (Exaone4Config / Exaone4Attention /
ROPE_INIT_FUNCTIONS) wherever transformers can parse the config.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from exaone_deploy.spec import (
    ConfigError,
    HeadSpec,
    ModelSpec,
    load_spec,
    spec_from_config,
)


def _write(tmp_path, cfg, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)
    return path


def _plan(spec: ModelSpec):
    return [(layer.sliding, layer.window, layer.rope) for layer in spec.layers]


def _hf_plan(cfg: dict):
    """transformers' per-layer plan, read off Exaone4Attention modules built (on meta) from ``cfg``.

    The plan depends only on layer_types/sliding_window, so the sizes are shrunk to keep this fast.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    small = dict(
        cfg,
        hidden_size=64,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=64,
    )
    hc = transformers.Exaone4Config(**small)
    with torch.device("meta"):
        model = transformers.Exaone4ForCausalLM(hc)
    plan = []
    for layer in model.model.layers:
        attn = layer.self_attn
        # modeling_exaone4: RoPE iff `self.sliding_window is None or self.is_sliding`; the mask uses
        # `sliding_window if is_sliding else None`.
        rope = attn.sliding_window is None or attn.is_sliding
        plan.append((attn.is_sliding, attn.sliding_window if attn.is_sliding else 0, rope))
    assert hc.layer_types == ["sliding_attention" if s else "full_attention" for s, _, _ in plan]
    return plan


# ---- the real checkpoints ------------------------------------------------------------------------


def test_exaone_4_0_32b(tmp_path, real_config):
    spec = load_spec(_write(tmp_path, real_config("32b")).parent)
    assert (spec.num_layers, spec.hidden_size, spec.intermediate_size) == (64, 5120, 27392)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.group_size) == (40, 8, 128, 5)
    assert (spec.q_size, spec.kv_size) == (5120, 1024)
    assert spec.vocab_size == 102400 and spec.max_position_embeddings == 131072
    assert spec.tie_word_embeddings is False
    assert spec.sliding_window == 4096
    assert spec.rms_norm_eps == 1e-5
    assert (spec.bos_token_id, spec.eos_token_id, spec.pad_token_id) == (1, (361,), 0)
    assert spec.rope.rope_type == "llama3" and spec.rope.theta == 1e6
    assert (spec.rope.factor, spec.rope.low_freq_factor, spec.rope.high_freq_factor) == (16.0, 1.0, 4.0)
    assert spec.rope.original_max_position_embeddings == 8192
    assert len(spec.layers) == 64 and [layer.index for layer in spec.layers] == list(range(64))
    for layer in spec.layers:
        is_global = layer.index % 4 == 3
        assert layer.sliding is not is_global
        assert layer.window == (0 if is_global else 4096)
        assert layer.rope is not is_global, "sliding layers use RoPE, global layers of the hybrid are NoPE"
        assert layer.kind == ("global" if is_global else "sliding")
    assert not spec.layers[-1].sliding
    assert spec.is_hybrid and spec.uses_rope
    # 32B: about 32.0e9 parameters (untied lm_head).
    assert 31.5e9 < spec.num_parameters() < 32.5e9


def test_exaone_4_0_1_2b(tmp_path, real_config):
    spec = load_spec(_write(tmp_path, real_config("1.2b")))
    assert (spec.num_layers, spec.hidden_size, spec.intermediate_size) == (30, 2048, 4096)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (32, 8, 64)
    assert spec.tie_word_embeddings is True and spec.sliding_window is None
    assert spec.max_position_embeddings == 65536
    assert _plan(spec) == [(False, 0, True)] * 30
    assert not spec.is_hybrid and spec.uses_rope
    # 1.2B: 1.28e9 parameters (tied embeddings counted once).
    assert 1.25e9 < spec.num_parameters() < 1.30e9


@pytest.mark.parametrize("name", ["32b", "1.2b"])
def test_real_plans_match_transformers(real_config, name):
    cfg = real_config(name)
    assert _plan(spec_from_config(cfg)) == _hf_plan(cfg)


def test_kv_cache_bytes_window(real_config):
    spec = spec_from_config(real_config("32b"))
    per_token_layer = 2 * 8 * 128 * 2  # K and V, 8 kv heads, head_dim 128, bf16
    assert spec.kv_cache_bytes(1000) == 64 * 1000 * per_token_layer
    # At 32k tokens, the 48 sliding layers hold only the 4096-token window.
    assert spec.kv_cache_bytes(32768) == (16 * 32768 + 48 * 4096) * per_token_layer
    assert spec.kv_cache_bytes(32768, windowed=False) == 64 * 32768 * per_token_layer


# ---- the spellings ---------------------------------------------------------------------------------


def _variants_32b(base: dict) -> dict:
    """The 32B config in every spelling we know of; all must give the same spec."""
    out = {"4.54 (rope_scaling, LLLG + layer_types)": base}
    v5 = copy.deepcopy(base)
    v5["rope_parameters"] = dict(v5.pop("rope_scaling"), rope_theta=v5.pop("rope_theta"))
    v5["transformers_version"] = "5.0.0"
    out["5.x (rope_parameters with rope_theta inside)"] = v5
    for pattern in ("LLLG", 4, "lllg"):
        v = copy.deepcopy(base)
        del v["layer_types"]
        v["sliding_window_pattern"] = pattern
        out[f"pattern {pattern!r}, no layer_types"] = v
    v = copy.deepcopy(base)
    del v["sliding_window_pattern"]
    out["layer_types, no pattern"] = v
    v = copy.deepcopy(base)
    del v["head_dim"]
    v["num_attention_heads"], v["hidden_size"] = 40, 5120  # 5120 / 40 = 128
    out["head_dim absent"] = v
    v = copy.deepcopy(base)
    v["rope_scaling"]["type"] = v["rope_scaling"].pop("rope_type")
    out["rope_scaling.type (old alias)"] = v
    return out


def test_32b_spellings_agree(real_config):
    variants = _variants_32b(real_config("32b"))
    plans = {name: _plan(spec_from_config(cfg)) for name, cfg in variants.items()}
    expected = plans["4.54 (rope_scaling, LLLG + layer_types)"]
    for name, plan in plans.items():
        assert plan == expected, name
    specs = {name: spec_from_config(cfg) for name, cfg in variants.items()}
    for name, spec in specs.items():
        assert spec.rope == specs["4.54 (rope_scaling, LLLG + layer_types)"].rope, name
        assert spec.head_dim == 128, name


@pytest.mark.parametrize(
    "variant",
    [
        "5.x (rope_parameters with rope_theta inside)",
        "pattern 4, no layer_types",
        "layer_types, no pattern",
    ],
)
def test_32b_spellings_match_transformers(real_config, variant):
    # transformers 5 cannot parse a string pattern without layer_types ((i + 1) % "LLLG": TypeError).
    cfg = _variants_32b(real_config("32b"))[variant]
    assert _plan(spec_from_config(cfg)) == _hf_plan(cfg)


def test_1_2b_spellings(real_config):
    base = real_config("1.2b")
    variants = [base]
    for pattern in (None, 0, 4, "LLLG"):  # ignored when sliding_window is null
        v = copy.deepcopy(base)
        v["sliding_window_pattern"] = pattern
        variants.append(v)
    v = copy.deepcopy(base)
    del v["layer_types"], v["sliding_window_pattern"]  # transformers divides by zero on this one
    variants.append(v)
    v = copy.deepcopy(base)
    v["rope_parameters"] = dict(v.pop("rope_scaling"), rope_theta=v.pop("rope_theta"))
    variants.append(v)
    for v in variants:
        spec = spec_from_config(v)
        assert _plan(spec) == [(False, 0, True)] * 30
        assert spec.tie_word_embeddings
    assert _plan(spec_from_config(variants[-1])) == _hf_plan(variants[-1])


def test_tie_word_embeddings_default_false(real_config):
    cfg = real_config("32b")
    del cfg["tie_word_embeddings"]
    assert spec_from_config(cfg).tie_word_embeddings is False  # transformers' Exaone4Config default


def test_window_but_no_sliding_layers_is_nope_everywhere(real_config):
    # FACTS: a config with a window but only global layers gets no RoPE anywhere (transformers agrees).
    cfg = real_config("32b")
    cfg["layer_types"] = ["full_attention"] * 64
    spec = spec_from_config(cfg)
    assert _plan(spec) == [(False, 0, False)] * 64
    assert not spec.uses_rope
    assert _plan(spec) == _hf_plan(cfg)


def test_last_layer_global_with_string_pattern(real_config):
    # 6 layers with "LLLG": layers 0-2 local, 3 global, 4 local, 5 forced global (final layer).
    cfg = real_config("32b")
    cfg.update(num_hidden_layers=6, sliding_window=8)
    del cfg["layer_types"]
    spec = spec_from_config(cfg)
    assert [layer.sliding for layer in spec.layers] == [True, True, True, False, True, False]
    assert [layer.rope for layer in spec.layers] == [True, True, True, False, True, False]
    assert [layer.window for layer in spec.layers] == [8, 8, 8, 0, 8, 0]


def test_pattern_lg_mixed(real_config):
    cfg = real_config("32b")
    cfg.update(num_hidden_layers=8, sliding_window=16, sliding_window_pattern="LG")
    del cfg["layer_types"]
    assert [layer.sliding for layer in spec_from_config(cfg).layers] == [True, False] * 4


def test_explicit_layer_types_are_honoured_like_transformers(real_config):
    cfg = real_config("32b")
    cfg.update(num_hidden_layers=6, sliding_window=8)
    cfg["layer_types"] = [
        "sliding_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "sliding_attention",
    ]
    assert _plan(spec_from_config(cfg)) == _hf_plan(cfg)


def test_spec_json_roundtrip(real_config):
    spec = spec_from_config(real_config("32b"))
    again = ModelSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again == spec


def test_config_hash_is_of_file_bytes(tmp_path, real_config):
    import hashlib

    path = _write(tmp_path, real_config("1.2b"))
    assert load_spec(path).config_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_spec(tmp_path).source == str(path)


# ---- RoPE against transformers ---------------------------------------------------------------------


def _hf_rope(cfg: dict):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.exaone4.modeling_exaone4 import Exaone4RotaryEmbedding

    hc = transformers.Exaone4Config(**cfg)
    rope_type = hc.rope_parameters["rope_type"]
    if rope_type == "default":
        inv, _ = Exaone4RotaryEmbedding.compute_default_rope_parameters(hc)
    else:
        inv, _ = ROPE_INIT_FUNCTIONS[rope_type](hc)
    rot = Exaone4RotaryEmbedding(hc)
    assert torch.equal(rot.inv_freq, inv)
    return torch, inv, rot


def _rope_cfg(real_config, name, rope_type):
    cfg = real_config(name)
    if rope_type == "default":
        cfg["rope_scaling"] = None
    return cfg


@pytest.mark.parametrize("rope_type", ["llama3", "default"])
@pytest.mark.parametrize("name", ["32b", "1.2b"])
def test_inv_freq_matches_transformers(real_config, name, rope_type):
    cfg = _rope_cfg(real_config, name, rope_type)
    spec = spec_from_config(cfg)
    assert spec.rope.rope_type == rope_type
    _, inv, _ = _hf_rope(cfg)
    ours = spec.rope.inv_freq(spec.head_dim)
    assert ours.shape == (spec.head_dim // 2,)
    np.testing.assert_allclose(ours, inv.double().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours, inv.double().numpy(), rtol=1e-6, atol=0)
    if rope_type == "llama3":
        # The scaling is really applied: the low frequencies are divided by the factor 16.
        plain = spec_from_config(_rope_cfg(real_config, name, "default")).rope.inv_freq(spec.head_dim)
        assert np.allclose(ours[-1], plain[-1] / 16) and ours[0] == plain[0]


def _cos_sin_diff(spec, rot, torch, positions):
    pos = torch.as_tensor(positions)[None]
    cos, sin = rot(torch.zeros(1, 1, spec.head_dim), pos)
    c, s = spec.rope.cos_sin(spec.head_dim, int(positions.max()) + 1)
    half = spec.head_dim // 2
    # transformers duplicates the halves (cat(freqs, freqs)); ours keeps one half.
    assert torch.equal(cos[0, :, :half], cos[0, :, half:])
    return (
        np.abs(cos[0, :, :half].numpy() - c[positions]).max(),
        np.abs(sin[0, :, :half].numpy() - s[positions]).max(),
    )


@pytest.mark.parametrize(
    "name,head_dim,rope_type",
    [
        ("32b", 128, "llama3"),  # the real 32B
        ("1.2b", 64, "llama3"),  # the real 1.2B
        ("32b", 16, "llama3"),  # the tiny presets' head_dim
        ("32b", 16, "default"),
    ],
)
def test_cos_sin_match_transformers(real_config, name, head_dim, rope_type):
    cfg = _rope_cfg(real_config, name, rope_type)
    cfg["head_dim"] = head_dim
    spec = spec_from_config(cfg)
    torch, _, rot = _hf_rope(cfg)
    positions = np.concatenate([np.arange(0, 4096), np.arange(4096, spec.max_position_embeddings, 97)])
    assert max(_cos_sin_diff(spec, rot, torch, positions)) <= 1e-6


# ---- bad input ---------------------------------------------------------------------------------------


def _error(tmp_path, cfg) -> ConfigError:
    path = _write(tmp_path, cfg)
    with pytest.raises(ConfigError) as info:
        load_spec(tmp_path)
    message = str(info.value)
    assert str(path) in message, message
    assert info.value.path == str(path)
    return info.value


@pytest.mark.parametrize("model_type", ["exaone", "llama", None])
def test_unknown_model_type(tmp_path, real_config, model_type):
    cfg = real_config("32b")
    cfg["model_type"] = model_type
    err = _error(tmp_path, cfg)
    assert err.field == "model_type" and "'model_type'" in str(err) and "exaone4" in str(err)


@pytest.mark.parametrize(
    "field", ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
)
def test_missing_required_field(tmp_path, real_config, field):
    cfg = real_config("32b")
    del cfg[field]
    err = _error(tmp_path, cfg)
    assert err.field == field and f"'{field}'" in str(err) and "missing" in str(err)


@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden_size", "5120"),
        ("num_hidden_layers", 0),
        ("num_attention_heads", True),
        ("head_dim", -128),
        ("vocab_size", 1.5),
    ],
)
def test_wrongly_typed_field(tmp_path, real_config, field, value):
    cfg = real_config("32b")
    cfg[field] = value
    err = _error(tmp_path, cfg)
    assert err.field == field and f"'{field}'" in str(err)


def test_heads_not_divisible_by_kv_heads(tmp_path, real_config):
    cfg = real_config("32b")
    cfg["num_key_value_heads"] = 6  # 40 % 6 != 0
    err = _error(tmp_path, cfg)
    assert err.field == "num_key_value_heads"
    assert "40" in str(err) and "6" in str(err) and "divisible" in str(err)


@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("rope_type", ["yarn", "linear", "dynamic", "longrope"])
def test_unknown_rope_type(tmp_path, real_config, spelling, rope_type):
    cfg = real_config("32b")
    params = dict(cfg.pop("rope_scaling"), rope_type=rope_type)
    if spelling == "rope_parameters":
        params["rope_theta"] = cfg.pop("rope_theta")
    cfg[spelling] = params
    err = _error(tmp_path, cfg)
    assert err.field == f"{spelling}.rope_type" and rope_type in str(err) and "llama3" in str(err)


def test_llama3_missing_parameter(tmp_path, real_config):
    cfg = real_config("32b")
    del cfg["rope_scaling"]["low_freq_factor"]
    err = _error(tmp_path, cfg)
    assert err.field == "rope_scaling.low_freq_factor"


@pytest.mark.parametrize("pattern", ["LLXG", "LLL G", "", "LLLg1"])
def test_bad_pattern_letters(tmp_path, real_config, pattern):
    cfg = real_config("32b")
    del cfg["layer_types"]
    cfg["sliding_window_pattern"] = pattern
    err = _error(tmp_path, cfg)
    assert err.field == "sliding_window_pattern" and "L and G" in str(err) and repr(pattern) in str(err)


def test_window_without_pattern_or_layer_types(tmp_path, real_config):
    cfg = real_config("32b")
    del cfg["layer_types"], cfg["sliding_window_pattern"]
    err = _error(tmp_path, cfg)
    assert err.field == "sliding_window_pattern"


@pytest.mark.parametrize(
    "layer_types,field",
    [
        (["sliding_attention"] * 63, "layer_types"),
        (["sliding_attention"] * 62 + ["chunked_attention", "full_attention"], "layer_types[62]"),
    ],
)
def test_bad_layer_types(tmp_path, real_config, layer_types, field):
    cfg = real_config("32b")
    cfg["layer_types"] = layer_types
    assert _error(tmp_path, cfg).field == field


@pytest.mark.parametrize("window", [0, -4096, "4096", 40.96])
def test_bad_sliding_window(tmp_path, real_config, window):
    cfg = real_config("32b")
    cfg["sliding_window"] = window
    assert _error(tmp_path, cfg).field == "sliding_window"


@pytest.mark.parametrize("value", ["llama3", [1, 2]])
def test_rope_scaling_not_an_object(tmp_path, real_config, value):
    cfg = real_config("32b")
    cfg["rope_scaling"] = value
    path = _write(tmp_path, cfg)
    try:
        load_spec(path)
    except ConfigError as e:
        assert str(path) in str(e) and e.field == "rope_scaling"
    except (ValueError, TypeError) as e:
        raise AssertionError(f"not a ConfigError: {e!r}") from None
    else:
        raise AssertionError("accepted")


def test_invalid_json(tmp_path, real_config):
    text = json.dumps(real_config("32b"))[:-20]
    err = _error(tmp_path, text)
    assert err.field == "<file>" and "JSON" in str(err)


def test_json_not_an_object(tmp_path):
    assert _error(tmp_path, "[1, 2, 3]").field == "<root>"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_spec(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value) and "not found" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_spec(tmp_path / "nope" / "my-config.json")
    assert "my-config.json" in str(info.value)


# ---- task heads (architectures) ------------------------------------------------------------------


def test_causal_lm_head_by_default(real_config):
    cfg = real_config("1.2b")
    assert spec_from_config(cfg).head == HeadSpec("causal-lm", pad_token_id=0)
    del cfg["architectures"]
    assert spec_from_config(cfg).head.task == "causal-lm"


@pytest.mark.parametrize(
    "arch,task,prefix,bias",
    [
        ("Exaone4ForSequenceClassification", "sequence-classification", "model", False),
        ("Exaone4ForTokenClassification", "token-classification", "model", True),
        ("Exaone4ForQuestionAnswering", "question-answering", "transformer", True),
    ],
)
def test_head_architectures(real_config, arch, task, prefix, bias):
    cfg = dict(
        real_config("1.2b"),
        architectures=[arch],
        id2label={"0": "NEG", "1": "POS", "2": "MIXED"},
        label2id={"NEG": 0, "POS": 1, "MIXED": 2},
        problem_type="single_label_classification",
    )
    head = spec_from_config(cfg).head
    assert (head.task, head.prefix, head.bias, head.pad_token_id) == (task, prefix, bias, 0)
    assert head.labels == (() if task == "question-answering" else ("NEG", "POS", "MIXED"))
    lm = spec_from_config(real_config("1.2b"))
    # heads replace the (tied) LM head: QA adds 2 * d + 2, the classifiers num_labels * (d + bias)
    extra = 2 * 2048 + 2 if task == "question-answering" else 3 * (2048 + bias)
    assert spec_from_config(cfg).num_parameters() == lm.num_parameters() + extra


def test_labels_default_and_num_labels(real_config):
    cfg = dict(real_config("1.2b"), architectures=["Exaone4ForSequenceClassification"])
    assert spec_from_config(cfg).head.labels == ("LABEL_0", "LABEL_1")
    assert spec_from_config(dict(cfg, num_labels=1)).head.labels == ("LABEL_0",)
    cfg = dict(cfg, id2label={"1": "b", "0": "a"}, token_classification_bias=False)
    assert spec_from_config(cfg).head.labels == ("a", "b")
    tok = spec_from_config(dict(cfg, architectures=["Exaone4ForTokenClassification"])).head
    assert tok.bias is False and tok.problem_type is None


@pytest.mark.parametrize(
    "extra,field,problem",
    [
        ({"architectures": ["LlamaForCausalLM"]}, "architectures", "unsupported architecture 'LlamaForCausalLM'"),
        ({"architectures": "Exaone4ForCausalLM"}, "architectures", "list of one class name"),
        ({"id2label": {"0": "a", "2": "b"}}, "id2label", "ids must be 0..1"),
        ({"id2label": {"x": "a"}}, "id2label", "integer ids"),
        ({"id2label": {"0": "a", "1": "b"}, "num_labels": 3}, "num_labels", "is 3 but id2label has 2"),
        ({"id2label": {"0": "a", "1": "b"}, "label2id": {"a": 1, "b": 0}}, "label2id", "does not agree"),
        ({"id2label": {"0": "a", "1": "a"}, "label2id": {"a": 0}}, "label2id", "does not agree"),
        ({"num_labels": 0}, "num_labels", "positive integer"),
        ({"problem_type": "ranking"}, "problem_type", "unknown problem type 'ranking'"),
    ],
)
def test_bad_head_fields(tmp_path, real_config, extra, field, problem):
    cfg = {**real_config("1.2b"), "architectures": ["Exaone4ForSequenceClassification"], **extra}
    path = _write(tmp_path, cfg)
    with pytest.raises(ConfigError, match=problem) as e:
        load_spec(path)
    assert e.value.field == field and str(path) in str(e.value)


def test_head_json_roundtrip_and_old_manifests(real_config):
    cfg = dict(
        real_config("32b"),
        architectures=["Exaone4ForTokenClassification"],
        id2label={"0": "O", "1": "B-PER", "2": "I-PER"},
    )
    spec = spec_from_config(cfg)
    d = json.loads(json.dumps(spec.to_json()))
    assert d["head"]["labels"] == ["O", "B-PER", "I-PER"]
    assert ModelSpec.from_json(d) == spec
    d.pop("head")  # a manifest written before heads existed
    assert ModelSpec.from_json(d).head == HeadSpec()
