"""The whole model on eager PyTorch (fp32) behind the same array interface as an ONNX export:
what serve falls back to when there is no usable export."""

from __future__ import annotations

import os

import numpy as np

from imgclf.export.graph import classifier_graph, eager_proba
from imgclf.model.bundle import resolve_bundle_dir
from imgclf.predict.base import BundleArrays, as_nchw_uint8


class TorchClassifier(BundleArrays):
    """The same array interface as :class:`~imgclf.predict.onnx_predictor.OnnxClassifier`, on the eager PyTorch graph (fp32)."""

    def __init__(self, model: str | os.PathLike, *, weights=None, cache_dir=None):
        from imgclf.model.classifier import Classifier

        d = resolve_bundle_dir(model)
        super().__init__(Classifier.load(d, weights=weights, engine="torch", precision="fp32", cache_dir=cache_dir, use_cache=False), d, "torch")
        self.graph = classifier_graph(self.clf)

    def predict_proba_arrays(self, batch: np.ndarray) -> np.ndarray:
        x = as_nchw_uint8(batch, self.input_size)
        if not len(x):
            return np.zeros((0, len(self.class_names_)), np.float32)
        return eager_proba(self.graph, x, batch_size=32)
