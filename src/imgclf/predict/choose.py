"""Which engine ``imgclf predict`` uses for a model: for ``auto`` the faster of its up-to-date
ONNX export and the feature path, measured once per model and machine, the feature path only
when it passes a parity check against the export; the export is made now for ``--engine onnx``;
torch is imported only when the feature path is measured or taken."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from imgclf.config import layout
from imgclf.export.images import find_parity_images
from imgclf.export.metadata import META_PREFIX, ONNX_NAME, ExportError, StaleExportError, bundle_hashes
from imgclf.export.onnx import export_onnx
from imgclf import distributed
from imgclf.engines.runtimes import cpu_has_bf16
from imgclf.fileio import atomic_write_bytes, default_cache_dir
from imgclf.model.bundle import BundleError, resolve_bundle_dir
from imgclf.model.metadata import read_model_meta
from imgclf.predict.base import Predictor
from imgclf.predict.onnx_predictor import OnnxClassifier

log = logging.getLogger("imgclf")

PREDICT_ENGINES = ("auto", "onnx", "torch", "openvino", "onnxruntime")
ENGINE_CHOICE_DIR = "engine-choice"  # under the cache: one measured choice per (bundle, machine)
MEASURE_IMAGES = 32  # real images timed through each engine
# the feature path may run bf16 features (OpenVINO on a CPU with native bf16), so it is held to a
# looser bound than the export's fp32 parity check, and must give the same top class on every image
AUTO_PARITY_ATOL = 0.02
SWITCH_GAIN = 1.1  # the feature path replaces the export only when at least this much faster


def switch_gain() -> float:
    """``SWITCH_GAIN``, or ``$IMGCLF_AUTO_SWITCH_GAIN`` (``inf``: always keep the export)."""
    try:
        return float(os.environ.get("IMGCLF_AUTO_SWITCH_GAIN", SWITCH_GAIN))
    except ValueError:
        return SWITCH_GAIN


def machine_signature() -> str:
    """What an engine's speed depends on here: CPU model and bf16, cores, runtime versions."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    versions = []
    for pkg in ("onnxruntime", "openvino", "torch", "imgclf"):
        try:
            versions.append(f"{pkg}={importlib_metadata.version(pkg)}")
        except importlib_metadata.PackageNotFoundError:
            versions.append(f"{pkg}=-")
    parts = [platform.machine(), model, f"bf16={cpu_has_bf16()}", f"cpus={os.cpu_count()}", f"threads={os.environ.get('OMP_NUM_THREADS', '')}", *versions]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _timed_proba(predictor, paths: list[str]) -> tuple[np.ndarray, float]:
    predictor.predict_proba(paths[:4])  # warm-up: sessions, exports, first-call allocations
    t = time.perf_counter()
    p = np.asarray(predictor.predict_proba(paths), dtype=np.float64)
    return p, time.perf_counter() - t


def measure_engines(model_dir: Path, export, make_feature_path, n_images: int = MEASURE_IMAGES) -> dict:
    """Time the ONNX ``export`` and the feature path on up to ``n_images`` of the model's own
    images (split.csv: test first) and say which ``auto`` should use and why.

    The feature path runs without the feature cache here (cached features would make it look
    fast), and it is chosen only when it gives the export's top class on every image, stays
    within ``AUTO_PARITY_ATOL`` of its probabilities and is :func:`switch_gain` times faster.
    """
    try:
        items, source = find_parity_images(model_dir, None, n_images)
    except ExportError as e:
        return {"engine": "onnx", "reason": f"not measured: {e}", "cache": False}
    paths = [str(p) for p, _ in items]
    try:
        features = make_feature_path()
    except Exception as e:  # a feature path that cannot load: the export it is
        return {"engine": "onnx", "reason": f"feature path unavailable ({(str(e).splitlines() or [type(e).__name__])[0]})", "cache": False}
    use_cache = features.use_cache
    features.use_cache = False
    try:
        p_onnx, t_onnx = _timed_proba(export, paths)
        p_feat, t_feat = _timed_proba(features, paths)
    finally:
        features.use_cache = use_cache
    rows = np.isfinite(p_onnx).all(1) & np.isfinite(p_feat).all(1)
    n = int(rows.sum())
    engine = features.backbone_runner().get()  # built by the measurement
    result = {"images": n, "source": source, "onnx_img_s": round(len(paths) / max(t_onnx, 1e-9), 1),
              "features_img_s": round(len(paths) / max(t_feat, 1e-9), 1), "feature_engine": f"{engine.name} {engine.precision}"}
    if n == 0:
        return {**result, "engine": "onnx", "reason": "no image decoded for the measurement", "cache": False}
    diff = float(np.abs(p_onnx[rows] - p_feat[rows]).max())
    same_top = bool((p_onnx[rows].argmax(1) == p_feat[rows].argmax(1)).all())
    result.update(max_abs_diff=diff, same_top_class=same_top)
    passes = same_top and diff <= AUTO_PARITY_ATOL
    if passes and result["features_img_s"] >= switch_gain() * result["onnx_img_s"]:
        return {**result, "engine": "features", "reason": "faster and within parity"}
    why = "slower or not enough faster" if passes else f"outside parity (max |dP| {diff:.2g}, same top class: {same_top})"
    return {**result, "engine": "onnx", "reason": f"feature path {why}"}


def auto_choice(model_dir: Path, bundle_id: str, export, make_feature_path, cache_dir=None) -> dict:
    """The measured choice for ``auto`` (read from the cache, else measured and stored there)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / ENGINE_CHOICE_DIR / f"{bundle_id}-{machine_signature()}.json"
    try:
        found = json.loads(path.read_text())
        if found.get("engine") in ("onnx", "features"):
            return {**found, "from": str(path)}
    except (OSError, ValueError):
        pass
    choice = measure_engines(model_dir, export, make_feature_path)
    if choice.pop("cache", True):
        try:
            atomic_write_bytes(path, json.dumps(choice, indent=2).encode())
        except OSError as e:  # a read-only cache: measured again next time
            log.warning("cannot store the engine choice in %s (%s)", path, e.strerror or e)
    return choice


def measured_feature_path(model_dir: Path, bundle_id: str, export, load_feature_path, cache_dir, who: str):
    """(the feature path where :func:`auto_choice` picked it, else None; the choice), logged as
    ``who``. ``load_feature_path()`` loads it; the instance the measurement loaded is reused."""
    made: list = []

    def make_feature_path():
        made.append(load_feature_path())
        return made[-1]

    choice = auto_choice(model_dir, bundle_id, export, make_feature_path, cache_dir)
    speeds = f"{choice['features_img_s']} vs {choice['onnx_img_s']} img/s" if "onnx_img_s" in choice else ""
    if choice["engine"] != "features":
        log.info("%s: ONNX Runtime on %s (%s%s)", who, export.path, choice["reason"], f"; {speeds}" if speeds else "")
        return None, choice
    log.info("%s: the feature path, %s for the ONNX export on this machine (%s)", who, speeds, choice.get("from", "measured now"))
    return (made[-1] if made else load_feature_path()), choice


def serving_choice(model_dir: str | os.PathLike, export: OnnxClassifier, *, weights=None, cache_dir=None):
    """What ``serve --engine auto`` serves: the feature path (a
    :class:`~imgclf.predict.feature_arrays.FeatureArrayClassifier`) where the measurement
    ``predict --engine auto`` uses and keeps picked it, else ``export`` (loaded against the
    bundle, so its recorded bundle id is the bundle's).

    A model with test-time views keeps the export: the export averages the views inside its
    graph, and the array path runs one view."""
    d = resolve_bundle_dir(model_dir)
    if _model_tta(d) != "none":
        return export
    from imgclf.predict.feature_arrays import FeatureArrayClassifier

    def load_feature_path():  # imports torch: only when measured or taken
        from imgclf.model.classifier import Classifier

        return Classifier.load(d, weights=weights, cache_dir=cache_dir, use_cache=False, progress=False)

    bid = export.sidecar["source"]["bundle_id"]
    chosen, choice = measured_feature_path(d, bid, export, load_feature_path, cache_dir, "serve engine auto")
    return export if chosen is None else FeatureArrayClassifier(chosen, d, bundle_id=bid, measured=choice)


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

    * ``auto``: with a valid, up-to-date ``model.onnx`` export of the bundle, the faster of
      it (an :class:`OnnxClassifier`) and the Classifier feature path, measured once per
      bundle and machine (:func:`auto_choice`; the feature path must pass parity with the
      export); without one, the feature path (engine auto). A tampered export is ignored with
      a warning.
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
    if found is not None and engine == "auto" and distributed.current() is None:  # (ranks would measure apart)
        chosen, _ = measured_feature_path(d, bid, found, lambda: feature_path("auto"), cache_dir, "engine auto")
        return found if chosen is None else chosen
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
