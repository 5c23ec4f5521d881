"""``imgclf inspect``: what a dataset holds and what is wrong with it; reads only."""

from __future__ import annotations

import json

from imgclf.cli.common import printable


def register(subparsers, commands) -> None:
    p = subparsers.add_parser("inspect", help="counts, image statistics and problems of a dataset", description="Counts per split and class, image sizes, unreadable/truncated/non-image files, exact and near duplicates (perceptual hash) and cross-split leakage. Reads only.")
    p.add_argument("data", nargs="?", default=None, help="dataset root (or give --manifest instead)")
    p.add_argument("--manifest", default=None, help="a CSV path,label[,split] (header row; paths relative to its folder or absolute) instead of DATA")
    p.add_argument("--no-near-duplicates", action="store_true", help="skip the perceptual-hash near-duplicate check")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    commands["inspect"] = cmd_inspect


def cmd_inspect(args) -> int:
    from imgclf.data.inspection import format_report, inspect_dataset

    if (args.data is None) == (args.manifest is None):
        raise ValueError("give exactly one of DATA (a dataset folder) and --manifest FILE.csv")
    report = inspect_dataset(args.data, manifest=args.manifest, progress=not args.no_progress, near_duplicates=not args.no_near_duplicates)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(printable(format_report(report)))
    return 0
