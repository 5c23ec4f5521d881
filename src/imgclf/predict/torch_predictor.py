"""The whole model on eager PyTorch (fp32) behind the same array interface as an ONNX export:
what serve falls back to when there is no usable export."""

from __future__ import annotations

import os

import numpy as np

from imgclf.export.graph import classifier_graph, eager_proba
from imgclf.export.metadata import Decision, bundle_hashes, resize_policy_text
from imgclf.model.bundle import resolve_bundle_dir
from imgclf.predict.base import as_nchw_uint8


class TorchClassifier:
    """The same array interface as :class:`~imgclf.predict.onnx_predictor.OnnxClassifier`, on the eager PyTorch graph (fp32)."""

    def __init__(self, model: str | os.PathLike, *, weights=None, cache_dir=None):
        from imgclf.model.classifier import Classifier

        d = resolve_bundle_dir(model)
        self.clf = Classifier.load(d, weights=weights, engine="torch", precision="fp32", cache_dir=cache_dir, use_cache=False)
        self.graph = classifier_graph(self.clf)
        self.class_names_ = list(self.clf.class_names_)
        self.preprocessing = self.clf.backbone_runner().spec.preprocessing
        self.input_size = self.preprocessing.input_size
        self.decision = Decision.for_model(self.clf.meta_)
        self.model_id = bundle_hashes(d)["bundle_id"]
        self.engine = "torch"
        self.path = d

    def predict_proba_arrays(self, batch: np.ndarray) -> np.ndarray:
        x = as_nchw_uint8(batch, self.input_size)
        if not len(x):
            return np.zeros((0, len(self.class_names_)), np.float32)
        return eager_proba(self.graph, x, batch_size=32)

    def info(self) -> dict:
        p = self.preprocessing
        return {
            "model_id": self.model_id, "engine": self.engine, "class_names": self.class_names_, "input_size": self.input_size,
            "resize_policy": resize_policy_text(p), "preprocessing": p.to_dict(), "threshold": self.decision.to_dict(),
            "decision": self.decision.description, "backbone": self.clf.meta_.backbone_name, "source": str(self.path), "quantization": None,
        }
