"""Planted label noise: does `imgclf audit` find it?

For each seed, copies the dataset's train/ (and validation/, if any) into a temporary folder,
moves a seeded FRACTION of the training images into another (random) class folder, runs
`imgclf audit` on the copy and scores the ranking against the planted flips:

* precision@N: of the N images with the lowest label quality (N = number flipped), the
  share that were flipped;
* flagged: images cleanlab's find_label_issues flagged, and how many of them were flipped;
* ROC-AUC of (1 - label quality) for telling flipped from clean images.

The source dataset is only read; everything is written under --work (default: a new /tmp folder).

    .venv/bin/python benchmarks/bench_audit.py --data ../shared/data/flowers12 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sklearn.metrics import roc_auc_score

from imgclf.cli.main import main as imgclf_main
from imgclf.data.imaging import is_image_file


def planted_copy(data: Path, dest: Path, fraction: float, seed: int) -> set[str]:
    """Copy train/ (+ validation/) of ``data`` to ``dest`` and flip ``fraction`` of train's labels."""
    for split in ("train", "validation"):
        if (data / split).is_dir():
            shutil.copytree(data / split, dest / split)
    classes = sorted(p.name for p in (dest / "train").iterdir() if p.is_dir())
    images = sorted(p for c in classes for p in (dest / "train" / c).iterdir() if is_image_file(p))
    rng = random.Random(seed)
    chosen = rng.sample(images, round(fraction * len(images)))
    flipped = set()
    for src in chosen:
        new_class = rng.choice([c for c in classes if c != src.parent.name])
        dst = dest / "train" / new_class / f"flipped-{src.parent.name}-{src.name}"
        shutil.move(src, dst)
        flipped.add(str(dst.resolve()))
    return flipped


def score(audit_csv: Path, flipped: set[str]) -> dict:
    with open(audit_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    is_flipped = [str(Path(r["path"]).resolve()) in flipped for r in rows]
    n = len(flipped)
    top = sum(is_flipped[:n])  # rows are sorted by label quality, worst first
    flagged = [f for r, f in zip(rows, is_flipped) if "label" in r["issue"].split(";")]
    return {
        "images": len(rows), "flipped": n, "precision_at_n": top / n, "flagged": len(flagged), "flagged_flipped": sum(flagged),
        "roc_auc": roc_auc_score(is_flipped, [1.0 - float(r["label_quality"]) for r in rows]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/flowers12")
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder under /tmp)")
    ap.add_argument("--backbone", default=None, help="imgclf audit --backbone (default: the audit's own)")
    args = ap.parse_args(argv)
    data = Path(args.data)
    work = Path(args.work or tempfile.mkdtemp(prefix="imgclf-bench-audit-"))
    results = []
    for seed in args.seeds:
        copy = work / f"noisy-seed{seed}"
        flipped = planted_copy(data, copy, args.fraction, seed)
        command = ["-q", "audit", str(copy), "--project", str(work / "audits"), "--name", f"seed{seed}", "--folds", str(args.folds),
                   "--seed", str(seed), "--no-progress", *(["--backbone", args.backbone] if args.backbone else [])]
        print("imgclf " + " ".join(command), file=sys.stderr)
        t0 = time.perf_counter()
        if imgclf_main(command) != 0:
            return 1
        results.append({"seed": seed, **score(work / "audits" / f"seed{seed}" / "audit.csv", flipped), "seconds": time.perf_counter() - t0})
        shutil.rmtree(copy)
    print(f"\n{data}: {args.fraction:.0%} of train labels flipped, {args.folds}-fold out-of-fold audit, backbone {args.backbone or 'default'}\n")
    print("| seed | images | flipped (N) | precision@N | flagged by cleanlab (flipped among them) | ROC-AUC | seconds |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['seed']} | {r['images']} | {r['flipped']} | {r['precision_at_n']:.3f} | {r['flagged']} ({r['flagged_flipped']}) | {r['roc_auc']:.4f} | {r['seconds']:.1f} |")
    mean = lambda k: sum(r[k] for r in results) / len(results)  # noqa: E731
    print(f"| mean | | | {mean('precision_at_n'):.3f} | | {mean('roc_auc'):.4f} | |")
    print(f"\naudit folders: {work / 'audits'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
