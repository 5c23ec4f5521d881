"""Test metrics beyond accuracy (scikit-learn): a medical task needs recall per class.

Schema of the dict written to ``test_metrics.json``:
``n``, ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``weighted_f1``,
``per_class`` {class: {precision, recall, f1, support}}, ``confusion_matrix``
{labels, rows=true, cols=predicted, counts}, ``roc_auc`` (binary: positive class = the
second class name; multi-class: one-vs-rest macro; null when a class is absent),
``positive_class`` (binary only).
"""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm


def classification_metrics(y_true, probs, class_names: list[str]) -> dict:
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    labels = list(range(len(class_names)))
    if len(y_true) == 0:
        return {"n": 0, "accuracy": None, "balanced_accuracy": None, "per_class": {}, "confusion_matrix": None, "roc_auc": None}
    y_pred = probs.argmax(1)
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = sorted(set(y_true.tolist()))
    out = {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": {
            "labels": list(class_names),
            "rows": "true",
            "cols": "predicted",
            "counts": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        },
        "roc_auc": None,
    }
    if len(class_names) == 2:
        out["positive_class"] = class_names[1]
        if len(present) == 2:
            out["roc_auc"] = float(skm.roc_auc_score(y_true, probs[:, 1]))
    elif len(present) == len(class_names):
        out["roc_auc"] = float(skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels))
    return out


def format_metrics(m: dict) -> str:
    """Console summary: headline numbers then the per-class table."""
    if not m.get("n"):
        return "no test images"

    def f(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    lines = [
        f"test images: {m['n']}   accuracy: {f(m['accuracy'])}   balanced accuracy: {f(m['balanced_accuracy'])}"
        f"   macro F1: {f(m['macro_f1'])}   ROC-AUC: {f(m['roc_auc'])}"
    ]
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
