"""Pretrained backbones: the registry of entries (specs), their weights, the feature extractors built from them, and their blocks."""
