"""PNG plots of a run's evidence: training curves, confusion matrices, ROC/PR curves,
reliability diagram, per-class F1, image grids.

Headless by construction: figures are ``matplotlib.figure.Figure`` objects rendered by
the Agg canvas, never pyplot, so no display, GUI backend or global figure state is
involved (safe in threads, servers and CI). Each function takes plain arrays/dicts,
writes one PNG atomically and returns its path.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn import metrics as skm

from imgclf.fileio import atomic_write_bytes
from imgclf.evaluation.metrics import operating_point

__all__ = [
    "training_curves", "confusion_matrices", "roc_curves", "pr_curves", "reliability_diagram",
    "per_class_f1", "image_grid", "save_figure",
]

_DPI = 100
_LEGEND_MAX = 12  # more classes than this: curves without a legend (see the per-class table)
_TRAIN, _VAL, _MARK = "#1f77b4", "#d62728", "#111111"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Render ``fig`` to PNG and write it atomically (a reader never sees half a file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _float(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return np.nan
    return f


def training_curves(history: Sequence[dict], path: str | os.PathLike, kept_stage: str | None = None) -> Path:
    """Loss and accuracy per epoch, train vs validation; best epoch and stage changes marked.

    ``history`` rows are ``metrics.csv`` rows (strings are fine): epoch, train_loss,
    train_accuracy, val_loss, val_accuracy, best, and optionally stage. ``kept_stage``: the
    stage whose model was delivered (its best epoch is the one marked), e.g. ``head`` when
    stage 2 ran but the frozen heads beat it; by default the last best epoch of any stage.
    """
    x = np.arange(1, len(history) + 1)
    fig = _figure(10, 3.8)
    axes = fig.subplots(1, 2)
    if not history:
        for ax in axes:
            ax.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax.transAxes)
        return save_figure(fig, path)
    best = [i + 1 for i, r in enumerate(history) if str(r.get("best", "")).lower() in ("true", "1", "yes")
            and (kept_stage is None or str(r.get("stage", "") or "") == kept_stage)]
    stages = [str(r.get("stage", "") or "") for r in history]
    for ax, key, label in ((axes[0], "loss", "loss (cross-entropy)"), (axes[1], "accuracy", "accuracy")):
        ax.plot(x, [_float(r.get(f"train_{key}")) for r in history], "-o", ms=3, color=_TRAIN, label="train")
        ax.plot(x, [_float(r.get(f"val_{key}")) for r in history], "-o", ms=3, color=_VAL, label="validation")
        if best:
            ax.axvline(best[-1], color="#2ca02c", ls="--", lw=1, label=f"best (epoch {best[-1]})")
        if len(set(stages)) > 1 and stages[0]:
            ax.text(1.1, 0.98, stages[0], transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="#555555")
        for i in range(1, len(stages)):
            if stages[i] != stages[i - 1]:
                ax.axvline(i + 0.5, color="#777777", ls=":", lw=1)
                ax.text(i + 0.6, 0.98, stages[i], transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="#555555")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (over all stages)" if len(set(stages)) > 1 else "epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_ylim(-0.02, 1.02)
    axes[0].set_title("Loss")
    axes[1].set_title("Accuracy")
    return save_figure(fig, path)


def confusion_matrices(counts, labels: Sequence[str], path: str | os.PathLike) -> Path:
    """Counts and row-normalised (recall per true class) confusion matrices side by side."""
    counts = np.asarray(counts, dtype=np.int64)
    rows = counts.sum(1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    k = len(labels)
    side = min(14.0, 2.5 + 0.55 * k)
    fig = _figure(2 * side + 1, side)
    axes = fig.subplots(1, 2)
    annotate = k <= 25
    for ax, mat, title, fmt, vmax in ((axes[0], counts, "Counts", "d", max(1, int(counts.max(initial=0)))), (axes[1], norm, "Row-normalised (recall)", ".2f", 1.0)):
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_xticks(range(k), [str(c) for c in labels], rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
        ax.set_yticks(range(k), [str(c) for c in labels])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        if annotate:
            for i in range(k):
                for j in range(k):
                    v = mat[i, j]
                    ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=9 if k < 10 else 7,
                            color="white" if v > 0.6 * vmax else "black")
    return save_figure(fig, path)


def _operating_points(y: np.ndarray, probs: np.ndarray, threshold: float) -> list[dict]:
    """The model's operating point and, if different, the one at 0.5 (binary)."""
    ts = [threshold] if abs(threshold - 0.5) < 1e-12 else [threshold, 0.5]
    return [operating_point(y, probs[:, 1], t) for t in ts]


def _drawable_classes(y: np.ndarray, class_names: Sequence[str]):
    """(class index, is-positive mask) per curve: the positive class if binary, else each
    class one-vs-rest; classes absent from (or making up all of) the test set are skipped."""
    for c in ([1] if len(class_names) == 2 else range(len(class_names))):
        pos = y == c
        if 0 < pos.sum() < len(y):
            yield c, pos


def roc_curves(y_true, probs, class_names: Sequence[str], path: str | os.PathLike, *, threshold: float = 0.5) -> Path:
    """Binary: ROC of the positive (second) class with the operating point(s) marked.
    Multi-class: one-vs-rest ROC per class."""
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    fig = _figure(6, 5.4)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#999999", lw=1, ls="--", label="chance")
    classes = [1] if len(class_names) == 2 else range(len(class_names))
    drawn = 0
    for c, pos in _drawable_classes(y, class_names):
        fpr, tpr, _ = skm.roc_curve(pos, probs[:, c])
        auc = skm.auc(fpr, tpr)
        ax.plot(fpr, tpr, lw=2 if len(classes) == 1 else 1.4, alpha=1 if len(classes) <= _LEGEND_MAX else 0.5,
                label=f"{class_names[c]} (AUC {auc:.3f})" if len(classes) <= _LEGEND_MAX else None)
        drawn += 1
        if len(class_names) == 2:
            for op, marker in zip(_operating_points(y, probs, threshold), ("o", "s")):
                ax.plot(1 - op["specificity"], op["sensitivity"], marker, ms=9, mfc="none", mew=2, color=_MARK,
                        label=f"threshold {op['threshold']:.3g}: sens {op['sensitivity']:.2f}, spec {op['specificity']:.2f}")
    _label_curve_axes(ax, drawn, "ROC", "false positive rate (1 - specificity)", "true positive rate (sensitivity)",
                      f"ROC, positive class: {class_names[1]}" if len(class_names) == 2 else "ROC, one vs rest per class", 1.01)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def _label_curve_axes(ax, drawn: int, what: str, xlabel: str, ylabel: str, title: str, ymax: float) -> None:
    """Labels, title and unit-square limits of a ROC/PR plot; says so when no curve could be drawn."""
    if not drawn:
        ax.text(0.5, 0.5, f"{what} undefined: a class is absent from the test set", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, ymax)


def pr_curves(y_true, probs, class_names: Sequence[str], path: str | os.PathLike, *, threshold: float = 0.5) -> Path:
    """Precision-recall: binary with the operating point(s) and the prevalence baseline;
    multi-class one-vs-rest per class."""
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    fig = _figure(6, 5.4)
    ax = fig.subplots()
    classes = [1] if len(class_names) == 2 else range(len(class_names))
    drawn = 0
    for c, pos in _drawable_classes(y, class_names):
        prec, rec, _ = skm.precision_recall_curve(pos, probs[:, c])
        ap = skm.average_precision_score(pos, probs[:, c])
        line = ax.step(rec, prec, where="post", lw=2 if len(classes) == 1 else 1.4,
                       label=f"{class_names[c]} (AP {ap:.3f})" if len(classes) <= _LEGEND_MAX else None)
        drawn += 1
        if len(class_names) == 2:
            ax.axhline(pos.mean(), color="#999999", ls="--", lw=1, label=f"prevalence {pos.mean():.2f}")
            for op, marker in zip(_operating_points(y, probs, threshold), ("o", "s")):
                precision = 1.0 if op["ppv"] is None else op["ppv"]
                ax.plot(op["sensitivity"], precision, marker, ms=9, mfc="none", mew=2, color=_MARK,
                        label=f"threshold {op['threshold']:.3g}: recall {op['sensitivity']:.2f}, precision {precision:.2f}")
        elif len(classes) > _LEGEND_MAX:
            line[0].set_alpha(0.5)
    _label_curve_axes(ax, drawn, "PR curve", "recall (sensitivity)", "precision (PPV)",
                      f"Precision-recall, positive class: {class_names[1]}" if len(class_names) == 2 else "Precision-recall, one vs rest", 1.04)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower left")
    return save_figure(fig, path)


def reliability_diagram(y_true, probs, path: str | os.PathLike, *, n_bins: int = 15) -> Path:
    """Accuracy vs confidence of the top label per bin (bars), perfect calibration
    diagonal, and how many images fall in each bin; ECE in the title."""
    from imgclf.evaluation.metrics import calibration_bins

    cal = calibration_bins(y_true, probs, n_bins)
    edges = np.array(cal["bin_edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    acc = np.array([np.nan if v is None else v for v in cal["accuracy"]])
    conf = np.array([np.nan if v is None else v for v in cal["confidence"]])
    fig = _figure(6, 6.2)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="#999999", ls="--", lw=1, label="perfect calibration")
    ok = np.isfinite(acc)
    top.bar(centres[ok], acc[ok], width=width * 0.95, color=_TRAIN, alpha=0.8, edgecolor="white", label="accuracy in bin")
    top.bar(centres[ok], conf[ok] - acc[ok], bottom=acc[ok], width=width * 0.95, color="#f4b6b6", edgecolor=_VAL, linewidth=0.8, label="gap to mean confidence")
    top.plot(conf[ok], acc[ok], "o", color=_MARK, ms=4, label="mean confidence")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1.02)
    top.set_title(f"Reliability (top-label), ECE {cal['ece']:.3f} over {n_bins} bins")
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="upper left")
    bottom.bar(centres, cal["count"], width=width * 0.95, color="#7f7f7f")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    bottom.grid(alpha=0.3)
    return save_figure(fig, path)


def per_class_f1(per_class: dict, path: str | os.PathLike) -> Path:
    """Horizontal F1 bar per class (support in the label), precision and recall as ticks."""
    names = list(per_class)
    f1 = [per_class[c]["f1"] for c in names]
    fig = _figure(7, max(2.6, 0.45 * len(names) + 1.8))
    ax = fig.subplots()
    ypos = np.arange(len(names))[::-1]
    ax.barh(ypos, f1, color=_TRAIN, alpha=0.85, label="F1")
    ax.plot([per_class[c]["precision"] for c in names], ypos, "|", ms=16, mew=2.5, color=_VAL, label="precision")
    ax.plot([per_class[c]["recall"] for c in names], ypos, "|", ms=16, mew=2.5, color=_MARK, label="recall")
    for yv, v in zip(ypos, f1):
        ax.text(0.01, yv, f"F1 {v:.2f}", va="center", fontsize=8, color="white" if v > 0.15 else "black")
    ax.set_yticks(ypos, [f"{c} (n={per_class[c]['support']})" for c in names])
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("score")
    ax.set_title("Per-class F1 (ticks: precision, recall)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return save_figure(fig, path)


def image_grid(cells: Sequence[dict], path: str | os.PathLike, *, columns: int = 2, title: str | None = None) -> Path:
    """A grid of cells, each ``{"images": [PIL, ...], "caption": str, "bad": bool}``: the
    images of a cell side by side (e.g. the test image and its Grad-CAM overlay)."""
    n = max(1, len(cells))
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    per_cell = max((len(c["images"]) for c in cells), default=1) or 1
    fig = _figure(3.0 * per_cell * columns, 3.5 * rows + (0.4 if title else 0))
    if title:
        fig.suptitle(title)
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    if not cells:
        axes[0].text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=axes[0].transAxes)
    for ax, cell in zip(axes, cells):
        imgs = [im.convert("RGB") for im in cell["images"]]
        h = max(im.height for im in imgs)
        imgs = [im.resize((max(1, round(im.width * h / im.height)), h)) for im in imgs]
        strip = Image.new("RGB", (sum(im.width for im in imgs) + 6 * (len(imgs) - 1), h), "white")
        x = 0
        for im in imgs:
            strip.paste(im, (x, 0))
            x += im.width + 6
        ax.imshow(np.asarray(strip))
        ax.set_title(cell.get("caption", ""), fontsize=9, color="#b00000" if cell.get("bad") else "black")
    return save_figure(fig, path)
