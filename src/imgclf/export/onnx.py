"""Whole-model ONNX export, written only after a parity check against PyTorch.

``imgclf export MODEL`` turns a bundle (frozen backbone + trained head) into ONE ONNX
graph: uint8 RGB ``image`` (batch, 3, S, S) in, class ``probabilities`` (batch, N) out,
dynamic batch. Normalisation (the backbone entry's mean/std) and the softmax live inside
the graph, so a client only has to resize/crop the picture to S×S as the metadata says
(files and metadata: :mod:`~imgclf.export.metadata`).

Parity: before anything is written, the exported graph is run with ONNX Runtime on real
images (:mod:`~imgclf.export.images`) and compared with the same PyTorch module in eager
fp32: max |ΔP| ≤ 1e-4 and identical top-1 on every image, else :class:`ParityError` and
no file. ``quantize="int8"`` adds a separate int8 graph (:mod:`~imgclf.export.quantize`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.engines.onnx import export_graph_bytes, ort_session, run_session
from imgclf.export.graph import classifier_graph, eager_proba
from imgclf.export.images import PARITY_IMAGES, find_parity_images, load_arrays
from imgclf.export.metadata import (
    META_PREFIX,
    ONNX_NAME,
    Decision,
    ExportError,
    bundle_hashes,
    metadata_props,
    resize_policy_text,
    sha256_bytes,
    sidecar_dict,
    sidecar_path,
    tta_suffix,
    with_metadata,
)
from imgclf.export.quantize import CALIBRATION_IMAGES, QUANTIZE_CHOICES, QuantizationResult, quantize_int8
from imgclf.fileio import atomic_write_bytes, write_json
from imgclf.model.bundle import resolve_bundle_dir

log = logging.getLogger("imgclf")

PARITY_ATOL = 1e-4


class ParityError(ExportError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance: the export is refused."""


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    sha256: str
    size_bytes: int
    model_id: str
    parity: dict
    seconds: float
    int8: QuantizationResult | None = None

    def summary_lines(self) -> list[str]:
        p = self.parity
        lines = [
            f"exported {self.path} ({self.size_bytes / 1e6:.1f} MB, sha256 {self.sha256[:12]}…; metadata also in {self.sidecar.name}) in {self.seconds:.1f} s",
            f"parity on {p['n_images']} real images ({p['source']}): max |ΔP| {p['max_abs_diff']:.2e} ≤ {p['tolerance']:g}, "
            f"top-1 identical {p['top1_agree']}/{p['n_images']} (ONNX Runtime vs PyTorch fp32)",
        ]
        q = self.int8
        if q is not None:
            if q.accuracy_change is None:
                acc = "no labelled test images found: accuracy change NOT measured"
            else:
                acc = (
                    f"test accuracy {q.accuracy_fp32:.4f} (fp32) → {q.accuracy_int8:.4f} (int8), "
                    f"{100 * q.accuracy_change:+.2f} points on {q.n_test} images; top-1 agreement with fp32 {q.top1_agreement:.3f}"
                )
            lines.append(
                f"int8: {q.path} ({q.size_bytes / 1e6:.1f} MB), static, calibrated on {q.n_calibration} training images ({q.calibration_source}); {acc}"
            )
            lines.append(f"int8 is not used unless asked for: `imgclf serve {q.path}` or OnnxClassifier('{q.path}')")
        return lines


def _resolve_out(model_dir: Path, out: str | os.PathLike | None) -> Path:
    if out is None:
        return model_dir / ONNX_NAME
    p = Path(out)
    if p.is_dir() or str(out).endswith(("/", os.sep)):
        return p / ONNX_NAME
    if p.suffix.lower() != ".onnx":
        raise ExportError(f"--out {out}: give a folder or a file name ending in .onnx")
    return p


def export_onnx(
    model: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    quantize: str | None = None,
    images=None,
    calibration_images=None,
    test_data: str | os.PathLike | None = None,
    n_parity: int = PARITY_IMAGES,
    n_calibration: int = CALIBRATION_IMAGES,
    weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    tta: str | None = None,
) -> ExportResult:
    """Export a bundle to one ONNX graph (+ sidecar), verified against PyTorch first.

    ``images``: a folder or files for the parity check (default: the run's split.csv).
    ``quantize="int8"``: also write ``<out stem>.int8.onnx`` (see the module docstring);
    ``calibration_images`` / ``test_data`` override split.csv's train / test images.
    ``tta``: test-time views to bake into the graph instead of the model's own setting.
    """
    from imgclf.model.classifier import Classifier

    t0 = time.perf_counter()
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ExportError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}")
    d = resolve_bundle_dir(model)
    target = _resolve_out(d, out)
    hashes = bundle_hashes(d)
    items, source = find_parity_images(d, images, n_parity)
    clf = Classifier.load(d, weights=weights, engine="torch", precision="fp32", cache_dir=cache_dir, use_cache=False)
    meta = clf.meta_
    prep = clf.backbone_runner().spec.preprocessing
    decision = Decision.for_model(meta)
    arrays, items = load_arrays(items, prep)
    if not len(arrays):
        raise ExportError(f"none of the parity images ({source}) could be decoded; pass --images DIR")
    graph = classifier_graph(clf, tta)

    log.info("exporting %s (%s + %s head, %d classes, test-time views: %s) to ONNX", d, meta.backbone_name, meta.head["kind"], len(meta.class_names), ", ".join(graph.views))
    props = metadata_props(meta, prep, decision, hashes["bundle_id"] + tta_suffix(meta, graph.tta), "none", graph)
    doc = f"imgclf classifier {', '.join(meta.class_names)}: uint8 RGB NCHW {prep.input_size}x{prep.input_size} in ({resize_policy_text(prep)}), probabilities out"
    data = with_metadata(export_graph_bytes(graph, prep.input_size), props, doc)

    parity = check_parity(data, graph, arrays, source=source)
    parity["images"] = [str(p) for p, _ in items]
    digest = sha256_bytes(data)
    sidecar = sidecar_dict(meta, prep, decision, props, digest, len(data), hashes, parity, quantization=None)
    atomic_write_bytes(target, data)
    write_json(sidecar_path(target), sidecar)
    log.info("wrote %s and %s", target, sidecar_path(target).name)
    result = ExportResult(target, sidecar_path(target), digest, len(data), props[f"{META_PREFIX}model_id"], parity, 0.0)
    if quantize == "int8":
        result.int8 = quantize_int8(
            data, d, target, meta, prep, decision, hashes, arrays, graph,
            calibration_images=calibration_images, test_data=test_data, n_calibration=n_calibration, seed=seed,
        )
    result.seconds = time.perf_counter() - t0
    return result


def check_parity(onnx_bytes: bytes, graph, arrays: np.ndarray, *, source: str = "images", atol: float = PARITY_ATOL) -> dict:
    """ONNX Runtime vs PyTorch eager fp32 on ``arrays``; raises :class:`ParityError`."""
    session = ort_session(onnx_bytes)
    ref = eager_proba(graph, arrays)
    got = run_session(session, arrays)
    single = run_session(session, arrays[:2], batch_size=1)  # dynamic batch: batch 1 too
    n = len(arrays)
    if got.shape != ref.shape or single.shape != ref[:2].shape:
        raise ParityError(f"parity check failed: ONNX Runtime output shape {got.shape} differs from PyTorch {ref.shape}; nothing was written")
    diff = float(max(np.abs(got - ref).max(), np.abs(single - ref[:2]).max()))
    agree = int((got.argmax(1) == ref.argmax(1)).sum())
    if not diff <= atol or agree != n:
        raise ParityError(
            f"parity check failed: ONNX Runtime and PyTorch disagree on {n} real images ({source}): "
            f"max |ΔP| {diff:.3g} (tolerance {atol:g}), top-1 identical {agree}/{n}; nothing was written"
        )
    return {"n_images": n, "source": source, "max_abs_diff": diff, "tolerance": atol, "top1_agree": agree, "reference": "PyTorch eager fp32", "engine": "onnxruntime CPU"}
