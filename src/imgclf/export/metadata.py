"""What an export records: file names, the ``imgclf.*`` metadata inside the graph and the
sidecar beside it, the model's decision rule and preprocessing — shared by the writer
(:mod:`~imgclf.export.onnx`) and every reader (:mod:`~imgclf.export.verify`, predict, serve).

Files (beside each other):

* ``model.onnx``       the graph; its ``metadata_props`` carry ``imgclf.*`` keys (class
                       names, input size and layout, resize policy/preprocessing, decision
                       threshold, model id, backbone, weights identity);
* ``model.onnx.json``  sidecar: the same metadata for humans and tools that do not read
                       ONNX, the ONNX file's sha256 and size, the source bundle's hashes
                       and the parity results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from imgclf._version import __version__
from imgclf.engines.onnx import INPUT_NAME, OPSET, OUTPUT_NAME
from imgclf.evaluation.thresholds import apply_threshold, prediction_rows
from imgclf.fileio import file_sha256
from imgclf.model.bundle import BundleError, resolve_bundle_dir
from imgclf.model.metadata import ModelMeta

log = logging.getLogger("imgclf")

EXPORT_FORMAT = "imgclf-onnx/1"
ONNX_NAME = "model.onnx"
META_PREFIX = "imgclf."


class ExportError(ValueError):
    """An export cannot be made or an exported file cannot be trusted; one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class StaleExportError(ExportError):
    """The export was made from another version of the bundle (it was re-saved since)."""


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """``model.onnx`` → ``model.onnx.json``."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".json")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundle_hashes(model_dir: str | os.PathLike) -> dict:
    """sha256 of model.json and model.safetensors, and the model id made from both."""
    d = resolve_bundle_dir(model_dir)
    js, st = file_sha256(d / "model.json"), file_sha256(d / "model.safetensors")
    return {"model_json_sha256": js, "model_safetensors_sha256": st, "bundle_id": sha256_bytes(f"{js}:{st}".encode())[:16]}


def tta_suffix(meta: ModelMeta, tta: str) -> str:
    """Model ids of exports with other test-time views than the model's own differ."""
    return "" if tta == meta.tta else f"-tta-{tta}"


def resize_policy_text(prep) -> str:
    """One line saying how a picture becomes the S×S input (for metadata and humans)."""
    if prep.policy == "squash":
        return f"resize to {prep.input_size}x{prep.input_size} ({prep.interpolation}), aspect ratio not kept"
    return (
        f"resize the shorter side to {prep.resize_size} ({prep.interpolation}), "
        f"then centre-crop {prep.input_size}x{prep.input_size}"
    )


class PixelPolicy(SimpleNamespace):
    """The fields of a model's preprocessing (input_size, resize_size, interpolation, mean,
    std, policy, ...) as attributes, from the export's metadata, for
    :func:`imgclf.data.preprocess.image_to_array`; ``to_dict()`` gives them back."""

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass(frozen=True)
class Decision:
    """How probabilities become a class: argmax, or a binary threshold on P(positive)
    (applied by :func:`~imgclf.evaluation.thresholds.apply_threshold`).

    ``model.json`` may carry ``"threshold"``: a number (binary models; positive class =
    the second class name, as in the metrics) or ``{"value": t, "positive_class": name}``.
    """

    class_names: tuple[str, ...]
    threshold: float | None = None
    positive_index: int | None = None

    @classmethod
    def for_model(cls, meta: ModelMeta) -> "Decision":
        """The decision rule recorded in a model's metadata."""
        return cls.from_values(meta.class_names, meta.threshold, meta.positive_class)

    @classmethod
    def from_meta(cls, meta: dict) -> "Decision":
        """The decision rule of a ``model.json``-shaped dict (``class_names``, optional
        ``threshold`` and ``positive_class``), e.g. an export sidecar's fields."""
        return cls.from_values(meta["class_names"], meta.get("threshold"), meta.get("positive_class"))

    @classmethod
    def from_values(cls, class_names, raw, positive_class: str | None = None) -> "Decision":
        """``raw``: None (argmax), a number or a ``{"value", "positive_class"}`` dict."""
        names = tuple(class_names)
        if raw is None:
            return cls(names)
        default_positive = positive_class or (names[1] if len(names) == 2 else None)
        if isinstance(raw, dict):
            value = raw.get("value", raw.get("threshold"))
            positive = raw.get("positive_class", default_positive)
        else:
            value, positive = raw, default_positive
        if len(names) != 2:
            log.warning("model.json has a threshold but %d classes; thresholds apply to binary models only, using argmax", len(names))
            return cls(names)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise BundleError(f"model.json threshold {raw!r} is not a number") from None
        if not 0.0 <= value <= 1.0 or positive not in names:
            raise BundleError(f"model.json threshold {raw!r}: needs a value in 0..1 and a positive class among {', '.join(names)}")
        return cls(names, value, names.index(positive))

    def to_dict(self) -> dict | None:
        if self.threshold is None:
            return None
        return {"value": self.threshold, "positive_class": self.class_names[self.positive_index]}

    @property
    def description(self) -> str:
        if self.threshold is None:
            return "argmax"
        return f"P({self.class_names[self.positive_index]}) >= {self.threshold:g}"

    def indices(self, proba: np.ndarray) -> np.ndarray:
        return apply_threshold(proba, self.threshold, self._positive)

    def rows(self, paths, proba: np.ndarray, errors: dict[str, str]) -> list[dict]:
        """``imgclf predict`` rows (:func:`~imgclf.evaluation.thresholds.prediction_rows`)."""
        return prediction_rows(paths, proba, errors, self.class_names, self.threshold, self._positive)

    @property
    def _positive(self) -> int:
        return 1 if self.positive_index is None else self.positive_index


# --------------------------------------------------------------------------- writing it


def metadata_props(meta: ModelMeta, prep, decision: Decision, model_id: str, quantization: str, graph) -> dict[str, str]:
    """The ``imgclf.*`` metadata_props of an exported graph."""
    n = len(meta.class_names)
    return {
        f"{META_PREFIX}format": EXPORT_FORMAT,
        f"{META_PREFIX}model_id": model_id,
        f"{META_PREFIX}class_names": json.dumps(list(meta.class_names)),
        f"{META_PREFIX}input_size": str(prep.input_size),
        f"{META_PREFIX}input": json.dumps({"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "shape": ["batch", 3, prep.input_size, prep.input_size], "channels": "RGB", "range": "0..255"}),
        f"{META_PREFIX}output": json.dumps({"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", n], "meaning": "softmax class probabilities in class_names order"}),
        f"{META_PREFIX}resize_policy": resize_policy_text(prep),
        f"{META_PREFIX}preprocessing": json.dumps(prep.to_dict()),
        f"{META_PREFIX}normalisation": "inside the graph: (x - mean) / std with the preprocessing's mean/std (0..255 units); feed raw pixels",
        f"{META_PREFIX}threshold": json.dumps(decision.to_dict()),
        f"{META_PREFIX}decision": decision.description,
        f"{META_PREFIX}tta": json.dumps({"setting": graph.tta, "views_averaged_in_graph": list(graph.views)}),
        f"{META_PREFIX}backbone": meta.backbone_name,
        f"{META_PREFIX}backbone_tuned": json.dumps(meta.backbone_tuned),
        f"{META_PREFIX}weights_identity": str(meta.weights_identity),
        f"{META_PREFIX}quantization": quantization,
        f"{META_PREFIX}version": __version__,
    }


def with_metadata(onnx_bytes: bytes, props: dict[str, str], doc: str) -> bytes:
    """The serialised graph with ``props`` as its only metadata_props, producer and doc set."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    model.producer_name = "imgclf"
    model.producer_version = __version__
    model.doc_string = doc
    return model.SerializeToString()


def sidecar_dict(meta: ModelMeta, prep, decision, props, digest, size, hashes, parity, quantization) -> dict:
    """The ``model.onnx.json`` of a graph with metadata ``props`` and sha256 ``digest``."""
    return {
        "format": EXPORT_FORMAT,
        "onnx_sha256": digest,
        "onnx_size": size,
        "model_id": props[f"{META_PREFIX}model_id"],
        "class_names": list(meta.class_names),
        "input": json.loads(props[f"{META_PREFIX}input"]),
        "output": json.loads(props[f"{META_PREFIX}output"]),
        "input_size": prep.input_size,
        "resize_policy": props[f"{META_PREFIX}resize_policy"],
        "preprocessing": prep.to_dict(),
        "threshold": decision.to_dict(),
        "decision": decision.description,
        "backbone": meta.backbone,
        "weights": meta.weights,
        "head": meta.head,
        "source": hashes,
        "parity": parity,
        "quantization": quantization,
        "opset": OPSET,
        "imgclf_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "onnx_metadata": props,
    }
