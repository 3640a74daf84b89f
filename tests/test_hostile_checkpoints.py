"""A checkpoint is data: hostile config.json values and safetensors files are refused with one clear line.

Each case is generated here (a corpus of hostile checkpoints), and each must end in a ConfigError or
CheckpointError naming the file and the problem, quickly and without allocating from the hostile value.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from exaone_deploy.checkpoint import Checkpoint, CheckpointError
from exaone_deploy.spec import ConfigError, load_spec


def _spec_error(tmp_path, cfg) -> ConfigError:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as info:
        load_spec(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)
    return info.value


HOSTILE_CONFIGS = [
    # (field to set, value, field the error must name)
    ("num_hidden_layers", 10**9, "num_hidden_layers"),  # used to hang `inspect` with a layer pattern
    ("vocab_size", 2**40, "vocab_size"),
    ("hidden_size", 2**31, "hidden_size"),
    ("max_position_embeddings", 0, "max_position_embeddings"),
    ("max_position_embeddings", -5, "max_position_embeddings"),
    ("max_position_embeddings", "131072", "max_position_embeddings"),
    ("max_position_embeddings", 2**40, "max_position_embeddings"),
    ("sliding_window", 2**40, "sliding_window"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps"),
    ("rms_norm_eps", float("inf"), "rms_norm_eps"),
    ("rms_norm_eps", 0.0, "rms_norm_eps"),
    ("tie_word_embeddings", "false", "tie_word_embeddings"),
    ("tie_word_embeddings", 1, "tie_word_embeddings"),
    ("bos_token_id", -1, "bos_token_id"),
    ("bos_token_id", True, "bos_token_id"),
    ("eos_token_id", [361, 10**9], "eos_token_id"),
    ("eos_token_id", "361", "eos_token_id"),
    ("pad_token_id", 1.5, "pad_token_id"),
]


@pytest.mark.parametrize("field,value,named", HOSTILE_CONFIGS, ids=[f"{f}={v!r}"[:40] for f, v, _ in HOSTILE_CONFIGS])
def test_hostile_config_values(tmp_path, real_config, field, value, named):
    cfg = real_config("32b")
    cfg[field] = value
    start = time.perf_counter()
    err = _spec_error(tmp_path, cfg)
    assert err.field == named, str(err)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "key,value",
    [
        ("rope_theta", float("nan")),
        ("factor", float("inf")),
        ("original_max_position_embeddings", 2**40),
        ("low_freq_factor", "1"),
    ],
)
def test_hostile_rope_parameters(tmp_path, real_config, key, value):
    cfg = real_config("32b")  # llama3 rope_scaling with rope_theta at the top level (transformers 4.x spelling)
    (cfg if key == "rope_theta" else cfg["rope_scaling"])[key] = value
    err = _spec_error(tmp_path, cfg)
    assert key in err.field, str(err)


def test_inspect_of_huge_layer_count_is_one_line_and_fast(tmp_path, real_config):
    cfg = real_config("32b")
    cfg["num_hidden_layers"] = 10**9
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    start = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "exaone_deploy", "inspect", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "num_hidden_layers" in r.stderr
    assert time.perf_counter() - start < 30


# ---- safetensors -----------------------------------------------------------------------------------------


def _raw_safetensors(path, entries: dict, data: bytes) -> None:
    header = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_overlapping_tensors_refused(tmp_path):
    data = np.arange(8, dtype=np.float32).tobytes()
    _raw_safetensors(
        tmp_path / "model.safetensors",
        {
            "a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
        },
        data,
    )
    with pytest.raises(CheckpointError, match="overlaps"):
        Checkpoint(tmp_path)


def test_gap_between_tensors_refused(tmp_path):
    data = np.arange(12, dtype=np.float32).tobytes()
    _raw_safetensors(
        tmp_path / "model.safetensors",
        {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]},
        },
        data,
    )
    with pytest.raises(CheckpointError, match="gap"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize(
    "dtype,code,bad",
    [
        (np.float32, "F32", np.nan),
        (np.float16, "F16", np.inf),
        (np.uint16, "BF16", 0x7FC0),
        (np.uint16, "BF16", 0xFF80),
    ],
)
def test_non_finite_weights_named(tmp_path, dtype, code, bad):
    arr = np.ones(16, dtype=dtype) if code != "BF16" else np.full(16, 0x3F80, dtype=np.uint16)
    arr[5] = bad
    _raw_safetensors(
        tmp_path / "model.safetensors",
        {"model.norm.weight": {"dtype": code, "shape": [16], "data_offsets": [0, arr.nbytes]}},
        arr.tobytes(),
    )
    ckpt = Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*NaN or infinite"):
        ckpt.read_numpy("model.norm.weight")
    import torch

    for target in (None, torch.float32):
        with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*NaN or infinite"):
            ckpt.read_torch("model.norm.weight", target)


def test_finite_weights_still_load(tmp_path):
    arr = np.linspace(-3, 3, 16, dtype=np.float32)
    _raw_safetensors(
        tmp_path / "model.safetensors",
        {"w": {"dtype": "F32", "shape": [16], "data_offsets": [0, arr.nbytes]}},
        arr.tobytes(),
    )
    np.testing.assert_array_equal(Checkpoint(tmp_path).read_numpy("w"), arr)
