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

from imgclf.export.metadata import Decision, bundle_hashes, resize_policy_text
from imgclf.predict.base import as_nchw_uint8


class FeatureArrayClassifier:
    """Already resized/cropped uint8 pixels → the model's probabilities through its feature path."""

    def __init__(self, clf, bundle_dir: str | os.PathLike, *, measured: dict | None = None):
        """``clf``: the bundle's loaded :class:`~imgclf.model.classifier.Classifier`;
        ``measured``: the engine choice that picked this path (reported by :meth:`info`)."""
        self.clf = clf
        self.path = bundle_dir
        self.class_names_ = list(clf.class_names_)
        self.preprocessing = clf.backbone_runner().spec.preprocessing
        self.input_size = self.preprocessing.input_size
        self.decision = Decision.for_model(clf.meta_)
        self.model_id = bundle_hashes(bundle_dir)["bundle_id"]
        engine = clf.backbone_runner().get()
        self.engine = f"features ({engine.name} {engine.precision})"
        self.measured = dict(measured or {})

    def predict_proba_arrays(self, batch: np.ndarray) -> np.ndarray:
        x = as_nchw_uint8(batch, self.input_size)
        if not len(x):
            return np.zeros((0, len(self.class_names_)), np.float32)
        return self.clf._proba_from_features(self.clf.backbone_runner().get()(x)).astype(np.float32)

    def info(self) -> dict:
        p = self.preprocessing
        speeds = {k: self.measured[k] for k in ("features_img_s", "onnx_img_s", "max_abs_diff") if k in self.measured}
        return {
            "model_id": self.model_id, "engine": self.engine, "class_names": self.class_names_, "input_size": self.input_size,
            "resize_policy": resize_policy_text(p), "preprocessing": p.to_dict(), "threshold": self.decision.to_dict(),
            "decision": self.decision.description, "backbone": self.clf.meta_.backbone_name, "source": str(self.path), "quantization": None,
            **({"engine_choice": speeds} if speeds else {}),
        }
