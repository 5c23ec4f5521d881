"""``imgclf inspect``: look at a dataset before training on it, without changing it.

Counts images per split and class exactly as found on disk (no carving),
decodes every image with the same ``load_rgb`` used for training (so a file
reported fine here will load fine later), collects decode problems by kind,
summarises sizes/formats/modes, and finds exact duplicates.

Duplicates are identical *decoded RGB pixels* (SHA-256 of size + RGB bytes),
not identical files: a byte copy and a lossless re-save (e.g. JPEG pixels
written out as PNG) are the same picture to the model. The same image in two
splits is leakage, which inflates validation/test scores, so it gets a loud
``LEAKAGE:`` warning.

Reads only: files are opened read-only and nothing is written anywhere.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from .data import SPLIT_NAMES, scan_layout
from .imaging import ImageDecodeError, decode_image

__all__ = ["inspect_dataset", "format_report"]

_LIST_LIMIT = 5  # paths quoted inline in a warning line


def _decode_one(path: Path) -> dict:
    """Decode one file; returns stats + pixel hash, or the problem."""
    try:
        decoded = decode_image(path)
    except ImageDecodeError as exc:
        return {"ok": False, "kind": exc.kind, "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the report
        return {"ok": False, "kind": "unreadable", "message": f"{path}: {type(exc).__name__}: {exc}"}
    rgb = decoded.image
    w, h = rgb.size
    digest = hashlib.sha256(f"{w}x{h}:".encode())
    digest.update(rgb.tobytes())
    return {
        "ok": True,
        "width": w,
        "height": h,
        "format": decoded.format or "unknown",
        "mode": decoded.mode,
        "hash": digest.hexdigest(),
    }


def _min_med_max(values: list[int]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _short_list(paths: list[str]) -> str:
    head = ", ".join(paths[:_LIST_LIMIT])
    more = len(paths) - _LIST_LIMIT
    return head + (f" (and {more} more)" if more > 0 else "")


def inspect_dataset(
    root: str | os.PathLike, *, progress: bool = False, workers: int | None = None
) -> dict:
    """Return a JSON-serialisable report on the dataset at ``root`` (keys in module docstring).

    ``workers``: decoding threads (default: min(32, CPUs + 4)); Pillow releases
    the GIL while decoding so threads scale. ``progress`` shows tqdm on stderr.
    Raises ``DatasetError`` if the folder structure itself is unusable.
    """
    root_path = Path(os.path.abspath(root))  # absolute paths throughout the report
    layout, found, ignored, warnings = scan_layout(root_path)
    warnings = list(warnings)

    def rel(p: str) -> str:
        try:
            return Path(p).relative_to(root_path).as_posix()
        except ValueError:
            return p

    class_names = sorted(found["train"])
    splits = [s for s in SPLIT_NAMES if s in found]

    counts = {
        split: {name: len(found[split].get(name, [])) for name in class_names} for split in splits
    }
    per_split = {split: sum(counts[split].values()) for split in splits}
    per_class = {name: sum(counts[split][name] for split in splits) for name in class_names}
    totals = {"per_split": per_split, "per_class": per_class, "total": sum(per_split.values())}

    items: list[tuple[str, str, Path]] = [
        (split, name, p) for split in splits for name in class_names for p in found[split].get(name, [])
    ]
    results: dict[int, dict] = {}
    if items:
        from tqdm import tqdm

        max_workers = workers or min(32, (os.cpu_count() or 1) + 4)
        with ThreadPoolExecutor(max_workers=max_workers) as pool, tqdm(
            total=len(items), desc="inspect", unit="img", file=sys.stderr, disable=not progress
        ) as bar:
            futures = {pool.submit(_decode_one, p): i for i, (_, _, p) in enumerate(items)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update(1)

    widths: list[int] = []
    heights: list[int] = []
    formats: Counter = Counter()
    modes: Counter = Counter()
    problems: list[dict] = []
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, (split, name, path) in enumerate(items):
        r = results[i]
        if not r["ok"]:
            problems.append({"path": str(path), "kind": r["kind"], "message": r["message"]})
            continue
        widths.append(r["width"])
        heights.append(r["height"])
        formats[r["format"]] += 1
        modes[r["mode"]] += 1
        by_hash[r["hash"]].append(i)
    problems.sort(key=lambda d: d["path"])

    within: list[dict] = []
    cross: list[dict] = []
    for idxs in by_hash.values():
        if len(idxs) < 2:
            continue
        group_splits = sorted({items[i][0] for i in idxs}, key=SPLIT_NAMES.index)
        for split in group_splits:
            in_split = [i for i in idxs if items[i][0] == split]
            if len(in_split) >= 2:
                within.append({
                    "split": split,
                    "paths": sorted(str(items[i][2]) for i in in_split),
                    "classes": sorted({items[i][1] for i in in_split}),
                })
        if len(group_splits) > 1:
            cross.append({
                "paths": sorted(str(items[i][2]) for i in idxs),
                "splits": group_splits,
                "classes": sorted({items[i][1] for i in idxs}),
            })
    within.sort(key=lambda g: (SPLIT_NAMES.index(g["split"]), g["paths"]))
    cross.sort(key=lambda g: g["paths"])

    # Leakage: for each later split, how many of its images also appear in an earlier split.
    for later, earlier in (("validation", "train"), ("test", "train"), ("test", "validation")):
        leaked = sorted(
            str(items[i][2])
            for idxs in by_hash.values()
            if any(items[j][0] == earlier for j in idxs)
            for i in idxs
            if items[i][0] == later
        )
        if leaked:
            warnings.append(
                f"LEAKAGE: {len(leaked)} images in {later} also appear in {earlier}: "
                f"{_short_list([rel(p) for p in leaked])}"
            )
    if within:
        n_extra = sum(len(g["paths"]) - 1 for g in within)
        warnings.append(
            f"{len(within)} group(s) of identical images within a split ({n_extra} redundant copies)"
        )
    conflicting = [g for g in within + cross if len(g["classes"]) > 1]
    if conflicting:
        warnings.append(
            f"{len(conflicting)} duplicate group(s) carry different class labels: "
            f"{_short_list([' = '.join(rel(p) for p in g['paths']) for g in conflicting])}"
        )
    if problems:
        kinds = Counter(p["kind"] for p in problems)
        warnings.append(
            f"{len(problems)} image(s) cannot be decoded ("
            + ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items()))
            + ") and would be skipped or fail training"
        )

    return {
        "root": str(root_path),
        "layout": layout,
        "class_names": class_names,
        "counts": counts,
        "totals": totals,
        "image_stats": {
            "decoded": len(widths),
            "width": _min_med_max(widths),
            "height": _min_med_max(heights),
            "formats": dict(sorted(formats.items())),
            "modes": dict(sorted(modes.items())),
        },
        "problems": problems,
        "duplicates": {"within_split": within, "cross_split": cross},
        "ignored": [str(p) for p in ignored],
        "warnings": warnings,
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]

    def fmt(r: list[str]) -> str:
        first = r[0].ljust(widths[0])
        rest = [cell.rjust(w) for cell, w in zip(r[1:], widths[1:])]
        return "  ".join([first] + rest).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return [fmt(header), sep] + [fmt(r) for r in rows[:-1]] + [sep, fmt(rows[-1])]


def format_report(report: dict) -> str:
    """Human-readable text for a report from ``inspect_dataset``."""
    root = report["root"].rstrip("/\\") + os.sep

    def rel(p: str) -> str:  # shorter lines; the JSON report keeps absolute paths
        return p[len(root):] if p.startswith(root) else p

    lines: list[str] = []
    lines.append(f"Dataset: {report['root']}")
    layout_note = " (flat: validation/test will be carved from these)" if report["layout"] == "flat" else ""
    lines.append(f"Layout:  {report['layout']}{layout_note}")
    lines.append(f"Classes: {len(report['class_names'])}")
    lines.append("")

    splits = list(report["counts"])
    header = ["class"] + splits + ["total"]
    rows = [
        [name] + [str(report["counts"][s][name]) for s in splits] + [str(report["totals"]["per_class"][name])]
        for name in report["class_names"]
    ]
    rows.append(
        ["Total"] + [str(report["totals"]["per_split"][s]) for s in splits] + [str(report["totals"]["total"])]
    )
    lines += _table(header, rows)
    lines.append("")

    st = report["image_stats"]
    lines.append(f"Images decoded: {st['decoded']}")
    if st["decoded"]:
        for dim in ("width", "height"):
            d = st[dim]
            lines.append(f"  {dim:<6} min {d['min']}  median {d['median']:g}  max {d['max']}")
        lines.append("  formats: " + ", ".join(f"{k} {v}" for k, v in st["formats"].items()))
        lines.append("  modes:   " + ", ".join(f"{k} {v}" for k, v in st["modes"].items()))
    lines.append("")

    problems = report["problems"]
    lines.append(f"Problems: {len(problems)}")
    for p in problems:
        msg = p["message"]
        if msg.startswith(p["path"]):
            msg = rel(p["path"]) + msg[len(p["path"]):]
        lines.append(f"  [{p['kind']}] {msg}")

    dup = report["duplicates"]
    lines.append("")
    lines.append(
        f"Duplicates: {len(dup['within_split'])} group(s) within a split, "
        f"{len(dup['cross_split'])} group(s) across splits"
    )
    for g in dup["within_split"]:
        lines.append(f"  within {g['split']}:")
        lines += [f"    {rel(p)}" for p in g["paths"]]
    for g in dup["cross_split"]:
        lines.append(f"  LEAKAGE across {' / '.join(g['splits'])}:")
        lines += [f"    {rel(p)}" for p in g["paths"]]

    if report["ignored"]:
        lines.append("")
        lines.append(f"Ignored (not used): {len(report['ignored'])}")
        lines += [f"  {rel(p)}" for p in report["ignored"]]
    if report["warnings"]:
        lines.append("")
        lines.append("Warnings:")
        lines += [f"  ! {w}" for w in report["warnings"]]
    return "\n".join(lines)
