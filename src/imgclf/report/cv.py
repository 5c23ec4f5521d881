"""The report's cross-validation section, and the note that says when a test split is too small.

Kept apart from :mod:`imgclf.report.html` (which calls it) so the section reads on its own:
``cv_section`` renders ``cv_summary.json`` (written by :mod:`imgclf.runs.cv`);
``small_test_split_note`` is the sentence every run's report (and log) gets when its test split
is too small to tell recipes apart.
"""

from __future__ import annotations

import html
import math

CV_SECTION = ("cv", "Cross-validation")  # (id, heading): in the report only when the run has cv_summary.json

# a test split whose 95% accuracy interval is wider than this cannot separate recipes a few points apart
DISTINGUISH_WIDTH = 0.10
Z_95 = 1.959964

METRIC_LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "weighted_f1": "weighted F1",
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC",
    "log_loss": "log loss (lower is better)",
    "brier": "Brier score (lower is better)",
    "ece": "ECE (15 bins)",
}


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _f(v, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _interval(iv) -> str:
    return f"{iv[0]:.3f} – {iv[1]:.3f}" if iv else "n/a"


def _table(header: list[str], rows: list[list[str]], first_text_cols: int = 1) -> str:
    def cell(i: int, v: str, tag: str) -> str:
        return f'<{tag} class="num">{v}</{tag}>' if i >= first_text_cols else f"<{tag}>{v}</{tag}>"

    out = ["<table><tr>", *(cell(i, _e(h), "th") for i, h in enumerate(header)), "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(cell(i, v, "td") for i, v in enumerate(r)) + "</tr>")
    out.append("</table>")
    return "".join(out)


# --------------------------------------------------------------------------- test split size


def wilson_interval(correct: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion: defined at 0 and 1 too, where a bootstrap interval collapses."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def small_test_split_note(metrics: dict) -> str:
    """One sentence when the test split's 95% accuracy interval is wider than DISTINGUISH_WIDTH, else "".

    The interval is the run's bootstrap interval; the Wilson interval when there is none
    or it collapsed to a point (every test image right or every one wrong).
    """
    n, acc = metrics.get("n") or 0, metrics.get("accuracy")
    if not n or acc is None:
        return ""
    ci = (metrics.get("ci") or {}).get("accuracy")
    if ci and ci[1] > ci[0]:
        lo, hi, how = ci[0], ci[1], "bootstrap"
    else:
        (lo, hi), how = wilson_interval(acc * n, n), "Wilson"
    width = hi - lo
    if width <= DISTINGUISH_WIDTH:
        return ""
    return (f"With {n} test images the 95% interval of test accuracy is {width:.2f} wide ({lo:.3f} – {hi:.3f}, {how}), more than "
            f"{DISTINGUISH_WIDTH:.2f}: recipes or settings whose test accuracies differ by less than about that cannot be told apart "
            "on this test split. Cross-validation (train --cv K) measures on every labelled image instead.")


# --------------------------------------------------------------------------- cross-validation section


def cv_section(summary: dict | None, test_metrics: dict | None = None) -> str:
    """The ``Cross-validation`` section from cv_summary.json ("" when the run had no --cv)."""
    if not summary:
        return ""
    k, repeats = summary["k"], summary["repeats"]
    out = [f'<section id="{CV_SECTION[0]}"><h2>{CV_SECTION[1]}</h2>']
    out.append(
        f"<p>{k}-fold stratified cross-validation, {repeats} repeat(s) ({len(summary['folds'])} fits), over all "
        f"{summary['n_images']} labelled images ({_e(summary['pool'])}); {summary['n_distinct_images']} different images: "
        f"{_e(summary['grouping'])}. Validation of each fold: {_e(summary['validation'])}.</p>"
    )
    out.append(f'<p class="note">{_e(summary["final_model"])}</p>')

    across = summary["across_folds"]
    rows = [[_e(METRIC_LABELS.get(key, key)), _f(a["mean"]), _f(a["sd"]), _interval(a["interval"]), _interval(a["plain_t_interval"]),
             f"{a['min']:.3f} – {a['max']:.3f}", str(a["folds"])] for key, a in across.items()]
    out.append("<h3>Across folds</h3>")
    out.append(_table(["metric", "mean", "SD", "95% interval (corrected t)", "uncorrected t", "min – max", "folds"], rows))
    out.append(f'<p class="note">{_e(summary["interval_method"])}</p>')

    out.append("<h3>Pooled out-of-fold predictions</h3>")
    keys = [key for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss", "ece") if any(key in p for p in summary["pooled"])]
    rows = []
    for p in summary["pooled"]:
        ci = p.get("ci") or {}
        rows.append([str(p["repeat"]), str(p["n"])] + [
            _f(p.get(key)) + (f" ({_interval(ci.get(key))})" if ci.get(key) else "") for key in keys])
    out.append(_table(["repeat", "images"] + [METRIC_LABELS[key] for key in keys], rows))
    out.append(f'<p class="note">Pooled: {_e(summary["pooled_method"])}.</p>')

    out.append("<h3>Per fold</h3>")
    fold_keys = [key for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss", "ece") if key in across]
    rows = [[str(r["repeat"]), str(r["fold"]), str(r["n_train"]), str(r["n_validation"]), str(r["n_test"])]
            + [_f(r.get(key)) for key in fold_keys]
            + [_f(r.get("threshold")) if r.get("threshold") is not None else "", "yes" if r.get("stage2_kept") else "no", f"{r['seconds']:.1f}"]
            for r in summary["folds"]]
    out.append(_table(["repeat", "fold", "train", "validation", "held out"] + [METRIC_LABELS[key] for key in fold_keys]
                      + ["threshold", "stage 2 kept", "seconds"], rows, first_text_cols=2))

    acc = across.get("accuracy") or {}
    test_ci = ((test_metrics or {}).get("ci") or {}).get("accuracy")
    if acc.get("interval") and (test_metrics or {}).get("n"):
        cv_width = acc["interval"][1] - acc["interval"][0]
        test_text = (f"the test split's ({test_metrics['n']} images) bootstrap interval is {test_ci[1] - test_ci[0]:.3f} wide"
                     if test_ci else f"the test split has {test_metrics['n']} images and no bootstrap interval")
        out.append(f'<p class="note">Accuracy: the cross-validation interval is {cv_width:.3f} wide; {_e(test_text)}. '
                   "The two measure different things: the test split scores the delivered model, cross-validation these settings.</p>")
    out.append("</section>")
    return "".join(out)
