"""The generation benchmark's round bookkeeping: ratios are paired within rounds, figures are best rounds."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "generate.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_generate", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(system, rnd, decode, prefill=100.0, rss=5, tokens=((1, 2),)):
    return {
        "system": system,
        "batch": 1,
        "round": rnd,
        "load_s": 1.0,
        "ttft_s": 1.0 / prefill,
        "prefill_s": 0.5,
        "decode_s": 1.0 / decode,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "peak_rss": rss,
        "peak_anon": rss,
        "rss_loaded": rss,
        "tokens": [list(t) for t in tokens],
    }


def test_ratios_are_paired_within_rounds(bench):
    # The machine halves its speed in round 2: both systems slow down, the within-round ratio stays 0.9.
    rounds = [[_run("ours", 1, 9.0), _run("genai", 1, 10.0)], [_run("genai", 2, 5.0), _run("ours", 2, 4.5)]]
    assert bench._paired_ratios(rounds, "ours", "genai", 1, "decode_tok_s") == pytest.approx([0.9, 0.9])
    # A round where the peer failed contributes no ratio.
    rounds.append([_run("ours", 3, 9.5), {"system": "genai", "batch": 1, "round": 3, "error": "boom"}])
    assert len(bench._paired_ratios(rounds, "ours", "genai", 1, "decode_tok_s")) == 2


def test_combine_takes_best_speeds_and_worst_memory(bench):
    rounds = [[_run("ours", 1, 8.0, prefill=150, rss=5)], [_run("ours", 2, 9.0, prefill=140, rss=6)]]
    row = bench._combine({"label": "ours"}, 1, rounds)
    assert row["decode_tok_s"] == 9.0 and row["prefill_tok_s"] == 150
    assert row["peak_rss"] == 6 and row["rounds_ok"] == 2 and row["tokens_stable"]
    assert "round" not in row
    rounds[1][0]["tokens"] = [[1, 3]]
    assert not bench._combine({"label": "ours"}, 1, rounds)["tokens_stable"]


def test_combine_reports_errors(bench):
    assert bench._combine({"label": "x", "error": "no build"}, 1, [])["error"] == "no build"
    failed = [[{"system": "ours", "batch": 1, "round": 1, "error": "oom"}]]
    assert bench._combine({"label": "ours"}, 1, failed)["error"] == "oom"
