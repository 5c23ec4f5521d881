"""End to end as a user would: train, run folder, save/load, evaluate, predict, inspect, errors."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_shapes_dataset, tree_snapshot
from imgclf.api import ImageClassifier
from imgclf.cli.main import main


def test_train_reaches_high_accuracy_and_writes_the_run_folder(trained_run, shapes_root):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.json", "split.csv", "metrics.csv", "model.safetensors", "model.json", "test_metrics.json", "train.log", "skipped.csv"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    m = json.loads((trained_run / "test_metrics.json").read_text())
    assert m["n"] == 18 and m["accuracy"] >= 0.9
    assert set(m["per_class"]) == {"circle", "square", "triangle"}
    assert {"balanced_accuracy", "confusion_matrix", "macro_f1"} <= set(m)
    cfg = json.loads((trained_run / "config.json").read_text())
    assert cfg["settings"]["lr"] == 1e-3 and cfg["settings"]["recipe"] == "ensemble" and cfg["settings"]["seed"] == 0 and cfg["dataset"]["split_seed"] == 0
    assert cfg["args"]["epochs"] == 20 and cfg["args"]["lr"] is None  # the command line as given; None = not given
    assert cfg["environment"]["torch"] and cfg["backbone_engine"]["engine"] in {"openvino", "onnxruntime", "torch", "cache"}
    rows = list(csv.DictReader(io.StringIO((trained_run / "metrics.csv").read_text())))
    assert rows and set(rows[0]) == {"stage", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_calibrated_loss", "best", "lr"}
    assert {r["stage"] for r in rows} == {"head"}  # the default recipe: frozen backbones, heads only
    assert cfg["settings"]["backbone"] == "efficientnet_lite0+lite1" and len(cfg["fit_summary"]["stages"]) == 1
    assert (trained_run / "report.html").is_file() and m["ci"]["accuracy"][0] <= m["accuracy"] <= m["ci"]["accuracy"][1]
    meta = json.loads((trained_run / "model.json").read_text())
    assert meta["class_names"] == ["circle", "square", "triangle"]
    assert meta["preprocessing"]["mean"] == [127.0, 127.0, 127.0]
    assert meta["backbone"]["name"] == "efficientnet_lite0+lite1" and meta["weights"]["kind"] == "package"
    log = (trained_run / "train.log").read_text()
    # the log states engine, precision and img/s of extraction (or that features came from the cache)
    assert re.search(r"\d+ images through (openvino|onnxruntime|torch) \((fp32|bf16)\) at [\d.]+ img/s|all \d+ images from the feature cache", log), log


def test_second_run_uses_cache_and_never_overwrites(trained_run, shapes_root, capsys):
    before = tree_snapshot(shapes_root)
    rc = main(["train", str(shapes_root), "--project", str(trained_run.parent), "--name", "shapes", "--no-progress", "--epochs", "3", "--lr", "3e-4"])
    assert rc == 0
    second = trained_run.parent / "shapes-2"
    assert second.is_dir() and (trained_run / "model.json").is_file()
    log = (second / "train.log").read_text()
    assert "all 36 images from the feature cache" in log and "through" not in log
    assert tree_snapshot(shapes_root) == before  # nothing written into the dataset


def test_save_load_identical_predictions(trained_run, shapes_root, tmp_path):
    paths = sorted((shapes_root / "test").rglob("*.jpg"))
    loaded = ImageClassifier.load(trained_run)
    p1 = loaded.predict_proba(paths)
    assert p1.shape == (18, 3) and np.allclose(p1.sum(1), 1)
    loaded.save(tmp_path / "copy")
    p2 = ImageClassifier.load(tmp_path / "copy").predict_proba(paths)
    np.testing.assert_array_equal(p1, p2)
    assert loaded.predict(paths[:2]) == [loaded.class_names_[i] for i in p1[:2].argmax(1)]
    assert loaded.score(shapes_root) >= 0.9


def test_predictions_do_not_depend_on_the_engine(trained_run, shapes_root):
    paths = sorted((shapes_root / "test").rglob("*.jpg"))
    default = ImageClassifier.load(trained_run).predict_proba(paths)
    fp32 = ImageClassifier.load(trained_run, engine="torch", precision="fp32", use_cache=False).predict_proba(paths)
    assert (default.argmax(1) == fp32.argmax(1)).all()
    assert np.abs(default - fp32).max() < 0.05


def test_predict_cli_files_folders_and_a_corrupt_file(trained_run, shapes_root, tmp_path, capsys):
    bad = tmp_path / "inbox" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "inbox" / "notes.txt").write_text("ignored")
    one = next((shapes_root / "test" / "circle").glob("*.jpg"))
    rc = main(["predict", str(trained_run), str(one), str(shapes_root / "test" / "square"), str(tmp_path / "inbox"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 1 + 6 + 1
    assert rows[0]["predicted"] == "circle" and float(rows[0]["circle"]) > 0.5
    assert sum(r["predicted"] == "square" for r in rows[1:7]) >= 5
    broken = [r for r in rows if r["path"].endswith("broken.jpg")][0]
    assert broken["predicted"] == "" and broken["error"]
    out_json = tmp_path / "pred.json"
    assert main(["predict", str(trained_run / "model.json"), str(one), str(bad), "--out", str(out_json), "--no-progress"]) == 0
    doc = json.loads(out_json.read_text())
    assert doc["class_names"] == ["circle", "square", "triangle"]
    assert doc["predictions"][0]["predicted"] == "circle" and doc["predictions"][1]["error"]


def test_evaluate_cli(trained_run, shapes_root, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(trained_run), str(shapes_root), "--out", str(out), "--no-progress"]) == 0
    m = json.loads(out.read_text())
    assert m["n"] == 18 and m["accuracy"] >= 0.9
    assert "accuracy" in capsys.readouterr().out


def test_flat_layout_trains_with_carved_splits(tmp_path):
    root = make_shapes_dataset(tmp_path / "flat", {"": 10}, classes=("circle", "square"))
    rc = main(["-q", "train", str(root), "--project", str(tmp_path / "runs"), "--no-progress", "--epochs", "5", "--val-fraction", "0.2", "--test-fraction", "0.3"])
    assert rc == 0
    split = list(csv.DictReader((tmp_path / "runs" / "train" / "split.csv").open()))
    counts = {}
    for r in split:
        counts[(r["split"], r["class"])] = counts.get((r["split"], r["class"]), 0) + 1
    assert counts[("test", "circle")] == 3 and counts[("validation", "circle")] == 1 and counts[("train", "circle")] == 6


def test_bad_input_is_one_line_exit_2(tmp_path, capsys, trained_run):
    cases = [
        ["train", str(tmp_path / "nope")],
        ["train", str(tmp_path), "--lr", "-1"],
        ["predict", str(tmp_path), str(tmp_path)],
        ["evaluate", str(trained_run), str(tmp_path / "nope")],
        ["train", str(tmp_path), "--backbone", "resnet9000"],
    ]
    for argv in cases:
        rc = main(argv + ["--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, argv
        assert len(err) == 1 and err[0].startswith("imgclf: error:"), (argv, err)
        assert "Traceback" not in err[0]


def test_outputs_inside_the_dataset_are_refused(shapes_root, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(shapes_root, ds)
    before = tree_snapshot(ds)
    rc = main(["train", str(ds), "--project", str(ds / "runs"), "--no-progress"])
    assert rc == 2 and "never writes into the dataset" in capsys.readouterr().err
    rc = main(["train", str(ds), "--project", str(tmp_path / "r"), "--cache-dir", str(ds / "cache"), "--no-progress"])
    assert rc == 2
    assert tree_snapshot(ds) == before


def test_training_skips_and_lists_a_corrupt_image(shapes_root, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(shapes_root, ds)
    (ds / "train" / "circle" / "zz_truncated.jpg").write_bytes((ds / "train" / "circle" / "circle_000.jpg").read_bytes()[:300])
    rc = main(["-q", "train", str(ds), "--project", str(tmp_path / "runs"), "--no-progress", "--epochs", "3"])
    assert rc == 0
    skipped = list(csv.DictReader((tmp_path / "runs" / "train" / "skipped.csv").open()))
    assert [r["path"].endswith("zz_truncated.jpg") for r in skipped] == [True]
    assert "zz_truncated.jpg" in (tmp_path / "runs" / "train" / "train.log").read_text()


def test_tampered_bundle_is_refused(trained_run, tmp_path):
    from imgclf.model.bundle import BundleError

    copy = tmp_path / "m"
    shutil.copytree(trained_run, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["class_names"].append("extra")
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="3"):
        ImageClassifier.load(copy)
    meta["class_names"].pop()
    meta["weights"]["identity"] = "something-else"
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="backbone weights differ"):
        ImageClassifier.load(copy)
    (copy / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(BundleError):
        ImageClassifier.load(copy)


def test_inspect_cli(shapes_root, capsys):
    assert main(["inspect", str(shapes_root), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["train"]["circle"] == 12 and report["problems"] == []
    assert main(["inspect", str(shapes_root), "--no-progress"]) == 0
    assert "circle" in capsys.readouterr().out


def test_console_script_and_module_entry_points():
    out = subprocess.run([sys.executable, "-m", "imgclf", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("train", "evaluate", "predict", "inspect", "demo"):
        assert cmd in out
    out = subprocess.run([sys.executable, "-m", "imgclf", "train", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--backbone", "--weights", "--head", "--lr", "--epochs", "--batch-size", "--seed", "--patience", "--class-weight", "--precision", "--engine", "--cache-dir", "--val-fraction", "--test-fraction"):
        assert flag in out


def test_demo_command_trains_on_synthetic_lesions(tmp_path, capsys):
    rc = main(["demo", "--project", str(tmp_path / "runs"), "--n-train", "8", "--epochs", "5", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "demo: test accuracy" in out
    assert (tmp_path / "runs" / "demo" / "model.json").is_file()
    assert (tmp_path / "runs" / "demo-data" / "train" / "benign").is_dir()


def test_evaluate_a_single_class_folder(trained_run, shapes_root, tmp_path):
    only = tmp_path / "only"
    shutil.copytree(shapes_root / "test" / "square", only / "square")
    m = ImageClassifier.load(trained_run).evaluate(only)
    assert m["n"] == 6 and m["per_class"]["square"]["support"] == 6 and m["roc_auc"] is None


def test_same_seed_same_metrics_end_to_end(trained_run, shapes_root):
    rc = main(["-q", "train", str(shapes_root), "--project", str(trained_run.parent), "--name", "again", "--no-progress", "--epochs", "20"])
    assert rc == 0
    a = json.loads((trained_run / "test_metrics.json").read_text())
    b = json.loads((trained_run.parent / "again" / "test_metrics.json").read_text())
    a.pop("run"), b.pop("run")
    assert a == b
    h1 = (trained_run / "metrics.csv").read_text()
    h2 = (trained_run.parent / "again" / "metrics.csv").read_text()
    assert h1 == h2


def test_predict_refuses_out_inside_an_input_folder(trained_run, shapes_root, capsys):
    before = tree_snapshot(shapes_root)
    rc = main(["predict", str(trained_run), str(shapes_root / "test"), "--out", str(shapes_root / "test" / "p.csv"), "--no-progress"])
    assert rc == 2 and "never writes into input folders" in capsys.readouterr().err
    assert tree_snapshot(shapes_root) == before


def test_validation_folder_replaces_carving(tmp_path):
    root = make_shapes_dataset(tmp_path / "flat", {"": 10}, classes=("circle", "square"))
    val = make_shapes_dataset(tmp_path / "val", {"": 3}, classes=("circle", "square"), seed=5)
    rc = main(["-q", "train", str(root), "--validation", str(val), "--project", str(tmp_path / "runs"), "--no-progress", "--epochs", "3", "--test-fraction", "0.2", "--no-report"])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "runs" / "train" / "split.csv").open()))
    by_split = {}
    for r in rows:
        by_split.setdefault(r["split"], []).append(r["path"])
    assert len(by_split["train"]) == 16 and len(by_split["test"]) == 4  # nothing carved for validation
    assert len(by_split["validation"]) == 6 and all(p.startswith(str(val)) for p in by_split["validation"])


def test_evaluate_on_the_runs_own_flat_set_uses_its_test_split(tmp_path, capsys):
    root = make_shapes_dataset(tmp_path / "flat", {"": 10}, classes=("circle", "square"))
    assert main(["-q", "train", str(root), "--project", str(tmp_path / "runs"), "--no-progress", "--epochs", "3", "--no-report"]) == 0
    out = tmp_path / "e.json"
    assert main(["evaluate", str(tmp_path / "runs" / "train"), str(root), "--out", str(out), "--no-progress", "--bootstrap", "0"]) == 0
    assert json.loads(out.read_text())["n"] == 4  # the carved test split, not all 20 images


def test_predict_takes_paths_after_options_and_after_double_dash(trained_run, shapes_root, tmp_path):
    one = shapes_root / "test" / "circle" / "circle_000.jpg"
    two = shapes_root / "test" / "square"
    out = tmp_path / "p.csv"
    assert main(["-q", "predict", str(trained_run), "--out", str(out), str(one), "--engine", "torch", "--no-progress", "--", str(two)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 1 + 6 and rows[0]["path"] == str(one) and not any(r["error"] for r in rows)


def test_console_log_follows_the_current_stderr_and_never_writes_to_a_closed_one(monkeypatch):
    """The CLI's console handler writes to sys.stderr as it is at each record: a stream
    replaced and closed after setup (a caller's redirect, a test runner's capture) is not used."""
    import logging

    from imgclf.runs.folders import setup_logging

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging()
    log = logging.getLogger("imgclf")
    log.info("one")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    log.info("two")
    assert second.getvalue() == "two\n"
