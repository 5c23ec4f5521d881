"""Static int8 (QDQ) copy of an fp32 export, with the test accuracy it costs.

Per-channel int8 weights and uint8 activations, calibrated on a seeded sample of the
training images, written as a *separate* ``model.int8.onnx`` (+ sidecar) together with the
test-split accuracy of fp32 and int8; the fp32 graph stays the one predict and serve pick
up, int8 is only used when pointed at explicitly.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.engines.onnx import INPUT_NAME, ort_session, run_session
from imgclf.export.images import images_from, load_arrays, split_images, spread
from imgclf.export.metadata import ExportError, metadata_props, sha256_bytes, sidecar_dict, sidecar_path, tta_suffix, with_metadata
from imgclf.fileio import atomic_write_bytes, write_json

log = logging.getLogger("imgclf")

CALIBRATION_IMAGES = 64
QUANTIZE_CHOICES = ("int8",)


@dataclass
class QuantizationResult:
    path: Path
    sidecar: Path
    n_calibration: int
    calibration_source: str
    accuracy_fp32: float | None
    accuracy_int8: float | None
    n_test: int
    top1_agreement: float | None
    max_abs_diff: float | None
    size_bytes: int

    @property
    def accuracy_change(self) -> float | None:
        if self.accuracy_fp32 is None or self.accuracy_int8 is None:
            return None
        return self.accuracy_int8 - self.accuracy_fp32


def quantize_int8(fp32_bytes, d, target, meta, prep, decision, hashes, parity_arrays, graph, *, calibration_images, test_data, n_calibration, seed) -> QuantizationResult:
    """Write ``<target stem>.int8.onnx`` (+ sidecar) from the verified fp32 graph ``fp32_bytes``."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration_images is not None:
        cal_items, cal_source = spread(images_from(calibration_images), n_calibration, seed), "given images"
    else:
        cal_items, cal_source = spread(split_images(d, "train"), n_calibration, seed), "train split (split.csv)"
    cal, cal_items = load_arrays(cal_items, prep)
    if not len(cal):
        raise ExportError(f"{d}: --quantize int8 needs training images to calibrate on (split.csv's train images are gone); pass --calibration DIR")
    log.info("int8: calibrating on %d images (%s)", len(cal), cal_source)

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{INPUT_NAME: cal[k:k + 8]} for k in range(0, len(cal), 8)])

        def get_next(self):
            return next(self._it, None)

    tmp = Path(tempfile.mkdtemp(prefix="imgclf-quant-"))
    qlog = logging.getLogger()
    level = qlog.level
    try:
        (tmp / "fp32.onnx").write_bytes(fp32_bytes)
        qlog.setLevel(logging.ERROR)  # onnxruntime.quantization logs on the root logger
        quant_pre_process(str(tmp / "fp32.onnx"), str(tmp / "pre.onnx"))
        quantize_static(
            str(tmp / "pre.onnx"), str(tmp / "int8.onnx"), _Reader(),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        qbytes = (tmp / "int8.onnx").read_bytes()
    finally:
        qlog.setLevel(level)
        shutil.rmtree(tmp, ignore_errors=True)

    model_id = hashes["bundle_id"] + tta_suffix(meta, graph.tta) + "-int8"
    props = metadata_props(meta, prep, decision, model_id, "int8 static QDQ (per-channel int8 weights, uint8 activations, MinMax calibration)", graph)
    doc = f"imgclf classifier (int8) {', '.join(meta.class_names)}: uint8 RGB NCHW {prep.input_size}x{prep.input_size} in, probabilities out"
    qbytes = with_metadata(qbytes, props, doc)

    # accuracy on the test split: fp32 graph vs int8 graph, the same images
    if test_data is not None:
        from imgclf.data.datasets import labelled_eval_samples

        test_items = [(s.path, meta.class_names[s.label]) for s in labelled_eval_samples(test_data, list(meta.class_names))]
    else:
        test_items = split_images(d, "test")
    xt, test_items = load_arrays(test_items, prep)
    s32, s8 = ort_session(fp32_bytes), ort_session(qbytes)
    acc32 = acc8 = agree = maxdiff = None
    if len(xt):
        y = np.array([meta.class_names.index(c) if c in meta.class_names else -1 for _, c in test_items])
        p32, p8 = run_session(s32, xt), run_session(s8, xt)
        i32, i8 = decision.indices(p32), decision.indices(p8)
        acc32, acc8 = float((i32 == y).mean()), float((i8 == y).mean())
        agree, maxdiff = float((i32 == i8).mean()), float(np.abs(p32 - p8).max())
    else:
        p8 = run_session(s8, parity_arrays)
        maxdiff = float(np.abs(p8 - run_session(s32, parity_arrays)).max())
    qpath = target.with_name(target.name[: -len(".onnx")] + ".int8.onnx")
    quant = {
        "type": "int8-static-qdq",
        "per_channel": True,
        "calibration": {"source": cal_source, "n_images": len(cal), "seed": seed, "method": "MinMax"},
        "test": {"n_images": len(xt), "accuracy_fp32": acc32, "accuracy_int8": acc8, "accuracy_change": None if acc32 is None else acc8 - acc32, "top1_agreement_with_fp32": agree, "max_abs_prob_diff_vs_fp32": maxdiff},
        "fp32_model": target.name,
    }
    parity = {"n_images": 0, "source": "int8 is not held to the 1e-4 parity; see quantization.test", "max_abs_diff": maxdiff, "tolerance": None, "top1_agree": None}
    digest = sha256_bytes(qbytes)
    sidecar = sidecar_dict(meta, prep, decision, props, digest, len(qbytes), hashes, parity, quantization=quant)
    atomic_write_bytes(qpath, qbytes)
    write_json(sidecar_path(qpath), sidecar)
    if acc32 is not None and acc8 < acc32 - 0.01:
        log.warning("int8 loses %.2f points of test accuracy (%.4f → %.4f); keep the fp32 model unless speed matters more", 100 * (acc32 - acc8), acc32, acc8)
    return QuantizationResult(qpath, sidecar_path(qpath), len(cal), cal_source, acc32, acc8, len(xt), agree, maxdiff, len(qbytes))
