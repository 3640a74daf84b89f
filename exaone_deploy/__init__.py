"""exaone-deploy: EXAONE 4.0 from a Hugging Face checkpoint to ONNX Runtime and TensorRT."""

__version__ = "0.1.0"
