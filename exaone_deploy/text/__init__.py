"""Text side shared by the runtime, calibration and validation: tokenizer, chat template, detokenizer, output
parsing, and corpus files (text / JSONL / chat -> token streams). No torch, no onnx."""
