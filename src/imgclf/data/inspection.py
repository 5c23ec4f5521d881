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

Near-duplicates across splits: a re-encoded (other JPEG quality) or resized copy has
other pixels, so the exact check misses it, yet it leaks just the same. Each decoded
image gets a 32×32 grayscale thumbnail (box filter) and its 64-bit perceptual hash
(``imagehash.phash`` of that thumbnail: signs of the 8×8 lowest DCT frequencies). Two
images in different splits are near-duplicates when

* their hashes differ in at most ``NEAR_DUP_MAX_DISTANCE`` = 12 of 64 bits, **and**
* their thumbnails (mean removed) have a Pearson correlation >= ``NEAR_DUP_MIN_CORRELATION``
  = 0.95.

The hash alone is not enough on homogeneous images (dermoscopy, X-rays, the demo's
lesions: one dark blob in the middle): there, unrelated images can be closer in hash
distance than re-encoded or resized copies, so a pair must also pass the thumbnail
correlation, which separates the two (the measurements behind both thresholds are in
benchmarks/README.md). Nearly flat images (thumbnail std < 2 grey levels) carry no
structure to compare and are left to the exact check. Not caught: crops, flips and rotations (the
hash is not invariant to them). Pairs that are exact duplicates are reported only as those. Results: ``near_duplicates`` {method, max_distance, min_correlation,
pairs (how many), cross_split: [{paths: [earlier, later], splits, classes, distance,
correlation}] (the first 10,000), counts:
{"<later>~<earlier>": images of <later> with a near-copy in <earlier>}, test_with_copies: [every
test image with a near-copy in train or validation]} and a
``LEAKAGE (near-duplicates):`` warning per split pair.

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

import numpy as np
from PIL import Image

from imgclf.data.datasets import SPLIT_NAMES, DatasetError, scan_layout, scan_manifest
from imgclf.data.imaging import ImageDecodeError, decode_image

__all__ = ["inspect_dataset", "format_report", "perceptual_signature", "NEAR_DUP_MAX_DISTANCE", "NEAR_DUP_MIN_CORRELATION"]

_LIST_LIMIT = 5  # paths quoted inline in a warning line

NEAR_DUP_MAX_DISTANCE = 12  # of 64 phash bits
NEAR_DUP_MIN_CORRELATION = 0.95  # of the 32x32 grey thumbnails, mean removed
_THUMB = 32
_FLAT_STD = 2.0  # grey levels: below this a thumbnail is "flat" and not compared
_LEAK_PAIRS = (("validation", "train"), ("test", "train"), ("test", "validation"))
_PAIR_LIMIT = 10_000  # near-duplicate pairs listed (all are counted)


def perceptual_signature(rgb: Image.Image) -> tuple[int | None, np.ndarray | None]:
    """(64-bit phash as int, 32×32 uint8 grey thumbnail), or (None, None) for a flat image."""
    import imagehash

    grey = rgb.convert("L").resize((_THUMB, _THUMB), Image.Resampling.BOX)
    thumb = np.asarray(grey, dtype=np.uint8)
    if float(thumb.std()) < _FLAT_STD:
        return None, None
    return int(str(imagehash.phash(grey)), 16), thumb


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
    phash, thumb = perceptual_signature(rgb)
    return {
        "ok": True,
        "width": w,
        "height": h,
        "format": decoded.format or "unknown",
        "mode": decoded.mode,
        "hash": digest.hexdigest(),
        "phash": phash,
        "thumb": thumb,
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
    root: str | os.PathLike | None = None,
    *,
    manifest: str | os.PathLike | None = None,
    progress: bool = False,
    workers: int | None = None,
    split_of: dict[str, str] | None = None,
    near_duplicates: bool = True,
) -> dict:
    """Return a JSON-serialisable report on the dataset at ``root`` (keys in module docstring).

    ``workers``: decoding threads (default: min(32, CPUs + 4)); Pillow releases
    the GIL while decoding so threads scale. ``progress`` shows tqdm on stderr.
    ``split_of``: {image path: split} of a training run (its ``split.csv``): duplicates
    and leakage are then checked between the splits the run really used (carved ones
    included), and images the run did not use are left out of that check; counts stay
    those of the folders. ``near_duplicates``: also run the perceptual-hash check.
    ``manifest``: a ``path,label[,split]`` CSV instead of ``root`` (the report's root is
    then the CSV's folder; listed files that do not exist are warnings and ``problems``).
    Raises ``DatasetError`` if the folder structure (or the manifest) itself is unusable.
    """
    if (root is None) == (manifest is None):
        raise DatasetError("give exactly one of a dataset folder and a manifest CSV")
    missing_listed: list[tuple[Path, str]] = []
    if manifest is not None:
        manifest_root, layout, found, ignored, warnings, missing_listed = scan_manifest(Path(os.path.abspath(manifest)))
        root_path = manifest_root
    else:
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
    # the split each image counts in for duplicates/leakage: its folder, or the run's split
    if split_of is not None:
        run_split = {os.path.realpath(p): s for p, s in split_of.items()}
        dup_split = [run_split.get(os.path.realpath(p)) for _, _, p in items]
    else:
        dup_split = [split for split, _, _ in items]
    for i, (split, name, path) in enumerate(items):
        r = results[i]
        if not r["ok"]:
            problems.append({"path": str(path), "kind": r["kind"], "message": r["message"]})
            continue
        widths.append(r["width"])
        heights.append(r["height"])
        formats[r["format"]] += 1
        modes[r["mode"]] += 1
        if dup_split[i] is not None:
            by_hash[r["hash"]].append(i)
    problems += [{"path": str(path), "kind": "missing", "message": reason} for path, reason in missing_listed]
    problems.sort(key=lambda d: d["path"])

    within: list[dict] = []
    cross: list[dict] = []
    for idxs in by_hash.values():
        if len(idxs) < 2:
            continue
        group_splits = sorted({dup_split[i] for i in idxs}, key=SPLIT_NAMES.index)
        for split in group_splits:
            in_split = [i for i in idxs if dup_split[i] == split]
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
    for later, earlier in _LEAK_PAIRS:
        leaked = sorted(
            str(items[i][2])
            for idxs in by_hash.values()
            if any(dup_split[j] == earlier for j in idxs)
            for i in idxs
            if dup_split[i] == later
        )
        if leaked:
            warnings.append(
                f"LEAKAGE: {len(leaked)} images in {later} also appear in {earlier}: "
                f"{_short_list([rel(p) for p in leaked])}"
            )
    near = None
    if near_duplicates:
        sigs = [
            (i, dup_split[i], results[i]["phash"], results[i]["thumb"], results[i]["hash"])
            for i in range(len(items))
            if results[i]["ok"] and dup_split[i] is not None and results[i]["phash"] is not None
        ]
        near = _near_duplicates(sigs, items)
        later_paths = near.pop("_later_paths")
        # complete, unlike the pair list (capped): the test images with a near-copy in an earlier split
        near["test_with_copies"] = sorted({p for key, paths in later_paths.items() if key.startswith("test~") for p in paths})
        for key, paths in later_paths.items():
            later, earlier = key.split("~")
            warnings.append(
                f"LEAKAGE (near-duplicates): {len(paths)} images in {later} have near-copies in {earlier} "
                f"(perceptual hash, not identical pixels): {_short_list([rel(p) for p in paths])}"
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
        **({"manifest": str(Path(os.path.abspath(manifest)))} if manifest is not None else {}),
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
        "near_duplicates": near,
        "ignored": [str(p) for p in ignored],
        "warnings": warnings,
    }


def _popcount64(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x)
    table = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)
    return table[x[..., None].view(np.uint8)].sum(-1)


def _unit(thumb: np.ndarray) -> np.ndarray:
    v = thumb.astype(np.float64).ravel()
    v -= v.mean()
    return v / (np.linalg.norm(v) or 1.0)


def _near_duplicates(sigs: list[tuple], items: list[tuple]) -> dict:
    """Cross-split pairs within the hash distance whose thumbnails also correlate (module docstring).

    ``sigs``: (item index, split, phash, thumbnail, pixel sha) per comparable image.
    Hamming distances are computed in blocks (XOR + popcount), so memory stays bounded.
    """
    pairs: list[dict] = []
    n_pairs = 0
    later_paths: dict[str, list[str]] = {}
    units: dict[int, np.ndarray] = {}

    def unit(sig) -> np.ndarray:
        if sig[0] not in units:
            units[sig[0]] = _unit(sig[3])
        return units[sig[0]]

    by_split: dict[str, list[tuple]] = defaultdict(list)
    for sig in sigs:
        by_split[sig[1]].append(sig)
    for later, earlier in _LEAK_PAIRS:
        a, b = by_split.get(later, []), by_split.get(earlier, [])
        if not a or not b:
            continue
        ha = np.array([s[2] for s in a], dtype=np.uint64)
        hb = np.array([s[2] for s in b], dtype=np.uint64)
        block = max(1, 4_000_000 // len(b))
        hits: set[str] = set()
        for start in range(0, len(a), block):
            dist = _popcount64(ha[start:start + block, None] ^ hb[None, :])
            for ia, ib in zip(*np.nonzero(dist <= NEAR_DUP_MAX_DISTANCE)):
                sa, sb = a[start + ia], b[ib]
                if sa[4] == sb[4]:
                    continue  # identical pixels: already an exact duplicate
                corr = float(unit(sa) @ unit(sb))
                if corr < NEAR_DUP_MIN_CORRELATION:
                    continue
                pa, pb = str(items[sa[0]][2]), str(items[sb[0]][2])
                hits.add(pa)
                n_pairs += 1
                if n_pairs > _PAIR_LIMIT:
                    continue
                pairs.append({
                    "paths": [pb, pa],
                    "splits": [earlier, later],
                    "classes": sorted({items[sa[0]][1], items[sb[0]][1]}),
                    "distance": int(dist[ia, ib]),
                    "correlation": round(corr, 4),
                })
        if hits:
            later_paths[f"{later}~{earlier}"] = sorted(hits)
    pairs.sort(key=lambda g: (SPLIT_NAMES.index(g["splits"][1]), SPLIT_NAMES.index(g["splits"][0]), g["paths"][1], g["paths"][0]))
    return {
        "method": "imagehash.phash (64-bit) of a 32x32 box-filtered grey thumbnail, confirmed by thumbnail correlation",
        "max_distance": NEAR_DUP_MAX_DISTANCE,
        "min_correlation": NEAR_DUP_MIN_CORRELATION,
        "compared": len(sigs),
        "pairs": n_pairs,
        "cross_split": pairs,
        "counts": {k: len(v) for k, v in later_paths.items()},
        "_later_paths": later_paths,
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
    lines.append(f"Dataset: {report['manifest']} (paths relative to {report['root']})" if report.get("manifest") else f"Dataset: {report['root']}")
    layout_note = {"flat": " (flat: validation/test will be carved from these)",
                   "manifest": " (train counts include rows with no split; splits no row names will be carved from them)"}.get(report["layout"], "")
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

    near = report.get("near_duplicates")
    if near is not None:
        lines.append("")
        lines.append(
            f"Near-duplicates across splits: {near.get('pairs', len(near['cross_split']))} pair(s) "
            f"(perceptual hash within {near['max_distance']} of 64 bits and thumbnail correlation >= {near['min_correlation']})"
        )
        for g in near["cross_split"][:50]:
            lines.append(f"  {g['splits'][1]} ~ {g['splits'][0]} (distance {g['distance']}, r {g['correlation']:.3f}):")
            lines += [f"    {rel(p)}" for p in g["paths"]]
        if near.get("pairs", 0) > 50:
            lines.append(f"  ... and {near['pairs'] - 50} more pair(s) (--json lists up to {_PAIR_LIMIT})")

    if report["ignored"]:
        lines.append("")
        lines.append(f"Ignored (not used): {len(report['ignored'])}")
        lines += [f"  {rel(p)}" for p in report["ignored"]]
    if report["warnings"]:
        lines.append("")
        lines.append("Warnings:")
        lines += [f"  ! {w}" for w in report["warnings"]]
    return "\n".join(lines)
