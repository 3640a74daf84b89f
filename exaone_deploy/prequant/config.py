"""Recognise a pre-quantized checkpoint's ``quantization_config`` and map it onto :class:`PrequantScheme`.

Sources, in order: ``quantization_config`` in config.json (as transformers, AutoAWQ, llm-compressor and
GPTQModel write it), else a separate ``quantize_config.json`` (as AutoGPTQ / GPTQModel write it beside the
weights). Field spellings follow the writers:

* GPTQ: GPTQModel ``QuantizeConfig.to_dict`` (gptqmodel/quantization/config.py): ``bits``, ``group_size``,
  ``desc_act``, ``sym``, ``lm_head``, ``quant_method``/``method``, ``checkpoint_format``/``format``,
  ``pack_dtype``, ``dynamic`` (per-module overrides), ``meta``; older AutoGPTQ files spell the same
  fields, with ``is_marlin_format`` for marlin packing.
* AWQ: AutoAWQ ``AwqConfig.to_transformers_dict`` (awq/models/_config.py): ``quant_method``, ``zero_point``,
  ``group_size``, ``bits``, ``version``, ``modules_to_not_convert``.
* FP8 block: transformers ``FineGrainedFP8Config`` / the DeepSeek-V3 spelling: ``quant_method`` "fp8",
  ``fmt`` "e4m3", ``activation_scheme``, ``weight_block_size``, ``modules_to_not_convert`` (vLLM/SGLang
  writers use ``ignored_layers``).
* compressed-tensors (llm-compressor): ``quant_method`` "compressed-tensors", ``format``, ``config_groups``
  of ``{targets, weights: {num_bits, type, symmetric, strategy, group_size, block_structure, actorder},
  input_activations}``, ``ignore``. ``actorder: group`` (a stored g_idx) is refused: compressed-tensors
  0.20's own decompressor no longer applies one (``QuantizationArgs.actorder`` docs), so there is no
  reference reading to match.

Everything we cannot import exactly is refused with one line naming the file, the field and its value
(3-bit and 2-bit codes, marlin/bitblas/exllama/GEMV packings, per-module bit overrides, static activation
scales, several config groups...). Rejected alternative: a best-effort "load what we can": a silently
mis-read packing yields a model that runs and outputs garbage, the worst failure for a deployment tool.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExaoneDeployError

__all__ = ["PrequantConfigError", "PrequantScheme", "read_scheme", "scheme_from_dict"]


class PrequantConfigError(ExaoneDeployError, ValueError):
    """A quantization_config we refuse; the one-line message names the file, the field and the value."""


@dataclass(frozen=True)
class PrequantScheme:
    """What a pre-quantized checkpoint's linears hold, independent of the writer's spelling.

    ``group_size`` is as written: -1 means one group spanning the whole input dim (use :meth:`groups`).
    ``ignore`` lists module names (or ``re:`` patterns, compressed-tensors style) left unquantized.
    """

    method: str  # "gptq" | "awq" | "fp8" | "compressed-tensors"
    bits: int
    group_size: int | None = None  # int formats; -1 = whole input dim
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str | None = None  # gptq: "gptq" (zeros stored minus 1) | "gptq_v2"
    zero_point: bool = False  # codes carry a zero point (gptq: not sym; awq: zero_point)
    weight_type: str = "int"  # "int" | "float" (fp8 e4m3)
    strategy: str | None = None  # compressed-tensors: "group" | "channel" | "block" | "tensor"
    weight_block_size: tuple[int, int] | None = None
    activation_scheme: str | None = None  # fp8: "dynamic" (static scales are refused)
    ignore: tuple[str, ...] = ()
    quantize_lm_head: bool = False
    source: str = ""

    def group_of(self, in_features: int) -> int:
        """The group size for a linear with ``in_features`` inputs (-1 and channel strategy: all of them)."""
        g = self.group_size
        return in_features if g is None or g == -1 else g

    def is_ignored(self, module: str) -> bool:
        """Whether ``module`` (e.g. "model.layers.0.mlp.down_proj") is listed as left unquantized."""
        for pat in self.ignore:
            if pat.startswith("re:"):
                if re.match(pat[3:], module):
                    return True
            elif module == pat or module.endswith("." + pat):
                return True
        return module == "lm_head" and not self.quantize_lm_head and self.method in ("gptq", "awq")


def _refuse(source: str, field: str, value, why: str) -> PrequantConfigError:
    return PrequantConfigError(f"{source}: unsupported quantization_config.{field} = {value!r} ({why})")


def _need(q: dict, source: str, field: str, allowed, why: str, default=None, label: str = ""):
    value = q.get(field, default)
    if value not in allowed:
        raise _refuse(source, label + field, value, why)
    return value


def _ignore_list(q: dict, *fields: str) -> tuple[str, ...]:
    out: list[str] = []
    for f in fields:
        out += list(q.get(f) or ())
    return tuple(out)


def _gptq(q: dict, source: str) -> PrequantScheme:
    if q.get("is_marlin_format"):
        raise _refuse(source, "is_marlin_format", True, "marlin-packed GPTQ; re-save in gptq format")
    fmt_field = "checkpoint_format" if "checkpoint_format" in q else "format"
    fmt = _need(
        q,
        source,
        fmt_field,
        ("gptq", "gptq_v2"),
        "only the gptq and gptq_v2 packings are read; marlin/bitblas/qqq/gptq_p are not",
        "gptq",
    )
    bits = _need(q, source, "bits", (4, 8), "only 4- and 8-bit GPTQ codes are supported")
    if q.get("dynamic"):
        raise _refuse(source, "dynamic", q["dynamic"], "per-module overrides (mixed per-layer bits)")
    _need(q, source, "pack_dtype", ("int32",), "only int32 packing words", "int32")
    group = q.get("group_size", -1)
    if not isinstance(group, int) or (group != -1 and group <= 0):
        raise _refuse(source, "group_size", group, "must be -1 or a positive integer")
    if q.get("lm_head"):
        raise _refuse(
            source,
            "lm_head",
            q["lm_head"],
            "a quantized lm_head is not supported; the LM head is kept in the checkpoint's float precision",
        )
    sym = bool(q.get("sym", True))
    return PrequantScheme(
        "gptq",
        bits,
        group,
        sym=sym,
        desc_act=bool(q.get("desc_act", False)),
        checkpoint_format=fmt,
        zero_point=True,
        quantize_lm_head=bool(q.get("lm_head", False)),
        ignore=_ignore_list(q, "modules_to_not_convert"),
        source=source,
    )


def _awq(q: dict, source: str) -> PrequantScheme:
    _need(
        q,
        source,
        "version",
        ("gemm", "GEMM"),
        "only AutoAWQ's GEMM packing is read; gemv/gemv_fast/exllama/marlin/ipex are not",
        "gemm",
    )
    bits = _need(q, source, "bits", (4,), "AWQ GEMM is 4-bit only", q.get("w_bit"))
    _need(q, source, "zero_point", (True,), "AWQ GEMM checkpoints always carry zero points", True)
    group = q.get("group_size", q.get("q_group_size"))
    if not isinstance(group, int) or (group != -1 and group <= 0):
        raise _refuse(source, "group_size", group, "must be -1 or a positive integer")
    return PrequantScheme(
        "awq", bits, group, sym=False, zero_point=True, ignore=_ignore_list(q, "modules_to_not_convert"), source=source
    )


def _block(value, source: str, field: str) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        raise _refuse(source, field, value, "must be two positive integers [out, in]")
    return int(value[0]), int(value[1])


def _fp8(q: dict, source: str) -> PrequantScheme:
    _need(q, source, "fmt", ("e4m3",), "only float8 e4m3 weights", "e4m3")
    _need(q, source, "activation_scheme", ("dynamic",), "static activation scales are not supported", "dynamic")
    if "scale_fmt" in q and q["scale_fmt"] not in (None, "float32"):
        raise _refuse(source, "scale_fmt", q["scale_fmt"], "only float32 weight_scale_inv")
    if q.get("weight_block_size") is None:
        raise _refuse(source, "weight_block_size", None, "per-tensor fp8 without blocks is not supported")
    block = _block(q["weight_block_size"], source, "weight_block_size")
    return PrequantScheme(
        "fp8",
        8,
        None,
        weight_type="float",
        strategy="block",
        weight_block_size=block,
        activation_scheme="dynamic",
        ignore=_ignore_list(q, "modules_to_not_convert", "ignored_layers"),
        source=source,
    )


def _compressed_tensors(q: dict, source: str) -> PrequantScheme:
    fmt = _need(
        q,
        source,
        "format",
        ("pack-quantized", "float-quantized"),
        "only pack-quantized int4/int8 and float-quantized fp8 are read",
    )
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise _refuse(
            source,
            "config_groups",
            sorted(groups),
            "exactly one config group is supported (several are mixed per-layer schemes)",
        )
    ((name, group),) = groups.items()
    where = f"config_groups.{name}"
    if group.get("format", fmt) != fmt:
        raise _refuse(source, f"{where}.format", group.get("format"), f"differs from format {fmt!r}")
    if group.get("output_activations"):
        raise _refuse(source, f"{where}.output_activations", group["output_activations"], "not supported")
    act = group.get("input_activations")
    if act and not act.get("dynamic"):
        raise _refuse(
            source,
            f"{where}.input_activations.dynamic",
            act.get("dynamic"),
            "static activation scales are not supported",
        )
    w = group.get("weights") or {}
    wtype = "float" if fmt == "float-quantized" else "int"
    _need(w, source, "type", (wtype,), f"{fmt} stores {wtype} weights", label=f"{where}.weights.")
    bits = w.get("num_bits")
    if (wtype, bits) not in (("int", 4), ("int", 8), ("float", 8)):
        raise _refuse(source, f"{where}.weights.num_bits", bits, "only int4, int8 and fp8 weights")
    if w.get("dynamic"):
        raise _refuse(source, f"{where}.weights.dynamic", w["dynamic"], "weights must be statically quantized")
    strategies = ("group", "channel") if wtype == "int" else ("block", "channel", "tensor")
    strategy = w.get("strategy")
    if strategy not in strategies:
        raise _refuse(source, f"{where}.weights.strategy", strategy, f"supported: {', '.join(strategies)}")
    if w.get("actorder") not in (None, "weight"):  # "weight" reorders during calibration only
        raise _refuse(
            source,
            f"{where}.weights.actorder",
            w["actorder"],
            "group activation order (a g_idx) is dropped by compressed-tensors itself; supported: null, weight",
        )
    block = (
        _block(w.get("block_structure"), source, f"{where}.weights.block_structure") if strategy == "block" else None
    )
    group_size = w.get("group_size") if strategy == "group" else -1
    if strategy == "group" and (not isinstance(group_size, int) or group_size <= 0):
        raise _refuse(source, f"{where}.weights.group_size", group_size, "must be a positive integer")
    sym = bool(w.get("symmetric", True))
    return PrequantScheme(
        "compressed-tensors",
        bits,
        group_size if wtype == "int" else None,
        sym=sym,
        zero_point=wtype == "int" and not sym,
        weight_type=wtype,
        strategy=strategy,
        weight_block_size=block,
        activation_scheme="dynamic" if act else None,
        ignore=_ignore_list(q, "ignore"),
        source=source,
    )


_READERS = {"gptq": _gptq, "awq": _awq, "fp8": _fp8, "compressed-tensors": _compressed_tensors}


def scheme_from_dict(q: dict, source: str = "quantization_config") -> PrequantScheme:
    """Map one ``quantization_config`` mapping onto a :class:`PrequantScheme` (``source`` names its file)."""
    if not isinstance(q, dict):
        raise PrequantConfigError(f"{source}: quantization_config is not a JSON object")
    method = q.get("quant_method", q.get("method"))
    method = method.lower() if isinstance(method, str) else method
    if method not in _READERS:
        raise _refuse(
            source, "quant_method", q.get("quant_method", q.get("method")), f"supported: {', '.join(_READERS)}"
        )
    return _READERS[method](q, source)


def read_scheme(model_dir: str | Path) -> PrequantScheme | None:
    """The checkpoint's scheme, or None for a checkpoint with no quantization config (a float one)."""
    model_dir = Path(model_dir)
    config_path, qc_path = model_dir / "config.json", model_dir / "quantize_config.json"
    for path, key in ((config_path, "quantization_config"), (qc_path, None)):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PrequantConfigError(f"{path}: not valid JSON ({e})") from None
        q = data.get(key) if key else data
        if q is not None:
            return scheme_from_dict(q, str(path))
    return None
