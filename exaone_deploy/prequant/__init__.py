"""Pre-quantized checkpoints (GPTQ, AWQ GEMM, FP8 block-scaled, compressed-tensors): recognise, read, write.

NumPy + ml_dtypes only (no torch, no CUDA kernels). :mod:`.config` maps a ``quantization_config`` onto a
:class:`PrequantScheme` or refuses it; :mod:`.formats` reads one linear's tensors into exact integer codes,
scales and zero points (or fp8 values and block scales) and dequantizes them as the reference
implementations do; :mod:`.pack` is the inverse; :mod:`.make` writes test checkpoints.
"""

from .config import PrequantConfigError, PrequantScheme, read_scheme, scheme_from_dict
from .formats import Fp8Weight, IntWeight, read_linear
from .load import dequantized_linears, iter_quantized_linears

__all__ = [
    "Fp8Weight",
    "IntWeight",
    "PrequantConfigError",
    "PrequantScheme",
    "dequantized_linears",
    "iter_quantized_linears",
    "make_prequantized",
    "read_linear",
    "read_scheme",
    "scheme_from_dict",
]


def make_prequantized(src_dir, out_dir, fmt: str, **opts):
    """See :func:`exaone_deploy.prequant.make.make_prequantized` (imported lazily: it needs the bundle writer)."""
    from .make import make_prequantized as make

    return make(src_dir, out_dir, fmt, **opts)
