"""``imgclf audit``: likely mislabelled images, outliers and duplicates, before training; reads only."""

from __future__ import annotations

import argparse
import logging
import sys

from imgclf.cli.common import add_runtime_flags, bounded, positive_int, printable, runtime_options

log = logging.getLogger("imgclf")


def register(subparsers, commands) -> None:
    p = subparsers.add_parser(
        "audit",
        help="find likely mislabelled images, outliers and duplicates before training",
        description=(
            "Out-of-fold probabilities for every training and validation image (stratified K-fold cross-validation of a "
            "logistic-regression head on the cached frozen backbone features), then confident learning (cleanlab) ranks the "
            "labels by quality and flags likely mislabels; feature-space outliers and identical images are flagged too. "
            "Writes audit.csv, audit.html (thumbnails of the top suspects beside typical images of the given and the "
            "suggested class), audit.json and skipped.csv into PROJECT/NAME (-2, -3... if taken). Never changes the dataset: "
            "to train without the images you reject, pass a file of their paths to `imgclf train --exclude FILE`."
        ),
    )
    p.add_argument("data", help="dataset root (train/ [validation/] [test/] or flat class folders)")
    p.add_argument("--project", default="runs", help="parent folder of the audit folder (default: runs)")
    p.add_argument("--name", default="audit", help="audit folder name; -2, -3... appended if taken (default: audit)")
    p.add_argument("--folds", type=bounded(int, "an integer", lambda v: v >= 2, ">= 2"), default=5, help="cross-validation folds (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default: 0)")
    p.add_argument("--backbone", default=None, help="backbone registry name for the features (default: efficientnet_lite0_stages, Lite0's last four stages pooled, as --recipe fast)")
    p.add_argument("--weights", default="imagenet", help="backbone weights: imagenet, none or a state-dict file (default: imagenet)")
    p.add_argument("--top", type=positive_int, default=50, help="label suspects shown in audit.html (default: 50)")
    p.add_argument("--no-duplicates", action="store_true", help="skip the exact-duplicate check (it decodes every image once more)")
    add_runtime_flags(p)
    commands["audit"] = cmd_audit


def cmd_audit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from imgclf.audit.core import ISSUE_LABEL, audit_dataset
    from imgclf.audit.render import write_audit
    from imgclf.config.settings import make_runtime
    from imgclf.fileio import default_cache_dir, is_within
    from imgclf.runs.folders import new_run_dir

    data = Path(args.data)
    if not data.is_dir():
        raise NotADirectoryError(f"{data}: not a folder")
    if is_within(Path(args.project), data):
        raise ValueError(f"--project {args.project} is inside the dataset {data}; imgclf never writes into the dataset folder")
    runtime = make_runtime(**runtime_options(args))
    if is_within(Path(runtime.cache_dir) if runtime.cache_dir else default_cache_dir(), data):
        raise ValueError(f"the feature cache is inside the dataset {data}; imgclf never writes into the dataset folder (set --cache-dir)")
    result = audit_dataset(data, folds=args.folds, seed=args.seed, backbone=args.backbone, weights=args.weights,
                           duplicates=not args.no_duplicates, **runtime.to_dict())
    out = new_run_dir(args.project, args.name)
    written = write_audit(result, out, top=args.top)
    s = result.summary()
    print(printable(f"audited {s['images']} images in {len(result.class_names)} classes ({result.folds}-fold out-of-fold accuracy {s['out_of_fold_accuracy']:.3f})"))
    print("issues: " + ", ".join(f"{k} {v}" for k, v in s["issues"].items()) + (f"; skipped {s['skipped']} unreadable" if s["skipped"] else ""))
    for r in result.issues(ISSUE_LABEL)[:10]:
        print(printable(f"  {r['label_quality']:.4f}  {r['given_label']} -> {r['suggested_label']}  {r['path']}"))
    for kind, path in written.items():
        print(printable(f"{kind}: {path}"), file=sys.stderr if kind in ("json", "skipped") else sys.stdout)
    return 0
