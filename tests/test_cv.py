"""train --cv K: stratified folds over every labelled image, duplicates kept together, honest intervals."""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, make_shapes_dataset

from imgclf.cli.main import main
from imgclf.config import layout
from imgclf.report.cv import DISTINGUISH_WIDTH, small_test_split_note, wilson_interval
from imgclf.runs.cv import across_folds, pooled_metrics
from imgclf.runs.train_run import train_run

K, REPEATS, PER_CLASS = 3, 2, 10


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def flat_with_copy(tmp_path_factory) -> tuple[Path, list[tuple[Path, Path]]]:
    """A flat folder of 3 x 10 tiny shapes plus, per class, one image copied under another name."""
    root = make_shapes_dataset(tmp_path_factory.mktemp("cvflat"), {"": PER_CLASS}, size=48)
    pairs = []
    for c in CLASSES:
        original, copy = root / c / f"{c}_003.jpg", root / c / f"zz_copy_of_{c}_003.jpg"
        shutil.copyfile(original, copy)
        pairs.append((original, copy))
    return root, pairs


@pytest.fixture(scope="module")
def cv_run(flat_with_copy, tmp_path_factory) -> Path:
    root = flat_with_copy[0]
    project = tmp_path_factory.mktemp("cvruns")
    rc = main(["-q", "train", str(root), "--recipe", "fast", "--cv", str(K), "--cv-repeats", str(REPEATS), "--epochs", "3",
               "--bootstrap", "200", "--project", str(project), "--name", "cv", "--no-progress"])
    assert rc == 0
    return project / "cv"


def test_cv_writes_fold_table_predictions_summary_and_the_normal_run_folder(cv_run):
    for name in (layout.CV_FOLDS, layout.CV_PREDICTIONS, layout.CV_SUMMARY, layout.MODEL_META, layout.TEST_METRICS, layout.REPORT):
        assert (cv_run / name).is_file(), name
    folds = _rows(cv_run / layout.CV_FOLDS)
    assert len(folds) == K * REPEATS
    assert sorted((int(r["repeat"]), int(r["fold"])) for r in folds) == [(r, f) for r in range(1, REPEATS + 1) for f in range(1, K + 1)]
    total = 3 * PER_CLASS + len(CLASSES)
    for r in range(1, REPEATS + 1):
        mine = [row for row in folds if int(row["repeat"]) == r]
        assert sum(int(row["n_test"]) for row in mine) == total
        for row in mine:  # trained on the other folds, validation carved from them
            assert int(row["n_train"]) + int(row["n_validation"]) + int(row["n_test"]) == total and int(row["n_validation"]) > 0
            assert 0.0 <= float(row["accuracy"]) <= 1.0 and float(row["log_loss"]) >= 0.0
    summary = json.loads((cv_run / layout.CV_SUMMARY).read_text())
    assert summary["k"] == K and summary["repeats"] == REPEATS and summary["n_images"] == total and summary["n_distinct_images"] == total - len(CLASSES)
    acc = summary["across_folds"]["accuracy"]
    values = [float(row["accuracy"]) for row in folds]
    assert acc["folds"] == K * REPEATS and math.isclose(acc["mean"], sum(values) / len(values), abs_tol=1e-9)
    lo, hi = acc["interval"]
    plo, phi = acc["plain_t_interval"]
    assert 0.0 <= lo <= acc["mean"] <= hi <= 1.0 and lo <= plo and phi <= hi  # the correction only widens
    for key in ("balanced_accuracy", "macro_f1", "roc_auc", "log_loss", "ece"):
        assert key in summary["across_folds"], key
    assert [p["repeat"] for p in summary["pooled"]] == list(range(1, REPEATS + 1))
    for pooled in summary["pooled"]:
        assert pooled["n"] == total and pooled["ci"]["accuracy"][0] <= pooled["accuracy"] <= pooled["ci"]["accuracy"][1]
    assert "Nadeau-Bengio" in summary["interval_method"] and "not independent" in summary["interval_method"]


def test_every_image_is_held_out_exactly_once_per_repeat(cv_run, flat_with_copy):
    root = flat_with_copy[0]
    images = sorted(str(p) for c in CLASSES for p in (root / c).iterdir())
    predictions = _rows(cv_run / layout.CV_PREDICTIONS)
    assert len(predictions) == len(images) * REPEATS
    for r in range(1, REPEATS + 1):
        held = [row["path"] for row in predictions if int(row["repeat"]) == r]
        assert sorted(held) == images and max(Counter(held).values()) == 1
    for row in predictions:
        assert row["true"] == Path(row["path"]).parent.name and row["predicted"] in CLASSES
        assert math.isclose(sum(float(row[c]) for c in CLASSES), 1.0, abs_tol=1e-4)


def test_exact_duplicates_land_in_the_same_fold(cv_run, flat_with_copy):
    fold_of = defaultdict(dict)
    for row in _rows(cv_run / layout.CV_PREDICTIONS):
        fold_of[int(row["repeat"])][row["path"]] = int(row["fold"])
    for r in range(1, REPEATS + 1):  # 6 pairs: by chance all together about once in 3**6 = 729 splits
        for original, copy in flat_with_copy[1]:
            assert fold_of[r][str(original)] == fold_of[r][str(copy)], (r, original.name)


def test_report_has_the_cross_validation_section_and_the_small_test_split_sentence(cv_run):
    page = (cv_run / layout.REPORT).read_text(encoding="utf-8")
    assert '<section id="cv"><h2>Cross-validation</h2>' in page and 'href="#cv"' in page
    for words in ("Across folds", "Pooled out-of-fold predictions", "Per fold", "corrected t", "never saw"):
        assert words in page, words
    # the test split here has a handful of images: the report says it cannot separate recipes
    assert "cannot be told apart on this test split" in page


def test_report_without_cv_has_no_cross_validation_section(cv_run, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(cv_run, plain)
    for name in (layout.CV_FOLDS, layout.CV_PREDICTIONS, layout.CV_SUMMARY, layout.REPORT):
        (plain / name).unlink()
    assert main(["-q", "report", str(plain), "--gradcam-images", "0"]) == 0
    page = (plain / layout.REPORT).read_text(encoding="utf-8")
    assert 'id="cv"' not in page and 'href="#cv"' not in page


def test_cv_larger_than_the_smallest_class_is_a_one_line_usage_error(tmp_path, capsys):
    root = make_shapes_dataset(tmp_path / "data", {"": 3}, size=32)
    (root / "circle" / "circle_002.jpg").unlink()  # circle: 2 images
    shutil.copyfile(root / "square" / "square_000.jpg", root / "square" / "square_copy.jpg")
    (root / "square" / "square_002.jpg").unlink()  # square: 3 files, 2 different pictures
    project = tmp_path / "runs"
    rc = main(["train", str(root), "--recipe", "fast", "--cv", "3", "--project", str(project), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("imgclf: error: --cv 3: class 'circle' has only 2 different image(s)"), err
    assert "use --cv 2 or less" in err[0]
    assert not project.exists()  # refused before a run folder
    (root / "circle" / "circle_001.jpg").rename(root / "circle" / "circle_009.jpg")
    shutil.copyfile(root / "circle" / "circle_000.jpg", root / "circle" / "circle_010.jpg")  # circle: 3 files, still 2 pictures
    rc = main(["train", str(root), "--recipe", "fast", "--cv", "3", "--project", str(project), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "class 'circle' has only 2 different image(s) (3 images, exact duplicates counted once)" in err[0], err
    with pytest.raises(ValueError, match="class 'circle' has only 2 different image"):  # the same check from Python
        train_run(root, recipe="fast", cv=3, project=project, progress=False)
    assert not project.exists()


def test_cv_one_is_refused_by_its_declaration(tmp_path, capsys):
    rc = main(["train", str(tmp_path / "never-read"), "--cv", "1", "--project", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cv must be 0 (off) or at least 2" in err[0], err


def test_corrected_interval_is_the_nadeau_bengio_formula():
    rows = [{"n_train": 60, "n_validation": 20, "n_test": 40, "accuracy": a} for a in (0.70, 0.80, 0.75, 0.85)]
    acc = across_folds(rows)["accuracy"]
    mean, sd, t = 0.775, 0.0645497224, 3.1824463053  # t(0.975, 3)
    half = t * sd * math.sqrt(1 / 4 + 40 / 80)
    assert math.isclose(acc["mean"], mean) and math.isclose(acc["sd"], sd, rel_tol=1e-6)
    assert math.isclose(acc["interval"][0], mean - half, rel_tol=1e-6) and math.isclose(acc["interval"][1], min(1.0, mean + half), rel_tol=1e-6)
    assert math.isclose(acc["plain_t_interval"][0], mean - t * sd / 2, rel_tol=1e-6)


def test_small_test_split_sentence_follows_the_interval_width():
    narrow = {"n": 2000, "accuracy": 0.9, "ci": {"accuracy": [0.887, 0.913]}}
    wide = {"n": 30, "accuracy": 0.8, "ci": {"accuracy": [0.63, 0.93]}}
    assert small_test_split_note(narrow) == ""
    text = small_test_split_note(wide)
    assert "30 test images" in text and "0.30 wide" in text and f"{DISTINGUISH_WIDTH:.2f}" in text and "bootstrap" in text
    # all right: the bootstrap interval is a point, the Wilson interval still says how little 20 images show
    perfect = {"n": 20, "accuracy": 1.0, "ci": {"accuracy": [1.0, 1.0]}}
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and lo < 0.9 and "Wilson" in small_test_split_note(perfect)
    assert small_test_split_note({"n": 0, "accuracy": None}) == ""


def test_pooled_binary_decisions_are_each_fold_models_own():
    """Two folds with different thresholds: pooled accuracy counts their decisions, not argmax of the pooled probabilities."""
    y = np.array([0, 0, 1, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.65, 0.35], [0.2, 0.8], [0.45, 0.55], [0.4, 0.6]])
    decisions = np.array([0, 0, 1, 1, 0, 1])  # fold 1 threshold 0.3 on p(1) for the first 4; fold 2 threshold 0.58
    m = pooled_metrics(y, probs, decisions, ["benign", "malignant"], bootstrap=100, seed=0)
    assert m["n"] == 6 and m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert m["confusion_matrix"]["counts"] == [[3, 0], [0, 3]]
    argmax_accuracy = float(np.mean(probs.argmax(1) == y))
    assert argmax_accuracy < 1.0  # the pooled probabilities under one rule would say otherwise
    assert math.isclose(m["roc_auc"], 8 / 9) and m["ci"]["accuracy"] == [1.0, 1.0] and m["log_loss"] > 0


def test_without_a_test_split_the_summary_says_cross_validation_is_the_estimate(cv_run, flat_with_copy, tmp_path):
    rc = main(["-q", "train", str(flat_with_copy[0]), "--recipe", "fast", "--cv", "2", "--test-fraction", "0", "--epochs", "2",
               "--no-report", "--project", str(tmp_path), "--name", "all", "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "all" / layout.CV_SUMMARY).read_text())
    assert "no test split" in summary["final_model"] and len(_rows(tmp_path / "all" / layout.CV_FOLDS)) == 2
    assert "never saw" in json.loads((cv_run / layout.CV_SUMMARY).read_text())["final_model"]


@pytest.mark.parametrize("failure", [RuntimeError("fold 2 ran out of memory"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_cv_leaves_the_finished_model_usable(flat_with_copy, tmp_path, monkeypatch, failure):
    import imgclf.runs.train_run as train_run_module
    from imgclf.model.classifier import Classifier

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(train_run_module, "run_cross_validation", broken)
    metrics = train_run(flat_with_copy[0], recipe="fast", epochs=2, cv=3, bootstrap=0, neighbors=False, project=str(tmp_path), name="r", progress=False)
    run = tmp_path / "r"
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert not (run / "cv_summary.json").exists() and "cross-validation" in (run / "train.log").read_text()
    assert Classifier.load(run, cache_dir=None).class_names_ == sorted(CLASSES) and metrics["accuracy"] >= 0
