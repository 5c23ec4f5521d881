"""What every predictor offers, so ``imgclf predict`` and serve need not know which engine
runs the model: files → rows (:class:`Predictor`) and pixels → probabilities (:class:`ArrayPredictor`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Predictor(Protocol):
    """Image files in, predictions out (:class:`~imgclf.predict.onnx_predictor.OnnxClassifier`,
    :class:`~imgclf.model.classifier.Classifier`).

    Unreadable files get NaN probabilities, ``None`` predictions and their reason in
    ``errors_`` (path → message) after each call.
    """

    class_names_: list[str]
    errors_: dict[str, str]

    def predict_proba(self, paths: Sequence[str | os.PathLike]) -> np.ndarray: ...

    def predict(self, paths: Sequence[str | os.PathLike]) -> list[str | None]: ...

    def predict_table(self, paths: Sequence[str | os.PathLike]) -> list[dict]: ...


@runtime_checkable
class ArrayPredictor(Protocol):
    """Already resized/cropped uint8 pixels in, probabilities out, with the metadata a server
    reports (:class:`~imgclf.predict.onnx_predictor.OnnxClassifier`,
    :class:`~imgclf.predict.torch_predictor.TorchClassifier`,
    :class:`~imgclf.predict.feature_arrays.FeatureArrayClassifier`)."""

    class_names_: list[str]
    input_size: int
    model_id: str
    engine: str

    @property
    def preprocessing(self): ...

    @property
    def decision(self): ...

    def predict_proba_arrays(self, batch: np.ndarray) -> np.ndarray: ...

    def info(self) -> dict: ...


def as_nchw_uint8(batch: np.ndarray, size: int) -> np.ndarray:
    """Accept uint8 (N,3,S,S) or (N,S,S,3) (or one image without N); return contiguous NCHW."""
    a = np.asarray(batch)
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB pixels 0..255, got dtype {a.dtype}")
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise ValueError(f"expected a batch (N,3,{size},{size}) or (N,{size},{size},3), got shape {a.shape}")
    if a.shape[1:] == (3, size, size):
        return np.ascontiguousarray(a)
    if a.shape[1:] == (size, size, 3):
        return np.ascontiguousarray(a.transpose(0, 3, 1, 2))
    raise ValueError(f"expected a batch (N,3,{size},{size}) or (N,{size},{size},3), got shape {a.shape}")
