"""A trained model: heads, the pickle-free bundle and its metadata, loading for inference."""
