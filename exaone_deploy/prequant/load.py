"""A pre-quantized checkpoint's linears, read with its scheme: the entry point for export and verify."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .config import PrequantConfigError, PrequantScheme, read_scheme
from .formats import LINEAR_SUFFIXES, Fp8Weight, IntWeight, read_linear
from .st import SafetensorsDir

__all__ = ["dequantized_linears", "iter_quantized_linears"]

# The tensor that marks a linear as quantized, per format (a linear without it is left in float).
_MARKER = {"gptq": "qweight", "awq": "qweight", "fp8": "weight_scale_inv", "compressed-tensors": "weight_scale"}


def iter_quantized_linears(
    model_dir: str | Path, scheme: PrequantScheme | None = None
) -> Iterator[tuple[str, IntWeight | Fp8Weight]]:
    """Yield (module name, weight) for every quantized linear of the checkpoint, in name order.

    A linear listed as ignored must be stored in float (``<module>.weight``); one that is neither
    quantized nor ignored is an error naming it.
    """
    model_dir = Path(model_dir)
    scheme = scheme or read_scheme(model_dir)
    if scheme is None:
        raise PrequantConfigError(f"{model_dir}: no quantization_config in config.json or quantize_config.json")
    st = SafetensorsDir(model_dir)
    modules = sorted({n.rpartition(".")[0] for n in st.names() if n.rpartition(".")[0].endswith(LINEAR_SUFFIXES)})
    for module in modules:
        if f"{module}.{_MARKER[scheme.method]}" in st:
            yield module, read_linear(st.__getitem__, module, scheme)
        elif f"{module}.weight" not in st or not scheme.is_ignored(module):
            raise PrequantConfigError(
                f"{model_dir}: {module} is neither quantized as {scheme.method} nor listed as left unquantized"
            )


def dequantized_linears(model_dir: str | Path) -> dict[str, np.ndarray]:
    """{"<module>.weight": float32 [out, in]} for every quantized linear, dequantized exactly."""
    return {f"{m}.weight": w.dequantize() for m, w in iter_quantized_linears(model_dir)}
