"""GraphIO: the graph I/O contract derived from the spec (names, cache lengths, step inputs, profile shapes)."""

from __future__ import annotations

import numpy as np
import pytest

from exaone_deploy.graph_io import DEFAULT_CONTEXT, STEP_INPUTS, GraphIO
from exaone_deploy.spec import spec_from_config


@pytest.fixture
def specs(real_config):
    return {name: spec_from_config(real_config(name)) for name in ("32b", "1.2b")}


def test_names_round_trip(specs):
    io = GraphIO(specs["32b"])
    pairs = list(io.cache_pairs())
    assert len(pairs) == 2 * 64 and pairs[:2] == [
        (0, "key", "past_key_values.0.key", "present.0.key"),
        (0, "value", "past_key_values.0.value", "present.0.value"),
    ]
    for layer, _kv, past, present in pairs:
        assert io.cache_layer(past) == io.cache_layer(present) == layer
        assert io.present_of(past) == present and io.is_cache(past) and io.is_cache(present)
    assert io.input_names == [*STEP_INPUTS, *(p for _, _, p, _ in pairs)]
    assert io.output_names == ["logits", *(q for _, _, _, q in pairs)]
    for other in (
        "input_ids",
        "logits",
        "past_key_values.x.key",
        "present.0.query",
        "past_key_values.0",
        "present.1.key.extra",
        "past_key_values_0_key",
    ):
        assert io.cache_layer(other) is None and not io.is_cache(other)
    assert io.present_of("logits") is None and io.present_of("present.0.key") is None


def test_cache_lengths_of_a_hybrid_spec(specs):
    spec = specs["32b"]  # LLLG x 16, window 4096
    windowed = GraphIO(spec, max_seq_len=32768, window_cache=True)
    assert windowed.cache_lengths == [4096, 4096, 4096, "cache_len"] * 16
    assert windowed.cache_lengths_at(8192)[:4] == [4096, 4096, 4096, 8192]
    assert windowed.cache_shape(1, 3, 8192) == (3, 8, 4096, 128) and windowed.cache_shape(3, 3, 8192) == (
        3,
        8,
        8192,
        128,
    )
    shapes = windowed.cache_shapes(2, 10000)
    assert len(shapes) == 128 and shapes[0] == shapes[1] == (2, 8, 4096, 128) and shapes[7] == (2, 8, 10000, 128)
    full = GraphIO(spec, max_seq_len=32768)
    assert full.cache_lengths == ["cache_len"] * 64
    assert {full.cache_shape(i, 1, 500) for i in range(64)} == {(1, 8, 500, 128)}
    assert GraphIO(specs["1.2b"], window_cache=True).cache_lengths == ["cache_len"] * 30  # no sliding layers
    views = list(windowed.cache_views(2, 9000))
    assert [v[0] for v in views] == list(range(128))
    assert views[6] == (6, "past_key_values.3.key", "present.3.key", (2, 8, 9000, 128))
    assert views[5][3] == (2, 8, 4096, 128)
    io_cache = windowed.manifest_io()["cache"]
    assert io_cache["per_layer_len"] == windowed.cache_lengths and io_cache["window_cache"] is True


def test_default_context(specs):
    assert GraphIO(specs["1.2b"], max_seq_len=65536).default_context() == DEFAULT_CONTEXT == 4096
    assert GraphIO(specs["1.2b"], max_seq_len=1024).default_context() == 1024
    assert GraphIO(specs["1.2b"], max_seq_len=1024).default_context(300) == 300


def test_prefill_inputs_equal_the_backends_hand_built_ones():
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4, 8]]
    inputs, lens = GraphIO.prefill_inputs(prompts)
    # What OrtBackend._prefill_rows / TrtBackend / calibration built by hand before GraphIO:
    ids = np.array([[5, 6, 7, 0, 0], [9, 0, 0, 0, 0], [1, 2, 3, 4, 8]], dtype=np.int64)
    want = {
        "input_ids": ids,
        "seqlens_k": np.array([2, 0, 4], np.int32),
        "total_sequence_length": np.array(5, np.int32),
        "logits_index": np.array([[2], [0], [4]], np.int64),
    }
    assert list(inputs) == list(STEP_INPUTS)
    for name, arr in want.items():
        assert inputs[name].dtype == arr.dtype and inputs[name].shape == arr.shape, name
        np.testing.assert_array_equal(inputs[name], arr)
    np.testing.assert_array_equal(lens, [3, 1, 5])
    # Equal-length rows (calibration samples as an (n, L) array) need no padding.
    calib, _ = GraphIO.prefill_inputs(np.arange(8).reshape(2, 4))
    np.testing.assert_array_equal(calib["seqlens_k"], np.full(2, 3, np.int32))
    np.testing.assert_array_equal(calib["logits_index"], np.full((2, 1), 3, np.int64))


@pytest.mark.parametrize("all_logits", [False, True])
def test_extend_inputs_equal_the_backends_hand_built_ones(all_logits):
    past, tokens = 10, [4, 5, 6]
    got = GraphIO.extend_inputs(past, tokens, all_logits)
    want = {
        "input_ids": np.array([[4, 5, 6]], np.int64),
        "seqlens_k": np.array([12], np.int32),
        "total_sequence_length": np.array(13, np.int32),
        "logits_index": np.array([[0, 1, 2]] if all_logits else [[2]], np.int64),
    }
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
        np.testing.assert_array_equal(got[name], arr)


def test_decode_inputs_filled_in_place():
    inputs = GraphIO.decode_inputs(3)
    buffers = {name: arr.ctypes.data for name, arr in inputs.items()}
    GraphIO.fill_decode(inputs, np.array([7, 0, 9]), np.array([4, 2, 11]))
    assert {name: arr.ctypes.data for name, arr in inputs.items()} == buffers  # no new arrays
    np.testing.assert_array_equal(inputs["input_ids"], [[7], [0], [9]])
    np.testing.assert_array_equal(inputs["seqlens_k"], [4, 2, 11])
    assert inputs["seqlens_k"].dtype == np.int32 and int(inputs["total_sequence_length"]) == 12
    np.testing.assert_array_equal(inputs["logits_index"], np.zeros((3, 1)))


def test_profile_shapes(specs):
    spec = specs["1.2b"]
    prefill, decode = GraphIO(spec).profile_shapes(4, 48)
    assert prefill["past_key_values.0.key"] == ((1, 8, 1, 64), (1, 8, 48, 64), (4, 8, 48, 64))
    assert decode["input_ids"] == ((1, 1), (4, 1), (4, 1)) and "total_sequence_length" not in decode
    prefill, decode = GraphIO(spec).profile_shapes(2, 100, prefill_opt_len=32)
    assert prefill["input_ids"] == ((1, 1), (1, 32), (2, 100)) and decode["seqlens_k"] == ((1,), (2,), (2,))
    # A window-sized cache is fixed at its window in every profile.
    prefill, decode = GraphIO(specs["32b"], window_cache=True).profile_shapes(2, 8192)
    assert decode["past_key_values.0.key"] == ((1, 8, 4096, 128), (2, 8, 4096, 128), (2, 8, 4096, 128))
    assert prefill["past_key_values.3.value"] == ((1, 8, 1, 128), (1, 8, 8192, 128), (2, 8, 8192, 128))
