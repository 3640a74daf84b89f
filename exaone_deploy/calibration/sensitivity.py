"""Per-layer sensitivity: the perplexity added by quantizing one decoder layer (or the LM head) alone.

Calibration runs once; then for each unit the plan is applied to that unit's linears only, the bundle is
written to a scratch directory and its perplexity measured on the evaluation text. Units whose increase is
largest are the ones to pass to ``--keep-float``.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..text.corpus import token_stream
from ..text.tokenizer import Tokenizer
from ..validate.ppl import perplexity
from .graph import find_linears
from .quantize import QuantOptions, calibrate, open_source, write_quantized_bundle

__all__ = ["LayerSensitivity", "sensitivity", "format_table"]


@dataclass
class LayerSensitivity:
    unit: str  # "0", "1", ..., "lm_head": what --keep-float accepts
    linears: int
    ppl: float
    increase_pct: float  # over the float model


def sensitivity(
    model_dir: str | Path,
    eval_data: str | Path,
    options: QuantOptions,
    *,
    seq_len: int = 256,
    max_tokens: int | None = 16384,
    work_dir: str | Path | None = None,
    progress: bool = False,
) -> dict:
    options.validate()
    work = Path(tempfile.mkdtemp(prefix="exaone-sensitivity-", dir=work_dir))
    try:
        source = open_source(model_dir, work, options.max_seq_len, progress=progress)
        tok = Tokenizer.from_dir(source.bundle)
        tokens, _ = token_stream(eval_data, tok, text_field=options.text_field)
        base = perplexity(source.bundle, eval_data, seq_len=seq_len, max_tokens=max_tokens, tokens=tokens)
        plan, calib, _ = calibrate(source, options, progress=progress)
        import onnx_ir as ir

        linears = find_linears(ir.load(source.bundle / "canonical.onnx").graph)
        units: dict[str, set[str]] = {}
        for lin in linears:
            units.setdefault("lm_head" if lin.layer is None else str(lin.layer), set()).add(lin.name)
        rows = []
        for unit, names in units.items():
            out = work / f"unit-{unit}"
            out.mkdir()
            write_quantized_bundle(source, plan, options, out, include=names, calib=calib, check=False)
            r = perplexity(out, eval_data, seq_len=seq_len, max_tokens=max_tokens, tokens=tokens)
            rows.append(LayerSensitivity(unit, len(names), r.ppl, 100.0 * (r.ppl / base.ppl - 1.0)))
            shutil.rmtree(out, ignore_errors=True)
        source.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows.sort(key=lambda r: -r.increase_pct)
    worst = [r.unit for r in rows if r.increase_pct > 0][: max(1, len(rows) // 8)]
    return {
        "scheme": options.scheme,
        "float_ppl": base.ppl,
        "seq_len": seq_len,
        "tokens": base.tokens,
        "layers": [asdict(r) for r in rows],
        "suggested_keep_float": ",".join(worst),
    }


def format_table(report: dict) -> str:
    lines = [
        f"{report['scheme']}: float ppl {report['float_ppl']:.4f} ({report['tokens']} tokens)",
        f"{'unit':>8}  {'linears':>7}  {'ppl':>10}  {'increase':>9}",
    ]
    for r in report["layers"]:
        lines.append(f"{r['unit']:>8}  {r['linears']:>7}  {r['ppl']:>10.4f}  {r['increase_pct']:>8.3f}%")
    lines.append(f"most sensitive: --keep-float {report['suggested_keep_float']}")
    return "\n".join(lines)
