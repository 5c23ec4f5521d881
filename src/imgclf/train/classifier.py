"""The training classifier: recipe settings resolved and validated, two-stage fit, threshold.

    clf = ImageClassifier(backbone="efficientnet_lite0").fit("data/lesions")
    clf.evaluate("data/lesions")          # metrics on the test split
    clf.predict_proba(["a.jpg", "b.png"])  # (n, n_classes)
    clf.save("model/"); ImageClassifier.load("model/")
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable

import numpy as np

from imgclf._version import __version__
from imgclf.backbones.registry import BackboneSpec, BlocksUnknownError, Preprocessing, get_backbone_spec
from imgclf.config.names import DEFAULT_BACKBONE
from imgclf.config.recipes import DEFAULT_RECIPE, default_unfreeze, resolve_recipe
from imgclf.data.augment import AugmentedView, build_augment, tta_views
from imgclf.data.datasets import Dataset, load_dataset, with_validation_folder
from imgclf.engines.features import BackboneRunner
from imgclf.evaluation.thresholds import choose_threshold, parse_policy
from imgclf.model.classifier import Classifier
from imgclf.model.heads import head_config
from imgclf.train.finetune import TAIL_BN_MODES, finetune, split_blocks
from imgclf.train.loops import MONITORS, TrainConfig, fit_head

log = logging.getLogger("imgclf")


class ImageClassifier(Classifier):
    """Transfer-learned image classifier on an ImageNet backbone with cached features.

    ``recipe`` (``seed`` | ``fast`` | ``finetune``, see :mod:`imgclf.config.recipes`) sets the
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
        super().__init__(backbone, weights, tta="none", seed=seed, engine=engine, precision=precision, cache_dir=cache_dir, use_cache=use_cache, progress=progress)
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
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    def _resolve_spec(self) -> BackboneSpec:
        """The registry entry, or under ``input_scaling: x/255`` the tutorial's preprocessing."""
        spec = get_backbone_spec(self.backbone)
        if self.settings["input_scaling"] == "x/255":
            log.warning(
                "recipe 'seed' keeps the tutorial's bug: pixels scaled x/255 (squash resize, nearest) instead of "
                "the preprocessing %s was trained with; for comparison only", spec.name)
            s = spec.preprocessing.input_size
            spec = dataclasses.replace(spec, preprocessing=Preprocessing(s, s, "nearest", (0.0, 0.0, 0.0), (255.0, 255.0, 255.0), "squash"))
        if self.settings["head"] == "tutorial":
            log.warning("--head tutorial keeps the tutorial's other bug: a sigmoid in front of a softmax-style loss; for comparison only")
        return spec

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

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> "ImageClassifier":
        """A saved model (see :meth:`Classifier.load`), with its training configuration restored."""
        clf = super().load(path, **kwargs)
        known = TrainConfig().to_dict()
        clf.train_config = TrainConfig(**{**known, **{k: v for k, v in clf.meta_.get("train_config", {}).items() if k in known}})
        return clf
