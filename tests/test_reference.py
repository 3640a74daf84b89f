"""The PyTorch reference model against transformers' Exaone4ForCausalLM, and the attention op against opref.

Same weights (make_tiny, both presets), fp32, eager and sdpa attention. Prompts are longer than the 32b
preset's window (8) so that sliding-window masking, NoPE global layers and llama3 RoPE are all exercised;
a sensitivity test shows that each of those mistakes would fail the parity bound by a wide margin.
"""

from __future__ import annotations

import dataclasses
import inspect
import zlib

import numpy as np
import pytest
import torch

from exaone_deploy import opref
from exaone_deploy.exporter import ops  # noqa: F401  (registers torch.ops.exaone_deploy.attention)
from exaone_deploy.exporter.reference import load_reference

transformers = pytest.importorskip("transformers")

PRESETS = ["1.2b", "32b"]
ATTN = ["eager", "sdpa"]
TOL = 1e-4  # logits max abs difference (the bound)
PROMPT = 45  # > 5x the 32b preset's window of 8


def _tokens(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 500, (batch, n), generator=g)


def _diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _hf_step(model, ids, cache=None):
    """One forward of transformers' model with its own cache; returns (logits, cache)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(ids, use_cache=True, **{name: cache})
    return out.logits, out[name]


def _hf_logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


# ---- full-sequence parity -------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("preset", PRESETS)
def test_logits_match_transformers(tiny_dirs, oracle, ours, preset, attn):
    hf, model = oracle(tiny_dirs[preset], attn), ours(tiny_dirs[preset])
    ids = _tokens(PROMPT, seed=1, batch=2)
    expected = _hf_logits(hf, ids)
    logits, caches = model.step(ids, [0, 0], model.empty_cache(2, PROMPT))
    assert logits.shape == expected.shape == (2, PROMPT, model.spec.vocab_size)
    assert logits.dtype == torch.float32
    assert _diff(logits, expected) <= TOL
    # The logits are not trivially small: the bound is meaningful.
    assert expected.abs().max() > 0.1 and expected.std() > 0.01
    # last-token logits only (logits_index of the prompt's last position)
    last, _ = model.step(ids, [0, 0], model.empty_cache(2, PROMPT), all_logits=False)
    assert last.shape == (2, 1, model.spec.vocab_size)
    assert _diff(last[:, 0], expected[:, -1]) <= TOL


def _variant(model_dir, change):
    """Our model with the per-layer plan changed by ``change(LayerSpec) -> LayerSpec``."""
    model = load_reference(model_dir, "float32", max_positions=512)
    for layer in model.model.layers:
        layer.self_attn.layer = change(layer.self_attn.layer)
    return model


@pytest.mark.parametrize(
    "preset,mistake",
    [
        ("32b", "rope on global layers"),
        ("32b", "window + 1"),
        ("32b", "window - 1"),
        ("32b", "no window"),
        ("1.2b", "no rope"),
    ],
)
def test_parity_detects_plan_mistakes(tiny_dirs, oracle, preset, mistake):
    change = {
        "rope on global layers": lambda s: dataclasses.replace(s, rope=True),
        "window + 1": lambda s: dataclasses.replace(s, window=s.window + 1) if s.sliding else s,
        "window - 1": lambda s: dataclasses.replace(s, window=s.window - 1) if s.sliding else s,
        "no window": lambda s: dataclasses.replace(s, window=0),
        "no rope": lambda s: dataclasses.replace(s, rope=False),
    }[mistake]
    model = _variant(tiny_dirs[preset], change)
    ids = _tokens(PROMPT, seed=1)
    logits, _ = model.step(ids, [0], model.empty_cache(1, PROMPT))
    assert _diff(logits, _hf_logits(oracle(tiny_dirs[preset]), ids)) > 20 * TOL


# ---- explicit KV cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_decode_steps_match_recompute_and_transformers_cache(tiny_dirs, oracle, ours, preset):
    model, hf = ours(tiny_dirs[preset]), oracle(tiny_dirs[preset], "sdpa")
    prompt, steps = 40, 32
    seq = _tokens(prompt + steps, seed=2)
    full, _ = model.step(seq, [0], model.empty_cache(1, prompt + steps))

    caches = model.empty_cache(1, prompt + steps)
    logits, caches = model.step(seq[:, :prompt], [0], caches, all_logits=False)
    hf_logits, hf_cache = _hf_step(hf, seq[:, :prompt])
    assert _diff(logits[:, 0], full[:, prompt - 1]) <= TOL
    assert _diff(logits[:, 0], hf_logits[:, -1]) <= TOL
    worst_recompute = worst_hf = 0.0
    for t in range(prompt, prompt + steps):
        logits, caches = model.step(seq[:, t : t + 1], [t], caches)
        hf_logits, hf_cache = _hf_step(hf, seq[:, t : t + 1], hf_cache)
        worst_recompute = max(worst_recompute, _diff(logits[:, 0], full[:, t]))
        worst_hf = max(worst_hf, _diff(logits[:, 0], hf_logits[:, -1]))
    assert worst_recompute <= TOL and worst_hf <= TOL
    assert _diff(full, _hf_logits(hf, seq)) <= TOL
    # The caches hold exactly the sequence's keys/values: a fresh prefill of everything gives the same.
    _, again = model.step(seq, [0], model.empty_cache(1, prompt + steps))
    for a, b in zip(caches, again):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [7, 3])
@pytest.mark.parametrize("preset", PRESETS)
def test_chunked_prefill_equals_one_shot(tiny_dirs, ours, preset, chunk):
    model = ours(tiny_dirs[preset])
    ids = _tokens(PROMPT, seed=3)
    one_shot, one_caches = model.step(ids, [0], model.empty_cache(1, PROMPT))
    caches, parts = model.empty_cache(1, PROMPT), []
    for start in range(0, PROMPT, chunk):
        logits, caches = model.step(ids[:, start : start + chunk], [start], caches)
        parts.append(logits)
    assert _diff(torch.cat(parts, dim=1), one_shot) <= TOL
    for a, b in zip(caches, one_caches):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
def test_left_padded_batch_equals_each_prompt_alone(tiny_dirs, oracle, ours, preset):
    model, hf = ours(tiny_dirs[preset]), oracle(tiny_dirs[preset], "eager")
    lengths, S, steps = [45, 30, 12], 45, 6
    seqs = [_tokens(n + steps, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(3, S, dtype=torch.long)
    mask = torch.zeros(3, S, dtype=torch.long)
    for b, (n, s) in enumerate(zip(lengths, seqs)):
        ids[b, S - n :], mask[b, S - n :] = s[:n], 1
    logits, caches, got_lengths = model.forward_padded(ids, mask, capacity=S + steps)
    assert got_lengths.tolist() == lengths
    # transformers on the same left-padded batch (positions restarting at each row's first real token)
    hf_batch = _hf_logits(hf, ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    for b, (n, s) in enumerate(zip(lengths, seqs)):
        alone, _ = model.step(s[None, :n], [0], model.empty_cache(1, n))
        assert _diff(logits[b, S - n :], alone[0]) <= TOL
        assert _diff(logits[b, S - n :], _hf_logits(hf, s[None, :n])[0]) <= TOL
        assert _diff(logits[b, S - n :], hf_batch[b, S - n :]) <= TOL
        assert not logits[b, : S - n].any()  # padded positions give zeros
    # Decoding continues from the batch's caches, each row at its own length.
    for t in range(steps):
        step_ids = torch.stack([s[n + t] for n, s in zip(lengths, seqs)])[:, None]
        out, caches = model.step(step_ids, [n + t for n in lengths], caches)
        for b, (n, s) in enumerate(zip(lengths, seqs)):
            full = _hf_logits(hf, s[None, : n + t + 1])
            assert _diff(out[b, 0], full[0, -1]) <= TOL, (b, t)


def test_position_beyond_rope_table_is_an_error(tiny_dirs):
    model = load_reference(tiny_dirs["1.2b"], "float32", max_positions=16)
    with pytest.raises((IndexError, RuntimeError, ValueError)):
        model.step(_tokens(20, seed=4), [0], model.empty_cache(1, 20))


# ---- the custom op against the NumPy reference -----------------------------------------------------------

H, C = 16, 24


def _op_inputs(mode: str, N: int, Nkv: int, rng: np.random.Generator):
    B = 3
    if mode == "prompt":  # right-padded prompts, rows of 10, 7 and 1 tokens
        S, past = 10, np.array([0, 0, 0])
        seqlens = np.array([9, 6, 0], dtype=np.int32)
    else:  # all S tokens real; rows already hold 5, 12 (> window) and 0 tokens
        S = {"continuation": 3, "decode": 1}[mode]
        past = np.array([5, 12, 0])
        seqlens = (past + S - 1).astype(np.int32)
    total = S if mode == "prompt" else int(seqlens.max()) + 1
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q, k, v = f(B, S, N * H), f(B, S, Nkv * H), f(B, S, Nkv * H)
    # Past buffers: real keys/values in the first past[b] slots, garbage beyond (must not be read).
    pk, pv = 100 * f(B, Nkv, C, H), 100 * f(B, Nkv, C, H)
    for b in range(B):
        pk[b, :, : past[b]] = f(Nkv, past[b], H)
        pv[b, :, : past[b]] = f(Nkv, past[b], H)
    cos, sin = opref.rope_cache(opref.llama3_inv_freq(H, 1e4, 8.0, 1.0, 4.0, 16), 64)
    return q, k, v, pk, pv, seqlens, total, cos, sin


@pytest.mark.parametrize("mode", ["prompt", "continuation", "decode"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (4, 1)], ids=["mha", "gqa4", "mqa"])
@pytest.mark.parametrize("rotary", [0, 1])
@pytest.mark.parametrize("window", [0, 5])
def test_op_matches_opref(mode, heads, rotary, window):
    N, Nkv = heads
    rng = np.random.default_rng(zlib.crc32(repr((mode, heads, rotary, window)).encode()))
    q, k, v, pk, pv, seqlens, total, cos, sin = _op_inputs(mode, N, Nkv, rng)
    expected = opref.attention_ref(
        q,
        k,
        v,
        pk,
        pv,
        seqlens,
        total,
        cos if rotary else None,
        sin if rotary else None,
        num_heads=N,
        kv_num_heads=Nkv,
        window=window,
        rotary=rotary,
        ring=0,
    )
    t = torch.from_numpy
    got = torch.ops.exaone_deploy.attention(
        t(q),
        t(k),
        t(v),
        t(pk),
        t(pv),
        t(seqlens),
        torch.tensor(total, dtype=torch.int32),
        t(cos) if rotary else None,
        t(sin) if rotary else None,
        N,
        Nkv,
        0.0,
        window,
        rotary,
        0,
    )
    out, present_k, present_v = (x.numpy() for x in got)
    np.testing.assert_allclose(out, expected[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(present_k, expected[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(present_v, expected[2], rtol=0, atol=1e-6)
    if mode == "prompt":  # padded query rows give zeros
        assert not out[1, 7:].any() and not out[2, 1:].any()
    # The inputs are not modified (presents are copies).
    assert np.array_equal(t(pk).numpy(), pk)


def test_op_explicit_scale():
    rng = np.random.default_rng(0)
    q, k, v, pk, pv, seqlens, total, cos, sin = _op_inputs("continuation", 8, 2, rng)
    expected = opref.attention_ref(q, k, v, pk, pv, seqlens, total, num_heads=8, kv_num_heads=2, scale=0.1, window=5)
    t = torch.from_numpy
    out, _, _ = torch.ops.exaone_deploy.attention(
        t(q),
        t(k),
        t(v),
        t(pk),
        t(pv),
        t(seqlens),
        torch.tensor(total, dtype=torch.int32),
        None,
        None,
        8,
        2,
        0.1,
        5,
        0,
        0,
    )
    np.testing.assert_allclose(out.numpy(), expected[0], rtol=0, atol=1e-5)


def test_op_rejects_overflowing_cache():
    rng = np.random.default_rng(0)
    q, k, v, pk, pv, seqlens, total, _, _ = _op_inputs("continuation", 4, 2, rng)
    seqlens = seqlens.copy()
    seqlens[0] = C  # C + 1 tokens in a cache of C slots
    t = torch.from_numpy
    with pytest.raises(ValueError, match="inconsistent"):
        torch.ops.exaone_deploy.attention(
            t(q),
            t(k),
            t(v),
            t(pk),
            t(pv),
            t(seqlens),
            torch.tensor(C + 1, dtype=torch.int32),
            None,
            None,
            4,
            2,
            0.0,
            0,
            0,
            0,
        )
    with pytest.raises(ValueError):
        opref.attention_ref(q, k, v, pk, pv, seqlens, C + 1, num_heads=4, kv_num_heads=2)
