"""What every predictor offers, so ``imgclf predict`` and serve need not know which engine
runs the model: files → rows (:class:`Predictor`) and pixels → probabilities (:class:`ArrayPredictor`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from imgclf.export.metadata import Decision, bundle_hashes, resize_policy_text


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


class BundleArrays:
    """What an array predictor built on a bundle's loaded
    :class:`~imgclf.model.classifier.Classifier` (``clf``) reports: class names, the input it
    takes, its decision rule, its id and :meth:`info`, the same for each engine behind it."""

    def __init__(self, clf, bundle_dir: str | os.PathLike, engine: str, *, bundle_id: str | None = None):
        self.clf = clf
        self.path = bundle_dir
        self.class_names_ = list(clf.class_names_)
        self.preprocessing = clf.backbone_runner().spec.preprocessing
        self.input_size = self.preprocessing.input_size
        self.decision = Decision.for_model(clf.meta_)
        self.model_id = bundle_id or bundle_hashes(bundle_dir)["bundle_id"]
        self.engine = engine

    def info(self) -> dict:
        p = self.preprocessing
        return {
            "model_id": self.model_id, "engine": self.engine, "class_names": self.class_names_, "input_size": self.input_size,
            "resize_policy": resize_policy_text(p), "preprocessing": p.to_dict(), "threshold": self.decision.to_dict(),
            "decision": self.decision.description, "backbone": self.clf.meta_.backbone_name, "source": str(self.path), "quantization": None,
        }
