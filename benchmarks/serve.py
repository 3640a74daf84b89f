"""Serving benchmark: ours vs llama.cpp's server at several concurrencies, multi-turn prefix reuse, Ray replicas.

One run measures, on the same model (a 1.2B-shaped random-weight checkpoint from ``make_tiny(..., "1.2b-full")``,
``--layers`` of its 30 layers to fit a small machine), each of these *targets*:

* ``ours-fp32`` / ``ours-int4``: ``exaone-deploy serve`` (a subprocess, as in production) on an fp32 bundle and
  its int4-rtn quantization,
* ``llama-f32`` / ``llama-q4_0``: ``llama-server`` (continuous batching, ``-np`` = the largest concurrency
  parallel slots) on the same checkpoint converted with llama.cpp's ``convert_hf_to_gguf.py`` (F32) and
  ``llama-quantize`` (Q4_0): the same quantization classes (llama.cpp's default F16 KV cache),
* ``ours-int4-kv8`` / ``llama-q4_0-kv8``: the same with an 8-bit KV cache on both sides: ours ``quantize
  --kv-cache int8`` (per-channel scales calibrated on ``--calib-data``, default 16 x 64 tokens of generated text),
  llama.cpp ``-ctk q8_0 -ctv q8_0 -fa on``,
* ``ray1`` / ``ray2`` (``--ray``): ``serve --replicas 1|2`` on the fp32 bundle, one thread per replica,

at each ``--concurrency`` C: C client streams send requests back to back (greedy, random token-id prompts of
``--prompt-len``, ``ignore_eos`` so every request makes ``--max-tokens`` tokens), reporting end-to-end tok/s
(completion tokens / wall time: prefill, queueing and HTTP included), time to first token p50/p99,
inter-token latency p50/p99 (gaps between streamed chunks) and, for ours, the decode-step throughput from
the server's Prometheus counters (``batch``: tokens per decode step; ``rows``: cache rows each step computed,
the span of slots it covers, so ``rows`` - ``batch`` rows of every step were idle); tok/s ratios are to
concurrency 1 of the same target.

Every request of the throughput levels (and the warm-up) has its own random prompt, never sent before:
llama-server's ``cache_prompt`` (on by default) reuses a slot's cached prompt when a request repeats one, and
ours reuses a finished request's cache (scheduler prefix cache), so repeated prompts would measure prefix
reuse, not prefill + decode (the multi-turn workload measures reuse). The ``cached`` column reports the prompt
tokens each server still took from its cache (llama-server: ``usage.prompt_tokens_details.cached_tokens``;
ours: the ``exaone_prefix_cache_reused_tokens`` counter); it should be about 0. Batch invariance is checked
apart, untimed: the first two prompts of the highest level are sent again alone and their tokens compared
(``same``). The TTFT / ITL stamps are the arrival times of the chunks that carry a token: ours streams one
chunk per token (text and ``token_ids``) and a closing chunk with the finish reason; llama-server streams
one chunk per token with ``finish_reason: null`` (often with empty text) and a closing one with the reason.

The multi-turn workload (``--conversations``, 0 to skip): conversations of ``--turns`` turns sharing one system
prompt, each turn's prompt = the previous prompt + its completion (token ids, ``return_token_ids``) + new user
tokens, run concurrently, on ours with and without prefix reuse (``--no-prefix-cache``): TTFT per turn.

llama.cpp is found in ``--llama-bin`` (``llama-server``, ``llama-quantize``) and ``--llama-src`` (its
``convert_hf_to_gguf.py`` and ``gguf-py``); the tiny tokenizer's pre-tokenizer is unknown to the converter, so it
is converted as EXAONE 4's (prompts are sent as token ids: llama.cpp never tokenizes text here).

    python benchmarks/serve.py --layers 2 --concurrency 1,4,16 --requests 16 --max-tokens 16
    python benchmarks/serve.py --bundle B --targets ours-fp32 --concurrency 1,8 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from exaone_deploy.server.launcher import ServerProcess

log = logging.getLogger("benchmarks.serve")

LLAMA_BIN = Path(os.environ.get("LLAMA_CPP_BIN", "/work/llama/build/bin"))
LLAMA_SRC = Path(os.environ.get("LLAMA_CPP_SRC", "/work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp"))
TOKEN_IDS = 2000  # prompts draw token ids from [100, TOKEN_IDS) (--max-token-id: smaller vocabularies)


# ---- artifacts (cached in --workdir) ---------------------------------------------------------------


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def checkpoint(workdir: Path, layers: int) -> Path:
    from exaone_deploy.tiny.make import make_tiny

    ckpt = workdir / f"exaone-4.0-1.2b-shape-{layers}l"
    if not (ckpt / "config.json").is_file():
        print(f"writing a random-weight 1.2B-shaped checkpoint ({layers} layers) to {ckpt} ...", file=sys.stderr)
        make_tiny(ckpt, "1.2b-full", seed=0, num_layers=layers)
    return ckpt


def _cached_bundle(path: Path, make) -> Path:
    from exaone_deploy.bundle import load_manifest

    try:
        load_manifest(path, verify=False)
        return path
    except Exception:  # noqa: BLE001 - not there yet (or broken): rebuild
        print(f"building {path} ...", file=sys.stderr)
        _quiet()
        make()
        return path


def our_bundles(ckpt: Path, workdir: Path, max_seq_len: int, kv8: bool = False, calib: Path | None = None):
    """{"fp32": bundle, "int4": bundle} (int4-rtn of the fp32 bundle: MatMulNBits, block 32), and with ``kv8``
    "int4-kv8": the same with an INT8 KV cache (scales calibrated on ``calib``, else on generated text)."""
    from exaone_deploy import api

    fp32 = workdir / f"{ckpt.name}-ort-fp32"
    int4 = workdir / f"{ckpt.name}-ort-int4"
    _cached_bundle(
        fp32, lambda: api.export(ckpt, fp32, target="ort", dtype="float32", max_seq_len=max_seq_len, force=True)
    )
    _cached_bundle(int4, lambda: api.quantize(fp32, int4, "int4-rtn", force=True))
    out = {"fp32": fp32, "int4": int4}
    if kv8:
        if calib is None:  # the random-weight checkpoint's scales need activations, not meaningful text
            calib = workdir / "calib-words.txt"
            words = np.random.default_rng(0).choice(["the", "king", "of", "a", "sword", "night", "love", "and"], 4096)
            calib.write_text(" ".join(words))
        out["int4-kv8"] = workdir / f"{ckpt.name}-ort-int4-kv8"
        _cached_bundle(
            out["int4-kv8"],
            lambda: api.quantize(
                fp32,
                out["int4-kv8"],
                "int4-rtn",
                kv_cache="int8",
                calib_data=calib,
                calib_samples=16,
                calib_seq_len=64,
                force=True,
            ),
        )
    return out


def gguf_files(ckpt: Path, workdir: Path) -> dict[str, Path]:
    """{"f32": GGUF, "q4_0": GGUF} of the checkpoint, by llama.cpp's own converter and quantizer."""
    f32, q4 = workdir / f"{ckpt.name}-f32.gguf", workdir / f"{ckpt.name}-q4_0.gguf"
    if not f32.is_file():
        # the tiny tokenizer's pre-tokenizer hash is unknown to the converter: convert it as EXAONE 4's
        shim = (
            "import sys, runpy; sys.argv = sys.argv[1:]; import conversion.base as b; "
            "b.TextModel.get_vocab_base_pre = lambda self, tok: 'exaone4'; "
            "runpy.run_path(sys.argv[0], run_name='__main__')"
        )
        env = dict(os.environ, PYTHONPATH=f"{LLAMA_SRC}:{LLAMA_SRC / 'gguf-py'}")
        subprocess.run(
            [
                sys.executable,
                "-c",
                shim,
                str(LLAMA_SRC / "convert_hf_to_gguf.py"),
                str(ckpt),
                "--outfile",
                str(f32),
                "--outtype",
                "f32",
            ],
            check=True,
            env=env,
            cwd=LLAMA_SRC,
            stdout=subprocess.DEVNULL,
        )
    if not q4.is_file():
        subprocess.run(
            [str(LLAMA_BIN / "llama-quantize"), str(f32), str(q4), "Q4_0"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return {"f32": f32, "q4_0": q4}


# ---- servers ----------------------------------------------------------------------------------------


class LlamaServer:
    """``llama-server`` on 127.0.0.1 (continuous batching, ``parallel`` slots of ``context`` tokens each)."""

    def __init__(
        self, gguf: Path, parallel: int, context: int, threads: int | None, timeout: float = 600, kv8: bool = False
    ):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [
            str(LLAMA_BIN / "llama-server"),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-np",
            str(parallel),
            "-c",
            str(context * parallel),
            "--cont-batching",
            "--no-warmup",
            "-t",
            str(threads or os.cpu_count()),
            "-tb",
            str(threads or os.cpu_count()),
            *(["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"] if kv8 else []),
        ]
        self.log = Path(tempfile.gettempdir()) / f"llama-server-{port}.log"  # (never beside the shared GGUF)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"llama-server did not start: {' '.join(cmd)} (log: {self.log})")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for name in (
        "exaone_decode_step_seconds_sum",
        "exaone_decode_batch_size_sum",
        "exaone_decode_batch_size_count",
        "exaone_decode_rows_total",
        "exaone_prefix_cache_reused_tokens_total",
    ):
        m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


# ---- the clients ----------------------------------------------------------------------------------


async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> dict:
    """One streamed greedy completion of token-id ``prompt``: ttft, chunk gaps (ITL), tokens, token ids (ours)."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    stamps, ids, usage = [], [], None  # stamps: arrival of each chunk that carries a token (module docstring)
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            usage = event.get("usage") or usage
            for choice in event.get("choices", ()):  # (llama-server: one token a chunk, maybe no text)
                if choice.get("token_ids") or choice.get("text") or choice.get("finish_reason") is None:
                    stamps.append(time.perf_counter())
                    ids += choice.get("token_ids") or []
    t1 = time.perf_counter()
    tokens = (usage or {}).get("completion_tokens") or len(ids) or len(stamps)
    return {
        "ttft": (stamps[0] if stamps else t1) - t0,
        "latency": t1 - t0,
        "tokens": tokens,
        "token_chunks": len(stamps),
        "cached": ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
        "token_ids": ids,
        "itl": np.diff(stamps).tolist(),
    }


async def run_level(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int):
    """Request i sends ``prompts[i]``; ``concurrency`` client streams take the next one as they finish."""
    n_requests = len(prompts)
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
                try:
                    results[i] = await one_request(client, prompts[i], max_tokens)
                except httpx.RemoteProtocolError:  # a keep-alive connection the server had just closed
                    results[i] = await one_request(client, prompts[i], max_tokens)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return [results[i] for i in range(n_requests)], wall


async def run_conversations(
    url: str, system: list[int], n_conv: int, turns: int, user_len: int, max_tokens: int, seed: int = 1
) -> list[list[float]]:
    """``n_conv`` concurrent conversations; returns each turn's TTFT, per conversation."""
    rng = np.random.default_rng(seed)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600.0)) as client:

        async def conversation(c: int) -> list[float]:
            prompt, ttfts = list(system), []
            for _ in range(turns):
                prompt += rng.integers(100, TOKEN_IDS, size=user_len).tolist()
                r = await one_request(client, prompt, max_tokens)
                ttfts.append(r["ttft"])
                prompt += r["token_ids"]
            return ttfts

        return await asyncio.gather(*(conversation(c) for c in range(n_conv)))


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


class Prompts:
    """Random token-id prompts, each drawn once: no request repeats an earlier one (module docstring)."""

    def __init__(self, length: int, seed: int = 0):
        self.length, self.rng = length, np.random.default_rng(seed)

    def take(self, n: int) -> list[list[int]]:
        return [self.rng.integers(100, TOKEN_IDS, size=self.length).tolist() for _ in range(n)]


def measure(url: str, prompts: Prompts, levels, requests, max_tokens, ours: bool, rounds: int = 1) -> list[dict]:
    """Each level ``rounds`` times, round-robin (1, 4, 16, 32, 1, 4, ...): a row sums a level's rounds, and its
    ratios to concurrency 1 (``x``, ``decode x``) are the median of per-round ratios, so a drift of the machine
    (this one's memory bandwidth moves batch 1 by +-15% within minutes) hits both sides of a ratio alike."""
    asyncio.run(run_level(url, prompts.take(1), 1, 2))  # warm-up (session, allocator)
    runs: dict[int, list] = {c: [] for c in levels}
    for _ in range(rounds):
        for c in levels:
            sent = prompts.take(requests or max(3, 2 * c))
            before = scrape(url) if ours else {}
            results, wall = asyncio.run(run_level(url, sent, c, max_tokens))
            after = scrape(url) if ours else {}
            runs[c].append((sent, results, wall, {k: after[k] - before[k] for k in after}))
            print(f"  concurrency {c}: {sum(r['tokens'] for r in results)} tokens in {wall:.1f} s", file=sys.stderr)
    rows = []
    for c in levels:
        results = [x for _, res, _, _ in runs[c] for x in res]
        wall = sum(w for _, _, w, _ in runs[c])
        delta = {k: sum(d.get(k, 0) for _, _, _, d in runs[c]) for k in (runs[c][0][3] if ours else {})}
        step_s = delta.get("exaone_decode_step_seconds_sum", 0)
        step_tokens = delta.get("exaone_decode_batch_size_sum", 0)
        steps = delta.get("exaone_decode_batch_size_count", 0)
        tokens = sum(r["tokens"] for r in results)
        chunks = sum(r["token_chunks"] for r in results)
        if chunks != tokens:
            log.warning("concurrency %d: %d token chunks for %d tokens: TTFT/ITL stamps are off", c, chunks, tokens)
        itl = [x for r in results for x in r["itl"]]
        per_round = [sum(r["tokens"] for r in res) / w for _, res, w, _ in runs[c]]
        per_round_decode = [
            d["exaone_decode_batch_size_sum"] / d["exaone_decode_step_seconds_sum"]
            if d.get("exaone_decode_step_seconds_sum")
            else None
            for _, _, _, d in runs[c]
        ]
        rows.append(
            {
                "concurrency": c,
                "requests": sum(len(x[0]) for x in runs[c]),
                "tokens": tokens,
                "wall_s": wall,
                "tokens_per_s": tokens / wall,
                "decode_tokens_per_s": step_tokens / step_s if step_s else None,
                "round_tokens_per_s": per_round,
                "round_decode_tokens_per_s": per_round_decode,
                "mean_decode_batch": step_tokens / steps if steps else None,
                "mean_decode_rows": delta.get("exaone_decode_rows_total", 0) / steps if steps else None,
                "ttft_p50_s": percentile([r["ttft"] for r in results], 50),
                "ttft_p99_s": percentile([r["ttft"] for r in results], 99),
                "itl_p50_s": percentile(itl, 50),
                "itl_p99_s": percentile(itl, 99),
                "prompt_tokens_cached": delta.get("exaone_prefix_cache_reused_tokens_total", 0)
                if ours
                else sum(r["cached"] for r in results),
                "same_as_alone": None,
            }
        )
    for r in rows:
        r["tokens_per_s_vs_1"] = float(
            np.median([a / b for a, b in zip(r["round_tokens_per_s"], rows[0]["round_tokens_per_s"])])
        )
        pairs = zip(r["round_decode_tokens_per_s"], rows[0]["round_decode_tokens_per_s"])
        pairs = [(a, b) for a, b in pairs if a and b]
        r["decode_tokens_per_s_vs_1"] = float(np.median([a / b for a, b in pairs])) if pairs else None
    sent, results = runs[levels[-1]][-1][:2]
    if levels[-1] > 1 and results[0]["token_ids"]:  # batch invariance, untimed: the top level's first prompts alone
        again, _ = asyncio.run(run_level(url, sent[:2], 1, max_tokens))
        rows[-1]["same_as_alone"] = all(a["token_ids"] == r["token_ids"] for a, r in zip(again, results))
    return rows


def print_rows(name: str, rows: list[dict]) -> None:
    print(f"\n{name}")
    head = (
        f"{'conc':>4} {'reqs':>4} {'tok/s':>7} {'x':>5} {'decode tok/s':>12} {'dec x':>5} {'batch':>5} {'rows':>5} "
        f"{'ttft p50':>8} {'ttft p99':>8} {'itl p50':>8} {'itl p99':>8} {'cached':>6} {'same':>4}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        same = "-" if r["same_as_alone"] is None else "yes" if r["same_as_alone"] else "NO"
        dec = f"{r['decode_tokens_per_s']:.2f}" if r["decode_tokens_per_s"] else "-"
        dec_x = f"{r['decode_tokens_per_s_vs_1']:.2f}" if r.get("decode_tokens_per_s_vs_1") else "-"
        batch = f"{r['mean_decode_batch']:.1f}" if r["mean_decode_batch"] else "-"
        span = f"{r['mean_decode_rows']:.1f}" if r.get("mean_decode_rows") else "-"
        print(
            f"{r['concurrency']:>4} {r['requests']:>4} {r['tokens_per_s']:>7.2f} {r['tokens_per_s_vs_1']:>5.2f} "
            f"{dec:>12} {dec_x:>5} {batch:>5} {span:>5} {r['ttft_p50_s']:>7.2f}s {r['ttft_p99_s']:>7.2f}s "
            f"{r['itl_p50_s'] * 1000:>6.0f}ms {r['itl_p99_s'] * 1000:>6.0f}ms {r['prompt_tokens_cached']:>6.0f} "
            f"{same:>4}"
        )


def main(argv=None) -> int:
    global TOKEN_IDS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None, help="Serve this bundle only (target ours-fp32).")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/exaone-deploy-bench"))
    ap.add_argument("--layers", type=int, default=30, help="Layers of the 1.2B shape (30: the real depth).")
    ap.add_argument(
        "--targets",
        default="ours-fp32,ours-int4,llama-f32,llama-q4_0",
        help="Comma-separated: ours-fp32, ours-int4, ours-int4-kv8, llama-f32, llama-q4_0, llama-q4_0-kv8.",
    )
    ap.add_argument("--calib-data", type=Path, default=None, help="Calibration text of ours-int4-kv8's cache scales.")
    ap.add_argument("--concurrency", default="1,4,16,32", help="Comma-separated client concurrencies.")
    ap.add_argument(
        "--requests", type=int, default=None, help="Requests per level (default: 2 x concurrency, at least 3)."
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="Run the levels this many times, round-robin; ratios: per-round median."
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--context", type=int, default=256, help="Tokens per cache slot on the server.")
    ap.add_argument("--threads", type=int, default=None, help="Threads of each server (default: all cores).")
    ap.add_argument("--conversations", type=int, default=4, help="Multi-turn workload: conversations (0: skip).")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--system-len", type=int, default=256, help="Shared system prompt tokens.")
    ap.add_argument("--ray", default="", help="Replica counts to compare through Ray Serve, e.g. 1,2 (fp32).")
    ap.add_argument("--json", action="store_true", help="Print one JSON object instead of the tables.")
    ap.add_argument("--max-token-id", type=int, default=TOKEN_IDS, help="Prompt token ids < this (> 100).")
    args = ap.parse_args(argv)
    TOKEN_IDS = args.max_token_id
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.prompt_len + args.max_tokens > args.context:
        ap.error("--prompt-len + --max-tokens must fit --context")
    targets = ["ours-fp32"] if args.bundle else [t for t in args.targets.split(",") if t]
    args.workdir.mkdir(parents=True, exist_ok=True)

    ckpt = None if args.bundle else checkpoint(args.workdir, args.layers)
    multi_ctx = args.system_len + args.turns * (32 + args.max_tokens) + 64
    kv8 = "ours-int4-kv8" in targets
    bundles = (
        {"fp32": args.bundle}
        if args.bundle
        else our_bundles(ckpt, args.workdir, max(args.context, multi_ctx), kv8=kv8, calib=args.calib_data)
    )
    ggufs = gguf_files(ckpt, args.workdir) if any(t.startswith("llama") for t in targets) else {}
    ggufs.update({f"{q}-kv8": g for q, g in list(ggufs.items())})
    rng = np.random.default_rng(0)
    if args.threads:
        os.environ["EXAONE_DEPLOY_THREADS"] = str(args.threads)
    common = [
        "--no-verify",
        "--max-batch",
        str(max(levels)),
        "--context",
        str(args.context),
        "--max-queue",
        str(4 * max(levels)),
        "--prefill-chunk",
        str(max(args.prompt_len, 64)),
    ]
    report: dict = {
        "layers": args.layers,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "prompt_len": args.prompt_len,
        "targets": {},
    }

    for target in targets:
        print(f"{target} ...", file=sys.stderr)
        kind, q = target.split("-", 1)
        if kind == "ours":
            server = ServerProcess(bundles[q], *common)
        else:
            server = LlamaServer(ggufs[q], max(levels), args.context, args.threads, kv8=q.endswith("-kv8"))
        try:
            report["targets"][target] = measure(
                server.url,
                Prompts(args.prompt_len),
                levels,
                args.requests,
                args.max_tokens,
                kind == "ours",
                args.rounds,
            )
        finally:
            server.close()

    for replicas in [int(r) for r in args.ray.split(",") if r]:
        name = f"ray{replicas}-fp32"
        print(f"{name} ...", file=sys.stderr)
        os.environ["EXAONE_DEPLOY_THREADS"] = "1"  # one thread per replica
        server = ServerProcess(bundles["fp32"], "--replicas", str(replicas), *common, timeout=600)
        try:
            report["targets"][name] = measure(
                server.url, Prompts(args.prompt_len), levels, args.requests, args.max_tokens, False, args.rounds
            )
        finally:
            server.close()
            if args.threads:
                os.environ["EXAONE_DEPLOY_THREADS"] = str(args.threads)
            else:
                os.environ.pop("EXAONE_DEPLOY_THREADS", None)

    if args.conversations:
        system = rng.integers(100, TOKEN_IDS, size=args.system_len).tolist()
        report["multi_turn"] = {}
        for label, extra in (("reuse", []), ("no-reuse", ["--no-prefix-cache"])):
            print(f"multi-turn, {label} ...", file=sys.stderr)
            server = ServerProcess(
                bundles["fp32"],
                "--no-verify",
                "--max-batch",
                str(args.conversations),
                "--context",
                str(multi_ctx),
                "--prefill-chunk",
                "512",
                *extra,
            )
            try:
                asyncio.run(run_level(server.url, Prompts(args.prompt_len, seed=2).take(1), 1, 2))
                ttfts = asyncio.run(
                    run_conversations(server.url, system, args.conversations, args.turns, 32, args.max_tokens)
                )
                health = httpx.get(server.url + "/health").json()
            finally:
                server.close()
            per_turn = np.median(np.asarray(ttfts), axis=0).tolist()
            report["multi_turn"][label] = {
                "ttft_median_per_turn_s": per_turn,
                "turn_last_over_first": per_turn[-1] / per_turn[0],
                "prefix_tokens_reused": health.get("prefix_tokens_reused"),
            }

    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"1.2B shape, {args.layers} layers; prompt {args.prompt_len} tokens, {args.max_tokens} new tokens per "
        f"request; {os.cpu_count()} CPUs, threads {args.threads or 'all'}"
    )
    for name, rows in report["targets"].items():
        print_rows(name, rows)
    for label, m in report.get("multi_turn", {}).items():
        turns = " ".join(f"{t * 1000:.0f}" for t in m["ttft_median_per_turn_s"])
        print(
            f"\nmulti-turn {label}: TTFT per turn (ms, median of {args.conversations} conversations): {turns}; "
            f"last/first {m['turn_last_over_first']:.2f}; prefix tokens reused {m['prefix_tokens_reused']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
