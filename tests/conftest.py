"""Shared fixtures: tiny random-weight checkpoints of both presets, the transformers oracle, real configs.

The tiny checkpoints are written once per test session (``make_tiny``, default storage dtypes: fp32 for
the 1.2b preset, bf16 for the 32b preset; bf16 -> fp32 is exact, so both models see the same fp32 weights).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from pathlib import Path

import pytest

PRESETS = ("1.2b", "32b")
REPO = Path(__file__).resolve().parents[1]


def load_script(relpath: str, name: str):
    """A repository script that is not a package module (``benchmarks/*.py``, ``docs/*.py``), imported from its
    file under ``name``."""
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict:
    """{preset: checkpoint directory} for the 1.2b (all global, tied) and 32b (LLLG hybrid, window 8) presets."""
    from exaone_deploy.tiny.make import make_tiny

    root = tmp_path_factory.mktemp("tiny-ckpt")
    return {preset: make_tiny(root / preset, preset, seed=0) for preset in PRESETS}


@functools.lru_cache(maxsize=8)
def load_oracle(model_dir, attn_implementation: str = "eager"):
    """transformers' Exaone4ForCausalLM on ``model_dir`` in fp32, eval mode (cached per dir and attention)."""
    import torch
    import transformers

    model = transformers.Exaone4ForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation=attn_implementation
    )
    return model.eval()


@functools.lru_cache(maxsize=8)
def load_ours(model_dir, dtype: str = "float32", max_positions: int = 512):
    """Our reference model (cached: tests must not modify it)."""
    from exaone_deploy.exporter.reference import load_reference

    return load_reference(model_dir, dtype, max_positions=max_positions)


@pytest.fixture(scope="session")
def oracle():
    """``oracle(model_dir, attn_implementation="eager")`` -> transformers' model in fp32 (cached)."""
    pytest.importorskip("transformers")
    return load_oracle


@pytest.fixture(scope="session")
def ours():
    """``ours(model_dir, dtype="float32")`` -> our reference model (cached; do not modify it)."""
    return load_ours


# ---- config.json of the real checkpoints ---------------------------------------------------------
# As published on the Hub (LGAI-EXAONE/EXAONE-4.0-32B and EXAONE-4.0-1.2B, written by transformers 4.54),
# to the best of our knowledge: sizes from ../shared/reference/FACTS.md.

_LLAMA3 = {
    "factor": 16.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

EXAONE_4_0_32B = {
    "architectures": ["Exaone4ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 361,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "intermediate_size": 27392,
    "layer_types": ["sliding_attention"] * 3 * 16,  # filled in below: "LLLG" x 16
    "max_position_embeddings": 131072,
    "model_type": "exaone4",
    "num_attention_heads": 40,
    "num_hidden_layers": 64,
    "num_key_value_heads": 8,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": dict(_LLAMA3),
    "rope_theta": 1000000,
    "sliding_window": 4096,
    "sliding_window_pattern": "LLLG",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0",
    "use_cache": True,
    "vocab_size": 102400,
}
EXAONE_4_0_32B["layer_types"] = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"] * 16

EXAONE_4_0_1_2B = {
    "architectures": ["Exaone4ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 361,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_types": ["full_attention"] * 30,
    "max_position_embeddings": 65536,
    "model_type": "exaone4",
    "num_attention_heads": 32,
    "num_hidden_layers": 30,
    "num_key_value_heads": 8,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": dict(_LLAMA3),
    "rope_theta": 1000000,
    "sliding_window": None,
    "sliding_window_pattern": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0",
    "use_cache": True,
    "vocab_size": 102400,
}

REAL_CONFIGS = {"32b": EXAONE_4_0_32B, "1.2b": EXAONE_4_0_1_2B}


@pytest.fixture
def real_config():
    """``real_config(name)`` -> a fresh deep copy of the real config.json dict of "32b" or "1.2b"."""
    return lambda name: copy.deepcopy(REAL_CONFIGS[name])
