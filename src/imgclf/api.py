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
    BackboneSpec,
    Preprocessing,
    BlocksUnknownError,
    WeightsRef,
    get_backbone_spec,
    resolve_weights,
)
from imgclf.bundle import BundleError, load_bundle, save_bundle
from imgclf.data import Dataset, load_dataset
from imgclf.augment import AugmentedView, build_augment, tta_views
from imgclf.features import BackboneRunner, extract_features
from imgclf.fileio import default_cache_dir
from imgclf.finetune import TAIL_BN_MODES, finetune, split_blocks, tensors_digest
from imgclf.heads import head_config, head_from_config
from imgclf.metrics import classification_metrics
from imgclf.names import DEFAULT_BACKBONE
from imgclf.recipes import DEFAULT_RECIPE, default_unfreeze, resolve_recipe
from imgclf.thresholds import apply_threshold, choose_threshold, parse_policy
from imgclf.training import MONITORS, TrainConfig, fit_head

log = logging.getLogger("imgclf")


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)


class ImageClassifier:
    """Transfer-learned image classifier on an ImageNet backbone with cached features.

    ``recipe`` (``seed`` | ``fast`` | ``finetune``, see :mod:`imgclf.recipes`) sets the
    defaults; every other training argument left as None takes the recipe's value.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str | os.PathLike | None = "imagenet",
        recipe: str = DEFAULT_RECIPE,
        *,
        head: str | None = None,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        patience: int | None = None,
        class_weight: str | None = None,
        loss: str | None = None,
        focal_gamma: float = 2.0,
        sampler: str | None = None,
        label_smoothing: float | None = None,
        mixup: float | None = None,
        augment: str | None = None,
        hflip: bool | None = None,
        vflip: bool | None = None,
        rot90: bool | None = None,
        crop_scale: float | None = None,
        color_jitter: float | None = None,
        feature_views: int | None = None,
        unfreeze: int | None = None,
        finetune_epochs: int | None = None,
        finetune_lr: float | None = None,
        finetune_patience: int | None = None,
        finetune_views: int | None = None,
        finetune_label_smoothing: float | None = None,
        finetune_bn: str | None = None,
        finetune_monitor: str | None = None,
        finetune_cutmix: float | None = None,
        threshold_policy: str | None = None,
        tta: str | None = None,
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
        self.settings = resolve_recipe(recipe, dict(
            head=head, epochs=epochs, lr=lr, batch_size=batch_size, patience=patience, class_weight=class_weight,
            loss=loss, sampler=sampler, label_smoothing=label_smoothing, mixup=mixup, augment=augment,
            feature_views=feature_views, unfreeze=unfreeze, finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
            finetune_patience=finetune_patience, finetune_views=finetune_views,
            finetune_label_smoothing=finetune_label_smoothing, finetune_bn=finetune_bn, finetune_monitor=finetune_monitor, finetune_cutmix=finetune_cutmix, threshold_policy=threshold_policy, tta=tta,
        ))
        st = self.settings
        self.augment_config = build_augment(st["augment"], hflip=hflip, vflip=vflip, rot90=rot90, crop_scale=crop_scale, color_jitter=color_jitter)
        self.settings["augment_config"] = self.augment_config.to_dict()
        self.settings["focal_gamma"] = focal_gamma
        self.train_config = TrainConfig(
            head=st["head"], epochs=st["epochs"], lr=st["lr"], batch_size=st["batch_size"], patience=st["patience"],
            class_weight=st["class_weight"], seed=seed, label_smoothing=st["label_smoothing"], loss=st["loss"],
            focal_gamma=focal_gamma, sampler=st["sampler"], mixup=st["mixup"], checkpoint=st["checkpoint"],
        )
        self.train_config.validate()
        parse_policy(st["threshold_policy"])
        tta_views(st["tta"])
        if st["feature_views"] < 1:
            raise ValueError("--feature-views must be >= 1")
        if st["finetune_views"] < 1:
            raise ValueError("--finetune-views must be >= 1")
        if st["finetune_epochs"] and not (st["finetune_lr"] > 0):
            raise ValueError("--finetune-lr must be a positive number")
        if not st["finetune_cutmix"] >= 0:
            raise ValueError("--finetune-cutmix must be >= 0")
        if st["finetune_bn"] not in TAIL_BN_MODES:
            raise ValueError(f"--finetune-bn must be one of {', '.join(TAIL_BN_MODES)}")
        if st["finetune_monitor"] not in MONITORS:
            raise ValueError(f"--finetune-monitor must be one of {', '.join(MONITORS)}")
        self.recipe = recipe
        self.tta = st["tta"]
        self.threshold_ = None
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
        self._tuned: dict[str, torch.Tensor] | None = None
        self.errors_: dict[str, str] = {}

    # ------------------------------------------------------------------ backbone

    def backbone_runner(self) -> BackboneRunner:
        """Resolve backbone and weights (cheap, fails fast offline); the model is built lazily."""
        if self._runner is None:
            if self._spec is None:
                spec = get_backbone_spec(self.backbone)
                if self.settings["input_scaling"] == "x/255":
                    log.warning(
                        "recipe 'seed' keeps the tutorial's bug: pixels scaled x/255 (squash resize, nearest) instead of "
                        "the preprocessing %s was trained with; for comparison only", spec.name)
                    s = spec.preprocessing.input_size
                    spec = dataclasses.replace(spec, preprocessing=Preprocessing(s, s, "nearest", (0.0, 0.0, 0.0), (255.0, 255.0, 255.0), "squash"))
                if self.settings["head"] == "tutorial":
                    log.warning("--head tutorial keeps the tutorial's other bug: a sigmoid in front of a softmax-style loss; for comparison only")
                self._spec = spec
            if self._weights_ref is None:
                self._weights_ref = resolve_weights(self._spec, self.weights, seed=self.seed)
            self._runner = BackboneRunner(self._spec, self._weights_ref, self.cache_dir, engine=self.engine, precision=self.precision, seed=self.seed)
            if self._tuned is not None:
                self._runner.apply_tuned(self._tuned)
        return self._runner

    def features(self, paths: Sequence[str | os.PathLike], desc: str = "features", transform=None) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """Backbone features for ``paths`` (cached); returns (X, ok indices, errors by index)."""
        runner = self.backbone_runner()
        bar = _progress_bar(len(paths), desc, self.progress)
        try:
            res = extract_features(list(paths), runner, use_cache=self.use_cache, progress=bar.update if bar else None, transform=transform)
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
        if transform is None:
            for i, msg in res.errors.items():
                log.warning("skipped %s", msg)
        self.last_extraction_ = res
        return res.features, res.ok_indices, res.errors

    def _split_features(self, samples, desc):
        x, ok, errors = self.features([s.path for s in samples], desc=desc)
        y = np.array([samples[i].label for i in ok], dtype=np.int64)
        skipped = [(str(samples[i].path), msg) for i, msg in errors.items()]
        return x, y, ok, skipped

    def _aligned_view(self, paths, ok: list[int], plain: np.ndarray, transform, desc: str) -> np.ndarray:
        """Features of one view, row-aligned with ``plain`` (the rows ``ok`` of ``paths``).

        An image whose view fails to decode falls back to its plain-view row.
        """
        xv, okv, _ = self.features(paths, desc=desc, transform=transform)
        pos = {i: k for k, i in enumerate(okv)}
        if any(i not in pos for i in ok):
            log.warning("%s: some views failed to decode; using the plain view for those images", desc)
        return np.stack([xv[pos[i]] if i in pos else plain[k] for k, i in enumerate(ok)]) if ok else plain

    # ------------------------------------------------------------------ fit

    def fit(self, data: str | os.PathLike | Dataset, validation: str | os.PathLike | None = None, *, on_epoch: Callable[[dict], None] | None = None) -> "ImageClassifier":
        """Train on ``data`` (a dataset root in either layout, or a loaded Dataset).

        ``validation`` optionally names a folder of class sub-folders that replaces the
        dataset's own (or carved) validation split.
        """
        t0 = time.perf_counter()
        st = self.settings
        # a second fit() starts from the pretrained backbone, not from a previous fine-tune
        self._runner, self._tuned, self.threshold_ = None, None, None
        if isinstance(data, Dataset):
            ds = data
        else:  # with a validation folder, nothing is carved out of train for validation
            ds = load_dataset(data, val_fraction=0.0 if validation is not None else self.val_fraction, test_fraction=self.test_fraction, seed=self.seed)
        if validation is not None:
            ds = with_validation_folder(ds, validation)
        for w in ds.warnings:
            log.warning("%s", w)
        self.dataset_ = ds
        self.class_names_ = list(ds.class_names)
        n_classes = len(self.class_names_)
        runner = self.backbone_runner()
        unfreeze = (default_unfreeze(runner.spec) if st["unfreeze"] is None else st["unfreeze"]) if st["finetune_epochs"] else 0
        if unfreeze:
            try:  # before any work: can this backbone be split into enough blocks?
                split_blocks(runner.torch_module(), runner.spec, unfreeze)
            except BlocksUnknownError as e:
                if st["unfreeze"] is not None:  # asked for explicitly
                    raise ValueError(f"{e}; drop --unfreeze or use --recipe fast") from None
                log.warning("%s: stage 2 skipped, the frozen backbone's head is the model", e)
                unfreeze = 0
        train, val = ds.samples["train"], ds.samples["validation"]
        xt, yt, ok_t, sk_tr = self._split_features(train, "train features")
        xv, yv, ok_v, sk_va = self._split_features(val, "validation features")
        self.skipped_ = sk_tr + sk_va
        if len(yt) == 0:
            raise ValueError("no readable training images")
        missing = [c for i, c in enumerate(self.class_names_) if i not in set(yt.tolist())]
        if missing:
            raise ValueError(f"no readable training images for class(es): {', '.join(missing)}")
        views = st["feature_views"] if self.augment_config.active else 1
        if views > 1:  # (views, n, D): the plain view plus views - 1 cached augmented ones
            train_paths = [s.path for s in train]
            xt = np.stack([xt] + [
                self._aligned_view(train_paths, ok_t, xt, AugmentedView(self.augment_config, v, self.seed), f"train features view {v + 1}/{views}")
                for v in range(1, views)
            ])
        t_feat = time.perf_counter() - t0
        head, history, summary = fit_head(xt, yt, xv, yv, n_classes, self.train_config, on_epoch=on_epoch)
        summaries = [summary]

        if unfreeze:
            cfg2 = dataclasses.replace(
                self.train_config, epochs=st["finetune_epochs"], lr=st["finetune_lr"], patience=st["finetune_patience"],
                optimizer="adamw", weight_decay=0.01, warmup_epochs=1.0, schedule="cosine", checkpoint="best",
                label_smoothing=st["finetune_label_smoothing"], monitor=st["finetune_monitor"], cutmix=st["finetune_cutmix"],
            )
            tuned, hist2, sum2 = finetune(
                runner, head, [str(train[i].path) for i in ok_t], yt, [str(val[i].path) for i in ok_v], yv, n_classes, cfg2,
                unfreeze=unfreeze, augment=self.augment_config, views=st["finetune_views"], tail_bn=st["finetune_bn"], on_epoch=on_epoch,
            )
            if tuned:
                runner.apply_tuned(tuned)
                self._tuned = tuned
            history += hist2
            summaries.append(sum2)
            self.finetune_config_ = cfg2.to_dict()
        self.head_ = head.eval()
        self.history_ = history

        if n_classes == 2:
            if self._tuned is not None and parse_policy(st["threshold_policy"])[0] != "fixed":
                # the backbone changed: validation features too
                xv, yv, _, _ = self._split_features(val, "validation features")
            self.threshold_ = self._choose_threshold(xv, yv)
        self.fit_summary_ = {
            "stages": summaries,
            "best_epoch": summaries[-1]["best_epoch"],
            "epochs_run": sum(s["epochs_run"] for s in summaries),
            "monitor": summaries[-1]["monitor"],
            "threshold": self.threshold_,
            "feature_seconds": round(t_feat, 3),
            "fit_seconds": round(time.perf_counter() - t0, 3),
        }
        self.meta_ = self._make_meta(runner, unfreeze if self._tuned is not None else 0)
        return self

    def _choose_threshold(self, x: np.ndarray, y: np.ndarray) -> float:
        """Binary decision threshold from validation features ``x`` and labels ``y``."""
        policy = self.settings["threshold_policy"]
        if parse_policy(policy)[0] == "fixed":
            return choose_threshold([], [], policy)
        if len(set(y.tolist())) < 2:
            log.warning("validation split lacks a class: threshold policy %s not applicable, using 0.5", policy)
            return 0.5
        t = choose_threshold(y, self._proba_from_features(x)[:, 1], policy)
        log.info("decision threshold %.4f on P(%s), chosen on validation by %s", t, self.class_names_[1], policy)
        return t

    def _make_meta(self, runner: BackboneRunner, unfreeze: int) -> dict:
        spec = runner.spec
        return {
            "imgclf_version": __version__,
            "backbone": spec.describe(),
            "weights": runner.weights.to_dict(),
            "preprocessing": spec.preprocessing.to_dict(),
            "class_names": list(self.class_names_),
            "head": head_config(self.train_config.head, spec.feature_dim, len(self.class_names_)),
            "frozen_backbone": self._tuned is None,
            "backbone_tuned": None if self._tuned is None else {"unfreeze": unfreeze, "digest": runner.tuned_digest, "tensors": len(self._tuned)},
            "recipe": self.recipe,
            "settings": self.settings,
            "train_config": self.train_config.to_dict(),
            "threshold": self.threshold_,
            "threshold_policy": self.settings["threshold_policy"] if self.threshold_ is not None else None,
            "positive_class": self.class_names_[1] if len(self.class_names_) == 2 else None,
            "tta": self.tta,
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

    def _proba(self, paths: list[str], desc: str, tta: str | None = None) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """Probabilities of readable images, averaged over the test-time views."""
        tta = self.tta if tta is None else tta
        x, ok, errors = self.features(paths, desc=desc)
        total = self._proba_from_features(x)
        views = tta_views(tta)[1:]
        for view in views:
            total += self._proba_from_features(self._aligned_view(paths, ok, x, view, f"{desc} ({view.name})"))
        return total / (1 + len(views)), ok, errors

    def predict_proba(self, paths: Sequence[str | os.PathLike], *, tta: str | None = None) -> np.ndarray:
        """(n, n_classes) probabilities; rows of unreadable files are NaN (see ``errors_``)."""
        self._check_fitted()
        paths = [str(p) for p in paths]
        probs, ok, errors = self._proba(paths, "predict features", tta)
        out = np.full((len(paths), len(self.class_names_)), np.nan)
        if ok:
            out[ok] = probs
        self.errors_ = {paths[i]: msg for i, msg in errors.items()}
        return out

    def predict(self, paths: Sequence[str | os.PathLike], *, tta: str | None = None) -> list[str | None]:
        """Predicted class name per path (binary: the stored threshold); None for unreadable files."""
        proba = self.predict_proba(paths, tta=tta)
        good = ~np.isnan(proba).any(1)
        idx = np.zeros(len(proba), np.int64)
        if good.any():
            idx[good] = apply_threshold(proba[good], self.threshold_)
        return [self.class_names_[int(i)] if g else None for i, g in zip(idx, good)]

    def predict_table(self, paths: Sequence[str | os.PathLike], *, tta: str | None = None) -> list[dict]:
        """Rows for the predict CLI: path, predicted class, probability per class, error."""
        proba = self.predict_proba(paths, tta=tta)
        rows = []
        for p, row in zip(paths, proba):
            r = {"path": str(p)}
            if np.isnan(row).any():
                r.update({"predicted": None, **{c: None for c in self.class_names_}, "error": self.errors_.get(str(p), "unreadable")})
            else:
                k = int(apply_threshold(row[None], self.threshold_)[0])
                r.update({"predicted": self.class_names_[k], **{c: float(v) for c, v in zip(self.class_names_, row)}, "error": None})
            rows.append(r)
        return rows

    # ------------------------------------------------------------------ evaluate

    def evaluate_samples(self, samples, *, tta: str | None = None, bootstrap: int = 1000) -> dict:
        self._check_fitted()
        paths = [str(s.path) for s in samples]
        probs, ok, errors = self._proba(paths, "test features", tta)
        y = np.array([samples[i].label for i in ok], dtype=np.int64)
        # per-image results, for reports (worst mistakes) and callers
        self.last_eval_ = {"paths": [paths[i] for i in ok], "y_true": y, "probs": probs}
        m = classification_metrics(y, probs, self.class_names_, threshold=self.threshold_, bootstrap=bootstrap, seed=self.seed)
        m["tta"] = self.tta if tta is None else tta
        m["skipped"] = [{"path": paths[i], "error": e} for i, e in errors.items()]
        return m

    def evaluate(self, data: str | os.PathLike | None = None, *, tta: str | None = None, bootstrap: int = 1000) -> dict:
        """Metrics on ``data``'s test split (or on all of a flat class-folder set).

        With no argument, evaluates the test split of the dataset given to ``fit``.
        """
        self._check_fitted()
        if data is None:
            if not hasattr(self, "dataset_"):
                raise ValueError("evaluate() needs a folder when the model was loaded from disk")
            return self.evaluate_samples(self.dataset_.samples["test"], tta=tta, bootstrap=bootstrap)
        return self.evaluate_samples(labelled_eval_samples(data, self.class_names_), tta=tta, bootstrap=bootstrap)

    def score(self, data: str | os.PathLike) -> float:
        return float(self.evaluate(data)["accuracy"])

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> Path:
        self._check_fitted()
        Path(path).mkdir(parents=True, exist_ok=True)
        return save_bundle(path, self.head_, self.meta_, backbone_tensors=self._tuned)

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
        tta: str | None = None,
    ) -> "ImageClassifier":
        """Load a bundle; the backbone comes from the weights source recorded in it.

        ``weights`` overrides where the backbone weights are read from (e.g. the file
        moved); its identity must still match the one the model was trained with.
        """
        meta, head_tensors, backbone_tensors = load_bundle(path)
        b = meta["backbone"]
        clf = cls(backbone=b["name"], recipe="fast", engine=engine, precision=precision, cache_dir=cache_dir, use_cache=use_cache, progress=progress, seed=int(meta.get("seed", 0)))
        spec = get_backbone_spec(b["name"])
        prep = Preprocessing.from_dict(meta["preprocessing"])
        if prep != spec.preprocessing:
            if meta.get("settings", {}).get("input_scaling") != "x/255":
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
        tuned_meta = meta.get("backbone_tuned")
        if tuned_meta:
            if not backbone_tensors or tensors_digest(backbone_tensors) != tuned_meta.get("digest"):
                raise BundleError(f"{path}: fine-tuned backbone tensors are missing or do not match model.json")
            clf._tuned = backbone_tensors
        head = head_from_config(meta["head"])
        try:
            head.load_state_dict(head_tensors, strict=True)
        except RuntimeError as e:
            raise BundleError(f"{path}: head tensors do not match model.json ({str(e).splitlines()[0]})") from None
        head.eval()
        clf.head_ = head
        clf.class_names_ = list(meta["class_names"])
        clf.meta_ = meta
        clf.threshold_ = meta.get("threshold")
        clf.tta = tta if tta is not None else meta.get("tta", "none")
        tta_views(clf.tta)
        clf.recipe = meta.get("recipe", "fast")
        known = TrainConfig().to_dict()
        clf.train_config = TrainConfig(**{**known, **{k: v for k, v in meta.get("train_config", {}).items() if k in known}})
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


def with_validation_folder(ds: Dataset, folder: str | os.PathLike) -> Dataset:
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
