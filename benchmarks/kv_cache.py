"""INT8 KV cache (issue 18): held-out perplexity cost on the bundled tiny model, and cache bytes per context.

Bundles: fp32 (float32 cache); fp32 weights + INT8 cache with static scales (``export --kv-cache int8``) and with
calibrated scales (an int4-rtn plan written smooth-only: no weight quantized, only the cache scales calibrated);
int8-sq and int4-awq with and without the INT8 cache (``quantize --kv-cache int8``). Calibration: the first 90%
of tinyshakespeare; perplexity: the last 10%, windows of ``--seq-len`` scored in chunks of ``--chunk`` tokens
(every chunk after the first reads its context back from the quantized cache).

    python benchmarks/kv_cache.py [--seq-len 512] [--chunk 64] [--max-tokens N] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize import _quiet, corpus_split  # noqa: E402


def sizes() -> list[dict]:
    """Cache bytes at 4k / 16k for the real 1.2B and 32B shapes: bf16 vs int8 (what the manifests report)."""
    from exaone_deploy.graph_io import GraphIO

    rows = []
    for name, layers, kv, hd, window, pattern in (
        ("EXAONE-4.0-1.2B", 30, 8, 64, 0, "G"),
        ("EXAONE-4.0-32B", 64, 8, 128, 4096, "LLLG"),
    ):
        spec = _spec(layers, kv, hd, window, pattern)
        for dtype, kind in (("bfloat16", "float"), ("bfloat16", "int8")):
            io = GraphIO(spec, dtype, 131072, window_cache=spec.is_hybrid, kv_cache=kind)
            rows.append(
                {
                    "model": name,
                    "cache": io.cache_dtype,
                    "4096": io.cache_bytes(4096),
                    "16384": io.cache_bytes(16384),
                    "bytes_per_token": io.cache_bytes_per_token,
                }
            )
    return rows


def _spec(layers, kv, hd, window, pattern):
    """A ModelSpec with the real models' attention shape (layers, KV heads, head_dim, window pattern)."""
    from exaone_deploy.spec import load_spec

    kinds = [("sliding_attention" if pattern[i % len(pattern)] == "L" else "full_attention") for i in range(layers)]
    cfg = {
        "architectures": ["Exaone4ForCausalLM"],
        "model_type": "exaone4",
        "hidden_size": 2048,
        "intermediate_size": 4096,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "vocab_size": 102400,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "sliding_window": window or None,
        "layer_types": kinds,
        "tie_word_embeddings": True,
    }
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        return load_spec(d)


def accuracy(args) -> dict:
    _quiet()
    from exaone_deploy.calibration.quantize import (
        QuantOptions,
        calibrate,
        open_source,
        quantize,
        write_quantized_bundle,
    )
    from exaone_deploy.exporter.export import ExportOptions, export_bundle
    from exaone_deploy.runtime.ort_backend import OrtBackend
    from exaone_deploy.text.corpus import token_stream
    from exaone_deploy.text.tokenizer import Tokenizer
    from exaone_deploy.validate.ppl import log_likelihood, windows

    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kv-cache-", dir=args.workdir))
    try:
        train, heldout = corpus_split(work)
        n = max(args.seq_len, 512)
        fp32 = export_bundle("tiny", work / "fp32", ExportOptions(max_seq_len=n), progress=False)
        export_bundle("tiny", work / "fp32-kv8-static", ExportOptions(max_seq_len=n, kv_cache="int8"), progress=False)
        cal = QuantOptions("int4-rtn", train, calib_samples=args.calib_samples, kv_cache="int8")
        source = open_source(fp32, work)
        plan, calib, _ = calibrate(source, cal)
        (work / "fp32-kv8-calibrated").mkdir()
        write_quantized_bundle(source, plan, cal, work / "fp32-kv8-calibrated", calib=calib, smooth_only=True)
        for scheme in ("int8-sq", "int4-awq"):
            for kv in ("float", "int8"):
                quantize(
                    fp32,
                    work / f"{scheme}-kv{'8' if kv == 'int8' else 'f'}",
                    QuantOptions(scheme, train, calib_samples=args.calib_samples, kv_cache=kv),
                )
        tokens, _ = token_stream(heldout, Tokenizer.from_dir(fp32))
        wins = windows(tokens, args.seq_len, args.max_tokens)
        rows = []
        for name in (
            "fp32",
            "fp32-kv8-static",
            "fp32-kv8-calibrated",
            "int8-sq-kvf",
            "int8-sq-kv8",
            "int4-awq-kvf",
            "int4-awq-kv8",
        ):
            be = OrtBackend(work / name, max_seq_len=args.seq_len)
            total = count = 0
            for w in wins:
                logits = be.score(w.tolist(), slot=0, chunk=args.chunk)
                total += log_likelihood(logits[:-1], w[1:])
                count += len(w) - 1
            rows.append({"bundle": name, "ppl": math.exp(-total / count), "cache_bytes": be.cache_bytes()})
        base = {r["bundle"]: r["ppl"] for r in rows}
        for r in rows:
            ref = base["fp32"] if r["bundle"].startswith("fp32") else base[r["bundle"][:-1] + "f"]
            r["increase_pct"] = 100.0 * (r["ppl"] / ref - 1.0)
        return {
            "heldout_tokens": count,
            "windows": len(wins),
            "seq_len": args.seq_len,
            "chunk": args.chunk,
            "calib_samples": args.calib_samples,
            "rows": rows,
            "sizes": sizes(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/exaone-deploy-bench"))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = accuracy(args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for r in out["rows"]:
            print(f"{r['bundle']:22s} ppl {r['ppl']:.4f}  {r['increase_pct']:+.2f}%  cache {r['cache_bytes']} B")
        for r in out["sizes"]:
            mib = {k: r[k] / 2**20 for k in ("4096", "16384")}
            print(f"{r['model']:16s} {r['cache']:9s} 4k {mib['4096']:8.1f} MiB  16k {mib['16384']:8.1f} MiB")
    return out


if __name__ == "__main__":
    main()
