"""benchmarks/vnni_rate.py builds and runs its probe and reports a rate per CPU (skips without VNNI or cc)."""

import json
import os

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/vnni_rate.py", "bench_vnni_rate")


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
