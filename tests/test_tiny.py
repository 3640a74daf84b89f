"""The tiny checkpoint generator, its tokenizer and the EXAONE 4.0 chat template."""

import json
from pathlib import Path

import jinja2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from exaone_deploy.tiny.make import make_tiny
from exaone_deploy.tiny.tokenizer import ADDED_TOKENS, SPECIAL_TOKENS, chat_template, train_tokenizer

transformers = pytest.importorskip("transformers")

PRESETS = ["1.2b", "32b"]
TEXTS = [
    "안녕하세요, 반갑습니다. 오늘 서울의 날씨는 맑습니다.",
    "¿Dónde está la biblioteca? Mañana comeré una manzana en el jardín.",
    "To be, or not to be, that is the question:\n\n  whether 'tis nobler\tin the mind.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {preset: make_tiny(root / preset, preset) for preset in PRESETS}


@pytest.fixture(scope="module")
def tok(tiny):
    return transformers.AutoTokenizer.from_pretrained(tiny["1.2b"])


def _read_json(path):
    return json.loads(Path(path).read_text())


def _file_tensors(model_dir):
    index = _read_json(model_dir / "model.safetensors.index.json")
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(model_dir / file))
    return index, tensors


# ----------------------------------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize("preset", PRESETS)
def test_loads_in_transformers_with_the_file_weights(tiny, preset):
    model_dir = tiny[preset]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    _, tensors = _file_tensors(model_dir)
    state = model.state_dict()
    for name, tensor in tensors.items():
        # Every weight comes from the files, nothing was left randomly initialised by transformers.
        assert torch.equal(state[name], tensor), name
    ids = torch.arange(20).unsqueeze(0) + 10  # longer than the 32b sliding window (8)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 20, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_preset_1_2b_layout(tiny):
    config = _read_json(tiny["1.2b"] / "config.json")
    assert config["architectures"] == ["Exaone4ForCausalLM"] and config["model_type"] == "exaone4"
    assert config["sliding_window"] is None and config["sliding_window_pattern"] is None
    assert config["layer_types"] == ["full_attention"] * 4
    assert config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == "float32"
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["rope_theta"] == 1000000
    assert config["rope_scaling"] == {
        "factor": 16.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny["1.2b"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    index, tensors = _file_tensors(tiny["1.2b"])
    assert "lm_head.weight" not in index["weight_map"]
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_preset_32b_layout(tiny):
    config = _read_json(tiny["32b"] / "config.json")
    assert config["sliding_window"] == 8 and config["sliding_window_pattern"] == "LLLG"
    assert config["layer_types"] == (["sliding_attention"] * 3 + ["full_attention"]) * 2
    assert config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "bfloat16"
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (8, 2, 16)

    hf_config = transformers.AutoConfig.from_pretrained(tiny["32b"])
    assert hf_config.layer_types == config["layer_types"] and hf_config.sliding_window == 8
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny["32b"])
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    index, tensors = _file_tensors(tiny["32b"])
    assert "lm_head.weight" in index["weight_map"]
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


@pytest.mark.parametrize("preset", PRESETS)
def test_sharded_index_and_tensor_names(tiny, preset):
    model_dir = tiny[preset]
    index, tensors = _file_tensors(model_dir)
    config = _read_json(model_dir / "config.json")
    files = set(index["weight_map"].values())
    assert len(files) >= 2
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())

    n, d = config["num_hidden_layers"], config["head_dim"]
    per_layer = [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        "post_attention_layernorm", "post_feedforward_layernorm",
    ]  # fmt: skip
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {f"model.layers.{i}.{w}.weight" for i in range(n) for w in per_layer}
    if not config["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    assert set(tensors) == expected
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (config["num_attention_heads"] * d, 64)
    assert tensors["model.layers.0.self_attn.k_norm.weight"].shape == (d,)
    # Norm weights are around 1 but not 1, so a dropped norm changes the outputs.
    norm = tensors["model.layers.0.post_attention_layernorm.weight"].float()
    assert 0.9 < norm.mean() < 1.1 and norm.std() > 0.05


@pytest.mark.parametrize("preset", PRESETS)
def test_ids_come_from_the_tokenizer(tiny, preset):
    model_dir = tiny[preset]
    config = _read_json(model_dir / "config.json")
    generation = _read_json(model_dir / "generation_config.json")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert config["vocab_size"] == tokenizer.get_vocab_size() == 512
    assert config["bos_token_id"] == generation["bos_token_id"] == tokenizer.token_to_id("[BOS]")
    assert config["eos_token_id"] == generation["eos_token_id"] == tokenizer.token_to_id("[|endofturn|]")
    assert config["pad_token_id"] == generation["pad_token_id"] == tokenizer.token_to_id("[PAD]")
    transformers.GenerationConfig.from_pretrained(model_dir)


def _digest(model_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(model_dir).iterdir())}


def test_deterministic_for_a_seed(tiny, tmp_path):
    again = make_tiny(tmp_path / "again", "32b", seed=0)
    assert _digest(again) == _digest(tiny["32b"])
    other = _digest(make_tiny(tmp_path / "other", "32b", seed=1))
    assert other["tokenizer.json"] == _digest(again)["tokenizer.json"]
    assert other["model-00001-of-00002.safetensors"] != _digest(again)["model-00001-of-00002.safetensors"]


def test_overrides_and_atomic_replace(tmp_path):
    out = make_tiny(tmp_path / "m", "32b", num_layers=6, dtype="float32")
    config = _read_json(out / "config.json")
    local, full = "sliding_attention", "full_attention"
    assert config["layer_types"] == [local, local, local, full, local, full]  # the last layer stays global
    assert config["torch_dtype"] == "float32"
    _, tensors = _file_tensors(out)
    assert all(t.dtype == torch.float32 for t in tensors.values())

    # An existing checkpoint is replaced, and no temporary directory is left behind.
    make_tiny(out, "1.2b")
    assert _read_json(out / "config.json")["num_hidden_layers"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]

    # A directory that is not a checkpoint is never replaced.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_tiny(precious)
    assert (precious / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips(tiny, tok, text):
    raw = Tokenizer.from_file(str(tiny["1.2b"] / "tokenizer.json"))
    ids = raw.encode(text).ids
    assert raw.decode(ids) == text
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok(text)["input_ids"] == ids  # no BOS added
    assert tok.unk_token_id not in ids


def test_special_and_added_tokens(tiny, tok):
    assert tok.bos_token == "[BOS]" and tok.eos_token == "[|endofturn|]"
    assert tok.pad_token == "[PAD]" and tok.unk_token == "[UNK]"
    for token in SPECIAL_TOKENS + ADDED_TOKENS:
        assert len(tok(token)["input_ids"]) == 1, token
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    text = "[|assistant|]\n<think>\nhmm\n</think>\n\n<tool_call>{}</tool_call>[|endofturn|]"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    # Role tokens are special and drop out; think/tool tags are text and stay.
    assert tok.decode(ids, skip_special_tokens=True) == "\n<think>\nhmm\n</think>\n\n<tool_call>{}</tool_call>"
    config = _read_json(tiny["1.2b"] / "tokenizer_config.json")
    assert config["add_bos_token"] is False
    assert config["chat_template"] == chat_template()


def test_train_tokenizer_size(tmp_path):
    train_tokenizer(TEXTS * 20, 300, tmp_path)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 300
    with pytest.raises(ValueError):
        train_tokenizer(TEXTS, 100, tmp_path / "small")


# -------------------------------------------------------------------------------------------- chat template

EMPTY_THINK = "<think>\n\n</think>\n\n"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather",
        "parameters": {
            "type": "object",
            "required": ["location"],
            "properties": {"location": {"type": "string", "description": "City"}},
        },
    },
}
TOOLS_TEXT = (
    "# Available Tools\n"
    "You can use none, one, or multiple of the following tools by calling them as functions to help with the "
    "user’s query.\n"
    "Here are the tools available to you in JSON format within <tool> and </tool> tags:\n"
    '<tool>{"type": "function", "function": {"name": "get_weather", "description": "Get weather", "parameters": '
    '{"type": "object", "required": ["location"], "properties": {"location": {"type": "string", '
    '"description": "City"}}}}}</tool>\n'
    "\n"
    "For each function call you want to make, return a JSON object with function name and arguments within "
    "<tool_call> and </tool_call> tags, like:\n"
    '<tool_call>{"name": function_1_name, "arguments": {argument_1_name: argument_1_value, argument_2_name: '
    "argument_2_value}}</tool_call>\n"
    '<tool_call>{"name": function_2_name, "arguments": {...}}</tool_call>\n'
    "...\n"
    "Note that if no argument name is specified for a tool, you can just print the argument value directly, "
    "without the argument name or JSON formatting."
)
WEATHER_CALL = '<tool_call>{"name": "get_weather", "arguments": {"location": "Seoul"}}</tool_call>'


def _call(arguments, name="get_weather"):
    return {"id": "call_0", "type": "function", "function": {"name": name, "arguments": arguments}}


# (messages, template kwargs, expected rendering)
CHAT_CASES = {
    "user_default": (
        [{"role": "user", "content": "Reply with exactly: OK"}],
        {},
        "[|user|]\nReply with exactly: OK[|endofturn|]\n[|assistant|]\n" + EMPTY_THINK,
    ),
    "system_user": (
        [{"role": "system", "content": "Stay concise."}, {"role": "user", "content": "Hi"}],
        {},
        "[|system|]\nStay concise.[|endofturn|]\n[|user|]\nHi[|endofturn|]\n[|assistant|]\n" + EMPTY_THINK,
    ),
    "enable_thinking_true": (
        [{"role": "user", "content": "3.12 vs 3.9?"}],
        {"enable_thinking": True},
        "[|user|]\n3.12 vs 3.9?[|endofturn|]\n[|assistant|]\n<think>\n",
    ),
    "enable_thinking_false": (
        [{"role": "user", "content": "3.12 vs 3.9?"}],
        {"enable_thinking": False},
        "[|user|]\n3.12 vs 3.9?[|endofturn|]\n[|assistant|]\n" + EMPTY_THINK,
    ),
    "tools_without_system": (
        [{"role": "user", "content": "Weather?"}],
        {"tools": [WEATHER_TOOL]},
        f"[|system|]\n{TOOLS_TEXT}[|endofturn|]\n[|user|]\nWeather?[|endofturn|]\n[|assistant|]\n" + EMPTY_THINK,
    ),
    "tools_with_system": (
        [{"role": "system", "content": "Stay concise."}, {"role": "user", "content": "Weather?"}],
        {"tools": [WEATHER_TOOL]},
        f"[|system|]\nStay concise.\n\n{TOOLS_TEXT}[|endofturn|]\n[|user|]\nWeather?[|endofturn|]\n[|assistant|]\n"
        + EMPTY_THINK,
    ),
    "tool_call_and_result": (
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [_call({"location": "Seoul"})]},
            {"role": "tool", "tool_call_id": "call_0", "content": "Sunny"},
        ],
        {},
        "[|user|]\nWeather?[|endofturn|]\n"
        f"[|assistant|]\n{EMPTY_THINK}{WEATHER_CALL}[|endofturn|]\n"
        '[|tool|]\n<tool_result>{"result": "Sunny"}</tool_result>[|endofturn|]\n'
        "[|assistant|]\n" + EMPTY_THINK,
    ),
    "tool_call_json_string_arguments": (
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [_call('{"location": "Seoul"}')]},
        ],
        {"add_generation_prompt": False},
        f"[|user|]\nWeather?[|endofturn|]\n[|assistant|]\n{EMPTY_THINK}{WEATHER_CALL}[|endofturn|]\n",
    ),
    "text_then_two_calls_then_two_results": (
        [
            {"role": "user", "content": "서울과 마드리드 날씨?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [_call({"location": "서울"}), _call({"location": "Madrid"})],
            },
            {"role": "tool", "content": "맑음"},
            {"role": "tool", "content": {"temp": 31}},
        ],
        {},
        "[|user|]\n서울과 마드리드 날씨?[|endofturn|]\n"
        f"[|assistant|]\n{EMPTY_THINK}Checking.\n"
        '<tool_call>{"name": "get_weather", "arguments": {"location": "서울"}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"location": "Madrid"}}</tool_call>[|endofturn|]\n'
        '[|tool|]\n<tool_result>{"result": "맑음"}</tool_result>\n'
        '<tool_result>{"result": {"temp": 31}}</tool_result>[|endofturn|]\n'
        "[|assistant|]\n" + EMPTY_THINK,
    ),
    "multi_turn": (
        [
            {"role": "system", "content": "Eres útil."},
            {"role": "user", "content": "Hola"},
            {"role": "assistant", "content": "¡Hola!"},
            {"role": "user", "content": "Again"},
        ],
        {"enable_thinking": True},
        "[|system|]\nEres útil.[|endofturn|]\n[|user|]\nHola[|endofturn|]\n"
        f"[|assistant|]\n{EMPTY_THINK}¡Hola![|endofturn|]\n[|user|]\nAgain[|endofturn|]\n[|assistant|]\n<think>\n",
    ),
    "past_reasoning_is_dropped": (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nhidden\n</think>\n\nHello!"},
            {"role": "assistant", "content": "Hello again!", "reasoning_content": "also hidden"},
            {"role": "user", "content": "Again"},
        ],
        {},
        f"[|user|]\nHi[|endofturn|]\n[|assistant|]\n{EMPTY_THINK}Hello![|endofturn|]\n"
        f"[|assistant|]\n{EMPTY_THINK}Hello again![|endofturn|]\n[|user|]\nAgain[|endofturn|]\n"
        "[|assistant|]\n" + EMPTY_THINK,
    ),
    "skip_think_false_keeps_final_reasoning": (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nLet me greet.\n</think>\n\nHello!"},
        ],
        {"skip_think": False, "add_generation_prompt": False},
        "[|user|]\nHi[|endofturn|]\n[|assistant|]\n<think>\nLet me greet.\n</think>\n\nHello![|endofturn|]\n",
    ),
    "content_parts": (
        [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}],
        {},
        "[|user|]\nHello there[|endofturn|]\n[|assistant|]\n" + EMPTY_THINK,
    ),
}


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_chat_template_renders_the_exaone4_format(tok, case):
    messages, kwargs, expected = CHAT_CASES[case]
    kwargs = {"add_generation_prompt": True, **kwargs}
    assert tok.apply_chat_template(messages, tokenize=False, **kwargs) == expected


def test_chat_template_tokenizes_role_tokens_as_single_ids(tok):
    messages, _, _ = CHAT_CASES["system_user"]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    ids = list(np.asarray(ids).reshape(-1))
    assert ids[0] == tok.convert_tokens_to_ids("[|system|]")
    assert ids.count(tok.convert_tokens_to_ids("[|endofturn|]")) == 2
    assert tok.convert_tokens_to_ids("<think>") in ids and tok.convert_tokens_to_ids("</think>") in ids


def test_chat_template_rejects_unknown_roles(tok):
    with pytest.raises(Exception, match="Unknown role"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_chat_template_is_independent_of_block_trimming(case):
    # A runtime rendering the template with plain jinja2 (no trim_blocks/lstrip_blocks) gets the same text.
    env = jinja2.Environment()
    env.filters["tojson"] = lambda x, ensure_ascii=False: json.dumps(x, ensure_ascii=ensure_ascii)
    messages, kwargs, expected = CHAT_CASES[case]
    kwargs = {"add_generation_prompt": True, **kwargs}
    assert env.from_string(chat_template()).render(messages=messages, **kwargs) == expected
