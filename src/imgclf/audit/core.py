"""Data-quality audit before training: likely mislabelled images, outliers, duplicates.

Every training and validation image gets an *out-of-fold* predicted probability: stratified
K-fold (seeded) over the cached frozen backbone features, each fold's head fitted without
the images it predicts, so an image's own (possibly wrong) label never vouches for itself.
The head is scikit-learn's L2-regularised logistic regression on standardised features:
convex (the same folds give the same numbers), a few seconds per fold on CPU, and the
frozen-feature + logistic-regression combination is what the project's reference
accuracies are quoted with; the project's own torch head (``train.heads.fit_head``) would
need a validation split and early stopping inside every fold for no better probabilities.

Confident learning (cleanlab) then flags label issues (``cleanlab.filter.find_label_issues``)
and scores every image's label quality (``cleanlab.rank.get_label_quality_scores``,
self-confidence: the out-of-fold probability of the given label). Outliers come from
cleanlab's ``OutOfDistribution`` on the features (average distance to the k nearest
neighbours); an image is flagged with Datalab's rule for features (distance beyond
Q3 + (1/0.37 - 1) IQR). Exact duplicates (identical decoded pixels, ``data.inspection``)
are flagged too, loudly when the copies carry different labels.

Reads only: the dataset is never written to.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf.data.datasets import load_dataset

log = logging.getLogger("imgclf")

AUDIT_COLUMNS = ["path", "split", "given_label", "suggested_label", "label_quality", "suggested_probability", "issue", "outlier_score"]
AUDITED_SPLITS = ("train", "validation")
LOGISTIC_C = 0.1  # inverse L2 strength on standardised features: softer, better-ranked probabilities than sklearn's 1.0
OUTLIER_THRESHOLD = 0.37037  # cleanlab Datalab's default for feature-based outliers
ISSUE_LABEL = "label"
ISSUE_OUTLIER = "outlier"
ISSUE_DUPLICATE = "duplicate"
ISSUE_DUPLICATE_CONFLICT = "duplicate-conflicting-labels"


@dataclass
class AuditResult:
    """The audit of one dataset; ``rows`` are sorted by label quality, worst first."""

    root: Path
    class_names: list[str]
    rows: list[dict]
    folds: int
    seed: int
    backbone: str
    head: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    oof_accuracy: float = 0.0

    def issues(self, kind: str | None = None) -> list[dict]:
        """Rows with any issue (or with issue ``kind``), in label-quality order."""
        return [r for r in self.rows if r["issue"] and (kind is None or kind in r["issue"].split(";"))]

    def typical(self, class_name: str, n: int = 3) -> list[str]:
        """Paths of the ``n`` images of ``class_name`` the out-of-fold head is surest of."""
        rows = [r for r in self.rows if r["given_label"] == class_name and not r["issue"]]
        return [r["path"] for r in sorted(rows, key=lambda r: -r["label_quality"])[:n]]

    def summary(self) -> dict:
        counts = {k: len(self.issues(k)) for k in (ISSUE_LABEL, ISSUE_OUTLIER, ISSUE_DUPLICATE_CONFLICT, ISSUE_DUPLICATE)}
        return {"root": str(self.root), "images": len(self.rows), "classes": self.class_names, "folds": self.folds, "seed": self.seed,
                "backbone": self.backbone, "head": self.head, "out_of_fold_accuracy": round(self.oof_accuracy, 4),
                "issues": counts, "skipped": len(self.skipped)}


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(n, n_classes) probabilities, each row from a head that never saw that image."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_classes = int(labels.max()) + 1
    probs = np.zeros((len(labels), n_classes), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_idx, held_idx in splitter.split(features, labels):
        head = make_pipeline(StandardScaler(), LogisticRegression(C=LOGISTIC_C, max_iter=3000))
        head.fit(features[fit_idx], labels[fit_idx])
        probs[np.ix_(held_idx, head.classes_)] = head.predict_proba(features[held_idx])
    return probs


def outlier_flags(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(outlier score in (0, 1], lower = more unusual; is-outlier flag) from the k-NN distances."""
    from cleanlab.outlier import OutOfDistribution

    k = max(1, min(10, len(features) - 1))
    scores = OutOfDistribution(params={"k": k, "t": 1}).fit_score(features=features, verbose=False)
    # score = exp(-distance / scale): -log(score) is the k-NN distance up to a scale, and the
    # quartile rule below is scale-free, so this is Datalab's rule on the distances
    distance = -np.log(np.clip(scores, 1e-300, None))
    q1, q3 = np.percentile(distance, [25, 75])
    limit = q3 + (1.0 / OUTLIER_THRESHOLD - 1.0) * (q3 - q1)
    return scores, distance > limit


def duplicate_issues(root: Path, paths: list[str]) -> dict[str, str]:
    """real path → duplicate issue for the audited images that have an identical copy."""
    from imgclf.data.inspection import inspect_dataset

    report = inspect_dataset(root, near_duplicates=False)
    audited = {os.path.realpath(p) for p in paths}
    out: dict[str, str] = {}
    groups = report["duplicates"]["within_split"] + report["duplicates"]["cross_split"]
    for g in groups:
        kind = ISSUE_DUPLICATE_CONFLICT if len(g["classes"]) > 1 else ISSUE_DUPLICATE
        for p in g["paths"]:
            real = os.path.realpath(p)
            if real in audited and out.get(real) != ISSUE_DUPLICATE_CONFLICT:
                out[real] = kind
    return out


def audit_dataset(
    data: str | os.PathLike,
    *,
    folds: int = 5,
    seed: int = 0,
    backbone: str | None = None,
    weights: str | None = "imagenet",
    duplicates: bool = True,
    **runtime,
) -> AuditResult:
    """Audit the training and validation images of the dataset at ``data`` (reads only).

    ``runtime``: runtime options (engine, precision, cache_dir, use_cache, progress) for the
    feature extraction, which shares the training runs' feature cache.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from imgclf.config.names import FAST_BACKBONE
    from imgclf.model.classifier import Classifier

    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    root = Path(data)
    ds = load_dataset(root, val_fraction=0.0, test_fraction=0.0, seed=seed)
    for w in ds.warnings:
        if "its fraction is 0" not in w:  # the audit asked for no carving: an empty validation or test split is expected
            log.warning("%s", w)
    samples = [s for split in AUDITED_SPLITS for s in ds.samples.get(split, [])]
    if not samples:
        raise ValueError(f"{root}: no training or validation images to audit")
    # Lite0's stage outputs by default: on dermoscopy with planted flips they ranked the flips far
    # better than its conv head (benchmarks/README.md, "imgclf audit"), and fast runs share them
    clf = Classifier(backbone or FAST_BACKBONE, weights, seed=seed, **runtime)
    features, ok, errors = clf.features([s.path for s in samples], desc="audit features")
    skipped = [(str(p), e) for p, e in ds.unreadable] + [(str(samples[i].path), msg) for i, msg in errors.items()]
    samples = [samples[i] for i in ok]
    given = np.array([s.label for s in samples], dtype=np.int64)

    # cleanlab wants labels 0..K-1 with every class present: audit the classes that have images
    present = sorted(set(given.tolist()))
    counts = np.bincount(given)[present]
    if len(present) < 2:
        raise ValueError(f"{root}: the audit needs readable images of at least 2 classes")
    if counts.min() < 2:
        thin = [ds.class_names[c] for c, n in zip(present, counts) if n < 2]
        raise ValueError(f"{root}: class(es) {', '.join(thin)} have fewer than 2 readable images; cross-validation needs 2")
    if counts.min() < folds:
        log.warning("smallest class has %d images: %d-fold cross-validation instead of %d", counts.min(), counts.min(), folds)
        folds = int(counts.min())
    to_local = {c: i for i, c in enumerate(present)}
    labels = np.array([to_local[c] for c in given.tolist()], dtype=np.int64)

    probs = out_of_fold_probabilities(features, labels, folds, seed)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    flagged = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    outlier_score, is_outlier = outlier_flags(features)
    dup = duplicate_issues(root, [str(s.path) for s in samples]) if duplicates else {}

    suggested = probs.argmax(axis=1)
    rows = []
    for i, s in enumerate(samples):
        issue = [ISSUE_LABEL] if flagged[i] else []
        if is_outlier[i]:
            issue.append(ISSUE_OUTLIER)
        if os.path.realpath(s.path) in dup:
            issue.append(dup[os.path.realpath(s.path)])
        rows.append({
            "path": os.path.abspath(s.path),
            "split": s.split,
            "given_label": ds.class_names[s.label],
            "suggested_label": ds.class_names[present[int(suggested[i])]],
            "label_quality": round(float(quality[i]), 6),
            "suggested_probability": round(float(probs[i, suggested[i]]), 6),
            "issue": ";".join(issue),
            "outlier_score": round(float(outlier_score[i]), 6),
        })
    rows.sort(key=lambda r: (r["label_quality"], r["path"]))
    return AuditResult(
        root=root, class_names=list(ds.class_names), rows=rows, folds=folds, seed=seed, backbone=clf.backbone,
        head=f"logistic regression (C={LOGISTIC_C}) on standardised features", skipped=skipped,
        oof_accuracy=float((suggested == labels).mean()),
    )
