"""Metrics with evidence: hand-computed values, calibration, operating points, bootstrap CIs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from imgclf.evaluation.metrics import (
    _weighted_balanced_accuracy,
    _weighted_roc_auc,
    bootstrap_ci,
    calibration_bins,
    classification_metrics,
    format_metrics,
)

BIN = ["benign", "malignant"]


def _binary_case():
    y = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.8, 0.9, 0.3])  # argmax: 0,0,1,1,0
    return y, np.stack([1 - p1, p1], 1)


def test_binary_hand_computed_values():
    y, probs = _binary_case()
    m = classification_metrics(y, probs, BIN, bootstrap=0)
    # log loss: -mean(log p(true)) = -(ln .9 + ln .6 + ln .2 + ln .9 + ln .3)/5
    assert m["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.6) + math.log(0.2) + math.log(0.9) + math.log(0.3)) / 5)
    # Brier (binary): mean (p1 - y)^2 = (.01 + .16 + .64 + .01 + .49)/5
    assert m["brier"] == pytest.approx((0.01 + 0.16 + 0.64 + 0.01 + 0.49) / 5)
    # average precision: ranking by p1: .9(+) .8(-) .4(-) .3(+) .1(-): AP = (1/1 + 2/4)/2
    assert m["pr_auc"] == pytest.approx((1.0 + 0.5) / 2)
    # at 0.5: TP=1 (0.9), FN=1 (0.3), TN=2 (0.1, 0.4), FP=1 (0.8)
    op = m["at_0_5"]
    assert (op["tp"], op["fn"], op["tn"], op["fp"]) == (1, 1, 2, 1)
    assert op["sensitivity"] == pytest.approx(0.5) and op["specificity"] == pytest.approx(2 / 3)
    assert op["ppv"] == pytest.approx(0.5) and op["npv"] == pytest.approx(2 / 3)
    assert m["threshold"] == 0.5 and m["at_threshold"] == op
    cm = m["confusion_matrix"]
    assert cm["counts"] == [[2, 1], [1, 1]]
    assert cm["normalized"] == [[pytest.approx(2 / 3), pytest.approx(1 / 3)], [0.5, 0.5]]
    # unchanged keys of the original schema
    assert {"n", "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "per_class", "roc_auc", "positive_class"} <= set(m)
    assert m["roc_auc"] == pytest.approx(4 / 6)
    assert json.loads(json.dumps(m)) == m


def test_threshold_is_the_decision_rule():
    y, probs = _binary_case()
    m = classification_metrics(y, probs, BIN, threshold=0.25, bootstrap=0)
    # p >= 0.25 positive: 0.4, 0.8 (FP), 0.9, 0.3 (TP) -> TP 2, FN 0, TN 1, FP 2
    op = m["at_threshold"]
    assert (op["tp"], op["fn"], op["tn"], op["fp"]) == (2, 0, 1, 2)
    assert op["sensitivity"] == 1.0 and op["specificity"] == pytest.approx(1 / 3)
    assert m["confusion_matrix"]["counts"] == [[1, 2], [0, 2]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["at_0_5"]["sensitivity"] == pytest.approx(0.5)  # still reported at 0.5
    assert "p >= 0.25" in format_metrics(m) and "p >= 0.5" in format_metrics(m)


def test_ece_hand_computed():
    # confidences .9 .9 .6 .6 (bins 13 and 9 of 15); correct 1 0 1 1
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 1])
    cal = calibration_bins(y, probs)
    assert cal["ece"] == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))
    assert cal["count"][13] == 2 and cal["count"][9] == 2 and sum(cal["count"]) == 4
    assert cal["accuracy"][13] == pytest.approx(0.5) and cal["confidence"][9] == pytest.approx(0.6)
    assert cal["accuracy"][0] is None
    m = classification_metrics(y, probs, BIN, bootstrap=0)
    assert m["ece"] == pytest.approx(0.4) and m["calibration"]["n_bins"] == 15
    # perfectly confident and right: ECE 0
    assert calibration_bins([0, 1], np.array([[1.0, 0.0], [0.0, 1.0]]))["ece"] == 0.0


def test_multiclass_hand_computed():
    y = np.array([0, 1, 2, 2])
    probs = np.array([
        [0.6, 0.3, 0.1],  # right
        [0.5, 0.4, 0.1],  # wrong, true class 2nd
        [0.2, 0.3, 0.5],  # right
        [0.5, 0.1, 0.4],  # wrong, true class 2nd
    ])
    m = classification_metrics(y, probs, ["a", "b", "c"], bootstrap=0)
    assert m["accuracy"] == 0.5
    assert m["top_k_accuracy"] == {"2": 1.0}
    # multi-class Brier: mean over images of sum_k (p_k - y_k)^2
    sq = [(0.4**2 + 0.3**2 + 0.1**2), (0.5**2 + 0.6**2 + 0.1**2), (0.2**2 + 0.3**2 + 0.5**2), (0.5**2 + 0.1**2 + 0.6**2)]
    assert m["brier"] == pytest.approx(np.mean(sq))
    # one-vs-rest AUC of class a: positive score .6 vs negatives .5 .2 .5 -> 1.0
    assert m["roc_auc_per_class"]["a"] == pytest.approx(1.0)
    # class c: positives .5 .4 vs negatives .1 .1 -> 1.0; class b: positive .4 vs .3 .3 .1 -> 1.0
    assert m["roc_auc"] == pytest.approx(1.0)
    assert "pr_auc" not in m and "at_threshold" not in m
    assert "top-2: 1.0000" in format_metrics(m)


def test_ci_brackets_point_estimate_and_is_reproducible():
    rng = np.random.default_rng(3)
    n = 120
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.35 * y + rng.uniform(0, 0.65, n), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    a = classification_metrics(y, probs, BIN, bootstrap=500, seed=7)
    b = classification_metrics(y, probs, BIN, bootstrap=500, seed=7)
    c = classification_metrics(y, probs, BIN, bootstrap=500, seed=8)
    assert a["ci"] == b["ci"]
    assert a["ci"] != c["ci"]
    for key in ("accuracy", "balanced_accuracy", "roc_auc"):
        lo, hi = a["ci"][key]
        assert lo <= a[key] <= hi, key
        assert hi - lo > 0.02  # a real interval, not a point
        assert hi - lo < 0.4
    assert a["ci"]["n_resamples"] == 500 and a["ci"]["seed"] == 7 and a["ci"]["level"] == 0.95
    assert a["ci"]["roc_auc_resamples"] == 500
    text = format_metrics(a)
    lo, hi = a["ci"]["accuracy"]
    assert f"[{lo:.3f}, {hi:.3f}]" in text and "95% bootstrap CI" in text
    assert classification_metrics(y, probs, BIN, bootstrap=0)["ci"] is None


def test_bootstrap_matches_a_plain_sklearn_loop():
    """Same resamples, scored one by one with scikit-learn: identical percentile intervals."""
    rng = np.random.default_rng(0)
    n, b, seed = 30, 60, 5
    for n_classes in (2, 3):
        y = rng.integers(0, n_classes, n)
        probs = rng.dirichlet(np.ones(n_classes), n).round(1)  # many ties in the scores
        probs = probs / probs.sum(1, keepdims=True)
        fast = bootstrap_ci(y, probs, b, seed)
        idx = np.random.default_rng(seed).integers(0, n, size=(b, n))  # what bootstrap_ci draws
        acc, bal, auc = [], [], []
        for i in idx:
            yi, pi = y[i], probs[i]
            acc.append(skm.accuracy_score(yi, pi.argmax(1)))
            present = sorted(set(yi.tolist()))
            bal.append(skm.recall_score(yi, pi.argmax(1), labels=present, average="macro", zero_division=0))
            try:
                auc.append(skm.roc_auc_score(yi, pi[:, 1]) if n_classes == 2 else skm.roc_auc_score(yi, pi, multi_class="ovr", labels=list(range(n_classes))))
            except ValueError:
                pass
        q = [2.5, 97.5]
        assert fast["accuracy"] == pytest.approx(list(np.percentile(acc, q)))
        assert fast["balanced_accuracy"] == pytest.approx(list(np.percentile(bal, q)))
        assert fast["roc_auc"] == pytest.approx(list(np.percentile(auc, q)))
        assert fast["roc_auc_resamples"] == len(auc)


def test_weighted_statistics_equal_sklearn_on_duplicated_rows():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 50)
    probs = rng.dirichlet(np.ones(4), 50).round(2)
    probs = probs / probs.sum(1, keepdims=True)
    w = rng.integers(0, 3, 50).astype(float)
    w[[np.flatnonzero(y == c)[0] for c in range(4)]] = 1  # every class present
    rep = np.repeat(np.arange(50), w.astype(int))
    assert _weighted_roc_auc(w[None], y, probs)[0] == pytest.approx(
        skm.roc_auc_score(y[rep], probs[rep], multi_class="ovr", labels=[0, 1, 2, 3]))
    correct = (probs.argmax(1) == y).astype(float)
    assert _weighted_balanced_accuracy(w[None], y, correct, 4)[0] == pytest.approx(skm.balanced_accuracy_score(y[rep], probs[rep].argmax(1)))


def test_degenerate_and_bad_inputs():
    assert classification_metrics([], np.zeros((0, 2)), BIN)["n"] == 0
    one = classification_metrics([1], np.array([[0.2, 0.8]]), BIN)
    assert one["ci"] is None and one["roc_auc"] is None and one["pr_auc"] is None
    assert one["at_threshold"]["specificity"] is None  # no negatives: undefined, not 0
    with pytest.raises(ValueError, match="shape"):
        classification_metrics([0, 1], np.array([[0.5, 0.5]]), BIN)
    with pytest.raises(ValueError, match="threshold"):
        classification_metrics([0, 1], np.eye(2), BIN, threshold=1.5)
    with pytest.raises(ValueError, match="bootstrap"):
        classification_metrics([0, 1], np.eye(2), BIN, bootstrap=-1)
    # a class absent from y_true: ROC-AUC null, CI for it null, accuracy CI still there
    m = classification_metrics([0, 0, 0], np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]), BIN, bootstrap=50)
    assert m["roc_auc"] is None and m["ci"]["roc_auc"] is None and m["ci"]["accuracy"] is not None
    assert "ROC-AUC: n/a" in format_metrics(m)
