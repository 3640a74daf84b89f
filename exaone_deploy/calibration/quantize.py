"""``exaone-deploy quantize``: checkpoint (or fp32 bundle) + calibration text -> quantized bundle.

1. Export an fp32 bundle (skipped when given one): its canonical graph is the starting point.
2. Tokenise the calibration file into N samples of L tokens (data.py).
3. Run them through the fp32 graph in ONNX Runtime, collecting the linear layers' input statistics (stats.py).
4. Plan per input group: SmoothQuant scales (int8-sq), AWQ scale and clip search (int4-awq), activation ranges
   by max / percentile / entropy (int8-sq, fp8).
5. Rewrite the canonical graph (rewrite.py), lower it for the target, check both graphs, write the bundle with
   the quantization recorded in its manifest, and move it into place atomically.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .. import bundle as bundle_mod
from ..checkpoint import resolve_model_dir
from ..errors import ExaoneDeployError
from ..exporter import writer
from ..exporter.export import CANONICAL_FILE, ExportOptions, check_kv_cache, export_bundle, graph_io
from ..graph_io import GraphIO
from ..spec import load_spec
from ..text.corpus import CalibrationSet, calibration_samples
from ..text.tokenizer import Tokenizer
from . import kvcache
from . import numerics as nq
from . import stats as stats_mod
from .graph import InputGroup, find_linears, input_groups, resolve_keep_float
from .rewrite import SCHEMES, GroupPlan, Plan, apply_plan, fold_target

log = logging.getLogger(__name__)

__all__ = [
    "QuantizeError",
    "QuantOptions",
    "quantize",
    "METHODS",
    "SCHEMES",
    "open_source",
    "calibrate",
    "make_plan",
    "write_quantized_bundle",
]

METHODS = ("max", "percentile", "entropy")
LM_HEADS = ("same", "int8")
BLOCK_SIZES = (32, 64, 128)


class QuantizeError(ExaoneDeployError, ValueError):
    pass


@dataclass(frozen=True)
class QuantOptions:
    scheme: str
    calib_data: Path | None = None
    target: str = "ort"
    calib_samples: int = 64
    calib_seq_len: int = 256
    seed: int = 0
    text_field: str = "text"
    data_format: str = "auto"
    keep_float: tuple[str, ...] = ()
    block_size: int = 32
    alpha: float = 0.5
    method: str = "max"
    percentile: float = 99.99
    awq_tokens: int = 512  # tokens the AWQ scale search evaluates (the clip search uses all of them)
    max_seq_len: int | None = None
    lm_head: str = "same"  # int4 schemes: "same" = INT4 head; "int8" = 8-bit head (llama.cpp keeps it at Q6_K)
    kv_cache: str = "float"  # "int8": INT8 KV cache, scales calibrated on the quantized graph (kvcache.py)

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantizeError(f"unknown scheme {self.scheme!r} (choose from {', '.join(SCHEMES)})")
        if self.target not in ("ort", "trt"):
            raise QuantizeError(f"unknown target {self.target!r} (choose from ort, trt)")
        if self.method not in METHODS:
            raise QuantizeError(f"unknown calibration method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.scheme == "fp8" and self.method == "entropy":
            raise QuantizeError(
                "--method entropy fits INT8's 128 uniform levels, not FP8's; use max or percentile with fp8"
            )
        if self.lm_head not in LM_HEADS:
            raise QuantizeError(f"unknown LM head quantization {self.lm_head!r} (choose from {', '.join(LM_HEADS)})")
        if self.block_size not in BLOCK_SIZES:
            raise QuantizeError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}")
        if not 0.0 <= self.alpha <= 1.0:
            raise QuantizeError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 < self.percentile <= 100.0:
            raise QuantizeError(f"--percentile must be in (0, 100], got {self.percentile}")
        check_kv_cache(self.kv_cache, self.target, QuantizeError)
        if self.calib_data is None and self.needs_calibration:
            raise QuantizeError(
                f"scheme {self.scheme} needs --calib-data"
                if self.scheme != "int4-rtn"
                else "--kv-cache int8 needs --calib-data (the cache scales are calibrated)"
            )

    @property
    def needs_calibration(self) -> bool:
        return self.scheme != "int4-rtn" or self.kv_cache == "int8"


@dataclass
class Source:
    """An fp32 bundle to start from (exported into a temporary directory when given a checkpoint)."""

    bundle: Path
    model_dir: Path  # where the tokenizer and config come from
    spec: object
    tmp: Path | None = None

    def close(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def open_source(
    model_dir: str | Path, work_dir: Path, max_seq_len: int | None = None, progress: bool = False
) -> Source:
    """An fp32 bundle for ``model_dir``: the directory itself if it is one, else a fresh export."""
    src = resolve_model_dir(model_dir)
    if (src / bundle_mod.MANIFEST).exists():
        manifest = bundle_mod.load_manifest(src, verify=False)
        if manifest.dtype != "float32" or manifest.get("quantization"):
            raise QuantizeError(
                f"{src}: quantize starts from a float32 bundle or a checkpoint, not a "
                f"{manifest.dtype} {'quantized ' if manifest.get('quantization') else ''}bundle"
            )
        if not manifest.data["files"].get("canonical"):
            raise QuantizeError(f"{src}: the bundle has no canonical graph to quantize")
        return Source(src, src, manifest.spec)
    if not (src / "config.json").exists():
        raise QuantizeError(f"{src}: neither a checkpoint (config.json) nor a bundle (manifest.json)")
    tmp = Path(tempfile.mkdtemp(prefix=".fp32-", dir=work_dir))
    out = tmp / "bundle"
    try:
        export_bundle(src, out, ExportOptions("ort", "float32", max_seq_len), progress=progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Source(out, src, load_spec(src), tmp)


def calibrate(
    source: Source, options: QuantOptions, progress: bool = False
) -> tuple[Plan, CalibrationSet | None, dict]:
    """Calibration data -> statistics -> plan. Returns (plan, calibration set, timings)."""
    spec = source.spec
    timings = {}
    calib = None
    if options.needs_calibration:
        t = time.perf_counter()
        tok = Tokenizer.from_dir(source.model_dir if (source.model_dir / "tokenizer.json").exists() else source.bundle)
        calib = calibration_samples(
            options.calib_data,
            tok,
            options.calib_samples,
            options.calib_seq_len,
            seed=options.seed,
            text_field=options.text_field,
            fmt=options.data_format,
        )
        timings["tokenize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model = stats_mod.CalibrationModel(source.bundle, spec) if calib is not None else None
    canonical = ir.load(source.bundle / CANONICAL_FILE)
    linears = find_linears(canonical.graph)
    groups = input_groups(linears)
    stats = None
    if model is not None:
        awq = options.block_size if options.scheme == "int4-awq" else None
        stats = stats_mod.collect(model, calib.tokens, awq_block=awq, awq_tokens=options.awq_tokens, progress=progress)
    timings["statistics_s"] = time.perf_counter() - t
    t = time.perf_counter()
    plan = make_plan(options, spec, groups, stats, model, calib, progress=progress)
    timings["plan_s"] = time.perf_counter() - t
    return plan, calib, timings


def make_plan(
    options: QuantOptions,
    spec,
    groups: list[InputGroup],
    stats: dict | None,
    model=None,
    calib: CalibrationSet | None = None,
    progress: bool = False,
) -> Plan:
    plan = Plan(
        options.scheme,
        options.block_size,
        {},
        (spec.num_heads, spec.num_kv_heads, spec.head_dim),
        lm_head=options.lm_head,
    )
    by_name = {m.name: m for g in groups for m in g.members}

    def tie_for(g: InputGroup):
        producer = fold_target(g, by_name)
        if producer is not None and producer.kind == "v_proj":
            return lambda v, reduce="max": nq.tie_heads(v, *plan.heads, reduce=reduce)
        return None

    def weights(g: InputGroup) -> list[np.ndarray]:
        return [np.asarray(m.weight.const_value.numpy(), dtype=np.float32) for m in g.members]

    from tqdm.auto import tqdm

    for g in tqdm(groups, desc=f"plan ({options.scheme})", disable=not progress, leave=False):
        gp = plan.groups[g.name] = GroupPlan()
        st = stats[g.name] if stats else None
        tie = tie_for(g)
        if options.scheme == "int8-sq":
            w_absmax = np.max([np.abs(w).max(axis=1) for w in weights(g)], axis=0)
            x_absmax = st.absmax.astype(np.float64)
            if tie is not None:
                w_absmax, x_absmax = tie(w_absmax), tie(x_absmax)
            gp.smooth = nq.smoothquant_scales(x_absmax, w_absmax, options.alpha)
            gp.act_amax = float((st.absmax / gp.smooth).max())
        elif options.scheme == "fp8":
            gp.act_amax = float(st.absmax.max())
        elif options.scheme == "int4-awq" and not any(plan.head_int8(m) for m in g.members):
            ws = weights(g)
            tie_mean = (lambda v, tie=tie: tie(v, "mean")) if tie is not None else None
            s, ratio, err, err0 = nq.awq_search_scale(st.tokens, st.meanabs, ws, options.block_size, tie=tie_mean)
            gp.smooth = s if ratio > 0 else None
            gp.info = {"awq_ratio": ratio, "awq_error_gain": (err0 / err) if err > 0 else 1.0}
            s_vec = s if ratio > 0 else np.ones(g.in_features, np.float32)
            sb = nq.pad_rows(s_vec[:, None], options.block_size).reshape(-1, options.block_size)  # padding: 0
            sb = np.where(sb == 0, 1.0, sb)
            gram = st.gram / (sb[:, :, None] * sb[:, None, :])
            for m, w in zip(g.members, ws):
                if m.kind in ("q_proj", "k_proj"):  # as AWQ: clipping q/k disturbs attention scores
                    continue
                gp.clip[m.name] = nq.awq_search_clip(w * s_vec[:, None], gram, options.block_size)
    if options.scheme in ("int8-sq", "fp8") and options.method != "max":
        inv = {
            g.name: (1.0 / plan.groups[g.name].smooth if plan.groups[g.name].smooth is not None else None)
            for g in groups
        }
        stats_mod.collect_histograms(model, calib.tokens, stats, inv, progress=progress)
        for g in groups:
            st = stats[g.name]
            plan.groups[g.name].act_amax = nq.amax_from_histogram(
                st.hist, st.hist_max, options.method, options.percentile
            )
    return plan


def write_quantized_bundle(
    source: Source,
    plan: Plan,
    options: QuantOptions,
    out_tmp: Path,
    include: set[str] | None = None,
    calib: CalibrationSet | None = None,
    check: bool = True,
    extra_info: dict | None = None,
    smooth_only: bool = False,
) -> dict:
    """Apply the plan to the source's canonical graph and write a complete bundle into ``out_tmp``.

    ``smooth_only`` applies the smoothing but keeps every weight in float (a check that the folds are exact).
    """
    model = ir.load(source.bundle / CANONICAL_FILE)
    linears = find_linears(model.graph)
    keep = resolve_keep_float(list(options.keep_float), linears)
    names = {lin.name for lin in linears}
    include = (names - keep) if include is None else (include & names) - keep
    summary = apply_plan(model, plan, options.target, include, quantize=not smooth_only)
    src_manifest = bundle_mod.load_manifest(source.bundle, verify=False)
    io = graph_io(
        source.spec,
        ExportOptions(options.target, "float32", kv_cache=options.kv_cache),
        max_seq_len=src_manifest.max_seq_len,
    )
    if options.kv_cache == "int8":
        io = _calibrate_kv_cache(source, model, io, calib)
    model.doc_string = f"EXAONE 4 canonical graph, {options.scheme} quantized for {options.target} by exaone-deploy"
    info = {
        "scheme": options.scheme,
        "target": options.target,
        "method": options.method if options.scheme in ("int8-sq", "fp8") else None,
        "alpha": options.alpha if options.scheme == "int8-sq" else None,
        "percentile": options.percentile if options.method == "percentile" else None,
        "block_size": options.block_size if options.scheme.startswith("int4") else None,
        "lm_head": options.lm_head if options.scheme.startswith("int4") else None,
        "calibration": calib.describe() if calib is not None else None,
        "keep_float": sorted(names - include),
        "quantized": len(summary),
        "kv_cache": options.kv_cache,
        "layers": summary,
        **(extra_info or {}),
    }
    # The same contract and lowering as an export of the source for this target (fusions included).
    writer.write_into(
        out_tmp,
        model,
        io,
        options.target,
        source_dir=source.model_dir,
        tokenizer_dirs=(source.bundle, source.model_dir),
        extra={"quantization": info},
        check=check,
    )
    return info


def _calibrate_kv_cache(source: Source, model: ir.Model, io: GraphIO, calib: CalibrationSet | None) -> GraphIO:
    """Per-channel K/V ranges of the rewritten (quantized) graph over the calibration samples -> the INT8 cache
    scales as initializers of ``model``; returns ``io`` with their source recorded."""
    if calib is None:
        raise QuantizeError("--kv-cache int8 needs calibration samples (--calib-data)")
    cm = stats_mod.CalibrationModel(source.bundle, source.spec, canonical=model, linears=False, kv_cache=True)
    amax = stats_mod.collect_kv(cm, calib.tokens)
    del cm
    kvcache.add_scale_initializers(model, io, amax)
    d = calib.describe()
    return dataclasses.replace(
        io,
        kv_scales=f"calibrated: per-channel max |k| (after RoPE) and |v| of the quantized "
        f"graph over {d['samples']} x {d['seq_len']} tokens of {d['file']}",
    )


def quantize(
    model_dir: str | Path, out_dir: str | Path, options: QuantOptions, *, force: bool = False, progress: bool = False
) -> dict:
    """Quantize a checkpoint or fp32 bundle into a new bundle (written atomically). Returns the manifest's
    ``quantization`` record plus timings."""
    options.validate()
    out = Path(out_dir)
    t0 = time.perf_counter()
    with bundle_mod.atomic_dir(out, force=force, error=QuantizeError) as tmp:
        source = open_source(model_dir, out.parent, options.max_seq_len, progress=progress)
        try:
            plan, calib, timings = calibrate(source, options, progress=progress)
            log.info(
                "%s: calibrated on %s (%.1f s statistics, %.1f s plan)",
                options.scheme,
                calib.describe() if calib else "no data",
                timings["statistics_s"],
                timings["plan_s"],
            )
            t = time.perf_counter()
            info = write_quantized_bundle(source, plan, options, tmp, calib=calib)
            timings["write_s"] = time.perf_counter() - t
        finally:
            source.close()
    log.info(
        "%s: %d linears quantized for %s, %d kept float -> %s",
        options.scheme,
        info["quantized"],
        options.target,
        len(info["keep_float"]),
        out,
    )
    timings["total_s"] = time.perf_counter() - t0
    return {**info, "timings": timings, "bundle": str(out)}
