"""Serving benchmark: aggregate throughput and latency of `exaone-deploy serve` at several concurrencies.

Starts the server on 127.0.0.1 (a subprocess, as in production), then for each concurrency C runs C client
streams that each send requests back to back (greedy, fixed-length random-token prompts, ``ignore_eos`` so
every request generates exactly ``--max-tokens`` tokens) and reports:

* ``tok/s``: completion tokens / wall time of the level (end to end: prefill, queueing and HTTP included),
* ``decode tok/s``: tokens produced by batched decode steps / time spent in those steps (from the server's
  Prometheus counters), i.e. the model's decode throughput at that batch size,
* p50/p99 time to first token and total request latency,
* whether every request's tokens equal those of the same prompt served at a lower concurrency (greedy answers
  must not depend on what else shares the batch; token ids come back through the ``return_token_ids``
  extension),

and the ratios of the throughputs to concurrency 1, all measured in this one run.

Without ``--bundle`` it builds (once, cached under ``--workdir``) a full-size EXAONE-4.0-1.2B-shaped bundle:
random weights from ``make_tiny(..., "1.2b-full")`` exported to an fp32 ONNX Runtime bundle.

    python benchmarks/serve.py                      # 1.2B shape, concurrency 1, 4, 16
    python benchmarks/serve.py --bundle B --concurrency 1,8 --max-tokens 32 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from exaone_deploy.server.launcher import ServerProcess

log = logging.getLogger("benchmarks.serve")


# ---- the bundle -----------------------------------------------------------------------------------

def build_default_bundle(workdir: Path, max_seq_len: int) -> Path:
    """A full-size 1.2B-shaped fp32 ORT bundle with random weights (cached in workdir)."""
    from exaone_deploy.bundle import load_manifest

    bundle = workdir / "exaone-4.0-1.2b-shape-ort-fp32"
    try:
        load_manifest(bundle, verify=False)
        return bundle
    except Exception:  # noqa: BLE001 - not there yet (or broken): rebuild
        pass
    import warnings

    warnings.filterwarnings("ignore")
    from exaone_deploy.exporter.export import ExportOptions, export_bundle
    from exaone_deploy.tiny.make import make_tiny

    ckpt = workdir / "exaone-4.0-1.2b-shape"
    if not (ckpt / "config.json").is_file():
        print(f"writing a random-weight 1.2B-shaped checkpoint to {ckpt} ...", file=sys.stderr)
        make_tiny(ckpt, "1.2b-full", seed=0)
    print(f"exporting {ckpt} -> {bundle} (fp32, max_seq_len {max_seq_len}) ...", file=sys.stderr)
    for name in ("torch", "torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    export_bundle(ckpt, bundle, ExportOptions(target="ort", dtype="float32", max_seq_len=max_seq_len), force=True,
                  progress=False)
    return bundle


# ---- the server -----------------------------------------------------------------------------------

def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for name in ("exaone_decode_step_seconds_sum", "exaone_decode_batch_size_sum", "exaone_decode_batch_size_count"):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


# ---- the clients ----------------------------------------------------------------------------------

async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}
    t0 = time.perf_counter()
    t_first, ids = None, []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            for choice in event.get("choices", ()):
                if choice.get("token_ids"):
                    t_first = t_first or time.perf_counter()
                    ids += choice["token_ids"]
    t1 = time.perf_counter()
    return {"ttft": (t_first or t1) - t0, "latency": t1 - t0, "tokens": len(ids), "token_ids": ids}


async def run_level(url: str, prompts: list[list[int]], concurrency: int, n_requests: int, max_tokens: int):
    todo: asyncio.Queue = asyncio.Queue()
    for i in range(n_requests):
        todo.put_nowait(i)
    results: dict[int, dict] = {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600.0), limits=limits) as client:

        async def worker():
            while True:
                try:
                    i = todo.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results[i] = await one_request(client, prompts[i % len(prompts)], max_tokens)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return [results[i] for i in range(n_requests)], wall


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None, help="An existing bundle (default: build the 1.2B shape).")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/exaone-deploy-bench"))
    ap.add_argument("--concurrency", default="1,4,16", help="Comma-separated client concurrencies.")
    ap.add_argument("--requests", type=int, default=None,
                    help="Requests per level (default: 2 x concurrency, at least 3).")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--context", type=int, default=256, help="Tokens per cache slot on the server.")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores).")
    ap.add_argument("--json", action="store_true", help="Print one JSON object instead of the table.")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.prompt_len + args.max_tokens > args.context:
        ap.error("--prompt-len + --max-tokens must fit --context")

    bundle = args.bundle or build_default_bundle(args.workdir, max_seq_len=max(args.context, 2048))
    from exaone_deploy.bundle import load_manifest

    manifest = load_manifest(bundle, verify=False)
    vocab = manifest.spec.vocab_size
    rng = np.random.default_rng(0)
    n_prompts = max(levels) * 2
    # random ids in the lower half of the vocabulary (plain tokens of the tiny tokenizer and of EXAONE's)
    prompts = [rng.integers(100, min(vocab, 2000), size=args.prompt_len).tolist() for _ in range(n_prompts)]

    env_threads = {"EXAONE_DEPLOY_THREADS": str(args.threads)} if args.threads else {}
    os.environ.update(env_threads)
    server = ServerProcess(bundle, "--no-verify", "--max-batch", str(max(levels)), "--context", str(args.context),
                    "--max-queue", str(4 * max(levels)), "--prefill-chunk", str(max(args.prompt_len, 64)))
    rows, reference = [], {}
    try:
        asyncio.run(run_level(server.url, prompts, 1, 1, 2))  # warm-up (session, allocator)
        for c in levels:
            n = args.requests or max(3, 2 * c)
            before = scrape(server.url)
            results, wall = asyncio.run(run_level(server.url, prompts, c, n, args.max_tokens))
            after = scrape(server.url)
            step_s = after["exaone_decode_step_seconds_sum"] - before["exaone_decode_step_seconds_sum"]
            step_tokens = after["exaone_decode_batch_size_sum"] - before["exaone_decode_batch_size_sum"]
            steps = after["exaone_decode_batch_size_count"] - before["exaone_decode_batch_size_count"]
            same = None
            for i, r in enumerate(results):
                key = i % len(prompts)
                if key not in reference:
                    reference[key] = (c, r["token_ids"])
                elif reference[key][0] != c:
                    same = (same is not False) and r["token_ids"] == reference[key][1]
            tokens = sum(r["tokens"] for r in results)
            rows.append({
                "concurrency": c, "requests": n, "tokens": tokens, "wall_s": wall,
                "tokens_per_s": tokens / wall,
                "decode_tokens_per_s": step_tokens / step_s if step_s else 0.0,
                "mean_decode_batch": step_tokens / steps if steps else 0.0,
                "ttft_p50_s": percentile([r["ttft"] for r in results], 50),
                "ttft_p99_s": percentile([r["ttft"] for r in results], 99),
                "latency_p50_s": percentile([r["latency"] for r in results], 50),
                "latency_p99_s": percentile([r["latency"] for r in results], 99),
                "same_as_lower_concurrency": same,
            })
            print(f"concurrency {c}: {tokens} tokens in {wall:.1f} s", file=sys.stderr)
    finally:
        server.close()

    base = rows[0]
    for r in rows:
        r["tokens_per_s_vs_first"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["decode_tokens_per_s_vs_first"] = (r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                                             if base["decode_tokens_per_s"] else 0.0)
    report = {"bundle": str(bundle), "model": manifest.spec.to_json() if hasattr(manifest.spec, "to_json") else None,
              "dtype": manifest.dtype, "max_tokens": args.max_tokens, "prompt_len": args.prompt_len,
              "context": args.context, "cpu_count": os.cpu_count(), "levels": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    s = manifest.spec
    print(f"bundle {bundle} ({manifest.dtype}; {s.num_layers} layers, hidden {s.hidden_size}, vocab {s.vocab_size}); "
          f"prompt {args.prompt_len} tokens, {args.max_tokens} new tokens per request, {os.cpu_count()} CPUs")
    head = (f"{'conc':>4} {'reqs':>4} {'tok/s':>7} {'x':>5} {'decode tok/s':>12} {'x':>5} {'batch':>5} "
            f"{'ttft p50':>8} {'ttft p99':>8} {'lat p50':>8} {'lat p99':>8} {'same':>4}")
    print(head)
    print("-" * len(head))
    for r in rows:
        same = "-" if r["same_as_lower_concurrency"] is None else "yes" if r["same_as_lower_concurrency"] else "NO"
        print(f"{r['concurrency']:>4} {r['requests']:>4} {r['tokens_per_s']:>7.2f} {r['tokens_per_s_vs_first']:>5.2f} "
              f"{r['decode_tokens_per_s']:>12.2f} {r['decode_tokens_per_s_vs_first']:>5.2f} "
              f"{r['mean_decode_batch']:>5.1f} {r['ttft_p50_s']:>7.2f}s {r['ttft_p99_s']:>7.2f}s "
              f"{r['latency_p50_s']:>7.2f}s {r['latency_p99_s']:>7.2f}s {same:>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
