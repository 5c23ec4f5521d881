"""Plots: every function writes a PNG that decodes and actually shows something."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from imgclf.evaluation import plots
from imgclf.evaluation.metrics import classification_metrics


def _check_png(path, min_size=(200, 150)):
    assert path.is_file() and path.stat().st_size > 2000
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
    assert arr.std() > 10  # not a blank canvas
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 20  # lines, text, colours
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temp files left behind


@pytest.fixture(scope="module")
def binary():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p1 = np.clip(0.4 * y + rng.uniform(0, 0.6, 80), 0, 1)
    return y, np.stack([1 - p1, p1], 1)


@pytest.fixture(scope="module")
def multiclass():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 90)
    logits = rng.normal(0, 1, (90, 4)) + 2.0 * np.eye(4)[y]
    e = np.exp(logits)
    return y, e / e.sum(1, keepdims=True)


def test_curves_and_matrices(tmp_path, binary, multiclass):
    for name, (y, probs), classes in (("bin", binary, ["benign", "malignant"]), ("multi", multiclass, ["a", "b", "c", "d"])):
        m = classification_metrics(y, probs, classes, bootstrap=0)
        _check_png(plots.roc_curves(y, probs, classes, tmp_path / f"{name}_roc.png", threshold=0.3))
        _check_png(plots.pr_curves(y, probs, classes, tmp_path / f"{name}_pr.png", threshold=0.3))
        _check_png(plots.reliability_diagram(y, probs, tmp_path / f"{name}_rel.png"))
        _check_png(plots.confusion_matrices(m["confusion_matrix"]["counts"], classes, tmp_path / f"{name}_cm.png"))
        _check_png(plots.per_class_f1(m["per_class"], tmp_path / f"{name}_f1.png"))


def test_operating_point_changes_the_roc_picture(tmp_path, binary):
    y, probs = binary
    a = plots.roc_curves(y, probs, ["n", "p"], tmp_path / "a.png", threshold=0.5)
    b = plots.roc_curves(y, probs, ["n", "p"], tmp_path / "b.png", threshold=0.2)
    assert a.read_bytes() != b.read_bytes()  # the marked point (and its legend) moved


def test_training_curves_with_stages_and_strings(tmp_path):
    rows = [
        {"stage": "head" if e < 6 else "finetune", "epoch": str(e % 6 + 1), "train_loss": str(1.0 / (e + 1)), "train_accuracy": str(0.5 + e / 25),
         "val_loss": str(1.2 / (e + 1) + 0.05), "val_accuracy": str(0.45 + e / 25), "best": str(e in (4, 9))}
        for e in range(10)
    ]
    _check_png(plots.training_curves(rows, tmp_path / "curves.png"))
    _check_png(plots.training_curves([], tmp_path / "empty.png"), (100, 100))
    # the marked epoch is the delivered stage's: stage 1's (epoch 5) when the frozen heads were kept
    last = plots.training_curves(rows, tmp_path / "last.png", kept_stage="finetune").read_bytes()
    assert last == (tmp_path / "curves.png").read_bytes()
    assert plots.training_curves(rows, tmp_path / "heads.png", kept_stage="head").read_bytes() != last


def test_report_marks_the_delivered_stage():
    from imgclf.report.html import _kept_stage

    tuned = {"fit_summary": {"stages": [{"stage": "head"}, {"stage": "finetune", "kept_start": False}]}}
    heads = {"fit_summary": {"stages": [{"stage": "head"}, {"stage": "finetune", "kept_start": False, "frozen_heads": {"kept": True}}]}}
    start = {"fit_summary": {"stages": [{"stage": "head"}, {"stage": "finetune", "kept_start": True}]}}
    assert _kept_stage(tuned) is None and _kept_stage({}) is None and _kept_stage(heads) == _kept_stage(start) == "head"


def test_absent_class_and_grid(tmp_path):
    y = np.zeros(10, np.int64)
    probs = np.tile([0.7, 0.3], (10, 1))
    _check_png(plots.roc_curves(y, probs, ["a", "b"], tmp_path / "roc.png"))  # says "undefined", no crash
    rng = np.random.default_rng(2)
    tiles = [Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)) for _ in range(6)]
    cells = [{"images": [tiles[i], tiles[i + 1]], "caption": f"cell {i}\ntrue a → predicted b", "bad": True} for i in range(0, 6, 2)]
    _check_png(plots.image_grid(cells, tmp_path / "grid.png", columns=2))


def test_headless_without_pyplot(tmp_path):
    """Rendered by the Agg canvas directly: no display, no GUI backend, pyplot never imported."""
    import os
    import subprocess

    code = (
        "import sys, numpy as np; from imgclf.evaluation import plots; "
        f"plots.per_class_f1({{'a': {{'precision': 1.0, 'recall': 0.5, 'f1': 0.67, 'support': 2}}}}, {str(tmp_path / 'f1.png')!r}); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    _check_png(tmp_path / "f1.png", (100, 100))
