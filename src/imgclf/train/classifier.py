"""The training classifier: recipe settings resolved and validated, two-stage fit, threshold.

    clf = ImageClassifier(backbone="efficientnet_lite0").fit("data/lesions")
    clf.evaluate("data/lesions")          # metrics on the test split
    clf.predict_proba(["a.jpg", "b.png"])  # (n, n_classes)
    clf.save("model/"); ImageClassifier.load("model/")
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from imgclf import distributed
from imgclf._version import __version__
from imgclf.backbones.blocks import BlocksUnknownError
from imgclf.backbones.specs import BackboneSpec, Preprocessing, get_backbone_spec
from imgclf.config import layout
from imgclf.config.layout import head_checkpoint_stage, refit_checkpoint_stage
from imgclf.config.recipes import default_unfreeze, make_settings
from imgclf.config.settings import RUNTIME_FIELDS, TRAIN_FIELDS, TTA_AUTO_CANDIDATES, TTA_AUTO_MARGIN, SettingError, TrainSettings, make_runtime
from imgclf.data.augment import TTA_PRESETS, AugmentedView, FixedView, build_augment
from imgclf.data.datasets import Dataset, load_dataset, with_validation_folder
from imgclf.engines.runner import BackboneRunner
from imgclf.evaluation.thresholds import choose_threshold, parse_policy
from imgclf.model.classifier import Classifier
from imgclf.evaluation.calibration import fit_temperature, view_mean_log_probs
from imgclf.model.heads import head_config, head_members, with_temperature
from imgclf.model.metadata import ModelMeta
from imgclf.model.neighbors import NeighborIndex, choose_cases
from imgclf.train.checkpoint import EpochCheckpoint, images_digest
from imgclf.train.finetune import finetune, plain_view_extraction, split_blocks, tail_features_from_cache
from imgclf.train.heads import fit_heads
from imgclf.train.loops import TrainConfig, calibrated_nll

log = logging.getLogger("imgclf")


class ImageClassifier(Classifier):
    """Transfer-learned image classifier on an ImageNet backbone with cached features.

    ``recipe`` (``ensemble``, the default | ``fast`` | ``finetune`` | ``seed``, see
    :mod:`imgclf.config.recipes`) sets the defaults; every setting given overrides it. ``fit`` validates the data and learns;
    fitted attributes end in ``_``.
    """

    def __init__(self, backbone: str | None = None, weights: str | os.PathLike | None = None, recipe: str | None = None, *,
                 settings: TrainSettings | None = None, **options):
        """``options``: any declared setting (:class:`~imgclf.config.settings.TrainSettings`,
        None = the recipe's value) or runtime option (:class:`~imgclf.config.settings.RuntimeOptions`).
        Unknown names and bad values raise :class:`~imgclf.config.settings.SettingError` here,
        before any work. ``settings`` passes a resolved object instead (e.g. a run's config)."""
        runtime = make_runtime(**{k: options.pop(k) for k in list(options) if k in RUNTIME_FIELDS})
        if settings is None:
            settings = make_settings(recipe, backbone=backbone, weights=weights, **options)
        elif backbone or weights or recipe or options:
            raise SettingError("pass either settings=... or individual settings, not both")
        # tta auto is decided by fit() on validation; until then the model averages no views
        super().__init__(settings.backbone, settings.weights, tta="none" if settings.tta == "auto" else settings.tta, seed=settings.seed,
                         **runtime.to_dict())
        self._use_settings(settings)

    def _use_settings(self, settings: TrainSettings) -> None:
        """Everything derived from the settings, in one place (construction and ``load``)."""
        self.settings = settings
        self.recipe = settings.recipe
        self.augment_config = build_augment(settings.augment, hflip=settings.hflip, vflip=settings.vflip, rot90=settings.rot90,
                                            crop_scale=settings.crop_scale, color_jitter=settings.color_jitter)
        self.train_config = TrainConfig.stage1(settings)
        self._unfreeze: int | None = None  # stage2_blocks(), once per backbone runner

    def _resolve_spec(self) -> BackboneSpec:
        """The registry entry, or under ``input_scaling: x/255`` the tutorial's preprocessing."""
        spec = get_backbone_spec(self.backbone)
        if self.settings.input_scaling == "x/255":
            log.warning(
                "recipe 'seed' keeps the tutorial's bug: pixels scaled x/255 (squash resize, nearest) instead of "
                "the preprocessing %s was trained with; for comparison only", spec.name)
            s = spec.preprocessing.input_size
            spec = dataclasses.replace(spec, preprocessing=Preprocessing(s, s, "nearest", (0.0, 0.0, 0.0), (255.0, 255.0, 255.0), "squash"))
        if self.settings.head == "tutorial":
            log.warning("--head tutorial keeps the tutorial's other bug: a sigmoid in front of a softmax-style loss; for comparison only")
        return spec

    def stage2_blocks(self) -> int:
        """Blocks stage 2 will train (0: no stage 2), checked against the backbone before any work.

        Resolves backbone and weights; an explicit ``unfreeze`` the backbone cannot honour
        is an error, an entry default it cannot honour skips stage 2 with a warning.
        """
        if self._unfreeze is None:
            st = self.settings
            runner = self.backbone_runner()
            unfreeze = (default_unfreeze(runner.spec) if st.unfreeze is None else st.unfreeze) if st.finetune_epochs else 0
            if unfreeze:
                try:
                    split_blocks(runner.torch_module(), runner.spec, unfreeze)
                except BlocksUnknownError as e:
                    if st.unfreeze is not None:  # asked for explicitly
                        raise ValueError(f"{e}; drop unfreeze (the frozen backbone's heads are then the model)") from None
                    log.warning("%s: stage 2 skipped, the frozen backbone's head is the model", e)
                    unfreeze = 0
            self._unfreeze = unfreeze
        return self._unfreeze

    # ------------------------------------------------------------------ fit

    def fit(self, data: str | os.PathLike | Dataset, validation: str | os.PathLike | None = None, *, on_epoch: Callable[[dict], None] | None = None,
            checkpoint_dir: str | os.PathLike | None = None) -> "ImageClassifier":
        """Train on ``data`` (a dataset root in either layout, or a loaded Dataset).

        ``validation`` optionally names a folder of class sub-folders that replaces the
        dataset's own (or carved) validation split. ``checkpoint_dir``: each stage saves its
        state there after every epoch (``layout.CHECKPOINT``) and continues from a state it
        finds there, so a killed fit repeated with the same settings and data resumes.
        """
        t0 = time.perf_counter()
        st = self.settings
        if self._tuned is not None:  # a second fit() starts from the pretrained backbone, not from a previous fine-tune
            self._runner, self._tuned, self._unfreeze = None, None, None
        self.threshold_ = None
        unfreeze = self.stage2_blocks()
        if isinstance(data, Dataset):
            ds = data
        else:  # with a validation folder, nothing is carved out of train for validation
            ds = load_dataset(data, val_fraction=0.0 if validation is not None else st.val_fraction, test_fraction=st.test_fraction, seed=self.seed)
        if validation is not None:
            ds = with_validation_folder(ds, validation)
        for w in ds.warnings:
            log.warning("%s", w)
        self.dataset_ = ds
        self.class_names_ = list(ds.class_names)
        n_classes = len(self.class_names_)
        runner = self.backbone_runner()
        train, val = ds.samples["train"], ds.samples["validation"]
        # with stage 2 ahead, images not in the feature cache go through the frozen prefix and then the
        # rest, leaving the prefix activations that stage 2 trains on in its disk cache (one pass, not two)
        split = plain_view_extraction(runner, unfreeze, runner.cache_root) if unfreeze and self.use_cache else None
        xt, yt, ok_t, sk_tr = self._split_features(train, "train features", engine_factory=split)
        xt_plain = xt  # the plain view, for the similar-cases index
        xv, yv, ok_v, sk_va = self._split_features(val, "validation features", engine_factory=split)
        self.skipped_ = sk_tr + sk_va
        if len(yt) == 0:
            raise ValueError("no readable training images")
        missing = [c for i, c in enumerate(self.class_names_) if i not in set(yt.tolist())]
        if missing:
            raise ValueError(f"no readable training images for class(es): {', '.join(missing)}")
        views = st.feature_views if self.augment_config.active else 1
        if views > 1:  # (views, n, D): the plain view plus views - 1 cached augmented ones
            train_paths = [s.path for s in train]
            xt = np.stack([xt] + [
                self._aligned_view(train_paths, ok_t, xt, AugmentedView(self.augment_config, v, self.seed), f"train features view {v + 1}/{views}")
                for v in range(1, views)
            ])
        t_feat = time.perf_counter() - t0
        # a checkpoint continues only on the same pictures: names and labels alone could hide re-exported files
        images = images_digest([s.path for s in train + val]) if checkpoint_dir is not None else None

        def stage_checkpoint(stage: str) -> EpochCheckpoint | None:
            return None if checkpoint_dir is None else EpochCheckpoint(Path(checkpoint_dir) / layout.CHECKPOINT.format(stage=stage), data=images)

        # under torchrun rank 0 trains and every rank takes its head: identical everywhere, whatever the CPUs
        trained = fit_heads(xt, yt, xv, yv, n_classes, self.train_config, st.heads, on_epoch=on_epoch,
                            checkpoint_for=lambda k: stage_checkpoint(head_checkpoint_stage(k)), parts=runner.spec.feature_parts) if distributed.is_main() else None
        head, history, summary = distributed.broadcast_object(trained)
        summaries = [summary]
        frozen_heads = head if head_members(head) > 1 else None  # --heads K: the frozen model stage 2 must beat

        if unfreeze:
            cfg2 = TrainConfig.stage2(st)
            # stage 2 tunes the tail with one head (the first), as it would without --heads; the K frozen
            # heads stay as they are, to be compared with the tuned model below
            start = copy.deepcopy(frozen_heads.members[0]) if frozen_heads is not None else head
            # under torchrun every rank fine-tunes its shard as DistributedDataParallel (train/finetune.py);
            # rank 0's tuned tensors and head are then every rank's, identical by construction
            tuned_run = finetune(
                runner, start, [str(train[i].path) for i in ok_t], yt, [str(val[i].path) for i in ok_v], yv, n_classes, cfg2,
                unfreeze=unfreeze, augment=self.augment_config, views=st.finetune_views, tail_bn=st.finetune_bn, on_epoch=on_epoch,
                cache_dir=runner.cache_root if self.use_cache else None, checkpoint=stage_checkpoint("finetune"),
            )
            (tuned, hist2, sum2), start = distributed.broadcast_object((tuned_run, start))
            if tuned or frozen_heads is None:  # (not tuned: its start again, restored by stage 2)
                head = start
            if tuned:
                runner.apply_tuned(tuned)
                self._tuned = tuned
            history += hist2
            summaries.append(sum2)
            self.finetune_config_ = cfg2.to_dict()

        threshold_on_validation = n_classes == 2 and parse_policy(st.threshold_policy)[0] != "fixed"
        decides_on_validation = st.calibration != "none" or threshold_on_validation or st.tta == "auto"
        if self._tuned is not None and (decides_on_validation or frozen_heads is not None):  # the backbone changed: validation features too
            frozen_val = xv, yv, ok_v
            xv, yv, ok_v, _ = self._split_features(val, "validation features")
            if frozen_heads is not None and len(yv) and self._frozen_heads_win(frozen_heads, frozen_val[0], frozen_val[1], head, xv, yv, summaries[1]):
                self._runner, self._tuned, head = None, None, frozen_heads  # back to the pretrained backbone
                runner = self.backbone_runner()
                xv, yv, ok_v = frozen_val
        elif frozen_heads is not None:
            head = frozen_heads
        self.head_ = head.eval()
        self.history_ = history
        # test-time views, temperature and threshold, in that order, on what the model will output
        val_paths = [str(s.path) for s in val]
        if st.tta == "auto":
            self.tta, logits = self._choose_tta(val_paths, ok_v, xv, yv)
        else:
            logits = self._validation_logits(val_paths, ok_v, xv, TTA_PRESETS[self.tta]) if decides_on_validation and len(yv) else None
        self.temperature_ = self._calibrate(logits, yv) if st.calibration == "temperature" else None
        if n_classes == 2:  # on the calibrated probabilities
            self.threshold_ = self._choose_threshold(logits, yv)
        refit = self._refit_heads(xt, yt, xv, yv, summaries[0], lambda k: stage_checkpoint(refit_checkpoint_stage(k)), runner.spec.feature_parts)
        stage2 = summaries[1] if len(summaries) > 1 else None
        cases = (train, ok_t, yt, xt_plain)  # the similar cases: the images the delivered heads learned from
        if refit:  # validation's too
            cases = (train + val, ok_t + [len(train) + i for i in ok_v], np.concatenate([yt, yv]), np.concatenate([xt_plain, xv]))
        self.neighbors_ = self._build_neighbors(*cases, stage2, unfreeze) if st.neighbors else None
        delivered = summaries[0] if stage2 and stage2.get("frozen_heads", {}).get("kept") else summaries[-1]  # the stage whose model this is
        self.fit_summary_ = {
            "stages": summaries,
            "best_epoch": delivered["best_epoch"],
            "epochs_run": sum(s["epochs_run"] for s in summaries),
            "monitor": delivered["monitor"],
            "threshold": self.threshold_,
            "temperature": self.temperature_,
            "tta": self.tta,
            "refit": refit,
            "feature_seconds": round(t_feat, 3),
            "fit_seconds": round(time.perf_counter() - t0, 3),
        }
        self.meta_ = self._make_meta(runner, unfreeze if self._tuned is not None else 0)
        return self

    def _refit_heads(self, xt: np.ndarray, yt: np.ndarray, xv: np.ndarray, yv: np.ndarray, first: dict,
                     checkpoint_for: Callable[[int], EpochCheckpoint | None], parts: tuple[int, ...] | None) -> dict | None:
        """``refit``: the frozen heads train again on train + validation, head k for the epochs
        validation chose for head k (same seed), and replace the heads validation decided with.

        The validation split has by then done its work (epochs, test-time views, temperature,
        threshold), and its images (a fifth of the labelled ones when carved) matter most to the smallest classes; the
        temperature fitted on the first heads is kept for the refit ones (each trains as long
        on the same kind of data). Skipped, with the reason logged, when the backbone was
        fine-tuned (its stage 2 needs the validation split as its monitor), without validation
        images, or with several feature views per training image. Returns what the refit did
        (images, epochs per head, seconds) or None."""
        if not self.settings.refit:
            return None
        why = ("the delivered model has a fine-tuned backbone" if self._tuned is not None else "no validation images" if len(yv) == 0
               else "the heads trained on several feature views per image" if np.ndim(xt) != 2 else None)
        if why:
            log.info("refit skipped: %s; the heads trained without the validation images are the model", why)
            return None
        t0 = time.perf_counter()
        epochs = [max(1, int(m["best_epoch"])) for m in first.get("members", [first])]
        x, y = np.concatenate([xt, xv]), np.concatenate([yt, yv])
        log.info("refit: %d head%s train again on train + validation (%d images), each for the epochs validation chose (%s)",
                 len(epochs), "s" if len(epochs) > 1 else "", len(y), ", ".join(map(str, epochs)))
        trained = fit_heads(x, y, x[:0], y[:0], len(self.class_names_), self.train_config, self.settings.heads,
                            checkpoint_for=checkpoint_for, parts=parts, member_epochs=epochs) if distributed.is_main() else None
        head, _, _ = distributed.broadcast_object(trained)
        self.head_ = (head if self.temperature_ is None else with_temperature(head, self.temperature_)).eval()
        return {"images": len(y), "validation_images": len(yv), "member_epochs": epochs, "seconds": round(time.perf_counter() - t0, 3)}

    def _build_neighbors(self, cases: list, ok: list[int], y: np.ndarray, x_plain: np.ndarray, stage2: dict | None = None,
                         unfreeze: int = 0) -> NeighborIndex:
        """The similar-cases index of the (at most ``neighbors_max``) images the delivered heads
        learned from (train, and validation after a refit), from the features predict will
        compute: when stage 2 tuned the backbone, the chosen images' features are those of the
        tuned backbone (plain view, no test-time views)."""
        st = self.settings
        keep = choose_cases(y, st.neighbors_max, self.seed)
        paths = [str(cases[ok[i]].path) for i in keep]
        labels, x = y[keep], x_plain[keep]
        if self._tuned is not None:
            x, ok_tuned = self._tuned_plain_features(paths, stage2, unfreeze)
            labels, paths = labels[ok_tuned], [paths[i] for i in ok_tuned]
        return NeighborIndex.build(x, labels, paths, self.class_names_, thumbnail_px=st.neighbors_thumbnail, training_images=len(y), seed=self.seed)

    def _frozen_heads_win(self, frozen_heads, xv_frozen: np.ndarray, yv_frozen: np.ndarray, tuned_head, xv_tuned: np.ndarray, yv_tuned: np.ndarray,
                          stage2: dict) -> bool:
        """Whether the K frozen heads (``--heads``) beat the model stage 2 tuned with the first of
        them, by temperature-calibrated validation log loss (stage 2's own monitor), both on
        full-precision validation features; ``stage2`` (its summary) records the comparison."""
        import torch

        def loss(head, x, y) -> float:
            with torch.no_grad():
                probs = torch.softmax(head.eval()(torch.from_numpy(np.asarray(x, np.float32))), 1).double().numpy()
            return calibrated_nll(probs, y)[0]

        # every rank computes the same numbers; rank 0's decision is everyone's
        heads_loss, tuned_loss = distributed.broadcast_object((loss(frozen_heads, xv_frozen, yv_frozen), loss(tuned_head, xv_tuned, yv_tuned)))
        win = heads_loss <= tuned_loss
        stage2["frozen_heads"] = {"heads": head_members(frozen_heads), "val_calibrated_loss": round(heads_loss, 6),
                                  "tuned_val_calibrated_loss": round(tuned_loss, 6), "kept": win}
        log.info("stage 2 against the %d frozen heads: calibrated validation log loss %.4f (tuned, one head) vs %.4f (frozen heads) -> %s",
                 head_members(frozen_heads), tuned_loss, heads_loss, "the frozen heads are the model" if win else "the tuned model is kept")
        return win

    def _tuned_plain_features(self, paths: list[str], stage2: dict | None, unfreeze: int) -> tuple[np.ndarray, list[int]]:
        """Features of ``paths`` through the tuned backbone for the similar-cases index: the tuned
        tail over stage 2's cached prefix activations where they are on disk (one process; the
        prefix did not change), the whole backbone for the rest."""
        rows: dict[int, np.ndarray] = {}
        if self.use_cache and distributed.current() is None and stage2 and stage2.get("prefix_cache_key"):
            runner = self.backbone_runner()
            x, found = tail_features_from_cache(runner, unfreeze, paths, runner.cache_root, stage2["prefix_cache_key"],
                                                tuple(stage2["prefix_shape"]))
            rows = dict(zip(found, x))
            if found:
                log.info("train features (tuned backbone, similar cases): %d of %d images from stage 2's cached prefix activations",
                         len(found), len(paths))
        rest = [i for i in range(len(paths)) if i not in rows]
        if rest:
            x, ok, _ = self.features([paths[i] for i in rest], desc="train features (tuned backbone, similar cases)")
            rows.update((rest[k], x[j]) for j, k in enumerate(ok))
        ok_all = sorted(rows)
        dim = self.backbone_runner().spec.feature_dim
        return (np.stack([rows[i] for i in ok_all]) if ok_all else np.zeros((0, dim), np.float32)), ok_all

    def _validation_logits(self, paths: list[str], ok: list[int], x: np.ndarray, views: tuple[str, ...]) -> np.ndarray:
        """(V, n, C) float64 logits of the head (as it is now) for the named test-time ``views`` of the
        validation images (``paths``, readable ``ok`` with plain-view features ``x``)."""
        import torch

        feats = [x if name == "identity" else self._aligned_view(paths, ok, x, FixedView(name), f"validation features ({name})")
                 for name in views]
        self.head_.eval()
        with torch.no_grad():  # raw logits in float64: log(float32 softmax) saturates and would bias T
            return np.stack([self.head_(torch.from_numpy(f)).double().numpy() for f in feats])

    def _choose_tta(self, paths: list[str], ok: list[int], x: np.ndarray, y: np.ndarray) -> tuple[str, np.ndarray | None]:
        """``tta auto``: each preset's validation log loss after its own temperature (or raw, with
        ``calibration none``); the fewest views within ``TTA_AUTO_MARGIN`` of the best. Test-time
        views multiply the cost of every prediction, so a costlier preset must earn its place.
        Returns the preset and its validation logits (None without validation images)."""
        if len(y) == 0:
            log.warning("tta auto: no validation images to choose on; the model averages no test-time views")
            return "none", None
        every = TTA_PRESETS[TTA_AUTO_CANDIDATES[-1]]
        logits = self._validation_logits(paths, ok, x, every)
        rows = np.arange(len(y))
        losses = {}
        for name in TTA_AUTO_CANDIDATES:
            z = logits[[every.index(v) for v in TTA_PRESETS[name]]]
            t = fit_temperature(z, y) if self.settings.calibration == "temperature" else 1.0
            losses[name] = float(-view_mean_log_probs(z, t)[rows, y].mean())
        best = min(losses.values())
        chosen = next(name for name in TTA_AUTO_CANDIDATES if losses[name] <= best + TTA_AUTO_MARGIN)
        log.info("tta auto: validation log loss %s on %d images -> %s (%d view%s per prediction)",
                 ", ".join(f"{n} {v:.4f}" for n, v in losses.items()), len(y), chosen, len(TTA_PRESETS[chosen]),
                 "s" if len(TTA_PRESETS[chosen]) > 1 else "")
        return chosen, logits[[every.index(v) for v in TTA_PRESETS[chosen]]]

    def _calibrate(self, logits: np.ndarray | None, y: np.ndarray) -> float | None:
        """Fit the temperature on the validation logits (V views, n, C) of what the model outputs:
        with test-time views, their averaged probabilities. The head then ends in it."""
        if logits is None or len(y) == 0:
            log.warning("no validation images: probabilities left uncalibrated (calibration temperature needs a validation split)")
            return None
        t = fit_temperature(logits, y)
        rows = np.arange(len(y))
        before, after = (float(-view_mean_log_probs(logits, temp)[rows, y].mean()) for temp in (1.0, t))
        self.head_ = with_temperature(self.head_, t).eval()
        log.info("calibration: temperature %.3f fitted on %d validation images%s (validation log loss %.4f -> %.4f)",
                 t, len(y), f", {len(logits)} test-time views averaged" if len(logits) > 1 else "", before, after)
        return t

    def _choose_threshold(self, logits: np.ndarray | None, y: np.ndarray) -> float:
        """Binary decision threshold on the validation probabilities the model outputs (its
        test-time views averaged, after the temperature), from their logits (V, n, 2)."""
        policy = self.settings.threshold_policy
        if parse_policy(policy)[0] == "fixed":
            return choose_threshold([], [], policy)
        if logits is None or len(set(y.tolist())) < 2:
            log.warning("validation split lacks a class: threshold policy %s not applicable, using 0.5", policy)
            return 0.5
        p = np.exp(view_mean_log_probs(logits, self.temperature_ or 1.0))[:, 1]
        t = choose_threshold(y, p, policy)
        log.info("decision threshold %.4f on P(%s), chosen on validation by %s", t, self.class_names_[1], policy)
        return t

    def _make_meta(self, runner: BackboneRunner, unfreeze: int) -> ModelMeta:
        spec = runner.spec
        return ModelMeta(
            imgclf_version=__version__,
            backbone=spec.describe(),
            weights=runner.weights.to_dict(),
            preprocessing=spec.preprocessing,
            class_names=tuple(self.class_names_),
            head=head_config(self.train_config.head, spec.feature_dim, len(self.class_names_), temperature=self.temperature_,
                             members=head_members(self.head_), parts=spec.feature_parts),
            frozen_backbone=self._tuned is None,
            backbone_tuned=None if self._tuned is None else {"unfreeze": unfreeze, "digest": runner.tuned_digest, "tensors": len(self._tuned)},
            recipe=self.recipe,
            settings={**self.settings.to_dict(), "augment_config": self.augment_config.to_dict()},
            train_config=self.train_config.to_dict(),
            threshold=self.threshold_,
            threshold_policy=self.settings.threshold_policy if self.threshold_ is not None else None,
            positive_class=self.class_names_[1] if len(self.class_names_) == 2 else None,
            tta=self.tta,
            seed=self.seed,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> "ImageClassifier":
        """A saved model (see :meth:`Classifier.load`), with its training settings restored."""
        clf = super().load(path, **kwargs)
        recorded = clf.meta_.settings
        known = {k: v for k, v in recorded.items() if k in TRAIN_FIELDS and k != "recipe"}
        known.setdefault("backbone", clf.meta_.backbone_name)  # a bundle without recorded settings: its own backbone
        clf._use_settings(make_settings(recorded.get("recipe"), **known))
        return clf
