"""Whole-model ONNX export with a parity check, and the ONNX Runtime prediction engine.

``imgclf export MODEL`` turns a bundle (frozen backbone + trained head) into ONE ONNX
graph: uint8 RGB ``image`` (batch, 3, S, S) in, class ``probabilities`` (batch, N) out,
dynamic batch. Normalisation (the backbone entry's mean/std) and the softmax live inside
the graph, so a client only has to resize/crop the picture to S×S as the metadata says.

Files (beside each other):

* ``model.onnx``       the graph; its ``metadata_props`` carry ``imgclf.*`` keys (class
                       names, input size and layout, resize policy/preprocessing, decision
                       threshold, model id, backbone, weights identity);
* ``model.onnx.json``  sidecar: the same metadata for humans and tools that do not read
                       ONNX, the ONNX file's sha256 and size, the source bundle's hashes
                       and the parity results. A file whose sha256 differs from the
                       sidecar's, or a sidecar that disagrees with the metadata inside the
                       graph, is refused (:class:`ExportError`) — never loaded.

Parity: before anything is written, the exported graph is run with ONNX Runtime on real
images (the run's ``split.csv``: test, then validation, then train images, every class
represented; or ``images=``) and compared with the same PyTorch module in eager fp32:
max |ΔP| ≤ 1e-4 and identical top-1 on every image, else :class:`ParityError` and no file.

``quantize="int8"``: static QDQ int8 (per-channel weights, uint8 activations) calibrated
on a seeded sample of the training images, written as a *separate* ``model.int8.onnx``
(+ sidecar) together with the test-split accuracy of fp32 and int8; the fp32 graph stays
the one predict and serve pick up, int8 is only used when pointed at explicitly.

Prediction: :class:`OnnxClassifier` (``predict_proba_arrays``, ``predict_proba``,
``predict``, ``predict_table`` with ``ImageClassifier.predict_table``'s rows) and
:func:`predictor_for`, the engine choice of ``imgclf predict``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from imgclf._version import __version__
from imgclf.model.bundle import BundleError, resolve_bundle_dir
from imgclf.fileio import atomic_write_bytes, default_cache_dir, file_sha256, write_json
from imgclf.engines.onnx import INPUT_NAME, OPSET, OUTPUT_NAME, export_graph_bytes, ort_session, run_session

# Heavier imgclf modules (features, api: they import torch) are imported inside the
# functions that need them, so that loading and running an exported graph stays light.

log = logging.getLogger("imgclf")

EXPORT_FORMAT = "imgclf-onnx/1"
ONNX_NAME = "model.onnx"
PARITY_ATOL = 1e-4
PARITY_IMAGES = 16
CALIBRATION_IMAGES = 64
QUANTIZE_CHOICES = ("int8",)
PREDICT_ENGINES = ("auto", "onnx", "torch", "openvino", "onnxruntime")
_PREFIX = "imgclf."


class ExportError(ValueError):
    """An export cannot be made or an exported file cannot be trusted; one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class StaleExportError(ExportError):
    """The export was made from another version of the bundle (it was re-saved since)."""


class ParityError(ExportError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance: the export is refused."""


# --------------------------------------------------------------------------- small helpers


class PixelPolicy(SimpleNamespace):
    """The fields of a model's preprocessing (input_size, resize_size, interpolation, mean,
    std, policy, ...) as attributes, from the export's metadata, for
    :func:`imgclf.data.preprocess.image_to_array`; ``to_dict()`` gives them back."""

    def to_dict(self) -> dict:
        return dict(vars(self))


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


def resize_policy_text(prep) -> str:
    """One line saying how a picture becomes the S×S input (for metadata and humans)."""
    if prep.policy == "squash":
        return f"resize to {prep.input_size}x{prep.input_size} ({prep.interpolation}), aspect ratio not kept"
    return (
        f"resize the shorter side to {prep.resize_size} ({prep.interpolation}), "
        f"then centre-crop {prep.input_size}x{prep.input_size}"
    )


@dataclass(frozen=True)
class Decision:
    """How probabilities become a class: argmax, or a binary threshold on P(positive).

    ``model.json`` may carry ``"threshold"``: a number (binary models; positive class =
    the second class name, as in the metrics) or ``{"value": t, "positive_class": name}``.
    """

    class_names: tuple[str, ...]
    threshold: float | None = None
    positive_index: int | None = None

    @classmethod
    def from_meta(cls, meta: dict) -> "Decision":
        names = tuple(meta["class_names"])
        raw = meta.get("threshold")
        if raw is None:
            return cls(names)
        default_positive = meta.get("positive_class") or (names[1] if len(names) == 2 else None)
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
        proba = np.asarray(proba)
        if self.threshold is None:
            return proba.argmax(1)
        other = 1 - self.positive_index
        return np.where(proba[:, self.positive_index] >= self.threshold, self.positive_index, other)


# --------------------------------------------------------------------------- decoding


def decode_to_array(path: str | os.PathLike, prep) -> np.ndarray:
    """File → uint8 (3, S, S), exactly as the feature path decodes for predict."""
    from imgclf.data.preprocess import decode_array

    arr, err = decode_array(str(path), prep)
    if err:
        from imgclf.data.imaging import ImageDecodeError

        raise ImageDecodeError(str(path), err.split(": ", 1)[-1], "unreadable")
    return arr


def _batched_decode(paths: Sequence[str], prep, batch_size: int, threads: int):
    """Yield (indices, uint8 batch or None, {index: error}) with decoding ahead of inference."""
    from imgclf.data.preprocess import decode_array, decoded_batches

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        yield from decoded_batches(list(range(len(paths))), lambda i: decode_array(str(paths[i]), prep), batch_size, pool)


def rows_from_proba(paths: Sequence, proba: np.ndarray, errors: dict[str, str], decision: Decision) -> list[dict]:
    """``ImageClassifier.predict_table`` rows: path, predicted, one key per class, error."""
    names = list(decision.class_names)
    rows = []
    ok = ~np.isnan(proba).any(1) if len(proba) else np.zeros(0, bool)
    idx = np.zeros(len(proba), int)
    if ok.any():
        idx[ok] = decision.indices(proba[ok])
    for k, (p, row) in enumerate(zip(paths, proba)):
        r = {"path": str(p)}
        if not ok[k]:
            r.update({"predicted": None, **{c: None for c in names}, "error": errors.get(str(p), "unreadable")})
        else:
            r.update({"predicted": names[int(idx[k])], **{c: float(v) for c, v in zip(names, row)}, "error": None})
        rows.append(r)
    return rows


def as_nchw_uint8(batch: np.ndarray, size: int) -> np.ndarray:
    """Accept uint8 (N,3,S,S) or (N,S,S,3) (or one image without N); return contiguous NCHW."""
    a = np.asarray(batch)
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB pixels 0..255, got dtype {a.dtype}")
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise ValueError(f"expected a batch (N,3,{size},{size}) or (N,{size},{size},3), got shape {a.shape}")
    if a.shape[1:] == (3, size, size):
        return np.ascontiguousarray(a)
    if a.shape[1:] == (size, size, 3):
        return np.ascontiguousarray(a.transpose(0, 3, 1, 2))
    raise ValueError(f"expected a batch (N,3,{size},{size}) or (N,{size},{size},3), got shape {a.shape}")


# --------------------------------------------------------------------------- the graph


def tta_view_names(tta: str | None) -> tuple[str, ...]:
    """The test-time views of a model's ``tta`` setting (as :mod:`imgclf.data.augment` defines them)."""
    from imgclf.data.augment import TTA_PRESETS

    tta = tta or "none"
    if tta not in TTA_PRESETS:
        raise ExportError(f"model.json tta {tta!r} is unknown (known: {', '.join(TTA_PRESETS)})")
    return tuple(TTA_PRESETS[tta])


def _view_op(name: str):
    """A flip/rotation of NCHW pixels equal to PIL's transpose of the picture (ROTATE_90 = counter-clockwise)."""
    import torch

    ops = {
        "identity": lambda x: x,
        "hflip": lambda x: torch.flip(x, dims=[3]),
        "vflip": lambda x: torch.flip(x, dims=[2]),
        # transpose + flip rather than torch.rot90, which the ONNX exporter does not support
        "rot90": lambda x: torch.flip(x.transpose(2, 3), dims=[2]),
        "rot180": lambda x: torch.flip(x, dims=[2, 3]),
        "rot270": lambda x: torch.flip(x.transpose(2, 3), dims=[3]),
    }
    if name not in ops:
        raise ExportError(f"test-time view {name!r} cannot be put into the graph")
    return ops[name]


def _classifier_graph(fx, head, views: Sequence[str] = ("identity",)):
    import torch
    from torch import nn

    ops = [_view_op(v) for v in views]

    class ClassifierGraph(nn.Module):
        """uint8 RGB (N,3,S,S) → softmax probabilities (N,C): backbone + head, eval mode.

        With test-time views (the model's ``tta``), the probabilities of the flipped /
        rotated inputs are averaged, as ``ImageClassifier.predict_proba`` does.
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
    setting = tta if tta is not None else (getattr(clf, "tta", None) or clf.meta_.get("tta") or "none")
    graph = _classifier_graph(clf.backbone_runner().torch_module(), clf.head_, tta_view_names(setting))
    graph.tta = setting
    return graph


def _reference_proba(graph, arrays: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """PyTorch eager fp32 probabilities: the parity reference."""
    import torch

    outs = []
    with torch.inference_mode():
        for k in range(0, len(arrays), batch_size):
            outs.append(graph(torch.from_numpy(arrays[k:k + batch_size])).float().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _with_metadata(onnx_bytes: bytes, props: dict[str, str], doc: str) -> bytes:
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    model.producer_name = "imgclf"
    model.producer_version = __version__
    model.doc_string = doc
    return model.SerializeToString()


def _metadata_props(meta: dict, prep, decision: Decision, model_id: str, quantization: str, graph) -> dict[str, str]:
    n = len(meta["class_names"])
    return {
        f"{_PREFIX}format": EXPORT_FORMAT,
        f"{_PREFIX}model_id": model_id,
        f"{_PREFIX}class_names": json.dumps(list(meta["class_names"])),
        f"{_PREFIX}input_size": str(prep.input_size),
        f"{_PREFIX}input": json.dumps({"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "shape": ["batch", 3, prep.input_size, prep.input_size], "channels": "RGB", "range": "0..255"}),
        f"{_PREFIX}output": json.dumps({"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", n], "meaning": "softmax class probabilities in class_names order"}),
        f"{_PREFIX}resize_policy": resize_policy_text(prep),
        f"{_PREFIX}preprocessing": json.dumps(prep.to_dict()),
        f"{_PREFIX}normalisation": "inside the graph: (x - mean) / std with the preprocessing's mean/std (0..255 units); feed raw pixels",
        f"{_PREFIX}threshold": json.dumps(decision.to_dict()),
        f"{_PREFIX}decision": decision.description,
        f"{_PREFIX}tta": json.dumps({"setting": graph.tta, "views_averaged_in_graph": list(graph.views)}),
        f"{_PREFIX}backbone": str(meta["backbone"]["name"]),
        f"{_PREFIX}backbone_tuned": json.dumps(meta.get("backbone_tuned")),
        f"{_PREFIX}weights_identity": str(meta["weights"].get("identity")),
        f"{_PREFIX}quantization": quantization,
        f"{_PREFIX}version": __version__,
    }


# --------------------------------------------------------------------------- images for parity / calibration / accuracy


def _split_images(model_dir: Path, split: str) -> list[tuple[Path, str]]:
    from imgclf.data.datasets import DatasetError, read_split_csv

    csv_path = model_dir / "split.csv"
    if not csv_path.is_file():
        return []
    try:
        rows = read_split_csv(csv_path)
    except DatasetError as e:
        log.warning("%s", e)
        return []
    return [(p, c) for p, c in rows.get(split, []) if p.is_file()]


def _spread(items: list[tuple[Path, str]], n: int, seed: int = 0) -> list[tuple[Path, str]]:
    """Up to ``n`` items, round-robin over classes (seeded order within a class)."""
    by_class: dict[str, list] = {}
    for it in items:
        by_class.setdefault(it[1], []).append(it)
    rng = random.Random(seed)
    for v in by_class.values():
        rng.shuffle(v)
    out: list = []
    while len(out) < n and any(by_class.values()):
        for c in sorted(by_class):
            if by_class[c] and len(out) < n:
                out.append(by_class[c].pop())
    return out


def _load_arrays(items: Sequence[tuple[Path, str]], prep, threads: int = 2) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    from imgclf.data.preprocess import decode_array

    with ThreadPoolExecutor(max_workers=threads) as pool:
        res = list(pool.map(lambda it: decode_array(str(it[0]), prep), items))
    kept = [(it, arr) for it, (arr, err) in zip(items, res) if arr is not None]
    if not kept:
        return np.zeros((0, 3, prep.input_size, prep.input_size), np.uint8), []
    return np.stack([a for _, a in kept]), [it for it, _ in kept]


def _images_from(paths_or_dir: Sequence[str | os.PathLike] | str | os.PathLike) -> list[tuple[Path, str]]:
    from imgclf.data.datasets import collect_image_paths

    inputs = [paths_or_dir] if isinstance(paths_or_dir, (str, os.PathLike)) else list(paths_or_dir)
    paths, problems = collect_image_paths(inputs)
    for p in problems:
        log.warning("%s", p)
    return [(p, p.parent.name) for p in paths]


def find_parity_images(model_dir: Path, images=None, n: int = PARITY_IMAGES) -> tuple[list[tuple[Path, str]], str]:
    """Real images for the parity check and where they came from."""
    if images is not None:
        found = _images_from(images)
        if not found:
            raise ExportError(f"no images found in {images if isinstance(images, (str, os.PathLike)) else ', '.join(map(str, images))}")
        return _spread(found, n), "given images"
    for split in ("test", "validation", "train"):
        found = _split_images(model_dir, split)
        if found:
            return _spread(found, n), f"{split} split (split.csv)"
    raise ExportError(
        f"{model_dir}: no real images to check parity on (split.csv is missing or its images are gone); "
        "pass --images DIR with a few images of the task"
    )


# --------------------------------------------------------------------------- export


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
    decision = Decision.from_meta(meta)
    arrays, items = _load_arrays(items, prep)
    if not len(arrays):
        raise ExportError(f"none of the parity images ({source}) could be decoded; pass --images DIR")
    graph = classifier_graph(clf, tta)

    log.info("exporting %s (%s + %s head, %d classes, test-time views: %s) to ONNX", d, meta["backbone"]["name"], meta["head"]["kind"], len(meta["class_names"]), ", ".join(graph.views))
    props = _metadata_props(meta, prep, decision, hashes["bundle_id"] + _tta_suffix(meta, graph.tta), "none", graph)
    doc = f"imgclf classifier {', '.join(meta['class_names'])}: uint8 RGB NCHW {prep.input_size}x{prep.input_size} in ({resize_policy_text(prep)}), probabilities out"
    data = _with_metadata(export_graph_bytes(graph, prep.input_size), props, doc)

    parity = check_parity(data, graph, arrays, source=source)
    parity["images"] = [str(p) for p, _ in items]
    digest = sha256_bytes(data)
    sidecar = _sidecar_dict(meta, prep, decision, props, digest, len(data), hashes, parity, quantization=None)
    atomic_write_bytes(target, data)
    write_json(sidecar_path(target), sidecar)
    log.info("wrote %s and %s", target, sidecar_path(target).name)
    result = ExportResult(target, sidecar_path(target), digest, len(data), props[f"{_PREFIX}model_id"], parity, 0.0)
    if quantize == "int8":
        result.int8 = _quantize_int8(
            data, d, target, meta, prep, decision, hashes, arrays, graph,
            calibration_images=calibration_images, test_data=test_data, n_calibration=n_calibration, seed=seed,
        )
    result.seconds = time.perf_counter() - t0
    return result


def check_parity(onnx_bytes: bytes, graph, arrays: np.ndarray, *, source: str = "images", atol: float = PARITY_ATOL) -> dict:
    """ONNX Runtime vs PyTorch eager fp32 on ``arrays``; raises :class:`ParityError`."""
    session = ort_session(onnx_bytes)
    ref = _reference_proba(graph, arrays)
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


def _sidecar_dict(meta, prep, decision, props, digest, size, hashes, parity, quantization) -> dict:
    return {
        "format": EXPORT_FORMAT,
        "onnx_sha256": digest,
        "onnx_size": size,
        "model_id": props[f"{_PREFIX}model_id"],
        "class_names": list(meta["class_names"]),
        "input": json.loads(props[f"{_PREFIX}input"]),
        "output": json.loads(props[f"{_PREFIX}output"]),
        "input_size": prep.input_size,
        "resize_policy": props[f"{_PREFIX}resize_policy"],
        "preprocessing": prep.to_dict(),
        "threshold": decision.to_dict(),
        "decision": decision.description,
        "backbone": meta["backbone"],
        "weights": meta["weights"],
        "head": meta["head"],
        "source": hashes,
        "parity": parity,
        "quantization": quantization,
        "opset": OPSET,
        "imgclf_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "onnx_metadata": props,
    }


def _quantize_int8(fp32_bytes, d, target, meta, prep, decision, hashes, parity_arrays, graph, *, calibration_images, test_data, n_calibration, seed) -> QuantizationResult:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration_images is not None:
        cal_items, cal_source = _spread(_images_from(calibration_images), n_calibration, seed), "given images"
    else:
        cal_items, cal_source = _spread(_split_images(d, "train"), n_calibration, seed), "train split (split.csv)"
    cal, cal_items = _load_arrays(cal_items, prep)
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

    model_id = hashes["bundle_id"] + _tta_suffix(meta, graph.tta) + "-int8"
    props = _metadata_props(meta, prep, decision, model_id, "int8 static QDQ (per-channel int8 weights, uint8 activations, MinMax calibration)", graph)
    doc = f"imgclf classifier (int8) {', '.join(meta['class_names'])}: uint8 RGB NCHW {prep.input_size}x{prep.input_size} in, probabilities out"
    qbytes = _with_metadata(qbytes, props, doc)

    # accuracy on the test split: fp32 graph vs int8 graph, the same images
    if test_data is not None:
        from imgclf.data.datasets import labelled_eval_samples

        test_items = [(s.path, meta["class_names"][s.label]) for s in labelled_eval_samples(test_data, list(meta["class_names"]))]
    else:
        test_items = _split_images(d, "test")
    xt, test_items = _load_arrays(test_items, prep)
    s32, s8 = ort_session(fp32_bytes), ort_session(qbytes)
    acc32 = acc8 = agree = maxdiff = None
    if len(xt):
        y = np.array([list(meta["class_names"]).index(c) if c in meta["class_names"] else -1 for _, c in test_items])
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
    sidecar = _sidecar_dict(meta, prep, decision, props, digest, len(qbytes), hashes, parity, quantization=quant)
    atomic_write_bytes(qpath, qbytes)
    write_json(sidecar_path(qpath), sidecar)
    if acc32 is not None and acc8 < acc32 - 0.01:
        log.warning("int8 loses %.2f points of test accuracy (%.4f → %.4f); keep the fp32 model unless speed matters more", 100 * (acc32 - acc8), acc32, acc8)
    return QuantizationResult(qpath, sidecar_path(qpath), len(cal), cal_source, acc32, acc8, len(xt), agree, maxdiff, len(qbytes))


# --------------------------------------------------------------------------- loading an export


def resolve_onnx_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / ONNX_NAME
    if not p.is_file():
        raise ExportError(f"{p}: no such ONNX file (export one with `imgclf export MODEL`)")
    return p


def load_verified(path: str | os.PathLike) -> tuple[Path, bytes, dict, dict[str, str]]:
    """(onnx path, its bytes, sidecar, embedded metadata) after every integrity check.

    The bytes returned are the ones hashed, so what is checked is what gets loaded.
    """
    p = resolve_onnx_path(path)
    sc = sidecar_path(p)
    if not sc.is_file():
        raise ExportError(f"{p}: its metadata file {sc.name} is missing; re-export with `imgclf export MODEL`")
    try:
        side = json.loads(sc.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{sc}: not valid JSON ({e}); re-export with `imgclf export MODEL`") from None
    if not isinstance(side, dict) or side.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{sc}: not an {EXPORT_FORMAT} metadata file")
    data = p.read_bytes()
    digest = sha256_bytes(data)
    if digest != side.get("onnx_sha256"):
        raise ExportError(
            f"{p}: sha256 {digest[:12]}… differs from the {str(side.get('onnx_sha256'))[:12]}… recorded in {sc.name} at export "
            "(the file was modified or is corrupt); refusing to load it — re-export with `imgclf export MODEL`"
        )
    try:
        import onnx

        model = onnx.load_from_string(data)
    except Exception as e:
        raise ExportError(f"{p}: not a readable ONNX model ({type(e).__name__})") from None
    props = {kv.key: kv.value for kv in model.metadata_props}
    if props.get(f"{_PREFIX}format") != EXPORT_FORMAT:
        raise ExportError(f"{p}: not an imgclf export (no {_PREFIX}format metadata)")
    problems = []
    if side.get("onnx_metadata") != props:
        problems.append("onnx_metadata")
    checks = {
        "class_names": json.loads(props.get(f"{_PREFIX}class_names", "null")),
        "input_size": int(props.get(f"{_PREFIX}input_size", "-1")),
        "threshold": json.loads(props.get(f"{_PREFIX}threshold", "null")),
        "model_id": props.get(f"{_PREFIX}model_id"),
        "preprocessing": json.loads(props.get(f"{_PREFIX}preprocessing", "null")),
    }
    problems += [k for k, v in checks.items() if side.get(k) != v]
    if problems:
        raise ExportError(
            f"{sc}: disagrees with the metadata inside {p.name} ({', '.join(problems)}); the metadata file was edited — "
            "refusing it; re-export with `imgclf export MODEL`"
        )
    return p, data, side, props


class OnnxClassifier:
    """A verified ``imgclf export`` graph on ONNX Runtime, with ImageClassifier's predict API.

    >>> clf = OnnxClassifier("runs/train/model.onnx")    # or the run folder
    >>> clf.predict_proba_arrays(batch_uint8)              # (N,3,S,S) or (N,S,S,3) → (N,C)
    >>> clf.predict_table(["a.jpg", "b.png"])              # rows as ImageClassifier.predict_table
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
        self.decision = Decision.from_meta({"class_names": self.class_names_, "threshold": side.get("threshold")})
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
        return [r["predicted"] for r in rows_from_proba(paths, proba, self.errors_, self.decision)]

    def predict_table(self, paths: Sequence[str | os.PathLike]) -> list[dict]:
        """Rows: path, predicted class, probability per class, error (as ImageClassifier's)."""
        proba = self.predict_proba(paths)
        return rows_from_proba(paths, proba, self.errors_, self.decision)

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


class TorchClassifier:
    """The same array interface as :class:`OnnxClassifier`, on the eager PyTorch graph (fp32)."""

    def __init__(self, model: str | os.PathLike, *, weights=None, cache_dir=None):
        from imgclf.model.classifier import Classifier

        d = resolve_bundle_dir(model)
        self.clf = Classifier.load(d, weights=weights, engine="torch", precision="fp32", cache_dir=cache_dir, use_cache=False)
        self.graph = classifier_graph(self.clf)
        self.class_names_ = list(self.clf.class_names_)
        self.preprocessing = self.clf.backbone_runner().spec.preprocessing
        self.input_size = self.preprocessing.input_size
        self.decision = Decision.from_meta(self.clf.meta_)
        self.model_id = bundle_hashes(d)["bundle_id"]
        self.engine = "torch"
        self.path = d

    def predict_proba_arrays(self, batch: np.ndarray) -> np.ndarray:
        x = as_nchw_uint8(batch, self.input_size)
        if not len(x):
            return np.zeros((0, len(self.class_names_)), np.float32)
        return _reference_proba(self.graph, x, batch_size=32)

    def info(self) -> dict:
        p = self.preprocessing
        return {
            "model_id": self.model_id, "engine": self.engine, "class_names": self.class_names_, "input_size": self.input_size,
            "resize_policy": resize_policy_text(p), "preprocessing": p.to_dict(), "threshold": self.decision.to_dict(),
            "decision": self.decision.description, "backbone": self.clf.meta_["backbone"]["name"], "source": str(self.path), "quantization": None,
        }


# --------------------------------------------------------------------------- engine choice


def _tta_suffix(meta: dict, tta: str) -> str:
    """Model ids of exports with other test-time views than the model's own differ."""
    return "" if tta == (meta.get("tta") or "none") else f"-tta-{tta}"


def _model_tta(d: Path) -> str:
    try:
        return json.loads((d / "model.json").read_text()).get("tta") or "none"
    except (OSError, ValueError, AttributeError):
        return "none"


def _export_locations(d: Path, bid: str, cache_dir, tta: str | None = None) -> list[Path]:
    """Where exports of the bundle ``bid`` live: the model folder, then the cache (the
    cache only, for test-time views other than the model's own)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    if tta is not None and tta != _model_tta(d):
        return [root / "exports" / f"{bid}-tta-{tta}" / ONNX_NAME]
    return [d / ONNX_NAME, root / "exports" / bid / ONNX_NAME]


def _export_tta(clf: "OnnxClassifier") -> str:
    try:
        return json.loads(clf.metadata.get(f"{_PREFIX}tta", "{}")).get("setting") or "none"
    except (ValueError, AttributeError):
        return "none"


def find_export(model_dir: str | os.PathLike, cache_dir=None, *, strict: bool = False, tta: str | None = None, bundle_id: str | None = None) -> OnnxClassifier | None:
    """A valid, up-to-date export of the bundle (model dir first, then the cache), or None.

    A file that fails its integrity check is skipped with a warning, or raises if ``strict``.
    A stale export (the bundle was re-saved since) is skipped, and so is one whose
    test-time views differ from ``tta`` (default: the model's own). ``bundle_id`` saves
    hashing the bundle again when the caller has it.
    """
    d = resolve_bundle_dir(model_dir)
    bid = bundle_id or bundle_hashes(d)["bundle_id"]
    wanted = tta if tta is not None else _model_tta(d)
    for p in _export_locations(d, bid, cache_dir, tta):
        if not p.is_file():
            continue
        try:
            found = OnnxClassifier(p, expected_bundle_id=bid)
        except StaleExportError as e:
            log.info("%s is stale: %s", p, e)
            continue
        except ExportError as e:
            if strict:
                raise
            log.warning("ignoring %s", e)
            continue
        if _export_tta(found) != wanted:
            log.info("%s averages test-time views %s, not %s; not used", p, _export_tta(found), wanted)
            continue
        return found
    return None


def _writable_target(d: Path, bid: str, cache_dir, tta: str | None = None) -> Path:
    locations = _export_locations(d, bid, cache_dir, tta)
    if len(locations) == 1:
        return locations[0]
    first, fallback = locations
    probe = d / f".imgclf-write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
        return first
    except OSError:
        return fallback


def predictor_for(
    model: str | os.PathLike,
    engine: str = "auto",
    *,
    weights=None,
    precision: str = "auto",
    cache_dir=None,
    use_cache: bool = True,
    progress: bool = False,
    parity_images=None,
    tta: str | None = None,
):
    """The predictor ``imgclf predict`` should use; every one has ``predict_table(paths)``,
    ``predict_proba(paths)``, ``predict(paths)``, ``class_names_`` and ``errors_``.

    * ``auto``: a valid, up-to-date ``model.onnx`` export of the bundle (an
      :class:`OnnxClassifier`), else the ImageClassifier feature path (engine auto).
      A tampered export is ignored with a warning.
    * ``onnx``: the export, made now (with its parity check) if missing or stale; written
      into the model folder, or the cache when that is read-only. A tampered export is
      an error. ``parity_images`` is used when split.csv's images are gone.
    * ``torch`` / ``openvino`` / ``onnxruntime``: :class:`~imgclf.model.classifier.Classifier`
      with that backbone engine (features from the cache where present).

    ``tta`` (``--tta``) overrides the model's test-time views; ONNX exports bake the views
    into the graph, so another setting uses (or, for ``onnx``, makes) a matching export in
    the cache. ``model`` may also be an ``.onnx`` file (engine auto or onnx; its views).
    """
    if engine not in PREDICT_ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(PREDICT_ENGINES)}")
    p = Path(model)
    if p.suffix.lower() == ".onnx" or (p.is_dir() and (p / ONNX_NAME).is_file() and not (p / "model.json").is_file()):
        if engine not in ("auto", "onnx"):
            raise ValueError(f"{model} is an ONNX export; --engine {engine} needs the model folder (model.json + model.safetensors)")
        clf = OnnxClassifier(p)
        if tta is not None and tta != _export_tta(clf):
            raise ValueError(f"{model} averages the test-time views of tta={_export_tta(clf)}; --tta {tta} needs the model folder")
        return clf
    load = dict(weights=weights, precision=precision, cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    if tta is not None:
        load["tta"] = tta

    def feature_path(engine_name: str):  # imports torch: only when this path is taken
        from imgclf.model.classifier import Classifier

        return Classifier.load(model, engine=engine_name, **load)

    if engine in ("torch", "openvino", "onnxruntime"):
        return feature_path(engine)
    d = resolve_bundle_dir(model)
    bid = bundle_hashes(d)["bundle_id"]
    found = find_export(d, cache_dir, strict=(engine == "onnx"), tta=tta, bundle_id=bid)
    if found is not None:
        log.info("engine: ONNX Runtime on %s", found.path)
        return found
    if engine == "auto":
        return feature_path("auto")
    target = _writable_target(d, bid, cache_dir, tta)
    log.info("no up-to-date ONNX export of %s; exporting now to %s", d, target)
    try:
        find_parity_images(d)  # real images from split.csv?
        images = None
    except ExportError:
        if not parity_images:
            raise
        images = list(parity_images)
    res = export_onnx(d, target, images=images, weights=weights, cache_dir=cache_dir, tta=tta)
    for line in res.summary_lines():
        log.info("%s", line)
    return OnnxClassifier(res.path, expected_bundle_id=bid)
