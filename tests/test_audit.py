"""`imgclf audit`: planted label flips rank on top, the outputs, the dataset untouched, `train --exclude`."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from conftest import make_shapes_dataset, tree_snapshot

from imgclf.cli.main import main
from imgclf.data.exclusions import read_path_list

# (from class, file index, to class): each moved file now carries a wrong label
FLIPS = [("circle", 1, "square"), ("square", 4, "triangle"), ("triangle", 7, "circle")]


@pytest.fixture(scope="module")
def flipped_root(tmp_path_factory) -> tuple[Path, list[str]]:
    """A shapes set (train 14/class, validation 4/class) with 3 training labels flipped."""
    root = make_shapes_dataset(tmp_path_factory.mktemp("audit-data"), {"train": 14, "validation": 4}, seed=3)
    flipped = []
    for src_class, index, dst_class in FLIPS:
        src = root / "train" / src_class / f"{src_class}_{index:03d}.jpg"
        dst = root / "train" / dst_class / src.name
        shutil.move(src, dst)
        flipped.append(str(dst.resolve()))
    return root, flipped


@pytest.fixture(scope="module")
def audit_run(flipped_root, tmp_path_factory):
    root, _ = flipped_root
    before = tree_snapshot(root)
    digests = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    project = tmp_path_factory.mktemp("audits")
    rc = main(["-q", "audit", str(root), "--project", str(project), "--no-progress", "--folds", "3"])
    assert rc == 0
    return project / "audit", before, digests


def _rows(out: Path) -> list[dict]:
    with open(out / "audit.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_flipped_labels_rank_on_top(flipped_root, audit_run):
    _, flipped = flipped_root
    out, _, _ = audit_run
    rows = _rows(out)
    top = {r["path"] for r in rows[: 2 * len(flipped)]}
    assert set(flipped) <= top
    by_path = {r["path"]: r for r in rows}
    for (src_class, _, dst_class), path in zip(FLIPS, flipped):
        assert by_path[path]["given_label"] == dst_class
        assert by_path[path]["suggested_label"] == src_class
        assert "label" in by_path[path]["issue"].split(";")
    assert json.loads((out / "audit.json").read_text())["backbone"] == "efficientnet_lite0_stages"  # the default: fast's features


def test_audit_csv_columns_and_order(flipped_root, audit_run):
    out, _, _ = audit_run
    with open(out / "audit.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["path", "split", "given_label", "suggested_label", "label_quality", "suggested_probability", "issue", "outlier_score"]
    rows = _rows(out)
    assert len(rows) == 3 * (14 + 4)
    assert {r["split"] for r in rows} == {"train", "validation"}
    scores = [float(r["label_quality"]) for r in rows]
    assert scores == sorted(scores) and all(0.0 <= s <= 1.0 for s in scores)


def test_audit_html_is_self_contained(flipped_root, audit_run):
    _, flipped = flipped_root
    out, _, _ = audit_run
    page = (out / "audit.html").read_text()
    assert "data:image/jpeg;base64," in page
    assert "src=\"http" not in page and "src='http" not in page
    assert Path(flipped[0]).name in page


def test_dataset_untouched(flipped_root, audit_run):
    root, _ = flipped_root
    _, before, digests = audit_run
    assert tree_snapshot(root) == before
    assert {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} == digests


def test_audit_refuses_output_inside_dataset(flipped_root, capsys):
    root, _ = flipped_root
    before = tree_snapshot(root)
    assert main(["audit", str(root), "--project", str(root / "runs"), "--no-progress"]) == 2
    assert "never writes into the dataset" in capsys.readouterr().err
    assert tree_snapshot(root) == before


def test_read_path_list_text_and_csv(tmp_path):
    text = tmp_path / "reject.txt"
    text.write_text("# rejected\n/a/b.jpg\n\n  c/d.png  \n")
    assert read_path_list(text) == ["/a/b.jpg", "c/d.png"]
    table = tmp_path / "reject.csv"
    table.write_text("path,given_label,issue\n/a/b.jpg,cat,label\n\"/x,y.jpg\",dog,\n")
    assert read_path_list(table) == ["/a/b.jpg", "/x,y.jpg"]


def test_train_exclude_skips_listed_files(flipped_root, tmp_path):
    root, flipped = flipped_root
    reject = tmp_path / "reject.txt"
    relative = Path(flipped[1]).relative_to(root.resolve()).as_posix()  # relative paths are under the dataset root
    reject.write_text(f"{flipped[0]}\n{relative}\n/not/in/the/dataset.jpg\n")
    project = tmp_path / "runs"
    rc = main(["-q", "train", str(root), "--project", str(project), "--name", "x", "--recipe", "fast", "--epochs", "2",
               "--no-progress", "--no-report", "--bootstrap", "0", "--exclude", str(reject)])
    assert rc == 0
    run = project / "x"
    with open(run / "split.csv", newline="") as fh:
        used = {str(Path(r["path"]).resolve()) for r in csv.DictReader(fh)}
    assert flipped[0] not in used and flipped[1] not in used and flipped[2] in used
    with open(run / "skipped.csv", newline="") as fh:
        skipped = {r["path"]: r["error"] for r in csv.DictReader(fh)}
    assert {str(Path(p).resolve()) for p in skipped} == {flipped[0], flipped[1]}
    assert set(skipped.values()) == {f"excluded by {reject}"}
    log = (run / "train.log").read_text()
    assert f"excluded by {reject}" in log and "1 listed path(s) match no image" in log


def test_train_exclude_unreadable_list_is_one_line_error(flipped_root, tmp_path, capsys):
    root, _ = flipped_root
    rc = main(["train", str(root), "--project", str(tmp_path / "runs"), "--recipe", "fast", "--no-progress",
               "--exclude", str(tmp_path / "missing.txt")])
    assert rc == 2
    assert "exclude list" in capsys.readouterr().err


def test_suspects_grid_shows_the_label_suspects(audit_run, tmp_path):
    from PIL import Image

    from imgclf.audit.core import AuditResult
    from imgclf.audit.render import write_suspects_png

    out, _, _ = audit_run
    rows = _rows(out)
    for r in rows:
        r["label_quality"] = float(r["label_quality"])
    result = AuditResult(root=out, class_names=[], rows=rows, folds=3, seed=0, backbone="", head="")
    assert len(result.issues("label")) >= 3
    png = write_suspects_png(result, tmp_path / "top.png", n=4, colors=64)
    with Image.open(png) as img:
        assert img.mode == "P" and img.width == 5 * 180
        assert img.height == 180 + 44  # one row of up to 5 suspects
