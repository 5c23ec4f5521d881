"""Tests for imgclf.data.inspection: counts, problems, duplicates/leakage, read-only behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tree_snapshot

from imgclf.data.datasets import DatasetError
from imgclf.data.inspection import format_report, inspect_dataset


def _noise(seed: int, size=(16, 12)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


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
    before = tree_snapshot(dataset)
    r = inspect_dataset(dataset, progress=True, workers=3)
    format_report(r)
    assert tree_snapshot(dataset) == before


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


# --------------------------------------------------------------------------- near-duplicates


def _lesions(n: int, seed: int, size: int = 160) -> list[Image.Image]:
    """Demo-style lesion photos: all alike at low frequencies (one blob in the middle), the
    hard case for a perceptual hash."""
    from imgclf.data.demo import render_lesion

    return [render_lesion(np.random.default_rng([seed, i]), i % 2 == 1, size) for i in range(n)]


@pytest.fixture
def near_dataset(tmp_path):
    root = tmp_path / "near"
    train = _lesions(12, 1)
    for i, im in enumerate(train):
        _save(im, root / "train" / ("b" if i % 2 else "a") / f"t{i}.jpg", quality=92)
    for i, im in enumerate(_lesions(8, 2)):  # unrelated test/validation images
        _save(im, root / ("test" if i < 6 else "validation") / ("b" if i % 2 else "a") / f"u{i}.jpg", quality=92)
    src = [Image.open(root / "train" / ("b" if i % 2 else "a") / f"t{i}.jpg").convert("RGB") for i in range(4)]
    _save(src[0], root / "test" / "a" / "reencoded_q50.jpg", quality=50)
    _save(src[1].resize((80, 80), Image.Resampling.BILINEAR), root / "test" / "b" / "half.jpg", quality=85)
    _save(src[2].resize((272, 272), Image.Resampling.BICUBIC), root / "test" / "a" / "bigger.png")
    _save(src[3], root / "validation" / "b" / "reencoded_q70.jpg", quality=70)
    (root / "test" / "a" / "byte_copy.jpg").write_bytes((root / "train" / "a" / "t4.jpg").read_bytes())
    return root


def test_near_duplicates_found_across_splits(near_dataset):
    r = inspect_dataset(near_dataset)
    near = r["near_duplicates"]
    assert near["max_distance"] == 12 and near["min_correlation"] == 0.95
    pairs = {(Path(g["paths"][0]).name, Path(g["paths"][1]).name): g["splits"] for g in near["cross_split"]}
    assert pairs == {
        ("t0.jpg", "reencoded_q50.jpg"): ["train", "test"],
        ("t1.jpg", "half.jpg"): ["train", "test"],
        ("t2.jpg", "bigger.png"): ["train", "test"],
        ("t3.jpg", "reencoded_q70.jpg"): ["train", "validation"],
    }  # and no pair of unrelated lesions, and the byte copy only as an exact duplicate
    assert near["counts"] == {"validation~train": 1, "test~train": 3}
    assert all(0 <= g["distance"] <= 12 and g["correlation"] >= 0.95 for g in near["cross_split"])
    assert sorted(Path(p).name for g in r["duplicates"]["cross_split"] for p in g["paths"]) == ["byte_copy.jpg", "t4.jpg"]
    warn = [w for w in r["warnings"] if w.startswith("LEAKAGE (near-duplicates)")]
    assert len(warn) == 2 and any("3 images in test have near-copies in train" in w and "half.jpg" in w for w in warn)
    text = format_report(r)
    assert "Near-duplicates across splits: 4 pair(s)" in text and "test ~ train" in text
    assert json.loads(json.dumps(r)) == r


def test_near_duplicates_use_the_runs_split(near_dataset):
    """A carved split lives in one folder on disk: the run's split.csv decides what leaks."""
    train = sorted((near_dataset / "train").rglob("*.jpg"))
    copy = near_dataset / "test" / "a" / "reencoded_q50.jpg"
    split_of = {str(p): "train" for p in train}
    split_of[str(copy)] = "validation"  # as if the run had carved it into validation
    r = inspect_dataset(near_dataset, split_of=split_of)
    pairs = [(g["splits"], Path(g["paths"][1]).name) for g in r["near_duplicates"]["cross_split"]]
    assert pairs == [(["train", "validation"], "reencoded_q50.jpg")]  # images the run did not use are left out
    assert r["counts"]["test"]["a"] == 6  # counts stay those of the folders


def test_near_duplicate_check_can_be_switched_off(near_dataset):
    r = inspect_dataset(near_dataset, near_duplicates=False)
    assert r["near_duplicates"] is None
    assert not [w for w in r["warnings"] if "near-duplicates" in w]
    assert "Near-duplicates" not in format_report(r)
