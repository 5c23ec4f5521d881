"""Decision threshold for binary models, chosen on the validation split.

A medical question rarely wants argmax at 0.5: the policy picks the operating point on
validation probabilities of the positive class (the second class name), the threshold is
stored in the model bundle and used by evaluate and predict (``p >= threshold``).

* ``youden``           maximise sensitivity + specificity − 1 (Youden's J);
* ``balanced``         the point where sensitivity and specificity are closest (equal error);
* ``sensitivity:S``    the highest threshold whose sensitivity is at least S (best specificity
                       subject to catching S of the positives), e.g. ``sensitivity:0.95``;
* ``fixed:T``          T, e.g. ``fixed:0.5``.

:func:`apply_threshold` and :func:`prediction_rows` are the one place probabilities
become classes and predict rows, for the feature path and an ONNX export alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imgclf.config.settings import parse_threshold_policy as parse_policy


def choose_threshold(y_true, p_positive, policy: str) -> float:
    """Threshold on the positive-class probability for ``policy`` (see module doc)."""
    from sklearn.metrics import roc_curve

    name, arg = parse_policy(policy)
    if name == "fixed":
        return float(arg)
    y = np.asarray(y_true)
    p = np.asarray(p_positive, dtype=np.float64)
    if len(np.unique(y)) < 2:
        raise ValueError("the validation split needs both classes to choose a threshold")
    fpr, tpr, thr = roc_curve(y, p)
    thr = np.minimum(thr, 1.0)  # sklearn's first threshold is +inf (predict nothing positive)
    if name == "youden":
        i = int(np.argmax(tpr - fpr))
    elif name == "balanced":
        i = int(np.argmin(np.abs(tpr - (1 - fpr))))
    else:  # sensitivity
        ok = np.flatnonzero(tpr >= arg)
        i = int(ok[0])  # thresholds decrease along the curve: first hit = highest threshold
    return float(thr[i])


def apply_threshold(probs: np.ndarray, threshold: float | None, positive_index: int = 1) -> np.ndarray:
    """Class indices: argmax, or for binary with a threshold ``p[:, positive_index] >= threshold``."""
    probs = np.asarray(probs)
    if threshold is None or probs.shape[1] != 2:
        return probs.argmax(1)
    hit = probs[:, positive_index] >= threshold
    return np.where(hit, positive_index, 1 - positive_index).astype(np.int64)


def prediction_rows(
    paths: Sequence, proba: np.ndarray, errors: dict[str, str], class_names: Sequence[str], threshold: float | None, positive_index: int = 1
) -> list[dict]:
    """Rows of ``imgclf predict``: path, predicted class, one key per class, error.

    A NaN row of ``proba`` is an unreadable file: no prediction, its reason from ``errors``
    (keyed by path; "unreadable" when missing).
    """
    names = list(class_names)
    proba = np.asarray(proba)
    ok = ~np.isnan(proba).any(1) if len(proba) else np.zeros(0, bool)
    idx = np.zeros(len(proba), np.int64)
    if ok.any():
        idx[ok] = apply_threshold(proba[ok], threshold, positive_index)
    rows = []
    for k, (p, row) in enumerate(zip(paths, proba)):
        r = {"path": str(p)}
        if not ok[k]:
            r.update({"predicted": None, **{c: None for c in names}, "error": errors.get(str(p), "unreadable")})
        else:
            r.update({"predicted": names[int(idx[k])], **{c: float(v) for c, v in zip(names, row)}, "error": None})
        rows.append(r)
    return rows
