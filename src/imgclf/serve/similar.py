"""Similar training cases for the server: the model's similar-cases index
(:mod:`imgclf.model.neighbors`), opened once when the app is made, and the feature path that
searches it.

An ONNX export gives class probabilities only, not backbone features, so neighbour requests
use a :class:`~imgclf.model.classifier.Classifier` of the same bundle (the one inside a
:class:`~imgclf.predict.torch_predictor.TorchClassifier` or a
:class:`~imgclf.predict.feature_arrays.FeatureArrayClassifier`, else one loaded here). Its search
runs in the server's one inference thread (a second
:class:`~imgclf.serve.batching.MicroBatcher` sharing the first one's thread), never on the
event loop. A model without an index, or whose index cannot be used, is served without
similar cases, and :attr:`SimilarCases.unavailable` says why."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from imgclf.config import layout
from imgclf.model.metadata import BundleError, read_model_meta

log = logging.getLogger("imgclf")

NO_INDEX = ("this model has no similar-cases index (trained with --no-neighbors, or by an imgclf before it existed); "
            "train it again without --no-neighbors to get similar training cases")


class SimilarCases:
    """The opened index and the Classifier whose backbone features search it."""

    def __init__(self, classifier, index):
        self.classifier = classifier
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def search(self, batch: np.ndarray, k: int) -> list[list]:
        """The ``k`` nearest stored cases of each preprocessed uint8 (N, 3, S, S) image, best
        first (:class:`~imgclf.model.neighbors.Neighbor`); call it in the inference thread."""
        return self.classifier.neighbors_of_arrays(batch, k=k)

    def thumbnail(self, i: int) -> bytes:
        return self.index.thumbnail(i)


def open_similar_cases(model, bundle_dir: str | os.PathLike | None, *, enabled: bool = True, weights=None, cache_dir=None) -> tuple[SimilarCases | None, str | None]:
    """(SimilarCases, None) when ``model``'s bundle has a usable index, else (None, why not).

    The index is read and hash-checked now, and the backbone built now, so the first request
    does not pay for it and no request loads anything."""
    if not enabled:
        return None, "similar cases are turned off on this server (--max-neighbors 0)"
    classifier = getattr(model, "clf", None)  # TorchClassifier, FeatureArrayClassifier: their own Classifier
    if classifier is not None and getattr(classifier, "meta_", None) is not None:
        entry = classifier.meta_.neighbors
    else:
        classifier = None
        meta_path = Path(bundle_dir) / layout.MODEL_META if bundle_dir is not None else None
        if meta_path is None or not meta_path.is_file():
            return None, NO_INDEX
        try:
            entry = read_model_meta(meta_path).neighbors
        except BundleError as e:
            return None, f"similar cases unavailable: {e}"
    if not entry:
        return None, NO_INDEX
    try:
        if classifier is None:
            from imgclf.model.classifier import Classifier  # torch: only when there is an index to search

            classifier = Classifier.load(bundle_dir, weights=weights, cache_dir=cache_dir, use_cache=False, progress=False)
        index = classifier.neighbor_index()
        classifier.backbone_runner().get()
        if index.method != "exact":  # the faiss index is built now, not inside the first request's inference turn
            index.search(np.zeros((1, index.features.shape[1]), np.float32), 1)
    except Exception as e:  # noqa: BLE001 - a bad or missing index leaves the classifier itself servable
        reason = " ".join(str(e).split()) or type(e).__name__
        log.warning("serving without similar cases: %s", reason)
        return None, f"similar cases unavailable: {reason}"
    log.info("similar cases: %d training images indexed (%s search)", len(index), index.method)
    return SimilarCases(classifier, index), None
