"""Frozen-backbone inference: the runtimes (ONNX Runtime / OpenVINO / PyTorch), the runner that picks one, the checksummed feature cache, extraction."""
