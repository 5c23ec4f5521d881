"""The feature path (backbone engine, then head) behind the array interface a server uses.

``imgclf serve --engine auto`` serves this instead of the ONNX export where the measured
choice that ``predict --engine auto`` makes (:func:`~imgclf.predict.choose.auto_choice`) is
the feature path: on a CPU with native bf16, OpenVINO's bf16 features beat the fp32 export
and stay within the parity bound of its probabilities. Its :class:`Classifier` also gives
the server's similar-cases search its features, so one backbone serves both.
"""

from __future__ import annotations

import os

import numpy as np

from imgclf.predict.base import BundleArrays, as_nchw_uint8


class FeatureArrayClassifier(BundleArrays):
    """Already resized/cropped uint8 pixels → the model's probabilities through its feature path."""

    def __init__(self, clf, bundle_dir: str | os.PathLike, *, bundle_id: str | None = None, measured: dict | None = None):
        """``clf``: the bundle's loaded :class:`~imgclf.model.classifier.Classifier`;
        ``measured``: the engine choice that picked this path (reported by :meth:`info`)."""
        engine = clf.backbone_runner().get()
        super().__init__(clf, bundle_dir, f"features ({engine.name} {engine.precision})", bundle_id=bundle_id)
        self.measured = {k: measured[k] for k in ("features_img_s", "onnx_img_s", "max_abs_diff") if k in (measured or {})}

    def predict_proba_arrays(self, batch: np.ndarray) -> np.ndarray:
        x = as_nchw_uint8(batch, self.input_size)
        if not len(x):
            return np.zeros((0, len(self.class_names_)), np.float32)
        return self.clf._proba_from_features(self.clf.backbone_runner().get()(x)).astype(np.float32)

    def info(self) -> dict:
        return {**super().info(), **({"engine_choice": self.measured} if self.measured else {})}
