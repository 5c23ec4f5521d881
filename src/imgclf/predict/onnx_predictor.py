"""A verified ``imgclf export`` graph on ONNX Runtime behind the predict API: light to load
(no torch), decoding ahead of inference."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from imgclf.engines.onnx import ort_session, run_session
from imgclf.export.metadata import Decision, ExportError, PixelPolicy, StaleExportError
from imgclf.export.verify import load_verified
from imgclf.predict.base import as_nchw_uint8

log = logging.getLogger("imgclf")


def _batched_decode(paths: Sequence[str], prep, batch_size: int, threads: int):
    """Yield (indices, uint8 batch or None, {index: error}) with decoding ahead of inference."""
    from imgclf.data.preprocess import decode_array, decoded_batches

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        yield from decoded_batches(list(range(len(paths))), lambda i: decode_array(str(paths[i]), prep), batch_size, pool)


class OnnxClassifier:
    """A verified ``imgclf export`` graph on ONNX Runtime, with Classifier's predict API.

    >>> clf = OnnxClassifier("runs/train/model.onnx")    # or the run folder
    >>> clf.predict_proba_arrays(batch_uint8)              # (N,3,S,S) or (N,S,S,3) → (N,C)
    >>> clf.predict_table(["a.jpg", "b.png"])              # rows as Classifier.predict_table
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, decode_threads: int = 2, batch_size: int = 32, expected_bundle_id: str | None = None):
        p, data, side, props = load_verified(path)
        if expected_bundle_id is not None and side.get("source", {}).get("bundle_id") != expected_bundle_id:
            raise StaleExportError(f"{p}: exported from another version of the model (the bundle changed since); re-export with `imgclf export MODEL`")
        self.path = p
        self.sidecar = side
        self.metadata = props
        self.class_names_ = list(side["class_names"])
        self.preprocessing = PixelPolicy(**side["preprocessing"])
        self.input_size = int(side["input_size"])
        self.decision = Decision.from_values(self.class_names_, side.get("threshold"))
        self.model_id = side["model_id"]
        self.quantization = side.get("quantization")
        self.engine = "onnxruntime" + ("-int8" if self.quantization else "")
        self.decode_threads = decode_threads
        self.batch_size = batch_size
        try:
            self.session = ort_session(data, threads)
        except Exception as e:
            raise ExportError(f"{p}: ONNX Runtime cannot load it ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        if inp.type != "tensor(uint8)" or list(inp.shape[1:]) != [3, self.input_size, self.input_size] or out.shape[-1] != len(self.class_names_):
            raise ExportError(f"{p}: graph signature {inp.type} {inp.shape} → {out.shape} does not match its metadata")
        self.errors_: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"OnnxClassifier({str(self.path)!r}, classes={self.class_names_}, engine={self.engine})"

    # -- arrays
    def predict_proba_arrays(self, batch: np.ndarray) -> np.ndarray:
        """uint8 RGB (N,3,S,S) or (N,S,S,3), already resized/cropped → float32 (N, C)."""
        x = as_nchw_uint8(batch, self.input_size)
        if not len(x):
            return np.zeros((0, len(self.class_names_)), np.float32)
        return run_session(self.session, x, self.batch_size)

    # -- files
    def predict_proba(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """(n, C) float64; NaN rows for unreadable files (reasons in ``errors_``)."""
        paths = [str(p) for p in paths]
        out = np.full((len(paths), len(self.class_names_)), np.nan)
        errors: dict[str, str] = {}
        for idx, batch, errs in _batched_decode(paths, self.preprocessing, self.batch_size, self.decode_threads):
            for i, msg in errs.items():
                errors[paths[i]] = msg
                log.warning("skipped %s", msg)
            if batch is not None:
                out[idx] = run_session(self.session, batch, self.batch_size)
        self.errors_ = errors
        return out

    def predict(self, paths: Sequence[str | os.PathLike]) -> list[str | None]:
        proba = self.predict_proba(paths)
        return [r["predicted"] for r in self.decision.rows(paths, proba, self.errors_)]

    def predict_table(self, paths: Sequence[str | os.PathLike]) -> list[dict]:
        """Rows: path, predicted class, probability per class, error (as Classifier's)."""
        proba = self.predict_proba(paths)
        return self.decision.rows(paths, proba, self.errors_)

    def info(self) -> dict:
        return {
            "model_id": self.model_id,
            "engine": self.engine,
            "class_names": self.class_names_,
            "input_size": self.input_size,
            "resize_policy": self.sidecar.get("resize_policy"),
            "preprocessing": self.preprocessing.to_dict(),
            "threshold": self.decision.to_dict(),
            "decision": self.decision.description,
            "backbone": self.sidecar.get("backbone", {}).get("name"),
            "source": str(self.path),
            "quantization": self.quantization,
        }
