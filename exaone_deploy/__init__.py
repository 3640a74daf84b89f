"""exaone-deploy: EXAONE 4.0 from a Hugging Face checkpoint to ONNX Runtime and TensorRT.

    from exaone_deploy import export, quantize, load

The names are resolved on first use (:mod:`exaone_deploy.api`), so ``import exaone_deploy`` imports nothing
heavy: no torch, onnx or onnxruntime until a function that needs them runs.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["export", "quantize", "load", "Model", "ExaoneDeployError", "__version__"]

_LAZY = {"export": "api", "quantize": "api", "load": "api", "Model": "api", "ExaoneDeployError": "errors"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
