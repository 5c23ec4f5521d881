"""ONNX export of a whole model (uint8 in, probabilities out), parity-checked, optionally int8."""
