"""Quantization accuracy (and optionally speed), measured in one run.

Accuracy: the model (default: the bundled trained ``tiny``) is exported to an fp32 ``ort`` bundle, quantized
with each scheme, and every bundle's perplexity is measured in ONNX Runtime on the held-out split of
tinyshakespeare (the last 10%, never used for calibration; calibration samples come from the first 90%).
The table shows the increase over the fp32 bundle against the targets: int8-sq <= 1%, fp8 <= 1.5%,
int4-awq (block 32) <= 5%, and AWQ below RTN at each block size.

Speed (``--speed``): the full-size EXAONE 4.0 1.2B shape with random weights (``make_tiny`` preset
``1.2b-full``, fp32, written under ``--workdir`` and shared with benchmarks/generate.py), exported to fp32, then
quantized int8-sq and int4 for ``ort``; each bundle decodes at batch 1 in its own process; the table shows
tokens/s, the ratio to our fp32 bundle, weights on disk and peak RSS.

    python benchmarks/quantize.py                       # accuracy table on the bundled tiny model
    python benchmarks/quantize.py --model DIR --speed   # plus the 1.2B-shape speed table
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import add_json_flag, emit, fmt_bytes, peak_rss_bytes, print_table, run_isolated  # noqa: E402

TARGETS = {"int8-sq": 1.0, "fp8": 1.5, "int4-awq@32": 5.0}
ACCURACY_CONFIGS = [
    # (scheme, target, block, method)
    ("int8-sq", "ort", 32, "max"),
    ("int8-sq", "ort", 32, "percentile"),
    ("int8-sq", "ort", 32, "entropy"),
    ("int8-sq", "trt", 32, "max"),
    ("fp8", "ort", 32, "max"),
    ("fp8", "trt", 32, "max"),
    ("int4-awq", "ort", 32, "max"),
    ("int4-rtn", "ort", 32, "max"),
    ("int4-awq", "trt", 32, "max"),
    ("int4-awq", "ort", 64, "max"),
    ("int4-rtn", "ort", 64, "max"),
    ("int4-awq", "ort", 128, "max"),
    ("int4-rtn", "ort", 128, "max"),
]


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)


def corpus_split(workdir: Path) -> tuple[Path, Path]:
    """The tinyshakespeare split the tiny model was trained with: (first 90% file, last 10% file)."""
    from exaone_deploy import assets

    train, heldout = workdir / "tinyshakespeare-train90.txt", workdir / "tinyshakespeare-heldout10.txt"
    train.write_text(assets.train_text(), encoding="utf-8")
    heldout.write_text(assets.heldout_text(), encoding="utf-8")
    return train, heldout


# ---- accuracy ----------------------------------------------------------------------------------------------


def accuracy(args) -> dict:
    _quiet()
    from exaone_deploy.calibration.quantize import QuantizeError, QuantOptions, quantize
    from exaone_deploy.checkpoint import resolve_model_dir
    from exaone_deploy.exporter.export import ExportOptions, export_bundle
    from exaone_deploy.text.corpus import token_stream
    from exaone_deploy.text.tokenizer import Tokenizer
    from exaone_deploy.validate.ppl import perplexity

    model = resolve_model_dir(args.model)
    if not (model / "config.json").is_file():
        raise SystemExit(
            f"{model}: no checkpoint there (the bundled tiny model may not be trained yet; pass --model DIR)"
        )
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="quantize-accuracy-", dir=args.workdir))
    try:
        train, heldout = corpus_split(work)
        t = time.perf_counter()
        fp32 = export_bundle(
            model, work / "fp32", ExportOptions("ort", "float32", max(args.seq_len, 512)), progress=False
        )
        export_s = time.perf_counter() - t
        tokens, _ = token_stream(heldout, Tokenizer.from_dir(fp32))

        def ppl(bundle: Path):
            return perplexity(bundle, heldout, seq_len=args.seq_len, max_tokens=args.max_tokens, tokens=tokens)

        base = ppl(fp32)
        rows = [
            {
                "config": "fp32",
                "scheme": "fp32",
                "target": "ort",
                "ppl": base.ppl,
                "increase_pct": 0.0,
                "weights": (fp32 / "weights.data").stat().st_size,
                "quantize_s": export_s,
            }
        ]
        configs = [c for c in ACCURACY_CONFIGS if not args.schemes or c[0] in args.schemes]
        for scheme, target, block, method in configs:
            name = f"{scheme}-{target}-b{block}-{method}"
            opts = QuantOptions(
                scheme,
                train,
                target=target,
                calib_samples=args.calib_samples,
                calib_seq_len=args.calib_seq_len,
                block_size=block,
                method=method,
                alpha=args.alpha,
            )
            t = time.perf_counter()
            try:
                out = quantize(fp32, work / name, opts)
            except QuantizeError as e:  # e.g. a block size larger than the tiny model's hidden size
                print(f"skipping {name}: {e}", file=sys.stderr)
                continue
            took = time.perf_counter() - t
            r = ppl(work / name)
            key = scheme if not scheme.startswith("int4") else f"{scheme}@{block}"
            inc = 100.0 * (r.ppl / base.ppl - 1.0)
            row = {
                "config": name,
                "scheme": scheme,
                "target": target,
                "block": block if scheme.startswith("int4") else None,
                "method": method if scheme in ("int8-sq", "fp8") else None,
                "ppl": r.ppl,
                "increase_pct": inc,
                "limit_pct": TARGETS.get(key),
                "weights": (work / name / "weights.data").stat().st_size,
                "quantize_s": took,
            }
            if row["limit_pct"] is not None:
                row["ok"] = inc <= row["limit_pct"]
            rows.append(row)
            shutil.rmtree(work / name, ignore_errors=True)
            del out
        # AWQ below RTN at each block size (ort rows).
        for block in (32, 64, 128):
            awq = [r for r in rows if r["scheme"] == "int4-awq" and r["block"] == block and r["target"] == "ort"]
            rtn = [r for r in rows if r["scheme"] == "int4-rtn" and r["block"] == block and r["target"] == "ort"]
            if awq and rtn:
                awq[0]["awq_beats_rtn"] = awq[0]["ppl"] < rtn[0]["ppl"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "model": str(model),
        "heldout_tokens": base.tokens,
        "seq_len": args.seq_len,
        "calibration": {
            "samples": args.calib_samples,
            "seq_len": args.calib_seq_len,
            "source": "first 90% of tinyshakespeare",
        },
        "fp32_ppl": base.ppl,
        "rows": rows,
    }


# ---- speed (1.2B shape) --------------------------------------------------------------------------------------


def build_fp32(workdir: Path, layers: int | None) -> tuple[Path, Path]:
    """The 1.2B-shaped fp32 checkpoint and its fp32 ort bundle (same names as benchmarks/generate.py)."""
    suffix = f"-L{layers}" if layers else ""
    ckpt = workdir / f"exaone4-1.2b-shape-fp32{suffix}"
    bundle = workdir / f"exaone4-1.2b-shape-fp32{suffix}-ort"
    if not (ckpt / "config.json").is_file():
        from exaone_deploy.tiny.make import make_tiny

        print(f"writing the random-weight checkpoint {ckpt} ...", file=sys.stderr)
        make_tiny(ckpt, "1.2b-full", seed=0, num_layers=layers, dtype="float32")  # written atomically
    if not (bundle / "manifest.json").is_file():
        print(f"exporting {ckpt} -> {bundle} ...", file=sys.stderr)
        run_isolated(_export, str(ckpt), str(bundle))
    return ckpt, bundle


def _export(ckpt: str, out: str) -> None:
    _quiet()
    from exaone_deploy.exporter.export import ExportOptions, export_bundle

    export_bundle(ckpt, out, ExportOptions(target="ort", dtype="float32", max_seq_len=4096), force=True, progress=False)


def _quantize(bundle: str, out: str, scheme: str, calib: str, block: int) -> dict:
    _quiet()
    from exaone_deploy.calibration.quantize import QuantOptions, quantize

    opts = QuantOptions(
        scheme, Path(calib), target="ort", calib_samples=8, calib_seq_len=128, block_size=block, awq_tokens=256
    )
    info = quantize(bundle, out, opts, force=True)
    return {"timings": info["timings"], "peak_rss": peak_rss_bytes()}


def _decode(bundle: str, prompt_len: int, new_tokens: int, repeats: int, relower: bool = False) -> dict:
    import numpy as np

    from exaone_deploy.bundle import load_manifest
    from exaone_deploy.runtime.ort_backend import OrtBackend
    from exaone_deploy.validate.ppl import ort_twin

    source = load_manifest(bundle, verify=False)
    if relower:  # a cached fp32 bundle may predate the current lowering: lower its canonical graph afresh
        work = Path(tempfile.mkdtemp(prefix="relowered-", dir=Path(bundle).parent))
        source = ort_twin(source, work)
    t = time.perf_counter()
    backend = OrtBackend(source, max_batch=1, capacity=prompt_len + new_tokens + 1, verify=False)
    load_s = time.perf_counter() - t
    prompt = np.random.default_rng(0).integers(0, backend.spec.vocab_size, prompt_len).tolist()
    best_prefill, best_decode = 0.0, 0.0
    tokens = []
    for r in range(repeats + 1):  # the first run warms up
        t = time.perf_counter()
        logits = backend.prefill([0], [prompt])
        prefill = time.perf_counter() - t
        out = []
        t = time.perf_counter()
        for _ in range(new_tokens):
            tok = int(np.argmax(logits[0]))
            out.append(tok)
            logits = backend.decode([0], [tok])
        decode = time.perf_counter() - t
        backend.release(0)
        if r:
            best_prefill = max(best_prefill, prompt_len / prefill)
            best_decode = max(best_decode, new_tokens / decode)
        tokens = out
    if relower:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "load_s": load_s,
        "prefill_tok_s": best_prefill,
        "decode_tok_s": best_decode,
        "peak_rss": peak_rss_bytes(),
        "tokens": tokens,
    }


def speed(args) -> dict:
    args.workdir.mkdir(parents=True, exist_ok=True)
    _, fp32 = build_fp32(args.workdir, args.speed_layers)
    calib_dir = Path(tempfile.mkdtemp(prefix="calib-", dir=args.workdir))
    calib, _ = corpus_split(calib_dir)
    suffix = f"-L{args.speed_layers}" if args.speed_layers else ""
    bundles = {"fp32": fp32}
    quant = {}
    for scheme, block in (("int8-sq", 32), ("int4-rtn", 32), ("int4-awq", 32)):
        if args.schemes and scheme not in args.schemes:
            continue
        out = args.workdir / f"exaone4-1.2b-shape{suffix}-ort-{scheme}-b{block}"
        if not (out / "manifest.json").is_file() or args.rebuild:
            print(f"quantizing {fp32} -> {out} ...", file=sys.stderr)
            quant[scheme] = run_isolated(_quantize, str(fp32), str(out), scheme, str(calib), block)
        bundles[scheme] = out
    shutil.rmtree(calib_dir, ignore_errors=True)
    rows = []
    for name, path in bundles.items():
        r = run_isolated(_decode, str(path), args.prompt_len, args.new_tokens, args.repeats, name == "fp32")
        r.update(
            name=name,
            weights=(path / "weights.data").stat().st_size,
            quantize_s=(quant.get(name) or {}).get("timings", {}).get("total_s"),
        )
        rows.append(r)
    base = rows[0]["decode_tok_s"]
    for r in rows:
        r["decode_vs_fp32"] = r["decode_tok_s"] / base
        r["prefill_vs_fp32"] = r["prefill_tok_s"] / rows[0]["prefill_tok_s"]
    return {
        "shape": "EXAONE-4.0-1.2B (random weights)",
        "layers": args.speed_layers or 30,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "rows": rows,
    }


# ---- main ------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="checkpoint for the accuracy table (default: the bundled tiny)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/exaone-deploy-bench"))
    ap.add_argument("--schemes", nargs="*", default=None, help="only these schemes")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seq-len", type=int, default=256, help="perplexity window")
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N held-out tokens")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--speed", action="store_true", help="also measure decode speed on the 1.2B shape")
    ap.add_argument("--speed-layers", type=int, default=None, help="fewer layers for a quick speed run")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rebuild", action="store_true", help="re-quantize the cached 1.2B-shape bundles")
    add_json_flag(ap)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = {}
    if not args.no_accuracy:
        result["accuracy"] = accuracy(args)
    if args.speed:
        result["speed"] = speed(args)

    def table():
        if "accuracy" in result:
            a = result["accuracy"]
            rows = [
                dict(
                    r,
                    weights=fmt_bytes(r["weights"]),
                    limit_pct=None if r.get("limit_pct") is None else f"<= {r['limit_pct']}",
                    ok={True: "yes", False: "NO"}.get(r.get("ok")),
                    awq_beats_rtn={True: "yes", False: "NO"}.get(r.get("awq_beats_rtn")),
                )
                for r in a["rows"]
            ]
            print_table(
                rows,
                [
                    ("config", "config"),
                    ("ppl", "ppl"),
                    ("increase_pct", "+%"),
                    ("limit_pct", "target %"),
                    ("ok", "ok"),
                    ("awq_beats_rtn", "AWQ<RTN"),
                    ("weights", "weights"),
                    ("quantize_s", "quantize s"),
                ],
                title=f"perplexity on the held-out 10% of tinyshakespeare ({a['heldout_tokens']} tokens, "
                f"windows of {a['seq_len']}), {a['model']}; calibration {a['calibration']['samples']}"
                f" x {a['calibration']['seq_len']} tokens of the first 90%",
            )
            print()
        if "speed" in result:
            s = result["speed"]
            rows = [dict(r, weights=fmt_bytes(r["weights"]), peak_rss=fmt_bytes(r["peak_rss"])) for r in s["rows"]]
            print_table(
                rows,
                [
                    ("name", "bundle"),
                    ("decode_tok_s", "decode tok/s"),
                    ("decode_vs_fp32", "x fp32"),
                    ("prefill_tok_s", "prefill tok/s"),
                    ("prefill_vs_fp32", "x fp32"),
                    ("weights", "weights"),
                    ("peak_rss", "peak RSS"),
                    ("load_s", "load s"),
                    ("quantize_s", "quantize s"),
                ],
                title=f"{s['shape']}, {s['layers']} layers, ONNX Runtime CPU, batch 1, "
                f"{s['prompt_len']}-token prompt, {s['new_tokens']} new tokens (best of repeats)",
            )

    emit(result, args.json, table)
    return result


if __name__ == "__main__":
    main()
