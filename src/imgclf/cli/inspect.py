"""``imgclf inspect``: what a dataset holds and what is wrong with it; reads only."""

from __future__ import annotations

import json

from imgclf.cli.common import printable


def register(subparsers, commands) -> None:
    p = subparsers.add_parser("inspect", help="counts, image statistics and problems of a dataset", description="Counts per split and class, image sizes, unreadable/truncated/non-image files, exact and near duplicates (perceptual hash) and cross-split leakage. Reads only.")
    p.add_argument("data", help="dataset root")
    p.add_argument("--no-near-duplicates", action="store_true", help="skip the perceptual-hash near-duplicate check")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    commands["inspect"] = cmd_inspect


def cmd_inspect(args) -> int:
    from imgclf.data.inspection import format_report, inspect_dataset

    report = inspect_dataset(args.data, progress=not args.no_progress, near_duplicates=not args.no_near_duplicates)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(printable(format_report(report)))
    return 0
