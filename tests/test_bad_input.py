"""Bad input a user met: symlink loops, unreadable folders, --out paths that are not plain files.

Permission errors are simulated by making ``os.scandir`` refuse one folder, so these
tests also run as root (where chmod 000 does not stop anything).
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_shapes_dataset
from imgclf.cli.main import main
from imgclf.data.datasets import DatasetError, collect_image_paths, labelled_eval_samples, load_dataset, scan_layout
from imgclf.fileio import atomic_write_bytes, check_output_path


def _img(path: Path, color=(0, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def _classes(folder: Path, spec: dict[str, int]) -> None:
    for cls, n in spec.items():
        for i in range(n):
            _img(folder / cls / f"{cls}_{i}.png", (i, len(cls), 0))


def _deny_listing(monkeypatch, *folders: Path) -> None:
    """Listing any of ``folders`` fails as it does without read permission."""
    denied = {os.path.abspath(f) for f in folders}
    real_scandir = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and os.path.abspath(os.fspath(path)) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def _one_split_each(ds) -> dict[Path, tuple[str, str]]:
    """Real file -> (split, class); fails if a real file appears twice."""
    where: dict[Path, tuple[str, str]] = {}
    for s in ds.all_samples():
        real = Path(os.path.realpath(s.path))
        assert real not in where, f"{s.path} counted twice ({where[real]} and {s.split})"
        where[real] = (s.split, ds.class_names[s.label])
    return where


# --------------------------------------------------------------------------- symlink loops


def test_link_back_to_the_dataset_root_is_not_followed(tmp_path):
    root = tmp_path / "d"
    _classes(root, {"benign": 5, "malignant": 5})
    (root / "benign" / "sub").mkdir()
    os.symlink("../..", root / "benign" / "sub" / "root")
    ds = load_dataset(root)
    where = _one_split_each(ds)
    assert len(where) == 10
    assert all(cls == Path(real).parent.name for real, (_, cls) in where.items())  # no malignant labelled benign
    assert root / "benign" / "sub" / "root" in ds.ignored
    assert any("sub/root" in w and "loop" in w for w in ds.warnings)


def test_loop_inside_a_class_folder_counts_each_file_once(tmp_path):
    _classes(tmp_path / "train", {"benign": 4, "malignant": 4})
    _classes(tmp_path / "test", {"benign": 2, "malignant": 2})
    _img(tmp_path / "train" / "benign" / "sub" / "deep.png")
    os.symlink("..", tmp_path / "train" / "benign" / "sub" / "back")
    ds = load_dataset(tmp_path, val_fraction=0.25)
    assert sum(ds.counts()["train"].values()) + sum(ds.counts()["validation"].values()) == 9
    assert sum(ds.counts()["test"].values()) == 4
    _one_split_each(ds)
    assert tmp_path / "train" / "benign" / "sub" / "back" in ds.ignored


def test_links_to_another_class_or_to_a_counted_file_are_skipped_and_reported(tmp_path):
    _classes(tmp_path, {"benign": 3, "malignant": 3})
    os.symlink("../malignant", tmp_path / "benign" / "mal")
    os.symlink("benign_0.png", tmp_path / "benign" / "again.png")
    layout, found, ignored, warnings = scan_layout(tmp_path)
    assert [p.name for p in found["train"]["benign"]] == ["benign_0.png", "benign_1.png", "benign_2.png"]
    assert [p.name for p in found["train"]["malignant"]] == ["malignant_0.png", "malignant_1.png", "malignant_2.png"]
    assert {tmp_path / "benign" / "mal", tmp_path / "benign" / "again.png"} <= set(ignored)  # the link loses, not the file
    assert any("benign/mal" in w and "same folder as" in w for w in warnings)
    assert any("again.png" in w and "same file as" in w for w in warnings)


def test_a_file_linked_from_another_class_keeps_its_own_class(tmp_path):
    _classes(tmp_path, {"benign": 2, "malignant": 2})
    os.symlink("../malignant/malignant_0.png", tmp_path / "benign" / "a_link.png")
    _, found, ignored, _ = scan_layout(tmp_path)
    assert tmp_path / "malignant" / "malignant_0.png" in found["train"]["malignant"]
    assert tmp_path / "benign" / "a_link.png" not in found["train"]["benign"]
    assert tmp_path / "benign" / "a_link.png" in ignored


def test_a_link_to_an_outside_folder_is_still_followed(tmp_path):
    _classes(tmp_path / "elsewhere", {"cats": 3})
    _classes(tmp_path / "d", {"dogs": 3})
    os.symlink(tmp_path / "elsewhere" / "cats", tmp_path / "d" / "cats")
    _, found, _, warnings = scan_layout(tmp_path / "d")
    assert len(found["train"]["cats"]) == 3 and warnings == []


def test_predict_inputs_with_a_loop_list_each_file_once(tmp_path):
    folder = tmp_path / "inbox"
    a, b = _img(folder / "a.png"), _img(folder / "sub" / "b.png")
    os.symlink("..", folder / "sub" / "back")
    paths, problems = collect_image_paths([folder, folder / "sub"])
    assert paths == [a, b]
    assert len(problems) == 1 and "sub/back" in problems[0] and "loop" in problems[0]


# --------------------------------------------------------------------------- unreadable folders


def test_unreadable_class_sub_folder_is_reported_not_dropped(tmp_path, monkeypatch):
    _classes(tmp_path, {"benign": 3, "malignant": 3})
    locked = tmp_path / "malignant" / "locked"
    _img(locked / "hidden_from_us.png")
    _deny_listing(monkeypatch, locked)
    ds = load_dataset(tmp_path)
    assert sum(ds.counts()[s]["malignant"] for s in ds.counts()) == 3
    assert ds.unreadable == [(locked, "cannot read folder (Permission denied)")]
    assert any(str(locked) in w and "Permission denied" in w for w in ds.warnings)


def test_unreadable_class_folder_error_names_the_permission_problem(tmp_path, monkeypatch):
    _classes(tmp_path, {"benign": 3, "malignant": 3})
    _deny_listing(monkeypatch, tmp_path / "malignant")
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path)
    assert str(tmp_path / "malignant") in str(err.value) and "Permission denied" in str(err.value)
    assert "contains no images" not in str(err.value)


def test_unreadable_evaluation_class_folder_is_logged(tmp_path, monkeypatch, caplog):
    _classes(tmp_path, {"benign": 2, "malignant": 2})
    _deny_listing(monkeypatch, tmp_path / "benign")
    with caplog.at_level("WARNING", logger="imgclf"):
        samples = labelled_eval_samples(tmp_path, ["benign", "malignant"])
    assert len(samples) == 2
    assert any("benign" in r.getMessage() and "Permission denied" in r.getMessage() for r in caplog.records)


def test_unreadable_predict_folder_is_not_called_empty(tmp_path, monkeypatch):
    _img(tmp_path / "ok" / "a.png")
    locked = tmp_path / "locked"
    _img(locked / "b.png")
    _img(tmp_path / "ok" / "deeper" / "c.png")
    _deny_listing(monkeypatch, locked, tmp_path / "ok" / "deeper")
    unreadable: list = []
    paths, problems = collect_image_paths([tmp_path / "ok", locked], unreadable=unreadable)
    assert paths == [tmp_path / "ok" / "a.png"]
    assert unreadable == [(tmp_path / "ok" / "deeper", "cannot read folder (Permission denied)"), (locked, "cannot read folder (Permission denied)")]
    assert len(problems) == 2 and all("Permission denied" in p for p in problems)
    assert not any("contains no images" in p for p in problems)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads a chmod 000 folder anyway")
def test_real_chmod_000_folder_is_reported(tmp_path):
    _classes(tmp_path, {"benign": 3, "malignant": 3})
    locked = tmp_path / "malignant" / "locked"
    _img(locked / "x.png")
    locked.chmod(0)
    try:
        ds = load_dataset(tmp_path)
    finally:
        locked.chmod(0o755)
    assert [p for p, _ in ds.unreadable] == [locked]


def test_train_and_predict_end_to_end_with_a_loop_and_locked_folders(tmp_path, monkeypatch, capsys):
    """Train lists the locked folder in skipped.csv and uses each image once; predict gives the locked folder a row."""
    root = make_shapes_dataset(tmp_path / "flat", {"": 6}, classes=("circle", "square"), size=48)
    (root / "circle" / "sub").mkdir()
    os.symlink("../..", root / "circle" / "sub" / "root")
    locked = root / "square" / "locked"
    _img(locked / "x.png")
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    for name in ("circle_000.jpg", "square_000.jpg"):
        (inbox / name).write_bytes((root / name.split("_")[0] / name).read_bytes())
    os.symlink("..", inbox / "sub" / "back")
    (inbox / "locked").mkdir()
    _deny_listing(monkeypatch, locked, inbox / "locked")

    assert main(["-q", "train", str(root), "--project", str(tmp_path / "runs"), "--no-progress", "--epochs", "2"]) == 0
    run = tmp_path / "runs" / "train"
    split = list(csv.DictReader((run / "split.csv").open()))
    assert len(split) == 12 and len({os.path.realpath(r["path"]) for r in split}) == 12
    assert all(Path(os.path.realpath(r["path"])).parent.name == r["class"] for r in split)
    skipped = list(csv.DictReader((run / "skipped.csv").open()))
    assert [(r["path"], r["error"]) for r in skipped] == [(str(locked), "cannot read folder (Permission denied)")]
    assert "Permission denied" in (run / "train.log").read_text()
    capsys.readouterr()

    assert main(["predict", str(run), str(inbox), "--no-progress"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [Path(r["path"]).name for r in rows] == ["circle_000.jpg", "square_000.jpg", "locked"]
    assert rows[2]["predicted"] == "" and "Permission denied" in rows[2]["error"]

    out = tmp_path / "pred.json"  # an existing output keeps its permissions
    out.write_text("{}")
    out.chmod(0o644)
    assert main(["predict", str(run), str(inbox / "circle_000.jpg"), "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["predictions"][0]["predicted"] in ("circle", "square")
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


# --------------------------------------------------------------------------- what --out may replace


def test_new_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a" / "new.json", b"{}")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "private.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "new.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


def test_replacing_a_file_keeps_its_mode(tmp_path):
    target = tmp_path / "shared.csv"
    target.write_text("old")
    target.chmod(0o664)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o664
    assert [p.name for p in tmp_path.iterdir()] == ["shared.csv"]  # no temp file left behind


def test_a_symlink_is_written_through_to_its_target(tmp_path):
    target = tmp_path / "real" / "out.csv"
    target.parent.mkdir()
    target.write_text("old")
    target.chmod(0o640)
    link = tmp_path / "link.csv"
    os.symlink(target, link)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    dangling = tmp_path / "dangling.csv"
    os.symlink(tmp_path / "real" / "made.csv", dangling)
    atomic_write_bytes(dangling, b"x")
    assert dangling.is_symlink() and (tmp_path / "real" / "made.csv").read_bytes() == b"x"


def test_special_files_and_folders_are_refused(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    device_link = tmp_path / "null-link"
    os.symlink(os.devnull, device_link)
    folder = tmp_path / "folder"
    folder.mkdir()
    for path, kind in ((fifo, "FIFO"), (device_link, "device"), (folder, "folder")):
        with pytest.raises(ValueError, match=kind) as err:
            atomic_write_bytes(path, b"data")
        assert str(path) in str(err.value)
        with pytest.raises(ValueError, match=kind):
            check_output_path(path)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert device_link.is_symlink() and os.readlink(device_link) == os.devnull
    assert folder.is_dir() and not list(folder.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "null-link", "pipe"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        check_output_path(tmp_path / "file" / "out.csv")


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("bad", ["folder", "device"])
def test_bad_out_fails_before_the_model_is_loaded(tmp_path, capsys, command, bad):
    image = _img(tmp_path / "data" / "a" / "x.png")
    out = tmp_path / "out"
    if bad == "folder":
        out.mkdir()
    else:
        os.symlink(os.devnull, out)
    data = str(image) if command == "predict" else str(tmp_path / "data")
    rc = main([command, str(tmp_path / "no-such-model"), data, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"--out {out}" in err[0] and ("a folder" if bad == "folder" else "a device") in err[0]
    assert out.is_dir() if bad == "folder" else out.is_symlink()

