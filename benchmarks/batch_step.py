"""Batched decode steps in process: how a step's time grows with the batch (the server's continuous batching).

    python benchmarks/batch_step.py int4=BUNDLE_INT4 "int4-ortattn=BUNDLE_INT4@ops=linear" fp32=BUNDLE_FP32 \\
        --batch 1,4,16 --past 96 --rounds 3

Each ``LABEL=BUNDLE[@kernels=auto|on|off][@ops=linear,attention]`` is one ``OrtBackend`` (``--threads``), loaded
once: ``kernels`` as ``EXAONE_DEPLOY_KERNELS`` (our kernels or onnxruntime's), ``ops`` as
``EXAONE_DEPLOY_KERNEL_OPS`` (which of our op families: ``linear`` = QMatMul/FMatMul, ``attention`` = our
GroupQueryAttention). Every row of the batch holds ``--past`` tokens (a prompt prefilled once per slot; the step
then re-decodes at that depth, so every round measures the same step), and a round runs ``--steps`` steps per
(session, batch) in turn, so a drift of the machine hits all alike. Reported: the median step time, tokens per
second (batch / step), and the scaling ``batch x step(1) / step(batch)``: the aggregate decode throughput at that
batch over batch 1's, as the median of per-round ratios (issue 17's bar is 8x at 16). The process re-executes
itself with glibc's huge-page tunable, as the ``exaone-deploy`` verbs do (runtime/hugepages.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import add_json_flag, emit, print_table  # noqa: E402


def _spec(text: str) -> tuple[str, str, dict[str, str]]:
    label, sep, rest = text.partition("=")
    if not sep or not rest:
        raise argparse.ArgumentTypeError(f"expected LABEL=BUNDLE[@KEY=VALUE...], got {text!r}")
    path, *entries = rest.split("@")
    if not (Path(path) / "manifest.json").is_file():
        raise argparse.ArgumentTypeError(f"{path}: not a bundle (no manifest.json)")
    opts = dict(e.partition("=")[::2] for e in entries)
    unknown = set(opts) - {"kernels", "ops"}
    if unknown:
        raise argparse.ArgumentTypeError(f"{text}: unknown option(s) {', '.join(sorted(unknown))} (kernels, ops)")
    return label, path, opts


def _backend(path: str, opts: dict[str, str], batch: int, context: int, threads: int):
    from exaone_deploy.runtime.ort_backend import OrtBackend

    old = os.environ.get("EXAONE_DEPLOY_KERNEL_OPS")
    if "ops" in opts:
        os.environ["EXAONE_DEPLOY_KERNEL_OPS"] = opts["ops"]
    try:
        return OrtBackend(path, max_batch=batch, max_seq_len=context, threads=threads, kernels=opts.get("kernels"))
    finally:
        if old is None:
            os.environ.pop("EXAONE_DEPLOY_KERNEL_OPS", None)
        else:
            os.environ["EXAONE_DEPLOY_KERNEL_OPS"] = old


def main(argv=None) -> dict:
    if argv is None:  # weights and caches in 2 MiB pages, as `exaone-deploy serve` runs them
        from exaone_deploy.runtime.hugepages import reexec

        reexec([sys.executable, *sys.argv])
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("models", nargs="+", type=_spec, metavar="LABEL=BUNDLE[@KEY=VALUE...]")
    ap.add_argument("--batch", default="1,16", help="comma-separated batch sizes (the first is the reference)")
    ap.add_argument("--past", type=int, default=96, help="tokens each row holds before the step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="steps per (session, batch) per round")
    add_json_flag(ap)
    args = ap.parse_args(argv)
    batches = [int(x) for x in args.batch.split(",")]
    top, context = max(batches), args.past + 32
    rng = np.random.default_rng(0)
    backends = {}
    for label, path, opts in args.models:
        t0 = time.perf_counter()
        be = backends[label] = _backend(path, opts, top, context, args.threads)
        for slot in range(top):
            be.prefill([slot], [[int(x) for x in rng.integers(10, 1000, args.past)]])
        print(
            f"{label}: loaded and prefilled in {time.perf_counter() - t0:.1f} s (kernels {be.kernels})", file=sys.stderr
        )
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for b in batches:
            for label, be in backends.items():
                slots = list(range(b))
                be.lengths[:top] = args.past
                be.decode(slots, [5] * b)  # warm: the (rows) binding is made once
                t = time.perf_counter()
                for _ in range(args.steps):
                    be.lengths[:top] = args.past
                    be.decode(slots, [5] * b)
                times.setdefault((label, b), []).append((time.perf_counter() - t) / args.steps * 1e3)
    ref = batches[0]
    rows, result = [], {"past": args.past, "threads": args.threads, "rounds": args.rounds, "runs": []}
    for label in backends:
        for b in batches:
            ms = times[(label, b)]
            scale = [b * r / m for r, m in zip(times[(label, ref)], ms)]
            result["runs"].append({"label": label, "batch": b, "step_ms": ms, "scaling": scale})
            rows.append(
                {
                    "session": label,
                    "batch": b,
                    "step": f"{np.median(ms):.1f} ({min(ms):.1f}-{max(ms):.1f})",
                    "tok/s": f"{b / np.median(ms) * 1e3:.1f}",
                    "scaling": f"{np.median(scale):.2f}x ({min(scale):.2f}-{max(scale):.2f})",
                }
            )
    cols = ["session", "batch", ("step", "step ms"), "tok/s", ("scaling", f"x batch {ref}")]
    emit(result, args.json, lambda: print_table(rows, cols, title=f"decode step at depth {args.past}"))
    return result


if __name__ == "__main__":
    main()
