"""The generation benchmark's round bookkeeping: ratios are paired within rounds, figures are best rounds."""

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/generate.py", "bench_generate")


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


def test_spread_uses_each_rounds_own_bandwidth(bench):
    # Round 2 has twice the bandwidth and twice the speed: the same 50% of its own ceiling both times.
    rounds = [[_run("ours", 1, 5.0, prefill=100)], [_run("ours", 2, 10.0, prefill=300)]]
    for rnd in rounds:
        rnd[0]["decode_bytes_per_token"] = 1e9
    rounds.append([dict(_run("ours", 3, 99.0), error="disturbed: other processes used 1.00 cores")])
    row = {"system": "ours", "batch": 1}
    bench._spread(row, rounds, [{"read_Bps": 10e9}, {"read_Bps": 20e9}, {"read_Bps": 20e9}])
    assert row["decode_of_round_ceiling_rounds"] == pytest.approx([0.5, 0.5])
    assert row["decode_tok_s_median"] == pytest.approx(7.5) and row["prefill_tok_s_median"] == pytest.approx(200)


def test_other_load_subtracts_our_own_cpu(bench, monkeypatch):
    import time

    busy, ours = iter([100.0, 103.0]), iter([10.0, 12.0])  # 3 busy CPU seconds, 2 of them our children's
    monkeypatch.setattr(bench, "_busy_cpu_s", lambda: next(busy))
    monkeypatch.setattr(bench, "_children_cpu_s", lambda: next(ours))
    with bench.OtherLoad() as load:
        time.sleep(1.0)
    assert 0.6 < load.cores < 1.01


def test_other_load_sees_a_process_that_is_not_ours(bench):
    import subprocess
    import sys
    import time

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # not waited for inside the block
    try:
        time.sleep(0.3)
        with bench.OtherLoad() as load:
            time.sleep(1.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert load.cores > 0.2  # it gets at least a share of one of the cores, however loaded the machine is


def test_checkpoint_runs_llamacpp_and_bundles_only(bench, tmp_path, capsys):
    # --checkpoint (a 32B-shaped cut, say) feeds llama.cpp's converter; our rows come as --bundle of it.
    ckpt = tmp_path / "exaone4-32b-shape-4l"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(
        '{"hidden_size": 5120, "vocab_size": 102400, "sliding_window": 4096, "sliding_window_pattern": "LLLG"}'
    )
    args = bench.parse_args(["--checkpoint", str(ckpt), "--systems", "llamacpp-q4_0"])
    assert args.checkpoint == ckpt
    assert bench._shape_name(ckpt) == "exaone4-32b-shape-4l: hidden 5120, vocab 102400, sliding window 4096"
    for bad in (["--systems", "ours"], ["--systems", "llamacpp-f32", "--layers", "2"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--checkpoint", str(ckpt), *bad])
        assert "--checkpoint runs llama.cpp systems" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--checkpoint", str(tmp_path), "--systems", "llamacpp-f32"])
    assert "no config.json" in capsys.readouterr().err
