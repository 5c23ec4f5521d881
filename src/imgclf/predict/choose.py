"""Which engine ``imgclf predict`` uses for a model: its up-to-date ONNX export when there is
one (made now for ``--engine onnx``), else the feature path; torch is imported only then."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from imgclf.config import layout
from imgclf.export.images import find_parity_images
from imgclf.export.metadata import META_PREFIX, ONNX_NAME, ExportError, StaleExportError, bundle_hashes
from imgclf.export.onnx import export_onnx
from imgclf.fileio import default_cache_dir
from imgclf.model.bundle import BundleError, resolve_bundle_dir
from imgclf.model.metadata import read_model_meta
from imgclf.predict.base import Predictor
from imgclf.predict.onnx_predictor import OnnxClassifier

log = logging.getLogger("imgclf")

PREDICT_ENGINES = ("auto", "onnx", "torch", "openvino", "onnxruntime")


def _model_tta(d: Path) -> str:
    try:
        return read_model_meta(d / layout.MODEL_META).tta
    except BundleError:  # the model's own loading says what is wrong with it
        return "none"


def _export_locations(d: Path, bid: str, cache_dir, tta: str | None = None) -> list[Path]:
    """Where exports of the bundle ``bid`` live: the model folder, then the cache (the
    cache only, for test-time views other than the model's own)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    if tta is not None and tta != _model_tta(d):
        return [root / "exports" / f"{bid}-tta-{tta}" / ONNX_NAME]
    return [d / ONNX_NAME, root / "exports" / bid / ONNX_NAME]


def _export_tta(clf: OnnxClassifier) -> str:
    try:
        return json.loads(clf.metadata.get(f"{META_PREFIX}tta", "{}")).get("setting") or "none"
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
    device: str = "auto",
) -> Predictor:
    """The :class:`~imgclf.predict.base.Predictor` ``imgclf predict`` should use.

    * ``auto``: a valid, up-to-date ``model.onnx`` export of the bundle (an
      :class:`OnnxClassifier`), else the Classifier feature path (engine auto).
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
    load = dict(weights=weights, precision=precision, cache_dir=cache_dir, use_cache=use_cache, progress=progress, device=device)
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
