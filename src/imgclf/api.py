"""Python API: ``ImageClassifier`` with scikit-learn-shaped methods.

    clf = ImageClassifier(backbone="efficientnet_lite0").fit("data/lesions")
    clf.evaluate("data/lesions")          # metrics on the test split
    clf.predict_proba(["a.jpg", "b.png"])  # (n, n_classes)
    clf.save("model/"); ImageClassifier.load("model/")

The CLI is a thin face over this class.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from imgclf import __version__
from imgclf.backbones import (
    DEFAULT_BACKBONE,
    BackboneSpec,
    Preprocessing,
    WeightsRef,
    get_backbone_spec,
    resolve_weights,
)
from imgclf.bundle import BundleError, load_bundle, save_bundle
from imgclf.data import Dataset, load_dataset
from imgclf.features import BackboneRunner, default_cache_dir, extract_features
from imgclf.heads import head_config, head_from_config
from imgclf.metrics import classification_metrics
from imgclf.training import TrainConfig, fit_head

log = logging.getLogger("imgclf")


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)


class ImageClassifier:
    """Transfer-learned image classifier on a frozen, cached ImageNet backbone."""

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str | os.PathLike | None = "imagenet",
        head: str = "recipe",
        epochs: int = 30,
        lr: float = 1e-3,
        batch_size: int = 32,
        patience: int = 5,
        class_weight: str = "auto",
        seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        engine: str = "auto",
        precision: str = "auto",
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        progress: bool = False,
    ):
        self.backbone = backbone
        self.weights = weights
        self.train_config = TrainConfig(head=head, epochs=epochs, lr=lr, batch_size=batch_size, patience=patience, class_weight=class_weight, seed=seed)
        self.train_config.validate()
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.engine = engine
        self.precision = precision
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.use_cache = use_cache
        self.progress = progress
        self._runner: BackboneRunner | None = None
        self._spec: BackboneSpec | None = None
        self._weights_ref: WeightsRef | None = None
        self.errors_: dict[str, str] = {}

    # ------------------------------------------------------------------ backbone

    def backbone_runner(self) -> BackboneRunner:
        """Resolve backbone and weights (cheap, fails fast offline); the model is built lazily."""
        if self._runner is None:
            if self._spec is None:
                self._spec = get_backbone_spec(self.backbone)
            if self._weights_ref is None:
                self._weights_ref = resolve_weights(self._spec, self.weights, seed=self.seed)
            self._runner = BackboneRunner(self._spec, self._weights_ref, self.cache_dir, engine=self.engine, precision=self.precision, seed=self.seed)
        return self._runner

    def features(self, paths: Sequence[str | os.PathLike], desc: str = "features") -> tuple[np.ndarray, list[int], dict[int, str]]:
        """Backbone features for ``paths`` (cached); returns (X, ok indices, errors by index)."""
        runner = self.backbone_runner()
        bar = _progress_bar(len(paths), desc, self.progress)
        try:
            res = extract_features(list(paths), runner, use_cache=self.use_cache, progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
        if res.computed:
            log.info(
                "%s: %d images through %s (%s) at %.1f img/s, %d from cache",
                desc, res.computed, res.engine, res.precision, res.images_per_second, res.cached,
            )
        elif paths:
            log.info("%s: all %d images from the feature cache", desc, res.cached)
        for i, msg in res.errors.items():
            log.warning("skipped %s", msg)
        self.last_extraction_ = res
        return res.features, res.ok_indices, res.errors

    def _split_features(self, samples, desc):
        x, ok, errors = self.features([s.path for s in samples], desc=desc)
        y = np.array([samples[i].label for i in ok], dtype=np.int64)
        skipped = [(str(samples[i].path), msg) for i, msg in errors.items()]
        return x, y, ok, skipped

    # ------------------------------------------------------------------ fit

    def fit(self, data: str | os.PathLike | Dataset, validation: str | os.PathLike | None = None, *, on_epoch: Callable[[dict], None] | None = None) -> "ImageClassifier":
        """Train on ``data`` (a dataset root in either layout, or a loaded Dataset).

        ``validation`` optionally names a folder of class sub-folders that replaces the
        dataset's own (or carved) validation split.
        """
        t0 = time.perf_counter()
        ds = data if isinstance(data, Dataset) else load_dataset(data, val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=self.seed)
        if validation is not None:
            ds = _with_validation_folder(ds, validation)
        for w in ds.warnings:
            log.warning("%s", w)
        self.dataset_ = ds
        self.class_names_ = list(ds.class_names)
        xt, yt, _, sk_tr = self._split_features(ds.samples["train"], "train features")
        xv, yv, _, sk_va = self._split_features(ds.samples["validation"], "validation features")
        self.skipped_ = sk_tr + sk_va
        if len(yt) == 0:
            raise ValueError("no readable training images")
        missing = [c for i, c in enumerate(self.class_names_) if i not in set(yt.tolist())]
        if missing:
            raise ValueError(f"no readable training images for class(es): {', '.join(missing)}")
        t_feat = time.perf_counter() - t0
        head, history, summary = fit_head(xt, yt, xv, yv, len(self.class_names_), self.train_config, on_epoch=on_epoch)
        self.head_ = head
        self.history_ = history
        self.fit_summary_ = {**summary, "feature_seconds": round(t_feat, 3), "fit_seconds": round(time.perf_counter() - t0, 3)}
        runner = self.backbone_runner()
        self.meta_ = self._make_meta(runner)
        return self

    def _make_meta(self, runner: BackboneRunner) -> dict:
        spec = runner.spec
        return {
            "imgclf_version": __version__,
            "backbone": spec.describe(),
            "weights": runner.weights.to_dict(),
            "preprocessing": spec.preprocessing.to_dict(),
            "class_names": list(self.class_names_),
            "head": head_config(self.train_config.head, spec.feature_dim, len(self.class_names_)),
            "frozen_backbone": True,
            "train_config": self.train_config.to_dict(),
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ predict

    def _check_fitted(self):
        if not hasattr(self, "head_"):
            raise RuntimeError("this ImageClassifier is not fitted; call fit() or ImageClassifier.load()")

    @torch.no_grad()
    def _proba_from_features(self, x: np.ndarray) -> np.ndarray:
        self.head_.eval()
        if len(x) == 0:
            return np.zeros((0, len(self.class_names_)), np.float64)
        return torch.softmax(self.head_(torch.from_numpy(x)), 1).double().numpy()

    def predict_proba(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """(n, n_classes) probabilities; rows of unreadable files are NaN (see ``errors_``)."""
        self._check_fitted()
        paths = [str(p) for p in paths]
        x, ok, errors = self.features(paths, desc="predict features")
        out = np.full((len(paths), len(self.class_names_)), np.nan)
        if ok:
            out[ok] = self._proba_from_features(x)
        self.errors_ = {paths[i]: msg for i, msg in errors.items()}
        return out

    def predict(self, paths: Sequence[str | os.PathLike]) -> list[str | None]:
        """Predicted class name per path (None for unreadable files)."""
        proba = self.predict_proba(paths)
        return [None if np.isnan(row).any() else self.class_names_[int(row.argmax())] for row in proba]

    def predict_table(self, paths: Sequence[str | os.PathLike]) -> list[dict]:
        """Rows for the predict CLI: path, predicted class, probability per class, error."""
        proba = self.predict_proba(paths)
        rows = []
        for p, row in zip(paths, proba):
            r = {"path": str(p)}
            if np.isnan(row).any():
                r.update({"predicted": None, **{c: None for c in self.class_names_}, "error": self.errors_.get(str(p), "unreadable")})
            else:
                r.update({"predicted": self.class_names_[int(row.argmax())], **{c: float(v) for c, v in zip(self.class_names_, row)}, "error": None})
            rows.append(r)
        return rows

    # ------------------------------------------------------------------ evaluate

    def evaluate_samples(self, samples) -> dict:
        self._check_fitted()
        x, y, ok, skipped = self._split_features(samples, "test features")
        probs = self._proba_from_features(x)
        # per-image results, for reports (worst mistakes) and callers
        self.last_eval_ = {"paths": [str(samples[i].path) for i in ok], "y_true": y, "probs": probs}
        m = classification_metrics(y, probs, self.class_names_)
        m["skipped"] = [{"path": p, "error": e} for p, e in skipped]
        return m

    def evaluate(self, data: str | os.PathLike | None = None) -> dict:
        """Metrics on ``data``'s test split (or on all of a flat class-folder set).

        With no argument, evaluates the test split of the dataset given to ``fit``.
        """
        self._check_fitted()
        if data is None:
            if not hasattr(self, "dataset_"):
                raise ValueError("evaluate() needs a folder when the model was loaded from disk")
            return self.evaluate_samples(self.dataset_.samples["test"])
        return self.evaluate_samples(labelled_eval_samples(data, self.class_names_))

    def score(self, data: str | os.PathLike) -> float:
        return float(self.evaluate(data)["accuracy"])

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> Path:
        self._check_fitted()
        Path(path).mkdir(parents=True, exist_ok=True)
        return save_bundle(path, self.head_, self.meta_)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        weights: str | os.PathLike | None = None,
        engine: str = "auto",
        precision: str = "auto",
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        progress: bool = False,
    ) -> "ImageClassifier":
        """Load a bundle; the backbone comes from the weights source recorded in it.

        ``weights`` overrides where the backbone weights are read from (e.g. the file
        moved); its identity must still match the one the model was trained with.
        """
        meta, head_tensors = load_bundle(path)
        b = meta["backbone"]
        clf = cls(backbone=b["name"], engine=engine, precision=precision, cache_dir=cache_dir, use_cache=use_cache, progress=progress, seed=int(meta.get("seed", 0)))
        spec = get_backbone_spec(b["name"])
        prep = Preprocessing.from_dict(meta["preprocessing"])
        if prep != spec.preprocessing:
            log.warning("model.json preprocessing differs from the registry's current entry; using the model's")
            spec = dataclasses.replace(spec, preprocessing=prep)
        clf._spec = spec
        recorded = meta["weights"]
        kind = recorded.get("kind")
        if weights is not None:
            ref = resolve_weights(spec, weights, seed=clf.seed)
        elif kind == "none":
            ref = WeightsRef(**recorded)
        elif kind == "file":
            if not recorded.get("path") or not Path(recorded["path"]).is_file():
                raise BundleError(f"{path}: backbone weights file {recorded.get('path')} not found; pass --weights PATH to the same file")
            ref = resolve_weights(spec, recorded["path"], seed=clf.seed)
        else:
            ref = resolve_weights(spec, "imagenet", seed=clf.seed)
        if ref.identity != recorded.get("identity"):
            raise BundleError(
                f"{path}: backbone weights differ from training ({ref.identity} here, {recorded.get('identity')} in the model)"
            )
        clf._weights_ref = ref
        head = head_from_config(meta["head"])
        try:
            head.load_state_dict(head_tensors, strict=True)
        except RuntimeError as e:
            raise BundleError(f"{path}: head tensors do not match model.json ({str(e).splitlines()[0]})") from None
        head.eval()
        clf.head_ = head
        clf.class_names_ = list(meta["class_names"])
        clf.meta_ = meta
        clf.train_config = TrainConfig(**{**TrainConfig().to_dict(), **meta.get("train_config", {})})
        return clf


def labelled_eval_samples(data: str | os.PathLike, class_names: list[str]):
    """Samples to evaluate: ``DATA/test/<class>/*`` if DATA has a test folder, else ``DATA/<class>/*``.

    Unlike training, one class folder is enough (e.g. a folder of malignant cases only).
    """
    from imgclf.data import DatasetError, Sample, scan_class_folders

    root = Path(data)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    folder = root / "test" if (root / "test").is_dir() else root
    ignored: list[Path] = []
    warnings: list[str] = []
    folders = scan_class_folders(folder, ignored, warnings)
    for w in warnings:
        log.warning("%s", w)
    if not any(folders.values()):
        raise DatasetError(f"{folder}: no images in class sub-folders (expected {folder}/<class>/<image>)")
    index = {c: i for i, c in enumerate(class_names)}
    unknown = [c for c in folders if c not in index]
    if unknown:
        raise DatasetError(f"{folder}: class folder(s) {', '.join(unknown)} unknown to the model (classes: {', '.join(class_names)})")
    return [Sample(Path(p), index[c], "test") for c in sorted(folders) for p in folders[c]]


def _with_validation_folder(ds: Dataset, folder: str | os.PathLike) -> Dataset:
    samples = labelled_eval_samples(folder, ds.class_names)
    samples = [dataclasses.replace(s, split="validation") for s in samples]
    new = dataclasses.replace(ds, samples={**ds.samples, "validation": samples}, split_source={**ds.split_source, "validation": f"folder {folder}"})
    return new


def environment_info() -> dict:
    import importlib.metadata as md

    def v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "imgclf": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        **{k: v(k) for k in ("torchvision", "timm", "onnxruntime", "openvino", "numpy", "pillow", "scikit-learn")},
    }
