"""Rewrite a float EXAONE 4 checkpoint (e.g. from ``make_tiny``) as a pre-quantized one, for tests.

The seven linears of every layer (q/k/v/o_proj, gate/up/down_proj) are quantized and packed as the
publishers' tools lay them out; embeddings, norms and ``lm_head`` keep the checkpoint's dtype, as every
format's writer leaves them by default. Each tensor stays in the shard its float original was in, and
config.json gains ``quantization_config`` spelled as the real writers spell it (see :func:`quantization_config`;
GPTQ also gets ``quantize_config.json``, as GPTQModel/AutoGPTQ save it). Everything else (tokenizer,
generation config) is copied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..bundle import atomic_dir, is_checkpoint_dir
from . import pack
from .config import scheme_from_dict
from .formats import LINEAR_SUFFIXES
from .st import SafetensorsDir, write_safetensors

__all__ = ["FORMATS", "make_prequantized", "quantization_config"]

FORMATS = ("gptq", "awq", "fp8", "compressed-tensors")


def quantization_config(
    fmt: str,
    *,
    bits: int = 4,
    group_size: int = 32,
    sym: bool = True,
    desc_act: bool = False,
    checkpoint_format: str = "gptq",
    block_size: tuple[int, int] = (128, 128),
    weight_type: str = "int",
    skip: tuple[str, ...] = (),
) -> dict:
    """``quantization_config`` as each writer serializes it.

    * gptq: GPTQModel ``QuantizeConfig.to_dict`` keys (bits, group_size, desc_act, sym, lm_head,
      quant_method, checkpoint_format, pack_dtype, meta{quantizer, uri, damp_percent, ...}).
    * awq: AutoAWQ ``AwqConfig.to_transformers_dict`` (quant_method, zero_point, group_size, bits, version,
      modules_to_not_convert).
    * fp8: the DeepSeek-V3 / transformers ``FineGrainedFP8Config`` spelling (quant_method, fmt,
      activation_scheme, weight_block_size), plus modules_to_not_convert when ``skip`` is given.
    * compressed-tensors: llm-compressor's serialization of ``QuantizationConfig`` (W4A16 / W8A16 preset
      group scheme, or FP8_BLOCK with dynamic per-token-group fp8 activations), ``ignore`` ["lm_head"].
    """
    if fmt == "gptq":
        return {
            "bits": bits,
            "group_size": group_size,
            "desc_act": desc_act,
            "sym": sym,
            "lm_head": False,
            "quant_method": "gptq",
            "checkpoint_format": checkpoint_format,
            "pack_dtype": "int32",
            "meta": {
                "quantizer": ["gptqmodel:5.0.0"],
                "uri": "https://github.com/modelcloud/gptqmodel",
                "damp_percent": 0.05,
                "damp_auto_increment": 0.01,
                "static_groups": False,
                "true_sequential": True,
                "mse": 0.0,
            },
            **({"modules_to_not_convert": list(skip)} if skip else {}),
        }
    if fmt == "awq":
        return {
            "quant_method": "awq",
            "zero_point": True,
            "group_size": group_size,
            "bits": 4,
            "version": "gemm",
            "modules_to_not_convert": list(skip) or None,
        }
    if fmt == "fp8":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block_size),
            **({"modules_to_not_convert": list(skip)} if skip else {}),
        }
    if fmt != "compressed-tensors":
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if desc_act:
        raise ValueError("compressed-tensors has no act-order g_idx layout we import (see prequant.config)")
    if weight_type == "float":
        weights = {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": "block",
            "group_size": None,
            "block_structure": list(block_size),
            "dynamic": False,
            "actorder": None,
            "observer": "minmax",
        }
        acts = {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": "group",
            "group_size": 128,
            "block_structure": None,
            "dynamic": True,
            "actorder": None,
            "observer": None,
        }
        ct_format = "float-quantized"
    else:
        weights = {
            "num_bits": bits,
            "type": "int",
            "symmetric": sym,
            "strategy": "group",
            "group_size": group_size,
            "block_structure": None,
            "dynamic": False,
            "actorder": None,
            "observer": "minmax",
        }
        acts, ct_format = None, "pack-quantized"
    return {
        "quant_method": "compressed-tensors",
        "format": ct_format,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": acts,
                "output_activations": None,
                "format": ct_format,
            }
        },
        "ignore": ["lm_head", *skip],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.12.2",
    }


def _quantize(w: np.ndarray, fmt: str, opts: dict, importance: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Packed tensors (suffix -> array) of one float32 weight [out, in] in ``fmt`` (``importance``: act-order's
    per-input-column ranking, shared by the linears that read the same input)."""
    ct = fmt == "compressed-tensors"
    if fmt == "fp8" or (ct and opts.get("weight_type") == "float"):
        fp8 = pack.quantize_fp8(w, tuple(opts.get("block_size", (128, 128))))
        return pack.pack_fp8(fp8, "weight_scale" if ct else "weight_scale_inv")
    group = w.shape[1] if opts.get("group_size", 32) == -1 else opts.get("group_size", 32)
    g_idx = pack.act_order_g_idx(w, group, importance) if opts.get("desc_act") else None
    sym = fmt != "awq" and opts.get("sym", True)
    scale_dtype = pack.ml_dtypes.bfloat16 if ct else np.float16
    iw = pack.quantize_int(
        w, opts.get("bits", 4) if fmt != "awq" else 4, group, sym=sym, scale_dtype=scale_dtype, g_idx=g_idx
    )
    if fmt == "gptq":
        return pack.pack_gptq(iw, opts.get("checkpoint_format", "gptq"))
    return pack.pack_awq(iw) if fmt == "awq" else pack.pack_compressed_tensors(iw, sym)


SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # linears that read one input


def _shared_importance(src: SafetensorsDir, module: str) -> np.ndarray:
    """Act-order's column ranking for ``module``: the squared column norms summed over the linears that read its
    input (GPTQ's Hessian is the input's, so q/k/v share one order and gate/up another)."""
    parent, _, leaf = module.rpartition(".")
    siblings = next((g for g in SHARED_INPUT if leaf in g), (leaf,))
    names = [f"{parent}.{s}.weight" for s in siblings if f"{parent}.{s}.weight" in src]
    return sum((src[n].astype(np.float64) ** 2).sum(0) for n in names)


def make_prequantized(src_dir: str | Path, out_dir: str | Path, fmt: str, **opts) -> Path:
    """Write ``src_dir``'s float checkpoint to ``out_dir`` with its linears pre-quantized in ``fmt``.

    Args:
        fmt: "gptq" | "awq" | "fp8" | "compressed-tensors".
        opts: :func:`quantization_config`'s keywords: bits (4/8), group_size (default 32, -1 = whole input
            dim; the real checkpoints use 128, wider than the tiny models), sym, desc_act (GPTQ act-order
            g_idx), checkpoint_format ("gptq" | "gptq_v2"), block_size (fp8, default [128, 128]),
            weight_type ("int" | "float", compressed-tensors), skip (module names left unquantized).
    Returns ``out_dir``. The result is deterministic.
    """
    q = quantization_config(fmt, **opts)
    scheme = scheme_from_dict(q, f"make_prequantized({fmt})")  # what we write, we must also accept
    src, out_dir = SafetensorsDir(src_dir), Path(out_dir).absolute()
    shards: dict[str, dict[str, np.ndarray]] = {}
    for name in src.names():
        module, _, leaf = name.rpartition(".")
        tensors = {name: src[name]}
        if leaf == "weight" and module.endswith(LINEAR_SUFFIXES) and not scheme.is_ignored(module):
            importance = _shared_importance(src, module) if opts.get("desc_act") else None
            packed = _quantize(src[name].astype(np.float32), fmt, opts, importance)
            tensors = {f"{module}.{k}": v for k, v in packed.items()}
        shards.setdefault(src.file_of(name), {}).update(tensors)
    config = json.loads((Path(src_dir) / "config.json").read_text())
    config["quantization_config"] = q
    with atomic_dir(out_dir, replaceable=is_checkpoint_dir, error=FileExistsError) as tmp:
        for path in Path(src_dir).iterdir():
            if (
                path.is_file()
                and path.suffix != ".safetensors"
                and path.name not in ("config.json", "model.safetensors.index.json")
            ):
                shutil.copy2(path, tmp / path.name)
        weight_map, total = {}, 0
        for file, tensors in sorted(shards.items()):
            total += write_safetensors(tmp / file, tensors)
            weight_map.update(dict.fromkeys(tensors, file))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        for path, obj in ((tmp / "model.safetensors.index.json", index), (tmp / "config.json", config)) + (
            ((tmp / "quantize_config.json", q),) if fmt == "gptq" else ()
        ):
            path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir
