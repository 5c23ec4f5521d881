"""Cross-validation of a run's settings (``train --cv K``): an honest estimate on a small set.

A test split of a few dozen images gives an accuracy interval too wide to tell two recipes
apart. Cross-validation uses every labelled image once as a held-out image: the train,
validation and test splits (or the manifest's rows) are pooled and cut into K stratified
folds; exact duplicates (the same file bytes, the feature cache's content hash) stay in one
fold so a copy never sits on both sides. For each fold the same settings are fitted on the
other folds, with validation carved from them by the usual per-class rule
(``val_fraction``, ``seed``), and the held-out fold is scored. ``cv_repeats`` repeats the K
folds with another shuffle.

The run's model bundle and its test metrics stay the normal run's: the fold models are
only measured, then discarded. So ``--cv`` never changes the model a user deploys, and
the test split remains an untouched check of that exact model; cross-validation tells
how well this recipe does on this data. (``--test-fraction 0`` on a flat folder trains the
final model on every image but train's validation carve; it then has no test metrics.)

Reads top to bottom in the order it runs: plan the folds (refused before the run folder
exists when K is too large), fit and score each fold, summarise across folds and pooled,
write ``cv_folds.csv``, ``cv_predictions.csv`` and ``cv_summary.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.config import layout
from imgclf.config.settings import TRAIN_FIELDS, RuntimeOptions, TrainSettings
from imgclf.data.datasets import Dataset, Sample, _split_dataset, content_groups
from imgclf.evaluation.metrics import CI_LEVEL, bootstrap_ci, classification_metrics
from imgclf.evaluation.thresholds import apply_threshold
from imgclf.fileio import write_csv, write_json
from imgclf.train.classifier import ImageClassifier

log = logging.getLogger("imgclf")

# the metrics summarised across folds, in the order the tables show them
CV_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc", "pr_auc", "log_loss", "brier", "ece")
BOUNDED_METRICS = frozenset({"accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc", "pr_auc", "ece"})  # intervals clipped to [0, 1]
FOLD_COLUMNS = ["repeat", "fold", "n_train", "n_validation", "n_test", "skipped", *CV_METRICS, "threshold", "stage2_kept", "seconds"]

INTERVAL_METHOD = (
    "Student-t interval over the K x R fold values with the Nadeau-Bengio correction for overlapping training sets: "
    "mean +- t(0.975, K*R - 1) * SD * sqrt(1/(K*R) + n_test/n_train). The folds share training images and repeats reuse "
    "the same images, so the fold values are not independent: the uncorrected t-interval (mean +- t * SD / sqrt(K*R), "
    "also given) is too narrow, and the corrected one is an approximation, not an exact 95% guarantee. "
    "Accuracy-like metrics and ECE are clipped to [0, 1]."
)
POOLED_METHOD = (
    "every held-out prediction of one repeat pooled (each image once) and scored as one set; decisions are each fold "
    "model's own (binary: its threshold chosen on its validation); 95% percentile-bootstrap intervals over the pooled "
    "images for accuracy, balanced accuracy and ROC-AUC (they describe the resampling of images, not of training sets)"
)
FINAL_MODEL_NOTE = (
    "The model bundle, test_metrics.json and the test-split numbers of the report are the normal run's: trained on the "
    "train split (validation as usual) and scored on the test split it never saw. The cross-validation fold models were "
    "only measured, then discarded; cross-validation estimates how these settings do on all labelled images."
)
FINAL_MODEL_NO_TEST_NOTE = (
    "The model bundle is the normal run's, trained on the train split (validation as usual). The dataset has no test split, "
    "so that model has no test metrics of its own: the cross-validation numbers (of these settings, on all labelled images) "
    "are the estimate. The fold models were only measured, then discarded."
)


@dataclass(frozen=True)
class Fold:
    """One held-out fold of one repeat (numbered from 1), as indices into the pooled samples."""

    repeat: int
    fold: int
    train: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class FoldPlan:
    """Every fold of every repeat over the pooled labelled samples of a dataset."""

    k: int
    repeats: int
    seed: int
    samples: list[Sample]
    groups: list[str]  # content hash per sample (exact duplicates share one)
    folds: list[Fold]


# --------------------------------------------------------------------------- planning


def plan_folds(ds: Dataset, k: int, repeats: int, seed: int) -> FoldPlan:
    """Stratified K folds (duplicates grouped), ``repeats`` times; ValueError (one line) when K is too large.

    K may be at most the number of different pictures in the smallest class: with more
    folds than that, some training folds would lack the class or a fold could not hold it.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    samples = ds.all_samples()
    group_of = content_groups([s.path for s in samples])
    groups = [group_of[s.path] for s in samples]
    distinct = {c: len({g for s, g in zip(samples, groups) if s.label == i}) for i, c in enumerate(ds.class_names)}
    smallest = min(distinct, key=lambda c: distinct[c])
    if k > distinct[smallest]:
        images = sum(1 for s in samples if s.label == ds.class_names.index(smallest))
        copies = f" ({images} images, exact duplicates counted once)" if images != distinct[smallest] else ""
        raise ValueError(f"--cv {k}: class '{smallest}' has only {distinct[smallest]} different image(s){copies} across all splits; "
                         f"use --cv {max(2, distinct[smallest])} or less" + (" (or add images)" if distinct[smallest] < 2 else ""))
    y = np.array([s.label for s in samples], dtype=np.int64)
    group_ids = np.unique(np.array(groups), return_inverse=True)[1]
    folds = []
    for r in range(repeats):
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=(seed + r) % 2**32)
        for f, (train_idx, test_idx) in enumerate(splitter.split(np.zeros(len(y)), y, group_ids)):
            folds.append(Fold(repeat=r + 1, fold=f + 1, train=train_idx, test=test_idx))
    return FoldPlan(k=k, repeats=repeats, seed=seed, samples=samples, groups=groups, folds=folds)


def log_expected_cost(plan: FoldPlan, settings: TrainSettings, runtime: RuntimeOptions, fit_summary: dict | None) -> None:
    """Say before the folds run how many fits they are and roughly how long they take."""
    n_fits = len(plan.folds)
    dups = sum(n - 1 for n in Counter(plan.groups).values() if n > 1)
    what = (f"cross-validation: {plan.k} folds x {plan.repeats} repeat(s) = {n_fits} fits of recipe {settings.recipe} on "
            f"{len(plan.samples)} images (all splits pooled; {dups} exact duplicate(s) kept with their originals)")
    if not runtime.use_cache:
        what += "; the feature cache is off (--no-cache), so every fold extracts its features again"
    if settings.stage2:
        what += "; every fold runs stage 2 (fine-tuning)" + (", from cached prefix activations" if runtime.use_cache else "")
    elif runtime.use_cache:
        what += "; every fold retrains the head on cached features"
    if fit_summary and runtime.use_cache:  # the final fit just ran: its training time (features excluded, they are cached now) per fold
        per_fit = max(0.0, fit_summary["fit_seconds"] - fit_summary["feature_seconds"])
        what += f"; expected roughly {n_fits * per_fit:.0f} s plus feature-cache reads (the final fit trained for {per_fit:.1f} s)"
    log.info("%s", what)


# --------------------------------------------------------------------------- one fold


def fold_dataset(ds: Dataset, plan: FoldPlan, fold: Fold, settings: TrainSettings) -> Dataset:
    """Training folds as train (validation carved from them by the usual per-class rule), the held-out fold as test."""
    def by_class(indices: np.ndarray) -> dict[str, list[Path]]:
        out: dict[str, list[Path]] = {c: [] for c in ds.class_names}
        for i in indices:
            out[ds.class_names[plan.samples[i].label]].append(Path(plan.samples[i].path))
        return out

    source = {"train": f"cross-validation: the folds other than {fold.fold}", "test": f"cross-validation fold {fold.fold} of {plan.k}, repeat {fold.repeat}"}
    # the loader's own carving (private there), so a fold's validation is carved exactly like a normal run's
    return _split_dataset(
        ds.root, ds.layout, {"train": by_class(fold.train), "test": by_class(fold.test)}, source, "the training folds", "split",
        val_fraction=settings.val_fraction, test_fraction=0.0, seed=settings.seed, ignored=[], warnings=[], unreadable=[],
        group_of={Path(s.path): g for s, g in zip(plan.samples, plan.groups)},  # hashed once, when the folds were planned
    )


def fit_fold(clf: ImageClassifier, fold_ds: Dataset, fold: Fold) -> tuple[dict, list[dict], dict]:
    """Fit on the fold's train/validation, score its held-out images.

    Returns the cv_folds row, the cv_predictions rows and the held-out arrays
    (``y_true``, ``probs``, ``decisions``) for the pooled metrics.
    """
    t0 = time.perf_counter()
    clf.fit(fold_ds)
    test = fold_ds.samples["test"]
    m = clf.evaluate_samples(test, bootstrap=0)
    ev = clf.last_eval_
    names = clf.class_names_
    decisions = apply_threshold(ev["probs"], clf.threshold_)
    predictions = [
        {"repeat": fold.repeat, "fold": fold.fold, "path": p, "true": names[int(t)], "predicted": names[int(d)],
         **{c: f"{v:.6f}" for c, v in zip(names, pr)}}
        for p, t, pr, d in zip(ev["paths"], ev["y_true"], ev["probs"], decisions)
    ]
    row = {
        "repeat": fold.repeat, "fold": fold.fold, "n_train": len(fold_ds.samples["train"]), "n_validation": len(fold_ds.samples["validation"]),
        "n_test": m["n"], "skipped": len(m["skipped"]), **{key: m.get(key) for key in CV_METRICS if key in m},
        "threshold": clf.threshold_, "stage2_kept": not clf.meta_.frozen_backbone, "seconds": round(time.perf_counter() - t0, 3),
    }
    return row, predictions, {"y_true": ev["y_true"], "probs": ev["probs"], "decisions": np.asarray(decisions)}


# --------------------------------------------------------------------------- summaries


def across_folds(rows: list[dict], level: float = CI_LEVEL) -> dict:
    """Per metric: mean, SD, min, max over the folds where it is defined, with the corrected and the plain t-interval."""
    from scipy import stats

    n_train = float(np.mean([r["n_train"] + r["n_validation"] for r in rows]))
    n_test = float(np.mean([r["n_test"] for r in rows]))
    out = {}
    for key in CV_METRICS:
        values = np.array([r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])], dtype=np.float64)
        if not len(values):
            continue
        entry = {"mean": float(values.mean()), "sd": None, "min": float(values.min()), "max": float(values.max()),
                 "folds": int(len(values)), "interval": None, "plain_t_interval": None}
        if len(values) >= 2:
            sd = float(values.std(ddof=1))
            t = float(stats.t.ppf((1 + level) / 2, len(values) - 1))
            lo, hi = (0.0, 1.0) if key in BOUNDED_METRICS else (0.0, math.inf)

            def clip(a: float, b: float) -> list[float]:
                return [max(lo, a), min(hi, b)]

            half = t * sd * math.sqrt(1 / len(values) + n_test / n_train)
            plain = t * sd / math.sqrt(len(values))
            entry.update(sd=sd, interval=clip(entry["mean"] - half, entry["mean"] + half),
                         plain_t_interval=clip(entry["mean"] - plain, entry["mean"] + plain))
        out[key] = entry
    return out


def pooled_metrics(y: np.ndarray, probs: np.ndarray, decisions: np.ndarray, class_names: list[str], *, bootstrap: int, seed: int) -> dict:
    """One repeat's out-of-fold predictions scored as one set (see POOLED_METHOD).

    The probability metrics come from :func:`classification_metrics`; the decision metrics
    are recounted from each fold model's own decisions, which for a binary model differ from
    any single threshold applied to the pooled probabilities.
    """
    from sklearn import metrics as skm

    labels = list(range(len(class_names)))
    m = classification_metrics(y, probs, class_names, threshold=None, bootstrap=0)
    _, recall, f1, support = skm.precision_recall_fscore_support(y, decisions, labels=labels, zero_division=0)
    present = sorted(set(y.tolist()))
    out = {
        "n": int(len(y)),
        "accuracy": float(np.mean(decisions == y)),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1.mean()),
        "weighted_f1": float(np.average(f1, weights=support)),
        **{key: m.get(key) for key in ("roc_auc", "pr_auc", "log_loss", "brier", "ece") if key in m},
        "confusion_matrix": {"labels": list(class_names), "rows": "true", "cols": "predicted",
                             "counts": skm.confusion_matrix(y, decisions, labels=labels).tolist()},
        "ci": None,
    }
    if bootstrap > 0 and len(y) >= 2:
        out["ci"] = {**bootstrap_ci(y, probs, bootstrap, seed, y_pred=decisions), "method": "percentile bootstrap over the pooled out-of-fold images"}
    return out


def format_cv(summary: dict) -> str:
    """Console lines: the fold table, then across-fold means with intervals and the pooled numbers."""
    shown = [k for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss", "ece") if k in summary["across_folds"]]
    lines = [f"{'repeat':>6} {'fold':>4} {'n_test':>6} " + " ".join(f"{k[:12]:>12}" for k in shown)]
    for r in summary["folds"]:
        lines.append(f"{r['repeat']:>6} {r['fold']:>4} {r['n_test']:>6} " + " ".join(
            f"{r[k]:>12.4f}" if r.get(k) is not None else f"{'n/a':>12}" for k in shown))
    for k in shown:
        a = summary["across_folds"][k]
        iv = a["interval"]
        lines.append(f"{k}: mean {a['mean']:.4f} over {a['folds']} folds" + (f", 95% interval [{iv[0]:.4f}, {iv[1]:.4f}] (corrected t)" if iv else ""))
    for p in summary["pooled"]:
        ci = p.get("ci") or {}
        acc = ci.get("accuracy")
        lines.append(f"pooled out-of-fold, repeat {p['repeat']}: {p['n']} images, accuracy {p['accuracy']:.4f}"
                     + (f" [{acc[0]:.4f}, {acc[1]:.4f}] (bootstrap)" if acc else "") + f", balanced accuracy {p['balanced_accuracy']:.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the whole cross-validation


def run_cross_validation(ds: Dataset, plan: FoldPlan, settings: TrainSettings, runtime: RuntimeOptions, run_dir: Path, *,
                         bootstrap: int, fit_summary: dict | None = None) -> dict:
    """Fit and score every fold (progress logged), write the three cv files into ``run_dir``; returns the summary (cv_summary.json)."""
    t0 = time.perf_counter()
    final_model = FINAL_MODEL_NOTE if ds.samples.get("test") else FINAL_MODEL_NO_TEST_NOTE
    log_expected_cost(plan, settings, runtime, fit_summary)
    # the fold models are measured and discarded: nothing only a delivered model needs (the similar-cases index)
    fold_settings = dataclasses.replace(settings, neighbors=False) if "neighbors" in TRAIN_FIELDS else settings
    clf = ImageClassifier(settings=fold_settings, **runtime.to_dict())  # one classifier, refitted per fold: fit() starts from the pretrained backbone
    rows: list[dict] = []
    predictions: list[dict] = []
    held_out: dict[int, list[dict]] = {r: [] for r in range(1, plan.repeats + 1)}
    for fold in plan.folds:
        row, preds, arrays = fit_fold(clf, fold_dataset(ds, plan, fold, settings), fold)
        rows.append(row)
        predictions += preds
        held_out[fold.repeat].append(arrays)
        line = (f"cv repeat {fold.repeat} fold {fold.fold}/{plan.k}: {row['n_test']} held-out images, accuracy {row['accuracy']:.4f}, "
                f"balanced accuracy {row['balanced_accuracy']:.4f} ({row['seconds']:.1f} s)")
        log.info("%s", line)
    names = list(ds.class_names)
    pooled = []
    for r, parts in held_out.items():
        y, probs, decisions = (np.concatenate([a[key] for a in parts]) for key in ("y_true", "probs", "decisions"))
        pooled.append({"repeat": r, **pooled_metrics(y, probs.reshape(-1, len(names)), decisions, names, bootstrap=bootstrap, seed=settings.seed)})
    summary = {
        "k": plan.k,
        "repeats": plan.repeats,
        "n_images": len(plan.samples),
        "n_distinct_images": len(set(plan.groups)),
        "class_names": names,
        "splitter": "sklearn StratifiedGroupKFold(n_splits=K, shuffle=True, random_state=seed + repeat - 1), groups = content hash",
        "grouping": "exact duplicates (identical file bytes: the feature cache's content hash) are kept in one fold",
        "pool": "train, validation and test splits (or the manifest's rows) pooled",
        "validation": f"carved from the training folds per class, val_fraction {settings.val_fraction:g}, seed {settings.seed}",
        "seed": plan.seed,
        "final_model": final_model,
        "interval_level": CI_LEVEL,
        "interval_method": INTERVAL_METHOD,
        "across_folds": across_folds(rows),
        "pooled_method": POOLED_METHOD,
        "pooled": pooled,
        "folds": rows,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_csv(run_dir / layout.CV_FOLDS, rows, FOLD_COLUMNS)
    write_csv(run_dir / layout.CV_PREDICTIONS, predictions, ["repeat", "fold", "path", "true", "predicted", *names])
    write_json(run_dir / layout.CV_SUMMARY, summary)
    log.info("%s", final_model)
    log.info("cross-validation done in %.1f s", summary["seconds"])
    return summary
