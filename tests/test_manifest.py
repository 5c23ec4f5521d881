"""``--manifest FILE.csv`` (path,label[,split]) as the dataset of train, evaluate, predict and inspect."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import make_shapes_dataset, tree_snapshot
from imgclf.cli.main import main
from imgclf.data.datasets import DatasetError, load_dataset, load_manifest

FAST = ["--recipe", "fast", "--epochs", "3", "--no-progress", "--no-report", "--bootstrap", "0"]


def write_manifest(path: Path, rows: list[list[str]], header=("path", "label", "split")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def folder_rows(root: Path, relative_to: Path | None = None, split_of_folder: bool = False) -> list[list[str]]:
    """A manifest row per image under ``root`` (label = its class folder; split = its split folder)."""
    rows = []
    for p in sorted(root.rglob("*.jpg")):
        shown = p.relative_to(relative_to).as_posix() if relative_to else str(p)
        rows.append([shown, p.parent.name] + ([p.parent.parent.name] if split_of_folder else []))
    return rows


def split_rows(run: Path) -> list[list[str]]:
    with open(run / "split.csv", newline="") as fh:
        return list(csv.reader(fh))


@pytest.fixture(scope="module")
def flat_root(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("flat"), {"": 10}, size=64)


@pytest.fixture(scope="module")
def manifest_and_folder_runs(flat_root, tmp_path_factory):
    """The same flat set trained as a folder and as a split-less manifest (relative paths, CSV in the set)."""
    project = tmp_path_factory.mktemp("manifest_runs")
    manifest = write_manifest(flat_root / "images.csv", folder_rows(flat_root, relative_to=flat_root), header=("path", "label"))
    before = tree_snapshot(flat_root)
    assert main(["-q", "train", str(flat_root), "--project", str(project), "--name", "folder", "--seed", "3", *FAST]) == 0
    assert main(["-q", "train", "--manifest", str(manifest), "--project", str(project), "--name", "manifest", "--seed", "3", *FAST]) == 0
    assert tree_snapshot(flat_root) == before  # nothing written beside the images
    return project / "folder", project / "manifest", manifest


def test_manifest_without_split_column_trains_like_the_flat_folder(manifest_and_folder_runs):
    folder_run, manifest_run, manifest = manifest_and_folder_runs
    assert split_rows(manifest_run) == split_rows(folder_run)
    a = json.loads((folder_run / "test_metrics.json").read_text())
    b = json.loads((manifest_run / "test_metrics.json").read_text())
    assert (b["n"], b["accuracy"], b["confusion_matrix"]) == (a["n"], a["accuracy"], a["confusion_matrix"])
    cfg = json.loads((manifest_run / "config.json").read_text())
    assert cfg["dataset"]["manifest"] == str(manifest.resolve())
    assert cfg["dataset"]["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert cfg["dataset"]["layout"] == "manifest" and cfg["dataset"]["class_names"] == ["circle", "square", "triangle"]
    assert cfg["run"]["manifest"] == str(manifest)


def test_manifest_with_split_column_and_absolute_paths_matches_split_folders(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", {"train": 8, "val": 2, "test": 3}, size=48)
    rows = folder_rows(root, split_of_folder=True)  # absolute paths; split values as the folders are named (val)
    manifest = write_manifest(tmp_path / "lists" / "m.csv", [[p, c, s.upper() if s == "test" else s] for p, c, s in rows])
    a, b = load_dataset(root, seed=1), load_manifest(manifest, seed=1)
    assert b.class_names == a.class_names
    assert {k: [(s.path, s.label) for s in v] for k, v in b.samples.items()} == {k: [(s.path, s.label) for s in v] for k, v in a.samples.items()}
    # only a test split named: validation carved from train exactly as for a train/test folder set
    no_val = make_shapes_dataset(tmp_path / "ds2", {"train": 8, "test": 3}, size=48)
    manifest2 = write_manifest(no_val / "m.csv", folder_rows(no_val, relative_to=no_val, split_of_folder=True))
    a, b = load_dataset(no_val, seed=5), load_manifest(manifest2, seed=5)
    assert {k: [s.path for s in v] for k, v in b.samples.items()} == {k: [s.path for s in v] for k, v in a.samples.items()}
    assert b.split_source["validation"] == a.split_source["validation"] == "stratified 0.2 of train, seed 5"


def test_empty_split_cells_are_carved_and_named_train_rows_stay_in_train(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", {"": 10}, size=48)
    rows = [[p, c, "train" if p.endswith("_000.jpg") else ""] for p, c in folder_rows(root)]
    ds = load_manifest(write_manifest(tmp_path / "m.csv", rows), seed=0)
    train = {str(s.path) for s in ds.samples["train"]}
    assert all(p in train for p, _, split in rows if split == "train")
    assert len(ds.samples["test"]) == 6 and len(ds.samples["validation"]) == 3  # per class: 9 to carve from, 2 to test, 1 of 7 to validation
    assert ds.split_source["test"] == "stratified 0.2 of rows with no split, seed 0"


def test_a_row_to_carve_that_copies_a_named_train_row_stays_in_train(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", {"": 10}, size=48)
    rows = [[p, c, "train" if p.endswith("_000.jpg") else ""] for p, c in folder_rows(root)]
    copies = []
    for p, c, split in list(rows):
        if split == "train":
            copy = Path(p).with_name("copy_of_000.jpg")
            shutil.copyfile(p, copy)
            rows.append([str(copy), c, ""])
            copies.append(copy)
    for seed in range(5):
        ds = load_manifest(write_manifest(tmp_path / "m.csv", rows), seed=seed)
        train = {s.path for s in ds.samples["train"]}
        assert all(copy in train for copy in copies), seed
        assert any(f"{len(copies)} exact copies" in w for w in ds.warnings)


def test_a_missing_listed_file_is_skipped_and_listed_in_skipped_csv(tmp_path, capsys):
    root = make_shapes_dataset(tmp_path / "ds", {"train": 6, "test": 2}, size=48)
    rows = folder_rows(root, relative_to=tmp_path, split_of_folder=True)
    rows.append(["ds/train/circle/gone.jpg", "circle", "train"])
    manifest = write_manifest(tmp_path / "m.csv", rows)
    project = tmp_path.parent / f"{tmp_path.name}_runs"
    assert main(["-q", "train", "--manifest", str(manifest), "--project", str(project), "--name", "r", *FAST]) == 0
    skipped = list(csv.DictReader(open(project / "r" / "skipped.csv", newline="")))
    assert [r["path"] for r in skipped] == [str(tmp_path / "ds/train/circle/gone.jpg")]
    assert f"manifest line {len(rows) + 1}: no such file" in skipped[0]["error"]
    assert "gone.jpg" not in (project / "r" / "split.csv").read_text()


BAD = {
    "no label column": ("path,class\na.jpg,x\n", "lacks column(s) label"),
    "empty label": ("path,label\n{img},\n", ":2: empty label"),
    "extra field": ("path,label\n{img},circle,oops\n", ":2: 3 field(s), the header has 2"),
    "duplicate": ("path,label\ncircle/circle_000.jpg,circle\n{img},square\n", ":3: {img} is listed again (first on line 2)"),
    "unknown split": ("path,label,split\n{img},circle,holdout\n", ":2: unknown split 'holdout'"),
    "class only in test": ("path,label,split\n{img},circle,train\n{img1},square,train\n{img2},triangle,test\n", "label 'triangle' appears in test but not in train"),
    "one class": ("path,label\n{img},circle\n{img1},circle\n", "only one label ('circle')"),
    "header only": ("path,label\n", "manifest has a header but no rows"),
    "empty file": ("", "manifest is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_is_one_line_exit_2(case, flat_root, tmp_path, capsys):
    text, expected = BAD[case]
    shutil.copytree(flat_root / "circle", tmp_path / "lists" / "circle")  # for the relative path of the duplicate case
    images = {"img": tmp_path / "lists/circle/circle_000.jpg", "img1": flat_root / "circle/circle_001.jpg", "img2": flat_root / "triangle/triangle_000.jpg"}
    manifest = tmp_path / "lists" / "m.csv"
    manifest.write_text(text.format(**images))
    expected = expected.format(**images)
    rc = main(["train", "--manifest", str(manifest), "--project", str(tmp_path / "runs"), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expected in err[0], err
    with pytest.raises(DatasetError):
        load_manifest(manifest)


def test_data_and_manifest_exactly_one(flat_root, manifest_and_folder_runs, tmp_path, capsys):
    _, _, manifest = manifest_and_folder_runs
    for argv in (["train"], ["train", str(flat_root), "--manifest", str(manifest)], ["inspect"], ["evaluate", "run"], ["predict", "run"]):
        rc = main([*argv, "--project", str(tmp_path)] if argv[0] == "train" else argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and ("exactly one" in err[0] or "not both" in err[0] or "nothing to predict" in err[0]), (argv, err)


def test_outputs_beside_the_manifest_or_its_images_are_refused(flat_root, tmp_path, capsys):
    lists = tmp_path / "lists"
    manifest = write_manifest(lists / "m.csv", folder_rows(flat_root), header=("path", "label"))
    rc = main(["train", "--manifest", str(manifest), "--project", str(lists / "runs"), *FAST])
    assert rc == 2 and "never writes into the dataset" in capsys.readouterr().err
    rc = main(["train", "--manifest", str(manifest), "--project", str(flat_root / "circle" / "runs"), *FAST])
    assert rc == 2 and "a folder of the manifest's images" in capsys.readouterr().err
    assert not (flat_root / "circle" / "runs").exists() and not (lists / "runs").exists()


def test_evaluate_and_predict_with_a_manifest(manifest_and_folder_runs, flat_root, tmp_path, capsys):
    _, run, manifest = manifest_and_folder_runs
    # the run's own split-less manifest: its test split from split.csv, not every (training) row
    out = tmp_path / "m.json"
    assert main(["-q", "evaluate", str(run), "--manifest", str(manifest), "--out", str(out), "--bootstrap", "0"]) == 0
    own = json.loads(out.read_text())
    assert own["n"] == json.loads((run / "test_metrics.json").read_text())["n"] == 6
    # another manifest with test rows: exactly those rows, a missing one reported as skipped
    rows = [[str(flat_root / f"{c}/{c}_00{i}.jpg"), c, "test"] for c in ("circle", "square") for i in range(2)]
    other = write_manifest(tmp_path / "lists" / "other.csv", [*rows, [str(flat_root / "circle/x.jpg"), "circle", "test"], [str(flat_root / "square/square_009.jpg"), "square", "train"]])
    assert main(["-q", "evaluate", str(run), "--manifest", str(other), "--out", str(out), "--bootstrap", "0"]) == 0
    m = json.loads(out.read_text())
    assert m["n"] == 4 and m["data"] == str(other) and [s["path"] for s in m["skipped"]] == [str(flat_root / "circle/x.jpg")]
    capsys.readouterr()
    # predict: the path column only (no label needed), together with a plain file argument
    paths_only = write_manifest(tmp_path / "paths.csv", [["circle/circle_001.jpg"], ["square/square_002.jpg"]], header=("path",))
    shutil.copytree(flat_root / "circle", tmp_path / "circle")
    shutil.copytree(flat_root / "square", tmp_path / "square")
    assert main(["-q", "predict", str(run), str(flat_root / "triangle/triangle_000.jpg"), "--manifest", str(paths_only)]) == 0
    predicted = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [Path(r["path"]).name for r in predicted] == ["triangle_000.jpg", "circle_001.jpg", "square_002.jpg"]
    assert all(not r["error"] for r in predicted)
    rc = main(["predict", str(run), "--manifest", str(paths_only), "--out", str(paths_only)])
    assert rc == 2 and "is the input" in capsys.readouterr().err


def test_inspect_with_a_manifest_reports_leakage_and_missing_files(flat_root, tmp_path, capsys):
    rows = [[str(p), c, "train"] for p, c in folder_rows(flat_root)]
    rows.append([str(tmp_path / "copy.jpg"), "circle", "test"])
    rows.append([str(tmp_path / "absent.jpg"), "square", "test"])
    shutil.copy(flat_root / "circle/circle_004.jpg", tmp_path / "copy.jpg")
    manifest = write_manifest(tmp_path / "m.csv", rows)
    assert main(["inspect", "--manifest", str(manifest), "--json", "--no-progress", "--no-near-duplicates"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "manifest" and report["manifest"] == str(manifest) and report["root"] == str(tmp_path)
    assert report["counts"]["test"] == {"circle": 1, "square": 0, "triangle": 0} and report["totals"]["per_split"]["train"] == 30
    assert any(w.startswith("LEAKAGE: 1 images in test also appear in train") for w in report["warnings"])
    assert [(p["path"], p["kind"]) for p in report["problems"]] == [(str(tmp_path / "absent.jpg"), "missing")]
    assert main(["inspect", "--manifest", str(manifest), "--no-progress", "--no-near-duplicates"]) == 0
    assert f"Dataset: {manifest}" in capsys.readouterr().out
