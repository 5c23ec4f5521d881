"""A trained classifier for inference: load a bundle, extract (cached) features, predict, evaluate.

Loading needs no training code: serve, export, report and explain use this class;
:class:`imgclf.train.classifier.ImageClassifier` extends it with ``fit``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from imgclf.backbones.specs import BackboneSpec, WeightsRef, get_backbone_spec
from imgclf.backbones.weights import resolve_weights, tensors_digest
from imgclf.config.names import DEFAULT_BACKBONE
from imgclf.data.augment import tta_views
from imgclf.data.datasets import labelled_eval_samples
from imgclf import distributed
from imgclf.engines.extract import extract_features, extract_features_sharded
from imgclf.engines.runner import BackboneRunner
from imgclf.evaluation.metrics import classification_metrics
from imgclf.evaluation.thresholds import apply_threshold, prediction_rows
from imgclf.fileio import default_cache_dir
from imgclf.model.bundle import BundleError, load_bundle, resolve_bundle_dir, save_bundle
from imgclf.model.heads import head_from_config, head_temperature
from imgclf.model.neighbors import Neighbor, NeighborIndex

log = logging.getLogger("imgclf")


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)


class Classifier:
    """A head on a (possibly partly fine-tuned) ImageNet backbone, with cached features."""

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str | os.PathLike | None = "imagenet",
        *,
        tta: str = "none",
        seed: int = 0,
        engine: str = "auto",
        precision: str = "auto",
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        progress: bool = False,
        device: str = "auto",
    ):
        self.backbone = backbone
        self.weights = weights
        tta_views(tta)
        self.tta = tta
        self.threshold_ = None
        self.seed = seed
        self.engine = engine
        self.precision = precision
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.use_cache = use_cache
        self.progress = progress
        self._runner: BackboneRunner | None = None
        self._spec: BackboneSpec | None = None
        self._weights_ref: WeightsRef | None = None
        self._tuned: dict[str, torch.Tensor] | None = None
        self.errors_: dict[str, str] = {}
        self.neighbors_: NeighborIndex | None = None  # the similar-cases index, set by fit or read from the bundle on first use
        self._bundle_dir: Path | None = None
        self._last_plain: tuple[np.ndarray, list[int]] | None = None  # plain-view features of the last prediction

    def _resolve_spec(self) -> BackboneSpec:
        """The registry entry of ``self.backbone`` (the training class may adjust it)."""
        return get_backbone_spec(self.backbone)

    def prepare_backbone(self) -> BackboneRunner:
        """Resolve backbone and weights; a weights *file* is loaded into the model now, so a
        file that is damaged or does not fit fails before any work, not per engine later."""
        runner = self.backbone_runner()
        if runner.weights.kind == "file":
            runner.torch_module()
        return runner

    # ------------------------------------------------------------------ backbone

    def backbone_runner(self) -> BackboneRunner:
        """Resolve backbone and weights (cheap, fails fast offline); the model is built lazily."""
        if self._runner is None:
            if self._spec is None:
                self._spec = self._resolve_spec()
            if self._weights_ref is None:
                self._weights_ref = resolve_weights(self._spec, self.weights, seed=self.seed)
            self._runner = BackboneRunner(self._spec, self._weights_ref, self.cache_dir, engine=self.engine, precision=self.precision, seed=self.seed,
                                          device=self.device)
            if self._tuned is not None:
                self._runner.apply_tuned(self._tuned)
        return self._runner

    def features(self, paths: Sequence[str | os.PathLike], desc: str = "features", transform=None,
                 engine_factory=None) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """Backbone features for ``paths`` (cached); returns (X, ok indices, errors by index).
        ``engine_factory``: see :func:`~imgclf.engines.extract.extract_features`."""
        runner = self.backbone_runner()
        # under torchrun each rank extracts its shard and all get every row; rank 0 shows its progress
        bar = _progress_bar(len(distributed.shard(len(paths))), desc, self.progress and distributed.is_main())
        try:
            extract = extract_features if distributed.current() is None else extract_features_sharded
            res = extract(list(paths), runner, use_cache=self.use_cache, progress=bar.update if bar else None, transform=transform,
                          engine_factory=engine_factory)
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

    def _split_features(self, samples, desc, engine_factory=None):
        x, ok, errors = self.features([s.path for s in samples], desc=desc, engine_factory=engine_factory)
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
    # ------------------------------------------------------------------ predict

    def _check_fitted(self):
        if not hasattr(self, "head_"):
            raise RuntimeError("this ImageClassifier is not fitted; call fit() or load()")

    @torch.no_grad()
    def _proba_from_features(self, x: np.ndarray) -> np.ndarray:
        """The head's probabilities, computed in float64 and rounded to float32. A CPU matrix
        product may take another code path (another summation order) for another number of rows
        or another position of a row in the batch, so float32 probabilities would differ in their
        last bits with the images that share the batch (one process vs torchrun's shards, predict
        vs serve). In float64 those differences are about 1e-16, below float32's rounding, so an
        image's probabilities depend on the image alone."""
        if len(x) == 0:
            return np.zeros((0, len(self.class_names_)), np.float64)
        probs = torch.softmax(self._float64_head()(torch.from_numpy(np.asarray(x, np.float64))), 1)
        return probs.float().double().numpy()

    def _float64_head(self) -> torch.nn.Module:
        """A float64 copy of ``head_``, made again when ``head_`` is another object or one of its
        tensors was changed in place (e.g. the temperature set after fitting): their version
        counters. The head itself (not its id, which a new head may reuse) is kept to compare."""
        tensors = [*self.head_.parameters(), *self.head_.buffers()]
        key = [t._version for t in tensors]
        cached = getattr(self, "_head64", None)
        if cached is None or cached[0] is not self.head_ or cached[1] != key:
            self._head64 = (self.head_, key, copy.deepcopy(self.head_).double().eval())
        return self._head64[2]

    def _proba(self, paths: list[str], desc: str, tta: str | None = None) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """Probabilities of readable images, averaged over the test-time views."""
        tta = self.tta if tta is None else tta
        x, ok, errors = self.features(paths, desc=desc)
        self._last_plain = (x, ok)
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

    def predict_table(self, paths: Sequence[str | os.PathLike], *, tta: str | None = None, neighbors: int = 0) -> list[dict]:
        """Rows for the predict CLI: path, predicted class, probability per class, error; with
        ``neighbors`` K, also ``neighbor{i}_path``/``_label``/``_similarity`` for i = 1..K
        (:meth:`neighbor_columns`), the K most similar training images, empty for bad files."""
        if neighbors:
            index = self.neighbor_index()  # no index: fail before any work
        proba = self.predict_proba(paths, tta=tta)
        rows = prediction_rows(paths, proba, self.errors_, self.class_names_, self.threshold_)
        if neighbors:
            x, ok = self._last_plain
            found = dict(zip(ok, index.neighbors(x, neighbors))) if ok else {}
            for i, row in enumerate(rows):
                cases = found.get(i, [])
                for j in range(neighbors):
                    case = cases[j] if j < len(cases) else None
                    row[f"neighbor{j + 1}_path"] = case.path if case else None
                    row[f"neighbor{j + 1}_label"] = case.label if case else None
                    row[f"neighbor{j + 1}_similarity"] = case.similarity if case else None
        return rows

    # ------------------------------------------------------------------ similar cases

    @staticmethod
    def neighbor_columns(k: int) -> list[str]:
        """The columns :meth:`predict_table` adds for ``neighbors=k``, in order."""
        return [f"neighbor{j}_{part}" for j in range(1, k + 1) for part in ("path", "label", "similarity")]

    def neighbor_index(self) -> NeighborIndex:
        """The similar-cases index: built by ``fit``, or read from the bundle (sha256-checked
        against model.json) on first use; :class:`BundleError` when the model has none."""
        self._check_fitted()
        if self.neighbors_ is None:
            entry = getattr(self, "meta_", None) and self.meta_.neighbors
            if not entry or self._bundle_dir is None:
                raise BundleError("this model has no similar-cases index (trained with --no-neighbors, or by an imgclf before it existed); "
                                  "train again without --no-neighbors to use --neighbors")
            self.neighbors_ = NeighborIndex.load(self._bundle_dir, entry, self.class_names_)
        return self.neighbors_

    def neighbors(self, paths: Sequence[str | os.PathLike], k: int = 5) -> list[list[Neighbor] | None]:
        """The ``k`` most similar training images of each file, best first (cosine similarity of
        the plain-view backbone features predict computes); None for an unreadable file (its
        reason in ``errors_``). A case's picture: ``neighbor_index().thumbnail(case.index)``."""
        index = self.neighbor_index()
        paths = [str(p) for p in paths]
        x, ok, errors = self.features(paths, desc="neighbour features")
        self.errors_ = {paths[i]: msg for i, msg in errors.items()}
        out: list[list[Neighbor] | None] = [None] * len(paths)
        for i, cases in zip(ok, index.neighbors(x, k) if ok else []):
            out[i] = cases
        return out

    def neighbors_of_arrays(self, batch: np.ndarray, k: int = 5) -> list[list[Neighbor]]:
        """Like :meth:`neighbors` for already preprocessed uint8 (N, 3, S, S) pixels (what
        ``data.preprocess.image_to_array`` gives with this model's preprocessing)."""
        index = self.neighbor_index()
        batch = np.asarray(batch, dtype=np.uint8)
        if len(batch) == 0:
            return []
        return index.neighbors(self.backbone_runner().get()(batch), k)

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
        index = self.neighbors_
        if index is None and self.meta_.neighbors and self._bundle_dir is not None:  # a loaded model keeps its index
            index = self.neighbor_index()
        return save_bundle(path, self.head_, self.meta_, backbone_tensors=self._tuned, neighbors=index)

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
        device: str = "auto",
    ) -> "Classifier":
        """Load a bundle; the backbone comes from the weights source recorded in it.

        ``weights`` overrides where the backbone weights are read from (e.g. the file
        moved); its identity must still match the one the model was trained with.
        """
        meta, head_tensors, backbone_tensors = load_bundle(path)
        clf = cls.__new__(cls)
        Classifier.__init__(clf, backbone=meta.backbone_name, engine=engine, precision=precision, cache_dir=cache_dir, use_cache=use_cache, progress=progress, seed=meta.seed,
                            device=device)
        spec = get_backbone_spec(meta.backbone_name)
        prep = meta.preprocessing
        if prep != spec.preprocessing:
            if meta.settings.get("input_scaling") != "x/255":
                log.warning("model.json preprocessing differs from the registry's current entry; using the model's")
            spec = dataclasses.replace(spec, preprocessing=prep)
        widths = list(meta.head.get("parts") or [meta.head.get("in_dim")])
        if widths != list(spec.feature_parts):
            raise BundleError(f"{path}: the model's head reads features of width {'+'.join(map(str, widths))} and {spec.name} gives "
                              f"{'+'.join(map(str, spec.feature_parts))} in this imgclf (its features changed since the model was trained); retrain it")
        clf._spec = spec
        recorded = meta.weights
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
        if meta.backbone_tuned:
            if not backbone_tensors or tensors_digest(backbone_tensors) != meta.backbone_tuned.get("digest"):
                raise BundleError(f"{path}: fine-tuned backbone tensors are missing or do not match model.json")
            clf._tuned = backbone_tensors
        head = head_from_config(meta.head)
        try:
            head.load_state_dict(head_tensors, strict=True)
        except RuntimeError as e:
            raise BundleError(f"{path}: head tensors do not match model.json ({str(e).splitlines()[0]})") from None
        head.eval()
        clf.head_ = head
        clf.temperature_ = head_temperature(head)
        clf.class_names_ = list(meta.class_names)
        clf.meta_ = meta
        clf._bundle_dir = resolve_bundle_dir(path)
        clf.threshold_ = meta.threshold
        clf.tta = tta if tta is not None else meta.tta
        tta_views(clf.tta)
        clf.recipe = meta.recipe
        clf.settings = dict(meta.settings)
        return clf
