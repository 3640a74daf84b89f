"""Calibration and quantization: INT8 SmoothQuant, FP8, INT4 AWQ/RTN on the exported graph; perplexity tools.

Modules: data (calibration text -> token samples), stats (activation statistics in ONNX Runtime), numerics
(quantizers, range calibrators, SmoothQuant, AWQ in NumPy), graph (finding the linears), rewrite (the
onnx-ir graph rewrite per scheme and target), quantize (the pipeline), ppl (perplexity), sensitivity
(per-layer report), cli (the click commands). Heavy imports stay inside the modules.

Design choices:

* Quantization happens on the exported canonical ONNX graph, not on torch modules: the graph is what ships,
  the linear layers are plain ``MatMul(x, W^T)`` with named initializers, and one rewrite serves both targets.
  The quantized bundle keeps the layout of an fp32 bundle: ``canonical.onnx`` (quantized, attention still the
  custom op) lowered to ``model.onnx`` exactly as the exporter lowers, sharing ``weights.data``.
* Activation statistics come from running the fp32 graph itself in ONNX Runtime with the linear inputs as
  extra outputs (no torch, the same kernels and attention op as in service, one batch of activations in
  memory). Two passes when a histogram method needs the range first.
* NVIDIA ModelOpt is not used: it quantizes ``torch.nn.Linear`` modules and exports through its own (TorchScript)
  ONNX path, while our graph comes from a dynamo trace with a custom attention op; its FP8/INT4 exports use
  ``trt::`` domain ops that ONNX Runtime cannot run; and its HF integration pins transformers < 5.15. The
  algorithms are reimplemented in NumPy after the published ones: SmoothQuant (s = max|X|^a / max|W|^(1-a)),
  AWQ (grid search of s = mean|X|^r, then per-block clip search), TensorRT's entropy calibration.
* EXAONE 4 is post-norm, so the residual stream feeding q/k/v and gate/up has no norm to fold smoothing into:
  an explicit ``Mul`` is inserted there. o_proj's and down_proj's smoothing folds exactly into v_proj's (tied
  across the query heads of each KV head) and up_proj's output columns.
"""
