"""report.html: self-contained, every section, leakage warning, Grad-CAM gallery, and it
renders in a real headless Chromium with no console errors and no network requests."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import browser_available, launch_chromium
from imgclf.cli.main import main
from imgclf.evaluation.metrics import classification_metrics
from imgclf.report.html import SECTIONS, write_run_report

SECTION_IDS = [sid for sid, _ in SECTIONS]


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _write_rows(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue())


@pytest.fixture(scope="module")
def leaky_run(trained_run, shapes_root, tmp_path_factory):
    """The trained shapes run, re-pointed at a copy of its dataset with two near-copies of
    train images added to test (re-encoded JPEG, enlarged PNG) and three test predictions
    turned into confident mistakes, so every part of the report has something to show."""
    base = tmp_path_factory.mktemp("leaky")
    data = base / "data"
    shutil.copytree(shapes_root, data)
    run = base / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("plots", "report.html"))
    src = sorted((data / "train" / "circle").glob("*.jpg"))
    with Image.open(src[0]) as im:
        im.convert("RGB").save(data / "test" / "circle" / "copy_q90.jpg", quality=90)
    with Image.open(src[1]) as im:
        im.convert("RGB").resize((150, 150), Image.Resampling.BICUBIC).save(data / "test" / "circle" / "copy_big.png")

    cfg = json.loads((run / "config.json").read_text())
    old_root = cfg["dataset"]["root"]
    cfg["dataset"]["root"] = str(data)
    (run / "config.json").write_text(json.dumps(cfg))
    rows = _rows(run / "split.csv")
    for r in rows:
        r["path"] = r["path"].replace(old_root, str(data))
    rows += [{"split": "test", "class": "circle", "path": str(data / "test" / "circle" / n)} for n in ("copy_q90.jpg", "copy_big.png")]
    _write_rows(run / "split.csv", rows)

    preds = _rows(run / "test_predictions.csv")
    names = json.loads((run / "model.json").read_text())["class_names"]
    for i, r in enumerate(preds):
        r["path"] = r["path"].replace(old_root, str(data))
        if i in (0, 7, 13):  # a confident mistake: swap the true class's probability with another's
            other = names[(names.index(r["true"]) + 1) % len(names)]
            r[r["true"]], r[other] = r[other], r[r["true"]]
            r["predicted"] = other
    circle = next(r for r in preds if r["true"] == "circle" and r["predicted"] == "circle")
    preds += [{**circle, "path": str(data / "test" / "circle" / n)} for n in ("copy_q90.jpg", "copy_big.png")]  # the copies, scored
    _write_rows(run / "test_predictions.csv", preds)
    html_path = write_run_report(run, gradcam_images=8)
    return run, html_path


def test_report_is_complete_and_self_contained(leaky_run):
    run, html_path = leaky_run
    assert html_path == run / "report.html"
    text = html_path.read_text(encoding="utf-8")
    for sid, label in SECTIONS:
        assert re.search(rf'<section id="{sid}"><h2>{re.escape(label)}</h2>', text), sid
    # nothing fetched from anywhere: every src/href is a data: URI or an in-page anchor
    for attr, value in re.findall(r'\b(src|href)="([^"]*)"', text):
        assert value.startswith(("data:", "#")), (attr, value[:80])
    assert "http://" not in text and "https://" not in text and "<script" not in text.lower()
    assert "default-src 'none'" in text  # the page itself forbids network loads
    imgs = re.findall(r'<img src="data:image/png;base64,([^"]+)"', text)
    assert len(imgs) >= 7  # curves, confusion, ROC, PR, reliability, F1, worst mistakes
    for b64 in imgs:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            assert im.format == "PNG" and im.size[0] > 100
    for name in ("training_curves", "confusion_matrix", "roc", "pr", "reliability", "per_class_f1", "worst_mistakes"):
        p = run / "plots" / f"{name}.png"
        with Image.open(p) as im:
            assert np.asarray(im.convert("RGB")).std() > 10, name
    # metrics with CIs straight from test_metrics.json
    m = json.loads((run / "test_metrics.json").read_text())
    lo, hi = m["ci"]["accuracy"]
    assert f"{lo:.3f} – {hi:.3f}" in text
    # environment and time taken
    cfg = json.loads((run / "config.json").read_text())
    assert f"{cfg['wall_seconds']:.1f} s" in text and cfg["environment"]["torch"] in text
    refit = cfg["fit_summary"]["refit"]  # the default refits its heads on train + validation: the report says so
    assert f"train + validation ({refit['images']} images, {refit['validation_images']} of them validation)" in text
    assert ("Clopper" in text) == (m["accuracy"] == 1.0)  # a collapsed interval is explained


def test_perfect_score_note():
    from imgclf.report.html import _perfect_note

    assert "0.912" in _perfect_note({"n": 40, "accuracy": 1.0})  # 0.025 ** (1/40)
    assert _perfect_note({"n": 40, "accuracy": 0.975}) == ""


def test_report_flags_near_copies_and_shows_mistakes(leaky_run):
    run, html_path = leaky_run
    text = html_path.read_text(encoding="utf-8")
    summary = text[text.index('<section id="summary">'):text.index('<section id="dataset">')]
    assert "2 test image(s) have near-copies in train" in summary
    leakage = text[text.index('id="leakage"'):text.index('<section id="configuration">')]
    assert "copy_q90.jpg" in leakage and "copy_big.png" in leakage
    assert leakage.count("test ~ train") == 2  # exactly the two planted pairs, nothing unrelated
    # the scored copies: named in the summary and scored apart in Metrics, the other images only
    n_scored = len(_rows(run / "test_predictions.csv"))
    assert "2 test image(s) are copies of train or validation images" in summary and "another class" not in summary
    metrics = text[text.index('<section id="metrics">'):text.index('<section id="plots">')]
    assert 'id="without-copies"' in metrics and f"without copies (n = {n_scored - 2})" in metrics
    mistakes = text[text.index('<section id="mistakes">'):text.index('<section id="environment">')]
    n_shown = int(re.search(r"The (\d+) misclassified test images", mistakes).group(1))
    assert n_shown >= 3 and "Grad-CAM" in mistakes
    assert "Grad-CAM not available" not in mistakes
    with Image.open(run / "plots" / "worst_mistakes.png") as im:
        assert im.size[0] >= 600  # image + overlay side by side, two columns


def test_report_command_regenerates(leaky_run, capsys, tmp_path):
    import shutil

    run = tmp_path / "copy"  # regenerate a copy: the shared run's report stays as other tests expect
    shutil.copytree(leaky_run[0], run)
    html_path = run / "report.html"
    html_path.unlink()
    rc = main(["-q", "report", str(run), "--gradcam-images", "0"])
    assert rc == 0 and html_path.is_file()
    assert capsys.readouterr().out.strip() == str(html_path)
    assert "Grad-CAM gallery switched off" in html_path.read_text(encoding="utf-8")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["report", str(empty)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "not a finished run folder" in err
    rc = main(["report", str(tmp_path / "missing")])
    assert rc == 2 and "not a run folder" in capsys.readouterr().err


def test_damaged_model_json_leaves_out_the_model_and_says_why(leaky_run, tmp_path, caplog):
    run = tmp_path / "damaged"
    shutil.copytree(leaky_run[0], run)
    meta = json.loads((run / "model.json").read_text())
    del meta["head"]
    (run / "model.json").write_text(json.dumps(meta))
    text = write_run_report(run, gradcam_images=0).read_text(encoding="utf-8")
    assert any("missing keys head" in r.getMessage() and "leaves out the model" in r.getMessage() for r in caplog.records)
    configuration = text[text.index('<section id="configuration">'):text.index('<section id="training">')]
    assert "<h3>Model</h3>" not in configuration and "Resolved training settings" not in configuration


def test_binary_report_without_model_or_dataset(tmp_path):
    """A run folder whose dataset is gone and model cannot load still gets a full report."""
    rng = np.random.default_rng(0)
    names = ["benign", "malignant"]
    y = rng.integers(0, 2, 60)
    p1 = np.clip(0.45 * y + rng.uniform(0, 0.55, 60), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, probs, names, threshold=0.4, bootstrap=200)
    run = tmp_path / "run"
    run.mkdir()
    (run / "test_metrics.json").write_text(json.dumps(m))
    (run / "config.json").write_text(json.dumps({
        "command": "train", "args": {"epochs": 3, "lr": 3e-5},
        "dataset": {"root": str(tmp_path / "gone"), "layout": "splits", "class_names": names, "counts": {"train": {"benign": 30, "malignant": 30}, "test": {"benign": 30, "malignant": 30}}},
        "environment": {"python": "3.11"}, "wall_seconds": 12.5,
    }))
    _write_rows(run / "test_predictions.csv", [
        {"path": str(tmp_path / "gone" / f"{i}.jpg"), "true": names[t], "predicted": names[int(p[1] >= 0.4)], "benign": f"{p[0]:.6f}", "malignant": f"{p[1]:.6f}"}
        for i, (t, p) in enumerate(zip(y, probs))
    ])
    _write_rows(run / "metrics.csv", [{"epoch": e, "train_loss": 1 / e, "train_accuracy": 0.5, "val_loss": 1 / e, "val_accuracy": 0.5, "best": e == 3} for e in (1, 2, 3)])
    text = write_run_report(run).read_text(encoding="utf-8")
    assert "no longer exists" in text and "Leakage not checked" in text
    assert "Operating points (positive class: malignant)" in text and "0.4 (model's)" in text
    assert "lr</b> 3e-05" in text  # small learning rates are not rounded to 0
    assert (run / "plots" / "roc.png").is_file() and not (run / "plots" / "worst_mistakes.png").exists()
    assert "no longer exist at their recorded path" in text


@pytest.mark.skipif(not browser_available(), reason="needs Debian's chromium (.ci/run installs it) and the playwright package")
def test_report_renders_in_headless_chromium(leaky_run, tmp_path):
    from playwright.sync_api import sync_playwright

    run, html_path = leaky_run
    url = html_path.resolve().as_uri()
    console, page_errors, requests = [], [], []
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: console.append((msg.type, msg.text)))
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            page.on("request", lambda req: requests.append(req.url))
            page.goto(url, wait_until="load")
            for sid, label in SECTIONS:
                heading = page.locator(f"section#{sid} > h2")
                assert heading.is_visible(), sid
                assert heading.inner_text().strip() == label
            # every image decoded (a broken data: URI has naturalWidth 0)
            broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length")
            n_images = page.evaluate("document.images.length")
            assert n_images >= 7 and broken == 0
            assert page.locator("section#summary .warn").first.is_visible()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            if os.environ.get("IMGCLF_SCREENSHOT_DIR"):  # to look at it: keep a copy
                shutil.copy(tmp_path / "report.png", Path(os.environ["IMGCLF_SCREENSHOT_DIR"]) / "report_playwright.png")
        finally:
            browser.close()
    assert not page_errors, page_errors
    assert not [c for c in console if c[0] in ("error", "warning")], console
    assert all(u == url or u.startswith("data:") for u in requests), [u[:80] for u in requests if not u.startswith("data:")]
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.size[1] > 3000 and np.asarray(shot.convert("L")).std() > 10


def test_metrics_without_the_test_images_copied_from_training():
    from imgclf.evaluation.metrics import classification_metrics
    from imgclf.report.html import _metrics, _without_copies

    names = ["benign", "malignant"]
    paths = [f"/d/test/{i}.jpg" for i in range(8)]
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.7, 0.6, 0.2])  # 3.jpg and 7.jpg wrong
    probs = np.stack([1 - p1, p1], 1)
    insp = {
        "duplicates": {"cross_split": [
            {"paths": ["/d/test/3.jpg", "/d/train/a.jpg"], "splits": ["train", "test"], "classes": ["benign"]},
            {"paths": ["/d/test/7.jpg", "/d/validation/b.jpg"], "splits": ["validation", "test"], "classes": ["benign", "malignant"]},
            {"paths": ["/d/train/c.jpg", "/d/validation/c.jpg"], "splits": ["train", "validation"], "classes": ["benign"]},
        ]},
        "near_duplicates": {"cross_split": [
            {"paths": ["/d/train/e.jpg", "/d/test/5.jpg"], "splits": ["train", "test"], "classes": ["malignant"]},
            {"paths": ["/d/validation/f.jpg", "/d/test/6.jpg"], "splits": ["validation", "test"], "classes": ["malignant"]},
            {"paths": ["/d/train/g.jpg", "/d/validation/h.jpg"], "splits": ["train", "validation"], "classes": ["benign", "malignant"]},
        ], "test_with_copies": ["/d/test/5.jpg", "/d/test/6.jpg"]},  # as inspect_dataset gives them: every test image with a near copy
    }
    metrics = classification_metrics(y, probs, names, threshold=0.5, bootstrap=50)
    ctx = {"inspection": insp, "metrics": metrics, "paths": paths, "y_true": y, "probs": probs, "n_pred": 8, "class_names": names}
    wc = _without_copies(ctx)
    assert (wc["copied"], wc["relabelled"]) == (4, 1)  # 3, 5, 6, 7; only 7's copy carries another label
    # with the run's placement of each image, a copy is relabelled only where its own class differs
    twins = {"paths": ["/d/test/0.jpg", "/d/test/4.jpg", "/d/train/z.jpg"], "splits": ["train", "test"], "classes": ["benign", "malignant"]}
    placed = {"/d/test/0.jpg": ("test", "benign"), "/d/test/4.jpg": ("test", "malignant"), "/d/train/z.jpg": ("train", "benign")}
    twin_ctx = {**ctx, "inspection": {"duplicates": {"cross_split": [twins]}}, "placed": placed}
    assert (lambda w: (w["copied"], w["relabelled"]))(_without_copies(twin_ctx)) == (2, 1)
    # near copies beyond the capped pair list still count
    capped = {"duplicates": {"cross_split": []}, "near_duplicates": {"cross_split": [], "test_with_copies": ["/d/test/2.jpg"]}}
    assert _without_copies({**ctx, "inspection": capped})["copied"] == 1
    kept = [0, 1, 2, 4]
    want = classification_metrics(y[kept], probs[kept], names, threshold=0.5, bootstrap=50)
    assert wc["metrics"]["n"] == 4 and wc["metrics"]["accuracy"] == want["accuracy"] == 1.0 and wc["metrics"]["ci"] == want["ci"]
    ctx["without_copies"] = wc
    section = _metrics(ctx)
    assert 'id="without-copies"' in section and "without copies (n = 4)" in section and "all test images (n = 8)" in section
    # nothing copied, or the dataset not checked: no second column
    assert _without_copies({**ctx, "inspection": {"duplicates": {"cross_split": []}}}) is None
    assert _without_copies({**ctx, "inspection": None}) is None
