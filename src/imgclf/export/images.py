"""Real images an export is checked on: parity (test, then validation, then train images of
the run's split.csv, every class represented), int8 calibration and test accuracy."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from imgclf.export.metadata import ExportError

log = logging.getLogger("imgclf")

PARITY_IMAGES = 16


def decode_to_array(path: str | os.PathLike, prep) -> np.ndarray:
    """File → uint8 (3, S, S), exactly as the feature path decodes for predict."""
    from imgclf.data.preprocess import decode_array

    arr, err = decode_array(str(path), prep)
    if err:
        from imgclf.data.imaging import ImageDecodeError

        raise ImageDecodeError(str(path), err.split(": ", 1)[-1], "unreadable")
    return arr


def split_images(model_dir: Path, split: str) -> list[tuple[Path, str]]:
    """(path, class) of the run's split.csv rows of ``split`` whose files still exist."""
    from imgclf.data.datasets import DatasetError, read_split_csv

    csv_path = model_dir / "split.csv"
    if not csv_path.is_file():
        return []
    try:
        rows = read_split_csv(csv_path)
    except DatasetError as e:
        log.warning("%s", e)
        return []
    return [(p, c) for p, c in rows.get(split, []) if p.is_file()]


def spread(items: list[tuple[Path, str]], n: int, seed: int = 0) -> list[tuple[Path, str]]:
    """Up to ``n`` items, round-robin over classes (seeded order within a class)."""
    by_class: dict[str, list] = {}
    for it in items:
        by_class.setdefault(it[1], []).append(it)
    rng = random.Random(seed)
    for v in by_class.values():
        rng.shuffle(v)
    out: list = []
    while len(out) < n and any(by_class.values()):
        for c in sorted(by_class):
            if by_class[c] and len(out) < n:
                out.append(by_class[c].pop())
    return out


def load_arrays(items: Sequence[tuple[Path, str]], prep, threads: int = 2) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    """uint8 (N,3,S,S) of the decodable ``items``, and those items."""
    from imgclf.data.preprocess import decode_array

    with ThreadPoolExecutor(max_workers=threads) as pool:
        res = list(pool.map(lambda it: decode_array(str(it[0]), prep), items))
    kept = [(it, arr) for it, (arr, err) in zip(items, res) if arr is not None]
    if not kept:
        return np.zeros((0, 3, prep.input_size, prep.input_size), np.uint8), []
    return np.stack([a for _, a in kept]), [it for it, _ in kept]


def images_from(paths_or_dir: Sequence[str | os.PathLike] | str | os.PathLike) -> list[tuple[Path, str]]:
    """(path, parent folder name) of the images in a folder or list of files."""
    from imgclf.data.datasets import collect_image_paths

    inputs = [paths_or_dir] if isinstance(paths_or_dir, (str, os.PathLike)) else list(paths_or_dir)
    paths, problems = collect_image_paths(inputs)
    for p in problems:
        log.warning("%s", p)
    return [(p, p.parent.name) for p in paths]


def find_parity_images(model_dir: Path, images=None, n: int = PARITY_IMAGES) -> tuple[list[tuple[Path, str]], str]:
    """Real images for the parity check and where they came from."""
    if images is not None:
        found = images_from(images)
        if not found:
            raise ExportError(f"no images found in {images if isinstance(images, (str, os.PathLike)) else ', '.join(map(str, images))}")
        return spread(found, n), "given images"
    for split in ("test", "validation", "train"):
        found = split_images(model_dir, split)
        if found:
            return spread(found, n), f"{split} split (split.csv)"
    raise ExportError(
        f"{model_dir}: no real images to check parity on (split.csv is missing or its images are gone); "
        "pass --images DIR with a few images of the task"
    )
