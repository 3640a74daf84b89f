"""benchmarks/vnni_rate.py builds and runs its probe and reports a rate per CPU (skips without VNNI or cc)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "vnni_rate.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vnni_rate", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reports_a_rate_per_cpu(bench, capsys):
    why = bench._supported()
    if why:
        pytest.skip(why)
    result = bench.main(["--seconds", "0.05", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    cpus = sorted(os.sched_getaffinity(0))
    assert result["cpus"] == cpus
    assert len(result["together_per_cpu_per_s"]) == len(cpus)
    # a 512-bit vpdpbusd per cycle at >= 0.5 GHz: anything slower means the probe measured something else
    assert result["alone_per_s"] > 5e8 and min(result["together_per_cpu_per_s"]) > 5e8
