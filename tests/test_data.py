"""Tests for imgclf.data.datasets: layouts, stray files, carved splits, split CSV, predict inputs."""

from __future__ import annotations

import csv
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import tree_snapshot

from imgclf.data.datasets import (
    SPLIT_ALIASES,
    SPLIT_NAMES,
    Dataset,
    DatasetError,
    Sample,
    collect_image_paths,
    load_dataset,
    read_split_csv,
    scan_layout,
    write_split_csv,
)


def _img(path: Path, color=(0, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def _make_classes(folder: Path, spec: dict[str, int], ext=".png"):
    for cls, n in spec.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            # a different picture per file (a copy would be carved with its original)
            _img(folder / cls / f"{cls}_{i:03d}{ext}", (i % 256, sum(map(ord, cls)) % 256, i // 256))


def test_constants():
    assert SPLIT_NAMES == ("train", "validation", "test")
    assert SPLIT_ALIASES["validation"] == ("validation", "val", "valid")


def test_full_splits_layout(tmp_path):
    _make_classes(tmp_path / "train", {"cat": 5, "dog": 4})
    _make_classes(tmp_path / "validation", {"cat": 2, "dog": 1})
    _make_classes(tmp_path / "test", {"cat": 1, "dog": 3})
    before = tree_snapshot(tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.layout == "splits"
    assert ds.class_names == ["cat", "dog"]
    assert ds.counts() == {
        "train": {"cat": 5, "dog": 4},
        "validation": {"cat": 2, "dog": 1},
        "test": {"cat": 1, "dog": 3},
    }
    assert ds.split_source == {
        "train": "folder train",
        "validation": "folder validation",
        "test": "folder test",
    }
    assert len(ds.all_samples()) == 16
    s = ds.samples["test"][0]
    assert isinstance(s, Sample) and s.split == "test" and s.label == 0
    assert s.path == tmp_path / "test" / "cat" / "cat_000.png"
    assert all(ds.class_names[x.label] == x.path.parent.name for x in ds.all_samples())
    assert ds.warnings == [] and ds.ignored == []
    assert tree_snapshot(tmp_path) == before  # nothing written into the dataset


@pytest.mark.parametrize("alias", ["val", "valid", "Validation"])
def test_validation_aliases(tmp_path, alias):
    _make_classes(tmp_path / "train", {"a": 3, "b": 3})
    _make_classes(tmp_path / alias, {"a": 1, "b": 2})
    layout, found, ignored, warnings = scan_layout(tmp_path)
    assert layout == "splits"
    assert set(found) == {"train", "validation"}
    assert {k: len(v) for k, v in found["validation"].items()} == {"a": 1, "b": 2}
    ds = load_dataset(tmp_path)
    assert ds.counts()["validation"] == {"a": 1, "b": 2}
    assert ds.split_source["validation"] == f"folder {alias}"
    assert ds.split_source["test"] == "stratified 0.2 of train, seed 0"


def test_two_alias_folders_is_error(tmp_path):
    _make_classes(tmp_path / "train", {"a": 3, "b": 3})
    _make_classes(tmp_path / "val", {"a": 1, "b": 1})
    _make_classes(tmp_path / "validation", {"a": 1, "b": 1})
    with pytest.raises(DatasetError, match="'val' and 'validation'"):
        load_dataset(tmp_path)


def test_train_only_carves_validation_and_test(tmp_path):
    _make_classes(tmp_path / "train", {"a": 10, "b": 5})
    ds = load_dataset(tmp_path, val_fraction=0.2, test_fraction=0.2, seed=0)
    c = ds.counts()
    # a: test round(10*.2)=2, val round(8*.2)=2 -> train 6; b: test 1, val round(4*.2)=1 -> 3
    assert c == {
        "train": {"a": 6, "b": 3},
        "validation": {"a": 2, "b": 1},
        "test": {"a": 2, "b": 1},
    }
    assert ds.split_source["test"] == "stratified 0.2 of train, seed 0"
    assert ds.split_source["validation"] == "stratified 0.2 of train after carving test, seed 0"
    paths = [s.path for s in ds.all_samples()]
    assert len(paths) == len(set(paths)) == 15  # disjoint and complete


def test_only_validation_missing(tmp_path):
    _make_classes(tmp_path / "train", {"a": 10, "b": 10})
    _make_classes(tmp_path / "test", {"a": 2, "b": 2})
    ds = load_dataset(tmp_path, val_fraction=0.3)
    assert ds.counts()["validation"] == {"a": 3, "b": 3}
    assert ds.counts()["test"] == {"a": 2, "b": 2}
    assert ds.counts()["train"] == {"a": 7, "b": 7}
    assert ds.split_source["validation"] == "stratified 0.3 of train, seed 0"


def test_flat_layout(tmp_path):
    _make_classes(tmp_path, {"roses": 10, "tulips": 6, "daisy": 3})
    ds = load_dataset(tmp_path)
    assert ds.layout == "flat"
    assert ds.class_names == ["daisy", "roses", "tulips"]
    c = ds.counts()
    assert c["test"] == {"daisy": 1, "roses": 2, "tulips": 1}
    # daisy: 3 -> 1 test, leaving 2: round(2*.2)=0 and n<3, so no validation image.
    assert c["validation"] == {"daisy": 0, "roses": 2, "tulips": 1}
    assert c["train"] == {"daisy": 2, "roses": 6, "tulips": 4}
    assert any("'daisy'" in w and "validation" in w for w in ds.warnings)
    assert "all images" in ds.split_source["test"]


def test_stratification_every_class_in_every_split(tmp_path):
    _make_classes(tmp_path, {f"c{i}": n for i, n in enumerate([4, 5, 7, 20, 50])})
    ds = load_dataset(tmp_path, seed=3)
    for split, per_class in ds.counts().items():
        assert all(n >= 1 for n in per_class.values()), (split, per_class)
    c = ds.counts()
    assert c["test"]["c4"] == 10 and c["validation"]["c4"] == 8


def _split_of_each_file(ds) -> dict[Path, str]:
    placed = {s.path: split for split, samples in ds.samples.items() for s in samples}
    assert len(placed) == sum(len(v) for v in ds.samples.values())  # each file in one split
    return placed


def test_exact_copies_are_carved_with_their_original(tmp_path):
    _make_classes(tmp_path, {"benign": 30, "malignant": 20})
    copies = {  # copy -> original: under another name in the same class, twice, and under the other class
        tmp_path / "benign" / "copy_a.png": tmp_path / "benign" / "benign_003.png",
        tmp_path / "benign" / "copy_b.png": tmp_path / "benign" / "benign_003.png",
        tmp_path / "benign" / "copy_c.png": tmp_path / "benign" / "benign_017.png",
        tmp_path / "malignant" / "copy_d.png": tmp_path / "benign" / "benign_020.png",
        tmp_path / "benign" / "copy_e.png": tmp_path / "malignant" / "malignant_004.png",
    }
    for copy, original in copies.items():
        shutil.copyfile(original, copy)
    together = 0
    for seed in range(12):
        ds = load_dataset(tmp_path, seed=seed)
        placed = _split_of_each_file(ds)
        assert len(placed) == 55
        for copy, original in copies.items():
            assert placed[copy] == placed[original], (seed, copy.name)
            together += placed[copy] != "train"
        # a copy under the other class goes where train keeps one of them, so no class loses training images to it
        assert all(n >= 10 for n in ds.counts()["train"].values())
        assert any("5 exact copies (identical bytes)" in w for w in ds.warnings), ds.warnings
    assert together > 0  # copies did land in validation or test together with their originals


def test_without_copies_the_carve_is_the_documented_file_rule(tmp_path):
    """No copies: each class's sorted paths shuffled by random.Random(f"{seed}:{class}"), test the first
    round(n * test_fraction), validation the first round(n_left * val_fraction) of the rest (module docstring)."""
    _make_classes(tmp_path, {"a": 23, "b": 9})
    for seed in (0, 7):
        ds = load_dataset(tmp_path, seed=seed, val_fraction=0.25, test_fraction=0.2)
        for label, name in enumerate(ds.class_names):
            rng = random.Random(f"{seed}:{name}")
            pool = sorted((tmp_path / name).iterdir(), key=lambda p: p.as_posix())
            expected = {}
            for split, fraction in (("test", 0.2), ("validation", 0.25)):
                shuffled = list(pool)
                rng.shuffle(shuffled)
                k = int(round(len(pool) * fraction))
                expected[split], pool = set(shuffled[:k]), sorted(shuffled[k:], key=lambda p: p.as_posix())
            expected["train"] = set(pool)
            for split in ("train", "validation", "test"):
                assert {s.path for s in ds.samples[split] if s.label == label} == expected[split], (seed, name, split)


def test_a_class_of_one_picture_copied_carves_nothing_and_says_so(tmp_path):
    _make_classes(tmp_path, {"a": 10})
    (tmp_path / "b").mkdir()
    for i in range(6):
        _img(tmp_path / "b" / f"b_{i}.png", (7, 7, 7))  # six identical files
    ds = load_dataset(tmp_path, seed=0)
    c = ds.counts()
    assert (c["train"]["b"], c["validation"]["b"], c["test"]["b"]) == (6, 0, 0)
    assert any("class 'b'" in w and "none carved into test" in w for w in ds.warnings)


def test_tiny_classes_keep_one_in_train_and_warn(tmp_path):
    _make_classes(tmp_path, {"one": 1, "two": 2, "many": 10})
    ds = load_dataset(tmp_path)
    c = ds.counts()
    assert c["train"]["one"] == 1 and c["test"]["one"] == 0
    assert c["train"]["two"] + c["test"]["two"] + c["validation"]["two"] == 2
    assert c["train"]["two"] >= 1
    assert any("'one'" in w and "test" in w for w in ds.warnings)


def test_small_fraction_still_carves_one_when_n_at_least_3(tmp_path):
    _make_classes(tmp_path, {"a": 3, "b": 4, "c": 20})
    ds = load_dataset(tmp_path, test_fraction=0.1, val_fraction=0.1)
    c = ds.counts()
    # round(3*.1)=0 and round(4*.1)=0, but n>=3 forces one into test.
    assert c["test"] == {"a": 1, "b": 1, "c": 2}
    # validation from what is left: a has 2 left (<3, round 0) -> 0; b has 3 left -> forced 1.
    assert c["validation"] == {"a": 0, "b": 1, "c": 2}
    assert c["train"] == {"a": 2, "b": 2, "c": 16}


def test_carving_is_deterministic_and_seeded(tmp_path):
    _make_classes(tmp_path, {"a": 30, "b": 25})
    def split_of(ds):
        return {split: [s.path for s in ds.samples[split]] for split in SPLIT_NAMES}
    first = split_of(load_dataset(tmp_path, seed=7))
    again = split_of(load_dataset(tmp_path, seed=7))
    other = split_of(load_dataset(tmp_path, seed=8))
    assert first == again
    assert first["test"] != other["test"]
    # Same relative split when the dataset is copied elsewhere.
    copy = tmp_path.parent / (tmp_path.name + "_copy")
    shutil.copytree(tmp_path, copy)
    moved = split_of(load_dataset(copy, seed=7))
    assert {k: [p.name for p in v] for k, v in moved.items()} == {
        k: [p.name for p in v] for k, v in first.items()
    }


def test_fraction_validation(tmp_path):
    _make_classes(tmp_path, {"a": 3, "b": 3})
    for bad in (1.0, -0.1, 1.5, "x"):
        with pytest.raises(DatasetError):
            load_dataset(tmp_path, val_fraction=bad)
        with pytest.raises(DatasetError):
            load_dataset(tmp_path, test_fraction=bad)


def test_zero_fraction_leaves_split_empty(tmp_path):
    _make_classes(tmp_path, {"a": 5, "b": 5})
    ds = load_dataset(tmp_path, test_fraction=0.0)
    assert ds.counts()["test"] == {"a": 0, "b": 0}
    assert ds.counts()["validation"] == {"a": 1, "b": 1}
    assert ds.split_source["test"].startswith("none")


def test_class_only_in_test_is_error_naming_folder(tmp_path):
    _make_classes(tmp_path / "train", {"a": 3, "b": 3})
    _make_classes(tmp_path / "test", {"a": 1, "b": 1, "zebra": 1})
    with pytest.raises(DatasetError) as ei:
        load_dataset(tmp_path)
    assert str(tmp_path / "test" / "zebra") in str(ei.value)
    assert "\n" not in str(ei.value)


def test_class_missing_in_test_warns(tmp_path):
    _make_classes(tmp_path / "train", {"a": 3, "b": 3})
    _make_classes(tmp_path / "test", {"a": 2})
    ds = load_dataset(tmp_path)
    assert ds.counts()["test"] == {"a": 2, "b": 0}
    assert any("'b'" in w and "test" in w for w in ds.warnings)


def test_stray_files_ignored_and_reported(tmp_path):
    _make_classes(tmp_path / "train", {"a": 3, "b": 3})
    _make_classes(tmp_path / "val", {"a": 1, "b": 1})
    (tmp_path / "README.txt").write_text("hi")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "train" / "README.txt").write_text("hi")
    (tmp_path / "train" / "Thumbs.db").write_bytes(b"\0")
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "train" / "a" / "labels.csv").write_text("x")
    (tmp_path / "train" / ".hidden_cls").mkdir()
    _img(tmp_path / "train" / ".hidden_cls" / "x.png")
    _make_classes(tmp_path / "extras", {"a": 1})
    _img(tmp_path / "train" / "b" / "sub" / "deep.jpg")  # nested images count
    ds = load_dataset(tmp_path)
    assert ds.class_names == ["a", "b"]
    # train has a:3, b:4 (incl. the nested image); test is carved (>=1 per class when n>=3).
    assert ds.counts() == {
        "train": {"a": 2, "b": 3},
        "validation": {"a": 1, "b": 1},
        "test": {"a": 1, "b": 1},
    }
    all_paths = {s.path for s in ds.all_samples()}
    assert tmp_path / "train" / "b" / "sub" / "deep.jpg" in all_paths
    expected_ignored = {
        tmp_path / "README.txt",
        tmp_path / ".DS_Store",
        tmp_path / "extras",
        tmp_path / "train" / "README.txt",
        tmp_path / "train" / "Thumbs.db",
        tmp_path / "train" / ".hidden_cls",
        tmp_path / "train" / "a" / ".DS_Store",
        tmp_path / "train" / "a" / "labels.csv",
    }
    assert set(ds.ignored) == expected_ignored
    assert any("extras" in w and "unknown top-level folder" in w for w in ds.warnings)


def test_empty_train_class_is_error(tmp_path):
    _make_classes(tmp_path / "train", {"a": 3, "b": 0})
    (tmp_path / "train" / "b" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError) as ei:
        load_dataset(tmp_path)
    assert str(tmp_path / "train" / "b") in str(ei.value)


@pytest.mark.parametrize("case", ["missing", "file", "empty", "one-class", "loose-images"])
def test_root_errors(tmp_path, case):
    root = tmp_path / "ds"
    if case == "file":
        root.write_text("x")
    elif case == "empty":
        root.mkdir()
    elif case == "one-class":
        _make_classes(root, {"only": 3})
    elif case == "loose-images":
        _img(root / "a.png")
        _img(root / "b.png")
    with pytest.raises(DatasetError) as ei:
        load_dataset(root)
    assert str(root) in str(ei.value)


def test_split_csv_round_trip(tmp_path):
    data = tmp_path / "data"
    _make_classes(data, {"a": 6, "b": 5})
    ds = load_dataset(data, seed=1)
    out = tmp_path / "run" / "split.csv"
    write_split_csv(ds, out)
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["split", "class", "path"]
    assert len(rows) == 12
    assert all(Path(r[2]).is_absolute() for r in rows[1:])
    back = read_split_csv(out)
    assert set(back) == set(SPLIT_NAMES)
    for split in SPLIT_NAMES:
        assert back[split] == [(s.path.absolute(), ds.class_names[s.label]) for s in ds.samples[split]]
    assert not [p for p in out.parent.iterdir() if p.name != "split.csv"]  # no temp file left


def test_split_csv_refuses_dataset_folder(tmp_path):
    _make_classes(tmp_path, {"a": 3, "b": 3})
    ds = load_dataset(tmp_path)
    with pytest.raises(DatasetError):
        write_split_csv(ds, tmp_path / "split.csv")
    assert not (tmp_path / "split.csv").exists()


def test_read_split_csv_relative_and_errors(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("split,class,path\nval,a,x/1.png\ntrain,b,/abs/2.png\n")
    got = read_split_csv(p, root=tmp_path / "r")
    assert got["validation"] == [(tmp_path / "r" / "x" / "1.png", "a")]
    assert got["train"] == [(Path("/abs/2.png"), "b")]
    assert got["test"] == []
    p.write_text("split,class,path\nholdout,a,x.png\n")
    with pytest.raises(DatasetError, match="holdout"):
        read_split_csv(p)
    p.write_text("split,path\ntrain,x.png\n")
    with pytest.raises(DatasetError, match="class"):
        read_split_csv(p)


def test_collect_image_paths(tmp_path):
    folder = tmp_path / "imgs"
    _img(folder / "b.png")
    _img(folder / "a.jpg")
    _img(folder / "sub" / "c.webp")
    _img(folder / ".hidden" / "h.png")
    (folder / "notes.txt").write_text("x")
    single = _img(tmp_path / "single.JPG")
    (tmp_path / "empty").mkdir()
    paths, problems = collect_image_paths(
        [single, folder, tmp_path / "missing.png", folder / "a.jpg", tmp_path / "empty"]
    )
    assert paths == [single, folder / "a.jpg", folder / "b.png", folder / "sub" / "c.webp"]
    assert len(problems) == 2
    assert any("missing.png" in p and "no such" in p for p in problems)
    assert any("empty" in p for p in problems)

    flat, _ = collect_image_paths([folder], recursive=False)
    assert flat == [folder / "a.jpg", folder / "b.png"]

    txt = tmp_path / "readme.txt"
    txt.write_text("x")
    paths, problems = collect_image_paths([str(txt)])
    assert paths == [] and len(problems) == 1 and "readme.txt" in problems[0]


def test_dataset_dataclass_defaults():
    ds = Dataset(root=Path("."), layout="flat", class_names=["a"], samples={})
    assert ds.counts() == {"train": {"a": 0}, "validation": {"a": 0}, "test": {"a": 0}}
    assert ds.all_samples() == []
    with pytest.raises(Exception):
        Sample(Path("x"), 0, "train").label = 1  # frozen
