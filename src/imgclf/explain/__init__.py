"""Grad-CAM: where the model looked."""
