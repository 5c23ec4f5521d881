"""Test metrics beyond accuracy, with uncertainty: a medical task needs recall per class,
calibration, and an honest interval around every headline number.

scikit-learn computes every metric; written here are only what it lacks: expected
calibration error, sensitivity/specificity at a threshold, and the bootstrap.

Schema of the dict written to ``test_metrics.json``. Probabilities are the model's
softmax outputs; a prediction is the model's decision: for a binary model with a
decision threshold, positive when p(positive) >= threshold, otherwise the argmax.

``n``
    test images scored.
``accuracy``, ``balanced_accuracy``
    balanced accuracy = mean recall over the classes present in ``y_true``.
``macro_f1``, ``weighted_f1``
``per_class``
    {class: {precision, recall, f1, support}}.
``confusion_matrix``
    {labels, rows="true", cols="predicted", counts, normalized}; ``normalized`` is
    row-normalised (each true class's row sums to 1; an empty row stays all 0).
``roc_auc``
    binary: positive class = the second class name; multi-class: one-vs-rest macro
    average; null when a class is absent from ``y_true``.
``log_loss``
    mean negative log-likelihood of the true class (natural log, sklearn ``log_loss``).
``brier``
    sklearn ``brier_score_loss``: binary = mean (p_positive - y)^2 (0..1); multi-class =
    mean over images of the squared error summed over classes (0..2).
``ece``, ``calibration``
    expected calibration error of the top-label confidence over ``n_bins`` (15)
    equal-width bins [k/15, (k+1)/15) (1.0 in the last): sum_b n_b/n * |acc_b - conf_b|.
    ``calibration`` = {n_bins, bin_edges, count, confidence, accuracy} per bin (null
    where a bin is empty), for the reliability diagram.
``ci``
    95 % percentile-bootstrap intervals: {level, method, n_resamples, seed,
    accuracy: [lo, hi], balanced_accuracy: [lo, hi], roc_auc: [lo, hi] | null,
    roc_auc_resamples: resamples in which ROC-AUC was defined}. Images are resampled
    with replacement ``n_resamples`` times from a ``numpy.random.default_rng(seed)``, so
    the same seed gives the same interval. Null when ``bootstrap=0`` or ``n < 2``.
Binary only:
    ``positive_class``; ``pr_auc`` (sklearn ``average_precision_score`` of the positive
    class, the step-wise area under the precision-recall curve); ``threshold`` (the
    decision threshold on p(positive) used for every prediction-based metric above;
    0.5 when the model has none);
    ``at_threshold`` and ``at_0_5``: {threshold, sensitivity, specificity, ppv, npv,
    tp, fn, tn, fp} with "positive" meaning p(positive) >= threshold (null ratios where
    the denominator is 0).
Multi-class only:
    ``roc_auc_per_class`` {class: one-vs-rest ROC-AUC | null}; ``top_k_accuracy``
    {"k": accuracy} for k = 2 .. min(5, classes - 1).
``skipped``, ``run`` / ``model`` / ``data``
    added by the callers (unreadable test files; where the numbers come from).
"""

from __future__ import annotations

import math

import numpy as np

from imgclf.evaluation.thresholds import apply_threshold

ECE_BINS = 15
CI_LEVEL = 0.95


def classification_metrics(y_true, probs, class_names: list[str], *, threshold: float | None = None, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Every test metric of the module docstring for integer labels and (n, C) probabilities.

    ``threshold``: binary decision threshold on p(positive class), i.e. on ``probs[:, 1]``
    (None: argmax, reported as 0.5); ignored for multi-class. ``bootstrap``: resamples for
    the confidence intervals (0: none); ``seed`` makes them reproducible.
    """
    from sklearn import metrics as skm  # imported here: predict and serve do not need it

    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(class_names)
    labels = list(range(n_classes))
    if threshold is not None and not (0.0 <= float(threshold) <= 1.0):
        raise ValueError(f"threshold must be between 0 and 1, not {threshold}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    if len(y_true) == 0:
        return {
            "n": 0, "accuracy": None, "balanced_accuracy": None, "per_class": {}, "confusion_matrix": None,
            "roc_auc": None, "log_loss": None, "brier": None, "ece": None, "ci": None,
        }
    if probs.ndim != 2 or probs.shape != (len(y_true), n_classes):
        raise ValueError(f"probabilities have shape {probs.shape}; expected ({len(y_true)}, {n_classes})")
    if y_true.min() < 0 or y_true.max() >= n_classes:
        raise ValueError(f"labels must be in 0..{n_classes - 1}")
    y_pred = apply_threshold(probs, threshold)
    # float32 softmax sums to 1 only within ~1e-7; sklearn's log loss and Brier warn about that
    sums = probs.sum(1, keepdims=True)
    exact = np.divide(probs, sums, out=probs.copy(), where=sums > 0)
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = sorted(set(y_true.tolist()))
    counts = skm.confusion_matrix(y_true, y_pred, labels=labels)
    row_sums = counts.sum(1, keepdims=True)
    out = {
        "n": int(len(y_true)),
        # all from the per-class table above (sklearn's definitions)
        "accuracy": float(np.trace(counts) / len(y_true)),
        "balanced_accuracy": float(r[present].mean()),
        "macro_f1": float(f.mean()),
        "weighted_f1": float(np.average(f, weights=s)),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": {
            "labels": list(class_names),
            "rows": "true",
            "cols": "predicted",
            "counts": counts.tolist(),
            "normalized": np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0).round(6).tolist(),
        },
        "roc_auc": None,
        "log_loss": float(skm.log_loss(y_true, exact, labels=labels)),
        "brier": float(skm.brier_score_loss(y_true, exact[:, 1] if n_classes == 2 else exact, labels=labels)),
    }
    cal = calibration_bins(y_true, probs)
    out["ece"] = cal.pop("ece")
    out["calibration"] = cal
    if n_classes == 2:
        out["positive_class"] = class_names[1]
        if len(present) == 2:
            out["roc_auc"] = float(skm.roc_auc_score(y_true, probs[:, 1]))
            out["pr_auc"] = float(skm.average_precision_score(y_true, probs[:, 1]))
        else:
            out["pr_auc"] = None
        t = 0.5 if threshold is None else float(threshold)
        out["threshold"] = t
        out["at_threshold"] = operating_point(y_true, probs[:, 1], t)
        out["at_0_5"] = operating_point(y_true, probs[:, 1], 0.5)
    else:
        if len(present) == n_classes:
            out["roc_auc"] = float(skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels))
        out["roc_auc_per_class"] = {
            name: (float(skm.roc_auc_score(y_true == i, probs[:, i])) if 0 < (y_true == i).sum() < len(y_true) else None)
            for i, name in enumerate(class_names)
        }
        out["top_k_accuracy"] = {
            str(k): float(skm.top_k_accuracy_score(y_true, probs, k=k, labels=labels)) for k in range(2, min(5, n_classes - 1) + 1)
        }
    out["ci"] = bootstrap_ci(y_true, probs, bootstrap, seed, y_pred=y_pred) if bootstrap > 0 and len(y_true) >= 2 else None
    return out


def operating_point(y_true, p_positive, threshold: float) -> dict:
    """Sensitivity, specificity, PPV, NPV when "positive" means p_positive >= threshold."""
    y = np.asarray(y_true) == 1
    pos = np.asarray(p_positive) >= threshold
    tp, fn = int((pos & y).sum()), int((~pos & y).sum())
    tn, fp = int((~pos & ~y).sum()), int((pos & ~y).sum())

    def ratio(a, b):
        return float(a / (a + b)) if a + b else None

    return {
        "threshold": float(threshold), "sensitivity": ratio(tp, fn), "specificity": ratio(tn, fp),
        "ppv": ratio(tp, fp), "npv": ratio(tn, fn), "tp": tp, "fn": fn, "tn": tn, "fp": fp,
    }


def calibration_bins(y_true, probs, n_bins: int = ECE_BINS) -> dict:
    """Top-label reliability bins and ECE (sklearn has no ECE; its calibration_curve is binary only)."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(1)
    correct = (probs.argmax(1) == y_true).astype(np.float64)
    idx = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    nz = count > 0
    mean_conf = np.divide(conf_sum, count, out=np.zeros(n_bins), where=nz)
    mean_acc = np.divide(acc_sum, count, out=np.zeros(n_bins), where=nz)
    ece = float(np.sum(count[nz] / len(conf) * np.abs(mean_acc[nz] - mean_conf[nz])))
    return {
        "ece": ece,
        "n_bins": n_bins,
        "bin_edges": [round(k / n_bins, 6) for k in range(n_bins + 1)],
        "count": count.tolist(),
        "confidence": [float(v) if z else None for v, z in zip(mean_conf, nz)],
        "accuracy": [float(v) if z else None for v, z in zip(mean_acc, nz)],
    }


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(y_true, probs, n_resamples: int = 1000, seed: int = 0, level: float = CI_LEVEL, *, y_pred=None) -> dict:
    """Percentile-bootstrap intervals for accuracy, balanced accuracy and ROC-AUC.

    A resample is a vector of multiplicities (how often each image was drawn), so all
    resamples are scored at once with matrix products instead of 1000 scikit-learn calls:
    the weighted statistics are exactly sklearn's on the resampled
    data (tested against it). ``y_pred``: the decisions accuracy is counted on (default argmax).
    """
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n, n_classes = probs.shape
    correct = ((probs.argmax(1) if y_pred is None else np.asarray(y_pred)) == y).astype(np.float64)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, 2_000_000 // n))
    acc, bal, auc = [], [], []
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(b, n))
        w = np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        acc.append(w @ correct / n)
        bal.append(_weighted_balanced_accuracy(w, y, correct, n_classes))
        auc.append(_weighted_roc_auc(w, y, probs))
        done += b
    acc, bal, auc = np.concatenate(acc), np.concatenate(bal), np.concatenate(auc)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]

    def interval(v):
        v = v[np.isfinite(v)]
        return [float(x) for x in np.percentile(v, q)] if len(v) else None

    return {
        "level": level,
        "method": "percentile bootstrap over test images",
        "n_resamples": int(n_resamples),
        "seed": int(seed),
        "accuracy": interval(acc),
        "balanced_accuracy": interval(bal),
        "roc_auc": interval(auc),
        "roc_auc_resamples": int(np.isfinite(auc).sum()),
    }


def _weighted_balanced_accuracy(w: np.ndarray, y: np.ndarray, correct: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean per-class recall over the classes present in each resample (rows of ``w``)."""
    onehot = np.eye(n_classes)[y]  # (n, C)
    drawn = w @ onehot  # (b, C) images per class
    hits = w @ (onehot * correct[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(drawn > 0, hits / drawn, np.nan)
    return np.nanmean(recall, axis=1)


def _weighted_binary_auc(w: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Mann-Whitney ROC-AUC per row of multiplicities ``w`` (ties count one half); NaN if a side is empty."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    ws = w[:, order]
    pos = positive[order].astype(np.float64)
    p_g = np.add.reduceat(ws * pos, starts, axis=1)
    n_g = np.add.reduceat(ws * (1.0 - pos), starts, axis=1)
    below = np.cumsum(n_g, axis=1) - n_g
    p_tot, n_tot = p_g.sum(1), n_g.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((p_tot > 0) & (n_tot > 0), (p_g * (below + 0.5 * n_g)).sum(1) / (p_tot * n_tot), np.nan)


def _weighted_roc_auc(w: np.ndarray, y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Binary: AUC of the second class; multi-class: one-vs-rest macro (NaN if a class is absent)."""
    if probs.shape[1] == 2:
        return _weighted_binary_auc(w, y == 1, probs[:, 1])
    per = [_weighted_binary_auc(w, y == c, probs[:, c]) for c in range(probs.shape[1])]
    return np.mean(per, axis=0)  # NaN propagates: sklearn refuses a resample missing a class


# --------------------------------------------------------------------------- console


def _num(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _with_ci(m: dict, key: str) -> str:
    ci = (m.get("ci") or {}).get(key)
    v = _num(m.get(key))
    return f"{v} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and m.get(key) is not None else v


def format_metrics(m: dict) -> str:
    """Console summary: headline numbers (with 95 % CIs) then the per-class table."""
    if not m.get("n"):
        return "no test images"
    lines = [
        f"test images: {m['n']}   accuracy: {_with_ci(m, 'accuracy')}   balanced accuracy: {_with_ci(m, 'balanced_accuracy')}"
        f"   ROC-AUC: {_with_ci(m, 'roc_auc')}"
    ]
    if m.get("ci"):
        lines[0] += f"   ([ ] = {round(100 * m['ci']['level'])}% bootstrap CI)"
    extra = f"macro F1: {_num(m.get('macro_f1'))}"
    if "log_loss" in m:
        extra += f"   log loss: {_num(m.get('log_loss'))}   Brier: {_num(m.get('brier'))}   ECE: {_num(m.get('ece'))}"
    if "pr_auc" in m:
        extra += f"   PR-AUC: {_num(m.get('pr_auc'))}"
    if m.get("top_k_accuracy"):
        extra += "   " + "   ".join(f"top-{k}: {_num(v)}" for k, v in m["top_k_accuracy"].items())
    lines.append(extra)
    points = [m.get("at_threshold")] + ([m.get("at_0_5")] if m.get("threshold") != 0.5 else [])
    for op in filter(None, points):
        lines.append(
            f"positive = {m.get('positive_class')} when p >= {op['threshold']:g}: sensitivity {_num(op['sensitivity'])}"
            f"   specificity {_num(op['specificity'])}   PPV {_num(op['ppv'])}   NPV {_num(op['npv'])}"
        )
    width = max(8, *(len(c) for c in m["per_class"]))
    lines.append(f"{'class':<{width}}  precision  recall      f1  support")
    for c, v in m["per_class"].items():
        lines.append(f"{c:<{width}}  {v['precision']:9.4f}  {v['recall']:6.4f}  {v['f1']:6.4f}  {v['support']:7d}")
    cm = m["confusion_matrix"]
    lines.append("confusion matrix (rows true, columns predicted):")
    lines.append(" " * (width + 2) + " ".join(f"{c[:8]:>8}" for c in cm["labels"]))
    for c, row in zip(cm["labels"], cm["counts"]):
        lines.append(f"{c:<{width}}  " + " ".join(f"{v:8d}" for v in row))
    return "\n".join(lines)
