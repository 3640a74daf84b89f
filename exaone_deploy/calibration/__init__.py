"""Calibration and quantization: INT8 SmoothQuant, FP8, INT4 AWQ/RTN on the exported graph; perplexity tools.

Modules: data (calibration text -> token samples), stats (activation statistics in ONNX Runtime), numerics
(quantizers, range calibrators, SmoothQuant, AWQ in NumPy), graph (finding the linears), rewrite (the
onnx-ir graph rewrite per scheme and target), quantize (the pipeline), ppl (perplexity), sensitivity
(per-layer report), cli (the click commands). Heavy imports stay inside the modules.
"""
