"""Text side shared by the runtime and calibration: tokenizer, chat template, detokenizer, output parsing (no torch, no onnx)."""
