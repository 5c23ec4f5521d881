"""Frozen-backbone inference: ONNX Runtime / OpenVINO / PyTorch runtimes, the checksummed feature cache, extraction."""
