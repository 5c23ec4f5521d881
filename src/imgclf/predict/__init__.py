"""Prediction from a saved model: one Predictor protocol, the ONNX export or the feature path behind it."""
