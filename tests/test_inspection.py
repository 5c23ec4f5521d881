"""Tests for imgclf.inspection: counts, problems, duplicates/leakage, read-only behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.data import DatasetError
from imgclf.inspection import format_report, inspect_dataset


def _noise(seed: int, size=(16, 12)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _snapshot(root: Path):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


@pytest.fixture
def dataset(tmp_path):
    """A splits dataset with known problems, duplicates and leakage."""
    root = tmp_path / "ds"
    seed = iter(range(1000))
    for cls in ("cat", "dog"):
        for i in range(4):
            _save(_noise(next(seed)), root / "train" / cls / f"{cls}{i}.png")
        _save(_noise(next(seed)), root / "validation" / cls / f"{cls}_v.png")
        _save(_noise(next(seed)), root / "test" / cls / f"{cls}_t.png")
    # Within-split duplicate: byte-identical copy inside train.
    src = root / "train" / "cat" / "cat0.png"
    (root / "train" / "cat" / "cat0_copy.png").write_bytes(src.read_bytes())
    # Leakage 1: byte copy of a train image in test.
    (root / "test" / "dog" / "leak_bytes.png").write_bytes((root / "train" / "dog" / "dog1.png").read_bytes())
    # Leakage 2: a train JPEG re-saved losslessly as PNG in validation (same pixels, other bytes).
    jpg = _save(_noise(500, (24, 16)), root / "train" / "dog" / "photo.jpg", quality=90)
    with Image.open(jpg) as im:
        _save(im.convert("RGB"), root / "validation" / "dog" / "photo_resaved.png")
    # Problems of each kind (in test/cat).
    (root / "test" / "cat" / "zero.jpg").write_bytes(b"")
    (root / "test" / "cat" / "text.jpg").write_text("not an image")
    full = _save(_noise(900, (64, 64)), root / "test" / "cat" / "full.jpg")
    data = full.read_bytes()
    full.unlink()
    (root / "test" / "cat" / "cut.jpg").write_bytes(data[: len(data) // 2])
    # Other modes/formats for stats.
    _save(Image.new("L", (30, 40), 3), root / "train" / "cat" / "gray.png")
    # Stray files.
    (root / "README.txt").write_text("about")
    (root / "train" / ".DS_Store").write_bytes(b"\0")
    return root


def test_counts_and_totals(dataset):
    r = inspect_dataset(dataset)
    assert r["layout"] == "splits"
    assert r["class_names"] == ["cat", "dog"]
    assert r["counts"] == {
        "train": {"cat": 6, "dog": 5},
        "validation": {"cat": 1, "dog": 2},
        "test": {"cat": 4, "dog": 2},
    }
    assert r["totals"]["per_split"] == {"train": 11, "validation": 3, "test": 6}
    assert r["totals"]["per_class"] == {"cat": 11, "dog": 9}
    assert r["totals"]["total"] == 20
    assert r["root"] == str(dataset.absolute())


def test_problems_by_kind(dataset):
    r = inspect_dataset(dataset)
    kinds = {Path(p["path"]).name: p["kind"] for p in r["problems"]}
    assert kinds == {"zero.jpg": "zero-byte", "text.jpg": "not-an-image", "cut.jpg": "truncated"}
    for p in r["problems"]:
        assert "\n" not in p["message"] and p["message"].startswith(p["path"])


def test_too_large_problem(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    _save(_noise(1, (100, 100)), root / "a" / "big.png")
    _save(_noise(2, (10, 10)), root / "a" / "small.png")
    _save(_noise(3, (10, 10)), root / "b" / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    r = inspect_dataset(root)
    assert [(Path(p["path"]).name, p["kind"]) for p in r["problems"]] == [("big.png", "too-large")]
    assert r["image_stats"]["decoded"] == 2


def test_image_stats(dataset):
    st = inspect_dataset(dataset)["image_stats"]
    assert st["decoded"] == 17
    assert st["width"] == {"min": 16, "median": 16, "max": 30}
    assert st["height"] == {"min": 12, "median": 12, "max": 40}
    assert st["formats"] == {"JPEG": 1, "PNG": 16}
    assert st["modes"] == {"L": 1, "RGB": 16}


def test_duplicates_and_leakage(dataset):
    r = inspect_dataset(dataset)
    within = r["duplicates"]["within_split"]
    assert len(within) == 1
    assert within[0]["split"] == "train"
    assert [Path(p).name for p in within[0]["paths"]] == ["cat0.png", "cat0_copy.png"]

    cross = r["duplicates"]["cross_split"]
    groups = {tuple(sorted(Path(p).name for p in g["paths"])): g["splits"] for g in cross}
    assert groups == {
        ("dog1.png", "leak_bytes.png"): ["train", "test"],
        ("photo.jpg", "photo_resaved.png"): ["train", "validation"],
    }
    leak_lines = [w for w in r["warnings"] if w.startswith("LEAKAGE:")]
    assert any("1 images in test also appear in train" in w and "leak_bytes.png" in w for w in leak_lines)
    assert any("1 images in validation also appear in train" in w for w in leak_lines)
    assert len(leak_lines) == 2


def test_unrelated_images_not_flagged(tmp_path):
    root = tmp_path / "ds"
    for i in range(3):
        _save(_noise(i), root / "train" / "a" / f"{i}.png")
        _save(_noise(10 + i), root / "train" / "b" / f"{i}.png")
        _save(_noise(20 + i), root / "test" / "a" / f"{i}.png")
        _save(_noise(30 + i), root / "test" / "b" / f"{i}.png")
    # Same pixels but a different size is NOT a duplicate.
    _save(Image.new("RGB", (2, 8), 5), root / "train" / "a" / "tall.png")
    _save(Image.new("RGB", (8, 2), 5), root / "test" / "a" / "wide.png")
    r = inspect_dataset(root)
    assert r["duplicates"] == {"within_split": [], "cross_split": []}
    assert not [w for w in r["warnings"] if "LEAKAGE" in w]
    assert r["problems"] == []


def test_report_is_json_and_text(dataset):
    r = inspect_dataset(dataset, progress=False)
    again = json.loads(json.dumps(r))
    assert again == r
    assert str(dataset / "README.txt") in r["ignored"]
    assert str(dataset / "train" / ".DS_Store") in r["ignored"]
    text = format_report(r)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("class"))
    assert header.split() == ["class", "train", "validation", "test", "total"]
    assert next(line for line in lines if line.startswith("cat")).split() == ["cat", "6", "1", "4", "11"]
    assert next(line for line in lines if line.startswith("Total")).split() == ["Total", "11", "3", "6", "20"]
    assert "LEAKAGE" in text and "leak_bytes.png" in text
    assert "[truncated]" in text and "[zero-byte]" in text and "[not-an-image]" in text
    assert "README.txt" in text


def test_dataset_unchanged_after_inspect(dataset):
    before = _snapshot(dataset)
    r = inspect_dataset(dataset, progress=True, workers=3)
    format_report(r)
    assert _snapshot(dataset) == before


def test_flat_layout_inspect(tmp_path):
    root = tmp_path / "flat"
    _save(_noise(1), root / "x" / "1.png")
    _save(_noise(2), root / "y" / "1.png")
    _save(_noise(1), root / "y" / "same_as_x.png")  # same picture, two labels
    r = inspect_dataset(root)
    assert r["layout"] == "flat"
    assert r["counts"] == {"train": {"x": 1, "y": 2}}
    assert len(r["duplicates"]["within_split"]) == 1
    assert r["duplicates"]["within_split"][0]["classes"] == ["x", "y"]
    assert any("different class labels" in w for w in r["warnings"])
    assert "flat" in format_report(r)


def test_relative_root_gives_absolute_paths(dataset, monkeypatch):
    monkeypatch.chdir(dataset.parent)
    r = inspect_dataset("ds")
    assert r["root"] == str(dataset)
    assert all(Path(p["path"]).is_absolute() for p in r["problems"])
    assert "  test/cat/cut.jpg" in format_report(r).replace("[truncated] ", "")


def test_structural_error_raises(tmp_path):
    with pytest.raises(DatasetError):
        inspect_dataset(tmp_path / "missing")
