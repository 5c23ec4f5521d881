"""Images the user rejected (e.g. after ``imgclf audit``), left out of the next training run.

The list is a text file with one path per line (blank lines and ``#`` comments ignored) or a
CSV file with a ``path`` column, such as a filtered ``audit.csv``. Relative paths are taken
relative to the dataset root. Nothing on disk is moved: the samples are only dropped from the
loaded :class:`~imgclf.data.datasets.Dataset`, so every other image keeps its split.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from pathlib import Path

from imgclf.data.datasets import Dataset


def read_path_list(path: str | os.PathLike) -> list[str]:
    """The paths listed in ``path`` (text: one per line; CSV: its ``path`` column)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise ValueError(f"exclude list {path}: cannot read ({e.strerror or e})") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    header = [h.strip() for h in next(csv.reader(lines[:1]), [])]
    if "path" in header:  # a CSV file with a header row naming the path column
        reader = csv.DictReader(io.StringIO("\n".join(lines[1:])), fieldnames=header)
        return [row["path"].strip() for row in reader if (row.get("path") or "").strip()]
    return [ln.strip() for ln in lines]


def apply_exclusions(ds: Dataset, exclude_file: str | os.PathLike) -> tuple[Dataset, list[tuple[str, str]], list[str]]:
    """``ds`` without the images listed in ``exclude_file``.

    Returns (dataset, [(path, reason)] for the dropped samples, listed paths that matched no
    image of the dataset). Paths are compared resolved, so a symlinked or relative spelling
    of the same file matches.
    """
    listed = read_path_list(exclude_file)
    root = Path(ds.root)
    wanted = {os.path.realpath(p if os.path.isabs(p) else root / p): p for p in listed}
    reason = f"excluded by {exclude_file}"
    dropped: list[tuple[str, str]] = []
    matched: set[str] = set()
    samples = {}
    for split, items in ds.samples.items():
        keep = []
        for s in items:
            real = os.path.realpath(s.path)
            if real in wanted:
                dropped.append((str(s.path), reason))
                matched.add(real)
            else:
                keep.append(s)
        samples[split] = keep
    unmatched = [p for real, p in wanted.items() if real not in matched]
    return dataclasses.replace(ds, samples=samples), dropped, unmatched
