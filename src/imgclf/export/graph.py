"""The whole model as one torch module (uint8 NCHW in, probabilities out), test-time views
included: what gets exported, and the PyTorch eager reference it is checked against."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imgclf.export.metadata import ExportError


def tta_view_names(tta: str | None) -> tuple[str, ...]:
    """The test-time views of a model's ``tta`` setting (as :mod:`imgclf.data.augment` defines them)."""
    from imgclf.data.augment import TTA_PRESETS

    tta = tta or "none"
    if tta not in TTA_PRESETS:
        raise ExportError(f"model.json tta {tta!r} is unknown (known: {', '.join(TTA_PRESETS)})")
    return tuple(TTA_PRESETS[tta])


def _classifier_graph(fx, head, views: Sequence[str] = ("identity",)):
    import torch
    from torch import nn

    from imgclf.data.augment import TTA_VIEWS

    ops = [TTA_VIEWS[v].tensor_op for v in views]

    class ClassifierGraph(nn.Module):
        """uint8 RGB (N,3,S,S) → softmax probabilities (N,C): backbone + head, eval mode.

        With test-time views (the model's ``tta``), the probabilities of the flipped /
        rotated inputs are averaged, as ``Classifier.predict_proba`` does.
        """

        def __init__(self):
            super().__init__()
            self.fx = fx
            self.head = head
            self.views = tuple(views)

        def forward(self, image):
            if len(ops) == 1:
                return torch.softmax(self.head(self.fx(image)), dim=1)
            x = torch.cat([op(image) for op in ops], dim=0)
            p = torch.softmax(self.head(self.fx(x)), dim=1)
            return p.reshape(len(ops), image.shape[0], p.shape[1]).mean(dim=0)

    return ClassifierGraph().eval()


def classifier_graph(clf, tta: str | None = None):
    """The whole model of a loaded :class:`~imgclf.model.classifier.Classifier` as one torch module
    (uint8 NCHW in, probabilities out), with the model's test-time views unless ``tta``."""
    clf._check_fitted()
    clf.head_.eval()
    setting = tta if tta is not None else (getattr(clf, "tta", None) or clf.meta_.tta)
    graph = _classifier_graph(clf.backbone_runner().torch_module(), clf.head_, tta_view_names(setting))
    graph.tta = setting
    return graph


def eager_proba(graph, arrays: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """PyTorch eager fp32 probabilities of uint8 NCHW ``arrays``: the parity reference."""
    import torch

    outs = []
    with torch.inference_mode():
        for k in range(0, len(arrays), batch_size):
            outs.append(graph(torch.from_numpy(arrays[k:k + batch_size])).float().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
