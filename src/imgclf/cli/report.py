"""``imgclf report``: (re)write a run folder's report.html and plots."""

from __future__ import annotations

import argparse
from pathlib import Path

def register(subparsers, commands) -> None:
    p = subparsers.add_parser(
        "report",
        help="(re)write a run folder's report.html",
        description=(
            "Write RUN/report.html (one self-contained file: dataset summary and leakage check, configuration, training "
            "curves, metrics with confidence intervals, plots, worst mistakes with Grad-CAM, environment) and RUN/plots/*.png."
        ),
    )
    p.add_argument("run", help="run folder (holds config.json, test_metrics.json, model.json, ...)")
    p.add_argument("--gradcam-images", type=int, default=8, help="worst mistakes shown with Grad-CAM (0: none; default: 8)")
    p.add_argument("--weights", default=None, help="where to read the backbone weights if not where training found them")
    commands["report"] = cmd_report


def cmd_report(args: argparse.Namespace) -> int:
    from imgclf.report.html import write_run_report

    run = Path(args.run)
    if not run.is_dir():
        raise ValueError(f"{run}: not a run folder")
    clf = None
    if args.weights:
        from imgclf.model.classifier import Classifier

        clf = Classifier.load(run, weights=args.weights)
    path = write_run_report(run, clf=clf, gradcam_images=args.gradcam_images)
    print(path)
    return 0
