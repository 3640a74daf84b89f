"""The machine's int8 dot-product rate: ``vpdpbusd`` per second on one CPU alone, then on every CPU at once.

    python benchmarks/vnni_rate.py [--seconds 1.0] [--json]

Why: the int4 linears of a batched decode step are bound by this rate, not by memory (docs/scale.md, stop 26), and
on a shared or virtual machine the rate of a CPU can drop when its neighbours run the same instructions (power,
or vCPUs that share a physical core). Batch-16 over batch-1 decode throughput (issue 17's 8x bar) is a ratio of
this rate to the memory bandwidth, so it is worth knowing both before reading that ratio.

The loop is register-only (12 independent accumulator chains, no loads), so it measures issue rate, not memory.
It is compiled with the system C compiler (``$CC``, else ``cc``) into a temporary directory and run pinned to one
CPU (``taskset``-style, via ``os.sched_setaffinity`` in the child), first alone, then one copy per CPU together.
Also run: the same copy alone while every other CPU runs a scalar integer loop, which tells apart a shared-core or
frequency effect of vector work (the rate drops only under vector neighbours) from a generally busy host.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import add_json_flag, emit, print_table  # noqa: E402

_SOURCE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
__attribute__((target("avx512f,avx512vnni"))) static double vnni(double seconds) {
    __m512i a[12];
    for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_epi32(i);
    __m512i w = _mm512_set1_epi32(3), x = _mm512_set1_epi32(5);
    long n = 0;
    const double t0 = now();
    double t = t0;
    while (t - t0 < seconds) {
        for (long i = 0; i < 1000000; ++i) {
#pragma GCC unroll 12
            for (int j = 0; j < 12; ++j) a[j] = _mm512_dpbusd_epi32(a[j], w, x);
            __asm__ volatile("" : "+v"(w));
        }
        n += 12000000;
        t = now();
    }
    __m512i s = a[0];
    for (int i = 1; i < 12; ++i) s = _mm512_add_epi32(s, a[i]);
    if (_mm512_reduce_add_epi32(s) == 42) puts("");
    return n / (t - t0);
}
static void scalar(double seconds) {
    volatile unsigned long x = 0;
    const double t0 = now();
    while (now() - t0 < seconds)
        for (unsigned long i = 0; i < 10000000; ++i) x += i * 7;
}
int main(int argc, char **argv) {
    const double seconds = atof(argv[2]);
    if (argv[1][0] == 's') scalar(seconds);
    else printf("%.6e\n", vnni(seconds));
    return 0;
}
"""


def _compiler() -> str | None:
    """The C compiler, looked up as runtime/kernels builds its own: ``$CC``, else cc, gcc, clang."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _supported() -> str | None:
    """Why this machine cannot run the probe, or None."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no /proc/cpuinfo (Linux x86-64 only)"
    if " avx512_vnni" not in flags:
        return "this CPU has no AVX-512 VNNI"
    if not _compiler():
        return "no C compiler (set CC, or install gcc)"
    return None


def _pinned(binary: Path, mode: str, cpu: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        [str(binary), mode, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="length of each measurement")
    add_json_flag(ap)
    args = ap.parse_args(argv)
    why = _supported()
    if why:
        sys.exit(f"vnni_rate: {why}")
    cpus = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        src, binary = Path(tmp) / "vnni.c", Path(tmp) / "vnni"
        src.write_text(_SOURCE)
        subprocess.run([_compiler(), "-O2", "-o", str(binary), str(src)], check=True)

        def run(modes: dict[int, str]) -> list[float]:
            procs = {cpu: _pinned(binary, mode, cpu, args.seconds) for cpu, mode in modes.items()}
            out = {cpu: p.communicate()[0] for cpu, p in procs.items()}
            return [float(out[cpu]) for cpu, mode in modes.items() if mode == "v"]

        alone = run({cpus[0]: "v"})[0]
        others_scalar = run({cpu: ("v" if cpu == cpus[0] else "s") for cpu in cpus})[0] if len(cpus) > 1 else alone
        together = run({cpu: "v" for cpu in cpus})
    result = {
        "cpus": cpus,
        "alone_per_s": alone,
        "alone_beside_scalar_per_s": others_scalar,
        "together_per_cpu_per_s": together,
        "together_total_per_s": sum(together),
        "together_over_alone": sum(together) / len(together) / alone,
    }
    rows = [
        {"case": "one CPU, the others idle", "rate": f"{alone / 1e9:.2f}"},
        {"case": "one CPU, the others in a scalar loop", "rate": f"{others_scalar / 1e9:.2f}"},
        {
            "case": f"every CPU at once ({len(cpus)}), per CPU",
            "rate": f"{sum(together) / len(together) / 1e9:.2f} ({result['together_over_alone']:.0%} of alone)",
        },
        {"case": f"every CPU at once ({len(cpus)}), total", "rate": f"{sum(together) / 1e9:.2f}"},
    ]
    emit(result, args.json, lambda: print_table(rows, ["case", ("rate", "G vpdpbusd/s")], title="int8 dot rate"))
    return result


if __name__ == "__main__":
    main()
